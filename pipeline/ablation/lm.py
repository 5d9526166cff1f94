"""The LM budget of ablations: each variant is a phase-two model (fuser + projector + LLM), trained as
`layerfuse train` trains one and scored by greedy exact match, as `layerfuse eval` scores one.

    CacheBatches (union of the group's layers, tokens once)  --slice per variant-->  train_step(TrainObjective(vlm))
    EvalChunks (prompts of the evaluation questions, once)  --slice per variant-->  greedy_generate -> exact match

The LLM: with the LLM frozen (stage 1) every variant of a group shares one copy; an internal fuser's hooks are
attached only while its variant runs, so variants never see each other's hooks. When the LLM trains (full or
LoRA) each variant gets its own copy of the base LLM. Every variant starts from the base LLM.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from layerfuse.fusion import LLMSpec, VisionLanguageModel, VisionSpec, build_fuser
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.core.distributed import DistContext
from layerfuse.pipeline.training.evaluate import EvalChunks, normalize_answer
from layerfuse.pipeline.models.generate import greedy_generate
from layerfuse.pipeline.models.llm import LLMBundle
from layerfuse.pipeline.training.loader import FeatureBatch, LazyCache, TokenSettings, own_generator
from layerfuse.pipeline.ablation.questions import QuestionSet
from layerfuse.pipeline.ablation.shared_pass import MemberStats, VariantRNG
from layerfuse.pipeline.ablation.sweep import LMSettings, SweepSpec, Variant
from layerfuse.core.schedule import warmup_cosine
from layerfuse.pipeline.training.train import STAGE_DEFAULTS, TrainConfig, TrainObjective, apply_llm_mode, param_groups, train_step
from layerfuse.core.workers import worker_init_fn


def resolved_lm(lm: LMSettings) -> LMSettings:
    """The stage's defaults (docs/methods.md#training-recipe) filled in where the sweep leaves them open."""
    d = STAGE_DEFAULTS[lm.stage]
    return dataclasses.replace(lm, **{k: (getattr(lm, k) if getattr(lm, k) is not None else d[k])
                                      for k in ("llm_mode", "lr_fuser", "lr_projector", "lr_llm")})


def llm_shared(lm: LMSettings) -> bool:
    """One LLM for the whole group when nothing in it trains."""
    return resolved_lm(lm).llm_mode == "frozen"


def train_config(spec: SweepSpec, variant: Variant) -> TrainConfig:
    """The phase-two settings of one variant (what `apply_llm_mode` and `param_groups` read)."""
    lm = resolved_lm(spec.lm)
    return TrainConfig(
        cache=spec.cache, out="", stage=lm.stage, fuser=variant.fuser, layers=variant.layers, fuser_options=dict(variant.options),
        llm=lm.llm, template=lm.template, max_length=lm.max_length, batch_size=spec.batch_size, micro_batch_size=lm.micro_batch_size,
        lr_fuser=lm.lr_fuser, lr_projector=lm.lr_projector, lr_llm=lm.lr_llm, llm_mode=lm.llm_mode, lora_r=lm.lora_r,
        lora_alpha=lm.lora_alpha, lora_dropout=lm.lora_dropout, warmup_ratio=spec.warmup_ratio, max_grad_norm=spec.max_grad_norm,
        seed=variant.seed, progress=False, tensorboard=False,
    )


def token_settings(spec: SweepSpec, bundle: LLMBundle, num_visual_tokens: int) -> TokenSettings:
    max_pos = getattr(bundle.model.config, "max_position_embeddings", None)
    max_length = min(spec.lm.max_length, int(max_pos)) if max_pos else spec.lm.max_length
    return TokenSettings(spec.lm.template, num_visual_tokens, bundle.image_token_id, max_length, bundle.pad_token_id)


