"""``deqkit sim``: state-driven implicit modeling end to end (Tsai et al., arXiv 2209.09389).

Trains (or loads) an MLP baseline, collects its states on ``m`` training samples, solves the
SIM program for each λ, and reports non-zeros, accuracy, well-posedness and FGSM/PGD
robustness; writes ``sim_results.json`` and ``sim.png`` (atomically) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from .._io import atomic_write_bytes
from ..data import DATASETS as _ALL_DATASETS
from ..data import load_dataset
from ..errors import ConvergenceWarning
from .admm import MODES, BatchedADMM
from .attacks import ATTACKS, accuracy, robust_accuracy
from .baseline import make_mlp, train_mlp
from .fit import LAM_SCALES, PENALTIES, SOLVERS, STRUCTURES, baseline_nonzeros, count_nonzeros, finetune, fit_sim
from .states import collect_states

#: Data sets of :mod:`deqkit.data` the command offers: those whose raw inputs lie in [0, 1], the
#: box the attacks clip to (``mnist1d``'s signals are not scaled, so it is left out).
DATASETS: tuple[str, ...] = tuple(n for n in _ALL_DATASETS if n != "mnist1d")

_DEFAULTS = {  # per data set: samples, epochs, lr (data sets not listed use _FALLBACK)
    "digits": {"samples": 1000, "epochs": 60, "lr": 3e-3},
    "mnist5k": {"samples": 2000, "epochs": 20, "lr": 1e-3},
    "fashion-mnist": {"samples": 2000, "epochs": 10, "lr": 1e-3},
    "mnist": {"samples": 2000, "epochs": 10, "lr": 1e-3},
}
_FALLBACK = {"samples": 2000, "epochs": 10, "lr": 1e-3}


def defaults(name: str) -> dict:
    """Default ``samples``, ``epochs`` and ``lr`` for data set ``name``."""
    return _DEFAULTS.get(name, _FALLBACK)


def load_data(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)`` for SIM, through :func:`deqkit.data.load_dataset`.

    Inputs are flattened and only scaled to [0, 1] (``normalize=False``): the attacks clip to
    that box and ε is in pixel units. SIM needs no validation split (``val_fraction=0``), so the
    whole training pool trains (all 60k Fashion-MNIST training images). The test split is the
    official one where there is one (fashion-mnist, mnist; in file order), else deqkit.data's
    stratified hold-out drawn with ``test_seed=0``, the same for every ``seed``. The training
    samples come in a random order drawn with ``seed``; the command takes the first ``m`` of them
    as state samples.
    """
    splits = load_dataset(name, data_dir=data_dir, val_fraction=0.0, seed=seed, test_seed=0,
                          flatten=True, normalize=False)
    return (*splits.train.tensors, *splits.test.tensors)


#: the options that shape the results: a run resumed with --resume must have the same
RESULT_SETTINGS = (
    "dataset", "hidden", "samples", "kappa", "mode", "solver", "rho", "max_iter_ab", "max_iter_cd", "lam_scale",
    "penalty", "input_weight", "structure", "output_skip", "debias", "finetune_epochs", "finetune_lr", "seed",
    "attacks", "eps", "pgd_steps", "n_test", "n_attack",
)


