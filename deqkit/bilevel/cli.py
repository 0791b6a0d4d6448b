"""``deqkit hpo``: HOAG hyperparameter search of ℓ2-regularised logistic regression with
SHINE-family hypergradients (Ramzi et al., ICLR 2022, arXiv 2106.00553; Pedregosa, ICML 2016).

Prints, per estimator, the held-out (validation and test) loss against wall-clock time, a
summary table with each estimator's time to reach the Exact variant's final validation loss
(within 1%), and the hypergradient's agreement with Exact (CG to 1e-12) at the estimator's
final λ.  With ``--out DIR`` writes ``hpo_<dataset>.png`` and ``hpo_<dataset>.json``
(atomically: temporary file + ``os.replace``).

Run without the top-level CLI as ``python -m deqkit.bilevel.cli --dataset synthetic``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch

from deqkit._io import atomic_write_text, save_figure
from deqkit.errors import ConvergenceWarning

from .data import HPO_DATASETS, load_hpo_dataset, logistic_hpo_problem
from .hoag import HOAG, hypergradient_cosine
from .hypergrad import HYPERGRADIENT_NAMES, make_hypergradient

__all__ = ["add_subparser", "build_parser", "run", "main"]


def _estimator_list(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in HYPERGRADIENT_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown hypergradient estimator(s) {bad}; valid: {', '.join(HYPERGRADIENT_NAMES)}")
    return list(dict.fromkeys(names))


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--dataset", choices=HPO_DATASETS, default="breast_cancer",
                   help="reference dataset (default: breast_cancer)")
    p.add_argument("--hypergrad", type=_estimator_list, default=list(HYPERGRADIENT_NAMES),
                   help="comma list of " + ",".join(HYPERGRADIENT_NAMES) + " (default: all)")
    p.add_argument("--outer-steps", type=_positive_int, default=30,
                   help="HOAG outer iterations (default 30)")
    p.add_argument("--seed", type=int, default=0, help="split / synthetic-data seed")
    p.add_argument("--out", default=None, help="directory for the plot (PNG) and JSON results")
    p.add_argument("--per-feature", action="store_true",
                   help="one λ per feature (vector hyperparameter) instead of a scalar")
    p.add_argument("--lam0", type=float, default=0.0, help="initial λ (default 0)")
    p.add_argument("--refine", type=_positive_int, default=5,
                   help="CG iterations of shine-refine (default 5)")
    p.add_argument("--opa-freq", type=_positive_int, default=5,
                   help="OPA update every this many inner steps (default 5)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1, for comparable timings)")
    p.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    return p


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Register ``hpo`` on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "hpo", help="bi-level hyperparameter search with SHINE hypergradients",
        description=__doc__.split("\n\n")[0])
    _configure(p)
    p.set_defaults(func=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser (``python -m deqkit.bilevel.cli``)."""
    return _configure(argparse.ArgumentParser(prog="deqkit hpo", description=__doc__.split("\n\n")[0]))


