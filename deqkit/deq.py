"""The deep equilibrium layer: ``z* = f(z*, x)`` with a pluggable solver and gradient estimator."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._options import check_bool, check_failure_policy, check_fraction, check_int, validated_options
from .errors import NonFiniteError, OptionError, apply_failure_policy
from .estimators import BackwardStats, Exact, GradientEstimator
from .solvers import Anderson, Solver, SolverResult

__all__ = ["DEQ", "DEQInfo", "InitPolicy"]

InitPolicy = Union[str, Callable[[Any], Tensor]]


@dataclass
class DEQInfo:
    """What one DEQ call did. ``forward`` is the solve; ``backward`` is filled in by ``backward()``."""

    forward: SolverResult
    backward: Optional[BackwardStats] = None

    @property
    def nstep(self) -> Tensor:
        return self.forward.nstep

    @property
    def converged(self) -> Tensor:
        return self.forward.converged

    @property
    def abs_residual(self) -> Tensor:
        return self.forward.abs_residual

    @property
    def rel_residual(self) -> Tensor:
        return self.forward.rel_residual

    @property
    def time_s(self) -> Optional[float]:
        """Wall-clock seconds of the forward solve (no device synchronisation)."""
        return self.forward.time_s


def _requires_grad(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.requires_grad
    if isinstance(x, (list, tuple)):
        return any(_requires_grad(t) for t in x)
    if isinstance(x, dict):
        return any(_requires_grad(t) for t in x.values())
    return False


def _batch_like(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor):
        return x[0]
    if isinstance(x, dict) and x:
        return _batch_like(next(iter(x.values())))
    raise OptionError("DEQ: cannot infer the batch size, dtype and device from x; pass z0 explicitly.")


def _compute_parametrizations(module: nn.Module) -> None:
    """Evaluate every parametrised tensor once with autograd on (inside ``parametrize.cached()``)."""
    with torch.enable_grad():
        for m in module.modules():
            if parametrize.is_parametrized(m):
                for name in m.parametrizations:  # type: ignore[union-attr]  # a ModuleDict once parametrised
                    getattr(m, name)


_RUNNING_STATS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _refuse_batch_statistics(cell: nn.Module) -> None:
    """An :class:`~deqkit.errors.OptionError` for a layer whose statistics couple samples or change per call."""
    for name, m in cell.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (
            isinstance(m, _RUNNING_STATS) and getattr(m, "track_running_stats", False)
        ):
            raise OptionError(
                f"DEQ: the cell contains {type(m).__name__} at {name or '(the cell itself)'!r}: in training it "
                f"normalises with batch statistics, which couple the samples a solver treats separately, and its "
                f"running statistics would be updated at every solver iteration. Use a per-sample normalisation "
                f"(nn.LayerNorm, nn.GroupNorm), or pass check_batch_coupling=False if the layer is frozen "
                f"(eval mode, no running-stat updates)."
            )


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (or for CUDA: a CPU tensor may meet a CUDA-autocast cell)."""
    try:
        return bool(torch.is_autocast_enabled(device_type) or torch.is_autocast_enabled("cuda"))
    except (TypeError, RuntimeError):  # an older torch without the device argument, or an unknown device type
        return bool(torch.is_autocast_enabled())


def _nonfinite_samples(x: Any) -> Optional[Tensor]:
    """``(B,)`` bool: the samples of a tensor input ``x`` holding NaN/Inf (``None`` for other inputs); no host sync."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] == 0:
        return None
    return ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)


def _blame_input(x: Any, err: Optional[NonFiniteError]) -> None:
    """Re-raise a solver's NaN/Inf error as one about the data when ``x`` itself is not finite."""
    tensors = [x] if isinstance(x, Tensor) else list(x) if isinstance(x, (list, tuple)) else list(x.values()) if isinstance(x, dict) else []
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 1 and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(dim=1).nonzero().flatten().tolist()
            raise NonFiniteError(
                f"DEQ: the input x contains NaN/Inf (samples {bad[:10]}{'...' if len(bad) > 10 else ''}); the data "
                f"(or the layers before the DEQ) produced it, not the solver. Clean or filter the batch."
            ) from err


