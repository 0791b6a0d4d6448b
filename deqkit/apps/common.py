"""What the DEQ-classifier applications (``compare``, ``train``, the benchmarks) share: threads,
data and the seeded model. The library calls of those jobs are made here, in one place."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ..data import Splits, load_dataset
from ..errors import OptionError
from ..estimators import GradientEstimator
from ..models import DEQClassifier
from ..solvers import Solver

MODELS = ("mlp", "conv", "mdeq")


def set_threads(threads: Optional[int], device: str = "cpu") -> None:
    """``threads`` if given, else 1 on CPU: small models run far faster single-threaded on a
    shared CPU than with torch's default thread count."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise OptionError(f"threads must be an integer >= 1, got {threads!r}.")
    if threads or device == "cpu":
        torch.set_num_threads(threads or 1)


def load_splits(dataset: str, data_dir: Optional[str], subset: Optional[int], seed: int, model: str) -> Splits:
    """The data set's splits, flattened for the MLP model, image-shaped for the conv one."""
    return load_dataset(dataset, data_dir=data_dir, subset=subset, seed=seed, flatten=(model == "mlp"))


def build_classifier(
    model: str, input_shape: Any, num_classes: int, width: int, solver: Solver, grad: GradientEstimator, seed: int,
    **options: Any,
) -> nn.Module:
    """The seeded DEQ classifier (the same weights for every call with the same arguments).

    Forward non-convergence is counted by the trainer, not warned about per batch
    (``on_failure="ignore"``); ``options`` go to ``DEQClassifier.mlp`` / ``.conv``.
    """
    torch.manual_seed(seed)
    if model == "mlp":
        dim = math.prod(input_shape)
        return DEQClassifier.mlp(dim, width, num_classes, solver=solver, grad=grad, on_failure="ignore", **options)
    if model == "mdeq":  # its branch channels come from options["channels"] (default (16, 32)), not width
        return DEQClassifier.mdeq(input_shape, num_classes, solver=solver, grad=grad, on_failure="ignore", **options)
    return DEQClassifier.conv(input_shape, width, num_classes, solver=solver, grad=grad, on_failure="ignore", **options)
