"""Phase two: train fuser + projector (+ the LLM) from the cache; the vision encoder never runs.

    cache --CacheBatches (workers read only the fuser's layers)--> micro-batches [B, k, T, D] + tokens [B, S]
      --TrainObjective: fuser -> visual tokens at the image span -> LLM, cross-entropy on supervised tokens only-->
      gradients (DDP all-reduce or FSDP) --AdamW: fuser | projector | llm learning rates, warmup + cosine-->
      RUN/train/checkpoint (exact resume) and, at the end, the run model (pipeline/models/run.py)

Stage 1 trains fuser + projector with the LLM frozen (LLaVA pretraining, "plain" template); stage 2 starts
from a stage-1 run and also trains the LLM, fully or with LoRA ("v1" template). The loss of a step is the
mean over every supervised token of the global batch (not a mean of micro-batch means), so gradient
accumulation and the number of ranks do not change what is optimised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from tqdm.auto import tqdm

from layerfuse.core.config import check_choices
from layerfuse.core.errors import StateError
from layerfuse.core.fingerprint import fingerprint, fingerprint_diff, runtime
from layerfuse.fusion import FuserBuildError, VisionLanguageModel, VisionSpec, fuser_class, fuser_config
from layerfuse.fusion.internal import decoder_layers
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.data.conversation import IGNORE_INDEX, Template
from layerfuse.core.distributed import DistContext
from layerfuse.pipeline.models.llm import DEFAULT_LLM, LLMBundle, build_default_llm, load_llm
from layerfuse.pipeline.training.loader import (
    CacheBatches,
    ConversationFormat,
    FeatureBatch,
    OnCorrupt,
    TokenSettings,
    TrainingSet,
    scan_training_set,
)
from layerfuse.pipeline.training.metrics import MetricsLog
from layerfuse.pipeline.models.run import (
    FUSER_WEIGHTS,
    LLMMode,
    RunModel,
    Stage,
    build_vlm,
    load_fuser_weights,
    load_run_llm,
    read_run_model,
    save_run_model,
)
from layerfuse.pipeline.training.epoch_plan import BatchShape
from layerfuse.core.schedule import warmup_cosine
from layerfuse.core.resume_state import restore_rng
from layerfuse.pipeline.training.state import checkpoint_dir, load_checkpoint, save_checkpoint

Precision = Literal["auto", "fp32", "bf16"]
# LLaVA-1.5's recipe (docs/methods.md#training-recipe): stage 1 at 1e-3 with the LLM frozen, stage 2 at 2e-5 for
# everything
STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {"template": "plain", "lr_fuser": 1e-3, "lr_projector": 1e-3, "lr_llm": 0.0, "llm_mode": "frozen"},
    2: {"template": "v1", "lr_fuser": 2e-5, "lr_projector": 2e-5, "lr_llm": 2e-5, "llm_mode": "full"},
}


class TrainError(StateError):
    """A training run that cannot start or continue as asked (clear message, no traceback in the CLI)."""


@dataclass
class TrainConfig:
    """One phase-two run. None means "the stage's default" (STAGE_DEFAULTS) where it applies. Runtime fields may
    change between a run and its resumption: they do not change what is computed (core/fingerprint.py)."""

    cache: str
    out: str = runtime()
    stage: Stage = 1
    fuser: str = "concat"
    layers: str | None = None  # layer spec; None = the fuser's default
    fuser_options: dict[str, Any] = field(default_factory=dict)  # more fields of the fuser's config dataclass
    llm: str = DEFAULT_LLM  # hub id or folder; "default" = the embedded tiny Llama (random weights)
    llm_default_dir: str | None = None  # where "default" is built [OUT/default-llm]
    init_from: str | None = None  # stage 2: the stage-1 run to start from
    template: Template | None = None
    split: str = "train"
    categories: list[str] | None = None  # only samples of these categories
    max_length: int = 2048
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 32  # global batch (all ranks, all accumulation micro-batches)
    micro_batch_size: int | None = None  # per rank and forward pass [batch_size / world]
    lr_fuser: float | None = None
    lr_projector: float | None = None
    lr_llm: float | None = None
    llm_mode: LLMMode | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    fsdp: bool = False
    attn_implementation: str = "auto"
    seed: int = 0
    buffer_rows: int = 1024  # shuffle buffer (rounded up to whole global batches)
    workers: int = runtime(default=2)
    prefetch: int = runtime(default=2)
    log_every: int = runtime(default=10)
    save_every: int = runtime(default=200)
    device: str = runtime(default="auto")
    progress: bool = runtime(default=True)
    tensorboard: bool = runtime(default=True)
    # torch.compile the LLM's forward (nn.Module.compile: in place, the state dict keeps its names). Opt-in: on the
    # embedded default on CPU it makes a step 1.24x (stage 2) to 1.33x (stage 1) faster after ~10 s of compiling
    # (BENCHMARKS.md "Where make train's time goes"), but its kernels round differently, so a run differs in its last
    # bits from the eager one (and make train's accuracy table is the eager run's)
    compile: bool = runtime(default=False)
    on_corrupt: OnCorrupt = runtime(default="stop")  # a damaged cache row: stop, or skip it and record it (train/damaged.jsonl)

    def resolved(self) -> "TrainConfig":
        """A copy with the stage defaults filled in and the options checked."""
        check_choices(self, name=lambda path: "--" + path.replace("_", "-"), error=TrainError)
        fuser_class(self.fuser)  # an unknown fuser is named as such, not as an option problem
        try:
            fuser_config(self.fuser, **self.fuser_options)  # an unknown option name is an error before anything loads
        except FuserBuildError as e:
            raise TrainError(f"--fuser-opt: {e}") from None
        d = STAGE_DEFAULTS[self.stage]
        c = dataclasses.replace(self, **{k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in d.items()})
        if c.stage == 1 and c.llm_mode != "frozen":
            raise TrainError("stage 1 keeps the LLM frozen (LLaVA pretraining); train the LLM in stage 2")
        if c.max_steps is None and c.epochs <= 0:
            raise TrainError("--epochs must be > 0 (or give --max-steps)")
        return c

    def hash(self) -> str:
        return fingerprint(self)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    samples: int
    final_loss: float | None
    training_samples: int
    skipped: dict[str, int]
    elapsed_s: float
    resumed_from: int = 0
    is_main: bool = True  # rank 0 (or a single process): the one that reports


# -- the objective ------------------------------------------------------------------------------------------------
class TrainObjective(nn.Module):
    """micro-batch -> (summed token cross-entropy, the fuser's aux loss as a batch mean).

    Logits are computed only at positions whose next token is supervised (`logits_to_keep` with the positions
    of the batch), which saves the LM head's work on image and prompt tokens. The module wraps the whole VLM so
    DDP / FSDP see one forward."""

    def __init__(self, vlm: VisionLanguageModel):
        super().__init__()
        self.vlm = vlm
        base = vlm.llm.get_base_model() if hasattr(vlm.llm, "get_base_model") else vlm.llm
        self.keep_logits = "logits_to_keep" in inspect.signature(type(base).forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, has_image: torch.Tensor,
                layers: torch.Tensor, text: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, fused = self.vlm.prepare(input_ids, layers, text, has_image, attention_mask, labels)  # [B, S, d]
        targets = labels[:, 1:]  # logits at t predict the token at t+1
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": attention_mask, "use_cache": False}
        if self.keep_logits:
            keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()  # [K] positions
            logits = self.vlm.llm(**kwargs, logits_to_keep=keep).logits  # [B, K, V]
            targets = targets[:, keep]
        else:
            logits = self.vlm.llm(**kwargs).logits[:, :-1]
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        aux = fused.aux_loss if fused.aux_loss is not None else loss_sum.new_zeros(())
        return loss_sum, aux


# the named regions of one training step in a torch.profiler trace (bench/train_profile.py sums them)
STEP_REGIONS = ("step.forward", "step.backward", "step.clip_grad", "step.optimizer")


def supervised_tokens(batch: FeatureBatch) -> int:
    return int((batch.tokens.labels[:, 1:] != IGNORE_INDEX).sum())


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, trainable: list[nn.Parameter],
               micro: list[FeatureBatch], *, ctx: DistContext, device: torch.device, global_batch: int, max_grad_norm: float,
               autocast: Any) -> tuple[float, float, Any, dict[str, float]]:
    """One optimizer step over this rank's micro-batches -> (this rank's share of the LM loss, of the aux loss,
    gradient norm, learning rates used). The LM loss is normalised by the supervised tokens of the global batch."""
    n_tok = ctx.all_sum(torch.tensor(float(sum(supervised_tokens(m) for m in micro)))).item()
    lm_sum = aux_sum = 0.0
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    for i, mb in enumerate(micro):
        mb = mb.to(device)
        sync = i == len(micro) - 1 or not ddp
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast, record_function(STEP_REGIONS[0]):
            loss_sum, aux = model(mb.tokens.input_ids, mb.tokens.attention_mask, mb.tokens.labels, mb.tokens.has_image,
                                  mb.layers.float(), None if mb.text is None else mb.text.float())
            share = len(mb) / global_batch
            loss = (loss_sum / n_tok + aux * share) * ctx.world
        with record_function(STEP_REGIONS[1]):
            loss.backward()
        lm_sum += loss_sum.item() / n_tok
        aux_sum += aux.item() * share
    with record_function(STEP_REGIONS[2]):
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm) if max_grad_norm > 0 else None
    lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
    with record_function(STEP_REGIONS[3]):
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return lm_sum, aux_sum, grad_norm, lrs


# -- building the model -----------------------------------------------------------------------------------------------
def _default_llm_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.llm_default_dir) if cfg.llm_default_dir else Path(cfg.out) / "default-llm"


def _load_model(cfg: TrainConfig, cache: FeatureCache, device: torch.device, dtype: torch.dtype) -> tuple[VisionLanguageModel, LLMBundle, RunModel]:
    """The VLM this run starts from: a new fuser on the base LLM (stage 1), or a stage-1 run's model (stage 2)."""
    vision = VisionSpec.from_cache(cache)
    if cfg.init_from:
        init = read_run_model(cfg.init_from)
        if cfg.fuser != init.fuser:
            raise TrainError(f"--init-from {cfg.init_from} trained fuser {init.fuser!r}, not {cfg.fuser!r}")
        if cfg.layers is not None and cfg.layers != init.fuser_options.get("layers"):
            raise TrainError(f"--init-from {cfg.init_from} used layers {init.fuser_options.get('layers')!r}, not {cfg.layers!r}")
        if init.vision_spec() != vision:
            raise TrainError(f"--init-from {cfg.init_from} was trained on other features ({init.vision}) than cache {cfg.cache}")
        bundle = load_run_llm(cfg.init_from, init, device=device, dtype=dtype)
        options = {**init.fuser_options, **cfg.fuser_options}
        if init.fuser == "igva" and "mode" not in cfg.fuser_options:
            options["mode"] = "allocator"  # IGVA: uniform average in stage 1, the allocator from stage 2 on
        base_llm = init.llm
    else:
        if cfg.stage == 2:
            raise TrainError("stage 2 starts from a stage-1 run: pass --init-from RUN (the stage-1 output folder)")
        name = cfg.llm
        if name == DEFAULT_LLM:
            name = str(build_default_llm(_default_llm_dir(cfg)).resolve())
        bundle = load_llm(name, dtype=dtype, device=device, attn_implementation=cfg.attn_implementation)
        options = dict(cfg.fuser_options)
        if cfg.layers is not None:
            options["layers"] = cfg.layers
        if cfg.fuser == "igva" and "mode" not in options:
            options["mode"] = "uniform" if cfg.stage == 1 else "allocator"
        base_llm = name
        init = None
    enc = cache.meta["encoder"]
    model = RunModel(
        fuser=cfg.fuser, fuser_options=options, llm=base_llm, vision=asdict(vision), image_token_id=bundle.image_token_id,
        template=cfg.template, max_length=cfg.max_length, stage=cfg.stage, llm_mode=cfg.llm_mode,
        feature_dtype=cache.feature_dtype,
        encoder={"path": _absolute(enc.get("path") or cache.meta["config"]["vision"]["path"]),
                 "revision": cache.meta["config"]["vision"].get("revision"), "pad_to_square": bool(cache.meta["processor"].get("pad_to_square"))},
        text_model={"path": cache.meta["text"].get("path"), "suffixes": cache.meta["text"].get("suffixes", [])},
        cache=cfg.cache,
    )
    torch.manual_seed(cfg.seed)
    vlm = build_vlm(model, bundle)
    if init is not None:
        load_fuser_weights(vlm, Path(cfg.init_from) / FUSER_WEIGHTS)
    return vlm, bundle, model


