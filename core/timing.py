"""The one timer for benchmarks: CUDA events on a CUDA device, `time.perf_counter` elsewhere.

`time_once` times one call; `median_time` adds warm-up calls and takes the median of repeats. Both return
seconds. On a CUDA device the time is the GPU time between two events recorded on the current stream around the
call (work queued before the call is not counted; the host waits for the end event).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def time_once(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Seconds one call of `fn` takes on `device`."""
    if _is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in ms
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_time(fn: Callable[[], object], repeats: int, *, device: str | torch.device = "cpu", warmup: int = 0) -> float:
    """Median seconds of `repeats` timed calls of `fn`, after `warmup` untimed ones."""
    if repeats < 1:
        raise ValueError(f"median_time: repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(repeats))
