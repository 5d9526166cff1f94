"""Which variants train together: groups that share a pass, sized from the memory at hand.

A group shares one data order, so it holds variants of one seed (and, in lm mode, one token layout: the same
number of visual tokens). Inside that, variants are packed in sweep order while their estimated memory fits the
budget: `fraction` of the memory available now (CUDA: free device memory; CPU: MemAvailable from /proc/meminfo)
minus what the pass itself holds (prefetched batches, a shared frozen LLM). `group_size` overrides the estimate.

The estimate is deliberately rough (fp32 training):
    parameters x 16 bytes (weights, gradients, AdamW's two moments)
  + activations ~ 4 bytes x batch x (the variant's layer slice + its fused features + its head / LLM activations)
and errs on the large side; pass --group-size where it is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from layerfuse.fusion import VisionSpec
from layerfuse.pipeline.ablation.sweep import Variant


FP32 = 4
TRAIN_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq


@dataclass(frozen=True)
class LLMFootprint:
    """What the LLM adds in lm mode."""

    params: int
    hidden_size: int
    num_layers: int
    trained: bool  # full / LoRA: a copy per variant (and its optimizer state when full)
    trainable_params: int = 0  # full: params; LoRA: the adapter


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated now on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30  # unknown: assume 4 GiB


def variant_bytes(v: Variant, vision: VisionSpec, *, batch: int, width: int, head_params: int = 0,
                  llm: LLMFootprint | None = None, seq_len: int = 0) -> int:
    """Estimated training memory of one variant (its own parameters, optimizer state and activations)."""
    params = v.trainable_params + head_params
    state = params * TRAIN_BYTES_PER_PARAM
    k, t, d, n = len(v.required_layers), vision.num_tokens, vision.hidden_size, vision.num_patches
    fused_in = n * d * max(2, k)  # the terms the fuser builds before projecting
    modules = 12 if v.fuser == "mmfuser" else 4  # deformable attention keeps offsets, weights and samples per level
    act = FP32 * batch * (k * t * d + fused_in * modules + v.num_visual_tokens * width * 6)
    if llm is not None:
        act += FP32 * batch * seq_len * llm.hidden_size * llm.num_layers * 16
        if llm.trained:
            state += llm.params * FP32 + llm.trainable_params * (TRAIN_BYTES_PER_PARAM - FP32)
    return int(state + act)


def pass_bytes(union_layers: int, vision: VisionSpec, *, window_rows: int, buffers: int, shared_llm_params: int = 0) -> int:
    """What the pass holds besides the variants: `buffers` prefetched windows (stored fp16 + one fp32 batch) and a
    shared frozen LLM."""
    per_row = union_layers * vision.num_tokens * vision.hidden_size
    return int(buffers * window_rows * per_row * 2 + window_rows * per_row * FP32 + shared_llm_params * FP32)


def plan_groups(variants: Sequence[Variant], *, key: Callable[[Variant], tuple], cost: Callable[[Variant], int], budget: int,
                group_size: int | None = None) -> list[list[Variant]]:
    """Variants in groups of one `key` (seed, token layout) each; a group is filled in order while the summed `cost`
    stays within `budget` (at least one variant per group), or holds exactly `group_size` variants when given."""
    by_key: dict[tuple, list[Variant]] = {}
    for v in variants:
        by_key.setdefault(key(v), []).append(v)
    groups: list[list[Variant]] = []
    for members in by_key.values():
        current: list[Variant] = []
        used = 0
        for v in members:
            c = cost(v)
            full = len(current) >= group_size if group_size else (current and used + c > budget)
            if full:
                groups.append(current)
                current, used = [], 0
            current.append(v)
            used += c
        if current:
            groups.append(current)
    return groups
