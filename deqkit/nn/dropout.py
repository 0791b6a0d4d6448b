"""Variational (locked) dropout for DEQ cells: one mask per DEQ call.

Ordinary dropout draws a new mask at every evaluation, so the map a solver iterates would change
at every step and have no fixed point. :class:`VariationalDropout` draws one mask when first used
after :meth:`VariationalDropout.reset_per_call` — which :class:`~deqkit.deq.DEQ` calls on every
module of its cell at the start of each forward call — and reuses it for every solver iteration,
the estimator's evaluations and the backward pass (Gal & Ghahramani, "A Theoretically Grounded
Application of Dropout in Recurrent Neural Networks", NeurIPS 2016; used in DEQ and MDEQ, Bai et
al. 2019, 2020).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._options import check_fraction, validated_options

__all__ = ["VariationalDropout"]


@validated_options
class VariationalDropout(nn.Module):
    """Dropout with one mask per DEQ call, shared by all channels' positions (``(B, C, 1, ..)``).

    Args:
        p: drop probability in ``[0, 1)``; kept units are scaled by ``1 / (1 − p)``.
        per_channel: ``True`` (default): the mask has shape ``(B, C, 1, ...)`` (a whole channel is
            dropped); ``False``: one entry per element.

    Identity in eval mode. Outside a DEQ, call :meth:`reset_per_call` yourself for a new mask;
    a new mask is also drawn when the input's shape changes.
    """

    def __init__(self, p: float = 0.1, *, per_channel: bool = True) -> None:
        super().__init__()
        p = check_fraction("VariationalDropout", "p", p, include_zero=True)
        if p >= 1.0:
            from ..errors import OptionError

            raise OptionError(f"VariationalDropout: p must be in [0, 1), got {p}.")
        self.p = float(p)
        self.per_channel = bool(per_channel)
        self.mask: Optional[Tensor] = None
        #: masks drawn so far (a counter for tests and diagnostics)
        self.n_masks = 0

    def extra_repr(self) -> str:
        return f"p={self.p}, per_channel={self.per_channel}"

    def reset_per_call(self) -> None:
        """Forget the mask; the next forward draws a new one."""
        self.mask = None

    def _mask_shape(self, x: Tensor) -> tuple[int, ...]:
        if self.per_channel and x.dim() > 2:
            return (x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))
        return tuple(x.shape)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = self._mask_shape(x)
        if self.mask is None or tuple(self.mask.shape) != shape or self.mask.dtype != x.dtype or self.mask.device != x.device:
            keep = 1.0 - self.p
            self.mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep) / keep
            self.n_masks += 1
        return x * self.mask

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["mask"] = None  # a copy (EMA, pickling) starts with a fresh mask
        return state
