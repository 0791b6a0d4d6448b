"""SIM against global magnitude pruning at matched density: clean and FGSM/PGD accuracy.

``python -m deqkit.apps.bench.sim_pruning --datasets digits,synthetic --models mlp --seeds 1``

For each data set, architecture (``mlp``; ``cnn`` on image data) and seed: train the baseline,
then at each target density (fraction of the baseline's non-zero weights and biases; a CNN's
counted in its unrolled, implicit form for both methods):

- ``SIM``: ``fit_sim(density=d, debias=True, lam_scale=--lam-scale)`` on the states of ``--samples`` training inputs
  (no labels, no backprop; MLP ``structure="feedforward"``, CNN receptive-field supports);
- ``SIM+ft``: that model fine-tuned ``--ft-epochs`` epochs on the labels (masked, projected);
- ``SIM-robust`` (with ``--input-radius``/``--output-radius``): the robust program;
- ``prune``: one-shot global magnitude pruning to the density SIM reached;
- ``prune+ft``: that network fine-tuned with the same budget (epochs, lr, batch, masked).

Prints one table per data set/architecture (mean over seeds) and writes ``sim_pruning.json``
(atomically, after every seed, so an interrupted run keeps what finished).

``deqkit bench --section sim-pruning`` runs a small version (:class:`SimPruningConfig`'s
defaults); :data:`FULL_COMMAND` is the full one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, cast

import torch
from torch import Tensor, nn

from ..._io import atomic_write_bytes
from ...errors import ConvergenceWarning, OptionError
from ...sim.attacks import accuracy, robust_accuracy
from ...sim.baseline import make_mlp, train_mlp
from ...sim.cnn import cnn_layers, cnn_support, collect_cnn_states, make_cnn
from ...sim.fit import LAM_SCALES, RADIUS_SCALES, baseline_nonzeros, count_nonzeros, finetune, fit_sim
from ...sim.pruning import magnitude_prune, masked_finetune
from ...sim.robust import certified_linf_gain
from ...sim.states import collect_states
from ..sim import DATASETS, defaults, image_shape, load_data

__all__ = ["FULL_COMMAND", "SimPruningConfig", "bench_sim_pruning", "main", "run"]

METHODS = ("SIM", "SIM+ft", "SIM-robust", "prune", "prune+ft")
#: data sets the benchmark knows (``synthetic``: sklearn's ``make_classification``)
PRUNING_DATASETS = (*DATASETS, "synthetic")
#: the full benchmark (all data sets, both architectures, 3 seeds, 3 densities; hours on a CPU)
FULL_COMMAND = (
    "python -m deqkit.apps.bench.sim_pruning --datasets digits,synthetic,fashion-mnist --models mlp,cnn "
    "--seeds 3 --densities 0.7,0.5,0.3 --ft-epochs 5"
)


def synthetic(seed: int = 0) -> tuple[Tensor, ...]:
    """sklearn ``make_classification``: 6000 samples, 30 features (min-max scaled to [0, 1] on the
    training part), 5 classes; 5000 train / 1000 test."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=6000, n_features=30, n_informative=10, n_classes=5, random_state=seed)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    lo, hi = x[:5000].min(0).values, x[:5000].max(0).values
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    return x[:5000], y[:5000], x[5000:], y[5000:]


def _data(name: str, data_dir: str | None, seed: int) -> tuple[Tensor, ...]:
    if name == "synthetic":
        return synthetic(0)
    return load_data(name, data_dir, seed=seed)


def _baseline(args: Any, model: str, xtr: Tensor, ytr: Tensor, seed: int, name: str) -> nn.Module:
    torch.manual_seed(seed)
    q = int(ytr.max()) + 1
    if model == "cnn":
        shape = image_shape(xtr.shape[1])
        net: nn.Module = nn.Sequential(nn.Unflatten(1, shape), *make_cnn(shape, list(args.channels), q))
    else:
        hidden = [64, 32] if name == "synthetic" else list(args.hidden)
        net = make_mlp(xtr.shape[1], hidden, q)
    d = defaults(name) if name != "synthetic" else {"epochs": 40, "lr": 3e-3}
    epochs = args.epochs if args.epochs is not None else d["epochs"]
    return train_mlp(net, xtr.float(), ytr, epochs=epochs, lr=d["lr"], seed=seed).double().eval()


