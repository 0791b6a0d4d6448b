"""Hypergradient estimators for bi-level problems.

All estimators approximate

    dL/dλ = −(∂²h/∂λ∂x)ᵀ w,   w ≈ H⁻¹ ∇L(x*),   H = ∇²ₓₓh(x*, λ),

and differ only in how ``w`` is obtained (Ramzi et al., "SHINE", ICLR 2022,
arXiv 2106.00553; Pedregosa, "HOAG", ICML 2016):

============================  ==================================================
``Exact(tol)``                conjugate gradient with Hessian-vector products
``SHINE()``                   two-loop recursion over the inner L-BFGS pairs
``SHINE(refine=n)``           ``n`` CG iterations warm-started at SHINE's ``w``
``SHINE(opa=freq)``           SHINE on a memory enriched with OPA pairs
``JacobianFree()``            ``w = ∇L`` (``H⁻¹ ≈ I``)
============================  ==================================================

One interface: ``est.hypergradient(problem, lam, inner_result) -> HypergradResult``;
``est.inner_options(problem)`` gives what the inner solve must do for it (OPA).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from deqkit.errors import ConvergenceError, ConvergenceWarning, NonFiniteError

from .lbfgs import LBFGS, LBFGSResult
from .problem import BilevelProblem

__all__ = ["CGResult", "conjugate_gradient", "HypergradResult", "HypergradientEstimator",
           "Exact", "SHINE", "JacobianFree", "make_estimator", "ESTIMATOR_NAMES"]

ON_FAIL = ("warn", "raise", "record")


@dataclass
class CGResult:
    """Result of :func:`conjugate_gradient`: solution, iterations, residual norm, converged."""

    x: Tensor
    n_iter: int
    residual: float
    converged: bool


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor,
                       x0: Optional[Tensor] = None, rtol: float = 1e-10, atol: float = 0.0,
                       max_iter: int = 1000) -> CGResult:
    """Conjugate gradient for SPD ``A x = b``; stops when
    ``‖b − Ax‖ ≤ max(rtol‖b‖, atol)`` or after ``max_iter`` iterations.

    Raises :class:`NonFiniteError` on NaN/Inf or a non-positive curvature ``pᵀAp``
    (``A`` not positive definite)."""
    x = torch.zeros_like(b) if x0 is None else x0.detach().clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    target = max(rtol * float(b.norm()), atol)
    rr = float(r @ r)
    if math.sqrt(rr) <= target:
        return CGResult(x, 0, math.sqrt(rr), True)
    p = r.clone()
    for it in range(1, max_iter + 1):
        ap = matvec(p)
        pap = float(p @ ap)
        if not math.isfinite(pap):
            raise NonFiniteError("conjugate gradient met a non-finite Hessian-vector product")
        if pap <= 0:
            raise NonFiniteError(f"conjugate gradient met non-positive curvature pᵀHp={pap:.3e};"
                                 " the inner Hessian is not positive definite at x*")
        alpha = rr / pap
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = float(r @ r)
        if math.sqrt(rr_new) <= target:
            return CGResult(x, it, math.sqrt(rr_new), True)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return CGResult(x, max_iter, math.sqrt(rr), False)


@dataclass
class HypergradResult:
    """A hypergradient and how it was obtained.

    Attributes:
        grad: ``dL/dλ`` (shape of λ).
        w: the approximation of ``H⁻¹ ∇L(x*)``.
        outer_loss: ``L(x*)``; outer_grad: ``∇L(x*)``.
        n_hvp: Hessian-vector products used; cg_iter: CG iterations.
        converged: whether the linear solve met its tolerance (``True`` for non-iterative
            estimators); residual: ``‖H w − ∇L‖`` when known, else ``nan``.
        time: seconds spent in the estimator.
    """

    grad: Tensor
    w: Tensor
    outer_loss: float
    outer_grad: Tensor
    n_hvp: int
    cg_iter: int
    converged: bool
    residual: float
    time: float
    estimator: str


class HypergradientEstimator:
    """Base class: subclasses implement :meth:`_solve_w`."""

    name = "base"
    needs_pairs = False

    def inner_options(self, problem: BilevelProblem) -> Dict:
        """Keyword arguments the inner solve must receive for this estimator."""
        return {}

    def default_memory(self) -> int:
        """L-BFGS memory used by SHINE's bi-level code for this estimator."""
        return 30

    def hypergradient(self, problem: BilevelProblem, lam: Tensor, inner: LBFGSResult,
                      w0: Optional[Tensor] = None, rtol: Optional[float] = None
                      ) -> HypergradResult:
        """Estimate ``dL/dλ`` at ``inner.x`` (≈ ``x*(lam)``).

        Args:
            problem: the bi-level problem.
            lam: the hyperparameter (scalar or vector tensor).
            inner: the inner solve's result (its pairs for SHINE).
            w0: warm start for iterative linear solves (ignored otherwise).
            rtol: overrides the estimator's relative CG tolerance for this call.
        """
        t0 = time.perf_counter()
        self._check_inner(inner)
        x = inner.x
        loss, v = problem.outer_value_and_grad(x)
        w, n_hvp, cg_iter, converged, residual = self._solve_w(problem, lam, inner, v, w0, rtol)
        if not bool(torch.isfinite(w).all()):
            raise NonFiniteError(f"{self.name}: H⁻¹∇L estimate is not finite")
        grad = -problem.cross_vjp(x, lam, w)
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteError(f"{self.name}: the hypergradient is not finite")
        return HypergradResult(grad=grad, w=w, outer_loss=loss, outer_grad=v, n_hvp=n_hvp,
                               cg_iter=cg_iter, converged=converged, residual=residual,
                               time=time.perf_counter() - t0, estimator=self.name)

    def _check_inner(self, inner) -> None:
        if not hasattr(inner, "x"):
            raise ValueError(f"{self.name}: inner_result must be an LBFGSResult (with .x), "
                             f"got {type(inner).__name__}")

    def _solve_w(self, problem, lam, inner, v, w0, rtol):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