def _plot(path: str, runs: Dict[str, dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in runs.items():
        t = [h["time_s"] for h in r["history"]]
        axes[0].plot(t, [h["val_loss"] for h in r["history"]], marker=".", label=name)
        axes[1].plot(t, [h["test_loss"] for h in r["history"]], marker=".", label=name)
    for ax, lab in zip(axes, ("validation loss", "test loss")):
        ax.set_xlabel("wall-clock time (s)")
        ax.set_ylabel(lab)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)


def _make(name: str, args: argparse.Namespace):
    """The estimator ``name`` with the CLI's preset options (only those it takes)."""
    opts = {"shine-refine": {"refine": args.refine}, "shine-opa": {"opa_freq": args.opa_freq}}
    return make_hypergradient(name, **opts.get(name, {}))


def _fmt(v: Optional[float], spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def run(args: argparse.Namespace) -> int:
    """Run the ``hpo`` command; returns the exit status."""
    torch.set_num_threads(args.threads)
    splits = load_hpo_dataset(args.dataset, seed=args.seed)
    problem = logistic_hpo_problem(splits)
    d = splits.n_features
    lam0 = torch.full((d,) if args.per_feature else (), float(args.lam0), dtype=torch.float64)
    print(f"deqkit hpo: dataset={args.dataset} (train {len(splits.y_train)}, val "
          f"{len(splits.y_val)}, test {len(splits.y_test)}, d={d}), λ "
          f"{'per feature' if args.per_feature else 'scalar'}, outer steps {args.outer_steps}, "
          f"seed {args.seed}, threads {args.threads}")
    # warm-up (torch/autograd first-call overheads) so that the first timed run is not penalised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name in args.hypergrad:
            HOAG(_make(name, args), outer_steps=1).run(problem, lam0)
    runs: Dict[str, dict] = {}
    for name in args.hypergrad:
        est = _make(name, args)

        def progress(rec, name=name):
            if not args.quiet:
                print(f"  [{name:>13}] step {rec['step']:3d}  t={rec['time_s']:7.3f}s  "
                      f"val={rec['val_loss']:.5f}  test={rec['test_loss']:.5f}  "
                      f"|g|={rec['grad_norm']:.2e}  λ̄={rec['lam_mean']:+.3f}  "
                      f"inner={rec['inner_nstep']:4d}{'' if rec['inner_converged'] else '!'}  "
                      f"hvp={rec['n_hvp']:4d}{'' if rec['linear_converged'] else '!'}"
                      f"{'' if rec['accepted'] else '  (rejected)'}", flush=True)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # counted in the result
            res = HOAG(est, outer_steps=args.outer_steps, callback=progress).run(problem, lam0)
        # agreement with Exact at this estimator's final λ; for a scalar λ the cosine is
        # taken on the per-feature hypergradient at λ·1 (its sum is the scalar one)
        tol = res.history[-1]["inner_tol"]
        lam_vec = res.lam.expand(d).clone() if res.lam.dim() == 0 else res.lam
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            agree = hypergradient_cosine(problem, lam_vec, est, tol=tol)
        runs[name] = {
            "history": res.history, "final_lam": res.lam.tolist(),
            "final_val_loss": res.history[-1]["val_loss"],
            "final_test_loss": res.history[-1]["test_loss"],
            "best_val_loss": res.best_val_loss, "total_time": res.history[-1]["time_s"],
            "cosine_to_exact": agree["cosine"], "rel_error_to_exact": agree["rel_error"],
            "n_inner_not_converged": res.n_inner_not_converged,
            "n_linear_not_converged": res.n_linear_not_converged, "n_rejected": res.n_rejected,
        }
    # held-out loss against time, per estimator
    print("\nheld-out loss against wall-clock time")
    for name, r in runs.items():
        hist = r["history"]
        idx = sorted(set(list(range(0, len(hist), max(1, len(hist) // 6))) + [len(hist) - 1]))
        pts = "  ".join(f"{hist[i]['time_s']:.2f}s:{hist[i]['val_loss']:.4f}/{hist[i]['test_loss']:.4f}"
                        for i in idx)
        print(f"  {name:>13}  (time: val/test)  {pts}")
    target = None
    if "exact" in runs:
        target = 1.01 * runs["exact"]["final_val_loss"]
        for r in runs.values():
            r["time_to_exact_final_1pct"] = next(
                (h["time_s"] for h in r["history"] if h["val_loss"] <= target), None)
            r["time_ratio_vs_exact_total"] = (
                r["time_to_exact_final_1pct"] / runs["exact"]["total_time"]
                if r["time_to_exact_final_1pct"] is not None else None)
    hdr = (f"\n{'estimator':>13} | {'final val':>9} | {'best val':>9} | {'test':>8} | "
           f"{'time (s)':>8} | {'t→exact+1%':>10} | {'ratio':>6} | {'cos(exact)':>10} | "
           f"{'rel err':>8} | {'inner NC':>8} | {'CG NC':>5}")
    print(hdr)
    print("-" * (len(hdr) - 1))
    for name, r in runs.items():
        print(f"{name:>13} | {r['final_val_loss']:9.5f} | {r['best_val_loss']:9.5f} | "
              f"{r['final_test_loss']:8.5f} | {r['total_time']:8.3f} | "
              f"{_fmt(r.get('time_to_exact_final_1pct'), '.3f'):>10} | "
              f"{_fmt(r.get('time_ratio_vs_exact_total'), '.2f'):>6} | "
              f"{r['cosine_to_exact']:10.5f} | {r['rel_error_to_exact']:8.2e} | "
              f"{r['n_inner_not_converged']:8d} | {r['n_linear_not_converged']:5d}")
    if target is not None:
        print(f"(t→exact+1%: first time the validation loss ≤ 1.01 × Exact's final "
              f"{runs['exact']['final_val_loss']:.5f}; ratio: that time / Exact's total time)")
    print("(cos(exact): cosine to Exact-CG(1e-12) of the per-feature hypergradient at the final λ;"
          " rel err: ‖g − g_exact‖/‖g_exact‖ of that vector)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"hpo_{args.dataset}")
        payload = {"dataset": args.dataset, "seed": args.seed, "per_feature": args.per_feature,
                   "outer_steps": args.outer_steps, "n_features": d,
                   "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "estimators": runs}
        atomic_write_text(base + ".json", json.dumps(payload, indent=1))
        _plot(base + ".png", runs, f"HOAG on {args.dataset} "
              f"({'per-feature' if args.per_feature else 'scalar'} λ)")
        print(f"wrote {base}.json and {base}.png")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
