"""The explicit baseline network whose states SIM matches: an MLP of Linear + ReLU layers."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def make_mlp(p: int, hidden: Sequence[int], q: int) -> nn.Sequential:
    """``Linear(p, h1), ReLU, …, Linear(h_k, q)``."""
    if not hidden or any((not isinstance(h, int)) or h < 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty list of positive ints, got {hidden!r}")
    dims = [p, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], q))
    return nn.Sequential(*layers)


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
    """Adam on cross-entropy; returns ``net`` in eval mode."""
    if not (isinstance(epochs, int) and epochs >= 0):
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
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
