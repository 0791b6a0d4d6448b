"""Cross-rank agreement on when a forward solve stops (data-parallel training).

Under data parallelism (``torch.distributed``, DistributedDataParallel) every rank solves the
equilibrium of its own shard of the batch, so ranks stop after different numbers of iterations;
the step then waits at the gradient all-reduce for the slowest rank (a straggler).
:class:`AgreedStop` wraps a forward solver so that all ranks of a process group stop the
forward solve at the *same* iteration: once per iteration each rank all-reduces the number of
its samples still active, and the solve ends on every rank when the global count has fallen
to ``(1 − quorum) · B_global``:

* ``quorum=1.0``: every rank stops when no sample on any rank is active (the same iteration
  count everywhere, which is the slowest rank's). By default (the wrapped solver's
  ``freeze_converged=False``) no sample on any rank stops before then, so the ranks' shards
  iterate as one global batch and give the results of one process on the concatenated batch;
  with ``freeze_converged=True`` each sample freezes at its first iterate under ``tol`` and the
  results equal an unsynchronised solve's;
* ``quorum<1``: the ranks stop together as soon as that fraction of the global batch has
  stopped, so a few hard samples on one rank no longer hold every rank back (the samples cut
  off count as not converged in ``info.converged``).

A rank whose own samples have all stopped (``freeze_converged=True``, or NaN/Inf samples frozen)
does not evaluate the cell any more: it only takes part in the per-iteration all-reduce until
the agreement is reached, so every rank makes the same number of collective calls and nothing
hangs.

Rules: every rank must call the solve the same number of times with the same ``max_iter``
(true of a DDP step, where every rank runs the same model); a solve that raises on one rank
(NaN/Inf with ``on_nonfinite="raise"``) leaves the others waiting until the process group's
timeout, so use ``on_nonfinite="freeze"`` with agreement where that can happen.

Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019 (the batched per-sample solve);
Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training",
VLDB 2020 (DDP's gradient all-reduce, where the stragglers wait).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._options import check_fraction, validated_options
from .errors import OptionError
from .inverse import InverseEstimate
from .solvers.base import Fn, Problem, Solver, SolverResult

__all__ = ["AgreedStop", "distributed_world"]


def distributed_world(group: Any = None) -> int:
    """The size of ``group`` (default: the world) when ``torch.distributed`` is initialised, else 1."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


@validated_options
class AgreedStop(Solver):
    """A forward solver whose stop is agreed by all ranks of a process group (see the module docstring).

    Args:
        solver: the forward solver doing the work (its hooks, options and result are used unchanged).
        quorum: stop every rank once this fraction of the global batch has stopped, in ``(0, 1]``.
        group: the ``torch.distributed`` process group (default: the world).

    ``result.extra["agreed_nstep"]`` holds the iteration count all ranks agreed on.
    """

    def __init__(self, solver: Solver, *, quorum: float = 1.0, group: Any = None) -> None:
        if not isinstance(solver, Solver) or isinstance(solver, AgreedStop):
            raise OptionError(
                f"AgreedStop: solver must be a deqkit forward solver (not already agreed), got {type(solver).__name__}."
            )
        self.solver = solver
        self.quorum = check_fraction("AgreedStop", "quorum", quorum)
        self.group = group
        # the loop written once in Solver reads these attributes of the solver running it
        self.tol, self.max_iter = solver.tol, solver.max_iter
        self.stop_mode, self.on_nonfinite = solver.stop_mode, solver.on_nonfinite
        self.freeze_converged = solver.freeze_converged
        self.keeps_inverse = solver.keeps_inverse  # type: ignore[misc]
        self.call_options = solver.call_options  # type: ignore[misc]
        self.name = solver.name  # type: ignore[misc]
        self._calls = 0
        self._agreed = False
        self._threshold = 0
        self._active: Tensor | None = None

    def __repr__(self) -> str:
        return f"AgreedStop({self.solver!r}, quorum={self.quorum})"

    @property
    def needs_loss_grad(self) -> bool:
        return self.solver.needs_loss_grad

    # -- the collective ---------------------------------------------------------------------
    def _all_reduce_sum(self, value: int, device: torch.device) -> int:
        import torch.distributed as dist

        on_device = device.type != "cpu" and dist.get_backend(self.group) != "gloo"
        t = torch.tensor([value], dtype=torch.long, device=device if on_device else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return int(t.item())

    def _agree(self, n_active: int, device: torch.device) -> bool:
        """One collective call: ``True`` once the global number of active samples is at most the threshold."""
        self._calls += 1
        if self._all_reduce_sum(n_active, device) <= self._threshold:
            self._agreed = True
        return self._agreed

    # -- the hooks: the wrapped solver's, plus the agreement in terminate ---------------------
    def init(self, problem: Problem, z: Tensor, fz: Tensor) -> Any:
        self._calls, self._agreed, self._active = 0, False, None
        global_b = self._all_reduce_sum(z.shape[0], z.device)
        self._threshold = math.floor((1.0 - self.quorum) * global_b + 1e-9)
        return self.solver.init(problem, z, fz)

    def observe(self, state: Any, z: Tensor, fz: Tensor, fresh: Tensor) -> None:
        self._active = fresh  # the loop passes the active mask here, just before terminate
        self.solver.observe(state, z, fz, fresh)

    def step(self, state: Any, z: Tensor, fz: Tensor, active: Tensor) -> Any:
        return self.solver.step(state, z, fz, active)

    def terminate(self, state: Any, measure: Tensor, tol: float) -> Tensor:
        stop = self.solver.terminate(state, measure, tol)
        still = stop.logical_not() if self._active is None else self._active & stop.logical_not()
        if self._agree(int(still.sum()), measure.device):
            return torch.ones_like(stop)
        return stop if self.freeze_converged else torch.zeros_like(stop)  # the global batch goes on

    def inverse(self, state: Any) -> InverseEstimate | None:
        return self.solver.inverse(state)

    def extras(self, state: Any) -> dict:
        return self.solver.extras(state)

    def __call__(
        self, fn: Fn, z0: Tensor, *, max_iter: int | None = None, tol: float | None = None, **call_options: Any
    ) -> SolverResult:
        result = self._solve(fn, z0, max_iter=max_iter, tol=tol, options=call_options)
        # this rank's samples have all stopped: take part in the agreement until it is reached
        cap = result.max_iter
        while not self._agreed and self._calls < cap:
            self._agree(0, z0.device)
        result.extra["agreed_nstep"] = self._calls
        result.solver = type(self.solver).__name__
        return result
