"""`cache derive`: a smaller cache from a bigger one, checked, resumable, with its provenance."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from layerfuse.pipeline.cache.derive import DeriveError, derive_cache
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.cache.verify import verify_cache
from tests.support import layerfuse_cmd, torchrun_cmd


def test_derive_a_layer_subset_in_another_dtype(fp32_cache, tmp_path):
    out = str(tmp_path / "mm16")
    res = derive_cache(fp32_cache, out, layers="mmfuser", dtype="float16", progress=False)
    src, dst = FeatureCache(fp32_cache), FeatureCache(out)
    assert res.shards_written == 3 and dst.stored_layers == [3, 8, 13, 18, 23] and dst.storage_dtype == "float16"
    assert torch.equal(dst.features(slice(None), [3, 23]), src.features(slice(None), [3, 23]).half())
    assert dst.ids == src.ids and dst.conversations(slice(None)) == src.conversations(slice(None))
    assert torch.equal(dst.text_embeddings(), src.text_embeddings())
    assert dst.meta["derived_from"] == {"url": fp32_cache, "config_hash": src.meta["config_hash"]}
    assert dst.meta["config_hash"] != src.meta["config_hash"]
    assert verify_cache(out, progress=False).ok
    assert derive_cache(fp32_cache, out, layers="mmfuser", dtype="float16", progress=False).already_complete
    with pytest.raises(DeriveError, match="other settings"):
        derive_cache(fp32_cache, out, layers="3-18-23", progress=False)
    with pytest.raises(DeriveError, match=r"does not store hidden state\(s\) \[1, 2,"):
        derive_cache(out, str(tmp_path / "more"), layers="igva", progress=False)  # a derived cache cannot grow


def test_derive_resumes_after_sigkill(fp32_cache, tmp_path):
    out = tmp_path / "killed"
    args = layerfuse_cmd("cache", "derive", fp32_cache, "--out", str(out), "--layers", "3-18-23", "--dtype", "bfloat16", "--quiet")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    marker = out / "progress" / "shard-000000.json"
    t0 = time.monotonic()
    while not marker.exists():
        assert proc.poll() is None or marker.exists(), proc.stderr.read().decode()[-2000:]
        assert time.monotonic() - t0 < 120
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    src, dst = FeatureCache(fp32_cache), FeatureCache(out)
    assert torch.equal(dst.features(slice(None), None), src.features(slice(None), [3, 18, 23]).bfloat16())
    assert verify_cache(str(out), progress=False).ok


def test_an_interrupted_derive_redoes_only_the_missing_shards(fp32_cache, tmp_path, monkeypatch):
    from layerfuse.pipeline.cache.writer import CacheWriter

    out = str(tmp_path / "half")
    real, calls = CacheWriter.write_shard, []

    def dies_after_one(self, res):
        if calls:
            raise KeyboardInterrupt  # the process dies here (as under SIGKILL, nothing after the first marker is written)
        calls.append(res.index)
        real(self, res)

    monkeypatch.setattr(CacheWriter, "write_shard", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        derive_cache(fp32_cache, out, layers="18,", progress=False)
    monkeypatch.setattr(CacheWriter, "write_shard", real)
    assert not FeatureCache(out, allow_incomplete=True).complete
    res = derive_cache(fp32_cache, out, layers="18,", progress=False)
    assert res.shards_written == 2 and verify_cache(out, progress=False).ok
    assert torch.equal(FeatureCache(out).features(slice(None), [18]), FeatureCache(fp32_cache).features(slice(None), [18]))


def test_torchrun_two_ranks_derive_what_one_process_derives(fp32_cache, tmp_path):
    """Each rank writes the shards k = rank (mod 2) of the same plan; rank 0 finalizes: the same cache as one process."""
    one, two = str(tmp_path / "one"), tmp_path / "two"
    derive_cache(fp32_cache, one, layers="mmfuser", dtype="int8", progress=False)
    r = subprocess.run(torchrun_cmd("cache", "derive", fp32_cache, "--out", str(two), "--layers", "mmfuser", "--dtype", "int8", "--quiet"),
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = FeatureCache(one), FeatureCache(str(two))
    assert b.complete and verify_cache(str(two), progress=False).ok
    assert len(list((two / "progress").glob("shard-*.json"))) == 3
    assert torch.equal(b.features(slice(None), None), a.features(slice(None), None))
    assert b.meta["storage"]["quant"] == a.meta["storage"]["quant"]  # calibration (rank 0) and the error sums of every shard
    assert b.meta["config_hash"] == a.meta["config_hash"] and b.meta["summary"] == a.meta["summary"]
