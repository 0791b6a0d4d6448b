"""Audit (issue 17): HOAG's outer step on a quadratic bi-level problem with a known optimum.

Inner: ``h(x, λ) = ½‖x − a‖² + ½ Σᵢ e^{λᵢ} xᵢ²`` ⇒ ``x*ᵢ(λ) = aᵢ / (1 + e^{λᵢ})``.
Outer: ``L(x) = ½‖x − b‖²`` ⇒ minimum 0 at ``e^{λ*ᵢ} = aᵢ/bᵢ − 1``.
Hypergradient in closed form: ``dL/dλᵢ = −(x*ᵢ − bᵢ) aᵢ e^{λᵢ} / (1 + e^{λᵢ})²``.

A HOAG that steps *up* the hypergradient (``λ + g/L``) moves away from ``λ*`` at its first step
and never reaches the optimum; the tests below check the direction of the first step, its exact
size, and the progress to the known optimum, for two estimators.

Library calls in one place each (0.2 names: ``ExactHypergradient``, ``JacobianFreeHypergradient``,
``SHINEHypergradient``; 0.1's ``Exact``/``JacobianFree``/``SHINE``).
"""

from __future__ import annotations

import math

import pytest
import torch

from deqkit import bilevel

DT = torch.float64
A = torch.tensor([2.0, 3.0, 4.0, 1.5], dtype=DT)
B = torch.tensor([1.0, 1.0, 1.0, 0.5], dtype=DT)
LAM_STAR = torch.log(A / B - 1.0)


# -- the library calls, one place each -------------------------------------------------------------
def exact_estimator():
    return bilevel.ExactHypergradient(tol=1e-12)


def jacobian_free_estimator():
    return bilevel.JacobianFreeHypergradient()


def shine_estimator():
    return bilevel.SHINEHypergradient()


def problem():
    inner = lambda x, lam: 0.5 * ((x - A) ** 2).sum() + 0.5 * (torch.exp(lam) * x**2).sum()  # noqa: E731
    outer = lambda x: 0.5 * ((x - B) ** 2).sum()  # noqa: E731
    return bilevel.BilevelProblem(inner, outer, torch.zeros(4, dtype=DT), name="quadratic")


def run_hoag(estimator, lam0, steps, pb=None, **kw):
    return bilevel.HOAG(estimator, outer_steps=steps, tol_init=1e-11, **kw).run(pb or problem(), lam0)


# -- closed forms -----------------------------------------------------------------------------------
def x_star(lam):
    return A / (1 + torch.exp(lam))


def val_loss(lam):
    return float(0.5 * ((x_star(lam) - B) ** 2).sum())


def hypergrad(lam):
    e = torch.exp(lam)
    return -(x_star(lam) - B) * A * e / (1 + e) ** 2


LAM0 = torch.tensor([2.0, -1.0, 2.5, 1.5], dtype=DT)


def test_closed_form_sanity():
    assert val_loss(LAM_STAR) == pytest.approx(0.0, abs=1e-28)
    assert val_loss(LAM0) > 0.1
    # the hypergradient is the derivative of the closed-form loss
    lam = LAM0.clone().requires_grad_()
    e = torch.exp(lam)
    (g,) = torch.autograd.grad(0.5 * ((A / (1 + e) - B) ** 2).sum(), lam)
    torch.testing.assert_close(hypergrad(LAM0), g)


