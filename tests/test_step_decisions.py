"""The training-time random decisions of a DEQ (the ``random_max_iter`` cap, whether the Jacobian
penalty fires) come from the step's generator, a function of ``(seed, global_step)`` only.

Under data parallelism every rank must take the same decisions (a rank that adds the penalty or
stops at another cap builds another graph); under resume a run must take the decisions of an
uninterrupted one. The global torch RNG, which per-rank work (augmentation, dropout, Hutchinson
probes) advances differently, must not feed them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from deqkit import Anderson, Exact
from deqkit.models import DEQClassifier
from deqkit.regularizers import JacobianRegularizer
from deqkit.train import Callback, TrainConfig, Trainer
from deqkit.train.checkpoint import step_generator

N_TRAIN, IN_DIM, WIDTH, CLASSES = 24, 5, 6, 3
LOW, HIGH = 2, 40


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN, IN_DIM, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())


def _model() -> DEQClassifier:
    torch.manual_seed(0)
    model = DEQClassifier.mlp(
        IN_DIM,
        WIDTH,
        CLASSES,
        solver=Anderson(memory=4, tol=1e-6, max_iter=HIGH),
        grad=Exact(tol=1e-6, max_iter=30),
        on_failure="ignore",
        norm=None,
    )
    model.deq.random_max_iter = (LOW, HIGH)
    model.deq.jac_reg = JacobianRegularizer(0.1, freq=0.5)
    return model


def _config(**kw) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 8, "lr": 0.05, "optimizer": "sgd", "schedule": "none", "seed": 7, "progress": False}
    return TrainConfig(**{**base, **kw})


def _record(model: DEQClassifier, out: list) -> None:
    """Append each training call's ``(cap, penalty fired)`` (a forward hook on the DEQ)."""

    def hook(module, args, output):
        if module.training:
            info = output[1]
            out.append((int(info.forward.max_iter), info.jac_loss is not None))

    model.deq.register_forward_hook(hook)


class _Perturb(Callback):
    """Advance the global RNG by a different amount after every step (per-rank work would)."""

    def __init__(self, salt: int) -> None:
        self.salt = salt

    def on_step_end(self, trainer, step):
        torch.rand(self.salt + 3 * step["global_step"])


def _run(callbacks=(), **kw) -> list:
    model = _model()
    decisions: list = []
    _record(model, decisions)
    Trainer(model, _data(), None, _config(**kw), callbacks=list(callbacks)).fit()
    return decisions


def _expected(seed: int, steps: int) -> list:
    """What step k decides, from ``step_generator(seed, k)`` alone: the cap, then the penalty draw."""
    out = []
    for k in range(steps):
        g = step_generator(seed, k)
        cap = int(torch.randint(LOW, HIGH + 1, (), generator=g))
        out.append((cap, bool(torch.rand((), generator=g) < 0.5)))
    return out


def test_decisions_ignore_the_global_rng():
    """Same seed, the global RNG perturbed differently between steps: the same decisions."""
    plain = _run()
    perturbed = _run([_Perturb(1)])
    other = _run([_Perturb(5)])
    assert len(plain) == 6
    assert plain == perturbed == other
    # the decisions are random ones: several caps, the penalty on some steps and off on others
    assert len({cap for cap, _ in plain}) > 2 and len({fired for _, fired in plain}) == 2


def test_decision_of_step_k_depends_only_on_seed_and_k():
    assert _run() == _expected(7, 6)
    assert _run(seed=8) == _expected(8, 6) != _expected(7, 6)


def test_resumed_run_takes_the_uninterrupted_runs_decisions(tmp_path: Path):
    full = _run(checkpoint_dir=str(tmp_path / "full"))
    first = _run(epochs=1, checkpoint_dir=str(tmp_path / "cut"))  # 3 steps, then a checkpoint
    model = _model()
    rest: list = []
    _record(model, rest)
    torch.manual_seed(1234)  # a different process state before the resume
    Trainer(model, _data(), None, _config(checkpoint_dir=str(tmp_path / "cut"))).fit(resume=True)
    assert first + rest == full


def test_trainer_puts_the_deqs_own_generator_back():
    """Outside a trainer's step the DEQ draws from its own ``decision_generator`` (global RNG when None)."""
    model = _model()
    own = torch.Generator().manual_seed(0)
    model.deq.decision_generator = own
    Trainer(model, _data(), None, _config(max_steps=2)).fit()
    assert model.deq.decision_generator is own
    caps = []
    for _ in range(2):
        model.deq.decision_generator = torch.Generator().manual_seed(3)
        model.train()
        model(_data().tensors[0][:4])
        caps.append(int(model.last_info.forward.max_iter))
    assert caps[0] == caps[1] == int(torch.randint(LOW, HIGH + 1, (), generator=torch.Generator().manual_seed(3)))


def test_a_step_that_raises_still_puts_the_deqs_settings_back():
    """A step whose loss is non-finite raises NonFiniteError; the DEQ's own generator and per-step
    settings are restored all the same (a caller that catches the error goes on with them)."""
    from deqkit.errors import NonFiniteError

    model = _model()
    own = torch.Generator().manual_seed(0)
    model.deq.decision_generator = own
    depth = model.deq.unrolled_depth
    x, y = _data().tensors
    bad = torch.utils.data.TensorDataset(torch.full_like(x, float("nan")), y)
    with pytest.raises(NonFiniteError):
        Trainer(model, bad, None, _config(max_steps=2, pretrain_steps=1)).fit()
    assert model.deq.decision_generator is own and model.deq.unrolled_depth == depth


# -- two gloo processes: both ranks draw the same caps and penalties ----------------------------------
def _ddp_worker(out_dir: str) -> None:
    from deqkit.train.distributed import DistributedTrainer, world_info

    rank, _ = world_info()
    torch.rand(10 + 7 * rank)  # the ranks' global RNGs differ from the start ...
    model = _model()
    decisions: list = []
    _record(model, decisions)
    # ... and drift apart further after every step
    DistributedTrainer(model, _data(), None, _config(), callbacks=[_Perturb(rank)]).fit()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(decisions))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ranks_take_the_same_decisions(tmp_path: Path):
    from deqkit.train.distributed import launch

    launch(_ddp_worker, 2, str(tmp_path), timeout_s=120.0, collective_timeout_s=30.0, threads=1, backend="gloo")
    r0 = [tuple(d) for d in json.loads((tmp_path / "rank0.json").read_text())]
    r1 = [tuple(d) for d in json.loads((tmp_path / "rank1.json").read_text())]
    assert r0 == r1 == _expected(7, 6)
