"""Minimal private data loaders for the SIM demo (digits and Fashion-MNIST IDX files).

Temporary: to be replaced by ``deqkit.data.load_dataset`` once that module exists. Nothing here
downloads; Fashion-MNIST is read from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) or any directory holding the standard IDX files.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

DATASETS = ("digits", "fashion-mnist")
_FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + "-ubyte.gz", stem + "-ubyte", stem + ".idx.gz"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"no {stem}-ubyte[.gz] in {directory}")


def load_fashion_mnist(root: str | os.PathLike | None = None):
    """Return ``(X_train, y_train, X_test, y_test)``; images flattened to 784 floats in [0, 1]."""
    candidates = [Path(root)] if root is not None else [Path(d) for d in _FASHION_DIRS]
    for directory in candidates:
        if directory.is_dir():
            try:
                out = []
                for split in ("train", "t10k"):
                    x = _read_idx(_find(directory, f"{split}-images-idx3"))
                    y = _read_idx(_find(directory, f"{split}-labels-idx1"))
                    out += [x.reshape(len(x), -1).astype(np.float32) / 255.0, y.astype(np.int64)]
                return tuple(out)
            except FileNotFoundError:
                continue
    raise FileNotFoundError(
        "Fashion-MNIST IDX files not found in "
        + ", ".join(str(c) for c in candidates)
        + ". Install the Debian package `dataset-fashion-mnist` or pass --data-dir."
    )


def load_digits_split(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn ``load_digits`` (8x8, 64 features scaled to [0, 1]), split train/test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def load(name: str, root: str | os.PathLike | None = None):
    """Load ``name`` (one of :data:`DATASETS`) as numpy arrays ``(X_train, y_train, X_test, y_test)``."""
    if name == "digits":
        return load_digits_split()
    if name == "fashion-mnist":
        return load_fashion_mnist(root)
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
