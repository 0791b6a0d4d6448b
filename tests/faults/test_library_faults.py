"""Fault injection, library side: NaN/Inf at every stage, wrong shapes, dtypes and devices.

Each case states its expected behaviour, one of:

- ``error``: one :class:`~deqkit.errors.OptionError` / :class:`~deqkit.errors.NonFiniteError`
  whose one-line message says what was wrong and what to do;
- ``recorded``: the call returns, and the result records what happened (a policy such as
  ``on_nonfinite="freeze"`` or ``on_failure="ignore"``), with the affected samples marked;
- ``nan-propagates``: the value is NaN where the input was (never a finite wrong number).

The CLI/app side (kill points, corrupt files, disk full) lives in the other fault-suite files.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import NaNGradient
from torch import nn

from deqkit import (
    DEQ,
    GMRES,
    SHINE,
    Anderson,
    Broyden,
    BroydenReuse,
    Dense,
    Exact,
    FixedPoint,
    JacobianFree,
    Neumann,
    NonFiniteError,
    Unrolled,
    WarmExact,
)
from deqkit.errors import DEQError, OptionError

F64 = torch.float64
SOLVERS = [FixedPoint, Anderson, Broyden]
ESTIMATORS = {
    "Exact": lambda: Exact(),
    "Exact-Anderson": lambda: Exact(Anderson(tol=1e-8, max_iter=100)),
    "Neumann": lambda: Neumann(k=5),
    "Unrolled": lambda: Unrolled(k=3),
    "JacobianFree": JacobianFree,
    "SHINE": lambda: SHINE(),
    "SHINE-refine": lambda: SHINE(refine=2),
    "BroydenReuse": BroydenReuse,
    "WarmExact": lambda: WarmExact(),
}
ADJOINT_ESTIMATORS = [k for k in ESTIMATORS if k not in ("Unrolled", "JacobianFree")]


def _needs_broyden(name: str) -> bool:
    return name in ("SHINE", "SHINE-refine", "BroydenReuse", "WarmExact")


class Cell(nn.Module):
    """``tanh(W z + U x + b)``, ``‖W‖₂ = 0.4``, float64."""

    def __init__(self, d: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=g, dtype=F64)
        self.W = nn.Parameter(0.4 * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(d, d, generator=g, dtype=F64) / d**0.5)
        self.b = nn.Parameter(torch.zeros(d, dtype=F64))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _x(B: int = 4, d: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


# ---------------------------------------------------------------------------------------------
# NaN / Inf in the data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("solver_cls", SOLVERS)
def test_nonfinite_data_is_an_error_naming_the_input(solver_cls, bad):  # expected: error
    # (an Inf that tanh saturates would otherwise give a finite, silently wrong equilibrium)
    x = _x()
    x[2, 3] = bad
    with pytest.raises(NonFiniteError) as exc:
        DEQ(Cell(), solver_cls())(x)
    assert "input x contains NaN/Inf (samples [2])" in _one_line(exc.value)


@pytest.mark.parametrize("solver_cls", SOLVERS)
def test_nonfinite_data_with_freeze_is_recorded_and_the_rest_converges(solver_cls):  # expected: recorded
    x = _x()
    x[1] = float("nan")
    with pytest.warns(UserWarning, match="1 hit NaN/Inf"):
        z, info = DEQ(Cell(), solver_cls(on_nonfinite="freeze", tol=1e-8, max_iter=100))(x)
    assert info.forward.nonfinite.tolist() == [False, True, False, False]
    assert info.converged.tolist() == [True, False, True, True]
    assert torch.isfinite(z[[0, 2, 3]]).all()


def test_nonfinite_initial_state_is_an_error():  # expected: error
    z0 = torch.zeros(4, 6, dtype=F64)
    z0[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="initial state z0"):
        DEQ(Cell())(_x(), z0=z0)


# ---------------------------------------------------------------------------------------------
# NaN / Inf from the cell (its output, its parameters)
# ---------------------------------------------------------------------------------------------


class Exploding(Cell):
    """Finite at ``z = 0``, NaN once sample 0's state moves (a cell that overflows on its way)."""

    def forward(self, z, x):
        out = super().forward(z, x)
        blow = (z[:1].abs().sum() > 0).to(out.dtype)
        return torch.cat([out[:1] / (1 - blow), out[1:]])


