"""Command-line front end: ``deqkit {compare,train,sim,hpo}`` — thin layers over the library."""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Any, Optional, Sequence

from .data import DatasetNotFoundError


def parse_options(text: str, flag: str) -> dict[str, Any]:
    """``"k=5,damping=0.5"`` → ``{"k": 5, "damping": 0.5}`` (values parsed as Python literals)."""
    opts: dict[str, Any] = {}
    if not text:
        return opts
    for item in text.split(","):
        if "=" not in item:
            raise SystemExit(f"deqkit: {flag} expects key=value pairs separated by commas (e.g. memory=20,tol=1e-4); got {item!r}.")
        key, raw = item.split("=", 1)
        try:
            value: Any = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        opts[key.strip().replace("-", "_")] = value
    return opts


def _add_common(p: argparse.ArgumentParser, *, epochs: int, out: str) -> None:
    """Options shared by ``compare`` and ``train``: data, model size, optimisation, device, output."""
    p.add_argument("--dataset", default="digits", help="digits (default, embedded), mnist5k, fashion-mnist, mnist, mnist1d")
    p.add_argument("--data-dir", default=None, help="directory with the IDX files (fashion-mnist, mnist)")
    p.add_argument("--subset", type=int, default=None, help="use N training samples")
    p.add_argument("--model", default="mlp", choices=["mlp", "conv"])
    p.add_argument("--width", type=int, default=64, help="MLP state width / conv channels")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--out", default=out, help="output directory (checkpoints, metrics, results)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--no-progress", action="store_true")


def _add_compare(sub: Any) -> None:
    from .compare import DEFAULT_ESTIMATORS, ESTIMATOR_PRESETS

    p = sub.add_parser(
        "compare",
        help="train one DEQ with each gradient estimator and compare them (the main job)",
        description="Trains the same DEQ classifier (same seed and initialisation, Broyden forward solve) once per "
        "gradient estimator, then prints accuracy, time, forward steps, backward cost and the gradient cosine to "
        "a tight Exact gradient; writes results JSON/CSV and a PNG.",
    )
    _add_common(p, epochs=8, out="runs/compare")
    p.add_argument("--estimators", default=",".join(DEFAULT_ESTIMATORS), help=f"comma list from: {', '.join(ESTIMATOR_PRESETS)}")
    p.add_argument("--max-iter", type=int, default=30, help="forward Broyden iteration cap")
    p.add_argument("--tol", type=float, default=1e-4, help="forward relative tolerance")
    p.add_argument("--memory", type=int, default=30, help="Broyden memory (SHINE reuses it)")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, run_compare

    cfg = CompareConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        subset=args.subset,
        model=args.model,
        width=args.width,
        estimators=[e.strip() for e in args.estimators.split(",") if e.strip()],
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_iter=args.max_iter,
        tol=args.tol,
        memory=args.memory,
        device=args.device,
        threads=args.threads,
        out=args.out,
        progress=not args.no_progress,
        resume=args.resume,
    )
    run_compare(cfg)
    return 0


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train one DEQ classifier", description="Train a DEQ classifier with a chosen solver and gradient estimator; checkpoints and resumes.")
    _add_common(p, epochs=10, out="runs/train")
    p.add_argument("--solver", default="broyden", help="fixed-point, anderson, broyden")
    p.add_argument("--solver-opts", default="", help="e.g. memory=20,tol=1e-4,max_iter=30")
    p.add_argument("--grad", default="exact", help="exact, unrolled, neumann, jacobian-free, shine, broyden-reuse, exact-warm")
    p.add_argument("--grad-opts", default="", help="e.g. k=5,damping=0.5")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .compare import build_model, load_splits, set_threads
    from .estimators import make_estimator
    from .solvers import make_solver
    from .train import TrainConfig, Trainer

    set_threads(args.threads, args.device)
    solver_opts = {"tol": 1e-4, "max_iter": 30, **parse_options(args.solver_opts, "--solver-opts")}
    solver = make_solver(args.solver, **solver_opts)
    grad = make_estimator(args.grad, **parse_options(args.grad_opts, "--grad-opts"))
    splits = load_splits(args.dataset, args.data_dir, args.subset, args.seed, args.model)
    model = build_model(args.model, splits, args.width, solver, grad, args.seed)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        checkpoint_dir=args.out,
        log_path=f"{args.out}/metrics.jsonl",
        progress=not args.no_progress,
    )
    trainer = Trainer(model, splits.train, splits.val, cfg)
    trainer.fit(resume=args.resume)
    test = trainer.evaluate(splits.test)
    print(f"test accuracy {test['acc']:.4f}  test loss {test['loss']:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deqkit",
        description="Deep equilibrium and implicit models, with every cheap gradient estimator one switch apart.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_compare(sub)
    _add_train(sub)
    from .sim.cli import add_subparser as add_sim
    from .bilevel.cli import add_subparser as add_hpo

    add_sim(sub)
    add_hpo(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ndeqkit: interrupted; the last checkpoint (if any) is kept. Re-run with --resume to continue.", file=sys.stderr)
        return 130
    except (ValueError, DatasetNotFoundError) as err:  # option errors, missing data: one clear line
        print(f"deqkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
