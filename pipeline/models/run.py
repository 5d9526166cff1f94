"""A trained run's model: what it is (`RunModel`), how it is stored, and how it is rebuilt.

A run folder holds (see README "Phase two"):

    config.json         RunModel: fuser + options, base LLM, how text was tokenised, how features were made
    fuser.safetensors   every fuser parameter (projectors included)
    llm/                the LLM and tokenizer (save_pretrained), when the run trained the LLM fully
    adapter/            the LoRA adapter (peft), when the run trained LoRA
    train/              training state, logs, checkpoints (pipeline/training/train.py)

`load_run` rebuilds the VisionLanguageModel from the folder alone: no cache, no original data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from pydantic import with_config
from safetensors.torch import load_file, save_file

from layerfuse.core.atomic import fresh_temp_dir, publish_dir, read_json, replacing, write_json
from layerfuse.core.config import STRICT, read_config
from layerfuse.core.errors import MissingError, StateError
from layerfuse.core.hub import load_pretrained
from layerfuse.fusion import Fuser, FuserBuildError, LLMSpec, VisionLanguageModel, VisionSpec, build_fuser, fuser_class, fuser_config
from layerfuse.pipeline.data.conversation import Template
from layerfuse.pipeline.models.encoder import VisionEncoder, load_vision_encoder
from layerfuse.pipeline.models.llm import LLMBundle, load_llm

CONFIG = "config.json"
FUSER_WEIGHTS = "fuser.safetensors"
LLM_DIR = "llm"
ADAPTER_DIR = "adapter"
LLMMode = Literal["frozen", "full", "lora"]  # what a run does to the LLM: nothing, train it all, train a LoRA adapter
Stage = Literal[1, 2]  # phase two: 1 trains fuser + projector (LLM frozen), 2 also the LLM


@with_config(STRICT)
@dataclass
class RunModel:
    """Everything needed to rebuild and use the model of a run."""

    fuser: str
    fuser_options: dict[str, Any]  # fields of the fuser's config dataclass (layers included)
    llm: str  # the base LLM: hub id or folder (the embedded default is resolved to its folder)
    vision: dict[str, Any]  # VisionSpec as a dict
    image_token_id: int
    template: Template  # conversation template the run was trained with
    max_length: int
    stage: Stage
    llm_mode: LLMMode  # what the run did to the LLM
    feature_dtype: str = "float32"  # the dtype the cache returned (float16 for int8/float8 caches): live features are rounded to it
    encoder: dict[str, Any] = field(default_factory=dict)  # {"path", "revision", "pad_to_square"}: live inference
    text_model: dict[str, Any] = field(default_factory=dict)  # {"path", "suffixes"}: live instruction embeddings
    cache: str = ""  # the cache the run was trained on

    def vision_spec(self) -> VisionSpec:
        v = dict(self.vision)
        v["grid"] = tuple(v["grid"])
        return VisionSpec(**v)

    def encoder_path(self, source: str) -> str:
        """The vision tower the run recorded (for live inference and exports); `source` names the run in the error."""
        if not self.encoder.get("path"):
            raise StateError(f"run {source} does not record its vision encoder (retrain with this layerfuse version)")
        return str(self.encoder["path"])

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "run config") -> "RunModel":
        """A run's saved model record; an unknown or missing key, a wrong type or mode is a StateError naming `where`."""
        return read_config(cls, d, where=where, error=StateError)


def load_run_encoder(model: RunModel, source: str, *, device: str | torch.device = "cpu") -> VisionEncoder:
    """The run's recorded vision tower, loaded and checked against the features the run was trained on
    ((layers, hidden size, grid, CLS) of its cache); `source` names the run in errors."""
    path = model.encoder_path(source)
    encoder = load_vision_encoder(path, revision=model.encoder.get("revision"), device=device)
    info, spec = encoder.info, model.vision_spec()
    got = (info.num_layers, info.hidden_size, tuple(info.grid), info.has_cls)
    want = (spec.num_layers, spec.hidden_size, tuple(spec.grid), spec.has_cls)
    if got != want:
        raise StateError(f"the vision tower at {path} gives (layers, hidden, grid, CLS) = {got}; run {source} was trained on {want}")
    return encoder


