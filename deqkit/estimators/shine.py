"""Gradients from the forward pass's quasi-Newton inverse: SHINE, Broyden Jacobian reuse, WarmExact.

A quasi-Newton forward solve ends with ``H ≈ J_g⁻¹ = (J − I)⁻¹`` (Broyden: low-rank form
``−I + UVᵀ``), returned in ``result.inverse`` as an :class:`~deqkit.inverse.InverseEstimate`.
The exact adjoint is ``w = v(I − J)⁻¹ = −v J_g⁻¹``, so reusing ``H`` gives ``w ≈ −vH``: one
product, no solve. Everything here talks to ``result.inverse`` through the
:class:`~deqkit.inverse.InverseEstimate` interface only (``apply_left``, ``transpose``), so any
solver that returns one (``keeps_inverse = True``) gets SHINE.

* :class:`SHINE` — Ramzi, Mannel, Bahmani, Sutter & Vaiter, "SHINE: SHaring the INverse
  Estimate from the forward pass for bi-level optimization and implicit models", ICLR 2022
  (arXiv 2106.00553): with per-sample *fallback* to the Jacobian-free ``w = v`` when
  ``‖w‖ > ratio·‖v‖`` (their ratio 1.8), and *refine*: ``n`` backward Broyden iterations on
  ``w = wJ + v`` started at the SHINE estimate with the forward ``Hᵀ`` as the initial inverse.
* :class:`BroydenReuse` — Nguyen & Mauch, "Efficient Training of Deep Equilibrium Models",
  2023 (arXiv 2304.11663): the same reuse, plain (no fallback, no refinement).
* :class:`WarmExact` — the exact gradient, warm-started or preconditioned by ``H``.

Outer-problem awareness (OPA) lives in the forward solver: ``Broyden(opa_freq=k)`` with the
loss passed to ``DEQ.forward(x, loss_fn=...)``.
"""

from __future__ import annotations

import warnings
from typing import ClassVar, Optional, Union

import torch
from torch import Tensor

from .._options import check_bool, check_choice, check_int, check_positive, validated_options
from ..errors import OptionError
from ..inverse import InverseEstimate
from ..linear import FixedPointAdjoint, LinearSolver, as_linear_solver
from ..registry import register_estimator
from ..solvers.base import Solver, SolverResult
from ..solvers.broyden import Broyden
from .base import AdjointEstimator, BackwardStats, Vjp, forward_inverse
from .exact import Exact

__all__ = ["SHINE", "BroydenReuse", "WarmExact", "shine_direction"]


def shine_direction(v: Tensor, H: InverseEstimate) -> Tensor:
    """``−vH`` for rows ``v`` of shape ``(B, d)``: the SHINE adjoint estimate (Broyden: ``v − (vU)Vᵀ``)."""
    return -H.apply_left(v)


@register_estimator("shine")
@validated_options
class SHINE(AdjointEstimator):
    """SHINE: ``w = −vH`` from the forward inverse estimate (Ramzi et al., ICLR 2022, arXiv 2106.00553).

    Args:
        fallback: per sample, replace ``w`` by ``v`` (Jacobian-free) when ``‖w‖ > fallback_ratio·‖v‖``.
        fallback_ratio: the threshold ``c`` (1.8 in the paper).
        refine: number of backward Broyden iterations started at the SHINE estimate, with the
            forward ``Hᵀ`` as the initial inverse (0: none). Costs ``refine + 1`` VJPs.

    ``info.backward.n_fallback`` counts the samples that fell back; ``info.backward.vjps`` the cost.

    With OPA (``Broyden(opa_freq=k)`` and the loss passed to the forward call), leave the
    fallback off: OPA makes ``−vH`` accurate in the loss direction, so a large ``‖w‖`` is the true
    amplification by ``(I − J)⁻¹`` and the fallback replaces exactly those accurate estimates by
    ``v`` (see BENCHMARKS.md; tested on a small problem in ``tests/test_shine.py``); a DEQ built
    with both warns. Without OPA the fallback guards against a poor ``H`` and helps.
    """

    needs_inverse = True
    name: ClassVar[str] = "shine"

    def __init__(self, *, fallback: bool = False, fallback_ratio: float = 1.8, refine: int = 0) -> None:
        owner = type(self).__name__
        self.fallback = check_bool(owner, "fallback", fallback)
        self.fallback_ratio = check_positive(owner, "fallback_ratio", fallback_ratio)
        self.refine = check_int(owner, "refine", refine, minimum=0)

    @property
    def uses_vjp(self) -> bool:
        return self.refine > 0

    def check_solver(self, solver: object) -> None:
        """As :meth:`AdjointEstimator.check_solver`; also warns when the fallback meets OPA."""
        super().check_solver(solver)
        if self.fallback and getattr(solver, "needs_loss_grad", False):
            warnings.warn(
                f"{self.label} with an OPA solver ({solver!r}): OPA makes −vH accurate in the loss "
                "direction, and the fallback then replaces exactly the large, accurate estimates by v "
                "(see BENCHMARKS.md). Use SHINE(fallback=False) with OPA.",
                UserWarning,
                stacklevel=3,
            )

    def compute_w(self, v: Tensor, vjp: Vjp, result: SolverResult, stats: BackwardStats) -> Tensor:
        H = forward_inverse(result, type(self).__name__)
        w = shine_direction(v, H)
        if self.fallback:
            bad = w.norm(dim=1) > self.fallback_ratio * v.norm(dim=1)
            stats.n_fallback = int(bad.sum())
            w = torch.where(bad[:, None], v, w)
        if self.refine > 0:
            # n Broyden steps on the adjoint fixed point w = wJ + v: n + 1 residual evaluations
            solver = Broyden(memory=self.refine + 1, tol=torch.finfo(v.dtype).tiny, max_iter=self.refine + 1, stop_mode="abs")
            sol = FixedPointAdjoint(solver).solve_adjoint(vjp, v, w0=w, inverse=H.transpose())
            stats.refine = sol
            w = sol.z
        return w

    def adjoint_closed_form(self, v: Tensor, J: Tensor, inverse: Optional[Tensor] = None) -> Optional[Tensor]:
        """``−vH`` (with the fallback); ``None`` with ``refine`` (a fixed budget of Broyden steps)."""
        if self.refine > 0 or inverse is None:
            return None
        w = -torch.einsum("bi,bij->bj", v, inverse)
        if self.fallback:
            bad = w.norm(dim=1) > self.fallback_ratio * v.norm(dim=1)
            w = torch.where(bad[:, None], v, w)
        return w


