"""`layerfuse_vlm`: a transformers-native model class for a layerfuse VLM with any fuser.

A trained run (vision tower -> fuser + projector -> LLM) is written as one transformers checkpoint that
`from_pretrained` loads without `trust_remote_code`, once this module is imported (`import layerfuse.export` does
it): the config type `layerfuse_vlm` is registered with `AutoConfig`, the model with `AutoModelForImageTextToText`
and the processor with `AutoProcessor`.

    import layerfuse.export
    model = transformers.AutoModelForImageTextToText.from_pretrained(DIR)      # LayerfuseVLMForConditionalGeneration
    processor = transformers.AutoProcessor.from_pretrained(DIR)                # LayerfuseVLMProcessor
    inputs = processor(images=image, text="What colour is the circle?")        # a question: the run's template is applied
    answer = model.generate(**inputs, max_new_tokens=16)[:, inputs["input_ids"].shape[1]:]

The model holds the run's own modules, not a re-implementation: the vision tower returning every hidden state
(`AutoModel` of the tower's config: CLIPVisionModel, SiglipVisionModel, ...), and `fusion.VisionLanguageModel`
(fuser + projector + the causal LM). Its forward is the run's live path (pipeline/training/infer.py):

    pixel_values [B, 3, H, W] -> tower, hidden states hs[0..L] -> hs[required_layers] [B, k, T, D]
      -> rounded through the run's feature dtype (what the cache stored) -> fuser (+ text_embeds [B, d_s] for igva and
      tgif router=sentence; tgif router=llm pools the prompt's LLM token embeddings itself) -> tokens [B, N_v, d]
      placed at the N_v `<image>` placeholders of input_ids [B, S] -> LLM -> logits [B, S, V]

The internal fusers (inject, xattn, deepstack) act inside the LLM through forward pre-hooks: `VisionLanguageModel`
attaches them when the model is built, so a loaded checkpoint is attached like the run's model. The prefill sets
their context (features and image span), the decoding steps of `generate` reuse it.

`text_embeds` (igva, tgif router=sentence) is the sentence-transformers embedding of the cleaned question; the
processor computes it with the sentence model saved in DIR/sentence_model/ (`LayerfuseVLMProcessor`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import transformers
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel, ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from layerfuse.core.dtypes import StorageDtype
from layerfuse.core.errors import ConfigError
from layerfuse.fusion import LLMSpec, VisionLanguageModel, VisionSpec, build_fuser, fuser_config
from layerfuse.fusion.internal import InternalFuser
from layerfuse.fusion.kv_cache import cached_tokens, layer_cache
from layerfuse.pipeline.data.conversation import prompt_for_generation
from layerfuse.pipeline.models.encoder import ImagePreprocessor
from layerfuse.pipeline.models.generate import left_pad
from layerfuse.pipeline.models.llm import LLMBundle
from layerfuse.pipeline.models.run import RunModel, load_run, load_run_encoder
from layerfuse.pipeline.models.text import DEFAULT_SUFFIXES, InstructionEmbedder

MODEL_TYPE = "layerfuse_vlm"
SENTENCE_MODEL_DIR = "sentence_model"  # the sentence-transformers model of igva / tgif router=sentence, inside DIR


def _sub_config(value: Any, default_type: str) -> PretrainedConfig:
    """A nested config from a config, a dict (as saved in config.json) or None (the default type's defaults)."""
    if isinstance(value, PretrainedConfig):
        return value
    d = dict(value or {})
    model_type = d.pop("model_type", default_type)
    return transformers.AutoConfig.for_model(model_type, **d)


class LayerfuseVLMConfig(PretrainedConfig):
    """vision_config (the tower's), text_config (the LLM's), and what the run adds: the fuser, its options and the
    features it was trained on, the image placeholder, the feature dtype, the prompt template and the sentence model."""

    model_type = MODEL_TYPE
    sub_configs = {"vision_config": transformers.AutoConfig, "text_config": transformers.AutoConfig}

    def __init__(
        self,
        vision_config: Any = None,
        text_config: Any = None,
        fuser: str = "single",
        fuser_options: dict[str, Any] | None = None,  # fields of the fuser's config dataclass (layers included)
        vision_spec: dict[str, Any] | None = None,  # VisionSpec as a dict: num_layers, hidden_size, grid, has_cls, text_dim
        image_token_id: int = 0,
        feature_dtype: str = "float32",  # live hidden states are rounded to it (the dtype the run's cache returned)
        template: str = "plain",  # the run's conversation template (pipeline/data/conversation.py)
        pad_to_square: bool = False,  # LLaVA's expand2square before the image processor
        text_model: dict[str, Any] | None = None,  # {"path", "suffixes"}: the sentence model of igva / tgif-sentence
        **kwargs: Any,
    ):
        self.vision_config = _sub_config(vision_config, "clip_vision_model")
        self.text_config = _sub_config(text_config, "llama")
        self.fuser = fuser
        self.fuser_options = dict(fuser_options or {})
        self.vision_spec = dict(vision_spec or {})
        self.image_token_id = int(image_token_id)
        self.feature_dtype = feature_dtype
        self.template = template
        self.pad_to_square = bool(pad_to_square)
        self.text_model = dict(text_model or {})
        kwargs.setdefault("tie_word_embeddings", bool(getattr(self.text_config, "tie_word_embeddings", False)))
        super().__init__(**kwargs)

    def fuser_vision(self) -> VisionSpec:
        v = dict(self.vision_spec)
        v["grid"] = tuple(v["grid"])
        return VisionSpec(**v)


class LayerfuseVLMForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """vision tower -> fuser + projector -> causal LM, with transformers' `generate`.

    forward(input_ids [B, S], pixel_values [B, 3, H, W] | None, attention_mask [B, S], labels [B, S],
            text_embeds [B, d_s] | None, ...) -> the LLM's CausalLMOutputWithPast (loss + the fuser's aux loss)
    """

    config_class = LayerfuseVLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: LayerfuseVLMConfig):
        super().__init__(config)
        self.vision_tower = transformers.AutoModel.from_config(config.vision_config)
        llm = transformers.AutoModelForCausalLM.from_config(config.text_config)
        options = fuser_config(config.fuser, **config.fuser_options)
        fuser = build_fuser(config.fuser, config.fuser_vision(), LLMSpec.from_config(config.text_config), config=options)
        self.vlm = VisionLanguageModel(fuser, llm, config.image_token_id)  # attaches the internal fusers' hooks
        # post_init gathers tied weights (lm_head = embed_tokens) from direct children only; the LLM is a grandchild
        tied = getattr(llm, "all_tied_weights_keys", None) or {}
        self._tied_weights_keys = {f"vlm.llm.{k}": f"vlm.llm.{v}" for k, v in tied.items()}
        self._no_split_modules = sorted({*(llm._no_split_modules or []), *(self.vision_tower._no_split_modules or [])})
        self.post_init()

    # -- what GenerationMixin and PreTrainedModel ask for -------------------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.vlm.llm.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.vlm.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.vlm.llm.get_output_embeddings()

    def get_decoder(self) -> torch.nn.Module:
        return self.vlm.llm.get_decoder()

    # -- the computation ----------------------------------------------------------------------------------------
    def image_layers(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> the fuser's hidden states [B, k, T, D], rounded through the feature dtype."""
        tower = next(self.vision_tower.parameters())
        hs = self.vision_tower(pixel_values=pixel_values.to(tower.device, tower.dtype), output_hidden_states=True).hidden_states
        layers = torch.stack([hs[i] for i in self.vlm.fuser.required_layers], dim=1)  # [B, k, T, D]
        fuser = next(self.vlm.fuser.parameters())
        return layers.to(StorageDtype(self.config.feature_dtype).torch_dtype).to(fuser.device, fuser.dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """A prefill with an image runs the tower and the fuser; any other call (text only, a decoding step after
        a cached prefill, `inputs_embeds`) goes to the LLM as is. `kwargs`: the LLM's (KV cache under its
        transformers version's name, use_cache, logits_to_keep, ...)."""
        llm = self.vlm.llm
        past = cached_tokens(layer_cache(kwargs))
        common = dict(attention_mask=attention_mask, position_ids=position_ids, labels=labels, **kwargs)
        if inputs_embeds is not None:
            if pixel_values is not None:
                raise ValueError("pass input_ids with pixel_values (the image placeholders mark where the visual tokens go), not inputs_embeds")
            return llm(inputs_embeds=inputs_embeds, **common)
        if pixel_values is None or past > 0:
            placeholders = input_ids == self.vlm.image_token_id
            if placeholders.any():
                rows = placeholders.any(dim=1).nonzero().flatten().tolist()
                raise ValueError(
                    f"image placeholders (id {self.vlm.image_token_id}) in batch rows {rows} without pixel_values"
                    f"{' in this decoding step' if past else ''}: the image must be part of the prefill"
                )
            if past == 0 and isinstance(self.vlm.fuser, InternalFuser):
                self.vlm.fuser.clear_context()  # a new text-only sequence: no image for the hooks
            return llm(input_ids=input_ids, **common)
        fuser = self.vlm.fuser
        if fuser.needs_text and text_embeds is None:
            raise ValueError(
                f"{fuser.name} needs `text_embeds` [B, {fuser.text_dim}]: the question's sentence embedding, which "
                "LayerfuseVLMProcessor returns (AutoProcessor.from_pretrained on the checkpoint folder)"
            )
        text = text_embeds.to(next(fuser.parameters()).device).float() if fuser.needs_text else None
        embeds, fused = self.vlm.prepare(input_ids, self.image_layers(pixel_values), text, None, attention_mask, labels)
        out = llm(inputs_embeds=embeds, **common)
        if getattr(out, "loss", None) is not None and fused.aux_loss is not None:
            out.loss = out.loss + fused.aux_loss
        return out

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """GenerationMixin's inputs, with the image (and its text embedding) only in the prefill."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if cached_tokens(layer_cache(inputs)) > 0:
            inputs.pop("pixel_values", None)
            inputs.pop("text_embeds", None)
        return inputs


class LayerfuseVLMProcessor(ProcessorMixin):
    """The image processor of the tower + the run's tokenizer, and the prompt the run was trained with.

    processor(images=[PIL image] * B, text=[question] * B) -> BatchFeature:
        input_ids [B, S], attention_mask [B, S] (left-padded, for generation), pixel_values [B, 3, H, W],
        text_embeds [B, d_s] (only for fusers that need the sentence embedding)

    `text` is the question (one human turn, `<image>` not needed): the prompt is rendered in the run's template
    (`prompt_for_generation`, the same ids as `layerfuse infer`) with `num_image_tokens` placeholders.
    """

    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        template: str = "plain",
        num_image_tokens: int = 0,
        image_token_id: int = 0,
        pad_to_square: bool = False,
        needs_text: bool = False,
        suffixes: Sequence[str] = DEFAULT_SUFFIXES,
        sentence_model: str = SENTENCE_MODEL_DIR,  # relative to the folder the processor was loaded from, or a path / hub id
        **kwargs: Any,
    ):
        self.template = template
        self.num_image_tokens = int(num_image_tokens)
        self.image_token_id = int(image_token_id)
        self.pad_to_square = bool(pad_to_square)
        self.needs_text = bool(needs_text)
        self.suffixes = list(suffixes)
        self.sentence_model = sentence_model
        self._embedder: InstructionEmbedder | None = None
        self._folder: Path | None = None
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "LayerfuseVLMProcessor":
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        processor._folder = Path(pretrained_model_name_or_path)
        return processor

    def embedder(self) -> InstructionEmbedder:
        """The sentence model, loaded on first use (only igva / tgif router=sentence need it)."""
        if self._embedder is None:
            path = Path(self.sentence_model)
            if not path.is_absolute() and self._folder is not None and (self._folder / path).is_dir():
                path = self._folder / path
            self._embedder = InstructionEmbedder(str(path), suffixes=self.suffixes)
        return self._embedder

    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None, **kwargs: Any) -> BatchFeature:
        questions = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else [images] if not isinstance(images, (list, tuple)) else list(images)
        if not questions:
            raise ValueError("pass text=: the question(s), one per image")
        if images and len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions: one image per question (or none)")
        has_image = bool(images)
        prompts = [
            prompt_for_generation(q, self.tokenizer, self.template, num_visual_tokens=self.num_image_tokens,
                                  image_token_id=self.image_token_id, has_image=has_image)
            for q in questions
        ]
        input_ids, attention_mask = left_pad(prompts, self.tokenizer.pad_token_id)  # [B, S] each
        out: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if has_image:
            preprocess = ImagePreprocessor(self.image_processor, self.pad_to_square)
            out["pixel_values"] = torch.from_numpy(np.stack([preprocess(im.convert("RGB")) for im in images]))
            if self.needs_text:
                convs = [[{"from": "human", "value": q}] for q in questions]
                batch = self.embedder().embed(convs, [True] * len(convs), max_turns=1)
                out["text_embeds"] = torch.from_numpy(batch.mean)  # [B, d_s]
        return BatchFeature(out)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


class HFExportError(ConfigError):
    """The run cannot be written as a transformers checkpoint (stock LLaVA or layerfuse_vlm)."""


def assign_weights(hf: torch.nn.Module, state: dict[str, torch.Tensor], *, tied_head: str | None, target: str) -> None:
    """Put `state` into `hf` (built on the meta device) by assignment; every key of both must match, except the LM head
    `tied_head` when the model ties it to the input embeddings. Non-persistent buffers stay on meta: never saved."""
    expected = set(hf.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    missing = [k for k in missing if k != tied_head]
    if missing or unexpected:
        raise HFExportError(f"weights do not map onto {target}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.load_state_dict({k: v.detach() for k, v in state.items()}, strict=False, assign=True)


def export_layerfuse_vlm(run_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write the run in `run_dir` (any fuser) as a layerfuse_vlm checkpoint in `out_dir`; returns `out_dir`.

    DIR gets config.json + model.safetensors (the tower, the fuser and the LLM with its LoRA adapter merged), the
    image processor, the tokenizer, processor_config.json (template, image placeholders, padding) and, for fusers that
    need the question's sentence embedding, the sentence model in DIR/sentence_model/. Every weight of the model comes
    from the run or its tower: a missing or unexpected key is an error.
    """
    vlm, bundle, run = load_run(run_dir)
    return write_layerfuse_vlm(vlm, bundle, run, out_dir, dtype=dtype, source=str(run_dir))


def write_layerfuse_vlm(vlm: VisionLanguageModel, bundle: LLMBundle, run: RunModel, out_dir: str | Path, *,
                        dtype: torch.dtype | None = None, source: str = "the run") -> Path:
    """`export_layerfuse_vlm` for a run already loaded with `load_run` (`source` names it in errors)."""
    enc = run.encoder
    encoder = load_run_encoder(run, source)
    fuser = vlm.fuser
    text_model = {"path": run.text_model.get("path"), "suffixes": list(run.text_model.get("suffixes") or [])}
    config = LayerfuseVLMConfig(
        vision_config=encoder.model.config.to_dict(), text_config=vlm.llm.config.to_dict(), fuser=run.fuser,
        fuser_options=fuser.config.options(), vision_spec=dict(run.vision), image_token_id=run.image_token_id,
        feature_dtype=run.feature_dtype, template=run.template, pad_to_square=bool(enc.get("pad_to_square")), text_model=text_model,
    )
    with torch.device("meta"):
        hf = LayerfuseVLMForConditionalGeneration(config)
    state = {f"vision_tower.{k}": v for k, v in encoder.model.state_dict().items()}
    state.update({f"vlm.{k}": v for k, v in vlm.state_dict().items()})
    assign_weights(hf, state, tied_head="vlm.llm.lm_head.weight" if config.tie_word_embeddings else None, target=MODEL_TYPE)
    if dtype is not None:
        hf = hf.to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    processor = LayerfuseVLMProcessor(
        encoder.processor, bundle.tokenizer, template=run.template, num_image_tokens=fuser.num_visual_tokens,
        image_token_id=run.image_token_id, pad_to_square=bool(enc.get("pad_to_square")), needs_text=fuser.needs_text,
        suffixes=text_model["suffixes"] or DEFAULT_SUFFIXES,
    )
    processor.save_pretrained(out)
    if fuser.needs_text:
        InstructionEmbedder(text_model["path"], suffixes=processor.suffixes).model.save(str(out / SENTENCE_MODEL_DIR))
    return out


def register() -> None:
    """Make `layerfuse_vlm` known to AutoConfig, AutoModelForImageTextToText and AutoProcessor (idempotent)."""
    transformers.AutoConfig.register(MODEL_TYPE, LayerfuseVLMConfig, exist_ok=True)
    transformers.AutoModelForImageTextToText.register(LayerfuseVLMConfig, LayerfuseVLMForConditionalGeneration, exist_ok=True)
    transformers.AutoProcessor.register(LayerfuseVLMConfig, LayerfuseVLMProcessor, exist_ok=True)


register()
