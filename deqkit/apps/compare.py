"""The ``deqkit compare`` job: train one DEQ with each gradient estimator, side by side, and report.

Every run starts from the same seed and the same initial weights, uses the same Broyden
forward solve (so SHINE / BroydenReuse can reuse its inverse estimate) and the same data order;
only the backward pass differs. After training, :func:`deqkit.diagnostics.gradient_quality`
measures each estimator's gradient against a tight Exact one on a held-out batch, at that
run's own final weights.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .._io import atomic_open, atomic_write_text, save_figure
from .._options import check_choice, check_int, check_positive, validated_options
from ..data import Splits
from ..diagnostics import format_table, gradient_quality
from ..errors import OptionError
from ..estimators import SHINE, Adaptive, BroydenReuse, Exact, GradientEstimator, JacobianFree, Neumann, Unrolled, WarmExact
from ..linear import GMRES
from ..models import DEQClassifier
from ..solvers import Broyden, Solver
from ..train import AUGMENTATIONS, TrainConfig, Trainer
from .common import (
    MODELS,
    build_classifier,
    jac_reg_weight,
    load_splits,
    make_augment,
    prepare_out,
    resolve_device,
    set_threads,
)

#: the estimators ``deqkit compare`` knows, by name (each a factory: a fresh object per run)
ESTIMATOR_PRESETS: dict[str, Callable[[], GradientEstimator]] = {
    "exact": Exact,  # the library default: AutoAdjoint, tolerance matched to the forward's residual
    "exact-gmres": lambda: Exact(GMRES(tol=1e-6, max_iter=60)),
    "exact-broyden": lambda: Exact(Broyden(memory=30, tol=1e-6, max_iter=60)),
    "exact-warm": WarmExact,  # the Broyden adjoint above, started from −vH and the forward Hᵀ
    "exact-precond": lambda: WarmExact(GMRES(tol=1e-6, max_iter=60)),  # GMRES, the forward −H as preconditioner
    "unrolled": lambda: Unrolled(5, 0.5),
    "neumann": lambda: Neumann(5, 0.5),
    "jacobian-free": JacobianFree,
    "shine": lambda: SHINE(fallback=True),
    "shine-plain": lambda: SHINE(fallback=False),
    "shine-refine": lambda: SHINE(fallback=True, refine=3),
    "shine-opa": lambda: SHINE(fallback=False),  # with OPA the fallback hurts (see SHINE's docstring)
    "broyden-reuse": BroydenReuse,
}
DEFAULT_ESTIMATORS = ("exact", "unrolled", "neumann", "jacobian-free", "shine", "shine-opa", "broyden-reuse")
#: presets whose forward Broyden adds outer-problem-aware updates every this many steps
OPA_FREQ = {"shine-opa": 5}

# the adaptive estimator (SHINE + OPA on the Broyden forward, exact checks every 20 steps)
ESTIMATOR_PRESETS["adaptive"] = Adaptive
OPA_FREQ["adaptive"] = 5


def preset_label(name: str, grad: GradientEstimator) -> str:
    """The table label of preset ``name`` built as ``grad``: its own label, plus its OPA frequency."""
    return grad.label + (f" + OPA/{OPA_FREQ[name]}" if name in OPA_FREQ else "")


@validated_options
@dataclass
class CompareConfig:
    """Settings of :func:`run_compare` (the defaults are the embedded ``digits`` demo).

    ``max_iter``, ``tol`` and ``memory`` are the forward Broyden solver's options.
    """

    dataset: str = "digits"
    data_dir: Optional[str] = None
    subset: Optional[int] = None
    model: str = "mlp"
    width: int = 64
    estimators: list[str] = field(default_factory=lambda: list(DEFAULT_ESTIMATORS))
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    augment: str = "none"
    jac_reg: Union[float, str] = "auto"
    seed: int = 0
    max_iter: int = 30
    tol: float = 1e-4
    memory: int = 30
    device: str = "cpu"
    threads: Optional[int] = None
    out: str = "runs/compare"
    progress: bool = True
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        owner = "CompareConfig"
        if not self.estimators:
            raise OptionError(f"{owner}: give at least one estimator.")
        for name in self.estimators:
            check_choice(owner, "estimator", name, ESTIMATOR_PRESETS)
        check_choice(owner, "model", self.model, MODELS)
        check_choice(owner, "augment", self.augment, AUGMENTATIONS)
        jac_reg_weight(self.jac_reg, self.model)  # validates jac_reg
        for name in ("width", "epochs", "batch_size", "max_iter", "memory"):
            check_int(owner, name, getattr(self, name))
        check_positive(owner, "lr", self.lr)
        check_positive(owner, "tol", self.tol)

    @property
    def jac_reg_weight(self) -> float:
        """The Jacobian-regularisation weight ``jac_reg`` resolves to for ``model`` (``"auto"``: per model)."""
        return jac_reg_weight(self.jac_reg, self.model)

    def solver(self, estimator: str = "") -> Solver:
        """The forward solver (the same for every estimator; OPA presets add their extra updates)."""
        return Broyden(memory=self.memory, tol=self.tol, max_iter=self.max_iter, opa_freq=OPA_FREQ.get(estimator))


def _residual_curve(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Mean relative forward residual per Broyden iteration on a batch (the trained model)."""
    model.eval()
    with torch.no_grad():
        _, info = model(x, return_info=True)
    trace = info.forward.rel_trace  # (T, B)
    return [float(v) for v in trace.mean(dim=1)]


