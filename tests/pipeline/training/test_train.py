"""Phase two (pipeline/training/train.py, loader.py, model.py, evaluate.py, infer.py) on a tiny cache and a tiny LLM.

In-process runs use `workers=0` where a test spies on the cache reader; the subprocess tests (SIGKILL + resume,
DDP and FSDP under torchrun) run the installed `layerfuse` command with DataLoader workers, as users do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from layerfuse.core.schedule import lr_factor
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.data.conversation import IGNORE_INDEX, collate
from layerfuse.pipeline.models.llm import load_llm
from layerfuse.pipeline.models.run import load_run, read_run_model
from layerfuse.pipeline.training.evaluate import (
    EvalConfig,
    _write,
    chance_levels,
    evaluate,
    majority_baseline,
    normalize_answer,
)
from layerfuse.pipeline.training.loader import (
    TokenSettings,
    scan_training_set,
    tokenize_sample,
)
from layerfuse.pipeline.training.metrics import read_log
from layerfuse.pipeline.training.train import (
    TrainConfig,
    TrainError,
    TrainObjective,
    train,
)
from safetensors.torch import load_file

from tests.support import REPO, layerfuse_cmd, torchrun_cmd


def config(cache: str, llm_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=cache, out=str(out), llm=str(llm_dir), batch_size=8, max_steps=6, max_length=256, workers=0, log_every=1,
                save_every=0, progress=False, tensorboard=False, buffer_rows=16)
    base.update(kw)
    return TrainConfig(**base)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run / "train" / "log.jsonl")]


def llm_params(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_llm(str(path)).model.state_dict().items()}


@pytest.fixture(scope="module")
def stage1(train_cache, tiny_llm_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "stage1"
    train(config(train_cache, tiny_llm_dir, out, stage=1, categories=["caption"], max_steps=8, lr_projector=3e-3))
    return out


# -- stage 1 ----------------------------------------------------------------------------------------------------------
def test_stage1_reads_only_the_fusers_layers_and_keeps_the_llm_frozen(train_cache, tiny_llm_dir, tmp_path, monkeypatch):
    seen: list[list[int]] = []
    original = FeatureCache.features

    def spy(self, rows, layers=None):
        seen.append(list(layers))
        return original(self, rows, layers)

    monkeypatch.setattr(FeatureCache, "features", spy)
    out = tmp_path / "s1"
    res = train(config(train_cache, tiny_llm_dir, out, stage=1, categories=["caption"], layers="3-18-23", max_steps=10, lr_projector=3e-3))
    assert seen and all(layers == [3, 18, 23] for layers in seen)  # 3 of the 25 cached hidden states, nothing else
    assert res.steps == 10 and res.samples == 80 and res.training_samples == 24
    run = read_run_model(out)
    assert (run.fuser, run.stage, run.llm_mode, run.template, run.feature_dtype) == ("concat", 1, "frozen", "plain", "float16")
    assert Path(run.encoder["path"]).is_dir() and run.fuser_options["layers"] == "3-18-23"
    assert not (out / "llm").exists() and not (out / "adapter").exists()
    vlm, bundle, _ = load_run(out)
    base = llm_params(tiny_llm_dir)
    assert all(torch.equal(v, base[k]) for k, v in bundle.model.state_dict().items())  # the LLM is untouched
    curve = losses(out)
    assert len(curve) == 10 and np.mean(curve[-3:]) < np.mean(curve[:3])  # the projector learns


# -- the objective --------------------------------------------------------------------------------------------------------
def test_objective_equals_the_token_mean_cross_entropy_of_the_full_logits(train_cache, tiny_llm_dir, stage1):
    """Logits only at supervised positions (logits_to_keep) give exactly HF's full-logit loss."""
    vlm, bundle, model = load_run(stage1)
    cache = FeatureCache(train_cache)
    rows = cache.select(split="train")[:6]
    settings = TokenSettings("v1", vlm.fuser.num_visual_tokens, bundle.image_token_id, 256, bundle.pad_token_id)
    batch = collate([tokenize_sample(c, True, bundle.tokenizer, settings) for c in cache.conversations(rows)], bundle.pad_token_id)
    layers = cache.features(rows, vlm.fuser.required_layers).float()
    obj = TrainObjective(vlm)
    assert obj.keep_logits
    with torch.no_grad():
        loss_sum, aux = obj(batch.input_ids, batch.attention_mask, batch.labels, batch.has_image, layers, None)
        ref = vlm(batch.input_ids, layers, has_image=batch.has_image, attention_mask=batch.attention_mask, labels=batch.labels).lm_loss
    n = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-5, atol=1e-6)
    assert float(aux) == 0.0


