"""Gradient estimators: how the backward pass of a DEQ replaces ``(I − J)⁻¹``.

Each estimator takes the converged solve and returns a tensor whose **value is the solver's
best iterate** ``z*`` (the same for every estimator, so estimators differ only in their
gradients) and whose autograd graph yields that estimator's gradient for the cell's
parameters and input. With ``v = ∂L/∂z*`` (rows, per sample) and ``J = ∂f/∂z`` at ``z*``:

============================  ===========================================  ======================
estimator                     ``w`` reaching ``∂f/∂θ`` and ``∂f/∂x``        extra cost
============================  ===========================================  ======================
:class:`Exact`                ``w = wJ + v`` solved by a linear solver      iterative solve (VJPs)
:class:`Unrolled` (UPG)       backprop through k damped steps from ``z*``   k graph evaluations
:class:`Neumann` (NPG)        ``λ Σ_{t<k} v (λJ + (1−λ)I)^t``                k − 1 VJPs
:class:`JacobianFree` (JFB)   ``v`` (exactly ``Unrolled(1, 1)``)            none
============================  ===========================================  ======================

The hook-based estimators evaluate ``f(z*, x)`` once with a graph, and a tensor hook replaces
the gradient arriving there by ``w``.
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Optional, Union

import torch
from torch import Tensor

from ._options import options_repr, check_choice, check_fraction, check_int, check_positive, from_registry, validated_options
from .errors import ConvergenceError, ConvergenceWarning, NonFiniteError
from .linear import GMRES, LinearSolver
from .solvers import Solver, SolverResult

if TYPE_CHECKING:
    from .deq import DEQInfo

CellFn = Callable[[Tensor], Tensor]
Vjp = Callable[[Tensor], Tensor]
FAILURE_POLICIES = ("warn", "raise", "ignore")


@dataclass
class BackwardStats:
    """What the backward pass of one DEQ call did (filled in when ``backward`` runs).

    Attributes:
        estimator: the estimator's name.
        time_s: wall-clock seconds spent computing ``w`` (not the final VJP to the parameters;
            no device synchronisation); ``None`` for :class:`Unrolled`, whose ``w`` is
            autograd's pass through the unrolled graph, not a separate step.
        vjps: vector–Jacobian products spent computing ``w`` (per batch); for :class:`Unrolled`,
            the ``k`` graph evaluations it backpropagates through.
        solve: the adjoint solve's result, for :class:`Exact` (steps, residuals, converged).
        refine: SHINE's fixed-budget refinement steps (a budget, not a tolerance: its
            ``converged`` flags are not a failure).
        n_fallback: samples that fell back to the Jacobian-free direction (SHINE).
    """

    estimator: str
    time_s: Optional[float] = 0.0
    vjps: int = 0
    solve: Optional[SolverResult] = None
    refine: Optional[SolverResult] = None
    n_fallback: int = 0

    @property
    def converged(self) -> Optional[Tensor]:
        return None if self.solve is None else self.solve.converged


class GradientEstimator:
    """Base class. :meth:`attach` is the one call a :class:`~deqkit.deq.DEQ` makes."""

    #: the estimator reads the forward solver's inverse-Jacobian estimate (SHINE, BroydenReuse)
    needs_inverse_jacobian: ClassVar[bool] = False
    name: ClassVar[str] = "estimator"

    def check_solver(self, solver: object) -> None:
        """Refuse, at construction of the DEQ, a forward solver this estimator cannot use."""
        if self.needs_inverse_jacobian and not getattr(solver, "keeps_inverse_jacobian", False):
            raise ValueError(
                f"{type(self).__name__} reuses the forward solver's inverse-Jacobian estimate, but "
                f"{type(solver).__name__} keeps none. Use solver=Broyden(...) as the forward solver, "
                f"or choose an estimator that needs no solver state (Exact, Unrolled, Neumann, JacobianFree)."
            )

    def attach(self, cell_fn: CellFn, result: SolverResult, info: "DEQInfo") -> Tensor:
        """Return ``z*`` (value of ``result.z``) carrying this estimator's gradient.

        Args:
            cell_fn: ``z ↦ f(z, x)``, evaluated with autograd on (depends on θ and x).
            result: the forward solve.
            info: the DEQ call's info; the estimator records its backward stats there.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return options_repr(self)

    @property
    def label(self) -> str:
        """A short name for tables: the class and the options that differ from their defaults."""
        params = inspect.signature(type(self).__init__).parameters
        parts = []
        for k, p in params.items():
            if k == "self" or not hasattr(self, k):
                continue
            val = getattr(self, k)
            if p.default is inspect.Parameter.empty or val != p.default:
                parts.append(getattr(val, "name", None) or f"{k}={val}")
        return f"{type(self).__name__}({', '.join(parts)})" if parts else type(self).__name__


def straight_through(value: Tensor, carrier: Tensor) -> Tensor:
    """A tensor equal to ``value`` whose gradient flows unchanged into ``carrier``."""
    return value.detach() + (carrier - carrier.detach())


