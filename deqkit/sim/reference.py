"""CVXPY reference for the SIM state-matching program (row by row; optional extra ``cvxpy``).

Same program as :class:`deqkit.sim.admm.BatchedADMM` (Tsai, Decugis, El Ghaoui, Atamtürk,
arXiv 2209.09389): each row is one conic problem, built once with ``z`` and ``λ`` as
parameters and re-solved per row with Clarabel. Slow, but an independent check of the ADMM and
of the ℓ1-ball projection.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from .._options import (
    check_choice,
    check_failure_policy,
    check_int,
    check_positive,
    validated_options,
)
from ..errors import OptionError, apply_failure_policy
from ..results import ResultMixin
from .admm import MODES

__all__ = ["CVXPYResult", "solve_rows_cvxpy"]


def _require_cvxpy():
    try:
        import cvxpy as cp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the CVXPY reference needs the optional extra: pip install 'deqkit[sim]' (cvxpy, clarabel)") from exc
    return cp


@dataclass
class CVXPYResult(ResultMixin):
    """Per-row solutions of :func:`solve_rows_cvxpy` (numpy arrays, float64), one entry per row.

    Core fields (see :mod:`deqkit.results`):

    - ``converged``: the conic solver reported ``"optimal"`` (bool array);
    - ``nstep``: the conic solver's iterations (``-1`` where it reports none);
    - ``residual``: the primal infeasibility of the returned ``beta``: the excess of the ℓ1-ball
      constraint, plus ``‖Φβ − z‖`` in equality mode, plus ``max |β|`` off the support
      (``inf`` where the solver returned no point);
    - ``time_s``: wall-clock seconds of all rows' solves (the problem is built once, before).

    Extras: ``beta``, ``objective`` and the solver's ``status`` string per row.
    """

    beta: np.ndarray
    objective: np.ndarray
    converged: np.ndarray
    nstep: np.ndarray
    residual: np.ndarray
    time_s: float
    status: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs and error messages."""
        r = len(self.status)
        worst = float(np.max(self.residual)) if r else 0.0
        return (
            f"CVXPY: {r - self.n_failed} of {r} rows optimal ({', '.join(sorted(set(self.status)))}), "
            f"primal infeasibility max {worst:.3g}, {self.time_s:.3g} s"
        )


def _as_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        x = x.double() if dtype is np.float64 else x
    return np.asarray(x, dtype=dtype)


def _infeasibility(
    beta: np.ndarray, phi: np.ndarray, z: np.ndarray, mode: str, radius: float | None, k: int, support: np.ndarray | None
) -> float:
    """Primal infeasibility of one row's point (see :class:`CVXPYResult`)."""
    if not np.all(np.isfinite(beta)):
        return math.inf
    res = 0.0
    if radius is not None and k > 0 and math.isfinite(radius):
        res += max(0.0, float(np.abs(beta[:k]).sum()) - radius)
    if mode == "equality":
        res += float(np.linalg.norm(phi @ beta - z))
    if support is not None and not support.all():
        res += float(np.abs(beta[~support]).max())
    return res


@dataclass
class _RowProgram:
    """The CVXPY problem of one row, with ``z`` (and the off-support mask) as parameters."""

    problem: Any
    beta: Any
    z: Any
    off: Any = None
    lam: Any = None


def _build_program(
    cp,
    phi_np: np.ndarray,
    lam: float,
    mode: str,
    radius: float | None,
    n_constrained: int,
    weights,
    with_support: bool,
    block_ball=None,
) -> _RowProgram:
    """Build the row problem once; each row then only sets ``z`` (and ``off``)."""
    m, d = phi_np.shape
    beta = cp.Variable(d)
    z = cp.Parameter(m)
    lam_p = cp.Parameter(nonneg=True, value=lam)
    pen = cp.norm1(cp.multiply(_as_numpy(weights), beta)) if weights is not None else cp.norm1(beta)
    if mode == "relaxed":
        obj = lam_p * pen + 0.5 * cp.sum_squares(z - phi_np @ beta)
        cons = []
    else:
        obj = lam_p * pen
        cons = [phi_np @ beta == z]
    if radius is not None and n_constrained > 0 and math.isfinite(radius):
        cons.append(cp.norm1(beta[:n_constrained]) <= float(radius))
    if block_ball is not None and block_ball[1] > block_ball[0] and math.isfinite(block_ball[2]):
        cons.append(cp.norm1(beta[block_ball[0] : block_ball[1]]) <= float(block_ball[2]))
    off = None
    if with_support:
        off = cp.Parameter(d, nonneg=True)
        cons.append(cp.multiply(off, beta) == 0)
    return _RowProgram(cp.Problem(cp.Minimize(obj), cons), beta, z, off, lam_p)


