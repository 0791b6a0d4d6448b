"""Restricted SIM programs: the ADMM support mask, ``structure="feedforward"``,
``output_skip=False`` and the relaxed-lasso refit (``debias``)."""

import argparse
import warnings

import pytest
import torch

from deqkit.cli import sim as cli
from deqkit.errors import ConvergenceWarning
from deqkit.sim import BatchedADMM, States, collect_states, fit_sim, make_mlp, structure_support
from deqkit.sim.reference import solve_rows_cvxpy

TIGHT = dict(max_iter=20000, tol_abs=1e-10, tol=1e-9)


def _net(seed=0, p=6, hidden=(5, 4), q=3, scale=1.5):
    torch.manual_seed(seed)
    net = make_mlp(p, list(hidden), q).double()
    with torch.no_grad():
        for mod in net:
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(scale)
    return net


def _states(seed=0, m=80, p=6, hidden=(5, 4)):
    net = _net(seed, p, hidden)
    u = torch.rand(m, p, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    return net, u, collect_states(net, u)


def test_state_layers_follow_the_stacking_order():
    _, _, st = _states(hidden=(5, 4, 2))
    assert st.layer_sizes == (5, 4, 2)
    assert st.state_layers().tolist() == [3] * 2 + [2] * 4 + [1] * 5
    bare = States(U=st.U, Z=st.Z, X=st.X, Y=st.Y, kappa=st.kappa)
    with pytest.raises(ValueError, match="layer_sizes"):
        bare.state_layers()
    with pytest.raises(ValueError, match="layer_sizes"):
        fit_sim(bare, 0.1, lam_scale="paper", structure="feedforward")


def test_feedforward_support_is_strictly_earlier_layers():
    _, _, st = _states(hidden=(5, 4, 2))
    sab, scd = structure_support(st, "feedforward")
    n, p = 11, 6
    layer = st.state_layers()
    for i in range(n):
        for j in range(n):
            assert bool(sab[i, j]) == bool(layer[j] < layer[i])
    assert bool(sab[:, n:].all()) and scd is None
    _, scd = structure_support(st, "full", output_skip=False)
    assert not bool(scd[:, n : n + p].any()) and bool(scd[:, :n].all()) and bool(scd[:, -1].all())
    assert structure_support(st) == (None, None)
    with pytest.raises(ValueError, match="'full', 'feedforward'"):
        structure_support(st, "dag")


@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_admm_with_support_matches_cvxpy(lam):
    pytest.importorskip("cvxpy")
    _, _, st = _states(seed=2)
    phi, n = st.phi, st.X.shape[1]
    gen = torch.Generator().manual_seed(3)
    support = torch.rand(n, phi.shape[1], generator=gen) < 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        ours = BatchedADMM(**TIGHT).solve(phi, st.Z.T, lam, radius=0.5, n_constrained=n, support=support)
    ref = solve_rows_cvxpy(phi, st.Z.T, lam, radius=0.5, n_constrained=n, support=support)
    assert all(s == "optimal" for s in ref.status)
    assert not bool(ours.beta[~support].any())  # exactly zero off the support
    assert abs(ref.beta[~support.numpy()]).max() < 1e-7
    assert bool((ours.beta[:, :n].abs().sum(1) <= 0.5 + 1e-9).all())
    ref_obj = torch.as_tensor(ref.objective)
    assert bool(((ours.objective - ref_obj).abs() <= 1e-6 + 1e-5 * ref_obj.abs()).all())


def test_support_is_validated():
    _, _, st = _states()
    solver = BatchedADMM()
    with pytest.raises(ValueError, match="support must be a boolean tensor"):
        solver.solve(st.phi, st.Z.T, 0.1, support=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="support must be a boolean tensor"):
        solver.solve(st.phi, st.Z.T, 0.1, support=torch.ones(st.Z.shape[1], st.phi.shape[1]))


def test_feedforward_fit_is_nilpotent_and_reproduces_the_baseline_at_lam_zero():
    net, u, st = _states(seed=4, m=120, hidden=(5, 4, 3))
    kw = dict(admm_ab=BatchedADMM(**TIGHT), admm_cd=BatchedADMM(**TIGHT))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = fit_sim(st, 0.0, lam_scale="paper", structure="feedforward", output_skip=False, **kw)
    A = res.model.A.detach()
    sab, _ = structure_support(st, "feedforward")
    assert not bool(A[~sab[:, : A.shape[0]]].any())
    assert torch.linalg.matrix_power(A, 3).abs().max() == 0  # three hidden layers: A³ = 0
    assert not bool(res.model.D[:, : u.shape[1]].any())
    assert res.model.is_wellposed()
    with torch.no_grad():
        torch.testing.assert_close(res.model(u), net(u), rtol=0, atol=1e-5)


def test_full_structure_buys_lateral_edges_that_feedforward_forbids():
    # the mechanism named in the fit module's docstring, on a small problem: with the paper's
    # program the lasso uses same-layer states; the feedforward program cannot
    _, _, st = _states(seed=5, m=150, hidden=(8, 4))
    layer = st.state_layers()
    same = layer[:, None] == layer[None, :]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        full = fit_sim(st, 0.05, lam_scale="paper").model.A.detach()
        ff = fit_sim(st, 0.05, lam_scale="paper", structure="feedforward").model.A.detach()
    assert int((full[same] != 0).sum()) > 0
    assert int((ff[same] != 0).sum()) == 0


@pytest.mark.parametrize("structure", ["full", "feedforward"])
def test_debias_refits_least_squares_on_the_lasso_support(structure):
    _, _, st = _states(seed=6, m=100)
    kw = dict(admm_ab=BatchedADMM(**TIGHT), admm_cd=BatchedADMM(**TIGHT), structure=structure)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        lasso = fit_sim(st, 0.2, lam_scale="paper", **kw)
        refit = fit_sim(st, 0.2, lam_scale="paper", debias=True, **kw)
    assert lasso.refit_ab is None and refit.refit_ab is not None and refit.converged
    phi = st.phi
    for rows, targets, cols in (("AB", st.Z, slice(None)), ("CD", st.Y, slice(None))):
        b_lasso = torch.cat([getattr(lasso.model, rows[0]), getattr(lasso.model, rows[1])], 1).detach()
        b_refit = torch.cat([getattr(refit.model, rows[0]), getattr(refit.model, rows[1])], 1).detach()
        assert not bool(b_refit[b_lasso == 0].any())  # support can only shrink
        fit_lasso = (targets.T - b_lasso @ phi.T).pow(2).sum(1)
        fit_refit = (targets.T - b_refit @ phi.T).pow(2).sum(1)
        assert bool((fit_refit <= fit_lasso + 1e-9).all())  # the lasso point is feasible for the refit
        assert float(fit_refit.sum()) < 0.9 * float(fit_lasso.sum())  # and the shrinkage is undone
    assert refit.model.is_wellposed()


def test_debias_matches_cvxpy_least_squares_on_the_same_support():
    pytest.importorskip("cvxpy")
    _, _, st = _states(seed=7, m=60)
    n = st.X.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        ours = fit_sim(
            st,
            0.1,
            lam_scale="paper",
            debias=True,
            structure="feedforward",
            admm_ab=BatchedADMM(**TIGHT),
            admm_cd=BatchedADMM(**TIGHT),
        )
    for lasso, refit, targets, radius in ((ours.ab, ours.refit_ab, st.Z, 0.99), (ours.cd, ours.refit_cd, st.Y, None)):
        ref = solve_rows_cvxpy(st.phi, targets.T, 0.0, radius=radius, n_constrained=n if radius else 0, support=lasso.beta != 0)
        assert all(s == "optimal" for s in ref.status)
        torch.testing.assert_close(refit.beta, torch.as_tensor(ref.beta), rtol=0, atol=1e-5)


def test_debias_needs_the_relaxed_program():
    _, _, st = _states()
    with pytest.raises(ValueError, match="mode='relaxed'"):
        fit_sim(
            st,
            0.1,
            lam_scale="paper",
            mode="equality",
            debias=True,
            admm_ab=BatchedADMM(mode="equality"),
            admm_cd=BatchedADMM(mode="equality"),
        )
    args = cli.add_arguments(argparse.ArgumentParser()).parse_args(["--debias", "--mode", "equality"])
    with pytest.raises(ValueError, match="--debias"):
        cli.run(args)


def test_cli_parses_the_structure_options():
    parse = cli.add_arguments(argparse.ArgumentParser()).parse_args
    args = parse([])
    # output_skip None: the model's default (on for --model mlp, off for cnn), resolved by the job
    assert (args.structure, args.output_skip, args.debias) == ("full", None, False)
    assert parse(["--output-skip"]).output_skip is True
    args = parse(["--structure", "feedforward", "--no-output-skip", "--debias"])
    assert (args.structure, args.output_skip, args.debias) == ("feedforward", False, True)
    with pytest.raises(SystemExit):
        parse(["--structure", "dag"])
