"""The multiscale DEQ (``DEQClassifier.mdeq``) on Fashion-MNIST: gradient estimators on one
training step, memory against the forward depth, and side by side with torchdeq.

Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020 (the model);
Ramzi et al., "SHINE: SHaring the INverse Estimate from the forward pass for bi-level
optimization and implicit models", ICLR 2022 (whose MDEQ backward-time ratio the SHINE row is
read against); Geng et al., "On Training Implicit Models", NeurIPS 2021 (the phantom gradient).

The state is a tuple (one feature map per resolution branch): deqkit's DEQ takes it as it is,
torchdeq gets ``f(z_flat) = flatten(cell(unflatten(z_flat), u))`` per sample
(:func:`~deqkit.apps.bench.torchdeq.flat_cell`). SHINE's reference ratio is for trained models,
so the cell is first trained for ``warmup_steps`` Adam steps with ``Exact()`` (:func:`trained_mdeq`);
every table measures that trained model on a batch it was not trained on. The measuring machinery
is the MLP sections': :func:`~deqkit.apps.bench.step.step_rows`,
:func:`~deqkit.apps.bench.memory.memory_rows`, :func:`~deqkit.apps.bench.torchdeq.step_pairs`.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..._options import check_int, check_positive
from ...errors import OptionError
from ...estimators import Exact, GradientEstimator
from ...models import DEQClassifier
from ...solvers import Broyden, Solver
from ..common import build_classifier
from .config import DeviceLike
from .measure import cosine, rel_error
from .memory import memory_md, memory_rows, memory_targets
from .report import fmt_range, mark, md_table
from .step import step_rows, vjps_cell
from .torchdeq import (
    INSTALL_HINT,
    TorchDEQSettings,
    format_step_pairs,
    reference_gradient,
    step_pair_targets,
    step_pairs,
    torchdeq_available,
)

__all__ = [
    "TITLE",
    "MDEQ_ESTIMATORS",
    "MDEQBenchConfig",
    "mdeq_data",
    "trained_mdeq",
    "bench_mdeq",
    "format_mdeq_tables",
    "mdeq_targets",
    "MDEQ_NOTES",
]

#: this section's heading in BENCHMARKS.md
TITLE = "## Multiscale DEQ (MDEQ): estimators, memory, torchdeq"

#: estimators of the step table, keys of :data:`deqkit.apps.compare.ESTIMATOR_PRESETS`
MDEQ_ESTIMATORS = ("exact", "exact-gmres", "shine", "shine-opa", "unrolled", "jacobian-free", "adaptive")
#: the preset the ``bwd ÷ Exact`` column divides by: the default ``Exact()``
BASELINE = "exact"
#: the image shape and classes of Fashion-MNIST
INPUT_SHAPE, NUM_CLASSES = (1, 28, 28), 10


@dataclass(frozen=True)
class MDEQBenchConfig:
    """The MDEQ benchmark: ``DEQClassifier.mdeq((1, 28, 28), 10)`` (its defaults), the forward
    solver of ``deqkit train`` (``Broyden(tol, max_iter)``, Broyden's default ``memory``),
    trained ``warmup_steps`` Adam steps (``lr``, ``Exact()``, batches of ``batch``), then
    measured on the next ``batch`` training images; ``caps``: the memory table's forward caps;
    ``repeats``: interleaved timing rounds; ``ref_tol``: the float64 reference's forward tolerance."""

    batch: int = 64
    warmup_steps: int = 40
    lr: float = 2e-3
    seed: int = 0
    tol: float = 1e-4
    max_iter: int = 30
    memory: int = 20
    caps: tuple[int, ...] = (10, 20, 40)
    repeats: int = 7
    ref_tol: float = 1e-10
    ref_max_iter: int = 1000
    torchdeq: bool = True
    #: forward and backward iteration caps of the torchdeq comparison (both libraries)
    torchdeq_max_iter: int = 40
    #: a ``deqkit train --model mdeq`` checkpoint (``last.pt``) to measure instead of the warm-up
    #: model (the default channels); it is measured on the first ``batch`` test images
    checkpoint: Optional[str] = None
    name: str = "mdeq"

    def __post_init__(self) -> None:
        owner = "MDEQBenchConfig"
        for name in ("batch", "max_iter", "memory", "repeats", "ref_max_iter", "torchdeq_max_iter"):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "warmup_steps", self.warmup_steps, minimum=0)
        for name in ("lr", "tol", "ref_tol"):
            check_positive(owner, name, getattr(self, name))
        caps = tuple(self.caps)
        increasing = list(caps) == sorted(set(caps))
        if not caps or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in caps) or not increasing:
            raise OptionError(f"{owner}: caps must be increasing positive integers, got {self.caps!r}.")
        if self.checkpoint is not None and (not isinstance(self.checkpoint, str) or not self.checkpoint):
            raise OptionError(f"{owner}: checkpoint must be a file path, got {self.checkpoint!r}.")

    @classmethod
    def quick(cls, **changes: Any) -> MDEQBenchConfig:
        """The smoke run (seconds on a quiet machine): batch 4, 2 warm-up steps, caps 2 and 4, 1 round, torchdeq caps 15."""
        quick = cls(batch=4, warmup_steps=2, caps=(2, 4), repeats=1, torchdeq_max_iter=15, name="mdeq-quick")
        return replace(quick, **changes)

    def solver(self, opa_freq: Optional[int] = None) -> Broyden:
        return Broyden(memory=self.memory, tol=self.tol, max_iter=self.max_iter, opa_freq=opa_freq)

    def capped_solver(self, cap: int) -> Broyden:
        """Broyden run to exactly ``cap`` steps (an absolute tolerance of 1e-30 is never reached)."""
        return Broyden(memory=self.memory, tol=1e-30, max_iter=cap, stop_mode="abs")

    def torchdeq_settings(self) -> TorchDEQSettings:
        """The torchdeq comparison's solver settings: torchdeq.py's, with the caps ``torchdeq_max_iter``."""
        return TorchDEQSettings(f_max_iter=self.torchdeq_max_iter, b_max_iter=self.torchdeq_max_iter)

    def describe(self) -> str:
        return (
            f"`DEQClassifier.mdeq((1, 28, 28), 10)` (channels (16, 32), branches 7×7 and 4×4), "
            f"`Broyden(memory={self.memory}, tol={self.tol:g}, max_iter={self.max_iter})` (relative residual), batch {self.batch}"
        )


