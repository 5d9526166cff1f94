"""The command line and the packaging: help texts, the three source formats agree, install layout."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from layerfuse.core.errors import ToolchainError
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.data.records import SampleError
from layerfuse.pipeline.cli import main

from tests.support import REPO, layerfuse_cmd


@pytest.mark.parametrize("cmd", [[], ["data"], ["data", "synthetic"], ["extract"], ["cache"], ["cache", "info"], ["cache", "verify"],
                                 ["tower"], ["tower", "rebuild"], ["tower", "record"]])
def test_every_command_has_help_with_example(cmd):
    r = CliRunner().invoke(main, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Example" in r.output and "layerfuse" in r.output


def test_three_sources_give_the_same_cache(tmp_path, vision_dir):
    """The synthetic set written as LLaVA JSON and as WebDataset tars extracts to the same features and text
    as rendering it on the fly (PNG is lossless)."""
    data = tmp_path / "syn"
    r = subprocess.run(layerfuse_cmd("data", "synthetic", "--out", str(data), "--n", "12", "--seed", "4", "--quiet"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    common = ["--vision", str(vision_dir), "--shard-samples", "4", "--batch-size", "4", "--workers", "0", "--quiet"]
    outs = {}
    wds = ",".join(str(data / "wds" / f"{s}-000000.tar") for s in ("train", "val", "test") if (data / "wds" / f"{s}-000000.tar").exists())
    for name, src in {
        "builtin": ["--builtin", "12", "--seed", "4"],
        "llava": ["--llava", str(data / "llava.json"), "--image-root", str(data / "images")],
        "wds": ["--wds", wds],
    }.items():
        outs[name] = tmp_path / name
        r = subprocess.run(layerfuse_cmd("extract", "--out", str(outs[name]), *src, *common), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "12 images" in r.stdout
    ref = FeatureCache(outs["builtin"])
    by_id = {i: k for k, i in enumerate(ref.ids)}
    for name in ("llava", "wds"):
        c = FeatureCache(outs[name])
        assert sorted(c.ids) == sorted(ref.ids)
        order = [by_id[i] for i in c.ids]
        assert torch.equal(c.features(slice(None), [0, 12, 24]), ref.features(order, [0, 12, 24])), name
        assert torch.allclose(c.text_embeddings(), ref.text_embeddings(order), atol=1e-6), name
        assert list(c.categories) == [ref.categories[k] for k in order] and list(c.splits) == [ref.splits[k] for k in order]
    info = json.loads(subprocess.run(layerfuse_cmd("cache", "info", str(outs["wds"]), "--json"), capture_output=True, text=True, check=True).stdout)
    assert info["num_samples"] == 12 and info["num_layers"] == 25 and info["num_tokens"] == 65 and info["hidden_size"] == 64
    assert info["dtype"] == "float16" and info["text_dim"] == 384 and info["skipped"] == []
    human = subprocess.run(layerfuse_cmd("cache", "info", str(outs["wds"])), capture_output=True, text=True, check=True).stdout
    assert "num_samples      12" in human and "skipped          0" in human


def test_user_errors_are_one_line(tmp_path):
    """A LayerfuseError is `layerfuse <command>: <message>` on stderr and exit status 1, also in nested groups."""
    r = CliRunner().invoke(main, ["cache", "info", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and r.stderr == f"layerfuse cache info: no layerfuse cache at '{tmp_path / 'nothing'}'\n", r.output
    assert r.stdout == ""
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    r = CliRunner().invoke(main, ["extract", "--llava", str(bad), "--out", str(tmp_path / "c"), "--vision", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.stderr.startswith("layerfuse extract: ") and r.stderr.count("\n") == 1, r.output
    r = CliRunner().invoke(main, ["export", "onnx", "--run", str(tmp_path), "--out", str(tmp_path / "f.onnx")])
    assert r.exit_code == 1 and r.stderr.startswith(f"layerfuse export onnx: '{tmp_path}' is not a finished layerfuse run"), r.output


@pytest.mark.parametrize("error", [ToolchainError("no compiler here"), SampleError("truncated PNG")])
def test_every_layerfuse_error_is_a_user_error(tmp_path, monkeypatch, error):
    def fail(path):
        raise error

    monkeypatch.setattr("layerfuse.pipeline.cache.verify.cache_info", fail)
    r = CliRunner().invoke(main, ["cache", "info", str(tmp_path)])
    assert r.exit_code == 1 and r.stderr == f"layerfuse cache info: {error}\n"


@pytest.mark.parametrize("error", [KeyError("a bug"), FileNotFoundError("an internal file")])
def test_other_errors_keep_their_traceback(tmp_path, monkeypatch, error):
    """Anything that is not a LayerfuseError is a bug: it propagates (click prints the traceback), including a
    FileNotFoundError, which user-facing code raises as MissingError instead."""
    def fail(path):
        raise error

    monkeypatch.setattr("layerfuse.pipeline.cache.verify.cache_info", fail)
    with pytest.raises(type(error)) as caught:
        CliRunner().invoke(main, ["cache", "info", str(tmp_path)], catch_exceptions=False)
    assert caught.value is error


def test_wheel_installs_only_under_layerfuse(tmp_path):
    """No generic top-level names (pipeline, export, ...) land in site-packages."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this environment")
    import shutil

    root = REPO
    src = tmp_path / "src"  # build from a copy: setuptools leaves build/ behind in the tree it builds
    generated = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")

    def ignore(folder: str, names: list[str]) -> set[str]:  # runs/ and data/ only at the root: pipeline/data is code
        at_root = {".venv", ".git", "runs", "data"} if Path(folder) == root else set()
        return set(generated(folder, names)) | (at_root & set(names))

    shutil.copytree(root, src, ignore=ignore)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("layerfuse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"layerfuse", next(t for t in tops if t.endswith(".dist-info"))}
    stages = ("data", "models", "cache", "training", "ablation")
    for sub in ("core", "fusion", "plugins_trt", "export", "pipeline", *(f"pipeline/{p}" for p in stages)):
        assert f"layerfuse/{sub}/__init__.py" in names, sub
    assert "layerfuse/pipeline/cache/reader.py" in names and "layerfuse/pipeline/cli.py" in names
    for shipped in ("recipe.json", "model.safetensors", "config.json", "preprocessor_config.json", "layerfuse_default.json"):
        assert f"layerfuse/pipeline/models/default_tower/{shipped}" in names, shipped  # package data: the shipped tower


def test_extract_ends_with_a_summary_naming_skipped_samples(tmp_path, vision_dir):
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]
    (tmp_path / "z.png").write_bytes(b"")
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"id": "gone", "image": "missing.png", "conversations": conv},
                              {"id": "zero", "image": "z.png", "conversations": conv}, {"id": "bad"}]))
    r = subprocess.run(layerfuse_cmd("extract", "--llava", str(js), "--out", str(tmp_path / "c"), "--vision", str(vision_dir), "--workers", "0", "--quiet"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "0 images" in r.stdout and "2 skipped at decode" in r.stdout and "1 malformed records" in r.stdout
    assert "0 refused after the encoder" in r.stdout
    assert "repaired; extracted in " in r.stdout and "tower" not in r.stdout  # a given --vision: no tower to build
    assert "skipped: gone: image not found" in r.stdout and "skipped: zero: empty file" in r.stdout and "skipped: bad:" in r.stdout