@pytest.mark.parametrize("solver_cls", SOLVERS)
def test_nonfinite_cell_output_is_an_error_with_solver_specific_advice(solver_cls):  # expected: error
    with pytest.raises(NonFiniteError) as exc:
        DEQ(Exploding(), solver_cls(), check_batch_coupling=False)(_x())
    msg = _one_line(exc.value)
    assert "returned NaN/Inf at iteration 1 for samples [0]" in msg and "on_nonfinite='freeze'" in msg
    assert ("damping < 1" in msg) == (solver_cls is not Broyden)


@pytest.mark.parametrize("solver_cls", SOLVERS)
def test_nonfinite_cell_output_with_freeze_is_recorded(solver_cls):  # expected: recorded
    z, info = DEQ(
        Exploding(), solver_cls(on_nonfinite="freeze", max_iter=60, tol=1e-8), on_failure="ignore", check_batch_coupling=False
    )(_x())
    assert info.forward.nonfinite.tolist() == [True, False, False, False]
    assert not bool(info.converged[0]) and bool(info.converged[1:].all())
    assert torch.isfinite(z).all()  # the frozen sample keeps its best finite iterate


def test_nonfinite_parameters_are_an_error():  # expected: error
    cell = Cell()
    with torch.no_grad():
        cell.W[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="returned NaN/Inf at iteration 0"):
        DEQ(cell)(_x())


# ---------------------------------------------------------------------------------------------
# NaN / Inf in the backward pass: the adjoint and the loss
# ---------------------------------------------------------------------------------------------


class PoisonedJacobian(Cell):
    """Finite forward; every VJP through ``z`` is NaN (an adjoint that cannot be solved)."""

    def forward(self, z, x):
        return super().forward(NaNGradient.apply(z), x)


@pytest.mark.parametrize("name", [k for k in ADJOINT_ESTIMATORS if k not in ("SHINE", "BroydenReuse")])
def test_nonfinite_adjoint_is_an_error(name):  # expected: error
    solver = Broyden(tol=1e-8, max_iter=60) if _needs_broyden(name) else Anderson(tol=1e-8, max_iter=60)
    z, _ = DEQ(PoisonedJacobian(), solver, ESTIMATORS[name]())(_x())
    with pytest.raises(NonFiniteError) as exc:
        z.sum().backward()
    _one_line(exc.value)


