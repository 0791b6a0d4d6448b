"""Restarted GMRES for the adjoint equation."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .._options import check_int, validated_options
from ..errors import OptionError
from ..registry import register_linear_solver
from ..solvers.base import SolverResult
from .base import Fn, LinearSolver, _check_finite, _result

__all__ = ["GMRES"]


@register_linear_solver("gmres")
@validated_options
class GMRES(LinearSolver):
    """Restarted GMRES on ``w (I − J) = v``, one Krylov space per sample, built on VJPs.

    Saad & Schultz, "GMRES: a generalized minimal residual algorithm", SIAM J. Sci. Stat.
    Comput. 1986. ``max_iter`` caps the Krylov steps (one VJP each; ``nstep`` counts them per
    sample); each restart cycle adds one more VJP for the true residual. ``restart`` bounds the
    Krylov basis kept in memory. Converged samples stop changing. The small least-squares
    problem is solved by Givens rotations and back substitution, elementwise per sample, so the
    result is bitwise reproducible (a batched LAPACK ``lstsq`` was not).

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

    def _solve(self, vjp: Fn, v: Tensor, w0: Optional[Tensor], tol: float, max_iter: int, options: dict[str, Any]) -> SolverResult:
        preconditioner = options.get("preconditioner")
        if preconditioner is not None and w0 is not None:
            raise OptionError("GMRES: pass either w0 or preconditioner (a preconditioned solve starts at w = 0).")
        shape, B = v.shape, v.shape[0]
        vf = v.reshape(B, -1)
        dtype, dev = vf.dtype, vf.device
        eps = torch.finfo(dtype).eps

        def to_w(y: Tensor) -> Tensor:
            return y if preconditioner is None else preconditioner(y).reshape(B, -1)

        def op(u: Tensor) -> Tensor:  # y ↦ P(y) (I − J)
            pu = to_w(u)
            return pu - vjp(pu.view(shape)).reshape(B, -1)

        w = vf.new_zeros(vf.shape) if w0 is None else w0.reshape(B, -1).clone()  # the Krylov unknown (y)
        vnorm = vf.norm(dim=1)
        target = tol * (vnorm + eps) if self.stop_mode == "rel" else torch.full_like(vnorm, tol)
        nstep = torch.zeros(B, dtype=torch.long, device=dev)
        trace: list[Tensor] = []
        used = 0
        r = vf - op(w) if w0 is not None else vf.clone()
        while True:
            beta = r.norm(dim=1)
            trace.append(beta)
            active = beta > target
            nonfinite, any_active = torch.stack([~torch.isfinite(beta).all(), active.any()]).tolist()
            if nonfinite:
                _check_finite(self.name, beta, "residual")
            if used >= max_iter or not any_active:
                break
            k_max = min(self.restart, max_iter - used)
            basis = [r / torch.where(beta > 0, beta, torch.ones_like(beta))[:, None]]
            R = vf.new_zeros(B, k_max + 1, k_max)  # the Hessenberg matrix, rotated to upper triangular
            cs, sn = vf.new_zeros(B, k_max), vf.new_zeros(B, k_max)
            g = vf.new_zeros(B, k_max + 1)  # β e₁, rotated alongside
            g[:, 0] = beta
            k = 0
            for j in range(k_max):
                u = op(basis[j])
                used += 1
                nstep = nstep + active.long()
                h = []
                for i in range(j + 1):  # modified Gram–Schmidt, per sample
                    hij = (u * basis[i]).sum(dim=1)
                    h.append(hij)
                    u = u - hij[:, None] * basis[i]
                hn = u.norm(dim=1)
                # a (near-)zero hn is a "happy breakdown": the Krylov space holds the solution
                basis.append(u / torch.where(hn > eps * beta, hn, torch.ones_like(hn))[:, None])
                # Givens rotations, elementwise per sample: deterministic, unlike a LAPACK lstsq
                for i in range(j):
                    h[i], h[i + 1] = cs[:, i] * h[i] + sn[:, i] * h[i + 1], -sn[:, i] * h[i] + cs[:, i] * h[i + 1]
                denom = torch.sqrt(h[j] ** 2 + hn**2)
                safe = torch.where(denom > 0, denom, torch.ones_like(denom))
                cs[:, j] = torch.where(denom > 0, h[j] / safe, torch.ones_like(denom))
                sn[:, j] = torch.where(denom > 0, hn / safe, torch.zeros_like(denom))
                h[j] = denom
                R[:, : j + 1, j] = torch.stack(h, dim=1)
                g[:, j + 1] = -sn[:, j] * g[:, j]
                g[:, j] = cs[:, j] * g[:, j]
                k = j + 1
                est = g[:, j + 1].abs()
                nonfinite, go_on = torch.stack([~torch.isfinite(est).all(), (active & (est > target)).any()]).tolist()
                if nonfinite:  # one host sync per Krylov step
                    _check_finite(self.name, est, "Krylov least squares")
                if not go_on:
                    break
            y = vf.new_zeros(B, k)  # back substitution R y = g
            for i in range(k - 1, -1, -1):
                acc = g[:, i] - (R[:, i, i + 1 : k] * y[:, i + 1 : k]).sum(dim=1)
                diag = R[:, i, i]
                y[:, i] = torch.where(diag != 0, acc / torch.where(diag != 0, diag, torch.ones_like(diag)), torch.zeros_like(acc))
            Vk = torch.stack(basis[:k], dim=1)  # (B, k, d)
            step = torch.bmm(y.unsqueeze(1), Vk).squeeze(1)
            w = w + torch.where(active[:, None], step, torch.zeros_like(step))
            r = vf - op(w)  # true residual (one extra product) before a restart or the end
            used += 1
        return _result(self.name, to_w(w).view(shape), vf, r.norm(dim=1), nstep, trace, tol, self.stop_mode, max_iter)
