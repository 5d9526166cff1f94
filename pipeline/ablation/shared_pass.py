"""The shared pass: one read of the cache per seed feeds every variant of a group.

    batches {seed: batch} (one loader per seed of the group, zipped; each reads the union of the group's layers, text
                           if any variant needs it, once per step)
      -> prepare(batch)             once per step and seed (e.g. to the device, fp16 -> fp32)
      -> unit.train_step(batches)   for every unit: its seed's batch, its slice of the layers, its model, its optimizer

Members are the variants' trainers (pipeline/ablation/probe.py `ProbeVariant`, pipeline/ablation/lm.py `LMVariant`). A
*unit* is what one call trains: one member (`Alone`) or a stack of members computed as one batched model
(pipeline/ablation/stacked.py). Each member has its own torch RNG stream (`VariantRNG`), switched in around its work, so
dropout and any other random draw of a variant does not depend on which other variants share its pass: a variant
trained in a group ends with the same weights as the same variant trained alone on the same data.

`parallel` > 1 runs the units that draw no random numbers and share no modules (`Unit.exclusive` False) concurrently
on that many Python threads (torch releases the GIL inside its ops; the caller sets torch's own threads); the other
units run one at a time, each on its own RNG stream. When every unit may run concurrently there is no barrier at
each step (`_train_unbarriered`: each unit at its own pace, at most LEAD_STEPS ahead of the slowest). A unit's work
does not depend on the others, so the result is the same as one after another (with the same torch thread count per op).

Time: `compute_s` per member is its unit's own work (wall time, split evenly among a stack's members); the wait for the
next batches (`read_s`) is paid once per pass and shared, so a variant's train time is `compute_s + read_s / group
size`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    """One variant's model, optimizer and evaluation state."""

    variant: Any  # pipeline/ablation/sweep.py Variant: its seed picks the member's batches
    rng: VariantRNG
    stats: MemberStats
    exclusive: bool  # runs one at a time: draws random numbers (its RNG stream is switched in process-wide) or shares modules

    def train_step(self, batch: Any) -> float: ...  # one optimizer step -> its loss

    def eval_step(self, batch: Any) -> None: ...  # predictions for one evaluation batch, kept by the member


class Unit(Protocol):
    """What the shared pass drives: one member (`Alone`) or a stack of members trained as one batched model."""

    members: Sequence[Member]
    exclusive: bool

    def train_step(self, batches: Mapping[int, Any]) -> list[float]: ...  # {seed: batch} -> one loss per member

    def eval_step(self, batch: Any) -> None: ...


class Alone:
    """One member as a unit: its seed's batch, on its own RNG stream."""

    def __init__(self, member: Member):
        self.members = [member]
        self.exclusive = member.exclusive

    def train_step(self, batches: Mapping[int, Any]) -> list[float]:
        m = self.members[0]
        with m.rng.active():
            return [m.train_step(batches[m.variant.seed])]

    def eval_step(self, batch: Any) -> None:
        m = self.members[0]
        with m.rng.active():
            m.eval_step(batch)


@dataclass
class PassTiming:
    wall_s: float = 0.0
    read_s: float = 0.0  # time spent waiting for batches (reading, decoding), paid once for the group
    steps: int = 0


def _size(batch: Any) -> int:
    if isinstance(batch, (list, tuple)):
        return sum(len(b) for b in batch)
    return len(batch)


def _train_unit(unit: Unit, batches: Mapping[int, Any]) -> None:
    t = time.perf_counter()
    losses = unit.train_step(batches)
    share = (time.perf_counter() - t) / len(unit.members)
    for m, loss in zip(unit.members, losses):
        m.stats.compute_s += share
        m.stats.steps += 1
        m.stats.samples += _size(batches[m.variant.seed])
        m.stats.losses.append(float(loss))


def _next_batches(it: Iterator[tuple[int, Mapping[int, Any]]], prepare: Callable[[Any], Any], timing: PassTiming) -> dict[int, Any] | None:
    """The next step's prepared {seed: batch} (None at the end); the wait is added to timing.read_s."""
    t = time.perf_counter()
    try:
        _, batches = next(it)
    except StopIteration:
        return None
    out = {seed: prepare(b) for seed, b in batches.items()}
    timing.read_s += time.perf_counter() - t
    return out


