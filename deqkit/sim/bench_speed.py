"""Speed of the batched ADMM against CVXPY (Clarabel) row by row on the SIM program.

``python -m deqkit.sim.bench_speed --dataset fashion-mnist --samples 2000 --cvxpy-rows 8``:
trains a quick baseline (or loads ``--baseline``), collects states, solves all (A, B) rows with
the ADMM, solves the first ``--cvxpy-rows`` rows with CVXPY, and reports times (CVXPY
extrapolated per row to all rows) and the ADMM's objective gap on the rows both solved.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from .admm import BatchedADMM
from .baseline import make_mlp, train_mlp
from .cli import DATASETS, defaults, load_data
from .reference import solve_rows_cvxpy
from .states import collect_states


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deqkit.sim.bench_speed")
    ap.add_argument("--dataset", default="digits", choices=DATASETS)
    ap.add_argument("--data-dir", default=None, help="directory with the four IDX files (as for `deqkit sim`)")
    ap.add_argument("--hidden", default="64,32,16")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--cvxpy-rows", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-6, help="Clarabel gap/feasibility tolerance")
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args(argv)
    xtr, ytr, _, _ = load_data(args.dataset, args.data_dir)
    net = make_mlp(xtr.shape[1], [int(h) for h in args.hidden.split(",")], int(ytr.max()) + 1)
    if args.baseline and os.path.exists(args.baseline):
        net.load_state_dict(torch.load(args.baseline)); net.eval()
    else:
        train_mlp(net, xtr, ytr, epochs=args.epochs, lr=defaults(args.dataset)["lr"])
    net = net.double()
    st = collect_states(net, xtr[: args.samples].double())
    phi, z, n = st.phi, st.Z.T, st.X.shape[1]
    admm = BatchedADMM(rho=1.0, max_iter=2000, tol=1e-5, tol_abs=1e-7)
    t0 = time.perf_counter()
    res = admm.solve(phi, z, args.lam, radius=st.kappa, n_constrained=n)
    t_admm = time.perf_counter() - t0
    k = min(args.cvxpy_rows, z.shape[0])
    opts = {"tol_gap_abs": args.tol, "tol_gap_rel": args.tol, "tol_feas": args.tol}
    ref = solve_rows_cvxpy(phi, z[:k], args.lam, radius=st.kappa, n_constrained=n, solver_opts=opts)
    per_row = ref.time_s / k
    gap = (res.objective[:k].numpy() - ref.objective) / np.abs(ref.objective)
    print(f"Phi {tuple(phi.shape)}, {z.shape[0]} (A,B) rows, lam={args.lam}")
    print(f"ADMM (all {z.shape[0]} rows, incl. eigendecomposition): {t_admm:.2f} s, "
          f"converged {int(res.converged.sum())}/{z.shape[0]}, steps max {int(res.nstep.max())}")
    print(f"CVXPY/Clarabel (tol {args.tol:g}): {per_row:.2f} s/row over {k} rows -> {per_row * z.shape[0]:.1f} s for all rows")
    print(f"speed-up: {per_row * z.shape[0] / t_admm:.1f}x; ADMM objective rel. gap on those rows: "
          f"max {gap.max():.2e}, min {gap.min():.2e}; CVXPY status {set(ref.status)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
