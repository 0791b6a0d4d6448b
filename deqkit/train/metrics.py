"""What a training run records: per-step statistics of every DEQ call, per-epoch records,
the JSON-lines / TensorBoard log, and the :class:`Callback` hooks.

Non-convergence is counted, never silent, and never spammed: while the trainer runs, every DEQ
in the model runs with its failure policy set to ``"ignore"`` (and an estimator's
``on_failure="ignore"``) by :func:`quiet_deqs`, and the counts go into the metrics
(``fwd_unconverged``, ``bwd_unconverged`` per epoch) instead of one warning per batch.
"""

from __future__ import annotations

import contextlib
import json
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from .._io import atomic_write_text
from ..deq import DEQ, DEQInfo

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer

__all__ = ["Callback", "Metrics", "MetricsLog", "step_stats", "solve_stats", "collect_infos", "quiet_deqs", "deqs"]

_SUMMED = (
    "fwd_steps_sum",
    "fwd_samples",
    "fwd_unconverged",
    "bwd_unconverged",
    "bwd_samples",
    "bwd_fallback",
    "bwd_vjps",
    "fwd_ms",
    "bwd_ms",
    "adjoint_ms",
    "adjoint_timed",
    "adaptive_steps",
    "adaptive_checks",
    "adaptive_exact_steps",
    "adaptive_switches",
    "adaptive_cos_sum",
)


class Callback:
    """Hooks into :meth:`Trainer.fit`; subclass and override what you need.

    Raising ``KeyboardInterrupt`` from a hook behaves like ``Ctrl-C`` (checkpoint, re-raise);
    from :meth:`on_step_end` the completed step is included.
    """

    def on_step_end(self, trainer: Trainer, step: dict[str, Any]) -> None:
        """After every optimisation step; ``step`` has epoch, batch, global_step, loss, acc, ..."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After an epoch's record is in the history, its checkpoint written and its log line appended."""


def _mean(total: float, count: float) -> Optional[float]:
    return None if count == 0 else total / count


def deqs(model: nn.Module) -> list[DEQ]:
    """Every :class:`~deqkit.deq.DEQ` inside ``model``."""
    return [m for m in model.modules() if isinstance(m, DEQ)]


def _failure_attr(obj: object) -> str:
    # the DEQ's failure-policy attribute (``on_failure``; ``on_nonconvergence`` before the rename)
    return "on_failure" if isinstance(getattr(obj, "on_failure", None), str) else "on_nonconvergence"


@contextlib.contextmanager
def quiet_deqs(model: nn.Module) -> Iterator[None]:
    """Silence per-batch non-convergence warnings of every DEQ (counted in the metrics instead);
    the previous settings are restored afterwards."""
    saved: list[tuple[object, str, str]] = []
    try:
        for deq in deqs(model):
            attr = _failure_attr(deq)
            saved.append((deq, attr, getattr(deq, attr)))
            setattr(deq, attr, "ignore")
            for est in _with_inner(deq.grad):
                grad_policy = getattr(est, "on_failure", None)
                if isinstance(grad_policy, str):  # only some estimators have a failure policy
                    saved.append((est, "on_failure", grad_policy))
                    setattr(est, "on_failure", "ignore")  # noqa: B010 (not declared on GradientEstimator)
        for obj, attr, value in saved:
            _CONFIGURED.setdefault(obj, {}).setdefault(attr, value)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
            _CONFIGURED.get(obj, {}).pop(attr, None)


def _with_inner(grad: object) -> list[object]:
    """``grad`` and the estimators it holds as attributes (an ``Adaptive``'s exact and cheap ones)."""
    from ..estimators import GradientEstimator

    inner = [v for v in getattr(grad, "__dict__", {}).values() if isinstance(v, GradientEstimator) and v is not grad]
    return [grad, *dict.fromkeys(inner)]  # once each, in order


#: while :func:`quiet_deqs` is active: the failure policies it replaced, per object
_CONFIGURED: weakref.WeakKeyDictionary[object, dict[str, str]] = weakref.WeakKeyDictionary()


def configured_repr(obj: object) -> str:
    """``repr(obj)`` with the settings its owner configured, even inside :func:`quiet_deqs`
    (which silences the failure policies for the duration of training): what a checkpoint
    records and a resumed run compares."""
    original = dict(_CONFIGURED.get(obj, {}))
    if not original:
        return repr(obj)
    current = {attr: getattr(obj, attr) for attr in original}
    try:
        for attr, value in original.items():
            setattr(obj, attr, value)
        return repr(obj)
    finally:
        for attr, value in current.items():
            setattr(obj, attr, value)