def _nnz(net: nn.Module, model: str, p: int) -> int:
    if model == "cnn":
        return sum(
            int((lay.weight.abs() >= 1e-6).sum()) + int((lay.bias.abs() >= 1e-6).sum()) for lay in cnn_layers(net, (p,)).layers
        )
    return baseline_nonzeros(net)


def _row(
    net: nn.Module,
    nnz: int,
    ref: int,
    test: tuple[Tensor, Tensor],
    attack: tuple[Tensor, Tensor],
    args: Any,
    seed: int,
    extra: dict | None = None,
) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        row = {"accuracy": accuracy(net, *test), "density": nnz / ref}
        for att in ("fgsm", "pgd"):
            kw = {"steps": args.pgd_steps, "seed": seed} if att == "pgd" else {}
            rob = robust_accuracy(net, *attack, args.eps, attack=att, **kw)
            row.update({f"{att}@{e:g}": v for e, v in rob.items()})
    row.update(extra or {})
    return row


def run_one(args: Any, name: str, model: str, seed: int, log=print) -> dict:
    """Every method at every density for one data set, architecture and seed."""
    xtr, ytr, xte, yte = _data(name, args.data_dir, seed)
    dt = torch.float64
    xtr, xte = xtr.to(dt), xte.to(dt)
    if args.n_test:
        xte, yte = xte[: args.n_test], yte[: args.n_test]
    test, attack = (xte, yte), (xte[: args.n_attack], yte[: args.n_attack])
    t0 = time.perf_counter()
    net = _baseline(args, model, xtr, ytr, seed, name)
    p = xtr.shape[1]
    ref = _nnz(net, model, p)
    m = args.samples or (1000 if name == "digits" else 2000)
    rows: dict[str, Any] = {"baseline": _row(net, ref, ref, test, attack, args, seed, {"train_s": time.perf_counter() - t0})}
    if model == "cnn":
        states = collect_cnn_states(net, xtr[:m], in_shape=(p,))
        fit_kw: dict[str, Any] = {"support": cnn_support(net, (p,))}
    else:
        states = collect_states(net, xtr[:m])
        fit_kw = {"structure": "feedforward"}
    states.reference_nnz = ref
    count = lambda n_: _nnz(n_, model, p)
    for d in args.densities:
        key = f"{d:g}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            t1 = time.perf_counter()
            res = fit_sim(states, density=d, debias=True, lam_scale=args.lam_scale, **fit_kw)
            fit_s = time.perf_counter() - t1
        if res.search is not None and not res.search.converged:  # the warning is silenced above with the ADMM's row warnings
            log(
                f"  {name}/{model} seed {seed}: the density search missed {100 * d:g}% "
                f"(reached {100 * res.search.density:.2f}% in {res.search.nstep} solves)",
                file=sys.stderr,
            )
        sim = res.model.eval()
        sim_nnz = count_nonzeros(sim)["total"]
        gain = certified_linf_gain(sim)
        out = {
            "SIM": _row(
                sim,
                sim_nnz,
                ref,
                test,
                attack,
                args,
                seed,
                {"lam": res.lam, "fit_s": fit_s, "certified_gain": gain.gain if gain.certified else None},
            )
        }
        tuned = finetune(copy.deepcopy(sim), xtr, ytr, epochs=args.ft_epochs, lr=args.ft_lr, seed=seed)
        out["SIM+ft"] = _row(tuned, count_nonzeros(tuned)["total"], ref, test, attack, args, seed)
        if args.input_radius is not None or args.output_radius is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                rob = fit_sim(
                    states,
                    density=d,
                    debias=True,
                    lam_scale=args.lam_scale,
                    input_radius=args.input_radius,
                    output_radius=args.output_radius,
                    radius_scale=args.radius_scale,
                    **fit_kw,
                )
            g = certified_linf_gain(rob.model)
            out["SIM-robust"] = _row(
                rob.model.eval(),
                count_nonzeros(rob.model)["total"],
                ref,
                test,
                attack,
                args,
                seed,
                {"lam": rob.lam, "certified_gain": g.gain if g.certified else None},
            )
        # pruning to the density SIM reached (matched), then with the same fine-tuning budget
        pruned = magnitude_prune(net, res.density or d, count=count, reference=ref)
        pr_nnz = _nnz(pruned, model, p)
        out["prune"] = _row(pruned, pr_nnz, ref, test, attack, args, seed)
        pft = masked_finetune(copy.deepcopy(pruned), xtr, ytr, epochs=args.ft_epochs, lr=args.ft_lr, seed=seed)
        out["prune+ft"] = _row(pft, _nnz(pft, model, p), ref, test, attack, args, seed)
        rows[key] = out
        log(
            f"  {name}/{model} seed {seed} density {key}: "
            + ", ".join(f"{k} {100 * v['accuracy']:.2f}% @ {100 * v['density']:.1f}%" for k, v in out.items()),
            file=sys.stderr,
        )
    rows["seed"] = seed
    return rows


