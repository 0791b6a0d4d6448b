"""Conjugate gradient for symmetric positive-definite systems, per sample over a batch."""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from .._options import check_int, check_positive, validated_options
from ..errors import NonFiniteError, OptionError
from ..registry import register_linear_solver
from ..solvers import SolverResult
from .base import Fn, LinearSolver, _check_finite, _result

__all__ = ["CG"]


@register_linear_solver("cg")
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
    iteration (a single system keeps its scalars on the host, as a textbook CG).

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
        iterate = self._iterate_one if b.shape[0] == 1 else self._iterate_batch
        x, rr, nstep, trace = iterate(matvec, x, r, target, max_iter)
        _check_finite(self.name, x, "solution")
        result = _result(self.name, x, b, rr.sqrt(), nstep, list(trace.sqrt()), tol, self.stop_mode, max_iter)
        result.time_s = time.perf_counter() - start
        return result

    def _iterate_one(self, matvec: Fn, x: Tensor, r: Tensor, target: Tensor, max_iter: int):
        """CG on a single system ``(1, d)``, its scalars on the host: the textbook loop, with
        fewer tensor operations per iteration than the masked batch loop."""
        tgt, rr, n = float(target[0]), float(r[0] @ r[0]), 0
        trace = [rr]
        if math.sqrt(rr) > tgt:
            p = r.clone()
            for n in range(1, max_iter + 1):  # noqa: B007 - n is read after the loop
                ap = matvec(p)
                pap = float(p[0] @ ap[0])
                if not pap > 0:
                    self._curvature_error(pap)
                alpha = rr / pap
                x = x + alpha * p
                r = r - alpha * ap
                rr_new = float(r[0] @ r[0])
                trace.append(rr_new)
                if math.sqrt(rr_new) <= tgt:
                    rr = rr_new
                    break
                p = r + (rr_new / rr) * p
                rr = rr_new
        as_tensor = partial(torch.tensor, dtype=x.dtype, device=x.device)
        return x, as_tensor([rr]), torch.tensor([n], device=x.device), as_tensor(trace)[:, None]

    def _iterate_batch(self, matvec: Fn, x: Tensor, r: Tensor, target: Tensor, max_iter: int):
        """CG per sample of a batch ``(B, d)``: converged samples take zero steps; one host
        synchronisation per iteration (the curvature and stopping tests together)."""
        rr = (r * r).sum(dim=1)
        active = rr.sqrt() > target
        nstep = torch.zeros(r.shape[0], dtype=torch.long, device=r.device)
        trace = [rr]
        p = r.clone()
        all_active, any_active = torch.stack([active.all(), active.any()]).tolist()
        for _ in range(max_iter if any_active else 0):
            ap = matvec(p)
            pap = (p * ap).sum(dim=1)
            alpha = rr / pap if all_active else torch.where(active, rr / pap, 0.0)
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * ap
            rr_new = (r * r).sum(dim=1)
            nstep += active
            still = active & (rr_new.sqrt() > target)
            bad, now_all, any_active = torch.stack([(active & ~(pap > 0)).any(), still.all(), still.any()]).tolist()
            if bad:
                self._curvature_error(float(torch.where(active, pap, float("inf")).min()))
            beta = (rr_new / rr)[:, None]
            if all_active:
                p, rr = r + beta * p, rr_new
            else:  # frozen samples keep a finite p and their last residual
                p, rr = torch.where(still[:, None], r + beta * p, p), torch.where(active, rr_new, rr)
            active, all_active = still, now_all
            trace.append(rr)
            if not any_active:
                break
        return x, rr, nstep, torch.stack(trace)

    def _curvature_error(self, pap: float) -> None:
        """Raise for a non-finite or non-positive ``pᵀAp`` of a system still iterating."""
        if not math.isfinite(pap):
            raise NonFiniteError(f"{self.name}: a matrix–vector product is not finite (pᵀAp = {pap}).")
        raise NonFiniteError(
            f"{self.name}: non-positive curvature pᵀAp={pap:.3e}: the operator is not positive "
            f"definite, so conjugate gradient does not apply (use GMRES for a non-symmetric or indefinite system)."
        )

    def _solve(
        self, vjp: Fn, v: Tensor, w0: Optional[Tensor], tol: float, max_iter: int, options: dict[str, Any]
    ) -> SolverResult:
        """Solve ``w = vjp(w) + v``, i.e. ``A(w) = v`` with ``A(w) = w − vjp(w) = w (I − J)``
        (called by :meth:`~deqkit.linear.LinearSolver.solve_adjoint`, which checks the operands and
        applies the dtype policy).

        Valid only when ``I − J`` is symmetric positive definite (``J`` symmetric with every
        eigenvalue below 1, e.g. a gradient-descent step on a strongly convex function); a
        non-positive curvature raises :class:`~deqkit.errors.NonFiniteError` (use
        :class:`GMRES` otherwise). Rows ``w`` are shaped like ``v``; the relative residual is
        ``‖w − wJ − v‖ / ‖v‖``, as for every linear solver. CG takes no ``preconditioner`` or
        ``inverse`` (a preconditioner for CG must itself be symmetric positive definite, which a
        Broyden inverse estimate is not).
        """
        shape, B = v.shape, v.shape[0]
        vf = v.reshape(B, -1)

        def op(w: Tensor) -> Tensor:
            return w - vjp(w.view(shape)).reshape(B, -1)

        res = self.solve(op, vf, x0=None if w0 is None else w0.reshape(B, -1), tol=tol, max_iter=max_iter)
        res.z = res.z.view(shape)
        return res