def mdeq_data(cfg: MDEQBenchConfig, device: DeviceLike = "cpu") -> tuple[Tensor, Tensor, str]:
    """``warmup_steps + 1`` batches of Fashion-MNIST training images ``(N, 1, 28, 28)`` and labels
    (the last batch is the measured one), or with ``cfg.checkpoint`` one batch of test images;
    seeded random images, source ``"synthetic"``, when the data set is not found
    (``deqkit.data.load_dataset`` says where it looked)."""
    n = cfg.batch if cfg.checkpoint else (cfg.warmup_steps + 1) * cfg.batch
    try:
        from ...data import load_dataset

        splits = load_dataset("fashion-mnist", seed=cfg.seed, flatten=False)
        part = splits.test if cfg.checkpoint else splits.train
        if len(part) < n:
            raise OptionError(
                f"MDEQ benchmark: {n} images wanted, but fashion-mnist has {len(part)} "
                f"{'test' if cfg.checkpoint else 'training'} images; use fewer warm-up steps or a smaller batch."
            )
        x, y = part[:n]
        return x.to(device).clone(), y.to(device).clone(), "fashion-mnist"
    except (FileNotFoundError, ImportError) as exc:
        warnings.warn(f"MDEQ benchmark: Fashion-MNIST not available ({exc}); using seeded random images.", stacklevel=2)
        g = torch.Generator().manual_seed(cfg.seed)
        x, y = torch.randn(n, *INPUT_SHAPE, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)
        return x.to(device), y.to(device), "synthetic"


def trained_mdeq(
    cfg: MDEQBenchConfig, x: Tensor, y: Tensor, *, log: Callable[[str], None] = print
) -> tuple[DEQClassifier, dict[str, Any]]:
    """The seeded MDEQ after ``cfg.warmup_steps`` Adam steps (``Exact()``, train-mode) on the
    first ``warmup_steps`` batches of ``(x, y)``; returns it and the warm-up's loss record. With
    ``cfg.checkpoint``: the model of that ``deqkit train`` checkpoint instead (no training; the
    record names the checkpoint, its epoch and step)."""
    model = build_classifier("mdeq", INPUT_SHAPE, NUM_CLASSES, 0, cfg.solver(), Exact(), cfg.seed).to(x.device)
    if cfg.checkpoint:
        return model, _load_checkpoint(model, cfg.checkpoint)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses, t0 = [], time.perf_counter()
    for k in range(cfg.warmup_steps):
        xb, yb = x[k * cfg.batch : (k + 1) * cfg.batch], y[k * cfg.batch : (k + 1) * cfg.batch]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (k + 1) % 10 == 0 or k + 1 == cfg.warmup_steps:
            log(f"  warm-up step {k + 1}/{cfg.warmup_steps}: loss {losses[-1]:.3f}")
    opt.zero_grad(set_to_none=True)
    return model, {"steps": cfg.warmup_steps, "losses": losses, "time_s": time.perf_counter() - t0}


