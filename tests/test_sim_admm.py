"""Batched ADMM for the SIM program, checked against the CVXPY reference."""

import warnings

import numpy as np
import pytest
import torch

from deqkit.errors import ConvergenceError, ConvergenceWarning, NonFiniteError, OptionError
from deqkit.sim import BatchedADMM, collect_states, fit_sim, make_mlp
from deqkit.sim.reference import solve_rows_cvxpy


def _problem(m=40, d=15, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(m, d, generator=g, dtype=torch.float64)
    z = torch.randn(r, m, generator=g, dtype=torch.float64) * 2
    return phi, z


@pytest.mark.parametrize("lam", [0.3, 3.0])
def test_admm_relaxed_matches_cvxpy(lam):
    pytest.importorskip("cvxpy")
    phi, z = _problem()
    res = BatchedADMM(rho=1.0, max_iter=5000).solve(phi, z, lam, radius=0.99, n_constrained=6)
    ref = solve_rows_cvxpy(phi, z, lam, radius=0.99, n_constrained=6)
    assert res.all_converged and all(s == "optimal" for s in ref.status)
    rel = np.abs(res.objective.numpy() - ref.objective) / np.abs(ref.objective)
    assert np.all(rel < 1e-3), rel
    assert torch.all(res.beta[:, :6].abs().sum(1) <= 0.99 + 1e-12)
    # the constraint is active for some row (otherwise the test would not exercise it)
    assert torch.any(res.beta[:, :6].abs().sum(1) > 0.98)


def test_admm_equality_matches_cvxpy():
    pytest.importorskip("cvxpy")
    g = torch.Generator().manual_seed(3)
    phi = torch.randn(10, 16, generator=g, dtype=torch.float64)  # under-determined: real choice
    z = (torch.randn(3, 16, generator=g, dtype=torch.float64) * 0.1) @ phi.T
    res = BatchedADMM(mode="equality", max_iter=5000).solve(phi, z, 1.0, radius=0.99, n_constrained=5)
    ref = solve_rows_cvxpy(phi, z, 1.0, radius=0.99, n_constrained=5, mode="equality")
    assert res.all_converged
    rel = np.abs(res.objective.numpy() - ref.objective) / np.abs(ref.objective)
    assert np.all(rel < 1e-3), rel
    assert torch.all(res.constraint_residual < 1e-3 * torch.linalg.vector_norm(z, dim=1))


def test_admm_large_lambda_gives_zero_solution():
    phi, z = _problem()
    lam_max = float((phi.T @ z.T).abs().max())  # λ ≥ ‖Φᵀz‖_∞ ⇒ β = 0 is optimal
    res = BatchedADMM().solve(phi, z, 1.01 * lam_max)
    assert res.all_converged and torch.count_nonzero(res.beta) == 0
    res = BatchedADMM().solve(phi, z, 0.5 * lam_max)
    assert torch.count_nonzero(res.beta) > 0


def test_admm_reports_nonconvergence_and_nonfinite():
    phi, z = _problem()
    with pytest.warns(ConvergenceWarning, match="did not reach"):
        res = BatchedADMM(max_iter=3).solve(phi, z, 0.1)
    assert not res.converged.any() and torch.all(res.nstep == 3)
    with pytest.raises(ConvergenceError):
        BatchedADMM(max_iter=3, on_failure="raise").solve(phi, z, 0.1)
    z_bad = z.clone()
    z_bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        BatchedADMM().solve(phi, z_bad, 0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "exact"}, "'relaxed', 'equality'"),
        ({"rho": 0.0}, "rho"),
        ({"on_failure": "log"}, "'warn'"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": 0, "tol_abs": 0}, "cannot both be 0"),
        ({"alpha": 2.0}, "alpha"),
        ({"tau": 1.0}, "tau"),
        ({"adaptive_rho": 1}, "adaptive_rho"),
    ],
)
def test_admm_validates_options(kwargs, match):
    with pytest.raises(OptionError, match=match) as info:
        BatchedADMM(**kwargs)
    assert str(info.value).startswith("BatchedADMM")


def test_fit_sim_admm_matches_cvxpy_on_states():
    pytest.importorskip("cvxpy")
    torch.manual_seed(0)
    net = make_mlp(6, [5, 4], 3).double()
    states = collect_states(net, torch.rand(30, 6, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        ours = fit_sim(states, 0.05, lam_scale="paper", admm_ab=BatchedADMM(max_iter=5000), admm_cd=BatchedADMM(max_iter=5000))
    ref = fit_sim(states, 0.05, lam_scale="paper", method="cvxpy")
    assert ours.converged and ref.converged
    assert abs(ours.objective - ref.objective) <= 1e-3 * abs(ref.objective)
    assert ours.model.is_wellposed() and ref.model.is_wellposed()
    with pytest.raises(OptionError, match="fit_sim: method='scipy'.*'admm', 'cvxpy'"):
        fit_sim(states, 0.05, lam_scale="paper", method="scipy")
