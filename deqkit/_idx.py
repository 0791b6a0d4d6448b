"""Reader and writer for the IDX file format (MNIST, Fashion-MNIST, EMNIST, ...).

An IDX file is a 4-byte magic number, then ``ndim`` big-endian ``uint32`` dimension sizes, then
the data in C order, big-endian::

    byte 0, 1   0x00 0x00
    byte 2      type code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte 3      ndim
    ndim x 4    the sizes, big-endian uint32
    ...         prod(sizes) items

Files may be gzip-compressed; that is detected from the content (the gzip magic bytes), not the
file name. Private module: the public entry points are re-exported by :mod:`deqkit.data`.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Union

import numpy as np

from ._io import atomic_write_bytes

__all__ = ["IDXFormatError", "read_idx", "write_idx", "IDX_DTYPES"]

PathLike = Union[str, "os.PathLike[str]"]

#: IDX type code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF_KIND: dict[tuple[str, int], int] = {(d.kind, d.itemsize): c for c, d in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """An IDX file is malformed: bad magic number, unknown type code, or wrong data length."""


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise IDXFormatError(
            f"{path}: the file starts like gzip data but cannot be decompressed (truncated or corrupt download?): {exc}"
        ) from exc


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array in native byte order.

    Args:
        path: the file; gzip compression is detected from its first two bytes.

    Returns:
        An array with the file's shape and dtype (e.g. ``uint8`` of shape ``(N, 28, 28)`` for
        MNIST images, ``(N,)`` for labels).

    Raises:
        FileNotFoundError: the file does not exist.
        IDXFormatError: the header is not an IDX header (the error says which bytes are wrong),
            or the data is shorter or longer than the header's dimensions require.
    """
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise IDXFormatError(f"{path}: too short to be an IDX file ({len(buf)} bytes; the header alone is at least 4)")
    zero0, zero1, code, ndim = buf[0], buf[1], buf[2], buf[3]
    if zero0 != 0 or zero1 != 0:
        raise IDXFormatError(
            f"{path}: bad magic number 0x{buf[:4].hex()}: an IDX file starts with two zero bytes "
            f"(e.g. 0x00000803 for uint8 images, 0x00000801 for uint8 labels)"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X} ({d.name})" for c, d in IDX_DTYPES.items())
        raise IDXFormatError(
            f"{path}: bad magic number 0x{buf[:4].hex()}: unknown data type code 0x{code:02X}; known codes: {known}"
        )
    if ndim == 0:
        raise IDXFormatError(f"{path}: bad magic number 0x{buf[:4].hex()}: zero dimensions")
    header_len = 4 + 4 * ndim
    if len(buf) < header_len:
        raise IDXFormatError(
            f"{path}: truncated header: {ndim} dimensions need {header_len} header bytes, the file has {len(buf)}"
        )
    shape = struct.unpack(f">{ndim}I", buf[4:header_len])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(buf) - header_len
    if found < expected:
        raise IDXFormatError(
            f"{path}: truncated data: the header says shape {tuple(shape)} of {dtype.name} "
            f"({expected} bytes) but only {found} bytes follow the header"
        )
    if found > expected:
        raise IDXFormatError(
            f"{path}: {found - expected} unexpected trailing bytes: the header says shape "
            f"{tuple(shape)} of {dtype.name} ({expected} bytes) but {found} bytes follow the header"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file, atomically (temporary file, then :func:`os.replace`).

    Args:
        path: destination.
        array: a numpy array of dtype uint8, int8, int16, int32, float32 or float64, with 1 to
            255 dimensions.
        compress: gzip the file; ``None`` (default) means "if the name ends in ``.gz``".

    Returns:
        The path written.

    Raises:
        ValueError: the dtype has no IDX type code, or the array is 0-dimensional.
    """
    path = Path(path)
    array = np.asarray(array)
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in _CODE_OF_KIND:
        raise ValueError(
            f"write_idx: dtype {array.dtype} has no IDX type code; use one of " + ", ".join(d.name for d in IDX_DTYPES.values())
        )
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx: an IDX array needs 1 to 255 dimensions, got {array.ndim}")
    code = _CODE_OF_KIND[key]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if compress is None:
        compress = path.name.endswith(".gz")
    if compress:
        payload = gzip.compress(payload, mtime=0)
    atomic_write_bytes(path, payload)
    return path
