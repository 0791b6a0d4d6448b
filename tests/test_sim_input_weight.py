"""Per-block λ (``input_weight``): validation, ADMM/CVXPY agreement, effect on the input block."""

import warnings

import pytest
import torch

from deqkit.cli import sim as cli
from deqkit.errors import ConvergenceWarning
from deqkit.sim import BatchedADMM, collect_states, count_nonzeros, fit_sim, make_mlp


def _states(seed=0, m=60, p=6):
    torch.manual_seed(seed)
    net = make_mlp(p, [5, 4], 3).double()
    return collect_states(net, torch.rand(m, p, dtype=torch.float64))


def _input_nnz(model, p):
    return int((model.B[:, :p].abs() >= 1e-6).sum()) + int((model.D[:, :p].abs() >= 1e-6).sum())


def test_input_weight_admm_matches_cvxpy():
    pytest.importorskip("cvxpy")
    states = _states()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        ours = fit_sim(
            states,
            0.05,
            lam_scale="paper",
            input_weight=3.0,
            admm_ab=BatchedADMM(max_iter=5000),
            admm_cd=BatchedADMM(max_iter=5000),
        )
    ref = fit_sim(states, 0.05, lam_scale="paper", method="cvxpy", input_weight=3.0)
    assert ours.converged and ref.converged
    assert abs(ours.objective - ref.objective) <= 1e-3 * abs(ref.objective)
    assert ours.model.is_wellposed() and ref.model.is_wellposed()


def test_input_weight_one_is_the_uniform_program_and_larger_sparsifies_inputs():
    states = _states(seed=1)
    kw = dict(admm_ab=BatchedADMM(max_iter=5000), admm_cd=BatchedADMM(max_iter=5000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        base = fit_sim(states, 0.05, lam_scale="paper", **kw)
        same = fit_sim(states, 0.05, lam_scale="paper", input_weight=1.0, **kw)
        heavy = fit_sim(states, 0.05, lam_scale="paper", input_weight=20.0, **kw)
    for k in "ABCD":
        torch.testing.assert_close(getattr(base.model, k), getattr(same.model, k))
    p = states.U.shape[1]
    assert _input_nnz(heavy.model, p) < _input_nnz(base.model, p)
    assert heavy.model.is_wellposed()
    assert count_nonzeros(heavy.model)["total"] > 0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "2", True])
def test_input_weight_is_validated(bad):
    states = _states()
    with pytest.raises(ValueError, match="input_weight"):
        fit_sim(states, 0.1, lam_scale="paper", input_weight=bad)


def test_cli_input_weight_option_is_validated():
    args = cli.add_arguments(__import__("argparse").ArgumentParser()).parse_args(["--input-weight", "2.5"])
    assert args.input_weight == 2.5
    for bad in ("0", "-1", "nan"):  # refused by the flag's type, at parse time
        with pytest.raises(SystemExit):
            cli.add_arguments(__import__("argparse").ArgumentParser()).parse_args(["--input-weight", bad])
