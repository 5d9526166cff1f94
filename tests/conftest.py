"""Shared fixtures: a tiny vision tower saved to disk and small caches extracted through the real code path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BIN = Path(sys.executable).parent


def layerfuse_cmd(*args: str) -> list[str]:
    """The installed `layerfuse` console script (the same entry point users run)."""
    return [str(BIN / "layerfuse"), *args]


@pytest.fixture(scope="session")
def vision_dir(tmp_path_factory) -> Path:
    from layerfuse.pipeline.encoder import build_default_vision

    return build_default_vision(tmp_path_factory.mktemp("run") / "vision")


@pytest.fixture(scope="session")
def embedder():
    from layerfuse.pipeline.text import InstructionEmbedder

    return InstructionEmbedder()


def extract_config(out: str, vision_dir: Path, **kw):
    from layerfuse.pipeline.extract import ExtractConfig

    base = dict(out=str(out), vision=str(vision_dir), builtin=24, seed=3, shard_samples=8, batch_size=4, workers=1, progress=False)
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="session")
def fp32_cache(tmp_path_factory, vision_dir) -> str:
    """24 built-in samples, stored in float32, 3 shards."""
    from layerfuse.pipeline.extract import run_extract

    out = tmp_path_factory.mktemp("caches") / "fp32"
    run_extract(extract_config(str(out), vision_dir, dtype="float32"))
    return str(out)