def _gradient_of(loss_fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``z ↦ ∇_z loss_fn(z)`` (for outer-problem-aware solvers)."""

    def grad(z: Tensor) -> Tensor:
        z = z.detach().requires_grad_()
        (g,) = torch.autograd.grad(loss_fn(z), z)
        return g

    return grad


@validated_options
class DEQ(nn.Module):
    """A deep equilibrium layer: returns ``z*`` with ``z* = cell(z*, x)``.

    Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.

    Args:
        cell: an ``nn.Module`` computing ``f(z, x)``; must return a tensor shaped like ``z``.
            Samples must not interact inside the cell (no batch statistics), since solvers and
            estimators treat each sample's system separately.
        solver: the forward solver (default ``Anderson(memory=6, tol=1e-4, max_iter=40)``).
        grad: the gradient estimator (default ``Exact()``).
        state_shape: per-sample shape of ``z``; ``None`` means ``z`` has the shape of ``x``.
        init: initial state policy: ``"zeros"`` or a callable ``x ↦ z0``.
        eval_max_iter: iteration cap in eval mode (default: the solver's).
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when a forward solve
            misses its tolerance; ``info.converged`` always says which samples did.
        sync_stop: in training mode under ``torch.distributed`` (world size > 1), all ranks
            agree on when the forward solve stops (:class:`~deqkit.agreement.AgreedStop`: one
            all-reduce of the active-sample count per iteration); no effect otherwise.
        sync_quorum: with ``sync_stop``, every rank stops once this fraction of the global
            batch has stopped (``1.0``: when all samples on all ranks have).
        check_batch_coupling: refuse cells that couple the samples of a batch (default ``True``):
            at construction, a layer with batch statistics or running statistics (``BatchNorm*``,
            ``SyncBatchNorm``, ``InstanceNorm*(track_running_stats=True)``), whose statistics
            would change at every solver iteration; and at the first call with two or more
            samples (training or eval, once per DEQ), a cell whose output for one sample changes
            when another sample's state changes (e.g. ``z - z.mean(0)``): the probe evaluates the
            cell twice more (under ``no_grad``, the global RNG untouched). Either raises an
            :class:`~deqkit.errors.OptionError`. ``False`` skips both checks.

    Input shapes: ``x`` (or, for a tuple/dict input, its first tensor) and ``z`` must have a
    leading batch dimension. A 1-D ``x`` is refused unless ``z0`` is given: ``(8,)`` could be one
    sample of 8 features or 8 scalar samples; write ``x[None]`` or ``x[:, None]``. A given ``z0``
    (or the ``init`` callable's output) must have ``x``'s batch size, ``(B, *state_shape)`` when
    ``state_shape`` is set, a floating dtype and ``x``'s device; a floating ``x`` whose dtype
    differs from the cell's parameters (outside autocast) is refused before any solve. NaN/Inf in
    a tensor ``x`` raises a :class:`~deqkit.errors.NonFiniteError` naming the samples (even where
    the cell would saturate them to a finite output); with a solver's ``on_nonfinite="freeze"``
    those samples are instead marked in ``info.forward.nonfinite`` and not converged.

    ``forward(x, z0=None, loss_fn=None)`` returns ``(z, info)`` (:class:`DEQInfo`). The forward
    solver's inverse estimate (Broyden's ``H``) is kept in ``info.forward.inverse`` only when the
    estimator reuses it (``grad.needs_inverse``: SHINE, BroydenReuse, WarmExact).
    """

    def __init__(
        self,
        cell: nn.Module,
        solver: Optional[Solver] = None,
        grad: Optional[GradientEstimator] = None,
        *,
        state_shape: Optional[Sequence[int]] = None,
        init: InitPolicy = "zeros",
        eval_max_iter: Optional[int] = None,
        on_failure: str = "warn",
        sync_stop: bool = False,
        sync_quorum: float = 1.0,
        check_batch_coupling: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(cell, nn.Module):
            raise OptionError(
                f"DEQ: cell must be an nn.Module computing f(z, x) (so its parameters are seen and get gradients), "
                f"got {type(cell).__name__}. Wrap a function in an nn.Module that owns its parameters."
            )
        solver = Anderson(memory=6, tol=1e-4, max_iter=40) if solver is None else solver
        grad = Exact() if grad is None else grad
        if not isinstance(solver, Solver):
            raise OptionError(f"DEQ: solver must be a deqkit forward solver (FixedPoint, Anderson, Broyden), got {type(solver).__name__}.")
        if not isinstance(grad, GradientEstimator):
            raise OptionError(
                f"DEQ: grad must be a gradient estimator (Exact, Unrolled, Neumann, JacobianFree, SHINE, BroydenReuse), "
                f"got {type(grad).__name__}."
            )
        grad.check_solver(solver)
        if not (init == "zeros" or callable(init)):
            raise OptionError(f"DEQ: init must be 'zeros' or a callable x -> z0, got {init!r}.")
        if eval_max_iter is not None:
            check_int("DEQ", "eval_max_iter", eval_max_iter)
        on_failure = check_failure_policy("DEQ", on_failure)
        self.cell = cell
        self.solver = solver
        self.grad = grad
        self.state_shape = None if state_shape is None else tuple(int(s) for s in state_shape)
        self.init = init
        self.eval_max_iter = eval_max_iter
        self.on_failure = on_failure
        self._warned_no_opa = False
        self.sync_stop = check_bool("DEQ", "sync_stop", sync_stop)
        self.sync_quorum = check_fraction("DEQ", "sync_quorum", sync_quorum)
        self.check_batch_coupling = check_bool("DEQ", "check_batch_coupling", check_batch_coupling)
        self._coupling_probed = False
        if self.check_batch_coupling:
            _refuse_batch_statistics(cell)

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, grad={self.grad!r}, state_shape={self.state_shape}"

    def initial_state(self, x: Any) -> Tensor:
        """``z0`` for input ``x`` under the ``init`` policy (zeros: ``state_shape``, else ``x``'s shape)."""
        if callable(self.init):
            return self.init(x)
        ref = _batch_like(x)
        dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
        shape = ref.shape if self.state_shape is None else (ref.shape[0], *self.state_shape)
        return ref.new_zeros(shape, dtype=dtype)

    def forward(
        self, x: Any, z0: Optional[Tensor] = None, loss_fn: Optional[Callable[[Tensor], Tensor]] = None
    ) -> tuple[Tensor, DEQInfo]:
        """Solve for ``z*`` and attach the gradient estimator.

        Args:
            x: the input injection (a tensor, or a tuple/dict of tensors the cell understands).
            z0: initial state (default: the ``init`` policy).
            loss_fn: ``z ↦`` scalar training loss. Used, in training mode only, by a forward
                solver with outer-problem awareness (``Broyden(opa_freq=k)``); ignored otherwise.
        """
        given_z0 = z0 is not None
        self._check_input(x, given_z0)
        z0 = self.initial_state(x) if z0 is None else z0
        self._check_state(x, z0, given_z0)
        max_iter = self.eval_max_iter if (not self.training and self.eval_max_iter is not None) else None
        wants_loss = self.training and self.solver.needs_loss_grad
        call_options: dict[str, Any] = {"loss_grad": _gradient_of(loss_fn)} if wants_loss and loss_fn is not None else {}
        if wants_loss and loss_fn is None and not self._warned_no_opa:
            warnings.warn(
                "DEQ: the solver has opa_freq set but forward() got no loss_fn, so no outer-problem-aware "
                "updates are made. Pass loss_fn=... (DEQClassifier does when given target=...).",
                UserWarning,
                stacklevel=2,
            )
            self._warned_no_opa = True
        # Parametrised weights (spectral/weight norm) are computed once for the whole call, so the
        # map being solved does not change between iterations (spectral norm's power iteration would).
        with parametrize.cached():
            _compute_parametrizations(self.cell)  # cached with their graph, before the no-grad solve
            with torch.no_grad():
                if self.check_batch_coupling and not self._coupling_probed:
                    self._probe_batch_coupling(x, z0)
                bad_x = _nonfinite_samples(x)  # NaN/Inf in the data: an error, or recorded under "freeze"
                freeze = getattr(self.solver, "on_nonfinite", "raise") == "freeze"
                if bad_x is not None and not freeze and bool(bad_x.any()):
                    _blame_input(x, None)
                try:
                    result = self._forward_solver()(lambda z: self.cell(z, x), z0, max_iter=max_iter, **call_options)
                except NonFiniteError as err:
                    _blame_input(x, err)
                    raise
                if bad_x is not None and freeze and bad_x.shape == result.converged.shape:
                    result.nonfinite = bad_x if result.nonfinite is None else result.nonfinite | bad_x
                    result.converged = result.converged & ~bad_x
            return self._finish(x, result)

    def _forward_solver(self) -> Solver:
        """The solver of this call: wrapped in a cross-rank stop agreement when ``sync_stop`` applies."""
        if not (self.sync_stop and self.training):
            return self.solver
        from .agreement import AgreedStop, distributed_world

        if distributed_world() <= 1:
            return self.solver
        return AgreedStop(self.solver, quorum=self.sync_quorum)

    # -- input checks ---------------------------------------------------------------------------
    def _check_input(self, x: Any, given_z0: bool) -> None:
        """A 1-D (or 0-d) ``x`` has no batch dimension to speak of, unless ``z0`` defines the batch."""
        if not isinstance(x, Tensor):
            return
        if x.dim() == 0 or (x.dim() == 1 and not given_z0):
            raise OptionError(
                f"DEQ: x has shape {tuple(x.shape)}, which has no batch dimension: the DEQ would solve "
                f"{'nothing' if x.dim() == 0 else f'{x.shape[0]} separate scalar samples'}. Add one: x[None] for one "
                f"sample{'' if x.dim() == 0 else f' of {x.shape[0]} features, or x[:, None] for {x.shape[0]} samples of one feature'} "
                f"(or pass z0 of shape (B, ...) to fix the batch explicitly)."
            )
        if x.is_floating_point() and not _autocast_on(x.device.type):
            dtypes = {p.dtype for p in self.cell.parameters() if p.is_floating_point()}
            if len(dtypes) == 1 and x.dtype not in dtypes:
                (pd,) = dtypes
                raise OptionError(
                    f"DEQ: x has dtype {x.dtype} but the cell's parameters are {pd}; convert one "
                    f"(x.to({pd}) or cell.to({x.dtype})), or run under torch.autocast for mixed precision."
                )
        devices = {p.device for p in self.cell.parameters()}
        if len(devices) == 1 and x.device not in devices:
            raise OptionError(
                f"DEQ: x is on {x.device} but the cell's parameters are on {next(iter(devices))}; move one "
                f"(x.to(device) or model.to(device))."
            )

    def _check_state(self, x: Any, z0: Any, given_z0: bool) -> None:
        """``z0`` (given or from ``init``) against ``x``'s batch size and device and ``state_shape``."""
        if not isinstance(z0, Tensor):
            return  # structured states are checked by the solver
        source = "z0" if given_z0 else "the init policy's z0"
        if z0.dim() == 0:
            raise OptionError(f"DEQ: {source} must have a batch dimension (B, ...), got a 0-d tensor.")
        if not z0.is_floating_point():
            raise OptionError(f"DEQ: {source} must be a floating-point tensor, got {z0.dtype}.")
        if self.state_shape is not None and tuple(z0.shape[1:]) != self.state_shape:
            raise OptionError(
                f"DEQ: {source} has shape {tuple(z0.shape)} but state_shape={self.state_shape} asks for "
                f"(B, {', '.join(map(str, self.state_shape))})."
            )
        ref = x if isinstance(x, Tensor) else None
        if ref is not None and ref.dim() >= 1:
            if z0.shape[0] != ref.shape[0]:
                raise OptionError(
                    f"DEQ: {source} has batch size {z0.shape[0]} (shape {tuple(z0.shape)}) but x has {ref.shape[0]} "
                    f"(shape {tuple(ref.shape)}); both need the batch as their first dimension."
                )
            if z0.device != ref.device:
                raise OptionError(f"DEQ: {source} is on {z0.device} but x is on {ref.device}; put them on one device.")

    def _probe_batch_coupling(self, x: Any, z0: Any) -> None:
        """Raise if the cell's output for one sample depends on another sample's state (see ``check_batch_coupling``)."""
        if not isinstance(z0, Tensor) or z0.dim() < 1 or z0.shape[0] < 2:
            return  # one sample: nothing to compare; probed at the first call with two or more
        self._coupling_probed = True
        devices = [z0.device] if z0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            base = self.cell(z0, x)
            # a deterministic, non-constant change of sample 0's state
            bump = torch.linspace(0.5, 1.5, z0[0].numel(), dtype=z0.dtype, device=z0.device).view(z0[0].shape)
            moved = z0.clone()
            moved[0] = moved[0] + bump * (1 + z0[0].abs().max())
            other = self.cell(moved, x)
        if not isinstance(base, Tensor) or not isinstance(other, Tensor) or base.shape != z0.shape or other.shape != z0.shape:
            return  # the solver reports a wrong output shape with its own message
        diff = (other[1:] - base[1:]).abs().reshape(z0.shape[0] - 1, -1).amax(dim=1)
        scale = base[1:].abs().reshape(z0.shape[0] - 1, -1).amax(dim=1) + 1
        slack = 64 * torch.finfo(base.dtype).eps * scale
        changed = (diff > slack).nonzero().flatten()
        if changed.numel():
            idx = (changed + 1).tolist()
            raise OptionError(
                f"DEQ: the cell mixes the samples of a batch: changing sample 0's state changed the cell's output "
                f"for samples {idx[:8]}{'...' if len(idx) > 8 else ''} (by up to {float(diff.max()):.3g}). Solvers and "
                f"gradient estimators treat each sample's fixed point separately (per-sample stopping and "
                f"residuals), so results would be wrong. Use per-sample operations (LayerNorm/GroupNorm instead "
                f"of batch statistics, no z.mean(0)); a random cell (dropout) also fails this check. Pass "
                f"check_batch_coupling=False to skip it."
            )

    def _finish(self, x: Any, result: SolverResult) -> tuple[Tensor, DEQInfo]:
        if not self.grad.needs_inverse:
            result.inverse = None  # Broyden's U, V would otherwise live until backward (MBs per batch)
        info = DEQInfo(result)
        if not result.all_converged and self.on_failure != "ignore":
            msg = f"DEQ forward: {result.summary()}. Raise max_iter, loosen tol, or check the cell is contractive."
            apply_failure_policy(self.on_failure, msg, stacklevel=4)  # the caller of DEQ.forward
        needs_grad = torch.is_grad_enabled() and (_requires_grad(x) or any(p.requires_grad for p in self.cell.parameters()))
        if not needs_grad:
            return result.z, info
        return self.grad.attach(lambda z: self.cell(z, x), result, info), info
