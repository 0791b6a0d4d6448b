"""The forward fixed-point solvers as adjoint linear solvers."""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor

from .._options import validated_options
from ..errors import OptionError
from ..solvers.base import Solver, SolverResult
from .base import Fn, LinearSolver

__all__ = ["FixedPointAdjoint", "as_linear_solver"]


@validated_options
class FixedPointAdjoint(LinearSolver):
    """A forward solver (:class:`~deqkit.solvers.FixedPoint`, :class:`~deqkit.solvers.Anderson`,
    :class:`~deqkit.solvers.Broyden`, or one you registered) solving the adjoint equation as the
    fixed point ``w ↦ wJ + v``.

    Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019, solve the backward pass with
    the forward solver this way. Without ``w0`` the iteration starts at ``w = v`` (one free Picard
    step from zero), so even a capped solve never returns a zero adjoint. The solver's ``tol``,
    ``max_iter`` and ``stop_mode`` apply, with the adjoint residual of :mod:`deqkit.linear.base`
    (relative: ``‖w − wJ − v‖ / ‖v‖``). ``accepts_inverse`` when the solver takes an ``inverse0``
    call option (Broyden): then ``inverse=`` is its initial inverse estimate.

    :class:`~deqkit.estimators.Exact` wraps a forward solver in this adapter itself.
    """

    def __init__(self, solver: Solver) -> None:
        if not isinstance(solver, Solver):
            raise OptionError(
                f"FixedPointAdjoint: solver must be a deqkit forward solver (a Solver), got {type(solver).__name__}."
            )
        self.solver = solver

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.solver.name

    @property
    def tol(self) -> float:  # type: ignore[override]
        return self.solver.tol

    @property
    def max_iter(self) -> int:  # type: ignore[override]
        return self.solver.max_iter

    @property
    def stop_mode(self) -> str:  # type: ignore[override]
        return self.solver.stop_mode

    @property
    def accepts_inverse(self) -> bool:  # type: ignore[override]
        return "inverse0" in self.solver.call_options

    def __repr__(self) -> str:
        return f"FixedPointAdjoint({self.solver!r})"

    def _solve(
        self, vjp: Fn, v: Tensor, w0: Optional[Tensor], tol: float, max_iter: int, options: dict[str, Any]
    ) -> SolverResult:
        start = v.clone() if w0 is None else w0
        call_options = {"inverse0": options["inverse"]} if "inverse" in options else {}
        scale = v.reshape(v.shape[0], -1).norm(dim=1)  # the adjoint residual is relative to ‖v‖
        return self.solver._solve(lambda w: vjp(w) + v, start, max_iter=max_iter, tol=tol, options=call_options, rel_scale=scale)


def as_linear_solver(solver: Union[Solver, LinearSolver]) -> LinearSolver:
    """``solver`` as an adjoint :class:`LinearSolver`: a forward solver is wrapped in :class:`FixedPointAdjoint`."""
    if isinstance(solver, LinearSolver):
        return solver
    if isinstance(solver, Solver):
        return FixedPointAdjoint(solver)
    raise OptionError(
        f"linear_solver must be a deqkit solver (GMRES, Dense, or a forward solver: FixedPoint, Anderson, Broyden), "
        f"got {type(solver).__name__}."
    )
