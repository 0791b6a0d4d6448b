"""The benchmark scripts under ``tools/`` (not part of the package): they still run, on a tiny workload."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from deqkit.apps.bench.torchdeq import torchdeq_available
from deqkit.solvers import Anderson

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def train_tool(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    tool = _load("bench_torchdeq_train")
    tiny = {
        "width": 16,
        "activation": "tanh",
        "solver": lambda: Anderson(tol=1e-3, max_iter=10, stop_mode="abs"),
        "theirs": {"f_solver": "anderson", "f_max_iter": 10, "f_tol": 1e-3, "f_stop_mode": "abs"},
        "lr": 1e-2,
        "batch": 256,
        "epochs": 1,
    }
    monkeypatch.setitem(tool.WORKLOADS, "tiny", tiny)
    return tool


def test_training_runs_are_deterministic_so_repeats_differ_only_in_time(train_tool: ModuleType) -> None:
    """``--repeats`` keeps the fastest of repeated runs, which is only sound when a run's result
    does not depend on the repetition: the same seed gives the same accuracy and loss."""
    args = train_tool.argparse.Namespace(workload="tiny")
    data = train_tool.load_dataset("digits", seed=0)
    first, second = (train_tool.train_once("deqkit", 2, 0, args, data) for _ in range(2))
    assert first["test_loss"] == second["test_loss"] and first["test_acc"] == second["test_acc"]
    assert first["time_s"] > 0
    other = train_tool.train_once("deqkit", 2, 1, args, data)  # another seed: other weights and batches
    assert other["test_loss"] != first["test_loss"]


def test_the_torchdeq_comparison_prints_one_row_per_pair(train_tool: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    if not torchdeq_available():  # an optional extra (deqkit[bench]), not a dev dependency
        pytest.skip("torchdeq is not installed (pip install 'deqkit[bench]')")
    train_tool.main(["--workload", "tiny", "--seeds", "1", "--repeats", "2"])
    out = capsys.readouterr().out
    assert "not deterministic" not in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and " / " in line and "pair" not in line]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [label for label, _, _ in train_tool.PAIRS]
