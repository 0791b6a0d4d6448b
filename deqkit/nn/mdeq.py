"""The multiscale deep equilibrium cell (MDEQ) and its stem and head.

Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020. The state is a tuple
of feature maps, one per resolution (branch ``i`` has ``channels[i]`` channels at ``1/2^i`` of
the stem's resolution). One cell evaluation

1. runs a residual block per branch (GroupNorm, never BatchNorm, so samples never interact);
   the stem's features at that branch's resolution are added inside the block (every branch
   gets one: a branch without injection normalises a signal that is all ``z`` and is far from
   contractive);
2. fuses the branches: each branch ``i`` receives every other branch ``j``, brought to its
   resolution by ``i − j`` strided 3×3 convolutions (from a higher resolution) or by a 1×1
   convolution and nearest-neighbour upsampling (from a lower one); the sum goes through a
   ReLU and a GroupNorm.

The image is injected once per call, by the stem (:class:`MDEQStem`), outside the solve. Weight norm on
every convolution of the cell (the paper's choice) is applied with
:func:`~deqkit.nn.apply_weight_norm` and computed once per DEQ call; variational dropout
(:class:`~deqkit.nn.VariationalDropout`) keeps one mask per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._options import check_fraction, check_int, check_positive, validated_options
from ..errors import OptionError
from .dropout import VariationalDropout
from .norms import apply_weight_norm

__all__ = ["MDEQCell", "MDEQStem", "MDEQHead", "branch_sizes"]


def branch_sizes(height: int, width: int, n_branches: int) -> list[tuple[int, int]]:
    """Spatial size of each branch: the first is ``(height, width)``, each next one what a
    3×3 stride-2 convolution with padding 1 gives (``⌊(s − 1)/2⌋ + 1``)."""
    sizes = [(int(height), int(width))]
    for _ in range(n_branches - 1):
        h, w = sizes[-1]
        sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sizes


def _check_groups(owner: str, groups: int, channels: Sequence[int]) -> None:
    for c in channels:
        if c % groups:
            raise OptionError(f"{owner}: groups={groups} must divide every branch's channels, got channels={tuple(channels)}.")


class _ResidualBlock(nn.Module):
    """``y = GN(relu(conv₁ z))``, ``out = GN(relu(r·z + GN(conv₂ drop(y) + u)))``."""

    def __init__(self, c: int, hidden: int, groups: int, dropout: float, residual: float) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(c, hidden, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(hidden, c, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, hidden)
        self.gn2 = nn.GroupNorm(groups, c)
        self.gn3 = nn.GroupNorm(groups, c)
        self.drop = VariationalDropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        y = self.gn1(torch.relu(self.conv1(z)))
        h = self.conv2(self.drop(y)) + u
        return self.gn3(torch.relu(self.residual * z + self.gn2(h)))


def _downsample(c_from: int, c_to: int, steps: int, groups: int) -> nn.Module:
    layers: list[nn.Module] = []
    for s in range(steps):
        last = s == steps - 1
        c_out = c_to if last else c_from
        layers += [nn.Conv2d(c_from, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(groups, c_out)]
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _Upsample(nn.Module):
    """1×1 convolution, GroupNorm, nearest-neighbour upsampling to the target branch's size."""

    def __init__(self, c_from: int, c_to: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_from, c_to, 1, bias=False)
        self.gn = nn.GroupNorm(groups, c_to)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(self.gn(self.conv(x)), size=size, mode="nearest")