def format_table(name: str, model: str, runs: list[dict], args: Any) -> str:
    """Mean over seeds: one line per (density, method), the baseline first."""
    cols = ["accuracy", "density"] + [f"{a}@{e:g}" for a in ("fgsm", "pgd") for e in args.eps]
    head = (
        f"{name}/{model} ({len(runs)} seed{'s' if len(runs) != 1 else ''})\n{'target':>7} {'method':>11}"
        + "".join(f"{c:>10}" for c in cols)
        + f"{'gain':>9}"
    )

    def mean(rows: list[dict], c: str) -> float:
        return sum(r[c] for r in rows) / len(rows)

    lines = [head]
    base = [r["baseline"] for r in runs]
    lines.append(f"{'-':>7} {'baseline':>11}" + "".join(f"{100 * mean(base, c):10.2f}" for c in cols))
    for d in args.densities:
        key = f"{d:g}"
        for meth in METHODS:
            rows = [r[key][meth] for r in runs if meth in r[key]]
            if not rows:
                continue
            gains = [r.get("certified_gain") for r in rows if r.get("certified_gain") is not None]
            g = f"{sum(gains) / len(gains):9.3g}" if gains else f"{'':>9}"
            lines.append(f"{100 * d:6.0f}% {meth:>11}" + "".join(f"{100 * mean(rows, c):10.2f}" for c in cols) + g)
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deqkit.apps.bench.sim_pruning", description=cast(str, __doc__).split("\n")[0])
    lst = lambda t: lambda s: [t(v) for v in s.split(",") if v]
    p.add_argument("--datasets", type=lst(str), default=["digits", "synthetic"], help="digits, synthetic, fashion-mnist, …")
    p.add_argument("--models", type=lst(str), default=["mlp"], help="mlp and/or cnn (cnn: image data sets only)")
    p.add_argument("--seeds", type=int, default=1, help="how many seeds: --first-seed … --first-seed + N − 1")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0), to add seeds to an earlier run")
    p.add_argument("--densities", type=lst(float), default=[0.7, 0.5, 0.3])
    p.add_argument("--hidden", type=lst(int), default=[64, 32, 16], help="MLP hidden widths (synthetic: 64,32)")
    p.add_argument("--channels", type=lst(int), default=[8, 16], help="CNN channels")
    p.add_argument("--epochs", type=int, default=None, help="baseline epochs (None: deqkit sim's defaults)")
    p.add_argument("--samples", type=int, default=None, help="state samples (None: 1000 digits, 2000 others)")
    p.add_argument("--ft-epochs", type=int, default=5, help="fine-tuning epochs, the same for SIM and pruning")
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--eps", type=lst(float), default=[0.05, 0.1])
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--n-attack", type=int, default=300)
    p.add_argument("--lam-scale", choices=LAM_SCALES, default="pooled", help="fit_sim's lam_scale (how the rows are weighed)")
    p.add_argument("--input-radius", type=float, default=None, help="also run SIM-robust with this B-row ℓ1 bound")
    p.add_argument("--output-radius", type=float, default=None, help="… and this [C D]-row ℓ1 bound")
    p.add_argument("--radius-scale", choices=RADIUS_SCALES, default="absolute", help="fit_sim's radius_scale")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/sim_pruning")
    return p


