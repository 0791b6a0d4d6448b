"""Memory of one training step against the forward iteration cap: a DEQ (Exact, SHINE) against
naive backpropagation through the iterations."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...estimators import GradientEstimator
from ...models import DEQClassifier
from ...solvers import Solver
from ..compare import ESTIMATOR_PRESETS
from .config import REFERENCE, BenchConfig, DeviceLike, build_model, digits_batch
from .measure import memory_of_step, peak_allocated_bytes, quiet, saved_tensor_bytes, timed_step, zero_grads
from .report import kb, mark, md_table, ratio

__all__ = ["TITLE", "BPTT", "bench_memory", "memory_rows", "format_memory_table", "memory_targets", "MEMORY_NOTES"]

#: this section's heading in BENCHMARKS.md
TITLE = "## Memory against forward depth"


class BPTT(nn.Module):
    """Naive backprop through the forward iterations: ``n`` Picard steps ``z ← f(z, u)`` *with* autograd.

    The comparison point of the memory section: its graph holds every iterate, so memory grows
    linearly with the depth ``n``, where a DEQ (any estimator) keeps one cell evaluation.
    """

    def __init__(self, cell: nn.Module, n: int) -> None:
        super().__init__()
        self.cell, self.n = cell, int(n)

    def forward(self, u: Any, z0: Optional[Any] = None) -> Any:
        """``u``: the injection, a tensor or (multiscale cell) a tuple shaped like the state; ``z0`` defaults to zeros like ``u``."""
        if z0 is not None:
            z = z0
        elif isinstance(u, (tuple, list)):
            z = type(u)(torch.zeros_like(t) for t in u)
        else:
            z = torch.zeros_like(u)
        for _ in range(self.n):
            z = self.cell(z, u)
        return z


def _add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``graph_vs_first`` / ``peak_vs_first``: each row of one method against its smallest cap."""
    first = rows[0]
    for row in rows:
        row["graph_vs_first"] = ratio(row["graph_bytes"], first["graph_bytes"])
        row["peak_vs_first"] = ratio(row["peak_bytes"], first["peak_bytes"])
    return rows


#: ``(estimator, forward solver) ↦`` the seeded model (same weights every call)
ModelFactory = Callable[[GradientEstimator, Solver], DEQClassifier]


def _deq_rows(
    make_model: ModelFactory,
    solver_at: Callable[[int], Solver],
    method: str,
    preset: str,
    caps: Sequence[int],
    x: Tensor,
    y: Tensor,
) -> list[dict[str, Any]]:
    """A DEQ with estimator ``preset``, its forward solver ``solver_at(cap)`` (unreachable tolerance) run to each cap."""
    rows = []
    for cap in caps:
        model = make_model(ESTIMATOR_PRESETS[preset](), solver_at(cap))
        _, _, info = timed_step(model, x, y)  # warm-up; also gives the step count
        graph, peak = memory_of_step(model, x, y)
        rows.append(
            {
                "method": method,
                "cap": cap,
                "fwd_steps": float(info.nstep.float().mean()),
                "graph_bytes": graph,
                "peak_bytes": peak,
            }
        )
    return _add_ratios(rows)


def _bptt_rows(model: DEQClassifier, caps: Sequence[int], x: Tensor, y: Tensor) -> list[dict[str, Any]]:
    """Naive BPTT through ``model``'s cell (``cap`` Picard iterations with autograd)."""
    rows = []
    for cap in caps:
        unrolled = BPTT(model.cell, cap)

        def loss() -> Tensor:
            return nn.functional.cross_entropy(model.head(unrolled(model.injection(x))), y)  # noqa: B023 - used within this iteration

        with saved_tensor_bytes(list(model.parameters())) as saved:
            ell = loss()
        ell.backward()
        zero_grads(model)
        peak = peak_allocated_bytes(lambda: loss().backward(), x.device)
        zero_grads(model)
        rows.append(
            {
                "method": "BPTT (Picard, autograd)",
                "cap": cap,
                "fwd_steps": float(cap),
                "graph_bytes": saved["bytes"],
                "peak_bytes": peak,
            }
        )
    return _add_ratios(rows)


def memory_rows(
    make_model: ModelFactory,
    solver_at: Callable[[int], Solver],
    caps: Sequence[int],
    x: Tensor,
    y: Tensor,
    methods: Sequence[tuple[str, str]] = (("Exact (GMRES)", "exact-gmres"), ("SHINE(fallback)", "shine")),
) -> list[dict[str, Any]]:
    """The rows of :func:`bench_memory` for any model: each ``(label, preset)`` of ``methods`` at
    every cap, then naive BPTT through the same cell (tensor or tuple state)."""
    with quiet():
        rows = [r for label, preset in methods for r in _deq_rows(make_model, solver_at, label, preset, caps, x, y)]
        rows += _bptt_rows(make_model(ESTIMATOR_PRESETS["exact"](), solver_at(caps[0])), caps, x, y)
    return rows


