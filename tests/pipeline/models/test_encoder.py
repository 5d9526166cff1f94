"""Vision towers through the real loading path: CLIP (vision-only and full), SigLIP, offline hub ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from layerfuse.core.hub import CheckpointError
from layerfuse.pipeline.cache.extract import run_extract
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.models.encoder import ImagePreprocessor, VisionEncoder, _output_shape, load_vision_encoder
from layerfuse.pipeline.models.text import InstructionEmbedder
from PIL import Image

from tests.support import extract_config


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("siglip")
    cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(1)
    transformers.SiglipVisionModel(cfg).save_pretrained(d)
    proc_cls = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    proc_cls(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def test_siglip_has_no_cls_and_keeps_every_token(siglip_dir, tmp_path):
    enc = load_vision_encoder(str(siglip_dir))
    assert enc.info.has_cls is False and enc.info.num_tokens == 16 and enc.info.num_layers == 3 and enc.info.grid == (4, 4)
    out = tmp_path / "c"
    run_extract(extract_config(str(out), siglip_dir, builtin=4, shard_samples=4, dtype="float32"))
    cache = FeatureCache(out)
    assert cache.num_tokens == 16 and not cache.has_cls and cache.num_layers == 4
    ref_model = transformers.SiglipVisionModel.from_pretrained(siglip_dir).eval()
    from layerfuse.pipeline.data.access import load_image
    from layerfuse.pipeline.data.synthetic import synthetic_plan

    recs = synthetic_plan(4, 3).records
    pix = torch.from_numpy(np.stack([enc.preprocessor(False)(load_image(r, max_pixels=10**8)) for r in recs]))
    with torch.no_grad():
        hs = ref_model(pixel_values=pix, output_hidden_states=True).hidden_states
    assert torch.equal(cache.features(slice(None), [0, 3]), torch.stack([hs[0], hs[3]], 1))


def test_output_shape_on_meta_equals_a_real_forward_and_falls_back(siglip_dir, monkeypatch):
    """load_vision_encoder reads the tower's output shape without arithmetic (meta device), the shape of a real forward;
    a tower whose code fails on meta tensors is measured with a real forward instead."""
    model = transformers.SiglipVisionModel.from_pretrained(siglip_dir).eval()
    real = tuple(VisionEncoder(model, None, None)(torch.zeros(1, 3, 32, 32)).shape)
    assert _output_shape(model, 32) == real == (1, 4, 16, 32)
    calls = []
    real_forward = VisionEncoder.forward

    def forward(self, x):
        calls.append(x.device.type)
        if x.is_meta:
            raise NotImplementedError("this op has no meta kernel")
        return real_forward(self, x)

    monkeypatch.setattr(VisionEncoder, "forward", forward)
    assert _output_shape(model, 32) == real and calls == ["meta", "cpu"]


def test_full_clip_checkpoint_loads_its_vision_tower(tmp_path):
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16)
    txt = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    cfg = transformers.CLIPConfig(vision_config=vis, text_config=txt, projection_dim=16)
    torch.manual_seed(0)
    full = transformers.CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = load_vision_encoder(str(tmp_path))
    assert enc.info.model_type == "clip" and enc.info.has_cls and enc.info.num_tokens == 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
    assert torch.equal(enc(x), torch.stack(ref, 1))
    # hs[0] is after pre_layrnorm, hs[L] before post_layernorm (docs/methods.md#layer-indexing-and-presets)
    with torch.no_grad():
        emb = full.vision_model.pre_layrnorm(full.vision_model.embeddings(x))
    assert torch.allclose(enc(x)[:, 0], emb)


def test_pad_to_square_uses_processor_mean():
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    pre = ImagePreprocessor(proc, pad_to_square=True)
    assert pre.fill == (123, 117, 104)  # round(255 * OPENAI_CLIP_MEAN)
    img = Image.new("RGB", (8, 2), (255, 255, 255))
    x = pre(img)
    assert x.shape == (3, 8, 8)
    # the padded rows normalise to ~0 (the mean colour), the image rows to white
    assert abs(x[:, 0].mean()) < 0.02 and x[:, 4].mean() > 1.5


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"openai/clip-vit-large-patch14-336.*hf download .* --local-dir"):
        load_vision_encoder("openai/clip-vit-large-patch14-336")
    with pytest.raises(CheckpointError, match="sentence-transformers/all-mpnet-base-v2"):
        InstructionEmbedder("sentence-transformers/all-mpnet-base-v2")
    with pytest.raises(CheckpointError, match="no such directory"):
        load_vision_encoder("./no/such/dir")
