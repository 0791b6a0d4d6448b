"""L-BFGS's strong-Wolfe line search, trial by trial, against a reference written from the textbook.

The bi-level L-BFGS (``deqkit/bilevel/lbfgs.py``) finds its step with Nocedal & Wright's
Algorithm 3.5 (bracketing: double the trial until Armijo fails, the value stops decreasing or the
slope turns non-negative) and Algorithm 3.6 (zoom: safeguarded quadratic interpolation of
``(lo, φ(lo), φ'(lo))`` and ``(hi, φ(hi))``, bisection when the interpolant has no minimum or its
minimiser falls within 10 % of the bracket's ends), with Hager & Zhang's approximate-Wolfe test
once differences of ``φ`` reach round-off.

A line search that still ends at a Wolfe point but gets there by other trials (a wrong
interpolation denominator, a bracket end not swapped, a safeguard dropped) costs inner-problem
evaluations without changing the answer, so answer-only tests miss it (the mutation audit's
survivors). These tests compare the whole sequence of trial points, on non-quadratic 1-D
functions, with :func:`reference_wolfe` below, an independent transcription of the two
algorithms, and check the strong-Wolfe conditions at every accepted point.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from deqkit.bilevel.lbfgs import _wolfe

C1, C2 = 1e-4, 0.9


def reference_wolfe(phi: Callable[[float], tuple[float, float]], t1: float, max_evals: int = 25):
    """Nocedal & Wright Alg. 3.5-3.6 with safeguarded quadratic interpolation.

    Returns ``(trials, accepted_t or None, wolfe_ok)``; ``phi(t) -> (value, slope)``."""
    f0, d0 = phi(0.0)
    eps_f = 1e-12 * abs(f0)
    trials: list[float] = []

    def evaluate(t):
        trials.append(t)
        return phi(t)

    def wolfe(t, f, d):
        if f <= f0 + C1 * t * d0 and -d <= -C2 * d0 and d <= -C2 * d0:
            return True  # sufficient decrease and |φ'(t)| ≤ c2|φ'(0)|
        return f <= f0 + eps_f and C2 * d0 <= d <= (2 * C1 - 1) * d0  # approximate Wolfe

    def sufficient(t, f):
        return math.isfinite(f) and f <= f0 + C1 * t * d0

    def zoom(lo, f_lo, d_lo, hi, f_hi, budget):
        best = None
        while budget > 0:
            budget -= 1
            a, b = sorted((lo, hi))
            # minimiser of q with q(lo)=f_lo, q'(lo)=d_lo, q(hi)=f_hi
            curv = (f_hi - f_lo - d_lo * (hi - lo)) / (hi - lo) ** 2
            t = lo - d_lo / (2 * curv) if curv > 0 and math.isfinite(f_hi) else (lo + hi) / 2
            if t < a + 0.1 * (b - a) or t > b - 0.1 * (b - a):
                t = (lo + hi) / 2
            f, d = evaluate(t)
            if math.isfinite(f) and wolfe(t, f, d):
                return t, True
            if not sufficient(t, f) or f >= f_lo:
                hi, f_hi = t, f
            else:
                best = t
                if d * (hi - lo) >= 0:  # the minimum lies on lo's other side
                    hi, f_hi = lo, f_lo
                lo, f_lo, d_lo = t, f, d
            if abs(hi - lo) < 1e-16 * max(1.0, abs(lo)):
                break
        return (best, False) if best is not None else (None, False)

    t_prev, f_prev, d_prev, t, best = 0.0, f0, d0, t1, None
    for i in range(max_evals):
        f, d = evaluate(t)
        if math.isfinite(f) and wolfe(t, f, d):
            return trials, t, True
        if not sufficient(t, f) or (i > 0 and f >= f_prev):
            acc, ok = zoom(t_prev, f_prev, d_prev, t, f, max_evals - i - 1)
            if acc is None and best is not None:
                return trials, best, False
            return trials, acc, ok
        best = t
        if d >= 0:
            acc, ok = zoom(t, f, d, t_prev, f_prev, max_evals - i - 1)
            return trials, (acc if acc is not None else t), ok
        t_prev, f_prev, d_prev, t = t, f, d, 2.0 * t
    return trials, best, False


def softplus(z: float) -> float:
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


# 1-D functions φ(t) = h(x0 + t·p) with φ'(0) < 0: (value, slope) pairs
FUNCTIONS: dict[str, Callable[[float], tuple[float, float]]] = {
    # far minimum: the bracketing phase doubles the trial several times
    "softplus_far": lambda t: (softplus(8 - t) + 1e-3 * (t - 8) ** 2, -sigmoid(8 - t) + 2e-3 * (t - 8)),
    # steep quartic: the first trial overshoots, zoom interpolates down
    "quartic": lambda t: ((t - 0.3) ** 4 + 0.05 * t * t, 4 * (t - 0.3) ** 3 + 0.1 * t),
    # log-cosh well: slopes saturate, the quadratic model is poor
    "logcosh": lambda t: (math.log(math.cosh(3 * (t - 0.7))), 3 * math.tanh(3 * (t - 0.7))),
    # overflow beyond t > 0.9: non-finite values must shrink the bracket
    "overflow": lambda t: (math.inf, math.inf) if t > 0.9 else (math.exp(6 * t) - 8 * t, 6 * math.exp(6 * t) - 8),
    # minimum just past the first trial with a positive slope there
    "slope_turns": lambda t: ((t - 0.8) ** 2 + 0.3 * math.sin(5 * t), 2 * (t - 0.8) + 1.5 * math.cos(5 * t)),
    # sharp valley: the interpolated point falls outside the 10 % safeguard and bisection takes over
    "valley": lambda t: (math.sqrt(1e-4 + (t - 0.05) ** 2) - 0.2 * t, (t - 0.05) / math.sqrt(1e-4 + (t - 0.05) ** 2) - 0.2),
    # equal values at t = 1 and t = 2 (a smoothstep bump between): "the value stopped decreasing"
    # must hold at equality, or the search expands forever along the slope of -1
    "plateau": lambda t: (-t + _smoothstep(t - 1.0), -1.0 + _smoothstep_slope(t - 1.0)),
    # a kink of width 1e-9: the Wolfe set is tiny, zoom runs until the bracket collapses
    "kink": lambda t: (math.sqrt(1e-18 + (t - 0.37) ** 2), (t - 0.37) / math.sqrt(1e-18 + (t - 0.37) ** 2)),
    # sufficient decrease holds at t = 1 by 5e-5·|φ'(0)| only, with a positive slope there
    "armijo_edge": lambda t: (-t + (0.7 - 1.5e-4) * t * t + 0.3 * t**3, -1 + 2 * (0.7 - 1.5e-4) * t + 0.9 * t * t),
    # round-off: the value cannot decrease below f(0) (large, flat) while the slope goes to zero;
    # only the approximate-Wolfe test accepts
    "roundoff": lambda t: (1e6 + (1e-7 if t > 0 else 0.0), -1e-3 * (1 - t)),
}


def _smoothstep(s: float) -> float:
    s = min(max(s, 0.0), 1.0)
    return 3 * s * s - 2 * s**3


def _smoothstep_slope(s: float) -> float:
    return 6 * s * (1 - s) if 0.0 < s < 1.0 else 0.0


def _recorded(search, phi, t1, *constants, max_evals=25):
    """``search`` (deqkit's ``_wolfe`` or ``_armijo``) on ``phi`` from ``t1``: its trial points and its result."""
    trials: list[float] = []

    def wrapped(t):
        trials.append(t)
        f, d = phi(t)
        return f, None, d

    f0, d0 = phi(0.0)
    return trials, search(wrapped, f0, d0, t1, *constants, max_evals)


def run_deqkit(phi, t1, max_evals=25):
    return _recorded(_wolfe, phi, t1, C1, C2, max_evals=max_evals)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("t1", [1.0, 0.25, 3.0])
@pytest.mark.parametrize("max_evals", [2, 3, 25])
def test_trials_follow_the_textbook_line_search(name, t1, max_evals):
    """Same trials and same answer as the reference, with room to finish (25 evaluations) and
    with budgets that end the search early (2, 3: the fallbacks to the best point so far)."""
    phi = FUNCTIONS[name]
    assert phi(0.0)[1] < 0, "a descent direction"
    want_trials, want_t, want_ok = reference_wolfe(phi, t1, max_evals)
    trials, out = run_deqkit(phi, t1, max_evals)
    assert trials == pytest.approx(want_trials, rel=1e-12, abs=1e-15), (name, trials, want_trials)
    if want_t is None:
        assert out is None
        return
    assert out is not None
    t, f, _, ok = out
    assert (t, ok) == (pytest.approx(want_t, rel=1e-12), want_ok)
    if ok:  # an accepted point satisfies strong Wolfe (or the approximate test)
        f0, d0 = phi(0.0)
        d = phi(t)[1]
        strong = f <= f0 + C1 * t * d0 and abs(d) <= -C2 * d0
        approx = f <= f0 + 1e-12 * abs(f0) and C2 * d0 <= d <= (2 * C1 - 1) * d0
        assert strong or approx


def test_the_cases_exercise_every_branch():
    """The functions above reach expansion, both zoom entries, a non-finite value, bisection by the
    safeguard and interpolation inside it (otherwise the comparison would not cover them)."""
    seen: set[str] = set()
    for name, phi in FUNCTIONS.items():
        for t1 in (1.0, 0.25, 3.0):
            trials, _, _ = reference_wolfe(phi, t1)
            values = [phi(t)[0] for t in trials]
            if len(trials) >= 3 and trials[1] == 2 * trials[0] and trials[2] == 2 * trials[1]:
                seen.add("expand")
            if any(not math.isfinite(v) for v in values):
                seen.add("nonfinite")
            f0, d0 = phi(0.0)
            if phi(trials[0])[1] >= 0 and phi(trials[0])[0] <= f0 + C1 * trials[0] * d0:
                seen.add("zoom_from_positive_slope")
            if phi(trials[0])[0] > f0 + C1 * trials[0] * d0:
                seen.add("zoom_from_armijo")
            mids = [(a, b) for a, b in zip(trials, trials[1:])]
            if any(abs(b - a / 2) < 1e-15 for a, b in mids):
                seen.add("bisect")
            if len(trials) >= 2 and all(abs(b - a / 2) > 1e-9 and abs(b - 2 * a) > 1e-9 for a, b in mids[:1]):
                seen.add("interpolate")
    assert {"expand", "nonfinite", "zoom_from_positive_slope", "zoom_from_armijo", "bisect", "interpolate"} <= seen, seen


def test_a_tight_budget_returns_the_best_sufficient_point_not_a_wolfe_point():
    """With 2 evaluations the far-minimum function cannot finish: the last point with sufficient
    decrease is returned with ``wolfe_ok=False`` (and the reference agrees)."""
    phi = FUNCTIONS["softplus_far"]
    want_trials, want_t, want_ok = reference_wolfe(phi, 0.25, max_evals=2)
    trials, out = run_deqkit(phi, 0.25, max_evals=2)
    assert trials == pytest.approx(want_trials, rel=1e-12)
    assert out is not None and not want_ok and out[3] is False
    assert out[0] == pytest.approx(want_t, rel=1e-12)


def _run_armijo(phi, t1, max_evals=25):
    from deqkit.bilevel.lbfgs import _armijo

    return _recorded(_armijo, phi, t1, C1, max_evals=max_evals)


def test_armijo_backtracks_from_a_point_just_above_the_sufficient_decrease_line():
    """φ(t) = −2t + (1 − 1e-4)t² + t³: φ(1) = −1e-4 lies above the Armijo line f0 + c1·t·φ'(0) =
    −2e-4 (and |φ'(1)| > |φ'(0)|, so the round-off clause does not apply): the search halves once
    and accepts t = 1/2 (φ = −0.625)."""
    a = 1 - 1e-4
    phi = lambda t: (-2 * t + a * t * t + t**3, -2 + 2 * a * t + 3 * t * t)  # noqa: E731
    trials, out = _run_armijo(phi, 1.0)
    assert trials == [1.0, 0.5] and out is not None and out[0] == 0.5 and out[3] is True


def test_zoom_keeps_a_trial_without_sufficient_decrease_as_its_upper_end():
    """First trial t = 1 fails Armijo (φ = 1); the zoom's interpolated trial t = 1/4 has
    φ = −1e-5, below φ(0) = 0 but above the Armijo line (−2.5e-5): it must become the bracket's
    upper end, not its lower one (the reference and deqkit then agree on every later trial)."""

    def phi(t: float) -> tuple[float, float]:
        return (1.0, 1.0) if t >= 0.5 else (-4e-5 * t, -1.0)

    want_trials, want_t, want_ok = reference_wolfe(phi, 1.0, max_evals=6)
    trials, out = run_deqkit(phi, 1.0, max_evals=6)
    assert trials[:2] == [1.0, 0.25]
    assert trials == pytest.approx(want_trials, rel=1e-12)
    assert all(t < 0.25 for t in trials[2:]), "after 1/4 failed Armijo, the bracket is [0, 1/4]"


def test_zoom_stops_when_the_bracket_collapses():
    """A cliff at t = 3e-14 (slope −1 everywhere, so no Wolfe point exists): from t1 = 1e-14 the
    bracket shrinks below 1e-16 within a few trials and the search returns the best point with
    ``wolfe_ok=False`` instead of spending its whole budget."""

    def phi(t: float) -> tuple[float, float]:
        return (1.0, -1.0) if t >= 3e-14 else (-t, -1.0)

    want_trials, want_t, want_ok = reference_wolfe(phi, 1e-14)
    trials, out = run_deqkit(phi, 1e-14)
    assert trials == pytest.approx(want_trials, rel=1e-12, abs=0)
    assert len(trials) < 25 and out is not None and out[3] is False and not want_ok


def test_armijo_accepts_a_short_first_trial_on_its_own_sufficient_decrease_line():
    """φ(t) = −t + 98.9t² + 100t³ from t1 = 0.01: φ(0.01) = −1e-5 is below f0 + c1·t·φ'(0) = −1e-6
    (and |φ'(0.01)| > |φ'(0)|, so only the Armijo test can accept it): accepted at once. A line
    that scaled with 1/t instead of t would reject it."""
    phi = lambda t: (-t + 98.9 * t * t + 100 * t**3, -1 + 197.8 * t + 300 * t * t)  # noqa: E731
    assert phi(0.01)[0] == pytest.approx(-1e-5, rel=1e-9) and phi(0.01)[1] > 1
    trials, out = _run_armijo(phi, 0.01)
    assert trials == [0.01] and out is not None and out[3] is True
