"""The MDEQ cell and classifier, the DEQ's stabiliser options, and the trainer/CLI around them."""

import json

import pytest
import torch

from deqkit import DEQ, Broyden, Unrolled
from deqkit.cli import main
from deqkit.cli.train import epoch_line
from deqkit.data import load_dataset
from deqkit.errors import OptionError
from deqkit.models import DEQClassifier
from deqkit.nn import MDEQCell, MDEQStem, branch_sizes
from deqkit.regularizers import JacobianRegularizer
from deqkit.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: a second thread only adds contention


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("digits", subset=96, flatten=False)


def _mdeq(**kw):
    torch.manual_seed(0)
    opts = dict(channels=(8, 16), solver=Broyden(tol=1e-4, max_iter=30), on_failure="ignore")
    opts.update(kw)
    return DEQClassifier.mdeq((1, 8, 8), 10, **opts)


def test_mdeq_shapes_and_three_branches():
    assert branch_sizes(14, 14, 3) == [(14, 14), (7, 7), (4, 4)]
    torch.manual_seed(0)
    cell, stem = MDEQCell((8, 16, 16)), MDEQStem(1, (8, 16, 16))
    u = stem(torch.randn(2, 1, 28, 28))
    assert [tuple(t.shape) for t in u] == [(2, 8, 14, 14), (2, 16, 7, 7), (2, 16, 4, 4)]
    out = cell(tuple(torch.zeros_like(t) for t in u), u)
    assert [t.shape for t in out] == [t.shape for t in u]
    with pytest.raises(ValueError, match="injection"):
        cell(out, u[:2])
    with pytest.raises(OptionError, match="2 to 4"):
        MDEQCell((8,))
    with pytest.raises(OptionError, match="groups"):
        MDEQCell((8, 18), groups=4)
    with pytest.raises(OptionError, match="Did you mean 'dropout'"):
        DEQClassifier.mdeq((1, 8, 8), 10, dropot=0.1)
    # 28×28 images: the stem's two stride-2 convolutions put the branches at 7×7 and 4×4
    assert DEQClassifier.mdeq((1, 28, 28), 10).deq.state_shape == ((16, 7, 7), (32, 4, 4))
    assert DEQClassifier.mdeq((1, 28, 28), 10, stem_stride=2).deq.state_shape == ((16, 14, 14), (32, 7, 7))
    with pytest.raises(OptionError, match="stride"):
        MDEQStem(1, (8, 16), stride=3)


def test_mdeq_is_contractive_at_init_and_trains_a_step():
    model = _mdeq()
    model.deq.spectral_radius_iters = 30
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    logits, info = model(x, return_info=True)
    assert logits.shape == (4, 10) and info.converged.all()
    assert info.spectral_radius.shape == (4,) and float(info.spectral_radius.max()) < 1.0
    assert info.jac_fro is not None and info.jac_loss is None  # a monitor, no loss term
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert info.backward is not None and info.backward.solve.converged.all()


def test_deq_stabiliser_options():
    model = _mdeq()
    deq = model.deq
    u = model.injection(torch.randn(3, 1, 8, 8))
    deq.train()
    # Jacobian regularisation: a loss term with its graph to the cell, in training only
    deq.jac_reg = JacobianRegularizer(1.0, probes=2)
    _, info = deq(u)
    assert (
        info.jac_loss is not None and info.jac_loss.requires_grad and info.jac_fro == pytest.approx(float(info.jac_loss.detach()))
    )
    deq.eval()
    with torch.no_grad():
        assert deq(u)[1].jac_loss is None
    deq.train()
    deq.jac_reg = None
    # the solver's iterates, evenly spaced, z* last
    deq.keep_iterates = 3
    z, info = deq(u)
    assert len(info.iterates) == 3 and torch.equal(info.iterates[-1], info.forward.z)
    assert info.cell_fn is not None and info.unpack is not None
    deq.keep_iterates = 0
    # randomised cap
    deq.random_max_iter = (2, 3)
    for _ in range(3):
        assert int(deq(u)[1].nstep.max()) <= 3
    deq.random_max_iter = None
    # unrolled pre-training: f applied depth times from z0, with the autograd graph
    deq.unrolled_depth = 4
    z, info = deq(u)
    assert info.unrolled and info.nstep.eq(4).all() and info.backward is None
    zz = deq.initial_state(u)
    for _ in range(4):
        zz = deq.cell(zz, u)
    for a, b in zip(z, zz):
        torch.testing.assert_close(a, b)
    assert z[0].requires_grad
    with pytest.raises(OptionError, match="random_max_iter"):
        DEQ(deq.cell, random_max_iter=(5, 2))
    with pytest.raises(OptionError, match="jac_reg"):
        DEQ(deq.cell, jac_reg=0.5)


def test_trainer_reports_stability_and_applies_the_stabilisers(tiny, tmp_path):
    model = _mdeq(grad=Unrolled(3, 0.5))
    cfg = TrainConfig(
        epochs=2,
        batch_size=32,
        lr=3e-3,
        seed=0,
        progress=False,
        jac_reg_weight=0.5,
        monitor_every=1,
        pretrain_steps=2,
        pretrain_depth=3,
        fpc_iterates=3,
        random_max_iter=(20, 30),
        checkpoint_dir=str(tmp_path / "c"),
    )
    history = Trainer(model, tiny.train, tiny.val, cfg).fit()
    first, second = history
    assert first["pretrain_steps"] == 2 and second["pretrain_steps"] == 0
    # the pre-training calls are no solves: the epoch's solve counts cover the other steps only
    # (3 plain iterations never reach tol=1e-4: counted as solves they would make this <= 1/3)
    assert first["fwd_converged"] > 0.5
    assert first["jac_steps"] == 1 and second["jac_steps"] == 3  # pre-training steps take no JR term
    for rec in history:
        assert 0 < rec["spectral_radius"] <= rec["spectral_radius_max"]
        assert rec["fwd_residual"] is not None and rec["jac_fro"] is not None
    # after fit the DEQ's per-step settings are back
    assert model.deq.unrolled_depth is None and model.deq.spectral_radius_iters == 0
    with pytest.raises(OptionError, match="head"):
        Trainer(
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
            tiny.train,
            None,
            TrainConfig(epochs=1, progress=False, fpc_iterates=2),
        ).fit()


