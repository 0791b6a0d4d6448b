"""Disk full while writing (simulated: the write of one output raises ``OSError(ENOSPC)`` after
some bytes). Expected behaviour of every case: the file being replaced is intact (the old
version, readable), no temporary file is left, the command exits with status 1 and one line
``deqkit: error: could not write <file>: No space left on device; the previous file is
unchanged.``; a later run (``--resume``) finishes with the result of an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from faultkit import (  # noqa: F401 (an autouse fixture)
    assert_one_error_line,
    cli,
    history_without_times,
    model_state,
    run_in_tmp,
)

import deqkit._io as dio


class _Full:
    """A file object that accepts ``budget`` bytes, then raises ENOSPC (part of the last
    write landed, as on a real full disk)."""

    def __init__(self, fh, budget: int) -> None:
        self._fh, self._left = fh, budget

    def write(self, data):
        if len(data) > self._left:
            self._fh.write(data[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._fh.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._fh, name)


@pytest.fixture
def disk_full(monkeypatch):
    """``arm(name, budget, after=k)``: the (k+1)-th atomic write of a file called ``name`` fails."""
    state = {"name": None, "budget": 0, "skip": 0, "fired": 0}
    real_mk, real_fdopen = dio._mkstemp_umask, os.fdopen
    doomed: set[int] = set()

    def mk(directory, name):
        fd, tmp = real_mk(directory, name)
        if name == state["name"]:
            if state["skip"] == 0:
                doomed.add(fd)
            state["skip"] -= 1
        return fd, tmp

    def fdopen(fd, *a, **k):
        fh = real_fdopen(fd, *a, **k)
        if fd in doomed:
            doomed.discard(fd)
            state["fired"] += 1
            return _Full(fh, state["budget"])
        return fh

    monkeypatch.setattr(dio, "_mkstemp_umask", mk)
    monkeypatch.setattr(os, "fdopen", fdopen)

    def arm(name: str, budget: int = 100, after: int = 0) -> dict:
        state.update(name=name, budget=budget, skip=after, fired=0)
        return state

    return arm


TRAIN = ["train", "--epochs", "3", "--subset", "96", "--width", "8", "--batch-size", "32", "--no-progress"]


def _no_tmp(root: Path) -> bool:
    return not [p for p in root.rglob("*.tmp")]


def test_checkpoint_write_fails_then_resume(disk_full, capsys, tmp_path):
    rc, _, err = cli([*TRAIN, "--out", "ref"], capsys)
    assert rc == 0, err
    state = disk_full("last.pt", budget=2000, after=1)  # the second epoch's checkpoint
    rc, _, err = cli([*TRAIN, "--out", "o"], capsys)
    assert state["fired"] == 1
    assert_one_error_line(rc, err, status=1, contains="could not write")
    assert "No space left on device" in err and "previous file is unchanged" in err
    ckpt = torch.load(tmp_path / "o" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and _no_tmp(tmp_path)  # the epoch-1 checkpoint, whole
    disk_full("nothing")
    rc, _, err = cli([*TRAIN, "--out", "o", "--resume"], capsys)
    assert rc == 0, err
    a, b = model_state(tmp_path / "ref" / "last.pt"), model_state(tmp_path / "o" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("ref", "o")]
    assert history_without_times(logs[0]) == history_without_times(logs[1])


def test_metrics_log_write_fails(disk_full, capsys, tmp_path):
    rc, _, err = cli([*TRAIN, "--epochs", "1", "--out", "o"], capsys)
    assert rc == 0
    log = (tmp_path / "o" / "metrics.jsonl").read_bytes()
    disk_full("metrics.jsonl", budget=10)
    rc, _, err = cli([*TRAIN, "--epochs", "1", "--out", "o", "--resume"], capsys)
    assert_one_error_line(rc, err, status=1, contains="metrics.jsonl")
    assert (tmp_path / "o" / "metrics.jsonl").read_bytes() == log and _no_tmp(tmp_path)


def test_compare_results_write_fails(disk_full, capsys, tmp_path):
    argv = [
        "compare",
        "--epochs",
        "1",
        "--subset",
        "64",
        "--width",
        "8",
        "--grad",
        "jacobian-free",
        "--no-progress",
        "--out",
        "o",
    ]
    rc, _, err = cli(argv, capsys)
    assert rc == 0
    old = (tmp_path / "o" / "results.json").read_bytes()
    disk_full("results.json", budget=500)
    rc, _, err = cli([*argv, "--resume"], capsys)
    assert_one_error_line(rc, err, status=1, contains="results.json")
    assert (tmp_path / "o" / "results.json").read_bytes() == old and _no_tmp(tmp_path)


def test_hpo_results_write_fails(disk_full, capsys, tmp_path):
    argv = ["hpo", "--grad", "exact,shine", "--outer-steps", "2", "--no-progress", "--out", "o"]
    state = disk_full("hpo_breast_cancer.json", budget=300, after=1)  # after the first estimator's write
    rc, _, err = cli(argv, capsys)
    assert state["fired"] == 1
    assert_one_error_line(rc, err, status=1, contains="hpo_breast_cancer.json")
    kept = json.loads((tmp_path / "o" / "hpo_breast_cancer.json").read_text())
    assert list(kept["estimators"]) == ["exact"] and kept["complete"] is False and _no_tmp(tmp_path)


def test_sim_results_write_fails(disk_full, capsys, tmp_path):
    argv = [
        "sim",
        "--hidden",
        "8",
        "--samples",
        "100",
        "--lam",
        "0.3,1",
        "--epochs",
        "1",
        "--n-test",
        "50",
        "--n-attack",
        "0",
        "--no-plot",
        "--max-iter-ab",
        "50",
        "--max-iter-cd",
        "50",
        "--out",
        "o",
    ]
    state = disk_full("sim_results.json", budget=300, after=1)  # the second λ's write
    rc, _, err = cli(argv, capsys)
    assert state["fired"] == 1
    assert_one_error_line(rc, err, status=1, contains="sim_results.json", only=False)  # after ADMM warnings
    kept = json.loads((tmp_path / "o" / "sim_results.json").read_text())
    assert [r["lam"] for r in kept["sim"]] == [0.3] and _no_tmp(tmp_path)
