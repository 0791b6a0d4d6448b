"""Broyden's optional backtracking line search."""

from __future__ import annotations

import pytest
import torch
from conftest import F64

from deqkit import Broyden


def _atan_map(z):
    # g(z) = f(z) − z = −2·atan(z): root at 0; full quasi-Newton steps overshoot from |z₀| ≳ 1.4
    return z - 2 * torch.atan(z)


def test_line_search_rescues_overshooting_steps():
    z0 = torch.tensor([[0.5], [2.0], [5.0], [20.0]], dtype=F64)
    # each sample frozen at its own stop, so the near starts' runs can be compared step for step
    opts = {"memory": 10, "max_iter": 50, "tol": 1e-8, "stop_mode": "abs", "freeze_converged": True}
    plain = Broyden(**opts)(_atan_map, z0)
    searched = Broyden(**opts, line_search=True)(_atan_map, z0)
    # without it the far starts do not converge; the step/restart safeguards keep them bounded
    # (before the safeguards they ran away to |z| ~ 1e16, where z − 2·atan(z) rounds to z)
    assert not plain.converged[2:].any() and float(plain.z[2:].abs().max()) < 100
    assert (plain.extra["n_restart"][2:] > 0).all()
    assert searched.all_converged and float(searched.z.abs().max()) < 1e-8
    assert searched.extra["line_search_evals"] > 0 and plain.extra["line_search_evals"] == 0
    # the near starts needed no backtracking: the same iterates as without the search
    torch.testing.assert_close(searched.z[:2], plain.z[:2], rtol=0, atol=0)
    assert searched.nstep[:2].tolist() == plain.nstep[:2].tolist()


def test_line_search_changes_nothing_when_every_full_step_decreases_the_residual():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(8, 8, generator=gen, dtype=F64)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(16, 8, generator=gen, dtype=F64)
    fn = lambda z: torch.tanh(z @ W.T + x)
    z0 = torch.zeros(16, 8, dtype=F64)
    plain = Broyden(memory=30, max_iter=60, tol=1e-10)(fn, z0)
    searched = Broyden(memory=30, max_iter=60, tol=1e-10, line_search=True)(fn, z0)
    assert searched.extra["line_search_evals"] == 0
    assert torch.equal(searched.z, plain.z) and torch.equal(searched.nstep, plain.nstep)


def test_line_search_keeps_each_accepted_step_a_sufficient_decrease():
    seen = []

    def recording(z):
        out = _atan_map(z)
        seen.append((z.clone(), (out - z).norm(dim=1)))
        return out

    solver = Broyden(memory=10, max_iter=30, tol=1e-10, stop_mode="abs", line_search=True, line_search_steps=6)
    res = solver(recording, torch.tensor([[5.0]], dtype=F64))
    assert res.all_converged
    # abs_trace holds the residual of each accepted iterate: with backtracking that reaches
    # sufficient decrease within 6 halvings here, it never increases
    trace = res.abs_trace[: int(res.nstep[0]), 0]
    assert bool((trace[1:] <= trace[:-1] * (1 - 1e-4 / 64) + 1e-300).all()), trace
    assert len(seen) == 1 + int(res.nstep[0]) - 1 + res.extra["line_search_evals"]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"line_search": "yes"}, "line_search must be True or False"),
        ({"line_search_steps": 0}, "line_search_steps must be an integer >= 1"),
        ({"line_serach": True}, "Did you mean 'line_search'"),
    ],
)
def test_line_search_options_are_validated(kw, message):
    with pytest.raises(ValueError, match=message):
        Broyden(**kw)
