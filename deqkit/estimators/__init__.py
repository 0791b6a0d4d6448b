"""Gradient estimators: how the backward pass of a DEQ replaces ``(I − J)⁻¹``.

- :mod:`~deqkit.estimators.base`: the protocol (:class:`GradientEstimator`,
  :class:`AdjointEstimator`) and :class:`BackwardStats`;
- :mod:`~deqkit.estimators.exact`: :class:`Exact`;
- :mod:`~deqkit.estimators.phantom`: :class:`Unrolled`, :class:`Neumann`, :class:`JacobianFree`;
- :mod:`~deqkit.estimators.shine`: :class:`SHINE`, :class:`BroydenReuse`, :class:`WarmExact`;
- :mod:`~deqkit.estimators.adaptive`: :class:`Adaptive` (a cheap estimator, exact when it must).

:func:`make_estimator` builds a registered one by name.
"""

from typing import Any

from ..registry import ESTIMATORS, register_estimator
from .adaptive import Adaptive, AdaptiveDecision, AdaptiveStats  # noqa: E402 (after the estimators it combines)
from .base import AdjointEstimator, BackwardStats, GradientEstimator, loss_scaled_backward, loss_scaling_active, straight_through
from .exact import Exact
from .phantom import JacobianFree, Neumann, Unrolled
from .shine import SHINE, BroydenReuse, WarmExact, shine_direction

__all__ = [
    "GradientEstimator",
    "AdjointEstimator",
    "BackwardStats",
    "Exact",
    "Unrolled",
    "Neumann",
    "JacobianFree",
    "SHINE",
    "BroydenReuse",
    "WarmExact",
    "Adaptive",
    "AdaptiveDecision",
    "AdaptiveStats",
    "shine_direction",
    "straight_through",
    "loss_scaled_backward",
    "loss_scaling_active",
    "make_estimator",
    "register_estimator",
]


def make_estimator(name: str, **options: Any) -> GradientEstimator:
    """Build a registered gradient estimator by name (``exact``, ``unrolled``, ``neumann``,
    ``jacobian-free``/``jfb``, ``shine``, ``broyden-reuse``, ``exact-warm``, ``adaptive``, or one you registered)."""
    return ESTIMATORS.make(name, **options)
