"""The deep equilibrium layer: ``z* = f(z*, x)`` with a pluggable solver and gradient estimator."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union, cast

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
    #: Hutchinson estimate of ``‖∂f/∂z‖²_F / d`` at ``z*`` with its graph (training, when the
    #: DEQ's ``jac_reg`` fired this call; add ``weight · jac_loss`` to the loss), else ``None``
    jac_loss: Optional[Tensor] = None
    #: the value of that estimate (or a one-probe estimate when ``spectral_radius_iters`` is set), a float
    jac_fro: Optional[float] = None
    #: per-sample spectral radius of ``∂f/∂z`` at ``z*`` by power iteration (``spectral_radius_iters > 0``)
    spectral_radius: Optional[Tensor] = None
    #: detached solver iterates, flat ``(B, d)`` each, oldest first, the returned ``z*`` last
    #: (``keep_iterates > 0``), for :func:`deqkit.regularizers.fixed_point_correction`
    iterates: Optional[list] = None
    #: ``z ↦ f(z, x)`` on flat ``(B, d)`` states of this call (``None`` when not needed)
    cell_fn: Optional[Callable[[Tensor], Tensor]] = None
    #: flat ``(B, d)`` state ↦ the cell's state structure (tensor or tuple/list of tensors)
    unpack: Optional[Callable[[Tensor], Any]] = None
    #: this call ran unrolled (``unrolled_depth``: backprop through plain iterations), not a solve
    unrolled: bool = False

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
    tensors = (
        [x]
        if isinstance(x, Tensor)
        else list(x)
        if isinstance(x, (list, tuple))
        else list(x.values())
        if isinstance(x, dict)
        else []
    )
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


class StatePacker:
    """Packs a tuple/list of per-sample tensors ``(B, ...)`` into one flat ``(B, d)`` state and back.

    Every solver, estimator (SHINE/OPA included) and diagnostic works on the flat state; the cell
    sees the structure it returned (a multiscale cell's one tensor per resolution).
    """

    def __init__(self, like: Union[tuple, list]) -> None:
        if not like or not all(isinstance(t, Tensor) for t in like):
            raise OptionError("DEQ: a tuple/list state must be a non-empty sequence of tensors (B, ...).")
        B = like[0].shape[0]
        if any(t.dim() < 1 or t.shape[0] != B for t in like):
            raise OptionError(
                f"DEQ: every tensor of a tuple state needs the same batch size; got shapes {[tuple(t.shape) for t in like]}."
            )
        if len({t.dtype for t in like}) != 1:
            raise OptionError(f"DEQ: every tensor of a tuple state needs the same dtype; got {[t.dtype for t in like]}.")
        self.kind = type(like)
        self.shapes = [tuple(t.shape[1:]) for t in like]
        self.sizes = [max(1, int(torch.Size(s).numel())) if s else 1 for s in self.shapes]

    def pack(self, zs: Any) -> Tensor:
        if not isinstance(zs, (tuple, list)) or len(zs) != len(self.shapes):
            raise ValueError(
                f"DEQ: the cell must return a tuple/list of {len(self.shapes)} tensors like its state, got {type(zs).__name__}."
            )
        for t, shape in zip(zs, self.shapes):
            if tuple(t.shape[1:]) != shape:
                raise ValueError(
                    f"DEQ: the cell returned a state part of shape {tuple(t.shape)}; expected (B, {', '.join(map(str, shape))})."
                )
        return torch.cat([t.reshape(t.shape[0], -1) for t in zs], dim=1)

    def unpack(self, z: Tensor) -> Any:
        parts = torch.split(z, self.sizes, dim=1)
        return self.kind(p.reshape(z.shape[0], *s) for p, s in zip(parts, self.shapes))


def _per_call_reset(module: nn.Module) -> None:
    """Tell per-call modules (variational dropout) that a new DEQ call starts."""
    for m in module.modules():
        hook = getattr(m, "reset_per_call", None)
        if callable(hook):
            hook()


class _IterateRecorder:
    """Keeps at most ``2n`` evenly spaced inputs of the map (every ``stride``-th call, the stride
    doubling when full), so memory stays bounded whatever the number of iterations."""

    def __init__(self, n: int) -> None:
        self.n, self.stride, self.count = n, 1, 0
        self.kept: list[Tensor] = []

    def __call__(self, z: Tensor) -> None:
        if self.count % self.stride == 0:
            self.kept.append(z.detach().clone())
            if len(self.kept) >= 2 * self.n:
                self.kept = self.kept[::2]
                self.stride *= 2
        self.count += 1

    def select(self, z_star: Tensor) -> list:
        """``n`` iterates, evenly spaced over the solve, the last one ``z*``."""
        pool = [*self.kept[1:], z_star.detach()]  # z0 is not an iterate of the solve
        if len(pool) <= self.n:
            return pool
        idx = torch.linspace(0, len(pool) - 1, self.n).round().long().tolist()
        return [pool[i] for i in idx]


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
        jac_reg: a :class:`~deqkit.regularizers.JacobianRegularizer`: in training, on the
            fraction ``jac_reg.freq`` of calls, ``info.jac_loss`` holds the Hutchinson estimate of
            ``‖∂f/∂z‖²_F / d`` at ``z*`` with its graph (Bai, Koltun & Kolter, "Stabilizing
            Equilibrium Models by Jacobian Regularization", ICML 2021).
        spectral_radius_iters: when ``> 0``, every call reports ``info.spectral_radius`` (power
            iteration with this many VJPs) and a one-probe ``info.jac_fro`` (monitoring; no graph).
        keep_iterates: when ``> 0``, ``info.iterates`` holds that many detached solver iterates,
            evenly spaced, ``z*`` last (for fixed-point correction).
        random_max_iter: ``(low, high)``: in training, each call's iteration cap is drawn
            uniformly from ``[low, high]`` (from ``decision_generator``, see below).
        unrolled_depth: when set, training-mode calls do not solve: they return ``f`` iterated
            this many times from ``z0`` with the full autograd graph (unrolled pre-training);
            ``info.forward`` reports the residual of the last iterate. Set it back to ``None``
            to switch to the implicit gradient.

    The training-time random decisions (the ``random_max_iter`` cap, whether ``jac_reg`` fires)
    are drawn from the attribute ``decision_generator`` (a ``torch.Generator``), or from torch's
    global generator while it is ``None`` (the default; seeded runs repeat). :class:`~deqkit.train.Trainer`
    and :class:`~deqkit.train.distributed.DistributedTrainer` set it, for each step only, to
    :func:`~deqkit.train.checkpoint.step_generator` ``(seed, global_step)``: every rank of a
    data-parallel run then takes the same decisions, and a resumed run those of an uninterrupted one.

    States may be tensors or tuples/lists of tensors (one per resolution of a multiscale cell):
    the DEQ packs a tuple into one flat ``(B, d)`` state for the solver and the estimator and
    unpacks it for the cell, and returns ``z`` with the structure of ``z0``. With the
    ``"zeros"`` init give ``state_shape`` as a tuple of per-sample shapes.

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
        jac_reg: Optional[Any] = None,
        spectral_radius_iters: int = 0,
        keep_iterates: int = 0,
        random_max_iter: Optional[Sequence[int]] = None,
        unrolled_depth: Optional[int] = None,
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
            raise OptionError(
                f"DEQ: solver must be a deqkit forward solver (FixedPoint, Anderson, Broyden), got {type(solver).__name__}."
            )
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
        self.state_shape = None if state_shape is None else _state_shape(state_shape)
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
        self._set_stabilisers(jac_reg, spectral_radius_iters, keep_iterates, random_max_iter, unrolled_depth)
        #: draws the training-time decisions (the ``random_max_iter`` cap, whether ``jac_reg``
        #: fires); ``None``: torch's global generator. The trainers set it to the step's generator.
        self.decision_generator: Optional[torch.Generator] = None

    def _set_stabilisers(
        self,
        jac_reg: Any,
        spectral_radius_iters: int,
        keep_iterates: int,
        random_max_iter: Optional[Sequence[int]],
        unrolled_depth: Optional[int],
    ) -> None:
        from .regularizers import JacobianRegularizer

        if jac_reg is not None and not isinstance(jac_reg, JacobianRegularizer):
            raise OptionError(
                f"DEQ: jac_reg must be a deqkit.regularizers.JacobianRegularizer or None, got {type(jac_reg).__name__}."
            )
        self.jac_reg = jac_reg
        self.spectral_radius_iters = check_int("DEQ", "spectral_radius_iters", spectral_radius_iters, minimum=0)
        self.keep_iterates = check_int("DEQ", "keep_iterates", keep_iterates, minimum=0)
        if random_max_iter is not None:
            if not isinstance(random_max_iter, (tuple, list)) or len(random_max_iter) != 2:
                raise OptionError(f"DEQ: random_max_iter must be a pair (low, high) of iteration caps, got {random_max_iter!r}.")
            lo = check_int("DEQ", "random_max_iter[0]", random_max_iter[0])
            hi = check_int("DEQ", "random_max_iter[1]", random_max_iter[1])
            if lo > hi:
                raise OptionError(f"DEQ: random_max_iter must have low <= high, got {random_max_iter!r}.")
            random_max_iter = (lo, hi)
        self.random_max_iter = random_max_iter
        self.unrolled_depth = None if unrolled_depth is None else check_int("DEQ", "unrolled_depth", unrolled_depth)

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, grad={self.grad!r}, state_shape={self.state_shape}"

    def initial_state(self, x: Any) -> Any:
        """``z0`` for input ``x`` under the ``init`` policy (zeros: ``state_shape``, else ``x``'s shape)."""
        if callable(self.init):
            return self.init(x)
        ref = _batch_like(x)
        dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
        if self.state_shape is not None and self.state_shape and isinstance(self.state_shape[0], tuple):
            return tuple(ref.new_zeros((ref.shape[0], *s), dtype=dtype) for s in self.state_shape)  # type: ignore[arg-type]
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
        _per_call_reset(self.cell)
        # the init policy's state (a tensor, or a tuple/list of them that is packed below)
        z0 = cast(Tensor, self.initial_state(x)) if z0 is None else z0
        self._check_state(x, z0, given_z0)
        packer = StatePacker(z0) if isinstance(z0, (tuple, list)) else None
        if packer is not None:
            z0 = packer.pack(z0)
            loss_fn = None if loss_fn is None else _on_unpacked(loss_fn, packer)
        fn = self._flat_cell_fn(x, packer)
        max_iter = self.eval_max_iter if (not self.training and self.eval_max_iter is not None) else None
        if self.training and self.random_max_iter is not None:
            lo, hi = self.random_max_iter
            gen = self.decision_generator
            max_iter = int(torch.randint(lo, hi + 1, (), generator=gen, device=None if gen is None else gen.device))
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
            if self.training and self.unrolled_depth is not None and torch.is_grad_enabled():
                return self._unrolled(fn, z0, packer)
            recorder = _IterateRecorder(self.keep_iterates) if self.keep_iterates else None
            solve_fn = fn if recorder is None else _recording(fn, recorder)
            with torch.no_grad():
                bad_x = _nonfinite_samples(x)  # NaN/Inf in the data: an error, or recorded under "freeze"
                freeze = getattr(self.solver, "on_nonfinite", "raise") == "freeze"
                if bad_x is not None and not freeze and bool(bad_x.any()):
                    _blame_input(x, None)
                try:
                    result = self._forward_solver()(solve_fn, z0, max_iter=max_iter, **call_options)
                except NonFiniteError as err:
                    _blame_input(x, err)
                    raise
                if bad_x is not None and freeze and bad_x.shape == result.converged.shape:
                    result.nonfinite = bad_x if result.nonfinite is None else result.nonfinite | bad_x
                    result.converged = result.converged & ~bad_x
                # after the solve, so a per-call random draw of the cell (a variational-dropout mask)
                # comes from the main random stream, not from the probe's forked one
                if self.check_batch_coupling and not self._coupling_probed:
                    self._probe_batch_coupling(fn, z0)
            return self._finish(x, result, fn=fn, packer=packer, recorder=recorder)

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

    def _probe_batch_coupling(self, fn: Callable[[Tensor], Tensor], z0: Any) -> None:
        """Raise if the cell's output for one sample depends on another sample's state (see ``check_batch_coupling``)."""
        if not isinstance(z0, Tensor) or z0.dim() < 1 or z0.shape[0] < 2:
            return  # one sample: nothing to compare; probed at the first call with two or more
        self._coupling_probed = True
        devices = [z0.device] if z0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            base = fn(z0)
            # a deterministic, non-constant change of sample 0's state
            bump = torch.linspace(0.5, 1.5, z0[0].numel(), dtype=z0.dtype, device=z0.device).view(z0[0].shape)
            moved = z0.clone()
            moved[0] = moved[0] + bump * (1 + z0[0].abs().max())
            other = fn(moved)
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
                f"gradient estimators treat each sample's fixed point separately (per-sample residuals, convergence and "
                f"adjoints), so results would be wrong. Use per-sample operations (LayerNorm/GroupNorm instead "
                f"of batch statistics, no z.mean(0)); a random cell (dropout) also fails this check. Pass "
                f"check_batch_coupling=False to skip it."
            )

    def _flat_cell_fn(self, x: Any, packer: Optional[StatePacker]) -> Callable[[Tensor], Tensor]:
        """``z ↦ f(z, x)`` on the solver's state (flat ``(B, d)`` for a tuple state)."""
        if packer is None:
            return lambda z: self.cell(z, x)
        return lambda z: packer.pack(self.cell(packer.unpack(z), x))

    def _unrolled(self, fn: Callable[[Tensor], Tensor], z0: Tensor, packer: Optional[StatePacker]) -> tuple[Any, DEQInfo]:
        """Unrolled pre-training: ``unrolled_depth`` plain iterations with the autograd graph."""
        from .regularizers import unrolled_result

        start = time.perf_counter()
        z = z0
        assert self.unrolled_depth is not None
        for _ in range(self.unrolled_depth):
            z = fn(z)
        with torch.no_grad():
            result = unrolled_result(z.detach(), fn(z.detach()), self.solver, self.unrolled_depth)
        result.time_s = time.perf_counter() - start
        info = DEQInfo(result, unrolled=True, unpack=None if packer is None else packer.unpack)
        return (z if packer is None else packer.unpack(z)), info

    def _finish(
        self,
        x: Any,
        result: SolverResult,
        fn: Optional[Callable[[Tensor], Tensor]] = None,
        packer: Optional[StatePacker] = None,
        recorder: Optional[_IterateRecorder] = None,
    ) -> tuple[Any, DEQInfo]:
        fn = (lambda z: self.cell(z, x)) if fn is None else fn
        info, z = self._finish_solve(x, result, fn)
        info.unpack = None if packer is None else packer.unpack
        if recorder is not None:
            info.iterates = recorder.select(result.z)
            info.cell_fn = fn
        self._monitor(fn, result, info)
        return (z if packer is None else packer.unpack(z)), info

    def _monitor(self, fn: Callable[[Tensor], Tensor], result: SolverResult, info: DEQInfo) -> None:
        """Jacobian regularisation (training) and the spectral-radius monitor, at ``z*``."""
        from .regularizers import hutchinson_frobenius, spectral_radius

        if self.jac_reg is not None and self.training and torch.is_grad_enabled() and self.jac_reg.fires(self.decision_generator):
            est = hutchinson_frobenius(fn, result.z.detach(), probes=self.jac_reg.probes, create_graph=True)
            info.jac_loss = est.mean()
            info.jac_fro = float(info.jac_loss.detach())
        if self.spectral_radius_iters:
            # a monitor: its own generator, so measuring does not change a seeded run's random stream
            gen = torch.Generator(device=result.z.device).manual_seed(0)
            info.spectral_radius = spectral_radius(fn, result.z.detach(), n_iter=self.spectral_radius_iters, generator=gen)
            if info.jac_fro is None:
                info.jac_fro = float(hutchinson_frobenius(fn, result.z.detach(), probes=1, generator=gen).mean())

    def _finish_solve(self, x: Any, result: SolverResult, fn: Callable[[Tensor], Tensor]) -> tuple[DEQInfo, Tensor]:
        if not self.grad.needs_inverse:
            result.inverse = None  # Broyden's U, V would otherwise live until backward (MBs per batch)
        info = DEQInfo(result)
        if not result.all_converged and self.on_failure != "ignore":
            msg = f"DEQ forward: {result.summary()}. Raise max_iter, loosen tol, or check the cell is contractive."
            apply_failure_policy(self.on_failure, msg, stacklevel=4)  # the caller of DEQ.forward
        needs_grad = torch.is_grad_enabled() and (_requires_grad(x) or any(p.requires_grad for p in self.cell.parameters()))
        if not needs_grad:
            return info, result.z
        return info, self.grad.attach(fn, result, info)


def _state_shape(state_shape: Sequence[Any]) -> tuple:
    """``(C, H, W)`` or, for a tuple state, ``((C1, H1, W1), (C2, H2, W2), ...)``."""
    if len(state_shape) and isinstance(state_shape[0], (tuple, list, torch.Size)):
        return tuple(tuple(int(s) for s in part) for part in state_shape)
    return tuple(int(s) for s in state_shape)


def _on_unpacked(loss_fn: Callable[[Any], Tensor], packer: StatePacker) -> Callable[[Tensor], Tensor]:
    return lambda z: loss_fn(packer.unpack(z))


def _recording(fn: Callable[[Tensor], Tensor], recorder: _IterateRecorder) -> Callable[[Tensor], Tensor]:
    def recorded(z: Tensor) -> Tensor:
        recorder(z)
        return fn(z)

    return recorded
