"""Data-parallel training of DEQs: :class:`DistributedTrainer` on ``torch.distributed`` + DDP.

Launch with ``torchrun --nproc-per-node N -m deqkit train ...``, with ``deqkit train --nproc N``
(which spawns the processes itself), or from Python with :func:`launch`. The backend is chosen
from the device: NCCL for CUDA, gloo for CPU (:func:`default_backend`).

What the trainer guarantees
---------------------------
* **The batch is global.** ``config.batch_size`` is the number of samples per optimisation step
  summed over all ranks; each step's batch (the same seeded permutation as a one-process run,
  :func:`~deqkit.train.checkpoint.epoch_generator`) is split into ``world_size`` contiguous
  shards, and each rank's loss is its cross-entropy *sum* times ``world_size / n_batch``, so
  DDP's gradient average is the gradient of the mean loss over the whole batch, even for an
  uneven last batch. N processes therefore train like one process with the same config (up to
  the order of floating-point sums), and a checkpoint resumes under any world size.
* **Rank 0 writes**: the checkpoint (atomic, then a barrier), the JSON-lines log and the progress
  bar; every rank evaluates the validation set (identical results), the epoch metrics are summed
  over ranks (counts) or are rank 0's (timings).
* **Interrupts are agreed**: ``Ctrl-C`` under torchrun reaches every rank at a slightly different
  moment; the flag is all-reduced at each step boundary so all ranks stop after the same step.
* **Random decisions that must agree across ranks** are drawn from generators every rank builds
  from the same numbers: the data order (``epoch_generator(seed, epoch)``) and, for per-step
  choices such as whether to apply a Jacobian penalty or a randomised iteration cap,
  :func:`step_generator` ``(seed, global_step)``: the trainer hands each step's generator to every
  DEQ (``DEQ.decision_generator``), which draws its randomised iteration cap and whether its
  Jacobian penalty fires from it. A decision drawn from a per-rank generator makes ranks build
  different graphs (DDP then waits for gradients that never come) or do different work.
  Per-sample randomness (dropout masks outside the cell) may differ by rank.
* **Gradients reach the parameters through ``.backward()``**, which is what DDP all-reduces: every
  estimator of :mod:`deqkit.estimators` takes its vector–Jacobian products with
  ``torch.autograd.grad`` *with respect to the state only* and hands the adjoint to the cell's
  graph through a hook, so the parameter gradient is accumulated by ``loss.backward()``.
  Gradients computed with ``torch.autograd.grad(loss, params)`` would not be all-reduced.

DDP options a DEQ needs
-----------------------
* ``find_unused_parameters=False`` (the default here): every DEQ parameter is used by the one
  cell evaluation that carries the gradient, on every rank and every step, whatever the number
  of solver iterations (the solve runs without a graph). Set it only if the model has branches
  that some steps skip.
* ``static_graph``: safe (the graph of a step is the same on every step) but brings nothing
  measurable for a DEQ; off by default.
* No ``SyncBatchNorm`` (no collective of any kind) inside the cell: the cell runs once per
  solver iteration, and ranks run different numbers of iterations, so a collective there hangs
  or mixes iterations. Use group or layer norm in cells (the cells of :mod:`deqkit.models` do).
* ``broadcast_buffers`` (default on) keeps buffers such as spectral norm's power-iteration
  vectors equal across ranks.
* Stragglers: ranks stop their forward solves at different iterations, so each step waits for the
  slowest one. ``sync_stop=True`` (``DEQ.sync_stop``) makes the ranks agree on the stop with one
  all-reduce per iteration; ``sync_quorum < 1`` stops every rank once that fraction of the global
  batch has converged (see :mod:`deqkit.agreement`).

Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020;
Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
"""

from __future__ import annotations

import dataclasses
import datetime
import faulthandler
import gc
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler

