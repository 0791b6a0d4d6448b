"""The sim API speaks the library's vocabulary: every public constructor and function rejects a
typo'd keyword with "did you mean", a bad value with an OptionError naming its owner, and
``on_failure`` ("warn", "raise", "ignore") governs a missed ADMM tolerance; results carry the
core fields ``converged``, ``nstep``, ``residual``, ``time_s``."""

import math
import warnings

import pytest
import torch
from torch import nn

from deqkit.errors import ConvergenceError, ConvergenceWarning, OptionError
from deqkit.results import RESULT_FIELDS, ResultMixin
from deqkit.sim import (
    ADMMResult,
    BatchedADMM,
    ImplicitModel,
    SIMResult,
    accuracy,
    baseline_nonzeros,
    collect_states,
    count_nonzeros,
    fgsm,
    finetune,
    fit_sim,
    make_mlp,
    mlp_to_implicit,
    pgd,
    project_l1_ball,
    register_layer,
    robust_accuracy,
    solve_rows_cvxpy,
    structure_support,
    train_mlp,
)


def _net():
    torch.manual_seed(0)
    return make_mlp(6, [5, 4], 3).double()


def _states(m=40):
    net = _net()
    return collect_states(net, torch.rand(m, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))


def _data():
    u = torch.rand(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return _net(), u, torch.zeros(8, dtype=torch.long)


def _problem(m=30, d=12, r=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, d, generator=g, dtype=torch.float64), torch.randn(r, m, generator=g, dtype=torch.float64)


def _model():
    return ImplicitModel(4, 6, 3, bias=True, dtype=torch.float64)


# (owner as named in messages, call taking **kwargs, typo'd keyword, the option it should suggest)
TYPOS = [
    ("BatchedADMM", lambda **kw: BatchedADMM(**kw), "max_iters", "max_iter"),
    ("BatchedADMM", lambda **kw: BatchedADMM(**kw), "on_nonconvergence", None),
    ("ImplicitModel", lambda **kw: ImplicitModel(4, 3, 2, **kw), "kapa", "kappa"),
    ("fit_sim", lambda **kw: fit_sim(_states(), 0.1, lam_scale="paper", **kw), "on_failur", "on_failure"),
    ("fit_sim", lambda **kw: fit_sim(_states(), 0.1, lam_scale="paper", **kw), "structur", "structure"),
    ("collect_states", lambda **kw: collect_states(*_data()[:2], **kw), "kapa", "kappa"),
    ("mlp_to_implicit", lambda **kw: mlp_to_implicit(_net(), **kw), "solvr", "solver"),
    ("structure_support", lambda **kw: structure_support(_states(), **kw), "output_skp", "output_skip"),
    ("finetune", lambda **kw: finetune(_model(), *_data()[1:], **kw), "epoch", "epochs"),
    ("train_mlp", lambda **kw: train_mlp(*_data(), **kw), "learning_rate", None),
    ("train_mlp", lambda **kw: train_mlp(*_data(), **kw), "sed", "seed"),
    ("make_mlp", lambda **kw: make_mlp(p=3, q=2, **kw), "hiden", "hidden"),
    ("fgsm", lambda **kw: fgsm(*_data(), 0.1, **kw), "clp", "clip"),
    ("pgd", lambda **kw: pgd(*_data(), 0.1, **kw), "step", "steps"),
    ("pgd", lambda **kw: pgd(*_data(), 0.1, **kw), "generator", None),
    ("robust_accuracy", lambda **kw: robust_accuracy(*_data(), [0.1], **kw), "atack", "attack"),
    ("accuracy", lambda **kw: accuracy(*_data(), **kw), "batchsize", "batch_size"),
    ("solve_rows_cvxpy", lambda **kw: solve_rows_cvxpy(*_problem(), 0.1, **kw), "mod", "mode"),
    ("count_nonzeros", lambda **kw: count_nonzeros(_model(), **kw), "zero_tl", "zero_tol"),
    ("baseline_nonzeros", lambda **kw: baseline_nonzeros(_net(), **kw), "zerotol", "zero_tol"),
    ("project_l1_ball", lambda **kw: project_l1_ball(torch.ones(3), **kw), "radios", "radius"),
    ("register_layer", lambda **kw: register_layer(nn.Tanh, **kw), "handlr", "handler"),
]


@pytest.mark.parametrize("owner, call, typo, hint", TYPOS, ids=[f"{t[0]}-{t[2]}" for t in TYPOS])
def test_public_sim_api_rejects_a_typod_keyword(owner, call, typo, hint):
    with pytest.raises(OptionError) as info:
        call(**{typo: 1})
    msg = str(info.value)
    assert msg.startswith(f"{owner} got an unknown option {typo!r}")
    if hint is not None:
        assert f"Did you mean {hint!r}?" in msg


_BAD = float("inf")
# (owner as named in messages, call that must fail, option the message names)
BAD_VALUES = [
    ("BatchedADMM", lambda: BatchedADMM(rho=-1), "rho"),
    ("BatchedADMM", lambda: BatchedADMM(tol=_BAD), "tol"),
    ("BatchedADMM", lambda: BatchedADMM(tol_abs=float("nan")), "tol_abs"),
    ("BatchedADMM", lambda: BatchedADMM(max_iter=2.5), "max_iter"),
    ("BatchedADMM", lambda: BatchedADMM(on_failure="record"), "on_failure"),
    ("BatchedADMM", lambda: BatchedADMM(mode="exact"), "mode"),
    ("BatchedADMM", lambda: BatchedADMM(tol=0, tol_abs=0), "tol"),
    ("BatchedADMM.solve", lambda: BatchedADMM().solve(*_problem(), -0.1), "lam"),
    ("BatchedADMM.solve", lambda: BatchedADMM().solve(*_problem(), 0.1, radius=1.0, n_constrained=99), "n_constrained"),
    ("BatchedADMM.solve", lambda: BatchedADMM().solve(*_problem(), 0.1, radius=-1.0, n_constrained=2), "radius"),
    ("ImplicitModel", lambda: ImplicitModel(4, 3, 2, kappa=1.0), "kappa"),
    ("ImplicitModel", lambda: ImplicitModel(4, 3, 2, bias=1), "bias"),
    ("ImplicitModel", lambda: ImplicitModel(0, 3, 2), "n"),
    ("ImplicitModel", lambda: ImplicitModel(4, 3, 2, phi="sigmoidal"), "phi"),
    ("ImplicitModel.is_wellposed", lambda: ImplicitModel(4, 3, 2).is_wellposed("spectral"), "criterion"),
    ("fit_sim", lambda: fit_sim(_states(), -1.0), "lam"),
    ("fit_sim", lambda: fit_sim(_states(), _BAD), "lam"),
    ("fit_sim", lambda: fit_sim(_states(), 0.1, lam_scale="paper", zero_tol=float("nan")), "zero_tol"),
    ("fit_sim", lambda: fit_sim(_states(), 0.1, lam_scale="paper", on_failure="log"), "on_failure"),
    ("fit_sim", lambda: fit_sim(_states(), 0.1, lam_scale="paper", kappa=1.5), "kappa"),
    ("fit_sim", lambda: fit_sim(_states(), 0.1, lam_scale="paper", input_weight=0.0), "input_weight"),
    ("fit_sim", lambda: fit_sim(_states(), 0.1, lam_scale="paper", debias="yes"), "debias"),
    ("fit_sim", lambda: fit_sim(_states(), 0.1, lam_scale="paper", admm_ab=BatchedADMM(mode="equality")), "mode"),
    ("fit_sim", lambda: fit_sim(_states(), 0.1, lam_scale="none"), "lam_scale"),
    ("fit_sim", lambda: fit_sim(_states(), 0.1, lam_scale="sample"), "lam_scale"),
    ("fit_sim", lambda: fit_sim(_states()), "lam"),
    ("fit_sim", lambda: fit_sim(_states(), 0.1, density=0.5), "density"),
    ("fit_sim", lambda: fit_sim(_states(), density=0.0), "density"),
    ("fit_sim", lambda: fit_sim(_states(), density=0.5, mode="equality"), "density"),
    ("fit_sim", lambda: fit_sim(_states(), density=0.5, max_evals=1), "max_evals"),
    ("fit_sim", lambda: fit_sim(_states(), 0.1, input_radius=-1.0), "input_radius"),
    ("collect_states", lambda: collect_states(*_data()[:2], kappa=0.0), "kappa"),
    ("mlp_to_implicit", lambda: mlp_to_implicit(_net(), kappa=_BAD), "kappa"),
    ("structure_support", lambda: structure_support(_states(), "dag"), "structure"),
    ("finetune", lambda: finetune(_model(), *_data()[1:], lr=-1.0), "lr"),
    ("finetune", lambda: finetune(_model(), *_data()[1:], epochs=-1), "epochs"),
    ("train_mlp", lambda: train_mlp(*_data(), batch_size=0), "batch_size"),
    ("train_mlp", lambda: train_mlp(*_data(), seed=-1), "seed"),
    ("train_mlp", lambda: train_mlp(*_data(), weight_decay=_BAD), "weight_decay"),
    ("make_mlp", lambda: make_mlp(3, [], 2), "hidden"),
    ("fgsm", lambda: fgsm(*_data(), -0.1), "eps"),
    ("fgsm", lambda: fgsm(*_data(), 0.1, clip=(1.0, 0.0)), "clip"),
    ("pgd", lambda: pgd(*_data(), 0.1, steps=0), "steps"),
    ("pgd", lambda: pgd(*_data(), 0.1, step_size=_BAD), "step_size"),
    ("pgd", lambda: pgd(*_data(), 0.1, seed=-3), "seed"),
    ("robust_accuracy", lambda: robust_accuracy(*_data(), [0.1], attack="cw"), "attack"),
    ("robust_accuracy", lambda: robust_accuracy(*_data(), [0.1], attack="fgsm", steps=3), "steps"),
    ("robust_accuracy", lambda: robust_accuracy(*_data(), [_BAD]), "eps"),
    ("accuracy", lambda: accuracy(*_data(), batch_size=0), "batch_size"),
    ("solve_rows_cvxpy", lambda: solve_rows_cvxpy(*_problem(), -1.0), "lam"),
    ("solve_rows_cvxpy", lambda: solve_rows_cvxpy(*_problem(), 0.1, on_failure="loud"), "on_failure"),
    ("count_nonzeros", lambda: count_nonzeros(_model(), zero_tol=-1.0), "zero_tol"),
    ("baseline_nonzeros", lambda: baseline_nonzeros(_net(), zero_tol=_BAD), "zero_tol"),
    ("project_l1_ball", lambda: project_l1_ball(torch.ones(3), -1.0), "radius"),
    ("register_layer", lambda: register_layer(int, lambda m: None), "layer_type"),
]


@pytest.mark.parametrize("owner, call, option", BAD_VALUES, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BAD_VALUES)])
def test_public_sim_api_rejects_a_bad_value_naming_the_owner(owner, call, option):
    with pytest.raises(OptionError) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"{owner}:"), msg
    assert option in msg


