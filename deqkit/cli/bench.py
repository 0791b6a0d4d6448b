"""``deqkit bench``: the benchmark suite (step cost, memory, torchdeq side by side, accuracy over
seeds, SIM solver speed). The job is :func:`deqkit.apps.bench.run_suite`."""

from __future__ import annotations

import argparse
from typing import Any

from .._options import check_int, check_number
from ..errors import OptionError
from .options import Number, add_parser, comma_list, floats, ints, nonneg_int, pick, positive_float, positive_int

DESCRIPTION = """\
deqkit benchmarks: step cost per gradient estimator, memory against forward depth, torchdeq
side by side, accuracy over seeds (--section all runs these four), the SIM solver speed
(--section sim-speed) and SIM against magnitude pruning (--section sim-pruning, a small run:
digits and synthetic, MLP, 1 seed, 3 densities, under a minute), and the multiscale DEQ on
Fashion-MNIST (--section mdeq: estimators, memory against depth, torchdeq; not part of all).
--write refreshes this suite's
sections of BENCHMARKS.md in place. --device cuda runs every section on the GPU (timers
synchronised, memory from the CUDA allocator)."""


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    from ..apps.bench.suite import SECTION_NAMES

    p = add_parser(subparsers, "bench", help="the benchmark suite", description=DESCRIPTION)
    g = p.add_argument_group("suite")
    g.add_argument("--section", default="all", choices=SECTION_NAMES, help="what to run")
    g.add_argument("--quick", action="store_true", help="small sizes and 2 repeats (a smoke run, seconds)")
    g.add_argument("--repeats", type=positive_int, default=None, help="interleaved timing rounds (None: 15, --quick 2)")
    g.add_argument("--seeds", type=positive_int, default=10, help="seeds of the accuracy section (0 … N−1)")
    g.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    g.add_argument("--device", default="cpu", help="where every section's models and batches live: cpu, cuda, cuda:N or auto")
    g.add_argument("--write", default=None, metavar="BENCHMARKS.md", help="refresh this suite's sections of that file in place")
    g = p.add_argument_group("sim-speed section")
    g.add_argument("--dataset", default="digits", help="data set of the baseline (as for deqkit sim)")
    g.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="baseline (as deqkit sim --model): mlp, or cnn (image data; each row restricted to its receptive "
        "field for the ADMM and CVXPY alike, CVXPY's rows spread over the layers)",
    )
    g.add_argument("--data-dir", default=None, help="directory with the four IDX files (fashion-mnist, mnist)")
    g.add_argument("--hidden", type=ints, default=[64, 32, 16], help="hidden widths of the MLP baseline")
    g.add_argument("--channels", type=ints, default=[8, 16], help="channels of the CNN baseline's convolutions")
    g.add_argument("--kernel-size", type=positive_int, default=3, help="CNN kernel size")
    g.add_argument("--stride", type=positive_int, default=2, help="CNN stride")
    g.add_argument("--padding", type=nonneg_int, default=1, help="CNN zero padding")
    g.add_argument("--epochs", type=nonneg_int, default=10, help="baseline training epochs")
    g.add_argument("--baseline", default=None, help="baseline state_dict to load, if it exists")
    g.add_argument("--samples", type=positive_int, default=1000, help="state samples m")
    g.add_argument("--lam", type=Number(float, low=0.0), default=1.0, help="λ of the SIM program")
    g.add_argument(
        "--cvxpy-rows", type=positive_int, default=8, help="rows solved by CVXPY (the time is extrapolated to all rows)"
    )
    g.add_argument("--cvxpy-tol", type=positive_float, default=1e-6, help="Clarabel gap/feasibility tolerance")
    _add_sim_pruning_group(p)
    g = p.add_argument_group(
        "mdeq section", "DEQClassifier.mdeq on Fashion-MNIST, trained briefly first (--quick: its own tiny sizes)"
    )
    g.add_argument("--mdeq-batch", type=positive_int, default=64, help="batch of the warm-up training and of the measured step")
    g.add_argument("--mdeq-warmup-steps", type=nonneg_int, default=40, help="Adam steps (Exact()) before measuring")
    g.add_argument("--mdeq-caps", type=ints, default=[10, 20, 40], help="forward caps of the memory table, comma list")
    g.add_argument(
        "--mdeq-seed", type=nonneg_int, default=0, help="seed of the model, the warm-up and the images (another snapshot)"
    )
    g.add_argument(
        "--mdeq-checkpoint",
        default=None,
        metavar="PATH",
        help="measure the model of this `deqkit train --model mdeq` checkpoint (last.pt) on test images, instead of the warm-up",
    )
    p.set_defaults(func=run)
    return p


