"""The settings of a training run: :class:`TrainConfig`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .._options import (
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_number,
    unknown_option_message,
    validated_options,
)
from ..errors import OptionError

__all__ = ["TrainConfig", "OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "none")
_PATHS = ("checkpoint_dir", "log_path", "tensorboard_dir")


@validated_options
@dataclass
class TrainConfig:
    """Settings of a training run; every field is checked (a bad value raises
    :class:`~deqkit.errors.OptionError`, a ``ValueError``).

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
        amp: mixed precision: ``None`` (default, full precision), ``"bf16"`` (autocast to
            bfloat16, CPU or CUDA) or ``"fp16"`` (float16 with a GradScaler, CUDA only); see
            :mod:`deqkit.train.precision`.
        compile_cell: compile every DEQ cell with ``torch.compile`` (the solver loop stays eager).
        compile_backend: ``torch.compile``'s backend for the cells (``"inductor"``, ``"aot_eager"``, ...).

    Stabilisers of DEQ training (each off by default; see :mod:`deqkit.regularizers`):

    Attributes:
        jac_reg_weight: weight of the Jacobian regularisation ``‖∂f/∂z‖²_F / d`` at ``z*``
            (Hutchinson estimate) added to the loss of every DEQ in the model (0: off).
        jac_reg_freq: fraction of training steps it is computed on (in (0, 1]).
        jac_reg_probes: Gaussian probes (VJPs) per estimate.
        jac_reg_warmup: fraction of training over which its weight ramps up from 0.
        jac_reg_stop: fraction of training after which it is switched off (1: never).
        pretrain_steps: the first this many optimisation steps train by backprop through
            ``pretrain_depth`` plain iterations of the cell (no solver), then the implicit gradient.
        pretrain_depth: the plain iterations of those steps.
        random_max_iter: ``(low, high)``: each training forward solve's iteration cap is drawn
            uniformly from ``[low, high]`` (``None``: the solver's own cap).
        monitor_every: every this many steps the spectral radius of ``∂f/∂z`` at ``z*`` (power
            iteration, ``monitor_iters`` VJPs) and a Hutchinson ``‖J‖²_F / d`` are measured on
            that batch and reported per epoch (0: never; costs about one extra step each time).
        monitor_iters: power-iteration steps of that measurement.
        fpc_iterates: fixed-point correction: also train on this many solver iterates (``z*``
            included; ``z*`` keeps the main loss, weight 1, the earlier ones get weights
            ``fpc_gamma^(n−j)``), each by a one-step phantom gradient (0: off;
            the model needs a ``head`` mapping the state to logits, as DEQClassifier has).
        fpc_gamma: the decay of those weights.
        fpc_weight: the weight of that loss relative to the main loss.
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
    amp: Optional[str] = None
    compile_cell: bool = False
    compile_backend: str = "inductor"
    jac_reg_weight: float = 0.0
    jac_reg_freq: float = 1.0
    jac_reg_probes: int = 1
    jac_reg_warmup: float = 0.0
    jac_reg_stop: float = 1.0
    pretrain_steps: int = 0
    pretrain_depth: int = 6
    random_max_iter: Optional[tuple] = None
    monitor_every: int = 20
    monitor_iters: int = 15
    fpc_iterates: int = 0
    fpc_gamma: float = 0.8
    fpc_weight: float = 1.0

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_choices()
        self._check_paths()
        self._check_device()
        self._check_scale_options()
        self._check_stabilisers()

    def _check_scale_options(self) -> None:
        owner = type(self).__name__
        if self.amp is not None:
            if isinstance(self.amp, str):
                self.amp = self.amp.lower()
            check_choice(owner, "amp", self.amp, ("bf16", "fp16"))
        check_bool(owner, "compile_cell", self.compile_cell)
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise OptionError(
                f"{owner}: compile_backend must be a torch.compile backend name such as 'inductor', got {self.compile_backend!r}."
            )

    def _check_stabilisers(self) -> None:
        owner = type(self).__name__
        self.jac_reg_weight = check_number(owner, "jac_reg_weight", self.jac_reg_weight, low=0.0)
        self.jac_reg_freq = check_fraction(owner, "jac_reg_freq", self.jac_reg_freq)
        self.jac_reg_probes = check_int(owner, "jac_reg_probes", self.jac_reg_probes)
        self.jac_reg_warmup = check_fraction(owner, "jac_reg_warmup", self.jac_reg_warmup, include_zero=True)
        self.jac_reg_stop = check_fraction(owner, "jac_reg_stop", self.jac_reg_stop)
        self.pretrain_steps = check_int(owner, "pretrain_steps", self.pretrain_steps, minimum=0)
        self.pretrain_depth = check_int(owner, "pretrain_depth", self.pretrain_depth)
        if self.random_max_iter is not None:
            r = self.random_max_iter
            if not isinstance(r, (tuple, list)) or len(r) != 2:
                raise OptionError(f"{owner}: random_max_iter must be a pair (low, high) or None, got {r!r}.")
            lo, hi = check_int(owner, "random_max_iter[0]", r[0]), check_int(owner, "random_max_iter[1]", r[1])
            if lo > hi:
                raise OptionError(f"{owner}: random_max_iter must have low <= high, got {r!r}.")
            self.random_max_iter = (lo, hi)
        self.monitor_every = check_int(owner, "monitor_every", self.monitor_every, minimum=0)
        self.monitor_iters = check_int(owner, "monitor_iters", self.monitor_iters)
        self.fpc_iterates = check_int(owner, "fpc_iterates", self.fpc_iterates, minimum=0)
        self.fpc_gamma = check_fraction(owner, "fpc_gamma", self.fpc_gamma)
        self.fpc_weight = check_number(owner, "fpc_weight", self.fpc_weight, low=0.0)

    def _check_numbers(self) -> None:
        owner = type(self).__name__
        self.epochs = check_int(owner, "epochs", self.epochs)
        self.batch_size = check_int(owner, "batch_size", self.batch_size)
        self.seed = check_int(owner, "seed", self.seed, minimum=0)
        self.eval_every = check_int(owner, "eval_every", self.eval_every)
        if self.max_steps is not None:
            self.max_steps = check_int(owner, "max_steps", self.max_steps)
        self.lr = check_number(owner, "lr", self.lr, low=0.0, low_open=True)
        self.weight_decay = check_number(owner, "weight_decay", self.weight_decay, low=0.0)
        self.momentum = check_number(owner, "momentum", self.momentum, low=0.0)
        if self.grad_clip is not None:
            self.grad_clip = check_number(owner, "grad_clip", self.grad_clip, low=0.0, low_open=True)

    def _check_choices(self) -> None:
        owner = type(self).__name__
        if isinstance(self.optimizer, str):
            self.optimizer = self.optimizer.lower()
        if isinstance(self.schedule, str):
            self.schedule = self.schedule.lower()
        check_choice(owner, "optimizer", self.optimizer, OPTIMIZERS)
        check_choice(owner, "schedule", self.schedule, SCHEDULES)
        check_bool(owner, "progress", self.progress)

    def _check_paths(self) -> None:
        for name in _PATHS:
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, (str, os.PathLike)) or not str(v):
                    raise OptionError(f"{type(self).__name__}: {name} must be a path or None, got {v!r}.")
                setattr(self, name, os.fspath(v))

    def _check_device(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.device, (str, torch.device)):
            raise OptionError(f"{owner}: device must be a string such as 'cpu', 'cuda', 'cuda:0' or 'auto', got {self.device!r}.")
        self.device = str(self.device)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as exc:
                raise OptionError(
                    f"{owner}: device={self.device!r} is not a valid torch device; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'."
                ) from exc

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. parsed JSON/YAML); an unknown key raises ``OptionError``."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                raise OptionError(unknown_option_message(cls.__name__, str(key), valid))
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
