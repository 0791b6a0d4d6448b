"""The MDEQ benchmark section (deqkit/apps/bench/mdeq.py, ``deqkit bench --section mdeq``) at its quick size."""

from __future__ import annotations

import math

import pytest
import torch

from deqkit.apps import bench
from deqkit.apps.bench import mdeq as mdeq_section
from deqkit.apps.bench import suite
from deqkit.apps.bench.torchdeq import INSTALL_HINT, flat_cell, torchdeq_available
from deqkit.apps.common import build_classifier
from deqkit.cli.dispatch import build_parser
from deqkit.data import DatasetNotFoundError
from deqkit.errors import OptionError
from deqkit.estimators import Exact
from deqkit.solvers import Anderson

#: the quick run, forward tolerance tightened so the exact rows can be held to the float64 reference
#: (at the default 1e-4 the forward solve's own error dominates every float32 gradient)
QUICK = bench.MDEQBenchConfig.quick(tol=1e-6, max_iter=60)


@pytest.fixture(scope="module")
def result():
    """One quick run of the section, shared by the tests below (float32 models whatever the default
    dtype; one torch thread, as ``deqkit bench`` runs: a second one only adds contention here)."""
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float32)  # other test modules change the global default dtype
    torch.set_num_threads(1)
    try:
        return bench.bench_mdeq(QUICK, log=lambda s: None)
    finally:
        torch.set_default_dtype(old)
        torch.set_num_threads(threads)


def test_step_table_has_every_estimator(result):
    rows = result["step"]
    assert [r["estimator"] for r in rows] == list(bench.MDEQ_ESTIMATORS)
    by = {r["estimator"]: r for r in rows}
    assert by["exact"]["bwd_vs_exact"] == 1.0  # the baseline is the default Exact()
    for r in rows:
        assert len(r["fwd_ms"]) == len(r["bwd_ms"]) == QUICK.repeats
        assert all(math.isfinite(v) for v in (*r["fwd_ms"], *r["bwd_ms"], r["bwd_vs_exact"], r["ref_cos"], r["ref_err"]))
        assert r["fwd_converged"] == 1.0
    table = bench.format_mdeq_tables(result)
    for r in rows:
        assert f"| {r['label']} |" in table
    assert "Fashion-MNIST" in table or "synthetic" in table


def test_exact_rows_match_the_float64_reference(result):
    by = {r["estimator"]: r for r in result["step"]}
    assert not result["reference_warnings"]
    for name in ("exact", "exact-gmres"):
        assert by[name]["ref_err"] < 1e-3, name
        assert by[name]["ref_cos"] > 0.99999, name
    # the approximate estimators are further away, and the error says so
    assert by["jacobian-free"]["ref_err"] > 10 * by["exact-gmres"]["ref_err"]
    # the amplification column: the backward's max ‖w‖/‖v‖ for adjoint estimators, none for JFB
    assert by["exact"]["amplification"] is not None and 0 < by["exact"]["amplification"] < math.inf
    assert by["jacobian-free"]["amplification"] is None
    assert "max ‖w‖ / ‖v‖" in bench.format_mdeq_tables(result)


def test_memory_graph_flat_in_depth_for_the_deq_not_for_bptt(result):
    rows = result["memory"]
    for method in ("Exact()", "SHINE(fallback)", "BPTT (Picard, autograd)"):
        rs = [r for r in rows if r["method"] == method]
        assert [r["cap"] for r in rs] == list(QUICK.caps)
        assert [r["fwd_steps"] for r in rs] == [float(c) for c in QUICK.caps]
        graphs = [r["graph_bytes"] for r in rs]
        if method.startswith("BPTT"):
            assert all(a < b for a, b in zip(graphs, graphs[1:])), graphs
        else:
            assert len(set(graphs)) == 1, (method, graphs)