def _capped(policy):
    phi, z = _problem()
    return BatchedADMM(max_iter=3, on_failure=policy).solve(phi, z, 0.1), z.shape[0]


def test_admm_on_failure_raise_warn_ignore():
    with pytest.raises(ConvergenceError, match="5 of 5 rows did not reach tol=1e-05, tol_abs=1e-07 within max_iter=3"):
        _capped("raise")
    with pytest.warns(ConvergenceWarning, match="did not reach") as rec:
        res, r = _capped("warn")
    assert rec[0].filename == __file__  # attributed to the caller of solve()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res_ignored, _ = _capped("ignore")
    for out in (res, res_ignored):  # whatever the policy, the result records the failure
        assert not out.all_converged and out.n_failed == r
        assert torch.all(out.nstep == 3) and torch.all(out.residual > 1)
    torch.testing.assert_close(res.beta, res_ignored.beta, rtol=0, atol=0)


def test_fit_sim_on_failure_governs_the_whole_fit():
    st = _states()
    capped = {"admm_ab": BatchedADMM(max_iter=3, on_failure="raise"), "admm_cd": BatchedADMM(max_iter=3)}
    with pytest.raises(
        ConvergenceError, match=r"fit_sim\(lam=0.1\): rows of \(A, B\): ADMM: .* did not reach.*; rows of \(C, D\)"
    ):
        fit_sim(st, 0.1, lam_scale="paper", on_failure="raise", **capped)
    with pytest.warns(ConvergenceWarning, match=r"fit_sim\(lam=0.1\)") as rec:
        res = fit_sim(st, 0.1, lam_scale="paper", **capped)  # the ADMMs' own on_failure is not consulted
    assert len(rec) == 1 and rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = fit_sim(st, 0.1, lam_scale="paper", on_failure="ignore", **capped)
    for out in (res, quiet):
        assert out.converged is False and not out.all_converged and out.nstep == 3 and out.residual > 1