def test_gradient_accumulation_does_not_change_the_optimisation(train_cache, tiny_llm_dir, stage1, tmp_path):
    """Global batch 8 as one micro-batch or as four of 2: the same loss per step and the same weights."""
    runs = {}
    for micro in (8, 2):
        out = tmp_path / f"micro{micro}"
        train(config(train_cache, tiny_llm_dir, out, stage=2, init_from=str(stage1), micro_batch_size=micro, max_steps=4, lr_llm=1e-3))
        runs[micro] = out
    np.testing.assert_allclose(losses(runs[2]), losses(runs[8]), rtol=2e-5)
    a, b = load_file(str(runs[8] / "fuser.safetensors")), load_file(str(runs[2] / "fuser.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_compile_trains_the_same_model_up_to_rounding_and_saves_it_under_the_same_names(train_cache, tiny_llm_dir, stage1, tmp_path):
    """--compile (torch.compile of the LLM's forward, in place): the same losses up to kernel rounding, a run that loads
    like an eager one (the state dict keeps its names) and the same weights up to rounding."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile{compiled}"
        train(dataclasses.replace(config(train_cache, tiny_llm_dir, out, stage=2, init_from=str(stage1), max_steps=4, lr_llm=1e-3),
                                  compile=compiled))
        runs[compiled] = out
    np.testing.assert_allclose(losses(runs[True]), losses(runs[False]), rtol=1e-4)
    eager, _, _ = load_run(runs[False])
    comp, _, _ = load_run(runs[True])
    a, b = eager.state_dict(), comp.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0) and lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_factor(s, 100, 10) >= lr_factor(s + 1, 100, 10) for s in range(10, 100))


# -- stage 2 ----------------------------------------------------------------------------------------------------------
def test_stage2_full_trains_the_llm_with_its_own_learning_rate(train_cache, tiny_llm_dir, stage1, tmp_path):
    out = tmp_path / "s2"
    train(config(train_cache, tiny_llm_dir, out, stage=2, init_from=str(stage1), lr_llm=1e-3, lr_projector=5e-4, max_steps=5))
    run = read_run_model(out)
    assert (run.stage, run.llm_mode, run.template) == (2, "full", "v1")
    assert (out / "llm" / "model.safetensors").is_file()
    rows = read_log(out / "train" / "log.jsonl")
    assert rows[0]["lr_llm"] == pytest.approx(2 * rows[0]["lr_projector"])  # separate learning rates, same schedule
    trained = llm_params(out / "llm")
    base = llm_params(tiny_llm_dir)
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    s1 = load_file(str(stage1 / "fuser.safetensors"))
    s2 = load_file(str(out / "fuser.safetensors"))
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)  # started from stage 1, kept training


def test_stage2_lora_saves_an_adapter_that_loads_merged(train_cache, tiny_llm_dir, stage1, tmp_path):
    out = tmp_path / "lora"
    train(config(train_cache, tiny_llm_dir, out, stage=2, init_from=str(stage1), llm_mode="lora", lora_r=4, lr_llm=5e-3, max_steps=4))
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "llm").exists()
    vlm, bundle, _ = load_run(out)
    assert not any("lora" in k for k in bundle.model.state_dict())  # merged into plain weights
    base = llm_params(tiny_llm_dir)
    changed = [k for k, v in bundle.model.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(k.endswith(".weight") for k in changed)


def test_igva_stage1_uniform_then_stage2_allocator_with_instruction_embeddings(train_cache, tiny_llm_dir, tmp_path):
    s1, s2 = tmp_path / "igva1", tmp_path / "igva2"
    opts = {"allocator_dim": 32, "allocator_blocks": 1}
    train(config(train_cache, tiny_llm_dir, s1, stage=1, fuser="igva", fuser_options=opts, categories=["caption"], max_steps=2))
    assert read_run_model(s1).fuser_options["mode"] == "uniform"
    res = train(config(train_cache, tiny_llm_dir, s2, stage=2, fuser="igva", init_from=str(s1), max_steps=2, lr_fuser=1e-3))
    assert res.steps == 2 and read_run_model(s2).fuser_options["mode"] == "allocator"
    a, b = load_file(str(s1 / "fuser.safetensors")), load_file(str(s2 / "fuser.safetensors"))
    assert not torch.equal(a["allocator.head.weight"], b["allocator.head.weight"])  # the allocator trained in stage 2


def test_stage2_needs_a_stage1_run_and_matching_settings(train_cache, tiny_llm_dir, stage1, tmp_path):
    with pytest.raises(TrainError, match="--init-from"):
        train(config(train_cache, tiny_llm_dir, tmp_path / "a", stage=2))
    with pytest.raises(TrainError, match="trained fuser 'concat', not 'mmfuser'"):
        train(config(train_cache, tiny_llm_dir, tmp_path / "b", stage=2, init_from=str(stage1), fuser="mmfuser"))
    with pytest.raises(TrainError, match="keeps the LLM frozen"):
        train(config(train_cache, tiny_llm_dir, tmp_path / "c", stage=1, llm_mode="full"))


# -- data ---------------------------------------------------------------------------------------------------------------
def test_samples_that_do_not_fit_are_recorded_not_dropped_silently(train_cache, tiny_llm_dir, tmp_path):
    cache = FeatureCache(train_cache)
    bundle = load_llm(str(tiny_llm_dir))
    rows = cache.select(split="train")
    lengths = scan_training_set(cache, rows, bundle.tokenizer, TokenSettings("v1", 64, bundle.image_token_id, 10_000, bundle.pad_token_id), progress=False).lengths
    max_length = int(np.sort(lengths)[len(lengths) // 3])  # a third of the samples fit whole
    out = tmp_path / "cut"
    res = train(config(train_cache, tiny_llm_dir, out, stage=1, fuser="single", template="v1", max_length=max_length, max_steps=1))
    skipped = [json.loads(line) for line in (out / "train" / "skipped.jsonl").read_text().splitlines()]
    assert skipped and res.training_samples + len(skipped) == rows.size
    ids = set(cache.sample_ids(rows).tolist())
    assert all(s["id"] in ids and "max_length" in s["reason"] or "truncation" in s["reason"] for s in skipped)
    assert sum(res.skipped.values()) == len(skipped)


def test_existing_run_needs_resume_or_overwrite_and_resume_needs_the_same_settings(train_cache, tiny_llm_dir, tmp_path):
    out = tmp_path / "r"
    cfg = config(train_cache, tiny_llm_dir, out, stage=1, categories=["caption"], max_steps=2)
    train(cfg)
    with pytest.raises(TrainError, match="--resume"):
        train(cfg)
    with pytest.raises(TrainError, match="other settings.*batch_size"):
        train(config(train_cache, tiny_llm_dir, out, stage=1, categories=["caption"], max_steps=2, batch_size=4), resume=True)
    assert train(cfg, resume=True).resumed_from == 2  # finished: nothing to do
    assert train(cfg, overwrite=True).resumed_from == 0


def test_metrics_csv_and_tensorboard(train_cache, tiny_llm_dir, tmp_path):
    out = tmp_path / "tb"
    train(config(train_cache, tiny_llm_dir, out, stage=1, categories=["caption"], max_steps=4, log_every=2, tensorboard=True, workers=1))
    rows = read_log(out / "train" / "log.jsonl")
    assert [r["step"] for r in rows] == [2, 4]
    assert {"loss", "lr_projector", "grad_norm", "samples_per_s", "tokens_per_s", "epoch"} <= set(rows[0])
    csv = (out / "train" / "log.csv").read_text().splitlines()
    assert csv[0].startswith("step,") and len(csv) == 3
    assert list((out / "train" / "tensorboard").glob("events.out.tfevents.*"))


def test_bf16_autocast_and_gradient_checkpointing(train_cache, tiny_llm_dir, stage1, tmp_path):
    ref = tmp_path / "ref"
    train(config(train_cache, tiny_llm_dir, ref, stage=2, init_from=str(stage1), max_steps=3, lr_llm=1e-3))
    ckpt = tmp_path / "ckpt"
    train(config(train_cache, tiny_llm_dir, ckpt, stage=2, init_from=str(stage1), max_steps=3, lr_llm=1e-3, gradient_checkpointing=True))
    np.testing.assert_allclose(losses(ckpt), losses(ref), rtol=1e-5)
    low = tmp_path / "bf16"
    train(config(train_cache, tiny_llm_dir, low, stage=2, init_from=str(stage1), max_steps=3, lr_llm=1e-3, precision="bf16"))
    np.testing.assert_allclose(losses(low), losses(ref), rtol=0.03)


# -- eval and live inference -------------------------------------------------------------------------------------
def test_answer_normalisation_and_scoring(tmp_path):
    assert normalize_answer(" Red. ") == normalize_answer("red") == "red"
    assert normalize_answer("To the  LEFT") == "to the left" and normalize_answer("3") != normalize_answer("8")
    records = [{"id": f"s{i}", "category": c, "question": "q", "reference": ref, "answer": ans, "correct": normalize_answer(ans) == normalize_answer(ref)}
               for i, (c, ref, ans) in enumerate([("colour", "red", "Red"), ("colour", "blue", "red"), ("count", "3", "3"), ("count", "2", "3.")])]
    counts = {"colour": Counter({"red": 2, "blue": 1, "green": 1}), "count": Counter({"3": 3, "2": 1, "1": 1, "4": 1})}
    baseline, chance = majority_baseline(counts), chance_levels(counts)
    assert baseline == {"colour": ("red", 0.5), "count": ("3", 0.5)} and chance == {"colour": 1 / 3, "count": 1 / 4}
    assert chance_levels({"colour": ["red", "red", "blue"], "none": []}) == {"colour": 0.5}  # answers with repeats
    res = _write(tmp_path, records, [], baseline, chance, "m")
    assert res.per_category["colour"] == {"n": 2, "correct": 1, "accuracy": 0.5, "majority": 0.5, "majority_answer": "red", "chance": 1 / 3}
    assert res.per_category["count"]["accuracy"] == 0.5 and res.overall["accuracy"] == 0.5
    lines = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(lines[0]) and lines[1]["text"] == "red"
    md = (tmp_path / "results.md").read_text()
    assert "| accuracy | majority baseline | chance (1 / answers) |" in md and "| colour | 2 | 0.500 | 0.500 | 0.333 |" in md


def test_eval_scores_every_answered_val_sample(train_cache, stage1, tmp_path):
    res = evaluate(EvalConfig(run=str(stage1), split="val", batch_size=4, max_new_tokens=4, out=str(tmp_path / "ev"), workers=1, progress=False))
    cache = FeatureCache(train_cache)
    val = cache.select(split="val")
    assert res.overall["n"] == val.size == sum(v["n"] for v in res.per_category.values())
    assert set(res.per_category) == set(cache.categories[val].tolist())
    answers = [json.loads(x) for x in (tmp_path / "ev" / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["question_id"] for a in answers) == sorted(cache.sample_ids(val).tolist())


def test_live_path_gives_the_logits_of_the_cache_path(train_cache, tiny_llm_dir, tmp_path):
    """infer's path (decode -> processor -> encoder -> fp16 rounding; sentence model on the question) against the
    cached features and embeddings of the same built-in samples: the same model inputs and logits."""
    from layerfuse.pipeline.data import synthetic
    from layerfuse.pipeline.training.infer import LivePipeline, load_image

    out = tmp_path / "live"
    opts = {"allocator_dim": 32, "allocator_blocks": 1, "mode": "allocator"}  # needs the instruction embedding
    train(config(train_cache, tiny_llm_dir, out, stage=1, fuser="igva", fuser_options=opts, max_steps=2, lr_fuser=1e-2))
    pipe = LivePipeline(out)
    cache = FeatureCache(train_cache)
    rows = cache.select(split="val", has_image=True)[:3]
    images, questions = [], []
    for sid, conv in zip(cache.sample_ids(rows), cache.conversations(rows)):
        seed, index = (int(x) for x in str(sid).split("-")[1:])
        path = tmp_path / f"{sid}.png"
        synthetic.render(synthetic.make_scene(seed, index)).save(path)
        images.append(load_image(path))
        questions.append(conv[0]["value"])
    live = pipe.inputs(images, questions)
    cached_layers = cache.features(rows, pipe.vlm.fuser.required_layers).float()
    cached_text = cache.text_embeddings(rows, per_turn=True)[0][:, 0]
    torch.testing.assert_close(live.layers, cached_layers, rtol=0, atol=2e-3)  # at most an fp16 rounding step apart
    assert (live.layers == cached_layers).float().mean() > 0.999
    torch.testing.assert_close(live.text, cached_text, rtol=1e-4, atol=1e-5)
    vlm = pipe.vlm
    from layerfuse.pipeline.models.generate import left_pad

    ids, mask = left_pad(live.prompts, pipe.bundle.pad_token_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = vlm(ids, live.layers, live.text, attention_mask=mask, position_ids=pos).logits
        b = vlm(ids, cached_layers, cached_text, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert len(pipe.answer(images[:1], questions[:1], max_new_tokens=3)) == 1


def test_cli_train_eval_infer(train_cache, tiny_llm_dir, stage1, tmp_path):
    from click.testing import CliRunner
    from layerfuse.pipeline.cli import main
    from layerfuse.pipeline.data import synthetic

    out = tmp_path / "cli"
    args = ["train", "--cache", train_cache, "--llm", str(tiny_llm_dir), "--stage", "1", "--fuser", "mmfuser", "--fuser-opt", "heads=4",
            "--fuser-opt", "points=2", "--categories", "caption", "--max-steps", "2", "--batch-size", "4", "--workers", "0", "--out", str(out), "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "trained" in res.output and read_run_model(out).fuser_options["heads"] == 4
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "--resume" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["train", "--cache", train_cache, "--stage", "2", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--init-from" in res.output
    res = CliRunner().invoke(main, ["eval", "--run", str(stage1), "--limit", "4", "--quiet", "--workers", "0", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0 and "| **overall** |" in res.output, res.output
    synthetic.render(synthetic.make_scene(0, 1)).save(tmp_path / "img.png")
    res = CliRunner().invoke(main, ["infer", "--run", str(stage1), "--image", str(tmp_path / "img.png"), "--question", "Describe it.", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    (tmp_path / "bad.png").write_bytes(b"not an image")
    res = CliRunner().invoke(main, ["infer", "--run", str(stage1), "--image", str(tmp_path / "bad.png"), "--question", "Q?"])
    assert res.exit_code != 0 and "bad.png" in res.output and "Traceback" not in res.output


def test_cli_export_onnx_and_engine_without_tensorrt(stage1, tmp_path):
    from click.testing import CliRunner
    from layerfuse.pipeline.cli import main

    out = tmp_path / "front.onnx"
    res = CliRunner().invoke(main, ["export", "onnx", "--run", str(stage1), "--out", str(out), "--msda", "hybrid", "--check-batches", "1,2"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "OK" in res.output and "onnxruntime-cpu" in res.output
    res = CliRunner().invoke(main, ["export", "onnx", "--run", str(stage1), "--out", str(tmp_path / "enc.onnx"), "--with-encoder", "--check-batches", "1"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["export", "engine", "--onnx", str(out), "--out", str(tmp_path / "x.plan")])
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert res.exit_code != 0 and "TensorRT is not installed" in res.output and "Traceback" not in res.output
    else:  # pragma: no cover - a machine with TensorRT
        pytest.skip("TensorRT is installed: the engine path is exercised by tests/export/test_onnx_export.py")


# -- real processes: kill + resume, DDP, FSDP -------------------------------------------------------------------------
def cli_args(cache: str, llm_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--cache", cache, "--llm", str(llm_dir), "--out", str(out), "--batch-size", "8", "--max-length", "256",
            "--log-every", "1", "--quiet", "--no-tensorboard", "--buffer-rows", "16", *extra]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_continues_exactly(train_cache, tiny_llm_dir, stage1, tmp_path):
    common = ["--stage", "2", "--init-from", str(stage1), "--max-steps", "10", "--save-every", "2", "--workers", "1", "--lr-llm", "1e-3",
              "--llm-mode", "lora", "--lora-r", "4", "--lora-dropout", "0.1"]  # LoRA dropout: the RNG state matters
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(layerfuse_cmd(*cli_args(train_cache, tiny_llm_dir, ref, *common)), check=True, env=run_env(), capture_output=True, timeout=300)
    proc = subprocess.Popen(layerfuse_cmd(*cli_args(train_cache, tiny_llm_dir, killed, *common)), env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "train" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(read_log(log)) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(read_log(log)) < 10
    done = subprocess.run(layerfuse_cmd(*cli_args(train_cache, tiny_llm_dir, killed, *common), "--resume"), env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed at step" in done.stdout
    assert [r["step"] for r in read_log(log)] == list(range(1, 11))  # every step logged once
    assert losses(killed) == losses(ref)  # bit for bit
    for name in ("fuser.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(ref / name)), load_file(str(killed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_loss_curve(train_cache, tiny_llm_dir, stage1, tmp_path, mode):
    """The same global batch on 2 gloo ranks (DDP, or FSDP sharding the LLM) as on one process: same losses."""
    common = ["--stage", "2", "--init-from", str(stage1), "--max-steps", "5", "--workers", "1", "--lr-llm", "1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(layerfuse_cmd(*cli_args(train_cache, tiny_llm_dir, one, *common)), check=True, env=run_env(), capture_output=True, timeout=300)
    extra = ["--fsdp"] if mode == "fsdp" else []
    res = subprocess.run(torchrun_cmd(*cli_args(train_cache, tiny_llm_dir, two, *common, *extra)), env=run_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4)
    a, b = load_file(str(one / "fuser.safetensors")), load_file(str(two / "fuser.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
    la, lb = llm_params(one / "llm"), llm_params(two / "llm")
    for k in la:
        torch.testing.assert_close(lb[k], la[k], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_training_benchmark_script_writes_its_section(tmp_path):
    """bench/train.py --quick runs all three feeding modes end to end and replaces only its own section."""
    out = tmp_path / "BENCH.md"
    out.write_text("# layerfuse benchmarks\n\n## Other (`x`)\n\nkeep me\n")
    script = REPO / "bench" / "train.py"
    for _ in range(2):
        done = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600,
                              env=run_env())
        assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "keep me" in text and text.count("## Training from the cache (`bench/train.py`)") == 1
    assert "| tiny default CLIP (24 blocks, 65x64) | 8 |" in text


def test_training_profile_benchmark_writes_its_section_and_restores_each_candidate(tmp_path):
    """bench/train_profile.py --quick profiles both stages and times candidates from the same weights: the step run
    again in the next round gives the same losses (each candidate's optimizer state is a copy, not shared tensors)."""
    out = tmp_path / "BENCH.md"
    script = REPO / "bench" / "train_profile.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--rounds", "2", "--candidates", "current,AdamW foreach", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=run_env())
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.count("## Where make train's time goes (`bench/train_profile.py`)") == 1
    assert "| forward | backward | clip_grad | optimizer | loader wait |" in text
    for stage in (1, 2):
        assert f"| {stage} | current |" in text and f"| {stage} | AdamW foreach |" in text
    assert text.count("the same step again: 0.00e+00") == 2
