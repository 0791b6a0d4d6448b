"""The SIM program's rows sharded across ``torch.distributed`` ranks: :class:`ShardedADMM`.

The state-matching program is row-separable (Tsai et al., arXiv 2209.09389): every row of
``(A, B)`` and ``(C, D)`` is its own lasso with the same regressors ``Φ``. :class:`ShardedADMM`
is a :class:`~deqkit.sim.admm.BatchedADMM` whose solve splits the rows into ``world_size``
contiguous shards, solves this rank's shard with the batched ADMM (every row keeps its own
penalty and stopping rule, so a row's iterates do not depend on which other rows share its
batch), and all-gathers the per-row results, so every rank returns the whole
:class:`~deqkit.sim.admm.ADMMResult`, equal to the one-process solve up to the rounding of
matrix products over fewer columns. Pass it to :func:`~deqkit.sim.fit.fit_sim` as
``admm_ab=`` / ``admm_cd=`` to fit a SIM on several processes or GPUs:

    >>> fit = fit_sim(states, lam, admm_ab=ShardedADMM(max_iter=2000), admm_cd=ShardedADMM(max_iter=1000))

Every rank must hold the same ``Φ`` and targets and call the solve the same number of times.
Without an initialised process group (or with one process) it is the plain batched ADMM.
``time_s`` is the slowest rank's.

Boyd, Parikh, Chu, Peleato, Eckstein, "Distributed Optimization and Statistical Learning via
the Alternating Direction Method of Multipliers", Found. Trends Mach. Learn. 2011.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._options import validated_options
from .admm import ADMMResult, BatchedADMM, Factorization

__all__ = ["ShardedADMM", "row_shard"]

_ROW_FIELDS = (
    "beta",
    "objective",
    "converged",
    "nstep",
    "residual",
    "primal_residual",
    "dual_residual",
    "rho",
    "constraint_residual",
)


def row_shard(rows: int, rank: int, world: int) -> slice:
    """The contiguous rows ``rank`` solves out of ``rows`` (``torch.tensor_split``'s split)."""
    base, extra = divmod(rows, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _rows(value: Any, sl: slice, rows: int) -> Any:
    """``value[sl]`` for a per-row tensor (leading dimension ``rows``), else ``value`` unchanged."""
    if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == rows:
        return value[sl]
    return value


@validated_options
class ShardedADMM(BatchedADMM):
    """:class:`~deqkit.sim.admm.BatchedADMM` with its rows sharded over the ranks of ``group``.

    Args:
        group: the ``torch.distributed`` process group (default: the world).
        **options: those of :class:`~deqkit.sim.admm.BatchedADMM` (``rho``, ``max_iter``, ``tol``, ...).
    """

    def __init__(
        self,
        *,
        group: Any = None,
        rho: float = 1.0,
        max_iter: int = 1000,
        tol: float = 1e-5,
        tol_abs: float = 1e-7,
        mode: str = "relaxed",
        adaptive_rho: bool = True,
        mu: float = 10.0,
        tau: float = 2.0,
        check_every: int = 10,
        alpha: float = 1.0,
        zero_tol: float = 1e-6,
        on_failure: str = "warn",
        rank_tol: float = 1e-10,
    ) -> None:
        super().__init__(
            rho=rho,
            max_iter=max_iter,
            tol=tol,
            tol_abs=tol_abs,
            mode=mode,
            adaptive_rho=adaptive_rho,
            mu=mu,
            tau=tau,
            check_every=check_every,
            alpha=alpha,
            zero_tol=zero_tol,
            on_failure=on_failure,
            rank_tol=rank_tol,
        )
        self.group = group

    def __repr__(self) -> str:
        return "Sharded" + super().__repr__()

    def _world(self) -> tuple[int, int]:
        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        return dist.get_rank(self.group), dist.get_world_size(self.group)

    def _solve(
        self,
        phi: Tensor,
        targets: Tensor,
        lam: Any,
        radius: Any = None,
        n_constrained: int = 0,
        beta0: Tensor | None = None,
        factor: Factorization | None = None,
        weights: Tensor | None = None,
        support: Tensor | None = None,
        block_ball: tuple[int, int, Any] | None = None,
    ) -> ADMMResult:
        rank, world = self._world()
        rows = targets.shape[0] if isinstance(targets, Tensor) and targets.ndim == 2 else 0
        if world == 1 or rows < world:
            return super()._solve(phi, targets, lam, radius, n_constrained, beta0, factor, weights, support, block_ball)
        sl = row_shard(rows, rank, world)
        if factor is None:
            factor = self.factorize(phi)  # every rank, the same Φ: no need to broadcast
        local = super()._solve(
            phi,
            targets[sl],
            _rows(lam, sl, rows),
            _rows(radius, sl, rows),
            n_constrained,
            _rows(beta0, sl, rows),
            factor,
            weights,
            _rows(support, sl, rows),
            None if block_ball is None else (block_ball[0], block_ball[1], _rows(block_ball[2], sl, rows)),
        )
        return self._gather(local, rows, world)

    def _gather(self, local: ADMMResult, rows: int, world: int) -> ADMMResult:
        """All-gather the per-row fields (shards padded to the largest), in rank order."""
        sizes = [row_shard(rows, r, world).stop - row_shard(rows, r, world).start for r in range(world)]
        biggest = max(sizes)
        on_device = local.beta.device.type != "cpu" and dist.get_backend(self.group) != "gloo"
        fields: dict[str, Tensor] = {}
        for name in _ROW_FIELDS:
            t: Tensor = getattr(local, name)
            dtype = t.dtype
            send = t.to(torch.float64 if dtype == torch.bool else dtype)
            if not on_device:
                send = send.cpu()
            pad = biggest - send.shape[0]
            if pad:
                send = torch.cat([send, send.new_zeros((pad, *send.shape[1:]))])
            parts = [torch.empty_like(send) for _ in range(world)]
            dist.all_gather(parts, send.contiguous(), group=self.group)
            whole = torch.cat([p[:n] for p, n in zip(parts, sizes)])
            fields[name] = whole.to(device=local.beta.device, dtype=dtype)
        slowest = torch.tensor([local.time_s], dtype=torch.float64)
        if on_device:
            slowest = slowest.to(local.beta.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=self.group)
        return ADMMResult(time_s=float(slowest.item()), mode=local.mode, **fields)
