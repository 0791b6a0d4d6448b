"""Memory of one training step against the forward iteration cap: a DEQ (Exact, SHINE) against
naive backpropagation through the iterations."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..compare import ESTIMATOR_PRESETS
from .config import REFERENCE, BenchConfig, DeviceLike, build_model, digits_batch
from .measure import memory_of_step, peak_allocated_bytes, quiet, saved_tensor_bytes, timed_step, zero_grads
from .report import kb, mark, md_table, ratio

__all__ = ["TITLE", "BPTT", "bench_memory", "format_memory_table", "memory_targets", "MEMORY_NOTES"]

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

    def forward(self, u: Tensor, z0: Optional[Tensor] = None) -> Tensor:
        z = torch.zeros_like(u) if z0 is None else z0
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


def _deq_rows(cfg: BenchConfig, method: str, preset: str, caps: Sequence[int], x: Tensor, y: Tensor) -> list[dict[str, Any]]:
    """A DEQ with estimator ``preset``, its forward Broyden run to each cap (unreachable tolerance)."""
    rows = []
    for cap in caps:
        model = build_model(
            cfg, ESTIMATOR_PRESETS[preset](), cfg.solver(max_iter=cap, tol=1e-30, stop_mode="abs"), device=x.device
        )
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


def _bptt_rows(cfg: BenchConfig, caps: Sequence[int], x: Tensor, y: Tensor) -> list[dict[str, Any]]:
    """Naive BPTT through the same cell (``cap`` Picard iterations with autograd)."""
    rows = []
    for cap in caps:
        model = build_model(cfg, ESTIMATOR_PRESETS["exact-gmres"](), device=x.device)
        unrolled = BPTT(model.cell, cap)

        def loss() -> Tensor:
            return nn.functional.cross_entropy(model.head(unrolled(model.injection(x))), y)  # noqa: B023 - used within this iteration

        with saved_tensor_bytes(list(model.parameters())) as saved:
            ell = loss()
        ell.backward()
        zero_grads(model)
        peak = peak_allocated_bytes(lambda: loss().backward(), x.device)
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
    with quiet():
        rows = _deq_rows(cfg, "Exact (GMRES)", "exact-gmres", caps, x, y)
        rows += _deq_rows(cfg, "SHINE(fallback)", "shine", caps, x, y)
        rows += _bptt_rows(cfg, caps, x, y)
    log(format_memory_table(cfg, rows))
    return rows


def format_memory_table(cfg: BenchConfig, rows: Sequence[dict[str, Any]]) -> str:
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
    return (
        f"{cfg.name} cell (width {cfg.width}, batch {cfg.batch}), forward tol 1e-30 so every solve runs to its cap (a sample stops early only if its float32 residual is exactly 0; `fwd steps` is the per-sample mean)\n\n"
        + md_table(head, body)
    )


def memory_targets(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    for method in ("Exact (GMRES)", "SHINE(fallback)"):
        rs = [r for r in rows if r["method"] == method]
        # from the cap at which Broyden's ring buffer is full (min(memory, max_iter - 1) columns) on,
        # nothing may grow with the depth; below it the buffer is smaller, so the peak is too
        full = [r for r in rs if r["cap"] >= 30]
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