#: the columns of the printed table: (row key, heading, format)
TABLE_COLUMNS = (
    ("label", "estimator", ""),
    ("test_acc", "test acc", ".4f"),
    ("train_time_s", "train s", ".1f"),
    ("fwd_steps", "fwd steps", ".1f"),
    ("fwd_converged", "fwd conv", ".3f"),
    ("bwd_ms", "bwd ms", ".2f"),
    ("bwd_speedup", "bwd speed-up", ".1f"),
    ("cosine", "cos to exact", ".4f"),
)


def _probe_batch(splits: Splits, cfg: CompareConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out batch (up to 128 validation samples, seeded) where gradients are compared."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    idx = torch.randperm(len(splits.val), generator=gen)[: min(128, len(splits.val))]
    x, y = splits.val[idx]
    return x.to(cfg.device), y.to(cfg.device)


def _describe(cfg: CompareConfig, splits: Splits) -> str:
    return (
        f"deqkit compare: {cfg.dataset} ({len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test), "
        + (f"{cfg.model} width {cfg.width}, " if cfg.model != "mdeq" else "mdeq (its default channels; --width does not apply), ")
        + f"Broyden(memory={cfg.memory}, tol={cfg.tol:g}, max_iter={cfg.max_iter}), "
        f"{cfg.epochs} epochs, seed {cfg.seed}"
    )


def _train_config(cfg: CompareConfig, name: str) -> TrainConfig:
    out = Path(cfg.out)
    return TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        jac_reg_weight=cfg.jac_reg_weight,
        seed=cfg.seed,
        device=cfg.device,
        checkpoint_dir=str(out / "checkpoints" / name),
        log_path=str(out / f"metrics-{name}.jsonl"),
        progress=cfg.progress,
    )


def _run_one(
    name: str, cfg: CompareConfig, splits: Splits, probe: tuple[torch.Tensor, torch.Tensor], log: Callable[[str], None]
) -> dict[str, Any]:
    """Train (or, with ``cfg.resume``, finish) the run of preset ``name``; its table row."""
    grad = ESTIMATOR_PRESETS[name]()
    model = build_classifier(cfg.model, splits.input_shape, splits.num_classes, cfg.width, cfg.solver(name), grad, cfg.seed).to(
        cfg.device
    )
    label = preset_label(name, grad)
    log(f"\n[{name}] {label}")
    trainer = Trainer(
        model, splits.train, splits.val, _train_config(cfg, name), augment=make_augment(cfg.augment, splits, cfg.model)
    )
    history = trainer.fit(resume=cfg.resume)  # resume: finished runs load their last checkpoint
    train_time = history[-1]["elapsed_s"]  # training wall-clock, summed across resumes
    test = trainer.evaluate(splits.test)
    quality = _gradient_quality(model, grad, *probe)
    row = {
        "estimator": name,
        "label": label,
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "train_time_s": train_time,
        "fwd_steps": statistics.fmean(h["fwd_steps"] for h in history),
        "fwd_converged": statistics.fmean(h["fwd_converged"] for h in history),
        "bwd_ms": statistics.fmean(h["bwd_ms"] for h in history),
        "cosine": quality.cosine,
        "norm_ratio": quality.norm_ratio,
        "history": history,
        "residual_curve": _residual_curve(model, probe[0]),
    }
    log(
        f"[{name}] test acc {row['test_acc']:.4f}, {train_time:.1f}s, backward {row['bwd_ms']:.2f} ms/step, cosine {quality.cosine:.4f}"
    )
    return row


