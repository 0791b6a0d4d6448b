"""Restarted GMRES for the adjoint equation, with the Krylov bookkeeping kept off the critical path.

Per Krylov step the work is one VJP, four batched products against the stacked basis (classical
Gram–Schmidt with one reorthogonalisation), a norm, a division and two stores: no Python loop
over basis vectors, no host synchronisation and no least-squares work. The small least-squares
problem is brought up to date only at *checks*: the Hessenberg columns since the previous check
are rotated by the accumulated orthogonal factor (one product) and the block below gets its own
float64 QR. That gives the residual estimate after every step, so each sample stops at the first
step where it met its target whichever step the check ran at; the next check is scheduled from
the observed rate.
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

__all__ = ["GMRES", "HessenbergQR", "KrylovRun", "arnoldi_step"]

#: the longest stretch of Krylov steps between two checks
_MAX_CHECK_GAP = 8


def arnoldi_step(V: Tensor, Ht: Tensor, j: int, u: Tensor, passes: int = 2) -> Tensor:
    """Orthogonalise ``u`` ``(B, 1, d)`` against the basis rows ``V[:, :j+1]``, store it normalised as
    ``V[:, j+1]`` and its Hessenberg column (the projections, then the norm left) as ``Ht[:, j, :j+2]``;
    returns the new basis vector ``(B, d)`` (contiguous).

    Classical Gram–Schmidt as block products (no loop over basis vectors, no host
    synchronisation), run ``passes`` times: two is one reorthogonalisation, which keeps the basis
    orthonormal to working precision ("twice is enough", Giraud, Langou & Rozložník, Comput. Math.
    Appl. 2005), where one pass loses orthogonality on ill-conditioned Krylov spaces. Each pass
    after the first updates the accumulated projections ``h`` and projects ``u`` once by them
    (``u − hV``), so two passes are four batched products. (The second pass runs unconditionally:
    with ``A = I − J`` and ``J`` contractive ``A v ≈ v``, so the usual test for skipping it, a norm
    kept above ``1/√2``, fails at nearly every step.) A zero norm (breakdown) stores a zero row;
    the least squares masks it.
    """
    basis = V[:, : j + 1]
    bt = basis.transpose(1, 2)
    h = torch.bmm(u, bt)  # (B, 1, j+1)
    w = torch.baddbmm(u, h, basis, alpha=-1)
    for _ in range(passes - 1):
        h = torch.baddbmm(h, w, bt)
        w = torch.baddbmm(u, h, basis, alpha=-1)
    # (``out=`` into strided views is slow for the products on CPU; the norm is cheap there)
    hn = torch.linalg.vector_norm(w, dim=2, keepdim=True, out=Ht[:, j : j + 1, j + 1 : j + 2])  # (B, 1, 1)
    Ht[:, j, : j + 1] = h.squeeze(1)
    nxt = (w / hn.clamp_min(torch.finfo(w.dtype).tiny)).squeeze(1)
    V[:, j + 1] = nxt
    return nxt


class HessenbergQR:
    """The QR factorisation (float64) of a growing ``(B, j+1, j)`` Hessenberg matrix, extended by
    blocks of new columns, and the GMRES least-squares residuals it gives.

    ``Qt`` accumulates ``Qᵀ`` and ``R`` the triangular factor. A new block of columns is rotated by
    ``Qt`` (one product) and the Hessenberg block below the factored rows gets its own QR. The
    Householder reflectors of a Hessenberg matrix each touch two rows, so the first ``i`` of them
    are the QR of its leading ``(i+1) × i`` block: with ``g = β Qᵀe₁`` the least-squares residual
    with the first ``i`` basis vectors is ``‖g[i:]‖`` and its solution solves ``R[:i, :i] y = g[:i]``
    (Saad, "Iterative Methods for Sparse Linear Systems", §6.5.3, with blocks of rotations).
    """

    def __init__(self, beta: Tensor, k_max: int) -> None:
        B, f64 = beta.shape[0], torch.float64
        self.beta = beta.to(f64)
        self.Qt = torch.eye(k_max + 1, dtype=f64, device=beta.device).expand(B, k_max + 1, k_max + 1).contiguous()
        self.R = torch.zeros(B, k_max, k_max, dtype=f64, device=beta.device)
        self.m = 0  # columns factored

    def update(self, Ht: Tensor, j: int) -> Tensor:
        """Factor the columns ``m..j-1`` of the Hessenberg matrix (``Ht`` holds column ``i`` as row ``i``); returns ``est`` ``(B, j+1)``, ``est[:, i]`` the
        least-squares residual with the first ``i`` basis vectors."""
        m = self.m
        if j > m:
            C = torch.bmm(self.Qt[:, : j + 1, : j + 1], Ht[:, m:j, : j + 1].transpose(1, 2).to(torch.float64))
            self.R[:, :m, m:j] = C[:, :m]
            Qb, Rb = torch.linalg.qr(C[:, m:], mode="complete")
            self.R[:, m:j, m:j] = Rb[:, : j - m]
            self.Qt[:, m : j + 1, : j + 1] = torch.bmm(Qb.transpose(1, 2), self.Qt[:, m : j + 1, : j + 1])
            self.m = j
        return self.g(j).square().flip(1).cumsum(1).flip(1).sqrt()

    def g(self, j: int) -> Tensor:
        """``β Qᵀe₁`` over the first ``j+1`` rows, ``(B, j+1)``."""
        return self.beta[:, None] * self.Qt[:, : j + 1, 0]


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
        B = r.shape[0]
        V = r.new_empty(B, k_max + 1, r.shape[1])  # the orthonormal basis, one row per Krylov vector
        V[:, 0] = r / torch.where(beta > 0, beta, torch.ones_like(beta))[:, None]
        # the Hessenberg matrix of the Arnoldi relation (transposed), column j filled at step j; its least
        # squares is brought up to date (float64 QR) only at checks
        Ht = r.new_zeros(B, k_max, k_max + 1)  # row j: column j
        ls = HessenbergQR(beta, k_max)
        j = 0  # Krylov steps taken in this cycle
        next_check = min(self.first_check, k_max)
        vj = V[:, 0].clone()  # the newest basis vector, contiguous for the VJP
        while True:
            u = self.op(vj).unsqueeze(1)
            self.used += 1
            vj = arnoldi_step(V, Ht, j, u)
            j += 1
            if j < next_check and j < k_max:
                continue
            est = ls.update(Ht, j)
            k_s, all_done = self._check(est, j, active)
            if all_done or j >= k_max:
                break
            next_check = min(k_max, j + self._predict(est, j, active))
        steps = torch.where(active, k_s, torch.zeros_like(k_s))
        self.nstep = self.nstep + steps
        coeff = self._least_squares(ls.R[:, :j, :j], ls.g(j)[:, :j], steps)
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
    2005: "twice is enough"), as batched products against a preallocated basis. The small
    least-squares problem is solved in float64 by a QR factorisation (deterministic, unlike a
    batched LAPACK ``lstsq``), extended by the new columns only at *checks*
    (:class:`HessenbergQR`): it gives the residual estimate after every step, so each sample
    stops at the first step where it met ``tol`` (``nstep`` counts those steps) and its result
    does not depend on when the check ran; the next check is scheduled from the observed rate
    (at most ``8`` steps ahead), so there is no host synchronisation per Krylov step. Samples converged at the start of a restart cycle stop changing.

    The result's residual is the *true* residual ``‖w − wJ − v‖`` of the returned ``w`` (one more
    VJP at the end of each restart cycle), not the Krylov estimate, and ``converged`` is judged
    on it; ``nstep`` counts, per sample, the Krylov steps up to the first whose estimate met
    ``tol`` (the two agree to rounding, as the basis is kept orthonormal).

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