def _check_core_fields(res):
    assert isinstance(res, ResultMixin)
    for f in RESULT_FIELDS:
        assert hasattr(res, f), f
    assert isinstance(res.time_s, float) and res.time_s >= 0
    assert isinstance(res.summary(), str)


def test_admm_result_has_the_core_fields_and_residual_at_most_one_means_converged():
    phi, z = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = BatchedADMM(max_iter=60).solve(phi, z, torch.linspace(0.01, 3.0, z.shape[0], dtype=torch.float64))
    assert isinstance(res, ADMMResult)
    _check_core_fields(res)
    assert res.converged.shape == res.nstep.shape == res.residual.shape == (z.shape[0],)
    assert 0 < int(res.converged.sum()) < z.shape[0]  # a mix, so the equivalence below is exercised both ways
    assert torch.equal(res.converged, res.residual <= 1)
    assert "rows converged" in res.summary()


def test_sim_result_summarises_its_solves():
    st = _states()
    res = fit_sim(
        st, 0.05, lam_scale="paper", debias=True, admm_ab=BatchedADMM(max_iter=5000), admm_cd=BatchedADMM(max_iter=5000)
    )
    assert isinstance(res, SIMResult)
    _check_core_fields(res)
    assert set(res.solves) == {"ab", "cd", "refit_ab", "refit_cd"}
    assert res.converged is True and isinstance(res.nstep, int) and isinstance(res.residual, float)
    assert res.nstep == max(int(r.nstep.max()) for r in res.solves.values())
    assert res.residual <= 1


