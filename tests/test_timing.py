"""The device-synced clock shared by the trainer, the benchmark and the gradient diagnostic (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from deqkit import _timing
from deqkit._timing import synced_perf_counter


@pytest.fixture
def syncs(monkeypatch):
    """Replace ``torch.cuda.synchronize`` with a recorder; the list holds the device of each call."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    return calls


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu", torch.device("meta")])
def test_non_cuda_devices_never_sync(syncs, device):
    synced_perf_counter(device)
    assert syncs == []


@pytest.mark.parametrize("device", [torch.device("cuda"), torch.device("cuda:1"), "cuda", "cuda:0"])
def test_cuda_syncs_that_device_once_per_reading(syncs, device):
    synced_perf_counter(device)
    assert syncs == [device]
    synced_perf_counter(device)
    assert syncs == [device, device]


def test_syncs_before_reading_the_clock(syncs, monkeypatch):
    # both ends of an interval need the device idle *before* the clock is read
    order: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: order.append("sync"))
    monkeypatch.setattr(_timing.time, "perf_counter", lambda: order.append("clock") or 0.0)
    synced_perf_counter(torch.device("cuda"))
    assert order == ["sync", "clock"]


@pytest.mark.parametrize("device", [torch.device("cpu"), torch.device("cuda")])
def test_readings_are_increasing_perf_counter_seconds(syncs, device):
    readings = [synced_perf_counter(device) for _ in range(5)]
    assert all(isinstance(t, float) for t in readings)
    assert readings == sorted(readings)
    # the same clock as time.perf_counter, so differences are seconds comparable with it
    before = _timing.time.perf_counter()
    t = synced_perf_counter(device)
    after = _timing.time.perf_counter()
    assert before <= t <= after
    work = torch.randn(64, 64, dtype=torch.float64)
    t0 = synced_perf_counter(device)
    for _ in range(20):
        work = work @ work.T / 64
    assert synced_perf_counter(device) > t0
