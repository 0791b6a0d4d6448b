"""Benchmarks past one process: data-parallel scaling and stragglers, compiled cells, mixed precision.

    python -m deqkit.apps.bench.scale scaling [--nproc 1,2] [--steps 20] [--device cpu]
    python -m deqkit.apps.bench.scale compile [--backend inductor] [--device cpu]
    python -m deqkit.apps.bench.scale amp [--device cpu]          # bf16 (and fp16 on CUDA)
    python -m deqkit.apps.bench.scale all --quick                 # everything, small

The problem is the benchmark suite's reference: ``DEQClassifier.mlp(64, 64, 10)`` on digits,
Broyden forward, Exact backward (see :mod:`deqkit.apps.bench.config`). Every figure is a median
over timed steps after warm-up steps; each command prints a Markdown table.

- ``scaling``: DDP step throughput (global samples per second, the global batch fixed) at each
  process count, and the straggler effect: rank 1 solves to a 100x tighter tolerance than the
  others, with no agreement, with ``sync_stop`` (quorum 1) and with quorum 0.5.
- ``compile``: graph breaks of the cell and of the whole DEQ forward (``torch._dynamo.explain``),
  and the step time of the compiled cell over the eager one.
- ``amp``: step time and the gradient's cosine to float32 under bf16 (and fp16 on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from ...errors import OptionError
from ...estimators import Exact
from ...models import DEQClassifier
from ..common import resolve_device
from .config import REFERENCE, build_model, digits_batch

__all__ = ["bench_amp", "bench_compile", "bench_scaling", "main"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(device: torch.device, tol: float | None = None) -> DEQClassifier:
    model = build_model(REFERENCE, Exact(on_failure="ignore"), REFERENCE.solver(tol=tol)).to(device)
    return model.train()


# -- scaling ---------------------------------------------------------------------------------------
def _scaling_worker(out: str, batch: int, steps: int, warmup: int, device_name: str, case: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device_name if device_name == "cpu" else f"cuda:{rank}")
    straggle = case != "even"
    tol = REFERENCE.tol * (0.01 if straggle and rank == 1 else 1.0)
    model = _model(device, tol)
    model.deq.solver.max_iter = 60 if straggle else model.deq.solver.max_iter
    if case.startswith("sync"):
        model.deq.sync_stop, model.deq.sync_quorum = True, float(case.split("=")[1])
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    x, y, _ = digits_batch(batch)
    shard = torch.tensor_split(torch.arange(batch), world)[rank]
    x, y = x[shard].to(device), y[shard].to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times, iters = [], []
    for i in range(warmup + steps):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x), y, reduction="sum") * (world / batch)
        loss.backward()
        opt.step()
        _sync(device)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        if i >= warmup:
            times.append(float(t))
            assert model.last_info is not None  # set by the forward call above
            iters.append(float(model.last_info.nstep.float().mean()))
    it = torch.tensor(statistics.mean(iters), dtype=torch.float64)
    per_rank = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
    dist.all_gather(per_rank, it)
    if rank == 0:
        Path(out).write_text(json.dumps({"step_ms": 1e3 * statistics.median(times), "iters": [float(v) for v in per_rank]}))


def bench_scaling(nprocs: Sequence[int], batch: int, steps: int, warmup: int, device: str) -> list[dict[str, Any]]:
    """Rows of the scaling table (see the module docstring)."""
    from ...train.distributed import launch

    rows = []
    cases = [(n, "even") for n in nprocs] + [(max(nprocs), c) for c in ("straggler", "sync=1.0", "sync=0.5")]
    with tempfile.TemporaryDirectory() as tmp:
        for n, case in cases:
            if n < 2 and case != "even":
                continue
            out = os.path.join(tmp, f"{n}-{case}.json")
            launch(
                _scaling_worker,
                n,
                out,
                batch,
                steps,
                warmup,
                device,
                case,
                threads=1 if device == "cpu" else None,
                backend="gloo" if device == "cpu" else "nccl",
                timeout_s=1800.0,
            )
            r = json.loads(Path(out).read_text())
            rows.append(
                {
                    "nproc": n,
                    "case": case,
                    "step_ms": r["step_ms"],
                    "samples_per_s": batch / (r["step_ms"] / 1e3),
                    "iters": r["iters"],
                }
            )
    return rows


def _scaling_table(rows: list[dict[str, Any]], batch: int) -> str:
    labels = {
        "even": "all ranks alike",
        "straggler": "rank 1 tol/100, no agreement",
        "sync=1.0": "rank 1 tol/100, sync_stop (quorum 1)",
        "sync=0.5": "rank 1 tol/100, sync_stop quorum 0.5",
    }
    lines = [
        f"global batch {batch}; step = forward + backward + SGD update, the slowest rank's time; median",
        "",
        "| processes | case | step ms | samples/s | mean forward iterations per rank |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        its = ", ".join(f"{v:.1f}" for v in r["iters"])
        lines.append(f"| {r['nproc']} | {labels[r['case']]} | {r['step_ms']:.1f} | {r['samples_per_s']:.0f} | {its} |")
    return "\n".join(lines)


# -- compile ---------------------------------------------------------------------------------------
def _step_ms(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int, amp: torch.dtype | None = None
) -> float:
    times = []
    for i in range(warmup + steps):
        model.zero_grad()
        _sync(x.device)
        t0 = time.perf_counter()
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        _sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_compile(backend: str, device: str, steps: int, warmup: int) -> dict[str, Any]:
    """Graph breaks (cell, whole DEQ forward) and compiled/eager step time."""
    import torch._dynamo as dynamo

    from ...train.precision import compile_cells

    dev = torch.device(device)
    x, y, _ = digits_batch(REFERENCE.batch)
    x, y = x.to(dev), y.to(dev)
    eager = _model(dev)
    u = eager.injection(x).detach()
    z0 = torch.zeros_like(u)
    dynamo.reset()
    cell_explain = dynamo.explain(eager.deq.cell)(z0, u)
    dynamo.reset()
    with torch.no_grad():
        deq_explain = dynamo.explain(eager.deq)(u)
    dynamo.reset()
    eager_ms = _step_ms(eager, x, y, steps, warmup)
    compiled = _model(dev)
    t0 = time.perf_counter()
    compile_cells(compiled, backend)
    _step_ms(compiled, x, y, 1, 0)  # the compilations (forward and with-grad graphs)
    compile_s = time.perf_counter() - t0
    compiled_ms = _step_ms(compiled, x, y, steps, warmup)
    return {
        "backend": backend,
        "device": device,
        "cell_graph_breaks": cell_explain.graph_break_count,
        "cell_graphs": cell_explain.graph_count,
        "deq_graph_breaks": deq_explain.graph_break_count,
        "deq_graphs": deq_explain.graph_count,
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "ratio": compiled_ms / eager_ms,
        "compile_s": compile_s,
        "break_reasons": sorted({str(b.reason).split("\n")[0][:90] for b in deq_explain.break_reasons})[:5],
    }


def _compile_table(r: dict[str, Any]) -> str:
    head = (
        "| backend | device | cell: graphs / breaks | DEQ forward: graphs / breaks | eager step ms | compiled step ms "
        "| compiled/eager | first compile s |"
    )
    lines = [
        head,
        "|---|---|---|---|---|---|---|---|",
        (
            f"| {r['backend']} | {r['device']} | {r['cell_graphs']} / {r['cell_graph_breaks']} | {r['deq_graphs']} / "
            f"{r['deq_graph_breaks']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['ratio']:.2f} | {r['compile_s']:.0f} |"
        ),
    ]
    if r["break_reasons"]:
        lines += ["", "graph breaks of the DEQ forward (first reasons): " + "; ".join(r["break_reasons"])]
    return "\n".join(lines)


# -- amp -------------------------------------------------------------------------------------------
def bench_amp(device: str, steps: int, warmup: int) -> list[dict[str, Any]]:
    """Step time and gradient cosine to float32 under each autocast dtype the device supports."""
    dev = torch.device(device)
    x, y, _ = digits_batch(REFERENCE.batch)
    x, y = x.to(dev), y.to(dev)
    rows = []
    base = _model(dev)
    ref_ms = _step_ms(base, x, y, steps, warmup)
    g32 = torch.cat([cast(torch.Tensor, p.grad).flatten() for p in base.parameters()])
    rows.append({"dtype": "float32", "tol": REFERENCE.tol, "step_ms": ref_ms, "cosine": 1.0, "converged": 1.0})
    dtypes = [("bf16", torch.bfloat16)] + ([("fp16", torch.float16)] if dev.type == "cuda" else [])
    for name, dt in dtypes:
        model = _model(dev, tol=1e-2)
        ms = _step_ms(model, x, y, steps, warmup, amp=dt)
        g = torch.cat([cast(torch.Tensor, p.grad).flatten().float() for p in model.parameters()])
        assert model.last_info is not None  # set by the steps above
        rows.append(
            {
                "dtype": name,
                "tol": 1e-2,
                "step_ms": ms,
                "cosine": float(g @ g32 / (g.norm() * g32.norm())),
                "converged": float(model.last_info.converged.float().mean()),
            }
        )
    return rows


def _amp_table(rows: list[dict[str, Any]], device: str) -> str:
    lines = [
        f"device {device}; fp16 would use a GradScaler in the trainer (CUDA only)",
        "",
        "| autocast | forward tol | step ms | gradient cosine to float32 | forward converged |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['tol']:g} | {r['step_ms']:.1f} | {r['cosine']:.4f} | {r['converged']:.2f} |")
    return "\n".join(lines)


# -- command ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m deqkit.apps.bench.scale`` (``scripts/gpu_check.sh`` calls it)."""
    p = argparse.ArgumentParser(
        prog="python -m deqkit.apps.bench.scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=("scaling", "compile", "amp", "all"))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--nproc", default="1,2", help="process counts of the scaling table")
    p.add_argument("--batch", type=int, default=64, help="global batch of the scaling table")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of this process")
    p.add_argument("--quick", action="store_true", help="5 timed steps, 1 warm-up (a smoke run)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except OptionError as err:
        p.error(str(err))
    if args.quick:
        args.steps, args.warmup = 5, 1
    torch.set_num_threads(args.threads)
    if args.what in ("scaling", "all"):
        nprocs = [int(n) for n in args.nproc.split(",")]
        print(
            "### Scaling (DDP)\n\n"
            + _scaling_table(bench_scaling(nprocs, args.batch, args.steps, args.warmup, args.device), args.batch)
            + "\n",
            flush=True,
        )
    if args.what in ("compile", "all"):
        print(
            "### Compiled cell\n\n" + _compile_table(bench_compile(args.backend, args.device, args.steps, args.warmup)) + "\n",
            flush=True,
        )
    if args.what in ("amp", "all"):
        print(
            "### Mixed precision\n\n" + _amp_table(bench_amp(args.device, args.steps, args.warmup), args.device) + "\n",
            flush=True,
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