def test_hoag_first_step_goes_down_the_hypergradient_by_the_documented_size():
    """Step 0 evaluates λ₀; its update is ``λ₁ = λ₀ − g₀/L₀`` with ``L₀ = ‖g₀‖/√p`` (a first move of
    one unit per coordinate, no clipping here). Checked against the closed-form ``g₀``, and the
    loss at λ₁ is lower."""
    res = run_hoag(exact_estimator(), LAM0, steps=2)
    g0 = hypergrad(LAM0)
    lam1 = LAM0 - g0 * math.sqrt(g0.numel()) / g0.norm()
    h0, h1 = res.history
    assert h0["lam_mean"] == pytest.approx(float(LAM0.mean()), abs=1e-12)
    assert h0["grad_norm"] == pytest.approx(float(g0.norm()), rel=1e-6)
    assert h1["lam_mean"] == pytest.approx(float(lam1.mean()), abs=1e-6)
    torch.testing.assert_close(res.lam, lam1, rtol=1e-6, atol=1e-6)  # res.lam: the last evaluated λ
    assert h1["val_loss"] == pytest.approx(val_loss(lam1), rel=1e-6)
    assert h1["val_loss"] < h0["val_loss"]
    assert h1["accepted"]
    # each coordinate moved towards its optimum
    assert bool(((lam1 - LAM0) * (LAM_STAR - LAM0) > 0).all())


@pytest.mark.parametrize(
    "make", [exact_estimator, jacobian_free_estimator, shine_estimator], ids=["exact", "jacobian-free", "shine"]
)
def test_hoag_reaches_the_known_optimum(make):
    """30 outer steps from λ₀ (loss 1.3): measured best loss 1e-11 (Exact), 5e-10 (JacobianFree),
    2e-12 (SHINE), λ within 1e-2 of λ*; a HOAG stepping up never gets below its starting loss."""
    res = run_hoag(make(), LAM0, steps=30)
    start = res.history[0]["val_loss"]
    assert start == pytest.approx(val_loss(LAM0), rel=1e-8)
    assert res.best_val_loss < 1e-6 * start, [h["val_loss"] for h in res.history]
    torch.testing.assert_close(res.best_lam, LAM_STAR, rtol=0, atol=1e-2)
    assert res.best_val_loss == pytest.approx(val_loss(res.best_lam), rel=1e-4, abs=1e-14)
    assert res.n_linear_not_converged == 0 and res.n_inner_not_converged == 0
    assert all(h["linear_converged"] for h in res.history)


def test_hoag_accepted_losses_decrease():
    """Every accepted step lowers the outer loss (a rejected one is retried with a smaller step)."""
    res = run_hoag(exact_estimator(), LAM0, steps=12)
    losses = [h["val_loss"] for h in res.history if h["accepted"]]
    assert len(losses) >= 8
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 1e-2 * losses[0]


# == the inner L-BFGS's line searches (mutation survivors: interpolation and expansion) ==============
def lbfgs(line_search):
    return bilevel.LBFGS(tol=1e-10, line_search=line_search)


def quadratic(a, xhat):
    a, xhat = torch.tensor(a, dtype=DT), torch.tensor(xhat, dtype=DT)
    return bilevel.BilevelProblem(
        lambda x, lam: 0.5 * (a * (x - xhat) ** 2).sum(), lambda x: (x**2).sum(), torch.zeros(a.numel(), dtype=DT)
    ), xhat


@pytest.mark.parametrize(
    "a,xhat,line_search,steps,evals",
    [
        ([10.0], [0.1], "wolfe", 1, 4),  # first trial overshoots: zoom's quadratic interpolation is exact
        ([4.0], [-0.3], "wolfe", 1, 3),
        ([1.0], [100.0], "wolfe", 2, 7),  # first trial undershoots: the step doubles, then zooms
        ([10.0], [0.1], "armijo", 2, 6),  # halving from one unit
        ([1.0], [100.0], "armijo", 2, 3),
    ],
)
def test_lbfgs_line_search_evaluation_counts_on_a_1d_quadratic(a, xhat, line_search, steps, evals):
    """Measured counts on ``½a(x − x̂)²`` from 0 (first trial: one unit along −∇h): a line search
    that interpolates, expands or backtracks differently needs other counts (or misses x̂)."""
    pb, xh = quadratic(a, xhat)
    res = lbfgs(line_search).solve(pb, torch.tensor(0.0, dtype=DT))
    assert res.converged
    torch.testing.assert_close(res.x, xh, rtol=1e-12, atol=1e-12)
    assert (res.nstep, res.n_evals) == (steps, evals)
    assert all(float(s @ y) > 0 for s, y in zip(res.s, res.y))


