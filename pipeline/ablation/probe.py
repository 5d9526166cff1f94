"""The probe budget of ablations: a fuser trained with a small answer head instead of the LLM.

    layers [B, k, T, D] --fuser (projector to the probe width d)--> tokens [B, N_v, d]
    question [B, d_s] (the cached sentence embedding of the first question)
        --Linear--> query [B, 1, d] --attention pooling over LN(tokens) + positions--> pooled [B, d]
        --MLP(cat[pooled, query])--> logits [B, V] over the training split's answers

The question decides what to look at (colour of *which* object, count of *which* shape), the pooled visual
feature answers it; the head is small, so what is measured is mostly what the fused tokens carry. Training is
cross-entropy (+ the fuser's aux loss, IGVA's entropy term); evaluation is accuracy per task category on the
evaluation split, where an answer outside the training vocabulary counts as wrong. Which questions and answers:
pipeline/ablation/questions.py. `ProbeVariant` is one variant's trainer in the shared pass (pipeline/ablation/shared_pass.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from layerfuse.fusion import Fuser, FuserOutput, LLMSpec, VisionSpec, build_fuser
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.training.loader import CacheBatches, LazyCache, own_generator
from layerfuse.pipeline.training.epoch_plan import BatchShape, EpochPlan
from layerfuse.pipeline.ablation.questions import QuestionSet
from layerfuse.pipeline.ablation.shared_pass import MemberStats, VariantRNG
from layerfuse.pipeline.ablation.sweep import SweepSpec, Variant
from layerfuse.core.schedule import warmup_cosine
from layerfuse.core.workers import worker_init_fn


# -- the model --------------------------------------------------------------------------------------------------------
class ProbeHead(nn.Module):
    """tokens [B, N, d], question [B, d_s] -> logits [B, V]: attention pooling queried by the question, then an MLP.

    The tokens get a learned position embedding, as the visual tokens get positions in an LLM's input sequence:
    "which object is left of which" needs to know where each token sits."""

    def __init__(self, width: int, text_dim: int, num_answers: int, heads: int = 4, num_tokens: int = 576):
        super().__init__()
        if width % heads:
            raise ValueError(f"probe width {width} is not divisible by {heads} heads")
        self.query = nn.Linear(text_dim, width) if text_dim > 0 else None
        self.fixed_query = nn.Parameter(torch.zeros(width)) if text_dim <= 0 else None  # caches without text
        self.position = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, num_answers))

    def forward(self, tokens: torch.Tensor, question: torch.Tensor | None) -> torch.Tensor:
        if tokens.shape[1] > self.position.shape[0]:
            raise ValueError(f"the probe head was built for {self.position.shape[0]} visual tokens, got {tokens.shape[1]}")
        if self.query is not None:
            q = self.query(question).unsqueeze(1)  # [B, 1, d]
        else:
            q = self.fixed_query.expand(tokens.shape[0], 1, -1)
        kv = self.norm(tokens) + self.position[: tokens.shape[1]]  # [B, N, d]
        pooled = self.attn(q, kv, kv, need_weights=False)[0]  # [B, 1, d]
        return self.mlp(torch.cat([pooled, q], dim=-1).squeeze(1))  # [B, V]


class ProbeModel(nn.Module):
    """fuser + answer head: layers [B, k, T, D], text [B, d_s] -> (logits [B, V], FuserOutput)."""

    def __init__(self, fuser: Fuser, head: ProbeHead):
        super().__init__()
        self.fuser = fuser
        self.head = head

    def forward(self, layers: torch.Tensor, text: torch.Tensor | None) -> tuple[torch.Tensor, FuserOutput]:
        fused = self.fuser(layers, text if self.fuser.needs_text else None)
        return self.head(fused.tokens, text), fused


def probe_loss(logits: torch.Tensor, labels: torch.Tensor, fused: FuserOutput) -> torch.Tensor:
    loss = F.cross_entropy(logits.float(), labels)
    return loss + fused.aux_loss if fused.aux_loss is not None else loss


# -- the data ---------------------------------------------------------------------------------------------------------
@dataclass
class ProbeBatch:
    """One batch of the probe's shared pass."""

    layers: torch.Tensor  # [B, k, T, D] stored dtype: the union of the group's layers
    text: torch.Tensor | None  # [B, d_s] first-question embedding
    labels: torch.Tensor  # [B] int64 (UNKNOWN outside the vocabulary, evaluation only)
    rows: torch.Tensor  # [B] reader rows

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> ProbeBatch:
        move = lambda t: None if t is None else t.to(device)
        return ProbeBatch(move(self.layers), move(self.text), self.labels.to(device), self.rows)


