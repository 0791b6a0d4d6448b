"""Audit (issue 17): the documented defaults of the objects whose numbers are reported.

A default is part of every number produced without options (BENCHMARKS.md, the CLI tables): a
changed default must be a deliberate edit of this table, not a silent drift (the mutation run
found default values that no test pinned). One table, in the 0.2 names (docs/guide/migration.md:
``rtol`` → ``tol``, ``opa`` → ``opa_freq``, ``on_fail``/``on_nonconvergence`` → ``on_failure``,
``eps_rel``/``eps_abs`` → ``tol``/``tol_abs``, ``reject_rtol`` → ``reject_tol``).

Defaults changed on purpose at the 0.2 refactor (asserted here at their new values):
``Exact()``'s linear solver is ``AutoAdjoint`` (Picard steps switching to GMRES; was ``GMRES``)
and ``Exact(match_forward=True)`` lets the adjoint tolerance follow the forward residual;
``fit_sim``'s λ is scale-free (``lam_scale="normalized"``; 0.1 solved the paper's program, now
``lam_scale="paper"``); since 2026-11-30 the scale-free default is ``"pooled"`` (one root mean
square per block of rows instead of one per row; docs/guide/migration.md, "Behaviour changes").
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqkit as dk
from deqkit import bilevel
from deqkit.sim import BatchedADMM


class _Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


DEFAULTS = [
    ("FixedPoint", dk.FixedPoint, dict(damping=1.0, tol=1e-4, max_iter=50, stop_mode="rel", freeze_converged=False)),
    (
        "Anderson",
        dk.Anderson,
        dict(memory=6, regularization=1e-4, damping=1.0, tol=1e-4, max_iter=50, stop_mode="rel", freeze_converged=False),
    ),
    (
        "Broyden",
        dk.Broyden,
        dict(
            memory=20,
            opa_freq=None,
            line_search=False,
            line_search_steps=4,
            tol=1e-4,
            max_iter=50,
            stop_mode="rel",
            freeze_converged=False,
        ),
    ),
    ("GMRES", dk.GMRES, dict(restart=20, tol=1e-6, max_iter=60, stop_mode="rel")),
    ("Dense", dk.Dense, dict(max_dim=4096, tol=1e-6, stop_mode="rel")),
    (
        "Exact",
        dk.Exact,
        dict(tol=None, max_iter=None, on_failure="warn", warm_start="default", match_forward=True, forward_factor=0.3),
    ),
    # 0.2: the default adjoint solver is AutoAdjoint (was GMRES(restart=20, tol=1e-6, max_iter=60))
    (
        "Exact.linear_solver",
        lambda: dk.Exact().linear_solver,
        dict(restart=20, tol=1e-6, max_iter=60, stop_mode="rel", probe=3, switch_rate=0.8),
    ),
    ("Unrolled", dk.Unrolled, dict(k=5, damping=0.5)),
    ("Neumann", dk.Neumann, dict(k=5, damping=0.5)),
    ("JacobianFree", dk.JacobianFree, dict(k=1, damping=1.0)),
    ("SHINE", dk.SHINE, dict(fallback=False, fallback_ratio=1.8, refine=0)),
    ("WarmExact", dk.WarmExact, dict(warm_start="shine+inverse", on_failure="warn", match_forward=True, forward_factor=0.3)),
    ("WarmExact.linear_solver", lambda: dk.WarmExact().linear_solver, dict(memory=30, tol=1e-6, max_iter=60)),
    ("DEQ.solver", lambda: dk.DEQ(_Cell()).solver, dict(memory=6, tol=1e-4, max_iter=40)),
    ("DEQ", lambda: dk.DEQ(_Cell()), dict(init="zeros", eval_max_iter=None, on_failure="warn")),
    (
        "bilevel.ExactHypergradient",
        bilevel.ExactHypergradient,
        dict(tol=1e-10, max_iter=1000, warm_start=True, on_failure="warn"),
    ),
    ("bilevel.SHINEHypergradient", bilevel.SHINEHypergradient, dict(refine=0, opa_freq=None)),
    (
        "bilevel.HOAG",
        lambda: bilevel.HOAG(bilevel.ExactHypergradient()),
        dict(
            outer_steps=30,
            tol_init=1e-3,
            tol_decrease=0.78,
            lam_bounds=(-12.0, 12.0),
            reject_tol=0.0,
            warm_start=True,
            on_failure="warn",
        ),
    ),
    ("bilevel.HOAG.solver", lambda: bilevel.HOAG(bilevel.ExactHypergradient()).solver, dict(memory=30, max_iter=1000)),
    ("bilevel.HOAG.solver(opa)", lambda: bilevel.HOAG(bilevel.SHINEHypergradient(opa_freq=5)).solver, dict(memory=60)),
    (
        "bilevel.LBFGS",
        bilevel.LBFGS,
        dict(
            memory=30,
            tol=1e-6,
            max_iter=1000,
            line_search="wolfe",
            max_ls_evals=25,
            opa_step=1e-3,
            curvature_eps=1e-10,
            on_failure="warn",
        ),
    ),
    (
        "sim.BatchedADMM",
        BatchedADMM,
        dict(
            rho=1.0,
            max_iter=1000,
            tol_abs=1e-7,
            tol=1e-5,
            mode="relaxed",
            adaptive_rho=True,
            mu=10.0,
            tau=2.0,
            check_every=10,
            alpha=1.0,
            zero_tol=1e-6,
            rank_tol=1e-10,
            on_failure="warn",
        ),
    ),
]


@pytest.mark.parametrize("make,expected", [(m, e) for _, m, e in DEFAULTS], ids=[n for n, _, _ in DEFAULTS])
def test_documented_defaults(make, expected):
    obj = make()
    got = {k: getattr(obj, k) for k in expected}
    assert got == expected


def test_exact_default_adjoint_solver_is_auto_adjoint():
    """0.2: ``Exact()`` solves the adjoint with ``AutoAdjoint`` (was ``GMRES``), its tolerance
    following the forward residual (``match_forward=True``, capped at 1e-2)."""
    est = dk.Exact()
    assert type(est.linear_solver) is dk.AutoAdjoint
    assert est.MATCHED_TOL_CAP == 1e-2


def test_fit_sim_documented_defaults():
    """0.2: ``fit_sim``'s λ is scale-free by default (``lam_scale="pooled"``, until 2026-11-30 ``"normalized"``;
    ``"paper"`` is the 0.1 program)."""
    import inspect

    from deqkit.sim import fit_sim

    params = inspect.signature(fit_sim).parameters
    got = {k: params[k].default for k in ("method", "mode", "zero_tol", "lam_scale", "penalty", "on_failure")}
    assert got == dict(method="admm", mode="relaxed", zero_tol=1e-6, lam_scale="pooled", penalty="uniform", on_failure="warn")


def test_line_search_and_finetune_documented_defaults():
    """LBFGS's strong-Wolfe constants (c1 = 1e-4, c2 = 0.9, as its docstring says; the solver
    calls the search with them) and ``finetune``'s one epoch."""
    import inspect

    from deqkit.bilevel.lbfgs import LBFGS, _armijo, _wolfe
    from deqkit.sim import finetune

    wolfe = inspect.signature(_wolfe).parameters
    assert (wolfe["c1"].default, wolfe["c2"].default) == (1e-4, 0.9)
    assert inspect.signature(_armijo).parameters["c1"].default == 1e-4
    assert "c1=1e-4, c2=0.9" in (LBFGS.__doc__ or "")
    assert inspect.signature(finetune).parameters["epochs"].default == 1
