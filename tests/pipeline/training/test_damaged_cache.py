"""Training never runs silently on a damaged cache: it stops with one line naming the sample, shard and cache, or
(--on-corrupt skip) leaves the damaged rows out and records each with its reason."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from layerfuse.pipeline.cache.reader import CorruptRowsError, FeatureCache
from layerfuse.pipeline.training.train import train
from tests.pipeline.training.test_train import config
from tests.support import layerfuse_cmd


@pytest.fixture
def damaged(train_cache, tmp_path) -> tuple[Path, list[str], str]:
    """A copy of the training cache with the features of two training samples and the answer of a third changed
    behind the cache's back (through zarr, so every file stays readable): (cache, feature-damaged ids, answer-damaged id)."""
    out = tmp_path / "cache"
    shutil.copytree(train_cache, out)
    cache = FeatureCache(out)
    storage = cache.storage_rows(cache.select(split="train"))
    feats = zarr.open_array(str(out / "features"), mode="r+")
    for r in storage[3:5]:
        x = np.asarray(feats[r : r + 1])
        feats[r : r + 1] = (x.astype(np.float32) + 0.5).astype(x.dtype)
    convs = zarr.open_array(str(out / "samples" / "conversations"), mode="r+")
    r = int(storage[7])
    turns = json.loads(str(convs[r]))
    turns[-1]["value"] = "a rewritten answer"
    convs[r] = json.dumps(turns)
    ids = cache.sample_ids(np.searchsorted(cache.storage_rows(), storage[[3, 4, 7]])).tolist()
    return out, ids[:2], ids[2]


def test_training_stops_on_a_damaged_row(damaged, tiny_llm_dir, tmp_path):
    cache, _, answer_id = damaged
    with pytest.raises(CorruptRowsError, match=rf"sample {answer_id} .*conversations' fails its checksum"):
        train(config(str(cache), tiny_llm_dir, tmp_path / "run", stage=1, fuser="single", max_steps=2))


def test_cli_training_on_a_damaged_cache_is_one_line(damaged, tiny_llm_dir, tmp_path):
    cache, _, answer_id = damaged
    args = ["train", "--cache", str(cache), "--llm", str(tiny_llm_dir), "--fuser", "single", "--max-steps", "2", "--batch-size", "8",
            "--workers", "0", "--quiet"]
    r = subprocess.run(layerfuse_cmd(*args, "--out", str(tmp_path / "run")), capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "is damaged: sample" in r.stderr and str(cache) in r.stderr
    r = subprocess.run(layerfuse_cmd(*args, "--out", str(tmp_path / "skip"), "--on-corrupt", "skip"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f'"id": "{answer_id}"' in (tmp_path / "skip" / "train" / "skipped.jsonl").read_text()


def test_skip_leaves_damaged_rows_out_and_records_them(damaged, tiny_llm_dir, tmp_path):
    cache, feature_ids, answer_id = damaged
    out = tmp_path / "run"
    res = train(config(str(cache), tiny_llm_dir, out, stage=1, fuser="single", epochs=1.0, max_steps=None, on_corrupt="skip"))
    skipped = {s["id"]: s["reason"] for s in map(json.loads, (out / "train" / "skipped.jsonl").read_text().splitlines())}
    assert skipped[answer_id].startswith("damaged: 'samples/conversations' fails its checksum")
    dropped = [json.loads(line) for line in (out / "train" / "damaged.jsonl").read_text().splitlines()]
    assert sorted(d["id"] for d in dropped) == sorted(feature_ids)  # one epoch reads each training row once
    assert all("of the features fails its checksum" in d["reason"] and d["step"] >= 0 for d in dropped)
    assert res.final_loss is not None and np.isfinite(res.final_loss)
