"""The epoch plan (pipeline/training/epoch_plan.py): shard order shuffled, blocks, a windowed shuffle buffer, deterministic per
(seed, epoch), rank slices that reproduce the single-process global batches."""

from __future__ import annotations

import numpy as np
import pytest
from layerfuse.pipeline.training.epoch_plan import BatchShape, blocks, make_epoch_plan

CHUNK, SHARD = 4, 16


def training_rows(n_storage: int = 160, drop_every: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Reader rows 0..n-1 over storage rows with some rows missing (other splits / skipped samples)."""
    storage = np.array([r for r in range(n_storage) if r % drop_every], dtype=np.int64)
    return np.arange(storage.size, dtype=np.int64), storage


def plan(epoch: int = 0, seed: int = 0, global_batch: int = 8, buffer_rows: int = 16, **kw):
    rows, storage = training_rows(**kw)
    return make_epoch_plan(rows, storage, chunk_rows=CHUNK, shard_rows=SHARD, global_batch=global_batch,
                           buffer_rows=buffer_rows, seed=seed, epoch=epoch)


def test_blocks_are_chunk_aligned_runs_inside_one_shard():
    _, storage = training_rows()
    bl = blocks(storage, CHUNK, SHARD)
    flat = np.concatenate([pos for _, pos in bl])
    assert np.array_equal(flat, np.arange(storage.size))  # every row once, in order
    for shard, pos in bl:
        chunks = set((storage[pos] // CHUNK).tolist())
        assert len(chunks) == 1 and {int(storage[p] // SHARD) for p in pos} == {shard}
    with pytest.raises(ValueError, match="increasing"):
        blocks(storage[::-1], CHUNK, SHARD)


def test_epoch_covers_every_row_once_and_counts_the_tail():
    p = plan(global_batch=8)
    n = training_rows()[0].size
    used = p.batches.reshape(-1)
    assert len(set(used.tolist())) == used.size == p.num_batches * 8
    assert p.dropped == n - used.size and 0 <= p.dropped < 8
    assert p.batches.shape == (n // 8, 8)


def test_deterministic_per_seed_and_epoch_and_different_otherwise():
    assert np.array_equal(plan(epoch=1).batches, plan(epoch=1).batches)
    assert not np.array_equal(plan(epoch=0).batches, plan(epoch=1).batches)
    assert not np.array_equal(plan(seed=0).batches, plan(seed=1).batches)


def test_reads_stay_mostly_sequential():
    """A window (the shuffle buffer) touches about buffer/chunk chunks, not one chunk per sample."""
    p = plan(global_batch=8, buffer_rows=16)
    _, storage = training_rows()
    for w in range(p.num_windows):
        rows = np.concatenate([p.batches[b] for b in p.window(w)])
        chunks = np.unique(storage[rows] // CHUNK)
        assert chunks.size <= rows.size // (CHUNK - 1) + 2, (w, chunks.size, rows.size)
    # ... and the shard order is shuffled: the first window does not always start at shard 0
    firsts = {int(storage[plan(epoch=e).batches[0, 0]] // SHARD) for e in range(6)}
    assert len(firsts) > 1


def test_shuffle_mixes_inside_windows():
    p = plan(global_batch=8, buffer_rows=32)
    rows = np.concatenate([p.batches[b] for b in p.window(0)])
    assert not np.array_equal(rows, np.sort(rows))
    assert p.window_batches == 4 and p.window_of(5) == 1 and list(p.window(1)) == [4, 5, 6, 7]


def test_rank_slices_reproduce_the_global_batch():
    p = plan(global_batch=8)
    shape = BatchShape(8, 2, world=2)
    assert (shape.per_rank, shape.accumulation) == (4, 2)
    for b in range(p.num_batches):
        assert np.array_equal(np.concatenate([p.rank_rows(b, shape, r) for r in range(2)]), p.batches[b])


def test_unshuffled_plan_is_storage_order():
    rows, storage = training_rows()
    p = make_epoch_plan(rows, storage, chunk_rows=CHUNK, shard_rows=SHARD, global_batch=8, buffer_rows=8, seed=0, epoch=3, shuffle=False)
    assert np.array_equal(p.batches.reshape(-1), rows[: p.num_batches * 8])


@pytest.mark.parametrize("g, m, w, msg", [(8, 3, 1, "multiple"), (8, 2, 3, "multiple"), (8, 0, 1, ">= 1")])
def test_batch_shape_errors(g, m, w, msg):
    with pytest.raises(ValueError, match=msg):
        BatchShape(g, m, w)


def test_too_few_samples_for_one_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_epoch_plan(np.arange(3), np.arange(3), chunk_rows=4, shard_rows=16, global_batch=8, buffer_rows=8, seed=0, epoch=0)
