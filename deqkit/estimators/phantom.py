"""Phantom gradients (UPG, NPG) and Jacobian-free backpropagation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from .._options import check_fraction, check_int, validated_options
from ..registry import register_estimator
from ..solvers.base import SolverResult
from .base import AdjointEstimator, BackwardStats, CellFn, GradientEstimator, Vjp, straight_through

if TYPE_CHECKING:
    from ..deq import DEQInfo

__all__ = ["Neumann", "Unrolled", "JacobianFree"]


class _PhantomOptions:
    """The options ``(k, λ)`` shared by the phantom gradients, and their table label ``Name(k, λ)``."""

    def __init__(self, k: int = 5, damping: float = 0.5) -> None:
        owner = type(self).__name__
        self.k, self.damping = check_int(owner, "k", k), check_fraction(owner, "damping", damping)

    @property
    def label(self) -> str:
        return f"{type(self).__name__}({self.k}, {self.damping:g})"


def _neumann_closed_form(k: int, lam: float, v: Tensor, J: Tensor) -> Tensor:
    """``λ Σ_{t<k} v (λJ + (1−λ)I)^t`` with dense ``J`` ``(B, d, d)``."""
    eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
    M = lam * J + (1 - lam) * eye
    term, total = v, v
    for _ in range(k - 1):
        term = torch.einsum("bi,bij->bj", term, M)
        total = total + term
    return lam * total


@register_estimator("neumann")
@validated_options
class Neumann(_PhantomOptions, AdjointEstimator):
    """Neumann-series phantom gradient (NPG): ``w = λ Σ_{t<k} v (λJ + (1−λ)I)^t`` at ``z*``.

    Geng, Zhang, Bai, Wang & Lin, "On Training Implicit Models", NeurIPS 2021 (arXiv 2111.05177).
    ``k = 1`` gives ``λ v``; as ``k → ∞`` it tends to the exact ``v (I − J)⁻¹`` when the damped
    iteration is a contraction. Costs ``k − 1`` VJPs.
    """

    name = "neumann"

    def compute_w(self, v: Tensor, vjp: Vjp, result: SolverResult, stats: BackwardStats) -> Tensor:
        lam = self.damping
        term, total = v, v
        for _ in range(self.k - 1):
            term = lam * vjp(term) + (1 - lam) * term
            total = total + term
        return lam * total

    def adjoint_closed_form(self, v: Tensor, J: Tensor, inverse: Optional[Tensor] = None) -> Optional[Tensor]:
        return _neumann_closed_form(self.k, self.damping, v, J)


@register_estimator("unrolled")
@validated_options
class Unrolled(_PhantomOptions, GradientEstimator):
    """Unrolled phantom gradient (UPG): backprop through ``k`` damped steps started at ``z*``.

    ``z₀ = z*`` (detached), ``z_{t+1} = λ f(z_t, x) + (1 − λ) z_t``; the returned value stays
    ``z*``, the gradient is that of ``z_k``. Geng et al., NeurIPS 2021 (arXiv 2111.05177);
    their MDEQ setting is ``k = 5, λ = 0.5``. At an exact fixed point its ``w`` is the
    :class:`Neumann` series with the same ``(k, λ)``.
    """

    name = "unrolled"

    def attach(self, cell_fn: CellFn, result: SolverResult, info: DEQInfo) -> Tensor:
        z = result.z.detach()
        for _ in range(self.k):
            fz = cell_fn(z)
            z = fz if self.damping == 1.0 else self.damping * fz + (1 - self.damping) * z
        if not z.requires_grad:
            return result.z
        info.backward = BackwardStats(self.name, time_s=None, vjps=self.k)
        return straight_through(result.z, z)

    def adjoint_closed_form(self, v: Tensor, J: Tensor, inverse: Optional[Tensor] = None) -> Optional[Tensor]:
        """The :class:`Neumann` series (exact at a fixed point, where every unrolled step sees ``J``)."""
        return _neumann_closed_form(self.k, self.damping, v, J)


@register_estimator("jacobian-free", aliases=("jfb",))
@validated_options
class JacobianFree(Unrolled):
    """Jacobian-free backpropagation (JFB): ``w = v``, i.e. ``(I − J)⁻¹ ≈ I``.

    Fung, Heaton, Li, McKenzie, Osher & Yin, "JFB: Jacobian-Free Backpropagation for Implicit
    Networks", AAAI 2022. Identical to ``Unrolled(k=1, damping=1)`` by construction.
    """

    name = "jacobian-free"

    def __init__(self) -> None:
        super().__init__(k=1, damping=1.0)

    def __repr__(self) -> str:
        return "JacobianFree()"

    @property
    def label(self) -> str:
        return "JacobianFree"
