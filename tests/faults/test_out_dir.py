"""The output-directory policy of train, compare, sim and hpo: an --out holding an earlier run is
refused (one line) unless --resume or --overwrite; --overwrite leaves one clean run; an invalid or
unwritable --out is refused before any work."""

from __future__ import annotations

import json
import time

import pytest
from faultkit import assert_one_error_line, cli, run_in_tmp  # noqa: F401 (an autouse fixture)

SMALL = {
    "train": ["train", "--epochs", "1", "--subset", "64", "--width", "8", "--no-progress"],
    "compare": ["compare", "--epochs", "1", "--subset", "64", "--width", "8", "--grad", "jacobian-free", "--no-progress"],
    "sim": [
        "sim",
        "--hidden",
        "8",
        "--samples",
        "100",
        "--lam",
        "1",
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
    ],
    "hpo": ["hpo", "--grad", "exact", "--outer-steps", "2", "--no-progress"],
}


@pytest.mark.parametrize("command", list(SMALL))
def test_non_empty_out_is_refused(command, capsys, tmp_path):
    """Expected: the second run into the same --out is refused in one line, the first run's
    files unchanged."""
    rc, _, err = cli([*SMALL[command], "--out", "o"], capsys)
    assert rc == 0, err
    before = {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    rc, _, err = cli([*SMALL[command], "--out", "o"], capsys)
    assert_one_error_line(rc, err, contains="--resume")
    assert {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("command", ["train", "compare"])
def test_overwrite_leaves_one_clean_run(command, capsys, tmp_path):
    """Expected (the ``make demo`` case): --overwrite twice in a row leaves one run, every
    metrics log holding each epoch once; files deqkit did not write are kept."""
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    for _ in range(2):
        rc, _, err = cli([*SMALL[command], "--epochs", "2", "--out", "o", "--overwrite"], capsys)
        assert rc == 0, err
    logs = list((tmp_path / "o").glob("metrics*.jsonl"))
    assert logs
    for log in logs:
        assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


def test_makefile_demo_overwrites():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    demo = text.split("\ndemo:")[1].split("\n\n")[0]
    assert "--overwrite" in demo


@pytest.mark.parametrize("command", list(SMALL))
@pytest.mark.parametrize("case", ["existing file", "below a file"])
def test_invalid_out_refused_before_work(command, case, capsys, tmp_path):
    """Expected: one line naming --out, at once (no epoch trained first)."""
    (tmp_path / "f").write_text("x")
    out = "f" if case == "existing file" else "f/sub"
    t0 = time.perf_counter()
    rc, _, err = cli([*SMALL[command], "--out", out], capsys)
    assert_one_error_line(rc, err, contains="--out")
    assert (tmp_path / "f").read_text() == "x"
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.json"))
    assert time.perf_counter() - t0 < 60  # a refusal, not a run (generous: a busy machine)


def test_unwritable_out_refused_before_work(capsys, tmp_path, monkeypatch):
    """Expected: a directory where no file can be created is refused in one line before any
    work (simulated: running as root ignores permission bits)."""
    import builtins

    real_open = builtins.open

    def deny(file, mode="r", *a, **k):
        if "w" in str(mode) and ".deqkit-probe" in str(file):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    rc, _, err = cli([*SMALL["train"], "--out", "ro"], capsys)
    assert_one_error_line(rc, err, contains="not a writable directory")
    assert not list(tmp_path.rglob("*.pt"))


def test_resume_of_a_finished_run_does_not_retrain(capsys, tmp_path):
    rc, _, err = cli([*SMALL["train"], "--out", "o"], capsys)
    assert rc == 0, err
    ckpt = (tmp_path / "o" / "last.pt").read_bytes()
    rc, out, _err = cli([*SMALL["train"], "--out", "o", "--resume"], capsys)
    assert rc == 0 and "wrote" in out
    assert [json.loads(x)["epoch"] for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (tmp_path / "o" / "last.pt").read_bytes() == ckpt