from .._options import check_bool, check_fraction, check_int, validated_options
from ..deq import DEQ
from ..errors import OptionError
from .checkpoint import atomic_torch_save, epoch_generator, step_generator
from .config import TrainConfig
from .loop import PathLike, Trainer, _InterruptGuard
from .metrics import Callback, Metrics, MetricsLog

__all__ = [
    "DistributedTrainer",
    "EpochShardSampler",
    "default_backend",
    "free_port",
    "init_distributed",
    "launch",
    "step_generator",
    "world_info",
]

#: epoch sums added over ranks (counts); the timings stay rank 0's
SUMMED_OVER_RANKS = (
    "loss_sum",
    "correct",
    "n",
    "fwd_steps_sum",
    "fwd_samples",
    "fwd_unconverged",
    "bwd_unconverged",
    "bwd_samples",
    "bwd_fallback",
)


def default_backend(device: str | torch.device | None = None) -> str:
    """``"nccl"`` for a CUDA device (when NCCL is built in), else ``"gloo"``."""
    dev = torch.device("cuda" if device in (None, "auto") and torch.cuda.is_available() else (device or "cpu"))
    if dev.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def world_info(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group``; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(
    backend: str | None = None, device: str | torch.device | None = None, timeout_s: float = 600.0
) -> tuple[int, int]:
    """Initialise the default process group from the environment torchrun sets
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); returns ``(rank, world_size)``.

    A no-op returning the existing ``(rank, world_size)`` when already initialised. ``timeout_s``
    bounds every collective: a rank that never arrives makes the others fail instead of hang.
    """
    if dist.is_initialized():
        return world_info()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise OptionError(
            f"init_distributed: the environment lacks {', '.join(missing)}; launch with torchrun "
            f"(torchrun --nproc-per-node N -m deqkit train ...), deqkit train --nproc N, or deqkit.train.distributed.launch."
        )
    backend = backend or default_backend(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return world_info()


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world: int,
    port: int,
    backend: str,
    args: Sequence[Any],
    timeout_s: float,
    threads: int | None,
) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
        }
    )
    faulthandler.enable()  # a crash in native code (SIGABRT, SIGSEGV) prints the Python stack
    if threads is not None:
        torch.set_num_threads(threads)
    init_distributed(backend, timeout_s=timeout_s)
    try:
        fn(*args)
    finally:
        # DDP wrappers left in reference cycles hold the process group; collected during interpreter
        # shutdown, the gloo backend's threads were torn down out of order (std::terminate, SIGABRT).
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    nproc: int,
    *args: Any,
    backend: str | None = None,
    timeout_s: float = 600.0,
    collective_timeout_s: float | None = None,
    threads: int | None = None,
) -> None:
    """Run ``fn(*args)`` in ``nproc`` fresh processes (``torch.multiprocessing``, spawn) with the
    default process group initialised (``backend`` default: :func:`default_backend`).

    ``fn`` must be importable by name (a module-level function). Raises ``TimeoutError`` (after
    terminating the processes) when they have not all finished within ``timeout_s`` seconds, and
    ``torch.multiprocessing.ProcessRaisedException`` / ``ProcessExitedException`` when one fails.
    """
    from torch.multiprocessing.spawn import start_processes

    nproc = check_int("launch", "nproc", nproc)
    backend = backend or default_backend()
    ctimeout = timeout_s if collective_timeout_s is None else collective_timeout_s
    ctx = start_processes(
        _worker, args=(fn, nproc, free_port(), backend, args, ctimeout, threads), nprocs=nproc, join=False, start_method="spawn"
    )
    assert ctx is not None  # join=False: start_processes returns the ProcessContext
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"launch: the {nproc} processes did not finish within {timeout_s:g} s (terminated).")
    finally:
        # torch builds the list as ``[None] * nprocs`` then fills in every process
        for p in cast("list[BaseProcess]", ctx.processes):
            if p.is_alive():
                p.terminate()
                p.join(5)
                if p.is_alive():
                    p.kill()


