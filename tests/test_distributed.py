"""Data-parallel training with 2 gloo processes on CPU (``torch.multiprocessing`` spawn).

Each test launches fresh processes with :func:`deqkit.train.distributed.launch` (free port,
a wall-clock limit and a collective timeout, so a hang fails the test instead of blocking it);
the workers write what they computed to files, which the test compares with a one-process run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException
from torch.utils.data import TensorDataset

from deqkit import SHINE, Broyden, Exact, Unrolled
from deqkit.models import DEQClassifier
from deqkit.train import Callback, TrainConfig, Trainer
from deqkit.train.distributed import (
    DistributedTrainer,
    launch,
    step_generator,
    world_info,
)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

LAUNCH = {"timeout_s": 240.0, "collective_timeout_s": 60.0, "threads": 1, "backend": "gloo"}
N_TRAIN, IN_DIM, WIDTH, CLASSES = 32, 6, 8, 3


def _data(dtype: torch.dtype) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N_TRAIN, IN_DIM, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorDataset(x.to(dtype), y)


def _model(dtype: torch.dtype, grad: str, tol: float) -> DEQClassifier:
    """A contractive MLP DEQ (no layer norm: every sample's solve converges to ``tol``)."""
    estimator = {
        "exact": lambda: Exact(tol=1e-10 if dtype == torch.float64 else 1e-6, max_iter=100),
        "shine": SHINE,
        "unrolled": lambda: Unrolled(k=5),
    }[grad]()
    torch.manual_seed(0)
    model = DEQClassifier.mlp(
        IN_DIM, WIDTH, CLASSES, solver=Broyden(memory=30, tol=tol, max_iter=60), grad=estimator, on_failure="ignore", norm=None
    )
    return model.to(dtype)


def _config(**kw) -> TrainConfig:
    base = {
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.1,
        "optimizer": "sgd",
        "momentum": 0.5,
        "schedule": "none",
        "seed": 3,
        "progress": False,
    }
    return TrainConfig(**{**base, **kw})


CASES = [(grad, name) for grad in ("exact", "shine", "unrolled") for name in ("float64", "float32")]


def _tol(dtype: torch.dtype) -> float:
    return 1e-11 if dtype == torch.float64 else 1e-4


def _train(out: str, grad: str, dtype_name: str, steps: int) -> None:
    dtype = getattr(torch, dtype_name)
    rank, world = world_info()
    model = _model(dtype, grad, _tol(dtype))
    config = _config(max_steps=steps, batch_size=15)
    # the ranks agree on the forward stop: their shards then iterate as the one global batch
    trainer = (
        DistributedTrainer(model, _data(dtype), None, config, sync_stop=True)
        if world > 1
        else Trainer(model, _data(dtype), None, config)
    )
    trainer.fit()
    if rank == 0:
        torch.save(model.state_dict(), out)


def _equivalence_worker(out_dir: str, steps: int) -> None:
    for grad, name in CASES:
        _train(os.path.join(out_dir, f"{grad}-{name}.pt"), grad, name, steps)


def test_ddp_steps_equal_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    """K=3 DDP steps give the parameters of one process on the whole batches: batches of 15, 15, 2
    samples (32 in all), split 8 + 7, 8 + 7, 1 + 1 over the ranks (uneven shards: the loss scaling
    must make DDP's average the mean over the batch; the agreed forward stop makes the shards one
    batch, which no sample leaves before all have converged)."""
    steps = 3
    launch(_equivalence_worker, 2, str(tmp_path), steps, **LAUNCH)
    for grad, name in CASES:
        dtype = getattr(torch, name)
        ref_model = _model(dtype, grad, _tol(dtype))
        init = {k: v.clone() for k, v in ref_model.state_dict().items()}
        Trainer(ref_model, _data(dtype), None, _config(max_steps=steps, batch_size=15)).fit()
        ddp = torch.load(tmp_path / f"{grad}-{name}.pt")
        tol = 1e-5 if dtype == torch.float64 else 1e-4
        moved = max(float((ref_model.state_dict()[k] - init[k]).abs().max()) for k in init)
        assert moved > 1e-2, "the reference did not train"
        for k, v in ref_model.state_dict().items():
            err = float((ddp[k] - v).abs().max() / v.abs().max().clamp_min(1e-12))
            assert err < tol, f"{grad} {name} {k}: relative difference {err:.2e}"


class _Record(Callback):
    """Each step's largest forward step count and the count the ranks agreed on (-1: no agreement)."""

    def __init__(self, model: DEQClassifier, steps: list, agreed: list) -> None:
        self.model, self.steps, self.agreed = model, steps, agreed

    def on_step_end(self, trainer, step):
        info = self.model.last_info
        self.steps.append(int(info.nstep.max()))
        self.agreed.append(int(info.forward.extra.get("agreed_nstep", -1)))


def _straggler_worker(out_dir: str) -> None:
    """Rank 1 solves to a far tighter tolerance than rank 0: the ranks run different iteration counts."""
    rank, _ = world_info()
    tol = 1e-2 if rank == 0 else 1e-12
    out: dict[str, list] = {}
    for sync in (False, True):
        model = _model(torch.float64, "exact", tol)
        steps: list[int] = []
        agreed: list[int] = []

        DistributedTrainer(
            model, _data(torch.float64), None, _config(max_steps=2), callbacks=[_Record(model, steps, agreed)], sync_stop=sync
        ).fit()
        out[f"sync={sync}"] = [steps, agreed]
    # a step with a quorum: all ranks stop together once half of the global batch has stopped
    model = _model(torch.float64, "exact", tol)
    model.train()
    model.deq.sync_stop, model.deq.sync_quorum = True, 0.5
    x = _data(torch.float64).tensors[0][rank * 8 : rank * 8 + 8]
    model(x)
    out["quorum"] = [int(model.last_info.nstep.max()), int(model.last_info.forward.extra["agreed_nstep"])]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


def test_ranks_with_different_iteration_counts_do_not_hang(tmp_path: Path) -> None:
    launch(_straggler_worker, 2, str(tmp_path), **LAUNCH)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # without agreement: each rank stops on its own, at very different counts
    steps0, steps1 = r0["sync=False"][0], r1["sync=False"][0]
    assert all(a + 3 < b for a, b in zip(steps0, steps1)), (steps0, steps1)
    # with agreement: both ranks report the same agreed count, the slowest rank's
    agreed0, agreed1 = r0["sync=True"][1], r1["sync=True"][1]
    assert agreed0 == agreed1, (agreed0, agreed1)
    assert agreed1 == r1["sync=True"][0], "the agreed count must be the slowest rank's own count"
    # the shards iterate as one global batch: the fast rank's samples go on to the agreed count
    assert r0["sync=True"][0] == agreed0
    # a quorum of one half: rank 0's samples (half the batch) stop early, so both ranks stop then
    assert r0["quorum"][1] == r1["quorum"][1] < r1["sync=False"][0][0]


class _Kill(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer, step):
        if step["global_step"] == self.at:
            os._exit(3)  # like SIGKILL: no checkpoint, no clean-up


def _resume_worker(run_dir: str, kill_at: int, resume: bool) -> None:
    rank, _ = world_info()
    model = _model(torch.float64, "exact", 1e-11)
    cfg = _resume_config(run_dir)
    callbacks = [_Kill(kill_at)] if kill_at > 0 else []
    DistributedTrainer(model, _data(torch.float64), None, cfg, callbacks=callbacks).fit(resume=resume)
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(run_dir, "final.pt"))


