"""The small reliability items: file modes, what ``train`` prints without a terminal, ``--help``
defaults, the resume false alarm, the metrics log after a crash, the Makefile's torch install,
the interrupt messages."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from faultkit import cli, run_in_tmp  # noqa: F401 (an autouse fixture)

from deqkit._io import atomic_write_text
from deqkit.cli import build_parser
from deqkit.cli.dispatch import interrupt_message

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["train", "--epochs", "2", "--subset", "64", "--width", "8"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_umask_mode(umask, tmp_path):
    """Expected: a new output file has mode 0o666 & ~umask (as ``open`` gives), not 0600."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_train_says_where_it_wrote_without_a_terminal(capsys, tmp_path):
    """Expected: without a terminal, one line per epoch (with the solves' stability) and the paths written, on stdout."""
    rc, out, err = cli([*TRAIN, "--out", "o"], capsys)
    assert rc == 0
    assert "wrote o/last.pt and o/metrics.jsonl" in out
    assert "epoch 1/2" in out and "epoch 2/2" in out and "fwd converged" in out


def test_help_shows_every_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for command, p in sub.choices.items():
        formatter = p._get_formatter()
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            text = formatter._get_help_string(action)
            if "(default: " not in text and "%(default)" not in text:
                missing.append((command, action.option_strings[-1]))
    assert missing == []
    help_text = " ".join(sub.choices["train"].format_help().split())
    for shown in (
        "training epochs (default: 10)",
        "samples per step (default: 64)",
        "(default: 0.002)",
        "(default: broyden)",
        "(default: exact)",
        "random seed (default: 0)",
        "(default: cpu)",
    ):
        assert shown in help_text, shown


@pytest.mark.parametrize("grad", ["exact", "exact-warm"])
def test_resume_of_exact_family_does_not_warn(grad, capsys, tmp_path):
    """Expected: resuming with unchanged settings raises no "changed settings" warning."""
    rc, _, err = cli([*TRAIN, "--grad", grad, "--out", "o", "--epochs", "1"], capsys)
    assert rc == 0, err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, err = cli([*TRAIN, "--grad", grad, "--out", "o", "--epochs", "1", "--resume"], capsys)
    assert rc == 0, err
    assert not [w for w in caught if "changed settings" in str(w.message)], [str(w.message) for w in caught]


def test_resume_still_warns_on_a_real_change(capsys, tmp_path):
    _rc, _, _ = cli([*TRAIN, "--grad", "exact", "--out", "o", "--epochs", "1"], capsys)
    with pytest.warns(UserWarning, match="changed settings"):
        cli([*TRAIN, "--grad", "jacobian-free", "--out", "o", "--epochs", "1", "--resume"], capsys)


def test_metrics_log_mirrors_the_checkpoint_after_a_crash(capsys, tmp_path):
    """Expected: a line half-written by a crash (or an extra one) is gone after --resume; the log
    holds each epoch once."""
    rc, _, _ = cli([*TRAIN, "--out", "o"], capsys)
    log = tmp_path / "o" / "metrics.jsonl"
    clean = log.read_text()
    with open(log, "a") as fh:
        fh.write('{"epoch": 3, "train_lo')
    rc, _, err = cli([*TRAIN, "--out", "o", "--resume"], capsys)
    assert rc == 0, err
    assert log.read_text() == clean and [json.loads(x)["epoch"] for x in clean.splitlines()] == [1, 2]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_torch_install_routes(tmp_path):
    """Expected: the plain install is pip's default index; TORCH_INDEX_URL goes to --index-url
    (for the CPU-only build); no host name is hard-coded."""

    def dry(*extra):
        res = subprocess.run(
            ["make", "-n", "-C", str(ROOT), "install", f"VENV={tmp_path}/v", *extra],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return next(ln for ln in res.stdout.splitlines() if "torch==" in ln)

    assert "--index-url" not in dry()
    assert dry("TORCH_INDEX_URL=file:///wheels/cpu").endswith("--index-url file:///wheels/cpu")
    text = (ROOT / "Makefile").read_text()
    assert "pytorch.org/whl" not in text and "CPU" in text


def test_interrupt_messages_are_true():
    ns = argparse.Namespace
    assert "nothing was saved" in interrupt_message(ns(command="hpo", out=None), False)
    msg = interrupt_message(ns(command="hpo", out="h"), True)
    assert msg.startswith("deqkit: terminated (SIGTERM)") and "--resume" in msg
    assert "--resume" in interrupt_message(ns(command="train", out="runs/train"), False)
    assert build_parser().parse_args(["hpo", "--out", "h", "--resume"]).resume  # the flag it names exists


def test_sim_samples_beyond_the_training_split_are_refused(capsys):
    """Expected (item 11): ``--samples`` larger than the training split is one error line, not a silent
    clamp recorded as the number asked for."""
    from faultkit import assert_one_error_line

    rc, _, err = cli(["sim", "--samples", "100000", "--hidden", "8", "--epochs", "1", "--lam", "1", "--out", "s"], capsys)
    assert_one_error_line(rc, err, contains="--samples 100000", only=False)
    assert "training split has only" in err
