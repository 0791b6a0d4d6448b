"""Forward fixed-point solvers: one protocol, one loop, one result object.

See :mod:`deqkit.solvers.base` for the protocol (``init`` / ``observe`` / ``step``, the loop
written once) and how to write a solver; :func:`make_solver` builds a registered one by name.
:mod:`deqkit.solvers.precision` holds the dtype policy of solver state (:func:`state_dtype`,
:func:`min_tol`, :class:`PrecisionWarning`), shared by the adjoint linear solvers.
"""

from typing import Any

from ..registry import SOLVERS, register_solver
from .anderson import Anderson
from .base import NONFINITE_POLICIES, STOP_MODES, Problem, Solver, SolverResult
from .broyden import Broyden, BroydenState
from .fixed_point import FixedPoint
from .precision import PrecisionWarning, min_tol, state_dtype
from .tracking import IterateTracker

__all__ = [
    "Solver",
    "SolverResult",
    "Problem",
    "IterateTracker",
    "FixedPoint",
    "Anderson",
    "Broyden",
    "BroydenState",
    "STOP_MODES",
    "NONFINITE_POLICIES",
    "make_solver",
    "register_solver",
    "PrecisionWarning",
    "min_tol",
    "state_dtype",
]


def make_solver(name: str, **options: Any) -> Solver:
    """Build a registered forward solver by name (``fixed-point``, ``anderson``, ``broyden``, or one you registered)."""
    return SOLVERS.make(name, **options)
