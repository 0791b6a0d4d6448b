"""Bad user input at the command line: every numeric flag of every command with out-of-range,
non-numeric and non-finite values, the ``key=value`` option strings, devices, threads and
``--out``. Expected behaviour of every case: exit status 2 and exactly one stderr line
``deqkit: error: ...`` naming the flag (never a traceback), before any work is done."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from faultkit import assert_one_error_line, cli, run_in_tmp  # noqa: F401 (an autouse fixture)

from deqkit.cli import build_parser
from deqkit.cli.options import Number


def _numeric_flags() -> list[tuple[str, str, Number]]:
    """(command, flag, type) of every flag whose type is a checked :class:`Number`."""
    flags = []
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action.type, Number):
                flags.append((command, action.option_strings[-1], action.type))
    return flags


def _bad_values(kind: Number) -> list[str]:
    """Non-numeric, non-finite and out-of-range values for a flag of type ``kind``."""
    values = ["abc", "", "nan", "inf", "-inf", "1e400"]
    if kind.kind is int:
        values += ["1.5", "2e3", "0x10"]
    if kind.low is not None:
        values.append(repr(kind.low - 1) if kind.kind is int else "-1e-300" if kind.low == 0 else repr(kind.low - 1.0))
        if kind.low_open:
            values.append(repr(kind.low))
    if kind.high is not None:
        values.append(repr(kind.high + 1))
        if kind.high_open:
            values.append(repr(kind.high))
    return [v for v in values if not _valid(kind, v)]


def _valid(kind: Number, text: str) -> bool:
    try:
        kind(text)
    except argparse.ArgumentTypeError:
        return False
    return True


FLAGS = _numeric_flags()
CASES = [(c, f, v) for c, f, t in FLAGS for v in _bad_values(t)]


def test_every_numeric_flag_is_checked():
    """The walk finds the numeric flags of all five commands (no ``type=int``/``float`` left)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    unchecked = [(c, a.option_strings[-1]) for c, p in sub.choices.items() for a in p._actions if a.type in (int, float)]
    assert unchecked == []
    assert {c for c, _, _ in FLAGS} == {"train", "compare", "sim", "hpo", "bench"}
    assert len(FLAGS) >= 30 and len(CASES) >= 250


PARSER = build_parser()


@pytest.mark.parametrize("command,flag,value", CASES, ids=[f"{c}{f}={v!r}" for c, f, v in CASES])
def test_bad_number_is_one_line(command, flag, value, capsys):
    """Through the parser ``deqkit.cli.main`` builds (one instance: fast); the first cases of each
    command also go through ``main`` itself below."""
    with pytest.raises(SystemExit) as exc:
        PARSER.parse_args([command, f"{flag}={value}"])
    line = assert_one_error_line(exc.value.code, capsys.readouterr().err, contains=flag)
    assert "expected" in line


@pytest.mark.parametrize("command", ["train", "compare", "sim", "hpo", "bench"])
def test_bad_number_through_main(command, capsys, tmp_path):
    for c, flag, value in [case for case in CASES if case[0] == command][:5]:
        rc, _, err = cli([c, f"{flag}={value}"], capsys)
        assert_one_error_line(rc, err, contains=flag)


KEY_VALUE_CASES = [
    ("train", "--solver-opts", "tol=abc"),
    ("train", "--solver-opts", "tol=inf"),
    ("train", "--solver-opts", "tol=nan"),
    ("train", "--solver-opts", "tol=-1e-4"),
    ("train", "--solver-opts", "max_iter=1.5"),
    ("train", "--solver-opts", "max_iter=-3"),
    ("train", "--solver-opts", "memory=abc"),
    ("train", "--solver-opts", "tol"),
    ("train", "--solver-opts", "tolx=1e-4"),
    ("train", "--grad-opts", "damping=abc"),
    ("train", "--grad-opts", "damping=inf"),
    ("train", "--grad-opts", "k=-1"),
    ("compare", "--solver-opts", "tol=abc"),
    ("compare", "--solver-opts", "tol=1e999"),
    ("compare", "--solver-opts", "memory=0"),
    ("compare", "--solver-opts", "opa_freq=3"),
    ("hpo", "--grad-opts", "refine=abc"),
    ("hpo", "--grad-opts", "opa_freq=nan"),
    ("hpo", "--grad-opts", "refine=-2"),
    ("hpo", "--grad-opts", "damping=1"),
]


