"""The benchmark commands of the fast-exact-gradient work run (numbers are not checked: no timed tests)."""

from __future__ import annotations

import math

from deqkit.apps import compare
from deqkit.apps.bench import BenchConfig
from deqkit.apps.bench.krylov import bench_krylov, format_krylov_table, krylov_targets
from deqkit.estimators import Adaptive, Exact

TINY = BenchConfig("tiny", width=16, batch=4, max_iter=10, memory=5)


def test_krylov_bench_reports_cost_per_step():
    rows = [bench_krylov(TINY, steps=4, repeats=1)]
    r = rows[0]
    assert r["vjps"] == 5 and math.isfinite(r["ratio"]) and r["ratio"] > 0
    assert "÷ one VJP" in format_krylov_table(rows)
    assert "≤ 1.3 × one VJP (tiny)" in krylov_targets(rows)[0]


def test_compare_presets_include_the_default_exact_and_adaptive():
    assert isinstance(compare.ESTIMATOR_PRESETS["adaptive"](), Adaptive)
    default, gmres = compare.ESTIMATOR_PRESETS["exact"](), compare.ESTIMATOR_PRESETS["exact-gmres"]()
    assert isinstance(default, Exact) and type(default.adjoint) is type(Exact().adjoint)  # what Exact() gives
    assert type(gmres.adjoint).__name__ == "GMRES" and type(default.adjoint).__name__ != "GMRES"
    assert compare.OPA_FREQ["adaptive"] == 5
    assert compare.CompareConfig(estimators=["adaptive", "exact"]).solver("adaptive").opa_freq == 5
