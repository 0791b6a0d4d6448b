"""Audit (issue 17): a missing optional dependency fails a ``DEQKIT_REQUIRE_ALL=1`` run instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import conftest
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def _run(tmp_path, body, flag):
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "DEQKIT_REQUIRE_ALL")}
    env["PYTHONPATH"] = os.pathsep.join([TESTS, os.path.dirname(TESTS), env.get("PYTHONPATH", "")])
    if flag is not None:
        env["DEQKIT_REQUIRE_ALL"] = flag
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", "-rs", "test_probe.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


IN_TEST = """
    import pytest
    def test_needs_it():
        pytest.importorskip("deqkit_no_such_package")
"""
AT_IMPORT = """
    import pytest
    pytest.importorskip("deqkit_no_such_package")
    def test_needs_it():
        pass
"""


@pytest.mark.parametrize("body", [IN_TEST, AT_IMPORT], ids=["in-test", "module-level"])
def test_importorskip_fails_when_all_are_required(tmp_path, body):
    proc = _run(tmp_path, body, "1")
    assert proc.returncode != 0, proc.stdout
    assert "DEQKIT_REQUIRE_ALL" in proc.stdout and "deqkit_no_such_package" in proc.stdout


@pytest.mark.parametrize("flag", [None])
def test_importorskip_skips_with_its_reason_otherwise(tmp_path, flag):
    proc = _run(tmp_path, IN_TEST, flag)
    assert proc.returncode == 0, proc.stdout
    assert "1 skipped" in proc.stdout and "could not import 'deqkit_no_such_package'" in proc.stdout


def test_the_required_list_and_the_switch(monkeypatch):
    assert {"cvxpy", "mlxtend", "mnist1d", "sklearn", "scipy", "hypothesis"} <= set(conftest.REQUIRED_OPTIONAL)
    monkeypatch.setattr(conftest, "REQUIRED_OPTIONAL", ("sys", "deqkit_no_such_package"))
    assert conftest.missing_optional() == ["deqkit_no_such_package"]
    monkeypatch.delenv("MAKELEVEL", raising=False)
    for value, expected in [("1", True), ("0", False), ("", False)]:
        monkeypatch.setenv("DEQKIT_REQUIRE_ALL", value)
        assert conftest.require_all_optional() is expected
    monkeypatch.delenv("DEQKIT_REQUIRE_ALL")
    monkeypatch.setenv("MAKELEVEL", "1")  # `make test` installs the [dev] extras
    assert conftest.require_all_optional() is True
