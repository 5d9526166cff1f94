"""The `layerfuse_vlm` transformers checkpoint (issue 17): every registered fuser's run exported with
`export_layerfuse_vlm`, loaded with `AutoModelForImageTextToText.from_pretrained` (no trust_remote_code) and
`AutoProcessor`, gives the logits of the run's live inference path (pipeline/training/infer.py: `LivePipeline`) and
the same greedy answer through `generate()`. Run folders are written with `save_run_model` around a tiny 4-layer
Llama and the session's tiny default-architecture CLIP tower, fuser weights moved off their init."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from layerfuse.export.hf_model import (
    MODEL_TYPE,
    SENTENCE_MODEL_DIR,
    LayerfuseVLMForConditionalGeneration,
    LayerfuseVLMProcessor,
    export_layerfuse_vlm,
)
from layerfuse.fusion import VisionSpec, list_fusers
from layerfuse.pipeline.cli import main as cli
from layerfuse.pipeline.models.generate import greedy_generate, left_pad
from layerfuse.pipeline.models.llm import DefaultLLMConfig, build_default_llm, load_llm
from layerfuse.pipeline.models.run import RunModel, build_vlm, save_run_model
from layerfuse.pipeline.models.text import DEFAULT_SUFFIXES, DEFAULT_TEXT_MODEL, resolve_text_model
from layerfuse.pipeline.training.infer import LivePipeline
from PIL import Image, ImageDraw

# the session tower (tests/conftest.py vision_dir): 24 blocks, width 64, 8x8 patches + CLS; MiniLM's 384-d sentences
VISION = VisionSpec(num_layers=24, hidden_size=64, grid=(8, 8), has_cls=True, text_dim=384)
OPTIONS = {
    "single": {},
    "concat": {"layers": "3-18-23"},
    "sti": {"layers": "8-16", "pool": 2},
    "mmfuser": {"heads": 4, "points": 2},
    "igva": {"allocator_dim": 32, "allocator_blocks": 2},
    "inject": {"layers": "3-18-23"},
    "xattn": {"layers": "3-18-23"},
    "tgif": {"router_dim": 16},  # router=llm: the prompt's mean LLM token embedding
    "tgif-sentence": {"router": "sentence", "router_dim": 16},
    "tokenpacker": {"heads": 4},
    "deepstack": {},  # 3 mergers into LLM layers 1, 2, 3
}
FUSER_OF = {"tgif-sentence": "tgif"}
CASES = list(OPTIONS)
QUESTIONS = ["What colour is the circle?", "How many squares are there? Answer the question using a single word or phrase."]


def test_every_registered_fuser_is_covered():
    assert {FUSER_OF.get(c, c) for c in CASES} == set(list_fusers())


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    """A tiny default-style Llama with 4 decoder layers (deepstack feeds layers 1-3), width 32, its BPE tokenizer."""
    cfg = DefaultLLMConfig(hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1, intermediate_size=64, corpus_seeds=(0,), corpus_samples=300)
    return build_default_llm(tmp_path_factory.mktemp("llm") / "tiny4", cfg)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    out = []
    for i, (w, h) in enumerate([(120, 80), (64, 96)]):  # not square: pad_to_square matters
        im = Image.new("RGB", (w, h), (30 + 90 * i, 200, 60))
        ImageDraw.Draw(im).ellipse([10, 10, 50, 50], fill=(250, 20 * i, 40))
        out.append(im)
    return out


def write_run(root: Path, case: str, llm_dir: Path, vision_dir: Path, llm_mode: str = "frozen") -> Path:
    """A run folder as `layerfuse train` leaves it, fuser weights moved off their init (zero gates, LayerScale and
    router outputs would hide a wrong wiring)."""
    bundle = load_llm(str(llm_dir))
    model = RunModel(
        fuser=FUSER_OF.get(case, case), fuser_options=dict(OPTIONS[case]), llm=str(llm_dir), vision=asdict(VISION),
        image_token_id=bundle.image_token_id, template="v1", max_length=512, stage=1, llm_mode=llm_mode,  # type: ignore[arg-type]
        feature_dtype="float16", encoder={"path": str(vision_dir), "revision": None, "pad_to_square": True},
        text_model={"path": resolve_text_model(DEFAULT_TEXT_MODEL), "suffixes": list(DEFAULT_SUFFIXES)},
    )
    torch.manual_seed(0)
    vlm = build_vlm(model, bundle)
    if llm_mode == "lora":  # as apply_llm_mode: the fuser re-attached to the PEFT model
        vlm.fuser.detach()
        vlm.llm = get_peft_model(vlm.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        vlm.fuser.attach(vlm.llm)
    with torch.no_grad():
        for p in vlm.fuser.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if llm_mode == "full":  # the trained LLM must be the one exported, not the base
            vlm.llm.get_input_embeddings().weight.add_(0.5)
        for n, p in vlm.llm.named_parameters():
            if "lora_B" in n:  # zero at init: the adapter would change nothing
                p.add_(torch.randn_like(p) * 0.5)
    save_run_model(root / case, model, vlm, bundle)
    return root / case


@pytest.fixture(scope="module")
def exported(tmp_path_factory, llm_dir, vision_dir):
    """case -> (run folder, exported folder), written once per module."""
    root = tmp_path_factory.mktemp("hf_model")
    done: dict[str, tuple[Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in done:
            run = write_run(root / "runs", case, llm_dir, vision_dir)
            done[case] = (run, export_layerfuse_vlm(run, root / "hf" / case))
        return done[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_auto_classes_load_with_the_runs_logits_and_answer(exported, images, case):
    run, out = exported(case)
    model = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert isinstance(model, LayerfuseVLMForConditionalGeneration) and isinstance(processor, LayerfuseVLMProcessor)
    assert model.config.model_type == MODEL_TYPE and model.vlm.fuser.name == FUSER_OF.get(case, case)
    live = LivePipeline(run)
    x = live.inputs(images, QUESTIONS)
    inputs = processor(images=images, text=QUESTIONS)
    ids, mask = left_pad(x.prompts, live.bundle.pad_token_id)
    torch.testing.assert_close(inputs["input_ids"], ids, rtol=0, atol=0)  # the run's template, left-padded
    assert ("text_embeds" in inputs) == live.vlm.fuser.needs_text
    if live.vlm.fuser.needs_text:
        torch.testing.assert_close(inputs["text_embeds"], x.text, rtol=1e-5, atol=1e-6)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(**inputs, position_ids=position_ids).logits
        theirs = live.vlm(ids, x.layers, x.text, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # generate(): the greedy tokens `layerfuse infer` decodes, for the left-padded batch (positions from the mask)
    banned = [model.config.image_token_id, processor.tokenizer.eos_token_id]  # 5 tokens from both, whatever they are
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=5, do_sample=False, suppress_tokens=banned)
    expected = greedy_generate(live.vlm, x.prompts, x.layers, x.text, pad_id=live.bundle.pad_token_id, eos_id=-1,
                               max_new_tokens=5, suppress=banned)
    assert [len(e) for e in expected] == [5, 5]
    assert gen[:, inputs["input_ids"].shape[1]:].tolist() == expected


def test_internal_fusers_are_attached_after_loading(exported):
    _, out = exported("deepstack")
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    fuser = model.vlm.fuser
    assert fuser._handles and len(fuser._handles) == len(set(fuser.llm_layer_of))


def test_sentence_model_and_processor_files_are_saved(exported):
    for case, needs in (("igva", True), ("single", False)):
        _, out = exported(case)
        assert (out / SENTENCE_MODEL_DIR).is_dir() == needs
        assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<image>") == transformers.AutoConfig.from_pretrained(out).image_token_id
        assert type(transformers.AutoImageProcessor.from_pretrained(out)).__name__.startswith("CLIPImageProcessor")


def test_text_only_prompt_and_missing_text_embeds(exported, images):
    _, out = exported("igva")
    model = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    inputs = processor(images=images[:1], text=QUESTIONS[:1])
    with pytest.raises(ValueError, match="text_embeds"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="without pixel_values"):
        model(input_ids=inputs["input_ids"])
    text_only = processor(text=QUESTIONS[:1])
    assert "pixel_values" not in text_only and not (text_only["input_ids"] == model.config.image_token_id).any()
    with torch.no_grad():
        model.generate(**text_only, max_new_tokens=2)


@pytest.mark.parametrize("llm_mode", ["full", "lora"])
def test_trained_llm_is_exported(tmp_path, llm_dir, vision_dir, images, llm_mode):
    """A run that trained the LLM (llm/, or adapter/ merged into the base by load_run): its LLM, not the base."""
    run = write_run(tmp_path / "runs", "inject", llm_dir, vision_dir, llm_mode=llm_mode)
    assert (run / ("llm" if llm_mode == "full" else "adapter")).is_dir()
    out = export_layerfuse_vlm(run, tmp_path / "hf")
    model = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    live = LivePipeline(run)
    x = live.inputs(images[:1], QUESTIONS[:1])
    inputs = transformers.AutoProcessor.from_pretrained(out)(images=images[:1], text=QUESTIONS[:1])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, live.vlm(x.prompts[0].input_ids[None], x.layers).logits, rtol=1e-5, atol=1e-5)


def test_cli_export_hf_picks_the_format(exported, tmp_path):
    runner = CliRunner()
    run, _ = exported("single")
    res = runner.invoke(cli, ["export", "hf", "--run", str(run), "--out", str(tmp_path / "llava")])
    assert res.exit_code == 0, res.output
    assert transformers.AutoConfig.from_pretrained(tmp_path / "llava").model_type == "llava"
    res = runner.invoke(cli, ["export", "hf", "--run", str(run), "--out", str(tmp_path / "native"), "--format", "layerfuse"])
    assert res.exit_code == 0, res.output
    assert transformers.AutoConfig.from_pretrained(tmp_path / "native").model_type == MODEL_TYPE
    run, _ = exported("mmfuser")
    res = runner.invoke(cli, ["export", "hf", "--run", str(run), "--out", str(tmp_path / "mm")])
    assert res.exit_code == 0, res.output
    assert transformers.AutoConfig.from_pretrained(tmp_path / "mm").model_type == MODEL_TYPE
    res = runner.invoke(cli, ["export", "hf", "--run", str(run), "--out", str(tmp_path / "x"), "--format", "llava"])
    assert res.exit_code == 1 and "no transformers LLaVA equivalent" in res.output


def test_tied_word_embeddings(tmp_path, llm_dir, vision_dir, images):
    """An LLM whose lm_head is its input embedding (Qwen2-0.5B, Llama-3.2-1B): saved once, tied again on loading."""
    tied = tmp_path / "tied"
    llm = transformers.AutoModelForCausalLM.from_pretrained(llm_dir)
    llm.config.tie_word_embeddings = True
    llm.lm_head.weight = llm.get_input_embeddings().weight
    llm.save_pretrained(tied)
    transformers.AutoTokenizer.from_pretrained(llm_dir).save_pretrained(tied)
    run = write_run(tmp_path / "runs", "xattn", tied, vision_dir)
    out = export_layerfuse_vlm(run, tmp_path / "hf")
    model = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    live = LivePipeline(run)
    x = live.inputs(images[:1], QUESTIONS[:1])
    inputs = transformers.AutoProcessor.from_pretrained(out)(images=images[:1], text=QUESTIONS[:1])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, live.vlm(x.prompts[0].input_ids[None], x.layers).logits, rtol=1e-5, atol=1e-5)
