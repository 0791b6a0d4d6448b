"""``deqkit train``: train one DEQ classifier with a chosen solver and gradient estimator.

Also the flag groups ``train`` and ``compare`` share (data, model, training, runtime, output).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .options import (
    Number,
    add_output_group,
    add_parser,
    add_runtime_group,
    fraction,
    nonneg_int,
    parse_options,
    pick,
    positive_float,
    positive_int,
)

DESCRIPTION = """\
Train a DEQ classifier with a chosen forward solver and gradient estimator; checkpoints after
every epoch and resumes (--resume) exactly where it stopped."""

SOLVERS = ("fixed-point", "anderson", "broyden")
#: the forward solver options ``--solver-opts`` is merged over
SOLVER_OPTS_DEFAULT = "tol=1e-4,max_iter=30"


def add_classifier_groups(
    subparsers: Any,
    name: str,
    *,
    help: str,
    description: str,
    epochs: int,
    out: str,
    solver_group: Callable[[argparse._ArgumentGroup], None],
) -> argparse.ArgumentParser:
    """A parser with the groups ``train`` and ``compare`` share: data, model, training, the
    command's own "solver and gradient" group (filled by ``solver_group``), runtime, output."""
    from ..apps.common import JAC_REG_DEFAULT, MODELS
    from ..data import DATASETS
    from ..train.augment import AUGMENTATIONS

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
    g.add_argument(
        "--jac-reg",
        type=Number(float, low=0.0, words=("auto",)),
        default="auto",
        metavar="W",
        help="Jacobian regularisation weight (Hutchinson ||df/dz||_F^2/d at z*; 0: off; "
        + ", ".join(f"auto: {w:g} for --model {m}" for m, w in JAC_REG_DEFAULT.items())
        + ", 0 otherwise)",
    )
    g.add_argument(
        "--augment",
        default="none",
        choices=AUGMENTATIONS,
        help="random left-right flips and/or 2-pixel shifts of the training images (--model conv, mdeq); "
        "flips suit clothes, not digits",
    )
    solver_group(p.add_argument_group("solver and gradient"))
    add_runtime_group(p)
    add_output_group(p, out=out, resume="continue from the checkpoints in --out")
    return p


def _solver_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--solver", default="broyden", help="forward solver: " + ", ".join(SOLVERS))
    g.add_argument(
        "--solver-opts",
        default=SOLVER_OPTS_DEFAULT,
        help="its options key=value,..., merged over the default, e.g. memory=20,tol=1e-5",
    )
    from ..estimators import ESTIMATORS  # the registry: estimators registered by the user are accepted too

    g.add_argument("--grad", default="exact", help="gradient estimator: " + ", ".join(ESTIMATORS.names()))
    g.add_argument("--grad-opts", default="", help="its options key=value,..., e.g. k=5,damping=0.5")


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_classifier_groups(
        subparsers,
        "train",
        help="train one DEQ classifier",
        description=DESCRIPTION,
        epochs=10,
        out="runs/train",
        solver_group=_solver_flags,
    )
    _scale_flags(p.add_argument_group("scale (processes, precision, compilation)"))
    _stabiliser_flags(p.add_argument_group("stabilisers (DEQ training)"))
    p.set_defaults(func=run)
    return p


def _scale_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="train data-parallel on N processes (spawned here; gloo on CPU, NCCL on CUDA); under torchrun leave it at 1",
    )
    g.add_argument(
        "--amp",
        default=None,
        choices=("bf16", "fp16"),
        help="mixed precision: bf16 autocast (CPU, CUDA) or fp16 with a GradScaler (CUDA)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the DEQ cell (the solver loop stays eager)")
    g.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    g.add_argument(
        "--sync-stop",
        action="store_true",
        help="distributed: all ranks agree on when the forward solve stops (one all-reduce per iteration)",
    )
    g.add_argument(
        "--sync-quorum",
        type=fraction,
        default=1.0,
        help="with --sync-stop: stop every rank once this fraction of the global batch has stopped",
    )