def test_cvxpy_result_has_the_core_fields():
    pytest.importorskip("cvxpy")
    phi, z = _problem(r=3)
    res = solve_rows_cvxpy(phi, z, 0.1, radius=0.5, n_constrained=4)
    _check_core_fields(res)
    assert res.all_converged and res.n_failed == 0 and list(res.status) == ["optimal"] * 3
    assert (res.nstep > 0).all() and (res.residual <= 1e-6).all()
    assert not math.isnan(float(res.objective.sum()))


def test_states_and_layers_validate_their_fields():
    st = _states()
    with pytest.raises(OptionError, match="States got an unknown option 'kapa'. .*Did you mean 'kappa'"):
        type(st)(U=st.U, Z=st.Z, X=st.X, Y=st.Y, kapa=0.9)
    with pytest.raises(OptionError, match="States: kappa"):
        type(st)(U=st.U, Z=st.Z, X=st.X, Y=st.Y, kappa=1.0)
    with pytest.raises(OptionError, match="States: Y must be a 2-D tensor"):
        type(st)(U=st.U, Z=st.Z, X=st.X, Y=st.Y[:-1], kappa=0.9)
    with pytest.raises(OptionError, match="collect_states: unsupported layer Tanh"):
        collect_states(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.rand(2, 3))


def test_methods_with_keyword_options_reject_typos():
    phi, z = _problem()
    with pytest.raises(OptionError, match="got an unknown option 'radus'.*Did you mean 'radius'"):
        BatchedADMM().solve(phi, z, 0.1, radus=1.0)
    with pytest.raises(OptionError, match="got an unknown option 'criteria'.*Did you mean 'criterion'"):
        _model().is_wellposed(criteria="inf")


def test_cvxpy_on_failure_raise_warn_ignore():
    pytest.importorskip("cvxpy")
    phi, z = _problem(r=2)
    capped = {"radius": 0.5, "n_constrained": 4, "solver_opts": {"max_iter": 2}}  # Clarabel stops early
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")  # CVXPY's own note
        with pytest.raises(ConvergenceError, match="solve_rows_cvxpy: 2 of 2 rows not solved to optimality"):
            solve_rows_cvxpy(phi, z, 0.1, on_failure="raise", **capped)
        with pytest.warns(ConvergenceWarning, match="not solved to optimality"):
            res = solve_rows_cvxpy(phi, z, 0.1, **capped)
        warnings.simplefilter("error", ConvergenceWarning)
        quiet = solve_rows_cvxpy(phi, z, 0.1, on_failure="ignore", **capped)
    for out in (res, quiet):
        assert out.n_failed == 2 and not out.converged.any() and "optimal" not in out.status
