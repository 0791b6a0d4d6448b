"""The gradient-estimator protocol: how the backward pass of a DEQ replaces ``(I − J)⁻¹``.

Each estimator takes the converged solve and returns a tensor whose **value is the solver's
best iterate** ``z*`` (the same for every estimator, so estimators differ only in their
gradients) and whose autograd graph yields that estimator's gradient for the cell's
parameters and input. With ``v = ∂L/∂z*`` (rows, per sample) and ``J = ∂f/∂z`` at ``z*``:

===================================  ===========================================  ======================
estimator                            ``w`` reaching ``∂f/∂θ`` and ``∂f/∂x``        extra cost
===================================  ===========================================  ======================
:class:`~deqkit.Exact`               ``w = wJ + v`` solved by a linear solver      iterative solve (VJPs)
:class:`~deqkit.Unrolled` (UPG)      backprop through k damped steps from ``z*``   k graph evaluations
:class:`~deqkit.Neumann` (NPG)       ``λ Σ_{t<k} v (λJ + (1−λ)I)^t``                k − 1 VJPs
:class:`~deqkit.JacobianFree` (JFB)  ``v`` (exactly ``Unrolled(1, 1)``)            none
:class:`~deqkit.SHINE`               ``−vH`` from the forward inverse estimate     one low-rank product
===================================  ===========================================  ======================

Writing an estimator: subclass :class:`AdjointEstimator` and implement
:meth:`AdjointEstimator.compute_w` (``v ↦ w``), register it with
:func:`~deqkit.register_estimator`, and (optionally) give its closed form in
:meth:`GradientEstimator.adjoint_closed_form` so the conformance tests can check it.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
from torch import Tensor

from .._options import options_repr
from ..errors import NonFiniteError, OptionError
from ..inverse import InverseEstimate
from ..solvers.base import SolverResult
from ..solvers.precision import autocast_dtype

if TYPE_CHECKING:
    from ..deq import DEQInfo

__all__ = [
    "BackwardStats",
    "GradientEstimator",
    "AdjointEstimator",
    "straight_through",
    "CellFn",
    "Vjp",
    "loss_scaled_backward",
    "loss_scaling_active",
]

CellFn = Callable[[Tensor], Tensor]
Vjp = Callable[[Tensor], Tensor]


@dataclass
class BackwardStats:
    """What the backward pass of one DEQ call did (``info.backward``, filled in when ``backward`` runs).

    Attributes:
        estimator: the estimator's name.
        time_s: wall-clock seconds spent computing ``w`` (not the final VJP to the parameters;
            no device synchronisation); ``None`` for :class:`~deqkit.Unrolled`, whose ``w`` is
            autograd's pass through the unrolled graph, not a separate step.
        vjps: vector–Jacobian products spent computing ``w`` (per batch); for :class:`~deqkit.Unrolled`,
            the ``k`` graph evaluations it backpropagates through.
        solve: the adjoint solve's result, for :class:`~deqkit.Exact` (steps, residuals, converged).
        refine: SHINE's fixed-budget refinement steps (a budget, not a tolerance: its
            ``converged`` flags are not a failure).
        n_fallback: samples whose ``w`` fell back to the Jacobian-free direction ``v``: SHINE's
            fallback, and :class:`~deqkit.Exact`'s samples whose forward missed its tolerance.
        overflow: the backward met NaN/Inf inside :func:`loss_scaled_backward` and returned a
            non-finite ``w`` for the loss scaler to detect (the optimiser step is then skipped).
        amplification: the largest ``‖w‖ / ‖v‖`` over the batch: how much the backward scaled up
            the incoming gradient ``v = dL/dz*`` (``None`` without an adjoint hook, as for
            :class:`~deqkit.Unrolled` and :class:`~deqkit.JacobianFree`, or when ``w`` is
            non-finite). The exact adjoint of a cell that contracts at rate ``ρ < 1`` in norm
            gives at most ``1 / (1 − ρ)``. A large value where the forward did not converge
            means the exact gradient is dominated by the forward's error: near a non-contractive
            cell the adjoint equation is nearly singular, and it amplifies the error of ``z*``
            with the rest. Measured on the ``w`` returned, so after any fallback.
        fallback_amplification: for :class:`~deqkit.Exact`, the largest ``‖w‖ / ‖v‖`` of the
            adjoints it replaced by the Jacobian-free ``v`` (what triggered the fallback;
            ``None`` when no sample fell back).
    """

    estimator: str
    time_s: Optional[float] = 0.0
    vjps: int = 0
    solve: Optional[SolverResult] = None
    refine: Optional[SolverResult] = None
    n_fallback: int = 0
    overflow: bool = False
    amplification: Optional[float] = None
    fallback_amplification: Optional[float] = None

    @property
    def converged(self) -> Optional[Tensor]:
        """The adjoint solve's per-sample ``converged`` mask (``None`` without a solve)."""
        return None if self.solve is None else self.solve.converged


