"""Shared fixtures and small problems for the core tests (solvers, estimators, DEQ).

Every tensor is created with an explicit dtype: other test modules change the global default.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

from deqkit import GMRES, Anderson, Broyden, Dense, FixedPoint

F64 = torch.float64

# -- no silent skips ------------------------------------------------------------------------------
# The optional packages of the ``[dev]`` extras that tests import (or ``importorskip``). In a
# ``[dev]`` run a missing one is an error, not a skip: ``DEQKIT_REQUIRE_ALL=1`` (CI, and ``make``
# targets, which install ``.[dev]``) fails the run at start-up, and turns any
# ``pytest.importorskip`` skip into a failure. ``DEQKIT_REQUIRE_ALL=0`` allows the skips
# (a minimal install); unset, the rule applies under ``make`` (``MAKELEVEL`` set) and not otherwise.
# Skips that are not about an importable package (the apt-installed Fashion-MNIST files) still
# skip, with their reason shown by ``-ra``.
REQUIRED_OPTIONAL = ("cvxpy", "mlxtend", "mnist1d", "sklearn", "scipy", "matplotlib", "hypothesis")


def require_all_optional() -> bool:
    flag = os.environ.get("DEQKIT_REQUIRE_ALL", "").strip().lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag in ("0", "false", "no"):
        return False
    return bool(os.environ.get("MAKELEVEL"))


def missing_optional() -> list[str]:
    return [m for m in REQUIRED_OPTIONAL if importlib.util.find_spec(m) is None]


def pytest_sessionstart(session: pytest.Session) -> None:
    if require_all_optional() and (missing := missing_optional()):
        raise pytest.UsageError(
            f"DEQKIT_REQUIRE_ALL: optional test dependencies missing: {', '.join(missing)}. "
            f"Install the dev extras (pip install -e '.[dev]'), or set DEQKIT_REQUIRE_ALL=0 to let "
            f"the tests that need them skip."
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and call.excinfo is not None and require_all_optional():
        msg = str(call.excinfo.value)
        if msg.startswith("could not import"):  # pytest.importorskip
            rep.outcome = "failed"
            rep.longrepr = f"DEQKIT_REQUIRE_ALL: {msg} (a required optional dependency; not skipped)"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and require_all_optional():
        longrepr = rep.longrepr
        msg = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if "could not import" in msg:  # a module-level pytest.importorskip
            rep.outcome = "failed"
            rep.longrepr = f"DEQKIT_REQUIRE_ALL: {msg} (a required optional dependency; not skipped)"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


class LinearCell(nn.Module):
    """``f(z, x) = A z + B x`` (rows: ``z Aᵀ + x Bᵀ``), spectral norm of ``A`` = ``rho`` < 1."""

    def __init__(self, d: int = 8, p: int = 5, rho: float = 0.5, seed: int = 0, symmetric: bool = False, dtype=F64):
        super().__init__()
        A = randn(d, d, seed=seed, dtype=dtype)
        if symmetric:
            A = A + A.T
        A = rho * A / torch.linalg.matrix_norm(A, ord=2)
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(randn(d, p, seed=seed + 1, dtype=dtype))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T + x @ self.B.T


class ShiftCell(nn.Module):
    """``f(z, x) = A z + x`` with a (symmetric) ``A``: then ``dL/dx = w`` exactly."""

    def __init__(self, d: int = 8, rho: float = 0.5, seed: int = 0, symmetric: bool = True, dtype=F64):
        super().__init__()
        A = randn(d, d, seed=seed, dtype=dtype)
        if symmetric:
            A = A + A.T
        self.A = nn.Parameter(rho * A / torch.linalg.matrix_norm(A, ord=2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T + x


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + U x + b)`` with ``‖W‖₂ = rho``."""

    def __init__(self, d: int = 8, p: int = 5, rho: float = 0.3, seed: int = 0, dtype=F64):
        super().__init__()
        W = randn(d, d, seed=seed, dtype=dtype)
        self.W = nn.Parameter(rho * W / torch.linalg.matrix_norm(W, ord=2))
        self.U = nn.Parameter(randn(d, p, seed=seed + 1, dtype=dtype) / p**0.5)
        self.b = nn.Parameter(0.1 * randn(d, seed=seed + 2, dtype=dtype))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class ConvCell(nn.Module):
    """A conv-like cell on states of shape ``(B, C, H, W)``: ``tanh(conv(z) + x)``, small weights."""

    def __init__(self, channels: int = 2, rho: float = 0.3, seed: int = 0, dtype=F64):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=True).to(dtype)
        with torch.no_grad():
            w = randn(*self.conv.weight.shape, seed=seed, dtype=dtype)
            # ‖conv‖₂ ≤ Σ|w| over a kernel's taps per channel pair: keep it well below 1
            self.conv.weight.copy_(rho * w / w.abs().sum())
            self.conv.bias.copy_(0.1 * randn(channels, seed=seed + 1, dtype=dtype))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(z) + x)


