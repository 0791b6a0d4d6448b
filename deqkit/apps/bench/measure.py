"""How the benchmark suite measures: interleaved timing of training steps, the bytes autograd
saves, and the peak of torch's CPU allocator.

* **Time**: wall clock of one training step on one batch, split into the forward call
  (injection, solve, estimator attach, head, loss) and ``loss.backward()``. Every configuration
  is warmed up once, then configurations are *interleaved* (A B C … A B C …, the start rotating
  each round) for ``repeats`` rounds; tables give the median and [min, max]. The weights never
  change (no optimiser step), so every round repeats exactly the same work.
* **Memory**, two deterministic measures: ``graph`` — the bytes of the distinct tensors
  autograd saves for backward during the forward call (parameters excluded): what a DEQ keeps
  between forward and backward, independent of the allocator and of other processes; and
  ``peak`` — the peak of live tensor bytes allocated by torch's CPU allocator during the whole
  step (forward *and* backward), above the level at the step's start, read from the
  ``"Total Allocated"`` counter of ``torch.profiler`` memory events. ``peak`` also sees what
  ``graph`` misses: solver buffers (Broyden's ``U, V``), tensors kept alive by Python closures,
  and the backward's transient buffers (GMRES's Krylov basis). Process RSS is useless at these
  sizes and ``tracemalloc`` does not see torch. On CUDA ``peak`` is the caching allocator's
  ``torch.cuda.max_memory_allocated`` over the step, above the allocation at its start.
* **Device**: every section takes ``device`` (``deqkit bench --device cuda``); its model and
  batch live there, and every timer reads the clock after ``torch.cuda.synchronize``
  (:func:`deqkit._timing.synced_perf_counter`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..._timing import synced_perf_counter
from ...errors import ConvergenceWarning

__all__ = [
    "saved_tensor_bytes",
    "peak_allocated_bytes",
    "quiet",
    "timed_step",
    "memory_of_step",
    "interleaved",
    "zero_grads",
    "cosine",
    "rel_error",
]


def cosine(a: Tensor, b: Tensor) -> float:
    """The cosine of two flat gradients."""
    return float(a @ b / (a.norm() * b.norm()))


def rel_error(a: Tensor, ref: Tensor) -> float:
    """``‖a − ref‖ / ‖ref‖``."""
    return float((a - ref).norm() / ref.norm())


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


@contextlib.contextmanager
def saved_tensor_bytes(exclude: Sequence[Tensor] = ()) -> Any:
    """Count the bytes of the distinct storages autograd saves for backward inside the block.

    Yields a dict whose ``"bytes"`` entry is filled in as tensors are saved. Storages of
    ``exclude`` (the parameters) are not counted; a storage saved twice counts once.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    out = {"bytes": 0, "tensors": 0}

    def pack(t: Tensor) -> Tensor:
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in skip and ptr not in seen:
                seen[ptr] = st.nbytes()
                out["bytes"] += st.nbytes()
                out["tensors"] += 1
        except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


#: Lines the native profiler writes to stderr that say nothing about the measurement: its trace
#: points, and the allocator's note on blocks allocated before profiling began (the peak is
#: taken above the level at the first event, so those blocks are already accounted for).
_PROFILER_NOISE = ("USDT:", "was allocated before the profiling started")


@contextlib.contextmanager
def _without_profiler_noise():
    """Drop the :data:`_PROFILER_NOISE` lines native code writes to file descriptor 2 while the
    block runs; everything else written to stderr meanwhile is passed on when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not any(noise in line for noise in _PROFILER_NOISE):
                    sys.stderr.write(line)


def peak_allocated_bytes(fn: Callable[[], Any], device: Any = "cpu") -> int:
    """Peak live bytes allocated by torch's allocator of ``device`` while ``fn`` runs, above the start level.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``, minus
    ``torch.cuda.memory_allocated`` at the start (the device synchronised at both ends). CPU:

    read from the ``"Total Allocated"`` counter of the profiler's memory events (exported as a
    Chrome trace: the in-memory event list drops most allocation events). Deterministic for a
    deterministic ``fn``. Returns 0 when the profiler recorded no memory event.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return _cuda_peak_bytes(fn, dev)
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_noise():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    fd, path = tempfile.mkstemp(suffix=".json", prefix="deqkit-bench-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as fh:
            trace = json.load(fh)
    finally:
        os.unlink(path)
    events = sorted(
        (
            e
            for e in trace.get("traceEvents", [])
            if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {}) and e["args"].get("Device Type", 0) == 0
        ),
        key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)),
    )
    if not events:
        return 0
    # the counter is the allocator's running total (it still counts blocks a previous profiled
    # region allocated and never saw freed): measure from the level just before the first event
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return int(max(0, max(e["args"]["Total Allocated"] for e in events) - start))


def _cuda_peak_bytes(fn: Callable[[], Any], dev: torch.device) -> int:
    """:func:`peak_allocated_bytes` on a CUDA device: the caching allocator's own peak counter."""
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    start = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    return int(max(0, torch.cuda.max_memory_allocated(dev) - start))


@contextlib.contextmanager
def quiet() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message=".*profiler.*")
        yield


def timed_step(model: nn.Module, x: Tensor, y: Tensor, *, opa: bool = False) -> tuple[float, float, Any]:
    """One training step (no optimiser update): returns forward seconds, backward seconds, DEQInfo.
    ``opa``: hand the targets to the forward call, so an OPA-enabled Broyden sees the loss."""
    zero_grads(model)
    t0 = synced_perf_counter(x.device)
    logits, info = model(x, return_info=True, target=y) if opa else model(x, return_info=True)
    loss = nn.functional.cross_entropy(logits, y)
    t1 = synced_perf_counter(x.device)
    loss.backward()
    t2 = synced_perf_counter(x.device)
    return t1 - t0, t2 - t1, info


def memory_of_step(model: nn.Module, x: Tensor, y: Tensor, *, opa: bool = False) -> tuple[int, int]:
    """(graph bytes saved during the forward call, peak allocated bytes over the whole step)."""
    params = list(model.parameters())

    def forward() -> Tensor:
        with saved_tensor_bytes(params) as saved:
            logits = model(x, target=y) if opa else model(x)
            loss = nn.functional.cross_entropy(logits, y)
        forward.saved = saved["bytes"]  # type: ignore[attr-defined]
        return loss

    zero_grads(model)
    loss = forward()
    loss.backward()
    graph = forward.saved  # type: ignore[attr-defined]
    del loss
    zero_grads(model)

    def step() -> None:
        forward().backward()

    peak = peak_allocated_bytes(step, x.device)
    zero_grads(model)
    return graph, peak


def interleaved(names: Sequence[str], repeats: int, run: Callable[[str], None], warmup: bool = True) -> None:
    """Run every name once (warm-up), then ``repeats`` rounds A B C …, the start rotating each round."""
    if warmup:
        for n in names:
            run(n)
    for r in range(repeats):
        k = r % len(names)
        for n in list(names[k:]) + list(names[:k]):
            run(n)