# process-wide, not thread-local: autograd runs the backward of CUDA tensors on its own device threads
_scaling_lock = threading.Lock()
_scaling_depth = 0


@contextlib.contextmanager
def loss_scaled_backward() -> Iterator[None]:
    """Declare the backward passes run inside as those of a scaled loss (fp16 ``GradScaler``).

    Dynamic loss scaling (Micikevicius et al., "Mixed Precision Training", ICLR 2018) expects
    the scaled gradient to overflow now and then: the scaler finds NaN/Inf in the gradients,
    skips that optimiser step and lowers the scale. Inside this context a DEQ's backward that
    meets NaN/Inf (in the incoming gradient ``dL/dz*``, the adjoint solve or ``w``) therefore
    does not raise :class:`~deqkit.errors.NonFiniteError`: it returns a ``w`` of NaN, which
    reaches every parameter behind the DEQ, so the scaler sees the overflow and skips the step;
    ``info.backward.overflow`` is set. Outside it, NaN/Inf in the backward raises as always.
    (:class:`~deqkit.Unrolled` and :class:`~deqkit.JacobianFree` have no adjoint hook: autograd
    carries NaN/Inf through their unrolled steps into the gradients, in or out of this context.)
    The :class:`~deqkit.train.Trainer` enters it around its scaled backward (``amp="fp16"``);
    in a loop of your own::

        with loss_scaled_backward():
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    The flag is process-wide (autograd may run the backward on a device thread).
    """
    global _scaling_depth
    with _scaling_lock:
        _scaling_depth += 1
    try:
        yield
    finally:
        with _scaling_lock:
            _scaling_depth -= 1


def loss_scaling_active() -> bool:
    """Whether a :func:`loss_scaled_backward` context is open (NaN/Inf in a backward is a scaler overflow)."""
    return _scaling_depth > 0


def overflow_guard(v: Tensor, compute: Callable[[], Tensor]) -> Tensor:
    """``compute()`` (an estimator's ``w`` for the flattened ``v``); under :func:`loss_scaled_backward`
    a :class:`~deqkit.errors.NonFiniteError` it raises becomes a ``w`` of NaN (see there)."""
    try:
        return compute()
    except NonFiniteError:
        if not loss_scaling_active():
            raise
        return torch.full_like(v, float("nan"))


def _incoming_message(owner: object) -> str:
    return (
        f"{type(owner).__name__}: the incoming gradient dL/dz* contains NaN/Inf: the loss or the layers "
        f"after the DEQ produced it (check the loss is finite; under fp16 loss scaling, run the backward inside "
        f"deqkit.estimators.loss_scaled_backward() so the scaler skips the step)."
    )


def amplification_per_sample(w: Tensor, v: Tensor) -> Tensor:
    """``‖w_i‖ / ‖v_i‖`` per sample ``(B,)`` (norms in at least float32, so half precision is safe)."""
    dt = torch.promote_types(torch.promote_types(w.dtype, v.dtype), torch.float32)
    B = w.shape[0]
    return w.reshape(B, -1).to(dt).norm(dim=1) / v.reshape(B, -1).to(dt).norm(dim=1).clamp_min(torch.finfo(dt).tiny)