def _gradient_quality(model: DEQClassifier, grad: GradientEstimator, x: torch.Tensor, y: torch.Tensor) -> Any:
    """``grad``'s gradient against a tight Exact one at the model's final weights, on ``(x, y)``."""
    loss_fn = lambda z: nn.functional.cross_entropy(model.head(z), y)  # noqa: E731
    with torch.no_grad():
        u = model.injection(x)
    return gradient_quality(model.deq, u, loss_fn, [grad], repeats=3)[0]


def _add_speedups(results: list[dict[str, Any]]) -> None:
    """``bwd_speedup``: Exact's backward time over each run's (``None`` without an Exact run)."""
    exact_bwd = next((r["bwd_ms"] for r in results if r["estimator"] == "exact"), None)
    for r in results:
        r["bwd_speedup"] = (exact_bwd / r["bwd_ms"]) if exact_bwd and r["bwd_ms"] > 0 else None


def run_compare(cfg: CompareConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train one model per estimator in ``cfg.estimators``; print the table; write JSON, CSV and PNG.

    Returns one dict per estimator with the table's numbers, the per-epoch history and the
    residual curve. Each estimator's training checkpoints to ``out/checkpoints/<name>``; with
    ``cfg.resume`` an interrupted comparison continues where it stopped. The output directory
    follows :func:`~deqkit.apps.common.prepare_out` (an earlier run there is refused unless
    ``cfg.resume`` or ``cfg.overwrite``), checked before any work.
    """
    cfg.device = resolve_device(cfg.device)
    out = prepare_out(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
    set_threads(cfg.threads, cfg.device)
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.subset, cfg.seed, cfg.model)
    probe = _probe_batch(splits, cfg)
    log(_describe(cfg, splits))
    results = [_run_one(name, cfg, splits, probe, log) for name in cfg.estimators]
    _add_speedups(results)
    log("\n" + format_table(results, list(TABLE_COLUMNS)))
    write_outputs(results, cfg, out)
    log(f"\nwrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'compare.png'}")
    return results


def write_outputs(results: list[dict[str, Any]], cfg: CompareConfig, out: Path) -> None:
    """results.json (everything), results.csv (the table) and compare.png, each written atomically."""
    # the weight "auto" resolved to, next to what was asked for
    config = {**asdict(cfg), "jac_reg_weight": cfg.jac_reg_weight}
    payload = {"config": config, "results": results}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2, default=float))
    keys = [
        "estimator",
        "label",
        "test_acc",
        "test_loss",
        "train_time_s",
        "fwd_steps",
        "fwd_converged",
        "bwd_ms",
        "bwd_speedup",
        "cosine",
        "norm_ratio",
    ]

    with atomic_open(out / "results.csv", "w") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    plot(results, out / "compare.png")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Validation accuracy against training wall-clock, and forward residual against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        t = [h["elapsed_s"] for h in r["history"]]
        acc = [h["val_acc"] for h in r["history"]]
        ax1.plot(t, acc, marker="o", ms=3, label=r["label"])
        ax2.semilogy(range(1, len(r["residual_curve"]) + 1), r["residual_curve"], label=r["label"])
    ax1.set_xlabel("training wall-clock (s)")
    ax1.set_ylabel("validation accuracy")
    ax1.set_title("accuracy vs time")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("Broyden iteration")
    ax2.set_ylabel("mean relative residual")
    ax2.set_title("forward residual (trained models, val batch)")
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