def train_together(units: Sequence[Unit], steps: Iterable[tuple[int, Mapping[int, Any]]], total: int, *,
                   prepare: Callable[[Any], Any] = lambda b: b, desc: str = "train", progress: bool = True, parallel: int = 1) -> PassTiming:
    """Train every unit on each step's batches (`steps`: an iterator of (step, {seed: batch})), in the same order;
    `parallel` > 1: the units that are not `exclusive` concurrently on that many threads."""
    timing = PassTiming()
    t_start = time.perf_counter()
    it = iter(steps)
    members = [m for u in units for m in u.members]
    free = [u for u in units if not u.exclusive] if parallel > 1 else []
    serial = [u for u in units if u not in free]
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=total, unit="step", desc=desc, disable=not progress, dynamic_ncols=True, leave=False))
        if len(free) > 1 and not serial:  # every unit concurrent: each at its own pace (no step barrier)
            _train_unbarriered(free, it, prepare, min(parallel, len(free)), timing, bar, members)
            timing.wall_s = time.perf_counter() - t_start
            return timing
        pool = stack.enter_context(ThreadPoolExecutor(min(parallel, len(free)))) if len(free) > 1 else None
        if pool is None:
            serial, free = units, []
        while (batches := _next_batches(it, prepare, timing)) is not None:
            running = [pool.submit(_train_unit, u, batches) for u in free] if pool is not None else []
            for u in serial:
                _train_unit(u, batches)
            for f in running:
                f.result()
            timing.steps += 1
            bar.update(1)
            if members:
                bar.set_postfix(loss=f"{sum(m.stats.losses[-1] for m in members) / len(members):.3f}")
    timing.wall_s = time.perf_counter() - t_start
    return timing


LEAD_STEPS = 4  # how many steps the fastest unit of an unbarriered pass may run ahead of the slowest (batches held)


def _train_unbarriered(units: Sequence[Unit], it: Iterator[tuple[int, Mapping[int, Any]]], prepare: Callable[[Any], Any],
                       threads: int, timing: PassTiming, bar: Any, members: Sequence[Member]) -> None:
    """`train_together` for units that may all run concurrently, without a barrier at every step: `threads` workers
    take whichever unit is free and has its next step's batches (the unit furthest behind first), so 3 units on 2
    threads keep both busy instead of one thread idling while the other runs a second unit. Each unit still trains on
    every step's batches in order, and units share nothing, so each ends as it would alone. The batches of the last
    LEAD_STEPS steps are held until every unit is past them; the main thread reads and prepares them."""
    cond = threading.Condition()
    window: dict[int, Mapping[int, Any]] = {}  # step -> prepared batches, until every unit has trained on it
    done = {id(u): 0 for u in units}  # steps each unit has finished
    busy: set[int] = set()
    state: dict[str, Any] = {"read": 0, "exhausted": False, "error": None}

    def next_task() -> tuple[Unit, Mapping[int, Any]] | None:
        with cond:
            while True:
                if state["error"] is not None:
                    return None
                ready = [u for u in units if id(u) not in busy and done[id(u)] < state["read"]]
                if ready:
                    u = min(ready, key=lambda u: done[id(u)])
                    busy.add(id(u))
                    return u, window[done[id(u)]]
                if state["exhausted"] and all(d == state["read"] for d in done.values()):
                    return None
                cond.wait()

    def work() -> None:
        while (task := next_task()) is not None:
            u, batches = task
            try:
                _train_unit(u, batches)
            except BaseException as e:  # raised in the calling thread below
                with cond:
                    state["error"] = e
                    cond.notify_all()
                return
            with cond:
                busy.discard(id(u))
                done[id(u)] += 1
                for step in [k for k in window if k < min(done.values())]:
                    del window[step]
                cond.notify_all()

    workers = [threading.Thread(target=work, name=f"layerfuse-unit-{i}", daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    shown = 0
    try:
        while True:
            with cond:
                cond.wait_for(lambda: state["error"] is not None or state["read"] - min(done.values()) < LEAD_STEPS)
                slowest = min(done.values())
                if state["error"] is not None:
                    break
            bar.update(slowest - shown)
            shown = slowest
            if members:
                bar.set_postfix(loss=f"{sum(m.stats.losses[-1] for m in members if m.stats.losses) / len(members):.3f}")
            if (batches := _next_batches(it, prepare, timing)) is None:
                break
            with cond:
                window[state["read"]] = batches
                state["read"] += 1
                timing.steps += 1
                cond.notify_all()
    finally:
        with cond:
            state["exhausted"] = True
            cond.notify_all()
        for w in workers:
            w.join()
    bar.update(min(done.values()) - shown)
    if state["error"] is not None:
        raise state["error"]


def zip_seeds(steps: Mapping[int, Iterable[tuple[int, Any]]]) -> Iterator[tuple[int, dict[int, Any]]]:
    """{seed: (step, batch) iterator} -> (step, {seed: batch}): one loader per seed, in step."""
    seeds = list(steps)
    for items in zip(*(steps[s] for s in seeds)):
        yield items[0][0], {s: batch for s, (_, batch) in zip(seeds, items)}


def evaluate_together(units: Sequence[Unit], batches: Iterable[Any], total: int, *,
                      prepare: Callable[[Any], Any] = lambda b: b, desc: str = "eval", progress: bool = True) -> PassTiming:
    """Every unit's `eval_step` on each evaluation batch (read once), under no_grad."""
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
            for u in units:
                t = time.perf_counter()
                u.eval_step(batch)
                share = (time.perf_counter() - t) / len(u.members)
                for m in u.members:
                    m.stats.eval_s += share
            timing.steps += 1
            bar.update(1)
    timing.wall_s = time.perf_counter() - t_start
    return timing
