"""Extraction's background stages: the text stage embeds each output shard's instructions once, the same bits in its
thread, inline and on resume; the writer pool writes every
shard and surfaces the first error."""

from __future__ import annotations

import os
import threading

import numpy as np
import torch
import pytest
from layerfuse.core.distributed import DistContext
from layerfuse.pipeline.cache.extract import ACCELERATOR_SPARE_CORES, CPU_BATCH_TOKENS, CPU_WORKERS, ExtractConfig, _TextStage
from layerfuse.pipeline.cache.writer import ShardWriterPool
from layerfuse.pipeline.data.synthetic import synthetic_plan
from layerfuse.pipeline.models.text import TEXT_CPU_THREADS, TextBatch, max_human_turns

RECORDS = synthetic_plan(24, 3).records
SHARD = 10  # output shard rows: batches of 5 never straddle one
BATCHES = [list(range(s, min(24, s + 5))) for s in range(0, 24, 5)]  # 5 batches, the last one short
MAX_TURNS = max_human_turns([r.conversations for r in RECORDS])


def assert_same(a: TextBatch, b: TextBatch) -> None:
    for name in ("turns", "num_turns", "mean"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{name} differs"


def whole_shard(embedder, rows, flags) -> TextBatch:
    """`rows`' embeddings taken from their output shard embedded as one batch (its planned image flags), with the rows
    whose image did not decode (`flags` False) marked empty."""
    k = rows[0] // SHARD
    shard = list(range(k * SHARD, min(len(RECORDS), (k + 1) * SHARD)))
    full = embedder.embed([RECORDS[r].conversations for r in shard], [RECORDS[r].has_image for r in shard], MAX_TURNS)
    pick = [shard.index(r) for r in rows]
    keep = np.asarray(flags)
    return TextBatch(full.turns[pick] * keep[:, None, None], (full.num_turns[pick] * keep).astype(np.int16),
                     full.mean[pick] * keep[:, None])


@pytest.mark.parametrize("background", [True, False])
def test_text_stage_embeds_each_output_shard_once(embedder, background):
    """Every batch's embeddings are its rows' out of their output shard's instructions embedded together, in the
    thread and inline alike, also when an image did not decode."""
    stage = _TextStage(embedder, RECORDS, BATCHES, MAX_TURNS, SHARD, background=background, ahead=2)
    try:
        for i, rows in enumerate(BATCHES):
            flags = [RECORDS[r].has_image for r in rows]
            if i == 2:
                flags[1] = False  # an image that did not decode: that batch is built again with the real flags
            assert_same(stage.get(rows, flags), whole_shard(embedder, rows, flags))
    finally:
        stage.close()
    assert not stage.thread.is_alive()


def test_text_stage_same_bits_on_resume(embedder):
    """A resumed run (only the batches of the shards still to do) stores the bits an uninterrupted run stores."""
    full = _TextStage(embedder, RECORDS, BATCHES, MAX_TURNS, SHARD)
    later = _TextStage(embedder, RECORDS, BATCHES[2:], MAX_TURNS, SHARD)
    try:
        got = {tuple(rows): full.get(rows, [RECORDS[r].has_image for r in rows]) for rows in BATCHES}
        for rows in BATCHES[2:]:
            assert_same(later.get(rows, [RECORDS[r].has_image for r in rows]), got[tuple(rows)])
    finally:
        full.close(), later.close()


def test_text_stage_any_batch_order(embedder):
    stage = _TextStage(embedder, RECORDS, BATCHES, MAX_TURNS, SHARD, ahead=1)
    try:
        for rows in [BATCHES[0], BATCHES[3], BATCHES[1], list(reversed(BATCHES[2]))]:  # a streamed source's order
            flags = [RECORDS[r].has_image for r in rows]
            assert_same(stage.get(rows, flags), whole_shard(embedder, rows, flags))
    finally:
        stage.close()
    assert not stage.thread.is_alive()


class _FailingEmbedder:
    dim = 4

    def turns(self, conversation, max_turns):
        return ["a question"]

    def embed_texts(self, texts):
        raise RuntimeError("sentence model failed")


def test_text_stage_error_is_raised_by_get():
    stage = _TextStage(_FailingEmbedder(), RECORDS, BATCHES, MAX_TURNS, SHARD)
    try:
        with pytest.raises(RuntimeError, match="sentence model failed"):
            stage.get(BATCHES[0], [True] * len(BATCHES[0]))
    finally:
        stage.close()


class _FakeWriter:
    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.done, self.lock = fail_at, [], threading.Lock()

    def write_shard(self, res) -> None:
        if res == self.fail_at:
            raise OSError(f"disk full at shard {res}")
        with self.lock:
            self.done.append(res)


def test_writer_pool_writes_every_shard():
    fake = _FakeWriter()
    sink = ShardWriterPool(fake, depth=2, threads=3)  # type: ignore[arg-type]
    for k in range(10):
        sink.submit(k)  # type: ignore[arg-type]
    sink.close()
    assert sorted(fake.done) == list(range(10)) and sink.written == 10


def test_writer_pool_raises_the_first_error():
    sink = ShardWriterPool(_FakeWriter(fail_at=3), depth=1, threads=2)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="disk full at shard 3"):
        for k in range(10):
            sink.submit(k)  # type: ignore[arg-type]
        sink.close()
    if any(t.is_alive() for t in sink.threads):
        with pytest.raises(OSError):
            sink.close()