def _absolute(path: str | None) -> str | None:
    """Local folders as absolute paths (a run must find the encoder from any working directory); ids unchanged."""
    if path and Path(path).exists():
        return str(Path(path).resolve())
    return path


def apply_llm_mode(vlm: VisionLanguageModel, cfg: TrainConfig) -> None:
    llm = vlm.llm
    if cfg.llm_mode == "frozen":
        llm.requires_grad_(False)
    elif cfg.llm_mode == "full":
        llm.requires_grad_(True)
        llm.get_input_embeddings().requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        vlm.fuser.detach()
        torch.manual_seed(cfg.seed + 1)
        targets: Any = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
        vlm.llm = get_peft_model(llm, lora)
        vlm.fuser.attach(vlm.llm)
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(vlm.llm, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
            vlm.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            vlm.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if cfg.llm_mode != "full" and hasattr(vlm.llm, "enable_input_require_grads"):
            vlm.llm.enable_input_require_grads()


def param_groups(objective: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    groups: dict[str, list[nn.Parameter]] = {"fuser": [], "projector": [], "llm": []}
    decay: dict[str, list[nn.Parameter]] = {k: [] for k in groups}
    for name, p in objective.named_parameters():
        if not p.requires_grad:
            continue
        key = "llm" if ".llm." in f".{name}" else ("projector" if "projector" in name else "fuser")
        (decay if p.dim() >= 2 and cfg.weight_decay > 0 else groups)[key].append(p)
    lrs = {"fuser": cfg.lr_fuser, "projector": cfg.lr_projector, "llm": cfg.lr_llm}
    out = []
    for key in groups:
        for params, wd in ((groups[key], 0.0), (decay[key], cfg.weight_decay)):
            if params:
                out.append({"params": params, "lr": lrs[key], "weight_decay": wd, "name": key})
    if not out:
        raise TrainError("nothing to train: every parameter is frozen")
    return out


# -- the run ----------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run (or resume) one phase-two training; under torchrun every rank calls this."""
    cfg = cfg.resolved()
    ctx = DistContext.from_env(backend="auto")
    try:
        return _train(cfg, ctx, resume, overwrite)
    finally:
        ctx.close()


def _prepare_out(cfg: TrainConfig, ctx: DistContext, resume: bool, overwrite: bool) -> Path:
    out = Path(cfg.out)
    train_dir = out / "train"
    saved = train_dir / "config.json"
    if ctx.is_main:
        if saved.exists() and not resume and not overwrite:
            raise TrainError(f"'{out}' already holds a training run; pass --resume to continue it or --overwrite to start over")
        if overwrite and not resume and out.exists():
            for p in (out / "train", out / "config.json", out / "fuser.safetensors", out / "llm", out / "adapter"):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        if resume and saved.exists():
            old = json.loads(saved.read_text())
            if old.get("hash") != cfg.hash():
                diff = fingerprint_diff(old["config"], cfg)
                raise TrainError(f"cannot resume '{out}' with other settings ({', '.join(diff)}); use the original command")
        train_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"hash": cfg.hash(), "config": asdict(cfg)}, indent=1, default=str))
    ctx.barrier()
    return train_dir


