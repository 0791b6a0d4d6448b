"""Smoke test of the benchmark suite (deqkit/apps/bench/) at minimal sizes: rows, finite numbers, file sections."""

from __future__ import annotations

import math

import pytest
import torch

from deqkit.apps import bench
from deqkit.apps.bench import torchdeq as torchdeq_section
from deqkit.cli import main

TINY = bench.BenchConfig("tiny", width=16, batch=4, max_iter=10, memory=5)


@pytest.fixture(autouse=True)
def _float32_default():
    # other test modules change the global default dtype; the bench builds float32 models itself
    old = torch.get_default_dtype()
    yield
    torch.set_default_dtype(old)


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_step_rows_and_numbers():
    names = ("exact-gmres", "exact-warm", "unrolled", "shine", "broyden-reuse")
    rows = bench.bench_step(TINY, names, repeats=1, log=lambda s: None)
    assert [r["estimator"] for r in rows] == list(names)
    for r in rows:
        assert len(r["fwd_ms"]) == len(r["bwd_ms"]) == 1
        assert _finite(*r["fwd_ms"], *r["bwd_ms"], r["bwd_vs_exact"], r["fwd_steps"], r["cosine"])
        assert r["graph_bytes"] > 0 and r["peak_bytes"] > 0
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-4)
    table = bench.format_step_table(TINY, rows)
    assert table.count("\n| ") == len(names) + 1  # header + one line per estimator (after the separator)
    assert len(bench.step_targets(rows)) == 4


def test_memory_flat_for_deq_and_growing_for_bptt():
    rows = bench.bench_memory(TINY, caps=(2, 6), log=lambda s: None)
    methods = [r["method"] for r in rows]
    assert methods.count("Exact (GMRES)") == methods.count("SHINE(fallback)") == 2
    for r in rows:
        assert _finite(r["graph_bytes"], r["peak_bytes"], r["graph_vs_first"], r["peak_vs_first"])
    exact = [r for r in rows if r["method"] == "Exact (GMRES)"]
    bptt = [r for r in rows if r["method"].startswith("BPTT")]
    assert exact[0]["graph_bytes"] == exact[1]["graph_bytes"]  # one cell evaluation whatever the depth
    assert bptt[1]["graph_bytes"] > 1.5 * bptt[0]["graph_bytes"]  # every iterate kept


def test_torchdeq_section_optional(monkeypatch):
    lines = []
    if not bench.torchdeq_available():
        assert bench.bench_torchdeq(TINY, repeats=1, log=lines.append) is None
        assert "pip install 'deqkit[bench]'" in lines[0]
        return
    res = bench.bench_torchdeq(TINY, repeats=1, f_max_iter=10, fixed_iters=5, b_max_iter=10, log=lines.append)
    assert set(res["forward"]) == {"to tol", "fixed"}
    assert res["forward"]["fixed"]["deqkit"]["fevals"] == res["forward"]["fixed"]["torchdeq"]["fevals"] == 5
    for r in res["step"]:
        assert _finite(*r["ours"]["total_ms"], r["ours_cos_gmres"])
    exact = [r for r in res["step"] if r["pair"].startswith("Exact, fixed-point")][0]
    assert exact["grad_cos"] > 0.99
    # and the skip path, as if torchdeq were missing
    monkeypatch.setattr(torchdeq_section, "torchdeq_available", lambda: False)
    lines.clear()
    assert bench.bench_torchdeq(TINY, repeats=1, log=lines.append) is None
    assert "pip install 'deqkit[bench]'" in lines[0]


