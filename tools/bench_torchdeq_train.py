"""Whole training runs against torchdeq, per estimator pair: issue 14's held-out digits job, or
``deqkit compare``'s default workload.

    python tools/bench_torchdeq_train.py [--workload held-out|compare] [--seeds 3] [--threads 1] [--repeats 1]

``held-out`` (chosen by the issue's author, not tuned here): sklearn digits (deqkit's split), an
MLP DEQ whose cell is ``LayerNorm(tanh(W z + u))`` of width 128 (``DEQClassifier.mlp(...,
activation="tanh")``), Anderson forward to absolute tolerance 1e-4 with a cap of 30 iterations in
both libraries, Adam (lr 1e-3), batch 128, 15 epochs. ``compare``: ``deqkit compare``'s defaults
(digits, ``LayerNorm(relu(W z + u))`` of width 64, Broyden forward to relative 1e-4 with a cap of
30, Adam lr 2e-3, batch 64, 8 epochs). Each library otherwise keeps its defaults: deqkit's
solvers and estimators, torchdeq's ``get_deq`` (its solver of the same name, its backward:
fixed-point iteration to absolute 1e-6, cap 40). The pairs:

* ``Exact()`` against torchdeq's IFT (``ift=True``),
* ``Unrolled(5, 0.5)`` against its phantom gradient (``grad=5, tau=0.5``),
* ``JacobianFree()`` against its default ``grad=1``.

Both libraries train the same initial weights (same seed) on the same batches in the same order;
the runs are interleaved (per seed and pair, the library that goes first alternates), one
torch thread. Training time counts the optimisation steps only (not the evaluation); with
``--repeats N`` each run is repeated N times (interleaved again) and its fastest time is kept
(the runs are deterministic, so only the time differs). Prints one row per pair: mean training
time of each library, the mean of the per-seed time ratios, and test accuracies.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deqkit import DEQ
from deqkit.apps.bench.report import md_table
from deqkit.apps.bench.torchdeq import torchdeq_available
from deqkit.apps.common import build_classifier
from deqkit.data import load_dataset
from deqkit.estimators import Exact, GradientEstimator, JacobianFree, Unrolled
from deqkit.solvers import Anderson, Broyden

#: (label, deqkit estimator, torchdeq get_deq keywords)
PAIRS: list[tuple[str, Callable[[], GradientEstimator], dict[str, Any]]] = [
    ("Exact() / IFT", lambda: Exact(on_failure="ignore"), {"ift": True}),
    ("Unrolled(5, 0.5) / phantom grad=5, tau=0.5", lambda: Unrolled(5, 0.5), {"grad": 5, "tau": 0.5}),
    ("JacobianFree() / grad=1", JacobianFree, {}),
]


#: per workload: the cell's width and activation, the forward solver (deqkit's and torchdeq's
#: settings), and the optimisation
WORKLOADS: dict[str, dict[str, Any]] = {
    "held-out": {
        "width": 128,
        "activation": "tanh",
        "solver": lambda: Anderson(tol=1e-4, max_iter=30, stop_mode="abs"),
        "theirs": {"f_solver": "anderson", "f_max_iter": 30, "f_tol": 1e-4, "f_stop_mode": "abs"},
        "lr": 1e-3,
        "batch": 128,
        "epochs": 15,
    },
    "compare": {
        "width": 64,
        "activation": "relu",
        "solver": lambda: Broyden(memory=30, tol=1e-4, max_iter=30),
        "theirs": {"f_solver": "broyden", "f_max_iter": 30, "f_tol": 1e-4, "f_stop_mode": "rel"},
        "lr": 2e-3,
        "batch": 64,
        "epochs": 8,
    },
}


def _model(seed: int, work: dict[str, Any], dim: int, classes: int) -> nn.Module:
    cell = {"activation": work["activation"]}
    return build_classifier("mlp", (dim,), classes, work["width"], work["solver"](), Exact(), seed, **cell)


class _TheirDEQ(nn.Module):
    """The classifier's injection, cell and head around a torchdeq layer."""

    def __init__(self, model: nn.Module, forward: dict[str, Any], **kw: Any) -> None:
        super().__init__()
        from torchdeq import get_deq  # pyright: ignore[reportAttributeAccessIssue]  (optional: pip install deqkit[bench])

        self.injection, self.cell, self.head = model.injection, model.cell, model.head
        self.deq = get_deq(**forward, **kw)

    def forward(self, x: Tensor) -> Tensor:
        u = self.injection(x)
        zs, _ = self.deq(lambda z: self.cell(z, u), torch.zeros_like(u))
        return self.head(zs[-1])


