"""Data augmentation of image batches during training: :class:`ImageAugment`.

Random horizontal flips and random translations (pad by ``shift`` pixels with the background
value, crop back at a random offset), drawn independently per sample from a generator the
trainer seeds per step, so a resumed run augments exactly as an uninterrupted one. The standard
augmentation of convolutional networks on small images (e.g. He, Zhang, Ren & Sun, "Deep
Residual Learning for Image Recognition", CVPR 2016, §4.2, on CIFAR-10). Off by default in the
commands: on the six-epoch Fashion-MNIST MDEQ it cost 1.5 points (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

from .._options import check_bool, check_int, validated_options
from ..errors import OptionError

__all__ = ["ImageAugment", "AUGMENTATIONS"]

#: the names ``deqkit train --augment`` takes
AUGMENTATIONS = ("none", "flip", "shift", "flip+shift")


@validated_options
class ImageAugment:
    """Per-sample random flips and translations of image batches ``(B, C, H, W)``.

    Args:
        flip: flip each image left–right with probability 1/2 (right for clothes, wrong for digits).
        shift: translate each image by a whole number of pixels drawn uniformly from
            ``[-shift, shift]`` in each direction (0: none); uncovered pixels get ``fill``.
        fill: the background value per channel (a float, or one per channel), in the units of
            the (normalised) batch, e.g. ``-mean / std`` for a black background.

    ``augment(x, generator)`` returns a new batch; ``x`` is not modified. It draws its random
    numbers from ``generator`` (a CPU ``torch.Generator``) only.
    """

    def __init__(self, *, flip: bool = False, shift: int = 0, fill: Union[float, Sequence[float]] = 0.0) -> None:
        self.flip = check_bool("ImageAugment", "flip", flip)
        self.shift = check_int("ImageAugment", "shift", shift, minimum=0)  # pixels
        self.fill = torch.as_tensor(fill, dtype=torch.float64).reshape(-1)

    @classmethod
    def from_name(cls, name: str, fill: Union[float, Sequence[float]] = 0.0, shift: int = 2) -> ImageAugment | None:
        """The augmentation ``name`` (one of :data:`AUGMENTATIONS`; ``"none"`` gives ``None``)."""
        if name not in AUGMENTATIONS:
            raise OptionError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {name!r}.")
        if name == "none":
            return None
        return cls(flip="flip" in name, shift=shift if "shift" in name else 0, fill=fill)

    def __repr__(self) -> str:
        return f"ImageAugment(flip={self.flip}, shift={self.shift})"

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() != 4:
            raise OptionError(
                f"ImageAugment: expects image batches (B, C, H, W), got shape {tuple(x.shape)}; "
                f"flattened inputs cannot be flipped or shifted (use augment='none' for them)."
            )
        B, C, H, W = x.shape
        if self.fill.numel() not in (1, C):
            raise OptionError(f"ImageAugment: fill has {self.fill.numel()} values for {C} channels.")
        if self.flip:
            flips = (torch.rand(B, generator=generator) < 0.5).to(x.device)
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        if self.shift:
            s = self.shift
            offsets = torch.randint(0, 2 * s + 1, (2, B), generator=generator).to(x.device)
            fill = self.fill.to(device=x.device, dtype=x.dtype)
            padded = fill.reshape(1, -1, 1, 1).expand(B, C, H + 2 * s, W + 2 * s).clone()
            padded[:, :, s : s + H, s : s + W] = x
            rows = (offsets[0][:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
            cols = (offsets[1][:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
            bidx = torch.arange(B, device=x.device)[:, None, None, None]
            cidx = torch.arange(C, device=x.device)[None, :, None, None]
            x = padded[bidx, cidx, rows, cols]
        return x
