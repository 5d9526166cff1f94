"""Phase two's data: cached features and tokenised conversations, read and collated in DataLoader workers.

    FeatureCache --(the plan's rows; only the fuser's layers; text only when needed)--> worker process:
        read one window in a few slice reads, tokenise, collate micro-batches
    -> FeatureBatch: tokens TokenBatch [B, S], layers [B, k, T, D] (stored dtype), text [B, d_s] | None, rows [B]
       (the batch format is pluggable: `ConversationFormat` here; the ablation probe's answer labels in probe.py)

`scan_training_set` tokenises every candidate sample once before training (in workers too) so that samples the
settings cannot use (an image span cut by max_length, no assistant turn, ...) are known up front, recorded with
their id and reason, and left out of the plan; the loader re-tokenises rows in the workers, identically.

Damaged rows (FeatureCache checks every read against its checksums): with on_corrupt="stop" (the default) the first
one stops the run with `CorruptRowsError` naming the sample, shard and cache; with "skip" the scan leaves out rows whose
conversation is damaged, and a window leaves out rows whose features or text are damaged, each recorded with its
reason (`TrainingSet.skipped`, `CacheBatches.dropped`). A batch left with no sample on a rank is still an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, NamedTuple, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from layerfuse.pipeline.cache.reader import CorruptRowsError, FeatureCache
from layerfuse.pipeline.data.conversation import SkipSample, TokenBatch, TokenizedSample, collate, tokenize_conversation
from layerfuse.pipeline.training.epoch_plan import BatchShape, EpochPlan, make_epoch_plan
from layerfuse.core.workers import worker_init_fn


OnCorrupt = Literal["stop", "skip"]


def damaged_records(cache: FeatureCache, e: CorruptRowsError) -> list[dict[str, Any]]:
    """{"row", "id", "reason"} per reader row of a CorruptRowsError (reason prefixed "damaged: ")."""
    ids = cache.sample_ids(e.rows[e.rows >= 0])
    return [{"row": int(r), "id": str(i), "reason": f"damaged: {why}"} for r, i, why in zip(e.rows[e.rows >= 0], ids, np.asarray(e.reasons)[e.rows >= 0])]


@dataclass(frozen=True)
class TokenSettings:
    """How conversations become token ids for one model."""

    template: str  # plain | v1 | chat
    num_visual_tokens: int
    image_token_id: int
    max_length: int
    pad_id: int


def tokenize_sample(conversations: Sequence[dict[str, str]], has_image: bool, tokenizer: Any, s: TokenSettings) -> TokenizedSample:
    return tokenize_conversation(
        conversations, tokenizer, s.template, num_visual_tokens=s.num_visual_tokens, image_token_id=s.image_token_id,
        max_length=s.max_length, has_image=has_image,
    )


@dataclass
class FeatureBatch:
    """A micro-batch as the model consumes it."""

    tokens: TokenBatch
    layers: torch.Tensor  # [B, k, T, D] in the cache's stored dtype (zeros for text-only samples)
    text: torch.Tensor | None  # [B, d_s] mean instruction embedding, when the fuser needs it
    rows: torch.Tensor  # [B] reader rows of the cache

    def __len__(self) -> int:
        return len(self.tokens)

    def pin_memory(self) -> "FeatureBatch":
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        tok = self.tokens
        return FeatureBatch(TokenBatch(*(pin(t) for t in (tok.input_ids, tok.attention_mask, tok.labels, tok.has_image, tok.image_start))),
                            pin(self.layers), pin(self.text), self.rows)

    def to(self, device: torch.device | str) -> "FeatureBatch":
        nb = torch.device(device).type == "cuda"
        move = lambda t: None if t is None else t.to(device, non_blocking=nb)  # noqa: E731
        return FeatureBatch(self.tokens.to(device), move(self.layers), move(self.text), self.rows)


def own_generator(*seed: int) -> torch.Generator:
    """A DataLoader's own RNG: starting its workers must not draw from the global torch RNG, which training owns
    (dropout); otherwise a resumed run, which starts its loader at another moment, would see other dropout masks."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))


