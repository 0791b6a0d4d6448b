"""Batched ADMM for the row-separable SIM state-matching program.

Tsai, Decugis, El Ghaoui, Atamtürk, "State-driven Implicit Modeling for Sparsity and
Robustness in Neural Networks", arXiv 2209.09389. For every row ``i`` (all rows at once):

* ``mode="relaxed"``:  ``min_β λ‖β‖₁ + ½‖z_i − Φβ‖²   s.t. ‖β[:k]‖₁ ≤ r_i``
* ``mode="equality"``: ``min_β λ‖β‖₁                 s.t. Φβ = z_i, ‖β[:k]‖₁ ≤ r_i``

(optionally with a weighted norm ``‖β‖₁ = Σ_j w_j |β_j|``, ``w`` shared by all rows, and
restricted to a per-row support: ``β_j = 0`` off a boolean mask),

with ``Φ`` (``m × d``) shared by all rows, ``k`` the number of leading coordinates under the
ball constraint (the row of ``A``) and ``r_i = κ`` for rows of ``(A, B)``, ``∞`` for ``(C, D)``.

ADMM splits ``β = v`` (Boyd et al., 2011, §6.4): the ``β``-step is a ridge solve (relaxed) or
an affine projection (equality) with ``Φ``; the ``v``-step is the prox of
``λ‖·‖₁ + ι(ℓ1 ball)`` (with a support: zero the coordinates off it, then the same prox).
``ΦᵀΦ = QΛQᵀ`` is diagonalised once, so the ``β``-step for all rows is two matrix products
and each row may carry its own penalty ``ρ_i`` (residual balancing, Boyd §3.4.1) at no extra
cost. Rows stop individually on Boyd's primal/dual residual criterion
(§3.3.1); converged rows are frozen and removed from the working set. Runs on any device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConvergenceError, ConvergenceWarning, NonFiniteError
from .projection import _radius_tensor, prox_l1_ball

MODES = ("relaxed", "equality")
ON_NONCONVERGENCE = ("warn", "raise", "ignore")


@dataclass
class Factorization:
    """Eigendecomposition ``ΦᵀΦ = Q diag(lam) Qᵀ`` shared by every row (and by several solves)."""

    phi: Tensor
    q: Tensor
    lam: Tensor
    rank_mask: Tensor  # eigenvalues treated as non-zero (range of Φᵀ)


@dataclass
class ADMMResult:
    """Outcome of :meth:`BatchedADMM.solve`; one entry per row.

    ``beta`` is the split variable ``v``: exactly sparse and exactly inside the ball.
    ``objective`` is the program's objective at ``beta`` (for ``mode="equality"``:
    ``λ‖β‖₁``; its constraint violation is ``constraint_residual = ‖Φβ − z‖``).
    """

    beta: Tensor
    objective: Tensor
    converged: Tensor
    nstep: Tensor
    primal_residual: Tensor
    dual_residual: Tensor
    rho: Tensor
    constraint_residual: Tensor
    mode: str

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


class BatchedADMM:
    """Batched ADMM over all rows of the SIM program (see the module docstring).

    Args:
        rho: initial ADMM penalty (per row afterwards when ``adaptive_rho``).
        max_iter: iteration cap per row.
        eps_abs, eps_rel: Boyd's stopping tolerances on the primal residual ``‖β − v‖`` and
            dual residual ``ρ‖v − v_prev‖``.
        mode: ``"relaxed"`` (penalised fit) or ``"equality"`` (exact state matching).
        adaptive_rho: residual balancing every ``check_every`` iterations (factor ``tau`` when
            one residual exceeds ``mu`` times the other, each normalised by its tolerance).
        alpha: over-relaxation in ``[1, 1.8]`` (1 = plain ADMM).
        zero_tol: entries with ``|β| < zero_tol`` are set to zero at the end.
        on_nonconvergence: ``"warn"`` (ConvergenceWarning), ``"raise"`` (ConvergenceError) or
            ``"ignore"``; non-converged rows are always flagged in the result.
        rank_tol: relative eigenvalue cut-off defining the range of ``Φ`` (equality mode).
    """

    def __init__(
        self,
        rho: float = 1.0,
        max_iter: int = 1000,
        eps_abs: float = 1e-7,
        eps_rel: float = 1e-5,
        mode: str = "relaxed",
        adaptive_rho: bool = True,
        mu: float = 10.0,
        tau: float = 2.0,
        check_every: int = 10,
        alpha: float = 1.0,
        zero_tol: float = 1e-6,
        on_nonconvergence: str = "warn",
        rank_tol: float = 1e-10,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is invalid; valid: {', '.join(MODES)}")
        if on_nonconvergence not in ON_NONCONVERGENCE:
            raise ValueError(
                f"on_nonconvergence={on_nonconvergence!r} is invalid; valid: {', '.join(ON_NONCONVERGENCE)}"
            )
        for name, val in (("rho", rho), ("mu", mu), ("rank_tol", rank_tol)):
            if not (val > 0 and math.isfinite(val)):
                raise ValueError(f"{name} must be positive and finite, got {val}")
        if not (tau > 1):
            raise ValueError(f"tau must be > 1, got {tau}")
        for name, val in (("eps_abs", eps_abs), ("eps_rel", eps_rel), ("zero_tol", zero_tol)):
            if not (val >= 0):
                raise ValueError(f"{name} must be >= 0, got {val}")
        if eps_abs == 0 and eps_rel == 0:
            raise ValueError("eps_abs and eps_rel cannot both be 0")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if not (isinstance(check_every, int) and check_every >= 1):
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        if not (1.0 <= alpha < 2.0):
            raise ValueError(f"alpha must be in [1, 2), got {alpha}")
        self.rho = float(rho)
        self.max_iter = max_iter
        self.eps_abs = float(eps_abs)
        self.eps_rel = float(eps_rel)
        self.mode = mode
        self.adaptive_rho = adaptive_rho
        self.mu = float(mu)
        self.tau = float(tau)
        self.check_every = check_every
        self.alpha = float(alpha)
        self.zero_tol = float(zero_tol)
        self.on_nonconvergence = on_nonconvergence
        self.rank_tol = float(rank_tol)

    def __repr__(self) -> str:
        return (
            f"BatchedADMM(rho={self.rho}, max_iter={self.max_iter}, eps_abs={self.eps_abs}, "
            f"eps_rel={self.eps_rel}, mode={self.mode!r}, adaptive_rho={self.adaptive_rho})"
        )

    def factorize(self, phi: Tensor) -> Factorization:
        """Diagonalise ``ΦᵀΦ`` (in float64, then cast back to ``phi``'s dtype)."""
        if phi.ndim != 2:
            raise ValueError(f"Phi must be 2-D (m, d), got shape {tuple(phi.shape)}")
        if not bool(torch.isfinite(phi).all()):
            raise NonFiniteError("Phi contains NaN or Inf")
        g = phi.to(torch.float64).T @ phi.to(torch.float64)
        lam, q = torch.linalg.eigh(g)
        lam = lam.clamp(min=0)
        top = float(lam.max()) if lam.numel() else 0.0
        rank_mask = lam > self.rank_tol * max(top, 1e-300)
        return Factorization(phi=phi, q=q.to(phi.dtype), lam=lam.to(phi.dtype), rank_mask=rank_mask)

    def solve(
        self,
        phi: Tensor,
        targets: Tensor,
        lam: float | Tensor,
        radius: float | Tensor | None = None,
        n_constrained: int = 0,
        beta0: Tensor | None = None,
        factor: Factorization | None = None,
        weights: Tensor | None = None,
        support: Tensor | None = None,
    ) -> ADMMResult:
        """Solve the program for every row of ``targets``.

        Args:
            phi: ``(m, d)`` regressors ``Φ`` (samples × features).
            targets: ``(r, m)``; row ``i`` is ``z_i``.
            lam: ℓ1 weight λ ≥ 0, scalar or ``(r,)``.
            radius: ball radius (scalar or ``(r,)``, ``inf`` = none) on the first
                ``n_constrained`` coordinates; ``None`` = no constraint.
            beta0: ``(r, d)`` warm start (e.g. the solution at a nearby λ).
            factor: a :class:`Factorization` of this ``phi`` to reuse.
            weights: ``(d,)`` positive weights of a weighted ℓ1 penalty (default all ones).
            support: ``(r, d)`` boolean mask; coefficients outside it are held at zero (the
                program restricted to a fixed sparsity pattern, e.g. to debias a lasso fit).
        """
        if factor is None:
            factor = self.factorize(phi)
        elif factor.phi is not phi and (factor.phi.shape != phi.shape or not torch.equal(factor.phi, phi)):
            raise ValueError("factor was computed for a different Phi; call factorize(phi) for this one")
        m, d = phi.shape
        if targets.ndim != 2 or targets.shape[1] != m:
            raise ValueError(f"targets must have shape (r, {m}), got {tuple(targets.shape)}")
        if not bool(torch.isfinite(targets).all()):
            raise NonFiniteError("targets contain NaN or Inf")
        r = targets.shape[0]
        dt, dev = phi.dtype, phi.device
        lam_t = torch.as_tensor(lam, dtype=dt, device=dev)
        lam_t = lam_t.expand(r).clone() if lam_t.ndim == 0 else lam_t.clone()
        if lam_t.shape != (r,) or bool((lam_t < 0).any()) or not bool(torch.isfinite(lam_t).all()):
            raise ValueError("lam must be a finite non-negative scalar or (r,) tensor")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=dt, device=dev)
            if weights.shape != (d,) or not bool((weights > 0).all()) or not bool(torch.isfinite(weights).all()):
                raise ValueError(f"weights must be a positive finite tensor of shape ({d},)")
        if support is not None:
            if support.shape != (r, d) or support.dtype != torch.bool:
                raise ValueError(f"support must be a boolean tensor of shape ({r}, {d}), got {support.dtype} {tuple(support.shape)}")
            support_t = support.to(dev).T.to(dt)  # (d, r), rows as columns like the state
        if radius is None:
            n_constrained = 0
            rad = torch.full((r,), math.inf, dtype=dt, device=dev)
        else:
            if not (0 <= n_constrained <= d):
                raise ValueError(f"n_constrained must be in [0, {d}], got {n_constrained}")
            rad = _radius_tensor(radius, r, phi).clone()
        q, ev = factor.q, factor.lam
        # Φᵀz for every row, expressed in the eigenbasis: (d, r)
        c = q.T @ (phi.T @ targets.T)
        if self.mode == "equality":
            inv = torch.where(factor.rank_mask, 1.0 / torch.where(factor.rank_mask, ev, torch.ones_like(ev)), torch.zeros_like(ev))
            c_ls = c * inv[:, None]  # least-squares solution, eigen coordinates
            null = (~factor.rank_mask).to(dt)[:, None]

        # state, rows as columns (d, r)
        if beta0 is not None:
            if beta0.shape != (r, d):
                raise ValueError(f"beta0 must have shape ({r}, {d}), got {tuple(beta0.shape)}")
            v = beta0.to(dt).T.clone()
        else:
            v = torch.zeros(d, r, dtype=dt, device=dev)
        w = torch.zeros(d, r, dtype=dt, device=dev)
        rho = torch.full((r,), self.rho, dtype=dt, device=dev)

        out_v = torch.zeros(d, r, dtype=dt, device=dev)
        out_rho = rho.clone()
        out_conv = torch.zeros(r, dtype=torch.bool, device=dev)
        out_nstep = torch.zeros(r, dtype=torch.long, device=dev)
        out_pr = torch.full((r,), math.inf, dtype=dt, device=dev)
        out_dr = torch.full((r,), math.inf, dtype=dt, device=dev)

        active = torch.arange(r, device=dev)
        sqrt_d = math.sqrt(d)
        it = 0
        while active.numel() > 0 and it < self.max_iter:
            it += 1
            # β-step
            if self.mode == "relaxed":
                beta = q @ ((c[:, active] + rho * (q.T @ (v - w))) / (ev[:, None] + rho))
            else:
                beta = q @ (null * (q.T @ (v - w)) + c_ls[:, active])
            beta_hat = self.alpha * beta + (1.0 - self.alpha) * v if self.alpha != 1.0 else beta
            v_old = v
            t = lam_t[active] / rho
            if weights is not None:
                t = t[:, None] * weights[None, :]
            x = beta_hat + w
            if support is not None:  # prox of g + ι{β = 0 off the support}: zero those first
                x = x * support_t[:, active]
            v = prox_l1_ball(x.T, t, rad[active], n_constrained).T
            w = w + beta_hat - v
            # residuals and stopping
            pr = torch.linalg.vector_norm(beta - v, dim=0)
            dr = rho * torch.linalg.vector_norm(v - v_old, dim=0)
            eps_pri = sqrt_d * self.eps_abs + self.eps_rel * torch.maximum(
                torch.linalg.vector_norm(beta, dim=0), torch.linalg.vector_norm(v, dim=0)
            )
            eps_dual = sqrt_d * self.eps_abs + self.eps_rel * rho * torch.linalg.vector_norm(w, dim=0)
            done = (pr <= eps_pri) & (dr <= eps_dual)
            last = it == self.max_iter
            if it % self.check_every == 0 or last or bool(done.any()):
                if not bool(torch.isfinite(v).all()):
                    raise NonFiniteError(f"ADMM iterate became non-finite at iteration {it}")
                stop = done | last if last else done
                if bool(stop.any()):
                    idx = active[stop]
                    out_v[:, idx] = v[:, stop]
                    out_rho[idx] = rho[stop]
                    out_conv[idx] = done[stop]
                    out_nstep[idx] = it
                    out_pr[idx] = pr[stop]
                    out_dr[idx] = dr[stop]
                    keep = ~stop
                    active, v, w, rho, pr, dr = active[keep], v[:, keep], w[:, keep], rho[keep], pr[keep], dr[keep]
                    eps_pri, eps_dual = eps_pri[keep], eps_dual[keep]
                if self.adaptive_rho and it % self.check_every == 0 and active.numel() > 0:
                    pn = pr / eps_pri
                    dn = dr / eps_dual
                    up = pn > self.mu * dn
                    down = dn > self.mu * pn
                    scale = torch.where(up, torch.full_like(rho, self.tau), torch.ones_like(rho))
                    scale = torch.where(down, torch.full_like(rho, 1.0 / self.tau), scale)
                    rho = rho * scale
                    w = w / scale  # scaled dual u = y/ρ
        beta = out_v.T.contiguous()
        if self.zero_tol > 0:
            beta = torch.where(beta.abs() < self.zero_tol, torch.zeros_like(beta), beta)
        if not bool(torch.isfinite(beta).all()):
            raise NonFiniteError("ADMM produced a non-finite solution")
        resid = targets - beta @ phi.T
        l1 = (beta.abs() * weights).sum(dim=1) if weights is not None else beta.abs().sum(dim=1)
        cres = torch.linalg.vector_norm(resid, dim=1)
        if self.mode == "relaxed":
            obj = lam_t * l1 + 0.5 * cres**2
        else:
            obj = lam_t * l1
        result = ADMMResult(
            beta=beta,
            objective=obj,
            converged=out_conv,
            nstep=out_nstep,
            primal_residual=out_pr,
            dual_residual=out_dr,
            rho=out_rho,
            constraint_residual=cres,
            mode=self.mode,
        )
        n_bad = int((~out_conv).sum())
        if n_bad and self.on_nonconvergence != "ignore":
            msg = (
                f"ADMM: {n_bad} of {r} rows did not reach eps_abs={self.eps_abs}, "
                f"eps_rel={self.eps_rel} within max_iter={self.max_iter}. Try increasing "
                "`max_iter`, changing `rho`, or loosening the tolerances."
            )
            if self.on_nonconvergence == "raise":
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=2)
        return result