@contextlib.contextmanager
def collect_infos(model: nn.Module, sink: list[DEQInfo]) -> Iterator[None]:
    """Append the :class:`DEQInfo` of every DEQ call inside ``model`` to ``sink``."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], DEQInfo):
            sink.append(output[1])

    handles = [deq.register_forward_hook(hook) for deq in deqs(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def solve_stats(infos: list[DEQInfo]) -> dict[str, float]:
    """Forward-solve counts of ``infos``: step sum, samples, unconverged samples."""
    out = {"fwd_steps_sum": 0.0, "fwd_samples": 0, "fwd_unconverged": 0}
    for info in infos:
        out["fwd_steps_sum"] += float(info.nstep.sum())
        out["fwd_samples"] += info.nstep.numel()
        out["fwd_unconverged"] += int((~info.converged).sum())
    return out


def step_stats(infos: list[DEQInfo]) -> dict[str, Any]:
    """Forward and backward counts of one step's DEQ calls (their ``info.backward`` filled in)."""
    stats: dict[str, Any] = {
        **solve_stats(infos),
        "bwd_unconverged": 0,
        "bwd_samples": 0,
        "bwd_fallback": 0,
        "bwd_vjps": 0,
        "adjoint_ms": 0.0,
        "adjoint_timed": 0,
        "adaptive_steps": 0,
        "adaptive_checks": 0,
        "adaptive_exact_steps": 0,
        "adaptive_switches": 0,
        "adaptive_cos_sum": 0.0,
        "bwd_amplification": 0.0,
    }
    for info in infos:
        bwd = info.backward
        if bwd is None:
            continue
        if bwd.amplification is not None:
            stats["bwd_amplification"] = max(stats["bwd_amplification"], bwd.amplification)
        decision = getattr(bwd, "decision", None)  # an Adaptive estimator's step (AdaptiveStats)
        if decision is not None:
            stats["adaptive_steps"] += 1
            stats["adaptive_exact_steps"] += int(decision.used == "exact")
            stats["adaptive_switches"] += int(decision.switched is not None)
            if decision.checked and decision.cosine is not None:
                stats["adaptive_checks"] += 1
                stats["adaptive_cos_sum"] += decision.cosine
        if bwd.time_s is not None:  # None: not separable from the backward (Unrolled)
            stats["adjoint_ms"] += 1e3 * bwd.time_s
            stats["adjoint_timed"] += 1
        stats["bwd_vjps"] += bwd.vjps
        stats["bwd_fallback"] += bwd.n_fallback
        if bwd.solve is not None:
            stats["bwd_samples"] += bwd.solve.converged.numel()
            stats["bwd_unconverged"] += int((~bwd.solve.converged).sum())
    return stats


class Metrics:
    """The running sums of one epoch; :meth:`record` turns them into the epoch's history entry."""

    KEYS = ("loss_sum", "correct", "n", "steps", *_SUMMED, "epoch_s", "amp_skipped", "bwd_amplification")

    def __init__(self, state: Optional[dict[str, float]] = None) -> None:
        self.sums = {k: 0.0 for k in self.KEYS}
        if state:
            self.sums.update({k: float(v) for k, v in state.items()})

    def add(self, s: dict[str, Any]) -> None:
        a = self.sums
        a["loss_sum"] += s["loss"] * s["n"]
        a["correct"] += s["correct"]
        a["n"] += s["n"]
        a["steps"] += 1
        for k in _SUMMED:
            a[k] += s[k]
        a["amp_skipped"] += s.get("amp_skipped", 0)  # steps the fp16 loss scaler skipped (overflow)
        a["bwd_amplification"] = max(a["bwd_amplification"], s.get("bwd_amplification", 0.0))  # the epoch's largest

    def postfix(self) -> dict[str, str]:
        """The progress bar's short summary."""
        a = self.sums
        fwd = _mean(a["fwd_steps_sum"], a["fwd_samples"])
        out = {"loss": f"{a['loss_sum'] / max(a['n'], 1):.3f}", "acc": f"{a['correct'] / max(a['n'], 1):.3f}"}
        if fwd is not None:
            out["fwd"] = f"{fwd:.1f}"
            out["conv"] = f"{1 - a['fwd_unconverged'] / a['fwd_samples']:.2f}"
        out["bwd_ms"] = f"{a['bwd_ms'] / max(a['steps'], 1):.1f}"
        if a["amp_skipped"]:
            out["skipped"] = str(int(a["amp_skipped"]))
        return out

    def record(
        self, epoch: int, global_step: int, lr: Optional[float], val: Optional[dict[str, Any]], elapsed_s: float
    ) -> dict[str, Any]:
        """The history entry of ``epoch`` (0-based; stored 1-based), see :meth:`Trainer.fit`."""
        a = self.sums
        steps = a["steps"]
        fwd_conv = None if a["fwd_samples"] == 0 else 1.0 - a["fwd_unconverged"] / a["fwd_samples"]
        return {
            "epoch": epoch + 1,
            "global_step": global_step,
            "lr": lr,
            "train_loss": _mean(a["loss_sum"], a["n"]),
            "train_acc": _mean(a["correct"], a["n"]),
            "val_loss": None if val is None else val["loss"],
            "val_acc": None if val is None else val["acc"],
            "fwd_steps": _mean(a["fwd_steps_sum"], a["fwd_samples"]),
            "fwd_converged": fwd_conv,
            "fwd_unconverged": int(a["fwd_unconverged"]),
            "bwd_unconverged": int(a["bwd_unconverged"]),
            "bwd_fallback": int(a["bwd_fallback"]),
            "bwd_vjps": _mean(a["bwd_vjps"], steps),
            "bwd_amplification": a["bwd_amplification"] or None,
            "fwd_ms": _mean(a["fwd_ms"], steps),
            "bwd_ms": _mean(a["bwd_ms"], steps),
            "adjoint_ms": _mean(a["adjoint_ms"], steps) if a["adjoint_timed"] else None,
            "val_fwd_steps": None if val is None else val["fwd_steps"],
            "val_fwd_converged": None if val is None else val["fwd_converged"],
            "val_fwd_unconverged": None if val is None else val["fwd_unconverged"],
            **_adaptive_record(a),
            "steps": int(steps),
            "amp_skipped": int(a["amp_skipped"]),
            "epoch_s": a["epoch_s"],
            "elapsed_s": elapsed_s,
        }


