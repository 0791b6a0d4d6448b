"""Wall-clock readings that are safe on an asynchronous device: the one place the sync rule lives."""

from __future__ import annotations

import time
from typing import Union

import torch


def synced_perf_counter(device: Union[torch.device, str]) -> float:
    """``time.perf_counter()``, after waiting for ``device`` to finish its queued work when it is CUDA.

    CUDA kernels run asynchronously, so a bare clock reading only says when the host *queued* the
    work. Reading the clock this way at both ends of an interval (``t0 = synced_perf_counter(d)``
    … ``t1 = synced_perf_counter(d)``) charges the interval exactly the device work issued inside
    it: the sync at the start keeps earlier work out, the one at the end keeps this work in. On any
    other device (CPU) it is plain ``time.perf_counter()``.

    Each call on CUDA stalls the host until the device is idle, so use it for measurements, not in
    code that runs on every training step unless that step reports its timings.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