def _training_set(cfg: TrainConfig, cache: FeatureCache, bundle: LLMBundle, settings: TokenSettings, train_dir: Path | None, ctx: DistContext) -> TrainingSet:
    rows = cache.select(split=cfg.split)
    if cfg.categories:
        rows = rows[np.isin(cache.categories[rows], cfg.categories)]
    if rows.size == 0:
        cats = sorted(set(cache.categories.tolist()))
        raise TrainError(f"cache {cfg.cache} has no samples in split {cfg.split!r}" + (f" with categories {cfg.categories} (it has {cats})" if cfg.categories else ""))
    ts = scan_training_set(cache, rows, bundle.tokenizer, settings, workers=cfg.workers, progress=cfg.progress and ctx.is_main,
                           on_corrupt=cfg.on_corrupt)
    if ctx.is_main and train_dir is not None:
        with (train_dir / "skipped.jsonl").open("w") as f:
            for s in ts.skipped:
                f.write(json.dumps(s) + "\n")
    return ts


@dataclass
class TrainingSetup:
    """Everything a training loop needs, built as `layerfuse train` builds it (also used by bench/train.py)."""

    vlm: VisionLanguageModel
    bundle: LLMBundle
    run_model: RunModel
    training_set: TrainingSet
    batches: CacheBatches
    model: nn.Module  # the TrainObjective, wrapped in DDP / FSDP under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[nn.Parameter]
    device: torch.device
    autocast: Any
    total_steps: int


