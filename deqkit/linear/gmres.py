"""Restarted GMRES for the adjoint equation, with the Krylov bookkeeping kept off the critical path.

Per Krylov step the work is one VJP, two block projections against the stacked basis
(classical Gram–Schmidt with one reorthogonalisation, as batched matrix products), a norm, and
one Givens rotation of the small least-squares problem (float64; the earlier rotations are
applied to the new column as one product with their accumulated matrix): no Python loop over
basis vectors and no host synchronisation. The residual estimate after every step stays on the
device; *checks* read it, so each sample stops at the first step where it met its target
whichever step the check ran at, and the next check is scheduled from the observed rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from .._options import check_int, validated_options
from ..errors import OptionError
from ..registry import register_linear_solver
from ..solvers.base import SolverResult
from .base import Fn, LinearSolver, _check_finite, _result

__all__ = ["GMRES", "KrylovRun"]

#: the longest stretch of Krylov steps between two checks
_MAX_CHECK_GAP = 8


class KrylovRun:
    """The state of one restarted-GMRES solve on rows ``(B, d)`` (used by :class:`GMRES` and by
    adjoint policies that hand over to GMRES with an iterate and its residual already known).

    Args:
        op: ``y ↦ P(y)(I − J)`` on rows ``(B, d)`` (one VJP).
        vf: the right-hand side ``(B, d)``.
        target: per-sample absolute residual target ``(B,)``.
        restart: the Krylov basis size.
        first_check: Krylov steps before the first check (later ones are predicted).
    """

    def __init__(self, op: Fn, vf: Tensor, target: Tensor, restart: int, first_check: int = 2) -> None:
        self.op, self.vf, self.target, self.restart = op, vf, target, restart
        self.first_check = max(1, first_check)
        self.nstep = torch.zeros(vf.shape[0], dtype=torch.long, device=vf.device)
        self.used = 0  # VJPs spent (Krylov steps + true residuals), against max_iter
        self.trace: list[Tensor] = []
        self.checks = 0  # host synchronisations on the Krylov least squares

    def run(self, y: Tensor, r: Tensor, max_iter: int) -> tuple[Tensor, Tensor]:
        """Restarted GMRES from ``y`` whose true residual ``v − op(y)`` is ``r``; returns ``(y, r)``."""
        while True:
            beta = r.norm(dim=1)
            self.trace.append(beta)
            active = beta > self.target
            nonfinite, any_active = torch.stack([~torch.isfinite(beta).all(), active.any()]).tolist()
            if nonfinite:
                _check_finite("gmres", beta, "residual")
            if self.used >= max_iter or not any_active:
                return y, r
            k_max = min(self.restart, max_iter - self.used)
            y = y + self._cycle(r, beta, active, k_max)
            r = self.vf - self.op(y)  # true residual (one extra product) before a restart or the end
            self.used += 1

    def _cycle(self, r: Tensor, beta: Tensor, active: Tensor, k_max: int) -> Tensor:
        """One Arnoldi cycle of up to ``k_max`` steps from residual ``r``; the step to add to ``y``."""
        B, d = r.shape
        dev, f64 = r.device, torch.float64
        V = r.new_empty(B, k_max + 1, d)  # the orthonormal basis, one row per Krylov vector
        V[:, 0] = r / torch.where(beta > 0, beta, torch.ones_like(beta))[:, None]
        # the least squares, in float64: Q accumulates the Givens rotations (so a new Hessenberg
        # column is rotated by one product), R is the rotated Hessenberg, est[:, i] the residual
        # estimate with i basis vectors
        Q = torch.eye(k_max + 1, dtype=f64, device=dev).expand(B, k_max + 1, k_max + 1).contiguous()
        R = torch.zeros(B, k_max, k_max, dtype=f64, device=dev)
        est = torch.zeros(B, k_max + 1, dtype=f64, device=dev)
        est[:, 0] = beta
        b64 = beta.to(f64)
        tiny = torch.finfo(r.dtype).tiny
        j = 0  # Krylov steps taken in this cycle
        next_check = min(self.first_check, k_max)
        while True:
            u = self.op(V[:, j])
            self.used += 1
            basis = V[:, : j + 1]  # (B, j+1, d)
            bt = basis.transpose(1, 2)
            u3 = u.unsqueeze(1)
            h = torch.bmm(u3, bt)  # classical Gram–Schmidt, as block products
            u3 = u3 - torch.bmm(h, basis)
            h2 = torch.bmm(u3, bt)  # … and once more ("twice is enough")
            u3 = u3 - torch.bmm(h2, basis)
            hn = u3.norm(dim=2, keepdim=True)  # (B, 1, 1)
            V[:, j + 1] = (u3 / hn.clamp_min(tiny)).squeeze(1)  # hn ≈ 0: breakdown (the LS masks it)
            # rotate the new Hessenberg column by the previous rotations, then annihilate hn
            col = torch.bmm(Q[:, : j + 1, : j + 1], (h + h2).to(f64).transpose(1, 2)).squeeze(2)  # (B, j+1)
            a, b = col[:, j], hn.reshape(B).to(f64)
            den = torch.hypot(a, b)
            ok = den > 0
            safe = torch.where(ok, den, torch.ones_like(den))
            c = torch.where(ok, a / safe, torch.ones_like(den))
            s = torch.where(ok, b / safe, torch.zeros_like(den))
            R[:, :j, j] = col[:, :j]
            R[:, j, j] = den
            row = Q[:, j, : j + 1].clone()
            Q[:, j, : j + 1] = c[:, None] * row
            Q[:, j + 1, : j + 1] = -s[:, None] * row
            Q[:, j, j + 1] = s
            Q[:, j + 1, j + 1] = c
            est[:, j + 1] = (b64 * Q[:, j + 1, 0]).abs()
            j += 1
            if j < next_check and j < k_max:
                continue
            k_s, all_done = self._check(est, j, active)
            if all_done or j >= k_max:
                break
            next_check = min(k_max, j + self._predict(est, j, active))
        steps = torch.where(active, k_s, torch.zeros_like(k_s))
        self.nstep = self.nstep + steps
        coeff = self._least_squares(R[:, :j, :j], b64[:, None] * Q[:, :j, 0], steps)
        return torch.bmm(coeff.to(V.dtype).unsqueeze(1), V[:, :j]).squeeze(1)

    def _check(self, est: Tensor, j: int, active: Tensor) -> tuple[Tensor, bool]:
        """``(first, all_done)``: per sample the fewest basis vectors meeting the target (``j`` where
        none does) and whether every active sample met it (one host synchronisation)."""
        self.checks += 1
        res = est[:, : j + 1]
        met = res <= self.target.to(res.dtype)[:, None]
        reached = met.any(dim=1)
        first = torch.where(reached, met.long().argmax(dim=1), torch.full_like(reached, j, dtype=torch.long))
        nonfinite, all_done = torch.stack([~torch.isfinite(res).all(), (reached | ~active).all()]).tolist()
        if nonfinite:
            _check_finite("gmres", res, "Krylov least squares")
        return first, bool(all_done)

    def _predict(self, est: Tensor, j: int, active: Tensor) -> int:
        """Steps until the slowest active sample should meet its target, from its recent rate."""
        m = min(j, 3)
        now, before = est[:, j], est[:, j - m]
        tgt = self.target.to(est.dtype)
        left = active & (now > tgt)
        rate = (now / before.clamp_min(1e-300)).clamp(1e-12, 1.0) ** (1.0 / m)
        need = torch.log(tgt.clamp_min(1e-300) / now.clamp_min(1e-300)) / torch.log(rate).clamp(max=-1e-3)
        worst = float(torch.where(left, need, torch.zeros_like(need)).max())
        return int(min(_MAX_CHECK_GAP, max(1, math.ceil(worst)))) if math.isfinite(worst) else _MAX_CHECK_GAP

    @staticmethod
    def _least_squares(R: Tensor, g: Tensor, steps: Tensor) -> Tensor:
        """Per sample, ``R y = g`` on its first ``steps`` unknowns (zero beyond); ``(B, j)``."""
        j = R.shape[-1]
        idx = torch.arange(j, device=R.device)
        keep = idx[None, :] < steps[:, None]  # (B, j)
        keep2 = keep[:, :, None] & keep[:, None, :]
        eye = torch.eye(j, dtype=R.dtype, device=R.device).expand_as(R)
        Rm = torch.where(keep2, R, eye)
        diag = torch.diagonal(Rm, dim1=1, dim2=2)
        Rm = Rm + torch.diag_embed(torch.where(diag == 0, torch.ones_like(diag), torch.zeros_like(diag)))
        gm = torch.where(keep, g, torch.zeros_like(g))
        return torch.linalg.solve_triangular(Rm, gm.unsqueeze(2), upper=True).squeeze(2)


@register_linear_solver("gmres")
@validated_options
class GMRES(LinearSolver):
    """Restarted GMRES on ``w (I − J) = v``, one Krylov space per sample, built on VJPs.

    Saad & Schultz, "GMRES: a generalized minimal residual algorithm", SIAM J. Sci. Stat.
    Comput. 1986. ``max_iter`` caps the Krylov steps (one VJP each); each restart cycle adds one
    more VJP for the true residual. ``restart`` bounds the Krylov basis kept in memory.

    Orthogonalisation is classical Gram–Schmidt with one reorthogonalisation (Giraud, Langou &
    Rozložník, "The loss of orthogonality in the Gram–Schmidt processes", Comput. Math. Appl.
    2005: "twice is enough"), as two batched products against a preallocated basis. The small
    least-squares problem is solved in float64 by a QR factorisation (deterministic, unlike a
    batched LAPACK ``lstsq``) only at *checks*: one QR gives the residual estimate after every
    step, so each sample stops at the first step where it met ``tol`` (``nstep`` counts those
    steps) and its result does not depend on when the check ran; the next check is scheduled
    from the observed rate (at most ``8`` steps ahead), so there is no host synchronisation per
    Krylov step. Samples converged at the start of a restart cycle stop changing.

    ``solve_adjoint(..., preconditioner=P)``: a map ``P`` on rows ``(B, d)`` with
    ``P(y) ≈ y (I − J)⁻¹``; GMRES then runs on ``y ↦ P(y)(I − J)`` (right preconditioning, Saad,
    "Iterative Methods for Sparse Linear Systems", §9.3) and returns ``w = P(y)``. The residual,
    the stopping test and ``nstep`` stay those of ``w``. It starts at ``w = 0``, so ``w0`` must be
    ``None``: the first Krylov step already holds ``P(v)``.
    """

    name = "gmres"
    accepts_preconditioner = True

    def __init__(self, *, restart: int = 20, tol: float = 1e-6, max_iter: int = 60, stop_mode: str = "rel") -> None:
        super().__init__(tol=tol, max_iter=max_iter, stop_mode=stop_mode)
        self.restart = check_int(type(self).__name__, "restart", restart)

    def target(self, vf: Tensor, tol: float) -> Tensor:
        """Per-sample absolute residual target for rows ``vf`` ``(B, d)``."""
        vnorm = vf.norm(dim=1)
        eps = torch.finfo(vf.dtype).eps
        return tol * (vnorm + eps) if self.stop_mode == "rel" else torch.full_like(vnorm, tol)

    def _solve(
        self, vjp: Fn, v: Tensor, w0: Optional[Tensor], tol: float, max_iter: int, options: dict[str, Any]
    ) -> SolverResult:
        preconditioner = options.get("preconditioner")
        if preconditioner is not None and w0 is not None:
            raise OptionError("GMRES: pass either w0 or preconditioner (a preconditioned solve starts at w = 0).")
        shape, B = v.shape, v.shape[0]
        vf = v.reshape(B, -1)
        op, to_w = self.operator(vjp, shape, preconditioner)
        run = KrylovRun(op, vf, self.target(vf, tol), self.restart)
        if w0 is None:
            y, r = vf.new_zeros(vf.shape), vf.clone()
        else:
            y = w0.reshape(B, -1).clone()
            r = vf - op(y)
        y, r = run.run(y, r, max_iter)
        return _result(self.name, to_w(y).view(shape), vf, r.norm(dim=1), run.nstep, run.trace, tol, self.stop_mode, max_iter)

    @staticmethod
    def operator(vjp: Fn, shape: torch.Size, preconditioner: Optional[Fn] = None) -> tuple[Fn, Callable[[Tensor], Tensor]]:
        """``(op, to_w)``: ``op(y) = P(y)(I − J)`` and ``to_w(y) = P(y)`` on rows ``(B, d)``."""
        B = shape[0]

        def to_w(y: Tensor) -> Tensor:
            return y if preconditioner is None else preconditioner(y).reshape(B, -1)

        def op(u: Tensor) -> Tensor:
            pu = to_w(u)
            return pu - vjp(pu.view(shape)).reshape(B, -1)

        return op, to_w