def _load_checkpoint(model: DEQClassifier, path: str) -> dict[str, Any]:
    """Load the weights of the ``deqkit train`` checkpoint ``path`` into ``model``; its record."""
    from ..._io import load_torch_file

    advice = "pass the last.pt that `deqkit train --model mdeq` wrote (default channels)"
    ckpt = load_torch_file(path, what="deqkit training checkpoint", advice=advice)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise OptionError(f"MDEQ benchmark: {path} is not a deqkit training checkpoint (no model weights); {advice}.")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise OptionError(f"MDEQ benchmark: {path} does not hold this benchmark's MDEQ ({first}); {advice}.") from exc
    return {
        "steps": 0,
        "losses": [],
        "time_s": 0.0,
        "checkpoint": path,
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
    }


def _with(model: DEQClassifier, grad: GradientEstimator, solver: Solver) -> DEQClassifier:
    """A copy of ``model`` (same weights) with estimator ``grad`` and forward ``solver``."""
    m = copy.deepcopy(model)
    m.deq.grad, m.deq.solver = grad, solver
    return m


def _reference(model: DEQClassifier, x: Tensor, y: Tensor, cfg: MDEQBenchConfig) -> tuple[Tensor, list[str]]:
    """The float64 reference gradient and the warnings its solves raised (shown under the tables)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = reference_gradient(model, x, y, tol=cfg.ref_tol, max_iter=cfg.ref_max_iter)
    for p in model.parameters():
        p.grad = None
    return ref, [str(w.message).splitlines()[0] for w in caught]


def bench_mdeq(
    cfg: MDEQBenchConfig = MDEQBenchConfig(),
    *,
    estimators: Sequence[str] = MDEQ_ESTIMATORS,
    log: Callable[[str], None] = print,
    device: DeviceLike = "cpu",
) -> dict[str, Any]:
    """Run the MDEQ section on ``device``: warm-up training, then the three tables.

    Returns a dict: ``cfg``, ``source`` (``"fashion-mnist"`` or ``"synthetic"``), ``warmup``
    (loss record), ``reference_warnings``, ``step`` (one row per estimator: the
    :func:`~deqkit.apps.bench.step.step_rows` keys plus ``ref_cos`` and ``ref_err``, the
    gradient's cosine and relative error to the float64 reference), ``memory`` (the
    :func:`~deqkit.apps.bench.memory.memory_rows` rows for ``Exact()``, SHINE and BPTT), and
    ``torchdeq`` (the :func:`~deqkit.apps.bench.torchdeq.step_pairs` rows, or ``None`` when
    torchdeq is not installed or ``cfg.torchdeq`` is off).
    """
    if BASELINE not in estimators:
        estimators = (BASELINE, *estimators)
    x_all, y_all, source = mdeq_data(cfg, device)
    if cfg.checkpoint:
        log(f"MDEQ: {source}, the model of {cfg.checkpoint}, batch {cfg.batch} of test images")
    else:
        log(f"MDEQ: {source}, {cfg.warmup_steps} warm-up steps (Adam lr {cfg.lr:g}, Exact(), batch {cfg.batch})")
    model, warm = trained_mdeq(cfg, x_all, y_all, log=log)
    x, y = x_all[-cfg.batch :], y_all[-cfg.batch :]
    ref, ref_warnings = _reference(model, x, y, cfg)
    log("  estimators on one step ...")
    rows = step_rows(
        _with(model, Exact(), cfg.solver()),
        x,
        y,
        estimators,
        cfg.solver,
        repeats=cfg.repeats,
        memory=False,
        cosine=False,
        keep_grad=True,
        baseline=BASELINE,
    )
    for r in rows:
        g = r.pop("grad")
        r["ref_cos"], r["ref_err"] = cosine(g, ref), rel_error(g, ref)
    log("  memory against forward depth ...")
    mem = memory_rows(
        lambda grad, solver: _with(model, grad, solver),
        cfg.capped_solver,
        cfg.caps,
        x,
        y,
        methods=(("Exact()", "exact"), ("SHINE(fallback)", "shine")),
    )
    pairs = None
    if cfg.torchdeq and torchdeq_available():
        log("  against torchdeq ...")
        pairs = step_pairs(_with(model, Exact(), cfg.solver()), x, y, cfg.torchdeq_settings(), cfg.repeats, reference=ref)
    elif cfg.torchdeq:
        log(INSTALL_HINT)
    res = {
        "cfg": cfg,
        "source": source,
        "warmup": warm,
        "reference_warnings": ref_warnings,
        "step": rows,
        "memory": mem,
        "torchdeq": pairs,
    }
    log(format_mdeq_tables(res))
    return res


def format_mdeq_tables(res: dict[str, Any]) -> str:
    """The section's tables (markdown), each with a line saying what it shows."""
    cfg: MDEQBenchConfig = res["cfg"]
    data = "Fashion-MNIST" if res["source"] == "fashion-mnist" else "**synthetic** random images (Fashion-MNIST not found)"
    warm = res["warmup"]
    losses = warm["losses"]
    if warm.get("checkpoint"):
        trained = f"the model of `{warm['checkpoint']}` (`deqkit train`: epoch {warm['epoch']}, step {warm['global_step']})"
        measured = "measured on the first test batch"
    else:
        trained = (
            f"trained first for {warm['steps']} Adam steps (lr {cfg.lr:g}, `Exact()`, batch {cfg.batch}; loss "
            f"{losses[0]:.2f} → {losses[-1]:.2f})"
            if losses
            else "untrained (0 warm-up steps)"
        )
        measured = "measured on the next batch"
    parts = [f"{cfg.name}: {cfg.describe()} of {data}, {trained}, {measured}.", ""]
    head = [
        "estimator",
        "fwd ms",
        "bwd ms",
        "bwd ÷ Exact()",
        "fwd steps",
        "fwd converged",
        "bwd VJPs (iters)",
        "max ‖w‖ / ‖v‖",
        "cos to ref",
        "rel err to ref",
    ]
    body = []
    for r in res["step"]:
        body.append(
            [
                r["label"],
                fmt_range(r["fwd_ms"]),
                fmt_range(r["bwd_ms"]),
                f"{r['bwd_vs_exact']:.2f}",
                f"{r['fwd_steps']:.1f}",
                f"{r['fwd_converged']:.0%}",
                vjps_cell(r),
                "-" if r.get("amplification") is None else f"{r['amplification']:.3g}",
                f"{r['ref_cos']:.6f}",
                f"{r['ref_err']:.1e}",
            ]
        )
    parts += [
        f"Estimators on one training step ({cfg.repeats} interleaved rounds, median [min, max]); reference: float64 copy, "
        f"forward Anderson to rel {cfg.ref_tol:g}, adjoint GMRES to rel 1e-10 (not matched to the forward).",
        "",
        md_table(head, body),
        "",
    ]
    if res["reference_warnings"]:
        parts += ["Reference solve warnings: " + "; ".join(res["reference_warnings"]), ""]
    parts += [
        f"Memory of one step against the forward cap (Broyden to an unreachable tolerance, so every solve runs to its cap; "
        f"Broyden's buffer holds min({cfg.memory}, cap − 1) columns):",
        "",
        memory_md(res["memory"]),
        "",
    ]
    if res["torchdeq"] is not None:
        s = cfg.torchdeq_settings()
        parts += [
            f"Against torchdeq (its layer takes one tensor state: `f(z_flat) = flatten(cell(unflatten(z_flat), u))`); both "
            f"libraries: Anderson forward to rel tol {s.f_tol:g} (cap {s.f_max_iter}), backward abs tol {s.b_tol:g} "
            f"(cap {s.b_max_iter}); grad rel err against the reference above:",
            "",
            format_step_pairs(res["torchdeq"]),
            "",
        ]
    elif cfg.torchdeq:
        parts += [INSTALL_HINT, ""]
    return "\n".join(parts).rstrip("\n")


