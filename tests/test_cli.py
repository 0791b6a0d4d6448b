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
    rc = main(
        ["compare", "--subset", "200", "--epochs", "1", "--grad", "exact,unrolled,shine-opa", "--out", str(out), "--no-progress"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "cos to exact" in printed and "Unrolled(5, 0.5)" in printed
    payload = json.loads((out / "results.json").read_text())
    rows = {r["estimator"]: r for r in payload["results"]}
    assert set(rows) == {"exact", "unrolled", "shine-opa"}
    assert payload["config"]["jac_reg"] == "auto" and payload["config"]["jac_reg_weight"] == 0.0  # MLP: auto is off
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
    args = [
        "train",
        "--subset",
        "150",
        "--epochs",
        "1",
        "--grad",
        "unrolled",
        "--grad-opts",
        "k=3,damping=0.5",
        "--out",
        str(out),
        "--no-progress",
    ]
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
        (["train", "--augment", "flip"], "needs image-shaped inputs"),  # the MLP's flat inputs
    ],
)
def test_bad_options_give_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["train", "--epoch", "3"], ["sim", "--lam-sc", "paper"], ["compare", "--subs", "9"]])
def test_abbreviated_flags_are_usage_errors(argv, capsys):
    """``--epoch 3`` is not taken for ``--epochs 3``: a flag added later cannot change an old command."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"unrecognized arguments: {' '.join(argv[1:])}" in capsys.readouterr().err


def test_train_says_how_it_augments(tmp_path, capsys):
    argv = ["train", "--model", "conv", "--width", "8", "--subset", "64", "--epochs", "1", "--no-progress"]
    assert main([*argv, "--augment", "flip+shift", "--out", str(tmp_path / "a")]) == 0
    assert "training images augmented: ImageAugment(flip=True, shift=2) (--augment flip+shift)" in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0  # default: none
    assert "augmented" not in capsys.readouterr().out


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


# -- one vocabulary --------------------------------------------------------------------------------

import argparse  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from deqkit.cli import build_parser  # noqa: E402
from deqkit.cli.options import HelpFormatter, parse_options  # noqa: E402
from deqkit.errors import OptionError  # noqa: E402

COMMANDS = ("compare", "train", "sim", "hpo", "bench")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_registered():
    assert tuple(_subparsers()) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_help_groups_the_options_and_shows_every_default(command, capsys):
    parser = _subparsers()[command]
    groups = [g for g in parser._action_groups if g.title not in ("options", "positional arguments")]
    assert len(groups) >= 2, f"{command}: options are not grouped"
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for group in groups:
        assert f"\n{group.title}:\n" in text
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    formatter = HelpFormatter(command)
    for action in options:
        assert "(default: %(default)s)" in formatter._get_help_string(action), action.option_strings
    assert text.count("(default:") == len(options)


def test_one_flag_per_idea():
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in _subparsers().items()}
    for name in ("compare", "train", "hpo"):
        assert "--grad" in flags[name], name  # the gradient estimator(s), everywhere
    for old in ("--estimators", "--hypergrad", "--quiet"):
        assert not any(old in f for f in flags.values()), old
    assert "--solver" in flags["train"] and "--solver" not in flags["sim"] and "--fit-solver" in flags["sim"]
    for name in ("compare", "train", "sim", "hpo"):
        assert {"--out", "--seed", "--no-progress", "--dataset", "--threads"} <= flags[name], name
    assert "--solver-opts" in flags["train"] and "--solver-opts" in flags["compare"]
    assert "--grad-opts" in flags["train"] and "--grad-opts" in flags["hpo"]


@pytest.mark.parametrize("command", ["train", "hpo"])
@pytest.mark.parametrize("value", ["abc", "inf", "nan", "-inf"])
def test_a_bad_number_is_one_error_line_and_exit_2(command, value, capsys):
    assert main([command, "--grad-opts", f"tol={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deqkit: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "--grad-opts: tol must be a finite number" in err


def test_the_command_line_gives_one_line_and_exit_2():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for value in ("abc", "inf"):
        proc = subprocess.run(
            [sys.executable, "-m", "deqkit", "train", "--grad-opts", f"tol={value}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 2
        assert proc.stderr.startswith("deqkit: error: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_parse_options_numbers_words_and_errors():
    from deqkit import Unrolled

    assert parse_options("k=3, damping=0.5", "--grad-opts", Unrolled) == {"k": 3, "damping": 0.5}
    assert parse_options("stop-mode=abs,line_search=true,opa_freq=none", "--solver-opts") == {
        "stop_mode": "abs",
        "line_search": True,
        "opa_freq": None,
    }
    assert parse_options("", "--grad-opts") == {}
    for text, message in [
        ("tol=abc", "tol must be a finite number"),
        ("tol=inf", "tol must be a finite number"),
        ("max_iter=2.5", "max_iter must be an integer"),
        ("damping=nan", "damping must be a finite number"),
        ("k=x", "k must be an integer"),
        ("k", "key=value"),
        ("=3", "key=value"),
    ]:
        with pytest.raises(OptionError, match=message):
            parse_options(text, "--grad-opts", Unrolled)


def test_compare_solver_opts_reach_the_forward_solver():
    from deqkit.cli.compare import solver_options

    assert solver_options("memory=20,tol=1e-5") == {"memory": 20, "tol": 1e-5}
    with pytest.raises(OptionError, match="Did you mean 'max_iter'"):
        solver_options("max_iters=3")
