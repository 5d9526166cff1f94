"""Export a trained `single` / `concat` model as a standard transformers LLaVA checkpoint.

transformers' `LlavaForConditionalGeneration` selects `vision_feature_layer` (an int, or a list whose hidden
states it concatenates on channels), drops CLS with `vision_feature_select_strategy="default"` and projects with
`linear_1 -> GELU -> linear_2`: exactly layerfuse's `single` and `concat` fusers
(docs/methods.md#baseline-and-external-direct) when every term is one layer and the projector is the 2-layer MLP.
Everything else (group means, STI, MMFuser, IGVA, the internal fusers, a 1-layer projector) has no LLaVA equivalent
and is refused with the reason; `export_run` writes those as a `layerfuse_vlm` checkpoint instead (hf_model.py).

    export_llava(vlm, vision_dir, out_dir, tokenizer=tok)
    LlavaForConditionalGeneration.from_pretrained(out_dir)   # same logits as vlm on the same image and ids
    export_run(run_dir, out_dir)                             # `layerfuse export hf`: LLaVA where it can, else layerfuse_vlm
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import transformers

from layerfuse.core.config import check_choice
from layerfuse.fusion.vlm import VisionLanguageModel
from layerfuse.pipeline.models.encoder import load_vision_encoder
from layerfuse.pipeline.models.run import load_run

from .hf_model import HFExportError, assign_weights, write_layerfuse_vlm

HFFormat = Literal["auto", "llava", "layerfuse"]  # auto: llava where the model is expressible in it, else layerfuse


def llava_feature_layer(vlm: VisionLanguageModel) -> int | list[int]:
    """`vision_feature_layer` for this model, or HFExportError saying why LLaVA cannot express it."""
    fuser = vlm.fuser
    if fuser.name not in ("single", "concat"):
        raise HFExportError(
            f"fuser {fuser.name!r} has no transformers LLaVA equivalent; only 'single' and 'concat' "
            "(a channel concat of single layers) export to LlavaForConditionalGeneration"
        )
    if fuser.selection.has_groups:
        raise HFExportError(
            f"{fuser.name} uses group means ({fuser.selection.describe()}); LLaVA's vision_feature_layer "
            "can only select single layers"
        )
    if fuser.config.projector_depth != 2:
        raise HFExportError("LLaVA's projector is Linear -> GELU -> Linear; a projector_depth of 1 cannot be expressed")
    layers = [t[0] for t in fuser.selection.terms]
    return layers[0] if fuser.name == "single" else layers


def llava_config(vlm: VisionLanguageModel, vision_config: Any) -> transformers.LlavaConfig:
    fuser = vlm.fuser
    text_config = vlm.llm.config
    return transformers.LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=vlm.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if fuser.vision.has_cls else "full",
        vision_feature_layer=llava_feature_layer(vlm),
        image_seq_length=fuser.num_visual_tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def llava_state_dict(vlm: VisionLanguageModel, vision_tower: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under LlavaForConditionalGeneration's names (transformers >= 4.52 layout)."""
    state: dict[str, torch.Tensor] = {}
    parts = {
        "model.vision_tower.": vision_tower,
        "model.multi_modal_projector.": vlm.fuser.projector,
        "model.language_model.": vlm.llm.get_decoder(),
        "lm_head.": vlm.llm.get_output_embeddings(),
    }
    for prefix, module in parts.items():
        for key, value in module.state_dict().items():
            state[prefix + key] = value.detach()
    return state


def export_llava(
    vlm: VisionLanguageModel,
    vision_dir: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    image_processor: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `vlm` (a `single`/`concat` model) and the vision tower in `vision_dir` as a LLaVA checkpoint.

    Saves the model (safetensors), the image processor and, when a tokenizer is given, the tokenizer and a
    LlavaProcessor. Every weight of the LLaVA model comes from ours: a missing or unexpected key is an error.
    """
    llava_feature_layer(vlm)  # refuse early, before loading anything
    encoder = load_vision_encoder(str(vision_dir))
    vision_tower = encoder.model
    vision_config = vision_tower.config
    if encoder.info.num_layers != vlm.fuser.vision.num_layers or encoder.info.hidden_size != vlm.fuser.vision.hidden_size:
        raise HFExportError(
            f"the vision tower in {vision_dir} ({encoder.info.num_layers} blocks, width {encoder.info.hidden_size}) is not "
            f"the one the fuser was trained on ({vlm.fuser.vision.num_layers} blocks, width {vlm.fuser.vision.hidden_size})"
        )
    config = llava_config(vlm, vision_config)
    with torch.device("meta"):
        hf = transformers.LlavaForConditionalGeneration(config)
    state = llava_state_dict(vlm, vision_tower)
    assign_weights(hf, state, tied_head="lm_head.weight" if config.tie_word_embeddings else None, target="LlavaForConditionalGeneration")
    if dtype is not None:
        hf = hf.to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    processor = image_processor or encoder.processor
    processor.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        patch = int(getattr(vision_config, "patch_size", 0) or 0)
        transformers.LlavaProcessor(
            image_processor=processor,
            tokenizer=tokenizer,
            patch_size=patch or None,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=int(vlm.fuser.vision.has_cls),
        ).save_pretrained(out)
    return out


def llava_refusal(vlm: VisionLanguageModel) -> str | None:
    """Why `vlm` cannot be a LLaVA checkpoint, or None when it can."""
    try:
        llava_feature_layer(vlm)
    except HFExportError as e:
        return str(e)
    return None


def export_run(run_dir: str | Path, out_dir: str | Path, *, format: HFFormat = "auto", dtype: torch.dtype | None = None) -> tuple[Path, str]:
    """Write a trained run as a transformers checkpoint; returns (out_dir, the format written: "llava" | "layerfuse").

    "llava": the stock `LlavaForConditionalGeneration` (single / concat of single layers, 2-layer projector; anything
    else is refused). "layerfuse": the `layerfuse_vlm` class (any fuser; loading needs `import layerfuse.export`).
    "auto": llava where it can, else layerfuse.
    """
    check_choice(format, HFFormat, "--format", HFExportError)
    vlm, bundle, run = load_run(run_dir)
    reason = llava_refusal(vlm)
    if format == "llava" and reason is not None:
        raise HFExportError(f"{reason}; export it with --format layerfuse")
    if format == "layerfuse" or reason is not None:
        return write_layerfuse_vlm(vlm, bundle, run, out_dir, dtype=dtype, source=str(run_dir)), "layerfuse"
    return export_llava(vlm, run.encoder_path(str(run_dir)), out_dir, tokenizer=bundle.tokenizer, dtype=dtype), "llava"
