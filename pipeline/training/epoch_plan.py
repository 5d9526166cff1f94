"""The order in which phase two reads the cache: deterministic per (seed, epoch), mostly sequential.

    training rows -> blocks      chunk-aligned runs of rows inside one storage shard
                  -> sequence    shards in a random order, each shard's blocks in a random order
                  -> windows     `window_batches` global batches each (the shuffle buffer), shuffled inside
                  -> batches     consecutive slices of `global_batch` rows; the tail that fills no batch waits
                                 for the next epoch (counted in `EpochPlan.dropped`)
    global batch  -> rank slice  rows [r*G/W, (r+1)*G/W) for rank r of W
                  -> micro       `micro_batch` rows each (gradient accumulation inside a rank)

A window is what one DataLoader worker reads in one go: its rows come from a few blocks, so each compressed
chunk is fetched and decompressed once per window, not once per sample. The plan depends only on the rows,
the cache layout, the seed and the epoch, never on the number of workers or ranks, so a run on W ranks sees
exactly the global batches of a run on one process, and a resumed run the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchShape:
    """How a global batch is split: global = world * accumulation * micro."""

    global_batch: int
    micro_batch: int
    world: int = 1

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.world < 1:
            raise ValueError(f"micro batch and world size must be >= 1, got {self.micro_batch} and {self.world}")
        if self.global_batch % (self.world * self.micro_batch):
            raise ValueError(
                f"global batch {self.global_batch} is not a multiple of world size x micro batch = "
                f"{self.world} x {self.micro_batch}; choose --batch-size / --micro-batch-size that divide"
            )

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world

    @property
    def accumulation(self) -> int:
        return self.per_rank // self.micro_batch


@dataclass(frozen=True)
class EpochPlan:
    """The global batches of one epoch: `batches[i]` = reader rows of global batch i."""

    epoch: int
    batches: np.ndarray  # [n_batches, global_batch] int64 reader rows
    window_batches: int  # global batches per window (shuffle buffer)
    dropped: int  # rows of the training set in no batch of this epoch

    @property
    def num_batches(self) -> int:
        return int(self.batches.shape[0])

    @property
    def num_windows(self) -> int:
        return -(-self.num_batches // self.window_batches)

    def window_of(self, batch: int) -> int:
        return batch // self.window_batches

    def window(self, w: int) -> range:
        """Global-batch indices in window w."""
        return range(w * self.window_batches, min((w + 1) * self.window_batches, self.num_batches))

    def rank_rows(self, batch: int, shape: BatchShape, rank: int) -> np.ndarray:
        """This rank's rows of global batch `batch`: [per_rank]."""
        return self.batches[batch, rank * shape.per_rank : (rank + 1) * shape.per_rank]


def blocks(storage_rows: np.ndarray, chunk_rows: int, shard_rows: int) -> list[tuple[int, np.ndarray]]:
    """Group positions 0..n-1 of `storage_rows` (sorted ascending) into chunk-aligned blocks: [(shard, positions)]."""
    if storage_rows.size and np.any(np.diff(storage_rows) <= 0):
        raise ValueError("storage rows must be strictly increasing")
    chunk_of = storage_rows // chunk_rows
    cuts = np.flatnonzero(np.diff(chunk_of)) + 1
    out = []
    for pos in np.split(np.arange(storage_rows.size), cuts):
        if pos.size:
            out.append((int(storage_rows[pos[0]] // shard_rows), pos))
    return out


def make_epoch_plan(
    rows: np.ndarray,
    storage_rows: np.ndarray,
    *,
    chunk_rows: int,
    shard_rows: int,
    global_batch: int,
    buffer_rows: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> EpochPlan:
    """The plan of one epoch over `rows` (reader rows, with their `storage_rows`, both sorted ascending).

    `buffer_rows` is the shuffle buffer: rounded up to a whole number of global batches. Without `shuffle` the
    rows are taken in storage order (evaluation, benchmarks).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size < global_batch:
        raise ValueError(f"the training set has {rows.size} samples, fewer than one global batch of {global_batch}")
    window_batches = max(1, -(-buffer_rows // global_batch))
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        by_shard: dict[int, list[np.ndarray]] = {}
        for shard, pos in blocks(np.asarray(storage_rows, dtype=np.int64), chunk_rows, shard_rows):
            by_shard.setdefault(shard, []).append(pos)
        order = []
        for shard in rng.permutation(sorted(by_shard)):
            shard_blocks = by_shard[int(shard)]
            order += [shard_blocks[i] for i in rng.permutation(len(shard_blocks))]
        seq = rows[np.concatenate(order)]
    else:
        seq = rows
    n_batches = seq.size // global_batch
    used = seq[: n_batches * global_batch]
    window = window_batches * global_batch
    if shuffle:
        used = np.concatenate([used[i : i + window][rng.permutation(min(window, used.size - i))] for i in range(0, used.size, window)])
    return EpochPlan(epoch, used.reshape(n_batches, global_batch), window_batches, int(seq.size - used.size))
