"""Anderson acceleration."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .._options import check_fraction, check_int, check_positive, validated_options
from ..registry import register_solver
from .base import Problem, Solver
from .tracking import IterateTracker

__all__ = ["Anderson"]


@dataclass
class _AndersonState:
    F: Tensor  # (B, m, d) the map at past iterates, f(x)
    G: Tensor  # (B, m, d) their residuals f(x) − x
    gram: Tensor  # (B, m, m) GGᵀ, updated one row/column per step
    count: int = 0
    batched: bool = False  # the products with the history as batched matrix products (else elementwise)
    tracker: Optional[IterateTracker] = None  # the loop's, when the hooks run inside it


#: on the CPU, states with at least this many entries per sample take the history products as
#: batched matrix products, narrower ones elementwise (where ``bmm``'s per-call cost dominates);
#: the timings behind the threshold are in BENCHMARKS.md ("Against torchdeq", forward cost)
_BMM_MIN_DIM = 128


@register_solver("anderson")
@validated_options
class Anderson(Solver):
    """Anderson acceleration (type II) with ``memory`` past iterates.

    Each step mixes the last ``m`` iterates with weights ``α`` (``Σα = 1``) minimising
    ``‖Σ αᵢ gᵢ‖²`` (``gᵢ = f(zᵢ) − zᵢ``) and takes ``z ← β Σ αᵢ f(zᵢ) + (1 − β) Σ αᵢ zᵢ``.
    Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.

    ``regularization`` λ is scale-free: it is added to the Gram matrix ``GGᵀ`` normalised to a
    unit diagonal, so it weighs the newest (small) and oldest (large) residuals alike. An
    absolute λ, as some peers use, swamps the normal equations once residuals are small and
    stalls tight solves.
    """

    nonfinite_advice = "or use damping < 1 (or a larger regularization)"
    name = "anderson"

    def __init__(
        self,
        *,
        memory: int = 6,
        regularization: float = 1e-4,
        damping: float = 1.0,
        tol: float = 1e-4,
        max_iter: int = 50,
        stop_mode: str = "rel",
        on_nonfinite: str = "raise",
        freeze_converged: bool = False,
    ) -> None:
        super().__init__(
            tol=tol, max_iter=max_iter, stop_mode=stop_mode, on_nonfinite=on_nonfinite, freeze_converged=freeze_converged
        )
        owner = type(self).__name__
        self.memory = check_int(owner, "memory", memory)
        self.regularization = check_positive(owner, "regularization", regularization, allow_zero=True)
        self.damping = check_fraction(owner, "damping", damping)

    def init(self, problem: Problem, z: Tensor, fz: Tensor) -> _AndersonState:
        B, d = z.shape
        m = min(self.memory, problem.max_iter)
        batched = z.device.type != "cpu" or d >= _BMM_MIN_DIM
        return _AndersonState(
            z.new_zeros(B, m, d), z.new_zeros(B, m, d), z.new_zeros(B, m, m), batched=batched, tracker=problem.tracker
        )

    def observe(self, state: Any, z: Tensor, fz: Tensor, fresh: Tensor) -> None:
        slot = state.count % state.F.shape[1]
        g = fz - z if state.tracker is None else state.tracker.residual  # the loop computed it already
        state.F[:, slot] = fz
        state.G[:, slot] = g
        # (B, m): ⟨g_i, g⟩, as g (1 × d) times Gᵀ: the (m × d) · (d × 1) form is 4-8x slower on the CPU
        col = (
            torch.bmm(g.unsqueeze(1), state.G.transpose(1, 2)).squeeze(1) if state.batched else (state.G * g.unsqueeze(1)).sum(-1)
        )
        state.gram[:, slot, :] = col
        state.gram[:, :, slot] = col
        state.count += 1

    def step(self, state: Any, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        n = min(state.count, state.F.shape[1])
        if n == 1:
            return z + self.damping * (fz - z)
        gram = state.gram[:, :n, :n]
        # Scale-free Tikhonov: regularise the Gram matrix normalised to unit diagonal, so that λ
        # acts the same on the newest (small) and oldest (large) residuals in the window.
        # The floor √tiny keeps an exact fixed point (g = 0: a converged sample that goes on
        # iterating with its batch) finite: its weight ~ scale² / λ stays far below overflow.
        info = torch.finfo(z.dtype)
        scale = gram.diagonal(dim1=1, dim2=2).clamp_min(math.sqrt(info.tiny)).rsqrt()  # (B, n)
        corr = gram * scale[:, :, None] * scale[:, None, :]
        lam = max(self.regularization, 10 * info.eps)  # a few ulps keep repeated history solvable
        corr.diagonal(dim1=1, dim2=2).add_(lam)  # corr is a fresh tensor: + λI in place
        # solve_ex: no error check, so no host sync on CUDA; a failure shows up as NaN in the next
        # residual, which the loop reports
        y = torch.linalg.solve_ex(corr, scale.unsqueeze(-1)).result.squeeze(-1)
        a = y * scale
        alpha = a / a.sum(dim=1, keepdim=True)
        # β Σα f(x_i) + (1 − β) Σα x_i = Σα f(x_i) − (1 − β) Σα g_i: one weighted sum when β = 1
        mix_f = _weighted(alpha, state.F[:, :n], state.batched)
        if self.damping == 1.0:
            return mix_f
        return mix_f - (1.0 - self.damping) * _weighted(alpha, state.G[:, :n], state.batched)


def _weighted(alpha: Tensor, X: Tensor, batched: bool) -> Tensor:
    """``Σᵢ αᵢ Xᵢ`` per sample, ``(B, d)``, for weights ``(B, n)`` and history ``(B, n, d)``."""
    if batched:
        return torch.bmm(alpha.unsqueeze(1), X).squeeze(1)
    return (alpha.unsqueeze(-1) * X).sum(1)
