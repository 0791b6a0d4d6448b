"""Global magnitude pruning: the baseline a practitioner would use instead of SIM.

One-shot global magnitude pruning (Han, Pool, Tran, Dally, "Learning both weights and
connections for efficient neural networks", NeurIPS 2015; the global variant as in Blalock et
al., "What is the state of neural network pruning?", MLSys 2020): keep the weights of largest
magnitude over all layers together, biases kept; optionally followed by masked fine-tuning on
the labels (the pruned weights stay zero). Used to compare SIM against pruning at matched
density (Tsai, Decugis, El Ghaoui, Atamtürk, arXiv 2209.09389 compare against the dense
baseline only).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._options import check_int, check_positive, validated_options
from ..errors import OptionError

__all__ = ["magnitude_prune", "masked_finetune", "prunable_weights"]


def prunable_weights(net: nn.Module) -> list[nn.Parameter]:
    """The weight tensors of ``net``'s ``Linear`` and ``Conv2d`` layers (biases are not pruned)."""
    # the stubs type ``weight`` as Tensor; on these layers it is their Parameter
    return [cast(nn.Parameter, m.weight) for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@validated_options
@torch.no_grad()
def magnitude_prune(
    net: nn.Module, density: float, count: Callable[[nn.Module], int] | None = None, reference: int | None = None, iters: int = 40
) -> nn.Module:
    """A copy of ``net`` with its smallest-magnitude weights (global threshold) set to zero.

    Without ``count``, ``density`` is the fraction of non-zero weights kept. With ``count`` (a
    function giving a network's non-zeros in some form, e.g. a CNN's unrolled convolution
    matrices) and ``reference``, the threshold is bisected until ``count(pruned)/reference``
    is at most ``density`` and as close to it as the threshold allows.
    """
    own = "magnitude_prune"
    density = check_positive(own, "density", density)
    check_int(own, "iters", iters)
    weights = prunable_weights(net)
    if not weights:
        raise OptionError(f"{own}: the network has no Linear or Conv2d weights to prune.")
    mags = torch.cat([w.detach().abs().flatten() for w in weights])

    def pruned_at(thr: float) -> nn.Module:
        out = copy.deepcopy(net)
        for w in prunable_weights(out):
            w.mul_((w.abs() > thr).to(w.dtype))
        return out

    if count is None:
        k = round(density * int((mags > 0).sum()))
        if k <= 0:
            return pruned_at(float(mags.max()))
        thr = float(torch.topk(mags, k).values[-1])
        return pruned_at(thr * (1 - 1e-12) if thr > 0 else 0.0) if k < mags.numel() else copy.deepcopy(net)
    if reference is None:
        raise OptionError(f"{own}: count needs reference (the non-zero count the density is relative to).")
    lo, hi = 0.0, float(mags.max())  # count(lo) ≥ target ≥ count(hi)
    best = pruned_at(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        cand = pruned_at(mid)
        if count(cand) / reference > density:
            lo = mid
        else:
            hi, best = mid, cand
    return best


@validated_options
def masked_finetune(
    net: nn.Module, u: Tensor, y: Tensor, epochs: int = 1, lr: float = 1e-3, batch_size: int = 256, seed: int = 0
) -> nn.Module:
    """Adam on cross-entropy with the zero weights of ``net`` held at zero (in place; eval mode after)."""
    check_int("masked_finetune", "epochs", epochs, minimum=0)
    check_positive("masked_finetune", "lr", lr)
    check_int("masked_finetune", "batch_size", batch_size)
    weights = prunable_weights(net)
    masks = [(w.detach() != 0).to(w.dtype) for w in weights]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(check_int("masked_finetune", "seed", seed, minimum=0))
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(u), generator=gen)
        for i in range(0, len(u), batch_size):
            idx = perm[i : i + batch_size].to(u.device)
            opt.zero_grad()
            F.cross_entropy(net(u[idx]), y[idx]).backward()
            for w, mk in zip(weights, masks):
                assert w.grad is not None  # every pruned weight takes part in the loss just differentiated
                w.grad.mul_(mk)
            opt.step()
            with torch.no_grad():
                for w, mk in zip(weights, masks):
                    w.mul_(mk)
    return net.eval()
