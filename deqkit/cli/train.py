"""``deqkit train``: train one DEQ classifier with a chosen solver and gradient estimator.

Also the flag groups ``train`` and ``compare`` share (data, model, training, runtime, output).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from .options import add_output_group, add_parser, add_runtime_group, parse_options, pick, positive_float, positive_int

DESCRIPTION = """\
Train a DEQ classifier with a chosen forward solver and gradient estimator; checkpoints after
every epoch and resumes (--resume) exactly where it stopped."""

SOLVERS = ("fixed-point", "anderson", "broyden")
#: the forward solver options ``--solver-opts`` is merged over
SOLVER_OPTS_DEFAULT = "tol=1e-4,max_iter=30"
ESTIMATORS = ("exact", "unrolled", "neumann", "jacobian-free", "shine", "broyden-reuse", "exact-warm")


def add_classifier_groups(
    subparsers: Any, name: str, *, help: str, description: str, epochs: int, out: str,
    solver_group: Callable[[argparse._ArgumentGroup], None],
) -> argparse.ArgumentParser:
    """A parser with the groups ``train`` and ``compare`` share: data, model, training, the
    command's own "solver and gradient" group (filled by ``solver_group``), runtime, output."""
    from ..apps.common import MODELS
    from ..data import DATASETS

    p = add_parser(subparsers, name, help=help, description=description)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help="one of " + ", ".join(DATASETS) + " (digits is embedded)")
    g.add_argument("--data-dir", default=None, help="directory with the four IDX files (fashion-mnist, mnist)")
    g.add_argument("--subset", type=positive_int, default=None, help="use N training samples (None: all)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mlp", choices=MODELS, help="the DEQ cell")
    g.add_argument("--width", type=positive_int, default=64, help="MLP state width / conv channels")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=epochs, help="training epochs")
    g.add_argument("--batch-size", type=positive_int, default=64, help="samples per step")
    g.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (Adam, cosine schedule)")
    solver_group(p.add_argument_group("solver and gradient"))
    add_runtime_group(p)
    add_output_group(p, out=out, resume="continue from the checkpoints in --out")
    return p


def _solver_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--solver", default="broyden", help="forward solver: " + ", ".join(SOLVERS))
    g.add_argument("--solver-opts", default=SOLVER_OPTS_DEFAULT,
                   help="its options key=value,..., merged over the default, e.g. memory=20,tol=1e-5")
    g.add_argument("--grad", default="exact", help="gradient estimator: " + ", ".join(ESTIMATORS))
    g.add_argument("--grad-opts", default="", help="its options key=value,..., e.g. k=5,damping=0.5")


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_classifier_groups(subparsers, "train", help="train one DEQ classifier", description=DESCRIPTION, epochs=10,
                              out="runs/train", solver_group=_solver_flags)
    _scale_flags(p.add_argument_group("scale (processes, precision, compilation)"))
    p.set_defaults(func=run)
    return p


def _scale_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--nproc", type=int, default=1,
                   help="train data-parallel on N processes (spawned here; gloo on CPU, NCCL on CUDA); "
                        "under torchrun leave it at 1")
    g.add_argument("--amp", default=None, choices=("bf16", "fp16"),
                   help="mixed precision: bf16 autocast (CPU, CUDA) or fp16 with a GradScaler (CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the DEQ cell (the solver loop stays eager)")
    g.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    g.add_argument("--sync-stop", action="store_true",
                   help="distributed: all ranks agree on when the forward solve stops (one all-reduce per iteration)")
    g.add_argument("--sync-quorum", type=float, default=1.0,
                   help="with --sync-stop: stop every rank once this fraction of the global batch has stopped")