@validated_options
class MDEQCell(nn.Module):
    """Multiscale DEQ cell ``f((z_1, …, z_n), u) -> (z_1', …, z_n')``.

    Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020.

    Args:
        channels: channels per branch, highest resolution first (2 to 4 branches).
        hidden_ratio: the residual block's inner channels are ``hidden_ratio × channels[i]``.
        groups: GroupNorm groups (must divide every branch's channels and hidden channels).
        dropout: variational-dropout probability inside the residual blocks (one mask per call).
        weight_norm: weight-normalise every convolution (computed once per DEQ call).
        init_std: the residual blocks' convolutions start as ``N(0, init_std²)`` (small:
            near-contractive at initialisation).
        residual: weight ``r`` of the block's skip connection ``r·z`` (1 is the paper's block;
            the default 0.5 keeps the spectral radius of ``∂f/∂z`` below 1 at initialisation,
            where with ``r = 1`` it starts slightly above 1 and the forward solves stall).

    ``forward(z, u)``: ``z`` and ``u`` (the stem's features) tuples of ``(B, channels[i], H_i, W_i)``
    (see :func:`branch_sizes`); returns a tuple of ``z``'s shapes.
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32),
        *,
        hidden_ratio: float = 1.0,
        groups: int = 4,
        dropout: float = 0.0,
        weight_norm: bool = True,
        init_std: float = 0.01,
        residual: float = 0.5,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if not isinstance(channels, (tuple, list)) or not 2 <= len(channels) <= 4:
            raise OptionError(f"{owner}: channels must list 2 to 4 branch widths, highest resolution first, got {channels!r}.")
        channels = tuple(check_int(owner, "channels[i]", c) for c in channels)
        check_positive(owner, "hidden_ratio", hidden_ratio)
        check_int(owner, "groups", groups)
        dropout = check_fraction(owner, "dropout", dropout, include_zero=True)
        if dropout >= 1:
            raise OptionError(f"{owner}: dropout must be in [0, 1), got {dropout}.")
        check_positive(owner, "init_std", init_std)
        residual = check_fraction(owner, "residual", residual, include_zero=True)
        hidden = tuple(max(groups, int(round(hidden_ratio * c / groups)) * groups) for c in channels)
        _check_groups(owner, groups, channels)
        self.channels, self.groups, self.dropout = channels, groups, dropout
        self.blocks = nn.ModuleList(_ResidualBlock(c, h, groups, dropout, residual) for c, h in zip(channels, hidden))
        n = len(channels)
        self.fuse = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j < i:
                    row.append(_downsample(channels[j], channels[i], i - j, groups))
                elif j > i:
                    row.append(_Upsample(channels[j], channels[i], groups))
                else:
                    row.append(nn.Identity())
            self.fuse.append(row)
        self.post = nn.ModuleList(nn.GroupNorm(groups, c) for c in channels)
        for block in self.blocks:
            assert isinstance(block, _ResidualBlock)
            for conv in (block.conv1, block.conv2):
                nn.init.normal_(conv.weight, 0.0, init_std)
        if weight_norm:
            apply_weight_norm(self, types=(nn.Conv2d,))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, dropout={self.dropout}"

    def forward(self, z: Sequence[Tensor], u: Sequence[Tensor]) -> tuple[Tensor, ...]:
        n = len(self.channels)
        if not isinstance(z, (tuple, list)) or len(z) != n:
            raise ValueError(f"MDEQCell: the state must be a tuple of {n} tensors, one per branch.")
        if not isinstance(u, (tuple, list)) or len(u) != n or any(a.shape != b.shape for a, b in zip(u, z)):
            raise ValueError(
                f"MDEQCell: the injection must be a tuple of {n} tensors shaped like the state "
                f"{[tuple(t.shape) for t in z]}; use MDEQStem(..., n_branches={n})."
            )
        b = [block(zi, ui) for block, zi, ui in zip(self.blocks, z, u)]
        out = []
        for i, row in enumerate(self.fuse):
            assert isinstance(row, nn.ModuleList)
            size = (b[i].shape[-2], b[i].shape[-1])
            total = b[i]
            op: nn.Module
            for j, op in enumerate(row):
                if j < i:
                    total = total + op(b[j])
                elif j > i:
                    total = total + op(b[j], size)
            out.append(self.post[i](torch.relu(total)))
        return tuple(out)


@validated_options
class MDEQStem(nn.Module):
    """The injection, one feature map per branch (runs once per input, outside the solve).

    ``u₀``: a 3×3 convolution, then one 3×3 stride-2 convolution per halving of ``stride``,
    then a 3×3 convolution (GroupNorm after each, ReLU between); ``u_i = GN(conv₃ₓ₃,stride 2(relu(u_{i−1})))``.

    Args:
        in_channels: image channels.
        channels: the branches' channels, highest resolution first.
        stride: 1, 2, 4 or 8: how much smaller the first branch is than the image.
        groups: GroupNorm groups.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], *, stride: int = 2, groups: int = 4) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "in_channels", in_channels)
        channels = tuple(check_int(owner, "channels[i]", c) for c in channels)
        check_int(owner, "stride", stride)
        if stride not in (1, 2, 4, 8):
            raise OptionError(f"{owner}: stride must be 1, 2, 4 or 8, got {stride}.")
        check_int(owner, "groups", groups)
        _check_groups(owner, groups, channels)
        c0 = channels[0]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c0, 3, padding=1, bias=False), nn.GroupNorm(groups, c0), nn.ReLU()]
        for _ in range(stride.bit_length() - 1):
            layers += [nn.Conv2d(c0, c0, 3, stride=2, padding=1, bias=False), nn.GroupNorm(groups, c0), nn.ReLU()]
        layers += [nn.Conv2d(c0, c0, 3, padding=1, bias=False), nn.GroupNorm(groups, c0)]
        self.net = nn.Sequential(*layers)
        self.down = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.GroupNorm(groups, b))
            for a, b in zip(channels[:-1], channels[1:])
        )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        u = [self.net(x)]
        for down in self.down:
            u.append(down(u[-1]))
        return tuple(u)


@validated_options
class MDEQHead(nn.Module):
    """Classification head on a tuple state: average-pool each branch to ``pool × pool``,
    concatenate, linear layer."""

    def __init__(self, channels: Sequence[int], num_classes: int, *, pool: int = 2) -> None:
        super().__init__()
        check_int("MDEQHead", "num_classes", num_classes)
        self.pool = check_int("MDEQHead", "pool", pool)
        self.linear = nn.Linear(sum(channels) * self.pool * self.pool, num_classes)

    def forward(self, z: Sequence[Tensor]) -> Tensor:
        feats = [F.adaptive_avg_pool2d(t, self.pool).flatten(1) for t in z]
        return self.linear(torch.cat(feats, dim=1))
