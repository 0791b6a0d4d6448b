"""Failures are loud: shapes, non-finite values, options, non-convergence forward and backward."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import F64, LinearCell, TanhCell, randn
from torch import nn

from deqkit import (
    DEQ,
    GMRES,
    Anderson,
    Broyden,
    ConvergenceError,
    ConvergenceWarning,
    Dense,
    Exact,
    FixedPoint,
    JacobianFree,
    Neumann,
    NonFiniteError,
    Unrolled,
    make_estimator,
    make_solver,
)
from deqkit.errors import DEQError

SOLVER_CLASSES = [FixedPoint, Anderson, Broyden]


# ---------------------------------------------------------------------------------------------
# cell output shape and non-finite values
# ---------------------------------------------------------------------------------------------


class WrongShapeCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, z, x):
        return self.lin(x)  # (B, 3) for a state of shape (B, 4)


@pytest.mark.parametrize("cls", SOLVER_CLASSES)
def test_cell_returning_other_shape_is_a_value_error(cls):
    x = randn(2, 4)
    with pytest.raises(ValueError, match=r"must return a tensor of the same shape as z") as exc:
        DEQ(WrongShapeCell(), cls())(x)
    assert "(2, 4)" in str(exc.value)
    with pytest.raises(ValueError, match="same shape"):
        cls()(lambda z: z.sum(dim=1), torch.zeros(2, 4, dtype=F64))


@pytest.mark.parametrize("cls", SOLVER_CLASSES)
def test_nan_from_cell_is_non_finite_error(cls):
    x = randn(2, 4)
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        cls()(lambda z: z * float("nan"), x.clone())
    # NaN appearing mid-solve, in one sample only
    calls = {"n": 0}

    def late_nan(z):
        calls["n"] += 1
        out = 0.5 * z + 1.0
        if calls["n"] >= 3:
            out = out.clone()
            out[1, 0] = float("inf")
        return out

    with pytest.raises(NonFiniteError, match=r"samples \[1\]"):
        cls(tol=1e-14, max_iter=20)(late_nan, torch.zeros(2, 4, dtype=F64))
    assert issubclass(NonFiniteError, DEQError)


def test_nan_initial_state_and_nan_input_through_deq():
    with pytest.raises(NonFiniteError, match="z0"):
        FixedPoint()(lambda z: z, torch.full((2, 3), float("nan"), dtype=F64))
    cell = TanhCell(6, 4, seed=1)
    x = randn(2, 4)
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        DEQ(cell, state_shape=(6,))(x)


def test_non_floating_or_empty_state_rejected():
    with pytest.raises(ValueError, match="floating"):
        FixedPoint()(lambda z: z, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="B >= 1"):
        FixedPoint()(lambda z: z, torch.zeros(0, 3, dtype=F64))


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", SOLVER_CLASSES + [GMRES, Dense])
def test_unknown_option_names_valid_options_and_suggests(cls):
    with pytest.raises(ValueError) as exc:
        cls(tolerance=1e-3)
    msg = str(exc.value)
    assert "tolerance" in msg and "Valid options" in msg
    for valid in ("tol", "stop_mode"):
        assert valid in msg
    assert "Did you mean 'tol'?" in msg
    if cls is not Dense:  # Dense has no iteration cap
        with pytest.raises(ValueError, match="Did you mean 'max_iter'"):
            cls(max_iters=5)


def test_unknown_option_for_estimators_and_deq():
    with pytest.raises(ValueError, match="Did you mean 'damping'"):
        Unrolled(k=3, dampening=0.5)
    with pytest.raises(ValueError, match="Did you mean 'on_failure'"):
        Exact(on_fail="raise")
    with pytest.raises(ValueError, match="Did you mean 'eval_max_iter'"):
        DEQ(TanhCell(), eval_maxiter=3)
    with pytest.raises(ValueError, match="unknown option"):
        JacobianFree(k=2)


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: FixedPoint(tol=-1e-3), "tol must be a finite number > 0"),
        (lambda: FixedPoint(tol=0), "tol must be a finite number > 0"),
        (lambda: FixedPoint(damping=0), "damping must lie in (0, 1]"),
        (lambda: FixedPoint(damping=1.5), "damping must lie in (0, 1]"),
        (lambda: Anderson(damping=0.0), "damping must lie in (0, 1]"),
        (lambda: FixedPoint(max_iter=0), "max_iter must be an integer >= 1"),
        (lambda: Broyden(max_iter=2.5), "max_iter must be an integer >= 1"),
        (lambda: Broyden(memory=0), "memory must be an integer >= 1"),
        (lambda: Anderson(regularization=-1.0), "regularization must be a finite number >= 0"),
        (lambda: FixedPoint(stop_mode="foo"), "stop_mode='foo' is not valid"),
        (lambda: GMRES(restart=0), "restart must be an integer >= 1"),
        (lambda: GMRES(tol=-1.0), "tol must be a finite number > 0"),
        (lambda: Unrolled(k=0), "k must be an integer >= 1"),
        (lambda: Neumann(damping=0), "damping must lie in (0, 1]"),
        (lambda: Exact(on_failure="loud"), "on_failure='loud' is not valid"),
        (lambda: Exact(warm_start="jbf"), "Did you mean 'jfb'"),
        (lambda: Exact(linear_solver="gmres"), "linear_solver must be a deqkit solver"),
        (lambda: DEQ(TanhCell(), on_failure="warns"), "Did you mean 'warn'"),
        (lambda: DEQ(TanhCell(), eval_max_iter=0), "eval_max_iter must be an integer >= 1"),
        (lambda: DEQ(TanhCell(), solver=GMRES()), "solver must be a deqkit forward solver"),
        (lambda: DEQ(TanhCell(), init="ones"), "init must be 'zeros' or a callable"),
    ],
)
def test_bad_option_values(build, fragment):
    with pytest.raises(ValueError) as exc:
        build()
    assert fragment in str(exc.value)


def test_bad_call_overrides():
    with pytest.raises(ValueError, match="max_iter"):
        FixedPoint()(lambda z: z, torch.zeros(1, 2, dtype=F64), max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        FixedPoint()(lambda z: z, torch.zeros(1, 2, dtype=F64), tol=-1.0)


def test_make_solver_and_estimator_names():
    with pytest.raises(ValueError, match="Did you mean 'anderson'"):
        make_solver("andersen")
    with pytest.raises(ValueError, match="Did you mean 'broyden'"):
        make_solver("broyden2")
    with pytest.raises(ValueError, match="Did you mean 'unrolled'"):
        make_estimator("unroled")
    s = make_solver("fixed_point", tol=1e-5)
    assert isinstance(s, FixedPoint) and s.tol == 1e-5
    assert isinstance(make_solver("Anderson"), Anderson)
    with pytest.raises(ValueError, match="Did you mean 'memory'"):
        make_solver("broyden", memroy=5)


def test_dense_refuses_a_too_large_state():
    v = torch.zeros(2, 20, dtype=F64)
    with pytest.raises(ValueError, match=r"max_dim=10.*GMRES"):
        Dense(max_dim=10).solve_adjoint(lambda u: u, v)
    # the same through a DEQ's backward pass
    cell = TanhCell(20, 4, seed=2)
    deq = DEQ(cell, Anderson(tol=1e-8), Exact(Dense(max_dim=10)), state_shape=(20,))
    z, _ = deq(randn(2, 4))
    with pytest.raises(ValueError, match="max_dim"):
        z.sum().backward()


# ---------------------------------------------------------------------------------------------
# forward non-convergence through the DEQ
# ---------------------------------------------------------------------------------------------


def _slow_deq(policy):
    cell = LinearCell(8, 5, rho=0.9, seed=3)
    return DEQ(cell, FixedPoint(tol=1e-12, max_iter=3), state_shape=(8,), on_failure=policy), randn(2, 5)


def test_deq_nonconvergence_raise():
    deq, x = _slow_deq("raise")
    with pytest.raises(ConvergenceError, match=r"0/2 samples converged.*max_iter=3"):
        deq(x)


def test_deq_nonconvergence_warn_default():
    deq, x = _slow_deq("warn")
    with pytest.warns(ConvergenceWarning, match="Raise max_iter"):
        z, info = deq(x)
    assert not info.converged.any()
    assert z.shape == (2, 8)
    deq_default = DEQ(deq.cell, FixedPoint(tol=1e-12, max_iter=3), state_shape=(8,))
    with pytest.warns(ConvergenceWarning):
        deq_default(x)


def test_deq_converged_does_not_warn():
    cell = LinearCell(8, 5, rho=0.5, seed=3)
    deq = DEQ(cell, Anderson(tol=1e-8, max_iter=100), state_shape=(8,), on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, info = deq(randn(2, 5))
        z.sum().backward()
    assert info.converged.all() and info.backward.solve.all_converged


# ---------------------------------------------------------------------------------------------
# Exact backward failure
# ---------------------------------------------------------------------------------------------

FAILING_LINEAR = {
    "gmres": lambda: GMRES(tol=1e-14, max_iter=1),
    "fixed-point": lambda: FixedPoint(tol=1e-14, max_iter=2),
    "anderson": lambda: Anderson(tol=1e-14, max_iter=2),
    "broyden": lambda: Broyden(tol=1e-14, max_iter=2),
}


def _backward_setup(linear, on_failure):
    cell = TanhCell(8, 5, rho=0.6, seed=4)
    x = randn(3, 5, seed=5).requires_grad_()
    deq = DEQ(cell, Anderson(tol=1e-12, max_iter=100), Exact(linear, on_failure=on_failure), state_shape=(8,))
    return deq, x


@pytest.mark.parametrize("name", list(FAILING_LINEAR))
def test_exact_backward_failure_warns_by_default(name):
    deq, x = _backward_setup(FAILING_LINEAR[name](), "warn")
    z, info = deq(x)
    with pytest.warns(ConvergenceWarning, match="Exact backward"):
        (z**2).sum().backward()
    sol = info.backward.solve
    assert sol is not None and not sol.converged.any()
    assert info.backward.converged is sol.converged
    assert sol.max_iter == FAILING_LINEAR[name]().max_iter
    # never a silent zero: the inexact gradient is there, and finite
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().min()) > 0
    assert all(float(p.grad.abs().max()) > 0 for p in deq.cell.parameters())


@pytest.mark.parametrize("name", list(FAILING_LINEAR))
def test_exact_backward_failure_raises_when_asked(name):
    deq, x = _backward_setup(FAILING_LINEAR[name](), "raise")
    z, _ = deq(x)
    with pytest.raises(ConvergenceError, match=r"Exact backward: .*0/3 samples converged"):
        (z**2).sum().backward()


def test_exact_backward_failure_ignore_is_recorded():
    deq, x = _backward_setup(GMRES(tol=1e-14, max_iter=1), "ignore")
    z, info = deq(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (z**2).sum().backward()
    assert not info.backward.solve.converged.any()


def test_exact_override_of_linear_solver_cap():
    """``Exact(max_iter=..., tol=...)`` overrides the linear solver's own settings."""
    deq, x = _backward_setup(GMRES(tol=1e-12, max_iter=100), "raise")
    deq.grad = Exact(GMRES(tol=1e-12, max_iter=100), max_iter=1, tol=1e-14, on_failure="raise")
    z, _ = deq(x)
    with pytest.raises(ConvergenceError):
        (z**2).sum().backward()