def _scale_config(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields of the scale flags (absent on parsers without them)."""
    return {"amp": getattr(args, "amp", None), "compile_cell": bool(getattr(args, "compile", False)),
            "compile_backend": getattr(args, "compile_backend", "inductor")}


def build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The splits, the model and the :class:`~deqkit.train.TrainConfig` of the parsed flags.

    The forward solver and the estimator are built by name; their option strings are checked
    against the class found for that name (a non-numeric ``tol`` is refused here, in one line).
    """
    from ..apps.common import build_classifier, load_splits
    from ..estimators import make_estimator
    from ..solvers import make_solver
    from ..train import TrainConfig

    solver_cls = type(make_solver(args.solver))  # an unknown name: "did you mean" here
    solver_opts = {
        **parse_options(SOLVER_OPTS_DEFAULT, "--solver-opts", solver_cls),
        **parse_options(args.solver_opts, "--solver-opts", solver_cls),
    }
    solver = make_solver(args.solver, **solver_opts)
    grad_cls = type(make_estimator(args.grad))
    grad = make_estimator(args.grad, **parse_options(args.grad_opts, "--grad-opts", grad_cls))
    splits = load_splits(args.dataset, args.data_dir, args.subset, args.seed, args.model)
    model = build_classifier(args.model, splits.input_shape, splits.num_classes, args.width, solver, grad, args.seed)
    cfg = TrainConfig(
        **pick(args, "epochs", "batch_size", "lr", "seed", "device"),
        checkpoint_dir=args.out,
        log_path=f"{args.out}/metrics.jsonl",
        progress=not args.no_progress,
        **_scale_config(args),
    )
    return splits, model, cfg


def _epoch_lines() -> Any:
    """A callback printing one line per epoch to stderr (the progress when stderr is not a
    terminal and so shows no bar)."""
    import sys

    from ..train import Callback

    class EpochLines(Callback):
        def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
            val = "" if record.get("val_acc") is None else f", val acc {record['val_acc']:.4f}"
            print(f"epoch {record['epoch']}/{trainer.config.epochs}: train loss {record['train_loss']:.4f}{val}, "
                  f"{record['elapsed_s']:.1f}s", file=sys.stderr, flush=True)

    return EpochLines()


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from .._options import check_fraction, check_int
    from ..apps.common import prepare_out, resolve_device, set_threads
    from ..train import Trainer

    nproc = check_int("deqkit train", "--nproc", getattr(args, "nproc", 1))
    check_fraction("deqkit train", "--sync-quorum", getattr(args, "sync_quorum", 1.0))
    args.device = resolve_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: rank 0 owns the output directory
        if os.environ.get("RANK", "0") == "0":
            prepare_out(args.out, resume=args.resume, overwrite=args.overwrite)
        return _run_distributed(args)
    prepare_out(args.out, resume=args.resume, overwrite=args.overwrite)
    if nproc > 1:
        import torch

        from ..train.distributed import default_backend, launch
        from ..train.precision import amp_dtype

        amp_dtype(getattr(args, "amp", None), torch.device(args.device))  # fp16 on CPU: refused here

        launch(_run_distributed, nproc, args, backend=default_backend(args.device), timeout_s=7 * 24 * 3600.0)
        return 0
    set_threads(args.threads, args.device)
    splits, model, cfg = build(args)
    lines = [_epoch_lines()] if not args.no_progress and not sys.stderr.isatty() else []
    trainer = Trainer(model, splits.train, splits.val, cfg, callbacks=lines)
    trainer.fit(resume=args.resume)
    test = trainer.evaluate(splits.test)
    print(f"test accuracy {test['acc']:.4f}  test loss {test['loss']:.4f}")
    print(f"wrote {trainer.checkpoint_path} and {cfg.log_path}")
    return 0


def _run_distributed(args: argparse.Namespace) -> int:
    """One rank of ``deqkit train`` under torch.distributed (torchrun, or --nproc's processes)."""
    from ..apps.common import set_threads
    from ..train.distributed import DistributedTrainer, init_distributed

    rank, _ = init_distributed(device=args.device)
    set_threads(args.threads, args.device)
    splits, model, cfg = build(args)
    trainer = DistributedTrainer(model, splits.train, splits.val, cfg, sync_stop=bool(getattr(args, "sync_stop", False)),
                                 sync_quorum=getattr(args, "sync_quorum", 1.0))
    trainer.fit(resume=args.resume)
    test = trainer.evaluate(splits.test)
    if rank == 0:
        print(f"test accuracy {test['acc']:.4f}  test loss {test['loss']:.4f}")
    return 0
