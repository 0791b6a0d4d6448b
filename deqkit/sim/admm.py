"""Batched ADMM for the row-separable SIM state-matching program.

Tsai, Decugis, El Ghaoui, Atamtürk, "State-driven Implicit Modeling for Sparsity and
Robustness in Neural Networks", arXiv 2209.09389. For every row ``i`` (all rows at once):

* ``mode="relaxed"``:  ``min_β λ‖β‖₁ + ½‖z_i − Φβ‖²   s.t. ‖β[:k]‖₁ ≤ r_i``
* ``mode="equality"``: ``min_β λ‖β‖₁                 s.t. Φβ = z_i, ‖β[:k]‖₁ ≤ r_i``

(optionally with a weighted norm ``‖β‖₁ = Σ_j w_j |β_j|``, ``w`` shared by all rows, and
restricted to a per-row support: ``β_j = 0`` off a boolean mask),

with ``Φ`` (``m × d``) shared by all rows, ``k`` the number of leading coordinates under the
ball constraint (the row of ``A``) and ``r_i = κ`` for rows of ``(A, B)``, ``∞`` for ``(C, D)``.

ADMM (Boyd, Parikh, Chu, Peleato, Eckstein, "Distributed Optimization and Statistical Learning
via the Alternating Direction Method of Multipliers", Found. Trends Mach. Learn. 2011) splits
``β = v`` (§6.4): the ``β``-step is a ridge solve (relaxed) or an affine projection (equality)
with ``Φ``; the ``v``-step is the prox of ``λ‖·‖₁ + ι(ℓ1 ball)`` (with a support: zero the
coordinates off it, then the same prox). ``ΦᵀΦ = QΛQᵀ`` is diagonalised once, so the
``β``-step for all rows is two matrix products and each row may carry its own penalty ``ρ_i``
(residual balancing, §3.4.1) at no extra cost. Rows stop individually on Boyd's primal/dual
residual criterion (§3.3.1); converged rows are frozen and removed from the working set.
Runs on any device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .._options import (
    check_bool,
    check_choice,
    check_failure_policy,
    check_int,
    check_number,
    check_positive,
    validated_options,
)
from ..errors import NonFiniteError, OptionError, apply_failure_policy
from ..results import ResultMixin
from .projection import _radius_tensor, prox_l1_ball

__all__ = ["MODES", "ADMMResult", "BatchedADMM", "Factorization"]

#: the two programs :class:`BatchedADMM` solves
MODES = ("relaxed", "equality")


@dataclass
class Factorization:
    """Eigendecomposition ``ΦᵀΦ = Q diag(lam) Qᵀ`` shared by every row (and by several solves)."""

    phi: Tensor
    q: Tensor
    lam: Tensor
    rank_mask: Tensor  # eigenvalues treated as non-zero (range of Φᵀ)


@dataclass
class ADMMResult(ResultMixin):
    """Outcome of :meth:`BatchedADMM.solve`; one entry per row (tensors of shape ``(r,)``).

    Core fields (see :mod:`deqkit.results`):

    - ``converged``: the row met both of Boyd's stopping criteria (primal and dual);
    - ``nstep``: ADMM iterations the row ran;
    - ``residual``: ``max(primal_residual / eps_pri, dual_residual / eps_dual)``, the larger of
      the two residuals, each divided by its tolerance at the row's last iteration, so the row
      converged exactly when ``residual ≤ 1``;
    - ``time_s``: wall-clock seconds of the whole solve (all rows, factorisation included
      when it was not passed in).

    Extras: ``beta`` is the split variable ``v``: exactly sparse and exactly inside the ball.
    ``objective`` is the program's objective at ``beta`` (for ``mode="equality"``:
    ``λ‖β‖₁``; its constraint violation is ``constraint_residual = ‖Φβ − z‖``).
    ``primal_residual = ‖β − v‖`` and ``dual_residual = ρ‖v − v_prev‖`` are the unscaled
    residuals, ``rho`` each row's final penalty.
    """

    beta: Tensor
    objective: Tensor
    converged: Tensor
    nstep: Tensor
    residual: Tensor
    time_s: float
    primal_residual: Tensor
    dual_residual: Tensor
    rho: Tensor
    constraint_residual: Tensor
    mode: str

    def summary(self) -> str:
        """One line for logs and error messages."""
        r = int(self.converged.numel())
        worst = float(self.residual.max()) if r else 0.0
        steps = int(self.nstep.max()) if r else 0
        return (
            f"ADMM ({self.mode}): {r - self.n_failed} of {r} rows converged, nstep max {steps}, "
            f"residual/tolerance max {worst:.3g}, {self.time_s:.3g} s"
        )


@dataclass
class _Problem:
    """The checked inputs of one :meth:`BatchedADMM.solve` call, rows as columns."""

    phi: Tensor
    targets: Tensor
    factor: Factorization
    lam: Tensor  # (r,)
    radius: Tensor  # (r,)
    n_constrained: int
    weights: Tensor | None  # (d,)
    support: Tensor | None  # (d, r) in phi's dtype
    c: Tensor  # Φᵀz in the eigenbasis, (d, r)
    c_ls: Tensor | None = None  # equality: least-squares solution in the eigenbasis
    block_ball: tuple[int, int, Tensor] | None = None  # a second ball (start, stop, (r,) radius)
    null: Tensor | None = None  # equality: (d, 1) indicator of the null space of Φ

    @property
    def rows(self) -> int:
        return self.targets.shape[0]

    @property
    def dim(self) -> int:
        return self.phi.shape[1]


class _Record:
    """Per-row outputs, filled as rows stop (converged, or at the iteration cap)."""

    def __init__(self, d: int, r: int, rho: Tensor) -> None:
        dt, dev = rho.dtype, rho.device
        self.v = torch.zeros(d, r, dtype=dt, device=dev)
        self.rho = rho.clone()
        self.converged = torch.zeros(r, dtype=torch.bool, device=dev)
        self.nstep = torch.zeros(r, dtype=torch.long, device=dev)
        self.pr = torch.full((r,), math.inf, dtype=dt, device=dev)
        self.dr = torch.full((r,), math.inf, dtype=dt, device=dev)
        self.ratio = torch.full((r,), math.inf, dtype=dt, device=dev)

    def store(self, idx: Tensor, stop: Tensor, it: int, v: Tensor, rho: Tensor, done: Tensor, res: _Residuals) -> None:
        """Record the rows ``idx`` (global indices) selected by ``stop`` (a mask of the working set)."""
        self.v[:, idx] = v[:, stop]
        self.rho[idx] = rho[stop]
        self.converged[idx] = done[stop]
        self.nstep[idx] = it
        self.pr[idx] = res.pr[stop]
        self.dr[idx] = res.dr[stop]
        self.ratio[idx] = torch.maximum(_ratio(res.pr[stop], res.eps_pri[stop]), _ratio(res.dr[stop], res.eps_dual[stop]))


def _ratio(x: Tensor, eps: Tensor) -> Tensor:
    """``x / eps`` with ``0 / 0 = 0`` (a zero residual meets a zero tolerance)."""
    return torch.where(x == 0, torch.zeros_like(x), x / eps)


@dataclass
class _Residuals:
    """Boyd's primal/dual residuals and their tolerances (§3.3.1), one entry per working row."""

    pr: Tensor
    dr: Tensor
    eps_pri: Tensor
    eps_dual: Tensor

    def done(self) -> Tensor:
        return (self.pr <= self.eps_pri) & (self.dr <= self.eps_dual)

    def keep(self, mask: Tensor) -> _Residuals:
        return _Residuals(self.pr[mask], self.dr[mask], self.eps_pri[mask], self.eps_dual[mask])