def _as_is(item: Any) -> Any:
    """collate_fn for items that are already batches (the default would turn numpy arrays into tensors)."""
    return item


class LazyCache:
    """A FeatureCache opened on first use in each process (zarr handles are not shared across a fork)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None):
        self.url, self.storage_options = url, storage_options
        self._cache: FeatureCache | None = None
        self._pid = -1

    @property
    def cache(self) -> FeatureCache:
        if self._cache is None or self._pid != os.getpid():
            self._cache = FeatureCache(self.url, self.storage_options)
            self._pid = os.getpid()
        return self._cache


# ------------------------------------------------------------------------------------------ training set


@dataclass
class TrainingSet:
    """The samples a run trains on: reader rows (ascending) that tokenise under its settings."""

    rows: np.ndarray  # [n] int64
    lengths: np.ndarray  # [n] int32 tokens per sample
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"row", "id", "reason"} per left-out sample

    def __len__(self) -> int:
        return int(self.rows.size)

    def skipped_by_reason(self) -> dict[str, int]:
        """Counts per kind of reason (numbers in the reasons masked, so all truncations count together)."""
        out: dict[str, int] = {}
        for s in self.skipped:
            key = re.sub(r"\d+", "N", s["reason"])
            out[key] = out.get(key, 0) + 1
        return out


class _ScanChunks(Dataset):
    """Item i: tokenise rows chunk i -> (rows, lengths, skipped)."""

    def __init__(self, lazy: LazyCache, chunks: list[np.ndarray], tokenizer: Any, settings: TokenSettings, on_corrupt: OnCorrupt):
        self.lazy, self.chunks, self.tokenizer, self.settings, self.on_corrupt = lazy, chunks, tokenizer, settings, on_corrupt

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        cache = self.lazy.cache
        rows = self.chunks[i]
        ok, lengths, skipped = [], [], []
        while True:
            try:
                convs = cache.conversations(rows)
                break
            except CorruptRowsError as e:
                if self.on_corrupt != "skip":
                    raise
                skipped += damaged_records(cache, e)
                rows = rows[~np.isin(rows, e.rows)]
        has_image = cache.has_image[rows]
        ids = cache.sample_ids(rows)
        for r, conv, img, sid in zip(rows, convs, has_image, ids):
            try:
                lengths.append(len(tokenize_sample(conv, bool(img), self.tokenizer, self.settings)))
                ok.append(int(r))
            except SkipSample as e:
                skipped.append({"row": int(r), "id": str(sid), "reason": e.reason})
        return np.asarray(ok, dtype=np.int64), np.asarray(lengths, dtype=np.int32), skipped


def scan_training_set(
    cache: FeatureCache,
    rows: np.ndarray,
    tokenizer: Any,
    settings: TokenSettings,
    *,
    workers: int = 0,
    chunk: int = 1024,
    progress: bool = True,
    on_corrupt: OnCorrupt = "stop",
) -> TrainingSet:
    """Tokenise `rows` once; keep those that fit the settings, record the others with the reason (and, with
    on_corrupt="skip", those whose conversation is damaged)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    chunks = [rows[i : i + chunk] for i in range(0, rows.size, chunk)]
    ds = _ScanChunks(LazyCache(cache.url, None), chunks, tokenizer, settings, on_corrupt)
    n_workers = min(workers, len(chunks))
    loader = DataLoader(ds, batch_size=None, collate_fn=_as_is, num_workers=n_workers, worker_init_fn=worker_init_fn(n_workers),
                        generator=own_generator(0))
    kept, lengths, skipped = [], [], []
    with tqdm(total=int(rows.size), unit="sample", desc="tokenise", disable=not progress, leave=False) as bar:
        for r, n, s in loader:
            kept.append(r)
            lengths.append(n)
            skipped += s
            bar.update(r.size + len(s))
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return TrainingSet(cat(kept, np.int64), cat(lengths, np.int32), skipped)


# ------------------------------------------------------------------------------------------ the windows


