"""Helpers the tests share (imported as `from tests.support import ...`; fixtures stay in conftest.py)."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def layerfuse_cmd(*args: str) -> list[str]:
    """The installed `layerfuse` console script (the same entry point users run)."""
    return [str(BIN / "layerfuse"), *args]


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    """`layerfuse ARGS` under torchrun with `nproc` local processes (gloo on a CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "layerfuse.pipeline.cli", *args]


def extract_config(out: str, vision_dir: Path, **kw):
    from layerfuse.pipeline.cache.extract import ExtractConfig

    base = dict(out=str(out), vision=str(vision_dir), builtin=24, seed=3, shard_samples=8, batch_size=4, workers=1, progress=False)
    base.update(kw)
    return ExtractConfig(**base)


@contextmanager
def cache_deprecations() -> Iterator[list[str]]:
    """The KV-cache deprecation notices (`past_key_values` -> `cache`, transformers 5.24) given while the block runs:
    `deprecate_kwarg` FutureWarnings and the `transformers` loggers' warnings (`warning_once` remembers what it said
    in this process; that memory is cleared first)."""
    seen: list[str] = []

    def about_the_cache(message: str) -> bool:
        return "deprecat" in message and "past_key_value" in message

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if about_the_cache(record.getMessage()):
                seen.append(f"log {record.name}: {record.getMessage()}")

    once = getattr(logging.Logger, "warning_once", None)  # installed by transformers.utils.logging
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    logger, handler = logging.getLogger("transformers"), Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
    finally:
        logger.removeHandler(handler)
    seen += [f"{w.category.__name__}: {w.message}" for w in caught if about_the_cache(str(w.message))]
