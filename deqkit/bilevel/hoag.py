"""HOAG-style outer loop (Pedregosa, "Hyperparameter optimization with approximate
gradient", ICML 2016), with the settings of SHINE's bi-level code (Ramzi et al., ICLR 2022,
arXiv 2106.00553): inner tolerance ``ε₀ = 1e-3·‖∇ₓh(x₀, λ₀)‖``, ``εₖ = ε₀·0.78ᵏ``; λ clipped
to ``[−12, 12]``; 30 outer steps.

Outer step ``k``: solve the inner problem to ``‖∇ₓh‖ ≤ εₖ`` (warm-started at the previous
``x*``), estimate the hypergradient ``gₖ`` (CG-based estimators to the relative tolerance
``εₖ/‖∇ₓh(x₀, λ₀)‖``, warm-started at the previous ``w``), then
``λₖ₊₁ = clip(λₖ − gₖ/Lₖ)``.  Adaptive step as in HOAG: ``L₀ = ‖g₀‖/√p`` (a first move of
about one unit per coordinate); a step that decreased the outer loss makes ``L ← 0.95 L``; a
step that increased it by more than ``reject_rtol`` is rejected: λ returns to the previous
accepted point, ``L ← 2L``, and the step is retried with the stored hypergradient.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from torch import Tensor

from .hypergrad import Exact, HypergradientEstimator, default_inner_solver
from .lbfgs import LBFGS, LBFGSResult
from .problem import BilevelProblem

__all__ = ["HOAG", "HOAGResult", "hypergradient_cosine"]


@dataclass
class HOAGResult:
    """Outcome of :meth:`HOAG.run`.

    Attributes:
        lam, x: the last evaluated λ and its inner solution.
        best_lam, best_val_loss: the evaluated λ with the lowest outer loss.
        history: one dict per outer step: ``step, time`` (cumulative seconds, excluding the
            test-loss evaluation and logging), ``val_loss, test_loss, grad_norm, lam_mean,
            inner_tol, inner_steps, inner_converged, n_hvp, linear_converged, accepted,
            step_size, n_opa, n_skipped``.
        last_inner: the last inner result (its pairs).
    """

    lam: Tensor
    x: Tensor
    best_lam: Tensor
    best_val_loss: float
    history: List[Dict]
    estimator: str
    last_inner: Optional[LBFGSResult] = None
    n_inner_not_converged: int = 0
    n_linear_not_converged: int = 0
    n_rejected: int = 0

    @property
    def times(self) -> List[float]:
        return [h["time"] for h in self.history]

    @property
    def val_losses(self) -> List[float]:
        return [h["val_loss"] for h in self.history]

    @property
    def test_losses(self) -> List[Optional[float]]:
        return [h["test_loss"] for h in self.history]

    def time_to_reach(self, target: float) -> Optional[float]:
        """First cumulative time at which the outer loss was ``≤ target`` (None if never)."""
        for h in self.history:
            if h["val_loss"] <= target:
                return h["time"]
        return None


class HOAG:
    """HOAG outer loop driven by any hypergradient estimator.

    Args:
        estimator: an :class:`~deqkit.bilevel.hypergrad.HypergradientEstimator`.
        solver: the inner :class:`LBFGS` (default: memory 30, 60 with OPA, ``max_iter=1000``,
            ``on_fail='record'`` since inexact early solves are by design).
        outer_steps: number of outer iterations (30).
        tol_init: ``ε₀ / ‖∇ₓh(x₀, λ₀)‖`` (1e-3).
        tol_decrease: factor per outer step (0.78).
        lam_bounds: clip interval for λ ((−12, 12)).
        reject_rtol: relative increase of the outer loss above which a step is rejected (0).
        warm_start: warm-start the inner solve at the previous ``x*`` and CG at the previous
            ``w``.
        callback: called with each history dict (e.g. to print progress).
    """

    def __init__(self, estimator: HypergradientEstimator, solver: Optional[LBFGS] = None,
                 outer_steps: int = 30, tol_init: float = 1e-3, tol_decrease: float = 0.78,
                 lam_bounds: Tuple[float, float] = (-12.0, 12.0), reject_rtol: float = 0.0,
                 warm_start: bool = True,
                 callback: Optional[Callable[[Dict], None]] = None) -> None:
        if not isinstance(estimator, HypergradientEstimator):
            raise ValueError("estimator must be a HypergradientEstimator (Exact, SHINE, "
                             f"JacobianFree), got {type(estimator).__name__}")
        if not isinstance(outer_steps, int) or outer_steps < 1:
            raise ValueError(f"outer_steps must be a positive int, got {outer_steps!r}")
        if not tol_init > 0:
            raise ValueError(f"tol_init must be positive, got {tol_init!r}")
        if not 0 < tol_decrease <= 1:
            raise ValueError(f"tol_decrease must be in (0, 1], got {tol_decrease!r}")
        if not lam_bounds[0] < lam_bounds[1]:
            raise ValueError(f"lam_bounds must be (low, high) with low < high, got {lam_bounds!r}")
        if not reject_rtol >= 0:
            raise ValueError(f"reject_rtol must be >= 0, got {reject_rtol!r}")
        self.estimator = estimator
        self.solver = solver if solver is not None else default_inner_solver(
            estimator, max_iter=1000, on_fail="record")
        self.outer_steps = outer_steps
        self.tol_init = float(tol_init)
        self.tol_decrease = float(tol_decrease)
        self.lam_bounds = (float(lam_bounds[0]), float(lam_bounds[1]))
        self.reject_rtol = float(reject_rtol)
        self.warm_start = bool(warm_start)
        self.callback = callback

    def run(self, problem: BilevelProblem, lam0: Tensor) -> HOAGResult:
        """Run the outer loop from ``lam0`` (scalar or vector tensor)."""
        est = self.estimator
        lam = lam0.detach().clone().to(problem.x0.dtype)
        lo, hi = self.lam_bounds
        clock = 0.0
        t0 = time.perf_counter()
        _, g0 = problem.inner_value_and_grad(problem.x0, lam)
        g0norm = max(float(g0.norm()), 1e-300)
        x = problem.x0
        w = None
        L_lam = None
        old = None  # (lam, grad, loss) at the last accepted point
        best_lam, best_loss = lam.clone(), math.inf
        history: List[Dict] = []
        n_in_nc = n_lin_nc = n_rej = 0
        inner = None
        x_eval = x
        lam_eval = lam
        clock += time.perf_counter() - t0
        for k in range(self.outer_steps):
            t0 = time.perf_counter()
            rel_tol = self.tol_init * self.tol_decrease ** k
            inner = self.solver.solve(problem, lam, x0=x if self.warm_start else None,
                                      tol=rel_tol * g0norm, **est.inner_options(problem))
            hg = est.hypergradient(problem, lam, inner, w0=w if self.warm_start else None,
                                   rtol=rel_tol)
            loss, g = hg.outer_loss, hg.grad
            x_eval, lam_eval = inner.x, lam.clone()
            accepted = True
            if old is not None:
                if loss > old[2] * (1.0 + self.reject_rtol) + 1e-15:
                    accepted = False
                    n_rej += 1
                    L_lam *= 2.0
                    lam, g = old[0].clone(), old[1]
                    # x and w stay at the rejected point's values: a fine warm start
                else:
                    L_lam *= 0.95
            if accepted:
                old = (lam.clone(), g, loss)
                x = inner.x
                w = hg.w
            if L_lam is None:
                L_lam = max(float(g.norm()) / math.sqrt(g.numel()), 1e-12)
            step = 1.0 / L_lam
            lam = (lam - step * g).clamp(lo, hi)
            clock += time.perf_counter() - t0
            if loss < best_loss and accepted:
                best_loss, best_lam = loss, lam_eval.clone()
            n_in_nc += int(not inner.converged)
            n_lin_nc += int(not hg.converged)
            rec = {
                "step": k, "time": clock, "val_loss": hg.outer_loss,
                "test_loss": problem.test_value(inner.x),
                "grad_norm": float(hg.grad.norm()), "lam_mean": float(lam_eval.mean()),
                "inner_tol": rel_tol * g0norm, "inner_steps": inner.n_steps,
                "inner_converged": inner.converged, "n_hvp": hg.n_hvp,
                "linear_converged": hg.converged, "accepted": accepted, "step_size": step,
                "n_opa": inner.n_opa, "n_skipped": inner.n_skipped,
            }
            history.append(rec)
            if self.callback is not None:
                self.callback(rec)
        return HOAGResult(lam=lam_eval, x=x_eval, best_lam=best_lam, best_val_loss=best_loss,
                          history=history, estimator=est.name, last_inner=inner,
                          n_inner_not_converged=n_in_nc, n_linear_not_converged=n_lin_nc,
                          n_rejected=n_rej)


def hypergradient_cosine(problem: BilevelProblem, lam: Tensor,
                         estimator: HypergradientEstimator, tol: float,
                         x0: Optional[Tensor] = None, solver: Optional[LBFGS] = None,
                         reference: Optional[HypergradientEstimator] = None) -> Dict[str, float]:
    """Solve the inner problem at ``lam`` (to ``‖∇h‖ ≤ tol``, with ``estimator``'s inner
    options) and compare ``estimator``'s hypergradient with ``reference`` (default
    ``Exact(rtol=1e-12)``) at the same ``x*``.

    Returns ``{'cosine', 'rel_error', 'norm', 'ref_norm'}``.
    """
    solver = solver if solver is not None else default_inner_solver(
        estimator, max_iter=2000, on_fail="warn")
    reference = reference if reference is not None else Exact(rtol=1e-12, max_iter=5000)
    inner = solver.solve(problem, lam, x0=x0, tol=tol, **estimator.inner_options(problem))
    g = estimator.hypergradient(problem, lam, inner).grad
    g_ref = reference.hypergradient(problem, lam, inner).grad
    n, nr = float(g.norm()), float(g_ref.norm())
    cos = float((g * g_ref).sum()) / max(n * nr, 1e-300)
    return {"cosine": cos, "rel_error": float((g - g_ref).norm()) / max(nr, 1e-300),
            "norm": n, "ref_norm": nr}