class BatchFormat(Protocol):
    """What a micro-batch holds besides the features: `ConversationFormat` (tokens, for LM training) here, the probe's
    answer labels in pipeline/ablation/probe.py. Both run in the DataLoader workers, once per window."""

    def text(self, cache: FeatureCache, rows: np.ndarray) -> torch.Tensor | None:
        """Instruction embeddings of `rows` [n, d_s], or None when no model needs them."""

    def batches(self, cache: FeatureCache, rows: np.ndarray, layers: torch.Tensor, text: torch.Tensor | None,
                slices: list[slice]) -> list[Any]:
        """One micro-batch per slice of `rows` (layers [n, k, T, D] and text [n, d_s] of those rows)."""


class ConversationFormat:
    """Micro-batches for LM training: conversations tokenised with the run's settings -> FeatureBatch."""

    def __init__(self, tokenizer: Any, settings: TokenSettings, need_text: bool):
        self.tokenizer, self.settings, self.need_text = tokenizer, settings, need_text

    def text(self, cache: FeatureCache, rows: np.ndarray) -> torch.Tensor | None:
        return cache.text_embeddings(rows) if self.need_text else None  # [n, d_s] mean over human turns

    def batches(self, cache: FeatureCache, rows: np.ndarray, layers: torch.Tensor, text: torch.Tensor | None,
                slices: list[slice]) -> list[FeatureBatch]:
        convs, has_image = cache.conversations(rows), cache.has_image[rows]
        samples = [tokenize_sample(c, bool(i), self.tokenizer, self.settings) for c, i in zip(convs, has_image)]
        return [FeatureBatch(collate(samples[sl], self.settings.pad_id), layers[sl], None if text is None else text[sl],
                             torch.from_numpy(rows[sl])) for sl in slices]


class Window(NamedTuple):
    """What a worker returns for one window: this rank's micro-batches per global batch, and the rows left out as
    damaged (on_corrupt="skip"). A NamedTuple, so that the DataLoader's pin_memory recurses into it."""

    batches: list[list[Any]]
    dropped: list[dict[str, Any]]


class WindowReader(Dataset):
    """Item (epoch, w): this rank's micro-batches of every global batch in window w of that epoch's plan.

    One `features` call per window reads the needed chunks once (neighbouring rows merge into slice reads); the
    format (tokenisation, labels) and collation run here too, so the training process only moves finished batches.
    Plans are index arithmetic, made where they are needed (in the worker) by `plan_of`.
    """

    def __init__(self, lazy: LazyCache, plan_of: Callable[[int], EpochPlan], shape: BatchShape, rank: int, layers: Sequence[int | tuple[int, ...]],
                 fmt: BatchFormat, on_corrupt: OnCorrupt = "stop"):
        self.lazy, self.plan_of, self.shape, self.rank, self.layers, self.fmt = lazy, plan_of, shape, rank, list(layers), fmt
        self.on_corrupt = on_corrupt

    def __getitem__(self, key: tuple[int, int]) -> Window:
        epoch, w = key
        plan = self.plan_of(epoch)
        cache = self.lazy.cache
        batches = [plan.rank_rows(b, self.shape, self.rank) for b in plan.window(w)]
        dropped: list[dict[str, Any]] = []
        while True:
            rows = np.concatenate(batches)
            m, bounds = self.shape.micro_batch, np.cumsum([0] + [b.size for b in batches])
            slices = [[slice(s, s + m) for s in range(lo, hi, m)] for lo, hi in zip(bounds[:-1], bounds[1:])]
            try:
                layers = cache.features(rows, self.layers)  # [n, k, T, D]
                micro = self.fmt.batches(cache, rows, layers, self.fmt.text(cache, rows), [sl for per in slices for sl in per])
                break
            except CorruptRowsError as e:
                if self.on_corrupt != "skip":
                    raise
                dropped += damaged_records(cache, e)
                batches = [b[~np.isin(b, e.rows)] for b in batches]
                if any(b.size == 0 for b in batches):
                    raise CorruptRowsError(f"{e} (--on-corrupt skip: no sample of a batch is left on rank {self.rank})",
                                           e.rows, e.storage_rows, e.reasons) from None
        out, k = [], 0
        for per in slices:
            out.append(micro[k : k + len(per)])
            k += len(per)
        return Window(out, dropped)


