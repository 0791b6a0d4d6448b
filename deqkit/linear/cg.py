"""Conjugate gradient for symmetric positive-definite systems, per sample over a batch."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from .._options import check_int, check_positive, validated_options
from ..errors import NonFiniteError, OptionError
from ..solvers import SolverResult
from .base import Fn, LinearSolver, _check_finite, _result

__all__ = ["CG"]


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row inner products ``(B,)``. A batch of one takes the plain dot product, so a solve
    of one system is bitwise that of an unbatched CG (CG amplifies round-off differences)."""
    if a.shape[0] == 1:
        return (a[0] @ b[0]).reshape(1)
    return (a * b).sum(dim=1)


@validated_options
class CG(LinearSolver):
    """Conjugate gradient (Hestenes & Stiefel, "Methods of conjugate gradients for solving
    linear systems", J. Res. NBS 1952; Nocedal & Wright, "Numerical Optimization", Alg. 5.2)
    for ``A x = b`` with ``A`` symmetric positive definite, given only products ``x ↦ A x``.

    Every sample of a batch ``(B, d)`` runs its own CG and stops on its own test: with
    ``stop_mode="rel"`` when ``‖b − A x‖ ≤ tol·‖b‖``, with ``"abs"`` when ``‖b − A x‖ ≤ tol``
    (``‖b − A x‖`` is CG's recursively updated residual). A converged sample stops changing;
    the loop ends when all have converged or after ``max_iter`` iterations (one product each;
    ``nstep`` counts a sample's own iterations). The result's ``z`` is the solution.

    A non-positive curvature ``pᵀAp ≤ 0`` (``A`` not positive definite) or a non-finite
    product raises :class:`~deqkit.errors.NonFiniteError`. One host synchronisation per
    iteration.

    Two entry points: :meth:`solve` (any SPD ``A``; the bi-level Hessian systems) and
    :meth:`solve_adjoint` (the adjoint protocol shared with :class:`GMRES` and :class:`Dense`).
    """

    name = "cg"
    accepts_preconditioner: ClassVar[bool] = False
    accepts_inverse: ClassVar[bool] = False
    #: CG is correct only for symmetric positive-definite systems (for the adjoint: ``I − J``
    #: with ``J`` symmetric, eigenvalues below 1); a test matrix gives CG only such systems
    requires_symmetric: ClassVar[bool] = True

    def __init__(self, *, tol: float = 1e-6, max_iter: int = 100, stop_mode: str = "rel") -> None:
        super().__init__(tol=tol, max_iter=max_iter, stop_mode=stop_mode)

    def solve(
        self, matvec: Fn, b: Tensor, *, x0: Optional[Tensor] = None, tol: Optional[float] = None, max_iter: Optional[int] = None
    ) -> SolverResult:
        """Solve ``A x = b`` for each row of ``b`` (shape ``(B, d)``), from ``x0`` (default zero).

        ``matvec`` maps a ``(B, d)`` batch of vectors to their products with ``A`` (one
        symmetric positive-definite ``A`` per sample). ``tol`` / ``max_iter`` override the
        solver's own settings for this call.
        """
        start = time.perf_counter()
        owner = f"{type(self).__name__}.solve"
        tol = self.tol if tol is None else check_positive(owner, "tol", tol)
        max_iter = self.max_iter if max_iter is None else check_int(owner, "max_iter", max_iter)
        if b.dim() != 2:
            raise OptionError(f"{owner}: b must be a (B, d) batch, got shape {tuple(b.shape)}.")
        x = torch.zeros_like(b) if x0 is None else x0.detach().reshape(b.shape).clone()
        r = b - matvec(x) if x0 is not None else b.clone()
        eps = torch.finfo(b.dtype).eps
        target = tol * (b.norm(dim=1) + eps) if self.stop_mode == "rel" else torch.full_like(b[:, 0], tol)
        rr = _rowdot(r, r)
        active = rr.sqrt() > target
        nstep = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        trace = [rr.sqrt()]
        p = r.clone()
        for _ in range(max_iter if bool(active.any()) else 0):
            ap = matvec(p)
            pap = _rowdot(p, ap)
            self._check_curvature(pap, active)
            alpha = torch.where(active, rr / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(pap))
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * ap
            rr_new = _rowdot(r, r)
            nstep = nstep + active.long()
            still = active & (rr_new.sqrt() > target)
            beta = rr_new / torch.where(active, rr, torch.ones_like(rr))
            p = torch.where(still[:, None], r + beta[:, None] * p, p)
            rr = torch.where(active, rr_new, rr)
            active = still
            trace.append(rr.sqrt())
            if not bool(active.any()):
                break
        _check_finite(self.name, x, "solution")
        result = _result(self.name, x, b, rr.sqrt(), nstep, trace, tol, self.stop_mode, max_iter)
        result.time_s = time.perf_counter() - start
        return result

    def _check_curvature(self, pap: Tensor, active: Tensor) -> None:
        """Raise on a non-finite or non-positive ``pᵀAp`` of a sample still iterating."""
        nonfinite, nonpositive = torch.stack([(active & ~torch.isfinite(pap)).any(), (active & (pap <= 0)).any()]).tolist()
        if nonfinite:
            raise NonFiniteError(f"{self.name}: a matrix–vector product is not finite (pᵀAp = NaN/Inf).")
        if nonpositive:
            worst = float(torch.where(active, pap, torch.full_like(pap, float("inf"))).min())
            raise NonFiniteError(
                f"{self.name}: non-positive curvature pᵀAp={worst:.3e}: the operator is not positive definite, "
                f"so conjugate gradient does not apply (use GMRES for a non-symmetric or indefinite system)."
            )

    def solve_adjoint(
        self,
        vjp: Fn,
        v: Tensor,
        *,
        w0: Optional[Tensor] = None,
        tol: Optional[float] = None,
        max_iter: Optional[int] = None,
        preconditioner: Any = None,
        inverse: Any = None,
    ) -> SolverResult:
        """Solve ``w = vjp(w) + v``, i.e. ``A(w) = v`` with ``A(w) = w − vjp(w) = w (I − J)``.

        Valid only when ``I − J`` is symmetric positive definite (``J`` symmetric with every
        eigenvalue below 1, e.g. a gradient-descent step on a strongly convex function); a
        non-positive curvature raises :class:`~deqkit.errors.NonFiniteError` (use
        :class:`GMRES` otherwise). Rows ``w`` are shaped like ``v``; the relative residual is
        ``‖w − wJ − v‖ / ‖v‖``, as for every linear solver. CG takes no ``preconditioner`` or
        ``inverse`` (a preconditioner for CG must itself be symmetric positive definite, which a
        Broyden inverse estimate is not).
        """
        for opt, val in (("preconditioner", preconditioner), ("inverse", inverse)):
            if val is not None:
                raise OptionError(f"{type(self).__name__}.solve_adjoint does not take {opt}= (accepts_{opt} is False); "
                                  "use GMRES for a preconditioned adjoint solve.")
        shape, B = v.shape, v.shape[0]
        vf = v.reshape(B, -1)

        def op(w: Tensor) -> Tensor:
            return w - vjp(w.view(shape)).reshape(B, -1)

        res = self.solve(op, vf, x0=None if w0 is None else w0.reshape(B, -1), tol=tol, max_iter=max_iter)
        res.z = res.z.view(shape)
        return res
