"""Smoke tests of the `deqkit` command line on tiny settings (the full demo is `make demo`)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from deqkit.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_compare_writes_table_json_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--subset", "200", "--epochs", "1", "--grad", "exact,unrolled,shine-opa", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "cos to exact" in printed and "Unrolled(5, 0.5)" in printed
    payload = json.loads((out / "results.json").read_text())
    rows = {r["estimator"]: r for r in payload["results"]}
    assert set(rows) == {"exact", "unrolled", "shine-opa"}
    assert rows["exact"]["cosine"] == pytest.approx(1.0, abs=1e-3)  # Exact against a tighter Exact
    for r in rows.values():
        assert 0.0 <= r["test_acc"] <= 1.0 and math.isfinite(r["bwd_ms"]) and -1 <= r["cosine"] <= 1
        assert r["history"] and r["residual_curve"]
    with open(out / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert (out / "compare.png").stat().st_size > 1000
    assert not list(out.glob(".*.tmp"))


def test_train_then_resume(tmp_path, capsys):
    out = tmp_path / "t"
    args = ["train", "--subset", "150", "--epochs", "1", "--grad", "unrolled", "--grad-opts", "k=3,damping=0.5", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert (out / "last.pt").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert main(args[:4] + ["2"] + args[5:] + ["--resume"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines][-1] == 2
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--grad", "shin"], "Did you mean 'shine'"),
        (["train", "--solver-opts", "tolerance=1e-3"], "Did you mean 'tol'"),
        (["train", "--solver", "anderson", "--grad", "shine"], "Broyden"),
        (["train", "--grad", "unrolled", "--grad-opts", "k=abc"], "k must be an integer"),
        (["compare", "--solver-opts", "tolerance=1e-3"], "Did you mean 'tol'"),
    ],
)
def test_bad_options_give_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_data_gives_one_clear_line(tmp_path, capsys):
    assert main(["sim", "--dataset", "mnist", "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "IDX files were not found" in err and "--data-dir" in err and "Traceback" not in err


def test_compare_resume_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--subset", "150", "--epochs", "1", "--grad", "unrolled", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())["results"][0]
    assert first["bwd_speedup"] is None  # no exact run to compare with: no number, no nan
    assert "nan" not in capsys.readouterr().out
    assert main(argv + ["--resume"]) == 0
    again = json.loads((out / "results.json").read_text())["results"][0]
    # nothing retrained: the same weights give the same test accuracy and the same recorded training time
    assert again["test_acc"] == first["test_acc"]
    assert again["train_time_s"] == first["train_time_s"]
