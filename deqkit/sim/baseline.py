"""The explicit baseline network whose states SIM matches (Tsai, Decugis, El Ghaoui,
Atamtürk, arXiv 2209.09389): an MLP of Linear + ReLU layers."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._options import check_int, check_positive, validated_options
from ..errors import OptionError

__all__ = ["make_mlp", "train_mlp"]


def _check_training_options(owner: str, epochs, lr, batch_size, seed, weight_decay=0.0) -> None:
    """The options :func:`train_mlp` and :func:`~deqkit.sim.fit.finetune` share."""
    check_int(owner, "epochs", epochs, minimum=0)
    check_positive(owner, "lr", lr)
    check_int(owner, "batch_size", batch_size)
    check_int(owner, "seed", seed, minimum=0)
    check_positive(owner, "weight_decay", weight_decay, allow_zero=True)


@validated_options
def make_mlp(p: int, hidden: Sequence[int], q: int) -> nn.Sequential:
    """``Linear(p, h1), ReLU, …, Linear(h_k, q)``."""
    check_int("make_mlp", "p", p)
    check_int("make_mlp", "q", q)
    if (
        isinstance(hidden, (str, bytes))
        or not hidden
        or any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden)
    ):
        raise OptionError(f"make_mlp: hidden must be a non-empty list of positive ints, got {hidden!r}.")
    dims = [p, *hidden]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], q))
    return nn.Sequential(*layers)


@validated_options
def train_mlp(
    net: nn.Module,
    u: Tensor,
    y: Tensor,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Adam on cross-entropy (mini-batches in an order drawn with ``seed``); returns ``net`` in eval mode."""
    _check_training_options("train_mlp", epochs, lr, batch_size, seed, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(u), generator=gen)
        for i in range(0, len(u), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            F.cross_entropy(net(u[idx]), y[idx]).backward()
            opt.step()
    return net.eval()