def first_question_embedding(cache: FeatureCache, rows: np.ndarray) -> torch.Tensor:
    """[n, d_s]: the embedding of each row's first question, the one its label answers."""
    turns, _ = cache.text_embeddings(rows, per_turn=True)
    return turns[:, 0].float()


def read_probe_batch(cache: FeatureCache, rows: np.ndarray, labels: np.ndarray, layers: list[int], need_text: bool) -> ProbeBatch:
    """Features of `layers` and the first-question embedding of `rows`, read once."""
    feats = cache.features(rows, layers)  # [n, k, T, D]
    text = first_question_embedding(cache, rows) if need_text else None
    return ProbeBatch(feats, text, torch.from_numpy(np.asarray(labels, dtype=np.int64)), torch.from_numpy(np.asarray(rows)))


class AnswerFormat:
    """The probe's batch format for `CacheBatches`: answer labels and the first question's embedding -> ProbeBatch."""

    def __init__(self, data: QuestionSet, need_text: bool):
        self.data, self.need_text = data, need_text

    def text(self, cache: FeatureCache, rows: np.ndarray) -> torch.Tensor | None:
        return first_question_embedding(cache, rows) if self.need_text else None

    def batches(self, cache: FeatureCache, rows: np.ndarray, layers: torch.Tensor, text: torch.Tensor | None,
                slices: list[slice]) -> list[ProbeBatch]:
        labels = torch.from_numpy(np.asarray(self.data.labels_of(rows), dtype=np.int64))
        return [ProbeBatch(layers[sl], None if text is None else text[sl], labels[sl], torch.from_numpy(rows[sl])) for sl in slices]


class _EvalChunks(Dataset):
    def __init__(self, lazy: LazyCache, data: QuestionSet, layers: list[int], need_text: bool, chunk: int):
        self.lazy, self.data, self.layers, self.need_text, self.chunk = lazy, data, layers, need_text, chunk

    def __len__(self) -> int:
        return math.ceil(self.data.eval_rows.size / self.chunk)

    def __getitem__(self, i: int) -> ProbeBatch:
        sl = slice(i * self.chunk, (i + 1) * self.chunk)
        return read_probe_batch(self.lazy.cache, self.data.eval_rows[sl], self.data.eval_labels[sl], self.layers, self.need_text)


def _as_is(x: Any) -> Any:
    return x


class ProbeBatches:
    """The probe's training steps over the cache: `steps(start, stop)` yields (step, ProbeBatch).

    Phase two's loader (`CacheBatches`, pipeline/training/epoch_plan.py's order: deterministic per (seed, epoch), chunk-aligned
    blocks in a shuffled order, shuffled again inside windows of `buffer_rows`; one DataLoader over every epoch)
    with the probe's batch format: one micro-batch per step."""

    def __init__(self, cache: FeatureCache, data: QuestionSet, *, layers: list[int], need_text: bool, batch_size: int, seed: int,
                 buffer_rows: int = 1024, workers: int = 1, prefetch: int = 2):
        self.cache, self.data, self.layers, self.need_text, self.seed, self.workers = cache, data, list(layers), need_text, seed, workers
        self.batches = CacheBatches(cache, data.train_rows, AnswerFormat(data, need_text), layers=layers,
                                    shape=BatchShape(batch_size, batch_size, 1), seed=seed, buffer_rows=buffer_rows, workers=workers,
                                    prefetch=prefetch)
        self.steps_per_epoch = self.batches.steps_per_epoch

    def plan(self, epoch: int) -> EpochPlan:
        return self.batches.plan(epoch)

    def steps(self, start: int, stop: int) -> Iterator[tuple[int, ProbeBatch]]:
        """(step, batch) for steps start..stop-1; only the windows of these steps are read."""
        for step, (batch,) in self.batches.steps(start, stop):
            yield step, batch

    def eval_batches(self, chunk: int = 256) -> Iterator[ProbeBatch]:
        """The evaluation rows in storage order, `chunk` at a time."""
        ds = _EvalChunks(LazyCache(self.cache.url, None), self.data, self.layers, self.need_text, chunk)
        n = min(self.workers, len(ds))
        yield from DataLoader(ds, batch_size=None, collate_fn=_as_is, num_workers=n, worker_init_fn=worker_init_fn(n),
                              generator=own_generator(self.seed, 1 << 20))


