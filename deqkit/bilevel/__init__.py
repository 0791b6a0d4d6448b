"""Bi-level optimisation with SHINE hypergradients.

``x*(λ) = argmin_x h(x, λ)``, outer loss ``L(x*(λ))``, hypergradient
``dL/dλ = −(∂²h/∂λ∂x)ᵀ H⁻¹ ∇L(x*)``.

- :class:`BilevelProblem`: any ``h(x, lam)`` and ``L(x)`` written in torch.
- :class:`LBFGS`: the inner solver; its result keeps the ``(s, y)`` pairs and exposes them as
  an inverse estimate (:class:`LBFGSInverse`, a :class:`deqkit.inverse.InverseEstimate`,
  the interface the core's SHINE uses for Broyden's inverse).
- Hypergradient estimators (one interface, ``est.hypergradient(problem, lam, inner_result)``):
  :class:`ExactHypergradient` (conjugate gradient, :class:`deqkit.linear.CG`),
  :class:`SHINEHypergradient` (``refine=n``, ``opa_freq=k``), :class:`JacobianFreeHypergradient`;
  by name with :func:`make_hypergradient`, extended with :func:`register_hypergradient`.
- :class:`HOAG`: the outer loop (Pedregosa, ICML 2016).
- :func:`load_hpo_dataset`, :func:`logistic_hpo_problem`: the reference problem.

References: Ramzi, Mannel, Bai, Starck, Ciuciu, Moreau, "SHINE: SHaring the INverse Estimate
from the forward pass for bi-level optimization and implicit models", ICLR 2022,
arXiv 2106.00553; Pedregosa, "Hyperparameter optimization with approximate gradient",
ICML 2016.
"""

from .data import HPO_DATASETS, HPOSplits, load_hpo_dataset, logistic_hpo_problem
from .hoag import HOAG, HOAGResult, hypergradient_cosine
from .hypergrad import (
    HYPERGRADIENT_NAMES,
    HYPERGRADIENTS,
    ExactHypergradient,
    HypergradientEstimator,
    HypergradResult,
    JacobianFreeHypergradient,
    SHINEHypergradient,
    WEstimate,
    default_inner_solver,
    make_hypergradient,
    register_hypergradient,
)
from .lbfgs import LBFGS, LBFGSInverse, LBFGSResult, SecantMemory, dense_bfgs_inverse, two_loop
from .problem import BilevelProblem

__all__ = [
    "BilevelProblem",
    "LBFGS",
    "LBFGSResult",
    "LBFGSInverse",
    "SecantMemory",
    "two_loop",
    "dense_bfgs_inverse",
    "HypergradientEstimator",
    "HypergradResult",
    "WEstimate",
    "ExactHypergradient",
    "SHINEHypergradient",
    "JacobianFreeHypergradient",
    "make_hypergradient",
    "register_hypergradient",
    "HYPERGRADIENTS",
    "HYPERGRADIENT_NAMES",
    "default_inner_solver",
    "HOAG",
    "HOAGResult",
    "hypergradient_cosine",
    "HPO_DATASETS",
    "HPOSplits",
    "load_hpo_dataset",
    "logistic_hpo_problem",
]
