"""Training loop for DEQ classifiers: metrics that include the solver's work, exact resume.

:class:`Trainer` trains any ``nn.Module`` classifier (``model(x) -> logits``) with cross-entropy,
and additionally reports what every :class:`~deqkit.deq.DEQ` inside it did: forward solver
steps, the fraction of samples whose forward solve converged, the number that did not, the
backward (adjoint) failures of :class:`~deqkit.estimators.Exact`, and the wall-clock cost of
forward and backward per step.

Non-convergence is counted, never silent, and never spammed: during :meth:`Trainer.fit` and
:meth:`Trainer.evaluate` every DEQ in the model runs with ``on_failure="ignore"`` (and
an estimator's ``on_failure="ignore"``), and the counts go into the metrics (``fwd_unconverged``,
``bwd_unconverged`` per epoch) instead of one warning per batch. The previous settings are
restored afterwards.

Reproducibility and resume:

* the data order is a pure function of ``(seed, epoch)``: each epoch shuffles with a fresh
  ``torch.Generator`` seeded from both, so a resumed run sees exactly the batches an
  uninterrupted one would;
* after each epoch a checkpoint (model, optimiser, scheduler, RNG states of torch / numpy /
  python, the epoch's data generator, position, history, config) is written atomically: to a
  temporary file in the same directory, flushed and fsync'ed, then ``os.replace``'d over
  ``<checkpoint_dir>/last.pt``; a crash mid-write leaves the previous checkpoint intact;
* ``Ctrl-C`` (SIGINT) during :meth:`Trainer.fit` finishes the current optimisation step,
  writes a checkpoint of that state (mid-epoch position included) and re-raises
  ``KeyboardInterrupt``; a second ``Ctrl-C`` aborts at once. A ``KeyboardInterrupt`` raised by
  other means (a callback, a debugger) saves the last completed step likewise, unless it
  arrived inside the parameter update, in which case the last checkpoint is kept;
* ``fit(resume=True)`` continues from ``last.pt``; on CPU the result equals an uninterrupted
  run's bit for bit (same config, same data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from ._options import check_choice, unknown_option_message, validated_options
from ._io import atomic_open
from ._timing import synced_perf_counter
from .deq import DEQ, DEQInfo
from .errors import NonFiniteError

__all__ = ["TrainConfig", "Trainer", "Callback", "seed_everything", "CHECKPOINT_NAME"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "none")
CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 1
# config keys whose change makes a resumed run differ from an uninterrupted one
_RESUME_KEYS = ("batch_size", "lr", "weight_decay", "optimizer", "momentum", "schedule", "seed", "grad_clip", "max_steps")

PathLike = Union[str, "os.PathLike[str]"]


def _deq_settings(model: nn.Module) -> list[str]:
    """The solver and gradient estimator of every DEQ in ``model`` (their reprs), so a resumed
    run can tell that they were swapped (e.g. a preset that changed meaning)."""
    return [f"solver={m.solver!r}, grad={m.grad!r}" for m in model.modules() if isinstance(m, DEQ)]


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@validated_options
@dataclass
class TrainConfig:
    """Settings of a training run; every field is checked (a bad value raises ``ValueError``).

    Attributes:
        epochs: number of passes over the training set.
        batch_size: samples per optimisation step (the last batch of an epoch may be smaller).
        lr: learning rate (peak learning rate with ``schedule="cosine"``).
        weight_decay: L2 penalty (decoupled for ``"adamw"``).
        optimizer: ``"adam"`` (default), ``"adamw"`` or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum.
        schedule: ``"cosine"`` (default: cosine decay to 0 over all steps, updated every step)
            or ``"none"``.
        seed: seeds torch / numpy / python at the start of a fresh run, and the data order.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"``.
        eval_every: evaluate on the validation set every this many epochs (and after the last).
        checkpoint_dir: where ``last.pt`` is written after every epoch; ``None``: no checkpoints.
        log_path: a JSON-lines file; one object per epoch is appended; ``None``: no log.
        progress: show a tqdm progress bar (only when stderr is a terminal).
        max_steps: stop after this many optimisation steps in total (``None``: no cap).
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        tensorboard_dir: also log the epoch metrics to TensorBoard there, if
            ``torch.utils.tensorboard`` can be imported (a warning otherwise).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9
    schedule: str = "cosine"
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 1
    checkpoint_dir: Optional[str] = None
    log_path: Optional[str] = None
    progress: bool = True
    max_steps: Optional[int] = None
    grad_clip: Optional[float] = None
    tensorboard_dir: Optional[str] = None

    def __post_init__(self) -> None:
        owner = "TrainConfig"

        def integer(name: str, minimum: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                raise ValueError(f"{owner}: {name} must be an integer >= {minimum}{' or None' if optional else ''}, got {v!r}.")
            setattr(self, name, int(v))

        def number(name: str, *, positive: bool, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            ok = isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or (v <= 0 if positive else v < 0):
                bound = "> 0" if positive else ">= 0"
                raise ValueError(f"{owner}: {name} must be a finite number {bound}{' or None' if optional else ''}, got {v!r}.")
            setattr(self, name, float(v))

        integer("epochs", 1)
        integer("batch_size", 1)
        integer("seed", 0)
        integer("eval_every", 1)
        integer("max_steps", 1, optional=True)
        number("lr", positive=True)
        number("weight_decay", positive=False)
        number("momentum", positive=False)
        number("grad_clip", positive=True, optional=True)
        if isinstance(self.optimizer, str):
            self.optimizer = self.optimizer.lower()
        if isinstance(self.schedule, str):
            self.schedule = self.schedule.lower()
        check_choice(owner, "optimizer", self.optimizer, OPTIMIZERS)
        check_choice(owner, "schedule", self.schedule, SCHEDULES)
        if not isinstance(self.progress, bool):
            raise ValueError(f"{owner}: progress must be True or False, got {self.progress!r}.")
        for name in ("checkpoint_dir", "log_path", "tensorboard_dir"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, (str, os.PathLike)) or not str(v):
                    raise ValueError(f"{owner}: {name} must be a path or None, got {v!r}.")
                setattr(self, name, os.fspath(v))
        if not isinstance(self.device, (str, torch.device)):
            raise ValueError(f"{owner}: device must be a string such as 'cpu', 'cuda', 'cuda:0' or 'auto', got {self.device!r}.")
        self.device = str(self.device)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as exc:
                raise ValueError(
                    f"{owner}: device={self.device!r} is not a valid torch device; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'."
                ) from exc

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping (e.g. parsed JSON/YAML); unknown keys raise ``ValueError``."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                raise ValueError(unknown_option_message(cls.__name__, str(key), valid))
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# ------------------------------------------------------------------------------------------------
# Callbacks and helpers
# ------------------------------------------------------------------------------------------------


class Callback:
    """Hooks into :meth:`Trainer.fit`; subclass and override what you need.

    Raising ``KeyboardInterrupt`` from a hook behaves like ``Ctrl-C`` (checkpoint, re-raise);
    from :meth:`on_step_end` the completed step is included.
    """

    def on_step_end(self, trainer: "Trainer", step: dict[str, Any]) -> None:
        """After every optimisation step; ``step`` has epoch, batch, global_step, loss, acc, ..."""

    def on_epoch_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        """After an epoch's record is in the history, its checkpoint written and its log line appended."""


def _new_accumulator() -> dict[str, float]:
    keys = (
        "loss_sum", "correct", "n", "steps", "fwd_steps_sum", "fwd_samples", "fwd_unconverged",
        "bwd_unconverged", "bwd_samples", "bwd_vjps", "fwd_ms", "bwd_ms", "adjoint_ms", "adjoint_timed", "epoch_s",
    )
    return {k: 0.0 for k in keys}


def _mean(total: float, count: float) -> Optional[float]:
    return None if count == 0 else total / count


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that shuffles epoch ``epoch`` (0-based): a function of ``(seed, epoch)`` only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _fetch(dataset: Dataset, idx: Tensor) -> Sequence[Tensor]:
    if isinstance(dataset, TensorDataset):
        return [t[idx] for t in dataset.tensors]
    return default_collate([dataset[int(i)] for i in idx])


def _deqs(model: nn.Module) -> list[DEQ]:
    return [m for m in model.modules() if isinstance(m, DEQ)]


@contextlib.contextmanager
def _quiet_deqs(model: nn.Module) -> Iterator[None]:
    """Silence per-batch non-convergence warnings of every DEQ (counted in the metrics instead)."""
    saved: list[tuple[object, str, str]] = []
    try:
        for deq in _deqs(model):
            saved.append((deq, "on_failure", deq.on_failure))
            deq.on_failure = "ignore"
            if isinstance(getattr(deq.grad, "on_failure", None), str):
                saved.append((deq.grad, "on_failure", deq.grad.on_failure))
                deq.grad.on_failure = "ignore"
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


@contextlib.contextmanager
def _collect_infos(model: nn.Module, sink: list[DEQInfo]) -> Iterator[None]:
    """Append the :class:`DEQInfo` of every DEQ call inside ``model`` to ``sink``."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], DEQInfo):
            sink.append(output[1])

    handles = [deq.register_forward_hook(hook) for deq in _deqs(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    On any failure the temp file is removed and an existing ``path`` is left untouched.
    """
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


class _InterruptGuard:
    """Defer SIGINT to the next step boundary (main thread only); a second SIGINT raises at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\ndeqkit: interrupt received; finishing the current step and saving a checkpoint "
            "(press Ctrl-C again to abort immediately).",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> "_InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except (ValueError, OSError):
                self._installed = False
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------


class Trainer:
    """Cross-entropy training of a classifier, with DEQ metrics, checkpoints and exact resume.

    Args:
        model: ``model(x) -> logits`` (e.g. :class:`~deqkit.models.DEQClassifier`); it may
            contain any number of :class:`~deqkit.deq.DEQ` layers, whose calls are all counted.
            If its ``forward`` takes a ``target`` keyword, the training labels are passed there
            (outer-problem awareness of the forward solver, see ``DEQClassifier.forward``).
        train_set: a dataset of ``(x, y)`` pairs (a ``TensorDataset`` takes a fast path).
        val_set: evaluated every ``config.eval_every`` epochs (``None``: no validation).
        config: a :class:`TrainConfig` (default ``TrainConfig()``) or a dict of its fields.
        callbacks: :class:`Callback` objects.

    Attributes:
        history: one dict per completed epoch (see :meth:`fit`).
        optimizer, scheduler: built by :meth:`fit`.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        val_set: Optional[Dataset] = None,
        config: Union[TrainConfig, dict[str, Any], None] = None,
        *,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Trainer: model must be an nn.Module, got {type(model).__name__}.")
        if config is None:
            config = TrainConfig()
        elif isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        elif not isinstance(config, TrainConfig):
            raise ValueError(f"Trainer: config must be a TrainConfig or a dict, got {type(config).__name__}.")
        try:
            n_train = len(train_set)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ValueError("Trainer: train_set must be a map-style dataset with a length.") from exc
        if n_train == 0:
            raise ValueError("Trainer: train_set is empty.")
        self.model = model
        self.train_set = train_set
        self.val_set = val_set
        self.config = config
        self.callbacks = list(callbacks)
        self.device = config.resolved_device()
        self.history: list[dict[str, Any]] = []
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self._pos = {"epoch": 0, "batch": 0, "global_step": 0}
        self._acc = _new_accumulator()
        self._elapsed_before = 0.0
        self._t_start = time.perf_counter()
        self._rng_snapshot: Optional[dict[str, Any]] = None
        self._consistent = True
        self._tb: Any = None
        try:
            self._passes_target = "target" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self._passes_target = False

    # -- paths and sizes ------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[Path]:
        """``<checkpoint_dir>/last.pt``, or ``None`` without a checkpoint directory."""
        d = self.config.checkpoint_dir
        return None if d is None else Path(d) / CHECKPOINT_NAME

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_set) / self.config.batch_size)  # type: ignore[arg-type]

    @property
    def total_steps(self) -> int:
        total = self.config.epochs * self.steps_per_epoch
        return total if self.config.max_steps is None else min(total, self.config.max_steps)

    def _elapsed(self) -> float:
        return self._elapsed_before + (time.perf_counter() - self._t_start)

    # -- building --------------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("Trainer: the model has no trainable parameters.")
        if cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if cfg.schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(self.total_steps, 1))
        else:
            self.scheduler = None

    # -- checkpoints -----------------------------------------------------------------------------
    def _checkpoint(self, rng: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        assert self.optimizer is not None
        epoch = self._pos["epoch"]
        gen = _epoch_generator(self.config.seed, epoch)
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": _rng_state() if rng is None else rng,
            "data_generator": gen.get_state(),
            "epoch": epoch,
            "batch": self._pos["batch"],
            "global_step": self._pos["global_step"],
            "accumulator": dict(self._acc),
            "history": list(self.history),
            "elapsed_s": self._elapsed(),
            "n_train": len(self.train_set),  # type: ignore[arg-type]
            "config": self.config.to_dict(),
            "deqs": _deq_settings(self.model),
        }

    def save_checkpoint(self, path: Optional[PathLike] = None, *, rng: Optional[dict[str, Any]] = None) -> Path:
        """Write the current state atomically to ``path`` (default :attr:`checkpoint_path`)."""
        target = Path(path) if path is not None else self.checkpoint_path
        if target is None:
            raise ValueError("Trainer.save_checkpoint: no path given and config.checkpoint_dir is None.")
        if self.optimizer is None:
            self._build_optimizer()
        atomic_torch_save(self._checkpoint(rng), target)
        return target

    def load_checkpoint(self, path: Optional[PathLike] = None) -> dict[str, Any]:
        """Restore model, optimiser, scheduler, RNG states, position and history from ``path``."""
        source = Path(path) if path is not None else self.checkpoint_path
        if source is None:
            raise ValueError("Trainer.load_checkpoint: no path given and config.checkpoint_dir is None.")
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{source} is not a deqkit training checkpoint (format {CHECKPOINT_FORMAT}).")
        n_train = len(self.train_set)  # type: ignore[arg-type]
        if ckpt["n_train"] != n_train:
            raise ValueError(
                f"{source} was written for a training set of {ckpt['n_train']} samples, this one has {n_train}; "
                f"resume with the same data (same dataset, subset and seed)."
            )
        old = ckpt["config"]
        changed = [k for k in _RESUME_KEYS if old.get(k) != getattr(self.config, k)]
        if old.get("epochs") != self.config.epochs and self.config.schedule != "none":
            changed.append("epochs")
        what = [f"{k}: {old.get(k)!r} -> {getattr(self.config, k)!r}" for k in changed]
        deqs = _deq_settings(self.model)
        if "deqs" in ckpt and ckpt["deqs"] != deqs:  # a solver or gradient estimator was swapped
            changed.append("deqs")
            what.append(f"DEQ solver/estimator: {ckpt['deqs']} -> {deqs}")
        if changed:
            warnings.warn(
                f"resuming from {source} with changed settings {'; '.join(what)}; "
                f"the run will differ from an uninterrupted one.",
                stacklevel=3,
            )
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise ValueError(f"{source} does not match this model's architecture: {exc}") from exc
        self.model.to(self.device)
        self._build_optimizer()
        assert self.optimizer is not None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if "epochs" in changed or "max_steps" in changed:
                self.scheduler.T_max = max(self.total_steps, 1)  # type: ignore[attr-defined]
        _set_rng_state(ckpt["rng"])
        self._pos = {"epoch": int(ckpt["epoch"]), "batch": int(ckpt["batch"]), "global_step": int(ckpt["global_step"])}
        self._acc = {**_new_accumulator(), **{k: float(v) for k, v in ckpt["accumulator"].items()}}
        self.history = list(ckpt["history"])
        self._elapsed_before = float(ckpt["elapsed_s"])
        self._t_start = time.perf_counter()
        return ckpt

    # -- logging ---------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        cfg = self.config
        if cfg.log_path is not None:
            path = Path(cfg.log_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, allow_nan=True) + "\n")
                fh.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch" and v is not None:
                    self._tb.add_scalar(k, v, record["epoch"])
            self._tb.flush()

    def _open_tensorboard(self) -> None:
        if self.config.tensorboard_dir is None or self._tb is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # type: ignore[attr-defined]
        except Exception as exc:  # tensorboard is optional
            warnings.warn(f"TensorBoard logging disabled: torch.utils.tensorboard cannot be imported ({exc}).", stacklevel=3)
            return
        self._tb = SummaryWriter(self.config.tensorboard_dir)

    # -- one step --------------------------------------------------------------------------------
    def _step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        assert self.optimizer is not None
        cfg = self.config
        infos: list[DEQInfo] = []
        self.optimizer.zero_grad(set_to_none=True)
        t0 = synced_perf_counter(self.device)
        with _collect_infos(self.model, infos):
            logits = self.model(x, target=y) if self._passes_target else self.model(x)
        loss = F.cross_entropy(logits, y)
        t1 = synced_perf_counter(self.device)
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"Trainer: the training loss is {loss.item()} at step {self._pos['global_step'] + 1}. "
                f"Lower the learning rate, set grad_clip, or use a contractive cell (spectral_norm=True)."
            )
        loss.backward()
        t2 = synced_perf_counter(self.device)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self._consistent = False
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        n = y.shape[0]
        stats: dict[str, Any] = {
            "loss": float(loss.detach()),
            "correct": int((logits.detach().argmax(dim=1) == y).sum()),
            "n": n,
            "fwd_ms": 1e3 * (t1 - t0),
            "bwd_ms": 1e3 * (t2 - t1),
            "fwd_steps_sum": 0.0,
            "fwd_samples": 0,
            "fwd_unconverged": 0,
            "bwd_unconverged": 0,
            "bwd_samples": 0,
            "bwd_vjps": 0,
            "adjoint_ms": 0.0,
            "adjoint_timed": 0,
        }
        for info in infos:
            stats["fwd_steps_sum"] += float(info.nstep.sum())
            stats["fwd_samples"] += info.nstep.numel()
            stats["fwd_unconverged"] += int((~info.converged).sum())
            bwd = info.backward
            if bwd is not None:
                if bwd.time_s is not None:  # None: not separable from the backward (Unrolled)
                    stats["adjoint_ms"] += 1e3 * bwd.time_s
                    stats["adjoint_timed"] += 1
                stats["bwd_vjps"] += bwd.vjps
                if bwd.solve is not None:
                    stats["bwd_samples"] += bwd.solve.converged.numel()
                    stats["bwd_unconverged"] += int((~bwd.solve.converged).sum())
        return stats

    def _accumulate(self, s: dict[str, Any]) -> None:
        a = self._acc
        a["loss_sum"] += s["loss"] * s["n"]
        a["correct"] += s["correct"]
        a["n"] += s["n"]
        a["steps"] += 1
        for k in ("fwd_steps_sum", "fwd_samples", "fwd_unconverged", "bwd_unconverged", "bwd_samples", "bwd_vjps", "fwd_ms", "bwd_ms", "adjoint_ms", "adjoint_timed"):
            a[k] += s[k]

    def _postfix(self) -> dict[str, str]:
        a = self._acc
        fwd = _mean(a["fwd_steps_sum"], a["fwd_samples"])
        out = {"loss": f"{a['loss_sum'] / max(a['n'], 1):.3f}", "acc": f"{a['correct'] / max(a['n'], 1):.3f}"}
        if fwd is not None:
            out["fwd"] = f"{fwd:.1f}"
            out["conv"] = f"{1 - a['fwd_unconverged'] / a['fwd_samples']:.2f}"
        out["bwd_ms"] = f"{a['bwd_ms'] / max(a['steps'], 1):.1f}"
        return out

    def _record(self, epoch: int, val: Optional[dict[str, Any]]) -> dict[str, Any]:
        a = self._acc
        steps = a["steps"]
        fwd_conv = None if a["fwd_samples"] == 0 else 1.0 - a["fwd_unconverged"] / a["fwd_samples"]
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None
        return {
            "epoch": epoch + 1,
            "global_step": self._pos["global_step"],
            "lr": lr,
            "train_loss": _mean(a["loss_sum"], a["n"]),
            "train_acc": _mean(a["correct"], a["n"]),
            "val_loss": None if val is None else val["loss"],
            "val_acc": None if val is None else val["acc"],
            "fwd_steps": _mean(a["fwd_steps_sum"], a["fwd_samples"]),
            "fwd_converged": fwd_conv,
            "fwd_unconverged": int(a["fwd_unconverged"]),
            "bwd_unconverged": int(a["bwd_unconverged"]),
            "bwd_vjps": _mean(a["bwd_vjps"], steps),
            "fwd_ms": _mean(a["fwd_ms"], steps),
            "bwd_ms": _mean(a["bwd_ms"], steps),
            "adjoint_ms": _mean(a["adjoint_ms"], steps) if a["adjoint_timed"] else None,
            "val_fwd_steps": None if val is None else val["fwd_steps"],
            "val_fwd_converged": None if val is None else val["fwd_converged"],
            "val_fwd_unconverged": None if val is None else val["fwd_unconverged"],
            "steps": int(steps),
            "epoch_s": a["epoch_s"],
            "elapsed_s": self._elapsed(),
        }

    # -- public ----------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs (or ``config.max_steps`` steps); return the history.

        Args:
            resume: continue from ``<checkpoint_dir>/last.pt`` (a fresh run when there is none yet).

        Returns:
            :attr:`history`: one dict per epoch with ``epoch`` (1-based), ``global_step``, ``lr``,
            ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc`` (``None`` when not evaluated),
            ``fwd_steps`` (mean forward solver steps per sample), ``fwd_converged`` (fraction of
            forward solves that converged), ``fwd_unconverged`` (count), ``bwd_unconverged``
            (adjoint solves of ``Exact`` that missed their tolerance), ``bwd_vjps`` (per step),
            ``fwd_ms`` / ``bwd_ms`` (wall-clock per step of forward+loss and of
            ``loss.backward()``), ``adjoint_ms`` (of that, the estimator computing ``w``;
            ``None`` for :class:`~deqkit.estimators.Unrolled`, whose ``w`` is autograd's own pass),
            ``val_fwd_*``, ``steps``, ``epoch_s`` and ``elapsed_s`` (total training wall clock,
            across resumes).

        Raises:
            KeyboardInterrupt: after saving a checkpoint (see the module docstring).
        """
        cfg = self.config
        self.model.to(self.device)
        ckpt_path = self.checkpoint_path
        if resume and ckpt_path is None:
            raise ValueError("Trainer.fit(resume=True) needs config.checkpoint_dir.")
        if resume and ckpt_path is not None and ckpt_path.is_file():
            self.load_checkpoint(ckpt_path)
        else:
            if resume:
                warnings.warn(f"no checkpoint at {ckpt_path}; starting a fresh run.", stacklevel=2)
            seed_everything(cfg.seed)
            self._build_optimizer()
            self.history = []
            self._pos = {"epoch": 0, "batch": 0, "global_step": 0}
            self._acc = _new_accumulator()
            self._elapsed_before = 0.0
            self._t_start = time.perf_counter()
        self._open_tensorboard()
        n = len(self.train_set)  # type: ignore[arg-type]
        spe = self.steps_per_epoch
        use_bar = cfg.progress and sys.stderr.isatty()
        tqdm_cls = None
        if use_bar:
            try:
                from tqdm.auto import tqdm as tqdm_cls  # type: ignore[no-redef]
            except ImportError:
                tqdm_cls = None

        guard = _InterruptGuard()
        self._consistent = True
        self._rng_snapshot = None
        with guard, _quiet_deqs(self.model):
            try:
                while self._pos["epoch"] < cfg.epochs:
                    epoch = self._pos["epoch"]
                    if cfg.max_steps is not None and self._pos["global_step"] >= cfg.max_steps and self._pos["batch"] == 0:
                        break
                    perm = torch.randperm(n, generator=_epoch_generator(cfg.seed, epoch))
                    self.model.train()
                    bar = None
                    if tqdm_cls is not None:
                        bar = tqdm_cls(total=spe, initial=self._pos["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                                       leave=False, dynamic_ncols=True)
                    t_epoch = time.perf_counter()
                    try:
                        for b in range(self._pos["batch"], spe):
                            if cfg.max_steps is not None and self._pos["global_step"] >= cfg.max_steps:
                                break
                            if guard.requested:
                                raise KeyboardInterrupt
                            self._rng_snapshot = _rng_state()
                            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                            x, y = (t.to(self.device, non_blocking=True) for t in _fetch(self.train_set, idx))
                            stats = self._step(x, y)
                            self._accumulate(stats)
                            self._pos["batch"] = b + 1
                            self._pos["global_step"] += 1
                            self._rng_snapshot = None
                            self._consistent = True
                            if bar is not None:
                                bar.set_postfix(self._postfix(), refresh=False)
                                bar.update(1)
                            step = {"epoch": epoch + 1, "batch": b + 1, "global_step": self._pos["global_step"], **stats}
                            for cb in self.callbacks:
                                cb.on_step_end(self, step)
                    finally:
                        self._acc["epoch_s"] += time.perf_counter() - t_epoch
                        if bar is not None:
                            bar.close()
                    if guard.requested:
                        raise KeyboardInterrupt
                    val = None
                    last = epoch + 1 == cfg.epochs or (cfg.max_steps is not None and self._pos["global_step"] >= cfg.max_steps)
                    if self.val_set is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
                        val = self._evaluate(self.val_set, guard=guard)
                    record = self._record(epoch, val)
                    self.history.append(record)
                    self._pos = {"epoch": epoch + 1, "batch": 0, "global_step": self._pos["global_step"]}
                    self._acc = _new_accumulator()
                    if ckpt_path is not None:
                        self.save_checkpoint(ckpt_path)
                    self._log(record)
                    for cb in self.callbacks:
                        cb.on_epoch_end(self, record)
            except KeyboardInterrupt:
                self._on_interrupt()
                raise
        if self._tb is not None:
            self._tb.flush()
        return self.history

    def _on_interrupt(self) -> None:
        path = self.checkpoint_path
        if path is None:
            print("deqkit: training interrupted (no checkpoint_dir: nothing saved).", file=sys.stderr, flush=True)
            return
        if not self._consistent:
            print(
                f"deqkit: training interrupted inside a parameter update; keeping the last checkpoint {path}.",
                file=sys.stderr,
                flush=True,
            )
            return
        self.save_checkpoint(path, rng=self._rng_snapshot)
        print(
            f"deqkit: training interrupted at epoch {self._pos['epoch'] + 1}, step {self._pos['batch']} "
            f"(global step {self._pos['global_step']}); checkpoint saved to {path}. Resume with fit(resume=True).",
            file=sys.stderr,
            flush=True,
        )

    def _evaluate(self, dataset: Dataset, batch_size: Optional[int] = None, guard: Optional[_InterruptGuard] = None) -> dict[str, Any]:
        bs = batch_size or self.config.batch_size
        n = len(dataset)  # type: ignore[arg-type]
        was_training = self.model.training
        self.model.eval()
        loss_sum, correct, steps_sum, samples, unconv = 0.0, 0, 0.0, 0, 0
        try:
            with torch.no_grad():
                for start in range(0, n, bs):
                    if guard is not None and guard.requested:
                        raise KeyboardInterrupt
                    idx = torch.arange(start, min(start + bs, n))
                    x, y = (t.to(self.device) for t in _fetch(dataset, idx))
                    infos: list[DEQInfo] = []
                    with _collect_infos(self.model, infos):
                        logits = self.model(x)
                    loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                    correct += int((logits.argmax(dim=1) == y).sum())
                    for info in infos:
                        steps_sum += float(info.nstep.sum())
                        samples += info.nstep.numel()
                        unconv += int((~info.converged).sum())
        finally:
            self.model.train(was_training)
        return {
            "loss": _mean(loss_sum, n),
            "acc": _mean(correct, n),
            "n": n,
            "fwd_steps": _mean(steps_sum, samples),
            "fwd_converged": None if samples == 0 else 1.0 - unconv / samples,
            "fwd_unconverged": unconv,
        }

    def evaluate(self, dataset: Dataset, batch_size: Optional[int] = None) -> dict[str, Any]:
        """Loss and accuracy on ``dataset`` in eval mode, plus forward-solve statistics.

        Returns a dict with ``loss``, ``acc``, ``n``, ``fwd_steps`` (mean solver steps per
        sample), ``fwd_converged`` (fraction) and ``fwd_unconverged`` (count).
        """
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("Trainer.evaluate: the dataset is empty.")
        self.model.to(self.device)
        with _quiet_deqs(self.model):
            return self._evaluate(dataset, batch_size)
