"""Choosing λ for a target density: a warm-started search along the lasso path.

The number of non-zeros of a lasso solution falls (not always strictly) as λ grows, from the
dense least-squares fit at λ = 0 to none at ``λ ≥ λ_max = max_j |Φ_jᵀz|/w_j`` (the KKT
condition of ``β = 0``; Tibshirani, "Regression shrinkage and selection via the lasso", JRSS B
1996; Friedman, Hastie, Tibshirani, "Regularization paths for generalized linear models via
coordinate descent", J. Stat. Softw. 2010, who walk the same path on a log grid with warm
starts). :func:`search_lam` brackets the target on a log-λ grid downwards from ``λ_max``, then
refines the bracket by a safeguarded secant (regula falsi with the Illinois modification,
bisection when the secant step lands near a bracket end) on ``density(log λ)``. Each solve is
warm-started from the nearest λ already solved (the caller's ``evaluate`` does that).

Used by :func:`deqkit.sim.fit.fit_sim` (``density=...``) for the SIM program (Tsai, Decugis,
El Ghaoui, Atamtürk, arXiv 2209.09389).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import OptionError

__all__ = ["DensitySearch", "search_lam"]


@dataclass
class DensitySearch:
    """Outcome of :func:`search_lam`.

    ``lam`` is the λ chosen (the evaluated point whose density is nearest the target),
    ``density`` its density, ``converged`` whether ``|density − target| ≤ tol``, ``nstep`` the
    number of solves, and ``path`` every ``(λ, density)`` seen, in the order evaluated (the first
    entry is ``λ_max`` with density 0, known without a solve). With ``fit_sim(debias=True)``,
    ``density`` is that of the refitted model, and so are the path's points from the first
    refit on (the λ the lasso search chose, repeated with its refitted density, then any further
    solves).
    """

    lam: float
    density: float
    target: float
    tol: float
    converged: bool
    nstep: int
    path: list[tuple[float, float]] = field(default_factory=list)


def search_lam(
    evaluate: Callable[[float], float],
    target: float,
    lam_max: float,
    *,
    tol: float = 0.005,
    max_evals: int = 20,
    min_ratio: float = 1e-8,
    start: tuple[float, float] | None = None,
) -> DensitySearch:
    """λ with ``|evaluate(λ) − target| ≤ tol``, for a density that falls from its dense value at
    small λ to 0 at ``lam_max``.

    Args:
        evaluate: ``λ ↦ density`` (solves the program at λ; it may keep the solution for the
            caller and warm-start from earlier ones).
        target: the wanted density (> 0).
        lam_max: a λ at which the density is 0 (no solve is spent on it).
        tol: accepted distance to the target (a fraction: 0.005 = half a percentage point).
        max_evals: the most solves.
        min_ratio: the smallest λ tried is ``min_ratio·lam_max``; a target denser than the
            density there cannot be bracketed.
        start: an already evaluated ``(λ, density)`` with the density below the target: the
            bracket steps down from it instead of from ``λ_max`` (it is in ``path`` and may be
            the point chosen; it costs no solve).
    """
    path: list[tuple[float, float]] = [(lam_max, 0.0)]
    evals = 0

    def done(lam: float, d: float) -> DensitySearch:
        lam_b, d_b = min(path[1:] or path, key=lambda t: abs(t[1] - target))
        return DensitySearch(
            lam=lam_b, density=d_b, target=target, tol=tol, converged=abs(d_b - target) <= tol, nstep=evals, path=path
        )

    # 1) bracket: step down a decade at a time from λ_max (or start) until the density reaches the target
    hi, d_hi = lam_max, 0.0
    if start is not None:
        hi, d_hi = start
        if not (0 < hi <= lam_max and d_hi < target):
            raise OptionError(
                f"search_lam: start must be an evaluated (λ, density) with 0 < λ ≤ λ_max = {lam_max:g} and a density "
                f"below the target {target:g}, got {start}."
            )
        path.append(start)
    lam = hi / 10.0
    lo = d_lo = None
    while evals < max_evals:
        d = evaluate(lam)
        evals += 1
        path.append((lam, d))
        if abs(d - target) <= tol:
            return done(lam, d)
        if d > target:
            lo, d_lo = lam, d
            break
        hi, d_hi = lam, d
        if lam <= lam_max * min_ratio:
            return done(lam, d)
        lam = max(lam / 10.0, lam_max * min_ratio)
    if lo is None or d_lo is None:
        return done(lam, path[-1][1])
    # 2) refine: Illinois regula falsi on density(log λ), bisection as a safeguard
    x_lo, x_hi = math.log(lo), math.log(hi)
    f_lo, f_hi = d_lo - target, d_hi - target  # f_lo > 0 > f_hi
    side = 0
    while evals < max_evals and x_hi - x_lo > 1e-9:
        x = x_lo - f_lo * (x_hi - x_lo) / (f_hi - f_lo) if f_hi != f_lo else 0.5 * (x_lo + x_hi)
        frac = (x - x_lo) / (x_hi - x_lo)
        if not (0.05 < frac < 0.95):
            x = 0.5 * (x_lo + x_hi)
        lam = math.exp(x)
        d = evaluate(lam)
        evals += 1
        path.append((lam, d))
        if abs(d - target) <= tol:
            break
        f = d - target
        if f > 0:
            x_lo, f_lo = x, f
            if side == -1:
                f_hi *= 0.5  # Illinois: the end kept twice has its value halved
            side = -1
        else:
            x_hi, f_hi = x, f
            if side == 1:
                f_lo *= 0.5
            side = 1
    return done(lam, path[-1][1])
