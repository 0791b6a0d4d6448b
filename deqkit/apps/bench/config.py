"""The benchmark problems: a seeded ``DEQClassifier.mlp`` on a batch of ``digits``, Broyden forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ...estimators import GradientEstimator
from ...models import DEQClassifier
from ...solvers import Broyden, Solver
from ..common import build_classifier

__all__ = ["BenchConfig", "REFERENCE", "HARD", "digits_batch", "build_model", "DeviceLike"]

#: a device as the sections take it (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``)
DeviceLike = Union[str, torch.device]


@dataclass(frozen=True)
class BenchConfig:
    """One DEQ benchmark problem: ``DEQClassifier.mlp(64, width, 10)`` on a digits batch, Broyden forward."""

    name: str
    width: int = 64
    init_scale: float = 0.25
    tol: float = 1e-4
    max_iter: int = 30
    memory: int = 30
    batch: int = 64
    seed: int = 0

    def solver(
        self, max_iter: Optional[int] = None, tol: Optional[float] = None, opa_freq: Optional[int] = None, stop_mode: str = "rel"
    ) -> Broyden:
        return Broyden(
            memory=self.memory,
            tol=self.tol if tol is None else tol,
            max_iter=self.max_iter if max_iter is None else max_iter,
            opa_freq=opa_freq,
            stop_mode=stop_mode,
        )

    def describe(self) -> str:
        return (
            f"`DEQClassifier.mlp(64, {self.width}, 10, init_scale={self.init_scale:g})`, "
            f"`Broyden(memory={self.memory}, tol={self.tol:g}, max_iter={self.max_iter})` (relative residual), batch {self.batch}"
        )


#: the reference configuration: the digits MLP DEQ of ``deqkit compare``
REFERENCE = BenchConfig("reference")
#: a harder one: wider, less contractive cell, tighter tolerance (Broyden needs most of its iteration cap)
HARD = BenchConfig("hard", width=256, init_scale=0.7, tol=1e-6, max_iter=40)


def digits_batch(
    batch: int, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> tuple[Tensor, Tensor, str]:
    """The first ``batch`` training samples of ``digits`` (64 features) on ``device``; synthetic if scikit-learn is missing."""
    try:
        from ...data import load_dataset

        splits = load_dataset("digits", seed=seed)
        x, y = splits.train[: min(batch, len(splits.train))]
        return x.to(device=device, dtype=dtype).clone(), y.to(device).clone(), "digits"
    except ImportError:  # pragma: no cover - scikit-learn is a dev dependency
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(batch, 64, generator=g, dtype=dtype), torch.randint(0, 10, (batch,), generator=g)
        return x.to(device), y.to(device), "synthetic"


def build_model(
    cfg: BenchConfig,
    grad: GradientEstimator,
    solver: Optional[Solver] = None,
    dtype: torch.dtype = torch.float32,
    device: DeviceLike = "cpu",
) -> DEQClassifier:
    """The seeded classifier on ``device`` (same weights for every call with the same ``cfg``: built on the CPU, then moved)."""
    model = build_classifier("mlp", (64,), 10, cfg.width, solver or cfg.solver(), grad, cfg.seed, init_scale=cfg.init_scale)
    return model.to(device=device, dtype=dtype)
