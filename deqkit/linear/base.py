"""The linear-solver protocol for the adjoint equation of the exact implicit gradient.

The exact gradient needs ``w`` with ``w = wJ + v`` (``J = ∂f/∂z`` at ``z*``, ``v = ∂L/∂z*``,
row vectors), i.e. ``w (I − J) = v``. Only vector–Jacobian products ``u ↦ uJ`` are available.

Every adjoint solver is a :class:`LinearSolver` with one call::

    result = linear_solver.solve_adjoint(vjp, v, w0=None, tol=None, max_iter=None,
                                         preconditioner=None, inverse=None)

- :class:`~deqkit.linear.GMRES` (Krylov, per sample, restarted; accepts a ``preconditioner``),
- :class:`~deqkit.linear.Dense` (builds ``J``; tests and tiny states),
- :class:`~deqkit.linear.FixedPointAdjoint` (any forward solver of :mod:`deqkit.solvers` on the
  fixed point ``w ↦ wJ + v``; with Broyden it accepts an ``inverse`` estimate).

Capabilities are flags, not types: ``accepts_preconditioner`` and ``accepts_inverse`` say which
options a solver takes (passing one it does not take is an :class:`~deqkit.errors.OptionError`).

One residual for every adjoint solve: the relative residual is ``‖w − wJ − v‖ / ‖v‖`` (``abs``:
``‖w − wJ − v‖``). Every solve returns a :class:`~deqkit.solvers.SolverResult` whose ``z`` is ``w``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from .._options import check_choice, check_int, check_positive, options_repr, validated_options
from ..errors import NonFiniteError, OptionError
from ..inverse import InverseEstimate
from ..solvers.base import STOP_MODES, SolverResult, call_settings
from ..solvers.precision import autocast_dtype, coarsest, resolve_tol, state_dtype

__all__ = ["Fn", "LinearSolver"]

Fn = Callable[[Tensor], Tensor]


def _result(
    name: str,
    w: Tensor,
    v: Tensor,
    res: Tensor,
    nstep: Tensor,
    trace: list[Tensor],
    tol: float,
    stop_mode: str,
    max_iter: int,
    *,
    start: Optional[float] = None,
) -> SolverResult:
    """The :class:`~deqkit.solvers.SolverResult` of an adjoint solve from its absolute residuals.

    ``v`` is the flattened right-hand side ``(B, d)``; ``res`` and ``trace`` are absolute
    residuals ``‖w − wJ − v‖``; ``start`` is the ``time.perf_counter()`` at the solve's start.
    """
    vnorm = v.norm(dim=1)
    eps = torch.finfo(v.dtype).eps
    rel = res / (vnorm + eps)
    measure = rel if stop_mode == "rel" else res
    abs_trace = torch.stack(trace) if trace else res[None]
    return SolverResult(
        z=w,
        nstep=nstep,
        abs_residual=res,
        rel_residual=rel,
        converged=measure <= tol,
        abs_trace=abs_trace,
        rel_trace=abs_trace / (vnorm + eps),
        tol=tol,
        stop_mode=stop_mode,
        max_iter=max_iter,
        solver=name,
        time_s=None if start is None else time.perf_counter() - start,
    )


def _check_finite(name: str, t: Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(
            f"{name}: the adjoint solve produced NaN/Inf ({what}). The Jacobian at the fixed point may be "
            f"ill-conditioned (spectral radius ≥ 1): check that the forward solve converged."
        )


class LinearSolver:
    """Base class of the adjoint solvers: :meth:`solve_adjoint` is the one call.

    The adjoint equation is that of the implicit function theorem as used for DEQs by Bai,
    Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019; for the Krylov methods see Saad,
    "Iterative Methods for Sparse Linear Systems", SIAM 2003.

    Subclasses set ``name`` and the capability flags, and implement :meth:`_solve` (the
    validated settings in, a result from :func:`_result` out); :meth:`solve_adjoint` checks the
    options against the flags, applies the overrides and times the call.
    """

    name: ClassVar[str] = "linear"
    #: whether :meth:`solve_adjoint` takes ``preconditioner=`` (a map ``y ↦ y M ≈ y (I − J)⁻¹``)
    accepts_preconditioner: ClassVar[bool] = False
    #: whether :meth:`solve_adjoint` takes ``inverse=`` (an :class:`~deqkit.inverse.InverseEstimate` of
    #: the adjoint system's ``(Jᵀ − I)⁻¹`` to start from)
    accepts_inverse: ClassVar[bool] = False
    #: whether the solver handles only symmetric positive-definite systems ``I − J`` (conjugate
    #: gradients); the conformance tests then give it a symmetric ``J``
    requires_symmetric: ClassVar[bool] = False

    def __init__(self, *, tol: float, max_iter: int, stop_mode: str) -> None:
        owner = type(self).__name__
        self.tol = check_positive(owner, "tol", tol)
        self.max_iter = check_int(owner, "max_iter", max_iter)
        check_choice(owner, "stop_mode", stop_mode, STOP_MODES)
        self.stop_mode = stop_mode

    def __repr__(self) -> str:
        return options_repr(self)

    @validated_options
    def solve_adjoint(
        self,
        vjp: Fn,
        v: Tensor,
        *,
        w0: Optional[Tensor] = None,
        tol: Optional[float] = None,
        max_iter: Optional[int] = None,
        preconditioner: Optional[Fn] = None,
        inverse: Optional[InverseEstimate] = None,
    ) -> SolverResult:
        """Solve ``w = vjp(w) + v`` for rows ``w`` shaped like ``v`` (``vjp(w) = wJ``).

        Args:
            vjp: ``u ↦ uJ`` on tensors shaped like ``v``.
            v: the right-hand side ``∂L/∂z*``, ``(B, ...)``.
            w0: the initial guess (default: the solver's own start).
            tol: overrides the solver's own tolerance for this call.
            max_iter: overrides the solver's own iteration cap for this call.
            preconditioner: only where ``accepts_preconditioner``.
            inverse: only where ``accepts_inverse``.

        The result's ``z`` is ``w``; its relative residual is ``‖w − wJ − v‖ / ‖v‖``; its
        ``time_s`` the wall-clock of the whole call.
        """
        start = time.perf_counter()
        self._refuse_options(preconditioner, inverse)
        tol, max_iter = self._settings(tol, max_iter)
        v, w0 = self._check_operands(v, w0)
        # the dtype policy (deqkit.solvers.precision): the solve runs in at least float32, the VJP
        # sees v's dtype, w comes back in v's dtype; a relative tol below the resolution of v (or of
        # the VJP's autocast dtype) is raised to it
        # (an estimator's VJP records the autocast dtype its graph was built under in ``vjp.precision_dtype``)
        floor = coarsest(v.dtype, getattr(vjp, "precision_dtype", None), autocast_dtype(v.device.type))
        tol = resolve_tol(self, tol, self.stop_mode, floor, what="the gradient")
        in_dtype, work = v.dtype, state_dtype(v.dtype)
        if work != in_dtype:
            vjp = self._promoted(vjp, v.shape, in_dtype, work)
            v = v.to(work)
            w0 = None if w0 is None else w0.to(work)
        options = {k: o for k, o in (("preconditioner", preconditioner), ("inverse", inverse)) if o is not None}
        result = self._solve(vjp, v, w0, tol, max_iter, options)
        if result.z.dtype != in_dtype:
            result.z = result.z.to(in_dtype)
        result.time_s = time.perf_counter() - start
        return result

    def _check_operands(self, v: Any, w0: Any) -> tuple[Tensor, Optional[Tensor]]:
        """One clear error for a right-hand side or initial guess of the wrong kind, shape, dtype or device."""
        owner = f"{type(self).__name__}.solve_adjoint"
        if not isinstance(v, Tensor) or v.dim() < 1 or v.shape[0] == 0 or not v.is_floating_point():
            raise OptionError(
                f"{owner}: v must be a floating-point tensor of shape (B, ...) with B >= 1, got "
                f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}."
            )
        if not torch.isfinite(v).all():
            raise NonFiniteError(
                f"{owner}: the right-hand side v (the incoming gradient dL/dz*) contains NaN/Inf; the loss or the "
                f"layers after the DEQ produced it."
            )
        if w0 is not None:
            if not isinstance(w0, Tensor) or w0.shape != v.shape:
                raise OptionError(
                    f"{owner}: w0 must have the shape of v {tuple(v.shape)}, got {tuple(getattr(w0, 'shape', ()))}."
                )
            if w0.device != v.device:
                raise OptionError(f"{owner}: w0 is on {w0.device} but v is on {v.device}; put them on one device.")
            w0 = w0.to(v.dtype)
        return v, w0

    @staticmethod
    def _promoted(vjp: Fn, shape: torch.Size, in_dtype: torch.dtype, work: torch.dtype) -> Fn:
        """``vjp`` called in ``in_dtype``, its output in the working dtype ``work``."""

        def wrapped(u: Tensor) -> Tensor:
            return vjp(u.to(in_dtype)).to(work)

        return wrapped

    def _solve(
        self, vjp: Fn, v: Tensor, w0: Optional[Tensor], tol: float, max_iter: int, options: dict[str, Any]
    ) -> SolverResult:
        """The solve itself, with validated settings; ``options`` holds the accepted per-call options given."""
        raise NotImplementedError(f"{type(self).__name__} must implement _solve (or override solve_adjoint)")

    # -- helpers for subclasses -------------------------------------------------------------
    def _settings(self, tol: Optional[float], max_iter: Optional[int]) -> tuple[float, int]:
        """This call's ``(tol, max_iter)``: the overrides (validated) or the solver's own."""
        steps, tolerance = call_settings(self, max_iter, tol)
        return tolerance, steps

    def _refuse_options(self, preconditioner: Any = None, inverse: Any = None) -> None:
        """An :class:`~deqkit.errors.OptionError` for a per-call option this solver does not take."""
        for opt, val, ok in (
            ("preconditioner", preconditioner, self.accepts_preconditioner),
            ("inverse", inverse, self.accepts_inverse),
        ):
            if val is not None and not ok:
                raise OptionError(
                    f"{type(self).__name__}.solve_adjoint does not take {opt}= (accepts_{opt} is False); "
                    f"use a linear solver that does (preconditioner: GMRES; inverse: FixedPointAdjoint(Broyden(...)))."
                )