def _resumed_rows(path: Path, results: dict) -> dict:
    """Rows of a previous run at ``path`` by ``(λ, fine-tuning epochs)``, after checking that
    it was made with the same settings and baseline as ``results`` (ValueError otherwise)."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    changed = [f"{k}: {old.get(k)!r} -> {results[k]!r}" for k in RESULT_SETTINGS if old.get(k) != results[k]]
    if changed:
        raise ValueError(f"--resume: {path} was written with other settings ({'; '.join(changed)}); "
                         "use another --out, or drop --resume to start over")
    ob, nb = old.get("baseline", {}), results["baseline"]
    if (ob.get("accuracy"), ob.get("nnz")) != (nb["accuracy"], nb["nnz"]):
        raise ValueError(f"--resume: {path} was written for another baseline (test accuracy {ob.get('accuracy')} vs "
                         f"{nb['accuracy']}); pass the same --baseline file")
    return {(r["lam"], r["finetune_epochs"]): r for r in old.get("sim", [])}


def _floats(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return vals


def _ints(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from exc
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return vals


def _names(valid: Sequence[str]):
    def parse(text: str) -> list[str]:
        vals = [t.strip() for t in text.split(",") if t.strip()]
        bad = [v for v in vals if v not in valid]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"invalid {bad or text!r}; valid: {', '.join(valid)}")
        return vals

    return parse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="data set (default: digits)")
    p.add_argument("--data-dir", default=None,
                   help="directory with the four IDX files (fashion-mnist: default /usr/share/datasets/fashion-mnist; mnist: required)")
    p.add_argument("--hidden", type=_ints, default=[64, 32, 16], help="hidden widths of the MLP baseline (default 64,32,16)")
    p.add_argument("--lam", type=_floats, default=[0.01, 0.1, 0.3, 1.0], help="λ values, comma-separated")
    p.add_argument("--lam-scale", choices=LAM_SCALES, default="none", help="per-row λ scaling (default none)")
    p.add_argument("--penalty", choices=PENALTIES, default="uniform",
                   help="ℓ1 weights: uniform (paper, default) or standardized (rescaling-invariant, experimental)")
    p.add_argument("--input-weight", type=float, default=1.0,
                   help="per-block λ: ℓ1 weight of the input columns of B, D relative to A, C and the bias (default 1, the paper's uniform penalty)")
    p.add_argument("--structure", choices=STRUCTURES, default="full",
                   help="full (paper, default): any state may feed any state; feedforward: states read only earlier layers")
    p.add_argument("--output-skip", action=argparse.BooleanOptionalAction, default=True,
                   help="let the outputs read the inputs directly (D's input columns; default yes)")
    p.add_argument("--debias", action="store_true", help="refit each row by least squares on its lasso support (relaxed lasso)")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="after each fit, also fine-tune a copy on the training labels for this many epochs, "
                        "sparsity pattern and well-posedness kept (default 0: SIM alone)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="Adam learning rate of the fine-tuning (default 1e-3)")
    p.add_argument("--kappa", type=float, default=0.99, help="well-posedness margin κ (default 0.99)")
    p.add_argument("--samples", type=int, default=None, help="state samples m (default 1000 digits, 2000 others)")
    p.add_argument("--mode", choices=MODES, default="relaxed")
    p.add_argument("--solver", choices=SOLVERS, default="admm")
    p.add_argument("--rho", type=float, default=1.0, help="ADMM penalty ρ (default 1)")
    p.add_argument("--max-iter-ab", type=int, default=2000, help="ADMM iterations for (A, B) rows")
    p.add_argument("--max-iter-cd", type=int, default=1000, help="ADMM iterations for (C, D) rows")
    p.add_argument("--epochs", type=int, default=None, help="baseline training epochs")
    p.add_argument("--lr", type=float, default=None, help="baseline learning rate")
    p.add_argument("--baseline", default=None, help="baseline state_dict: loaded if it exists, else trained and saved")
    p.add_argument("--eps", type=_floats, default=[0.0, 0.02, 0.05, 0.1], help="attack radii ε (ℓ∞, inputs in [0, 1])")
    p.add_argument("--attacks", type=_names(ATTACKS), default=list(ATTACKS), help="fgsm,pgd")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--n-test", type=int, default=None, help="test samples for accuracy (default all)")
    p.add_argument("--n-attack", type=int, default=300, help="test samples for the attacks (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="sim_out", help="output directory (sim_results.json, sim.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="keep the λ already in OUT/sim_results.json (same settings and baseline; λ not asked for this "
                        "time are kept too) and run the rest; a λ after a kept one starts its solve cold, so it can "
                        "differ from an uninterrupted run within the ADMM tolerance")
    return p


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Register ``sim`` on an ``argparse`` subparsers object; returns the new parser."""
    p = subparsers.add_parser("sim", help="state-driven implicit models (SIM) from an MLP baseline", description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _plot(results: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = results["sim"]
    plain = [r for r in rows if not r.get("finetune_epochs")]
    tuned = [r for r in rows if r.get("finetune_epochs")]
    lams = [r["lam"] for r in plain]
    ax = axes[0]
    ax.plot(lams, [100 * r["accuracy"] for r in plain], "o-", color="C0", label="SIM accuracy")
    if tuned:
        ax.plot([r["lam"] for r in tuned], [100 * r["accuracy"] for r in tuned], "o:", color="C2",
                label="SIM + fine-tuning accuracy")
    ax.axhline(100 * results["baseline"]["accuracy"], color="C0", ls="--", label="baseline accuracy")
    ax.set_xscale("log")
    ax.set_xlabel("λ")
    ax.set_ylabel("test accuracy (%)", color="C0")
    ax2 = ax.twinx()
    ax2.plot(lams, [r["nnz"]["total"] for r in plain], "s-", color="C1", label="SIM non-zeros")
    ax2.axhline(results["baseline"]["nnz"], color="C1", ls="--", label="baseline non-zeros")
    ax2.set_ylabel("non-zeros of (A, B, C, D)", color="C1")
    ax.set_title("accuracy and non-zeros against λ")
    ax = axes[1]
    for attack in results["attacks"]:
        ls = "-" if attack == "fgsm" else ":"
        rob = results["baseline"]["robust"].get(attack)
        if rob:
            eps = sorted(float(e) for e in rob)
            ax.plot(eps, [100 * rob[str(e)] for e in eps], "k" + ls, marker="o", label=f"baseline {attack}")
        for i, r in enumerate(rows):
            rob = r["robust"].get(attack)
            if rob:
                eps = sorted(float(e) for e in rob)
                ax.plot(eps, [100 * rob[str(e)] for e in eps], ls, color=f"C{i % 10}", marker=".", label=f"SIM λ={r['lam']:g}{' +ft' if r.get('finetune_epochs') else ''} {attack}")
    ax.set_xlabel("ε (ℓ∞)")
    ax.set_ylabel("accuracy under attack (%)")
    ax.set_title("robustness")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run(args: argparse.Namespace) -> int:
    """Run the SIM pipeline for parsed ``args``; returns the exit status."""
    for name, val, lo in (("samples", args.samples, 1), ("n_attack", args.n_attack, 0), ("pgd_steps", args.pgd_steps, 1)):
        if val is not None and val < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {val}")
    if not (0 < args.kappa < 1):
        raise ValueError(f"--kappa must be in (0, 1), got {args.kappa}")
    if not (args.input_weight > 0 and math.isfinite(args.input_weight)):
        raise ValueError(f"--input-weight must be a finite number > 0, got {args.input_weight}")
    if args.finetune_epochs < 0:
        raise ValueError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if not (args.finetune_lr > 0 and math.isfinite(args.finetune_lr)):
        raise ValueError(f"--finetune-lr must be a finite number > 0, got {args.finetune_lr}")
    if args.debias and args.mode != "relaxed":
        raise ValueError("--debias refits by least squares and needs --mode relaxed")
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    d = defaults(args.dataset)
    m = args.samples or d["samples"]
    xtr, ytr, xte, yte = load_data(args.dataset, args.data_dir, seed=args.seed)
    if args.n_test is not None:
        xte, yte = xte[: args.n_test], yte[: args.n_test]
    q = int(ytr.max()) + 1
    net = make_mlp(xtr.shape[1], list(args.hidden), q)
    t0 = time.perf_counter()
    if args.baseline and os.path.exists(args.baseline):
        net.load_state_dict(torch.load(args.baseline, map_location="cpu"))
        net.eval()
        how = f"loaded {args.baseline}"
    else:
        train_mlp(net, xtr, ytr, epochs=args.epochs if args.epochs is not None else d["epochs"], lr=args.lr or d["lr"], seed=args.seed)
        how = f"trained in {time.perf_counter() - t0:.1f}s"
        if args.baseline:
            import io

            buf = io.BytesIO()
            torch.save(net.state_dict(), buf)
            atomic_write_bytes(Path(args.baseline), buf.getvalue())
    dt = torch.float64
    net = net.to(device=dev, dtype=dt).eval()
    xtr, xte, ytr, yte = xtr.to(dev, dt), xte.to(dev, dt), ytr.to(dev), yte.to(dev)
    n_att = min(args.n_attack, len(xte))
    xa, ya = xte[:n_att], yte[:n_att]
    def robust(model) -> dict:
        accs: dict = {}
        if n_att == 0:
            return accs
        for att in args.attacks:
            # the same random PGD starts for every model (and for a resumed run)
            kw = {"steps": args.pgd_steps, "seed": args.seed} if att == "pgd" else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                accs[att] = {str(k): v for k, v in robust_accuracy(model, xa, ya, args.eps, attack=att, **kw).items()}
        return accs

    base_acc = accuracy(net, xte, yte)
    base_nnz = baseline_nonzeros(net)
    results = {"command": " ".join(sys.argv)}
    results.update({k: getattr(args, k) for k in RESULT_SETTINGS})
    results.update({"hidden": list(args.hidden), "samples": m, "attacks": list(args.attacks), "eps": list(args.eps)})
    results.update({"baseline": {"accuracy": base_acc, "nnz": base_nnz, "how": how, "robust": robust(net)},
                    "sim": [], "complete": False})
    out = Path(args.out)
    done = _resumed_rows(out / "sim_results.json", results) if args.resume else {}
    print(f"baseline MLP {xtr.shape[1]}-{'-'.join(map(str, args.hidden))}-{q} ({how}): "
          f"test accuracy {100 * base_acc:.2f}%, non-zeros {base_nnz}")
    states = collect_states(net, xtr[:m], kappa=args.kappa, dtype=dt)
    admm_ab = BatchedADMM(rho=args.rho, max_iter=args.max_iter_ab, mode=args.mode)
    admm_cd = BatchedADMM(rho=args.rho, max_iter=args.max_iter_cd, mode=args.mode)
    prev = None

    def evaluate(model, lam: float, res, finetune_epochs: int) -> dict:
        with warnings.catch_warnings(record=True) as fwd_warn:
            warnings.simplefilter("always", ConvergenceWarning)
            acc = accuracy(model, xte, yte)
        nnz = count_nonzeros(model)
        return {
            "lam": lam,
            "finetune_epochs": finetune_epochs,
            "accuracy": acc,
            "nnz": nnz,
            "nnz_fraction": nnz["total"] / base_nnz,
            "A_inf_norm": model.inf_norm(),
            "wellposed": model.is_wellposed(),
            "solve_time_s": res.time_s,
            "solver_converged": res.converged,
            "forward_warnings": len(fwd_warn),
            "robust": robust(model),
        }

    for lam in args.lam:
        wanted = [(lam, 0)] + ([(lam, args.finetune_epochs)] if args.finetune_epochs else [])
        if all(key in done for key in wanted):
            print(f"  λ={lam:g}: kept from {out / 'sim_results.json'} (--resume)", file=sys.stderr)
            results["sim"] += [done[key] for key in wanted]
            prev = None  # the next λ's solve starts cold: same program, same solution within tolerance
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            res = fit_sim(states, lam, method=args.solver, mode=args.mode, admm_ab=admm_ab, admm_cd=admm_cd,
                          warm_start=prev, lam_scale=args.lam_scale if args.solver == "admm" else "none",
                          penalty=args.penalty, input_weight=args.input_weight, structure=args.structure,
                          output_skip=args.output_skip, debias=args.debias)
        for w in caught:
            print(f"  warning: {w.message}", file=sys.stderr)
        model = res.model.eval()
        prev = model
        results["sim"].append(evaluate(model, lam, res, finetune_epochs=0))
        if args.finetune_epochs:
            tuned = copy.deepcopy(model)
            t0 = time.perf_counter()
            finetune(tuned, xtr, ytr, epochs=args.finetune_epochs, lr=args.finetune_lr, seed=args.seed,
                     log=lambda e, loss: print(f"  fine-tuning λ={lam:g}: epoch {e}/{args.finetune_epochs}, "
                                               f"train loss {loss:.4f}", file=sys.stderr, flush=True))
            elapsed = time.perf_counter() - t0
            row = evaluate(tuned, lam, res, finetune_epochs=args.finetune_epochs)
            row["finetune_time_s"] = elapsed
            results["sim"].append(row)
        # every finished λ is on disk (atomically): an interrupted run keeps it for --resume
        atomic_write_bytes(out / "sim_results.json", json.dumps(results, indent=2).encode())
    asked = {(r["lam"], r["finetune_epochs"]) for r in results["sim"]}
    kept = [r for key, r in done.items() if key not in asked]  # λ of the earlier run not asked for now
    results["sim"] = sorted(results["sim"] + kept, key=lambda r: (r["lam"], r["finetune_epochs"]))
    # table
    eps_cols = [(a, str(float(e))) for a in args.attacks for e in args.eps if n_att]
    head = f"{'model':>18} {'acc %':>7} {'nnz':>7} {'nnz %':>6} {'‖A‖∞':>6} {'ok':>3} {'solve s':>7}"
    head += "".join(f" {a}@{float(e):g}".rjust(11) for a, e in eps_cols)
    print(head)

    def fmt(name, acc, nnz, frac, ainf, ok, t, rob):
        s = f"{name:>18} {100 * acc:7.2f} {nnz:7d} {100 * frac:6.1f} {ainf:>6} {ok:>3} {t:>7}"
        return s + "".join(f"{100 * rob[a][e]:11.1f}" for a, e in eps_cols)

    b = results["baseline"]
    print(fmt("baseline", b["accuracy"], b["nnz"], 1.0, "-", "-", "-", b["robust"]))
    for r in results["sim"]:
        name = f"SIM λ={r['lam']:g}" + (f" +ft{r['finetune_epochs']}" if r["finetune_epochs"] else "")
        print(fmt(name, r["accuracy"], r["nnz"]["total"], r["nnz_fraction"], f"{r['A_inf_norm']:.3f}",
                  "yes" if r["wellposed"] else "NO", f"{r['solve_time_s']:.1f}", r["robust"]))
    results["complete"] = True
    atomic_write_bytes(out / "sim_results.json", json.dumps(results, indent=2).encode())
    if not args.no_plot:
        _plot(results, out / "sim.png")
    print(f"wrote {out / 'sim_results.json'}" + ("" if args.no_plot else f" and {out / 'sim.png'}"))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="deqkit sim", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