def build_vlm(model: RunModel, bundle: LLMBundle) -> VisionLanguageModel:
    """The fuser built from the registry for this LLM, on the LLM's device, attached to it."""
    cfg = fuser_config(model.fuser, **model.fuser_options)
    fuser = build_fuser(model.fuser, model.vision_spec(), LLMSpec.from_config(bundle.model.config), config=cfg)
    fuser.to(next(bundle.model.parameters()).device)
    return VisionLanguageModel(fuser, bundle.model, bundle.image_token_id)


def save_run_model(run_dir: str | Path, model: RunModel, vlm: VisionLanguageModel, bundle: LLMBundle,
                   fuser_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json, fuser.safetensors and llm/ (full) or adapter/ (LoRA).

    Every file is written under a temporary name and renamed, so a kill never leaves a torn model; config.json
    comes last and marks the folder complete. `fuser_state` overrides the fuser's own state_dict (FSDP runs pass
    the gathered full state)."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    model.fuser_options = vlm.fuser.config.options()
    state = fuser_state if fuser_state is not None else vlm.fuser.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with replacing(run / FUSER_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"fuser": model.fuser})
    if model.llm_mode in ("full", "lora"):
        target = run / (ADAPTER_DIR if model.llm_mode == "lora" else LLM_DIR)
        staging = fresh_temp_dir(target)
        vlm.llm.save_pretrained(staging)
        bundle.tokenizer.save_pretrained(staging)
        publish_dir(staging, target, replace=True)
    write_json(run / CONFIG, asdict(model), indent=1, default=str)


def read_run_model(run_dir: str | Path) -> RunModel:
    path = Path(run_dir) / CONFIG
    missing = MissingError(f"'{run_dir}' is not a finished layerfuse run: {CONFIG} is missing (pass the --out folder of a finished `layerfuse train`)")
    saved = read_json(path, missing=missing, error=StateError)
    model = RunModel.from_dict(saved, where=str(path))
    if "group_mode" in _option_names(model.fuser) and "group_mode" not in model.fuser_options:
        # written before internal fusers had group_mode: they fused every layer group as its mean (one projector)
        model.fuser_options = {**model.fuser_options, "group_mode": "mean"}
    return model


def _option_names(fuser: str) -> set[str]:
    try:
        return {f.name for f in dataclasses.fields(fuser_class(fuser).config_class)}
    except FuserBuildError:
        return set()  # an unknown fuser: building it names the problem


def load_run_llm(run_dir: str | Path, model: RunModel, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 merge_adapter: bool = True) -> LLMBundle:
    """The run's LLM: its trained copy (llm/), or the base LLM with its LoRA adapter (adapter/) merged in."""
    run = Path(run_dir)
    source = str(run / LLM_DIR) if (run / LLM_DIR).is_dir() else model.llm
    bundle = load_llm(source, dtype=dtype, device=device)
    if (run / ADAPTER_DIR).is_dir():
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(bundle.model, str(run / ADAPTER_DIR))
        bundle.model = peft_model.merge_and_unload() if merge_adapter else peft_model
    return bundle


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[VisionLanguageModel, LLMBundle, RunModel]:
    """Rebuild a run's model (eval mode) from its folder."""
    model = read_run_model(run_dir)
    bundle = load_run_llm(run_dir, model, device=device, dtype=dtype)
    vlm = build_vlm(model, bundle)
    load_fuser_weights(vlm, Path(run_dir) / FUSER_WEIGHTS)
    return vlm.eval(), bundle, model


def load_run_fuser(run_dir: str | Path) -> tuple[Fuser, RunModel]:
    """Only the trained fuser of a run (eval mode), built against the LLM's config: no LLM weights are loaded
    (exporting the visual front end of a 7B model needs no 7B model in memory)."""
    run = Path(run_dir)
    model = read_run_model(run)
    source = str(run / LLM_DIR) if (run / LLM_DIR).is_dir() else model.llm
    config = load_pretrained("LLM config", source, transformers.AutoConfig.from_pretrained)
    fuser = build_fuser(model.fuser, model.vision_spec(), LLMSpec.from_config(config), config=fuser_config(model.fuser, **model.fuser_options))
    state = load_file(str(run / FUSER_WEIGHTS))
    missing, unexpected = fuser.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{run / FUSER_WEIGHTS} does not fit fuser {fuser.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return fuser.eval(), model


def load_fuser_weights(vlm: VisionLanguageModel, path: str | Path) -> None:
    state = load_file(str(path))
    missing, unexpected = vlm.fuser.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path} does not fit fuser {vlm.fuser.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