class AdjointEstimator(GradientEstimator):
    """Estimators defined by a map ``v ↦ w`` (implemented by :meth:`compute_w`) at ``z*``.

    The cell is evaluated once with a graph at ``z*``; a hook on its output replaces the
    incoming gradient ``v`` by ``w``, which autograd then pushes to θ and x.
    """

    @property
    def uses_vjp(self) -> bool:
        """Whether :meth:`compute_w` calls ``vjp`` (then a graph in ``z`` is built in the forward)."""
        return True

    def compute_w(self, v: Tensor, vjp: Vjp, result: SolverResult, stats: BackwardStats) -> Tensor:
        """``w`` for flattened row vectors ``v`` of shape ``(B, d)``; ``vjp(u) = uJ`` on ``(B, d)``."""
        raise NotImplementedError

    def attach(self, cell_fn: CellFn, result: SolverResult, info: "DEQInfo") -> Tensor:
        # The path to θ and x is built with z* detached, so the final backward does not also
        # pay a VJP into z; estimators that take VJPs get a second evaluation with z requiring
        # grad (built here, in the forward, where the cell's parametrised weights are cached).
        # SHINE / BroydenReuse take none and build no z-graph. The cell must be deterministic
        # (no dropout inside it), as a fixed point requires anyway.
        f_out = cell_fn(result.z.detach())
        if not f_out.requires_grad:
            return result.z
        shape, B = f_out.shape, f_out.shape[0]
        stats = BackwardStats(self.name)
        z_in = result.z.detach().requires_grad_()
        f_z = cell_fn(z_in) if self.uses_vjp else None

        def vjp(u: Tensor) -> Tensor:
            assert f_z is not None, f"{type(self).__name__}.uses_vjp must be True to take VJPs"
            stats.vjps += 1
            (g,) = torch.autograd.grad(f_z, z_in, u.reshape(shape), retain_graph=True)
            return g.reshape(B, -1)

        def hook(v: Optional[Tensor]) -> Optional[Tensor]:
            if v is None:  # an undefined (zero) incoming gradient stays undefined
                return None
            start = time.perf_counter()
            w = self.compute_w(v.reshape(B, -1), vjp, result, stats)
            if not torch.isfinite(w).all():
                raise NonFiniteError(
                    f"{type(self).__name__}: the backward pass produced NaN/Inf in the adjoint w. "
                    f"Check that the forward solve converged (info.converged) and the loss is finite."
                )
            stats.time_s += time.perf_counter() - start
            info.backward = stats
            return w.reshape(shape).to(v.dtype)

        f_out.register_hook(hook)  # the VJPs use their own graph, so they never re-enter this hook
        return straight_through(result.z, f_out)


@validated_options
class Exact(AdjointEstimator):
    """Exact implicit gradient (implicit function theorem): solve ``w = wJ + v``.

    Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019. The adjoint equation is
    solved by ``linear_solver``: any forward solver (:class:`~deqkit.solvers.FixedPoint`,
    :class:`~deqkit.solvers.Anderson`, :class:`~deqkit.solvers.Broyden`) applied to the fixed
    point ``w ↦ wJ + v``, or a dedicated :class:`~deqkit.linear.GMRES` / :class:`~deqkit.linear.Dense`.

    Args:
        linear_solver: the adjoint solver (default ``GMRES(restart=20)``).
        tol, max_iter: override the linear solver's own tolerance and cap when given. The
            relative residual differs by solver family: GMRES and Dense divide ``‖w − wJ − v‖``
            by ``‖v‖``; the fixed-point-type solvers by ``‖wJ + v‖`` (≈ ``‖w‖`` at the
            solution), as they do in the forward solve.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when the solve misses its
            tolerance; the result is always in ``info.backward.solve``. NaN/Inf always raises.
        warm_start: ``"default"`` (the linear solver's own start: zero for GMRES, ``w = v`` for the
            fixed-point-type solvers) or ``"jfb"`` (start at ``w = v`` whatever the solver).
    """

    name = "exact"

    def __init__(
        self,
        linear_solver: Optional[Union[Solver, LinearSolver]] = None,
        *,
        tol: Optional[float] = None,
        max_iter: Optional[int] = None,
        on_failure: str = "warn",
        warm_start: str = "default",
    ) -> None:
        owner = type(self).__name__
        if linear_solver is None:
            linear_solver = GMRES(tol=1e-6, max_iter=60)
        if not hasattr(linear_solver, "solve_adjoint"):
            raise ValueError(
                f"{owner}: linear_solver must be a deqkit solver (FixedPoint, Anderson, Broyden, GMRES, Dense), "
                f"got {type(linear_solver).__name__}."
            )
        if tol is not None:
            check_positive(owner, "tol", tol)
        if max_iter is not None:
            check_int(owner, "max_iter", max_iter)
        check_choice(owner, "on_failure", on_failure, FAILURE_POLICIES)
        check_choice(owner, "warm_start", warm_start, self.warm_starts)
        self.linear_solver = linear_solver
        self.tol, self.max_iter = tol, max_iter
        self.on_failure, self.warm_start = on_failure, warm_start

    warm_starts: ClassVar[tuple[str, ...]] = ("default", "jfb")

    def initial_guess(self, v: Tensor, result: SolverResult) -> Optional[Tensor]:
        return v.clone() if self.warm_start == "jfb" else None

    def compute_w(self, v: Tensor, vjp: Vjp, result: SolverResult, stats: BackwardStats) -> Tensor:
        sol = self.linear_solver.solve_adjoint(vjp, v, self.initial_guess(v, result), tol=self.tol, max_iter=self.max_iter)
        return self.finish(sol, stats)

    def finish(self, sol: SolverResult, stats: BackwardStats) -> Tensor:
        """Record the adjoint solve and apply the ``on_failure`` policy; return ``w``."""
        stats.solve = sol
        if not sol.all_converged and self.on_failure != "ignore":
            msg = (
                f"Exact backward: {sol.summary()}. The gradient is inexact. Raise max_iter or tol of the linear "
                f"solver, try GMRES, or check the forward solve converged (spectral radius of J must be < 1)."
            )
            if self.on_failure == "raise":
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=2)
        return sol.z


