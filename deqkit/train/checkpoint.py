"""Checkpoints of a training run: atomic save, load with resume checks, RNG states, data order.

A checkpoint holds the model, optimiser, scheduler, the RNG states of torch / numpy / python,
the epoch's data generator, the position in the run, the metrics accumulated so far, the
history, the config and the DEQs' solver/estimator settings. It is written atomically
(temporary file in the same directory, fsync, ``os.replace``): a crash mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import io
import os
import random
import warnings
from pathlib import Path
from typing import Any, Optional, Union, cast

import numpy as np
import torch
from torch import nn

from .._io import atomic_open, load_torch_file
from ..deq import DEQ

__all__ = [
    "CHECKPOINT_NAME",
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "atomic_torch_save",
    "deq_settings",
    "epoch_generator",
    "read_checkpoint",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "step_generator",
    "warn_on_changed_settings",
]

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 1
#: config keys whose change makes a resumed run differ from an uninterrupted one
RESUME_KEYS = ("batch_size", "lr", "weight_decay", "optimizer", "momentum", "schedule", "seed", "grad_clip", "max_steps")

PathLike = Union[str, "os.PathLike[str]"]
#: what every checkpoint holds (a file without one of them is refused, not half-restored)
CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "rng",
    "epoch",
    "batch",
    "global_step",
    "accumulator",
    "history",
    "elapsed_s",
    "n_train",
    "config",
)
#: what to do about a checkpoint that cannot be resumed from
RESTART_ADVICE = "delete it, or start the run over (deqkit: --overwrite; Trainer: fit(resume=False))"


class CheckpointError(ValueError):
    """A file is not a deqkit training checkpoint, or not one for this model and data."""


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that shuffles epoch ``epoch`` (0-based): a function of ``(seed, epoch)`` only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def augment_generator(seed: int, global_step: int, rank: int = 0) -> torch.Generator:
    """The generator of step ``global_step``'s data augmentation on rank ``rank``: a function of
    ``(seed, global_step, rank)`` only, so a resumed run augments as an uninterrupted one; a
    stream of its own (not :func:`step_generator`'s), and one per rank (each rank's shard holds
    other samples)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + 7_919 * global_step + 104_729 * rank + 2) % (2**63 - 1))


def step_generator(seed: int, global_step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator every rank builds identically for step ``global_step`` of a run seeded ``seed``.

    Draw from it every random decision that must agree across ranks (whether this step adds a
    Jacobian penalty, a randomised iteration cap, ...): a function of ``(seed, global_step)``
    only, so a resumed run draws what an uninterrupted one drew."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + 7_919 * global_step + 1) % (2**63 - 1))


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (and CUDA, when initialised), numpy and python, as tensors and
    plain values (loadable with ``torch.load(weights_only=True)``)."""
    # legacy=True (numpy's default) on the MT19937 global generator: the 5-tuple form, which the
    # stub's first overload (a call without ``legacy``) types as the dict form
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
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


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def deq_settings(model: nn.Module) -> list[str]:
    """The solver and gradient estimator of every DEQ in ``model`` (their reprs), so a resumed
    run can tell that they were swapped (e.g. a preset that changed meaning)."""
    from .metrics import configured_repr  # the policies as configured, not as silenced during training

    return [f"solver={configured_repr(m.solver)}, grad={configured_repr(m.grad)}" for m in model.modules() if isinstance(m, DEQ)]


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    On any failure the temp file is removed and an existing ``path`` is left untouched.
    """
    buf = io.BytesIO()  # serialised first: a failed write (disk full) is then a plain OSError, not torch's RuntimeError
    torch.save(obj, buf)
    with atomic_open(path, "wb") as fh:
        fh.write(buf.getbuffer())


def read_checkpoint(source: Path, n_train: int) -> dict[str, Any]:
    """Load ``source`` and check that it is a training checkpoint for ``n_train`` samples."""
    ckpt = load_torch_file(source, what="deqkit training checkpoint", advice=RESTART_ADVICE)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or not all(k in ckpt for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{source} is not a deqkit training checkpoint (format {CHECKPOINT_FORMAT}); {RESTART_ADVICE}")
    if ckpt["n_train"] != n_train:
        raise CheckpointError(
            f"{source} was written for a training set of {ckpt['n_train']} samples, this one has {n_train}; "
            f"resume with the same data (same dataset, subset and seed)."
        )
    return ckpt


def warn_on_changed_settings(
    source: Path, ckpt: dict[str, Any], config: Any, model: nn.Module, augment: Optional[str] = None
) -> list[str]:
    """Warn when the run resumes with settings that make it differ from an uninterrupted one;
    returns the names of the changed settings (``"deqs"`` for a swapped solver or estimator,
    ``"augment"`` for another training augmentation, given as its ``repr``)."""
    old = ckpt["config"]
    changed = [k for k in RESUME_KEYS if old.get(k) != getattr(config, k)]
    if old.get("epochs") != config.epochs and config.schedule != "none":
        changed.append("epochs")
    what = [f"{k}: {old.get(k)!r} -> {getattr(config, k)!r}" for k in changed]
    deqs = deq_settings(model)
    if "deqs" in ckpt and ckpt["deqs"] != deqs:
        changed.append("deqs")
        what.append(f"DEQ solver/estimator: {ckpt['deqs']} -> {deqs}")
    if augment is not None and "augment" in ckpt and ckpt["augment"] != augment:
        changed.append("augment")
        what.append(f"augment: {ckpt['augment']} -> {augment}")
    if changed:
        warnings.warn(
            f"resuming from {source} with changed settings {'; '.join(what)}; the run will differ from an uninterrupted one.",
            stacklevel=5,
        )
    return changed
