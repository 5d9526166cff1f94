"""Extraction's background stages: the text stage equals inline embedding bit for bit, the writer pool writes every
shard and surfaces the first error."""

from __future__ import annotations

import threading

import numpy as np
import torch
import pytest
from layerfuse.pipeline.cache.extract import CPU_BATCH_TOKENS, ExtractConfig, _TextStage
from layerfuse.pipeline.cache.writer import ShardWriterPool
from layerfuse.pipeline.data.synthetic import synthetic_plan
from layerfuse.pipeline.models.text import TextBatch, max_human_turns

RECORDS = synthetic_plan(24, 3).records
BATCHES = [list(range(s, min(24, s + 5))) for s in range(0, 24, 5)]  # 5 batches, the last one short
MAX_TURNS = max_human_turns([r.conversations for r in RECORDS])


def assert_same(a: TextBatch, b: TextBatch) -> None:
    for name in ("turns", "num_turns", "mean"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{name} differs"


def inline(embedder, rows, flags) -> TextBatch:
    return embedder.embed([RECORDS[r].conversations for r in rows], flags, MAX_TURNS)


@pytest.mark.parametrize("background", [True, False])
def test_text_stage_equals_inline_embedding(embedder, background):
    stage = _TextStage(embedder, RECORDS, BATCHES, MAX_TURNS, background=background, ahead=2)
    try:
        for i, rows in enumerate(BATCHES):
            flags = [RECORDS[r].has_image for r in rows]
            if i == 2:
                flags[1] = False  # an image that did not decode: that batch is embedded again with the real flags
            assert_same(stage.get(rows, flags), inline(embedder, rows, flags))
    finally:
        stage.close()
    assert not stage.thread.is_alive()


def test_text_stage_any_batch_order(embedder):
    stage = _TextStage(embedder, RECORDS, BATCHES, MAX_TURNS, ahead=1)
    try:
        for rows in [BATCHES[0], BATCHES[3], BATCHES[1], list(reversed(BATCHES[2]))]:  # a streamed source's order
            flags = [RECORDS[r].has_image for r in rows]
            assert_same(stage.get(rows, flags), inline(embedder, rows, flags))
    finally:
        stage.close()
    assert not stage.thread.is_alive()


class _FailingEmbedder:
    dim = 4

    def embed(self, conversations, has_image, max_turns):
        raise RuntimeError("sentence model failed")


def test_text_stage_error_is_raised_by_get():
    stage = _TextStage(_FailingEmbedder(), RECORDS, BATCHES, MAX_TURNS)
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


def test_text_stage_thread_uses_the_callers_torch_threads(embedder):
    """On a CPU the sentence model's bits depend on torch's intra-op thread count: the stage's thread copies the caller's."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        stage = _TextStage(embedder, RECORDS, BATCHES, MAX_TURNS)
        try:
            rows = BATCHES[0]
            flags = [RECORDS[r].has_image for r in rows]
            assert_same(stage.get(rows, flags), inline(embedder, rows, flags))
        finally:
            stage.close()
    finally:
        torch.set_num_threads(before)


def test_images_per_forward_default_by_device_and_tokens():
    """--batch-size wins; by default 32 on an accelerator, and on a CPU as many images as hold CPU_BATCH_TOKENS tokens."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = ExtractConfig()
    assert auto.batch_size is None and CPU_BATCH_TOKENS == 4096
    assert [auto.forward_batch(cpu, t) for t in (65, 197, 577, 5000)] == [32, 20, 7, 1]  # default tower, ViT-B/16, ViT-L/14-336
    assert auto.forward_batch(cuda, 577) == 32
    assert ExtractConfig(batch_size=12).forward_batch(cpu, 577) == 12
