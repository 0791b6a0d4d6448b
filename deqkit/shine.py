"""Gradients from the forward pass's quasi-Newton inverse: SHINE and Broyden Jacobian reuse.

A Broyden forward solve ends with ``H ≈ J_g⁻¹ = (J − I)⁻¹`` in low-rank form ``−I + UVᵀ``.
The exact adjoint is ``w = v(I − J)⁻¹ = −v J_g⁻¹``, so reusing ``H`` gives
``w ≈ −vH = v − (vU)Vᵀ``: one low-rank product, no solve.

* :class:`SHINE` — Ramzi, Mannel, Bahmani, Sutter & Vaiter, "SHINE: SHaring the INverse
  Estimate from the forward pass for bi-level optimization and implicit models", ICLR 2022
  (arXiv 2106.00553): with per-sample *fallback* to the Jacobian-free ``w = v`` when
  ``‖w‖ > ratio·‖v‖`` (their ratio 1.8), and *refine*: ``n`` backward Broyden iterations on
  ``w = wJ + v`` started at the SHINE estimate with the forward ``H`` (transposed) as the
  initial inverse.
* :class:`BroydenReuse` — Nguyen & Mauch, "Efficient Training of Deep Equilibrium Models",
  2023 (arXiv 2304.11663): the same reuse, plain (no fallback, no refinement).

Outer-problem awareness (OPA) lives in the forward solver: ``Broyden(opa_freq=k)`` with the
loss passed to ``DEQ.forward(x, loss_fn=...)``.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import Tensor

from ._options import check_int, check_positive, validated_options
from .estimators import AdjointEstimator, BackwardStats, Exact, Vjp
from .linear import GMRES
from .solvers import Broyden, BroydenState, SolverResult


def shine_direction(v: Tensor, H: BroydenState) -> Tensor:
    """``−vH = v − (vU)Vᵀ`` for rows ``v`` of shape ``(B, d)``: the SHINE adjoint estimate."""
    return -H.apply_left(v)


def transposed(H: BroydenState) -> BroydenState:
    """``Hᵀ = −I + VUᵀ``: the inverse estimate for the adjoint (row-vector) system."""
    return BroydenState(H.V, H.U, H.n_updates)


def _forward_inverse(result: SolverResult, owner: str) -> BroydenState:
    if not isinstance(result.state, BroydenState):
        raise ValueError(
            f"{owner}: the forward solve ({result.solver}) returned no inverse-Jacobian estimate; use solver=Broyden(...)."
        )
    return result.state


@validated_options
class SHINE(AdjointEstimator):
    """SHINE: ``w = −vH`` from the forward Broyden estimate (arXiv 2106.00553).

    Args:
        fallback: per sample, replace ``w`` by ``v`` (Jacobian-free) when ``‖w‖ > fallback_ratio·‖v‖``.
        fallback_ratio: the threshold ``c`` (1.8 in the paper).
        refine: number of backward Broyden iterations started at the SHINE estimate, with the
            forward ``Hᵀ`` as the initial inverse (0: none). Costs ``refine + 1`` VJPs.

    ``info.backward.n_fallback`` counts the samples that fell back; ``info.backward.vjps`` the cost.

    With OPA (``Broyden(opa_freq=k)`` and the loss passed to the forward call), leave the
    fallback off: OPA makes ``−vH`` accurate in the loss direction, so a large ``‖w‖`` is the true
    amplification by ``(I − J)⁻¹`` and the fallback replaces exactly those accurate estimates by
    ``v``. Measured on the trained digits DEQs of ``deqkit compare`` (10 seeds, OPA every 5
    steps): cosine to the exact gradient 0.992 ± 0.006 without the fallback (BENCHMARKS.md
    accuracy section), 0.555 ± 0.315 with it (the same command and seeds before the preset
    changed) (tested on a small problem in ``tests/test_shine.py``); a DEQ built with both warns.
    Without OPA the fallback guards against a poor ``H`` and helps.
    """

    needs_inverse_jacobian = True
    name: ClassVar[str] = "shine"

    def __init__(self, *, fallback: bool = False, fallback_ratio: float = 1.8, refine: int = 0) -> None:
        owner = type(self).__name__
        if not isinstance(fallback, bool):
            raise ValueError(f"{owner}: fallback must be True or False, got {fallback!r}.")
        check_positive(owner, "fallback_ratio", fallback_ratio)
        check_int(owner, "refine", refine, minimum=0)
        self.fallback, self.fallback_ratio, self.refine = fallback, float(fallback_ratio), int(refine)

    @property
    def uses_vjp(self) -> bool:
        return self.refine > 0

    def check_solver(self, solver: object) -> None:
        """As :meth:`AdjointEstimator.check_solver`; also warns when the fallback meets OPA."""
        super().check_solver(solver)
        if self.fallback and getattr(solver, "opa_freq", None) is not None:
            warnings.warn(
                f"{self.label} with an OPA solver ({solver!r}): OPA makes −vH accurate in the loss "
                "direction, and the fallback then replaces exactly the large, accurate estimates by v "
                "(measured on trained digits DEQs: cosine to exact 0.555 with the fallback, 0.992 "
                "without). Use SHINE(fallback=False) with OPA.",
                UserWarning,
                stacklevel=3,
            )

    def compute_w(self, v: Tensor, vjp: Vjp, result: SolverResult, stats: BackwardStats) -> Tensor:
        H = _forward_inverse(result, type(self).__name__)
        w = shine_direction(v, H)
        if self.fallback:
            bad = w.norm(dim=1) > self.fallback_ratio * v.norm(dim=1)
            stats.n_fallback = int(bad.sum())
            w = torch.where(bad[:, None], v, w)
        if self.refine > 0:
            # n Broyden steps on the adjoint fixed point w = wJ + v: n + 1 residual evaluations
            solver = Broyden(memory=self.refine + 1, tol=torch.finfo(v.dtype).tiny, max_iter=self.refine + 1, stop_mode="abs")
            sol = solver.solve_adjoint(vjp, v, w, state0=transposed(H))
            stats.refine = sol
            w = sol.z
        return w


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


@validated_options
class WarmExact(Exact):
    """:class:`~deqkit.estimators.Exact` helped by the forward Broyden estimate ``H ≈ J_g⁻¹``.

    ``warm_start="shine"``: the adjoint solve starts at ``w₀ = −vH``; ``"shine+inverse"`` (the
    default with a Broyden ``linear_solver``, which is the default solver) also starts Broyden
    from the forward ``Hᵀ`` as its inverse estimate. Same tolerance, fewer backward iterations
    (BENCHMARKS.md step table: 11 vs 12 VJPs on the digits MLP, 30 vs 42 at width 256, against
    the same Broyden adjoint started cold). ``"precondition"`` (the default with :class:`~deqkit.linear.GMRES`):
    ``−H`` is GMRES's right preconditioner, ``w = −yH`` with GMRES on ``y ↦ −yH(I − J)``: its
    first step already contains the SHINE estimate, and every later step is one VJP plus one
    low-rank product (width 256: 38 instead of 49 VJPs; on a CPU at that size the saving and the
    extra products balance: 0.93–1.05× the time of plain GMRES over three runs of the step
    benchmark, 0.96× in the recorded one, and 1.04–1.12× on the small reference cell; it should
    pay where the cell's VJP dominates). A plain warm start of GMRES (``"shine"``) saves about
    one step per sample and costs one VJP for the initial residual, so it rarely pays. Ramzi et al. (arXiv
    2106.00553) use ``H`` as a warm start; the preconditioned form is ours.
    """

    needs_inverse_jacobian = True
    warm_starts: ClassVar[tuple[str, ...]] = ("shine", "shine+inverse", "precondition")
    name: ClassVar[str] = "exact-warm"

    def __init__(self, linear_solver=None, *, tol=None, max_iter=None, on_failure: str = "warn", warm_start=None) -> None:
        if linear_solver is None:
            linear_solver = Broyden(memory=30, tol=1e-6, max_iter=60)
        if warm_start is None:
            warm_start = ("shine+inverse" if isinstance(linear_solver, Broyden)
                          else "precondition" if isinstance(linear_solver, GMRES) else "shine")
        if warm_start == "shine+inverse" and not isinstance(linear_solver, Broyden):
            raise ValueError("WarmExact: warm_start='shine+inverse' needs linear_solver=Broyden(...).")
        if warm_start == "precondition" and not isinstance(linear_solver, GMRES):
            raise ValueError("WarmExact: warm_start='precondition' needs linear_solver=GMRES(...).")
        super().__init__(linear_solver, tol=tol, max_iter=max_iter, on_failure=on_failure, warm_start=warm_start)

    def compute_w(self, v: Tensor, vjp: Vjp, result: SolverResult, stats: BackwardStats) -> Tensor:
        H = _forward_inverse(result, type(self).__name__)
        if self.warm_start == "precondition":
            sol = self.linear_solver.solve_adjoint(vjp, v, tol=self.tol, max_iter=self.max_iter,
                                                   precondition=lambda y: shine_direction(y, H))
            return self.finish(sol, stats)
        w0 = shine_direction(v, H)
        extra = {"state0": transposed(H)} if self.warm_start == "shine+inverse" else {}
        sol = self.linear_solver.solve_adjoint(vjp, v, w0, tol=self.tol, max_iter=self.max_iter, **extra)
        return self.finish(sol, stats)