def _resume_config(run_dir: str) -> TrainConfig:
    return _config(epochs=3, batch_size=8, checkpoint_dir=run_dir, lr=0.05)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """Both ranks die (os._exit) mid-epoch 2; the 2-process resume from the epoch-1 checkpoint
    ends where an uninterrupted run ends, and so does a 1-process resume (another world size).

    The uninterrupted run is trained in this process: N processes train like one (the test above).
    """
    killed = tmp_path / "killed"
    full_model = _model(torch.float64, "exact", 1e-11)
    full = Trainer(full_model, _data(torch.float64), None, _resume_config(str(tmp_path / "full")))
    full_history = full.fit()
    want = full_model.state_dict()
    with pytest.raises((ProcessExitedException, ProcessRaisedException)):
        launch(_resume_worker, 2, str(killed), 6, False, **LAUNCH)  # 4 steps per epoch: dies in epoch 2
    ckpt = torch.load(killed / "last.pt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["world_size"] == 2
    assert not (killed / "final.pt").exists()
    one_proc = tmp_path / "one"
    shutil.copytree(killed, one_proc)
    launch(_resume_worker, 2, str(killed), 0, True, **LAUNCH)
    got = torch.load(killed / "final.pt")
    moved = max(float((want[k] - v).abs().max()) for k, v in _model(torch.float64, "exact", 1e-11).state_dict().items())
    assert moved > 1e-2, "the run did not train"
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-10), k
    # the same checkpoint resumed by a single process (another world size) reaches the same parameters
    model = _model(torch.float64, "exact", 1e-11)
    history = Trainer(model, _data(torch.float64), None, _resume_config(str(one_proc))).fit(resume=True)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for k, v in model.state_dict().items():
        assert torch.allclose(v, want[k], rtol=0, atol=1e-10), k
    assert abs(full_history[-1]["train_loss"] - history[-1]["train_loss"]) < 1e-10
    # the epoch-1 metrics of the 2-process run (summed over ranks) are the one-process run's
    assert abs(full_history[0]["train_loss"] - history[0]["train_loss"]) < 1e-10
    assert full_history[0]["train_acc"] == history[0]["train_acc"]


