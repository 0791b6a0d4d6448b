"""GMRES internals: the block Gram–Schmidt Arnoldi step, the blocked Hessenberg QR read at checks,
and results that do not depend on when the checks ran (float64, closed forms)."""

from __future__ import annotations

import pytest
import torch

import deqkit.linear.gmres as gm
from deqkit.linear import GMRES
from deqkit.linear.gmres import HessenbergQR, arnoldi_step

f64 = torch.float64


def _arnoldi(A: torch.Tensor, r: torch.Tensor, k: int, passes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` Arnoldi steps on rows ``y ↦ y A`` from ``r`` ``(B, d)``: the basis ``V`` and ``Ht``."""
    B, d = r.shape
    V = torch.empty(B, k + 1, d, dtype=r.dtype)
    Ht = torch.zeros(B, k, k + 1, dtype=r.dtype)
    V[:, 0] = r / r.norm(dim=1, keepdim=True)
    vj = V[:, 0].clone()
    for j in range(k):
        vj = arnoldi_step(V, Ht, j, (vj @ A).unsqueeze(1), passes=passes)
    return V, Ht


def _ill_conditioned(d: int = 30) -> torch.Tensor:
    """A symmetric ``I − J`` with eigenvalues from 1e-14 to 1: its Krylov vectors turn nearly dependent."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(d, d, dtype=f64, generator=g))[0]
    return Q @ torch.diag(torch.logspace(-14, 0, d, dtype=f64)) @ Q.T


def test_block_gram_schmidt_with_reorthogonalisation_keeps_the_basis_orthonormal():
    A, k = _ill_conditioned(), 29
    r = torch.randn(3, 30, dtype=f64, generator=torch.Generator().manual_seed(1))
    eye = torch.eye(k + 1, dtype=f64)
    V, Ht = _arnoldi(A, r, k, passes=2)
    assert (V @ V.transpose(1, 2) - eye).abs().max() < 1e-10
    # the Arnoldi relation V[:k] A = Hᵀ-rows · V holds to rounding
    assert (V[:, :k] @ A - Ht @ V).norm() / A.norm() < 1e-12
    # the problem is hard enough: one pass of classical Gram–Schmidt loses orthogonality on it
    V1, _ = _arnoldi(A, r, k, passes=1)
    assert (V1 @ V1.transpose(1, 2) - eye).abs().max() > 1e-3


def test_breakdown_stores_a_zero_vector_not_nan():
    # A = I: the first Krylov step already spans the space, the new vector is exactly zero
    V, Ht = _arnoldi(torch.eye(5, dtype=f64), torch.randn(2, 5, dtype=f64), 2, passes=2)
    assert torch.isfinite(V).all() and (V[:, 1:] == 0).all()
    assert torch.allclose(Ht[:, 0, 0], torch.ones(2, dtype=f64))


@pytest.mark.parametrize("checks", [(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12), (2, 10, 12), (5, 6, 12), (12,)])
def test_blocked_hessenberg_qr_gives_every_least_squares_residual_and_solution(checks):
    """At any schedule of checks, ``est[:, i]`` is ``min_y ‖βe₁ − H[:i+1, :i] y‖`` and ``R y = g`` its minimiser."""
    g = torch.Generator().manual_seed(2)
    B, k = 4, 12
    H = torch.randn(B, k + 1, k, dtype=f64, generator=g).triu(-1)  # upper Hessenberg
    H[1, 4, 3] = 0.0  # a breakdown in one sample
    beta = torch.rand(B, dtype=f64, generator=g) + 0.5
    ls = HessenbergQR(beta, k)
    Ht = H.transpose(1, 2).contiguous()
    for j in checks:
        est = ls.update(Ht, j)
        assert est.shape == (B, j + 1)
        for i in range(j + 1):
            rhs = torch.zeros(B, i + 1, dtype=f64)
            rhs[:, 0] = beta
            if i == 0:
                want = beta
            else:
                Hi = H[:, : i + 1, :i]
                y = torch.linalg.lstsq(Hi, rhs.unsqueeze(2)).solution
                want = (rhs.unsqueeze(2) - Hi @ y).squeeze(2).norm(dim=1)
            torch.testing.assert_close(est[:, i], want, rtol=1e-10, atol=1e-12)
    j = checks[-1]
    y = torch.linalg.solve_triangular(ls.R[:, :j, :j], ls.g(j)[:, :j].unsqueeze(2), upper=True)
    rhs = torch.zeros(B, j + 1, 1, dtype=f64)
    rhs[:, 0, 0] = beta
    keep = torch.tensor([0, 2, 3])  # sample 1 broke down: its R is singular beyond the breakdown
    torch.testing.assert_close(y[keep], torch.linalg.lstsq(H[keep, :, :j], rhs[keep]).solution, rtol=1e-9, atol=1e-10)


def _linear_problem(d: int = 24):
    g = torch.Generator().manual_seed(3)
    rho = torch.tensor([0.2, 0.5, 0.7, 0.9, 0.97], dtype=f64)  # contractions of different strength:
    B = rho.shape[0]  # each sample stops at its own step
    J = torch.randn(B, d, d, dtype=f64, generator=g)
    J = rho[:, None, None] * J / torch.linalg.matrix_norm(J, ord=2)[:, None, None]
    v = torch.randn(B, d, dtype=f64, generator=g)

    def vjp(w: torch.Tensor) -> torch.Tensor:
        return torch.bmm(w.unsqueeze(1), J).squeeze(1)

    w_star = torch.linalg.solve((torch.eye(d, dtype=f64) - J).transpose(1, 2), v.unsqueeze(2)).squeeze(2)
    return vjp, v, w_star, J


@pytest.mark.parametrize("gap", [1, 3])
def test_the_result_does_not_depend_on_when_checks_run(monkeypatch, gap):
    """Each sample stops at the first Krylov step meeting ``tol``: with a check after every step
    (gap 1) or rarer ones, ``nstep``, ``w`` and the residual are the same; the residual is the true one."""
    vjp, v, w_star, J = _linear_problem()
    solver = GMRES(restart=40, tol=1e-9, max_iter=40)
    ref = solver.solve_adjoint(vjp, v)
    monkeypatch.setattr(gm, "_MAX_CHECK_GAP", gap)
    monkeypatch.setattr(gm.KrylovRun, "_predict", lambda self, est, j, active: gap)
    res = solver.solve_adjoint(vjp, v)
    assert torch.equal(res.nstep, ref.nstep)
    assert len(set(ref.nstep.tolist())) > 1  # the samples stopped at different steps
    torch.testing.assert_close(res.z, ref.z, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.abs_residual, ref.abs_residual, rtol=1e-6, atol=1e-16)
    assert bool(res.converged.all())
    true_res = (res.z - vjp(res.z) - v).norm(dim=1)
    torch.testing.assert_close(res.abs_residual, true_res, rtol=1e-10, atol=1e-18)
    assert ((res.z - w_star).norm(dim=1) <= 1e-7 * w_star.norm(dim=1)).all()
    # nstep is the fewest steps that meet tol: one step fewer misses it
    short = GMRES(restart=40, tol=1e-30, max_iter=1, stop_mode="abs")
    for b in range(v.shape[0]):
        n = int(res.nstep[b])
        Jb = J[b]
        fewer = short.solve_adjoint(lambda w: w @ Jb, v[b : b + 1], max_iter=n - 1) if n > 1 else None
        if fewer is not None:
            assert float(fewer.rel_residual[0]) > 1e-9