def test_torchdeq_rows(result):
    if not torchdeq_available():  # an optional extra (deqkit[bench]): the section says how to get it
        assert result["torchdeq"] is None
        assert INSTALL_HINT in bench.format_mdeq_tables(result)
        return
    rows = result["torchdeq"]
    assert rows is not None
    by = {r["pair"]: r for r in rows}
    default = by["Exact() default / IFT default"]
    assert default["theirs"] is not None and math.isfinite(default["theirs_err"])
    # the same cell through the flat wrapper and through deqkit's tuple state: the same gradient
    assert by["Exact, fixed-point backward"]["grad_cos"] > 0.999
    targets = bench.mdeq_targets(result)
    assert any("default Exact() step" in t for t in targets)
    assert any("SHINE(fallback=True) backward" in t for t in targets)


def test_flat_wrapper_has_deqkits_tuple_fixed_point(one_thread):
    """What torchdeq is given (the flat map) has the fixed point deqkit's DEQ finds on the tuple state."""
    torch.manual_seed(0)
    model = build_classifier("mdeq", (1, 28, 28), 10, 0, Anderson(tol=1e-10, max_iter=300), Exact(), 0).double()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        u = model.injection(x)
        z_ours, info = model.deq(u)
        f, z0, unpack = flat_cell(model.cell, u)
        assert z0.shape == (3, sum(t[0].numel() for t in u))
        z_flat = Anderson(tol=1e-10, max_iter=300)(f, z0).z  # a solver on the flat vector, as torchdeq's are
        z_theirs = unpack(z_flat)
    assert bool(info.converged.all())
    assert isinstance(z_theirs, tuple) and len(z_theirs) == len(z_ours) == 2
    for a, b in zip(z_ours, z_theirs):
        assert a.shape == b.shape
        assert float((a - b).norm() / a.norm()) < 1e-7


def test_synthetic_fallback(monkeypatch):
    import deqkit.data

    def missing(*a, **k):
        raise DatasetNotFoundError("not here")

    monkeypatch.setattr(deqkit.data, "load_dataset", missing)
    cfg = bench.MDEQBenchConfig.quick()
    with pytest.warns(UserWarning, match="seeded random images"):
        x, y, source = mdeq_section.mdeq_data(cfg)
    assert source == "synthetic"
    assert x.shape == ((cfg.warmup_steps + 1) * cfg.batch, 1, 28, 28) and y.max() < 10


def test_section_registered_not_in_all_and_written_under_its_heading(result, tmp_path):
    assert "mdeq" in suite.SECTION_NAMES and "mdeq" not in suite.SuiteConfig().wanted()
    sections = suite.render_sections({"mdeq": result}, "deqkit bench --section mdeq", 1)
    text = sections["mdeq"]
    assert text.startswith(mdeq_section.TITLE + "\n") and "Targets:" in text
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Memory against forward depth\n\nold\n")
    bench.write_sections(str(path), {suite.HEADINGS["mdeq"]: text})
    out = path.read_text()
    assert "## Memory against forward depth\n\nold\n" in out and mdeq_section.TITLE in out


def test_cli_flags_reach_the_config():
    from deqkit.cli.bench import config

    args = build_parser().parse_args(
        ["bench", "--section", "mdeq", "--mdeq-batch", "32", "--mdeq-caps", "5,10", "--mdeq-seed", "2"]
    )
    cfg = config(args)
    assert cfg.wanted() == ["mdeq"]
    assert cfg.mdeq.batch == 32 and cfg.mdeq.caps == (5, 10) and cfg.mdeq.warmup_steps == 40 and cfg.mdeq.seed == 2
    assert cfg.command() == "deqkit bench --section mdeq --mdeq-batch 32 --mdeq-caps 5,10 --mdeq-seed 2"
    bad = build_parser().parse_args(["bench", "--section", "mdeq", "--mdeq-caps", "10,5"])
    with pytest.raises(OptionError, match="--mdeq-caps"):
        config(bad)