def prepare_training(cfg: TrainConfig, ctx: DistContext, train_dir: Path | None = None) -> TrainingSetup:
    """Model (from the LLM or a stage-1 run, LLM mode applied), training set, batches, optimizer and schedule.

    `cfg` must be resolved. Samples the settings cannot use are listed in `train_dir/skipped.jsonl` when given."""
    device = ctx.device(cfg.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    cache = FeatureCache(cfg.cache)
    vlm, bundle, run_model = _load_model(cfg, cache, device, torch.float32)
    max_pos = getattr(bundle.model.config, "max_position_embeddings", None)
    max_length = min(cfg.max_length, int(max_pos)) if max_pos else cfg.max_length
    apply_llm_mode(vlm, cfg)
    fuser = vlm.fuser
    fuser.use_views(cache.views)  # group terms from the cache's stored group means, where it has them
    settings = TokenSettings(cfg.template, fuser.num_visual_tokens, bundle.image_token_id, max_length, bundle.pad_token_id)
    ts = _training_set(cfg, cache, bundle, settings, train_dir, ctx)
    shape = BatchShape(cfg.batch_size, cfg.micro_batch_size or cfg.batch_size // ctx.world, ctx.world)
    batches = CacheBatches(
        cache, ts.rows, ConversationFormat(bundle.tokenizer, settings, fuser.needs_text), layers=fuser.required_inputs, shape=shape, rank=ctx.rank, seed=cfg.seed, buffer_rows=cfg.buffer_rows, workers=cfg.workers, prefetch=cfg.prefetch,
        pin_memory=device.type == "cuda", on_corrupt=cfg.on_corrupt,
    )
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * batches.steps_per_epoch))
    warmup = max(1, round(cfg.warmup_ratio * total))

    if cfg.compile:
        vlm.llm.compile(dynamic=True)
    objective = TrainObjective(vlm)
    if cfg.fsdp:
        if ctx.world < 2:
            raise TrainError("--fsdp shards the model over torchrun ranks; run it under torchrun with 2 or more processes")
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(vlm.llm):
            fully_shard(layer)
        model: nn.Module = fully_shard(objective)
    elif ctx.world > 1:
        model = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        model = objective
    optimizer = torch.optim.AdamW(param_groups(objective, cfg), betas=(0.9, 0.999), eps=1e-8)
    scheduler = warmup_cosine(optimizer, total, warmup)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    return TrainingSetup(vlm, bundle, run_model, ts, batches, model, optimizer, scheduler, trainable, device, autocast, total)


