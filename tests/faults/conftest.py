"""Fixtures of the fault-injection suite (the helpers are in ``faultkit.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh directory (commands default to ``runs/...`` relative paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