def test_nan_loss_gradient_raises_non_finite():
    deq, x = _backward_setup(GMRES(tol=1e-10, max_iter=50), "warn")
    z, _ = deq(x)
    with pytest.raises(NonFiniteError, match="adjoint"):
        (z * float("nan")).sum().backward()


def test_a_plain_function_as_cell_is_refused_with_advice():
    with pytest.raises(ValueError, match="must be an nn.Module"):
        DEQ(lambda z, x: 0.5 * z + x)


@pytest.mark.parametrize("make", [lambda: FixedPoint(max_iter=1), lambda: Anderson(max_iter=1), lambda: Broyden(max_iter=1)])
def test_a_capped_adjoint_solve_never_returns_a_zero_gradient(make):
    """With one iteration allowed, a fixed-point adjoint returns its start w = v (the JFB direction), not zero."""
    cell = TanhCell()
    deq = DEQ(cell, FixedPoint(tol=1e-10, max_iter=200), Exact(make(), on_failure="ignore"), state_shape=(8,))
    x = randn(3, 5, seed=9)
    z, info = deq(x)
    z.sum().backward()
    assert cell.W.grad.abs().sum() > 0
    assert not info.backward.solve.all_converged


def test_broyden_refuses_a_loss_gradient_it_would_ignore():
    with pytest.raises(ValueError, match="opa_freq"):
        Broyden()(lambda z: 0.5 * z, torch.zeros(2, 3, dtype=torch.float64), loss_grad=lambda z: z)