@pytest.mark.parametrize(
    "changes, match",
    [({"batch": 0}, "batch"), ({"warmup_steps": -1}, "warmup_steps"), ({"caps": (20, 10)}, "caps"), ({"tol": 0.0}, "tol")],
)
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(OptionError, match=match):
        bench.MDEQBenchConfig(**changes)


def test_suite_hands_device_and_rounds_to_the_section(monkeypatch):
    seen = {}

    def record(cfg, device="cpu", **kwargs):
        seen.update(cfg=cfg, device=device)
        raise KeyboardInterrupt  # stop before anything is measured

    monkeypatch.setattr(suite, "bench_mdeq", record)
    with pytest.raises(KeyboardInterrupt):
        suite.run_suite(suite.SuiteConfig(section="mdeq", quick=True, device="cpu"))
    assert seen["device"] == "cpu"
    assert seen["cfg"] == bench.MDEQBenchConfig.quick(repeats=2)  # --quick: the quick problem, 2 rounds
    with pytest.raises(KeyboardInterrupt):
        suite.run_suite(suite.SuiteConfig(section="mdeq", repeats=5, mdeq=bench.MDEQBenchConfig(batch=16)))
    assert seen["cfg"] == bench.MDEQBenchConfig(batch=16, repeats=5)


def test_checkpoint_replaces_the_warm_up_and_is_measured_on_test_images(tmp_path):
    """``--mdeq-checkpoint``: the weights measured are the checkpoint's (no warm-up training), the
    batch is the first test batch, the table says so; a wrong file is refused with a clear error."""
    torch.manual_seed(5)
    trained = build_classifier("mdeq", (1, 28, 28), 10, 0, Anderson(), Exact(), 0)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights the seeded build cannot produce
    path = tmp_path / "last.pt"
    torch.save({"model": trained.state_dict(), "epoch": 6, "global_step": 5064}, path)
    cfg = bench.MDEQBenchConfig.quick(checkpoint=str(path))
    x, y, source = mdeq_section.mdeq_data(cfg)
    model, record = mdeq_section.trained_mdeq(cfg, x, y, log=lambda s: None)
    for (name, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name
    assert record["steps"] == 0 and record["epoch"] == 6 and record["global_step"] == 5064
    assert x.shape[0] == cfg.batch
    if source == "fashion-mnist":
        import deqkit.data

        test_x, _ = deqkit.data.load_dataset("fashion-mnist", seed=cfg.seed, flatten=False).test[: cfg.batch]
        assert torch.equal(x, test_x)
    res = {"cfg": cfg, "source": source, "warmup": record, "step": [], "memory": [], "torchdeq": None, "reference_warnings": []}
    head = bench.format_mdeq_tables(res)
    assert f"the model of `{path}` (`deqkit train`: epoch 6, step 5064)" in head and "first test batch" in head
    # a checkpoint of another architecture, and a file that is not a checkpoint
    other = build_classifier("mdeq", (1, 28, 28), 10, 0, Anderson(), Exact(), 0, channels=(8, 16))
    torch.save({"model": other.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(OptionError, match="does not hold this benchmark's MDEQ"):
        mdeq_section.trained_mdeq(bench.MDEQBenchConfig.quick(checkpoint=str(tmp_path / "other.pt")), x, y)
    torch.save({"weights": 1}, tmp_path / "junk.pt")
    with pytest.raises(OptionError, match="not a deqkit training checkpoint"):
        mdeq_section.trained_mdeq(bench.MDEQBenchConfig.quick(checkpoint=str(tmp_path / "junk.pt")), x, y)
    # the CLI flag reaches the config and the reproduction command
    from deqkit.cli.bench import config

    args = build_parser().parse_args(["bench", "--section", "mdeq", "--mdeq-checkpoint", str(path)])
    assert config(args).mdeq.checkpoint == str(path)
    assert config(args).command() == f"deqkit bench --section mdeq --mdeq-checkpoint {path}"
