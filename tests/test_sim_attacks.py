"""FGSM / PGD on linear models, where the attacks have closed forms."""

import pytest
import torch
import torch.nn.functional as F

from deqkit.sim import accuracy, fgsm, pgd, robust_accuracy


def _linear(q=4, p=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(q, p, generator=g, dtype=torch.float64)
    b = torch.randn(q, generator=g, dtype=torch.float64)
    return w, b, (lambda u: u @ w.T + b)


def test_fgsm_closed_form_on_linear_model():
    w, b, model = _linear()
    g = torch.Generator().manual_seed(1)
    u = torch.rand(20, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (20,), generator=g)
    # ∇_u CE(Wu + b, y) = (softmax(Wu + b) − e_y) W, divided by the batch size (mean reduction)
    grad = (torch.softmax(model(u), 1) - F.one_hot(y, 4).double()) @ w
    for clip in (None, (0.0, 1.0)):
        expect = u + 0.1 * grad.sign()
        if clip is not None:
            expect = expect.clamp(*clip)
        assert torch.allclose(fgsm(model, u, y, 0.1, clip=clip), expect)


def test_pgd_reaches_the_worst_case_of_a_binary_linear_model():
    w, b, model = _linear(q=2)
    u = torch.rand(30, 7, dtype=torch.float64)
    y = torch.randint(0, 2, (30,))
    eps = 0.05
    # worst case in the ε-ball (no clipping): move each input by ε·sign against the margin;
    # the margin (true − other logit) drops by exactly ε‖w_y − w_other‖₁
    sgn = torch.where(y[:, None] == 0, 1.0, -1.0).double()
    dw = (w[0] - w[1])[None, :] * sgn
    margin = lambda x: ((x @ w.T + b).gather(1, y[:, None]) - (x @ w.T + b).gather(1, 1 - y[:, None])).squeeze(1)
    expect = margin(u) - eps * dw.abs().sum(1)
    adv = pgd(model, u, y, eps, steps=5, random_start=True, clip=None, seed=0)
    assert torch.all((adv - u).abs() <= eps + 1e-12)
    assert torch.allclose(margin(adv), expect, atol=1e-10)
    # FGSM is already optimal here
    assert torch.allclose(margin(fgsm(model, u, y, eps, clip=None)), expect, atol=1e-10)


def test_pgd_respects_ball_and_clip_and_robust_accuracy_at_zero():
    w, b, model = _linear()
    u = torch.rand(25, 7, dtype=torch.float64)
    y = model(u).argmax(1)
    adv = pgd(model, u, y, 0.2, steps=3)
    assert torch.all((adv - u).abs() <= 0.2 + 1e-12) and adv.min() >= 0 and adv.max() <= 1
    rob = robust_accuracy(model, u, y, [0.0, 0.5], attack="pgd", steps=3)
    assert rob[0.0] == accuracy(model, u, y) == 1.0
    assert rob[0.5] < 1.0
    with pytest.raises(ValueError, match="'fgsm', 'pgd'"):
        robust_accuracy(model, u, y, [0.1], attack="cw")
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, u, y, -0.1)