def finish_backward(
    owner: object, w: Tensor, v: Tensor, shape: torch.Size, stats: BackwardStats, info: DEQInfo, start: float
) -> Tensor:
    """The end of an estimator's backward hook: ``w`` checked finite, the call timed into ``stats``
    (recorded as ``info.backward``), ``w`` returned in the shape ``shape`` and ``v``'s dtype.

    A non-finite ``w`` raises :class:`~deqkit.errors.NonFiniteError`, except under
    :func:`loss_scaled_backward`, where it is returned (as NaN) for the loss scaler to detect.
    ``stats.amplification`` gets the largest ``‖w‖ / ‖v‖`` (one host read, with the check)."""
    ratio = amplification_per_sample(w, v)
    finite, amplification = torch.stack(
        [torch.isfinite(w).all().to(ratio.dtype), ratio.max() if ratio.numel() else ratio.new_zeros(())]
    ).tolist()
    if finite:
        stats.amplification = amplification
    else:
        if loss_scaling_active():
            stats.overflow = True
            w = torch.full_like(w, float("nan"))
        elif not torch.isfinite(v).all():  # only on the error path: no extra sync otherwise
            raise NonFiniteError(_incoming_message(owner))
        else:
            raise NonFiniteError(
                f"{type(owner).__name__}: the backward pass produced NaN/Inf in the adjoint w. "
                f"Check that the forward solve converged (info.converged) and the loss is finite."
            )
    assert stats.time_s is not None
    stats.time_s += time.perf_counter() - start
    info.backward = stats
    return w.reshape(shape).to(v.dtype)


class GradientEstimator:
    """Base class. :meth:`attach` is the one call a :class:`~deqkit.DEQ` makes.

    Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019, define the implicit gradient
    the estimators approximate; see each subclass for its own paper.
    """

    #: the estimator reads the forward solver's inverse estimate ``result.inverse`` (SHINE, BroydenReuse, WarmExact)
    needs_inverse: ClassVar[bool] = False
    #: the registered name
    name: ClassVar[str] = "estimator"

    def check_solver(self, solver: object) -> None:
        """Refuse, at construction of the DEQ, a forward solver this estimator cannot use."""
        if self.needs_inverse and not getattr(solver, "keeps_inverse", False):
            raise OptionError(
                f"{type(self).__name__} reuses the forward solver's inverse-Jacobian estimate, but "
                f"{type(solver).__name__} keeps none. Use solver=Broyden(...) as the forward solver, "
                f"or choose an estimator that needs no solver state (Exact, Unrolled, Neumann, JacobianFree)."
            )

    def attach(self, cell_fn: CellFn, result: SolverResult, info: DEQInfo) -> Tensor:
        """Return ``z*`` (value of ``result.z``) carrying this estimator's gradient.

        Args:
            cell_fn: ``z ↦ f(z, x)``, evaluated with autograd on (depends on θ and x).
            result: the forward solve.
            info: the DEQ call's info; the estimator records its backward stats there.
        """
        raise NotImplementedError

    def adjoint_closed_form(self, v: Tensor, J: Tensor, inverse: Optional[Tensor] = None) -> Optional[Tensor]:
        """The ``w`` this estimator defines, from dense matrices (tests on small problems).

        Args:
            v: rows ``∂L/∂z*``, ``(B, d)``.
            J: the per-sample Jacobian ``∂f/∂z`` at ``z*``, ``(B, d, d)``.
            inverse: the forward solver's inverse estimate as a dense ``(B, d, d)`` matrix, if any.

        Returns ``None`` (the default) where the estimator has no closed form; the conformance
        tests then check only its generic properties.
        """
        return None

    def __repr__(self) -> str:
        return options_repr(self)

    @property
    def label(self) -> str:
        """A short name for tables: the class and the options that differ from their defaults.

        The options are the named parameters of the class's ``__init__`` and, while an
        ``__init__`` takes ``**kwargs`` (which it forwards), those of the next one up the MRO, so
        a subclass written ``def __init__(self, **kwargs)`` still shows its parent's options; the
        nearest class's default counts."""
        params: dict[str, inspect.Parameter] = {}
        for cls in type(self).__mro__:
            if "__init__" not in vars(cls) or cls is object:
                continue
            forwards = False
            for k, p in inspect.signature(vars(cls)["__init__"]).parameters.items():
                forwards = forwards or p.kind is p.VAR_KEYWORD
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and k != "self":
                    params.setdefault(k, p)
            if not forwards:
                break
        parts = []
        for k, p in params.items():
            if not hasattr(self, k):
                continue
            val = getattr(self, k)
            if p.default is inspect.Parameter.empty or val != p.default:
                parts.append(getattr(val, "name", None) or f"{k}={val}")
        return f"{type(self).__name__}({', '.join(parts)})" if parts else type(self).__name__


