"""`layerfuse ablate`: run a sweep of fusion variants on one cache, group by group, resumably.

    SweepSpec --expand (registry, meta device)--> variants: valid | invalid (reason)
      --skip finished (DIR/variants/<id>.json with the same key)--> pending
      --plan_groups (seed, token layout, memory)--> groups
      --per group: one shared pass (pipeline/ablation/shared_pass.py) over the cache, then one shared evaluation pass-->
      DIR/variants/<id>.json per finished variant  --pipeline/ablation/report.py-->  DIR/results.{md,csv,json}, DIR/plots/

The output folder:

    sweep.json            the spec, its settings hash, every variant (invalid ones with the reason), the questions
    variants/<id>.json    one finished variant: accuracy per category, loss curve, times, IGVA weights on eval
    results.md/.csv/.json mean +- std over seeds per (fuser, layer set); invalid and unfinished variants listed
    plots/*.png           heatmap, per-category bars, layer-probe curves, IGVA weights per category
    default-llm/          the embedded default LLM (lm mode with --llm default)

Resume: a killed sweep rerun with the same command trains only the variants without a finished file (a group that
was cut short is trained again from its start: the unit of resume is the variant). A rerun that changes only the
variant lists (fusers, layers, seeds, fuser options, probe layers) keeps every finished variant whose key still
matches and trains the new ones; a rerun that changes what a variant computes (mode, steps, batch, learning rates,
categories, cache, ...) is refused unless --overwrite.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from layerfuse.core.errors import StateError
from layerfuse.core.atomic import write_json
from layerfuse.core.hub import load_pretrained
from layerfuse.fusion import LLMSpec, VisionSpec, build_fuser, parse_layers
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.core.distributed import DistContext
from layerfuse.pipeline.models.llm import DEFAULT_LLM, build_default_llm, load_llm
from layerfuse.pipeline.training.epoch_plan import BatchShape
from layerfuse.pipeline.training.loader import CacheBatches, ConversationFormat, scan_training_set
from layerfuse.pipeline.ablation.equivalent import equivalents
from layerfuse.pipeline.ablation.lm import LMVariant, eval_chunks, resolved_lm, token_settings
from layerfuse.pipeline.ablation.probe import ProbeBatches, ProbeVariant, default_workers, prepare_batch, total_steps
from layerfuse.pipeline.ablation.questions import QuestionSet, question_set
from layerfuse.pipeline.ablation.report import write_report
from layerfuse.pipeline.ablation.results import SWEEP_FILE, VARIANTS_DIR
from layerfuse.pipeline.ablation.shared_pass import Alone, PassTiming, Unit, evaluate_together, train_together, zip_seeds
from layerfuse.pipeline.ablation.stacked import StackedProbe, plan_stacks
from layerfuse.pipeline.ablation.sweep import SweepSpec, Variant, expand_sweep
from layerfuse.pipeline.ablation.groups import LLMFootprint, available_memory, pass_bytes, plan_groups, variant_bytes


EVAL_CHUNK = 256


class AblateError(StateError):
    """A sweep that cannot start or continue as asked (clear message, no traceback in the CLI)."""


@dataclass
class AblateOptions:
    """How a sweep runs (none of it changes the results)."""

    out: str
    group_size: int | None = None  # variants per shared pass [from the memory estimate]
    memory_fraction: float = 0.5  # of the available memory the groups may use
    workers: int | None = None  # DataLoader reader processes per seed of a pass [1 below 8 cores, else 2]
    threads: int | None = None  # torch CPU threads [see cpu_threads]
    concurrent: int | None = None  # probe mode on CPU: units of a pass trained at once [see cpu_threads]
    stack: bool | None = None  # probe mode: variants of one architecture as one batched model [on CUDA only]
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True


@dataclass
class AblateResult:
    out: Path
    variants: int  # valid variants in the sweep
    invalid: int
    reused: int  # finished before this run
    trained: int
    groups: int
    wall_s: float
    same: int = 0  # not trained: the same function as another variant (records copied, `same_as`)


# -- the output folder ------------------------------------------------------------------------------------------------
def variant_path(out: Path, v: Variant | str) -> Path:
    return out / VARIANTS_DIR / f"{v if isinstance(v, str) else v.id}.json"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def is_finished(out: Path, v: Variant) -> bool:
    rec = read_json(variant_path(out, v))
    return rec is not None and rec.get("key") == v.key


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def prepare_out(spec: SweepSpec, opts: AblateOptions) -> Path:
    """The output folder; a different sweep in it is refused (or removed with overwrite)."""
    out = Path(opts.out)
    saved = read_json(out / SWEEP_FILE)
    if saved is not None and saved.get("settings_hash") != spec.settings_hash() and not opts.overwrite:
        old, new = _flatten(saved.get("settings", {})), _flatten(spec.settings())
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise AblateError(
            f"'{out}' holds a sweep with other settings (changed: {', '.join(changed) or 'format'}); its variants would not be "
            "comparable. Rerun the original command to continue it, use another --out, or pass --overwrite to start over"
        )
    if opts.overwrite and out.exists():
        for name in (SWEEP_FILE, VARIANTS_DIR, "results.md", "results.csv", "results.json", "plots"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    elif out.exists() and saved is None and any(out.iterdir()) and not (out / VARIANTS_DIR).exists():
        raise AblateError(f"'{out}' exists, is not empty and holds no sweep; choose another --out")
    (out / VARIANTS_DIR).mkdir(parents=True, exist_ok=True)
    return out


# -- scoring ----------------------------------------------------------------------------------------------------------
def score(correct: np.ndarray, categories: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Accuracy per category and overall (micro: over samples; macro: mean of the categories)."""
    per = {}
    for c in names:
        sel = categories == c
        n = int(sel.sum())
        if n:
            k = int(correct[sel].sum())
            per[c] = {"n": n, "correct": k, "accuracy": k / n}
    n, k = int(correct.size), int(correct.sum())
    macro = float(np.mean([r["accuracy"] for r in per.values()])) if per else 0.0
    return {"per_category": per, "overall": {"n": n, "correct": k, "accuracy": k / max(1, n), "macro": macro}}


