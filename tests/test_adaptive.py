"""The default exact gradient's adjoint policy and the Adaptive estimator.

Adaptive: on a cell whose contraction factor is raised mid-training, the cheap gradient's
cosine to the exact one falls and the estimator switches to exact (and back when the cell is
easy again, with hysteresis); on an easy cell it never switches; every step's decision is in
``info.backward``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqkit as dk
from deqkit.errors import OptionError
from deqkit.estimators import Adaptive, AdaptiveStats

F64 = torch.float64
D, P, B = 16, 5, 8


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


class ScaledTanhCell(nn.Module):
    """``f(z, x) = tanh(ρ·W z + U x)``, ``W`` symmetric with ``‖W‖₂ = 1`` (its largest eigenvalue
    ``+1``), small inputs: the contraction factor is about ``ρ``, a buffer the test raises."""

    def __init__(self, rho: float) -> None:
        super().__init__()
        W = randn(D, D, seed=1)
        W = W + W.T
        eig, vec = torch.linalg.eigh(W)
        W = W + (eig.abs().max() - eig.max()) * torch.outer(vec[:, -1], vec[:, -1]) * 2  # make +‖W‖ the top eigenvalue
        self.W = nn.Parameter(W / torch.linalg.matrix_norm(W, ord=2))
        self.U = nn.Parameter(0.1 * randn(D, P, seed=2) / P**0.5)
        self.register_buffer("rho", torch.tensor(rho, dtype=F64))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.rho * z @ self.W.T + x @ self.U.T)


def train_steps(deq: dk.DEQ, n: int, seed: int = 0) -> list:
    """``n`` forward/backward steps on fresh batches (no optimiser: the cell only changes by ``rho``)."""
    infos = []
    for i in range(n):
        x = randn(B, P, seed=100 * seed + i)
        z, info = deq(x)
        (z.sum() + 0.5 * (z * z).sum()).backward()
        infos.append(info)
    return infos


def test_adaptive_switches_when_the_cell_becomes_ill_conditioned_and_back():
    cell = ScaledTanhCell(0.3)
    est = Adaptive(check_every=3)
    deq = dk.DEQ(cell, dk.Anderson(tol=1e-10, max_iter=400), est, state_shape=(D,), on_failure="ignore")
    infos = train_steps(deq, 9)
    assert est.mode == "cheap" and not any(d.switched for d in est.history)
    assert all(d.cosine > est.threshold for d in est.history if d.checked)
    cell.rho.fill_(0.95)  # the contraction factor raised mid-training
    infos += train_steps(deq, 6, seed=1)
    switches = [d for d in est.history if d.switched]
    assert [d.switched for d in switches] == ["to-exact"], est.history
    assert switches[0].cosine < est.threshold
    assert est.mode == "exact"
    assert all(i.backward.decision.used == "exact" for i in infos[switches[0].step :])  # exact after the switch
    cell.rho.fill_(0.3)  # easy again: back to the cheap gradient at the next check (cosine >= recover)
    train_steps(deq, 4, seed=2)
    assert [d.switched for d in est.history if d.switched] == ["to-exact", "to-cheap"] and est.mode == "cheap"
    back = next(d for d in est.history if d.switched == "to-cheap")
    assert back.cosine >= est.recover
    m = est.metrics()
    assert m["adaptive_switches"] == 2 and m["adaptive_exact"] == 0 and 0 < m["adaptive_exact_share"] < 1


def test_adaptive_does_not_switch_on_an_easy_cell_and_records_every_step():
    est = Adaptive(check_every=4)
    deq = dk.DEQ(ScaledTanhCell(0.3), dk.Anderson(tol=1e-10, max_iter=200), est, state_shape=(D,))
    infos = train_steps(deq, 12)
    assert est.mode == "cheap" and est.metrics()["adaptive_switches"] == 0
    decisions = [i.backward.decision for i in infos]
    assert all(isinstance(i.backward, AdaptiveStats) for i in infos)
    assert [d.step for d in decisions] == list(range(1, 13))
    assert [d.checked for d in decisions] == [s in (1, 5, 9) for s in range(1, 13)]
    assert [d.used for d in decisions] == ["exact" if s in (1, 5, 9) else "unrolled" for s in range(1, 13)]
    assert decisions[0].reason == "first step" and decisions[4].reason == "scheduled"
    assert infos[0].backward.solve is not None and infos[0].backward.solve.all_converged  # the check's exact solve


def test_adaptive_uses_shine_with_a_broyden_forward_and_exact_gradient_on_checks():
    cell = ScaledTanhCell(0.3)
    est = Adaptive(check_every=2)
    deq = dk.DEQ(cell, dk.Broyden(tol=1e-10, max_iter=100), est, state_shape=(D,))
    infos = train_steps(deq, 3)
    assert [i.backward.decision.used for i in infos] == ["exact", "shine", "exact"]
    # a check step's gradient is the exact one
    x = randn(B, P, seed=7)
    grads = {}
    for name, grad in (
        ("adaptive", Adaptive(exact=dk.Exact(tol=1e-12, max_iter=300))),
        ("exact", dk.Exact(dk.Dense(), match_forward=False)),
    ):
        cell.zero_grad()
        z, _ = dk.DEQ(cell, dk.Broyden(tol=1e-12, max_iter=100), grad, state_shape=(D,))(x)
        (z.sum() + 0.5 * (z * z).sum()).backward()
        grads[name] = torch.cat([p.grad.flatten() for p in cell.parameters()])
    torch.testing.assert_close(grads["adaptive"], grads["exact"], rtol=1e-8, atol=1e-10)


def test_adaptive_is_registered_and_validates_its_options():
    assert isinstance(dk.make_estimator("adaptive"), Adaptive)
    with pytest.raises(OptionError, match="recover must be >= threshold"):
        Adaptive(threshold=0.99, recover=0.9)
    with pytest.raises(OptionError, match="cheap must be"):
        Adaptive(cheap=dk.Exact)  # a class, not an estimator
    with pytest.raises(OptionError, match="did you mean|Did you mean"):
        Adaptive(check_evry=3)


class _Decisions:
    """Each training step's Adaptive decision, read from the model after the step."""

    def __init__(self, model) -> None:
        self.model, self.decisions = model, []

    def on_step_end(self, trainer, step):
        self.decisions.append(getattr(self.model.last_info.backward, "decision", None))

    def on_epoch_end(self, trainer, record):
        pass


