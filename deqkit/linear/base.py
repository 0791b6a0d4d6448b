"""Linear solvers for the adjoint equation of the exact implicit gradient.

The exact gradient needs ``w`` with ``w = wJ + v`` (``J = ∂f/∂z`` at ``z*``, ``v = ∂L/∂z*``,
row vectors), i.e. ``w (I − J) = v``. Only vector–Jacobian products ``u ↦ uJ`` are available.

Any forward solver of :mod:`deqkit.solvers` solves it as the fixed point ``w ↦ wJ + v``
(:meth:`deqkit.solvers.Solver.solve_adjoint`). This module adds two solvers that use the
linearity: :class:`GMRES` (Krylov, per sample, restarted) and :class:`Dense` (builds ``J``
explicitly; for tests and tiny states). All return a :class:`~deqkit.solvers.SolverResult`.

The relative residual of an adjoint solve is ``‖w − wJ − v‖ / ‖v‖``.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

from .._options import options_repr, check_choice, check_int, check_positive
from ..errors import NonFiniteError
from ..solvers import STOP_MODES, SolverResult

Fn = Callable[[Tensor], Tensor]


def _result(
    name: str, w: Tensor, v: Tensor, res: Tensor, nstep: Tensor, trace: list[Tensor], tol: float, stop_mode: str, max_iter: int
) -> SolverResult:
    vnorm = v.norm(dim=1)
    eps = torch.finfo(v.dtype).eps
    rel = res / (vnorm + eps)
    measure = rel if stop_mode == "rel" else res
    abs_trace = torch.stack(trace) if trace else res[None]
    return SolverResult(
        z=w,
        nstep=nstep,
        abs_residual=res,
        rel_residual=rel,
        converged=measure <= tol,
        abs_trace=abs_trace,
        rel_trace=abs_trace / (vnorm + eps),
        tol=tol,
        stop_mode=stop_mode,
        max_iter=max_iter,
        solver=name,
    )


def _check_finite(name: str, t: Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(
            f"{name}: the adjoint solve produced NaN/Inf ({what}). The Jacobian at the fixed point may be "
            f"ill-conditioned (spectral radius ≥ 1): check that the forward solve converged."
        )


class LinearSolver:
    """Base class of the dedicated adjoint solvers (``solve_adjoint`` is the one call)."""

    name: ClassVar[str] = "linear"

    def __init__(self, *, tol: float, max_iter: int, stop_mode: str) -> None:
        owner = type(self).__name__
        check_positive(owner, "tol", tol)
        check_int(owner, "max_iter", max_iter)
        check_choice(owner, "stop_mode", stop_mode, STOP_MODES)
        self.tol, self.max_iter, self.stop_mode = float(tol), int(max_iter), stop_mode

    def __repr__(self) -> str:
        return options_repr(self)

    def solve_adjoint(
        self, vjp: Fn, v: Tensor, w0: Optional[Tensor] = None, *, tol: Optional[float] = None, max_iter: Optional[int] = None
    ) -> SolverResult:
        """Solve ``w = vjp(w) + v`` for rows ``w`` shaped like ``v``, from ``w0`` (default zero).

        ``tol`` / ``max_iter`` override the solver's own settings. The result's ``z`` is ``w``;
        its relative residual is ``‖w − wJ − v‖ / ‖v‖``.
        """
        raise NotImplementedError
