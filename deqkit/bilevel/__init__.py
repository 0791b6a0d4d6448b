"""Bi-level optimisation with SHINE hypergradients (deqkit issue #6).

``x*(λ) = argmin_x h(x, λ)``, outer loss ``L(x*(λ))``, hypergradient
``dL/dλ = −(∂²h/∂λ∂x)ᵀ H⁻¹ ∇L(x*)``.

- :class:`BilevelProblem`: any ``h(x, lam)`` and ``L(x)`` written in torch.
- :class:`LBFGS`: the inner solver; its result keeps the ``(s, y)`` pairs.
- Estimators (one interface, ``est.hypergradient(problem, lam, inner_result)``):
  :class:`Exact`, :class:`SHINE` (``refine=n``, ``opa=freq``), :class:`JacobianFree`.
- :class:`HOAG`: the outer loop (Pedregosa, ICML 2016).
- :func:`load_dataset`, :func:`logistic_hpo_problem`: the reference problem.

References: Ramzi, Mannel, Bai, Starck, Ciuciu, Moreau, "SHINE: SHaring the INverse Estimate
from the forward pass for bi-level optimization and implicit models", ICLR 2022,
arXiv 2106.00553; Pedregosa, "Hyperparameter optimization with approximate gradient",
ICML 2016.
"""

from .data import DATASETS, Splits, load_dataset, logistic_hpo_problem
from .hoag import HOAG, HOAGResult, hypergradient_cosine
from .hypergrad import (ESTIMATOR_NAMES, CGResult, Exact, HypergradientEstimator,
                        HypergradResult, JacobianFree, SHINE, conjugate_gradient,
                        default_inner_solver, make_estimator)
from .lbfgs import LBFGS, LBFGSResult, SecantMemory, dense_bfgs_inverse, two_loop
from .problem import BilevelProblem

__all__ = [
    "BilevelProblem", "LBFGS", "LBFGSResult", "SecantMemory", "two_loop", "dense_bfgs_inverse",
    "HypergradientEstimator", "HypergradResult", "Exact", "SHINE", "JacobianFree",
    "conjugate_gradient", "CGResult", "make_estimator", "default_inner_solver",
    "ESTIMATOR_NAMES", "HOAG", "HOAGResult", "hypergradient_cosine", "DATASETS", "Splits",
    "load_dataset", "logistic_hpo_problem",
]
