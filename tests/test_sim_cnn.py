"""Convolutional baselines for SIM (deqkit.sim.cnn): exact conversion, receptive-field supports, fits."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from deqkit.errors import ConvergenceWarning, OptionError
from deqkit.sim import BatchedADMM, fit_sim
from deqkit.sim.cnn import (
    cnn_layers,
    cnn_support,
    cnn_to_implicit,
    collect_cnn_states,
    make_cnn,
)
from deqkit.solvers import Anderson

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: a second thread only adds contention


def _cnn(in_shape=(1, 8, 8), channels=(3, 4), stride=2, padding=1, kernel=3, seed=0):
    torch.manual_seed(seed)
    return make_cnn(in_shape, channels, q=5, kernel_size=kernel, stride=stride, padding=padding).double().eval()


@pytest.mark.parametrize(
    "in_shape, stride, padding, kernel", [((1, 8, 8), 2, 1, 3), ((2, 9, 7), 1, 0, 3), ((1, 10, 10), 2, 2, 4)]
)
def test_cnn_converts_to_an_implicit_model_that_reproduces_it(in_shape, stride, padding, kernel):
    net = _cnn(in_shape, stride=stride, padding=padding, kernel=kernel)
    model = cnn_to_implicit(net, in_shape)
    model.solver = Anderson(memory=6, tol=1e-13, max_iter=500, stop_mode="abs")
    u = torch.rand(16, *in_shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(u.reshape(16, -1)), net(u), atol=1e-10, rtol=0)
    assert model.is_wellposed()
    sizes = [int(torch.tensor(s).prod()) for s in cnn_layers(net, in_shape).shapes[:-1]]
    assert model.n == sum(sizes) and model.p == int(torch.tensor(in_shape).prod())


def _changed(f, base, d, eps=1.0):
    """Brute force: out[i, j] is True when perturbing input j of ``f`` changes output i."""
    x = base.repeat(d, 1) + eps * torch.eye(d, dtype=torch.float64)
    return ((f(x) - f(base)).abs() > 1e-12).T


def test_receptive_field_support_matches_a_brute_force_dependency_check():
    in_shape = (2, 7, 6)
    net = _cnn(in_shape, channels=(3, 2), stride=2, padding=1)
    with torch.no_grad():  # positive weights: no cancellation hides a dependency
        for mod in net:
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.copy_(mod.weight.abs() + 0.1)
    conv1, conv2 = net[0], net[2]
    cl = cnn_layers(net, in_shape)
    s1, s2 = cl.shapes[0], cl.shapes[1]
    n1, n2, p = int(torch.tensor(s1).prod()), int(torch.tensor(s2).prod()), int(torch.tensor(in_shape).prod())
    n = n1 + n2
    f1 = lambda x: conv1(x.reshape(-1, *in_shape)).reshape(x.shape[0], -1)
    f2 = lambda h: conv2(h.reshape(-1, *s1)).reshape(h.shape[0], -1)
    f21 = lambda x: f2(f1(x))
    dep1 = _changed(f1, torch.zeros(1, p, dtype=torch.float64), p)
    dep2 = _changed(f2, torch.zeros(1, n1, dtype=torch.float64), n1)
    dep21 = _changed(f21, torch.zeros(1, p, dtype=torch.float64), p)
    for skip in (False, True):
        ab, cd = cnn_support(net, in_shape, skip_inputs=skip)
        # stacking: layer 2's units first (rows 0..n2), then layer 1's; columns [X (same order) | U | 1]
        assert torch.equal(ab[n2:, n : n + p], dep1)  # layer 1 reads its input pixels
        assert not ab[n2:, :n].any()  # ... and no state
        assert torch.equal(ab[:n2, n2:n], dep2)  # layer 2 reads layer-1 units in its field
        assert not ab[:n2, :n2].any()  # no lateral or self edges
        assert torch.equal(ab[:n2, n : n + p], dep21 if skip else torch.zeros_like(dep21))
        assert ab[:, -1].all() and cd[:, -1].all() and cd[:, :n2].all() and not cd[:, n2 : n + p].any()
    assert 0 < dep2.double().mean() < 0.5  # the fields are local: the check is not trivial


def test_fit_at_lam_zero_reproduces_the_cnn_on_its_states_and_grouped_equals_masked():
    in_shape = (1, 6, 6)
    net = _cnn(in_shape, channels=(2, 3))
    u = torch.rand(150, *in_shape, dtype=torch.float64)
    st = collect_cnn_states(net, u)
    support = cnn_support(net, in_shape)
    tight = dict(tol=1e-11, tol_abs=1e-13, max_iter=20000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = fit_sim(st, 0.0, support=support, admm_ab=BatchedADMM(**tight), admm_cd=BatchedADMM(**tight))
    model = res.model
    model.solver = Anderson(memory=6, tol=1e-13, max_iter=500, stop_mode="abs")
    with torch.no_grad():
        torch.testing.assert_close(model(u.reshape(150, -1)), net(u), atol=1e-6, rtol=0)
    assert not bool(model.A.detach()[~support[0][:, : model.n]].any())  # nothing outside the fields
    # the grouped solve (rows sharing a field solved together on their columns) = the masked full solve
    admm = BatchedADMM(tol=1e-10, tol_abs=1e-12, max_iter=20000)
    lam = 0.05 * res.ab.beta.new_ones(st.Z.shape[1])
    from deqkit.sim.fit import _Block, _solve_grouped

    block = _Block(admm, st.Z.T, 1.0, st.kappa, st.X.shape[1], support[0], None)
    grouped = _solve_grouped(block, st.phi, lam, weights=None, support=None, beta0=None)
    masked = admm.solve(st.phi, st.Z.T, lam, radius=st.kappa, n_constrained=st.X.shape[1], support=support[0])
    torch.testing.assert_close(grouped.objective, masked.objective, rtol=1e-6, atol=1e-8)
    assert st.reference_nnz == sum(int((l.weight != 0).sum() + (l.bias != 0).sum()) for l in cnn_layers(net, in_shape).layers)


def test_cnn_density_target():
    in_shape = (1, 8, 8)
    net = _cnn(in_shape)
    st = collect_cnn_states(net, torch.rand(200, *in_shape, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = fit_sim(st, density=0.5, support=cnn_support(net, in_shape))
    assert abs(res.density - 0.5) <= 0.02


@pytest.mark.parametrize(
    "layer, match",
    [
        (nn.MaxPool2d(2), "MaxPool2d"),
        (nn.BatchNorm2d(3), "BatchNorm2d"),
        (nn.Conv2d(3, 3, 3, groups=3), "groups=1"),
        (nn.Conv2d(3, 3, 3, dilation=2), "dilation=1"),
        (nn.Tanh(), "Tanh"),
    ],
)
def test_unsupported_layers_get_a_clear_error(layer, match):
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), layer, nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(OptionError, match=match):
        cnn_layers(net, (1, 8, 8))
    with pytest.raises(OptionError, match="in_shape"):
        cnn_to_implicit(_cnn(), None)


def test_cli_model_cnn_run(tmp_path):
    pytest.importorskip("sklearn")
    import argparse
    import json

    from deqkit.cli import sim as cli

    out = tmp_path / "out"
    args = cli.add_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--dataset",
            "digits",
            "--model",
            "cnn",
            "--channels",
            "2,3",
            "--samples",
            "120",
            "--density",
            "0.5",
            "--epochs",
            "2",
            "--n-test",
            "60",
            "--n-attack",
            "20",
            "--eps",
            "0.05",
            "--attacks",
            "fgsm",
            "--no-plot",
            "--out",
            str(out),
            "--no-progress",
            "--input-radius",
            "0.8",
            "--output-radius",
            "0.5",
            "--radius-scale",
            "relative",
        ]
    )
    assert cli.run(args) == 0
    res = json.loads((out / "sim_results.json").read_text())
    (row,) = res["sim"]
    assert res["model"] == "cnn" and res["channels"] == [2, 3] and res["radius_scale"] == "relative"
    assert res["output_skip"] is False  # the CNN default: the outputs read the last feature map, as the CNN's do
    assert abs(row["nnz_fraction"] - 0.5) <= 0.02 and row["wellposed"] and row["certified_gain"] is not None
    assert row["lam"] > 0 and row["density_target"] == 0.5
    assert row["input_radius"] > 0 and row["output_radius"] > 0  # the absolute bounds the fractions gave
    with pytest.raises(OptionError, match="--output-radius"):
        cli.validate(
            cli.add_arguments(argparse.ArgumentParser()).parse_args(["--output-radius", "2", "--radius-scale", "relative"])
        )


def test_support_and_structure_are_exclusive():
    in_shape = (1, 6, 6)
    net = _cnn(in_shape, channels=(2, 2))
    st = collect_cnn_states(net, torch.rand(30, *in_shape, dtype=torch.float64))
    with pytest.raises(OptionError, match="support"):
        fit_sim(st, 0.1, support=cnn_support(net, in_shape), structure="feedforward")
