"""Adaptive against the default Exact (and GMRES) over seeds: accuracy and training time.

    python tools/bench_adaptive.py [--seeds 3]

The accuracy section's runs (``deqkit.apps.bench.accuracy``: digits, and Fashion-MNIST with 4000
training images when its files are installed), restricted to ``exact`` (``Exact()``),
``adaptive`` (``Adaptive()``: SHINE + OPA/5 on the Broyden forward, exact checks every 20 steps)
and ``exact-gmres``; prints the tables and, per data set, Adaptive's accuracy difference and
training-time ratio to Exact.
"""

from __future__ import annotations

import argparse
import time

import torch

from deqkit.apps.bench.accuracy import ACCURACY_SETS, bench_accuracy, format_accuracy_tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    res = bench_accuracy(ACCURACY_SETS, seeds=tuple(range(args.seeds)), estimators=["exact", "adaptive", "exact-gmres"])
    print(format_accuracy_tables(res))
    for r in res:
        by = {row["estimator"]: row for row in r["rows"]}
        if "exact" in by and "adaptive" in by:
            e, a = by["exact"], by["adaptive"]
            print(
                f"{r['set']}: Adaptive − Exact test accuracy {100 * (a['test_acc'][0] - e['test_acc'][0]):+.2f} points; "
                f"training time {a['train_time_s'][0] / e['train_time_s'][0]:.2f}× Exact's"
            )
    print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