@register_estimator("broyden-reuse")
@validated_options
class BroydenReuse(SHINE):
    """Broyden Jacobian reuse (Nguyen & Mauch 2023, arXiv 2304.11663): ``w = −vH``, as is.

    One mechanism with :class:`SHINE` (this is ``SHINE(fallback=False, refine=0)``); kept as its
    own preset so the paper's method is one name away and reported under its name.
    """

    name: ClassVar[str] = "broyden-reuse"

    def __init__(self) -> None:
        super().__init__(fallback=False, refine=0)

    def __repr__(self) -> str:
        return "BroydenReuse()"


@register_estimator("exact-warm")
@validated_options
class WarmExact(Exact):
    """:class:`~deqkit.Exact` helped by the forward inverse estimate ``H ≈ J_g⁻¹``.

    ``warm_start="shine"``: the adjoint solve starts at ``w₀ = −vH``; ``"shine+inverse"`` (the
    default with a linear solver that ``accepts_inverse``, such as the default Broyden) also
    starts the solver from the forward ``Hᵀ`` as its inverse estimate: same tolerance, fewer
    backward iterations. ``"precondition"`` (the default with a linear solver that
    ``accepts_preconditioner``, such as :class:`~deqkit.linear.GMRES`): ``−H`` is the right
    preconditioner, ``w = −yH`` with GMRES on ``y ↦ −yH(I − J)``: its first step already contains
    the SHINE estimate, and every later step is one VJP plus one low-rank product; it pays where
    the cell's VJP dominates (see BENCHMARKS.md for measured step counts and times). A plain warm
    start of GMRES (``"shine"``) saves about one step per sample and costs one VJP for the
    initial residual, so it rarely pays. Ramzi et al. (ICLR 2022, arXiv 2106.00553) use ``H`` as
    a warm start; the preconditioned form is ours.

    ``tol``, ``max_iter``, ``on_failure``, ``match_forward``, ``forward_factor``,
    ``unconverged`` and ``fallback_error`` are :class:`~deqkit.Exact`'s: by default the adjoint
    tolerance follows the accuracy the forward solve reached, and a sample whose forward missed
    its tolerance and is estimated to be far from its fixed point gets ``w = v``.
    """

    needs_inverse = True
    warm_starts: ClassVar[tuple[str, ...]] = ("shine", "shine+inverse", "precondition")
    name: ClassVar[str] = "exact-warm"

    def __init__(
        self,
        linear_solver: Optional[Union[Solver, LinearSolver]] = None,
        *,
        tol: Optional[float] = None,
        max_iter: Optional[int] = None,
        on_failure: str = "warn",
        warm_start: Optional[str] = None,
        match_forward: bool = True,
        forward_factor: float = 0.3,
        unconverged: str = "jacobian-free",
        fallback_error: float = 1e-2,
    ) -> None:
        owner = type(self).__name__
        if linear_solver is None:
            linear_solver = Broyden(memory=30, tol=1e-6, max_iter=60)
        adjoint = as_linear_solver(linear_solver)
        if warm_start is None:
            warm_start = (
                "shine+inverse" if adjoint.accepts_inverse else "precondition" if adjoint.accepts_preconditioner else "shine"
            )
        check_choice(owner, "warm_start", warm_start, self.warm_starts)
        if warm_start == "shine+inverse" and not adjoint.accepts_inverse:
            raise OptionError(
                f"{owner}: warm_start='shine+inverse' needs a linear solver that accepts an inverse estimate "
                f"(accepts_inverse), e.g. linear_solver=Broyden(...); {adjoint!r} does not."
            )
        if warm_start == "precondition" and not adjoint.accepts_preconditioner:
            raise OptionError(
                f"{owner}: warm_start='precondition' needs a linear solver that accepts a preconditioner "
                f"(accepts_preconditioner), e.g. linear_solver=GMRES(...); {adjoint!r} does not."
            )
        super().__init__(
            linear_solver,
            tol=tol,
            max_iter=max_iter,
            on_failure=on_failure,
            warm_start=warm_start,
            match_forward=match_forward,
            forward_factor=forward_factor,
            unconverged=unconverged,
            fallback_error=fallback_error,
        )

    def compute_w(self, v: Tensor, vjp: Vjp, result: SolverResult, stats: BackwardStats) -> Tensor:
        H = forward_inverse(result, type(self).__name__)
        if self.warm_start == "precondition":
            return self.solve(vjp, v, result, stats, preconditioner=lambda y: shine_direction(y, H))
        inverse = H.transpose() if self.warm_start == "shine+inverse" else None
        return self.solve(vjp, v, result, stats, w0=shine_direction(v, H), inverse=inverse)
