"""Linear solvers for the adjoint equation ``w = wJ + v`` of the exact implicit gradient.

See :mod:`deqkit.linear.base` for the protocol every linear solver implements;
:func:`make_linear_solver` builds a registered one by name.
"""

from typing import Any

from ..registry import LINEAR_SOLVERS, register_linear_solver
from .auto import AutoAdjoint
from .base import LinearSolver
from .cg import CG
from .dense import Dense
from .fixed_point import FixedPointAdjoint, as_linear_solver
from .gmres import GMRES

__all__ = [
    "LinearSolver",
    "GMRES",
    "AutoAdjoint",
    "Dense",
    "CG",
    "FixedPointAdjoint",
    "as_linear_solver",
    "make_linear_solver",
    "register_linear_solver",
]


def make_linear_solver(name: str, **options: Any) -> LinearSolver:
    """Build a registered adjoint linear solver by name (``gmres``, ``auto``, ``dense``, ``cg``, or one you registered)."""
    return LINEAR_SOLVERS.make(name, **options)
