"""Tiny trained runs and built-in samples (rendered images, their cached features) for the harness adapters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.data import synthetic
from layerfuse.pipeline.training.train import TrainConfig, train


def _train(cache: str, llm_dir: Path, out: Path, **kw) -> Path:
    base = dict(cache=cache, out=str(out), llm=str(llm_dir), stage=1, template="v1", batch_size=8, max_steps=3, max_length=256,
                workers=0, log_every=1, save_every=0, progress=False, tensorboard=False, buffer_rows=16, lr_fuser=1e-2, lr_projector=1e-2)
    base.update(kw)
    train(TrainConfig(**base))
    return out


@pytest.fixture(scope="session")
def igva_run(train_cache, tiny_llm_dir, tmp_path_factory) -> Path:
    """igva in allocator mode (the question's sentence embedding weights the layer groups), v1 template: questions are
    part of the prompt."""
    opts = {"allocator_dim": 32, "allocator_blocks": 1, "mode": "allocator"}
    return _train(train_cache, tiny_llm_dir, tmp_path_factory.mktemp("harness") / "igva", fuser="igva", fuser_options=opts)


@pytest.fixture(scope="session")
def concat_run(train_cache, tiny_llm_dir, tmp_path_factory) -> Path:
    """concat on 3-18-23 (no text input), v1 template."""
    return _train(train_cache, tiny_llm_dir, tmp_path_factory.mktemp("harness") / "concat", fuser="concat", layers="3-18-23")


@dataclass
class BuiltinSample:
    row: int  # storage row in the cache
    image: Image.Image  # the built-in render, as a user's image would arrive
    path: Path  # the same image as a PNG file
    question: str  # the first human turn (with <image>)
    answer: str  # the reference answer


@pytest.fixture(scope="session")
def builtin_samples(train_cache, tmp_path_factory) -> list[BuiltinSample]:
    """Four val samples of the test cache with an image, one per category where possible, rendered again from their
    seed and index (the pictures the cache's features were extracted from)."""
    cache = FeatureCache(train_cache)
    rows = cache.select(split="val", has_image=True)
    picked, seen = [], set()
    for row, cat in zip(rows, cache.categories[rows]):
        if cat not in seen and cat != "caption":
            picked.append(int(row))
            seen.add(cat)
    picked = picked[:4]
    folder = tmp_path_factory.mktemp("builtin-images")
    out = []
    for row, sid, conv in zip(picked, cache.sample_ids(np.array(picked)), cache.conversations(np.array(picked))):
        seed, index = (int(x) for x in str(sid).split("-")[1:])
        path = folder / f"{sid}.png"
        synthetic.render(synthetic.make_scene(seed, index)).save(path)
        out.append(BuiltinSample(row, Image.open(path).convert("RGB"), path, conv[0]["value"], conv[1]["value"]))
    return out
