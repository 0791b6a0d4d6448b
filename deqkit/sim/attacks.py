"""ℓ∞ input attacks for robustness evaluation (SIM, Tsai et al., arXiv 2209.09389, §5).

* FGSM (Goodfellow et al., ICLR 2015): ``u' = clip(u + ε·sign(∇_u L))``.
* PGD (Madry et al., ICLR 2018): ``k`` steps of size ``α`` along ``sign(∇_u L)``, each followed
  by projection onto the ε-ball around ``u`` (and onto the valid input range), optionally from
  a uniform random start.

Models are any callables ``u ↦ logits`` with a gradient to ``u``; for an
:class:`~deqkit.sim.model.ImplicitModel` that gradient is the core's implicit gradient.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Model = Callable[[Tensor], Tensor]
ATTACKS = ("fgsm", "pgd")


def _check(eps: float, clip: Optional[tuple[float, float]]) -> None:
    if not (eps >= 0):
        raise ValueError(f"eps must be >= 0, got {eps}")
    if clip is not None and not (len(clip) == 2 and clip[0] < clip[1]):
        raise ValueError(f"clip must be (low, high) with low < high, got {clip}")


def _input_grad(model: Model, u: Tensor, y: Tensor, loss_fn) -> Tensor:
    u = u.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(u), y)
        (g,) = torch.autograd.grad(loss, u)
    return g


def fgsm(
    model: Model,
    u: Tensor,
    y: Tensor,
    eps: float,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    clip: Optional[tuple[float, float]] = (0.0, 1.0),
) -> Tensor:
    """One-step ℓ∞ attack ``clip(u + ε·sign(∇_u loss(model(u), y)))`` (a new tensor, no grad)."""
    _check(eps, clip)
    if eps == 0:
        return u.detach().clone()
    adv = u.detach() + eps * _input_grad(model, u, y, loss_fn).sign()
    if clip is not None:
        adv = adv.clamp(*clip)
    return adv.detach()


def pgd(
    model: Model,
    u: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 10,
    step_size: Optional[float] = None,
    random_start: bool = True,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    clip: Optional[tuple[float, float]] = (0.0, 1.0),
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Projected gradient ascent on the loss in the ℓ∞ ball of radius ε (default step ``2.5ε/steps``)."""
    _check(eps, clip)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if eps == 0:
        return u.detach().clone()
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    if not (alpha > 0):
        raise ValueError(f"step_size must be > 0, got {step_size}")
    u0 = u.detach()
    adv = u0.clone()
    if random_start:
        noise = torch.rand(u0.shape, generator=generator, dtype=u0.dtype, device="cpu").to(u0.device)
        adv = adv + eps * (2 * noise - 1)
    if clip is not None:
        adv = adv.clamp(*clip)
    for _ in range(steps):
        adv = adv + alpha * _input_grad(model, adv, y, loss_fn).sign()
        adv = torch.max(torch.min(adv, u0 + eps), u0 - eps)
        if clip is not None:
            adv = adv.clamp(*clip)
    return adv.detach()


@torch.no_grad()
def accuracy(model: Model, u: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``u`` whose argmax prediction equals ``y``."""
    correct = 0
    for i in range(0, len(u), batch_size):
        correct += int((model(u[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum())
    return correct / max(len(u), 1)


def robust_accuracy(
    model: Model,
    u: Tensor,
    y: Tensor,
    eps: Sequence[float],
    attack: str = "fgsm",
    batch_size: int = 512,
    **attack_kwargs,
) -> dict[float, float]:
    """Accuracy under ``attack`` (``"fgsm"`` or ``"pgd"``) at each ε: ``{ε: accuracy}``."""
    if attack not in ATTACKS:
        raise ValueError(f"attack={attack!r} is invalid; valid: {', '.join(ATTACKS)}")
    fn = fgsm if attack == "fgsm" else pgd
    out = {}
    for e in eps:
        correct = 0
        for i in range(0, len(u), batch_size):
            ub, yb = u[i : i + batch_size], y[i : i + batch_size]
            adv = fn(model, ub, yb, float(e), **attack_kwargs)
            with torch.no_grad():
                correct += int((model(adv).argmax(dim=1) == yb).sum())
        out[float(e)] = correct / max(len(u), 1)
    return out
