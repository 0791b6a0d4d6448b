"""deqkit: deep equilibrium and implicit models in PyTorch, every cheap gradient one switch apart."""

from .deq import DEQ, DEQInfo
from .errors import ConvergenceError, ConvergenceWarning, DEQError, NonFiniteError, OptionError, PrecisionWarning
from .estimators import (
    SHINE,
    Adaptive,
    AdjointEstimator,
    BackwardStats,
    BroydenReuse,
    Exact,
    GradientEstimator,
    JacobianFree,
    Neumann,
    Unrolled,
    WarmExact,
    make_estimator,
)
from .inverse import InverseEstimate
from .linear import GMRES, AutoAdjoint, Dense, FixedPointAdjoint, LinearSolver, make_linear_solver
from .models import ConvCell, DEQClassifier, MLPCell
from .registry import register_estimator, register_linear_solver, register_solver
from .solvers import Anderson, Broyden, BroydenState, FixedPoint, Solver, SolverResult, make_solver

__version__ = "0.2.0"

__all__ = [
    "DEQ",
    "DEQInfo",
    "Solver",
    "SolverResult",
    "FixedPoint",
    "Anderson",
    "Broyden",
    "BroydenState",
    "InverseEstimate",
    "LinearSolver",
    "GMRES",
    "AutoAdjoint",
    "Dense",
    "FixedPointAdjoint",
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
    "MLPCell",
    "ConvCell",
    "DEQClassifier",
    "make_solver",
    "make_estimator",
    "make_linear_solver",
    "register_solver",
    "register_estimator",
    "register_linear_solver",
    "ConvergenceError",
    "ConvergenceWarning",
    "PrecisionWarning",
    "DEQError",
    "NonFiniteError",
    "OptionError",
]
