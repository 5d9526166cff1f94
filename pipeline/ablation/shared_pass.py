"""The shared pass: one read of the cache feeds every variant of a group.

    batches (the union of the group's layers, text if any variant needs it; read and decoded once)
      -> prepare(batch)            once per step (e.g. to the device, fp16 -> fp32)
      -> member.train_step(batch)  for every member in turn: its slice of the layers, its model, its optimizer

Members are the variants' trainers (pipeline/ablation/probe.py `ProbeVariant`, pipeline/ablation/lm.py `LMVariant`). Each has
its own torch RNG stream (`VariantRNG`), switched in around its work, so dropout and any other random draw of a
variant does not depend on which other variants share its pass: a variant trained in a group ends with the same
weights as the same variant trained alone on the same data.

Time: `compute_s` per member is its own work; the wait for the next batch (`read_s`) is paid once per pass and
shared, so a variant's train time is `compute_s + read_s / group size`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm


class VariantRNG:
    """A variant's own torch random stream (CPU generator, and the CUDA one when the device is CUDA)."""

    def __init__(self, seed: int, device: torch.device):
        self.cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if self.cuda else []):
            torch.manual_seed(seed)
            self.cpu_state = torch.random.get_rng_state()
            self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run the block on this variant's stream; the caller's stream is restored afterwards."""
        outer_cpu = torch.random.get_rng_state()
        outer_cuda = torch.cuda.get_rng_state(self.device) if self.cuda else None
        torch.random.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)
        try:
            yield
        finally:
            self.cpu_state = torch.random.get_rng_state()
            torch.random.set_rng_state(outer_cpu)
            if self.cuda:
                self.cuda_state = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)


@dataclass
class MemberStats:
    compute_s: float = 0.0  # this member's own training work
    eval_s: float = 0.0
    steps: int = 0
    samples: int = 0
    losses: list[float] = field(default_factory=list)  # one per step


class Member(Protocol):
    """What the shared pass drives: one variant's model, optimizer and evaluation state."""

    rng: VariantRNG
    stats: MemberStats

    def train_step(self, batch: Any) -> float: ...  # one optimizer step -> its loss

    def eval_step(self, batch: Any) -> None: ...  # predictions for one evaluation batch, kept by the member


@dataclass
class PassTiming:
    wall_s: float = 0.0
    read_s: float = 0.0  # time spent waiting for batches (reading, decoding), paid once for the group
    steps: int = 0


def _size(batch: Any) -> int:
    if isinstance(batch, (list, tuple)):
        return sum(len(b) for b in batch)
    return len(batch)


def train_together(members: Sequence[Member], steps: Iterable[tuple[int, Any]], total: int, *,
                   prepare: Callable[[Any], Any] = lambda b: b, desc: str = "train", progress: bool = True) -> PassTiming:
    """Train every member on each batch of `steps` (an iterator of (step, batch)), in the same order."""
    timing = PassTiming()
    t_start = time.perf_counter()
    it = iter(steps)
    with tqdm(total=total, unit="step", desc=desc, disable=not progress, dynamic_ncols=True, leave=False) as bar:
        while True:
            t = time.perf_counter()
            try:
                _, batch = next(it)
            except StopIteration:
                break
            batch = prepare(batch)
            timing.read_s += time.perf_counter() - t
            n = _size(batch)
            for m in members:
                t = time.perf_counter()
                with m.rng.active():
                    loss = m.train_step(batch)
                m.stats.compute_s += time.perf_counter() - t
                m.stats.steps += 1
                m.stats.samples += n
                m.stats.losses.append(float(loss))
            timing.steps += 1
            bar.update(1)
            if members:
                bar.set_postfix(loss=f"{sum(m.stats.losses[-1] for m in members) / len(members):.3f}")
    timing.wall_s = time.perf_counter() - t_start
    return timing


def evaluate_together(members: Sequence[Member], batches: Iterable[Any], total: int, *,
                      prepare: Callable[[Any], Any] = lambda b: b, desc: str = "eval", progress: bool = True) -> PassTiming:
    """Every member's `eval_step` on each evaluation batch (read once), under no_grad."""
    timing = PassTiming()
    t_start = time.perf_counter()
    it = iter(batches)
    with torch.no_grad(), tqdm(total=total, unit="batch", desc=desc, disable=not progress, dynamic_ncols=True, leave=False) as bar:
        while True:
            t = time.perf_counter()
            try:
                batch = prepare(next(it))
            except StopIteration:
                break
            timing.read_s += time.perf_counter() - t
            for m in members:
                t = time.perf_counter()
                with m.rng.active():
                    m.eval_step(batch)
                m.stats.eval_s += time.perf_counter() - t
            timing.steps += 1
            bar.update(1)
    timing.wall_s = time.perf_counter() - t_start
    return timing
