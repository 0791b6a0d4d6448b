"""Gradient estimators against closed forms, unrolled autograd and gradcheck (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    F64,
    FORWARD_NAMES,
    LINEAR_NAMES,
    ShiftCell,
    TanhCell,
    randn,
    rel_err,
    tight_forward_solvers,
    tight_linear_solvers,
)
from torch.func import functional_call

from deqkit import DEQ, GMRES, Anderson, Dense, Exact, FixedPoint, JacobianFree, Neumann, Unrolled, make_estimator


def _loss(z, c):
    return (c * z).sum() + 0.5 * (z**2).sum()


def _grads(deq, x, c):
    """(z, dL/dparams..., dL/dx, info) of ``L = Σ c·z* + ½‖z*‖²`` through the DEQ."""
    deq.zero_grad()
    x = x.detach().clone().requires_grad_()
    z, info = deq(x)
    _loss(z, c).backward()
    return z.detach(), {n: p.grad.clone() for n, p in deq.cell.named_parameters()}, x.grad.clone(), info


# ---------------------------------------------------------------------------------------------
# Exact against the closed form, every forward solver × every linear solver
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("forward", FORWARD_NAMES)
@pytest.mark.parametrize("linear", LINEAR_NAMES)
def test_exact_linear_cell_closed_form(forward, linear, linear_problem):
    """``f = A z + B x``: ``z* = (I−A)⁻¹Bx``, ``w = v(I−A)⁻¹`` with ``v = c + z*``;
    ``dL/dA = Σ_b w_bᵀ z*_b``, ``dL/dB = Σ_b w_bᵀ x_b``, ``dL/dx = w B``."""
    cell, x, c = linear_problem
    d = cell.A.shape[0]
    deq = DEQ(
        cell,
        tight_forward_solvers()[forward],
        Exact(tight_linear_solvers()[linear], on_failure="raise"),
        state_shape=(d,),
        on_failure="raise",
    )
    z, g, gx, info = _grads(deq, x, c)

    A, Bm = cell.A.detach(), cell.B.detach()
    I_A = torch.eye(d, dtype=F64) - A
    z_ref = torch.linalg.solve(I_A, (x @ Bm.T).T).T
    v = c + z_ref
    w = torch.linalg.solve(I_A.T, v.T).T  # rows: w (I − A) = v
    assert rel_err(z, z_ref) < 1e-10
    assert rel_err(g["A"], w.T @ z_ref) < 1e-8
    assert rel_err(g["B"], w.T @ x) < 1e-8
    assert rel_err(gx, w @ Bm) < 1e-8
    assert info.backward.solve.all_converged
    assert info.backward.vjps >= 1


def test_exact_dense_cost_and_stats(linear_problem):
    cell, x, c = linear_problem
    deq = DEQ(cell, Anderson(tol=1e-12, max_iter=100), Exact(Dense()), state_shape=(8,))
    _, _, _, info = _grads(deq, x, c)
    assert info.backward.vjps == 8  # one VJP per Jacobian row
    assert info.backward.solve.solver == "dense"
    assert info.backward.time_s >= 0


@pytest.mark.parametrize("warm_start", ["default", "jfb"])
def test_exact_warm_start_same_answer(warm_start, linear_problem):
    cell, x, c = linear_problem
    deq = DEQ(
        cell, Anderson(tol=1e-12, max_iter=100), Exact(GMRES(tol=1e-12, max_iter=100), warm_start=warm_start), state_shape=(8,)
    )
    _, g, gx, _ = _grads(deq, x, c)
    ref = DEQ(cell, Anderson(tol=1e-12, max_iter=100), Exact(Dense()), state_shape=(8,))
    _, g_ref, gx_ref, _ = _grads(ref, x, c)
    assert rel_err(g["A"], g_ref["A"]) < 1e-9 and rel_err(gx, gx_ref) < 1e-9


# ---------------------------------------------------------------------------------------------
# Exact on a nonlinear cell: unrolled autograd and gradcheck
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("linear", ["gmres", "dense", "anderson"])
def test_exact_tanh_cell_matches_long_unrolled_autograd(linear):
    """``tanh(Wz + Ux + b)`` with ‖W‖ = 0.3: 200 plain iterations (error ~0.3²⁰⁰) with a graph
    give the exact gradient; the DEQ's Exact estimator must agree to 1e-9."""
    cell = TanhCell(8, 5, rho=0.3, seed=3)
    x = randn(4, 5, seed=4)
    c = randn(4, 8, seed=5)
    deq = DEQ(cell, Anderson(tol=1e-12, max_iter=200), Exact(tight_linear_solvers()[linear]), state_shape=(8,))
    z, g, gx, _ = _grads(deq, x, c)

    cell.zero_grad()
    xr = x.clone().requires_grad_()
    zr = torch.zeros(4, 8, dtype=F64)
    for _ in range(200):
        zr = cell(zr, xr)
    _loss(zr, c).backward()
    assert rel_err(z, zr.detach()) < 1e-11
    for name, p in cell.named_parameters():
        assert rel_err(g[name], p.grad) < 1e-9, name
    assert rel_err(gx, xr.grad) < 1e-9


