"""An estimator that trains on a cheap gradient and pays for the exact one only when it must."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch
from torch import Tensor

from .._options import check_fraction, check_int, validated_options
from ..errors import OptionError
from ..inverse import InverseEstimate
from ..registry import register_estimator
from ..solvers.base import SolverResult
from .base import (
    AdjointEstimator,
    BackwardStats,
    CellFn,
    GradientEstimator,
    Vjp,
    finish_backward,
    loss_scaling_active,
    overflow_guard,
    straight_through,
)
from .exact import Exact
from .phantom import Unrolled
from .shine import SHINE

if TYPE_CHECKING:
    from ..deq import DEQInfo

__all__ = ["Adaptive", "AdaptiveDecision", "AdaptiveStats"]


@dataclass
class AdaptiveDecision:
    """What :class:`Adaptive` did on one step (``info.backward.decision``).

    Attributes:
        step: the estimator's step counter (calls that built a gradient), from 1.
        mode: ``"cheap"`` or ``"exact"``: the mode the estimator is in *after* this step.
        used: the estimator whose gradient this step got (``"exact"`` on every check).
        checked: whether the cheap adjoint was compared with the exact one on this batch.
        reason: why a check ran (``"scheduled"``, ``"first step"``, ``"signal: ..."``), else ``""``.
        cosine: cosine between the cheap and the exact adjoint ``w`` over the batch (checks only).
        switched: ``"to-exact"``, ``"to-cheap"`` or ``None``.
        fwd_converged: fraction of the batch whose forward solve converged (the cheap signal).
        n_fallback: SHINE's fallback count on this step (cheap SHINE steps with a fallback).
    """

    step: int
    mode: str
    used: str
    checked: bool = False
    reason: str = ""
    cosine: Optional[float] = None
    switched: Optional[str] = None
    fwd_converged: float = 1.0
    n_fallback: int = 0


@dataclass
class AdaptiveStats(BackwardStats):
    """:class:`~deqkit.estimators.BackwardStats` plus the step's :class:`AdaptiveDecision`."""

    decision: Optional[AdaptiveDecision] = None


def _cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 1.0


