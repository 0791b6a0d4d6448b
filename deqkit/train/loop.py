"""The training loop: :class:`Trainer`.

:class:`Trainer` trains any ``nn.Module`` classifier (``model(x) -> logits``) with cross-entropy,
and additionally reports what every :class:`~deqkit.deq.DEQ` inside it did: forward solver
steps, the fraction of samples whose forward solve converged, the number that did not, the
backward (adjoint) failures of :class:`~deqkit.estimators.Exact`, and the wall-clock cost of
forward and backward per step (see :mod:`deqkit.train.metrics`).

Reproducibility and resume:

* the data order is a pure function of ``(seed, epoch)``: each epoch shuffles with a fresh
  ``torch.Generator`` seeded from both, so a resumed run sees exactly the batches an
  uninterrupted one would;
* after each epoch a checkpoint is written atomically to ``<checkpoint_dir>/last.pt`` (see
  :mod:`deqkit.train.checkpoint`);
* ``Ctrl-C`` (SIGINT) during :meth:`Trainer.fit` finishes the current optimisation step,
  writes a checkpoint of that state (mid-epoch position included) and re-raises
  ``KeyboardInterrupt``; a second ``Ctrl-C`` aborts at once. A ``KeyboardInterrupt`` raised by
  other means (a callback, a debugger) saves the last completed step likewise, unless it
  arrived inside the parameter update, in which case the last checkpoint is kept;
* ``fit(resume=True)`` continues from ``last.pt``; on CPU the result equals an uninterrupted
  run's bit for bit (same config, same data).
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from .._options import validated_options
from .._timing import synced_perf_counter
from ..deq import DEQInfo
from ..errors import NonFiniteError, OptionError
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    atomic_torch_save,
    augment_generator,
    deq_settings,
    epoch_generator,
    read_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
    step_generator,
    warn_on_changed_settings,
)
from .config import TrainConfig
from .metrics import Callback, Metrics, MetricsLog, collect_infos, evaluation_record, quiet_deqs, solve_stats, step_stats
from .precision import amp_dtype, autocast, compile_cells, make_grad_scaler, scaled_backward, scaler_step

__all__ = ["Trainer", "STABILITY_KEYS", "stability_stats", "stability_record", "stability_postfix"]

PathLike = Union[str, "os.PathLike[str]"]


def _fetch(dataset: Dataset, idx: Tensor) -> Sequence[Tensor]:
    if isinstance(dataset, TensorDataset):
        return [t[idx] for t in dataset.tensors]
    return default_collate([dataset[int(i)] for i in idx])


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

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if an interrupt is pending."""
        if self.requested:
            raise KeyboardInterrupt

    def __enter__(self) -> _InterruptGuard:
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


