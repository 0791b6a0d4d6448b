"""Mixed precision and compiled cells for the trainer.

- ``amp="bf16"``: the forward (solve, cell, head, loss) runs under ``torch.autocast`` in bfloat16,
  on CPU and CUDA; no loss scaling is needed (bf16 has float32's exponent range).
- ``amp="fp16"``: float16 autocast with a ``torch.amp.GradScaler``, CUDA only (CPU float16
  autocast is slow where it exists and unscaled fp16 gradients underflow): asking for it on CPU
  is an :class:`~deqkit.errors.OptionError`. An overflowed step (NaN/Inf in the scaled gradients)
  is skipped by the scaler, which then halves the scale; the trainer counts these steps
  (``amp_skipped`` in each epoch's record). The DEQ backward runs inside
  :func:`~deqkit.estimators.loss_scaled_backward`, so such an overflow reaches the scaler as a
  non-finite gradient instead of raising :class:`~deqkit.errors.NonFiniteError`.

The solver's own state (Anderson's Gram matrix, Broyden's low-rank inverse, GMRES's basis) must
be kept in float32 whatever precision the cell computes in; tolerances below the cell dtype's
resolution (bf16: about 4e-3 relative) cannot be met, so loosen ``tol`` under autocast.

Micikevicius et al., "Mixed Precision Training", ICLR 2018 (loss scaling);
Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training", 2019.

``compile_cells`` compiles every DEQ's cell in place (``nn.Module.compile``: the state-dict keys
do not change, so checkpoints of eager and compiled runs are interchangeable); the solver loop
stays eager, since its per-iteration convergence check reads a value on the host.
Ansel et al., "PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode Transformation
and Graph Compilation", ASPLOS 2024.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from ..errors import OptionError
from ..estimators.base import loss_scaled_backward

__all__ = ["AMP_MODES", "amp_dtype", "autocast", "compile_cells", "make_grad_scaler", "scaled_backward", "scaler_step"]

#: the values of ``TrainConfig.amp`` besides ``None``
AMP_MODES = ("bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (``None``: full precision); refuses unsafe pairs."""
    if amp is None:
        return None
    if amp not in _DTYPES:
        raise OptionError(f"amp must be one of {', '.join(AMP_MODES)} or None, got {amp!r}.")
    if amp == "fp16" and device.type != "cuda":
        raise OptionError(
            f"amp='fp16' needs a CUDA device (float16 autocast with a GradScaler); the device is {device}. "
            f"Use amp='bf16' on CPU, or device='cuda'."
        )
    return _DTYPES[amp]


def autocast(dtype: torch.dtype | None, device: torch.device) -> AbstractContextManager[Any]:
    """``torch.autocast`` for ``device`` in ``dtype``, or a no-op context when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(amp: str | None, device: torch.device) -> Any | None:
    """A ``GradScaler`` for ``amp="fp16"`` (CUDA), else ``None``."""
    if amp != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def compile_cells(model: nn.Module, backend: str = "inductor") -> int:
    """Compile the cell of every :class:`~deqkit.deq.DEQ` in ``model`` in place; returns how many.

    ``backend`` is ``torch.compile``'s (``"inductor"`` needs a C++ compiler on CPU;
    ``"aot_eager"`` traces without generating code, for checks).
    """
    from ..deq import DEQ

    n = 0
    for m in model.modules():
        if isinstance(m, DEQ) and not getattr(m.cell, "_deqkit_compiled", False):
            m.cell.compile(backend=backend)
            m.cell._deqkit_compiled = True  # type: ignore[assignment]
            n += 1
    if n == 0:
        raise OptionError("compile: the model contains no DEQ whose cell could be compiled.")
    return n


def scaled_backward(scaler: Any | None, loss: torch.Tensor) -> None:
    """``loss.backward()``; with a ``GradScaler``, the scaled loss's, inside
    :func:`~deqkit.estimators.loss_scaled_backward` (an overflow is then the scaler's to skip)."""
    if scaler is None:
        loss.backward()
        return
    with loss_scaled_backward():
        scaler.scale(loss).backward()


def scaler_step(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """``scaler.step(optimizer)`` and ``scaler.update()``; whether the scaler skipped the step.

    The scaler skips the step exactly when it found NaN/Inf in the unscaled gradients, and then
    lowers its scale; that lowering is how the skip is read here (one host synchronisation).
    """
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return bool(scaler.get_scale() < before)
