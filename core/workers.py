"""DataLoader worker processes: one compute thread each, and never outliving their parent."""

from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Callable

import torch


def worker_init(worker_id: int, parent: int) -> None:
    torch.set_num_threads(1)
    die_with_parent(parent)


def worker_init_fn(num_workers: int) -> Callable[[int], None] | None:
    """`worker_init_fn` for a DataLoader started by this process (None without workers)."""
    return functools.partial(worker_init, parent=os.getpid()) if num_workers else None


def die_with_parent(parent: int) -> None:
    """Linux: a DataLoader worker is killed with its parent, even when the parent is SIGKILLed.

    Without this, a worker of a killed run can block forever on its result queue as an orphan.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
