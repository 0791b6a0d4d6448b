"""The default exact gradient: the adjoint policy (AutoAdjoint), the tolerance that follows the
forward solve, and GMRES's per-sample stopping and determinism."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import deqkit as dk
from deqkit.linear import GMRES, AutoAdjoint

F64 = torch.float64


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def jacobians(B: int, d: int, radius: float, seed: int) -> torch.Tensor:
    """Per-sample ``J`` with spectral radius ``radius`` (non-normal, random)."""
    Ms = randn(B, d, d, seed=seed)
    return torch.stack([radius * M / torch.linalg.eigvals(M).abs().max() for M in Ms])


def closed_form(J: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(J.shape[-1], dtype=J.dtype)
    return torch.linalg.solve((eye - J).transpose(1, 2), v.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("radius, policy", [(0.3, "fixed-point"), (0.97, "fixed-point→gmres"), (1.2, "fixed-point→gmres")])
def test_auto_adjoint_picks_by_contraction_and_records_it(radius, policy):
    B, d = 4, 30
    J, v = jacobians(B, d, radius, seed=1), randn(B, d, seed=2)
    vjp = lambda u: torch.einsum("bi,bij->bj", u, J)
    res = AutoAdjoint(tol=1e-10, max_iter=400, restart=d).solve_adjoint(vjp, v)  # full GMRES: no stagnation
    assert res.all_converged, res.summary()
    assert res.extra["policy"] == policy and res.solver == f"auto({policy})"
    assert float((res.z - closed_form(J, v)).norm() / closed_form(J, v).norm()) < 1e-8
    true = (res.z - vjp(res.z) - v).norm(dim=1) / v.norm(dim=1)
    torch.testing.assert_close(res.rel_residual, true, rtol=1e-6, atol=1e-14)
    if policy == "fixed-point":
        assert res.extra["gmres_steps"] == 0 and res.extra["rate"] < 0.9
    else:
        assert res.extra["switched_at"] == res.extra["fixed_point_steps"] <= 5 and res.extra["gmres_steps"] > 0
        # both phases counted per sample: the Picard probe plus the Krylov steps
        assert bool((res.nstep >= res.extra["fixed_point_steps"]).all())


def test_auto_adjoint_picard_phase_counts_and_freezes_each_sample_on_its_own():
    """Picard phase, checked against a plain loop: ``nstep`` per sample is the steps up to its
    first residual under the target, and a sample's ``w`` stops changing there, so it is the same
    alone as in a batch with a slower sample (the host looks only at scheduled checks)."""
    d = 12
    J = torch.cat([jacobians(1, d, 0.1, seed=3), jacobians(1, d, 0.35, seed=4), jacobians(1, d, 0.55, seed=5)])
    v = randn(3, d, seed=6)
    vjp = lambda u: torch.einsum("bi,bij->bj", u, J)
    res = AutoAdjoint(tol=1e-9, max_iter=200).solve_adjoint(vjp, v)
    assert res.extra["policy"] == "fixed-point" and res.all_converged
    for i in range(3):  # the plain loop: w ← wJ + v from w = v until ‖wJ + v − w‖ ≤ tol (‖v‖ + eps)
        w, k = v[i].clone(), 0
        target = 1e-9 * (v[i].norm() + torch.finfo(F64).eps)
        while True:
            nxt = w @ J[i] + v[i]
            k += 1
            if (nxt - w).norm() <= target:
                break
            w = nxt
        assert int(res.nstep[i]) == k, (i, res.nstep.tolist(), k)
        torch.testing.assert_close(res.z[i], w, rtol=0, atol=1e-13)
        alone = AutoAdjoint(tol=1e-9, max_iter=200).solve_adjoint(lambda u, i=i: u @ J[i], v[i : i + 1])
        torch.testing.assert_close(alone.z[0], res.z[i], rtol=0, atol=0)
    assert len(set(res.nstep.tolist())) == 3  # three different stopping steps: the test sees per-sample stopping


def test_auto_adjoint_reads_the_residuals_only_at_scheduled_checks(monkeypatch):
    """The Picard phase's host reads (one per check, where the forecast runs) are few: after the
    first step, after the probe, then at the forecast convergence step, not once per step."""
    import deqkit.linear.auto as auto

    calls = []
    forecast = AutoAdjoint._forecast
    monkeypatch.setattr(AutoAdjoint, "_forecast", lambda self, *a: calls.append(1) or forecast(self, *a))
    J, v = jacobians(4, 20, 0.5, seed=7), randn(4, 20, seed=8)
    res = AutoAdjoint(tol=1e-12, max_iter=200).solve_adjoint(lambda u: torch.einsum("bi,bij->bj", u, J), v)
    steps = int(res.nstep.max())
    assert res.all_converged and res.extra["policy"] == "fixed-point" and steps > 20
    assert len(calls) <= 3 + -(-steps // auto._MAX_GAP), (len(calls), steps)


def test_gmres_stops_each_sample_on_its_own_and_is_deterministic():
    B, d = 5, 40
    J, v = jacobians(B, d, 0.9, seed=3), randn(B, d, seed=4)
    J[0] *= 0.1 / 0.9  # one easy sample among hard ones
    vjp = lambda u: torch.einsum("bi,bij->bj", u, J)
    g = GMRES(tol=1e-9, max_iter=200)
    batch = g.solve_adjoint(vjp, v)
    alone = g.solve_adjoint(lambda u: torch.einsum("bi,bij->bj", u, J[:1]), v[:1])
    assert int(batch.nstep[0]) == int(alone.nstep[0]) < int(batch.nstep[1:].min())
    torch.testing.assert_close(batch.z[0], alone.z[0], rtol=1e-12, atol=1e-14)  # independent of its batch mates
    again = g.solve_adjoint(vjp, v)
    assert torch.equal(again.z, batch.z) and torch.equal(again.nstep, batch.nstep)


def test_gmres_float32_matches_float64():
    B, d = 4, 64
    J, v = jacobians(B, d, 0.8, seed=5), randn(B, d, seed=6)
    w64 = GMRES(tol=1e-10, max_iter=200).solve_adjoint(lambda u: torch.einsum("bi,bij->bj", u, J), v).z
    J32 = J.float()
    res = GMRES(tol=1e-5, max_iter=200).solve_adjoint(lambda u: torch.einsum("bi,bij->bj", u, J32), v.float())
    assert res.all_converged
    assert float((res.z.double() - w64).norm() / w64.norm()) < 1e-4


class Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        W = randn(12, 12, seed=7)
        self.W = nn.Parameter(0.8 * W / torch.linalg.matrix_norm(W, ord=2))
        self.U = nn.Parameter(randn(12, 3, seed=8))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T)


def _backward(grad: dk.GradientEstimator, fwd_tol: float) -> dk.DEQInfo:
    deq = dk.DEQ(Cell(), dk.Anderson(tol=fwd_tol, max_iter=100), grad, state_shape=(12,))
    z, info = deq(randn(6, 3, seed=9))
    z.square().sum().backward()
    return info


def test_exact_default_tolerance_follows_the_forward_unless_told_not_to():
    info = _backward(dk.Exact(), fwd_tol=1e-3)
    reached = float(info.forward.rel_residual.max())
    assert 1e-5 < reached <= 1e-3
    solve = info.backward.solve
    assert solve.tol == pytest.approx(0.3 * reached) and solve.extra["tol_requested"] == 1e-6
    assert solve.solver.startswith("auto(") and solve.all_converged
    full = _backward(dk.Exact(match_forward=False), fwd_tol=1e-3).backward.solve
    assert full.tol == 1e-6 and full.all_converged and int(full.nstep.max()) > int(solve.nstep.max())
    # a tight forward keeps the requested tolerance; the factor scales the matched one
    assert _backward(dk.Exact(), fwd_tol=1e-9).backward.solve.tol == 1e-6
    assert _backward(dk.Exact(forward_factor=0.1), fwd_tol=1e-3).backward.solve.tol == pytest.approx(0.1 * reached)
    # never looser than the cap, and a missed (matched) tolerance is still reported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loose = _backward(dk.Exact(), fwd_tol=0.5)
    assert loose.backward.solve.tol <= dk.Exact.MATCHED_TOL_CAP
    with pytest.warns(dk.ConvergenceWarning, match="Exact backward"):
        _backward(dk.Exact(max_iter=1, match_forward=True), fwd_tol=1e-3)


def test_exact_options_are_validated():
    with pytest.raises(dk.OptionError, match="match_forward"):
        dk.Exact(match_forward="yes")
    with pytest.raises(dk.OptionError, match="forward_factor"):
        dk.Exact(forward_factor=0.0)


@pytest.mark.parametrize("linear_solver", [None, "gmres"], ids=["broyden-adjoint", "gmres-preconditioned"])
def test_warm_exact_tolerance_follows_the_forward_as_exact_does(linear_solver):
    """``WarmExact`` is an ``Exact``: the same ``match_forward`` rule, whatever warm start it uses."""

    def backward(grad: dk.GradientEstimator, fwd_tol: float) -> dk.DEQInfo:
        deq = dk.DEQ(Cell(), dk.Broyden(tol=fwd_tol, max_iter=100), grad, state_shape=(12,))
        z, info = deq(randn(6, 3, seed=9))
        z.square().sum().backward()
        return info

    def make(**kw):
        return dk.WarmExact(None if linear_solver is None else GMRES(tol=1e-6, max_iter=60), **kw)

    info = backward(make(), fwd_tol=1e-3)
    reached = float(info.forward.rel_residual.max())
    assert 1e-5 < reached <= 1e-3
    solve = info.backward.solve
    assert solve.tol == pytest.approx(0.3 * reached) and solve.extra["tol_requested"] == 1e-6 and solve.all_converged
    full = backward(make(match_forward=False), fwd_tol=1e-3).backward.solve
    assert full.tol == 1e-6 and full.all_converged
    assert backward(make(forward_factor=0.1), fwd_tol=1e-3).backward.solve.tol == pytest.approx(0.1 * reached)


def test_backward_amplification_is_the_largest_w_over_v():
    """``info.backward.amplification``: max over the batch of ‖w‖ / ‖v‖, against the float64
    closed form ``w = v (I − A)⁻¹`` of a linear cell; ``None`` for JacobianFree (no adjoint hook)."""
    from conftest import LinearCell

    cell = LinearCell(d=8, p=5, rho=0.9, seed=3)
    x, z0, c = randn(6, 5, seed=4), torch.zeros(6, 8, dtype=F64), randn(6, 8, seed=5)
    solver = dk.Anderson(tol=1e-12, max_iter=200)
    deq = dk.DEQ(cell, solver, dk.Exact(AutoAdjoint(tol=1e-12, max_iter=400), match_forward=False))
    z, info = deq(x, z0)
    (z * c).sum().backward()  # v = c per sample
    w = c @ torch.linalg.inv(torch.eye(8, dtype=F64) - cell.A.detach())
    expected = float((w.norm(dim=1) / c.norm(dim=1)).max())
    assert expected > 1.2  # the cell (ρ = 0.9) amplifies, so the value is not a trivial 1
    assert info.backward.amplification == pytest.approx(expected, rel=1e-8)
    z, info = dk.DEQ(cell, solver, dk.JacobianFree())(x, z0)
    (z * c).sum().backward()
    assert info.backward is None or info.backward.amplification is None


class _ScaledLinearCell(nn.Module):
    """``f(z, u) = s · zA + u`` with a per-sample contraction ``s``: the VJP is ``w ↦ s·wAᵀ``."""

    def __init__(self, A: torch.Tensor, s: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A)
        self.s = s

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.s[:, None] * (z @ self.A) + u


@pytest.mark.parametrize("linear_solver", [None, GMRES(tol=1e-12, max_iter=100, restart=20)])
def test_exact_gives_unconverged_samples_far_from_their_fixed_point_the_jacobian_free_direction(linear_solver):
    """A sample whose forward missed its tolerance with ``κ·r > fallback_error`` gets ``w = v`` and
    is counted; one that missed it by little (small ``κ·r``) and the converged ones keep the
    float64 closed form ``v (I − s Aᵀ)⁻¹``; ``unconverged="exact"`` never falls back."""
    d, B = 8, 6
    A = randn(d, d, seed=7)
    A = A / torch.linalg.eigvals(A).abs().max()  # spectral radius 1: sample i contracts at rate s_i
    s = torch.tensor([0.05, 0.95, 0.05, 0.97, 0.5, 0.05], dtype=F64)  # 1, 3: slow; 4: misses by a little
    cell = _ScaledLinearCell(A, s)
    solver = dk.FixedPoint(tol=1e-12, max_iter=12, stop_mode="abs")  # 0.05¹² ≪ 1e-12 ≪ 0.5¹² ≪ 0.95¹²
    c = randn(B, d, seed=8)
    exact = closed_form(s[:, None, None] * A.T.expand(B, d, d), c)
    far = torch.tensor([False, True, False, True, False, False])
    for unconverged in ("jacobian-free", "exact"):
        kw = {} if linear_solver is None else {"linear_solver": linear_solver}
        grad = dk.Exact(tol=1e-12, match_forward=False, on_failure="ignore", unconverged=unconverged, **kw)
        u = randn(B, d, seed=9).requires_grad_()
        z, info = dk.DEQ(cell, solver, grad, on_failure="ignore")(u, torch.zeros(B, d, dtype=F64))
        (z * c).sum().backward()  # v = c; ∂f/∂u = I, so u.grad = w
        assert (~info.forward.converged).tolist() == [False, True, False, True, True, False]
        kappa = exact.norm(dim=1) / c.norm(dim=1)
        estimate = kappa * info.forward.rel_residual
        assert bool((estimate[far] > 1e-2).all()) and float(estimate[4]) < 1e-2  # the problem tests both sides
        if unconverged == "jacobian-free":
            with pytest.raises(dk.ConvergenceError, match="2 of 6 samples missed the forward tolerance"):
                u2 = u.detach().clone().requires_grad_()
                z2, _ = dk.DEQ(cell, solver, dk.Exact(on_failure="raise", **kw), on_failure="ignore")(u2, torch.zeros_like(u2))
                (z2 * c).sum().backward()
            torch.testing.assert_close(u.grad[far], c[far], rtol=0, atol=0)
            torch.testing.assert_close(u.grad[~far], exact[~far], rtol=1e-9, atol=1e-12)
            assert info.backward.n_fallback == 2
            # the replaced adjoints' amplification is reported; the returned w's is measured after the fallback
            assert info.backward.fallback_amplification == pytest.approx(float(kappa[far].max()), rel=1e-8)
            assert info.backward.amplification == pytest.approx(float(kappa[~far].max().clamp_min(1.0)), rel=1e-8)
        else:
            torch.testing.assert_close(u.grad, exact, rtol=1e-9, atol=1e-12)
            assert info.backward.n_fallback == 0 and info.backward.fallback_amplification is None
    with pytest.raises(dk.OptionError, match="unconverged"):
        dk.Exact(unconverged="skip")
    with pytest.raises(dk.OptionError, match="fallback_error"):
        dk.Exact(fallback_error=0.0)
