"""The README's quick-start example runs as written, and the README keeps exactly two set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "cosine" in out


def test_sim_example_runs(capsys):
    import pytest

    pytest.importorskip("sklearn")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README has no SIM example"
    exec(compile(blocks[1], "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "SIM: accuracy" in out and "‖A‖∞ = 0." in out


def test_two_setup_commands_and_ci_calls_the_test_one():
    text = README.read_text()
    setup = text.split("## Set-up", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make (\w+)", setup, flags=re.M)
    assert commands == ["demo", "test"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