@pytest.mark.parametrize("name", ADJOINT_ESTIMATORS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_is_an_error_naming_the_incoming_gradient(name, bad):  # expected: error
    solver = Broyden(tol=1e-8, max_iter=60) if _needs_broyden(name) else Anderson(tol=1e-8, max_iter=60)
    z, _ = DEQ(Cell(), solver, ESTIMATORS[name]())(_x())
    with pytest.raises(NonFiniteError) as exc:
        (z.sum() * bad).backward()
    msg = _one_line(exc.value)
    assert "incoming gradient" in msg and "loss" in msg


@pytest.mark.parametrize("name", ["Unrolled", "JacobianFree"])
def test_nonfinite_loss_through_an_unrolled_estimator_gives_nan_gradients(name):  # expected: nan-propagates
    cell = Cell()
    z, _ = DEQ(cell, Anderson(tol=1e-8, max_iter=60), ESTIMATORS[name]())(_x())
    (z.sum() * float("nan")).backward()
    assert all(torch.isnan(p.grad).all() for p in cell.parameters())  # never a finite wrong number


# ---------------------------------------------------------------------------------------------
# wrong shapes, dtypes and devices: DEQ
# ---------------------------------------------------------------------------------------------


class WrongShape(Cell):
    def forward(self, z, x):
        return super().forward(z, x)[:, :3]


class IntegerOut(Cell):
    def forward(self, z, x):
        return super().forward(z, x).round().long()


DEQ_CASES = {
    "1-D x": (lambda: DEQ(Cell())(_x()[0]), OptionError, r"no batch dimension.*x\[None\]"),
    "0-d x": (lambda: DEQ(Cell())(torch.tensor(1.0, dtype=F64)), OptionError, "no batch dimension"),
    "z0 batch": (lambda: DEQ(Cell())(_x(), z0=torch.zeros(2, 6, dtype=F64)), OptionError, "batch size 2"),
    "z0 state_shape": (
        lambda: DEQ(Cell(), state_shape=(6,))(_x(), z0=torch.zeros(4, 3, 2, dtype=F64)),
        OptionError,
        "state_shape",
    ),
    "z0 integer": (lambda: DEQ(Cell())(_x(), z0=torch.zeros(4, 6, dtype=torch.long)), OptionError, "floating-point"),
    "z0 0-d": (lambda: DEQ(Cell())(_x(), z0=torch.tensor(0.0, dtype=F64)), OptionError, "batch dimension"),
    "init wrong batch": (lambda: DEQ(Cell(), init=lambda x: torch.zeros(1, 6, dtype=F64))(_x()), OptionError, "init policy"),
    "x float32, cell float64": (
        lambda: DEQ(Cell())(_x().float()),
        OptionError,
        "dtype torch.float32 but the cell's parameters are torch.float64",
    ),
    "x on another device": (lambda: DEQ(Cell())(torch.zeros(4, 6, dtype=F64, device="meta")), OptionError, "x is on meta"),
    "z0 on another device": (
        lambda: DEQ(Cell())(_x(), z0=torch.zeros(4, 6, dtype=F64, device="meta")),
        OptionError,
        "z0 is on meta but x is on cpu",
    ),
    "cell output shape": (lambda: DEQ(WrongShape())(_x()), OptionError, "same shape as z"),
    "cell output integer": (lambda: DEQ(IntegerOut(), check_batch_coupling=False)(_x()), OptionError, "floating point"),
    "cell not a module": (lambda: DEQ(lambda z, x: z), OptionError, "nn.Module"),
    "solver not a solver": (lambda: DEQ(Cell(), solver=GMRES()), OptionError, "forward solver"),
    "estimator needs Broyden": (lambda: DEQ(Cell(), Anderson(), SHINE()), OptionError, "Broyden"),
    "BatchNorm in cell": (lambda: DEQ(nn.Sequential(nn.BatchNorm1d(6))), OptionError, "BatchNorm1d"),
}


@pytest.mark.parametrize("case", list(DEQ_CASES))
def test_wrong_input_into_deq_is_one_clear_error(case):  # expected: error
    call, err, pattern = DEQ_CASES[case]
    with pytest.raises(err, match=pattern) as exc:
        call()
    _one_line(exc.value)


# ---------------------------------------------------------------------------------------------
# wrong shapes, dtypes and devices: solvers, linear solvers, estimators
# ---------------------------------------------------------------------------------------------


def _tanh(z):
    return torch.tanh(0.5 * z + 1)


SOLVER_CASES = {
    "z0 list": (lambda s: s(_tanh, [0.0, 1.0]), OptionError, "z0 must be a tensor"),
    "z0 0-d": (lambda s: s(_tanh, torch.tensor(0.0)), OptionError, "z0 must be a tensor"),
    "z0 empty batch": (lambda s: s(_tanh, torch.zeros(0, 3)), OptionError, "B >= 1"),
    "z0 integer": (lambda s: s(_tanh, torch.zeros(2, 3, dtype=torch.long)), OptionError, "floating-point"),
    "z0 inf": (lambda s: s(_tanh, torch.full((2, 3), float("inf"))), NonFiniteError, "initial state"),
    "map other shape": (lambda s: s(lambda z: z[:, :2], torch.zeros(2, 3)), OptionError, "same shape"),
    "map other device": (lambda s: s(lambda z: z.to("meta"), torch.zeros(2, 3)), OptionError, "same device"),
    "map returns a list": (lambda s: s(lambda z: [z], torch.zeros(2, 3)), OptionError, "same shape"),
    "max_iter 0": (lambda s: s(_tanh, torch.zeros(2, 3), max_iter=0), OptionError, "max_iter"),
    "tol nan": (lambda s: s(_tanh, torch.zeros(2, 3), tol=float("nan")), OptionError, "tol"),
    "tol string": (lambda s: s(_tanh, torch.zeros(2, 3), tol="1e-4"), OptionError, "tol"),
    "unknown call option": (lambda s: s(_tanh, torch.zeros(2, 3), tolerance=1e-3), OptionError, "Did you mean 'tol'"),
}


@pytest.mark.parametrize("solver_cls", SOLVERS)
@pytest.mark.parametrize("case", list(SOLVER_CASES))
def test_wrong_input_into_a_solver_is_one_clear_error(solver_cls, case):  # expected: error
    call, err, pattern = SOLVER_CASES[case]
    with pytest.raises(err, match=pattern) as exc:
        call(solver_cls())
    assert isinstance(exc.value, DEQError)
    _one_line(exc.value)


J = 0.3 * torch.eye(3, dtype=F64)


def _vjp(u):
    return u @ J


LINEAR_CASES = {
    "v integer": (lambda s: s.solve_adjoint(_vjp, torch.ones(2, 3, dtype=torch.long)), OptionError, "floating-point"),
    "v 0-d": (lambda s: s.solve_adjoint(_vjp, torch.tensor(1.0, dtype=F64)), OptionError, r"shape \(B, \.\.\.\)"),
    "v nan": (lambda s: s.solve_adjoint(_vjp, torch.full((2, 3), float("nan"), dtype=F64)), NonFiniteError, "incoming gradient"),
    "w0 shape": (
        lambda s: s.solve_adjoint(_vjp, torch.ones(2, 3, dtype=F64), w0=torch.zeros(2, 2, dtype=F64)),
        OptionError,
        "w0 must have the shape",
    ),
    "w0 device": (
        lambda s: s.solve_adjoint(_vjp, torch.ones(2, 3, dtype=F64), w0=torch.zeros(2, 3, dtype=F64, device="meta")),
        OptionError,
        "w0 is on meta",
    ),
    "unknown option": (
        lambda s: s.solve_adjoint(_vjp, torch.ones(2, 3, dtype=F64), tolerance=1e-3),
        OptionError,
        "Did you mean 'tol'",
    ),
    "vjp NaN": (lambda s: s.solve_adjoint(lambda u: u * float("nan"), torch.ones(2, 3, dtype=F64)), NonFiniteError, "NaN"),
}


@pytest.mark.parametrize(
    "linear", [lambda: GMRES(), lambda: Dense(), lambda: Exact(Anderson()).adjoint], ids=["GMRES", "Dense", "Anderson"]
)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_wrong_input_into_a_linear_solver_is_one_clear_error(linear, case):  # expected: error
    call, err, pattern = LINEAR_CASES[case]
    with pytest.raises(err, match=pattern) as exc:
        call(linear())
    _one_line(exc.value)


def test_dense_refuses_a_state_too_large():  # expected: error
    with pytest.raises(OptionError, match="max_dim"):
        Dense(max_dim=2).solve_adjoint(_vjp, torch.ones(2, 3, dtype=F64))


def test_estimator_option_errors_are_one_line():  # expected: error
    for call, pattern in (
        (lambda: WarmExact(GMRES(), warm_start="shine+inverse"), "accepts_inverse"),
        (lambda: Neumann(k=0), "k"),
        (lambda: SHINE(fallback_ratio=-1), "fallback_ratio"),
        (lambda: Exact(tol=float("inf")), "tol"),
        (lambda: Exact("gmres"), "linear_solver"),
    ):
        with pytest.raises(OptionError, match=pattern) as exc:
            call()
        _one_line(exc.value)


# ---------------------------------------------------------------------------------------------
# non-convergence: recorded, policy-driven, never silent
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["warn", "raise", "ignore"])
def test_a_capped_forward_solve_follows_on_failure_and_is_always_recorded(policy):
    deq = DEQ(Cell(), FixedPoint(max_iter=2, tol=1e-12), on_failure=policy)
    if policy == "raise":
        with pytest.raises(DEQError, match=r"0/4 samples converged"):
            deq(_x())
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _z, info = deq(_x())
    assert not bool(info.converged.any()) and info.nstep.tolist() == [2, 2, 2, 2]
    assert bool(caught) == (policy == "warn")
