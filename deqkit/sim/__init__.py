"""State-driven implicit modeling (SIM).

Tsai, Decugis, El Ghaoui, Atamtürk, "State-driven Implicit Modeling for Sparsity and
Robustness in Neural Networks", arXiv 2209.09389: fit an implicit model
``x = φ(Ax + Bu), ŷ = Cx + Du`` to the states of a trained explicit network by a convex,
row-separable program (ℓ1 for sparsity, ``‖A‖_∞ ≤ κ`` for well-posedness), solved by a batched
ADMM (or a CVXPY reference); then evaluate sparsity, accuracy and robustness to attacks.

    >>> states = collect_states(mlp, u_train)          # rescaled so ‖A‖_∞ ≤ κ is feasible
    >>> res = fit_sim(states, density=0.5)             # λ searched for 50 % of the baseline's non-zeros
    >>> res.lam, res.density                           # the λ chosen (scale-free units), the density reached
    >>> res.model(u_test), count_nonzeros(res.model)
"""

from .admm import ADMMResult, BatchedADMM
from .attacks import accuracy, fgsm, pgd, robust_accuracy
from .baseline import make_mlp, train_mlp
from .cnn import cnn_layers, cnn_support, cnn_to_implicit, collect_cnn_states, make_cnn
from .density import DensitySearch, search_lam
from .fit import (
    SIMResult,
    baseline_nonzeros,
    count_nonzeros,
    finetune,
    fit_sim,
    lam_factors,
    structure_support,
)
from .model import ImplicitModel
from .projection import project_l1_ball
from .reference import CVXPYResult, solve_rows_cvxpy
from .robust import LinfGain, certified_accuracy, certified_linf_gain
from .states import States, collect_states, mlp_to_implicit, register_layer

__all__ = [
    "ADMMResult",
    "BatchedADMM",
    "CVXPYResult",
    "DensitySearch",
    "ImplicitModel",
    "LinfGain",
    "SIMResult",
    "States",
    "accuracy",
    "baseline_nonzeros",
    "certified_accuracy",
    "certified_linf_gain",
    "cnn_layers",
    "cnn_support",
    "cnn_to_implicit",
    "collect_cnn_states",
    "collect_states",
    "count_nonzeros",
    "fgsm",
    "finetune",
    "fit_sim",
    "lam_factors",
    "make_cnn",
    "make_mlp",
    "mlp_to_implicit",
    "pgd",
    "project_l1_ball",
    "register_layer",
    "robust_accuracy",
    "search_lam",
    "solve_rows_cvxpy",
    "structure_support",
    "train_mlp",
]
