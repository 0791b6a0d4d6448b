"""Property tests (hypothesis): random contractive cells and state shapes, float64.

* every forward solver finds the same fixed point (and it is one);
* ``Exact`` with every adjoint solver agrees with ``Exact(Dense())``;
* a long Neumann series agrees with ``Exact(Dense())`` (an independent path to the same gradient).

``max_examples`` is bounded so the file runs in seconds.
"""

from __future__ import annotations

import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import deqkit as dk  # noqa: E402

DT = torch.float64
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


# -- the library calls, one place each -------------------------------------------------------------
def forward_solvers():
    return {
        "fixed-point": dk.FixedPoint(tol=1e-12, max_iter=500, stop_mode="abs"),
        "anderson": dk.Anderson(memory=6, tol=1e-12, max_iter=300, stop_mode="abs"),
        "broyden": dk.Broyden(memory=60, tol=1e-12, max_iter=300, stop_mode="abs"),
    }


def adjoint_solvers():
    return {
        "gmres": dk.GMRES(restart=30, tol=1e-12, max_iter=300),
        "auto": dk.AutoAdjoint(restart=30, tol=1e-12, max_iter=300),  # 0.2's default adjoint solver
        "fixed-point": dk.FixedPoint(tol=1e-13, max_iter=500),
        "anderson": dk.Anderson(memory=6, tol=1e-13, max_iter=300),
        "broyden": dk.Broyden(memory=60, tol=1e-13, max_iter=300),
    }


def exact(linear_solver):
    return dk.Exact(linear_solver, on_failure="raise")


def dense():
    return dk.Dense()


def neumann(k):
    return dk.Neumann(k, 1.0)


def make_deq(cell, solver, grad, state_shape):
    return dk.DEQ(cell, solver, grad, state_shape=state_shape, on_failure="raise")


# -- random problems -------------------------------------------------------------------------------
class FlatTanhCell(nn.Module):
    """``f(z, x) = tanh(W vec(z) + U x + b)`` reshaped to the state shape; ``‖W‖₂ = rho`` < 1."""

    def __init__(self, shape, p, rho, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = math.prod(shape)
        W = torch.randn(d, d, generator=g, dtype=DT)
        self.W = nn.Parameter(rho * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(d, p, generator=g, dtype=DT) / math.sqrt(p))
        self.b = nn.Parameter(0.1 * torch.randn(d, generator=g, dtype=DT))
        self.shape = tuple(shape)

    def forward(self, z, x):
        out = torch.tanh(z.flatten(1) @ self.W.T + x @ self.U.T + self.b)
        return out.view(z.shape[0], *self.shape)


problems = st.fixed_dictionaries(
    {
        "shape": st.lists(st.integers(1, 4), min_size=1, max_size=3).filter(lambda s: 2 <= math.prod(s) <= 24),
        "p": st.integers(1, 5),
        "batch": st.integers(1, 4),
        "rho": st.floats(0.05, 0.7),
        "seed": st.integers(0, 10**6),
    }
)


def _setup(pr):
    cell = FlatTanhCell(pr["shape"], pr["p"], pr["rho"], pr["seed"])
    g = torch.Generator().manual_seed(pr["seed"] + 1)
    x = torch.randn(pr["batch"], pr["p"], generator=g, dtype=DT)
    c = torch.randn(pr["batch"], *pr["shape"], generator=g, dtype=DT)
    return cell, x, c


def _grads(pr, solver, grad):
    cell, x, c = _setup(pr)
    xx = x.clone().requires_grad_()
    deq = make_deq(cell, solver, grad, pr["shape"])
    z, info = deq(xx)
    ((z - c) ** 2).sum().backward()
    return z.detach(), torch.cat([p.grad.flatten() for p in cell.parameters()] + [xx.grad.flatten()]), info


@SETTINGS
@given(problems)
def test_forward_solvers_agree_on_the_fixed_point(pr):
    zs = {name: _grads(pr, s, exact(dense()))[0] for name, s in forward_solvers().items()}
    cell, x, _ = _setup(pr)
    with torch.no_grad():
        z = zs["broyden"]
        assert float((cell(z, x) - z).norm()) < 1e-10
    for name, z2 in zs.items():
        torch.testing.assert_close(z2, z, rtol=0, atol=1e-10, msg=name)


@SETTINGS
@given(problems, st.sampled_from(sorted(adjoint_solvers())))
def test_exact_with_any_adjoint_solver_matches_dense(pr, name):
    _, g_ref, _ = _grads(pr, forward_solvers()["broyden"], exact(dense()))
    _, g, info = _grads(pr, forward_solvers()["broyden"], exact(adjoint_solvers()[name]))
    assert bool(info.backward.solve.converged.all())
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-9)


@SETTINGS
@given(problems)
def test_a_long_neumann_series_matches_dense(pr):
    """``Σ_{t<k} v Jᵗ`` with ``‖J‖ ≤ ρ ≤ 0.7``: the tail is below ``ρᵏ/(1−ρ)``; k = 90 makes it < 1e-13."""
    _, g_ref, _ = _grads(pr, forward_solvers()["anderson"], exact(dense()))
    _, g, _ = _grads(pr, forward_solvers()["anderson"], neumann(90))
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)