def test_integer_input_with_state_shape_gets_a_float_state():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(0.3 * torch.eye(4))

        def forward(self, z, x):
            return torch.tanh(z @ self.W.T + x.to(z.dtype)[:, :1])

    deq = DEQ(Embed(), FixedPoint(tol=1e-8, max_iter=100), state_shape=(4,))
    z, info = deq(torch.ones(3, 2, dtype=torch.long))
    assert z.is_floating_point() and bool(info.converged.all())


@pytest.mark.parametrize("make", [FixedPoint, Anderson, Broyden])
def test_freeze_policy_keeps_the_finite_samples_and_marks_the_bad_one(make):
    """on_nonfinite='freeze': a sample whose map turns NaN stops at its best finite iterate and is
    reported (nonfinite mask, not converged); the other samples get what they get alone."""
    A = 0.5 * torch.eye(3, dtype=torch.float64)
    x = randn(4, 3, seed=3)
    poison = torch.tensor([False, True, False, False])

    def fn(z, steps=[0]):
        steps[0] += 1
        out = z @ A.T + x
        if steps[0] > 1:  # sample 1 turns NaN from the second evaluation on
            out = torch.where(poison[:, None], torch.full_like(out, float("nan")), out)
        return out

    res = make(tol=1e-10, max_iter=200, on_nonfinite="freeze")(fn, torch.zeros(4, 3, dtype=torch.float64))
    assert res.nonfinite.tolist() == poison.tolist()
    assert res.converged.tolist() == (~poison).tolist()
    assert torch.isfinite(res.z).all()
    alone = make(tol=1e-10, max_iter=200)(lambda z: z @ A.T + x[[0]], torch.zeros(1, 3, dtype=torch.float64))
    torch.testing.assert_close(res.z[0], alone.z[0], rtol=1e-9, atol=1e-12)
    assert "NaN/Inf and were frozen" in res.summary()
    with pytest.raises(NonFiniteError, match="on_nonfinite='freeze'"):
        make(tol=1e-10, max_iter=200)(lambda z: torch.full_like(z, float("nan")), torch.zeros(2, 3, dtype=torch.float64))