@validated_options
class BatchedADMM:
    """Batched ADMM over all rows of the SIM program (see the module docstring).

    Args (keyword-only):
        rho: initial ADMM penalty (per row afterwards when ``adaptive_rho``).
        max_iter: iteration cap per row.
        tol: relative stopping tolerance (Boyd's ``ε_rel``).
        tol_abs: absolute stopping tolerance (Boyd's ``ε_abs``). ADMM needs both: a row
            stops when the primal residual ``‖β − v‖ ≤ √d·tol_abs + tol·max(‖β‖, ‖v‖)`` and the
            dual residual ``ρ‖v − v_prev‖ ≤ √d·tol_abs + tol·ρ‖u‖`` (Boyd et al. 2011,
            §3.3.1). The relative term alone never stops a row whose solution is ``β = 0``
            (a large λ, where both norms vanish); the absolute term alone depends on the
            scale of the states. Either may be 0, not both.
        mode: ``"relaxed"`` (penalised fit) or ``"equality"`` (exact state matching).
        adaptive_rho: residual balancing every ``check_every`` iterations (factor ``tau`` when
            one residual exceeds ``mu`` times the other, each normalised by its tolerance).
        mu, tau: residual-balancing threshold (``> 0``) and factor (``> 1``).
        check_every: iterations between two checks for non-finite iterates and ρ updates.
        alpha: over-relaxation in ``[1, 2)`` (1 = plain ADMM).
        zero_tol: entries with ``|β| < zero_tol`` are set to zero at the end.
        on_failure: what to do when some row misses the tolerance within ``max_iter``:
            ``"warn"`` (a ConvergenceWarning, default), ``"raise"`` (ConvergenceError) or
            ``"ignore"``; the result records the rows either way (``converged``).
        rank_tol: relative eigenvalue cut-off defining the range of ``Φ`` (equality mode).
    """

    def __init__(
        self,
        *,
        rho: float = 1.0,
        max_iter: int = 1000,
        tol: float = 1e-5,
        tol_abs: float = 1e-7,
        mode: str = "relaxed",
        adaptive_rho: bool = True,
        mu: float = 10.0,
        tau: float = 2.0,
        check_every: int = 10,
        alpha: float = 1.0,
        zero_tol: float = 1e-6,
        on_failure: str = "warn",
        rank_tol: float = 1e-10,
    ) -> None:
        own = "BatchedADMM"
        check_choice(own, "mode", mode, MODES)
        self.rho = check_positive(own, "rho", rho)
        self.max_iter = check_int(own, "max_iter", max_iter)
        self.tol = check_positive(own, "tol", tol, allow_zero=True)
        self.tol_abs = check_positive(own, "tol_abs", tol_abs, allow_zero=True)
        if self.tol == 0 and self.tol_abs == 0:
            raise OptionError(f"{own}: tol and tol_abs cannot both be 0, got tol=0, tol_abs=0.")
        self.mode = mode
        self.adaptive_rho = check_bool(own, "adaptive_rho", adaptive_rho)
        self.mu = check_positive(own, "mu", mu)
        self.tau = check_number(own, "tau", tau, low=1.0, low_open=True)
        self.check_every = check_int(own, "check_every", check_every)
        self.alpha = check_number(own, "alpha", alpha, low=1.0, high=2.0, high_open=True)
        self.zero_tol = check_positive(own, "zero_tol", zero_tol, allow_zero=True)
        self.on_failure = check_failure_policy(own, on_failure)
        self.rank_tol = check_positive(own, "rank_tol", rank_tol)

    def __repr__(self) -> str:
        return (
            f"BatchedADMM(rho={self.rho}, max_iter={self.max_iter}, tol={self.tol}, "
            f"tol_abs={self.tol_abs}, mode={self.mode!r}, adaptive_rho={self.adaptive_rho})"
        )

    # ------------------------------------------------------------------ setup
    def factorize(self, phi: Tensor) -> Factorization:
        """Diagonalise ``ΦᵀΦ`` (in float64, then cast back to ``phi``'s dtype)."""
        if phi.ndim != 2:
            raise OptionError(f"BatchedADMM.factorize: Phi must be 2-D (m, d), got shape {tuple(phi.shape)}.")
        if not bool(torch.isfinite(phi).all()):
            raise NonFiniteError("BatchedADMM.factorize: Phi contains NaN or Inf")
        g = phi.to(torch.float64).T @ phi.to(torch.float64)
        lam, q = torch.linalg.eigh(g)
        lam = lam.clamp(min=0)
        top = float(lam.max()) if lam.numel() else 0.0
        rank_mask = lam > self.rank_tol * max(top, 1e-300)
        return Factorization(phi=phi, q=q.to(phi.dtype), lam=lam.to(phi.dtype), rank_mask=rank_mask)

    def _problem(self, phi, targets, lam, radius, n_constrained, factor, weights, support, block_ball=None) -> _Problem:
        """Check the inputs of :meth:`solve` and precompute what every iteration reuses."""
        own = "BatchedADMM.solve"
        if factor is None:
            factor = self.factorize(phi)
        elif factor.phi is not phi and (factor.phi.shape != phi.shape or not torch.equal(factor.phi, phi)):
            raise OptionError(f"{own}: factor was computed for a different Phi; call factorize(phi) for this one.")
        m, d = phi.shape
        if targets.ndim != 2 or targets.shape[1] != m:
            raise OptionError(f"{own}: targets must have shape (r, {m}), got {tuple(targets.shape)}.")
        if not bool(torch.isfinite(targets).all()):
            raise NonFiniteError(f"{own}: targets contain NaN or Inf")
        r = targets.shape[0]
        dt, dev = phi.dtype, phi.device
        lam_t = torch.as_tensor(lam, dtype=dt, device=dev)
        lam_t = lam_t.expand(r).clone() if lam_t.ndim == 0 else lam_t.clone()
        if lam_t.shape != (r,) or bool((lam_t < 0).any()) or not bool(torch.isfinite(lam_t).all()):
            raise OptionError(f"{own}: lam must be a finite non-negative scalar or ({r},) tensor, got {lam!r}.")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=dt, device=dev)
            if weights.shape != (d,) or not bool((weights > 0).all()) or not bool(torch.isfinite(weights).all()):
                raise OptionError(f"{own}: weights must be a positive finite tensor of shape ({d},).")
        support_t = None
        if support is not None:
            if support.shape != (r, d) or support.dtype != torch.bool:
                raise OptionError(
                    f"{own}: support must be a boolean tensor of shape ({r}, {d}), got {support.dtype} {tuple(support.shape)}."
                )
            support_t = support.to(dev).T.to(dt)  # (d, r), rows as columns like the state
        if radius is None:
            n_constrained = 0
            rad = torch.full((r,), math.inf, dtype=dt, device=dev)
        else:
            check_int(own, "n_constrained", n_constrained, minimum=0, maximum=d)
            rad = _radius_tensor(radius, r, phi, owner=own).clone()
        q, ev = factor.q, factor.lam
        c = q.T @ (phi.T @ targets.T)  # Φᵀz for every row, expressed in the eigenbasis: (d, r)
        ball2 = None
        if block_ball is not None:
            if not (isinstance(block_ball, tuple) and len(block_ball) == 3):
                raise OptionError(f"{own}: block_ball must be a tuple (start, stop, radius), got {block_ball!r}.")
            start = check_int(own, "block_ball start", block_ball[0], minimum=n_constrained, maximum=d)
            stop = check_int(own, "block_ball stop", block_ball[1], minimum=start, maximum=d)
            ball2 = (start, stop, _radius_tensor(block_ball[2], r, phi, owner=own).clone())
        prob = _Problem(
            phi=phi,
            targets=targets,
            factor=factor,
            lam=lam_t,
            radius=rad,
            n_constrained=n_constrained,
            weights=weights,
            support=support_t,
            c=c,
            block_ball=ball2,
        )
        if self.mode == "equality":
            mask = factor.rank_mask
            inv = torch.where(mask, 1.0 / torch.where(mask, ev, torch.ones_like(ev)), torch.zeros_like(ev))
            prob.c_ls = c * inv[:, None]
            prob.null = (~mask).to(dt)[:, None]
        return prob

    # ------------------------------------------------------------- the steps
    def _beta_step(self, prob: _Problem, active: Tensor, v: Tensor, w: Tensor, rho: Tensor) -> Tensor:
        """Ridge solve (relaxed) or affine projection onto ``Φβ = z`` (equality), in the eigenbasis."""
        q, ev = prob.factor.q, prob.factor.lam
        if self.mode == "relaxed":
            return q @ ((prob.c[:, active] + rho * (q.T @ (v - w))) / (ev[:, None] + rho))
        assert prob.null is not None and prob.c_ls is not None  # set for mode="equality"
        return q @ (prob.null * (q.T @ (v - w)) + prob.c_ls[:, active])

    def _v_step(self, prob: _Problem, active: Tensor, x: Tensor, rho: Tensor) -> Tensor:
        """Prox of ``(λ/ρ)‖·‖₁ + ι(ℓ1 ball) + ι(support)`` at ``x`` (rows as columns)."""
        t = prob.lam[active] / rho
        if prob.weights is not None:
            t = t[:, None] * prob.weights[None, :]
        if prob.support is not None:  # prox of g + ι{β = 0 off the support}: zero those first
            x = x * prob.support[:, active]
        ball2 = None
        if prob.block_ball is not None:
            ball2 = (prob.block_ball[0], prob.block_ball[1], prob.block_ball[2][active])
        return prox_l1_ball(x.T, t, prob.radius[active], prob.n_constrained, ball2).T

    def _residuals(self, beta: Tensor, v: Tensor, v_old: Tensor, w: Tensor, rho: Tensor, sqrt_d: float) -> _Residuals:
        """Boyd's primal and dual residuals and their tolerances (§3.3.1)."""
        pr = torch.linalg.vector_norm(beta - v, dim=0)
        dr = rho * torch.linalg.vector_norm(v - v_old, dim=0)
        eps_pri = sqrt_d * self.tol_abs + self.tol * torch.maximum(
            torch.linalg.vector_norm(beta, dim=0), torch.linalg.vector_norm(v, dim=0)
        )
        eps_dual = sqrt_d * self.tol_abs + self.tol * rho * torch.linalg.vector_norm(w, dim=0)
        return _Residuals(pr, dr, eps_pri, eps_dual)

    def _balance_rho(self, res: _Residuals, rho: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """Residual balancing (Boyd §3.4.1), each residual normalised by its tolerance; the scaled
        dual ``u = y/ρ`` is rescaled with ρ."""
        pn = res.pr / res.eps_pri
        dn = res.dr / res.eps_dual
        up = pn > self.mu * dn
        down = dn > self.mu * pn
        scale = torch.where(up, torch.full_like(rho, self.tau), torch.ones_like(rho))
        scale = torch.where(down, torch.full_like(rho, 1.0 / self.tau), scale)
        return rho * scale, w / scale

    def _iterate(self, prob: _Problem, v: Tensor) -> _Record:
        """The ADMM loop over the working set of rows; stopped rows are recorded and dropped."""
        d, r = prob.dim, prob.rows
        dt, dev = prob.phi.dtype, prob.phi.device
        w = torch.zeros(d, r, dtype=dt, device=dev)
        rho = torch.full((r,), self.rho, dtype=dt, device=dev)
        rec = _Record(d, r, rho)
        active = torch.arange(r, device=dev)
        sqrt_d = math.sqrt(d)
        it = 0
        while active.numel() > 0 and it < self.max_iter:
            it += 1
            beta = self._beta_step(prob, active, v, w, rho)
            beta_hat = self.alpha * beta + (1.0 - self.alpha) * v if self.alpha != 1.0 else beta
            v_old = v
            v = self._v_step(prob, active, beta_hat + w, rho)
            w = w + beta_hat - v
            res = self._residuals(beta, v, v_old, w, rho, sqrt_d)
            done = res.done()
            last = it == self.max_iter
            if it % self.check_every == 0 or last or bool(done.any()):
                if not bool(torch.isfinite(v).all()):
                    raise NonFiniteError(f"BatchedADMM: iterate became non-finite at iteration {it}")
                stop = done | last if last else done
                if bool(stop.any()):
                    rec.store(active[stop], stop, it, v, rho, done, res)
                    keep = ~stop
                    active, v, w, rho, res = active[keep], v[:, keep], w[:, keep], rho[keep], res.keep(keep)
                if self.adaptive_rho and it % self.check_every == 0 and active.numel() > 0:
                    rho, w = self._balance_rho(res, rho, w)
        return rec

    def _result(self, prob: _Problem, rec: _Record, t0: float) -> ADMMResult:
        """Zero the tiny entries and evaluate the objective at the recorded ``v``."""
        beta = rec.v.T.contiguous()
        if self.zero_tol > 0:
            beta = torch.where(beta.abs() < self.zero_tol, torch.zeros_like(beta), beta)
        if not bool(torch.isfinite(beta).all()):
            raise NonFiniteError("BatchedADMM: produced a non-finite solution")
        resid = prob.targets - beta @ prob.phi.T
        l1 = (beta.abs() * prob.weights).sum(dim=1) if prob.weights is not None else beta.abs().sum(dim=1)
        cres = torch.linalg.vector_norm(resid, dim=1)
        obj = prob.lam * l1 + 0.5 * cres**2 if self.mode == "relaxed" else prob.lam * l1
        return ADMMResult(
            beta=beta,
            objective=obj,
            converged=rec.converged,
            nstep=rec.nstep,
            residual=rec.ratio,
            time_s=time.perf_counter() - t0,
            primal_residual=rec.pr,
            dual_residual=rec.dr,
            rho=rec.rho,
            constraint_residual=cres,
            mode=self.mode,
        )

    def failure_message(self, result: ADMMResult) -> str | None:
        """The message for rows that missed the tolerance, ``None`` when all converged."""
        n_bad = result.n_failed
        if not n_bad:
            return None
        return (
            f"ADMM: {n_bad} of {result.converged.numel()} rows did not reach tol={self.tol:g}, "
            f"tol_abs={self.tol_abs:g} within max_iter={self.max_iter}. Try increasing `max_iter`, "
            "changing `rho`, or loosening the tolerances."
        )

    # ------------------------------------------------------------------ solve
    @validated_options
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
        block_ball: tuple[int, int, float | Tensor] | None = None,
    ) -> ADMMResult:
        """Solve the program for every row of ``targets``; apply ``on_failure`` to rows that miss the tolerance.

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
            block_ball: ``(start, stop, radius2)``: a second ℓ1 ball ``‖β[start:stop]‖₁ ≤ radius2``
                (scalar or ``(r,)``) on coordinates after the first ``n_constrained`` (e.g. the input
                columns of ``B``, to bound the model's sensitivity to its input).
        """
        result = self._solve(phi, targets, lam, radius, n_constrained, beta0, factor, weights, support, block_ball)
        msg = self.failure_message(result)
        if msg is not None:
            apply_failure_policy(self.on_failure, msg, stacklevel=3)  # past the options wrapper
        return result

    def _solve(
        self,
        phi,
        targets,
        lam,
        radius=None,
        n_constrained=0,
        beta0=None,
        factor=None,
        weights=None,
        support=None,
        block_ball=None,
    ) -> ADMMResult:
        """:meth:`solve` without the failure policy (the caller applies its own)."""
        t0 = time.perf_counter()
        prob = self._problem(phi, targets, lam, radius, n_constrained, factor, weights, support, block_ball)
        r, d = prob.rows, prob.dim
        if beta0 is not None:
            if beta0.shape != (r, d):
                raise OptionError(f"BatchedADMM.solve: beta0 must have shape ({r}, {d}), got {tuple(beta0.shape)}.")
            v = beta0.to(phi.dtype).T.clone()
        else:
            v = torch.zeros(d, r, dtype=phi.dtype, device=phi.device)
        rec = self._iterate(prob, v)
        return self._result(prob, rec, t0)
