"""Audit (issue 17): the trainer's resume restores every RNG stream, and its checkpoint write is atomic.

Second, independent checks next to ``tests/test_train.py``:

* RNG: the streams (torch, numpy, python) after ``load_checkpoint`` continue exactly where the
  saving run was, even when the resuming process has scrambled them; and a model that draws from
  numpy's and python's generators resumes (mid-epoch and after an epoch) to the uninterrupted run.
* atomic write: while the new checkpoint is being written the old file is complete and
  unchanged; the new file arrives by ``os.replace`` of a ``.<name>.XXXX.tmp`` in the same
  directory; a process killed (SIGKILL) in the middle of the write leaves the old checkpoint.

Library calls in one place each.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from deqkit import Anderson, Unrolled
from deqkit.data import load_dataset
from deqkit.models import DEQClassifier
from deqkit.train import CHECKPOINT_NAME, Callback, TrainConfig, Trainer


# -- the library calls, one place each -------------------------------------------------------------
def make_trainer(model, data, tmp_path, callbacks=(), **cfg):
    base = dict(epochs=2, batch_size=32, lr=3e-3, seed=5, progress=False, checkpoint_dir=str(tmp_path / "ckpt"))
    base.update(cfg)
    return Trainer(model, data.train, None, TrainConfig(**base), callbacks=list(callbacks))


def deq_model(seed=0):
    torch.manual_seed(seed)
    return DEQClassifier.mlp(64, 16, 10, solver=Anderson(tol=1e-4, max_iter=20), grad=Unrolled(3, 0.5))


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", subset=160)  # 160 train: 5 steps of 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: a second thread only adds contention


def draws():
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]


def scramble():
    torch.manual_seed(987654)
    np.random.seed(987654)
    random.seed(987654)


class Stop(Callback):
    def __init__(self, *, step=None, epoch=None):
        self.step, self.epoch = step, epoch

    def on_step_end(self, trainer, step):
        if step["global_step"] == self.step:
            raise KeyboardInterrupt

    def on_epoch_end(self, trainer, record):
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


class RecordDraws(Callback):
    """Right after the end-of-epoch checkpoint is written, record what the RNGs give next."""

    def __init__(self):
        self.after = {}

    def on_epoch_end(self, trainer, record):
        state = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        self.after[record["epoch"]] = draws()
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])


class NoisyHead(nn.Module):
    """Logit noise from numpy and python generators (not torch's): resume must restore them too."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        out = self.base(x)
        if self.training:
            noise = torch.tensor(np.random.randn(*out.shape), dtype=out.dtype) + random.gauss(0.0, 1.0)
            out = out + 0.5 * noise
        return out


# == row: RNG restore on resume ======================================================================
def test_load_checkpoint_restores_the_saved_rng_streams(data, tmp_path):
    rec = RecordDraws()
    make_trainer(deq_model(), data, tmp_path, callbacks=[rec], epochs=1).fit()
    scramble()
    scrambled = draws()
    scramble()
    trainer = make_trainer(deq_model(), data, tmp_path, epochs=1)
    trainer.load_checkpoint()
    resumed = draws()
    assert resumed == rec.after[1]
    assert resumed != scrambled


@pytest.mark.parametrize("stop", [dict(step=7), dict(epoch=1)], ids=["mid-epoch", "after-epoch"])
def test_a_model_drawing_from_numpy_and_python_resumes_to_the_uninterrupted_run(data, tmp_path, stop):
    straight = NoisyHead(deq_model())
    hist_straight = make_trainer(straight, data, tmp_path / "a").fit()
    with pytest.raises(KeyboardInterrupt):
        make_trainer(NoisyHead(deq_model()), data, tmp_path / "b", callbacks=[Stop(**stop)]).fit()
    scramble()
    resumed = NoisyHead(deq_model(seed=3))
    hist = make_trainer(resumed, data, tmp_path / "b").fit(resume=True)
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in hist_straight]
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


# == row: the checkpoint write is atomic =============================================================
def _trained(data, tmp_path):
    trainer = make_trainer(deq_model(), data, tmp_path, epochs=1)
    trainer.fit()
    path = tmp_path / "ckpt" / CHECKPOINT_NAME
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)  # a new write would differ
    return trainer, path, path.read_bytes()


def test_the_old_checkpoint_is_intact_while_the_new_one_is_written(data, tmp_path, monkeypatch):
    trainer, path, before = _trained(data, tmp_path)
    real_save = torch.save
    seen = []

    def observing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if hasattr(f, "flush"):
            f.flush()
        seen.append(path.read_bytes() == before)  # what a reader sees now, mid-write

    monkeypatch.setattr(torch, "save", observing_save)
    trainer.save_checkpoint()
    monkeypatch.undo()
    assert seen == [True]
    after = path.read_bytes()
    assert after != before
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_the_checkpoint_arrives_by_os_replace_of_a_hidden_temp_file(data, tmp_path, monkeypatch):
    trainer, path, _ = _trained(data, tmp_path)
    real_replace = os.replace
    calls = []

    def recording_replace(src, dst, *a, **k):
        calls.append((os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", recording_replace)
    trainer.save_checkpoint()
    monkeypatch.undo()
    assert len(calls) == 1
    src, dst = calls[0]
    assert os.path.samefile(dst, path)
    assert os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst))
    assert re.fullmatch(rf"\.{re.escape(CHECKPOINT_NAME)}\..+\.tmp", os.path.basename(src)), src
    assert sorted(os.listdir(path.parent)) == [CHECKPOINT_NAME]


_KILLED_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_audit_train import deq_model, make_trainer
    from deqkit.data import load_dataset
    from pathlib import Path
    data = load_dataset("digits", subset=160)
    trainer = make_trainer(deq_model(), data, Path({tmp!r}), epochs=1)
    trainer.fit()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    real_save = torch.save
    def killed_save(obj, f, *a, **k):
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        raw = buf.getvalue()
        target = f if hasattr(f, "write") else open(f, "wb")
        target.write(raw[: len(raw) // 2])
        target.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    import hashlib
    sys.stdout.write(hashlib.sha256(Path({tmp!r}, "ckpt", "last.pt").read_bytes()).hexdigest() + "\\n")
    sys.stdout.flush()
    torch.save = killed_save
    trainer.save_checkpoint()
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_process_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    code = _KILLED_MID_WRITE.format(tests=os.path.dirname(__file__), tmp=str(tmp_path))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    path = tmp_path / "ckpt" / CHECKPOINT_NAME
    assert hashlib.sha256(path.read_bytes()).hexdigest() == proc.stdout.strip()
    ckpt = torch.load(path, weights_only=True)  # complete and loadable
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 5
    leftovers = [n for n in os.listdir(path.parent) if n != CHECKPOINT_NAME]
    assert all(re.fullmatch(rf"\.{re.escape(CHECKPOINT_NAME)}\..+\.tmp", n) for n in leftovers), leftovers