class CacheBatches:
    """The training steps of a run: `steps(start, stop)` yields (step, this rank's micro-batches of that step).

    Step s is global batch s % steps_per_epoch of epoch s // steps_per_epoch, so a resumed run continues with
    exactly the batches it would have seen. Windows are read ahead by `workers` processes (`prefetch` windows
    each), with pinned memory when batches go to a GPU. `fmt` decides what a micro-batch holds.
    """

    def __init__(
        self,
        cache: FeatureCache,
        rows: np.ndarray,
        fmt: BatchFormat,
        *,
        layers: Sequence[int | tuple[int, ...]],  # hidden states, and stored group means named by their tuples
        shape: BatchShape,
        rank: int = 0,
        seed: int = 0,
        buffer_rows: int = 1024,
        shuffle: bool = True,
        workers: int = 2,
        prefetch: int = 2,
        pin_memory: bool = False,
        on_corrupt: OnCorrupt = "stop",
    ):
        self.on_corrupt = on_corrupt
        self.dropped: list[dict[str, Any]] = []  # rows left out as damaged so far (on_corrupt="skip"), with the reason
        self.cache, self.rows, self.fmt, self.shape, self.rank = cache, np.asarray(rows, dtype=np.int64), fmt, shape, rank
        self.layers = list(cache.resolve_layers(layers))
        self.seed, self.buffer_rows, self.shuffle = seed, buffer_rows, shuffle
        self.workers, self.prefetch, self.pin_memory = workers, prefetch, pin_memory
        self._storage = cache.storage_rows(self.rows)
        self._plans: dict[int, EpochPlan] = {}
        self.steps_per_epoch = self.plan(0).num_batches

    def plan(self, epoch: int) -> EpochPlan:
        """The plan of `epoch` (the last two are kept; making one is index arithmetic)."""
        if epoch not in self._plans:
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = make_epoch_plan(
                self.rows, self._storage, chunk_rows=self.cache.chunk_rows, shard_rows=self.cache.shard_rows,
                global_batch=self.shape.global_batch, buffer_rows=self.buffer_rows, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
            )
        return self._plans[epoch]

    def windows(self, start: int, stop: int) -> list[tuple[int, int]]:
        """(epoch, window) keys covering steps start..stop-1, in order."""
        keys: list[tuple[int, int]] = []
        per_window = self.plan(0).window_batches
        for step in range(start, stop):
            epoch, b = divmod(step, self.steps_per_epoch)
            key = (epoch, b // per_window)
            if not keys or keys[-1] != key:
                keys.append(key)
        return keys

    def steps(self, start: int, stop: int) -> Iterator[tuple[int, list[FeatureBatch]]]:
        """Steps start..stop-1, each with this rank's `accumulation` micro-batches.

        One DataLoader serves every epoch, so its workers read ahead across epoch boundaries too."""
        if start >= stop:
            return
        keys = self.windows(start, stop)
        ds = WindowReader(LazyCache(self.cache.url, None), self.plan, self.shape, self.rank, self.layers, self.fmt, self.on_corrupt)
        workers = min(self.workers, len(keys))
        loader = DataLoader(
            ds, batch_size=None, sampler=keys, collate_fn=_as_is, num_workers=workers,
            prefetch_factor=self.prefetch if workers else None, pin_memory=self.pin_memory, worker_init_fn=worker_init_fn(workers),
            generator=own_generator(self.seed, start),
        )
        step = start
        for (epoch, w), window in zip(keys, loader):
            self.dropped += window.dropped
            for b, micro in zip(self.plan(epoch).window(w), window.batches):
                if epoch * self.steps_per_epoch + b < step:
                    continue  # the first window of a resumed run: batches before the resume point
                yield step, micro
                step += 1
                if step >= stop:
                    return
