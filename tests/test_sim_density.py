"""λ in scale-free units and the density target of fit_sim (deqkit.sim.density)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from deqkit.errors import ConvergenceWarning, OptionError
from deqkit.sim import BatchedADMM, collect_states, fit_sim, make_mlp, train_mlp
from deqkit.sim.density import search_lam
from deqkit.sim.fit import lam_factors
from deqkit.sim.states import States

TIGHT = dict(tol=1e-10, tol_abs=1e-12, max_iter=5000)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: a second thread only adds contention


def test_cli_density_run_carries_the_chosen_lam(tmp_path):
    pytest.importorskip("sklearn")
    import json

    from deqkit.cli import sim as cli

    out = tmp_path / "out"
    args = cli.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        [
            "--dataset",
            "digits",
            "--hidden",
            "8",
            "--samples",
            "150",
            "--density",
            "0.5",
            "--epochs",
            "2",
            "--n-test",
            "60",
            "--n-attack",
            "0",
            "--no-plot",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert cli.run(args) == 0
    res = json.loads((out / "sim_results.json").read_text())
    (row,) = res["sim"]
    assert res["density"] == [0.5] and res["lam_scale"] == "pooled" and res["output_skip"] is True  # the MLP default
    assert row["density_target"] == 0.5 and abs(row["nnz_fraction"] - 0.5) <= 0.005 + 1e-9
    assert row["lam"] == row["lam_path"][-1][0] or any(p[0] == row["lam"] for p in row["lam_path"])
    with pytest.raises(OptionError, match="--lam or --density"):
        cli.run(cli.add_arguments(__import__("argparse").ArgumentParser()).parse_args(["--lam", "0.1", "--density", "0.5"]))


def _hadamard(m: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _orthogonal_states(seed=0, m=64, n=6, p=20, q=4, ref=200):
    """States whose Φ = [X U 1] has orthogonal columns (ΦᵀΦ = m·I): the lasso solution of
    every row is the soft-threshold of Φᵀz/m, so its non-zeros at λ are known in closed form."""
    g = torch.Generator().manual_seed(seed)
    h = _hadamard(m)
    ones, x, u = h[:, :1], h[:, 1 : 1 + n], h[:, 1 + n : 1 + n + p]
    phi = torch.cat([x, u, ones], 1)
    d = phi.shape[1]

    def targets(r, small_head):
        beta = torch.randn(r, d, generator=g, dtype=torch.float64)
        if small_head:  # keeps ‖a‖₁ ≤ κ inactive, so the ball does not move the solution
            beta[:, :n] *= 0.01
        return beta @ phi.T + 0.1 * torch.randn(r, m, generator=g, dtype=torch.float64)

    z, y = targets(n, True).T, targets(q, False).T
    return States(U=u, Z=z, X=x, Y=y, kappa=0.99, reference_nnz=ref), phi


def _closed_form_nnz(states, phi, lam, lam_scale):
    s_ab, s_cd = lam_factors(states, lam_scale)
    count = 0
    for t, s in ((states.Z.T, s_ab), (states.Y.T, s_cd)):
        corr = (t @ phi).abs()
        s = torch.as_tensor(s, dtype=corr.dtype).expand(corr.shape[0])
        count += int((corr > lam * s[:, None]).sum())
    return count


@pytest.mark.parametrize("lam_scale", ["pooled", "normalized", "paper"])
def test_orthogonal_design_fit_is_soft_thresholding(lam_scale):
    st, phi = _orthogonal_states()
    m = phi.shape[0]
    lam = 40.0 if lam_scale == "paper" else 0.3
    res = fit_sim(st, lam, lam_scale=lam_scale, admm_ab=BatchedADMM(**TIGHT), admm_cd=BatchedADMM(**TIGHT), on_failure="raise")
    s_ab, s_cd = lam_factors(st, lam_scale)
    for rows, t, s in (("AB", st.Z.T, s_ab), ("CD", st.Y.T, s_cd)):
        corr = t @ phi
        s = torch.as_tensor(s, dtype=corr.dtype).expand(corr.shape[0])[:, None]
        expect = torch.sign(corr) * (corr.abs() - lam * s).clamp(min=0) / m
        got = torch.cat([getattr(res.model, rows[0]), getattr(res.model, rows[1])], 1).detach()
        torch.testing.assert_close(got, expect, atol=1e-7, rtol=0)
    assert res.density == pytest.approx(_closed_form_nnz(st, phi, lam, lam_scale) / 200)


@pytest.mark.parametrize("target", [0.2, 0.5, 0.9])
def test_density_search_on_known_lasso_path(target):
    st, phi = _orthogonal_states(seed=1)
    res = fit_sim(
        st, density=target, density_tol=0.005, admm_ab=BatchedADMM(**TIGHT), admm_cd=BatchedADMM(**TIGHT), on_failure="raise"
    )
    # the λ it reports gives, in closed form, the density it reports, within the target's tolerance
    exact = _closed_form_nnz(st, phi, res.lam, "pooled") / 200
    assert exact == pytest.approx(res.density, abs=1 / 200)
    assert abs(res.density - target) <= 0.005 + 1e-12 and res.search.converged
    assert res.density_target == target and res.search.nstep <= 20
    # the path's densities are the closed form's at every λ it visited
    for lam, dens in res.search.path[1:]:
        assert _closed_form_nnz(st, phi, lam, "pooled") / 200 == pytest.approx(dens, abs=1 / 200)
    assert res.search.path[0][1] == 0.0 and _closed_form_nnz(st, phi, res.search.path[0][0], "pooled") == 0


def test_search_lam_brackets_and_reports_a_miss():
    # a step function of λ: density 0.8 below λ=1e-3, 0 above; 0.5 cannot be reached
    calls = []

    def evaluate(lam):
        calls.append(lam)
        return 0.8 if lam < 1e-3 else 0.0

    out = search_lam(evaluate, 0.5, 1.0, tol=0.01, max_evals=12)
    assert not out.converged and out.nstep == 12 and len(calls) == 12
    assert out.density in (0.8, 0.0)
    # a linear path in log λ: the secant finds it in few solves
    import math

    lin = search_lam(lambda lam: max(0.0, min(1.0, -math.log10(lam) / 6)), 0.5, 1.0, tol=1e-3)
    assert lin.converged and lin.nstep <= 6 and abs(lin.density - 0.5) <= 1e-3
    # from a known point below the target: no solve above it, and it is in the path
    seen = []
    line = lambda lam: seen.append(lam) or max(0.0, min(1.0, -math.log10(lam) / 6))
    near = search_lam(line, 0.5, 1.0, tol=1e-3, start=(1e-2, 1 / 3))
    assert near.converged and max(seen) < 1e-2 and near.path[1] == (1e-2, 1 / 3)
    with pytest.raises(OptionError, match="density below the target"):
        search_lam(line, 0.5, 1.0, start=(1e-4, 2 / 3))


def test_density_miss_follows_on_failure():
    st, _ = _orthogonal_states(seed=2, ref=100)  # the dense fit has 270 non-zeros: density 5 is out of reach
    with pytest.raises(Exception, match="density"):
        fit_sim(st, density=5.0, max_evals=6, on_failure="raise")
    with pytest.warns(ConvergenceWarning, match="density"):
        res = fit_sim(st, density=5.0, max_evals=6)
    assert not res.search.converged and res.density < 5.0


def test_density_needs_a_reference_count():
    st, _ = _orthogonal_states()
    bare = States(U=st.U, Z=st.Z, X=st.X, Y=st.Y, kappa=0.99)
    with pytest.raises(OptionError, match="density_of"):
        fit_sim(bare, density=0.5)
    res = fit_sim(bare, density=0.5, density_of=200, admm_ab=BatchedADMM(**TIGHT), admm_cd=BatchedADMM(**TIGHT))
    assert abs(res.density - 0.5) <= 0.005


@pytest.mark.parametrize("lam_scale", ["pooled", "normalized"])
def test_scaled_lam_is_invariant_to_sample_count_and_target_scale(lam_scale):
    # every sample twice and every target ×3: the pooled and normalized programs are the same, the paper's is not
    st, _ = _orthogonal_states(seed=3)
    two = lambda t: torch.cat([t, t], 0)
    big = States(U=two(st.U), Z=3 * two(st.Z), X=two(st.X), Y=3 * two(st.Y), kappa=0.99, reference_nnz=200)
    kw = dict(admm_ab=BatchedADMM(**TIGHT), admm_cd=BatchedADMM(**TIGHT), output_skip=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a, b = fit_sim(st, 0.2, lam_scale=lam_scale, **kw), fit_sim(big, 0.2, lam_scale=lam_scale, **kw)
        pa, pb = fit_sim(st, 20.0, lam_scale="paper", **kw), fit_sim(big, 20.0, lam_scale="paper", **kw)
    assert a.density == b.density > 0
    assert pa.density != pb.density  # the paper's λ depends on the scale


def test_pooled_lam_keeps_the_rows_relative_scale():
    # state 1's target is state 0's times 0.05: "pooled" thresholds both rows against one level,
    # so the small state keeps fewer coefficients; "normalized" divides each row by its own rms,
    # so both keep the same support
    st, _ = _orthogonal_states(seed=2)
    z = st.Z.clone()
    z[:, 1] = 0.05 * z[:, 0]
    st = States(U=st.U, Z=z, X=st.X, Y=st.Y, kappa=0.99, reference_nnz=200)
    kw = dict(admm_ab=BatchedADMM(**TIGHT), admm_cd=BatchedADMM(**TIGHT), on_failure="raise")
    support = lambda res: torch.cat([res.model.A, res.model.B], 1).detach() != 0
    normed, pooled = (support(fit_sim(st, 0.3, lam_scale=s, **kw)) for s in ("normalized", "pooled"))
    assert torch.equal(normed[1], normed[0]) and int(normed[0].sum()) > 0
    assert 0 < int(pooled[0].sum()) and int(pooled[1].sum()) < int(pooled[0].sum())
    s_ab, _ = lam_factors(st, "pooled")
    assert isinstance(s_ab, float)  # one factor for every row of the block


# ------------------------------------------------------------------------------------------
# a problem deqkit has not seen: sklearn make_classification, an MLP trained with Adam
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _classification_net():
    sk = pytest.importorskip("sklearn.datasets")
    x, y = sk.make_classification(n_samples=1000, n_features=30, n_informative=12, n_classes=5, random_state=0)
    x = torch.tensor(x, dtype=torch.float64)
    x = (x - x.min(0).values) / (x.max(0).values - x.min(0).values)
    y = torch.tensor(y)
    torch.manual_seed(0)
    net = make_mlp(30, [24, 12], 5).double()
    train_mlp(net, x, y, epochs=10, lr=3e-3, seed=0)
    return net, x


def _classification_states(m):
    net, x = _classification_net()
    return collect_states(net, x[:m]), net


def test_density_target_lands_on_an_unseen_problem_without_choosing_lam():
    st, _ = _classification_states(m=250)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for target in (0.5, 0.3):
            res = fit_sim(st, density=target, structure="feedforward", debias=True)
            assert abs(res.density - target) <= 0.02, (target, res.density, res.search.path)
            total = sum(int((getattr(res.model, k).detach() != 0).sum()) for k in "ABCD")
            assert total / st.reference_nnz == pytest.approx(res.density)


def test_default_lam_transfers_across_sample_counts():
    small, _ = _classification_states(m=200)
    large, _ = _classification_states(m=800)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        d_small, d_large = (fit_sim(s, 0.02, structure="feedforward").density for s in (small, large))
        p_small, p_large = (fit_sim(s, 3.0, lam_scale="paper", structure="feedforward").density for s in (small, large))
    assert abs(d_small - d_large) < 0.1, (d_small, d_large)
    assert abs(p_small - p_large) > abs(d_small - d_large), (p_small, p_large, d_small, d_large)


def test_density_target_holds_for_the_refitted_model_when_the_refit_drops_entries():
    """With ``debias`` the refit can zero support entries the lasso used (here: input columns of
    the output rows, which the last hidden layer determines exactly); the search must then go on
    until the *returned* model meets the target, and report that model's density."""
    pytest.importorskip("sklearn")
    from deqkit.apps.bench import sim_pruning as sp

    args = sp.parser().parse_args(["--hidden", "8", "--epochs", "2"])
    xtr, ytr, _, _ = sp._data("digits", None, 3)
    net = sp._baseline(args, "mlp", xtr.double(), ytr, 3, "digits")  # a barely trained net
    st = collect_states(net, xtr.double()[:150])
    st.reference_nnz = sp._nnz(net, "mlp", xtr.shape[1])
    res = fit_sim(st, density=0.5, structure="feedforward", debias=True)
    path = res.search.path
    # the mechanism is exercised: at the λ the lasso search chose, the refit was sparser than the target allows
    drops = [(a[1], b[1]) for a, b in zip(path, path[1:]) if a[0] == b[0] and b[1] < a[1] - res.search.tol]
    assert drops, path
    nnz = sum(int((getattr(res.model, k).detach() != 0).sum()) for k in "ABCD")
    assert res.search.converged and abs(res.density - 0.5) <= res.search.tol
    assert nnz / st.reference_nnz == pytest.approx(res.density) == pytest.approx(res.search.density)


