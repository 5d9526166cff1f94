"""Parity with transformers' LLaVA (docs/methods.md#baseline-and-external-direct): `single`/`concat` + projector give
the visual embeddings of `LlavaForConditionalGeneration` with `vision_feature_layer` int or list, and
`layerfuse.export.hf` writes a model that `from_pretrained` loads with the same logits. Tiny CLIP (with CLS) and SigLIP (without) towers, both loaded
through `load_vision_encoder`, the real loading path."""

from __future__ import annotations

import pytest
import torch
import transformers
from layerfuse.export.hf import HFExportError, export_llava, llava_feature_layer
from layerfuse.fusion import LLMSpec, VisionLanguageModel, VisionSpec, build_fuser
from layerfuse.pipeline.models.encoder import load_vision_encoder
from PIL import Image

IMAGE_TOKEN_ID = 4  # `<image>` in the default tokenizer (special tokens <unk> <s> </s> <pad> <image>)


@pytest.fixture(scope="module")
def towers(tmp_path_factory, vision_dir):
    """name -> (VisionEncoder, its folder): the default 24-block CLIP, and a 6-block SigLIP without CLS."""
    siglip_dir = tmp_path_factory.mktemp("siglip")
    cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    transformers.SiglipVisionModel(cfg).save_pretrained(siglip_dir)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(siglip_dir)
    return {name: (load_vision_encoder(str(d)), d) for name, d in (("clip", vision_dir), ("siglip", siglip_dir))}


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llm")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def make_vlm(encoder, llm_dir, name: str, layers: str) -> VisionLanguageModel:
    info = encoder.info
    vision = VisionSpec(info.num_layers, info.hidden_size, info.grid, info.has_cls)
    llm = transformers.AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    torch.manual_seed(2)
    fuser = build_fuser(name, vision, LLMSpec.from_config(llm.config), layers=layers)
    for p in fuser.projector.parameters():  # not the default init: any mix-up of weights would show
        p.data.normal_(0, 0.2)
    return VisionLanguageModel(fuser, llm, IMAGE_TOKEN_ID).eval()


def pixels(encoder, b: int = 2) -> torch.Tensor:
    size = encoder.model.config.image_size
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(3))


CASES = [
    ("clip", "single", "-2", 23),
    ("clip", "single", "3,", 3),
    ("clip", "concat", "3-18-23", [3, 18, 23]),
    ("clip", "concat", "1,3,-2", [1, 3, 23]),
    ("siglip", "single", "-2", 5),
    ("siglip", "concat", "3-18-23", [1, 4, 5]),  # scaled to 6 blocks
]


@pytest.mark.parametrize("tower, name, layers, hf_layer", CASES)
def test_visual_embeddings_equal_llava_get_image_features(towers, llm_dir, tower, name, layers, hf_layer):
    encoder, _ = towers[tower]
    vlm = make_vlm(encoder, llm_dir, name, layers)
    assert llava_feature_layer(vlm) == hf_layer
    strategy = "default" if encoder.info.has_cls else "full"
    config = transformers.LlavaConfig(
        vision_config=encoder.model.config.to_dict(), text_config=vlm.llm.config.to_dict(), image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=hf_layer, vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
    )
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    hf.model.vision_tower.load_state_dict(encoder.model.state_dict())
    hf.model.multi_modal_projector.load_state_dict(vlm.fuser.projector.state_dict())
    px = pixels(encoder)
    with torch.no_grad():
        theirs = torch.stack(hf.get_image_features(px, vision_feature_layer=hf_layer, vision_feature_select_strategy=strategy).pooler_output)
        ours = vlm.fuser(encoder(px)[:, vlm.fuser.required_layers]).tokens
    assert ours.shape == theirs.shape == (2, encoder.info.grid[0] * encoder.info.grid[1], 48)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tower, name, layers, hf_layer", [CASES[0], CASES[2], CASES[5]])
def test_export_round_trip_same_logits(towers, llm_dir, tmp_path, tower, name, layers, hf_layer):
    from layerfuse.pipeline.models.llm import train_default_tokenizer

    encoder, folder = towers[tower]
    vlm = make_vlm(encoder, llm_dir, name, layers)
    tokenizer = train_default_tokenizer()
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    out = export_llava(vlm, folder, tmp_path / "llava", tokenizer=tokenizer)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert hf.config.vision_feature_layer == hf_layer
    n = vlm.fuser.num_visual_tokens
    ids = torch.tensor([[1, 7, *[IMAGE_TOKEN_ID] * n, 9, 11, 13], [1, 8, *[IMAGE_TOKEN_ID] * n, 10, 12, 14]])
    px = pixels(encoder)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=px).logits
        ours = vlm(ids, encoder(px)[:, vlm.fuser.required_layers]).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the saved processor expands <image> to exactly the fuser's number of visual tokens
    processor = transformers.AutoProcessor.from_pretrained(out)
    size = encoder.model.config.image_size
    enc = processor(images=Image.new("RGB", (size, size)), text="<image>\nWhat colour is the circle?", return_tensors="pt")
    assert int((enc["input_ids"] == IMAGE_TOKEN_ID).sum()) == n


@pytest.mark.parametrize(
    "name, options, msg",
    [
        ("mmfuser", {"heads": 4}, "no transformers LLaVA equivalent"),
        ("sti", {}, "no transformers LLaVA equivalent"),
        ("concat", {"layers": "former"}, "group means"),
        ("single", {"projector_depth": 1}, "projector_depth of 1"),
    ],
)
def test_unrepresentable_models_are_refused(towers, llm_dir, tmp_path, name, options, msg):
    encoder, folder = towers["clip"]
    info = encoder.info
    llm = transformers.AutoModelForCausalLM.from_pretrained(llm_dir)
    fuser = build_fuser(name, VisionSpec(info.num_layers, info.hidden_size, info.grid, info.has_cls), LLMSpec.from_config(llm.config), **options)
    with pytest.raises(HFExportError, match=msg):
        export_llava(VisionLanguageModel(fuser, llm, IMAGE_TOKEN_ID), folder, tmp_path / "x")
    assert not (tmp_path / "x").exists()
