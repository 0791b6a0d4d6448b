"""Jacobian regularisation (Hutchinson), the spectral-radius monitor and fixed-point correction,
against exact float64 references."""

import math

import pytest
import torch
from torch import nn

from deqkit.errors import OptionError
from deqkit.regularizers import JacobianRegularizer, fixed_point_correction, hutchinson_frobenius, spectral_radius


class _TanhCell(nn.Module):
    """f(z, x) = tanh(W z + x): small, smooth, per-sample Jacobian diag(1 − f²) W."""

    def __init__(self, d, scale=0.9, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(scale * torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x)


def _jacobians(cell, z, x):
    """Per-sample Jacobians ∂f/∂z, (B, d, d), sample by sample."""
    return torch.stack([torch.autograd.functional.jacobian(lambda zi: cell(zi[None], xi[None])[0], zi) for zi, xi in zip(z, x)])


def test_hutchinson_is_unbiased_for_the_frobenius_norm():
    torch.manual_seed(0)
    d, B = 6, 3
    cell = _TanhCell(d)
    x, z = torch.randn(B, d, dtype=torch.float64), torch.randn(B, d, dtype=torch.float64)
    fn = lambda z: cell(z, x)  # noqa: E731
    J = _jacobians(cell, z, x)
    exact = J.pow(2).sum(dim=(1, 2)) / d
    n = 4000
    g = torch.Generator().manual_seed(1)
    samples = torch.stack([hutchinson_frobenius(fn, z, probes=1, generator=g) for _ in range(n)])  # (n, B)
    mean, sem = samples.mean(0), samples.std(0) / math.sqrt(n)
    assert torch.all((mean - exact).abs() < 4 * sem), (mean, exact, sem)
    # averaging probes inside one call estimates the same quantity, with smaller spread
    many = hutchinson_frobenius(fn, z, probes=2000, generator=g)
    torch.testing.assert_close(many, exact, rtol=0.1, atol=0)


def test_hutchinson_carries_the_graph_to_the_parameters():
    torch.manual_seed(0)
    d = 5
    cell = _TanhCell(d)
    x, z = torch.randn(2, d, dtype=torch.float64), torch.randn(2, d, dtype=torch.float64)
    fn = lambda z: cell(z, x)  # noqa: E731
    est = hutchinson_frobenius(fn, z, probes=3, create_graph=True)
    assert est.requires_grad
    est.sum().backward()
    assert cell.W.grad is not None and cell.W.grad.abs().sum() > 0
    assert not hutchinson_frobenius(fn, z).requires_grad


def test_power_method_matches_eigvals():
    torch.manual_seed(0)
    d, B = 8, 4
    # a Jacobian with a dominant real eigenvalue: W = Q diag(λ) Q⁻¹, f(z) = W z + x (J = W for every sample)
    lam = torch.tensor([0.95, -0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05], dtype=torch.float64)
    Q = torch.randn(d, d, dtype=torch.float64) + 3 * torch.eye(d, dtype=torch.float64)
    W = Q @ torch.diag(lam) @ torch.linalg.inv(Q)
    x = torch.randn(B, d, dtype=torch.float64)
    fn = lambda z: z @ W.T + x  # noqa: E731
    rho = spectral_radius(fn, torch.zeros(B, d, dtype=torch.float64), n_iter=200, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.eigvals(W).abs().max()
    torch.testing.assert_close(rho, ref.expand(B), rtol=1e-6, atol=0)


def test_power_method_on_a_nonlinear_cell_per_sample():
    torch.manual_seed(0)
    d, B = 6, 3
    cell = _TanhCell(d, scale=1.5)
    x, z = torch.randn(B, d, dtype=torch.float64), torch.randn(B, d, dtype=torch.float64)
    fn = lambda z: cell(z, x)  # noqa: E731
    J = _jacobians(cell, z, x)
    ref = torch.linalg.eigvals(J).abs().max(dim=1).values
    rho = spectral_radius(fn, z, n_iter=500, generator=torch.Generator().manual_seed(0))
    # power iteration converges when one real eigenvalue dominates; check those samples exactly
    ev = torch.linalg.eigvals(J)
    top = ev.abs().argmax(dim=1)
    real_dominant = ev[torch.arange(B), top].imag.abs() < 1e-12
    assert real_dominant.any()
    torch.testing.assert_close(rho[real_dominant], ref[real_dominant], rtol=1e-4, atol=0)


def _fpc_closed_form(W, x, iterates, gamma, tau):
    """d/dW of Σ_j γ^(n−j) ½‖(1−τ) z_j + τ tanh(W z_j + x)‖² with z_j held fixed (float64, by hand)."""
    n = len(iterates)
    grad = torch.zeros_like(W)
    for j, zj in enumerate(iterates, start=1):
        a = zj @ W.T + x
        f = torch.tanh(a)
        zt = (1 - tau) * zj + tau * f
        delta = gamma ** (n - j) * zt * tau * (1 - f**2)  # dL/da
        grad += delta.T @ zj
    return grad


@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_fixed_point_correction_gradient_matches_a_closed_form(tau):
    torch.manual_seed(0)
    d, B = 5, 3
    cell = _TanhCell(d)
    x = torch.randn(B, d, dtype=torch.float64)
    iterates = [torch.randn(B, d, dtype=torch.float64) for _ in range(4)]
    fn = lambda z: cell(z, x)  # noqa: E731
    loss = fixed_point_correction(fn, iterates, lambda z: 0.5 * z.pow(2).sum(), gamma=0.8, tau=tau)
    (g,) = torch.autograd.grad(loss, cell.W)
    torch.testing.assert_close(g, _fpc_closed_form(cell.W.detach(), x, iterates, 0.8, tau), rtol=1e-10, atol=1e-12)


def test_fixed_point_correction_matches_autograd_through_the_same_iterates():
    """The iterates of a plain fixed-point run, recorded with their graph: the correction's gradient
    equals autograd through one phantom step from each (detached) iterate, weighted γ^(n−j)."""
    torch.manual_seed(0)
    d, B = 5, 2
    cell = _TanhCell(d, scale=0.5)
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    fn = lambda z: cell(z, x)  # noqa: E731
    z, its = torch.zeros(B, d, dtype=torch.float64), []
    with torch.no_grad():
        for _ in range(6):
            z = fn(z)
            its.append(z.clone())
    loss_fn = lambda z: (z.sin() * torch.arange(d)).sum()  # noqa: E731
    got = torch.autograd.grad(fixed_point_correction(fn, its, loss_fn, gamma=0.7, k=2, tau=0.5), [cell.W, x])
    ref_loss = 0.0
    for j, zj in enumerate(its, start=1):
        y = zj
        for _ in range(2):
            y = 0.5 * y + 0.5 * torch.tanh(y @ cell.W.T + x)
        ref_loss = ref_loss + 0.7 ** (len(its) - j) * loss_fn(y)
    ref = torch.autograd.grad(ref_loss, [cell.W, x])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_regularizer_options_and_schedule():
    r = JacobianRegularizer(2.0, warmup=0.2, stop=0.8)
    assert r.weight_at(0.0) == 0.0 and r.weight_at(0.1) == pytest.approx(1.0) and r.weight_at(0.5) == 2.0
    assert r.weight_at(0.9) == 0.0
    assert JacobianRegularizer(1.0).weight_at(1.0) == 1.0
    with pytest.raises(OptionError, match="Did you mean 'probes'"):
        JacobianRegularizer(1.0, probe=2)
    with pytest.raises(OptionError, match="freq"):
        JacobianRegularizer(1.0, freq=0)
    with pytest.raises(OptionError, match="warmup"):
        JacobianRegularizer(1.0, warmup=0.9, stop=0.5)
    torch.manual_seed(0)
    fired = sum(JacobianRegularizer(1.0, freq=0.25).fires() for _ in range(4000))
    assert 850 < fired < 1150
    with pytest.raises(OptionError, match="keep_iterates"):
        fixed_point_correction(lambda z: z, [], lambda z: z.sum())