def test_hoag_reject_tolerance_accepts_small_increases_and_best_is_the_minimum():
    """With ``reject_tol`` large, the increases that plain HOAG rejects (2 here) are accepted,
    and ``best_val_loss`` stays the minimum over the accepted steps (not the last one)."""
    plain = run_hoag(exact_estimator(), LAM0, steps=30)
    assert plain.n_rejected >= 1
    res = run_hoag(exact_estimator(), LAM0, steps=30, reject_tol=1e3)
    assert res.n_rejected == 0 and all(h["accepted"] for h in res.history)
    losses = [h["val_loss"] for h in res.history]
    assert any(b > a for a, b in zip(losses, losses[1:]))  # an increase was accepted
    assert res.best_val_loss == min(losses)
    k = losses.index(min(losses))
    assert res.history[k]["lam_mean"] == pytest.approx(float(res.best_lam.mean()), abs=1e-15)


def test_hoag_clock_includes_the_setup():
    """The cumulative time of step 0 includes the initial gradient evaluation (slowed to 0.2 s)."""
    import time as _time

    pb = problem()
    real = pb.inner_value_and_grad
    calls = []

    def slow_first(x, lam):
        if not calls:
            _time.sleep(0.2)
        calls.append(1)
        return real(x, lam)

    pb.inner_value_and_grad = slow_first
    res = run_hoag(exact_estimator(), LAM0, steps=2, pb=pb)
    assert res.history[0]["time_s"] >= 0.2
    assert 0 < res.history[0]["time_s"] < res.history[1]["time_s"]


def test_two_loop_with_one_pair_and_with_none_against_closed_forms():
    """Nocedal & Wright (7.20): ``H₀ = γI`` with ``γ = sᵀy/yᵀy``, one BFGS update; no pairs: ``H = I``."""
    g = torch.Generator().manual_seed(3)
    s, y, v = (torch.randn(5, generator=g, dtype=DT) for _ in range(3))
    y = y + 2 * s  # sᵀy > 0
    gamma = float(s @ y) / float(y @ y)
    rho = 1.0 / float(s @ y)
    eye = torch.eye(5, dtype=DT)
    H = (eye - rho * torch.outer(s, y)) @ (gamma * eye) @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)
    torch.testing.assert_close(bilevel.two_loop([s], [y], v), H @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bilevel.two_loop([], [], v), v, rtol=0, atol=0)


def test_dense_bfgs_inverse_with_one_pair_and_a_memory_of_one():
    g = torch.Generator().manual_seed(4)
    s, y, v = (torch.randn(4, generator=g, dtype=DT) for _ in range(3))
    y = y + 2 * s
    torch.testing.assert_close(bilevel.dense_bfgs_inverse([s], [y]) @ v, bilevel.two_loop([s], [y], v), rtol=1e-12, atol=1e-12)
    mem = bilevel.SecantMemory(1)  # a memory of one pair is valid and keeps the newest
    mem.push(s, y)
    mem.push(2 * s, 2 * y)
    assert len(mem) == 1
    res = bilevel.LBFGS(memory=1, tol=1e-9).solve(quadratic([1.0, 10.0], [1.0, -1.0])[0], torch.tensor(0.0, dtype=DT))
    assert res.converged and len(res.s) == 1


def test_lbfgs_counts_the_opa_evaluations():
    """Each accepted step costs at least one line-search evaluation and each OPA pair one more:
    ``n_evals ≥ 1 + nstep + n_opa``."""
    pb = problem()
    res = bilevel.LBFGS(tol=1e-10).solve(pb, LAM0, opa_freq=1)
    assert res.n_opa >= 2
    assert res.n_evals >= 1 + res.nstep + res.n_opa