def test_write_replaces_only_own_sections(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    other = "## Someone else's section\n\nkeep me\n\n```\n## not a heading inside a fence\n```\n"
    path.write_text(other + "\n## Memory against forward depth\n\nold numbers\n\n## Another section\n\ntext\n")
    bench.write_sections(
        str(path),
        {
            bench.SECTIONS["memory"]: "## Memory against forward depth\n\nnew numbers\n",
            bench.SECTIONS["step"]: "## DEQ gradient estimators: step cost\n\nstep\n",
        },
    )
    text = path.read_text()
    assert text.startswith(other)
    assert "old numbers" not in text and "new numbers" in text
    assert "## Another section\n\ntext\n" in text
    assert text.rstrip().endswith("step")
    # idempotent
    before = text
    bench.write_sections(str(path), {bench.SECTIONS["memory"]: "## Memory against forward depth\n\nnew numbers\n"})
    assert path.read_text() == before


def test_cli_quick_memory_section(tmp_path, capsys):
    out = tmp_path / "B.md"
    assert main(["bench", "--quick", "--section", "memory", "--write", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(bench.SECTIONS["memory"]) and "BPTT" in text


def test_peak_memory_measure_keeps_stderr_clean(capfd):
    import sys

    def work():
        sys.stderr.write("a plain line survives\n")
        return torch.ones(1000, 100) * 2

    peak = bench.peak_allocated_bytes(work)
    err = capfd.readouterr().err
    assert "USDT" not in err and "a plain line survives" in err
    assert peak >= 1000 * 100 * 4


def test_sim_speed_section(capsys):
    pytest.importorskip("cvxpy")
    pytest.importorskip("sklearn")
    cfg = bench.SimSpeedConfig(hidden=[8], samples=80, cvxpy_rows=1, epochs=1)
    out = bench.bench_sim_speed(cfg, log=lambda s: None)
    assert out["rows"] == 8 and out["cvxpy_rows"] == 1 and _finite(out["admm_s"], out["gap_max"])
    assert out["cvxpy_status"] == {"optimal"}


TINY_PRUNING = [
    "--pruning-datasets",
    "digits",
    "--pruning-hidden",
    "8",
    "--pruning-epochs",
    "2",
    "--pruning-samples",
    "150",
    "--pruning-ft-epochs",
    "1",
    "--pruning-n-test",
    "60",
    "--pruning-n-attack",
    "20",
    "--pruning-pgd-steps",
    "2",
]


def test_cli_sim_pruning_section(tmp_path, capsys):
    """``deqkit bench --section sim-pruning`` at a tiny setting prints the benchmark's table and writes its JSON."""
    pytest.importorskip("sklearn")
    import json

    argv = ["bench", "--section", "sim-pruning", *TINY_PRUNING, "--pruning-densities", "0.5", "--pruning-out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== SIM against magnitude pruning" in out and "the full benchmark: python -m deqkit.apps.bench.sim_pruning" in out
    table = out[out.index("digits/mlp (1 seed)") :].splitlines()
    assert table[1].split()[:4] == ["target", "method", "accuracy", "density"]
    rows = {line.split()[1]: line.split() for line in table[2:] if line.strip().startswith(("-", "50%"))}
    assert set(rows) == {"baseline", "SIM", "SIM+ft", "prune", "prune+ft"}
    assert all(_finite(*map(float, r[2:4])) for r in rows.values())
    assert abs(float(rows["SIM"][3]) - 50) <= 2 and rows["prune"][3] == rows["SIM"][3]  # matched density
    assert "digits/mlp" in json.loads((tmp_path / "sim_pruning.json").read_text())["runs"]


def test_cli_sim_pruning_defaults_and_bad_density(capsys):
    from deqkit.cli.bench import config
    from deqkit.cli.dispatch import build_parser

    cfg = config(build_parser().parse_args(["bench", "--section", "sim-pruning"]))
    assert cfg.wanted() == ["sim-pruning"] and cfg.sim_pruning == bench.SimPruningConfig()
    small = bench.SimPruningConfig()
    assert small.datasets == ["digits", "synthetic"] and small.models == ["mlp"] and small.seeds == 1
    args = small.args()  # the benchmark module's own flags, its defaults where the section sets none
    assert args.densities == [0.7, 0.5, 0.3] and args.hidden == [64, 32, 16] and args.epochs is None
    # every flag reaches the benchmark
    given = config(build_parser().parse_args(["bench", "--section", "sim-pruning", *TINY_PRUNING, "--pruning-out", "o"]))
    want = dict(datasets=["digits"], hidden=[8], epochs=2, samples=150, ft_epochs=1, n_test=60, n_attack=20, pgd_steps=2, out="o")
    assert given.sim_pruning == bench.SimPruningConfig(**want)
    assert {k: getattr(given.sim_pruning.args(), k) for k in want} == want
    assert main(["bench", "--section", "sim-pruning", "--pruning-densities", "1.5"]) == 2
    assert "--pruning-densities must lie in (0, 1]" in capsys.readouterr().err


def test_section_header_names_today_and_this_machine(monkeypatch):
    """The command header of a written section carries the run's date and the machine it ran on
    (not a date or machine frozen in the code)."""
    import datetime
    import os

    from deqkit.apps.bench import report

    head = report.header("deqkit bench --section step", 1)
    assert datetime.date.today().isoformat() in head and f"{os.cpu_count()}-core CPU, no GPU" in head
    monkeypatch.setattr(report.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(report.torch.cuda, "get_device_name", lambda d: "NVIDIA H200")
    assert "NVIDIA H200" in report.header("deqkit bench --device cuda", 1, "cuda")
    assert "no GPU" in report.header("deqkit bench", 1, "cpu")


@pytest.mark.parametrize("module", ["sim_pruning", "krylov", "scale"])
def test_bench_scripts_run_as_modules_without_a_runpy_warning(module):
    """``python -m deqkit.apps.bench.<module>``: the package imports no submodule, so runpy does not
    warn that the module was imported before it ran (and runs a second copy of it)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", f"deqkit.apps.bench.{module}", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_every_public_bench_name_resolves():
    import deqkit.apps.bench as bench

    for name in bench.__all__:
        assert getattr(bench, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bench.nope  # noqa: B018


def test_torchdeq_matched_pair_runs_our_forward_tighter():
    """The matched pair: deqkit's default Exact() with its forward to a tighter tolerance.
    A tighter forward takes more evaluations and gives a gradient closer to the reference."""
    if not bench.torchdeq_available():  # an optional extra (deqkit[bench]), not a dev dependency
        pytest.skip("torchdeq is not installed (pip install 'deqkit[bench]')")
    from deqkit import Exact
    from deqkit.apps.bench.config import build_model, digits_batch

    x, y, _ = digits_batch(TINY.batch, TINY.seed)
    model = build_model(TINY, Exact())
    settings = torchdeq_section.TorchDEQSettings(f_tol=1e-3, f_max_iter=60, b_max_iter=60)
    rows = torchdeq_section.step_pairs(model, x, y, settings, 1, matched_f_tol=1e-6)
    by = {r["pair"]: r for r in rows}
    default, matched = by[torchdeq_section.DEFAULT_PAIR], by[torchdeq_section.MATCHED_PAIR]
    assert matched["ours"]["fwd_evals"] > default["ours"]["fwd_evals"]
    assert matched["ours_err"] < 0.1 * default["ours_err"]
    lines = torchdeq_section.step_pair_targets(rows, "tiny")
    assert any(line.startswith("tiny, at equal gradient accuracy (deqkit's forward tolerance 1e-06") for line in lines)


def test_equal_accuracy_tol_is_the_loosest_ladder_tolerance_matching_torchdeqs_gradient():
    """The search returns the first ladder tolerance whose gradient error is at most torchdeq's
    default's, and the one before it on the ladder is not accurate enough."""
    if not bench.torchdeq_available():
        pytest.skip("torchdeq is not installed (pip install 'deqkit[bench]')")
    from deqkit import Exact
    from deqkit.apps.bench.config import build_model, digits_batch

    x, y, _ = digits_batch(TINY.batch, TINY.seed)
    model = build_model(TINY, Exact())
    settings = torchdeq_section.TorchDEQSettings(f_tol=1e-2, f_max_iter=60, b_max_iter=60)
    reference = torchdeq_section.reference_gradient(model, x, y)
    ladder = (1.0, 0.1, 0.01, 0.001)
    tol = torchdeq_section.equal_accuracy_tol(model, x, y, settings, reference, ladder=ladder)
    assert tol is not None and tol < settings.f_tol  # a loose shared tolerance: deqkit's default is less accurate

    def errors(f_tol: float) -> tuple[float, float]:
        rows = torchdeq_section.step_pairs(model, x, y, settings, 1, reference=reference, matched_f_tol=f_tol)
        r = {r["pair"]: r for r in rows}[torchdeq_section.MATCHED_PAIR]
        return r["ours_err"], r["theirs_err"]

    ours, theirs = errors(tol)
    assert ours <= theirs
    looser = ladder[[settings.f_tol * f for f in ladder].index(tol) - 1] * settings.f_tol
    ours_looser, _ = errors(looser)
    assert ours_looser > theirs