@register_estimator("adaptive")
@validated_options
class Adaptive(GradientEstimator):
    """Train on a cheap gradient estimator; check it against the exact one now and then, and
    switch to the exact gradient while the cheap one is poor.

    Every step the cheap estimator's own signals are read (the fraction of the batch whose
    forward solve converged; SHINE's fallback count). Every ``check_every`` steps — and at once
    when the converged fraction drops by more than ``signal_drop`` since the last check — the
    step is a *check*: the exact adjoint (:class:`~deqkit.Exact`) and the cheap adjoint are both
    computed on the current batch, the step uses the exact one, and their cosine decides:

    * in cheap mode, a cosine below ``threshold`` switches to exact mode;
    * in exact mode, a cosine at or above ``recover`` (> ``threshold``: hysteresis) switches back.

    The cosine is taken between the adjoints ``w`` (what the estimators compute) summed over the
    batch, not between parameter gradients: the estimator does not see the parameters. The
    cheap adjoint of :class:`~deqkit.Unrolled` ``(k, λ)`` is its Neumann series (equal at the
    fixed point, Geng et al., NeurIPS 2021). Each step's :class:`AdaptiveDecision` is in
    ``info.backward.decision`` (an :class:`AdaptiveStats`), the checks and switches in
    :attr:`history`, and :meth:`metrics` gives counters for training logs.

    The estimators are those of SHINE (Ramzi et al., ICLR 2022, arXiv 2106.00553), the phantom
    gradient (Geng et al., NeurIPS 2021, arXiv 2111.05177) and the implicit gradient (Bai, Kolter
    & Koltun, NeurIPS 2019); choosing between them from measured agreement is ours.

    Args:
        cheap: the cheap estimator (an :class:`AdjointEstimator` or an :class:`~deqkit.Unrolled`);
            default ``SHINE(fallback=False)`` when the forward solve returns an inverse estimate
            (Broyden; give it ``opa_freq`` for SHINE + OPA), else ``Unrolled(5, 0.5)``.
        exact: the exact estimator (default ``Exact()``).
        check_every: steps between scheduled checks (the first step is always a check).
        threshold: switch to exact below this cosine.
        recover: switch back to cheap at or above this cosine (``>= threshold``).
        signal_drop: a drop of the forward-converged fraction (since the last check) that triggers
            a check at once.
    """

    name: ClassVar[str] = "adaptive"

    def __init__(
        self,
        cheap: Optional[GradientEstimator] = None,
        exact: Optional[Exact] = None,
        *,
        check_every: int = 20,
        threshold: float = 0.95,
        recover: float = 0.99,
        signal_drop: float = 0.25,
    ) -> None:
        owner = type(self).__name__
        if cheap is not None and not isinstance(cheap, (AdjointEstimator, Unrolled)) or isinstance(cheap, Adaptive):
            raise OptionError(
                f"{owner}: cheap must be an adjoint estimator (SHINE, BroydenReuse, Neumann, ...) or Unrolled/JacobianFree, "
                f"got {type(cheap).__name__}."
            )
        if exact is not None and not isinstance(exact, Exact):
            raise OptionError(f"{owner}: exact must be an Exact estimator, got {type(exact).__name__}.")
        self.cheap = cheap
        self.exact = exact
        self._exact = Exact() if exact is None else exact
        self.check_every = check_int(owner, "check_every", check_every)
        self.threshold = check_fraction(owner, "threshold", threshold)
        self.recover = check_fraction(owner, "recover", recover)
        if self.recover < self.threshold:
            raise OptionError(
                f"{owner}: recover must be >= threshold (hysteresis), got recover={recover} < threshold={threshold}."
            )
        self.signal_drop = check_fraction(owner, "signal_drop", signal_drop)
        #: the DEQ keeps the forward inverse estimate for this estimator when the solver has one
        self.needs_inverse = cheap is None or bool(getattr(cheap, "needs_inverse", False))  # type: ignore[misc]
        self.mode = "cheap"
        self.step = 0
        #: the decisions of the steps that checked or switched
        self.history: list[AdaptiveDecision] = []
        self._last_check = 0
        self._ref_converged: Optional[float] = None
        self._exact_steps = 0
        self._shine = SHINE(fallback=False)
        self._unrolled = Unrolled(5, 0.5)

    def check_solver(self, solver: object) -> None:
        """Refuse only what the given cheap estimator refuses (the default adapts to the solver)."""
        if self.cheap is not None:
            self.cheap.check_solver(solver)

    def cheap_for(self, result: SolverResult) -> GradientEstimator:
        """The cheap estimator for this forward solve."""
        if self.cheap is not None:
            return self.cheap
        return self._shine if isinstance(result.inverse, InverseEstimate) else self._unrolled

    def metrics(self) -> dict[str, Any]:
        """Counters for training logs: mode (1 = exact), checks, switches, last cosine, share of exact steps."""
        checks = [d for d in self.history if d.checked]
        return {
            "adaptive_exact": int(self.mode == "exact"),
            "adaptive_checks": len(checks),
            "adaptive_switches": sum(d.switched is not None for d in self.history),
            "adaptive_cosine": checks[-1].cosine if checks else float("nan"),
            "adaptive_exact_share": self._exact_steps / self.step if self.step else 0.0,
        }

    # -- the step -------------------------------------------------------------------------
    def _why_check(self, fwd_converged: float) -> str:
        if self.step == 1:
            return "first step"
        if self.step - self._last_check >= self.check_every:
            return "scheduled"
        if self._ref_converged is not None and fwd_converged < self._ref_converged - self.signal_drop:
            return f"signal: forward converged {fwd_converged:.0%} (was {self._ref_converged:.0%})"
        return ""

    def attach(self, cell_fn: CellFn, result: SolverResult, info: DEQInfo) -> Tensor:
        f_out = cell_fn(result.z.detach())
        if not f_out.requires_grad:
            return result.z
        self.step += 1
        fwd_converged = float(result.converged.float().mean())
        reason = self._why_check(fwd_converged)
        cheap = self.cheap_for(result)
        decision = AdaptiveDecision(
            self.step,
            self.mode,
            "exact" if (reason or self.mode == "exact") else cheap.name,
            checked=bool(reason),
            reason=reason,
            fwd_converged=fwd_converged,
        )
        if decision.used == "exact":
            self._exact_steps += 1
        if reason:
            self._last_check, self._ref_converged = self.step, fwd_converged
        if decision.used != "exact" and isinstance(cheap, Unrolled):
            z = cheap.attach(cell_fn, result, info)
            inner = info.backward
            info.backward = AdaptiveStats(self.name, time_s=None, vjps=inner.vjps if inner else 0, decision=decision)
            return z
        use_vjp = decision.used == "exact" or bool(getattr(cheap, "uses_vjp", True))
        return self._attach_adjoint(cell_fn, f_out, result, info, cheap, decision, use_vjp)

    def _attach_adjoint(
        self,
        cell_fn: CellFn,
        f_out: Tensor,
        result: SolverResult,
        info: DEQInfo,
        cheap: GradientEstimator,
        decision: AdaptiveDecision,
        use_vjp: bool,
    ) -> Tensor:
        # as AdjointEstimator.attach: the path to θ and x from f(z*) with z* detached, VJPs on a
        # second evaluation with z requiring grad (built only when a VJP will be taken)
        shape, B = f_out.shape, f_out.shape[0]
        stats = AdaptiveStats(self.name, decision=decision)
        z_in = result.z.detach().requires_grad_()
        f_z = cell_fn(z_in) if use_vjp else None

        def vjp(u: Tensor) -> Tensor:
            assert f_z is not None
            stats.vjps += 1
            (g,) = torch.autograd.grad(f_z, z_in, u.reshape(shape), retain_graph=True)
            return g.reshape(B, -1)

        def hook(v: Optional[Tensor]) -> Optional[Tensor]:
            if v is None:
                return None
            start = time.perf_counter()
            vf = v.reshape(B, -1)
            w = overflow_guard(vf, lambda: self._w(vf, vjp, result, stats, cheap, decision))
            return finish_backward(self, w, v, shape, stats, info, start)

        f_out.register_hook(hook)
        return straight_through(result.z, f_out)

    def _w(
        self,
        vf: Tensor,
        vjp: Vjp,
        result: SolverResult,
        stats: AdaptiveStats,
        cheap: GradientEstimator,
        decision: AdaptiveDecision,
    ) -> Tensor:
        """The adjoint of one backward: the exact one (compared with the cheap one on a check) or the cheap one."""
        if decision.used == "exact":
            inner = BackwardStats(self._exact.name)
            w = self._exact.compute_w(vf, vjp, result, inner)
            stats.solve = inner.solve
            # an overflow of fp16 loss scaling (w not finite) decides nothing: the step is skipped
            if decision.checked and not (loss_scaling_active() and not bool(torch.isfinite(w).all())):
                self._decide(decision, self._cheap_w(cheap, vf, vjp, result, stats), w)
        else:
            inner = BackwardStats(cheap.name)
            assert isinstance(cheap, AdjointEstimator)
            w = cheap.compute_w(vf, vjp, result, inner)
            stats.refine, stats.n_fallback = inner.refine, inner.n_fallback
            decision.n_fallback = inner.n_fallback
        return w

    def _cheap_w(self, cheap: GradientEstimator, v: Tensor, vjp: Vjp, result: SolverResult, stats: AdaptiveStats) -> Tensor:
        """The cheap estimator's adjoint on this batch (Unrolled: its Neumann series)."""
        if isinstance(cheap, Unrolled):
            lam, term, total = cheap.damping, v, v
            for _ in range(cheap.k - 1):
                term = lam * vjp(term) + (1 - lam) * term
                total = total + term
            return lam * total
        inner = BackwardStats(cheap.name)
        assert isinstance(cheap, AdjointEstimator)
        w = cheap.compute_w(v, vjp, result, inner)
        stats.n_fallback = inner.n_fallback
        return w

    def _decide(self, decision: AdaptiveDecision, w_cheap: Tensor, w_exact: Tensor) -> None:
        """Compare on a check, switch with hysteresis, record."""
        cos = _cosine(w_cheap, w_exact)
        decision.cosine = cos
        if self.mode == "cheap" and cos < self.threshold:
            self.mode, decision.switched = "exact", "to-exact"
        elif self.mode == "exact" and cos >= self.recover:
            self.mode, decision.switched = "cheap", "to-cheap"
        decision.mode = self.mode
        self.history.append(decision)