def _train(cfg: TrainConfig, ctx: DistContext, resume: bool, overwrite: bool) -> TrainResult:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    train_dir = _prepare_out(cfg, ctx, resume, overwrite)
    setup = prepare_training(cfg, ctx, train_dir)
    vlm, bundle, run_model, ts, batches = setup.vlm, setup.bundle, setup.run_model, setup.training_set, setup.batches
    model, optimizer, scheduler, trainable, device, total = setup.model, setup.optimizer, setup.scheduler, setup.trainable, setup.device, setup.total_steps
    fuser = vlm.fuser
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)

    start, samples, elapsed0 = 0, 0, 0.0
    state = load_checkpoint(train_dir, ctx.rank) if resume else None
    if state is not None:
        if state.config_hash != cfg.hash():
            raise TrainError(f"the checkpoint in {checkpoint_dir(train_dir)} was written by other settings; start a new run")
        set_model_state_dict(model, state.trainable, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state.optimizer, options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state.scheduler)
        if state.rng is not None:
            restore_rng(state.rng["tensors"], state.rng["plain"])
        start, samples, elapsed0 = state.step, state.samples, state.elapsed_s
    log = MetricsLog(train_dir, enabled=ctx.is_main, resume_step=start if state is not None else None, tensorboard=cfg.tensorboard)
    if ctx.is_main and state is None:
        skipped = ts.skipped_by_reason()
        note = f"; left out {len(ts.skipped)} ({', '.join(f'{n} {r}' for r, n in skipped.items())}), listed in {train_dir / 'skipped.jsonl'}" if ts.skipped else ""
        tqdm.write(f"train: stage {cfg.stage}, {fuser.name} {fuser.selection.describe()}, LLM {run_model.llm} ({cfg.llm_mode}); "
                   f"{len(ts)} samples{note}; {batches.steps_per_epoch} steps/epoch of {cfg.batch_size}, {total} steps")

    def checkpoint(step: int) -> None:
        msd = get_model_state_dict(model, options=full)
        osd = get_optimizer_state_dict(model, optimizer, options=full)
        save_checkpoint(train_dir, step=step, samples=samples, scheduler=scheduler.state_dict(), config_hash=cfg.hash(),
                        elapsed_s=elapsed0 + time.perf_counter() - t0, trainable=msd, optimizer=osd, rank=ctx.rank,
                        is_main=ctx.is_main, barrier=ctx.barrier)

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=start, unit="step", desc=f"train stage {cfg.stage}", disable=not (cfg.progress and ctx.is_main), dynamic_ncols=True)
    window = {"loss": 0.0, "lm": 0.0, "aux": 0.0, "n": 0, "samples": 0, "tokens": 0, "t": time.perf_counter()}
    last_loss = None
    step = start
    recorded = 0
    for step, micro in batches.steps(start, total):
        if len(batches.dropped) > recorded:  # --on-corrupt skip: damaged rows left out of this step
            _record_damaged(train_dir, batches.dropped[recorded:], step, ctx.rank)
            recorded = len(batches.dropped)
        lm_sum, aux_sum, grad_norm, lrs = train_step(model, optimizer, scheduler, trainable, micro, ctx=ctx, device=device,
                                                     global_batch=cfg.batch_size, max_grad_norm=cfg.max_grad_norm, autocast=setup.autocast)
        lm = ctx.all_sum(torch.tensor([lm_sum, aux_sum], dtype=torch.float64))
        samples += cfg.batch_size
        last_loss = float(lm.sum())
        window["loss"] += last_loss
        window["lm"] += float(lm[0])
        window["aux"] += float(lm[1])
        window["n"] += 1
        window["samples"] += cfg.batch_size
        window["tokens"] += int(sum(int(m.tokens.attention_mask.sum()) for m in micro)) * ctx.world
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == total:
            dt = max(1e-9, time.perf_counter() - window["t"])
            if isinstance(grad_norm, torch.Tensor) and hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            row = {"step": done, "epoch": round(done / batches.steps_per_epoch, 4), "loss": window["loss"] / window["n"],
                   "lm_loss": window["lm"] / window["n"], "aux_loss": window["aux"] / window["n"], **lrs,
                   "grad_norm": None if grad_norm is None else float(grad_norm), "samples_per_s": window["samples"] / dt,
                   "tokens_per_s": window["tokens"] / dt, "elapsed_s": elapsed0 + time.perf_counter() - t0}
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{max(lrs.values()):.2e}", samples_s=f"{row['samples_per_s']:.1f}")
            window.update(loss=0.0, lm=0.0, aux=0.0, n=0, samples=0, tokens=0, t=time.perf_counter())
        if cfg.save_every and done % cfg.save_every == 0 and done < total:
            checkpoint(done)
    bar.close()
    if start < total:
        checkpoint(total)
    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        fuser_state = {k[len("vlm.fuser."):]: v for k, v in full_state.items() if k.startswith("vlm.fuser.")}
        if cfg.fsdp and cfg.llm_mode == "full":
            llm_state = {k[len("vlm.llm."):]: v for k, v in full_state.items() if k.startswith("vlm.llm.")}
            vlm.llm.save_pretrained = _with_state(vlm.llm.save_pretrained, llm_state)
        save_run_model(cfg.out, run_model, vlm, bundle, fuser_state=fuser_state)
    log.close()
    ctx.barrier()
    return TrainResult(Path(cfg.out), total, samples, last_loss, len(ts), ts.skipped_by_reason(),
                       elapsed0 + time.perf_counter() - t0, resumed_from=start, is_main=ctx.is_main)


def _record_damaged(train_dir: Path, dropped: list[dict[str, Any]], step: int, rank: int) -> None:
    """Append rows left out as damaged to train/damaged.jsonl (each rank its own file under torchrun) and say so."""
    path = train_dir / ("damaged.jsonl" if rank == 0 else f"damaged.rank{rank}.jsonl")
    with path.open("a") as f:
        for d in dropped:
            f.write(json.dumps({**d, "step": step}) + "\n")
    first = dropped[0]
    tqdm.write(f"train: step {step}: left out {len(dropped)} damaged sample(s) (--on-corrupt skip), e.g. {first['id']}: "
               f"{first['reason']}; listed in {path}")


def _with_state(save_pretrained, state: dict[str, torch.Tensor]):
    """save_pretrained with an explicit (gathered) state dict: FSDP-sharded parameters cannot be saved as they are."""
    return lambda path, **kw: save_pretrained(path, state_dict=state, **kw)
