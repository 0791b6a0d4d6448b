"""Helpers and the ``in_tmp`` fixture of the fault-injection suite: run ``deqkit`` in-process (fast: no interpreter start)
or as a child process (to kill it), and read what a run left in its output directory.

Cases that need many child processes are marked ``faults_full``: the default suite runs one
seeded kill point per command and signal; ``DEQKIT_FAULT_SEEDS=N`` runs N seeded points each
(see RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def cli(argv: Sequence[str], capsys: Any) -> tuple[int, str, str]:
    """``deqkit argv`` in this process: (exit status, stdout, stderr). Usage errors (argparse's
    ``SystemExit``) count as their status."""
    from deqkit.cli import main

    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc: int, err: str, status: int = 2, contains: str | None = None, only: bool = True) -> str:
    """The command failed with ``status`` and one stderr line ``deqkit: error: ...``, the last
    (no traceback); with ``only`` it is the only line (otherwise earlier progress or warning
    lines of the work done before the failure are allowed). Returns that line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == status, (rc, err)
    if not only:
        lines = lines[-1:] if sum(ln.startswith("deqkit: error: ") for ln in lines) == 1 else lines
    assert len(lines) == 1 and lines[0].startswith("deqkit: error: "), err
    assert "Traceback" not in err and "weights_only=False" not in err
    if contains is not None:
        assert contains in lines[0], lines[0]
    return lines[0]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(argv: Sequence[str], cwd: Path) -> subprocess.Popen:
    """``python -m deqkit argv`` as a child process (its own session, pipes for the output)."""
    return subprocess.Popen(
        [sys.executable, "-m", "deqkit", *argv],
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_at(proc: subprocess.Popen, trigger: Path, delay_s: float, sig: int, timeout_s: float = 240.0) -> bool:
    """Send ``sig`` to ``proc`` ``delay_s`` after ``trigger`` first exists (a file the run writes
    once it has done some work). Returns whether the signal landed while the run was still
    working (``False``: it had already finished)."""
    t0 = time.monotonic()
    while not trigger.exists():
        if proc.poll() is not None:
            return False
        if time.monotonic() - t0 > timeout_s:
            proc.kill()
            raise AssertionError(f"{trigger} never appeared")
        time.sleep(0.01)
    time.sleep(delay_s)
    if proc.poll() is not None:
        return False
    proc.send_signal(sig)
    return True


def finish(proc: subprocess.Popen, timeout_s: float = 240.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out, err


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def history_without_times(history: list[dict]) -> list[dict]:
    """Epoch records without wall-clock fields (they differ between any two runs)."""
    timed = ("_s", "_ms")
    return [{k: v for k, v in h.items() if not k.endswith(timed)} for h in history]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def fault_seeds() -> list[int]:
    """The seeds of the kill points: 1 by default, ``DEQKIT_FAULT_SEEDS`` to try more."""
    return list(range(int(os.environ.get("DEQKIT_FAULT_SEEDS", "1"))))


SIGNALS = {"kill-9": signal.SIGKILL, "sigterm": signal.SIGTERM}


@pytest.fixture(autouse=True)
def run_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every case runs in its own ``tmp_path`` (commands default to ``runs/...`` relative paths).
    Test modules import this autouse fixture (a ``conftest.py`` here would shadow
    ``tests/conftest.py`` for the ``from conftest import`` of other test modules)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