@pytest.mark.parametrize("linear", [Dense(tol=1e-10), GMRES(tol=1e-13, max_iter=50)], ids=["dense", "gmres"])
def test_gradcheck_tiny_deq(linear):
    cell = TanhCell(3, 2, rho=0.5, seed=9)
    deq = DEQ(cell, Anderson(tol=1e-13, max_iter=200), Exact(linear, on_failure="raise"), state_shape=(3,))
    x = randn(2, 2, seed=10).requires_grad_()
    c = randn(2, 3, seed=11)
    assert torch.autograd.gradcheck(lambda xx: _loss(deq(xx)[0], c), (x,), eps=1e-6, atol=1e-7, rtol=1e-6)
    W = cell.W.detach().clone().requires_grad_()
    xc = x.detach()

    def of_weight(WW):
        z, _ = functional_call(deq, {"cell.W": WW}, (xc,))
        return _loss(z, c)

    assert torch.autograd.gradcheck(of_weight, (W,), eps=1e-6, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Phantom gradients and JFB
# ---------------------------------------------------------------------------------------------


def _shift_problem():
    cell = ShiftCell(8, rho=0.5, seed=21, symmetric=True)
    x = randn(3, 8, seed=22)
    c = randn(3, 8, seed=23)
    return cell, x, c


@pytest.mark.parametrize("family", [Unrolled, Neumann])
@pytest.mark.parametrize("damping", [1.0, 0.7])
def test_phantom_gradients_approach_exact_monotonically(family, damping):
    """Property tested: for ``f = A z + x`` with symmetric ``A`` (‖A‖₂ = 0.5) the estimate of
    ``dL/dx = w`` after k damped steps has error ``e_k = −w* M^k``, ``M = λA + (1−λ)I``
    symmetric with ‖M‖₂ < 1, hence ``‖e_k‖`` is non-increasing in k and ≤ ‖M‖₂^k ‖w*‖
    (< 1e-5 relative at k = 32). The same holds for ``dL/dA``'s error only up to the
    Kronecker structure, so only ``dL/dx`` is checked for monotonicity."""
    cell, x, c = _shift_problem()
    solver = Anderson(tol=1e-13, max_iter=100)
    _, _, gx_exact, _ = _grads(DEQ(cell, solver, Exact(Dense()), state_shape=(8,)), x, c)
    errs = []
    for k in (1, 2, 4, 8, 16, 32):
        _, g, gx, _ = _grads(DEQ(cell, solver, family(k=k, damping=damping), state_shape=(8,)), x, c)
        errs.append(rel_err(gx, gx_exact))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 1e-2  # the comparison is not vacuous
    bound = max(abs(damping * s + 1 - damping) for s in (-0.5, 0.5))  # ‖M‖₂ ≤ this
    for k, e in zip((1, 2, 4, 8, 16, 32), errs):
        assert e <= bound**k * (1 + 1e-6) + 1e-12, (k, errs)
    assert errs[-1] < 1e-5


@pytest.mark.parametrize("family", [Unrolled, Neumann])
def test_phantom_gradients_tanh_cell_converge_to_exact(family):
    cell = TanhCell(8, 5, rho=0.3, seed=31)
    x = randn(3, 5, seed=32)
    c = randn(3, 8, seed=33)
    solver = Anderson(tol=1e-13, max_iter=100)
    _, g_ex, gx_ex, _ = _grads(DEQ(cell, solver, Exact(Dense()), state_shape=(8,)), x, c)
    errs = []
    for k in (1, 4, 32):
        _, g, gx, _ = _grads(DEQ(cell, solver, family(k=k, damping=0.8), state_shape=(8,)), x, c)
        errs.append(max(rel_err(gx, gx_ex), *(rel_err(g[n], g_ex[n]) for n in g_ex)))
    assert errs[0] > 1e-2
    assert errs[1] < errs[0] and errs[2] < errs[1]
    assert errs[2] < 1e-8, errs


def test_unrolled_equals_neumann_on_linear_cell():
    """For a linear cell J is constant and the unrolled steps start at z*, so UPG == NPG."""
    cell, x, c = _shift_problem()
    solver = Anderson(tol=1e-13, max_iter=100)
    for k, lam in ((1, 0.5), (3, 0.6), (7, 1.0)):
        _, gu, gxu, _ = _grads(DEQ(cell, solver, Unrolled(k=k, damping=lam), state_shape=(8,)), x, c)
        _, gn, gxn, _ = _grads(DEQ(cell, solver, Neumann(k=k, damping=lam), state_shape=(8,)), x, c)
        assert rel_err(gxu, gxn) < 1e-12 and rel_err(gu["A"], gn["A"]) < 1e-12


def test_jacobian_free_equals_unrolled_1_1_exactly():
    cell = TanhCell(8, 5, rho=0.3, seed=41)
    x = randn(3, 5, seed=42)
    c = randn(3, 8, seed=43)
    solver = Anderson(tol=1e-10, max_iter=100)
    z1, g1, gx1, _ = _grads(DEQ(cell, solver, JacobianFree(), state_shape=(8,)), x, c)
    z2, g2, gx2, _ = _grads(DEQ(cell, solver, Unrolled(k=1, damping=1.0), state_shape=(8,)), x, c)
    assert torch.equal(z1, z2) and torch.equal(gx1, gx2)
    for n in g1:
        assert torch.equal(g1[n], g2[n])
    # and it is genuinely w = v: dL/dx = v ∂f/∂x at z*
    _, _, gx_ex, _ = _grads(DEQ(cell, solver, Exact(Dense()), state_shape=(8,)), x, c)
    assert rel_err(gx1, gx_ex) > 1e-3
    xr = x.clone().requires_grad_()
    f = cell(z1, xr)
    (gx_ref,) = torch.autograd.grad(f, xr, c + z1)
    torch.testing.assert_close(gx1, gx_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("lam", [0.3, 0.5, 1.0])
def test_neumann_k1_is_damped_jfb(lam):
    cell = TanhCell(8, 5, rho=0.3, seed=51)
    x = randn(3, 5, seed=52)
    c = randn(3, 8, seed=53)
    solver = Anderson(tol=1e-10, max_iter=100)
    _, gj, gxj, _ = _grads(DEQ(cell, solver, JacobianFree(), state_shape=(8,)), x, c)
    _, gn, gxn, _ = _grads(DEQ(cell, solver, Neumann(k=1, damping=lam), state_shape=(8,)), x, c)
    torch.testing.assert_close(gxn, lam * gxj, rtol=1e-13, atol=1e-15)
    for n in gj:
        torch.testing.assert_close(gn[n], lam * gj[n], rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# straight-through value
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "estimator",
    [
        Exact(),
        Exact(Dense()),
        Exact(FixedPoint(tol=1e-8, max_iter=200)),
        Unrolled(5, 0.5),
        Unrolled(3, 1.0),
        Neumann(5, 0.5),
        JacobianFree(),
        make_estimator("jfb"),
        make_estimator("neumann", k=2),
    ],
    ids=lambda e: repr(e),
)
def test_estimator_value_is_solver_result(estimator):
    """The returned tensor's value is exactly ``result.z`` (not ``f(z*)`` nor ``z_k`` of the unroll)."""
    cell = TanhCell(8, 5, rho=0.6, seed=61)
    x = randn(3, 5, seed=62).requires_grad_()
    # a loose tol: f(z*) ≠ z* visibly, so a returned f(z*) would be caught
    deq = DEQ(cell, Anderson(tol=1e-3, max_iter=50), estimator, state_shape=(8,))
    z, info = deq(x)
    assert z.requires_grad
    assert torch.equal(z.detach(), info.forward.z)
    assert not torch.equal(cell(info.forward.z, x).detach(), info.forward.z)
    z.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().max()) > 0
