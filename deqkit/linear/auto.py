"""The default adjoint policy: fixed-point steps while they contract well, GMRES when they do not."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from .._options import check_fraction, check_int, validated_options
from ..errors import OptionError
from ..registry import register_linear_solver
from ..solvers.base import SolverResult
from .base import Fn, LinearSolver, _check_finite, _result
from .gmres import GMRES, KrylovRun

__all__ = ["AutoAdjoint"]


@register_linear_solver("auto")
@validated_options
class AutoAdjoint(LinearSolver):
    """Picard iteration on ``w ↦ wJ + v`` while it contracts fast, restarted GMRES when it does not.

    A Picard step costs one VJP and no bookkeeping, and from a good start (``w = v``) it converges
    at the rate ``ρ`` of ``J`` on the adjoint; GMRES (Saad & Schultz, SIAM J. Sci. Stat. Comput.
    1986) never needs more steps than Picard from the same start (its residual polynomial is
    optimal, Picard's is ``zᵏ``) but each step also orthogonalises, so it pays only when ``ρ`` is
    close to 1 — where a few slow modes dominate, which GMRES removes in a few steps. The
    iteration for the adjoint equation is that of Bai, Kolter & Koltun, "Deep Equilibrium
    Models", NeurIPS 2019.

    The policy: Picard steps from ``w0`` (default ``w = v``), each giving the residual of the
    current iterate for free; a sample stops changing at its first residual under ``tol``. A step
    is one VJP and a few elementwise operations kept on the device; the host reads the residuals
    only at checks (after the first step, after ``probe`` steps, then when the slowest active
    sample is forecast to meet ``tol`` at its current rate, at most 8 steps apart), so a step
    costs little more than its VJP. At a check, per sample, the contraction rate is read off the
    last residual ratios. When the slowest still-active sample contracts slower than
    ``switch_rate``, or its predicted Picard steps to ``tol`` exceed what is left of ``max_iter``,
    the solve hands over to GMRES, started from the current iterate with its residual already
    known (no extra VJP). ``nstep`` counts both phases per sample; ``result.extra`` records the
    phases (``"policy"``: ``"fixed-point"`` or ``"fixed-point→gmres"``), ``fixed_point_steps``,
    ``gmres_steps`` (max over samples), ``rate`` (the slowest contraction seen) and ``switched_at``.
    Missing ``tol`` is reported in ``converged`` as for any solver, never hidden.

    Args:
        tol: as every linear solver.
        max_iter: as every linear solver; counts the VJPs of both phases.
        stop_mode: as every linear solver.
        restart: GMRES's basis size.
        probe: Picard steps before the first decision (at least 1).
        switch_rate: the contraction rate above which GMRES takes over (the default was chosen
            by ``tools/bench_switch_rate.py``; its figures are in BENCHMARKS.md).

    With ``preconditioner=`` it runs GMRES directly (a right preconditioner needs a Krylov method).
    """

    name = "auto"
    accepts_preconditioner = True

    def __init__(
        self,
        *,
        tol: float = 1e-6,
        max_iter: int = 60,
        stop_mode: str = "rel",
        restart: int = 20,
        probe: int = 3,
        switch_rate: float = 0.8,
    ) -> None:
        super().__init__(tol=tol, max_iter=max_iter, stop_mode=stop_mode)
        owner = type(self).__name__
        self.restart = check_int(owner, "restart", restart)
        self.probe = check_int(owner, "probe", probe)
        self.switch_rate = check_fraction(owner, "switch_rate", switch_rate)
        self._gmres = GMRES(restart=restart, tol=tol, max_iter=max_iter, stop_mode=stop_mode)

    def _solve(
        self, vjp: Fn, v: Tensor, w0: Optional[Tensor], tol: float, max_iter: int, options: dict[str, Any]
    ) -> SolverResult:
        preconditioner = options.get("preconditioner")
        if preconditioner is not None:
            if w0 is not None:
                raise OptionError("AutoAdjoint: pass either w0 or preconditioner (a preconditioned solve starts at w = 0).")
            res = self._gmres._solve(vjp, v, None, tol, max_iter, options)
            res.solver = f"{self.name}(gmres)"
            res.extra.update(policy="gmres (preconditioned)", fixed_point_steps=0, gmres_steps=int(res.nstep.max()))
            return res
        shape, B = v.shape, v.shape[0]
        vf = v.reshape(B, -1)
        target = self._gmres.target(vf, tol)
        w = vf.clone() if w0 is None else w0.reshape(B, -1).clone()
        active = torch.ones(B, dtype=torch.bool, device=vf.device)
        trace: list[Tensor] = []
        used, rate, switched_at = 0, 0.0, None
        # Steps keep their bookkeeping on the device; the host looks (one synchronisation) only at
        # checks: after the first step (an easy or warm-started solve ends there), after the probe,
        # then when the slowest active sample is forecast to meet its target (at most _MAX_GAP on).
        next_check, checked = 1, 0
        while True:
            nxt = vf + vjp(w.view(shape)).reshape(B, -1)  # one Picard step
            used += 1
            r = nxt - w  # the residual of w, free with the step
            rn = r.norm(dim=1)
            trace.append(rn)
            active = active & (rn > target)
            if used >= next_check or used >= max_iter:
                worst_rate, worst_need = self._forecast(trace, target, active)
                recent = torch.stack(trace[checked:])
                any_active, nonfinite, worst_rate, worst_need = torch.stack(
                    [active.any().double(), (~torch.isfinite(recent).all()).double(), worst_rate, worst_need]
                ).tolist()
                checked = used
                if nonfinite:
                    _check_finite(self.name, torch.stack(trace), "residual")
                if any_active and len(trace) > 1:
                    rate = max(rate, worst_rate)
                if not any_active or used >= max_iter:
                    break
                if len(trace) > self.probe and (worst_rate > self.switch_rate or worst_need > max_iter - used):
                    switched_at = used
                    break
                next_check = self.probe + 1 if used <= self.probe else used + _gap(worst_need)
            w = torch.where(active[:, None], nxt, w)
        nstep = _steps_to_target(trace, target)
        gmres_steps = 0
        if switched_at is not None:  # GMRES from w, whose residual r is known
            op, _ = GMRES.operator(vjp, shape)
            run = KrylovRun(op, vf, target, self.restart)
            run.used = used
            w, r = run.run(w, r, max_iter)
            nstep = nstep + run.nstep
            trace.extend(run.trace[1:])
            gmres_steps = int(run.nstep.max())
            rn = r.norm(dim=1)
        policy = "fixed-point→gmres" if switched_at is not None else "fixed-point"
        res = _result(f"{self.name}({policy})", w.view(shape), vf, rn, nstep, trace, tol, self.stop_mode, max_iter)
        res.extra.update(
            policy=policy,
            fixed_point_steps=used if switched_at is None else switched_at,
            gmres_steps=gmres_steps,
            rate=rate,
            switched_at=switched_at,
        )
        return res

    def _forecast(self, trace: list[Tensor], target: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """Over the active samples: the slowest recent contraction rate and the most Picard steps
        still needed at that rate (device scalars; zero before two residuals)."""
        if len(trace) < 2:
            zero = trace[-1].new_zeros((), dtype=torch.float64)
            return zero, zero
        m = min(len(trace) - 1, 3)
        now, before = trace[-1].double(), trace[-1 - m].double()
        rate = (now / before.clamp_min(1e-300)) ** (1.0 / m)
        need = torch.log(target.double().clamp_min(1e-300) / now.clamp_min(1e-300)) / torch.log(rate.clamp(1e-12, 1 - 1e-12))
        need = torch.where(rate >= 1, torch.full_like(need, math.inf), need)
        zero = torch.zeros_like(rate)
        return torch.where(active, rate, zero).max(), torch.where(active, need, zero).max()


#: the most Picard steps between two checks
_MAX_GAP = 8


def _gap(need: float) -> int:
    """Steps to the next check: the forecast steps to the target, at least 1, at most :data:`_MAX_GAP`."""
    return int(min(_MAX_GAP, max(1, math.ceil(need)))) if math.isfinite(need) else _MAX_GAP


def _steps_to_target(trace: list[Tensor], target: Tensor) -> Tensor:
    """Per sample, the steps up to and including the first whose residual met ``target`` (all of
    them where none did)."""
    above = torch.stack(trace) > target  # (steps, B)
    return (above.long().cumprod(dim=0).sum(dim=0) + 1).clamp(max=len(trace))
