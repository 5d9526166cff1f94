"""Stacked training (probe mode): variants of one architecture trained as one batched model.

Variants that differ only in seed, or in a layer set of the same shape, have the same modules with the same parameter
shapes. A stack of S of them runs one forward/backward with `torch.func.vmap` over `functional_call` of the first
member's model:

    per member s: its seed's batch, its slice of the layers   inputs [S, B, k, T, D], text [S, B, d_s], labels [S, B]
    params {name: torch.stack(member s's parameter)}          [S, ...] each step, so gradients reach every member's own
    vmap(functional_call(model, params_s, inputs_s))         -> loss [S]; backward of the sum (the members are independent)
    per member: gradient clipping, AdamW step, schedule      each member's own optimizer, exactly as alone

Each member keeps its parameters, optimizer, schedule and evaluation (evaluation runs per member, as alone); only the
forward/backward is batched. Seeds in one stack read their own batches (one loader per seed, shared_pass.zip_seeds).

What is equal to training alone: the first step's logits bit for bit; gradients to ~1e-8 (vmap reduces the batch of
some ops, LayerNorm's and attention's weight gradients, cross-entropy's mean, in another order); after many steps the
weights to ~1e-5 and the losses to ~1e-6, so evaluation accuracy is normally the same (a question whose two best logits
are within that tolerance can flip). tests/pipeline/ablation/test_stacked.py checks it.

Which variants stack (`plan_stacks`): members whose key (`stack_key`) is equal: same fuser and options, same parameter
names and shapes, the same input structure (positions of each term in its inputs), no random draws. Fusers stack only
when they are known to vmap (`STACKABLE`): mmfuser does not (ms_deform_attn's gather path is a custom
autograd.Function, and impl=auto times candidates on first use); fusers added later train on their own until checked.

When it pays (BENCHMARKS.md, bench/ablate.py): on CPU the probe's steps are GEMM-bound and vmap's batched linear (a
weight per sample: matmul with broadcast weights, copies) is slower than the members one after another (measured 1.9x
slower for 3 x concat 3-18-23 on one core), so `stack=None` stacks only on CUDA, where a step of a small probe is bound
by kernel launches and one launch serves S variants.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.func import functional_call, vmap

from layerfuse.pipeline.ablation.probe import ProbeBatch, ProbeVariant, probe_loss

warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")  # SDPA under vmap: a loop over S, same numbers
STACKABLE = frozenset({"single", "concat", "sti", "igva"})  # checked against training alone (test_stacked.py)


def stack_key(m: ProbeVariant) -> tuple | None:
    """Members with equal keys compute the same function of their own parameters and inputs; None: trains alone."""
    fuser = m.model.fuser
    if m.variant.fuser not in STACKABLE or m.exclusive:
        return None
    params = tuple((n, tuple(p.shape), p.requires_grad) for n, p in m.model.named_parameters())
    structure = tuple(tuple(p) for p in fuser.selection.positions(fuser.required_inputs))
    options = json.dumps(m.variant.options, sort_keys=True, default=str)
    return m.variant.fuser, options, params, structure, len(fuser.required_inputs), fuser.num_visual_tokens


def plan_stacks(members: Sequence[ProbeVariant], *, enabled: bool) -> list[list[ProbeVariant]]:
    """The pass's members in stacks (sweep order kept within each; a stack of one trains alone)."""
    if not enabled:
        return [[m] for m in members]
    stacks: dict[Any, list[ProbeVariant]] = {}
    for i, m in enumerate(members):
        key = stack_key(m)
        stacks.setdefault(("alone", i) if key is None else key, []).append(m)
    return list(stacks.values())


class StackedProbe:
    """S probe members of one `stack_key` as one unit of the shared pass (pipeline/ablation/shared_pass.py `Unit`)."""

    exclusive = False

    def __init__(self, members: Sequence[ProbeVariant]):
        if len({stack_key(m) for m in members}) != 1 or stack_key(members[0]) is None:
            raise ValueError("StackedProbe: the members do not share one stack key")
        self.members = list(members)
        self.template = copy.deepcopy(members[0].model).to("meta")  # the function; parameters come from the members
        self.template.train()
        self.names = [n for n, _ in self.template.named_parameters()] + [n for n, _ in self.template.named_buffers()]
        self.params = [{**dict(m.model.named_parameters()), **dict(m.model.named_buffers())} for m in self.members]
        self.with_text = members[0].model.head.query is not None or members[0].model.fuser.needs_text
        self.loss = vmap(self._loss, in_dims=(0, 0, 0 if self.with_text else None, 0))

    def _loss(self, params: dict[str, torch.Tensor], layers: torch.Tensor, text: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """One member: layers [B, k, T, D], text [B, d_s], labels [B] -> loss []."""
        logits, fused = functional_call(self.template, params, (layers, text))
        return probe_loss(logits, labels, fused)

    def train_step(self, batches: Mapping[int, ProbeBatch]) -> list[float]:
        own = [batches[m.variant.seed] for m in self.members]
        layers = torch.stack([m.inputs(b) for m, b in zip(self.members, own)])  # [S, B, k, T, D]
        text = torch.stack([b.text for b in own]) if self.with_text else None  # [S, B, d_s]
        labels = torch.stack([b.labels for b in own])  # [S, B]
        params = {n: torch.stack([p[n] for p in self.params]) for n in self.names}  # [S, ...]
        for m in self.members:
            m.model.train()
        losses = self.loss(params, layers, text, labels)  # [S]
        losses.sum().backward()
        for m in self.members:
            m.update()
        return losses.detach().tolist()

    def eval_step(self, batch: ProbeBatch) -> None:
        for m in self.members:
            m.eval_step(batch)