class _Jitter:
    """An augmentation for the tests' vectors: Gaussian noise drawn from the trainer's generator."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return x + 0.3 * torch.randn(x.shape, generator=generator, dtype=x.dtype)

    def __repr__(self) -> str:
        return "_Jitter(0.3)"


def _augmented_worker(run_dir: str, kill_at: int, resume: bool, augment: bool) -> None:
    rank, _ = world_info()
    model = _model(torch.float64, "exact", 1e-11)
    callbacks = [_Kill(kill_at)] if kill_at > 0 else []
    trainer = DistributedTrainer(
        model, _data(torch.float64), None, _resume_config(run_dir), callbacks=callbacks, augment=_Jitter() if augment else None
    )
    trainer.fit(resume=resume)
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(run_dir, "final.pt"))


def test_killed_augmented_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """With a random augmentation each rank draws its noise from (seed, step, rank): a 2-process
    run killed mid-epoch 2 and resumed augments every later step as the uninterrupted run did,
    so it ends at the same parameters; and the augmentation did change the run."""
    launch(_augmented_worker, 2, str(tmp_path / "full"), 0, False, True, **LAUNCH)
    launch(_augmented_worker, 2, str(tmp_path / "plain"), 0, False, False, **LAUNCH)
    killed = tmp_path / "killed"
    with pytest.raises((ProcessExitedException, ProcessRaisedException)):
        launch(_augmented_worker, 2, str(killed), 6, False, True, **LAUNCH)
    assert torch.load(killed / "last.pt", weights_only=True)["global_step"] == 4
    launch(_augmented_worker, 2, str(killed), 0, True, True, **LAUNCH)
    want, got = torch.load(tmp_path / "full" / "final.pt"), torch.load(killed / "final.pt")
    plain = torch.load(tmp_path / "plain" / "final.pt")
    assert max(float((want[k] - plain[k]).abs().max()) for k in want) > 1e-3, "the augmentation changed nothing"
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-10), k


def test_step_generator_is_the_same_on_every_rank_and_differs_by_step() -> None:
    a = torch.rand(4, generator=step_generator(3, 10))
    b = torch.rand(4, generator=step_generator(3, 10))
    c = torch.rand(4, generator=step_generator(3, 11))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_distributed_trainer_needs_a_process_group() -> None:
    from deqkit.errors import OptionError

    with pytest.raises(OptionError, match="not initialised"):
        DistributedTrainer(_model(torch.float32, "exact", 1e-4), _data(torch.float32), None, _config())


# -- the SIM program's rows sharded over 2 ranks ----------------------------------------------------
def _sim_states():
    from deqkit.sim import collect_states, make_mlp

    torch.manual_seed(0)
    net = make_mlp(6, [5, 4], 3).double()
    return collect_states(net, torch.rand(30, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))


def _sim_fit(admm_cls, **fit_options):
    from deqkit.sim import fit_sim

    return fit_sim(
        _sim_states(), 0.05, admm_ab=admm_cls(max_iter=5000), admm_cd=admm_cls(max_iter=5000), on_failure="ignore", **fit_options
    )


def _sharded_admm_worker(out_dir: str) -> None:
    from deqkit.sim.distributed import ShardedADMM

    rank, _ = world_info()
    out = {}
    for debias in (False, True):
        fit = _sim_fit(ShardedADMM, debias=debias)
        out[f"debias={debias}"] = {
            "params": {k: v.clone() for k, v in fit.model.state_dict().items()},
            "nstep": [fit.ab.nstep.clone(), fit.cd.nstep.clone()],
            "converged": [fit.ab.converged.clone(), fit.cd.converged.clone()],
            "objective": fit.objective,
        }
    torch.save(out, os.path.join(out_dir, f"sim-rank{rank}.pt"))


def test_sharded_admm_on_two_processes_equals_the_one_process_fit(tmp_path: Path) -> None:
    """9 + 3 rows (an odd number of (A, B) rows: uneven shards), with and without the debiasing refit."""
    from deqkit.sim import BatchedADMM

    launch(_sharded_admm_worker, 2, str(tmp_path), **LAUNCH)
    ranks = [torch.load(tmp_path / f"sim-rank{r}.pt") for r in (0, 1)]
    for debias in (False, True):
        ref = _sim_fit(BatchedADMM, debias=debias)
        assert ref.ab.nstep.numel() % 2 == 1
        for got in (r[f"debias={debias}"] for r in ranks):  # every rank holds the whole result
            assert torch.equal(got["nstep"][0], ref.ab.nstep) and torch.equal(got["nstep"][1], ref.cd.nstep)
            assert torch.equal(got["converged"][0], ref.ab.converged)
            assert abs(got["objective"] - ref.objective) <= 1e-10 * abs(ref.objective)
            for k, v in ref.model.state_dict().items():
                assert torch.allclose(got["params"][k], v, rtol=0, atol=1e-10), k


def test_sharded_admm_in_one_process_is_the_batched_admm() -> None:
    from deqkit.sim import BatchedADMM
    from deqkit.sim.distributed import ShardedADMM, row_shard

    ref, got = _sim_fit(BatchedADMM), _sim_fit(ShardedADMM)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(got.model.state_dict()[k], v)
    assert [row_shard(9, r, 2) for r in (0, 1)] == [slice(0, 5), slice(5, 9)]
    assert [row_shard(2, r, 3) for r in range(3)] == [slice(0, 1), slice(1, 2), slice(2, 2)]