def _phantom_options(owner: object, k: int, damping: float) -> tuple[int, float]:
    """Validated ``(k, λ)`` of a phantom-gradient estimator."""
    check_int(type(owner).__name__, "k", k)
    check_fraction(type(owner).__name__, "damping", damping)
    return int(k), float(damping)


@validated_options
class Neumann(AdjointEstimator):
    """Neumann-series phantom gradient (NPG): ``w = λ Σ_{t<k} v (λJ + (1−λ)I)^t`` at ``z*``.

    Geng, Zhang, Bai, Wang & Lin, "On Training Implicit Models", NeurIPS 2021 (arXiv 2111.05177).
    ``k = 1`` gives ``λ v``; as ``k → ∞`` it tends to the exact ``v (I − J)⁻¹`` when the damped
    iteration is a contraction. Costs ``k − 1`` VJPs.
    """

    name = "neumann"

    def __init__(self, k: int = 5, damping: float = 0.5) -> None:
        self.k, self.damping = _phantom_options(self, k, damping)

    @property
    def label(self) -> str:
        return f"{type(self).__name__}({self.k}, {self.damping:g})"

    def compute_w(self, v: Tensor, vjp: Vjp, result: SolverResult, stats: BackwardStats) -> Tensor:
        lam = self.damping
        term, total = v, v
        for _ in range(self.k - 1):
            term = lam * vjp(term) + (1 - lam) * term
            total = total + term
        return lam * total


@validated_options
class Unrolled(GradientEstimator):
    """Unrolled phantom gradient (UPG): backprop through ``k`` damped steps started at ``z*``.

    ``z₀ = z*`` (detached), ``z_{t+1} = λ f(z_t, x) + (1 − λ) z_t``; the returned value stays
    ``z*``, the gradient is that of ``z_k``. Geng et al., NeurIPS 2021 (arXiv 2111.05177);
    their MDEQ setting is ``k = 5, λ = 0.5``.
    """

    name = "unrolled"

    def __init__(self, k: int = 5, damping: float = 0.5) -> None:
        self.k, self.damping = _phantom_options(self, k, damping)

    label = Neumann.label

    def attach(self, cell_fn: CellFn, result: SolverResult, info: "DEQInfo") -> Tensor:
        z = result.z.detach()
        for _ in range(self.k):
            fz = cell_fn(z)
            z = fz if self.damping == 1.0 else self.damping * fz + (1 - self.damping) * z
        if not z.requires_grad:
            return result.z
        info.backward = BackwardStats(self.name, time_s=None, vjps=self.k)
        return straight_through(result.z, z)


@validated_options
class JacobianFree(Unrolled):
    """Jacobian-free backpropagation (JFB): ``w = v``, i.e. ``(I − J)⁻¹ ≈ I``.

    Fung, Heaton, Li, McKenzie, Osher & Yin, "JFB: Jacobian-Free Backpropagation for Implicit
    Networks", AAAI 2022. Identical to ``Unrolled(k=1, damping=1)`` by construction.
    """

    name = "jacobian-free"

    def __init__(self) -> None:
        super().__init__(k=1, damping=1.0)

    def __repr__(self) -> str:
        return "JacobianFree()"

    @property
    def label(self) -> str:
        return "JacobianFree"


ESTIMATORS: dict[str, Callable[..., GradientEstimator]] = {
    "exact": Exact,
    "unrolled": Unrolled,
    "neumann": Neumann,
    "jacobian-free": JacobianFree,
    "jfb": JacobianFree,
}


def make_estimator(name: str, **options: object) -> GradientEstimator:
    """Build a gradient estimator by name (``exact``, ``unrolled``, ``neumann``, ``jacobian-free``, ``shine``, ...)."""
    from . import shine  # registers SHINE, BroydenReuse, WarmExact (kept out of this module's imports)

    registry = {**ESTIMATORS, "shine": shine.SHINE, "broyden-reuse": shine.BroydenReuse, "exact-warm": shine.WarmExact}
    return from_registry("estimator", registry, name, **options)
