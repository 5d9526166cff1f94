"""The language model of phase two: loading (hub id or local directory) and the embedded default.

The embedded default (`--llm default`) is a small Llama built in code from a fixed seed, with a byte-level
BPE tokenizer trained on the built-in synthetic dataset's text (questions, answers, captions) and the
conversation templates' scaffolding. Both are saved to a directory and loaded back through exactly the
same code path as a real checkpoint. Its weights are random: it only learns what phase two teaches it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from layerfuse.pipeline.data import synthetic
from layerfuse.core.hub import CheckpointError, load_pretrained
from layerfuse.pipeline.data.conversation import IMAGE_TOKEN, V1_ROLES, V1_SEP, V1_SYSTEM
from layerfuse.pipeline.models.default_build import build_default, settings_of

DEFAULT_LLM = "default"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE_TOKEN)  # ids 0..4 in the default tokenizer


@dataclass(frozen=True)
class DefaultLLMConfig:
    """The embedded default LLM: a 4-layer Llama (GQA 4/2 heads) and a small byte-level BPE vocabulary."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 344
    max_position_embeddings: int = 1024
    max_vocab_size: int = 2000  # BPE target; training stops earlier once every corpus word is one token
    corpus_seeds: tuple[int, ...] = (0, 1, 2)  # built-in dataset seeds whose text trains the tokenizer
    corpus_samples: int = 2000  # samples per seed (text only, no image is rendered)
    seed: int = 0


@dataclass
class LLMBundle:
    """A loaded causal LM with its tokenizer; `<image>` and a pad token are guaranteed to exist."""

    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any  # transformers tokenizer
    image_token_id: int
    name: str
    attn_implementation: str

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


# ------------------------------------------------------------------------------------ the default


def tokenizer_corpus(cfg: DefaultLLMConfig = DefaultLLMConfig()) -> Iterator[str]:
    """Text the default tokenizer is trained on: built-in conversations as the templates render them.

    Scenes come from `synthetic.make_scene`, which lays out a sample without rendering its image, plus
    every word the generator can emit (so coverage does not depend on which seeds were sampled).
    """
    user, assistant = V1_ROLES
    yield V1_SYSTEM
    for seed in cfg.corpus_seeds:
        for i in range(cfg.corpus_samples):
            scene = synthetic.make_scene(seed, i)
            after_image = scene.human.replace(IMAGE_TOKEN, "")  # "\nQuestion": the text after the image span
            yield f"{V1_SYSTEM}{V1_SEP}{user}: {after_image}{V1_SEP}{assistant}: {scene.answer}{EOS}{user}:"
            yield f"{user}: {after_image.strip()}{V1_SEP}{assistant}:"  # a text-only or later turn
            yield scene.answer  # the plain template: the caption directly after the image span
    words = [*synthetic.COLOURS, *synthetic.SHAPES, *synthetic.PLURALS.values(), *synthetic.DETAIL_WORDS.values()]
    words += [*"0123456789", "left", "right", "above", "below", "dark", "light", "grey", "background"]
    yield " ".join(words)
    yield " ".join(w.capitalize() for w in words)
    yield from synthetic.CAPTION_PROMPTS
    yield synthetic.LLAVA_SUFFIX


def train_default_tokenizer(cfg: DefaultLLMConfig = DefaultLLMConfig()) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown tokens possible) with <unk> <s> </s> <pad> <image>; adds <s> in front."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.max_vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(cfg), trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[IMAGE_TOKEN],  # transformers 5 stores it as extra_special_tokens
        model_max_length=cfg.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def build_default_llm(out_dir: str | Path, cfg: DefaultLLMConfig = DefaultLLMConfig()) -> Path:
    """Create the default Llama (random weights from `cfg.seed`) and its tokenizer in `out_dir`.

    Built by the one default-model builder (default_build.py): in a private staging folder renamed into place, so
    a killed build never leaves a half-written default and concurrent builders (e.g. several ranks) all end up with
    one folder. Idempotent: a folder built with the same settings is kept; one built with other settings, or an
    incomplete one, is an error.
    """

    def fill(staging: Path) -> dict[str, Any]:
        tokenizer = train_default_tokenizer(cfg)
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(config)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        return {"vocab_size": len(tokenizer), "num_parameters": sum(p.numel() for p in model.parameters())}

    return build_default(out_dir, settings_of(cfg), fill, seed=cfg.seed, note={"note": "random weights", "kind": "llm"},
                         what="default LLM", error=CheckpointError)


# ---------------------------------------------------------------------------------------- loading


def _causal_lm_class(config: Any, name: str) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise CheckpointError(f"'{name}' (model_type {config.model_type!r}) is not a causal language model") from None


def resolve_attn_implementation(requested: str, model_class: type, device: str | torch.device, dtype: torch.dtype) -> str:
    """"auto" -> flash_attention_2 (flash_attn installed, CUDA, fp16/bf16, supported) > sdpa > eager."""
    if requested != "auto":
        return requested
    flash_ok = getattr(model_class, "_supports_flash_attn", False) or getattr(model_class, "_supports_flash_attn_2", False)
    if (
        flash_ok
        and torch.device(device).type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


@torch.no_grad()
def ensure_image_token(model: Any, tokenizer: Any) -> int:
    """Add `<image>` as a special token if missing (new embedding rows = mean of the old ones); its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        inp = model.get_input_embeddings().weight  # [V', d]
        inp[old:] = inp[:old].mean(dim=0, keepdim=True)
        outp = model.get_output_embeddings()
        if outp is not None and outp.weight.data_ptr() != inp.data_ptr():
            outp.weight[old:] = outp.weight[:old].mean(dim=0, keepdim=True)
            if getattr(outp, "bias", None) is not None:
                outp.bias[old:] = outp.bias[:old].mean()
    return image_id


def ensure_pad_token(model: Any, tokenizer: Any) -> int:
    """Set the pad token to unk (or eos) when the tokenizer has none; its id."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        if fallback is None:
            raise CheckpointError(f"tokenizer '{tokenizer.name_or_path}' has no pad, unk nor eos token")
        tokenizer.pad_token = fallback
    pad = int(tokenizer.pad_token_id)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = pad
    return pad


def load_llm(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "auto",
    default_dir: str | Path | None = None,
    revision: str | None = None,
) -> LLMBundle:
    """Load a causal LM and its tokenizer from a hub id or a local directory ("default": the embedded
    default, built in `default_dir` on first use). Failures are `CheckpointError`s with offline advice."""
    name = str(name_or_path)
    if name == DEFAULT_LLM:
        if default_dir is None:
            raise ValueError("load_llm('default') needs default_dir, where the embedded default LLM is built")
        name = str(build_default_llm(default_dir))
    config = load_pretrained("LLM config", name, transformers.AutoConfig.from_pretrained, revision=revision)
    attn = resolve_attn_implementation(attn_implementation, _causal_lm_class(config, name), device, dtype)
    tokenizer = load_pretrained("tokenizer", name, transformers.AutoTokenizer.from_pretrained, revision=revision)
    model = load_pretrained(
        "LLM", name, transformers.AutoModelForCausalLM.from_pretrained, revision=revision, dtype=dtype, attn_implementation=attn
    )
    model = model.to(device)
    image_token_id = ensure_image_token(model, tokenizer)
    ensure_pad_token(model, tokenizer)
    return LLMBundle(model, tokenizer, image_token_id, str(name_or_path), attn)