def mdeq_targets(res: dict[str, Any]) -> list[str]:
    """The target lines, each marked met or missed."""
    cfg: MDEQBenchConfig = res["cfg"]
    by = {r["estimator"]: r for r in res["step"]}
    out = []
    for name, bound in (("shine", 0.10), ("shine-opa", 0.10), ("unrolled", 0.6)):
        if name in by:
            v = by[name]["bwd_vs_exact"]
            out.append(f"{by[name]['label']} backward ≤ {bound:g} × Exact() backward: {v:.2f}× — {mark(v <= bound)}")
    out += memory_targets(res["memory"], full_from=cfg.memory)
    if res["torchdeq"] is not None:
        out += step_pair_targets(res["torchdeq"], cfg.name)
    return out


MDEQ_NOTES = """\
What is measured: as in the step-cost section (one training step, no optimiser update, same
weights and batch every round, 1 warm-up per estimator, then interleaved rounds), on the
multiscale DEQ after a short training run: SHINE's paper ratio (0.077 on CIFAR MDEQ) is for
trained models, whose Jacobians differ from the initialisation's. `bwd ÷ Exact()` divides by the
default `Exact()` (Picard on the adjoint while it contracts, then GMRES, to the forward's
residual). `cos to ref` / `rel err to ref`: the float32 step's parameter gradient against a
float64 copy solved tightly (see the table's line); the forward tolerance of 1e-4 bounds what any
float32 estimator can reach. `adaptive` checks against the exact adjoint on its first step (the
warm-up) and every 20 steps; the timed rounds are its cheap steps. Memory and torchdeq columns: as
in those sections; the DEQ memory target compares caps from Broyden's `memory` on, where its
buffer is (nearly) full. torchdeq's solvers see the flat `(B, d)` state; deqkit packs the tuple
the same way internally.
"""