def _add_sim_pruning_group(p: argparse.ArgumentParser) -> None:
    from ..apps.bench.sim_pruning import FULL_COMMAND, PRUNING_DATASETS, SimPruningConfig

    d = SimPruningConfig()

    g = p.add_argument_group(
        "sim-pruning section",
        "SIM against global magnitude pruning at matched density: clean, FGSM and PGD accuracy\n"
        "(--data-dir as above). The defaults are a small run (under a minute); the full benchmark:\n"
        f"  {FULL_COMMAND}",
    )
    g.add_argument("--pruning-datasets", type=comma_list(PRUNING_DATASETS), default=d.datasets, help="comma list of data sets")
    g.add_argument("--pruning-models", type=comma_list(("mlp", "cnn")), default=d.models, help="mlp and/or cnn (image data only)")
    g.add_argument("--pruning-seeds", type=positive_int, default=d.seeds, help="seeds 0 … N−1")
    g.add_argument("--pruning-densities", type=floats, default=d.densities, help="target densities in (0, 1], comma list")
    g.add_argument("--pruning-hidden", type=ints, default=None, help="MLP hidden widths (None: 64,32,16; synthetic 64,32)")
    g.add_argument("--pruning-epochs", type=positive_int, default=None, help="baseline epochs (None: deqkit sim's per data set)")
    g.add_argument("--pruning-samples", type=positive_int, default=None, help="state samples (None: 1000 digits, 2000 others)")
    g.add_argument(
        "--pruning-ft-epochs", type=nonneg_int, default=d.ft_epochs, help="fine-tuning epochs, the same for SIM and pruning"
    )
    g.add_argument("--pruning-n-test", type=positive_int, default=None, help="test samples (None: the whole test split)")
    g.add_argument("--pruning-n-attack", type=positive_int, default=d.n_attack, help="test samples attacked by FGSM/PGD")
    g.add_argument("--pruning-pgd-steps", type=positive_int, default=d.pgd_steps, help="PGD steps")
    g.add_argument("--pruning-out", default=d.out, help="directory of sim_pruning.json")


def _sim_pruning_config(args: argparse.Namespace) -> Any:
    from ..apps.bench import SimPruningConfig
    from ..errors import OptionError

    bad = [d for d in args.pruning_densities if not 0 < d <= 1]
    if bad:
        raise OptionError(f"deqkit bench: --pruning-densities must lie in (0, 1], got {bad}.")
    names = ("datasets", "models", "seeds", "densities", "hidden", "epochs", "samples", "ft_epochs", "n_test", "n_attack")
    opts = {n: getattr(args, f"pruning_{n}") for n in (*names, "pgd_steps", "out")}
    return SimPruningConfig(**opts, data_dir=args.data_dir)


def config(args: argparse.Namespace) -> Any:
    """The :class:`~deqkit.apps.bench.SuiteConfig` of the parsed flags (values checked)."""
    from ..apps.bench import SimSpeedConfig, SuiteConfig
    from ..apps.bench.mdeq import MDEQBenchConfig
    from ..apps.common import resolve_device

    owner = "deqkit bench"
    for flag, value in (
        ("--threads", args.threads),
        ("--seeds", args.seeds),
        ("--samples", args.samples),
        ("--cvxpy-rows", args.cvxpy_rows),
        ("--epochs", args.epochs),
    ):
        check_int(owner, flag, value, minimum=0 if flag == "--epochs" else 1)
    if args.repeats is not None:
        check_int(owner, "--repeats", args.repeats)
    check_number(owner, "--lam", args.lam, low=0.0)
    caps = tuple(args.mdeq_caps)
    if list(caps) != sorted(set(caps)):
        raise OptionError(f"deqkit bench: --mdeq-caps must be increasing, got {','.join(map(str, caps))}.")
    check_number(owner, "--cvxpy-tol", args.cvxpy_tol, low=0.0, low_open=True)
    device = resolve_device(args.device)  # "cuda" without CUDA: one OptionError line
    sim = SimSpeedConfig(
        **pick(
            args,
            *("dataset", "data_dir", "hidden", "samples", "lam", "cvxpy_rows", "cvxpy_tol", "baseline", "epochs"),
            *("model", "channels", "kernel_size", "stride", "padding"),
        )
    )
    return SuiteConfig(
        **pick(args, "section", "quick", "repeats", "seeds", "threads", "write"),
        sim_speed=sim,
        sim_pruning=_sim_pruning_config(args),
        mdeq=MDEQBenchConfig(
            batch=args.mdeq_batch,
            warmup_steps=args.mdeq_warmup_steps,
            caps=caps,
            seed=args.mdeq_seed,
            checkpoint=args.mdeq_checkpoint,
        ),
        device=device,
    )


def run(args: argparse.Namespace) -> int:
    from ..apps.bench import run_suite

    run_suite(config(args))
    return 0