def test_text_embeddings_do_not_depend_on_the_callers_threads(embedder):
    """On a CPU the sentence model's bits can depend on torch's intra-op thread count (torchrun's ranks run with one,
    a single process with all cores: tests/pipeline/training/test_resume_distributed.py failed on text/turns without
    this rule): it runs with `TEXT_CPU_THREADS` whatever the caller's count, which is restored after."""
    texts = [t for r in RECORDS for t in embedder.turns(r.conversations, MAX_TURNS)]
    before = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append(embedder.embed_texts(texts))
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
    assert all(got[0].keys() == g.keys() and all(np.array_equal(got[0][t], g[t]) for t in g) for g in got[1:])
    assert TEXT_CPU_THREADS == 1


def test_images_per_forward_default_by_device_and_tokens():
    """--batch-size wins; by default 32 on an accelerator, and on a CPU as many images as hold CPU_BATCH_TOKENS tokens."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = ExtractConfig()
    assert auto.batch_size is None and CPU_BATCH_TOKENS == 4096
    assert [auto.forward_batch(cpu, t) for t in (65, 197, 577, 5000)] == [32, 20, 7, 1]  # default tower, ViT-B/16, ViT-L/14-336
    assert auto.forward_batch(cuda, 577) == 32
    assert ExtractConfig(batch_size=12).forward_batch(cpu, 577) == 12


def test_decoding_workers_default_by_device_cores_and_ranks(monkeypatch):
    """--workers wins (0 included); by default 2 on a CPU, where the forward takes the other cores, and on an
    accelerator the cores this process may use minus ACCELERATOR_SPARE_CORES, split among a node's ranks, at least 2."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = ExtractConfig()
    assert auto.workers is None and (CPU_WORKERS, ACCELERATOR_SPARE_CORES) == (2, 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))  # the lent H200 machine's 16 cores
    assert auto.loader_workers(cpu) == 2
    assert auto.loader_workers(cuda) == 12
    assert auto.loader_workers(cuda, local_world=4) == 3  # 4 ranks on the node share the 12
    assert auto.loader_workers(cuda, local_world=8) == 2  # never below 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert auto.loader_workers(cuda) == 2
    assert ExtractConfig(workers=0).loader_workers(cuda) == 0 and ExtractConfig(workers=5).loader_workers(cpu) == 5


def test_ranks_on_a_node_come_from_torchrun(monkeypatch):
    """DistContext.local_world is torchrun's LOCAL_WORLD_SIZE (what the ranks of a node divide their cores by); a
    single process has its node to itself."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert DistContext.from_env().local_world == 1
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # a group already joined: nothing to start
    ctx = DistContext.from_env()
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.local_world, ctx.owns_group) == (5, 8, 1, 4, False)