def _solve_each(
    prog: _RowProgram,
    phi_np: np.ndarray,
    z_np: np.ndarray,
    supp_np: np.ndarray | None,
    mode: str,
    radius: float | None,
    n_constrained: int,
    solver: str,
    solver_opts: dict | None,
    lams: np.ndarray | None = None,
) -> CVXPYResult:
    """Solve the program row by row and collect the per-row results."""
    r, d = z_np.shape[0], phi_np.shape[1]
    out_beta, out_obj = np.zeros((r, d)), np.zeros(r)
    nstep, resid = np.full(r, -1, dtype=np.int64), np.zeros(r)
    status = []
    t0 = time.perf_counter()
    for i, zi in enumerate(z_np):
        prog.z.value = zi
        if lams is not None:
            prog.lam.value = float(lams[i])
        if supp_np is not None:
            prog.off.value = (~supp_np[i]).astype(np.float64)
        prog.problem.solve(solver=solver, **(solver_opts or {}))
        status.append(prog.problem.status)
        iters = getattr(prog.problem.solver_stats, "num_iters", None)
        nstep[i] = -1 if iters is None else int(iters)
        if prog.beta.value is None:
            out_beta[i] = np.nan
            out_obj[i] = np.nan
        else:
            out_beta[i] = prog.beta.value
            out_obj[i] = prog.problem.value
        resid[i] = _infeasibility(out_beta[i], phi_np, zi, mode, radius, n_constrained, None if supp_np is None else supp_np[i])
    converged = np.array([s == "optimal" for s in status], dtype=bool)
    return CVXPYResult(
        beta=out_beta,
        objective=out_obj,
        converged=converged,
        nstep=nstep,
        residual=resid,
        time_s=time.perf_counter() - t0,
        status=status,
    )


@validated_options
def solve_rows_cvxpy(
    phi: Tensor | np.ndarray,
    targets: Tensor | np.ndarray,
    lam: float | np.ndarray | Tensor,
    *,
    radius: float | None = None,
    n_constrained: int = 0,
    mode: str = "relaxed",
    solver: str = "CLARABEL",
    solver_opts: dict | None = None,
    weights: np.ndarray | Tensor | None = None,
    support: np.ndarray | Tensor | None = None,
    block_ball: tuple[int, int, float] | None = None,
    on_failure: str = "warn",
) -> CVXPYResult:
    """Solve the SIM program for each row of ``targets`` (``(r, m)``) with CVXPY.

    ``relaxed``: ``min λ‖β‖₁ + ½‖z − Φβ‖² s.t. ‖β[:k]‖₁ ≤ radius``;
    ``equality``: ``min λ‖β‖₁ s.t. Φβ = z, ‖β[:k]‖₁ ≤ radius`` (``k = n_constrained``).
    ``weights`` (``(d,)``) makes the penalty ``λ Σ_j w_j |β_j|``; ``support`` (``(r, d)``
    boolean) holds each row's coefficients outside its mask at zero. ``solver`` is the CVXPY
    conic solver's name, ``solver_opts`` its options. ``on_failure`` (``"warn"``, ``"raise"``,
    ``"ignore"``) applies when some row's status is not ``"optimal"``. ``lam`` is a scalar or
    one value per row (``(r,)``); ``block_ball = (start, stop, radius2)`` adds the constraint
    ``‖β[start:stop]‖₁ ≤ radius2`` (as :class:`~deqkit.sim.admm.BatchedADMM`'s).
    """
    own = "solve_rows_cvxpy"
    check_choice(own, "mode", mode, MODES)
    lams = None
    if isinstance(lam, (np.ndarray, Tensor)) and _as_numpy(lam).ndim == 1:
        lams = _as_numpy(lam)
        if not (np.all(np.isfinite(lams)) and np.all(lams >= 0)):
            raise OptionError(f"{own}: lam must be finite and non-negative, got {lams!r}.")
        lam = float(lams[0]) if len(lams) else 0.0
    else:
        lam = check_positive(own, "lam", float(lam) if isinstance(lam, (np.ndarray, Tensor)) else lam, allow_zero=True)
    on_failure = check_failure_policy(own, on_failure)
    if radius is not None and radius != math.inf:
        radius = check_positive(own, "radius", radius, allow_zero=True)
    cp = _require_cvxpy()
    phi_np, z_np = _as_numpy(phi), _as_numpy(targets)
    m, d = phi_np.shape
    if z_np.ndim != 2 or z_np.shape[1] != m:
        raise OptionError(f"{own}: targets must have shape (r, {m}), got {z_np.shape}.")
    n_constrained = check_int(own, "n_constrained", n_constrained, minimum=0, maximum=d)
    r = z_np.shape[0]
    supp_np = None
    if support is not None:
        supp_np = _as_numpy(support, dtype=bool)
        if supp_np.shape != (r, d):
            raise OptionError(f"{own}: support must have shape ({r}, {d}), got {supp_np.shape}.")
    if lams is not None and lams.shape != (r,):
        raise OptionError(f"{own}: lam must be a scalar or have shape ({r},), got shape {lams.shape}.")
    prog = _build_program(cp, phi_np, lam, mode, radius, n_constrained, weights, supp_np is not None, block_ball)
    result = _solve_each(prog, phi_np, z_np, supp_np, mode, radius, n_constrained, solver, solver_opts, lams)
    if result.n_failed:
        bad = ", ".join(sorted(set(result.status) - {"optimal"}))
        apply_failure_policy(
            on_failure, f"{own}: {result.n_failed} of {r} rows not solved to optimality (status {bad}).", stacklevel=3
        )
    return result
