"""HOAG-style outer loop (Pedregosa, "Hyperparameter optimization with approximate
gradient", ICML 2016), with the settings of SHINE's bi-level code (Ramzi et al., ICLR 2022,
arXiv 2106.00553): inner tolerance ``ε₀ = 1e-3·‖∇ₓh(x₀, λ₀)‖``, ``εₖ = ε₀·0.78ᵏ``; λ clipped
to ``[−12, 12]``; 30 outer steps.

Outer step ``k``: solve the inner problem to ``‖∇ₓh‖ ≤ εₖ`` (warm-started at the previous
``x*``), estimate the hypergradient ``gₖ`` (CG-based estimators to the relative tolerance
``εₖ/‖∇ₓh(x₀, λ₀)‖``, warm-started at the previous ``w``), then
``λₖ₊₁ = clip(λₖ − gₖ/Lₖ)``.  Adaptive step as in HOAG: ``L₀ = ‖g₀‖/√p`` (a first move of
about one unit per coordinate); a step that decreased the outer loss makes ``L ← 0.95 L``; a
step that increased it by more than ``reject_tol`` (relative) is rejected: λ returns to the
previous accepted point, ``L ← 2L``, and the step is retried with the stored hypergradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from deqkit._options import check_bool, check_failure_policy, check_int, check_number, check_positive, validated_options
from deqkit.errors import OptionError, apply_failure_policy
from deqkit.results import ResultMixin

from .hypergrad import ExactHypergradient, HypergradientEstimator, HypergradResult, default_inner_solver
from .lbfgs import LBFGS, LBFGSResult
from .problem import BilevelProblem

__all__ = ["HOAG", "HOAGResult", "hypergradient_cosine"]


@dataclass
class HOAGResult(ResultMixin):
    """Outcome of :meth:`HOAG.run`.

    HOAG runs a fixed number of outer steps with inner tolerances that tighten at every step,
    so inexact early solves are by design; what decides whether the returned λ can be
    trusted is the *last* step. Hence:

    Attributes:
        converged: the last outer step's inner solve met its tolerance and its hypergradient's
            linear solve (if any) met its own.
        nstep: outer steps run.
        residual: ``‖∇ₓh(x, λ)‖`` of the last inner solve (compared to the last step's
            ``inner_tol``).
        time_s: seconds of the run (excluding the test-loss evaluation and logging).
        lam, x: the last evaluated λ and its inner solution.
        best_lam, best_val_loss: the evaluated λ with the lowest outer loss.
        history: one dict per outer step: ``step, time_s`` (cumulative seconds, excluding the
            test-loss evaluation and logging), ``val_loss, test_loss, grad_norm, lam_mean,
            inner_tol, inner_nstep, inner_converged, n_hvp, linear_converged, accepted,
            step_size, n_opa, n_skipped``.
        estimator: the hypergradient estimator's name.
        last_inner: the last inner result (its pairs).
        n_inner_not_converged, n_linear_not_converged: steps whose inner / linear solve missed
            its tolerance; n_rejected: rejected outer steps.
    """

    lam: Tensor
    x: Tensor
    best_lam: Tensor
    best_val_loss: float
    history: list[dict]
    estimator: str
    converged: bool
    nstep: int
    residual: float
    time_s: float
    last_inner: Optional[LBFGSResult] = None
    n_inner_not_converged: int = 0
    n_linear_not_converged: int = 0
    n_rejected: int = 0

    @property
    def times(self) -> list[float]:
        """Cumulative seconds after each outer step."""
        return [h["time_s"] for h in self.history]

    @property
    def val_losses(self) -> list[float]:
        return [h["val_loss"] for h in self.history]

    @property
    def test_losses(self) -> list[Optional[float]]:
        return [h["test_loss"] for h in self.history]

    def time_to_reach(self, target: float) -> Optional[float]:
        """First cumulative time at which the outer loss was ``≤ target`` (None if never)."""
        for h in self.history:
            if h["val_loss"] <= target:
                return h["time_s"]
        return None


@dataclass
class _Run:
    """The mutable state of one :meth:`HOAG.run`."""

    lam: Tensor
    x: Tensor
    g0norm: float
    clock: float
    w: Optional[Tensor] = None
    L_lam: Optional[float] = None
    old: Optional[tuple[Tensor, Tensor, float]] = None  # (lam, grad, loss) at the last accepted point
    best_lam: Optional[Tensor] = None
    best_loss: float = math.inf
    history: list[dict] = field(default_factory=list)
    inner: Optional[LBFGSResult] = None
    hg: Optional[HypergradResult] = None
    lam_eval: Optional[Tensor] = None
    n_in_nc: int = 0
    n_lin_nc: int = 0
    n_rej: int = 0


@validated_options
class HOAG:
    """HOAG outer loop driven by any hypergradient estimator.

    Args:
        hypergradient: a :class:`~deqkit.bilevel.HypergradientEstimator`
            (:class:`~deqkit.bilevel.ExactHypergradient`, ...; see
            :func:`~deqkit.bilevel.make_hypergradient`).
        solver: the inner :class:`LBFGS` (default: memory 30, 60 with OPA, ``max_iter=1000``,
            ``on_failure='ignore'`` since inexact early solves are by design).
        outer_steps: number of outer iterations (30).
        tol_init: ``ε₀ / ‖∇ₓh(x₀, λ₀)‖`` (1e-3).
        tol_decrease: factor per outer step (0.78).
        lam_bounds: clip interval for λ ((−12, 12)).
        reject_tol: relative increase of the outer loss above which a step is rejected (0).
        warm_start: warm-start the inner solve at the previous ``x*`` and CG at the previous
            ``w``.
        on_failure: what a run whose last step's inner or linear solve missed its tolerance
            does (see :class:`HOAGResult`): ``'warn'``, ``'raise'`` or ``'ignore'``.
        callback: called with each history dict (e.g. to print progress).
    """

    def __init__(
        self,
        hypergradient: HypergradientEstimator,
        *,
        solver: Optional[LBFGS] = None,
        outer_steps: int = 30,
        tol_init: float = 1e-3,
        tol_decrease: float = 0.78,
        lam_bounds: tuple[float, float] = (-12.0, 12.0),
        reject_tol: float = 0.0,
        warm_start: bool = True,
        on_failure: str = "warn",
        callback: Optional[Callable[[dict], None]] = None,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(hypergradient, HypergradientEstimator):
            raise OptionError(
                f"{owner}: hypergradient must be a HypergradientEstimator (ExactHypergradient, "
                f"SHINEHypergradient, JacobianFreeHypergradient, or make_hypergradient(name)), "
                f"got {hypergradient!r}."
            )
        if solver is not None and not callable(getattr(solver, "solve", None)):
            raise OptionError(f"{owner}: solver must be an inner solver such as LBFGS(...), got {solver!r}.")
        if callback is not None and not callable(callback):
            raise OptionError(f"{owner}: callback must be a callable or None, got {callback!r}.")
        self.hypergradient = hypergradient
        self.solver = solver if solver is not None else default_inner_solver(hypergradient, max_iter=1000, on_failure="ignore")
        self.outer_steps = check_int(owner, "outer_steps", outer_steps)
        self.tol_init = check_positive(owner, "tol_init", tol_init)
        self.tol_decrease = check_number(owner, "tol_decrease", tol_decrease, low=0.0, high=1.0, low_open=True)
        self.lam_bounds = self._check_bounds(owner, lam_bounds)
        self.reject_tol = check_positive(owner, "reject_tol", reject_tol, allow_zero=True)
        self.warm_start = check_bool(owner, "warm_start", warm_start)
        self.on_failure = check_failure_policy(owner, on_failure)
        self.callback = callback

    @staticmethod
    def _check_bounds(owner: str, lam_bounds: Any) -> tuple[float, float]:
        try:
            lo, hi = lam_bounds
        except (TypeError, ValueError):
            raise OptionError(f"{owner}: lam_bounds must be a pair (low, high), got {lam_bounds!r}.") from None
        lo, hi = check_number(owner, "lam_bounds[0]", lo), check_number(owner, "lam_bounds[1]", hi)
        if not lo < hi:
            raise OptionError(f"{owner}: lam_bounds must be (low, high) with low < high, got {lam_bounds!r}.")
        return lo, hi

    def __repr__(self) -> str:
        return (
            f"HOAG({self.hypergradient!r}, solver={self.solver!r}, outer_steps={self.outer_steps}, "
            f"tol_init={self.tol_init:g}, tol_decrease={self.tol_decrease:g}, lam_bounds={self.lam_bounds}, "
            f"reject_tol={self.reject_tol:g}, warm_start={self.warm_start}, on_failure={self.on_failure!r})"
        )

    def run(self, problem: BilevelProblem, lam0: Tensor) -> HOAGResult:
        """Run the outer loop from ``lam0`` (scalar or vector tensor)."""
        st = self._start(problem, lam0)
        for k in range(self.outer_steps):
            rec = self._outer_step(problem, st, k)
            st.history.append(rec)
            if self.callback is not None:
                self.callback(rec)
        return self._finish(st)

    # ----------------------------------------------------------------- the steps of a run
    def _start(self, problem: BilevelProblem, lam0: Tensor) -> _Run:
        """λ₀ and ``‖∇ₓh(x₀, λ₀)‖`` (the scale of the inner tolerances)."""
        t0 = time.perf_counter()
        lam = lam0.detach().clone().to(problem.x0.dtype)
        _, g0 = problem.inner_value_and_grad(problem.x0, lam)
        g0norm = max(float(g0.norm()), 1e-300)
        return _Run(lam=lam, x=problem.x0, g0norm=g0norm, best_lam=lam.clone(), lam_eval=lam, clock=time.perf_counter() - t0)

    def _outer_step(self, problem: BilevelProblem, st: _Run, k: int) -> dict[str, Any]:
        """One outer step: inner solve, hypergradient, accept or reject, move λ; its record."""
        t0 = time.perf_counter()
        est = self.hypergradient
        rel_tol = self.tol_init * self.tol_decrease**k
        inner = self.solver.solve(
            problem, st.lam, x0=st.x if self.warm_start else None, tol=rel_tol * st.g0norm, **est.inner_options(problem)
        )
        hg = est.hypergradient(problem, st.lam, inner, w0=st.w if self.warm_start else None, tol=rel_tol)
        st.inner, st.hg, st.lam_eval = inner, hg, st.lam.clone()
        accepted, g = self._accept_or_reject(st, hg)
        if st.L_lam is None:
            st.L_lam = max(float(g.norm()) / math.sqrt(g.numel()), 1e-12)
        step = 1.0 / st.L_lam
        st.lam = (st.lam - step * g).clamp(*self.lam_bounds)
        st.clock += time.perf_counter() - t0
        if hg.outer_loss < st.best_loss and accepted:
            st.best_loss, st.best_lam = hg.outer_loss, st.lam_eval.clone()
        st.n_in_nc += int(not inner.converged)
        st.n_lin_nc += int(not hg.converged)
        return {
            "step": k,
            "time_s": st.clock,
            "val_loss": hg.outer_loss,
            "test_loss": problem.test_value(inner.x),
            "grad_norm": float(hg.grad.norm()),
            "lam_mean": float(st.lam_eval.mean()),
            "inner_tol": rel_tol * st.g0norm,
            "inner_nstep": inner.nstep,
            "inner_converged": inner.converged,
            "n_hvp": hg.n_hvp,
            "linear_converged": hg.converged,
            "accepted": accepted,
            "step_size": step,
            "n_opa": inner.n_opa,
            "n_skipped": inner.n_skipped,
        }

    def _accept_or_reject(self, st: _Run, hg: HypergradResult) -> tuple[bool, Tensor]:
        """HOAG's step control; returns whether the step is accepted and the gradient to step
        along (the stored one after a rejection, when λ returns to the last accepted point)."""
        loss, g = hg.outer_loss, hg.grad
        if st.old is not None:
            assert st.L_lam is not None  # set by the first outer step, which stored st.old
            if loss > st.old[2] * (1.0 + self.reject_tol) + 1e-15:
                st.n_rej += 1
                st.L_lam *= 2.0
                st.lam = st.old[0].clone()
                # x and w stay at the rejected point's values: a fine warm start
                return False, st.old[1]
            st.L_lam *= 0.95
        st.old = (st.lam.clone(), g, loss)
        assert st.inner is not None  # set by _outer_step before this call
        st.x = st.inner.x
        st.w = hg.w
        return True, g

    def _finish(self, st: _Run) -> HOAGResult:
        inner, hg = st.inner, st.hg
        # outer_steps >= 1 (validated), so the first step set these
        assert inner is not None and hg is not None
        assert st.lam_eval is not None and st.best_lam is not None
        converged = bool(inner.converged and hg.converged)
        result = HOAGResult(
            lam=st.lam_eval,
            x=inner.x,
            best_lam=st.best_lam,
            best_val_loss=st.best_loss,
            history=st.history,
            estimator=self.hypergradient.name,
            converged=converged,
            nstep=len(st.history),
            residual=inner.residual,
            time_s=st.clock,
            last_inner=inner,
            n_inner_not_converged=st.n_in_nc,
            n_linear_not_converged=st.n_lin_nc,
            n_rejected=st.n_rej,
        )
        if not converged:
            what = "inner solve" if not inner.converged else "hypergradient's linear solve"
            apply_failure_policy(
                self.on_failure,
                f"HOAG: the last outer step's {what} missed its tolerance (inner ‖∇ₓh‖={inner.residual:.3e}, "
                f"tol={st.history[-1]['inner_tol']:.3e}; linear residual {hg.residual:.2e}), so the final λ's "
                "hypergradient is inexact. Try a larger `max_iter` for the inner solver or the estimator.",
                stacklevel=3,
            )
        return result


@validated_options
def hypergradient_cosine(
    problem: BilevelProblem,
    lam: Tensor,
    hypergradient: HypergradientEstimator,
    tol: float,
    x0: Optional[Tensor] = None,
    solver: Optional[LBFGS] = None,
    reference: Optional[HypergradientEstimator] = None,
) -> dict[str, float]:
    """Solve the inner problem at ``lam`` (to ``‖∇h‖ ≤ tol``, with ``hypergradient``'s inner
    options) and compare ``hypergradient``'s estimate with ``reference`` (default
    ``ExactHypergradient(tol=1e-12)``) at the same ``x*``.

    Returns ``{'cosine', 'rel_error', 'norm', 'ref_norm'}``.
    """
    tol = check_positive("hypergradient_cosine", "tol", tol)
    solver = solver if solver is not None else default_inner_solver(hypergradient, max_iter=2000, on_failure="warn")
    reference = reference if reference is not None else ExactHypergradient(tol=1e-12, max_iter=5000)
    inner = solver.solve(problem, lam, x0=x0, tol=tol, **hypergradient.inner_options(problem))
    g = hypergradient.hypergradient(problem, lam, inner).grad
    g_ref = reference.hypergradient(problem, lam, inner).grad
    n, nr = float(g.norm()), float(g_ref.norm())
    cos = float((g * g_ref).sum()) / max(n * nr, 1e-300)
    return {"cosine": cos, "rel_error": float((g - g_ref).norm()) / max(nr, 1e-300), "norm": n, "ref_norm": nr}