class EpochShardSampler(DistributedSampler):
    """A ``DistributedSampler`` whose epoch order is the one-process trainer's
    (:func:`~deqkit.train.checkpoint.epoch_generator` of ``(seed, epoch)``; call :meth:`set_epoch`),
    padded to a multiple of the world size and strided over the ranks, as ``DistributedSampler`` does.

    For a ``DataLoader`` over one rank's samples; :class:`DistributedTrainer` shards each global
    batch instead (the same order, and a checkpoint resumes under any world size).
    """

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            indices = torch.randperm(n, generator=epoch_generator(self.seed, self.epoch)).tolist()
        else:
            indices = list(range(n))
        if not self.drop_last:
            pad = self.total_size - len(indices)
            indices += (indices * math.ceil(pad / max(len(indices), 1)))[:pad]
        else:
            indices = indices[: self.total_size]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


class _AgreedGuard(_InterruptGuard):
    """The interrupt guard whose check is agreed by all ranks (one all-reduce per step)."""

    def __init__(self, group: Any = None) -> None:
        super().__init__()
        self.group = group

    def check(self) -> None:
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.long)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if int(flag.item()):
            self.requested = True
            raise KeyboardInterrupt


@validated_options
class DistributedTrainer(Trainer):
    """:class:`~deqkit.train.Trainer` under ``torch.distributed`` + ``DistributedDataParallel``
    (see the module docstring for what it guarantees).

    Construct it in every rank after the process group is initialised (:func:`init_distributed`),
    with the same model (same seed), data and config.

    Args:
        model: as for :class:`~deqkit.train.Trainer`.
        train_set: as for :class:`~deqkit.train.Trainer`.
        val_set: as for :class:`~deqkit.train.Trainer`.
        config: as for :class:`~deqkit.train.Trainer`; ``config.batch_size`` is the global
            batch (all ranks together).
        callbacks: as for :class:`~deqkit.train.Trainer`; they run on every rank.
        augment: as for :class:`~deqkit.train.Trainer`; each rank seeds it with its rank too, so
            the augmented batch differs from a one-process run's.
        sync_stop: ``True``/``False`` sets ``sync_stop`` of every DEQ in the model (cross-rank
            agreement on the forward stop); ``None`` (default) leaves the DEQs as they are.
        sync_quorum: with ``sync_stop=True``, the fraction of the global batch that must have
            stopped before all ranks stop.
        find_unused_parameters: passed to ``DistributedDataParallel``.
        static_graph: passed to ``DistributedDataParallel``.
        group: the process group (default: the world).
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset | None = None,
        config: TrainConfig | dict[str, Any] | None = None,
        *,
        callbacks: Sequence[Callback] = (),
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        sync_stop: bool | None = None,
        sync_quorum: float = 1.0,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        group: Any = None,
    ) -> None:
        owner = "DistributedTrainer"
        if not (dist.is_available() and dist.is_initialized()):
            raise OptionError(
                f"{owner}: torch.distributed is not initialised; call deqkit.train.distributed.init_distributed() "
                f"in each process (launched by torchrun or deqkit.train.distributed.launch), or use Trainer."
            )
        super().__init__(model, train_set, val_set, config, callbacks=callbacks, augment=augment)
        self.group = group
        self.rank, self.world_size = world_info(group)
        self.find_unused_parameters = check_bool(owner, "find_unused_parameters", find_unused_parameters)
        self.static_graph = check_bool(owner, "static_graph", static_graph)
        if sync_stop is not None:
            check_bool(owner, "sync_stop", sync_stop)
            quorum = check_fraction(owner, "sync_quorum", sync_quorum)
            for m in model.modules():
                if isinstance(m, DEQ):
                    m.sync_stop, m.sync_quorum = sync_stop, quorum
        self._check_batches(owner)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if self.rank != 0:
            self.config = dataclasses.replace(self.config, progress=False)
            self._log = MetricsLog(None, None)
        self._ddp: nn.Module | None = None
        self._n_batch = 0
        self._n_local = 0

    def _check_batches(self, owner: str) -> None:
        n, bs, w = len(self.train_set), self.config.batch_size, self.world_size  # type: ignore[arg-type]
        last = n % bs
        if bs < w or 0 < last < w:
            raise OptionError(
                f"{owner}: every step's batch is split over {w} ranks, so each batch needs at least {w} samples; "
                f"batch_size={bs} with {n} training samples leaves {'batches' if bs < w else 'a last batch'} of "
                f"{bs if bs < w else last}. Choose batch_size >= {w} with len(train_set) % batch_size == 0 or >= {w}."
            )

    # -- the hooks of Trainer --------------------------------------------------------------------
    def _prepare_model(self) -> None:
        super()._prepare_model()
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(
                self.model,
                device_ids=ids,
                process_group=self.group,
                find_unused_parameters=self.find_unused_parameters,
                static_graph=self.static_graph,
            )

    def _train_module(self) -> nn.Module:
        return self.model if self._ddp is None else self._ddp

    def _shard(self, idx: Tensor) -> Tensor:
        local = torch.tensor_split(idx, self.world_size)[self.rank]
        self._n_batch, self._n_local = idx.numel(), local.numel()
        return local

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        n_batch = self._n_batch or y.shape[0] * self.world_size
        return F.cross_entropy(logits, y, reduction="sum") * (self.world_size / n_batch)

    def _step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        stats = super()._step(x, y)
        # the step's loss value is the shard's scaled sum; the metrics want the shard's mean
        n_batch = self._n_batch or y.shape[0] * self.world_size
        stats["loss"] = stats["loss"] * n_batch / (self.world_size * max(y.shape[0], 1))
        return stats

    def _make_guard(self) -> _InterruptGuard:
        return _AgreedGuard(self.group)

    def _reduced_sums(self) -> dict[str, float]:
        sums = dict(self._metrics.sums)
        t = torch.tensor([sums[k] for k in SUMMED_OVER_RANKS], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        sums.update({k: float(v) for k, v in zip(SUMMED_OVER_RANKS, t.tolist())})
        return sums

    def _end_epoch(self, guard: _InterruptGuard) -> None:
        self._metrics = Metrics(self._reduced_sums())
        super()._end_epoch(guard)

    # -- checkpoints: built on every rank (a collective), written by rank 0 ----------------------
    def _checkpoint(self, rng: dict[str, Any] | None = None) -> dict[str, Any]:
        ckpt = super()._checkpoint(rng)
        ckpt["accumulator"] = self._reduced_sums()
        ckpt["world_size"] = self.world_size
        return ckpt

    def save_checkpoint(self, path: PathLike | None = None, *, rng: dict[str, Any] | None = None) -> Path:
        """Build the checkpoint on every rank (the epoch sums are reduced), write it atomically on
        rank 0, then wait for rank 0 (a barrier). Must be called by every rank."""
        target = Path(path) if path is not None else self.checkpoint_path
        if target is None:
            raise OptionError("DistributedTrainer.save_checkpoint: no path given and config.checkpoint_dir is None.")
        if self.optimizer is None:
            self._build_optimizer()
        ckpt = self._checkpoint(rng)
        if self.rank == 0:
            atomic_torch_save(ckpt, target)
        dist.barrier(group=self.group)
        return target

    def load_checkpoint(self, path: PathLike | None = None) -> dict[str, Any]:
        """Restore on every rank; the partial epoch sums stay on rank 0 only (they are global)."""
        ckpt = super().load_checkpoint(path)
        if self.rank != 0:
            self._metrics = Metrics({k: v for k, v in ckpt["accumulator"].items() if k not in SUMMED_OVER_RANKS})
        return ckpt

    def _on_interrupt(self) -> None:
        if self.rank == 0:
            super()._on_interrupt()
            return
        if self.checkpoint_path is not None and self._consistent:
            self.save_checkpoint(self.checkpoint_path, rng=self._rng_snapshot)