def bench_memory(
    cfg: BenchConfig = REFERENCE,
    caps: Sequence[int] = (10, 30, 100),
    *,
    log: Callable[[str], None] = print,
    device: DeviceLike = "cpu",
) -> list[dict[str, Any]]:
    """Memory of one training step against the forward iteration cap, for Exact, SHINE and naive BPTT.

    The forward tolerance is set unreachable (1e-30) so every solve runs exactly ``cap`` steps.
    Row keys: ``method``, ``cap``, ``fwd_steps``, ``graph_bytes``, ``peak_bytes``, ``graph_vs_first``,
    ``peak_vs_first`` (ratios to the smallest cap). Models and batch live on ``device``.
    """
    x, y, _ = digits_batch(cfg.batch, cfg.seed, device=device)
    rows = memory_rows(
        lambda grad, solver: build_model(cfg, grad, solver, device=device),
        lambda cap: cfg.solver(max_iter=cap, tol=1e-30, stop_mode="abs"),
        caps,
        x,
        y,
    )
    log(format_memory_table(cfg, rows))
    return rows


def format_memory_table(cfg: BenchConfig, rows: Sequence[dict[str, Any]]) -> str:
    return (
        f"{cfg.name} cell (width {cfg.width}, batch {cfg.batch}), forward tol 1e-30 so every solve runs to its cap (a sample stops early only if its float32 residual is exactly 0; `fwd steps` is the per-sample mean)\n\n"
        + memory_md(rows)
    )


def memory_md(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of :func:`memory_rows`' rows."""
    head = ["method", "forward cap", "fwd steps", "graph KB", "÷ first cap", "peak KB", "÷ first cap"]
    body = [
        [
            r["method"],
            str(r["cap"]),
            f"{r['fwd_steps']:.0f}",
            kb(r["graph_bytes"]),
            f"{r['graph_vs_first']:.2f}",
            kb(r["peak_bytes"]),
            f"{r['peak_vs_first']:.2f}",
        ]
        for r in rows
    ]
    return md_table(head, body)


def memory_targets(rows: Sequence[dict[str, Any]], full_from: int = REFERENCE.memory) -> list[str]:
    """Target lines: every DEQ method's peak flat in the cap, from ``full_from`` (the forward Broyden's ``memory``) on."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows if not r["method"].startswith("BPTT")):
        rs = [r for r in rows if r["method"] == method]
        # from the cap at which Broyden's ring buffer is (nearly) full (min(memory, max_iter - 1)
        # columns) on, nothing may grow with the depth; below it the buffer is smaller, so the peak is too
        full = [r for r in rs if r["cap"] >= full_from]
        if len(full) >= 2:
            v = full[-1]["peak_bytes"] / full[0]["peak_bytes"]
            g = full[-1]["graph_bytes"] / full[0]["graph_bytes"]
            out.append(
                f"{method}: peak at cap {full[-1]['cap']} ≤ 1.1 × at cap {full[0]['cap']} (Broyden's buffer full): "
                f"{v:.2f}× (graph {g:.2f}×) — {mark(v <= 1.1)}"
            )
    rs = [r for r in rows if r["method"].startswith("BPTT")]
    if len(rs) >= 2:
        out.append(
            f"naive BPTT for comparison: {rs[-1]['peak_vs_first']:.1f}× peak, {rs[-1]['graph_vs_first']:.1f}× graph at cap {rs[-1]['cap']} vs {rs[0]['cap']}"
        )
    return out


MEMORY_NOTES = """\
The forward tolerance is unreachable, so every solve runs to `cap` Broyden steps (a sample whose
float32 residual becomes exactly 0 stops: the mean is 84 of 100 at cap 100); BPTT
runs `cap` Picard steps of the same cell with autograd on. A DEQ's graph is one cell evaluation
whatever the depth (Exact, SHINE: constant `graph KB`); its peak is set by the Broyden ring buffer
(`min(memory, cap − 1)` columns with `memory=30`: smaller below a cap of 31, constant from there
on, so it never grows past the memory) and by the residual traces `(cap, batch)`, which do grow,
but by 0.5 KB per step at batch 64. BPTT keeps every iterate's activations: linear growth.
"""
