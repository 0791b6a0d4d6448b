"""deqkit: deep equilibrium and implicit models in PyTorch, every cheap gradient one switch apart."""

from .deq import DEQ, DEQInfo
from .errors import ConvergenceError, ConvergenceWarning, DEQError, NonFiniteError
from .estimators import AdjointEstimator, Exact, GradientEstimator, JacobianFree, Neumann, Unrolled, make_estimator
from .linear import GMRES, Dense
from .models import ConvCell, DEQClassifier, MLPCell
from .shine import SHINE, BroydenReuse, WarmExact
from .solvers import Anderson, Broyden, BroydenState, FixedPoint, Solver, SolverResult, make_solver

__version__ = "0.1.0"

__all__ = [
    "DEQ",
    "DEQInfo",
    "Solver",
    "SolverResult",
    "FixedPoint",
    "Anderson",
    "Broyden",
    "BroydenState",
    "GMRES",
    "Dense",
    "GradientEstimator",
    "AdjointEstimator",
    "Exact",
    "Unrolled",
    "Neumann",
    "JacobianFree",
    "SHINE",
    "BroydenReuse",
    "WarmExact",
    "MLPCell",
    "ConvCell",
    "DEQClassifier",
    "make_solver",
    "make_estimator",
    "ConvergenceError",
    "ConvergenceWarning",
    "DEQError",
    "NonFiniteError",
]