def default_workers() -> int:
    """One reader process on small machines, two from 8 cores on."""
    return 2 if (os.cpu_count() or 1) >= 8 else 1


# -- one variant's trainer --------------------------------------------------------------------------------------------
def prepare_batch(batch: ProbeBatch, device: torch.device) -> ProbeBatch:
    """Once per step for the whole group: to the device, features to fp32."""
    b = batch.to(device)
    return ProbeBatch(b.layers.float(), b.text, b.labels, b.rows)


def draws_random(model: nn.Module) -> bool:
    """Whether training `model` draws random numbers: a dropout with p > 0 (nn.Dropout*, nn.MultiheadAttention's)."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            return True
    return False


class ProbeVariant:
    """One variant in the probe budget: ProbeModel, AdamW, warmup + cosine schedule, its predictions on eval."""

    def __init__(self, variant: Variant, vision: VisionSpec, spec: SweepSpec, questions: QuestionSet, union: list[int | tuple[int, ...]],
                 device: torch.device, total_steps: int):
        self.variant, self.device, self.max_grad_norm = variant, device, spec.max_grad_norm
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(variant.seed)  # the init depends on the seed and the variant only, not on the group
            fuser = build_fuser(variant.fuser, vision, LLMSpec(spec.probe.width), **variant.build_options())
            head = ProbeHead(spec.probe.width, vision.text_dim, len(questions.answers), spec.probe.heads, fuser.num_visual_tokens)
        self.model = ProbeModel(fuser, head).to(device)
        fuser.use_views([i for i in union if isinstance(i, tuple)])  # group means the shared pass reads as such
        self.positions = [union.index(i) for i in fuser.required_inputs]
        self.whole = self.positions == list(range(len(union)))
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=spec.probe.lr, weight_decay=spec.probe.weight_decay)
        warmup = max(1, round(spec.warmup_ratio * total_steps))
        self.scheduler = warmup_cosine(self.optimizer, total_steps, warmup)
        self.rng = VariantRNG(variant.seed, device)
        self.exclusive = draws_random(self.model)  # no fuser in the probe has dropout today: every probe variant can run concurrently
        self.stats = MemberStats()
        self.correct: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.trainable)

    def inputs(self, batch: ProbeBatch) -> torch.Tensor:
        """This variant's slice of the group's layers: [B, k_union, T, D] -> [B, k, T, D]."""
        return batch.layers if self.whole else batch.layers[:, self.positions]

    def train_step(self, batch: ProbeBatch) -> float:
        self.model.train()
        logits, fused = self.model(self.inputs(batch), batch.text)
        loss = probe_loss(logits, batch.labels, fused)
        loss.backward()
        self.update()
        return float(loss.detach())

    def update(self) -> None:
        """After backward: clip the gradients, one optimizer and schedule step, gradients cleared."""
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def eval_step(self, batch: ProbeBatch) -> None:
        self.model.eval()
        logits, fused = self.model(self.inputs(batch), batch.text)
        self.correct.append((logits.argmax(-1) == batch.labels).cpu().numpy())
        if fused.weights is not None:
            self.weights.append(fused.weights.float().cpu().numpy())

    def eval_outputs(self) -> tuple[np.ndarray, np.ndarray | None]:
        """-> correct [m] bool in evaluation-row order, IGVA weights [m, K] or None."""
        correct = np.concatenate(self.correct) if self.correct else np.zeros(0, bool)
        return correct, (np.concatenate(self.weights) if self.weights else None)


def total_steps(spec: SweepSpec, steps_per_epoch: int) -> int:
    return spec.steps if spec.steps is not None else max(1, math.ceil(spec.epochs * steps_per_epoch))
