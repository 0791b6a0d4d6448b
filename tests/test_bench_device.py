"""``deqkit bench --device`` / ``python -m deqkit.bench --device``, and ``scripts/gpu_check.sh``.

On CPU: ``--device cpu`` is accepted and reaches every section; ``--device cuda`` without CUDA is
one clear error line; the CUDA memory path reads the CUDA allocator (checked with fakes); and
every ``python -m deqkit...`` command of the GPU check script parses with the real parsers.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from deqkit.apps.bench import measure, suite
from deqkit.apps.bench.suite import SuiteConfig, run_suite
from deqkit.cli import build_parser, main
from deqkit.errors import OptionError

ROOT = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    """Raised by a recording stand-in once it has seen the device (nothing is measured)."""


def _recorder(seen: dict[str, Any], name: str, result: Any = None):
    def record(*args: Any, **kwargs: Any) -> Any:
        seen[name] = kwargs.get("device")
        if result is None:
            raise _Stop
        return result

    return record


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_every_section_receives_the_device(monkeypatch, device: str) -> None:
    # the suite hands cfg.device to each section (run with stand-ins: the device string need not exist)
    seen: dict[str, Any] = {}
    for name in ("bench_step", "bench_memory", "bench_krylov", "bench_accuracy", "bench_sim_speed"):
        monkeypatch.setattr(suite, name, _recorder(seen, name))
    monkeypatch.setattr(suite, "bench_torchdeq", _recorder(seen, "bench_torchdeq", result={"fake": True}))
    monkeypatch.setattr(suite, "torchdeq_targets", lambda res: [])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "fake GPU")
    for section in ("step", "memory", "torchdeq", "accuracy", "sim-speed"):
        with pytest.raises(_Stop):
            run_suite(SuiteConfig(section=section, quick=True, device=device))
    assert seen == {
        "bench_step": device,
        "bench_memory": device,
        "bench_torchdeq": device,
        "bench_krylov": device,
        "bench_accuracy": device,
        "bench_sim_speed": device,
    }
    cmd = SuiteConfig(device=device).command()
    assert ("--device" in cmd) == (device != "cpu")


def test_the_cli_threads_device_cpu_into_the_suite_config() -> None:
    from deqkit.cli import bench as bench_cli

    args = build_parser().parse_args(["bench", "--section", "step", "--quick", "--device", "cpu"])
    assert bench_cli.config(args).device == "cpu"
    args = build_parser().parse_args(["bench", "--quick"])
    assert bench_cli.config(args).device == "cpu", "the default stays cpu"


def test_device_cuda_without_cuda_is_one_clear_error(monkeypatch, capsys) -> None:
    from deqkit.cli import bench as bench_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match="--device cuda: no CUDA device is available"):
        bench_cli.config(build_parser().parse_args(["bench", "--device", "cuda"]))
    rc = main(["bench", "--section", "step", "--quick", "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "no CUDA device is available" in err and "--device cpu" in err and "Traceback" not in err


def test_python_m_deqkit_bench_runs_the_bench_command() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    ok = subprocess.run([sys.executable, "-m", "deqkit.bench", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "--device" in ok.stdout and "--section" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "deqkit.bench", "--quick", "--section", "step", "--device", "cuda"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2, bad.stderr
    assert "no CUDA device is available" in bad.stderr and "Traceback" not in bad.stderr


def test_a_quick_step_section_runs_on_the_device_it_is_given(one_thread) -> None:
    from deqkit.apps.bench import REFERENCE, bench_step
    from deqkit.apps.bench import step as step_section

    built: list[torch.device] = []
    real = step_section.build_model

    def spy(*args: Any, **kwargs: Any):
        model = real(*args, **kwargs)
        built.append(next(model.parameters()).device)
        return model

    step_section.build_model = spy  # type: ignore[assignment]
    try:
        rows = bench_step(
            REFERENCE, ["jacobian-free", "shine"], repeats=1, memory=False, cosine=False, log=lambda s: None, device="cpu"
        )
    finally:
        step_section.build_model = real  # type: ignore[assignment]
    assert built == [torch.device("cpu")] and [r["estimator"] for r in rows] == ["jacobian-free", "shine"]


def test_cuda_peak_memory_reads_the_cuda_allocator(monkeypatch) -> None:
    # no GPU here: fake the four torch.cuda calls and check the order and the arithmetic
    calls: list[str] = []
    state = {"allocated": 1000, "peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: (calls.append("reset"), state.update(peak=1000)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: state["peak"])

    def step() -> None:
        calls.append("fn")
        state["peak"] = 1000 + 4096

    assert measure.peak_allocated_bytes(step, "cuda") == 4096
    assert calls == ["sync", "reset", "fn", "sync"]
    assert measure.peak_allocated_bytes(lambda: torch.ones(1 << 16).sum(), "cpu") > 0, "CPU keeps the profiler path"


# -- scripts/gpu_check.sh: every command it runs exists with the options it passes ---------------
_SCRIPT = ROOT / "scripts" / "gpu_check.sh"
_VARS = {"$OUT": "gpu_check_out", "$NPROC": "1,2", "$PY": "python"}


def _script_commands() -> list[tuple[str, list[str]]]:
    """``(module, argv)`` of every ``"$PY" -m MODULE ...`` line of the script (the shell's quoting undone)."""
    out = []
    for line in _SCRIPT.read_text().splitlines():
        if line.lstrip().startswith("#") or '"$PY" -m ' not in line:
            continue
        words = shlex.split(line.split('"$PY" -m ', 1)[1])
        words = [re.sub(r"\$\w+", lambda m: _VARS.get(m.group(0), m.group(0)), w) for w in words]
        out.append((words[0], words[1:]))
    return out


def _parse(module: str, argv: list[str]) -> Any:
    if module == "deqkit":
        return build_parser().parse_args(argv)
    if module == "deqkit.bench":
        return build_parser().parse_args(["bench", *argv])
    if module == "deqkit.apps.bench.scale":
        from deqkit.apps.bench.scale import build_parser as scale_parser

        return scale_parser().parse_args(argv)
    if module == "pytest":
        missing = [a for a in argv if a.startswith("tests/") and not (ROOT / a.split("::")[0]).exists()]
        assert not missing, f"gpu_check.sh runs test files that do not exist: {missing}"
        return None
    raise AssertionError(f"gpu_check.sh runs `python -m {module}`, which this test does not know how to check")


def test_gpu_check_script_calls_only_options_that_exist(capsys) -> None:
    commands = _script_commands()
    modules = {m for m, _ in commands}
    assert {"deqkit", "deqkit.bench", "deqkit.apps.bench.scale", "pytest"} <= modules, modules
    for module, argv in commands:
        try:
            args = _parse(module, argv)
        except SystemExit:
            pytest.fail(f"gpu_check.sh: `python -m {module} {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")
        if args is not None and hasattr(args, "device"):
            assert args.device == "cuda", f"gpu_check.sh: `python -m {module}` must run with --device cuda"


def test_the_script_check_catches_a_misspelt_option(tmp_path, monkeypatch) -> None:
    # the check itself can fail: a script calling an option that does not exist
    bad = tmp_path / "gpu_check.sh"
    bad.write_text('step x 10 "$PY" -m deqkit.bench --quick --devices cuda\n')
    monkeypatch.setattr(sys.modules[__name__], "_SCRIPT", bad)
    ((module, argv),) = _script_commands()
    with pytest.raises(SystemExit):
        _parse(module, argv)
