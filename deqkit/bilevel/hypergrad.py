"""Hypergradient estimators for bi-level problems.

All estimators approximate

    dL/dλ = −(∂²h/∂λ∂x)ᵀ w,   w ≈ H⁻¹ ∇L(x*),   H = ∇²ₓₓh(x*, λ),

and differ only in how ``w`` is obtained (Ramzi et al., "SHINE: SHaring the INverse
Estimate from the forward pass for bi-level optimization and implicit models", ICLR 2022,
arXiv 2106.00553; Pedregosa, "Hyperparameter optimization with approximate gradient",
ICML 2016):

======================================  ==============================================
``ExactHypergradient(tol)``             conjugate gradient (:class:`deqkit.linear.CG`)
                                        with Hessian-vector products
``SHINEHypergradient()``                the inner solve's inverse estimate
                                        (``inner.inverse.apply``: L-BFGS two-loop)
``SHINEHypergradient(refine=n)``        ``n`` CG iterations warm-started at SHINE's ``w``
``SHINEHypergradient(opa_freq=k)``      SHINE on a memory enriched with OPA pairs
``JacobianFreeHypergradient()``         ``w = ∇L`` (``H⁻¹ ≈ I``)
======================================  ==============================================

The names differ from the core's gradient estimators (:class:`deqkit.Exact`,
:class:`deqkit.SHINE`, ...) on purpose: those differentiate a DEQ layer, these a bi-level
problem. One interface: ``est.hypergradient(problem, lam, inner_result) -> HypergradResult``;
``est.inner_options(problem)`` gives what the inner solve must do for it (OPA). Build by name
with :func:`make_hypergradient`; add your own with :func:`register_hypergradient`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from deqkit._options import check_bool, check_failure_policy, check_int, check_positive, options_repr, validated_options
from deqkit.errors import ConvergenceWarning, NonFiniteError, OptionError, apply_failure_policy
from deqkit.inverse import InverseEstimate
from deqkit.linear.cg import CG
from deqkit.registry import Registry
from deqkit.results import ResultMixin

from .lbfgs import LBFGS, LBFGSInverse
from .problem import BilevelProblem

__all__ = [
    "HypergradResult",
    "HypergradientEstimator",
    "WEstimate",
    "ExactHypergradient",
    "SHINEHypergradient",
    "JacobianFreeHypergradient",
    "HYPERGRADIENTS",
    "HYPERGRADIENT_NAMES",
    "register_hypergradient",
    "make_hypergradient",
    "default_inner_solver",
]


@dataclass
class HypergradResult(ResultMixin):
    """A hypergradient and how it was obtained.

    Attributes:
        grad: ``dL/dλ`` (shape of λ).
        w: the approximation of ``H⁻¹ ∇L(x*)``.
        outer_loss: ``L(x*)``; outer_grad: ``∇L(x*)``.
        n_hvp: Hessian-vector products used.
        nstep: CG iterations (0 for the non-iterative estimators).
        converged: whether the linear solve met its tolerance (``True`` for the estimators
            without a tolerance: SHINE, SHINE with a fixed ``refine`` budget, Jacobian-free).
        residual: the relative residual ``‖H w − ∇L‖ / ‖∇L‖`` when a CG ran, else ``nan``.
        time_s: seconds spent in the estimator.
        estimator: the estimator's name.
    """

    grad: Tensor
    w: Tensor
    outer_loss: float
    outer_grad: Tensor
    n_hvp: int
    nstep: int
    converged: bool
    residual: float
    time_s: float
    estimator: str


class WEstimate(NamedTuple):
    """What :meth:`HypergradientEstimator.solve_w` returns."""

    w: Tensor
    n_hvp: int
    nstep: int
    converged: bool
    residual: float


def _hessian_cg(
    owner: str, problem: BilevelProblem, x: Tensor, lam: Tensor, v: Tensor, w0: Optional[Tensor], tol: float, max_iter: int
):
    """CG on ``∇²ₓₓh(x, lam) w = v`` (a batch of one), from ``w0``; returns the
    :class:`~deqkit.solvers.SolverResult`."""
    hvp = problem.hvp_operator(x, lam)
    try:
        return CG(tol=tol, max_iter=max_iter).solve(lambda p: hvp(p[0])[None], v[None], x0=None if w0 is None else w0[None])
    except NonFiniteError as e:
        raise NonFiniteError(
            f"{owner}: {e} Here the operator is the inner Hessian ∇²ₓₓh at x*: the inner problem must be strongly convex near x*."
        ) from e


class HypergradientEstimator:
    """Base class of the bi-level hypergradient estimators: subclasses implement
    :meth:`solve_w` (the approximation of ``H⁻¹ ∇L(x*)``)."""

    name = "base"

    def inner_options(self, problem: BilevelProblem) -> dict[str, Any]:
        """Keyword arguments the inner solve must receive for this estimator."""
        return {}

    def default_memory(self) -> int:
        """L-BFGS memory used by SHINE's bi-level code for this estimator."""
        return 30

    def hypergradient(
        self, problem: BilevelProblem, lam: Tensor, inner: Any, w0: Optional[Tensor] = None, *, tol: Optional[float] = None
    ) -> HypergradResult:
        """Estimate ``dL/dλ`` at ``inner.x`` (≈ ``x*(lam)``).

        Args:
            problem: the bi-level problem.
            lam: the hyperparameter (scalar or vector tensor).
            inner: the inner solve's result (an :class:`~deqkit.bilevel.LBFGSResult`; SHINE
                uses its ``inverse``).
            w0: warm start for iterative linear solves (ignored otherwise).
            tol: overrides the estimator's relative CG tolerance for this call.
        """
        t0 = time.perf_counter()
        if tol is not None:
            tol = check_positive(f"{type(self).__name__}.hypergradient", "tol", tol)
        self.check_inner(inner)
        x = inner.x
        loss, v = problem.outer_value_and_grad(x)
        sol = self.solve_w(problem, lam, inner, v, w0, tol)
        if not bool(torch.isfinite(sol.w).all()):
            raise NonFiniteError(f"{self.name}: H⁻¹∇L estimate is not finite")
        grad = -problem.cross_vjp(x, lam, sol.w)
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteError(f"{self.name}: the hypergradient is not finite")
        return HypergradResult(
            grad=grad,
            w=sol.w,
            outer_loss=loss,
            outer_grad=v,
            n_hvp=sol.n_hvp,
            nstep=sol.nstep,
            converged=sol.converged,
            residual=sol.residual,
            time_s=time.perf_counter() - t0,
            estimator=self.name,
        )

    def check_inner(self, inner: Any) -> None:
        """Raise :class:`~deqkit.errors.OptionError` if ``inner`` lacks what this estimator needs."""
        if not isinstance(getattr(inner, "x", None), Tensor):
            raise OptionError(
                f"{type(self).__name__}: inner must be the result of an inner solve "
                f"(deqkit.bilevel.LBFGS.solve, with .x), got {type(inner).__name__}."
            )

    def solve_w(
        self, problem: BilevelProblem, lam: Tensor, inner: Any, v: Tensor, w0: Optional[Tensor], tol: Optional[float]
    ) -> WEstimate:  # pragma: no cover - abstract
        """``w ≈ H⁻¹ v`` with ``v = ∇L(x*)``, ``H = ∇²ₓₓh(x*, lam)``; ``w0``: a warm start;
        ``tol``: this call's relative tolerance (``None``: the estimator's own)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return options_repr(self)


@validated_options
class ExactHypergradient(HypergradientEstimator):
    """Implicit-function-theorem hypergradient: ``w`` solves ``H w = ∇L`` by conjugate
    gradient (:class:`deqkit.linear.CG`) with Hessian-vector products (Pedregosa, HOAG,
    ICML 2016).

    Args:
        tol: relative residual tolerance ``‖Hw − ∇L‖ ≤ tol‖∇L‖``.
        max_iter: CG iteration cap.
        warm_start: use ``w0`` (e.g. the previous outer step's ``w``) when given.
        on_failure: a CG that misses ``tol``: ``'warn'`` (ConvergenceWarning), ``'raise'``
            (ConvergenceError) or ``'ignore'``; always recorded in ``result.converged``.
    """

    name = "exact"

    def __init__(self, *, tol: float = 1e-10, max_iter: int = 1000, warm_start: bool = True, on_failure: str = "warn") -> None:
        owner = type(self).__name__
        self.tol = check_positive(owner, "tol", tol)
        self.max_iter = check_int(owner, "max_iter", max_iter)
        self.warm_start = check_bool(owner, "warm_start", warm_start)
        self.on_failure = check_failure_policy(owner, on_failure)

    def solve_w(self, problem, lam, inner, v, w0, tol):
        tol = self.tol if tol is None else tol
        w0 = w0 if self.warm_start else None
        res = _hessian_cg(type(self).__name__, problem, inner.x, lam, v, w0, tol, self.max_iter)
        nstep, converged, residual = int(res.nstep[0]), bool(res.converged[0]), float(res.residual[0])
        if not converged:
            apply_failure_policy(
                self.on_failure,
                f"{type(self).__name__}: CG missed tol={tol:.1e} after {nstep} iterations "
                f"(relative residual {residual:.2e}). Try increasing `max_iter`.",
                stacklevel=3,
            )
        return WEstimate(res.z[0], nstep + (1 if w0 is not None else 0), nstep, converged, residual)


@validated_options
class SHINEHypergradient(HypergradientEstimator):
    """SHINE: reuse the inner solve's inverse-Hessian estimate (``inner.inverse``, the L-BFGS
    two-loop recursion over its ``(s, y)`` pairs) as ``H⁻¹`` (Ramzi et al., ICLR 2022,
    arXiv 2106.00553). Any inner result whose ``inverse`` is an
    :class:`~deqkit.inverse.InverseEstimate` works.

    Args:
        refine: number of CG iterations warm-started at SHINE's ``w`` (0: none). A fixed
            budget: the result counts as converged whatever the residual.
        opa_freq: outer-problem awareness; add an extra secant pair along ``Hₖ∇L(xₙ)`` every
            ``opa_freq`` inner steps (``None``: off).  Needs ``∇L`` during the inner solve,
            which :meth:`inner_options` passes on.

    ``name`` is ``"shine"``, ``"shine-refine"``, ``"shine-opa"`` or ``"shine-opa-refine"``.
    """

    name = "shine"

    def __init__(self, *, refine: int = 0, opa_freq: Optional[int] = None) -> None:
        owner = type(self).__name__
        self.refine = check_int(owner, "refine", refine, minimum=0)
        self.opa_freq = None if opa_freq is None else check_int(owner, "opa_freq", opa_freq)
        self.name = "shine" + ("-opa" if self.opa_freq is not None else "") + ("-refine" if self.refine else "")

    def inner_options(self, problem: BilevelProblem) -> dict[str, Any]:
        if self.opa_freq is None:
            return {}
        return {"opa_freq": self.opa_freq, "outer_grad": problem.outer_grad}

    def default_memory(self) -> int:
        return 60 if self.opa_freq is not None else 30

    def check_inner(self, inner: Any) -> None:
        super().check_inner(inner)
        if not isinstance(getattr(inner, "inverse", None), InverseEstimate):
            raise OptionError(
                f"{type(self).__name__} needs an inner result with an inverse estimate "
                f"(the result of deqkit.bilevel.LBFGS.solve); got {type(inner).__name__}."
            )
        if self.opa_freq is not None and getattr(inner, "opa_freq", None) is None:
            raise OptionError(
                f"{type(self).__name__}(opa_freq=...) needs an inner solve run with OPA: "
                "pass **estimator.inner_options(problem) to LBFGS.solve."
            )

    def solve_w(self, problem, lam, inner, v, w0, tol):
        inverse = inner.inverse
        if isinstance(inverse, LBFGSInverse) and inverse.n_pairs == 0:
            warnings.warn(
                f"{type(self).__name__}: the inner solve kept no (s, y) pairs (it converged "
                "at x0); the estimate reduces to H⁻¹ ≈ I",
                ConvergenceWarning,
                stacklevel=3,
            )
        w = inverse.apply(v)
        if self.refine == 0:
            return WEstimate(w, 0, 0, True, float("nan"))
        res = _hessian_cg(type(self).__name__, problem, inner.x, lam, v, w, 1e-12 if tol is None else tol, self.refine)
        nstep = int(res.nstep[0])
        # a fixed CG budget is the point of refine: not reaching tol is not a failure
        return WEstimate(res.z[0], nstep + 1, nstep, True, float(res.residual[0]))


@validated_options
class JacobianFreeHypergradient(HypergradientEstimator):
    """Jacobian-free hypergradient: ``H⁻¹ ≈ I``, i.e. ``w = ∇L(x*)`` (Fung et al., "JFB:
    Jacobian-free backpropagation for implicit networks", AAAI 2022; the SHINE paper's
    baseline)."""

    name = "jacobian-free"

    def __init__(self) -> None:
        pass

    def solve_w(self, problem, lam, inner, v, w0, tol):
        return WEstimate(v.clone(), 0, 0, True, float("nan"))


# --------------------------------------------------------------------------- registry
#: the hypergradient estimators by name (:func:`make_hypergradient`, :func:`register_hypergradient`)
HYPERGRADIENTS: Registry = Registry("hypergradient")


def register_hypergradient(name: str, *, aliases: tuple = (), replace: bool = False) -> Callable[[Any], Any]:
    """Decorator: register a :class:`HypergradientEstimator` class (or a factory returning
    one) under ``name``, so that :func:`make_hypergradient` builds it."""
    return HYPERGRADIENTS.register(name, aliases=aliases, replace=replace)


@validated_options
def shine_refine(*, refine: int = 5) -> SHINEHypergradient:
    """The ``"shine-refine"`` preset: :class:`SHINEHypergradient` with ``refine`` CG steps (5)."""
    return SHINEHypergradient(refine=check_int("shine_refine", "refine", refine))


@validated_options
def shine_opa(*, opa_freq: int = 5) -> SHINEHypergradient:
    """The ``"shine-opa"`` preset: :class:`SHINEHypergradient` with OPA every ``opa_freq`` steps (5)."""
    return SHINEHypergradient(opa_freq=opa_freq)


HYPERGRADIENTS.add("exact", ExactHypergradient)
HYPERGRADIENTS.add("shine", SHINEHypergradient)
HYPERGRADIENTS.add("shine-refine", shine_refine)
HYPERGRADIENTS.add("shine-opa", shine_opa)
HYPERGRADIENTS.add("jacobian-free", JacobianFreeHypergradient)

#: the built-in names, in display order (``HYPERGRADIENTS.names()`` adds registered ones)
HYPERGRADIENT_NAMES = ("exact", "shine", "shine-refine", "shine-opa", "jacobian-free")


def make_hypergradient(name: str, **options: Any) -> HypergradientEstimator:
    """Build a registered hypergradient estimator by name (see :data:`HYPERGRADIENTS`), with
    ``options`` for its constructor: ``make_hypergradient("exact", tol=1e-8)``,
    ``make_hypergradient("shine-opa", opa_freq=3)``. An unknown name or option raises
    :class:`~deqkit.errors.OptionError` with a "did you mean"."""
    return HYPERGRADIENTS.make(name, **options)


def default_inner_solver(hypergradient: HypergradientEstimator, **options: Any) -> LBFGS:
    """An :class:`LBFGS` with the memory SHINE's code uses for ``hypergradient`` (30, 60 with
    OPA); ``options`` go to :class:`LBFGS`."""
    options.setdefault("memory", hypergradient.default_memory())
    return LBFGS(**options)
