"""Euclidean projection of rows onto the ℓ1 ball, and the prox used by the SIM program.

Well-posedness of an implicit model ``x = φ(Ax + Bu)`` with a componentwise 1-Lipschitz φ
(ReLU) holds when ``‖A‖_∞ < 1`` (El Ghaoui et al., "Implicit Deep Learning", 2021; Tsai et al.,
"State-driven Implicit Modeling", arXiv 2209.09389, §2). ``‖A‖_∞`` is the largest row ℓ1 norm,
so keeping ``‖A‖_∞ ≤ κ`` is a row-separable constraint: project each row onto the ℓ1 ball of
radius κ. The projection is the sort-based algorithm of Duchi et al. (ICML 2008), batched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._options import validated_options
from ..errors import OptionError

__all__ = ["project_l1_ball", "prox_l1_ball", "soft_threshold"]


def _radius_tensor(radius: float | Tensor, rows: int, like: Tensor, owner: str = "project_l1_ball") -> Tensor:
    r = torch.as_tensor(radius, dtype=like.dtype, device=like.device)
    if r.ndim == 0:
        r = r.expand(rows)
    if r.shape != (rows,):
        raise OptionError(f"{owner}: radius must be a scalar or have shape ({rows},), got shape {tuple(r.shape)}.")
    if bool((r < 0).any()) or bool(torch.isnan(r).any()):
        raise OptionError(f"{owner}: radius must be non-negative (inf means no constraint), got {radius!r}.")
    return r


@validated_options
def project_l1_ball(v: Tensor, radius: float | Tensor) -> Tensor:
    """Project each row of ``v`` (shape ``(r, d)``, or ``(d,)``) onto ``{a : ‖a‖₁ ≤ radius}``.

    ``radius`` is a scalar or a per-row tensor of shape ``(r,)``; ``inf`` leaves a row unchanged.
    Rows already inside the ball are returned unchanged; the others are soft-thresholded at the
    unique ``θ > 0`` that puts them on the sphere. This is the nearest point in Euclidean norm.
    """
    squeeze = v.ndim == 1
    if squeeze:
        v = v.unsqueeze(0)
    if v.ndim != 2:
        raise OptionError(f"project_l1_ball: v must be 1-D or 2-D, got shape {tuple(v.shape)}.")
    rows, d = v.shape
    r = _radius_tensor(radius, rows, v)
    if d == 0:
        return v.squeeze(0) if squeeze else v
    a = v.abs()
    inside = a.sum(dim=1) <= r
    r_safe = torch.where(inside | ~torch.isfinite(r), torch.ones_like(r), r)
    mu, _ = torch.sort(a, dim=1, descending=True)
    cssv = mu.cumsum(dim=1) - r_safe[:, None]
    ind = torch.arange(1, d + 1, device=v.device, dtype=v.dtype)
    count = ((mu - cssv / ind) > 0).sum(dim=1).clamp(min=1)
    theta = cssv.gather(1, (count - 1)[:, None]) / count[:, None].to(v.dtype)
    w = torch.sign(v) * (a - theta).clamp(min=0)
    out = torch.where(inside[:, None], v, w)
    return out.squeeze(0) if squeeze else out


def soft_threshold(v: Tensor, t: float | Tensor) -> Tensor:
    """``sign(v)·max(|v| − t, 0)``; ``t`` broadcasts against ``v``."""
    return torch.sign(v) * (v.abs() - t).clamp(min=0)


def prox_l1_ball(
    v: Tensor, t: Tensor, radius: Tensor, n_constrained: int, block_ball: tuple[int, int, Tensor] | None = None
) -> Tensor:
    """Prox of ``t‖β‖₁ + ι{‖β[:k]‖₁ ≤ radius}`` row by row (``k = n_constrained``).

    ``block_ball = (start, stop, radius2)`` adds a second, disjoint ball
    ``‖β[start:stop]‖₁ ≤ radius2`` (``start ≥ k``); the constraints act on disjoint coordinates,
    so the prox separates and each block is projected on its own.

    ``v`` is ``(r, d)``; ``t`` is ``(r,)`` or ``(r, d)`` (a weighted ℓ1 norm), ``radius`` is
    ``(r,)``. Soft-thresholding at ``t`` followed by
    the ℓ1-ball projection is exact here: on the ball the projection is itself a soft-threshold,
    and two soft-thresholds compose into one (KKT of the combined problem).
    """
    out = soft_threshold(v, t[:, None] if t.ndim == 1 else t)
    if n_constrained > 0:
        head = project_l1_ball(out[:, :n_constrained], radius)
        out = torch.cat([head, out[:, n_constrained:]], dim=1)
    if block_ball is not None:
        start, stop, rad2 = block_ball
        if stop > start:
            mid = project_l1_ball(out[:, start:stop], rad2)
            out = torch.cat([out[:, :start], mid, out[:, stop:]], dim=1)
    return out