def test_lam_factors_match_their_definitions():
    # the documented formulas, computed independently: m·rms(Φ)·rms(targets), pooled per block or per row
    st, phi = _orthogonal_states(seed=4)
    st = States(U=st.U, Z=st.Z * torch.linspace(0.2, 3.0, st.Z.shape[1], dtype=torch.float64), X=st.X, Y=st.Y, kappa=0.99)
    m = phi.shape[0]
    rms_phi = float(torch.sqrt((phi**2).sum() / phi.numel()))
    pooled_ab, pooled_cd = lam_factors(st, "pooled")
    assert pooled_ab == pytest.approx(m * rms_phi * float(torch.sqrt((st.Z**2).sum() / st.Z.numel())), rel=1e-12)
    assert pooled_cd == pytest.approx(m * rms_phi * float(torch.sqrt((st.Y**2).sum() / st.Y.numel())), rel=1e-12)
    row_rms = torch.stack([torch.sqrt((st.Z[:, i] ** 2).sum() / m) for i in range(st.Z.shape[1])])
    normed_ab, _ = lam_factors(st, "normalized")
    torch.testing.assert_close(normed_ab, m * rms_phi * row_rms, rtol=1e-12, atol=0)
    rms_ab, _ = lam_factors(st, "rms")
    torch.testing.assert_close(rms_ab, row_rms, rtol=1e-12, atol=0)
    assert lam_factors(st, "paper") == (1.0, 1.0)


def test_density_search_on_all_zero_targets_says_so():
    st, _ = _orthogonal_states()
    zero = States(U=st.U, Z=torch.zeros_like(st.Z), X=st.X, Y=torch.zeros_like(st.Y), kappa=0.99, reference_nnz=200)
    with pytest.raises(OptionError, match="every target is zero"):
        fit_sim(zero, density=0.5)
