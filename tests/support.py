"""Helpers the tests share (imported as `from tests.support import ...`; fixtures stay in conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def layerfuse_cmd(*args: str) -> list[str]:
    """The installed `layerfuse` console script (the same entry point users run)."""
    return [str(BIN / "layerfuse"), *args]


def extract_config(out: str, vision_dir: Path, **kw):
    from layerfuse.pipeline.cache.extract import ExtractConfig

    base = dict(out=str(out), vision=str(vision_dir), builtin=24, seed=3, shard_samples=8, batch_size=4, workers=1, progress=False)
    base.update(kw)
    return ExtractConfig(**base)


