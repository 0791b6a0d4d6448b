"""``deqkit sim``: state-driven implicit models (SIM) fitted to an MLP baseline's states.

The flags of the command; the job is :func:`deqkit.apps.sim.run_sim`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .._options import check_int, check_number
from ..apps.common import set_threads
from ..errors import OptionError
from ..sim.admm import MODES
from ..sim.attacks import ATTACKS
from ..sim.fit import LAM_SCALES, PENALTIES, RADIUS_SCALES, STRUCTURES
from ..sim.fit import SOLVERS as FIT_SOLVERS
from .options import (
    Number,
    add_data_group,
    add_output_group,
    add_runtime_group,
    comma_list,
    floats,
    ints,
    nonneg_int,
    positive_float,
    positive_int,
    register,
)

DESCRIPTION = """\
State-driven implicit modeling (Tsai et al., arXiv 2209.09389): train (or load) an MLP
baseline, collect its states on --samples training samples, solve the SIM program for each λ,
and report non-zeros, accuracy, well-posedness and FGSM/PGD robustness; writes
sim_results.json and sim.png to --out."""


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``deqkit sim``, in groups."""
    from ..apps.sim import DATASETS

    add_data_group(p, DATASETS, default="digits")
    g = p.add_argument_group("baseline MLP")
    g.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="baseline: mlp (Linear+ReLU) or cnn (Conv2d+ReLU layers, then Linear; the implicit model's state "
        "is the stacked feature maps and each row of the program is restricted to its receptive field)",
    )
    g.add_argument("--hidden", type=ints, default=[64, 32, 16], help="hidden widths of the MLP baseline")
    g.add_argument("--channels", type=ints, default=[8, 16], help="channels of the CNN baseline's convolutions")
    g.add_argument("--kernel-size", type=positive_int, default=3, help="CNN kernel size")
    g.add_argument("--stride", type=positive_int, default=2, help="CNN stride")
    g.add_argument("--padding", type=nonneg_int, default=1, help="CNN zero padding")
    g.add_argument(
        "--epochs", type=nonneg_int, default=None, help="baseline training epochs (None: 60 digits, 20 mnist5k, 10 others)"
    )
    g.add_argument("--lr", type=positive_float, default=None, help="baseline learning rate (None: 3e-3 digits, 1e-3 others)")
    g.add_argument("--baseline", default=None, help="baseline state_dict: loaded if it exists, else trained and saved")
    g = p.add_argument_group("SIM program")
    g.add_argument(
        "--lam",
        type=floats,
        default=None,
        help="λ values, comma-separated, in --lam-scale units (pooled: useful values in (0, 1)); "
        "give --lam or --density (neither: --density 0.7,0.5,0.3)",
    )
    g.add_argument(
        "--density",
        type=floats,
        default=None,
        help="target fractions of the baseline's non-zeros, comma-separated (e.g. 0.5,0.3): λ is searched "
        "for each (warm-started path search); the results carry the λ chosen",
    )
    g.add_argument(
        "--density-tol", type=positive_float, default=0.005, help="accepted distance to a --density target (0.005 = ±0.5 points)"
    )
    g.add_argument("--samples", type=positive_int, default=None, help="state samples m (None: 1000 digits, 2000 others)")
    g.add_argument(
        "--kappa",
        type=Number(float, low=0.0, high=1.0, low_open=True, high_open=True),
        default=0.99,
        help="well-posedness margin κ, in (0, 1)",
    )
    g.add_argument("--mode", choices=MODES, default="relaxed", help="the program's form")
    g.add_argument(
        "--lam-scale",
        choices=LAM_SCALES,
        default="pooled",
        help="units of λ: pooled (per-sample mean loss, unit-rms regressors, each block's targets divided by one "
        "pooled rms: a λ carries over between data sets and rows keep their relative scale), normalized (each "
        "row's target divided by its own rms; the default until 2026-11-30), paper (the SIM paper's program; "
        "pass it to reproduce the paper's λ), rms (λ·rms(z_i) per row)",
    )
    g.add_argument(
        "--penalty",
        choices=PENALTIES,
        default="uniform",
        help="ℓ1 weights: uniform (the paper's) or standardized (rescaling-invariant, experimental)",
    )
    g.add_argument(
        "--input-weight",
        type=positive_float,
        default=1.0,
        help="per-block λ: ℓ1 weight of the input columns of B, D relative to A, C and the bias",
    )
    g.add_argument(
        "--structure",
        choices=STRUCTURES,
        default="full",
        help="full (the paper's): any state may feed any state; feedforward: states read only earlier layers",
    )
    g.add_argument(
        "--output-skip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the outputs read the inputs directly (D's input columns); default: on for --model mlp, off for "
        "--model cnn (whose outputs read the last feature map only, as the CNN's do: more accurate and faster there)",
    )
    g.add_argument("--debias", action="store_true", help="refit each row by least squares on its lasso support (relaxed lasso)")
    g.add_argument(
        "--input-radius",
        type=positive_float,
        default=None,
        help="robustness: ℓ1 bound on each row of B's input columns (with --output-radius it bounds the ℓ∞ gain)",
    )
    g.add_argument(
        "--output-radius", type=positive_float, default=None, help="robustness: ℓ1 bound on each row of [C D] (bias excluded)"
    )
    g.add_argument(
        "--radius-scale",
        choices=RADIUS_SCALES,
        default="absolute",
        help="units of --input-radius/--output-radius: absolute (ℓ1 norms in the states' coordinates) or relative "
        "(a fraction in (0, 1] of the plain fit's largest row: the same tightening of that row on any network)",
    )
    g = p.add_argument_group("fit solver")
    g.add_argument("--fit-solver", choices=FIT_SOLVERS, default="admm", help="solver of the SIM program")
    g.add_argument("--rho", type=positive_float, default=1.0, help="ADMM penalty ρ")
    g.add_argument("--max-iter-ab", type=positive_int, default=2000, help="ADMM iterations for (A, B) rows")
    g.add_argument("--max-iter-cd", type=positive_int, default=1000, help="ADMM iterations for (C, D) rows")
    g = p.add_argument_group("fine-tuning")
    g.add_argument(
        "--finetune-epochs",
        type=nonneg_int,
        default=0,
        help="after each fit, also fine-tune a copy on the training labels for this many epochs, "
        "sparsity pattern and well-posedness kept (0: SIM alone)",
    )
    g.add_argument("--finetune-lr", type=positive_float, default=1e-3, help="Adam learning rate of the fine-tuning")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eps", type=floats, default=[0.0, 0.02, 0.05, 0.1], help="attack radii ε (ℓ∞, inputs in [0, 1])")
    g.add_argument("--attacks", type=comma_list(ATTACKS), default=list(ATTACKS), help="comma list of " + ", ".join(ATTACKS))
    g.add_argument("--pgd-steps", type=positive_int, default=10, help="PGD steps")
    g.add_argument("--n-test", type=positive_int, default=None, help="test samples for accuracy (None: all)")
    g.add_argument("--n-attack", type=nonneg_int, default=300, help="test samples for the attacks (0: skip)")
    add_runtime_group(p, threads_help="torch CPU threads (None: torch's default)")
    add_output_group(
        p,
        out="runs/sim",
        plot=True,
        resume="keep the λ already in OUT/sim_results.json (same settings and baseline; λ not asked for this "
        "time are kept too) and run the rest; a λ after a kept one starts its solve cold, so it can "
        "differ from an uninterrupted run within the ADMM tolerance",
    )
    return p


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sim`` on an ``argparse`` subparsers object; returns the new parser."""
    return register(
        subparsers,
        "sim",
        help="state-driven implicit models (SIM) from an MLP baseline",
        description=DESCRIPTION,
        add_arguments=add_arguments,
        run=run,
    )


def validate(args: argparse.Namespace) -> None:
    """Value checks argparse's types do not make (OptionError, one line naming the flag)."""
    for flag, minimum in (
        ("--kernel-size", 1),
        ("--stride", 1),
        ("--padding", 0),
        ("--samples", 1),
        ("--n-attack", 0),
        ("--pgd-steps", 1),
        ("--finetune-epochs", 0),
        ("--max-iter-ab", 1),
        ("--max-iter-cd", 1),
        ("--n-test", 1),
    ):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            check_int("deqkit sim", flag, value, minimum=minimum)
    check_number("deqkit sim", "--kappa", args.kappa, low=0.0, high=1.0, low_open=True, high_open=True)
    for flag in ("--input-weight", "--finetune-lr", "--rho"):
        check_number("deqkit sim", flag, getattr(args, flag[2:].replace("-", "_")), low=0.0, low_open=True)
    if args.lr is not None:
        check_number("deqkit sim", "--lr", args.lr, low=0.0, low_open=True)
    if args.debias and args.mode != "relaxed":
        raise OptionError("deqkit sim: --debias refits by least squares and needs --mode relaxed.")
    if args.model == "cnn" and args.structure != "full":
        raise OptionError(
            "deqkit sim: --structure does not apply to --model cnn (each row is restricted to its "
            "receptive field, which is feedforward already)."
        )
    if args.lam is not None and args.density is not None:
        raise OptionError("deqkit sim: give --lam or --density, not both.")
    if args.lam is None and args.density is None:  # equality mode: the solution does not depend on λ
        if args.mode == "relaxed":
            args.density = [0.7, 0.5, 0.3]
        else:
            args.lam = [1.0]
    for lam in args.lam or []:
        check_number("deqkit sim", "--lam", lam, low=0.0)
    for d in args.density or []:
        check_number("deqkit sim", "--density", d, low=0.0, low_open=True)
    check_number("deqkit sim", "--density-tol", args.density_tol, low=0.0, low_open=True)
    if args.density and args.mode != "relaxed":
        raise OptionError("deqkit sim: --density searches λ along the lasso path and needs --mode relaxed.")
    for flag in ("--input-radius", "--output-radius"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            relative = args.radius_scale == "relative"
            check_number("deqkit sim", flag, value, low=0.0, high=1.0 if relative else None, low_open=relative)


def check_files(args: argparse.Namespace) -> None:
    """The files the job will read, checked before any work: the ``--baseline`` state_dict
    (readable, an MLP with the ``--hidden`` widths) and, with ``--resume``, the earlier
    ``sim_results.json`` (readable JSON of a sim run). Each problem is one line naming the file."""
    import os
    from pathlib import Path

    from .._io import UnreadableFileError, load_torch_file, read_json_file
    from ..apps.sim import RESULTS_FILE

    if args.baseline and os.path.exists(args.baseline):
        advice = "delete it (it is retrained and saved there) or pass another --baseline"
        state = load_torch_file(args.baseline, what="baseline MLP state_dict", advice=advice)
        weights = (
            [v for k, v in state.items() if str(k).endswith("weight") and getattr(v, "dim", lambda: 0)() == 2]
            if isinstance(state, dict)
            else []
        )
        if not weights:
            raise UnreadableFileError(f"{args.baseline} is not a baseline MLP state_dict (no weight matrices); {advice}")
        widths = [int(w.shape[0]) for w in weights[:-1]]
        if widths != list(args.hidden):
            raise OptionError(
                f"--baseline {args.baseline} holds an MLP with hidden widths {','.join(map(str, widths))}, "
                f"--hidden asks for {','.join(map(str, args.hidden))}; pass --hidden "
                f"{','.join(map(str, widths))} or another --baseline."
            )
    results = Path(args.out) / RESULTS_FILE
    if args.resume and results.exists():
        advice = "delete it (or use --overwrite) to start over"
        old = read_json_file(results, what="deqkit sim results file", advice=advice)
        if not isinstance(old, dict) or not isinstance(old.get("sim"), list):
            raise UnreadableFileError(f"{results} is not a deqkit sim results file; {advice}")


def run(args: argparse.Namespace) -> int:
    """Check the flags, the files and ``--out``, then run :func:`deqkit.apps.sim.run_sim`;
    returns the exit status."""
    from ..apps.common import prepare_out, resolve_device
    from ..apps.sim import run_sim

    validate(args)
    args.device = resolve_device(args.device)
    check_files(args)
    prepare_out(args.out, resume=args.resume, overwrite=args.overwrite, inputs=(args.baseline,))
    if args.threads is not None:
        set_threads(args.threads, args.device)
    run_sim(args)
    return 0
