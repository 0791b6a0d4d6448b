"""Speed of the batched ADMM against CVXPY (Clarabel) row by row on the SIM program.

``deqkit bench --section sim-speed --dataset fashion-mnist --samples 2000 --cvxpy-rows 8``:
trains a quick baseline (or loads ``--baseline``), collects states, solves all (A, B) rows with
the ADMM, solves the first ``--cvxpy-rows`` rows with CVXPY, and reports times (CVXPY
extrapolated per row to all rows) and the ADMM's objective gap on the rows both solved.

``--model cnn`` does the same for a convolutional baseline (Tsai et al., arXiv 2209.09389, fit
convolutional baselines too): each row is restricted to its receptive field
(:func:`~deqkit.sim.cnn.cnn_support`), the ADMM runs as ``deqkit sim --model cnn`` runs it
(:func:`~deqkit.sim.fit.fit_sim` with ``support=``, the rows grouped by field), CVXPY solves the
same program row by row on each row's own columns, and its sample rows are spread over the layers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..._options import check_choice
from ..._timing import synced_perf_counter
from ...errors import OptionError
from ...sim.admm import BatchedADMM
from ...sim.baseline import make_mlp, train_mlp
from ...sim.cnn import cnn_support, collect_cnn_states
from ...sim.fit import fit_sim
from ...sim.reference import solve_rows_cvxpy
from ...sim.states import States, collect_states
from ..sim import DATASETS, baseline_mlp, defaults, load_data

__all__ = ["MODELS", "SimSpeedConfig", "bench_sim_speed", "format_sim_speed", "spread_rows"]

#: the baselines of the benchmark (as ``deqkit sim --model``)
MODELS = ("mlp", "cnn")


@dataclass
class SimSpeedConfig:
    """The SIM speed problem: ``samples`` states of a baseline on ``dataset``, one λ.

    ``model``: ``"mlp"`` (widths ``hidden``) or ``"cnn"`` (convolutions of ``channels``,
    ``kernel_size``, ``stride``, ``padding``, then a linear layer; image data sets only), as
    ``deqkit sim --model``."""

    dataset: str = "digits"
    data_dir: Optional[str] = None
    hidden: list[int] = field(default_factory=lambda: [64, 32, 16])
    samples: int = 1000
    lam: float = 1.0
    cvxpy_rows: int = 8
    cvxpy_tol: float = 1e-6
    baseline: Optional[str] = None
    epochs: int = 10
    model: str = "mlp"
    channels: list[int] = field(default_factory=lambda: [8, 16])
    kernel_size: int = 3
    stride: int = 2
    padding: int = 1


def _check(cfg: SimSpeedConfig) -> None:
    own = "bench_sim_speed"
    check_choice(own, "model", cfg.model, MODELS)
    if cfg.model == "cnn" and cfg.dataset not in DATASETS:
        raise OptionError(
            f"{own}: model='cnn' needs an image data set, got dataset={cfg.dataset!r}; "
            f"choose one of {', '.join(DATASETS)}, or use model='mlp'."
        )


def _states(cfg: SimSpeedConfig) -> Any:
    xtr, ytr, _, _ = load_data(cfg.dataset, cfg.data_dir)
    net = make_mlp(xtr.shape[1], list(cfg.hidden), int(ytr.max()) + 1)
    if cfg.baseline and os.path.exists(cfg.baseline):
        net.load_state_dict(torch.load(cfg.baseline))
        net.eval()
    else:
        train_mlp(net, xtr, ytr, epochs=cfg.epochs, lr=defaults(cfg.dataset)["lr"])
    return collect_states(net.double(), xtr[: cfg.samples].double())


def _cnn_states(cfg: SimSpeedConfig) -> tuple[States, tuple[Tensor, Tensor]]:
    """The CNN baseline's states (built and trained as by ``deqkit sim --model cnn``, seed 0) and
    the receptive-field supports ``(support_ab, support_cd)``."""
    xtr, ytr, _, _ = load_data(cfg.dataset, cfg.data_dir)
    torch.manual_seed(0)
    opts = SimpleNamespace(
        dataset=cfg.dataset,
        model="cnn",
        hidden=list(cfg.hidden),
        channels=list(cfg.channels),
        kernel_size=cfg.kernel_size,
        stride=cfg.stride,
        padding=cfg.padding,
        baseline=cfg.baseline if cfg.baseline and os.path.exists(cfg.baseline) else None,  # loaded, never written
        epochs=cfg.epochs,
        lr=None,
        seed=0,
    )
    net, _ = baseline_mlp(opts, xtr, ytr)
    net = net.double().eval()
    p = xtr.shape[1]
    st = collect_cnn_states(net, xtr[: cfg.samples].double(), in_shape=(p,))
    return st, cnn_support(net, (p,))


def spread_rows(layers: Tensor, k: int) -> list[int]:
    """``k`` row indices spread over the layers: an equal share of ``k`` per layer (layer 1
    first takes the remainder), evenly spaced inside each layer's rows; ``layers[i]`` is row
    ``i``'s layer (:meth:`~deqkit.sim.states.States.state_layers`). Sorted."""
    names = sorted(set(int(v) for v in layers.tolist()))
    out: list[int] = []
    for i, l in enumerate(names):
        rows = (layers == l).nonzero().squeeze(1).tolist()
        share = min(len(rows), k // len(names) + (1 if i < k % len(names) else 0))
        out += [rows[int((j + 0.5) * len(rows) / share)] for j in range(share)]
    return sorted(out)


def _on(st: States, device: Any) -> States:
    return dataclasses.replace(st, U=st.U.to(device), Z=st.Z.to(device), X=st.X.to(device), Y=st.Y.to(device))


def _admm() -> BatchedADMM:
    return BatchedADMM(rho=1.0, max_iter=2000, tol=1e-5, tol_abs=1e-7)


def _cvxpy_on(cfg: SimSpeedConfig, phi: Tensor, targets: Tensor, radius: float, n_constrained: int) -> Any:
    opts = {"tol_gap_abs": cfg.cvxpy_tol, "tol_gap_rel": cfg.cvxpy_tol, "tol_feas": cfg.cvxpy_tol}
    return solve_rows_cvxpy(phi, targets, cfg.lam, radius=radius, n_constrained=n_constrained, solver_opts=opts)


def _cvxpy_restricted(cfg: SimSpeedConfig, st: States, rows: list[int], support: Tensor) -> SimpleNamespace:
    """CVXPY row by row, each row on its own columns ``Φ[:, S_i]`` (the same program as with the
    mask ``support[i]``, whose coefficients off ``S_i`` are zero, without the zero variables):
    the row-by-row reference at its best. Returns the rows' ``objective``, ``time_s``, ``status``."""
    objective, time_s, status = [], 0.0, []
    for i in rows:
        cols = support[i].nonzero().squeeze(1)
        ref = _cvxpy_on(cfg, st.phi[:, cols], st.Z.T[[i]], st.kappa, int((cols < st.X.shape[1]).sum()))
        objective.append(float(ref.objective[0]))
        time_s += ref.time_s
        status += ref.status
    return SimpleNamespace(objective=np.array(objective), time_s=time_s, status=status)


def _bench_cnn(cfg: SimSpeedConfig, device: Any) -> dict[str, Any]:
    """The CNN baseline: ``fit_sim`` with the receptive-field supports (all rows, as ``deqkit sim``)
    against CVXPY with the same supports (each row on its own columns) on rows spread over the layers."""
    st, (sup_ab, sup_cd) = _cnn_states(cfg)
    st_d = _on(st, device)
    dev = st_d.U.device
    t0 = synced_perf_counter(dev)
    res = fit_sim(
        st_d, cfg.lam, lam_scale="paper", admm_ab=_admm(), admm_cd=_admm(), support=(sup_ab, sup_cd), on_failure="ignore"
    )
    t_fit = synced_perf_counter(dev) - t0
    layers = st.state_layers()
    rows = spread_rows(layers, cfg.cvxpy_rows)
    ref = _cvxpy_restricted(cfg, st, rows, sup_ab)
    gap = (torch.as_tensor(res.ab.objective)[rows].cpu().numpy() - ref.objective) / np.abs(ref.objective)
    r = st.X.shape[1]
    return {
        "model": "cnn",
        "phi_shape": tuple(st.phi.shape),
        "rows": r,
        "layer_rows": {int(l): int((layers == l).sum()) for l in sorted(set(layers.tolist()))},
        "support_mean": float(sup_ab.sum(1).double().mean()),
        "admm_s": float(res.ab.time_s),
        "fit_s": t_fit,
        "fit_rows": r + int(st.Y.shape[1]),
        "admm_converged": int(res.ab.converged.sum()),
        "admm_max_steps": int(res.ab.nstep.max()),
        "cvxpy_rows": len(rows),
        "cvxpy_row_ids": rows,
        "cvxpy_row_layers": [int(layers[i]) for i in rows],
        "cvxpy_s_per_row": ref.time_s / len(rows),
        "gap_max": float(gap.max()),
        "gap_min": float(gap.min()),
        "cvxpy_status": set(ref.status),
    }


def bench_sim_speed(cfg: SimSpeedConfig, log: Callable[[str], None] = print, device: Any = "cpu") -> dict[str, Any]:
    """Solve every (A, B) row with the batched ADMM (on ``device``) and ``cfg.cvxpy_rows`` of them with CVXPY (CPU).

    MLP: the first ``cfg.cvxpy_rows`` rows. CNN: rows spread over the layers, every row
    restricted to its receptive field for both solvers; the ADMM is :func:`~deqkit.sim.fit.fit_sim`
    with those supports (λ in the paper's units), which also fits the ``(C, D)`` rows (its whole
    time is reported too). The baseline is trained and its states collected on the CPU; the
    ADMM's inputs are then moved to ``device`` and its time is read after synchronising it.
    Raises OptionError for an unknown ``cfg.model`` or a CNN on a data set that is not images.
    """
    _check(cfg)
    if cfg.model == "cnn":
        out = _bench_cnn(cfg, device)
        log(format_sim_speed(cfg, out))
        return out
    st = _states(cfg)
    phi, z, n = st.phi, st.Z.T, st.X.shape[1]
    admm = _admm()
    phi_d, z_d = phi.to(device), z.to(device)
    t0 = synced_perf_counter(phi_d.device)
    res = admm.solve(phi_d, z_d, cfg.lam, radius=st.kappa, n_constrained=n)
    t_admm = synced_perf_counter(phi_d.device) - t0
    k = min(cfg.cvxpy_rows, z.shape[0])
    ref = _cvxpy_on(cfg, phi, z[:k], st.kappa, n)
    gap = (res.objective[:k].cpu().numpy() - ref.objective) / np.abs(ref.objective)
    out = {
        "model": "mlp",
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


def _format_cnn(cfg: SimSpeedConfig, r: dict[str, Any]) -> list[str]:
    per_row, rows = r["cvxpy_s_per_row"], r["rows"]
    layers = ", ".join(f"layer {l}: {c}" for l, c in r["layer_rows"].items())
    sample = ", ".join(f"{i} (layer {l})" for i, l in zip(r["cvxpy_row_ids"], r["cvxpy_row_layers"]))
    arch = f"kernel {cfg.kernel_size}, stride {cfg.stride}, padding {cfg.padding}"
    return [
        f"CNN channels {','.join(map(str, cfg.channels))} ({arch}): Phi {r['phi_shape']}, {rows} (A,B) rows ({layers}), "
        f"lam={cfg.lam} (paper units)",
        f"receptive-field supports: {r['support_mean']:.1f} of {r['phi_shape'][1]} columns per (A,B) row on average",
        f"ADMM (fit_sim, rows grouped by receptive field): (A,B) rows {r['admm_s']:.2f} s, "
        f"converged {r['admm_converged']}/{rows}, steps max {r['admm_max_steps']}; "
        f"whole fit (all {r['fit_rows']} rows, (C,D) included): {r['fit_s']:.2f} s",
        f"CVXPY/Clarabel (tol {cfg.cvxpy_tol:g}, same supports, each row on its own columns): {per_row:.2f} s/row over {r['cvxpy_rows']} rows "
        f"-> {per_row * rows:.1f} s for all (A,B) rows; rows {sample}",
    ]


def format_sim_speed(cfg: SimSpeedConfig, r: dict[str, Any]) -> str:
    """The printed report of :func:`bench_sim_speed`'s result ``r``."""
    per_row, rows = r["cvxpy_s_per_row"], r["rows"]
    if r.get("model") == "cnn":
        head = _format_cnn(cfg, r)
    else:
        head = [
            f"Phi {r['phi_shape']}, {rows} (A,B) rows, lam={cfg.lam}",
            f"ADMM (all {rows} rows, incl. eigendecomposition): {r['admm_s']:.2f} s, "
            f"converged {r['admm_converged']}/{rows}, steps max {r['admm_max_steps']}",
            f"CVXPY/Clarabel (tol {cfg.cvxpy_tol:g}): {per_row:.2f} s/row over {r['cvxpy_rows']} rows -> {per_row * rows:.1f} s for all rows",
        ]
    return "\n".join(
        [
            *head,
            f"speed-up: {per_row * rows / r['admm_s']:.1f}x; ADMM objective rel. gap on those rows: "
            f"max {r['gap_max']:.2e}, min {r['gap_min']:.2e}; CVXPY status {r['cvxpy_status']}",
        ]
    )
