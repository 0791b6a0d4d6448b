"""CVXPY reference for the SIM state-matching program (row by row; optional extra ``cvxpy``).

Same program as :class:`deqkit.sim.admm.BatchedADMM` (Tsai et al., arXiv 2209.09389): each
row is one conic problem, built once with ``z`` and ``λ`` as parameters and re-solved per row
with Clarabel. Slow, but an independent check of the ADMM and of the ℓ1-ball projection.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from .admm import MODES


def _require_cvxpy():
    try:
        import cvxpy as cp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the CVXPY reference needs the optional extra: pip install 'deqkit[sim]' (cvxpy, clarabel)"
        ) from exc
    return cp


@dataclass
class CVXPYResult:
    """Per-row solutions of :func:`solve_rows_cvxpy` (numpy arrays, float64)."""

    beta: np.ndarray
    objective: np.ndarray
    status: list[str] = field(default_factory=list)
    solve_time_s: float = 0.0


def solve_rows_cvxpy(
    phi: Tensor | np.ndarray,
    targets: Tensor | np.ndarray,
    lam: float,
    radius: float | None = None,
    n_constrained: int = 0,
    mode: str = "relaxed",
    solver: str = "CLARABEL",
    solver_opts: dict | None = None,
    weights: np.ndarray | Tensor | None = None,
    support: np.ndarray | Tensor | None = None,
) -> CVXPYResult:
    """Solve the SIM program for each row of ``targets`` (``(r, m)``) with CVXPY.

    ``relaxed``: ``min λ‖β‖₁ + ½‖z − Φβ‖² s.t. ‖β[:k]‖₁ ≤ radius``;
    ``equality``: ``min λ‖β‖₁ s.t. Φβ = z, ‖β[:k]‖₁ ≤ radius`` (``k = n_constrained``).
    ``weights`` (``(d,)``) makes the penalty ``λ Σ_j w_j |β_j|``; ``support`` (``(r, d)``
    boolean) holds each row's coefficients outside its mask at zero.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid; valid: {', '.join(MODES)}")
    cp = _require_cvxpy()
    phi_np = np.asarray(phi.detach().cpu().double() if isinstance(phi, Tensor) else phi, dtype=np.float64)
    z_np = np.asarray(
        targets.detach().cpu().double() if isinstance(targets, Tensor) else targets, dtype=np.float64
    )
    m, d = phi_np.shape
    if z_np.ndim != 2 or z_np.shape[1] != m:
        raise ValueError(f"targets must have shape (r, {m}), got {z_np.shape}")
    beta = cp.Variable(d)
    z = cp.Parameter(m)
    lam_p = cp.Parameter(nonneg=True, value=float(lam))
    if weights is not None:
        w_np = np.asarray(weights.detach().cpu().double() if isinstance(weights, Tensor) else weights, dtype=np.float64)
        pen = cp.norm1(cp.multiply(w_np, beta))
    else:
        pen = cp.norm1(beta)
    if mode == "relaxed":
        obj = lam_p * pen + 0.5 * cp.sum_squares(z - phi_np @ beta)
        cons = []
    else:
        obj = lam_p * pen
        cons = [phi_np @ beta == z]
    if radius is not None and n_constrained > 0 and math.isfinite(radius):
        cons.append(cp.norm1(beta[:n_constrained]) <= float(radius))
    if support is not None:
        supp_np = np.asarray(support.detach().cpu() if isinstance(support, Tensor) else support, dtype=bool)
        if supp_np.shape != (z_np.shape[0], d):
            raise ValueError(f"support must have shape ({z_np.shape[0]}, {d}), got {supp_np.shape}")
        off = cp.Parameter(d, nonneg=True)
        cons.append(cp.multiply(off, beta) == 0)
    prob = cp.Problem(cp.Minimize(obj), cons)
    out_beta = np.zeros((z_np.shape[0], d))
    out_obj = np.zeros(z_np.shape[0])
    status = []
    t0 = time.perf_counter()
    for i, zi in enumerate(z_np):
        z.value = zi
        if support is not None:
            off.value = (~supp_np[i]).astype(np.float64)
        prob.solve(solver=solver, **(solver_opts or {}))
        status.append(prob.status)
        if beta.value is None:
            out_beta[i] = np.nan
            out_obj[i] = np.nan
        else:
            out_beta[i] = beta.value
            out_obj[i] = prob.value
    return CVXPYResult(beta=out_beta, objective=out_obj, status=status, solve_time_s=time.perf_counter() - t0)