def igva_labels(v: Variant, vision: VisionSpec) -> list[str]:
    """Names of IGVA's layer groups (the extra terms of the selection), e.g. 'mean(1..6)'."""
    sel = parse_layers(v.layers, vision.num_layers)
    return [str(t[0]) if len(t) == 1 else f"mean({t[0]}..{t[-1]})" for t in sel.extra]


def variant_record(v: Variant, member: Any, timing: PassTiming, eval_timing: PassTiming, group: list[Variant], group_index: int,
                   spec: SweepSpec, questions: QuestionSet, vision: VisionSpec, stacked_with: list[str] | None = None) -> dict[str, Any]:
    correct, weights = member.eval_outputs()
    st = member.stats
    train_s = st.compute_s + timing.read_s / len(group)
    losses = st.losses
    every = max(1, len(losses) // 100)
    rec: dict[str, Any] = {
        "key": v.key,
        "variant": v.to_json(),
        "mode": spec.mode,
        "steps": st.steps,
        "samples": st.samples,
        "batch_size": spec.batch_size,
        "trainable_params": int(member.trainable_params),
        "fuser_params": v.trainable_params,
        "train_s": train_s,
        "compute_s": st.compute_s,
        "samples_per_s": st.samples / train_s if train_s > 0 else None,
        "eval_s": st.eval_s + eval_timing.read_s / len(group),
        "group": {"index": group_index, "size": len(group), "members": [g.id for g in group], "wall_s": timing.wall_s,
                  "read_s": timing.read_s, "stacked_with": stacked_with or []},
        "loss": {"first": losses[0] if losses else None, "last": float(np.mean(losses[-max(1, len(losses) // 20):])) if losses else None,
                 "every": every, "curve": losses[::every]},
        "eval": {"split": spec.eval_split, **score(correct, questions.eval_categories, questions.categories)},
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if weights is not None and v.fuser == "igva":
        ok = ~np.isnan(weights).any(axis=1)
        rec["igva_weights"] = {"groups": igva_labels(v, vision), "categories": [str(c) for c in questions.eval_categories[ok]],
                               "weights": np.round(weights[ok], 5).tolist()}
    return rec


# -- the sweep --------------------------------------------------------------------------------------------------------
def _llm_name(spec: SweepSpec, out: Path) -> str:
    if spec.lm.llm == DEFAULT_LLM:
        return str(build_default_llm(out / "default-llm").resolve())
    return spec.lm.llm


def _llm_spec(spec: SweepSpec, out: Path) -> LLMSpec:
    if spec.mode == "probe":
        return LLMSpec(spec.probe.width)
    config = load_pretrained("LLM config", _llm_name(spec, out), transformers.AutoConfig.from_pretrained)
    return LLMSpec.from_config(config)


def variant_inputs(v: Variant, vision: VisionSpec, llm: LLMSpec, views: list[tuple[int, ...]]) -> list[int | tuple[int, ...]]:
    """What a variant reads from a cache with these group-mean `views`: the fuser's own `required_inputs` after
    `use_views` (built on the meta device), so a fuser that splits a group into its layers (inject / xattn with
    group_mode per_layer) reads the layers, and a group term the cache stores as a view is read as that view."""
    with torch.device("meta"):
        fuser = build_fuser(v.fuser, vision, llm, **v.build_options())
    fuser.use_views(views)
    return list(fuser.required_inputs)


def input_order(inputs: set[int | tuple[int, ...]] | list[int | tuple[int, ...]]) -> list[int | tuple[int, ...]]:
    """Hidden states first (ascending), then group means (ascending), as a cache stores them."""
    return sorted(inputs, key=lambda x: (1, x) if isinstance(x, tuple) else (0, (x,)))


def run_ablation(spec: SweepSpec, opts: AblateOptions) -> AblateResult:
    """Run (or continue) a sweep; writes DIR/variants/*.json as variants finish and the report at the end."""
    t0 = time.perf_counter()
    spec.check()
    cache = FeatureCache(spec.cache)
    vision = VisionSpec.from_cache(cache)
    out = prepare_out(spec, opts)
    try:
        questions = question_set(cache, spec.categories, spec.train_split, spec.eval_split, spec.eval_limit)
    except ValueError as e:
        raise AblateError(str(e)) from None
    llm = _llm_spec(spec, out)
    variants = expand_sweep(spec, vision, llm)
    reads = {v.id: variant_inputs(v, vision, llm, cache.views) for v in variants if v.valid}  # each fuser built once, on meta
    for v in variants:  # a cache of a layer subset (extract --layers) cannot serve every variant
        if missing := sorted(i for i in reads.get(v.id, []) if isinstance(i, int) and i not in cache.stored_layers):
            v.reason = cache.missing_layers_message(missing)
    write_json(out / SWEEP_FILE, indent=1, default=_json_default, data={
        "settings_hash": spec.settings_hash(), "settings": spec.settings(), "spec": asdict(spec),
        "vision": asdict(vision), "variants": [v.to_json() for v in variants],
        "questions": {"categories": questions.categories, "answers": questions.answers, "majority": questions.majority,
                      "chance": questions.chance,
                      "train": int(questions.train_rows.size), "eval": int(questions.eval_rows.size), "eval_split": spec.eval_split},
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    valid = [v for v in variants if v.valid]
    pending = [v for v in valid if not is_finished(out, v)]
    invalid = len(variants) - len(valid)
    same = equivalents(valid, vision, LLMSpec(spec.probe.width)) if spec.mode == "probe" else {}
    to_train = [v for v in pending if v.id not in same]
    device = DistContext().device(opts.device)
    workers = default_workers() if opts.workers is None else opts.workers
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(opts, workers)[0])
    n_groups = 0
    try:
        if to_train:
            runner = _ProbeSweep if spec.mode == "probe" else _LMSweep
            n_groups = runner(spec, opts, cache, vision, reads, questions, out, device, workers).run(to_train, reused=len(valid) - len(pending),
                                                                                              invalid=invalid)
        elif opts.progress and not valid:
            tqdm.write(f"ablate: none of the {invalid} variants is valid (the reasons are in {out / 'results.md'})")
        elif opts.progress and not pending:  # (pending but none to train: the same as finished ones, copied below)
            tqdm.write(f"ablate: all {len(valid)} valid variants of {out} are finished ({invalid} invalid); rebuilding the report")
    finally:
        torch.set_num_threads(threads_before)
    copied = [v for v in pending if v.id in same and write_same_as(out, v, same[v.id])]
    if opts.progress and copied:
        tqdm.write(f"ablate: {len(copied)} variant(s) compute the same function as another and were not trained again: "
                   + ", ".join(f"{v.id} = {same[v.id].id}" for v in copied))
    write_report(out)
    return AblateResult(out, len(valid), invalid, len(valid) - len(pending), len(to_train), n_groups, time.perf_counter() - t0,
                        same=len(copied))


def write_same_as(out: Path, v: Variant, same: Variant) -> bool:
    """Write `v`'s record as a copy of the finished `same`'s, with `same_as` naming it (pipeline/ablation/equivalent.py);
    False when `same` is not finished."""
    rec = read_json(variant_path(out, same))
    if rec is None or rec.get("key") != same.key:
        return False
    write_json(variant_path(out, v), {**rec, "key": v.key, "variant": v.to_json(), "same_as": same.id,
                                      "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
               indent=1, default=_json_default)
    return True


def cpu_threads(opts: AblateOptions, workers: int, units: int = 1) -> tuple[int, int]:
    """(torch threads, units trained at once) on CPU for a pass of `units` units that may run concurrently.

    With two or more such units (probe mode): every core, as concurrent units (`concurrent`, default the cores) of
    cores / concurrent torch threads each: a probe step is a chain of small ops, and a unit on its own thread runs them
    without waiting for the others, while the readers (`workers` processes) are mostly idle; more torch threads inside
    one small op thrash as soon as a core is busy (docs/ablations.md, Threads). Otherwise cores - workers torch threads.
    `threads` overrides the torch threads."""
    cores = os.cpu_count() or 1
    concurrent = min(opts.concurrent or cores, units)
    if concurrent > 1:
        return opts.threads or max(1, cores // concurrent), concurrent
    return opts.threads or max(1, cores - workers), 1


class _Sweep:
    """Shared by both budgets: grouping, the two passes per group, writing each variant's result."""

    def __init__(self, spec: SweepSpec, opts: AblateOptions, cache: FeatureCache, vision: VisionSpec,
                 reads: dict[str, list[int | tuple[int, ...]]], questions: QuestionSet, out: Path, device: torch.device, workers: int):
        # reads: variant id -> what it reads from this cache (variant_inputs)
        self.spec, self.opts, self.cache, self.vision, self.reads, self.questions = spec, opts, cache, vision, reads, questions
        self.out, self.device, self.workers = out, device, workers

    # per budget
    def group_key(self, v: Variant) -> tuple:
        return (v.seed,)

    def cost(self, v: Variant) -> int:
        raise NotImplementedError

    def fixed_cost(self, pending: list[Variant]) -> int:
        union = len({i for v in pending for i in v.required_layers})
        return pass_bytes(union, self.vision, window_rows=max(self.spec.buffer_rows, self.spec.batch_size), buffers=2 * max(1, self.workers) + 1)

    def train_group(self, group: list[Variant], index: int, total_groups: int) -> tuple[list[Unit], PassTiming, PassTiming]:
        """-> the group's units (their members in group order), the training pass's timing, the evaluation pass's."""
        raise NotImplementedError

    def run(self, pending: list[Variant], *, reused: int, invalid: int) -> int:
        budget = int(self.opts.memory_fraction * available_memory(self.device)) - self.fixed_cost(pending)
        groups = plan_groups(pending, key=self.group_key, cost=self.cost, budget=budget, group_size=self.opts.group_size)
        if self.opts.progress:
            how = f"--group-size {self.opts.group_size}" if self.opts.group_size else f"memory budget {max(budget, 0) / 2**30:.1f} GiB"
            tqdm.write(f"ablate ({self.spec.mode}): {len(pending) + reused} valid variants ({invalid} invalid, {reused} finished earlier); "
                       f"training {len(pending)} in {len(groups)} shared pass(es) ({how}) on {self.device}")
        for i, group in enumerate(groups):
            units, timing, ev = self.train_group(group, i, len(groups))
            members = {m.variant.id: (m, [o.variant.id for o in u.members if o is not m]) for u in units for m in u.members}
            for v in group:
                m, stacked_with = members[v.id]
                write_json(variant_path(self.out, v), variant_record(v, m, timing, ev, group, i, self.spec, self.questions, self.vision,
                                                                     stacked_with), indent=1, default=_json_default)
            if self.opts.progress:
                acc = {vid: float(m.eval_outputs()[0].mean()) for vid, (m, _) in members.items()}
                best = max(acc, key=acc.get)
                tqdm.write(f"  group {i + 1}/{len(groups)} ({self.seeds_text(group)}, {len(group)} variants): {timing.wall_s:.0f}s train "
                           f"({timing.read_s:.0f}s waiting for data), {ev.wall_s:.0f}s eval; best {best} {acc[best]:.3f}")
            del members, units
        return len(groups)

    def union(self, group: list[Variant]) -> list[int | tuple[int, ...]]:
        """What the group's shared pass reads: every member's inputs (hidden states, then stored group means)."""
        return input_order({i for v in group for i in self.reads[v.id]})

    @staticmethod
    def seeds_text(group: list[Variant]) -> str:
        seeds = sorted({v.seed for v in group})
        return f"seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"

    def desc(self, group: list[Variant], index: int, total: int, what: str) -> str:
        return f"{what} {index + 1}/{total} ({self.seeds_text(group)}, {len(group)} variants)"


class _ProbeSweep(_Sweep):
    def group_key(self, v: Variant) -> tuple:
        return ()  # seeds share a pass: one loader per seed, zipped

    def fixed_cost(self, pending: list[Variant]) -> int:
        return super().fixed_cost(pending) * len({v.seed for v in pending})  # a loader per seed (at most that many)

    def cost(self, v: Variant) -> int:
        p = self.spec.probe
        head = (self.vision.text_dim + 1) * p.width + 4 * p.width * p.width + 2 * p.width * p.width + p.width * len(self.questions.answers)
        return variant_bytes(v, self.vision, batch=self.spec.batch_size, width=p.width, head_params=head)

    def train_group(self, group: list[Variant], index: int, total_groups: int):
        union = self.union(group)
        need_text = self.vision.text_dim > 0 or any(v.needs_text for v in group)
        seeds = list(dict.fromkeys(v.seed for v in group))
        try:
            loaders = {seed: ProbeBatches(self.cache, self.questions, layers=union, need_text=need_text, batch_size=self.spec.batch_size,
                                          seed=seed, buffer_rows=self.spec.buffer_rows, workers=self.workers) for seed in seeds}
        except ValueError as e:
            raise AblateError(f"{e} (training questions of categories {', '.join(self.questions.categories)})") from None
        first = loaders[seeds[0]]
        total = total_steps(self.spec, first.steps_per_epoch)
        members = [ProbeVariant(v, self.vision, self.spec, self.questions, union, self.device, total) for v in group]
        stack = self.device.type == "cuda" if self.opts.stack is None else self.opts.stack
        units: list[Unit] = [StackedProbe(s) if len(s) > 1 else Alone(s[0]) for s in plan_stacks(members, enabled=stack)]
        concurrent = 1
        if self.device.type == "cpu":
            threads, concurrent = cpu_threads(self.opts, self.workers, sum(not u.exclusive for u in units))
            torch.set_num_threads(threads)
        prep = lambda b: prepare_batch(b, self.device)
        progress = self.opts.progress
        steps = zip_seeds({seed: loader.steps(0, total) for seed, loader in loaders.items()})
        timing = train_together(units, steps, total, prepare=prep, desc=self.desc(group, index, total_groups, "group"), progress=progress,
                                parallel=concurrent)
        n_eval = math.ceil(self.questions.eval_rows.size / EVAL_CHUNK)
        ev = evaluate_together(units, first.eval_batches(EVAL_CHUNK), n_eval, prepare=prep, desc="eval", progress=progress)
        return units, timing, ev


class _LMSweep(_Sweep):
    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.lm = resolved_lm(self.spec.lm)
        self.bundle = load_llm(_llm_name(self.spec, self.out), device=self.device)
        cfg = self.bundle.model.config
        n_params = sum(p.numel() for p in self.bundle.model.parameters())
        trained = self.lm.llm_mode != "frozen"
        lora = self.lm.llm_mode == "lora"
        self.footprint = LLMFootprint(n_params, int(cfg.hidden_size), int(cfg.num_hidden_layers), trained,
                                      trainable_params=(n_params // 100 if lora else n_params) if trained else 0)
        self.training_sets: dict[int, Any] = {}

    def group_key(self, v: Variant) -> tuple:
        return (v.seed, v.num_visual_tokens)

    def cost(self, v: Variant) -> int:
        micro = self.lm.micro_batch_size or self.spec.batch_size
        return variant_bytes(v, self.vision, batch=micro, width=self.footprint.hidden_size, llm=self.footprint,
                             seq_len=v.num_visual_tokens + 64)

    def fixed_cost(self, pending: list[Variant]) -> int:
        shared = 0 if self.footprint.trained else self.footprint.params
        return super().fixed_cost(pending) + shared * 4

    def train_group(self, group: list[Variant], index: int, total_groups: int):
        union = self.union(group)
        need_text = any(v.needs_text for v in group)
        settings = token_settings(self.spec, self.bundle, group[0].num_visual_tokens)
        if settings.num_visual_tokens not in self.training_sets:
            self.training_sets[settings.num_visual_tokens] = scan_training_set(
                self.cache, self.questions.train_rows, self.bundle.tokenizer, settings, workers=self.workers, progress=self.opts.progress)
        ts = self.training_sets[settings.num_visual_tokens]
        micro = self.lm.micro_batch_size or self.spec.batch_size
        try:
            shape = BatchShape(self.spec.batch_size, micro, 1)
            batches = CacheBatches(self.cache, ts.rows, ConversationFormat(self.bundle.tokenizer, settings, need_text), layers=union,
                                   shape=shape, seed=group[0].seed, buffer_rows=self.spec.buffer_rows, workers=self.workers,
                                   pin_memory=self.device.type == "cuda")
        except ValueError as e:
            raise AblateError(str(e)) from None
        total = total_steps(self.spec, batches.steps_per_epoch)
        eval_ids = self.cache.sample_ids(self.questions.eval_rows)
        units = [Alone(LMVariant(v, self.vision, self.spec, self.bundle, union, self.device, total, eval_ids)) for v in group]
        seed = group[0].seed
        timing = train_together(units, zip_seeds({seed: batches.steps(0, total)}), total,
                                prepare=lambda micro: [mb.to(self.device) for mb in micro], desc=self.desc(group, index, total_groups, "group"),
                                progress=self.opts.progress)
        loader, n_eval = eval_chunks(self.cache, self.questions, union, need_text, self.bundle, settings, batch_size=self.spec.batch_size,
                                     workers=self.workers)
        ev = evaluate_together(units, loader, n_eval, desc="eval (greedy)", progress=self.opts.progress)
        return units, timing, ev
