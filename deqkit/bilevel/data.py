"""Reference bi-level problem: ℓ2-regularised logistic regression with weight ``e^λ``.

Inner (training):  ``h(x, λ) = Σᵢ log(1 + exp(−yᵢ aᵢᵀx)) + ½ Σⱼ e^{λⱼ} xⱼ²``  (sum over the
training set; λ scalar or one per feature), as in HOAG (Pedregosa, ICML 2016) and SHINE's
bi-level experiments (Ramzi et al., ICLR 2022).
Outer (validation): mean logistic loss on the validation split; a test split is reported.

Datasets (all offline): scikit-learn ``breast_cancer`` (569 × 30), ``digits`` as the binary
task "digit ≥ 5" (1797 × 64), and ``synthetic`` (``make_classification``, 2000 × 500).
Seeded splits: 90% train, 5% validation, 5% test (the held-out 10% halved); features
standardised with the training statistics.

The names differ from the core's :func:`deqkit.data.load_dataset` (image data sets for DEQs)
on purpose; the split arguments (``val_fraction``, ``test_fraction``, ``seed``) mean the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deqkit._options import check_choice, check_fraction, check_int, validated_options
from deqkit.errors import OptionError

from .problem import BilevelProblem

__all__ = ["HPOSplits", "HPO_DATASETS", "load_hpo_dataset", "logistic_hpo_problem"]

#: the reference data sets of the bi-level problems (all offline)
HPO_DATASETS = ("breast_cancer", "digits", "synthetic")


@dataclass
class HPOSplits:
    """Train/validation/test arrays as float64 tensors; labels in {−1, +1}."""

    X_train: Tensor
    y_train: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    name: str

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]


def _raw(name: str, seed: int, n_samples: int, n_features: int):
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        d = cast(Any, load_breast_cancer())  # a Bunch (the stubs' overloads also allow a tuple)
        return d.data, d.target
    if name == "digits":
        from sklearn.datasets import load_digits

        d = cast(Any, load_digits())  # a Bunch (the stubs' overloads also allow a tuple)
        return d.data, (d.target >= 5).astype(int)
    if name == "synthetic":
        from sklearn.datasets import make_classification

        return make_classification(
            n_samples=n_samples,
            n_features=n_features,
            n_informative=n_features // 10,
            n_redundant=n_features // 10,
            flip_y=0.05,
            class_sep=1.0,
            random_state=seed,
        )
    check_choice("load_hpo_dataset", "name", name, HPO_DATASETS)
    raise AssertionError("unreachable")


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple:
    """``(n_train, n_val)``: ``round((1 − val_fraction − test_fraction)·n)`` training samples;
    the rest is shared between validation and test in proportion (validation rounded down)."""
    held = val_fraction + test_fraction
    n_tr = int(round((1.0 - held) * n))
    n_val = int((n - n_tr) * (val_fraction / held))
    return n_tr, n_val


@validated_options
def load_hpo_dataset(
    name: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    n_samples: int = 2000,
    n_features: int = 500,
    dtype: torch.dtype = torch.float64,
) -> HPOSplits:
    """Load ``name`` (one of :data:`HPO_DATASETS`) with a seeded split.

    Args:
        seed: drives the split (and the ``synthetic`` data).
        val_fraction: the fraction held out as validation (the outer loss).
        test_fraction: the fraction held out as test (only reported); the rest is the
            training set of the inner problem.
        n_samples: number of samples of ``synthetic`` (ignored otherwise).
        n_features: number of features of ``synthetic`` (ignored otherwise).
        dtype: of every tensor (float64 by default: the hypergradient tests need it).
    """
    owner = "load_hpo_dataset"
    check_choice(owner, "name", name, HPO_DATASETS)
    check_int(owner, "seed", seed, minimum=0)
    val_fraction = check_fraction(owner, "val_fraction", val_fraction)
    test_fraction = check_fraction(owner, "test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise OptionError(
            f"{owner}: val_fraction + test_fraction must be < 1 (a training set must remain), "
            f"got {val_fraction!r} + {test_fraction!r}."
        )
    n_samples = check_int(owner, "n_samples", n_samples, minimum=2)
    n_features = check_int(owner, "n_features", n_features, minimum=10)
    X, y = _raw(name, seed, n_samples, n_features)
    X = np.asarray(X, dtype=np.float64)
    y = np.where(np.asarray(y) > 0, 1.0, -1.0)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_tr, n_val = _split_sizes(len(y), val_fraction, test_fraction)
    tr, va, te = perm[:n_tr], perm[n_tr : n_tr + n_val], perm[n_tr + n_val :]
    mu = X[tr].mean(0)
    sd = X[tr].std(0)
    sd[sd == 0] = 1.0
    X = (X - mu) / sd
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return HPOSplits(t(X[tr]), t(y[tr]), t(X[va]), t(y[va]), t(X[te]), t(y[te]), name)


def logistic_hpo_problem(splits: HPOSplits) -> BilevelProblem:
    """The HOAG/SHINE reference problem on ``splits``: inner = summed training logistic
    loss + ``½ Σ e^{λ} x²`` (λ scalar or per feature, broadcast), outer = mean validation
    logistic loss, test = mean test logistic loss."""
    A, b = splits.X_train, splits.y_train
    Av, bv = splits.X_val, splits.y_val
    At, bt = splits.X_test, splits.y_test

    def inner(x: Tensor, lam: Tensor) -> Tensor:
        return F.softplus(-b * (A @ x)).sum() + 0.5 * (torch.exp(lam) * x * x).sum()

    def outer(x: Tensor) -> Tensor:
        return F.softplus(-bv * (Av @ x)).mean()

    def test(x: Tensor) -> Tensor:
        return F.softplus(-bt * (At @ x)).mean()

    x0 = torch.zeros(A.shape[1], dtype=A.dtype)
    return BilevelProblem(inner, outer, x0, test=test, name=f"logreg-{splits.name}")