def _check_on_fail(on_fail: str) -> None:
    if on_fail not in ON_FAIL:
        raise ValueError(f"on_fail={on_fail!r} is not valid; valid: {ON_FAIL}")


class Exact(HypergradientEstimator):
    """Implicit-function-theorem hypergradient: ``w`` solves ``H w = ∇L`` by conjugate
    gradient with Hessian-vector products (Pedregosa, HOAG, ICML 2016).

    Args:
        rtol: relative residual tolerance ``‖Hw − ∇L‖ ≤ rtol‖∇L‖``.
        max_iter: CG iteration cap.
        warm_start: use ``w0`` (e.g. the previous outer step's ``w``) when given.
        on_fail: a CG that misses ``rtol``: ``'warn'`` (ConvergenceWarning), ``'raise'``
            (ConvergenceError) or ``'record'``; always recorded in ``result.converged``.
    """

    name = "exact"

    def __init__(self, rtol: float = 1e-10, max_iter: int = 1000, warm_start: bool = True,
                 on_fail: str = "warn") -> None:
        if not (isinstance(rtol, (int, float)) and rtol > 0):
            raise ValueError(f"rtol must be a positive number, got {rtol!r}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        _check_on_fail(on_fail)
        self.rtol = float(rtol)
        self.max_iter = max_iter
        self.warm_start = bool(warm_start)
        self.on_fail = on_fail

    def __repr__(self) -> str:
        return f"Exact(rtol={self.rtol:g}, max_iter={self.max_iter})"

    def _solve_w(self, problem, lam, inner, v, w0, rtol):
        hvp = problem.hvp_operator(inner.x, lam)
        tol = self.rtol if rtol is None else float(rtol)
        res = conjugate_gradient(hvp, v, x0=w0 if self.warm_start else None, rtol=tol,
                                 max_iter=self.max_iter)
        n_hvp = res.n_iter + (1 if (w0 is not None and self.warm_start) else 0)
        if not res.converged:
            msg = (f"Exact: CG missed rtol={tol:.1e} after {res.n_iter} iterations "
                   f"(relative residual {res.residual / max(float(v.norm()), 1e-300):.2e}). "
                   "Try increasing `max_iter`.")
            if self.on_fail == "raise":
                raise ConvergenceError(msg)
            if self.on_fail == "warn":
                warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        return res.x, n_hvp, res.n_iter, res.converged, res.residual


class SHINE(HypergradientEstimator):
    """SHINE: reuse the inner L-BFGS inverse-Hessian estimate (two-loop recursion over its
    ``(s, y)`` pairs) as ``H⁻¹`` (Ramzi et al., ICLR 2022, arXiv 2106.00553).

    Args:
        refine: number of CG iterations warm-started at SHINE's ``w`` (0: none).
        opa: outer-problem awareness; add an extra secant pair along ``Hₖ∇L(xₙ)`` every
            ``opa`` inner steps (``None``: off).  Needs ``∇L`` during the inner solve,
            which :meth:`inner_options` passes on.
    """

    needs_pairs = True

    def __init__(self, refine: int = 0, opa: Optional[int] = None) -> None:
        if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
            raise ValueError(f"refine must be a non-negative int, got {refine!r}")
        if opa is not None and (not isinstance(opa, int) or isinstance(opa, bool) or opa < 1):
            raise ValueError(f"opa must be None or a positive int (the OPA frequency), got {opa!r}")
        self.refine = refine
        self.opa = opa
        name = "shine"
        if opa is not None:
            name += "-opa"
        if refine:
            name += "-refine"
        self.name = name

    def __repr__(self) -> str:
        return f"SHINE(refine={self.refine}, opa={self.opa})"

    def inner_options(self, problem: BilevelProblem) -> Dict:
        if self.opa is None:
            return {}
        return {"opa_freq": self.opa, "outer_grad": problem.outer_grad}

    def default_memory(self) -> int:
        return 60 if self.opa is not None else 30

    def _check_inner(self, inner) -> None:
        if not isinstance(inner, LBFGSResult):
            raise ValueError("SHINE needs the result of deqkit.bilevel.LBFGS (its (s, y) pairs);"
                             f" got {type(inner).__name__}")
        if self.opa is not None and inner.opa_freq is None:
            raise ValueError("SHINE(opa=...) needs an inner solve run with OPA: pass "
                             "**estimator.inner_options(problem) to LBFGS.solve")

    def _solve_w(self, problem, lam, inner, v, w0, rtol):
        if len(inner.s) == 0:
            warnings.warn("SHINE: the inner solve kept no (s, y) pairs (it converged at x0); "
                          "the estimate reduces to H⁻¹ ≈ I", ConvergenceWarning, stacklevel=3)
        w = inner.inverse_hessian_product(v)
        if self.refine == 0:
            return w, 0, 0, True, float("nan")
        hvp = problem.hvp_operator(inner.x, lam)
        tol = 1e-12 if rtol is None else float(rtol)
        res = conjugate_gradient(hvp, v, x0=w, rtol=tol, max_iter=self.refine)
        # a fixed CG budget is the point of refine: not reaching rtol is not a failure
        return res.x, res.n_iter + 1, res.n_iter, True, res.residual


class JacobianFree(HypergradientEstimator):
    """Jacobian-free hypergradient: ``H⁻¹ ≈ I``, i.e. ``w = ∇L(x*)`` (as in Fung et al.,
    JFB, and the SHINE paper's baseline)."""

    name = "jacobian-free"

    def __repr__(self) -> str:
        return "JacobianFree()"

    def _solve_w(self, problem, lam, inner, v, w0, rtol):
        return v.clone(), 0, 0, True, float("nan")


ESTIMATOR_NAMES = ("exact", "shine", "shine-refine", "shine-opa", "jacobian-free")


def make_estimator(name: str, refine: int = 5, opa_freq: int = 5,
                   exact_rtol: float = 1e-10) -> HypergradientEstimator:
    """Build an estimator from its CLI name (one of :data:`ESTIMATOR_NAMES`)."""
    if name == "exact":
        return Exact(rtol=exact_rtol)
    if name == "shine":
        return SHINE()
    if name == "shine-refine":
        return SHINE(refine=refine)
    if name == "shine-opa":
        return SHINE(opa=opa_freq)
    if name == "jacobian-free":
        return JacobianFree()
    raise ValueError(f"unknown hypergradient estimator {name!r}; valid: {ESTIMATOR_NAMES}")


def default_inner_solver(estimator: HypergradientEstimator, **kwargs) -> LBFGS:
    """An :class:`LBFGS` with the memory SHINE's code uses for ``estimator`` (30, 60 with OPA)."""
    kwargs.setdefault("memory", estimator.default_memory())
    return LBFGS(**kwargs)
