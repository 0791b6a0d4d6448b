"""Inverse estimates: one interface for the quasi-Newton inverses that SHINE reuses.

A quasi-Newton solver builds, as a by-product, an estimate of the inverse of the Jacobian
(or Hessian) of the system it solves:

- Broyden on ``g(z) = f(z) − z`` keeps ``H ≈ J_g⁻¹ = (J − I)⁻¹`` in low-rank form
  ``−I + UVᵀ`` (:class:`deqkit.solvers.BroydenState`), per sample;
- L-BFGS on an inner objective ``h`` keeps ``H ≈ (∇²h)⁻¹`` as secant pairs ``(s, y)`` applied
  by the two-loop recursion (:class:`deqkit.bilevel.LBFGSInverse`).

SHINE (Ramzi et al., ICLR 2022, arXiv 2106.00553) reuses that estimate in the backward pass
(core) or in the hypergradient (bi-level); outer-problem awareness (OPA) improves it along the
direction the outer loss needs; WarmExact uses it to warm-start or precondition an exact
solve. All of them talk to an :class:`InverseEstimate`, so a new quasi-Newton solver gets
SHINE by returning one in its result's ``inverse`` field.

Shapes: vectors are batched rows or columns ``(B, d)``; an unbatched estimate (L-BFGS on one
problem) also accepts ``(d,)``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["InverseEstimate"]


class InverseEstimate:
    """An estimate ``H`` of an inverse Jacobian/Hessian, available as products only.

    The object SHINE shares between the forward and the backward pass (Ramzi, Mannel, Bahmani,
    Sutter & Vaiter, ICLR 2022, arXiv 2106.00553).

    Subclasses implement :meth:`apply` (``H x``), :meth:`apply_left` (``v H``) and
    :meth:`transpose` (``Hᵀ``); :meth:`dense` is optional (tests and small problems).
    """

    def apply(self, x: Tensor) -> Tensor:
        """``H x`` for column vectors ``x``."""
        raise NotImplementedError

    def apply_left(self, v: Tensor) -> Tensor:
        """``v H`` for row vectors ``v``."""
        raise NotImplementedError

    def transpose(self) -> InverseEstimate:
        """The estimate ``Hᵀ`` (the inverse for the transposed, adjoint system)."""
        raise NotImplementedError

    def dense(self) -> Tensor:
        """The dense matrix (``(B, d, d)`` or ``(d, d)``); for tests and small problems."""
        raise NotImplementedError(f"{type(self).__name__} has no dense form")

    def detach(self) -> InverseEstimate:
        """The same estimate detached from any autograd graph (default: itself)."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # a convenience so ``H @ x`` reads like the maths
    def __matmul__(self, x: Any) -> Tensor:
        return self.apply(x)

    def __rmatmul__(self, v: Any) -> Tensor:
        return self.apply_left(v)