def run(args: Any, log=print) -> dict:
    for m in args.models:
        if m not in ("mlp", "cnn"):
            raise OptionError(f"sim_pruning: --models takes mlp and cnn, got {m!r}.")
    if args.seeds < 1 or args.first_seed < 0:
        raise OptionError(f"sim_pruning: --seeds must be >= 1 and --first-seed >= 0, got {args.seeds} and {args.first_seed}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    results: dict[str, Any] = {"command": " ".join(sys.argv), "settings": {k: v for k, v in vars(args).items()}, "runs": {}}
    for name in args.datasets:
        for model in args.models:
            if model == "cnn" and name == "synthetic":
                continue
            runs = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                runs.append(run_one(args, name, model, seed, log))
                results["runs"][f"{name}/{model}"] = runs
                atomic_write_bytes(out / "sim_pruning.json", json.dumps(results, indent=1).encode())
            log(format_table(name, model, runs, args))
    return results


@dataclass
class SimPruningConfig:
    """Settings of ``deqkit bench --section sim-pruning`` (the flags of this module that it sets).

    The defaults are a small run: the MLP rows of the full benchmark (digits and synthetic, one
    seed, densities 0.7, 0.5, 0.3; this module's fine-tuning and attack settings), under a
    minute on one CPU thread.
    ``None`` keeps this module's own default (``epochs``: ``deqkit sim``'s per data set;
    ``samples``: 1000 digits, 2000 others; ``hidden``: 64,32,16; ``n_test``: the whole test split).
    """

    datasets: list[str] = field(default_factory=lambda: ["digits", "synthetic"])
    models: list[str] = field(default_factory=lambda: ["mlp"])
    seeds: int = 1
    densities: list[float] = field(default_factory=lambda: [0.7, 0.5, 0.3])
    hidden: Optional[list[int]] = None
    epochs: Optional[int] = None
    samples: Optional[int] = None
    ft_epochs: int = 5
    n_test: Optional[int] = None
    n_attack: int = 300
    pgd_steps: int = 10
    data_dir: Optional[str] = None
    out: str = "runs/sim_pruning"

    def args(self) -> argparse.Namespace:
        """This module's parsed flags for these settings (its defaults elsewhere)."""
        ns = parser().parse_args([])
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(ns, f.name, list(value) if isinstance(value, list) else value)
        return ns

    def command(self) -> str:
        """The equivalent ``python -m deqkit.apps.bench.sim_pruning`` command line."""
        parts = ["python -m deqkit.apps.bench.sim_pruning"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, list) else value
                parts.append(f"--{f.name.replace('_', '-')} {text}")
        return " ".join(parts)


def bench_sim_pruning(cfg: SimPruningConfig, log: Any = print) -> dict:
    """Run the benchmark with ``cfg``'s settings: prints its tables, writes ``<out>/sim_pruning.json``."""
    for name in cfg.datasets:
        if name not in PRUNING_DATASETS:
            raise OptionError(f"sim_pruning: unknown data set {name!r}; choose from {', '.join(PRUNING_DATASETS)}.")
    log(f"({cfg.command()}; the full benchmark: {FULL_COMMAND})")
    return run(cfg.args(), log)


def main(argv: list[str] | None = None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