def _progress_bar_class(progress: bool) -> Any:
    """tqdm's class when a bar is wanted and stderr is a terminal, else ``None``."""
    if not (progress and sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def _check_trainer_inputs(model: Any, train_set: Any, config: Any) -> TrainConfig:
    """The config as a :class:`TrainConfig`, after checking the model and training set."""
    if not isinstance(model, nn.Module):
        raise OptionError(f"Trainer: model must be an nn.Module, got {type(model).__name__}.")
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    elif not isinstance(config, TrainConfig):
        raise OptionError(f"Trainer: config must be a TrainConfig or a dict, got {type(config).__name__}.")
    try:
        n_train = len(train_set)
    except TypeError as exc:
        raise OptionError("Trainer: train_set must be a map-style dataset with a length.") from exc
    if n_train == 0:
        raise OptionError("Trainer: train_set is empty.")
    return config


@validated_options
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
        augment: applied to every training batch as ``augment(x, generator)`` (e.g. an
            :class:`~deqkit.train.ImageAugment`); the generator is seeded by ``(config.seed,
            step, rank)``, so a resumed run augments as an uninterrupted one. Never applied to
            evaluation. ``None``: no augmentation.

    Attributes:
        history: one dict per completed epoch (see :meth:`fit`).
        optimizer, scheduler: built by :meth:`fit`.
    """

    #: this process's rank (a :class:`~deqkit.train.distributed.DistributedTrainer` sets its own)
    rank: int = 0

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        val_set: Optional[Dataset] = None,
        config: Union[TrainConfig, dict[str, Any], None] = None,
        *,
        callbacks: Sequence[Callback] = (),
        augment: Optional[Callable[[Tensor, torch.Generator], Tensor]] = None,
    ) -> None:
        config = _check_trainer_inputs(model, train_set, config)
        if augment is not None and not callable(augment):
            raise OptionError(f"Trainer: augment must be a callable augment(x, generator), got {type(augment).__name__}.")
        self.augment = augment
        self.model = model
        self.train_set = train_set
        self.val_set = val_set
        self.config = config
        self.callbacks = list(callbacks)
        self.device = config.resolved_device()
        self._amp_dtype = amp_dtype(config.amp, self.device)  # refuses fp16 off CUDA
        self._scaler = make_grad_scaler(config.amp, self.device)
        self._amp_skipped = 0  # 1 when the GradScaler skipped the last step (overflow)
        self.history: list[dict[str, Any]] = []
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self._pos = {"epoch": 0, "batch": 0, "global_step": 0}
        self._metrics = Metrics()
        self._elapsed_before = 0.0
        self._t_start = time.perf_counter()
        self._rng_snapshot: Optional[dict[str, Any]] = None
        self._consistent = True
        self._log = MetricsLog(config.log_path, config.tensorboard_dir)
        self._stabilisers = _Stabilisers(model, config)
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

    def _steps_exhausted(self) -> bool:
        return self.config.max_steps is not None and self._pos["global_step"] >= self.config.max_steps

    # -- building --------------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise OptionError("Trainer: the model has no trainable parameters.")
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
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": rng_state() if rng is None else rng,
            "data_generator": epoch_generator(self.config.seed, epoch).get_state(),
            "epoch": epoch,
            "batch": self._pos["batch"],
            "global_step": self._pos["global_step"],
            "accumulator": dict(self._metrics.sums),
            "history": list(self.history),
            "elapsed_s": self._elapsed(),
            "n_train": len(self.train_set),  # type: ignore[arg-type]
            "config": self.config.to_dict(),
            "deqs": deq_settings(self.model),
            "augment": repr(self.augment),
            "scaler": None if self._scaler is None else self._scaler.state_dict(),
        }

    def save_checkpoint(self, path: Optional[PathLike] = None, *, rng: Optional[dict[str, Any]] = None) -> Path:
        """Write the current state atomically to ``path`` (default :attr:`checkpoint_path`)."""
        target = Path(path) if path is not None else self.checkpoint_path
        if target is None:
            raise OptionError("Trainer.save_checkpoint: no path given and config.checkpoint_dir is None.")
        if self.optimizer is None:
            self._build_optimizer()
        atomic_torch_save(self._checkpoint(rng), target)
        return target

    def load_checkpoint(self, path: Optional[PathLike] = None) -> dict[str, Any]:
        """Restore model, optimiser, scheduler, RNG states, position and history from ``path``."""
        source = Path(path) if path is not None else self.checkpoint_path
        if source is None:
            raise OptionError("Trainer.load_checkpoint: no path given and config.checkpoint_dir is None.")
        ckpt = read_checkpoint(source, len(self.train_set))  # type: ignore[arg-type]
        changed = warn_on_changed_settings(source, ckpt, self.config, self.model, augment=repr(self.augment))
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise ValueError(f"{source} does not match this model's architecture: {exc}") from exc
        self.model.to(self.device)
        self._restore_optimizer(ckpt, schedule_changed="epochs" in changed or "max_steps" in changed)
        set_rng_state(ckpt["rng"])
        if self._scaler is not None and ckpt.get("scaler") is not None:
            self._scaler.load_state_dict(ckpt["scaler"])
        self._pos = {"epoch": int(ckpt["epoch"]), "batch": int(ckpt["batch"]), "global_step": int(ckpt["global_step"])}
        self._metrics = Metrics(ckpt["accumulator"])
        self.history = list(ckpt["history"])
        self._elapsed_before = float(ckpt["elapsed_s"])
        self._t_start = time.perf_counter()
        return ckpt

    def _restore_optimizer(self, ckpt: dict[str, Any], schedule_changed: bool) -> None:
        self._build_optimizer()
        assert self.optimizer is not None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if schedule_changed:
                self.scheduler.T_max = max(self.total_steps, 1)  # type: ignore[attr-defined]

    # -- one step --------------------------------------------------------------------------------
    def _step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        """One optimisation step on ``(x, y)``; its statistics (see :func:`metrics.step_stats`)."""
        assert self.optimizer is not None
        infos: list[DEQInfo] = []
        self.optimizer.zero_grad(set_to_none=True)
        self._stabilisers.before_step(self._pos["global_step"])
        try:  # the DEQs' own settings come back even when the step raises (a caller may go on)
            t0 = synced_perf_counter(self.device)
            module = self._train_module()
            with collect_infos(self.model, infos), autocast(self._amp_dtype, self.device):
                logits = module(x, target=y) if self._passes_target else module(x)
                loss = self._loss(logits, y)
            extra_loss = self._stabilisers.extra_loss(infos, y, self._pos["global_step"] / max(self.total_steps, 1))
            t1 = synced_perf_counter(self.device)
            if not torch.isfinite(loss):
                raise NonFiniteError(
                    f"Trainer: the training loss is {loss.item()} at step {self._pos['global_step'] + 1}. "
                    f"Lower the learning rate, set grad_clip, or use a contractive cell (spectral_norm=True)."
                )
            self._backward(loss + extra_loss if extra_loss is not None else loss)
            t2 = synced_perf_counter(self.device)
        finally:
            self._stabilisers.after_step()
        self._update_parameters()
        return {
            "amp_skipped": self._amp_skipped,
            **stability_stats(infos),
            "loss": float(loss.detach()),
            "correct": int((logits.detach().argmax(dim=1) == y).sum()),
            "n": y.shape[0],
            "fwd_ms": 1e3 * (t1 - t0),
            "bwd_ms": 1e3 * (t2 - t1),
            **step_stats([info for info in infos if not info.unrolled]),  # pre-training calls are no solves
        }

    # -- hooks of the step (DistributedTrainer overrides them; mixed precision lives here) -------
    def _train_module(self) -> nn.Module:
        """The module the training forward calls (the model; its DDP wrapper when distributed)."""
        return self.model

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """The training loss of one step (mean cross-entropy)."""
        return F.cross_entropy(logits, y)

    def _backward(self, loss: Tensor) -> None:
        """``loss.backward()``, scaled by the GradScaler under ``amp="fp16"`` (an overflow is then the scaler's to skip)."""
        scaled_backward(self._scaler, loss)

    def _prepare_model(self) -> None:
        """Once the model is on its device: compile its DEQ cells (``config.compile_cell``)."""
        if self.config.compile_cell:
            compile_cells(self.model, self.config.compile_backend)

    def _make_guard(self) -> _InterruptGuard:
        return _InterruptGuard()

    def _shard(self, idx: Tensor) -> Tensor:
        """The indices of the step's batch this process trains on (all of them in one process)."""
        return idx

    def _update_parameters(self) -> None:
        assert self.optimizer is not None
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip) if self.config.grad_clip is not None else None
        if self._scaler is None and params:  # (under fp16 loss scaling a non-finite gradient is the scaler's to skip)
            self._check_finite_gradients(
                torch.nn.utils.get_total_norm([cast(Tensor, p.grad) for p in params]) if norm is None else norm
            )
        self._consistent = False
        if self._scaler is not None:
            self._amp_skipped = int(scaler_step(self._scaler, self.optimizer))
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            with warnings.catch_warnings():
                if self._amp_skipped:  # the scaler skipped optimizer.step(); the schedule still follows the step count
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                self.scheduler.step()

    def _check_finite_gradients(self, norm: Tensor) -> None:
        """Refuse an optimiser step on NaN/Inf gradients (the parameters stay as they were).

        The adjoint estimators raise on a non-finite backward themselves; the unrolled ones
        (``Unrolled``, ``JacobianFree``, pre-training steps) and the layers around the DEQ carry
        NaN/Inf into the gradients, which this one check per step (the gradient norm) catches."""
        if bool(torch.isfinite(norm)):
            return
        from .metrics import deqs

        names = sorted({type(deq.grad).__name__ for deq in deqs(self.model)})
        raise NonFiniteError(
            f"Trainer: the gradients contain NaN/Inf at step {self._pos['global_step'] + 1} (estimator "
            f"{', '.join(names) or 'none'}); the parameters were not updated. Lower the learning rate, set grad_clip, "
            f"add Jacobian regularisation (jac_reg), or check the cell's backward is finite where the forward is."
        )

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs (or ``config.max_steps`` steps); return the history.

        Args:
            resume: continue from ``<checkpoint_dir>/last.pt`` (a fresh run when there is none yet).

        Returns:
            :attr:`history`: one dict per epoch with ``epoch`` (1-based), ``global_step``, ``lr``,
            ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc`` (``None`` when not evaluated),
            ``fwd_steps`` (mean forward solver steps per sample), ``fwd_converged`` (fraction of
            forward solves that converged), ``fwd_unconverged`` (count), ``bwd_unconverged``
            (adjoint solves of ``Exact`` that missed their tolerance), ``bwd_fallback`` (samples
            whose ``w`` fell back to the Jacobian-free ``v``: SHINE's fallback, ``Exact`` where the
            forward missed its tolerance), ``bwd_vjps`` (per step),
            ``bwd_amplification`` (the epoch's largest ``‖w‖ / ‖v‖``, see
            :class:`~deqkit.estimators.BackwardStats`; ``None`` without an adjoint hook),
            ``fwd_ms`` / ``bwd_ms`` (wall-clock per step of forward+loss and of
            ``loss.backward()``), ``adjoint_ms`` (of that, the estimator computing ``w``;
            ``None`` for :class:`~deqkit.estimators.Unrolled`, whose ``w`` is autograd's own pass),
            ``val_fwd_*``, ``steps``, ``epoch_s`` and ``elapsed_s`` (total training wall clock,
            across resumes); and the stability of the training solves (see
            :func:`stability_record`): ``fwd_residual`` / ``fwd_residual_max`` (mean / largest
            forward residual), ``spectral_radius`` / ``spectral_radius_max`` (mean / largest
            over the monitored samples, ``None`` if none was monitored), ``jac_fro`` (mean
            Hutchinson ``‖J‖²_F / d``), ``jac_steps`` (steps that applied Jacobian
            regularisation) and ``pretrain_steps`` (unrolled pre-training steps this epoch; their
            calls are no solves and are left out of ``fwd_*``); ``amp_skipped``: steps the fp16
            loss scaler skipped because the scaled gradients overflowed (always 0 without one).

        Raises:
            KeyboardInterrupt: after saving a checkpoint (see the module docstring).
        """
        self.model.to(self.device)
        self._prepare_model()
        self._start(resume)
        self._stabilisers.configure()
        self._log.open(self.history)
        bar_class = _progress_bar_class(self.config.progress)
        guard = self._make_guard()
        self._consistent = True
        self._rng_snapshot = None
        with guard, quiet_deqs(self.model):
            try:
                while self._pos["epoch"] < self.config.epochs:
                    if self._steps_exhausted() and self._pos["batch"] == 0:
                        break
                    self._run_epoch(guard, bar_class)
                    self._end_epoch(guard)
            except KeyboardInterrupt:
                self._on_interrupt()
                raise
        self._log.flush()
        return self.history

    def _start(self, resume: bool) -> None:
        """Load the checkpoint (``resume``) or set up a fresh run."""
        ckpt_path = self.checkpoint_path
        if resume and ckpt_path is None:
            raise OptionError("Trainer.fit(resume=True) needs config.checkpoint_dir.")
        if resume and ckpt_path is not None and ckpt_path.is_file():
            self.load_checkpoint(ckpt_path)
            return
        if resume:
            warnings.warn(f"no checkpoint at {ckpt_path}; starting a fresh run.", stacklevel=3)
        seed_everything(self.config.seed)
        self._build_optimizer()
        self.history = []
        self._pos = {"epoch": 0, "batch": 0, "global_step": 0}
        self._metrics = Metrics()
        self._elapsed_before = 0.0
        self._t_start = time.perf_counter()

    def _run_epoch(self, guard: _InterruptGuard, bar_class: Any) -> None:
        """The optimisation steps of the current epoch, from the current batch on."""
        cfg, epoch = self.config, self._pos["epoch"]
        perm = torch.randperm(len(self.train_set), generator=epoch_generator(cfg.seed, epoch))  # type: ignore[arg-type]
        self.model.train()
        bar = None
        if bar_class is not None:
            bar = bar_class(
                total=self.steps_per_epoch,
                initial=self._pos["batch"],
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                leave=False,
                dynamic_ncols=True,
            )
        t_epoch = time.perf_counter()
        try:
            for b in range(self._pos["batch"], self.steps_per_epoch):
                if self._steps_exhausted():
                    break
                guard.check()
                self._run_batch(epoch, b, perm[b * cfg.batch_size : (b + 1) * cfg.batch_size], bar)
        finally:
            self._metrics.sums["epoch_s"] += time.perf_counter() - t_epoch
            if bar is not None:
                bar.close()

    def _run_batch(self, epoch: int, b: int, idx: Tensor, bar: Any) -> None:
        self._rng_snapshot = rng_state()
        x, y = (t.to(self.device, non_blocking=True) for t in _fetch(self.train_set, self._shard(idx)))
        if self.augment is not None:
            x = self.augment(x, augment_generator(self.config.seed, self._pos["global_step"], self.rank))
        stats = self._step(x, y)
        self._metrics.add(stats)
        for k in STABILITY_KEYS:
            if k.endswith("_max"):
                _max_merge(self._metrics.sums, k, stats[k])
            else:
                self._metrics.sums[k] = self._metrics.sums.get(k, 0.0) + stats[k]
        self._pos["batch"] = b + 1
        self._pos["global_step"] += 1
        self._rng_snapshot = None
        self._consistent = True
        if bar is not None:
            bar.set_postfix({**self._metrics.postfix(), **stability_postfix(self._metrics.sums)}, refresh=False)
            bar.update(1)
        step = {"epoch": epoch + 1, "batch": b + 1, "global_step": self._pos["global_step"], **stats}
        for cb in self.callbacks:
            cb.on_step_end(self, step)

    def _end_epoch(self, guard: _InterruptGuard) -> None:
        """Validate (when due), record, checkpoint, log and call the epoch callbacks."""
        guard.check()
        cfg, epoch = self.config, self._pos["epoch"]
        last = epoch + 1 == cfg.epochs or self._steps_exhausted()
        val = None
        if self.val_set is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
            val = self._evaluate(self.val_set, guard=guard)
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None
        record = self._metrics.record(epoch, self._pos["global_step"], lr, val, self._elapsed())
        record.update(stability_record(self._metrics.sums))
        self.history.append(record)
        self._pos = {"epoch": epoch + 1, "batch": 0, "global_step": self._pos["global_step"]}
        self._metrics = Metrics()
        if self.checkpoint_path is not None:
            self.save_checkpoint(self.checkpoint_path)
        self._log.write(record)
        for cb in self.callbacks:
            cb.on_epoch_end(self, record)

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

    # -- evaluation ------------------------------------------------------------------------------
    def _evaluate(
        self, dataset: Dataset, batch_size: Optional[int] = None, guard: Optional[_InterruptGuard] = None
    ) -> dict[str, Any]:
        bs = batch_size or self.config.batch_size
        n = len(dataset)  # type: ignore[arg-type]
        was_training = self.model.training
        self.model.eval()
        loss_sum, correct, infos = 0.0, 0, []
        try:
            with torch.no_grad():
                for start in range(0, n, bs):
                    if guard is not None:
                        guard.check()
                    x, y = (t.to(self.device) for t in _fetch(dataset, torch.arange(start, min(start + bs, n))))
                    with collect_infos(self.model, infos):
                        logits = self.model(x)
                    loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                    correct += int((logits.argmax(dim=1) == y).sum())
        finally:
            self.model.train(was_training)
        return evaluation_record(loss_sum, correct, n, solve_stats(infos))

    def evaluate(self, dataset: Dataset, batch_size: Optional[int] = None) -> dict[str, Any]:
        """Loss and accuracy on ``dataset`` in eval mode, plus forward-solve statistics.

        Returns a dict with ``loss``, ``acc``, ``n``, ``fwd_steps`` (mean solver steps per
        sample), ``fwd_converged`` (fraction) and ``fwd_unconverged`` (count).
        """
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise OptionError("Trainer.evaluate: the dataset is empty.")
        self.model.to(self.device)
        with quiet_deqs(self.model):
            return self._evaluate(dataset, batch_size)


# -- stabilisers of DEQ training (Jacobian regularisation, monitor, pre-training, FPC) ----------

#: the per-step sums behind the epoch's stability fields (kept in the metric accumulator, so
#: they survive a resume)
STABILITY_KEYS = (
    "fwd_residual_sum",
    "fwd_residual_max",
    "rho_sum",
    "rho_max",
    "rho_samples",
    "jac_fro_sum",
    "jac_fro_count",
    "jac_steps",
    "pretrain_steps",
)


def stability_stats(infos: list[DEQInfo]) -> dict[str, float]:
    """One step's stability sums over its DEQ calls (see :data:`STABILITY_KEYS`)."""
    out = {k: 0.0 for k in STABILITY_KEYS}
    for info in infos:
        out["pretrain_steps"] += info.unrolled
        if info.unrolled:  # not a solve: neither a converged nor a failed one (counted in pretrain_steps)
            continue
        res = info.forward.residual.detach().float()
        out["fwd_residual_sum"] += float(res.sum())
        out["fwd_residual_max"] = max(out["fwd_residual_max"], float(res.max()) if res.numel() else 0.0)
        if info.spectral_radius is not None:
            rho = info.spectral_radius.float()
            out["rho_sum"] += float(rho.sum())
            out["rho_max"] = max(out["rho_max"], float(rho.max()))
            out["rho_samples"] += rho.numel()
        if info.jac_fro is not None:
            out["jac_fro_sum"] += info.jac_fro
            out["jac_fro_count"] += 1
        out["jac_steps"] += info.jac_loss is not None
    out["jac_steps"] = float(out["jac_steps"] > 0)
    out["pretrain_steps"] = float(out["pretrain_steps"] > 0)
    return out


def _max_merge(sums: dict[str, float], key: str, value: float) -> None:
    sums[key] = max(sums.get(key, 0.0), value)


def stability_record(sums: dict[str, float]) -> dict[str, Any]:
    """The epoch's stability fields from the accumulated sums (see :meth:`Trainer.fit`)."""
    samples = sums.get("fwd_samples", 0.0)
    rho_n, jac_n = sums.get("rho_samples", 0.0), sums.get("jac_fro_count", 0.0)
    return {
        "fwd_residual": None if not samples else sums.get("fwd_residual_sum", 0.0) / samples,
        "fwd_residual_max": sums.get("fwd_residual_max", 0.0) if samples else None,
        "spectral_radius": None if not rho_n else sums["rho_sum"] / rho_n,
        "spectral_radius_max": None if not rho_n else sums["rho_max"],
        "jac_fro": None if not jac_n else sums["jac_fro_sum"] / jac_n,
        "jac_steps": int(sums.get("jac_steps", 0.0)),
        "pretrain_steps": int(sums.get("pretrain_steps", 0.0)),
    }


def stability_postfix(sums: dict[str, float]) -> dict[str, str]:
    """The progress bar's stability fields: mean forward residual and spectral radius."""
    rec = stability_record(sums)
    out = {}
    if rec["fwd_residual"] is not None:
        out["res"] = f"{rec['fwd_residual']:.1e}"
    if rec["spectral_radius"] is not None:
        out["rho"] = f"{rec['spectral_radius']:.2f}"
    return out


class _Stabilisers:
    """What :class:`TrainConfig`'s stabiliser fields do to the model's DEQs, step by step."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.model, self.config = model, config
        self._saved: list[tuple[Any, int, Optional[int]]] = []
        self._jac_reg: Any = None
        self._saved_generators: list[tuple[Any, Optional[torch.Generator]]] = []

    def _deqs(self) -> list[Any]:
        from .metrics import deqs

        return deqs(self.model)

    def configure(self) -> None:
        """Give every DEQ the run's regulariser, iteration-cap range and iterate memory."""
        from ..regularizers import JacobianRegularizer

        cfg = self.config
        if cfg.jac_reg_weight > 0:
            self._jac_reg = JacobianRegularizer(
                cfg.jac_reg_weight,
                freq=cfg.jac_reg_freq,
                probes=cfg.jac_reg_probes,
                warmup=cfg.jac_reg_warmup,
                stop=cfg.jac_reg_stop,
            )
        if cfg.fpc_iterates and not isinstance(getattr(self.model, "head", None), nn.Module):
            raise OptionError(
                "Trainer: fpc_iterates needs a model with a `head` module mapping the DEQ state to logits "
                "(DEQClassifier has one); set fpc_iterates=0."
            )
        for deq in self._deqs():
            if self._jac_reg is not None:
                deq.jac_reg = self._jac_reg
            if cfg.random_max_iter is not None:
                deq.random_max_iter = tuple(cfg.random_max_iter)
            if cfg.fpc_iterates:
                deq.keep_iterates = cfg.fpc_iterates

    def before_step(self, global_step: int) -> None:
        """Unrolled pre-training for the first steps; the spectral monitor on every ``monitor_every``-th."""
        cfg = self.config
        monitor = cfg.monitor_every > 0 and global_step % cfg.monitor_every == 0
        pretrain = global_step < cfg.pretrain_steps
        self._saved = []
        for deq in self._deqs():
            self._saved.append((deq, deq.spectral_radius_iters, deq.unrolled_depth))
            if monitor:
                deq.spectral_radius_iters = cfg.monitor_iters
            if pretrain:
                deq.unrolled_depth = cfg.pretrain_depth
        self._set_decision_generator(global_step)

    def _set_decision_generator(self, global_step: Optional[int]) -> None:
        """The step's random decisions (iteration cap, Jacobian penalty) come from a generator
        that is a function of ``(seed, global_step)``: the same on every rank and under resume.
        ``None``: put back the DEQs' own generators after the step."""
        if global_step is None:
            for deq, gen in self._saved_generators:
                deq.decision_generator = gen
            self._saved_generators = []
            return
        step_gen = step_generator(self.config.seed, global_step)
        self._saved_generators = [(deq, deq.decision_generator) for deq in self._deqs()]
        for deq, _ in self._saved_generators:
            deq.decision_generator = step_gen

    def after_step(self) -> None:
        for deq, iters, depth in self._saved:
            deq.spectral_radius_iters, deq.unrolled_depth = iters, depth
        self._saved = []
        self._set_decision_generator(None)

    def extra_loss(self, infos: list[DEQInfo], y: Tensor, progress: float) -> Optional[Tensor]:
        """Jacobian regularisation and fixed-point correction terms of this step (``None``: none)."""
        cfg = self.config
        total: Optional[Tensor] = None
        for info in infos:
            if info.jac_loss is not None and self._jac_reg is not None:
                w = self._jac_reg.weight_at(progress)
                if w > 0:
                    total = w * info.jac_loss if total is None else total + w * info.jac_loss
            if cfg.fpc_iterates and info.iterates and info.cell_fn is not None:
                from ..regularizers import fixed_point_correction

                head: Any = self.model.head
                unpack = info.unpack
                if len(info.iterates) < 2:
                    continue
                # z* is trained by the main loss (weight 1); the earlier iterates get gamma^(n-j)
                term = cfg.fpc_gamma * fixed_point_correction(
                    info.cell_fn,
                    info.iterates[:-1],
                    lambda z: F.cross_entropy(head(z if unpack is None else unpack(z)), y),  # noqa: B023 - used within this iteration
                    gamma=cfg.fpc_gamma,
                )
                total = cfg.fpc_weight * term if total is None else total + cfg.fpc_weight * term
        return total
