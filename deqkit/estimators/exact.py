"""The exact implicit gradient."""

from __future__ import annotations

import math
from typing import ClassVar, Optional, Union

import torch
from torch import Tensor

from .._options import check_bool, check_choice, check_failure_policy, check_int, check_positive, validated_options
from ..errors import apply_failure_policy
from ..inverse import InverseEstimate
from ..linear import AutoAdjoint, LinearSolver, as_linear_solver
from ..registry import register_estimator
from ..solvers.base import Solver, SolverResult
from .base import AdjointEstimator, BackwardStats, Vjp, amplification_per_sample

__all__ = ["Exact"]


@register_estimator("exact")
@validated_options
class Exact(AdjointEstimator):
    """Exact implicit gradient (implicit function theorem): solve ``w = wJ + v``.

    Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019. The adjoint equation is
    solved by ``linear_solver``: a :class:`~deqkit.linear.LinearSolver`
    (:class:`~deqkit.linear.AutoAdjoint`, :class:`~deqkit.linear.GMRES`,
    :class:`~deqkit.linear.Dense`) or any forward solver (:class:`~deqkit.solvers.FixedPoint`,
    :class:`~deqkit.solvers.Anderson`, :class:`~deqkit.solvers.Broyden`), which is wrapped in
    :class:`~deqkit.linear.FixedPointAdjoint`.

    The default adjoint solver is :class:`~deqkit.linear.AutoAdjoint` (relative tol 1e-6, at
    most 60 VJPs): Picard steps while they contract fast, GMRES when they do not; which ran, its
    steps and residual are in ``info.backward.solve`` (``solver``, ``nstep``, ``residual``,
    ``extra["policy"]``).

    **Samples whose forward solve missed its tolerance** (``unconverged="jacobian-free"``, the
    default): the implicit function theorem needs a fixed point. At an iterate with relative
    residual ``r = ‖f(z) − z‖ / ‖f(z)‖`` the distance to the fixed point is about
    ``‖(I − J)⁻¹‖·r``, and the adjoint's own amplification ``κ = ‖w‖/‖v‖`` is a lower estimate of
    that norm, so ``κ·r`` estimates how far (relatively) the sample's ``z`` is from its fixed
    point. Near a cell that stops contracting, where forward solves start to fail, ``I − J`` is
    nearly singular: ``κ`` reaches the thousands and one such sample's "exact" adjoint can wreck
    a training step (BENCHMARKS.md, the held-out digits job). A sample that missed its tolerance
    and has ``κ·r > fallback_error`` gets the Jacobian-free direction ``w = v`` instead (Fung et
    al., "JFB: Jacobian-Free Backpropagation for Implicit Networks", AAAI 2022), as SHINE's
    fallback does; those samples are counted in ``info.backward.n_fallback`` (and the training
    metric ``bwd_fallback``). A sample that missed its tolerance by a little, with a
    well-conditioned adjoint, keeps its exact adjoint, which is then far closer to the true
    gradient than ``v``. ``unconverged="exact"`` never falls back (used by the reference
    gradients).

    **Tolerance that follows the forward solve** (``match_forward=True``, the default): the
    right-hand side ``v`` and ``J`` are those of the iterate the forward returned, which is only
    as accurate as its residual; solving the adjoint far below that accuracy buys nothing. The
    adjoint's relative tolerance is then ``max(tol, forward_factor · ρ_f)``, with ``ρ_f`` the
    largest relative residual ``‖f(z) − z‖ / ‖f(z)‖`` over the batch's forward solve, and never
    looser than ``1e-2`` on this account. The default ``forward_factor=0.3`` sits below 1 because
    the forward runs the whole batch until its worst sample meets the tolerance, so the typical
    sample ends well below ``ρ_f`` and its gradient is that much more accurate: an adjoint solved
    only to ``ρ_f`` would then set the gradient's error (the factor's figures are in
    BENCHMARKS.md, "Against torchdeq"). The tolerance used is the solve's ``tol``
    (``info.backward.solve.tol``; ``extra["tol_requested"]`` holds the one asked for), and a solve
    that misses it is reported as always. ``match_forward=False`` solves to ``tol`` whatever the
    forward reached. Only adjoint solvers measuring the relative residual are matched.

    Args:
        linear_solver: the adjoint solver (default ``AutoAdjoint()``).
        tol: overrides the linear solver's own tolerance when given. Every adjoint solver
            measures the relative residual ``‖w − wJ − v‖ / ‖v‖``.
        max_iter: overrides the linear solver's own iteration cap when given.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when the solve misses its
            tolerance; the result is always in ``info.backward.solve``. NaN/Inf always raises.
        warm_start: ``"default"`` (the linear solver's own start: zero for GMRES, ``w = v`` for the
            fixed-point-type solvers and AutoAdjoint) or ``"jfb"`` (start at ``w = v`` whatever the solver).
        match_forward: let the adjoint tolerance follow the forward solve's accuracy (above).
        forward_factor: the factor of that rule (default 0.3).
        unconverged: ``"jacobian-free"`` (default) or ``"exact"``: the adjoint of samples whose
            forward solve missed its tolerance (above).
        fallback_error: the estimated relative distance to the fixed point, ``κ·r``, above which
            such a sample falls back (default 1e-2).
    """

    name = "exact"
    warm_starts: ClassVar[tuple[str, ...]] = ("default", "jfb")
    #: what the adjoint of a sample whose forward solve missed its tolerance is
    UNCONVERGED: ClassVar[tuple[str, ...]] = ("jacobian-free", "exact")

    def __init__(
        self,
        linear_solver: Optional[Union[Solver, LinearSolver]] = None,
        *,
        tol: Optional[float] = None,
        max_iter: Optional[int] = None,
        on_failure: str = "warn",
        warm_start: str = "default",
        match_forward: bool = True,
        forward_factor: float = 0.3,
        unconverged: str = "jacobian-free",
        fallback_error: float = 1e-2,
    ) -> None:
        owner = type(self).__name__
        if linear_solver is None:
            linear_solver = AutoAdjoint(tol=1e-6, max_iter=60)
        #: the adjoint solver as a :class:`~deqkit.linear.LinearSolver` (a forward solver, wrapped)
        self.adjoint = as_linear_solver(linear_solver)
        self.linear_solver = linear_solver
        self.tol = None if tol is None else check_positive(owner, "tol", tol)
        self.max_iter = None if max_iter is None else check_int(owner, "max_iter", max_iter)
        self.on_failure = check_failure_policy(owner, on_failure)
        check_choice(owner, "warm_start", warm_start, self.warm_starts)
        self.warm_start = warm_start
        self.match_forward = check_bool(owner, "match_forward", match_forward)
        self.forward_factor = check_positive(owner, "forward_factor", forward_factor)
        check_choice(owner, "unconverged", unconverged, self.UNCONVERGED)
        self.unconverged = unconverged
        self.fallback_error = check_positive(owner, "fallback_error", fallback_error)

    #: ``match_forward`` never loosens the adjoint tolerance beyond this
    MATCHED_TOL_CAP: ClassVar[float] = 1e-2

    def adjoint_tol(self, result: SolverResult) -> Optional[float]:
        """This call's adjoint tolerance (``None``: the linear solver's own): ``tol``, loosened to the
        forward's accuracy when ``match_forward`` (see the class docstring)."""
        requested = self.tol if self.tol is not None else self.adjoint.tol
        if not self.match_forward or self.adjoint.stop_mode != "rel":
            return self.tol
        reached = float(result.rel_residual.max()) if result.rel_residual.numel() else 0.0
        if math.isnan(reached):  # leave it to the solve to report
            return self.tol
        matched = min(self.forward_factor * reached, self.MATCHED_TOL_CAP)
        return max(requested, matched)

    def initial_guess(self, v: Tensor, result: SolverResult) -> Optional[Tensor]:
        """The adjoint solve's start (``None``: the linear solver's own)."""
        return v.clone() if self.warm_start == "jfb" else None

    def compute_w(self, v: Tensor, vjp: Vjp, result: SolverResult, stats: BackwardStats) -> Tensor:
        return self.solve(vjp, v, result, stats, w0=self.initial_guess(v, result))

    def solve(
        self,
        vjp: Vjp,
        v: Tensor,
        result: SolverResult,
        stats: BackwardStats,
        *,
        w0: Optional[Tensor] = None,
        preconditioner: Optional[Vjp] = None,
        inverse: Optional[InverseEstimate] = None,
    ) -> Tensor:
        """Solve the adjoint to this call's tolerance (:meth:`adjoint_tol`) from ``w0``, with the
        linear solver's optional ``preconditioner`` / ``inverse`` estimate; record the solve, apply
        the failure policy and the Jacobian-free fallback (class docstring)."""
        requested = self.tol if self.tol is not None else self.adjoint.tol
        sol = self.adjoint.solve_adjoint(
            vjp, v, w0=w0, tol=self.adjoint_tol(result), max_iter=self.max_iter, preconditioner=preconditioner, inverse=inverse
        )
        sol.extra.setdefault("tol_requested", requested)
        return self.fall_back(self.finish(sol, stats), v, result, stats)

    def fall_back(self, w: Tensor, v: Tensor, result: SolverResult, stats: BackwardStats) -> Tensor:
        """``w`` with ``v`` in the rows of samples whose forward missed its tolerance and whose
        estimated distance to the fixed point ``κ·r`` exceeds ``fallback_error``; counts them."""
        if self.unconverged == "exact":
            return w
        missed = ~result.converged.reshape(-1).to(v.device)
        kappa = amplification_per_sample(w, v)
        estimate = kappa * result.rel_residual.reshape(-1).to(kappa)
        bad = missed & (estimate > self.fallback_error)
        stats.n_fallback = n = int(bad.sum())  # one host read per backward
        if not n:
            return w
        worst, stats.fallback_amplification = torch.stack([estimate[bad].max(), kappa[bad].max()]).tolist()
        if self.on_failure != "ignore":
            msg = (
                f"Exact backward: {n} of {len(bad)} samples missed the forward tolerance and are estimated to be up to "
                f"{worst:.2g} (relative) from their fixed point (‖w‖/‖v‖ up to {stats.fallback_amplification:.3g} × "
                f"forward residual > fallback_error={self.fallback_error:g}); they got the Jacobian-free direction "
                "w = v (info.backward.n_fallback). "
                "Let the forward converge (more iterations, Jacobian regularisation), or pass unconverged='exact' "
                "to keep their adjoints."
            )
            apply_failure_policy(self.on_failure, msg, stacklevel=2)
        return torch.where(bad[:, None], v, w)

    def finish(self, sol: SolverResult, stats: BackwardStats) -> Tensor:
        """Record the adjoint solve and apply the ``on_failure`` policy; return ``w``."""
        stats.solve = sol
        if not sol.all_converged and self.on_failure != "ignore":
            msg = (
                f"Exact backward: {sol.summary()}. The gradient is inexact. Raise max_iter or tol of the linear "
                f"solver, try GMRES, or check the forward solve converged (spectral radius of J must be < 1)."
            )
            apply_failure_policy(self.on_failure, msg, stacklevel=2)
        return sol.z

    def adjoint_closed_form(self, v: Tensor, J: Tensor, inverse: Optional[Tensor] = None) -> Optional[Tensor]:
        """``w = v (I − J)⁻¹``."""
        eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
        return torch.linalg.solve((eye - J).transpose(1, 2), v.unsqueeze(-1)).squeeze(-1)
