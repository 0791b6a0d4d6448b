"""Speed of the batched ADMM against CVXPY (Clarabel) row by row on the SIM program.

``deqkit bench --section sim-speed --dataset fashion-mnist --samples 2000 --cvxpy-rows 8``:
trains a quick baseline (or loads ``--baseline``), collects states, solves all (A, B) rows with
the ADMM, solves the first ``--cvxpy-rows`` rows with CVXPY, and reports times (CVXPY
extrapolated per row to all rows) and the ADMM's objective gap on the rows both solved.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..._timing import synced_perf_counter
from ...sim.admm import BatchedADMM
from ...sim.baseline import make_mlp, train_mlp
from ...sim.reference import solve_rows_cvxpy
from ...sim.states import collect_states
from ..sim import defaults, load_data

__all__ = ["SimSpeedConfig", "bench_sim_speed", "format_sim_speed"]


@dataclass
class SimSpeedConfig:
    """The SIM speed problem: ``samples`` states of an MLP baseline on ``dataset``, one λ."""

    dataset: str = "digits"
    data_dir: Optional[str] = None
    hidden: list[int] = field(default_factory=lambda: [64, 32, 16])
    samples: int = 1000
    lam: float = 1.0
    cvxpy_rows: int = 8
    cvxpy_tol: float = 1e-6
    baseline: Optional[str] = None
    epochs: int = 10


def _states(cfg: SimSpeedConfig) -> Any:
    xtr, ytr, _, _ = load_data(cfg.dataset, cfg.data_dir)
    net = make_mlp(xtr.shape[1], list(cfg.hidden), int(ytr.max()) + 1)
    if cfg.baseline and os.path.exists(cfg.baseline):
        net.load_state_dict(torch.load(cfg.baseline))
        net.eval()
    else:
        train_mlp(net, xtr, ytr, epochs=cfg.epochs, lr=defaults(cfg.dataset)["lr"])
    return collect_states(net.double(), xtr[: cfg.samples].double())


def bench_sim_speed(cfg: SimSpeedConfig, log: Callable[[str], None] = print, device: Any = "cpu") -> dict[str, Any]:
    """Solve every (A, B) row with the batched ADMM (on ``device``) and the first ``cfg.cvxpy_rows`` with CVXPY (CPU).

    The baseline is trained and its states collected on the CPU; the ADMM's inputs are then moved
    to ``device`` and its time is read after synchronising it.
    """
    st = _states(cfg)
    phi, z, n = st.phi, st.Z.T, st.X.shape[1]
    admm = BatchedADMM(rho=1.0, max_iter=2000, tol=1e-5, tol_abs=1e-7)
    phi_d, z_d = phi.to(device), z.to(device)
    t0 = synced_perf_counter(phi_d.device)
    res = admm.solve(phi_d, z_d, cfg.lam, radius=st.kappa, n_constrained=n)
    t_admm = synced_perf_counter(phi_d.device) - t0
    k = min(cfg.cvxpy_rows, z.shape[0])
    opts = {"tol_gap_abs": cfg.cvxpy_tol, "tol_gap_rel": cfg.cvxpy_tol, "tol_feas": cfg.cvxpy_tol}
    ref = solve_rows_cvxpy(phi, z[:k], cfg.lam, radius=st.kappa, n_constrained=n, solver_opts=opts)
    gap = (res.objective[:k].cpu().numpy() - ref.objective) / np.abs(ref.objective)
    out = {
        "phi_shape": tuple(phi.shape),
        "rows": z.shape[0],
        "admm_s": t_admm,
        "admm_converged": int(res.converged.sum()),
        "admm_max_steps": int(res.nstep.max()),
        "cvxpy_rows": k,
        "cvxpy_s_per_row": ref.time_s / k,
        "gap_max": float(gap.max()),
        "gap_min": float(gap.min()),
        "cvxpy_status": set(ref.status),
    }
    log(format_sim_speed(cfg, out))
    return out


def format_sim_speed(cfg: SimSpeedConfig, r: dict[str, Any]) -> str:
    per_row, rows = r["cvxpy_s_per_row"], r["rows"]
    return "\n".join(
        [
            f"Phi {r['phi_shape']}, {rows} (A,B) rows, lam={cfg.lam}",
            f"ADMM (all {rows} rows, incl. eigendecomposition): {r['admm_s']:.2f} s, "
            f"converged {r['admm_converged']}/{rows}, steps max {r['admm_max_steps']}",
            f"CVXPY/Clarabel (tol {cfg.cvxpy_tol:g}): {per_row:.2f} s/row over {r['cvxpy_rows']} rows -> {per_row * rows:.1f} s for all rows",
            f"speed-up: {per_row * rows / r['admm_s']:.1f}x; ADMM objective rel. gap on those rows: "
            f"max {r['gap_max']:.2e}, min {r['gap_min']:.2e}; CVXPY status {r['cvxpy_status']}",
        ]
    )