def _adaptive_record(a: dict[str, float]) -> dict[str, Any]:
    """An :class:`~deqkit.estimators.Adaptive` estimator's epoch (the names of its
    :meth:`~deqkit.estimators.Adaptive.metrics`): checks against the exact gradient, their mean
    cosine, the share of steps that used the exact gradient, and mode switches (``None`` when no
    DEQ of the model used one)."""
    if not a.get("adaptive_steps"):
        return {"adaptive_checks": None, "adaptive_cosine": None, "adaptive_exact_share": None, "adaptive_switches": None}
    return {
        "adaptive_checks": int(a["adaptive_checks"]),
        "adaptive_cosine": _mean(a["adaptive_cos_sum"], a["adaptive_checks"]),
        "adaptive_exact_share": a["adaptive_exact_steps"] / a["adaptive_steps"],
        "adaptive_switches": int(a["adaptive_switches"]),
    }


def evaluation_record(loss_sum: float, correct: int, n: int, solves: dict[str, float]) -> dict[str, Any]:
    """What :meth:`Trainer.evaluate` returns."""
    samples = solves["fwd_samples"]
    return {
        "loss": _mean(loss_sum, n),
        "acc": _mean(correct, n),
        "n": n,
        "fwd_steps": _mean(solves["fwd_steps_sum"], samples),
        "fwd_converged": None if samples == 0 else 1.0 - solves["fwd_unconverged"] / samples,
        "fwd_unconverged": int(solves["fwd_unconverged"]),
    }


class MetricsLog:
    """Appends each epoch record to a JSON-lines file and, optionally, to TensorBoard."""

    def __init__(self, log_path: Optional[str], tensorboard_dir: Optional[str]) -> None:
        self.log_path, self.tensorboard_dir = log_path, tensorboard_dir
        self._tb: Any = None

    def open(self, history: Optional[list[dict[str, Any]]] = None) -> None:
        """Start the log of a run whose completed epochs are ``history``: the JSON-lines file is
        rewritten (atomically) to hold exactly those records, so it mirrors the checkpoint —
        a fresh run does not append to an older run's lines, and a resumed run drops a line
        half-written by a crash and restores one the crash kept from being written. Then open
        the TensorBoard writer (a warning, no writer, when it cannot be imported)."""
        if history is not None and self.log_path is not None:
            atomic_write_text(self.log_path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in history))
        if self.tensorboard_dir is None or self._tb is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # type: ignore[attr-defined]
        except Exception as exc:  # tensorboard is optional
            warnings.warn(f"TensorBoard logging disabled: torch.utils.tensorboard cannot be imported ({exc}).", stacklevel=4)
            return
        self._tb = SummaryWriter(self.tensorboard_dir)

    def write(self, record: dict[str, Any]) -> None:
        if self.log_path is not None:
            path = Path(self.log_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, allow_nan=True) + "\n")
                fh.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch" and v is not None:
                    self._tb.add_scalar(k, v, record["epoch"])
            self._tb.flush()

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
