"""Damped Picard iteration."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .._options import check_fraction, validated_options
from ..registry import register_solver
from .base import Solver

__all__ = ["FixedPoint"]


@register_solver("fixed-point")
@validated_options
class FixedPoint(Solver):
    """Damped Picard iteration ``z ← (1 − β) z + β f(z)``.

    The classical fixed-point (Banach–Picard, Krasnosel'skii–Mann for β < 1) iteration; see e.g.
    Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019, for its use in DEQs.
    Converges when the map is a contraction (e.g. ``‖J‖ < 1``); ``damping`` β < 1 helps when
    ``J`` has eigenvalues near −1. Options as :class:`~deqkit.solvers.Solver`, plus ``damping``.
    """

    nonfinite_advice = "or use damping < 1"
    name = "fixed-point"

    def __init__(
        self,
        *,
        damping: float = 1.0,
        tol: float = 1e-4,
        max_iter: int = 50,
        stop_mode: str = "rel",
        on_nonfinite: str = "raise",
        freeze_converged: bool = False,
    ) -> None:
        super().__init__(
            tol=tol, max_iter=max_iter, stop_mode=stop_mode, on_nonfinite=on_nonfinite, freeze_converged=freeze_converged
        )
        self.damping = check_fraction(type(self).__name__, "damping", damping)

    def step(self, state: Any, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        return z + self.damping * (fz - z)
