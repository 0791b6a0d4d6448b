"""Conformance: every registered forward solver, linear solver and gradient estimator through the
same float64 checks.

The checks are plain functions (:func:`check_forward_solver`, :func:`check_linear_solver`,
:func:`check_estimator`, :func:`check_phantom_family`); the parametrisations below read the
registries (``deqkit.registry.SOLVERS``, ``LINEAR_SOLVERS``, ``ESTIMATORS``) at collection time,
so a class registered by deqkit is tested by registration alone, and a test that registers a toy
class (see the end of this file) runs the same functions on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Optional

import pytest
import torch
from torch import nn

import deqkit as dk
from deqkit.errors import OptionError
from deqkit.estimators import GradientEstimator
from deqkit.inverse import InverseEstimate
from deqkit.linear import FixedPointAdjoint
from deqkit.registry import ESTIMATORS, LINEAR_SOLVERS, SOLVERS

F64 = torch.float64
TOL = 1e-11  # the tolerance every solver is asked to reach
B, D, P = 4, 8, 5


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def accepts(factory: Callable[..., Any], name: str) -> bool:
    """Whether ``factory`` takes the keyword ``name`` (a validated class lists it in ``valid_options``)."""
    valid = getattr(factory, "valid_options", None)
    if valid is None:
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            return False
        return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return name in valid


def build(factory: Callable[..., Any], **wanted: Any) -> Any:
    """``factory(**wanted)`` with only the options it accepts (e.g. Dense takes no ``max_iter``)."""
    return factory(**{k: v for k, v in wanted.items() if accepts(factory, k)})


def tight_solver(factory: Callable[..., Any]) -> dk.Solver:
    return build(factory, tol=TOL, max_iter=500, stop_mode="rel")


def tight_linear_solver(factory: Callable[..., Any]) -> dk.LinearSolver:
    return build(factory, tol=TOL, max_iter=300, stop_mode="rel")


def tight_estimator(factory: Callable[..., Any]) -> dk.GradientEstimator:
    return build(factory, tol=TOL, max_iter=300, on_failure="raise")


class DenseInverse(InverseEstimate):
    """A dense per-sample matrix ``(B, d, d)`` as an :class:`InverseEstimate` (for these tests)."""

    def __init__(self, M: torch.Tensor) -> None:
        self.M = M

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bij,bj->bi", self.M, x)

    def apply_left(self, v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,bij->bj", v, self.M)

    def transpose(self) -> DenseInverse:
        return DenseInverse(self.M.transpose(1, 2))

    def dense(self) -> torch.Tensor:
        return self.M


class LinearCell(nn.Module):
    """``f(z, x) = A z + B x`` with ``‖A‖₂ = rho``: the fixed point ``(I − A)⁻¹ B x`` in closed form."""

    def __init__(self, rho: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        A = randn(D, D, seed=seed)
        self.A = nn.Parameter(rho * A / torch.linalg.matrix_norm(A, ord=2))
        self.B = nn.Parameter(randn(D, P, seed=seed + 1))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T + x @ self.B.T

    def fixed_point(self, x: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(D, dtype=F64)
        return torch.linalg.solve(eye - self.A.detach(), (x @ self.B.detach().T).T).T


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + U x + b)`` with ``‖W‖₂ = rho`` (a contraction)."""

    def __init__(self, rho: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        W = randn(D, D, seed=seed)
        self.W = nn.Parameter(rho * W / torch.linalg.matrix_norm(W, ord=2))
        self.U = nn.Parameter(randn(D, P, seed=seed + 1) / P**0.5)
        self.b = nn.Parameter(0.1 * randn(D, seed=seed + 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)

    def fixed_point(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(x.shape[0], D, dtype=F64)
        with torch.no_grad():
            for _ in range(200):  # contraction factor ≤ 0.5: far below float64 resolution
                z = self(z, x)
        return z


CELLS = {"linear": LinearCell, "tanh": TanhCell}


def dense_jacobian(cell: nn.Module, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample ``∂f/∂z`` at ``z``, ``(B, d, d)``, row ``i`` = ``e_i J``."""
    zz = z.detach().requires_grad_()
    out = cell(zz, x.detach())
    rows = []
    for i in range(D):
        e = torch.zeros_like(out)
        e[:, i] = 1
        (g,) = torch.autograd.grad(out, zz, e, retain_graph=True)
        rows.append(g)
    return torch.stack(rows, dim=1)


def contractive_jacobians(seed: int = 5, rho: float = 0.6, symmetric: bool = False) -> torch.Tensor:
    Ms = randn(B, D, D, seed=seed)
    if symmetric:
        Ms = Ms + Ms.transpose(1, 2)
    return torch.stack([rho * M / torch.linalg.matrix_norm(M, ord=2) for M in Ms])


# ---------------------------------------------------------------------------------------------
# the checks (plain functions: a test that registers its own class calls them directly)
# ---------------------------------------------------------------------------------------------


def check_forward_solver(factory: Callable[..., Any]) -> None:
    """A forward solver reaches ``TOL`` on an affine and a tanh contraction, to the true fixed point,
    with the result protocol filled in; as an adjoint solver (through FixedPointAdjoint) it solves
    ``w = wJ + v`` against ``torch.linalg.solve``."""
    solver = tight_solver(factory)
    assert isinstance(solver, dk.Solver)
    x = randn(B, P, seed=3)
    for name, cls in CELLS.items():
        cell = cls(seed=11)
        z_ref = cell.fixed_point(x)
        with torch.no_grad():
            res = solver(lambda z: cell(z, x), torch.zeros(B, D, dtype=F64))
        assert isinstance(res, dk.SolverResult)
        assert res.all_converged, f"{name}: {res.summary()}"
        assert rel_err(res.z, z_ref) < 1e-9, name
        assert bool((res.residual <= TOL).all())
        assert res.nstep.shape == (B,) and bool((res.nstep >= 1).all()) and bool((res.nstep <= 500).all())
        assert res.abs_trace.shape == (int(res.nstep.max()), B)
        assert isinstance(res.time_s, float) and res.time_s >= 0
        if type(solver).keeps_inverse:
            assert isinstance(res.inverse, InverseEstimate), "keeps_inverse solvers return an InverseEstimate"
            u = randn(B, D, seed=4)
            torch.testing.assert_close(res.inverse.transpose().apply(u), res.inverse.apply_left(u), rtol=1e-10, atol=1e-12)
        else:
            assert res.inverse is None
    check_linear_solver(FixedPointAdjoint(solver))


def check_linear_solver(solver: dk.LinearSolver) -> None:
    """An adjoint solver solves ``w = wJ + v`` against ``torch.linalg.solve`` in float64, reports the one
    residual ``‖w − wJ − v‖ / ‖v‖``, and honours the options its capability flags advertise
    (a solver with ``requires_symmetric`` gets a symmetric ``J``, so ``I − J`` is positive definite)."""
    J = contractive_jacobians(symmetric=solver.requires_symmetric)
    v = randn(B, D, seed=6)
    eye = torch.eye(D, dtype=F64)
    w_ref = torch.linalg.solve((eye - J).transpose(1, 2), v.unsqueeze(-1)).squeeze(-1)
    vjp = lambda u: torch.einsum("bi,bij->bj", u, J)  # noqa: E731

    def check(res: dk.SolverResult, what: str) -> None:
        assert res.all_converged, f"{what}: {res.summary()}"
        assert rel_err(res.z, w_ref) < 1e-9, what
        true_abs = (res.z - vjp(res.z) - v).norm(dim=1)
        torch.testing.assert_close(res.rel_residual, true_abs / (v.norm(dim=1) + torch.finfo(F64).eps), rtol=1e-6, atol=1e-14)
        assert isinstance(res.time_s, float) and res.time_s >= 0

    check(solver.solve_adjoint(vjp, v), "cold start")
    check(solver.solve_adjoint(vjp, v, w0=w_ref.clone()), "warm start at the answer")
    exact_inverse = torch.linalg.inv(eye - J)  # y ↦ y (I − J)⁻¹
    if solver.accepts_preconditioner:
        res = solver.solve_adjoint(vjp, v, preconditioner=lambda y: torch.einsum("bi,bij->bj", y, exact_inverse))
        check(res, "exact preconditioner")
        assert int(res.nstep.max()) <= 2
    else:
        with pytest.raises(OptionError, match="preconditioner"):
            solver.solve_adjoint(vjp, v, preconditioner=lambda y: y)
    if solver.accepts_inverse:
        # the adjoint fixed point's g(w) = Jᵀw + v − w has inverse Jacobian (Jᵀ − I)⁻¹
        res = solver.solve_adjoint(vjp, v, inverse=DenseInverse(torch.linalg.inv(J.transpose(1, 2) - eye)))
        check(res, "exact inverse estimate")
        assert int(res.nstep.max()) <= 3
    else:
        with pytest.raises(OptionError, match="inverse"):
            solver.solve_adjoint(vjp, v, inverse=DenseInverse(-eye.expand(B, D, D)))


def run_deq(cell: nn.Module, solver: dk.Solver, estimator: dk.GradientEstimator, x: torch.Tensor, c: torch.Tensor):
    """Forward + backward of ``L = Σ c·z* + ½‖z*‖²``; returns ``(z, info, grads of (x, *params))``."""
    deq = dk.DEQ(cell, solver, estimator, state_shape=(D,), on_failure="raise")
    xx = x.clone().requires_grad_()
    z, info = deq(xx)
    loss = (c * z).sum() + 0.5 * (z * z).sum()
    params = list(cell.parameters())
    grads = torch.autograd.grad(loss, [xx, *params])
    return z, info, grads


def reference_grads(cell: nn.Module, z: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``w ∂f/∂x`` and ``w ∂f/∂θ`` at ``z``."""
    xx = x.clone().requires_grad_()
    out = cell(z.detach(), xx)
    return torch.autograd.grad(out, [xx, *cell.parameters()], w)


def check_estimator(est_factory: Callable[..., Any], solver_factory: Callable[..., Any]) -> None:
    """A gradient estimator with a compatible forward solver: value is the solver's ``z*``, gradients are
    finite, point the way of the exact gradient, and equal the estimator's own closed form
    (:meth:`GradientEstimator.adjoint_closed_form`) where it has one (the Exact family: the exact
    gradient)."""
    x = randn(B, P, seed=3)
    for name, cls in CELLS.items():
        cell = cls(seed=11)
        c = randn(B, D, seed=8)
        solver, estimator = tight_solver(solver_factory), tight_estimator(est_factory)
        z, info, grads = run_deq(cell, solver, estimator, x, c)
        assert torch.equal(z.detach(), info.forward.z), "the value is the solver's best iterate"
        assert all(bool(torch.isfinite(g).all()) for g in grads)
        v = c + info.forward.z  # ∂L/∂z*
        J = dense_jacobian(cell, info.forward.z, x)
        w_exact = dk.Exact().adjoint_closed_form(v, J)
        exact = torch.cat([g.flatten() for g in reference_grads(cell, info.forward.z, x, w_exact)])
        got = torch.cat([g.flatten() for g in grads])
        cosine = float(got @ exact / (got.norm() * exact.norm()))
        assert cosine > 0.5, f"{name}: cosine to the exact gradient {cosine:.3f}"
        H = info.forward.inverse.dense() if info.forward.inverse is not None else None
        w_ref = estimator.adjoint_closed_form(v, J, H)
        declares = type(estimator).adjoint_closed_form is not GradientEstimator.adjoint_closed_form
        assert (w_ref is not None) == declares, f"{estimator!r}: a closed form it declares must be returned"
        if w_ref is not None:
            ref = torch.cat([g.flatten() for g in reference_grads(cell, info.forward.z, x, w_ref)])
            assert rel_err(got, ref) < 1e-8, f"{name}: {estimator!r} differs from its closed form"


def check_phantom_family(est_factory: Callable[..., Any], solver_factory: Callable[..., Any]) -> None:
    """An estimator with a truncation ``k``: its error to the exact gradient decreases in ``k``."""
    x = randn(B, P, seed=3)
    cell = TanhCell(rho=0.5, seed=11)
    c = randn(B, D, seed=8)
    _, _, exact = run_deq(cell, tight_solver(solver_factory), dk.Exact(dk.Dense()), x, c)
    exact_flat = torch.cat([g.flatten() for g in exact])
    errors = []
    for k in (1, 2, 4, 8, 16):
        _, _, grads = run_deq(cell, tight_solver(solver_factory), est_factory(k=k, damping=0.9), x, c)
        errors.append(rel_err(torch.cat([g.flatten() for g in grads]), exact_flat))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3, errors


# ---------------------------------------------------------------------------------------------
# the registries, read at collection time
# ---------------------------------------------------------------------------------------------


def solver_items() -> list[tuple[str, Any]]:
    return list(SOLVERS.items())


def compatible_pairs() -> list[tuple[str, Any, str, Any]]:
    pairs = []
    for en, ef in ESTIMATORS.items():
        for sn, sf in SOLVERS.items():
            if getattr(ef, "needs_inverse", False) and not getattr(sf, "keeps_inverse", False):
                continue
            pairs.append((en, ef, sn, sf))
    return pairs


def incompatible_pairs() -> list[tuple[str, Any, str, Any]]:
    return [
        (en, ef, sn, sf)
        for en, ef in ESTIMATORS.items()
        for sn, sf in SOLVERS.items()
        if getattr(ef, "needs_inverse", False) and not getattr(sf, "keeps_inverse", False)
    ]


def test_registries_hold_the_builtins():
    assert {"fixed-point", "anderson", "broyden"} <= set(SOLVERS.names())
    assert {"gmres", "dense"} <= set(LINEAR_SOLVERS.names())
    assert {"exact", "exact-warm", "unrolled", "neumann", "jacobian-free", "shine", "broyden-reuse"} <= set(ESTIMATORS.names())
    assert isinstance(dk.make_estimator("jfb"), dk.JacobianFree)


@pytest.mark.parametrize("name, factory", solver_items(), ids=[n for n, _ in solver_items()])
def test_forward_solver_conforms(name, factory):
    check_forward_solver(factory)
    assert isinstance(dk.make_solver(name), factory)


@pytest.mark.parametrize("name, factory", list(LINEAR_SOLVERS.items()), ids=LINEAR_SOLVERS.names())
def test_linear_solver_conforms(name, factory):
    check_linear_solver(tight_linear_solver(factory))
    assert isinstance(dk.make_linear_solver(name), factory)


@pytest.mark.parametrize(
    "est_name, est, solver_name, solver", compatible_pairs(), ids=[f"{e}-{s}" for e, _, s, _ in compatible_pairs()]
)
def test_estimator_with_solver_conforms(est_name, est, solver_name, solver):
    check_estimator(est, solver)


@pytest.mark.parametrize(
    "est_name, est, solver_name, solver", incompatible_pairs(), ids=[f"{e}-{s}" for e, _, s, _ in incompatible_pairs()]
)
def test_estimator_refuses_a_solver_without_inverse(est_name, est, solver_name, solver):
    with pytest.raises(OptionError, match="keeps none"):
        dk.DEQ(TanhCell(), tight_solver(solver), tight_estimator(est), state_shape=(D,))


@pytest.mark.parametrize(
    "est_name, est",
    [(n, f) for n, f in ESTIMATORS.items() if accepts(f, "k") and accepts(f, "damping")],
    ids=[n for n, f in ESTIMATORS.items() if accepts(f, "k") and accepts(f, "damping")],
)
def test_truncated_estimators_approach_exact_as_k_grows(est_name, est):
    check_phantom_family(est, SOLVERS.get_factory("anderson"))


# ---------------------------------------------------------------------------------------------
# extension by registration alone: a toy solver and a toy estimator go through the same checks
# ---------------------------------------------------------------------------------------------


class Halfway(dk.Solver):
    """Krasnosel'skii–Mann iteration ``z ← (z + f(z)) / 2`` (Mann, Proc. AMS 1953): one hook, ``step``."""

    name = "test-halfway"

    def step(self, state: Any, z: torch.Tensor, fz: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return 0.5 * (z + fz)


class TwoTermNeumann(dk.AdjointEstimator):
    """``w = v + vJ`` (the Neumann series of Geng et al., NeurIPS 2021, with λ = 1, k = 2)."""

    name = "test-two-term"

    def compute_w(self, v, vjp, result, stats):
        return v + vjp(v)

    def adjoint_closed_form(self, v: torch.Tensor, J: torch.Tensor, inverse: Optional[torch.Tensor] = None) -> torch.Tensor:
        return v + torch.einsum("bi,bij->bj", v, J)


def test_a_registered_toy_solver_and_estimator_go_through_the_checks():
    dk.register_solver("test-halfway")(Halfway)
    dk.register_estimator("test-two-term")(TwoTermNeumann)
    try:
        assert "test-halfway" in [n for n, _ in solver_items()]
        assert any(e == "test-two-term" and s == "test-halfway" for e, _, s, _ in compatible_pairs())
        check_forward_solver(SOLVERS.get_factory("test-halfway"))
        for _, sf in SOLVERS.items():
            check_estimator(ESTIMATORS.get_factory("test-two-term"), sf)
        # a built-in estimator with the toy solver
        check_estimator(dk.Exact, Halfway)
        # the toy solver declares no call options: an unknown one gets "did you mean"
        with pytest.raises(OptionError, match="unknown option 'tols'.*Did you mean 'tol'"):
            Halfway()(lambda z: 0.5 * z, torch.zeros(1, 2, dtype=F64), tols=1e-3)
    finally:
        SOLVERS.remove("test-halfway")
        ESTIMATORS.remove("test-two-term")
    assert "test-halfway" not in SOLVERS and "test-two-term" not in ESTIMATORS


def test_a_broken_solver_fails_the_checks():
    """The checks have teeth: a solver that stops one step short of its fixed point fails them."""

    class Lazy(dk.Solver):
        def step(self, state, z, fz, active):
            return 0.9 * fz + 0.1 * z + 1e-3  # a biased map: its "fixed point" is not fn's

    with pytest.raises(AssertionError):
        check_forward_solver(Lazy)