def straight_through(value: Tensor, carrier: Tensor) -> Tensor:
    """A tensor equal to ``value`` whose gradient flows unchanged into ``carrier``."""
    return value.detach() + (carrier - carrier.detach())


def forward_inverse(result: SolverResult, owner: str) -> InverseEstimate:
    """The forward solve's inverse estimate, or an :class:`~deqkit.errors.OptionError` saying which solver to use."""
    if not isinstance(result.inverse, InverseEstimate):
        raise OptionError(
            f"{owner}: the forward solve ({result.solver}) returned no inverse-Jacobian estimate; use solver=Broyden(...)."
        )
    return result.inverse


class AdjointEstimator(GradientEstimator):
    """Estimators defined by a map ``v ↦ w`` (implemented by :meth:`compute_w`) at ``z*``.

    The backward hook of Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019: the
    gradient arriving at ``f(z*, x)`` is replaced by the adjoint ``w``.

    The cell is evaluated once with a graph at ``z*``; a hook on its output replaces the
    incoming gradient ``v`` by ``w``, which autograd then pushes to θ and x.
    """

    @property
    def uses_vjp(self) -> bool:
        """Whether :meth:`compute_w` calls ``vjp`` (then a graph in ``z`` is built in the forward)."""
        return True

    def compute_w(self, v: Tensor, vjp: Vjp, result: SolverResult, stats: BackwardStats) -> Tensor:
        """``w`` for flattened row vectors ``v`` of shape ``(B, d)``; ``vjp(u) = uJ`` on ``(B, d)``."""
        raise NotImplementedError

    def attach(self, cell_fn: CellFn, result: SolverResult, info: DEQInfo) -> Tensor:
        # The path to θ and x is built with z* detached, so the final backward does not also
        # pay a VJP into z; estimators that take VJPs get a second evaluation with z requiring
        # grad (built here, in the forward, where the cell's parametrised weights are cached).
        # SHINE / BroydenReuse take none and build no z-graph. The cell must be deterministic
        # (no dropout inside it), as a fixed point requires anyway.
        f_out = cell_fn(result.z.detach())
        if not f_out.requires_grad:
            return result.z
        shape, B = f_out.shape, f_out.shape[0]
        stats = BackwardStats(self.name)
        z_in = result.z.detach().requires_grad_()
        f_z = cell_fn(z_in) if self.uses_vjp else None

        def vjp(u: Tensor) -> Tensor:
            assert f_z is not None, f"{type(self).__name__}.uses_vjp must be True to take VJPs"
            stats.vjps += 1
            (g,) = torch.autograd.grad(f_z, z_in, u.reshape(shape).to(f_z.dtype), retain_graph=True)
            return g.reshape(B, -1)

        # the VJP graph is built now: under autocast its accuracy is the autocast dtype's, whatever
        # the dtypes of its inputs and outputs (the adjoint solve's tolerance floor reads this)
        vjp.precision_dtype = autocast_dtype(z_in.device.type)  # type: ignore[attr-defined]

        def hook(v: Optional[Tensor]) -> Optional[Tensor]:
            if v is None:  # an undefined (zero) incoming gradient stays undefined
                return None
            start = time.perf_counter()
            vf = v.reshape(B, -1)
            w = overflow_guard(vf, lambda: self.compute_w(vf, vjp, result, stats))
            return finish_backward(self, w, v, shape, stats, info, start)

        f_out.register_hook(hook)  # the VJPs use their own graph, so they never re-enter this hook
        return straight_through(result.z, f_out)
