"""``deqkit compare``: train one DEQ per gradient estimator and compare them (the main job).

The flags of the command; the job is :func:`deqkit.apps.compare.run_compare`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .._options import unknown_option_message
from ..errors import OptionError
from .options import comma_list, parse_options, pick
from .train import add_classifier_groups

DESCRIPTION = """\
Trains the same DEQ classifier (same seed and initialisation, Broyden forward solve) once per
gradient estimator, then prints accuracy, time, forward steps, backward cost and the gradient
cosine to a tight Exact gradient; writes results JSON/CSV and a PNG."""

#: the Broyden options ``--solver-opts`` may set
SOLVER_OPTS = ("memory", "tol", "max_iter")


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    from ..apps.compare import DEFAULT_ESTIMATORS, ESTIMATOR_PRESETS

    def solver_flags(g: argparse._ArgumentGroup) -> None:
        g.add_argument(
            "--solver-opts",
            default="memory=30,tol=1e-4,max_iter=30",
            help="options of the forward Broyden solver (the same for every run): " + ", ".join(SOLVER_OPTS),
        )
        g.add_argument(
            "--grad",
            type=comma_list(list(ESTIMATOR_PRESETS)),
            default=list(DEFAULT_ESTIMATORS),
            help="comma list of gradient estimator presets, one run each: " + ", ".join(ESTIMATOR_PRESETS),
        )

    p = add_classifier_groups(
        subparsers,
        "compare",
        help="train one DEQ with each gradient estimator and compare them (the main job)",
        description=DESCRIPTION,
        epochs=8,
        out="runs/compare",
        solver_group=solver_flags,
    )
    p.set_defaults(func=run)
    return p


def solver_options(text: str) -> dict[str, Any]:
    """``--solver-opts`` as ``CompareConfig`` fields (only the Broyden options it varies)."""
    from ..solvers import Broyden

    opts = parse_options(text, "--solver-opts", Broyden)
    for key in opts:
        if key not in SOLVER_OPTS:
            raise OptionError(unknown_option_message("deqkit compare --solver-opts", key, SOLVER_OPTS))
    return opts


def run(args: argparse.Namespace) -> int:
    from ..apps.compare import CompareConfig, run_compare

    cfg = CompareConfig(
        **pick(
            args,
            "dataset",
            "data_dir",
            "subset",
            "model",
            "width",
            "epochs",
            "batch_size",
            "lr",
            "augment",
            "jac_reg",
            "seed",
            "device",
            "threads",
            "out",
            "resume",
            "overwrite",
        ),
        estimators=args.grad,
        progress=not args.no_progress,
        **solver_options(args.solver_opts),
    )
    run_compare(cfg)
    return 0
