"""core/timing.py: the one benchmark timer (CPU path here; the CUDA path runs in plugins_trt/gpu_check.py on a GPU)."""

from __future__ import annotations

import time

import pytest
import torch

from layerfuse.core import timing


def test_time_once_measures_one_call_in_seconds():
    calls = []
    seconds = timing.time_once(lambda: (calls.append(1), time.sleep(0.02)))
    assert calls == [1] and 0.02 <= seconds < 1.0


def test_median_time_runs_warmup_untimed_then_takes_the_median(monkeypatch):
    calls = []
    durations = iter([0.5, 0.1, 0.3, 9.0, 0.2])  # seconds each timed call reports

    def fake_once(fn, device="cpu"):
        fn()
        return next(durations)

    monkeypatch.setattr(timing, "time_once", fake_once)
    assert timing.median_time(lambda: calls.append(1), 5, warmup=3) == 0.3
    assert len(calls) == 8  # 3 warm-up + 5 timed


def test_median_time_on_the_cpu_is_close_to_the_real_duration():
    assert 0.01 <= timing.median_time(lambda: time.sleep(0.01), 3, device=torch.device("cpu")) < 0.5


def test_median_time_needs_a_repeat():
    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        timing.median_time(lambda: None, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_time_gpu_work():
    x = torch.randn(2048, 2048, device="cuda")
    small = timing.median_time(lambda: x @ x, 3, device="cuda", warmup=1)
    large = timing.median_time(lambda: [x @ x for _ in range(8)], 3, device="cuda:0", warmup=1)
    assert 0 < small < large
