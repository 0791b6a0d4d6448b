"""ℓ∞ input attacks for robustness evaluation (SIM, Tsai et al., arXiv 2209.09389, §5).

* FGSM (Goodfellow et al., ICLR 2015): ``u' = clip(u + ε·sign(∇_u L))``.
* PGD (Madry et al., ICLR 2018): ``k`` steps of size ``α`` along ``sign(∇_u L)``, each followed
  by projection onto the ε-ball around ``u`` (and onto the valid input range), optionally from
  a uniform random start.

Models are any callables ``u ↦ logits`` with a gradient to ``u``; for an
:class:`~deqkit.sim.model.ImplicitModel` that gradient is the core's implicit gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._options import (
    check_bool,
    check_choice,
    check_int,
    check_positive,
    validated_options,
)
from ..errors import OptionError

__all__ = ["ATTACKS", "accuracy", "fgsm", "pgd", "robust_accuracy"]

Model = Callable[[Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
ATTACKS = ("fgsm", "pgd")
#: the options of :func:`pgd` that :func:`fgsm` does not have
_PGD_ONLY = ("steps", "step_size", "random_start", "seed")


def _check(owner: str, eps, clip: tuple[float, float] | None) -> float:
    eps = check_positive(owner, "eps", eps, allow_zero=True)
    if clip is not None and not (len(clip) == 2 and clip[0] < clip[1]):
        raise OptionError(f"{owner}: clip must be (low, high) with low < high, or None, got {clip!r}.")
    return eps


def _input_grad(model: Model, u: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    u = u.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(u), y)
        (g,) = torch.autograd.grad(loss, u)
    return g


@validated_options
def fgsm(
    model: Model,
    u: Tensor,
    y: Tensor,
    eps: float,
    loss_fn: LossFn = F.cross_entropy,
    clip: tuple[float, float] | None = (0.0, 1.0),
) -> Tensor:
    """One-step ℓ∞ attack ``clip(u + ε·sign(∇_u loss(model(u), y)))`` (a new tensor, no grad)."""
    eps = _check("fgsm", eps, clip)
    if eps == 0:
        return u.detach().clone()
    adv = u.detach() + eps * _input_grad(model, u, y, loss_fn).sign()
    if clip is not None:
        adv = adv.clamp(*clip)
    return adv.detach()


def _pgd_step_size(owner: str, eps: float, steps, step_size) -> float:
    steps = check_int(owner, "steps", steps)
    if step_size is None:
        return 2.5 * eps / steps
    return check_positive(owner, "step_size", step_size)


def _pgd(
    model: Model,
    u: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    alpha: float,
    random_start: bool,
    loss_fn: LossFn,
    clip: tuple[float, float] | None,
    generator: torch.Generator | None,
) -> Tensor:
    """PGD on checked options, drawing the random start from ``generator``."""
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


def _generator(owner: str, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(check_int(owner, "seed", seed, minimum=0))


@validated_options
def pgd(
    model: Model,
    u: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    loss_fn: LossFn = F.cross_entropy,
    clip: tuple[float, float] | None = (0.0, 1.0),
    seed: int | None = None,
) -> Tensor:
    """Projected gradient ascent on the loss in the ℓ∞ ball of radius ε (default step ``2.5ε/steps``).

    ``seed`` draws the random start (``None``: torch's global generator)."""
    eps = _check("pgd", eps, clip)
    alpha = _pgd_step_size("pgd", eps, steps, step_size)
    check_bool("pgd", "random_start", random_start)
    gen = _generator("pgd", seed)
    if eps == 0:
        return u.detach().clone()
    return _pgd(model, u, y, eps, steps, alpha, random_start, loss_fn, clip, gen)


@validated_options
@torch.no_grad()
def accuracy(model: Model, u: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``u`` whose argmax prediction equals ``y``."""
    check_int("accuracy", "batch_size", batch_size)
    correct = 0
    for i in range(0, len(u), batch_size):
        correct += int((model(u[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum())
    return correct / max(len(u), 1)


@validated_options
def robust_accuracy(
    model: Model,
    u: Tensor,
    y: Tensor,
    eps: Sequence[float],
    attack: str = "fgsm",
    batch_size: int = 512,
    loss_fn: LossFn = F.cross_entropy,
    clip: tuple[float, float] | None = (0.0, 1.0),
    steps: int | None = None,
    step_size: float | None = None,
    random_start: bool | None = None,
    seed: int | None = None,
) -> dict[float, float]:
    """Accuracy under ``attack`` (``"fgsm"`` or ``"pgd"``) at each ε: ``{ε: accuracy}``.

    ``loss_fn`` and ``clip`` are passed to the attack; ``steps``, ``step_size``,
    ``random_start`` and ``seed`` are :func:`pgd`'s (``None``: its defaults) and refused for
    FGSM. One generator drawn from ``seed`` serves every batch and every ε in turn.
    """
    own = "robust_accuracy"
    check_choice(own, "attack", attack, ATTACKS)
    check_int(own, "batch_size", batch_size)
    eps = [_check(own, e, clip) for e in eps]
    if attack == "pgd" and steps is not None:
        check_int(own, "steps", steps)
    pgd_opts = {"steps": steps, "step_size": step_size, "random_start": random_start, "seed": seed}
    if attack == "fgsm":
        given = [k for k in _PGD_ONLY if pgd_opts[k] is not None]
        if given:
            raise OptionError(
                f"{own}: {given[0]} applies to attack='pgd' only, got {given[0]}={pgd_opts[given[0]]!r} with attack='fgsm'."
            )
    steps = 10 if steps is None else steps
    random_start = True if random_start is None else check_bool(own, "random_start", random_start)
    gen = _generator(own, seed)
    out = {}
    for e in eps:
        correct = 0
        for i in range(0, len(u), batch_size):
            ub, yb = u[i : i + batch_size], y[i : i + batch_size]
            if attack == "fgsm":
                adv = fgsm(model, ub, yb, e, loss_fn=loss_fn, clip=clip)
            elif e == 0:
                adv = ub.detach().clone()
            else:
                adv = _pgd(model, ub, yb, e, steps, _pgd_step_size(own, e, steps, step_size), random_start, loss_fn, clip, gen)
            with torch.no_grad():
                correct += int((model(adv).argmax(dim=1) == yb).sum())
        out[float(e)] = correct / max(len(u), 1)
    return out
