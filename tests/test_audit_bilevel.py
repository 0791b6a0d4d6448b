"""Audit (issue 17): HOAG's outer step on a quadratic bi-level problem with a known optimum.

Inner: ``h(x, λ) = ½‖x − a‖² + ½ Σᵢ e^{λᵢ} xᵢ²`` ⇒ ``x*ᵢ(λ) = aᵢ / (1 + e^{λᵢ})``.
Outer: ``L(x) = ½‖x − b‖²`` ⇒ minimum 0 at ``e^{λ*ᵢ} = aᵢ/bᵢ − 1``.
Hypergradient in closed form: ``dL/dλᵢ = −(x*ᵢ − bᵢ) aᵢ e^{λᵢ} / (1 + e^{λᵢ})²``.

A HOAG that steps *up* the hypergradient (``λ + g/L``) moves away from ``λ*`` at its first step
and never reaches the optimum; the tests below check the direction of the first step, its exact
size, and the progress to the known optimum, for two estimators.

Library calls in one place each (the bilevel estimators are renamed ``ExactHypergradient`` …
at the refactor: change only the wrappers).
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
    return bilevel.Exact(rtol=1e-12)


def jacobian_free_estimator():
    return bilevel.JacobianFree()


def shine_estimator():
    return bilevel.SHINE()


def problem():
    inner = lambda x, lam: 0.5 * ((x - A) ** 2).sum() + 0.5 * (torch.exp(lam) * x**2).sum()  # noqa: E731
    outer = lambda x: 0.5 * ((x - B) ** 2).sum()  # noqa: E731
    return bilevel.BilevelProblem(inner, outer, torch.zeros(4, dtype=DT), name="quadratic")


def run_hoag(estimator, lam0, steps):
    return bilevel.HOAG(estimator, outer_steps=steps, tol_init=1e-11).run(problem(), lam0)


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


@pytest.mark.parametrize("make", [exact_estimator, jacobian_free_estimator, shine_estimator],
                         ids=["exact", "jacobian-free", "shine"])
def test_hoag_reaches_the_known_optimum(make):
    """30 outer steps from λ₀ (loss 1.3): measured best loss 1e-11 (Exact), 5e-10 (JacobianFree),
    2e-12 (SHINE), λ within 1e-2 of λ*; a HOAG stepping up never gets below its starting loss."""
    res = run_hoag(make(), LAM0, steps=30)
    start = res.history[0]["val_loss"]
    assert start == pytest.approx(val_loss(LAM0), rel=1e-8)
    assert res.best_val_loss < 1e-6 * start, [h["val_loss"] for h in res.history]
    torch.testing.assert_close(res.best_lam, LAM_STAR, rtol=0, atol=1e-2)
    assert res.best_val_loss == pytest.approx(val_loss(res.best_lam), rel=1e-4, abs=1e-14)


def test_hoag_accepted_losses_decrease():
    """Every accepted step lowers the outer loss (a rejected one is retried with a smaller step)."""
    res = run_hoag(exact_estimator(), LAM0, steps=12)
    losses = [h["val_loss"] for h in res.history if h["accepted"]]
    assert len(losses) >= 8
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 1e-2 * losses[0]
