"""Audit (issue 17): the documented defaults of the objects whose numbers are reported.

A default is part of every number produced without options (BENCHMARKS.md, the CLI tables): a
changed default must be a deliberate edit of this table, not a silent drift (the mutation run
found default values that no test pinned). One table; the lead renames keys here at the refactor
(``rtol`` → ``tol``, ``opa`` → ``opa_freq``, ``on_fail`` → ``on_failure`` …).
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
    ("FixedPoint", dk.FixedPoint, dict(damping=1.0, tol=1e-4, max_iter=50, stop_mode="rel")),
    ("Anderson", dk.Anderson, dict(memory=6, regularization=1e-4, damping=1.0, tol=1e-4, max_iter=50, stop_mode="rel")),
    ("Broyden", dk.Broyden, dict(memory=20, opa_freq=None, line_search=False, line_search_steps=4, tol=1e-4,
                                  max_iter=50, stop_mode="rel")),
    ("GMRES", dk.GMRES, dict(restart=20, tol=1e-6, max_iter=60, stop_mode="rel")),
    ("Dense", dk.Dense, dict(max_dim=4096, tol=1e-6, stop_mode="rel")),
    ("Exact", dk.Exact, dict(tol=None, max_iter=None, on_failure="warn", warm_start="default")),
    ("Exact.linear_solver", lambda: dk.Exact().linear_solver, dict(restart=20, tol=1e-6, max_iter=60)),
    ("Unrolled", dk.Unrolled, dict(k=5, damping=0.5)),
    ("Neumann", dk.Neumann, dict(k=5, damping=0.5)),
    ("JacobianFree", dk.JacobianFree, dict(k=1, damping=1.0)),
    ("SHINE", dk.SHINE, dict(fallback=False, fallback_ratio=1.8, refine=0)),
    ("WarmExact", dk.WarmExact, dict(warm_start="shine+inverse", on_failure="warn")),
    ("WarmExact.linear_solver", lambda: dk.WarmExact().linear_solver, dict(memory=30, tol=1e-6, max_iter=60)),
    ("DEQ.solver", lambda: dk.DEQ(_Cell()).solver, dict(memory=6, tol=1e-4, max_iter=40)),
    ("DEQ", lambda: dk.DEQ(_Cell()), dict(init="zeros", eval_max_iter=None, on_nonconvergence="warn")),
    ("bilevel.Exact", bilevel.Exact, dict(rtol=1e-10, max_iter=1000, warm_start=True, on_fail="warn")),
    ("bilevel.SHINE", bilevel.SHINE, dict(refine=0, opa=None)),
    ("bilevel.HOAG", lambda: bilevel.HOAG(bilevel.Exact()),
     dict(outer_steps=30, tol_init=1e-3, tol_decrease=0.78, lam_bounds=(-12.0, 12.0), reject_rtol=0.0, warm_start=True)),
    ("bilevel.HOAG.solver", lambda: bilevel.HOAG(bilevel.Exact()).solver, dict(memory=30, max_iter=1000)),
    ("bilevel.HOAG.solver(opa)", lambda: bilevel.HOAG(bilevel.SHINE(opa=5)).solver, dict(memory=60)),
    ("bilevel.LBFGS", bilevel.LBFGS, dict(memory=30, tol=1e-6, max_iter=1000, line_search="wolfe", max_ls_evals=25,
                                          opa_step=1e-3, curvature_eps=1e-10, on_fail="warn")),
    ("sim.BatchedADMM", BatchedADMM, dict(rho=1.0, max_iter=1000, eps_abs=1e-7, eps_rel=1e-5, mode="relaxed",
                                          adaptive_rho=True, mu=10.0, tau=2.0, check_every=10, alpha=1.0,
                                          zero_tol=1e-6, rank_tol=1e-10)),
]


@pytest.mark.parametrize("make,expected", [(m, e) for _, m, e in DEFAULTS], ids=[n for n, _, _ in DEFAULTS])
def test_documented_defaults(make, expected):
    obj = make()
    got = {k: getattr(obj, k) for k in expected}
    assert got == expected