@pytest.mark.parametrize("command,flag,text", KEY_VALUE_CASES, ids=[f"{c}{f}={t}" for c, f, t in KEY_VALUE_CASES])
def test_bad_key_value_option_is_one_line(command, flag, text, capsys, tmp_path):
    extra = ["--grad", "neumann"] if "damping" in text or "k=" in text else []
    if command == "hpo":
        extra = ["--grad", "shine-refine,shine-opa", "--outer-steps", "1"]
    rc, _, err = cli(
        [command, flag, text, *extra, "--epochs", "1"] if command != "hpo" else [command, flag, text, *extra], capsys
    )
    assert_one_error_line(rc, err)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))  # refused before any work


OTHER_CASES = {
    "cuda without CUDA": (["train", "--device", "cuda"], "CUDA"),
    "cuda:7": (["compare", "--device", "cuda:7"], "--device"),
    "not a device": (["train", "--device", "gpu0"], "--device"),
    "sim cuda": (["sim", "--device", "cuda"], "--device"),
    "threads -3": (["train", "--threads", "-3"], "--threads"),
    "threads 0": (["compare", "--threads", "0"], "--threads"),
    "sim threads 0": (["sim", "--threads", "0"], "--threads"),
    "hpo threads 0": (["hpo", "--threads", "0"], "--threads"),
    "hpo lam0 inf": (["hpo", "--lam0", "inf"], "--lam0"),
    "sim n-test 0": (["sim", "--n-test", "0"], "--n-test"),
    "sim n-test -5": (["sim", "--n-test", "-5"], "--n-test"),
    "sim lr 0": (["sim", "--lr", "0"], "--lr"),
    "unknown estimator": (["train", "--grad", "shinee"], "shine"),
    "unknown solver": (["train", "--solver", "broydn"], "broyden"),
    "resume and overwrite": (["train", "--resume", "--overwrite"], "--overwrite"),
    "hpo resume without out": (["hpo", "--resume"], "out"),
    "unknown dataset": (["train", "--dataset", "imagenet"], "imagenet"),
    "unknown flag": (["train", "--epochz", "3"], "--epochz"),
}


@pytest.mark.parametrize("name", list(OTHER_CASES))
def test_other_bad_input_is_one_line(name, capsys, tmp_path):
    argv, needle = OTHER_CASES[name]
    if name.startswith(("cuda", "sim cuda")) and torch.cuda.is_available() and name != "cuda:7":
        argv = [a if a != "cuda" else "cuda:99" for a in argv]  # a device this machine lacks, wherever it runs
    rc, _, err = cli(argv, capsys)
    assert_one_error_line(rc, err, contains=needle)
    assert not any(tmp_path.rglob("*.pt"))


def test_device_auto_works_in_every_command(capsys, tmp_path):
    """``--device auto`` is accepted by train, compare and sim (hpo and bench have no device)."""
    from deqkit.apps.common import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    rc, _, err = cli(
        [
            "compare",
            "--device",
            "auto",
            "--grad",
            "jacobian-free",
            "--epochs",
            "1",
            "--subset",
            "64",
            "--width",
            "8",
            "--out",
            "c",
            "--no-progress",
        ],
        capsys,
    )
    assert rc == 0, err
    rc, _out, err = cli(["train", "--device", "auto", "--epochs", "1", "--subset", "64", "--width", "8", "--out", "t"], capsys)
    assert rc == 0, err
    parser = build_parser()
    for command in ("train", "compare", "sim"):
        assert parser.parse_args([command, "--device", "auto"]).device == "auto"


def test_library_numbers():
    """The library side of the same checks (deqkit._options): a string or infinite tol is refused,
    a numpy integer is an integer."""
    import deqkit as dk
    from deqkit.errors import OptionError

    for bad in ("1e-4", float("inf"), float("nan"), -1.0):
        with pytest.raises(OptionError, match="tol"):
            dk.Anderson(tol=bad)
    assert dk.Anderson(max_iter=np.int64(10)).max_iter == 10
    assert dk.Broyden(memory=np.int32(5)).memory == 5
    assert math.isfinite(dk.Anderson(tol=np.float32(1e-4)).tol)
