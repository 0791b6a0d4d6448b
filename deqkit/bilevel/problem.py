"""Bi-level problems ``x*(λ) = argmin_x h(x, λ)``, outer loss ``L(x*(λ))``.

A :class:`BilevelProblem` wraps two plain torch callables and provides, through
``torch.autograd``, everything the inner solver and the hypergradient estimators need:
values and gradients of ``h`` and ``L``, Hessian-vector products ``∇²ₓₓh · v`` and the mixed
vector-Jacobian product ``(∂²h/∂λ∂x)ᵀ w``.  With those, the hypergradient is

    dL/dλ = −(∂²h/∂λ∂x)ᵀ H⁻¹ ∇L(x*),   H = ∇²ₓₓh(x*, λ)

(implicit function theorem; Pedregosa, "Hyperparameter optimization with approximate
gradient", ICML 2016; Ramzi et al., "SHINE: SHaring the INverse Estimate from the forward
pass for bi-level optimization and implicit models", ICLR 2022, arXiv 2106.00553).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from deqkit._options import validated_options
from deqkit.errors import NonFiniteError, OptionError

__all__ = ["BilevelProblem"]

InnerFn = Callable[[Tensor, Tensor], Tensor]
OuterFn = Callable[[Tensor], Tensor]


def _check_finite(name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{name} is not finite (NaN or Inf); check the problem's scaling and the value of λ.")


@validated_options
class BilevelProblem:
    """A bi-level problem defined by torch callables.

    Args:
        inner: ``h(x, lam) -> scalar tensor``, the inner objective, twice differentiable in
            ``x`` and differentiable in ``lam`` (strongly convex in ``x`` for the theory).
        outer: ``L(x) -> scalar tensor``, the outer (validation) loss.
        x0: initial inner iterate (its dtype and device are used throughout).
        test: optional ``T(x) -> scalar tensor``, a held-out loss that is only reported.
        name: a label used in logs.

    ``h`` and ``L`` are any torch code; the problem is the reference of Pedregosa (ICML 2016)
    and Ramzi et al. (ICLR 2022) when ``h`` is a regularised training loss and ``L`` a
    validation loss (:func:`~deqkit.bilevel.logistic_hpo_problem`).

    All methods take and return detached tensors; graphs are built internally.
    """

    def __init__(
        self, inner: InnerFn, outer: OuterFn, x0: Tensor, *, test: Optional[OuterFn] = None, name: str = "problem"
    ) -> None:
        if not callable(inner) or not callable(outer):
            raise OptionError(
                "BilevelProblem: inner and outer must be callables inner(x, lam) and outer(x), "
                f"got {type(inner).__name__} and {type(outer).__name__}."
            )
        if test is not None and not callable(test):
            raise OptionError(f"BilevelProblem: test must be a callable test(x) or None, got {test!r}.")
        if not isinstance(x0, Tensor) or x0.dim() != 1:
            raise OptionError(
                "BilevelProblem: x0 must be a 1-D tensor (flatten the inner variable), got "
                f"{tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}."
            )
        if not isinstance(name, str):
            raise OptionError(f"BilevelProblem: name must be a string, got {name!r}.")
        self.inner = inner
        self.outer = outer
        self.test = test
        self.x0 = x0.detach().clone()
        self.name = name

    # ----------------------------------------------------------------- inner problem
    def inner_value(self, x: Tensor, lam: Tensor) -> float:
        """``h(x, lam)`` as a float (no graph)."""
        with torch.no_grad():
            return float(self.inner(x, lam))

    def inner_value_and_grad(self, x: Tensor, lam: Tensor) -> tuple[float, Tensor]:
        """``(h(x, lam), ∇ₓh(x, lam))``; non-finite values are returned, not raised
        (the line search treats them as a too-long step)."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            val = self.inner(xr, lam.detach())
            (g,) = torch.autograd.grad(val, xr)
        return float(val.detach()), g.detach()

    def hvp_operator(self, x: Tensor, lam: Tensor) -> Callable[[Tensor], Tensor]:
        """Return ``v ↦ ∇²ₓₓh(x, lam) v``; the first-order graph is built once and reused."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.inner(xr, lam.detach()), xr, create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            with torch.enable_grad():
                (hv,) = torch.autograd.grad(g, xr, grad_outputs=v, retain_graph=True)
            return hv.detach()

        return hvp

    def cross_vjp(self, x: Tensor, lam: Tensor, w: Tensor) -> Tensor:
        """``(∂²h/∂λ∂x)ᵀ w`` = ``∂/∂λ ⟨∇ₓh(x, λ), w⟩`` (shape of ``lam``)."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            lr = lam.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.inner(xr, lr), xr, create_graph=True)
            (out,) = torch.autograd.grad(g, lr, grad_outputs=w.detach(), allow_unused=True)
        if out is None:  # h does not depend on λ through ∇ₓh
            return torch.zeros_like(lam)
        return out.detach()

    # ----------------------------------------------------------------- outer problem
    def outer_value_and_grad(self, x: Tensor) -> tuple[float, Tensor]:
        """``(L(x), ∇L(x))``; raises :class:`NonFiniteError` if either is not finite."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            val = self.outer(xr)
            (g,) = torch.autograd.grad(val, xr)
        _check_finite("the outer loss or its gradient", torch.cat([val.detach().reshape(1), g]))
        return float(val.detach()), g.detach()

    def outer_grad(self, x: Tensor) -> Tensor:
        """``∇L(x)`` (used by OPA during the inner solve)."""
        return self.outer_value_and_grad(x)[1]

    def outer_value(self, x: Tensor) -> float:
        """``L(x)`` as a float (no graph)."""
        with torch.no_grad():
            return float(self.outer(x))

    def test_value(self, x: Tensor) -> Optional[float]:
        """The held-out test loss, or ``None`` when the problem has none."""
        if self.test is None:
            return None
        with torch.no_grad():
            return float(self.test(x))
