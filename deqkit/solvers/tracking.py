"""Best-iterate tracking and residual traces, shared by every forward solver's loop.

:class:`IterateTracker` is the one place that computes the residuals of an iterate, keeps the
best iterate of each sample and the per-iteration traces; :meth:`deqkit.solvers.Solver.__call__`
feeds it, and a solver's hooks read it (``problem.tracker``) instead of computing the same
residuals again.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.linalg import vector_norm

from .._options import check_choice, validated_options

__all__ = ["IterateTracker"]


@validated_options
class IterateTracker:
    """Residuals, best iterate per sample and residual traces of one batched solve.

    Args:
        z: the initial flattened iterate ``(B, d)`` (the best iterate until a better one is seen).
        stop_mode: ``"rel"`` or ``"abs"``: which residual ranks iterates.
        rel_scale: per-sample denominators ``(B,)`` of the relative residual; ``None`` means
            ``‖fn(z)‖`` of each iterate (the forward convention). Adjoint solves pass ``‖v‖``.

    The residual of ``z`` is ``g = fn(z) − z``; ``abs = ‖g‖``, ``rel = ‖g‖ / (scale + eps)``.
    A frozen (inactive) sample repeats its last value in the traces.

    A solver's hooks see the tracker as ``problem.tracker`` and may read (never write) what the
    last :meth:`record` computed, instead of computing it again: ``residual`` (``g``, ``(B, d)``),
    ``abs_residual`` and ``fz_norm`` (``‖g‖`` and ``‖fn(z)‖``, ``(B,)``, of every sample, frozen
    or not), ``measure`` (the residual in ``stop_mode``, as compared to the tolerance),
    ``better`` (the samples whose best iterate is the last one) and the best iterate ``best_z``
    with its residuals ``best_abs``, ``best_rel``.
    """

    def __init__(self, z: Tensor, stop_mode: str, rel_scale: Optional[Tensor] = None) -> None:
        B = z.shape[0]
        check_choice("IterateTracker", "stop_mode", stop_mode, ("abs", "rel"))
        self.stop_mode = stop_mode
        self.rel_scale = rel_scale
        self.eps = torch.finfo(z.dtype).eps
        # 0-dim tensors: an operation with a Python number costs about twice one with a tensor on the CPU
        self._eps, self._inf = z.new_tensor(self.eps), z.new_tensor(math.inf)
        self.best_z = z.clone()
        self.best_abs = torch.full((B,), float("inf"), dtype=z.dtype, device=z.device)
        self.best_rel = self.best_abs.clone()
        self.abs_trace: list[Tensor] = []
        self.rel_trace: list[Tensor] = []
        self.residual = self.abs_residual = self.fz_norm = self.better = self.measure = self.best_abs  # set by record

    def record(self, z: Tensor, fz: Tensor, active: Tensor, all_active: bool = False) -> tuple[Tensor, Tensor]:
        """See iterate ``z`` with ``fz = fn(z)``; returns ``(measure, nonfinite)`` per sample.

        ``measure`` is the residual in ``stop_mode`` (compared to the tolerance by the loop);
        ``nonfinite`` marks the active samples whose ``fz`` holds NaN/Inf. ``all_active=True``
        (the caller knows that every entry of ``active`` is true) skips the masking.
        """
        self.residual = fz - z
        self.abs_residual = abs_res = vector_norm(self.residual, dim=1)  # NaN/Inf anywhere in a sample's f(z) shows up here
        self.fz_norm = fz_norm = vector_norm(fz, dim=1)
        scale = fz_norm if self.rel_scale is None else self.rel_scale
        rel_res = abs_res / (scale + self._eps)
        finite = (abs_res + fz_norm) < self._inf  # false for NaN and Inf (norms are never negative)
        nonfinite = ~finite if all_active else active & ~finite
        if self.abs_trace and not all_active:  # frozen samples repeat their last value in the traces
            abs_res = torch.where(active, abs_res, self.abs_trace[-1])
            rel_res = torch.where(active, rel_res, self.rel_trace[-1])
        self.abs_trace.append(abs_res)
        self.rel_trace.append(rel_res)
        self.measure = measure = rel_res if self.stop_mode == "rel" else abs_res
        self.better = better = measure < self.best if all_active else active & (measure < self.best)
        self.best_z = torch.where(better[:, None], z, self.best_z)
        self.best_abs = torch.where(better, abs_res, self.best_abs)
        self.best_rel = torch.where(better, rel_res, self.best_rel)
        return measure, nonfinite

    @property
    def best(self) -> Tensor:
        """The best residual so far per sample, in ``stop_mode``."""
        return self.best_rel if self.stop_mode == "rel" else self.best_abs

    def traces(self) -> tuple[Tensor, Tensor]:
        """``(abs_trace, rel_trace)``, each ``(T, B)``."""
        return torch.stack(self.abs_trace), torch.stack(self.rel_trace)
