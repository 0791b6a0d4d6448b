"""What the applications (``compare``, ``train``, ``sim``, ``hpo``, the benchmarks) share: the
output-directory policy, devices, threads, data and the seeded model. The library calls of
those jobs are made here, in one place."""

from __future__ import annotations

import fnmatch
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..data import Splits, load_dataset
from ..errors import OptionError
from ..estimators import GradientEstimator
from ..models import DEQClassifier
from ..solvers import Solver

MODELS = ("mlp", "conv", "mdeq")

#: what the commands write into their output directory (what ``--overwrite`` deletes; nothing else is touched)
OUTPUT_PATTERNS = (
    "last.pt",
    "metrics.jsonl",
    "metrics-*.jsonl",
    "checkpoints",
    "results.json",
    "results.csv",
    "compare.png",
    "sim_results.json",
    "sim.png",
    "hpo_*.json",
    "hpo_*.png",
    ".*.tmp",
)


def prepare_out(
    out: Union[str, os.PathLike[str]], *, resume: bool = False, overwrite: bool = False, inputs: tuple[Any, ...] = ()
) -> Path:
    """The output-directory policy of every command, applied before any work.

    * ``out`` must be a directory (it is created) in which a file can be written: checked by
      writing and deleting a probe file, so an unwritable ``--out`` fails now, not after an epoch;
    * a directory that already holds files is refused unless ``resume`` (continue the run it
      holds) or ``overwrite`` (delete the deqkit outputs it holds — :data:`OUTPUT_PATTERNS` —
      and start over; other files are left alone). Files in ``inputs`` (the job's own input
      files, e.g. a baseline kept in ``out``) do not count as an earlier run.

    Raises:
        OptionError: one line saying what is wrong with ``--out`` and what to do.
    """
    path = Path(out)
    if resume and overwrite:
        raise OptionError("--resume continues the run in --out and --overwrite deletes it: pass one of them.")
    if path.exists() and not path.is_dir():
        raise OptionError(f"--out {out} is an existing file, not a directory; choose another --out.")
    if path.is_dir() and not resume:
        own = {Path(p).resolve() for p in inputs if p}
        entries = sorted(e.name for e in path.iterdir() if e.resolve() not in own)
        if entries and not overwrite:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OptionError(
                f"--out {out} already holds files ({shown}); pass --resume to continue that run, --overwrite to start over "
                f"(its deqkit outputs are deleted), or choose another --out."
            )
        for name in entries:
            if any(fnmatch.fnmatch(name, pat) for pat in OUTPUT_PATTERNS):
                _remove(path / name, out)
    if resume and path.is_dir():
        _remove_stale_temporaries(path)
    _probe_writable(path, out)
    return path


#: the temporaries of deqkit's atomic writes (``.<name>.<12 hex>.tmp``, see ``deqkit._io``)
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def _remove_stale_temporaries(path: Path) -> None:
    """Delete what a killed run left of an atomic write (``kill -9`` mid-write cannot clean up; the
    file it was replacing is intact, so its temporary is garbage)."""
    for entry in path.rglob(".*.tmp"):
        if _TEMPORARY.match(entry.name) and entry.is_file():
            try:
                entry.unlink()
            except OSError:
                pass  # not ours to fight over; the run goes on


def _remove(target: Path, out: Any) -> None:
    try:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    except OSError as exc:
        raise OptionError(
            f"--overwrite: cannot delete {target} ({exc.strerror or exc}); remove it by hand or choose another --out."
        ) from exc


def _probe_writable(path: Path, out: Any) -> None:
    probe = path / f".deqkit-probe-{uuid.uuid4().hex}.tmp"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"deqkit")
    except OSError as exc:
        raise OptionError(
            f"--out {out} is not a writable directory ({exc.strerror or exc}); choose another --out or fix its permissions."
        ) from exc
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def resolve_device(device: Any, flag: str = "--device") -> str:
    """``device`` checked against this machine: ``"auto"`` becomes ``"cuda"`` when CUDA is
    available, else ``"cpu"``; a CUDA or MPS device this torch build or machine lacks is refused
    in one line (instead of an assertion deep inside torch)."""
    name = str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise OptionError(f"{flag} {device!r} is not a torch device; use cpu, cuda, cuda:N, mps or auto.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(
                f"{flag} {device}: no CUDA device is available to this torch build; use --device cpu, or auto "
                f"(cuda when available, else cpu)."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0.")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise OptionError(f"{flag} {device}: MPS is not available on this machine; use --device cpu or auto.")
    elif dev.type != "cpu":
        raise OptionError(f"{flag} {device!r}: deqkit's commands run on cpu, cuda, cuda:N, mps or auto.")
    return str(dev)


def set_threads(threads: Optional[int], device: str = "cpu") -> None:
    """``threads`` if given, else 1 on CPU: small models run far faster single-threaded on a
    shared CPU than with torch's default thread count."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise OptionError(f"--threads must be an integer >= 1, got {threads!r}.")
    if threads or device == "cpu":
        torch.set_num_threads(threads or 1)


def load_splits(dataset: str, data_dir: Optional[str], subset: Optional[int], seed: int, model: str) -> Splits:
    """The data set's splits, flattened for the MLP model, image-shaped for the conv one."""
    return load_dataset(dataset, data_dir=data_dir, subset=subset, seed=seed, flatten=(model == "mlp"))


#: ``jac_reg="auto"`` per model: the multiscale DEQ trains with Jacobian regularisation (without it
#: its training solves stop converging in the last epochs; BENCHMARKS.md, "MDEQ on Fashion-MNIST")
JAC_REG_DEFAULT = {"mdeq": 0.5}


def jac_reg_weight(value: Union[float, str], model: str) -> float:
    """The Jacobian-regularisation weight of ``--jac-reg value`` for ``model`` (``"auto"``: :data:`JAC_REG_DEFAULT`)."""
    if value == "auto":
        return JAC_REG_DEFAULT.get(model, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise OptionError(f"jac_reg must be 'auto' or a finite number >= 0, got {value!r}.")
    return float(value)


def make_augment(name: str, splits: Splits, model: str) -> Any:
    """The training augmentation ``name`` (one of :data:`~deqkit.train.AUGMENTATIONS`) for
    ``model`` on ``splits``: an :class:`~deqkit.train.ImageAugment` filling with the normalised
    black background, or ``None`` for ``"none"``."""
    from ..train import ImageAugment

    augment = ImageAugment.from_name(name, fill=(-splits.mean / splits.std).tolist())  # fill: raw 0, normalised
    if augment is not None and (splits.flat or len(splits.input_shape) != 3):
        raise OptionError(
            f"augment={name!r} needs image-shaped inputs (--model conv or mdeq on an image data set); "
            f"{splits.name} with --model {model} is not (use --augment none)."
        )
    return augment


def build_classifier(
    model: str,
    input_shape: Any,
    num_classes: int,
    width: int,
    solver: Solver,
    grad: GradientEstimator,
    seed: int,
    **options: Any,
) -> DEQClassifier:
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