def tight_forward_solvers(tol: float = 1e-12):
    """Forward solvers configured to reach ``tol`` on the small test problems."""
    return {
        "fixed-point": FixedPoint(tol=tol, max_iter=400),
        "anderson": Anderson(memory=6, tol=tol, max_iter=400),
        "broyden": Broyden(memory=40, tol=tol, max_iter=400),
    }


def tight_linear_solvers(tol: float = 1e-12):
    """Every adjoint solver usable by ``Exact``, configured for ``tol``."""
    return {
        "gmres": GMRES(restart=20, tol=tol, max_iter=200),
        "dense": Dense(tol=tol),
        "fixed-point": FixedPoint(tol=tol, max_iter=400),
        "anderson": Anderson(memory=6, tol=tol, max_iter=400),
        "broyden": Broyden(memory=40, tol=tol, max_iter=400),
    }


FORWARD_NAMES = ["fixed-point", "anderson", "broyden"]
LINEAR_NAMES = ["gmres", "dense", "fixed-point", "anderson", "broyden"]


@pytest.fixture
def linear_problem():
    """A linear cell, a batch ``x`` and the weights ``c`` of ``L = Σ c·z* + ½‖z*‖²``."""
    d, p, B = 8, 5, 3
    cell = LinearCell(d, p, rho=0.5, seed=1)
    x = randn(B, p, seed=7)
    c = randn(B, d, seed=8)
    return cell, x, c


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(autouse=True)
def _no_global_state_leaks():
    """Every test starts with float32 as the default dtype and must leave it so."""
    assert torch.get_default_dtype() == torch.float32, "a previous test changed the default dtype"
    yield
    assert torch.get_default_dtype() == torch.float32, "this test changed torch's default dtype without restoring it"


# -- the device of the tests that have a CUDA path ------------------------------------------------
#: ``DEQKIT_TEST_DEVICE=cuda`` runs every test that takes the ``test_device`` fixture on CUDA
#: (and the CUDA-only tests, e.g. fp16 with a GradScaler); default ``cpu``.
TEST_DEVICE = os.environ.get("DEQKIT_TEST_DEVICE", "cpu").strip().lower() or "cpu"


@pytest.fixture
def test_device() -> torch.device:
    """``torch.device(DEQKIT_TEST_DEVICE)``; asking for CUDA where there is none is an error, not a skip."""
    dev = torch.device(TEST_DEVICE)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEQKIT_TEST_DEVICE=cuda but torch.cuda.is_available() is False on this machine.")
    return dev


requires_cuda_run = pytest.mark.skipif(
    TEST_DEVICE != "cuda", reason="CUDA-only test: run with DEQKIT_TEST_DEVICE=cuda on a machine with a GPU"
)


@pytest.fixture
def one_thread():
    """One torch CPU thread for the test (small problems: a second thread only adds contention on
    a shared 2-core machine); the previous count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite map whose every VJP is NaN."""

    @staticmethod
    def forward(ctx, z):
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")