def test_trainer_epoch_record_sums_the_adaptive_decisions():
    """The epoch record's adaptive_* fields are the step decisions' counts (checks, their mean
    cosine, the share of exact steps, switches), and None for a model without Adaptive."""
    from torch.utils.data import TensorDataset

    from deqkit.models import DEQClassifier
    from deqkit.train import TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long()
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, progress=False, seed=0)
    records = {}
    for name, grad in (("adaptive", Adaptive(check_every=2, threshold=0.999, recover=0.9999)), ("exact", dk.Exact())):
        torch.manual_seed(0)
        model = DEQClassifier.mlp(6, 12, 2, grad=grad, on_failure="ignore")
        rec = _Decisions(model)
        records[name] = (Trainer(model, TensorDataset(x, y), None, cfg, callbacks=[rec]).fit()[-1], rec.decisions)
    record, decisions = records["adaptive"]
    assert len(decisions) == record["steps"] == 6
    checks = [d for d in decisions if d.checked]
    assert record["adaptive_checks"] == len(checks) >= 3
    assert record["adaptive_cosine"] == pytest.approx(sum(d.cosine for d in checks) / len(checks), rel=1e-12)
    assert record["adaptive_exact_share"] == pytest.approx(sum(d.used == "exact" for d in decisions) / 6, rel=1e-12)
    assert record["adaptive_switches"] == sum(d.switched is not None for d in decisions)
    assert 0 < record["adaptive_exact_share"] < 1 or record["adaptive_switches"] > 0
    exact_record = records["exact"][0]
    assert all(
        exact_record[k] is None for k in ("adaptive_checks", "adaptive_cosine", "adaptive_exact_share", "adaptive_switches")
    )


def test_cli_train_with_the_adaptive_estimator_logs_its_decisions(tmp_path, capsys):
    import json

    from deqkit.cli import main

    out = tmp_path / "a"
    argv = ["train", "--subset", "150", "--epochs", "1", "--grad", "adaptive", "--grad-opts", "check_every=3"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["adaptive_checks"] >= 1 and record["adaptive_exact_share"] > 0
    assert f"adaptive: {record['adaptive_checks']} checks" in capsys.readouterr().out
