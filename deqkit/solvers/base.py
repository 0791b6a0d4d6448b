"""The forward-solver protocol and the one solve loop.

Every solver finds ``z`` with ``fn(z) = z`` for a batch of states of any shape ``(B, ...)``:

    result = solver(fn, z0)

Samples are independent: each has its own residual, best iterate and ``converged`` flag, and
the batch stops when all have converged or the iteration cap is hit. Until then every sample
keeps iterating (the map evaluates the batch whole anyway, so a converged sample's further
steps are free and only bring it closer to its fixed point); ``freeze_converged=True`` instead
freezes each sample at its first iterate under ``tol``, so its result does not depend on the
rest of the batch. The result holds the best iterate of each sample, its step count,
residual traces, a ``converged`` mask, the wall-clock time and, for a quasi-Newton solver, its
inverse-Jacobian estimate (an :class:`~deqkit.inverse.InverseEstimate`).

The residual of an iterate is ``g(z) = fn(z) − z``; ``abs`` is ``‖g‖`` and ``rel`` is
``‖g‖ / (‖fn(z)‖ + eps)``, both per sample over the flattened state. ``stop_mode`` picks which
one is compared to ``tol`` (and ranks iterates for "best").

Writing a solver
----------------
The loop (validation, flattening, stopping, best-iterate tracking, traces, the
non-finite policy, timing) is written once, in :meth:`Solver.__call__`. A solver implements
hooks on flattened ``(B, d)`` tensors, in the spirit of optimistix's init/step/terminate:

- :meth:`Solver.step` (required): the next iterate from ``z`` and ``fz = fn(z)``;
- :meth:`Solver.init` (optional): build the solver's state at the start of a call;
- :meth:`Solver.observe` (optional): see each new evaluation (e.g. a secant update);
- :meth:`Solver.terminate` (optional): which samples stop (default: residual ``<= tol``);
- :meth:`Solver.inverse` / :meth:`Solver.extras` (optional): what goes into the result.

The hooks may read ``problem.tracker`` (an :class:`~deqkit.solvers.tracking.IterateTracker`):
the current iterate's residual ``f(z) − z`` and its norms, and the best iterate so far, which
the loop computes anyway.

Per-call options
beyond ``max_iter``/``tol`` are declared in ``call_options`` (Broyden: ``inverse0``,
``loss_grad``); any other keyword is refused with a "did you mean".

    >>> @register_solver("halfway")
    ... class Halfway(Solver):
    ...     '''z ← (z + f(z)) / 2'''
    ...     def step(self, state, z, fz, active):
    ...         return 0.5 * (z + fz)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor

from .._options import check_bool, check_choice, check_int, check_positive, options_repr, unknown_option_message
from ..errors import NonFiniteError, OptionError
from ..inverse import InverseEstimate
from ..registry import SOLVERS
from ..results import ResultMixin
from .precision import autocast_dtype, coarsest, resolve_tol, state_dtype
from .tracking import IterateTracker

__all__ = ["Fn", "STOP_MODES", "NONFINITE_POLICIES", "Problem", "Solver", "SolverResult"]

Fn = Callable[[Tensor], Tensor]

STOP_MODES = ("abs", "rel")
NONFINITE_POLICIES = ("raise", "freeze")


@dataclass
class SolverResult(ResultMixin):
    """What a forward (or fixed-point adjoint) solve returns. Per-sample tensors have leading dimension ``B``.

    Attributes:
        z: best iterate per sample (lowest residual in ``stop_mode``), shape of ``z0``.
        nstep: number of residual evaluations each sample used, ``(B,)`` (the batch's step count,
            or with ``freeze_converged`` its own stop step; Broyden's line-search trials are
            counted apart, in ``extra["line_search_evals"]``).
        abs_residual, rel_residual: residuals of the returned iterate, ``(B,)``; ``residual``
            is the one compared to ``tol``.
        converged: ``(B,)`` bool, residual of the returned iterate ``<= tol``.
        abs_trace, rel_trace: residual of the current iterate at each iteration, ``(T, B)``
            (a frozen sample repeats its last value).
        tol, stop_mode, max_iter: the settings this solve ran with.
        solver: the solver's name.
        inverse: the solver's inverse-Jacobian estimate (:class:`~deqkit.inverse.InverseEstimate`;
            Broyden: :class:`~deqkit.solvers.BroydenState`), ``None`` for other solvers.
        extra: solver-specific counters (Broyden: ``n_opa``, ``line_search_evals``).
        nonfinite: ``(B,)`` bool, samples whose map returned NaN/Inf (``on_nonfinite="freeze"``).
        time_s: wall-clock seconds of the solve (``time.perf_counter``, no device synchronisation).
    """

    z: Tensor
    nstep: Tensor
    abs_residual: Tensor
    rel_residual: Tensor
    converged: Tensor
    abs_trace: Tensor
    rel_trace: Tensor
    tol: float
    stop_mode: str
    max_iter: int
    solver: str
    inverse: Optional[InverseEstimate] = None
    extra: dict = field(default_factory=dict)
    nonfinite: Optional[Tensor] = None
    time_s: Optional[float] = None

    @property
    def residual(self) -> Tensor:  # type: ignore[override]
        """The residual that was compared to ``tol`` (``abs`` or ``rel``)."""
        return self.rel_residual if self.stop_mode == "rel" else self.abs_residual

    def summary(self) -> str:
        """One line for logs and error messages: how many converged, worst residual, step range."""
        B = self.converged.numel()
        worst = float(self.residual.max()) if B else 0.0
        n_bad = 0 if self.nonfinite is None else int(self.nonfinite.sum())
        bad = f"; {n_bad} hit NaN/Inf and were frozen" if n_bad else ""
        return (
            f"{self.solver}: {B - self.n_failed}/{B} samples converged to {self.stop_mode} tol={self.tol:g} "
            f"within max_iter={self.max_iter} (worst {self.stop_mode} residual {worst:.3g}, "
            f"steps {int(self.nstep.min()) if B else 0}..{int(self.nstep.max()) if B else 0}){bad}"
        )


@dataclass
class Problem:
    """What a solver's hooks see of one call.

    Attributes:
        fn: the map on flattened states, ``(B, d) -> (B, d)`` (checks its output shape).
        shape: the caller's state shape ``(B, ...)``.
        max_iter, tol: the settings of this call.
        options: the call options the solver declared in ``call_options`` and the caller passed.
        tracker: the loop's :class:`~deqkit.solvers.tracking.IterateTracker` (read-only for the
            hooks): the residual of the current iterate and the best iterate so far, computed
            once per iteration for the loop and for the solver.
    """

    fn: Fn
    shape: torch.Size
    max_iter: int
    tol: float
    options: dict[str, Any] = field(default_factory=dict)
    tracker: Optional[IterateTracker] = None


def call_settings(owner: Any, max_iter: Optional[int], tol: Optional[float]) -> tuple[int, float]:
    """One call's ``(max_iter, tol)``: the per-call overrides (validated) or ``owner``'s own settings.

    Shared by the forward solvers and the linear (adjoint) solvers.
    """
    name = type(owner).__name__
    steps: int = owner.max_iter if max_iter is None else check_int(name, "max_iter", max_iter)
    tolerance: float = owner.tol if tol is None else check_positive(name, "tol", tol)
    return steps, tolerance


class Solver:
    """Base class of the forward fixed-point solvers (see the module docstring for the protocol).

    The batched, per-sample-stopping fixed-point solve of a deep equilibrium model (Bai, Kolter &
    Koltun, "Deep Equilibrium Models", NeurIPS 2019); the protocol follows optimistix's
    init/step/terminate (Rader, Lyons & Kidger, "Optimistix: modular optimisation in JAX and
    Equinox", 2024).

    Args:
        tol: stopping tolerance on the residual selected by ``stop_mode``.
        max_iter: cap on residual evaluations (each costs one ``fn`` call).
        stop_mode: ``"rel"`` (``‖fn(z) − z‖ / ‖fn(z)‖``) or ``"abs"`` (``‖fn(z) − z‖``).
        on_nonfinite: ``"raise"`` (default: :class:`~deqkit.errors.NonFiniteError` as soon as
            ``fn`` returns NaN/Inf for a sample) or ``"freeze"``: that sample stops at its best
            finite iterate, is marked in ``result.nonfinite`` and counts as not converged,
            while the rest of the batch goes on.
        freeze_converged: ``False`` (default): every sample keeps iterating until the whole
            batch has converged (or the cap), and returns its best iterate: at no extra cost
            (the map evaluates the batch whole) the typical sample ends well below ``tol``.
            ``True``: a sample stops changing at its first iterate under ``tol``, so its result
            and step count do not depend on the rest of the batch (the per-sample stopping of
            Bai, Kolter & Koltun's DEQ code), at the price of a less accurate typical sample.

    To solve the linear adjoint equation of the exact gradient with a forward solver, wrap it:
    :class:`deqkit.linear.FixedPointAdjoint` (``Exact(Anderson())`` does so itself).
    """

    #: whether ``result.inverse`` holds an inverse-Jacobian estimate (needed by SHINE, BroydenReuse, WarmExact)
    keeps_inverse: ClassVar[bool] = False
    #: per-call keyword options this solver accepts beyond ``max_iter`` and ``tol``
    call_options: ClassVar[tuple[str, ...]] = ()
    #: the registered name (also what ``Exact(<solver>).label`` prints)
    name: ClassVar[str] = "solver"
    #: the solver-specific remedy named when the map returns NaN/Inf (an option this solver has)
    nonfinite_advice: ClassVar[str] = "or try another solver"

    def __init__(
        self,
        *,
        tol: float = 1e-4,
        max_iter: int = 50,
        stop_mode: str = "rel",
        on_nonfinite: str = "raise",
        freeze_converged: bool = False,
    ) -> None:
        owner = type(self).__name__
        self.tol = check_positive(owner, "tol", tol)
        self.max_iter = check_int(owner, "max_iter", max_iter)
        check_choice(owner, "stop_mode", stop_mode, STOP_MODES)
        check_choice(owner, "on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        self.stop_mode = stop_mode
        self.on_nonfinite = on_nonfinite
        self.freeze_converged = check_bool(owner, "freeze_converged", freeze_converged)

    def __repr__(self) -> str:
        return options_repr(self)

    @property
    def needs_loss_grad(self) -> bool:
        """Whether the solver wants ``loss_grad=`` (``z ↦ ∇_z L``) in its call (outer-problem awareness)."""
        return False

    # -- the hooks a solver implements ------------------------------------------------------
    def init(self, problem: Problem, z: Tensor, fz: Tensor) -> Any:
        """The solver's state for this call (default: none), from the first evaluation ``fz = fn(z)``."""
        return None

    def observe(self, state: Any, z: Tensor, fz: Tensor, fresh: Tensor) -> None:
        """See a new evaluation ``fz = fn(z)``; ``fresh`` ``(B,)`` marks the samples it is new for."""

    def step(self, state: Any, z: Tensor, fz: Tensor, active: Tensor) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """The next iterate ``(B, d)``, or ``(z_next, fn(z_next))`` when the solver evaluated it already.

        Only the ``active`` samples move; the loop keeps the others where they are.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement step(state, z, fz, active)")

    def terminate(self, state: Any, measure: Tensor, tol: float) -> Tensor:
        """``(B,)`` bool: the samples that stop now (default: residual ``measure <= tol``, or NaN).

        Called once per iteration with the residual in ``stop_mode``; a sample that stops is
        frozen (with ``freeze_converged=False``, the default, none stops before all do).
        Stopping does not make a sample converged: ``result.converged`` is always "the returned
        residual ``<= tol``". Must not synchronise with the host.
        """
        return ~(measure > tol)

    def inverse(self, state: Any) -> Optional[InverseEstimate]:
        """The inverse-Jacobian estimate to return in ``result.inverse`` (default: none)."""
        return None

    def extras(self, state: Any) -> dict:
        """Solver-specific counters for ``result.extra``."""
        return {}

    # -- the loop, written once -------------------------------------------------------------
    def __call__(
        self, fn: Fn, z0: Tensor, *, max_iter: Optional[int] = None, tol: Optional[float] = None, **call_options: Any
    ) -> SolverResult:
        """Solve ``fn(z) = z`` from ``z0`` (shape ``(B, ...)``).

        Args:
            fn: the map, batch in, batch of the same shape out.
            z0: the initial state.
            max_iter, tol: override the solver's defaults for this call.
            call_options: the per-call options the solver declares in ``call_options``
                (:class:`~deqkit.solvers.Broyden`: ``inverse0``, ``loss_grad``).
        """
        return self._solve(fn, z0, max_iter=max_iter, tol=tol, options=call_options)

    def _solve(
        self,
        fn: Fn,
        z0: Tensor,
        *,
        max_iter: Optional[int],
        tol: Optional[float],
        options: dict[str, Any],
        rel_scale: Optional[Tensor] = None,
        precision_dtype: Optional[torch.dtype] = None,
    ) -> SolverResult:
        """:meth:`__call__` with ``rel_scale``: the denominators of the relative residual (adjoint solves),
        and ``precision_dtype``: the dtype whose resolution bounds the residual (adjoint solves: that of ``v``).

        The dtype policy (:mod:`deqkit.solvers.precision`): the iterates and the solver's state are
        kept in :func:`~deqkit.solvers.precision.state_dtype` (at least float32), ``fn`` is called
        with ``z0``'s dtype, and ``result.z`` has ``z0``'s dtype.
        """
        start = time.perf_counter()
        self._check_z0(z0)
        work = state_dtype(z0.dtype)
        flat_fn = self._flat_map(fn, z0.shape, z0.dtype, work)
        problem = Problem(flat_fn, z0.shape, *self._settings(max_iter, tol), self._check_call_options(options))
        floor_dtypes = [z0.dtype, precision_dtype, autocast_dtype(z0.device.type)]
        result = self._iterate(problem, z0.to(work), rel_scale if rel_scale is None else rel_scale.to(work), floor_dtypes)
        if result.z.dtype != z0.dtype:
            result.z = result.z.to(z0.dtype)
        result.time_s = time.perf_counter() - start
        return result

    def _check_z0(self, z0: Any) -> None:
        owner = type(self).__name__
        if not isinstance(z0, Tensor) or z0.dim() < 1 or z0.shape[0] == 0:
            raise OptionError(
                f"{owner}: z0 must be a tensor of shape (B, ...) with B >= 1, got {getattr(z0, 'shape', type(z0))}."
            )
        if not z0.is_floating_point():
            raise OptionError(f"{owner}: z0 must be a floating-point tensor, got {z0.dtype}.")
        if not torch.isfinite(z0).all():
            raise NonFiniteError(f"{owner}: the initial state z0 contains NaN or Inf values.")

    def _settings(self, max_iter: Optional[int], tol: Optional[float]) -> tuple[int, float]:
        return call_settings(self, max_iter, tol)

    def _check_call_options(self, options: dict[str, Any]) -> dict[str, Any]:
        valid = ("max_iter", "tol", *self.call_options)
        for name in options:
            if name not in valid:
                msg = unknown_option_message(f"{type(self).__name__}(...) call", name, valid)
                takers = _solvers_taking(name)
                if takers:
                    msg += f" ({name!r} is an option of {', '.join(takers)}.)"
                raise OptionError(msg)
        return {k: v for k, v in options.items() if v is not None}

    @staticmethod
    def _flat_map(fn: Fn, shape: torch.Size, in_dtype: Optional[torch.dtype] = None, work: Optional[torch.dtype] = None) -> Fn:
        """``fn`` on flattened states ``(B, d)`` in the working dtype ``work``; ``fn`` itself sees ``in_dtype``.

        The returned function records the dtype of ``fn``'s raw output in its ``out_dtype`` attribute.
        """
        B = shape[0]

        def flat_fn(zf: Tensor) -> Tensor:
            z = zf.view(shape)
            out = fn(z if in_dtype is None else z.to(in_dtype))
            if not isinstance(out, Tensor) or out.shape != shape:
                raise OptionError(
                    f"the function being solved returned {getattr(out, 'shape', type(out))} for a state of shape "
                    f"{tuple(shape)}; a fixed-point map (a DEQ cell f(z, x)) must return a tensor of the same shape as z."
                )
            if out.device != zf.device:
                raise OptionError(
                    f"the function being solved returned a tensor on {out.device} for a state on {zf.device}; "
                    f"the map (a DEQ cell and its parameters) and the state must be on the same device."
                )
            if not out.is_floating_point():
                raise OptionError(
                    f"the function being solved returned a {out.dtype} tensor; a fixed-point map must return floating point."
                )
            flat_fn.out_dtype = out.dtype  # type: ignore[attr-defined]
            out = out.reshape(B, -1)
            return out if work is None else out.to(work)

        return flat_fn

    def _raise_nonfinite(self, it: int, bad_mask: Tensor) -> None:
        bad = bad_mask.nonzero().flatten().tolist()
        raise NonFiniteError(
            f"{type(self).__name__}: the fixed-point map returned NaN/Inf at iteration {it} for samples "
            f"{bad[:10]}{'...' if len(bad) > 10 else ''}. Check the cell's scale and inputs (NaN/Inf in x?), lower "
            f"the learning rate, add normalisation, {self.nonfinite_advice} (or on_nonfinite='freeze' to keep the rest)."
        )

    def _iterate(
        self, problem: Problem, z0: Tensor, rel_scale: Optional[Tensor], floor_dtypes: Optional[list] = None
    ) -> SolverResult:
        B = z0.shape[0]
        z = z0.reshape(B, -1).clone()
        fz = problem.fn(z)
        # a relative tol below the resolution of the map's output (or the caller's) dtype is raised to it
        floor = coarsest(*(floor_dtypes or []), getattr(problem.fn, "out_dtype", fz.dtype))
        problem.tol = resolve_tol(self, problem.tol, self.stop_mode, floor)
        tracker = problem.tracker = IterateTracker(z, self.stop_mode, rel_scale)
        state = self.init(problem, z, fz)
        active = torch.ones(B, dtype=torch.bool, device=z.device)
        was_active: list[Tensor] = []  # per iteration; summed once at the end into nstep
        nonfinite = torch.zeros(B, dtype=torch.bool, device=z.device)
        all_active = True  # known from the last host sync: no sample has stopped yet (saves the masking)
        for it in range(problem.max_iter):
            measure, bad_mask = tracker.record(z, fz, active, all_active)
            self.observe(state, z, fz, active)
            was_active.append(active)
            stop = self.terminate(state, measure, problem.tol)
            if not self.freeze_converged:  # none stops before every active sample does
                stop = (stop if all_active else stop | ~active).all().expand_as(stop)
            active = ~stop if all_active else active & ~stop
            if self.on_nonfinite == "freeze":
                nonfinite = nonfinite | bad_mask
                active = active & ~bad_mask
            # one host sync per iteration: any sample non-finite, any left active, all still active
            n_active, n_bad = torch.stack([active, bad_mask]).sum(1).tolist()
            any_bad, any_active, all_active = n_bad > 0, n_active > 0, n_active == B
            if any_bad and self.on_nonfinite == "raise":
                self._raise_nonfinite(it, bad_mask)
            if it == problem.max_iter - 1 or not any_active:
                break
            proposal = self.step(state, z, fz, active)
            # a solver that already evaluated its proposal (a line search) hands f(z_next) back
            z_next, fz_next = proposal if isinstance(proposal, tuple) else (proposal, None)
            if all_active:
                z = z_next
                fz = problem.fn(z) if fz_next is None else fz_next
            else:
                z = torch.where(active[:, None], z_next, z)
                fz = torch.where(active[:, None], problem.fn(z) if fz_next is None else fz_next, fz)
        abs_trace, rel_trace = tracker.traces()
        return SolverResult(
            z=tracker.best_z.view(problem.shape),
            nstep=torch.stack(was_active).sum(0),
            abs_residual=tracker.best_abs,
            rel_residual=tracker.best_rel,
            converged=(tracker.best <= problem.tol) & ~nonfinite,
            nonfinite=nonfinite,
            abs_trace=abs_trace,
            rel_trace=rel_trace,
            tol=problem.tol,
            stop_mode=self.stop_mode,
            max_iter=problem.max_iter,
            solver=type(self).__name__,
            inverse=self.inverse(state),
            extra=self.extras(state),
        )


def _solvers_taking(option: str) -> list[str]:
    """Names of the registered solver classes that declare ``option`` as a call option (for error hints)."""
    return [getattr(f, "__name__", str(f)) for _, f in SOLVERS.items() if option in getattr(f, "call_options", ())]
