"""The deep equilibrium layer: ``z* = f(z*, x)`` with a pluggable solver and gradient estimator."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._options import check_bool, check_failure_policy, check_fraction, check_int, validated_options
from .errors import OptionError, apply_failure_policy
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
        z0 = self.initial_state(x) if z0 is None else z0
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
                result = self._forward_solver()(lambda z: self.cell(z, x), z0, max_iter=max_iter, **call_options)
            return self._finish(x, result)

    def _forward_solver(self) -> Solver:
        """The solver of this call: wrapped in a cross-rank stop agreement when ``sync_stop`` applies."""
        if not (self.sync_stop and self.training):
            return self.solver
        from .agreement import AgreedStop, distributed_world

        if distributed_world() <= 1:
            return self.solver
        return AgreedStop(self.solver, quorum=self.sync_quorum)

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
