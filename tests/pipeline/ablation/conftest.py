"""Fixtures of the ablation tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as a sweep's unit gets on a 2-core machine next to its reader process (2 threads + a worker
    thrash); restored after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
