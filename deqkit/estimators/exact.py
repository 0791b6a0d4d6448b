"""The exact implicit gradient."""

from __future__ import annotations

from typing import ClassVar, Optional, Union

import torch
from torch import Tensor

from .._options import check_choice, check_failure_policy, check_int, check_positive, validated_options
from ..errors import apply_failure_policy
from ..linear import GMRES, LinearSolver, as_linear_solver
from ..registry import register_estimator
from ..solvers.base import Solver, SolverResult
from .base import AdjointEstimator, BackwardStats, Vjp

__all__ = ["Exact"]


@register_estimator("exact")
@validated_options
class Exact(AdjointEstimator):
    """Exact implicit gradient (implicit function theorem): solve ``w = wJ + v``.

    Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019. The adjoint equation is
    solved by ``linear_solver``: a :class:`~deqkit.linear.LinearSolver`
    (:class:`~deqkit.linear.GMRES`, :class:`~deqkit.linear.Dense`) or any forward solver
    (:class:`~deqkit.solvers.FixedPoint`, :class:`~deqkit.solvers.Anderson`,
    :class:`~deqkit.solvers.Broyden`), which is wrapped in :class:`~deqkit.linear.FixedPointAdjoint`.

    Args:
        linear_solver: the adjoint solver (default ``GMRES(restart=20)``).
        tol, max_iter: override the linear solver's own tolerance and cap when given. Every
            adjoint solver measures the relative residual ``‖w − wJ − v‖ / ‖v‖``.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when the solve misses its
            tolerance; the result is always in ``info.backward.solve``. NaN/Inf always raises.
        warm_start: ``"default"`` (the linear solver's own start: zero for GMRES, ``w = v`` for the
            fixed-point-type solvers) or ``"jfb"`` (start at ``w = v`` whatever the solver).
    """

    name = "exact"
    warm_starts: ClassVar[tuple[str, ...]] = ("default", "jfb")

    def __init__(
        self,
        linear_solver: Optional[Union[Solver, LinearSolver]] = None,
        *,
        tol: Optional[float] = None,
        max_iter: Optional[int] = None,
        on_failure: str = "warn",
        warm_start: str = "default",
    ) -> None:
        owner = type(self).__name__
        if linear_solver is None:
            linear_solver = GMRES(tol=1e-6, max_iter=60)
        #: the adjoint solver as a :class:`~deqkit.linear.LinearSolver` (a forward solver, wrapped)
        self.adjoint = as_linear_solver(linear_solver)
        self.linear_solver = linear_solver
        self.tol = None if tol is None else check_positive(owner, "tol", tol)
        self.max_iter = None if max_iter is None else check_int(owner, "max_iter", max_iter)
        self.on_failure = check_failure_policy(owner, on_failure)
        check_choice(owner, "warm_start", warm_start, self.warm_starts)
        self.warm_start = warm_start

    def initial_guess(self, v: Tensor, result: SolverResult) -> Optional[Tensor]:
        """The adjoint solve's start (``None``: the linear solver's own)."""
        return v.clone() if self.warm_start == "jfb" else None

    def compute_w(self, v: Tensor, vjp: Vjp, result: SolverResult, stats: BackwardStats) -> Tensor:
        sol = self.adjoint.solve_adjoint(vjp, v, w0=self.initial_guess(v, result), tol=self.tol, max_iter=self.max_iter)
        return self.finish(sol, stats)

    def finish(self, sol: SolverResult, stats: BackwardStats) -> Tensor:
        """Record the adjoint solve and apply the ``on_failure`` policy; return ``w``."""
        stats.solve = sol
        if not sol.all_converged and self.on_failure != "ignore":
            msg = (
                f"Exact backward: {sol.summary()}. The gradient is inexact. Raise max_iter or tol of the linear "
                f"solver, try GMRES, or check the forward solve converged (spectral radius of J must be < 1)."
            )
            apply_failure_policy(self.on_failure, msg, stacklevel=2)
        return sol.z

    def adjoint_closed_form(self, v: Tensor, J: Tensor, inverse: Optional[Tensor] = None) -> Optional[Tensor]:
        """``w = v (I − J)⁻¹``."""
        eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
        return torch.linalg.solve((eye - J).transpose(1, 2), v.unsqueeze(-1)).squeeze(-1)
