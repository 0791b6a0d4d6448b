"""A certified bound on an implicit model's sensitivity to ℓ∞ input perturbations.

For ``x = φ(Ax + Bu)``, ``ŷ = Cx + Du`` with φ componentwise 1-Lipschitz (ReLU, tanh) and
``ρ(|A|) < 1`` (El Ghaoui, Gu, Travacca, Askari, Tsai, "Implicit Deep Learning", SIAM J. Math.
Data Sci. 2021, §4 on sensitivity; the robustness program of Tsai, Decugis, El Ghaoui,
Atamtürk, arXiv 2209.09389), two inputs ``u`` and ``u + δ`` give states with
``|x' − x| ≤ |A||x' − x| + |B_u||δ|`` componentwise, hence
``|x' − x| ≤ (I − |A|)⁻¹|B_u||δ|`` (``(I − |A|)⁻¹ = Σ_k |A|^k ≥ 0``) and

    ``|ŷ'_k − ŷ_k| ≤ g_k ‖δ‖_∞``,  ``g = |C|(I − |A|)⁻¹|B_u|𝟙 + |D_u|𝟙``,

where ``B_u``, ``D_u`` are the input columns (a bias column does not move). The bound is
attained when every unit stays active and the weights are non-negative (then the model is
affine along ``δ = ε𝟙``). With the SIM program's ball constraints ``‖A_i‖₁ ≤ κ``,
``‖(B_u)_i‖₁ ≤ r_in`` and ``‖[C_k (D_u)_k]‖₁ ≤ r_out`` (``fit_sim(input_radius=...,
output_radius=...)``, convex and row-separable), ``g_k ≤ r_out·max(1, r_in/(1 − κ))``.

A prediction is certified at radius ε when its margin over every other class exceeds what the
two logits can move: ``ŷ_y − ŷ_j > (g_y + g_j)·ε`` for all ``j ≠ y``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._options import check_positive, validated_options
from ..errors import OptionError
from .model import ImplicitModel

__all__ = ["LinfGain", "certified_accuracy", "certified_linf_gain"]


@dataclass
class LinfGain:
    """``per_output[k] = g_k``: ``|ŷ_k(u + δ) − ŷ_k(u)| ≤ g_k‖δ‖_∞`` for every ``u`` and ``δ``;
    ``gain = max_k g_k`` bounds ``‖Δŷ‖_∞ / ‖δ‖_∞``. ``certified`` is False (and the gains
    ``inf``) when ``ρ(|A|) ≥ 1``, where no such bound follows. ``spectral_radius`` is ``ρ(|A|)``
    (or the ``‖A‖_∞`` bound on it when that is already ``< 1``)."""

    per_output: Tensor
    gain: float
    certified: bool
    spectral_radius: float

    def bound(self, eps: float) -> float:
        """The certified ``‖Δŷ‖_∞`` for perturbations of ℓ∞ norm ``eps``."""
        return self.gain * float(eps)


def _input_columns(model: ImplicitModel) -> tuple[Tensor, Tensor]:
    """``B_u`` and ``D_u``: the columns that multiply the input (the bias column dropped)."""
    p = model.p
    return model.B.detach()[:, :p], model.D.detach()[:, :p]


@validated_options
@torch.no_grad()
def certified_linf_gain(model: ImplicitModel) -> LinfGain:
    """The per-output ℓ∞ gains ``g = |C|(I − |A|)⁻¹|B_u|𝟙 + |D_u|𝟙`` of ``model`` (float64).

    ``(I − |A|)⁻¹|B_u|𝟙`` is a dense linear solve with ``n`` unknowns."""
    if not isinstance(model, ImplicitModel):
        raise OptionError(f"certified_linf_gain: model must be an ImplicitModel, got {type(model).__name__}.")
    a = model.A.detach().double().abs()
    c = model.C.detach().double().abs()
    bu, du = (t.double().abs() for t in _input_columns(model))
    inf_norm = float(a.sum(dim=1).max()) if a.numel() else 0.0
    radius = inf_norm
    if inf_norm >= 1.0:
        radius = float(torch.linalg.eigvals(a).abs().max())
    if radius >= 1.0:
        q = model.q
        return LinfGain(torch.full((q,), math.inf, dtype=torch.float64), math.inf, False, radius)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    s = torch.linalg.solve(eye - a, bu.sum(dim=1)) if a.numel() else bu.sum(dim=1)
    s = s.clamp(min=0.0)  # exact arithmetic gives s ≥ 0; clamp round-off
    g = c @ s + du.sum(dim=1)
    return LinfGain(g, float(g.max()) if g.numel() else 0.0, True, radius)


@validated_options
@torch.no_grad()
def certified_accuracy(model: ImplicitModel, u: Tensor, y: Tensor, eps: float, gain: LinfGain | None = None) -> float:
    """Fraction of ``(u, y)`` predicted correctly with a margin no ℓ∞ perturbation of radius
    ``eps`` can close: ``ŷ_y − ŷ_j > (g_y + g_j)·eps`` for every ``j ≠ y``."""
    eps = check_positive("certified_accuracy", "eps", eps, allow_zero=True)
    gain = gain if gain is not None else certified_linf_gain(model)
    if not gain.certified:
        return 0.0
    out = model(u).double()
    g = gain.per_output.to(out)
    true = out.gather(1, y[:, None])
    need = (g[y][:, None] + g[None, :]) * eps
    ok = (true - out > need) | (torch.arange(out.shape[1], device=out.device)[None, :] == y[:, None])
    return float(ok.all(dim=1).double().mean()) if len(u) else 0.0
