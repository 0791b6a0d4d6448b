"""``deqkit hpo``: bi-level hyperparameter search with SHINE-family hypergradients.

The flags of the command; the job is :func:`deqkit.apps.hpo.run_hpo`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import (
    add_data_group,
    add_output_group,
    add_runtime_group,
    comma_list,
    finite_float,
    parse_options,
    pick,
    positive_int,
    register,
)

DESCRIPTION = """\
HOAG hyperparameter search of l2-regularised logistic regression with SHINE-family
hypergradients (Ramzi et al., ICLR 2022; Pedregosa, ICML 2016). Prints each estimator's
held-out loss against wall-clock time, its time to reach Exact's final validation loss and its
agreement with Exact; with --out writes hpo_<dataset>.png and hpo_<dataset>.json."""


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``deqkit hpo``, in groups."""
    from ..apps.hpo import DATASETS, HYPERGRADIENTS

    add_data_group(p, DATASETS, default="breast_cancer", data_dir=False)
    g = p.add_argument_group("hypergradient")
    g.add_argument(
        "--grad",
        type=comma_list(HYPERGRADIENTS),
        default=list(HYPERGRADIENTS),
        help="comma list of hypergradient estimators, one run each: " + ", ".join(HYPERGRADIENTS),
    )
    g.add_argument(
        "--grad-opts",
        default="refine=5,opa_freq=5",
        help="estimator options key=value,...: refine (CG steps of shine-refine), opa_freq (OPA every this many inner steps)",
    )
    g = p.add_argument_group("outer problem")
    g.add_argument("--outer-steps", type=positive_int, default=30, help="HOAG outer iterations")
    g.add_argument("--lam0", type=finite_float, default=0.0, help="initial λ")
    g.add_argument("--per-feature", action="store_true", help="one λ per feature (vector hyperparameter) instead of a scalar")
    add_runtime_group(p, device=False, threads_default=1, threads_help="torch CPU threads (1: comparable timings)")
    add_output_group(p, out=None, resume="keep the estimators already in OUT/hpo_<dataset>.json (same settings) and run the rest")
    return p


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``hpo`` on an ``argparse`` subparsers object; returns its parser."""
    return register(
        subparsers,
        "hpo",
        help="bi-level hyperparameter search with SHINE hypergradients",
        description=DESCRIPTION,
        add_arguments=add_arguments,
        run=run,
    )


def config(args: argparse.Namespace) -> Any:
    """The :class:`~deqkit.apps.hpo.HPOConfig` of the parsed flags."""
    from ..apps.hpo import HPOConfig, make_hypergradient

    return HPOConfig(
        **pick(args, "dataset", "grad", "outer_steps", "seed", "out", "per_feature", "lam0", "threads", "resume", "overwrite"),
        grad_opts=parse_options(args.grad_opts, "--grad-opts", make_hypergradient),
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Run the ``hpo`` command; returns the exit status."""
    from ..apps.hpo import run_hpo

    run_hpo(config(args))
    return 0
