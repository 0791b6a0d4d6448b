"""Sweep AutoAdjoint's ``switch_rate`` (the default ``Exact()``'s Picard → GMRES hand-over).

    python tools/bench_switch_rate.py [--rates 0.7,0.8,0.9] [--repeats 25] [--no-train]

Two kinds of workload, each printed as a table of backward milliseconds (median) and VJPs:

* the step benchmark's ``reference`` and ``hard`` MLP cells at initialisation (digits batch of 64),
  each with an Anderson (m=6, rel tol 1e-4) and with the configuration's Broyden forward;
  interleaved rounds, one training step each (as ``deqkit bench --section step``);
* whole ``deqkit compare`` training runs (digits, 8 epochs): the backward cost averaged over
  training, where the cell's contraction changes as it learns.

The rates are compared with plain GMRES (``Exact(GMRES())``) in the same runs.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from deqkit import Anderson, Exact
from deqkit.apps import compare
from deqkit.apps.bench.config import HARD, REFERENCE, build_model, digits_batch
from deqkit.apps.bench.measure import quiet, timed_step
from deqkit.linear import GMRES, AutoAdjoint


def variants(rates: list[float]) -> dict:
    out = {f"auto {r:g}": (lambda r=r: Exact(AutoAdjoint(tol=1e-6, max_iter=60, switch_rate=r))) for r in rates}
    out["gmres"] = lambda: Exact(GMRES(tol=1e-6, max_iter=60))
    return out


def step_rows(rates: list[float], repeats: int) -> None:
    names = list(variants(rates))
    print("| cell, forward | " + " | ".join(f"{n}: bwd ms (VJPs)" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for cfg in (REFERENCE, HARD):
        for fwd in ("anderson", "broyden"):
            x, y, _ = digits_batch(cfg.batch)
            models = {}
            for name, make in variants(rates).items():
                solver = Anderson(memory=6, tol=1e-4, max_iter=40) if fwd == "anderson" else None
                models[name] = build_model(cfg, make(), solver)
            times: dict[str, list[float]] = {n: [] for n in names}
            vjps: dict[str, int] = {}
            for m in models.values():
                timed_step(m, x, y)  # warm-up
            for _ in range(repeats):
                for name, m in models.items():
                    _, bwd, info = timed_step(m, x, y)
                    times[name].append(1e3 * bwd)
                    vjps[name] = info.backward.vjps
            cells = [f"{statistics.median(times[n]):.2f} ({vjps[n]})" for n in names]
            print(f"| {cfg.name}, {fwd} | " + " | ".join(cells) + " |", flush=True)


def train_rows(rates: list[float]) -> None:
    presets = compare.ESTIMATOR_PRESETS
    names = []
    for name, make in variants(rates).items():
        key = f"sweep {name}"
        presets[key] = make
        names.append(key)
    rows = compare.run_compare(
        compare.CompareConfig(estimators=names, out="/tmp/deqkit_switch_rate", overwrite=True, progress=False), log=lambda m: None
    )
    print("\n| digits training run (8 epochs) | bwd ms / step | adjoint VJPs / step | test acc |")
    print("|---|---|---|---|")
    for r in rows:
        h = r["history"]
        vj = sum(e["bwd_vjps"] for e in h) / len(h)
        print(f"| {r['estimator'].removeprefix('sweep ')} | {r['bwd_ms']:.2f} | {vj:.1f} | {r['test_acc']:.4f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="0.7,0.8,0.9")
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-train", action="store_true", help="skip the training runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rates = [float(r) for r in args.rates.split(",")]
    with quiet():
        step_rows(rates, args.repeats)
        if not args.no_train:
            train_rows(rates)


if __name__ == "__main__":
    main()
