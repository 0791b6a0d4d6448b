"""Corrupt files of every kind the project reads: training checkpoints (``train``/``compare``
``--resume``), the sim results file (``sim --resume``), the hpo results file (``hpo --resume``),
the sim baseline state_dict (``--baseline``) and the IDX data files (``--data-dir``).

Expected behaviour of every case: exit status 2, one line ``deqkit: error: ...`` naming the file
and what to do (never advising ``weights_only=False``), and the file left as it was."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from faultkit import assert_one_error_line, cli, run_in_tmp  # noqa: F401 (an autouse fixture)

from deqkit._idx import write_idx

TRAIN = ["--epochs", "1", "--subset", "64", "--width", "8", "--no-progress"]


def _valid_torch_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(50)}, "format": 1}, buf)
    return buf.getvalue()


def _pickled_object() -> bytes:
    import pickle

    return pickle.dumps(os.path.join)  # a function reference: refused by the weights-only unpickler


CORRUPTIONS = {
    "random bytes": lambda: np.random.default_rng(0).bytes(4096),
    "empty": lambda: b"",
    "truncated torch file": lambda: _valid_torch_bytes()[:300],
    "torch file with a flipped byte run": lambda: _valid_torch_bytes()[:200] + b"\xff" * 64 + _valid_torch_bytes()[264:],
    "JSON text": lambda: b'{"model": 1}',
    "pickled object": _pickled_object,
    "a valid torch file of another kind": lambda: _valid_torch_bytes(),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
@pytest.mark.parametrize("command", ["train", "compare"])
def test_corrupt_checkpoint(command, kind, capsys, tmp_path):
    extra = ["--grad", "jacobian-free"] if command == "compare" else []
    ckpt = tmp_path / "r" / ("checkpoints/jacobian-free/last.pt" if command == "compare" else "last.pt")
    ckpt.parent.mkdir(parents=True)
    data = CORRUPTIONS[kind]()
    ckpt.write_bytes(data)
    rc, _, err = cli([command, *TRAIN, *extra, "--out", "r", "--resume"], capsys)
    line = assert_one_error_line(rc, err, contains=str(ckpt.relative_to(tmp_path)))
    assert "delete it" in line
    assert ckpt.read_bytes() == data


JSON_CORRUPTIONS = {
    "random bytes": lambda: np.random.default_rng(1).bytes(512),
    "empty": lambda: b"",
    "truncated": lambda: b'{"dataset": "digits", "sim": [{"lam": 0.1',
    "not an object": lambda: b"[1, 2, 3]",
    "another file's JSON": lambda: b'{"config": {}, "results": []}',
}


@pytest.mark.parametrize("kind", list(JSON_CORRUPTIONS))
def test_corrupt_sim_results(kind, capsys, tmp_path):
    path = tmp_path / "s" / "sim_results.json"
    path.parent.mkdir()
    data = JSON_CORRUPTIONS[kind]()
    path.write_bytes(data)
    rc, _, err = cli(["sim", "--out", "s", "--resume", "--hidden", "8", "--lam", "1"], capsys)
    assert_one_error_line(rc, err, contains="sim_results.json")
    assert path.read_bytes() == data


@pytest.mark.parametrize("kind", list(JSON_CORRUPTIONS))
def test_corrupt_hpo_results(kind, capsys, tmp_path):
    path = tmp_path / "h" / "hpo_breast_cancer.json"
    path.parent.mkdir()
    data = JSON_CORRUPTIONS[kind]()
    path.write_bytes(data)
    rc, _, err = cli(["hpo", "--out", "h", "--resume", "--grad", "exact", "--outer-steps", "1", "--no-progress"], capsys)
    assert_one_error_line(rc, err, contains="hpo_breast_cancer.json")
    assert path.read_bytes() == data


BASELINES = {
    **{k: v for k, v in CORRUPTIONS.items() if k != "a valid torch file of another kind"},
    "an MLP of other widths": lambda: _mlp_bytes([16, 8]),
    "a state_dict without weight matrices": lambda: _state_bytes({"x": torch.ones(3)}),
}


def _state_bytes(state) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _mlp_bytes(hidden) -> bytes:
    from deqkit.sim.baseline import make_mlp

    return _state_bytes(make_mlp(64, hidden, 10).state_dict())


@pytest.mark.parametrize("kind", list(BASELINES))
def test_bad_sim_baseline(kind, capsys, tmp_path):
    path = tmp_path / "base.pt"
    data = BASELINES[kind]()
    path.write_bytes(data)
    rc, _, err = cli(["sim", "--baseline", "base.pt", "--hidden", "8,4", "--lam", "1", "--out", "s"], capsys)
    assert_one_error_line(rc, err, contains="base.pt")
    assert path.read_bytes() == data and not (tmp_path / "s").exists()


def _idx_dir(root: Path) -> Path:
    d = root / "idx"
    d.mkdir()
    rng = np.random.default_rng(0)
    write_idx(d / "train-images-idx3-ubyte", rng.integers(0, 255, (60, 28, 28), dtype=np.uint8))
    write_idx(d / "train-labels-idx1-ubyte", (np.arange(60) % 10).astype(np.uint8))
    write_idx(d / "t10k-images-idx3-ubyte", rng.integers(0, 255, (20, 28, 28), dtype=np.uint8))
    write_idx(d / "t10k-labels-idx1-ubyte", (np.arange(20) % 10).astype(np.uint8))
    return d


IDX_CORRUPTIONS = {
    "random bytes": lambda b: np.random.default_rng(2).bytes(len(b)),
    "empty": lambda b: b"",
    "truncated": lambda b: b[: len(b) // 2],
    "header only": lambda b: b[:16],
    "bad magic": lambda b: b"\x01\x02" + b[2:],
}


@pytest.mark.parametrize("kind", list(IDX_CORRUPTIONS))
def test_corrupt_idx_file(kind, capsys, tmp_path):
    d = _idx_dir(tmp_path)
    target = d / "train-images-idx3-ubyte"
    target.write_bytes(IDX_CORRUPTIONS[kind](target.read_bytes()))
    rc, _, err = cli(["train", "--dataset", "mnist", "--data-dir", str(d), *TRAIN, "--out", "r"], capsys)
    assert_one_error_line(rc, err)
    assert "train-images" in err or "idx" in err.lower()
