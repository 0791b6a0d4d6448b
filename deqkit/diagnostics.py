"""Gradient-quality diagnostic: how close each estimator's gradient is to a tight exact one, and at what cost."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ._options import check_int, validated_options
from ._timing import synced_perf_counter
from .deq import DEQ
from .errors import OptionError
from .estimators import Exact, GradientEstimator
from .linear import GMRES

__all__ = ["GradientQuality", "gradient_quality", "format_table"]


@dataclass
class GradientQuality:
    """One row of :func:`gradient_quality` (the cosine-to-exact measure of SHINE, Ramzi et al., ICLR 2022).

    Attributes:
        estimator: the estimator's short label.
        cosine: cosine between its parameter gradient and the reference's.
        norm_ratio: ``‖g‖ / ‖g_ref‖``.
        rel_error: ``‖g − g_ref‖ / ‖g_ref‖``.
        input_cosine: the same cosine for ``dL/dx`` (``nan`` when ``x`` is not a float tensor).
        backward_ms: median wall-clock of ``loss.backward()`` over ``repeats``.
        vjps: VJPs (or graph evaluations) the estimator spent; ``n_fallback``: SHINE fallbacks.
        backward_converged: for solve-based estimators, whether every sample's adjoint solve met its tolerance.
    """

    estimator: str
    cosine: float
    norm_ratio: float
    rel_error: float
    input_cosine: float
    backward_ms: float
    vjps: int
    n_fallback: int
    backward_converged: Optional[bool]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cos(a: Tensor, b: Tensor) -> float:
    den = a.norm() * b.norm()
    return float((a @ b) / den) if den > 0 else float("nan")


def _run(
    deq: DEQ, x: Any, loss_fn: Callable[[Tensor], Tensor], params: Sequence[torch.nn.Parameter]
) -> tuple[Tensor, Optional[Tensor], float, Any]:
    for p in params:
        p.grad = None
    xx = x.detach().clone().requires_grad_() if isinstance(x, Tensor) and x.is_floating_point() else x
    z, info = deq(xx, loss_fn=loss_fn)
    loss = loss_fn(z)
    device = loss.device  # z may be a tuple of tensors (multiscale states)
    start = synced_perf_counter(device)
    loss.backward()
    elapsed = synced_perf_counter(device) - start
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for p in params]
    gx = xx.grad.reshape(-1) if isinstance(xx, Tensor) and xx.grad is not None else None
    return torch.cat(grads).detach().double(), None if gx is None else gx.detach().double(), elapsed, info


@validated_options
def gradient_quality(
    deq: DEQ,
    x: Any,
    loss_fn: Callable[[Tensor], Tensor],
    estimators: Sequence[GradientEstimator],
    *,
    reference: Optional[GradientEstimator] = None,
    params: Optional[Sequence[torch.nn.Parameter]] = None,
    repeats: int = 3,
) -> list[GradientQuality]:
    """Compare gradient estimators on one batch: cosine and norm ratio to a tight ``Exact``, and backward time.

    The DEQ's estimator is swapped in turn (and restored afterwards); the forward solve is the
    same for all, so the estimators differ only in their backward pass.

    Args:
        deq: the layer (its solver must keep an inverse estimate for SHINE/BroydenReuse).
        x: the input injection of one batch.
        loss_fn: ``z ↦`` scalar loss (e.g. head + cross-entropy); also handed to the forward
            solve so an OPA-enabled Broyden sees it.
        estimators: the estimators to measure.
        reference: the reference estimator (default ``Exact(GMRES(max_iter=500))`` with tol 1e-10
            in float64, ``100·eps`` in lower precision).
        params: the parameters whose gradient is compared (default: the DEQ's own).
        repeats: backward timings to take the median of.

    Returns:
        One :class:`GradientQuality` per estimator, in order.
    """
    repeats = check_int("gradient_quality", "repeats", repeats)
    params = [p for p in (deq.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise OptionError("gradient_quality: no parameter requires grad; nothing to compare.")
    if reference is None:  # as tight as the dtype allows
        tol = max(1e-10, 100 * torch.finfo(params[0].dtype).eps)
        reference = Exact(GMRES(tol=tol, max_iter=500), on_failure="warn", match_forward=False, unconverged="exact")
    for est in [reference, *estimators]:
        est.check_solver(deq.solver)
    saved = deq.grad
    was_training = deq.training
    deq.train()
    try:
        deq.grad = reference
        g_ref, gx_ref, _, _ = _run(deq, x, loss_fn, params)
        rows = []
        for est in estimators:
            deq.grad = est
            g, gx, elapsed, info = _run(deq, x, loss_fn, params)
            times = [elapsed]
            for _ in range(repeats - 1):
                g, gx, elapsed, info = _run(deq, x, loss_fn, params)
                times.append(elapsed)
            back = info.backward if info is not None else None
            solve = back.solve if back is not None else None
            rows.append(
                GradientQuality(
                    estimator=est.label,
                    cosine=_cos(g, g_ref),
                    norm_ratio=float(g.norm() / g_ref.norm()) if g_ref.norm() > 0 else float("nan"),
                    rel_error=float((g - g_ref).norm() / g_ref.norm()) if g_ref.norm() > 0 else float("nan"),
                    input_cosine=_cos(gx, gx_ref) if gx is not None and gx_ref is not None else float("nan"),
                    backward_ms=1e3 * statistics.median(times),
                    vjps=back.vjps if back is not None else 0,
                    n_fallback=back.n_fallback if back is not None else 0,
                    backward_converged=None if solve is None else solve.all_converged,
                )
            )
    finally:
        deq.grad = saved
        deq.train(was_training)
        for p in params:
            p.grad = None
    return rows


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are ``(key, header, format)`` triples, e.g. ``("cosine", "cos", ".4f")``;
    a missing or ``None`` value prints as ``-``."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            val = r.get(key)
            if val is None or val == "":
                line.append("-")
                continue
            try:
                line.append(format(val, fmt) if fmt else str(val))
            except (TypeError, ValueError):
                line.append(str(val))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for n, c in enumerate(cells):
        out.append("  ".join(s.rjust(w) if n else s.ljust(w) for s, w in zip(c, widths, strict=True)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