def train_once(lib: str, pair: int, seed: int, args: argparse.Namespace, data: Any) -> dict[str, float]:
    """One training run; ``{"time_s", "test_acc", "test_loss"}``."""
    work = WORKLOADS[args.workload]
    xtr, ytr = data.train[:]
    xte, yte = data.test[:]
    base = _model(seed, work, xtr.shape[1], int(ytr.max()) + 1)
    _, ours, theirs = PAIRS[pair]
    if lib == "deqkit":
        model = copy.deepcopy(base)
        model.deq = DEQ(model.cell, model.deq.solver, ours(), on_failure="ignore")
    else:
        model = _TheirDEQ(copy.deepcopy(base), work["theirs"], **theirs)
    opt = torch.optim.Adam(model.parameters(), lr=work["lr"])
    g = torch.Generator().manual_seed(seed)
    spent = 0.0
    for _ in range(work["epochs"]):
        order = torch.randperm(len(xtr), generator=g)
        model.train()
        t0 = time.perf_counter()
        for i in range(0, len(xtr), work["batch"]):
            idx = order[i : i + work["batch"]]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        spent += time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        logits = model(xte)
    acc = float((logits.argmax(1) == yte).double().mean())
    return {"time_s": spent, "test_acc": acc, "test_loss": float(nn.functional.cross_entropy(logits, yte))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="held-out")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="runs per (seed, pair, library); the fastest time counts")
    args = ap.parse_args(argv)
    if not torchdeq_available():
        raise SystemExit("torchdeq is not installed: pip install torchdeq==0.1.0 (or deqkit[bench]).")
    torch.set_num_threads(args.threads)
    t_all = time.time()
    runs: dict[tuple[int, str], list[dict[str, float]]] = {}
    for seed in range(args.seeds):
        data = load_dataset("digits", seed=seed)
        for p in range(len(PAIRS)):
            order = ("deqkit", "torchdeq") if (seed + p) % 2 == 0 else ("torchdeq", "deqkit")
            best: dict[str, dict[str, float]] = {}
            for rep in range(args.repeats):
                for lib in order if rep % 2 == 0 else order[::-1]:
                    r = train_once(lib, p, seed, args, data)
                    if lib in best and r["test_acc"] != best[lib]["test_acc"]:
                        print(f"  note: {lib} run not deterministic (test acc {r['test_acc']} vs {best[lib]['test_acc']})")
                    if lib not in best or r["time_s"] < best[lib]["time_s"]:
                        best[lib] = r
            for lib in order:
                r = best[lib]
                runs.setdefault((p, lib), []).append(r)
                print(
                    f"  seed {seed} {PAIRS[p][0]} [{lib}]: {r['time_s']:.1f} s, test acc {100 * r['test_acc']:.2f} %, "
                    f"test loss {r['test_loss']:.5f}",
                    flush=True,
                )
    head = ["pair (deqkit / torchdeq)", "deqkit train s", "torchdeq train s", "time ÷ (mean of per-seed ratios)"]
    head += ["deqkit test acc %", "torchdeq test acc %", "Δ points (mean)"]
    body = []
    for p, (label, _, _) in enumerate(PAIRS):
        ours, theirs = runs[(p, "deqkit")], runs[(p, "torchdeq")]
        ratios = [a["time_s"] / b["time_s"] for a, b in zip(ours, theirs)]
        acc = lambda rs: " / ".join(f"{100 * r['test_acc']:.2f}" for r in rs)
        delta = statistics.mean(100 * (a["test_acc"] - b["test_acc"]) for a, b in zip(ours, theirs))
        body.append(
            [
                label,
                f"{statistics.mean(r['time_s'] for r in ours):.2f}",
                f"{statistics.mean(r['time_s'] for r in theirs):.2f}",
                f"{statistics.mean(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)})",
                acc(ours),
                acc(theirs),
                f"{delta:+.2f}",
            ]
        )
    print("\n" + md_table(head, body))
    print(f"\nwall {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main()