def _scale_config(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields of the scale flags (absent on parsers without them)."""
    return {
        "amp": getattr(args, "amp", None),
        "compile_cell": bool(getattr(args, "compile", False)),
        "compile_backend": getattr(args, "compile_backend", "inductor"),
    }


def _pair(text: str) -> tuple[int, int]:
    """``"10,30"`` → ``(10, 30)`` (argparse ``type=``)."""
    try:
        lo, hi = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers LOW,HIGH such as 10,30, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def _stabiliser_flags(g: argparse._ArgumentGroup) -> None:
    from .options import ints

    g.add_argument("--jac-reg-freq", type=fraction, default=1.0, help="fraction of steps it is applied on")
    g.add_argument("--jac-reg-probes", type=positive_int, default=1, help="Gaussian probes (VJPs) per estimate")
    g.add_argument(
        "--pretrain-steps",
        type=nonneg_int,
        default=0,
        metavar="N",
        help="train the first N steps by backprop through --pretrain-depth plain iterations, then implicitly",
    )
    g.add_argument("--pretrain-depth", type=positive_int, default=6, help="plain iterations of a pre-training step")
    g.add_argument(
        "--random-max-iter",
        type=_pair,
        default=None,
        metavar="LOW,HIGH",
        help="draw each training solve's iteration cap uniformly from [LOW, HIGH]",
    )
    g.add_argument(
        "--monitor-every", type=nonneg_int, default=20, help="measure the spectral radius of df/dz at z* every N steps (0: never)"
    )
    g.add_argument(
        "--fpc",
        type=nonneg_int,
        default=0,
        metavar="N",
        help="fixed-point correction over N solver iterates (z* included; 0: off)",
    )
    g.add_argument(
        "--mdeq-channels",
        type=ints,
        default=[16, 32],
        metavar="C1,C2[,C3]",
        help="--model mdeq: channels per resolution branch, highest resolution first",
    )


def build(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """The splits, the model, the :class:`~deqkit.train.TrainConfig` and the augmentation of the parsed flags.

    The forward solver and the estimator are built by name; their option strings are checked
    against the class found for that name (a non-numeric ``tol`` is refused here, in one line).
    """
    from ..apps.common import build_classifier, load_splits, make_augment
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
    model_options = {"channels": tuple(args.mdeq_channels)} if args.model == "mdeq" else {}
    model = build_classifier(
        args.model, splits.input_shape, splits.num_classes, args.width, solver, grad, args.seed, **model_options
    )
    cfg = TrainConfig(
        **pick(args, "epochs", "batch_size", "lr", "seed", "device"),
        checkpoint_dir=args.out,
        log_path=f"{args.out}/metrics.jsonl",
        progress=not args.no_progress,
        **_scale_config(args),
        **stabiliser_config(args),
    )
    return splits, model, cfg, make_augment(args.augment, splits, args.model)


def stabiliser_config(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~deqkit.train.TrainConfig` fields of the stabiliser flags."""
    from ..apps.common import jac_reg_weight

    return {
        "jac_reg_weight": jac_reg_weight(args.jac_reg, args.model),
        "jac_reg_freq": args.jac_reg_freq,
        "jac_reg_probes": args.jac_reg_probes,
        "pretrain_steps": args.pretrain_steps,
        "pretrain_depth": args.pretrain_depth,
        "random_max_iter": args.random_max_iter,
        "monitor_every": args.monitor_every,
        "fpc_iterates": args.fpc,
    }


#: below this fraction of converged training forward solves, the epoch line says so
UNSTABLE_BELOW = 0.95


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One line per epoch: accuracy, loss and the stability of the training forward solves."""

    def fmt(v: Any, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    line = (
        f"epoch {record['epoch']}/{epochs}  loss {fmt(record['train_loss'], '.4f')}  acc {fmt(record['train_acc'], '.4f')}  "
        f"val_acc {fmt(record['val_acc'], '.4f')}  fwd converged {fmt(record['fwd_converged'], '.3f')}  "
        f"steps {fmt(record['fwd_steps'], '.1f')}  residual {fmt(record.get('fwd_residual'), '.2e')}  "
        f"spectral radius {fmt(record.get('spectral_radius'), '.3f')} (max {fmt(record.get('spectral_radius_max'), '.3f')})  "
        f"{record['epoch_s']:.0f}s"
    )
    if record.get("bwd_amplification") is not None:  # the backward's largest ‖w‖/‖v‖ (adjoint estimators)
        line += f"  bwd amplification max {record['bwd_amplification']:.3g}"
    if record.get("bwd_fallback"):  # samples whose w fell back to v (Exact: unconverged forward; SHINE's fallback)
        line += f"  bwd fallback {record['bwd_fallback']}"
    if record.get("adaptive_checks") is not None:  # an Adaptive estimator: its checks and switches
        line += (
            f"  adaptive: {record['adaptive_checks']} checks, cosine {fmt(record['adaptive_cosine'], '.3f')}, "
            f"exact on {record['adaptive_exact_share']:.0%} of steps, {record['adaptive_switches']} switches"
        )
    if record.get("amp_skipped"):  # the fp16 loss scaler skipped these steps (gradient overflow; scale halved)
        line += f"  amp skipped {record['amp_skipped']}/{record['steps']} steps (fp16 overflow)"
    conv, rho = record["fwd_converged"], record.get("spectral_radius_max")
    failing = conv is not None and conv < UNSTABLE_BELOW
    if failing or (rho is not None and rho >= 1.0):
        what = (
            f"training forward solves are failing (converged fraction {fmt(conv, '.3f')}, spectral radius max {fmt(rho, '.3f')})"
            if failing
            else f"the cell is not contractive at some monitored fixed point (spectral radius max {fmt(rho, '.3f')}), "
            f"though {fmt(conv, '.1%')} of the training solves converged"
        )
        jr = "raise --jac-reg" if record.get("jac_steps") else "add --jac-reg 0.5"
        line += f"\n  UNSTABLE: {what}; lower --lr, {jr}, or raise max_iter."
    return line


def run(args: argparse.Namespace) -> int:
    import os

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
    splits, model, cfg, augment = build(args)
    for line in _settings_lines(args, cfg, augment):
        print(line, flush=True)
    trainer = Trainer(model, splits.train, splits.val, cfg, callbacks=[_epoch_line_callback(cfg.epochs)], augment=augment)
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
    splits, model, cfg, augment = build(args)
    if rank == 0:
        for line in _settings_lines(args, cfg, augment):
            print(line, flush=True)
    trainer = DistributedTrainer(
        model,
        splits.train,
        splits.val,
        cfg,
        augment=augment,
        sync_stop=bool(getattr(args, "sync_stop", False)),
        sync_quorum=getattr(args, "sync_quorum", 1.0),
    )
    trainer.fit(resume=args.resume)
    test = trainer.evaluate(splits.test)
    if rank == 0:
        print(f"test accuracy {test['acc']:.4f}  test loss {test['loss']:.4f}")
    return 0


def _settings_lines(args: argparse.Namespace, cfg: Any, augment: Any) -> list[str]:
    """What the run does that the user did not ask for by name: the model-dependent defaults."""
    lines = []
    if args.jac_reg == "auto" and cfg.jac_reg_weight > 0:
        lines.append(
            f"Jacobian regularisation {cfg.jac_reg_weight:g} (--jac-reg auto for --model {args.model}; --jac-reg 0 turns it off)"
        )
    if augment is not None:
        lines.append(f"training images augmented: {augment} (--augment {args.augment})")
    return lines


def _epoch_line_callback(epochs: int) -> Any:
    """A :class:`~deqkit.train.Callback` printing :func:`epoch_line` after every epoch (stdout, flushed)."""
    from ..train import Callback

    class EpochLine(Callback):
        def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
            print(epoch_line(record, epochs), flush=True)

    return EpochLine()