def test_jacobian_regularisation_reaches_the_parameters(tiny):
    """The JR term changes the update: same seed, with and without it, different weights."""
    weights = []
    for w in (0.0, 5.0):
        model = _mdeq()
        cfg = TrainConfig(
            epochs=1, batch_size=32, lr=3e-3, seed=0, progress=False, jac_reg_weight=w, max_steps=1, monitor_every=0
        )
        Trainer(model, tiny.train, None, cfg).fit()
        weights.append(torch.cat([p.detach().flatten() for p in model.cell.parameters()]))
    assert not torch.allclose(weights[0], weights[1])


def test_diverging_training_is_reported(tiny, tmp_path, capsys):
    """lr far too high: the conv DEQ stops being contractive; the metrics and the epoch line say so."""
    torch.manual_seed(0)
    model = DEQClassifier.conv((1, 8, 8), 16, 10, solver=Broyden(tol=1e-4, max_iter=15), on_failure="ignore")
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, seed=0, progress=False, monitor_every=1)
    history = Trainer(model, tiny.train, None, cfg).fit()
    last = history[-1]
    assert last["fwd_converged"] < 0.5 and last["spectral_radius_max"] > 1.0 and last["fwd_residual"] > 1e-3
    line = epoch_line(last, 2)
    assert "UNSTABLE" in line and "spectral radius" in line and "--jac-reg" in line
    assert f"bwd amplification max {last['bwd_amplification']:.3g}" in line
    assert "failing" in line and "add --jac-reg 0.5" in line  # no JR in this run
    ok = dict(last, fwd_converged=1.0, spectral_radius=0.5, spectral_radius_max=0.7)
    assert "UNSTABLE" not in epoch_line(ok, 2)
    # converging, but one monitored Jacobian is not contractive, with JR on: said as it is
    edge = epoch_line(dict(ok, spectral_radius_max=1.004, jac_steps=844), 2)
    assert "UNSTABLE: the cell is not contractive" in edge and "100.0% of the training solves converged" in edge
    assert "failing" not in edge and "raise --jac-reg" in edge


def test_cli_train_mdeq_with_stabilisers(tmp_path, capsys):
    out = tmp_path / "m"
    args = [
        "train",
        "--model",
        "mdeq",
        "--mdeq-channels",
        "8,16",
        "--subset",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--jac-reg",
        "0.5",
        "--pretrain-steps",
        "1",
        "--random-max-iter",
        "10,20",
        "--fpc",
        "2",
        "--monitor-every",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "epoch 1/1" in text and "spectral radius" in text and "test accuracy" in text
    assert "Jacobian regularisation" not in text  # asked for by name: not announced
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["pretrain_steps"] == 1 and rec["jac_steps"] == 1 and rec["spectral_radius"] is not None
    with pytest.raises(SystemExit):
        main(["train", "--random-max-iter", "30,10"])


def test_monitoring_does_not_change_a_seeded_run(tiny):
    """The spectral-radius monitor draws from its own generator: with dropout masks drawn from the
    global one, a run with the monitor on every step ends with the same weights as one without."""
    weights = []
    for every in (0, 1):
        model = _mdeq(dropout=0.2)
        cfg = TrainConfig(epochs=1, batch_size=32, lr=3e-3, seed=0, progress=False, max_steps=2, monitor_every=every)
        history = Trainer(model, tiny.train, None, cfg).fit()
        assert (history[-1]["spectral_radius"] is None) == (every == 0)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_jac_reg_auto_regularises_the_mdeq_only():
    from deqkit.cli import build_parser
    from deqkit.cli.train import _settings_lines, stabiliser_config

    parser = build_parser()
    weight = lambda *argv: stabiliser_config(parser.parse_args(["train", *argv]))["jac_reg_weight"]  # noqa: E731
    assert weight("--model", "mdeq") == 0.5
    assert weight("--model", "conv") == 0.0 and weight() == 0.0
    assert weight("--model", "mdeq", "--jac-reg", "0") == 0.0
    assert weight("--model", "mlp", "--jac-reg", "0.25") == 0.25
    args = parser.parse_args(["train", "--model", "mdeq"])
    cfg = TrainConfig(**stabiliser_config(args))
    assert _settings_lines(args, cfg, None) == [
        "Jacobian regularisation 0.5 (--jac-reg auto for --model mdeq; --jac-reg 0 turns it off)"
    ]
    assert _settings_lines(parser.parse_args(["train"]), TrainConfig(), None) == []


def test_compare_regularises_the_mdeq_as_train_does():
    from deqkit.apps.compare import CompareConfig, _train_config

    assert _train_config(CompareConfig(model="mdeq"), "exact").jac_reg_weight == 0.5
    assert _train_config(CompareConfig(model="mlp"), "exact").jac_reg_weight == 0.0
    assert _train_config(CompareConfig(model="mdeq", jac_reg=0.0), "exact").jac_reg_weight == 0.0
    with pytest.raises(OptionError, match="jac_reg must be 'auto' or a finite number >= 0"):
        CompareConfig(jac_reg=-1.0)
