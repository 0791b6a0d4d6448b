"""Reliability of the core: input shapes, batch coupling, the dtype policy, Broyden's safeguards and buffers.

Each test guards a failure seen by a user: a 1-D input solved as scalar samples, BatchNorm or
``z.mean(0)`` inside a cell, half-precision cells failing in the default solver, Broyden running
away to overflow (or to a "converged" far-away iterate), buffers sized by ``memory`` alone.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import F64, TanhCell, randn
from torch import nn

from deqkit import (
    DEQ,
    GMRES,
    SHINE,
    Anderson,
    Broyden,
    ConvergenceWarning,
    Dense,
    Exact,
    FixedPoint,
    JacobianFree,
    NonFiniteError,
    Unrolled,
)
from deqkit.errors import OptionError
from deqkit.models import MLPCell
from deqkit.solvers.precision import PrecisionWarning, min_tol, state_dtype

F32 = torch.float32


class SmallMLP(nn.Module):
    """``tanh(W z + U x + b)`` with ``‖W‖₂ = 0.5`` (a contraction), any dtype."""

    def __init__(self, d: int = 12, seed: int = 0, dtype=F32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=g, dtype=F64)
        self.W = nn.Parameter((0.5 * W / torch.linalg.matrix_norm(W, 2)).to(dtype))
        self.U = nn.Parameter((torch.randn(d, d, generator=g, dtype=F64) / d**0.5).to(dtype))
        self.b = nn.Parameter((0.1 * torch.randn(d, generator=g, dtype=F64)).to(dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


# ---------------------------------------------------------------------------------------------
# input shapes
# ---------------------------------------------------------------------------------------------


def test_a_1d_input_without_batch_dimension_is_refused_with_the_fix():
    cell = SmallMLP(8)
    x = torch.randn(8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(OptionError, match=r"no batch dimension.*x\[None\]"):
        DEQ(cell)(x)
    with pytest.raises(OptionError, match="no batch dimension"):
        DEQ(cell, state_shape=(8,))(x)
    with pytest.raises(OptionError, match="no batch dimension"):
        DEQ(cell)(torch.tensor(1.0))
    # the fix the message names gives the batched answer
    z1, _ = DEQ(cell)(x[None])
    zb, _ = DEQ(cell)(torch.stack([x, 2 * x]))
    torch.testing.assert_close(z1[0], zb[0], atol=1e-5, rtol=0)


def test_a_1d_input_with_an_explicit_z0_takes_its_batch():
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.5))

        def forward(self, z, x):
            return self.a * torch.tanh(z) + x[:, None]

    x = torch.linspace(-1, 1, 5)
    z, info = DEQ(Scalar())(x, z0=torch.zeros(5, 1))
    assert z.shape == (5, 1) and bool(info.converged.all())


def test_z0_must_match_the_batch_and_the_state_shape():
    cell, x = SmallMLP(8), torch.randn(4, 8)
    with pytest.raises(OptionError, match="batch size 3"):
        DEQ(cell)(x, z0=torch.zeros(3, 8))
    with pytest.raises(OptionError, match=r"state_shape=\(8,\)"):
        DEQ(cell, state_shape=(8,))(x, z0=torch.zeros(4, 2, 4))
    with pytest.raises(OptionError, match="init policy"):
        DEQ(cell, init=lambda x: torch.zeros(2, 8))(x)
    with pytest.raises(OptionError, match="floating-point"):
        DEQ(cell)(x, z0=torch.zeros(4, 8, dtype=torch.long))


def test_input_dtype_and_device_other_than_the_cells_are_refused_before_solving():
    cell = SmallMLP(8)
    with pytest.raises(OptionError, match=r"dtype torch.float64 but the cell's parameters are torch.float32"):
        DEQ(cell)(torch.randn(4, 8, dtype=F64))
    with pytest.raises(OptionError, match=r"x is on meta but the cell's parameters are on cpu"):
        DEQ(cell)(torch.randn(4, 8, device="meta"))


# ---------------------------------------------------------------------------------------------
# batch coupling
# ---------------------------------------------------------------------------------------------


class BatchNormCell(nn.Module):
    def __init__(self, d=8, norm=nn.BatchNorm1d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.norm = norm(d)

    def forward(self, z, x):
        return torch.tanh(self.norm(0.3 * self.lin(z)) + x)


class MeanCell(SmallMLP):
    """Mixes samples through ``z.mean(0)``."""

    def forward(self, z, x):
        return torch.tanh((z - 0.5 * z.mean(0)) @ self.W.T + x @ self.U.T + self.b)


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, nn.SyncBatchNorm, lambda d: nn.InstanceNorm1d(d, track_running_stats=True)])
def test_layers_with_batch_or_running_statistics_are_refused_with_an_opt_out(norm):
    with pytest.raises(OptionError, match=r"at 'norm'.*check_batch_coupling=False"):
        DEQ(BatchNormCell(norm=norm))
    DEQ(BatchNormCell(norm=norm), check_batch_coupling=False)  # the opt-out


@pytest.mark.parametrize("training", [True, False])
def test_a_cell_mixing_samples_is_detected_at_the_first_call(training):
    deq = DEQ(MeanCell(8)).train(training)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(OptionError, match=r"mixes the samples.*samples \[1, 2, 3, 4, 5\]"):
        deq(x)
    _z, info = DEQ(MeanCell(8), check_batch_coupling=False).train(training)(x)  # the opt-out
    assert bool(info.converged.all())


class CountingCell(SmallMLP):
    calls = 0

    def forward(self, z, x):
        type(self).calls += 1
        return super().forward(z, x)


def test_the_coupling_probe_costs_two_cell_calls_once_and_passes_per_sample_cells():
    deq = DEQ(CountingCell(8), FixedPoint(max_iter=5, tol=1e-3), JacobianFree(), on_failure="ignore")
    x = torch.randn(4, 8)
    with torch.no_grad():
        CountingCell.calls = 0
        deq(x[:1])  # one sample: nothing to compare, not probed yet
        first_single = CountingCell.calls
        CountingCell.calls = 0
        deq(x)
        probed = CountingCell.calls
        CountingCell.calls = 0
        deq(x)
        later = CountingCell.calls
    assert probed == later + 2 and first_single <= later
    # per-sample normalisations pass, in float32 and bfloat16
    for dtype in (F32, torch.bfloat16):
        cell = MLPCell(16, norm="layer").to(dtype)
        DEQ(cell, on_failure="ignore")(torch.randn(5, 16).to(dtype))
        cell = MLPCell(16, norm="group", groups=4).to(dtype)
        DEQ(cell, on_failure="ignore")(torch.randn(5, 16).to(dtype))


# ---------------------------------------------------------------------------------------------
# dtype policy
# ---------------------------------------------------------------------------------------------


def test_state_dtype_and_min_tol():
    assert state_dtype(torch.bfloat16) == F32 and state_dtype(torch.float16) == F32
    assert state_dtype(F32) == F32 and state_dtype(F64) == F64
    assert min_tol(torch.bfloat16) == 4 * 2**-7 and min_tol(F32) == 4 * torch.finfo(F32).eps


HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("solver_cls", [Anderson, Broyden, FixedPoint])
def test_half_precision_cells_solve_with_float32_state_and_one_precision_warning(dtype, solver_cls):
    cell = SmallMLP(12, dtype=dtype)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0)).to(dtype)
    deq = DEQ(cell, solver_cls(), SHINE() if solver_cls is Broyden else Exact())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            z, info = deq(x)
    assert z.dtype == dtype and bool(info.converged.all())
    precision = [w for w in caught if issubclass(w.category, PrecisionWarning)]
    name = str(dtype).replace("torch.", "")
    assert len(precision) == 1 and name in str(precision[0].message) and f"{min_tol(dtype):.2g}" in str(precision[0].message)
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert info.forward.tol == min_tol(dtype) and info.forward.abs_residual.dtype == F32
    if solver_cls is Broyden:
        assert info.forward.inverse.U.dtype == F32


def test_the_solver_state_is_float32_for_a_half_cell():
    seen = {}

    class Spy(Anderson):
        def step(self, state, z, fz, active):
            seen["z"], seen["gram"] = z.dtype, state.gram.dtype
            return super().step(state, z, fz, active)

    cell = SmallMLP(8, dtype=torch.bfloat16)
    x = torch.randn(3, 8).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        res = Spy()(lambda z: cell(z, x), torch.zeros(3, 8, dtype=torch.bfloat16))
    assert seen == {"z": F32, "gram": F32} and res.z.dtype == torch.bfloat16


def _flat_grad(model):
    return torch.cat([p.grad.reshape(-1).float() for p in model.parameters()])


@pytest.mark.parametrize(
    "grad", [Exact, lambda: Unrolled(k=5, damping=0.5), JacobianFree, SHINE], ids=["Exact", "Unrolled", "JFB", "SHINE"]
)
def test_bfloat16_gradients_agree_with_float32(grad):
    x32 = torch.randn(16, 12, generator=torch.Generator().manual_seed(3))
    target = torch.randn(16, 12, generator=torch.Generator().manual_seed(4))
    grads = []
    for dtype in (F32, torch.bfloat16):
        cell = SmallMLP(12, seed=2, dtype=dtype)
        solver = Broyden(max_iter=60) if grad is SHINE else Anderson(max_iter=60)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)
            z, info = DEQ(cell, solver, grad())(x32.to(dtype))
            ((z.float() - target) ** 2).sum().backward()
        assert bool(info.converged.all())
        grads.append(_flat_grad(cell))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos >= 0.99, float(cos)


@pytest.mark.parametrize("linear", [GMRES(), Dense(), Anderson(tol=1e-6)], ids=["GMRES", "Dense", "Anderson"])
def test_adjoint_solves_in_half_precision_return_the_callers_dtype(linear):
    J = 0.3 * torch.eye(6)
    v = torch.randn(3, 6).bfloat16()
    adjoint = Exact(linear).adjoint
    with pytest.warns(PrecisionWarning, match="bfloat16"):
        sol = adjoint.solve_adjoint(lambda u: u @ J.to(u.dtype), v)
    assert sol.z.dtype == torch.bfloat16 and bool(sol.converged.all())
    torch.testing.assert_close(sol.z.float(), v.float() / 0.7, rtol=2e-2, atol=2e-2)


def test_a_float32_tolerance_below_epsilon_warns_once_per_solver_and_is_recorded():
    cell, x = SmallMLP(8), torch.randn(4, 8)
    solver = Anderson(tol=1e-9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r1 = solver(lambda z: cell(z, x), torch.zeros(4, 8))
        r2 = solver(lambda z: cell(z, x), torch.zeros(4, 8))
    msgs = [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)]
    assert len(msgs) == 1 and "float32" in msgs[0] and "4.8e-07" in msgs[0]
    assert r1.tol == r2.tol == min_tol(F32) and r1.all_converged
    # float64 keeps the tolerance
    cell64 = TanhCell()
    r = Anderson(tol=1e-12)(lambda z: cell64(z, randn(4, 5)), torch.zeros(4, 8, dtype=F64))
    assert r.tol == 1e-12


# ---------------------------------------------------------------------------------------------
# Broyden safeguards
# ---------------------------------------------------------------------------------------------


def _mlp_problem(seed: int = 0):
    torch.manual_seed(seed)
    cell = MLPCell(64)
    x = torch.randn(64, 64)
    return (lambda z: cell(z, x)), torch.zeros(64, 64)


@pytest.mark.parametrize("seed", [0, 1])
def test_broyden_does_not_run_away_at_the_precision_floor(seed):
    # a tolerance no float32 solve can meet: before the safeguards, noise-sized secant pairs drove
    # samples from the fixed point to overflow (NonFiniteError after ~140 iterations)
    fn, z0 = _mlp_problem(seed)
    with torch.no_grad():
        res = Broyden(tol=1e-12, stop_mode="abs", max_iter=300)(fn, z0)
    assert torch.isfinite(res.z).all() and float(res.abs_residual.max()) < 1e-5
    assert float(res.z.abs().max()) < 10


GUARDS = ("max_step_ratio", "restart_growth", "divergence_ratio")


@pytest.mark.parametrize("keep", [None, *GUARDS])
def test_each_broyden_safeguard_alone_stops_the_runaway(keep):
    # the control (no safeguard) reproduces the reported failure: NaN/Inf after ~140 iterations
    class OneGuard(Broyden):
        pass

    for name in GUARDS:
        if name != keep:
            setattr(OneGuard, name, float("inf"))
    fn, z0 = _mlp_problem(0)
    solver = OneGuard(tol=1e-12, stop_mode="abs", max_iter=300)
    with torch.no_grad():
        if keep is None:
            with pytest.raises(NonFiniteError, match="Broyden has no damping"):
                solver(fn, z0)
            return
        res = solver(fn, z0)
    assert torch.isfinite(res.z).all() and float(res.abs_residual.max()) < 1e-5
    used = res.extra["n_capped"] if keep == "max_step_ratio" else res.extra["n_restart"]
    assert int(used.sum()) > 0


def test_broyden_with_a_float32_tolerance_below_epsilon_converges_at_the_floor():
    fn, z0 = _mlp_problem(0)
    with torch.no_grad(), pytest.warns(PrecisionWarning, match="float32"):
        res = Broyden(tol=1e-8, max_iter=200)(fn, z0)
    assert res.all_converged and float(res.z.abs().max()) < 10


@pytest.mark.parametrize(
    "fn", [lambda z: z + 0.1 * torch.tanh(3 - z), lambda z: z - 0.5 * torch.atan(z - 3)], ids=["tanh", "atan"]
)
def test_broyden_never_reports_a_far_away_iterate_as_converged(fn):
    # g = f(z) − z is flat far from the root z = 3: secant steps jump out to |z| ~ 1e4..1e6,
    # where ‖g‖ / ‖f(z)‖ is tiny only because ‖f(z)‖ is huge
    # (before the safeguards: 16 of 25 "converged" at |z| = 4.2e4 (tanh), 14 up to |z| = 3.4e6 (atan)).
    # Now no step goes beyond divergence_ratio · (|z0| + |g(z0)|), so nothing that far is returned.
    z0 = torch.linspace(-6, 6, 25)[:, None]
    res = Broyden(memory=10, max_iter=100)(fn, z0)
    bound = Broyden.divergence_ratio * (z0.abs() + (fn(z0) - z0).abs()).flatten()
    assert bool((res.z.abs().flatten() <= bound).all())
    assert bool(((res.z.flatten() - 3).abs() < 1e-2).sum() >= 5)


def test_broyden_nonfinite_advice_does_not_name_damping_it_has_not():
    cell = SmallMLP(8)
    x = torch.randn(2, 8)
    with pytest.raises(NonFiniteError) as exc:
        Broyden()(lambda z: cell(z, x) / (z.sum() - z.sum()), torch.zeros(2, 8) + 1)
    assert "damping < 1" not in str(exc.value) and "Broyden has no damping" in str(exc.value)
    with pytest.raises(NonFiniteError, match="damping < 1"):
        Anderson()(lambda z: cell(z, x) / (z.sum() - z.sum()), torch.zeros(2, 8) + 1)


# ---------------------------------------------------------------------------------------------
# Broyden buffers
# ---------------------------------------------------------------------------------------------


def test_broyden_buffers_are_sized_by_max_iter_with_the_same_result():
    cell, x = TanhCell(rho=0.6), randn(5, 5)
    fn, z0 = (lambda z: cell(z, x)), torch.zeros(5, 8, dtype=F64)
    big = Broyden(memory=100, max_iter=30, tol=1e-10)(fn, z0)
    exact = Broyden(memory=29, max_iter=30, tol=1e-10)(fn, z0)
    assert big.inverse.U.shape == (5, 8, 29)
    assert torch.equal(big.z, exact.z) and torch.equal(big.nstep, exact.nstep)
    s = Broyden(memory=100, max_iter=30)
    assert s.state_bytes(z0) == 8 * 5 * 8 * (2 * 29 + 8) == Broyden(memory=29, max_iter=30).state_bytes(z0)
    assert s.state_bytes((10, 8), torch.bfloat16) == 4 * 10 * 8 * (2 * 29 + 8)  # float32 state
    assert Broyden(memory=10).state_bytes((512, 32, 28, 28), F32, max_iter=30) == 4 * 512 * 32 * 784 * (2 * 10 + 8)


def test_broyden_refuses_a_solve_above_max_state_bytes_before_allocating():
    cell, x = TanhCell(), randn(5, 5)
    with pytest.raises(OptionError, match=r"MiB of solver state.*max_state_bytes=1000.*Lower memory"):
        Broyden(max_state_bytes=1000)(lambda z: cell(z, x), torch.zeros(5, 8, dtype=F64))
    Broyden(max_state_bytes=10**6)(lambda z: cell(z, x), torch.zeros(5, 8, dtype=F64))


def test_autocast_cells_solve_under_the_dtype_policy():
    # under CPU autocast the cell's matmuls run in bfloat16 with float32 parameters and input
    cell, x = SmallMLP(12), torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z, info = DEQ(cell)(x.bfloat16())  # a bfloat16 injection meets float32 parameters: allowed here
        z.float().sum().backward()
    assert bool(info.converged.all()) and info.forward.tol == min_tol(torch.bfloat16)
    # forward and adjoint tolerances raised to bfloat16's floor (one warning each), no convergence warnings
    assert sorted(type(w.message).__name__ for w in caught) == ["PrecisionWarning", "PrecisionWarning"], [
        str(w.message) for w in caught
    ]
    assert info.backward.solve.tol == min_tol(torch.bfloat16) and bool(info.backward.converged.all())
    assert all(torch.isfinite(p.grad).all() for p in cell.parameters())


@pytest.mark.parametrize(
    "case",
    ["runaway", "far", "clean"],
)
def test_broyden_sync_free_safeguards_give_the_same_solve(case, monkeypatch):
    """On an accelerator Broyden applies its restart/divergence masks without reading them on the
    host (``_may_hold`` is always true); on the CPU it reads them and skips the masked passes when
    no sample is flagged. Both paths give bit-identical solves, on problems where the safeguards
    fire (``runaway``: the float32 precision floor; ``far``: flat maps) and where they do not."""
    import deqkit.solvers.broyden as broyden_module

    if case == "runaway":
        fn, z0 = _mlp_problem(0)
        solver = Broyden(tol=1e-12, stop_mode="abs", max_iter=200)
    elif case == "far":
        fn, z0 = (lambda z: z + 0.1 * torch.tanh(3 - z)), torch.linspace(-6, 6, 25)[:, None]
        solver = Broyden(memory=10, max_iter=100)
    else:
        fn, z0 = (lambda z: 0.5 * torch.tanh(z) + 1.0), torch.linspace(-1, 1, 8)[:, None]
        solver = Broyden(memory=10, max_iter=50, tol=1e-6)
    with torch.no_grad():
        host = solver(fn, z0)
        monkeypatch.setattr(broyden_module, "_may_hold", lambda mask: True)
        device = solver(fn, z0)
    fired = int(host.extra["n_restart"].sum())
    assert (fired > 0) == (case != "clean"), fired
    torch.testing.assert_close(device.z, host.z, rtol=0, atol=0)
    assert device.nstep.tolist() == host.nstep.tolist()
    assert device.extra["n_restart"].tolist() == host.extra["n_restart"].tolist()