class LMVariant:
    """One variant in the LM budget: VisionLanguageModel + TrainObjective, phase two's optimizer and schedule."""

    def __init__(self, variant: Variant, vision: VisionSpec, spec: SweepSpec, bundle: LLMBundle, union: list[int | tuple[int, ...]],
                 device: torch.device, total_steps: int, eval_ids: np.ndarray):
        self.variant, self.device, self.spec = variant, device, spec
        self.bundle = bundle
        self.cfg = train_config(spec, variant)
        self.shared = self.cfg.llm_mode == "frozen"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(variant.seed)  # the init depends on the seed and the variant only, not on the group
            llm = bundle.model if self.shared else copy.deepcopy(bundle.model)
            fuser = build_fuser(variant.fuser, vision, LLMSpec.from_config(llm.config), **variant.build_options()).to(device)
            self.vlm = VisionLanguageModel(fuser, llm, bundle.image_token_id)
            apply_llm_mode(self.vlm, self.cfg)
        if self.shared:
            self.vlm.fuser.detach()  # hooks on the shared LLM only while this variant runs (see `attached`)
        self.objective = TrainObjective(self.vlm)
        self.optimizer = torch.optim.AdamW(param_groups(self.objective, self.cfg), betas=(0.9, 0.999), eps=1e-8)
        warmup = max(1, round(spec.warmup_ratio * total_steps))
        self.scheduler = warmup_cosine(self.optimizer, total_steps, warmup)
        self.trainable = [p for p in self.objective.parameters() if p.requires_grad]
        fuser.use_views([i for i in union if isinstance(i, tuple)])  # group means the shared pass reads as such
        self.positions = [union.index(i) for i in fuser.required_inputs]
        self.whole = self.positions == list(range(len(union)))
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.rng = VariantRNG(variant.seed, device)
        self.exclusive = True  # LoRA dropout draws from the process-wide stream; a frozen LLM is shared by the group
        self.stats = MemberStats()
        self.eval_index = {str(i): k for k, i in enumerate(eval_ids)}
        self.correct = np.zeros(len(eval_ids), dtype=bool)
        self.weights: np.ndarray | None = None
        self.ctx = DistContext()

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.trainable)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """The fuser's hooks on the shared LLM for the duration of the block (a no-op for external fusers)."""
        if self.shared:
            self.vlm.fuser.attach(self.vlm.llm)
        try:
            yield
        finally:
            if self.shared:
                self.vlm.fuser.detach()

    def _slice(self, layers: torch.Tensor) -> torch.Tensor:
        return layers if self.whole else layers[:, self.positions]

    def train_step(self, micro: list[FeatureBatch]) -> float:
        own = [FeatureBatch(mb.tokens, self._slice(mb.layers), mb.text if self.vlm.fuser.needs_text else None, mb.rows) for mb in micro]
        self.objective.train()
        with self.attached():
            lm, aux, _, _ = train_step(self.objective, self.optimizer, self.scheduler, self.trainable, own, ctx=self.ctx, device=self.device,
                                       global_batch=self.spec.batch_size, max_grad_norm=self.spec.max_grad_norm, autocast=self.autocast)
        return lm + aux

    def eval_step(self, chunk: dict[str, Any]) -> None:
        if not chunk["items"]:
            return
        self.objective.eval()
        fuser = self.vlm.fuser
        layers = self._slice(chunk["layers"]).float()
        text = chunk["text"].float() if fuser.needs_text and chunk["text"] is not None else None
        with self.attached(), self.autocast:
            gen = greedy_generate(self.vlm, chunk["prompts"], layers, text, pad_id=self.bundle.pad_token_id,
                                  eos_id=self.bundle.tokenizer.eos_token_id, max_new_tokens=self.spec.lm.max_new_tokens,
                                  suppress=[self.bundle.image_token_id])
            weights = None
            if self.variant.fuser == "igva":  # its per-sample group weights on the evaluation split
                weights = fuser(layers.to(self.device), None if text is None else text.to(self.device)).weights
        for item, ids in zip(chunk["items"], gen):
            answer = self.bundle.tokenizer.decode(ids, skip_special_tokens=True).strip()
            k = self.eval_index.get(item["id"])
            if k is not None:
                self.correct[k] = normalize_answer(answer) == normalize_answer(item["reference"])
        if weights is not None:
            if self.weights is None:
                self.weights = np.full((len(self.correct), weights.shape[1]), np.nan, dtype=np.float32)
            for item, w in zip(chunk["items"], weights.float().cpu().numpy()):
                k = self.eval_index.get(item["id"])
                if k is not None:
                    self.weights[k] = w

    def eval_outputs(self) -> tuple[np.ndarray, np.ndarray | None]:
        """-> correct [m] bool in evaluation-row order (unscorable prompts count as wrong), IGVA weights [m, K] or None."""
        return self.correct, self.weights


def eval_chunks(cache: FeatureCache, questions: QuestionSet, union: list[int | tuple[int, ...]], need_text: bool, bundle: LLMBundle,
                settings: TokenSettings, *, batch_size: int, workers: int) -> tuple[DataLoader, int]:
    """The evaluation prompts of the group, `batch_size` questions per chunk, read once for every member."""
    rows = questions.eval_rows
    chunks = [rows[i : i + batch_size] for i in range(0, rows.size, batch_size)]
    ds = EvalChunks(LazyCache(cache.url, None), chunks, union, need_text, bundle.tokenizer, settings.template,
                     settings.num_visual_tokens, bundle.image_token_id)
    n = min(workers, len(chunks))
    loader = DataLoader(ds, batch_size=None, collate_fn=_as_is, num_workers=n, worker_init_fn=worker_init_fn(n),
                        generator=own_generator(0))
    return loader, len(chunks)


def _as_is(x: Any) -> Any:
    return x
