"""Tuple/list states: the DEQ packs them into one flat state, so every solver, estimator,
SHINE/OPA and diagnostic gives exactly what the hand-flattened problem gives."""

import math

import pytest
import torch
from torch import nn

from deqkit import DEQ, Anderson, Broyden, Exact, FixedPoint
from deqkit.deq import StatePacker
from deqkit.diagnostics import gradient_quality
from deqkit.errors import OptionError
from deqkit.estimators import make_estimator

SHAPES = ((3,), (2, 2))  # per-sample shapes of the two parts
D = 3 + 4


class _TupleCell(nn.Module):
    """A coupled two-part cell: z1' = tanh(A z1 + B vec(z2) + x), z2' = tanh(C z1 + E vec(z2)) (as 2×2)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(0.8 * torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D))
        self.b = nn.Parameter(0.1 * torch.randn(D, generator=g, dtype=torch.float64))

    def flat(self, z, x):
        pad = torch.cat([x, torch.zeros(x.shape[0], 4, dtype=x.dtype)], dim=1)
        return torch.tanh(z @ self.W.T + self.b + pad)

    def forward(self, z, x):
        z1, z2 = z
        out = self.flat(torch.cat([z1, z2.reshape(z2.shape[0], -1)], dim=1), x)
        return (out[:, :3], out[:, 3:].reshape(-1, 2, 2))


class _FlatCell(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, z, x):
        return self.inner.flat(z, x)


def _loss_tuple(z):
    return z[0].sin().sum() + (z[1] ** 2).sum() * 0.3


def _loss_flat(z):
    return _loss_tuple((z[:, :3], z[:, 3:].reshape(-1, 2, 2)))


ESTIMATORS = ["exact", "unrolled", "neumann", "jacobian-free", "shine", "broyden-reuse", "exact-warm"]


def _solver(name):
    return (
        Broyden(tol=1e-11, max_iter=200)
        if name in ("shine", "broyden-reuse", "exact-warm")
        else Anderson(tol=1e-11, max_iter=200)
    )


def _run(deq, x, loss_fn, params):
    xx = x.clone().requires_grad_()
    z, info = deq(xx, loss_fn=loss_fn)
    grads = torch.autograd.grad(loss_fn(z), [*params, xx])
    return z, info, grads


@pytest.mark.parametrize("name", ESTIMATORS)
def test_tuple_state_equals_the_flattened_solve(name):
    torch.manual_seed(0)
    cell = _TupleCell()
    x = torch.randn(4, 3, dtype=torch.float64)
    tup = DEQ(cell, _solver(name), make_estimator(name), state_shape=SHAPES)
    flat = DEQ(_FlatCell(cell), _solver(name), make_estimator(name), state_shape=(D,))
    zt, it, gt = _run(tup, x, _loss_tuple, [cell.W, cell.b])
    zf, iff, gf = _run(flat, x, _loss_flat, [cell.W, cell.b])
    assert isinstance(zt, tuple) and [tuple(t.shape) for t in zt] == [(4, 3), (4, 2, 2)]
    torch.testing.assert_close(torch.cat([zt[0], zt[1].reshape(4, -1)], 1), zf, rtol=0, atol=1e-12)
    assert it.converged.all() and torch.equal(it.nstep, iff.nstep)
    for a, b in zip(gt, gf):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert it.unpack is not None and iff.unpack is None


@pytest.mark.parametrize(
    "solver", [FixedPoint(tol=1e-10, max_iter=300), Anderson(tol=1e-10, max_iter=100), Broyden(tol=1e-10, max_iter=100)]
)
def test_every_solver_takes_a_tuple_and_a_list(solver):
    torch.manual_seed(0)
    cell = _TupleCell()
    x = torch.randn(3, 3, dtype=torch.float64)
    z0 = [torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 2, 2, dtype=torch.float64)]
    deq = DEQ(cell, solver)
    z, info = deq(x, z0=z0)
    assert isinstance(z, list) and info.converged.all()
    zt, _ = deq(x, z0=tuple(z0))
    assert isinstance(zt, tuple)
    fz = cell(tuple(z), x)
    for a, b in zip(fz, z):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_shine_with_opa_and_gradient_quality_on_tuples():
    torch.manual_seed(0)
    cell = _TupleCell()
    x = torch.randn(4, 3, dtype=torch.float64)
    solver = Broyden(tol=1e-10, max_iter=100, opa_freq=3)
    tup = DEQ(cell, solver, make_estimator("shine"), state_shape=SHAPES)
    flat = DEQ(_FlatCell(cell), Broyden(tol=1e-10, max_iter=100, opa_freq=3), make_estimator("shine"), state_shape=(D,))
    tup.train(), flat.train()
    _, it, gt = _run(tup, x, _loss_tuple, [cell.W])
    _, _, gf = _run(flat, x, _loss_flat, [cell.W])
    assert it.forward.extra.get("n_opa", 0) > 0
    torch.testing.assert_close(gt[0], gf[0], rtol=1e-9, atol=1e-11)
    rows = gradient_quality(tup, x, _loss_tuple, [make_estimator("shine"), Exact()], repeats=1)
    assert rows[1].cosine > 1 - 1e-8 and rows[0].cosine > 0.5


def test_packer_round_trip_and_errors():
    parts = (torch.randn(2, 3), torch.randn(2, 4, 5))
    p = StatePacker(parts)
    flat = p.pack(parts)
    assert flat.shape == (2, 23)
    back = p.unpack(flat)
    assert all(torch.equal(a, b) for a, b in zip(back, parts))
    with pytest.raises(OptionError, match="batch size"):
        StatePacker((torch.randn(2, 3), torch.randn(3, 3)))
    with pytest.raises(ValueError, match="expected"):
        p.pack((torch.randn(2, 3), torch.randn(2, 4, 4)))
    deq = DEQ(_TupleCell(), state_shape=SHAPES)
    z0 = deq.initial_state(torch.randn(5, 3, dtype=torch.float64))
    assert [tuple(t.shape) for t in z0] == [(5, 3), (5, 2, 2)] and z0[0].dtype == torch.float64
