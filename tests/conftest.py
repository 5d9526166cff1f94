"""Shared fixtures: a tiny vision tower saved to disk and small caches extracted through the real code path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import extract_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="session")
def vision_dir(tmp_path_factory) -> Path:
    """The default tower's architecture with random weights (pretraining it is tested in test_default_vision.py)."""
    from layerfuse.pipeline.models.default_vision import (
        DefaultVisionConfig,
        build_default_vision,
    )

    return build_default_vision(tmp_path_factory.mktemp("run") / "vision", DefaultVisionConfig(pretrain_steps=0))


@pytest.fixture(scope="session")
def embedder():
    from layerfuse.pipeline.models.text import InstructionEmbedder

    return InstructionEmbedder()


@pytest.fixture(scope="session")
def fp32_cache(tmp_path_factory, vision_dir) -> str:
    """24 built-in samples, stored in float32, 3 shards."""
    from layerfuse.pipeline.cache.extract import run_extract

    out = tmp_path_factory.mktemp("caches") / "fp32"
    run_extract(extract_config(str(out), vision_dir, dtype="float32"))
    return str(out)


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory, vision_dir) -> str:
    """The phase-two test cache: 120 built-in samples (all categories, ~96 train), fp16, shards of 16 rows in
    chunks of 4 rows, so the loader's shard/block/window logic has something to do."""
    from layerfuse.pipeline.cache.extract import run_extract

    out = tmp_path_factory.mktemp("caches") / "train"
    run_extract(extract_config(str(out), vision_dir, builtin=120, seed=5, shard_samples=16, chunk_kib=33, batch_size=16))
    return str(out)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A tiny embedded-default-style Llama (2 layers, width 32) with its BPE tokenizer, random weights, built and
    saved by `build_default_llm` (loaded back through the real loading code by every test that uses it)."""
    from layerfuse.pipeline.models.llm import DefaultLLMConfig, build_default_llm

    cfg = DefaultLLMConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, corpus_seeds=(0,), corpus_samples=300)
    return build_default_llm(tmp_path_factory.mktemp("llm") / "tiny", cfg)
