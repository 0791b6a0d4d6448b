"""Linear solvers for the adjoint equation ``w = wJ + v`` of the exact implicit gradient.

See :mod:`deqkit.linear.base` for the protocol every linear solver implements.
"""

from .base import LinearSolver
from .cg import CG
from .dense import Dense
from .gmres import GMRES

__all__ = ["LinearSolver", "GMRES", "Dense", "CG"]
