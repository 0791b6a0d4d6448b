"""Atomic file output and safe file input.

Output: a reader never sees a half-written file, and a failed write (disk full, Ctrl-C, a
crash) leaves the old one. New files get the mode the umask allows (as ``open`` would).

Input: :func:`load_torch_file` and :func:`read_json_file` turn any unreadable file (random
bytes, truncated, empty, of another kind, JSON syntax error) into one
:class:`UnreadableFileError` naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Union

from ._options import check_choice

PathLike = Union[str, "os.PathLike[str]"]


class UnreadableFileError(ValueError):
    """A file the job must read cannot be read as what it should be (the message names the file
    and what to do)."""


def _mkstemp_umask(directory: Path, name: str) -> tuple[int, str]:
    """A new temporary file next to ``name`` created with mode ``0o666 & ~umask`` (``mkstemp``
    would make it 0600, and ``os.replace`` keeps that mode)."""
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(directory))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _WriteError(OSError):
    """An ``OSError`` of :func:`atomic_open` whose message names the file and says the old one is kept."""

    def __str__(self) -> str:
        return str(self.strerror)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on success fsync it and ``os.replace`` it onto ``path``.

    On any exception (Ctrl-C included) the temporary file is removed and an existing ``path`` is
    left untouched.
    """
    check_choice("atomic_open", "mode", mode, ("w", "wb"))
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _mkstemp_umask(path.parent, path.name)
        text_options: dict[str, Any] = {} if "b" in mode else {"newline": "", "encoding": "utf-8"}
        with os.fdopen(fd, mode, **text_options) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, _WriteError):
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            raise _WriteError(exc.errno, f"could not write {path}: {exc.strerror or exc}; {kept}.") from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def save_figure(fig: Any, path: PathLike, dpi: int = 110) -> None:
    """``fig.savefig`` to ``path`` atomically (the format from the file's suffix, PNG by default)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format=fmt, dpi=dpi)


def _unreadable(path: Path, what: str, reason: str, advice: str) -> UnreadableFileError:
    return UnreadableFileError(f"{path} is not a readable {what} ({reason}); {advice}")


def load_torch_file(path: PathLike, *, what: str, advice: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with every way the file can be unreadable (random
    bytes, truncated, empty, a file of another kind) turned into one
    :class:`UnreadableFileError` naming the file, what it should have been and ``advice``.

    Only tensors and plain containers are ever unpickled (``weights_only=True``).
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _unreadable(path, what, exc.strerror or str(exc), advice) from exc
    if size == 0:
        raise _unreadable(path, what, "the file is empty", advice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on pickle protocols
            return torch.load(path, map_location=map_location, weights_only=True)
    except (
        pickle.UnpicklingError,
        EOFError,
        RuntimeError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        ImportError,
        IndexError,
        UnicodeDecodeError,
        zipfile.BadZipFile,
        OSError,
    ) as exc:
        raise _unreadable(path, what, f"not a torch file, truncated or corrupt: {_first_line(exc)}", advice) from exc


def read_json_file(path: PathLike, *, what: str, advice: str) -> Any:
    """The JSON document in ``path``; an unreadable file (empty, truncated, not UTF-8, a syntax
    error) is one :class:`UnreadableFileError` naming the file and ``advice``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _unreadable(path, what, "not UTF-8 text", advice) from exc
    except OSError as exc:
        raise _unreadable(path, what, exc.strerror or str(exc), advice) from exc
    if not text.strip():
        raise _unreadable(path, what, "the file is empty", advice)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _unreadable(path, what, f"JSON error: {exc}", advice) from exc


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, without torch's advice to unpickle
    arbitrary code (``weights_only=False`` is never the right fix for a damaged file)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for marker in ("Weights only load failed", "weights_only"):
        if marker in text:
            return "its contents are not tensors and plain data (damaged, or not a checkpoint)"
    return text.split(". ")[0][:160]
