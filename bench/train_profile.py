"""Where `make train`'s time goes, and what makes its steps faster.

`make train` is stage 1 (100 steps: fuser + projector, the LLM frozen) and stage 2 (1200 steps: everything trained)
of concat 3-18-23 with the embedded default LLM on the default cache, batch 32, fp32 on CPU, then `layerfuse eval`.
This benchmark builds a built-in cache with `run_extract` (or takes --cache) and the trainer with `prepare_training`
(what `layerfuse train` runs), with make train's stage settings, and

1. profiles steps of each stage under torch.profiler after warm-up: the share of the step's named regions
   (pipeline/training/train.py STEP_REGIONS: forward, backward, gradient clipping, optimizer) and of the wait for the
   loader, and the ops that take the most time;
2. times the same steps (batches collected beforehand, so only the step is measured) with each candidate change,
   interleaved in rounds from the same starting weights: the step as `layerfuse train` runs it, AdamW with
   foreach=True, AdamW with fused=True, and the LLM under torch.compile (dynamic shapes; its compile time apart).
   Each candidate's losses are compared with the current step's (max |difference| over the timed steps), since a
   change that moves the numbers moves the accuracy table too.

    python bench/train_profile.py --out BENCHMARKS.md [--quick] [--cache DIR] [--rounds 5] [--steps 20]
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from layerfuse.core.benchmarks import bench_parser, command, machine, write_section  # noqa: E402
from layerfuse.core.distributed import DistContext  # noqa: E402
from layerfuse.pipeline.cache.extract import ExtractConfig, run_extract  # noqa: E402
from layerfuse.pipeline.cache.reader import FeatureCache  # noqa: E402
from layerfuse.pipeline.training.train import STEP_REGIONS, TrainConfig, TrainingSetup, prepare_training, train, train_step  # noqa: E402

SECTION = "## Where make train's time goes (`bench/train_profile.py`)"
LOADER_WAIT = "loader wait"
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


def make_train_config(cache: str, work: Path, stage: int) -> TrainConfig:
    """make train's settings for `stage` (Makefile: concat 3-18-23, stage 2 at lr 1e-3 everywhere from a stage-1 run:
    here one of a single step, as the weights do not change a step's cost)."""
    lr = {} if stage == 1 else dict(lr_fuser=1e-3, lr_projector=1e-3, lr_llm=1e-3, init_from=str(work / "stage1-run"))
    return TrainConfig(cache=cache, out=str(work / f"stage{stage}"), stage=stage, fuser="concat", layers="3-18-23", llm="default",
                       llm_default_dir=str(work / "llm"), categories=["caption"] if stage == 1 else None, max_steps=1200,
                       progress=False, tensorboard=False, **lr).resolved()


def step_fn(setup: TrainingSetup, cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            trainable: list[torch.nn.Parameter]) -> Callable[[list], float]:
    ctx = DistContext()

    def step(micro: list) -> float:
        lm, aux, _, _ = train_step(model, optimizer, scheduler, trainable, micro, ctx=ctx, device=setup.device, global_batch=cfg.batch_size,
                                   max_grad_norm=cfg.max_grad_norm, autocast=setup.autocast)
        return lm + aux
    return step


def profile_stage(setup: TrainingSetup, cfg: TrainConfig, warmup: int, steps: int) -> dict[str, Any]:
    """Regions' share of the wall time over `steps` steps read from the cache (the loader as training uses it)."""
    step = step_fn(setup, cfg, setup.model, setup.optimizer, setup.scheduler, setup.trainable)
    it = setup.batches.steps(0, warmup + steps)
    for _ in range(warmup):
        step(next(it)[1])
    wait = 0.0
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t = time.perf_counter()
            micro = next(it)[1]
            wait += time.perf_counter() - t
            step(micro)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    regions = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in STEP_REGIONS}
    regions[LOADER_WAIT] = wait
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    self_total = sum(e.self_cpu_time_total for e in events) or 1
    return {"wall": wall, "steps": steps, "regions": regions,
            "ops": [(e.key, e.count / steps, e.self_cpu_time_total / self_total) for e in ops]}


# -- candidates ---------------------------------------------------------------------------------------------------------
def _adamw_like(optimizer: torch.optim.Optimizer, state: dict[str, Any], **flags: Any) -> torch.optim.Optimizer:
    """A new AdamW over `optimizer`'s parameter groups, in `state` (a copy: load_state_dict keeps the loaded tensors,
    which the steps then update in place), with the implementation `flags` (load_state_dict would restore the saved
    groups' foreach / fused, so they are set after it)."""
    groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused")} for g in optimizer.param_groups]
    opt = torch.optim.AdamW(groups, **flags)
    opt.load_state_dict(copy.deepcopy(state))
    for g in opt.param_groups:
        g.update({"foreach": None, "fused": None, **flags})
    return opt


CANDIDATES: dict[str, dict[str, Any]] = {
    "current": {},
    "AdamW foreach": {"optimizer": dict(foreach=True)},
    "AdamW fused": {"optimizer": dict(fused=True)},
    "torch.compile(LLM)": {"compile": True},
}


def compare_candidates(setup: TrainingSetup, cfg: TrainConfig, held: list[list], rounds: int, names: list[str]) -> dict[str, Any]:
    """Steps/s of each candidate over the `held` steps, interleaved in `rounds`, each round from the same weights."""
    start_model = copy.deepcopy(setup.model.state_dict())
    start_optim = copy.deepcopy(setup.optimizer.state_dict())
    start_sched = copy.deepcopy(setup.scheduler.state_dict())
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {}
    compile_s: float | None = None
    compiled = None
    repeat = 0.0
    for r in range(rounds):
        for name in names:
            spec = CANDIDATES[name]
            setup.model.load_state_dict(start_model)
            opt = _adamw_like(setup.optimizer, start_optim, **spec.get("optimizer", {}))
            setup.scheduler.load_state_dict(copy.deepcopy(start_sched))
            setup.scheduler.optimizer = opt
            llm = setup.model.vlm.llm
            if spec.get("compile"):
                if compiled is None:
                    compiled = torch.compile(llm, dynamic=True)
                    t = time.perf_counter()
                    setup.model.vlm.llm = compiled
                    step_fn(setup, cfg, setup.model, opt, setup.scheduler, setup.trainable)(held[0])  # compiles
                    compile_s = time.perf_counter() - t
                    setup.model.vlm.llm = llm  # the state dict's names are the plain module's
                    setup.model.load_state_dict(start_model)
                    opt = _adamw_like(setup.optimizer, start_optim)
                    setup.scheduler.load_state_dict(copy.deepcopy(start_sched))
                    setup.scheduler.optimizer = opt
                setup.model.vlm.llm = compiled
            step = step_fn(setup, cfg, setup.model, opt, setup.scheduler, setup.trainable)
            torch.manual_seed(r)  # every candidate of a round draws the same random numbers (if the step draws any)
            seen = []
            t = time.perf_counter()
            for micro in held:
                seen.append(step(micro))
            times[name].append(len(held) / (time.perf_counter() - t))
            setup.model.vlm.llm = llm
            losses.setdefault(name, seen)
            if name == "current" and r > 0:  # the step run again: how far the losses move with nothing changed
                repeat = max(repeat, max(abs(a - b) for a, b in zip(seen, losses["current"])))
    setup.scheduler.optimizer = setup.optimizer
    setup.model.load_state_dict(start_model)
    ref = losses["current"]
    return {"steps_per_s": {n: statistics.median(v) for n, v in times.items()}, "all": times, "compile_s": compile_s,
            "loss_diff": {n: max(abs(a - b) for a, b in zip(v, ref)) for n, v in losses.items()},
            "repeat_diff": repeat if rounds > 1 else None}


# -- report -------------------------------------------------------------------------------------------------------------
def render(cmd: str, stages: dict[int, dict[str, Any]], data: str, rounds: int, steps: int) -> str:
    lines = [SECTION, "", f"Command: `{cmd}`  ", f"Date: {datetime.date.today().isoformat()}  ", f"Machine: {machine()}  ",
             (f"Settings: make train's (concat 3-18-23, the embedded default LLM, batch 32, fp32 on CPU; stage 1 LLM frozen, "
              f"stage 2 everything trained at 1e-3) on {data}; profile over steps read from the cache after "
              f"warm-up; candidates on {steps} held steps, {rounds} interleaved rounds from the same weights, median steps/s."),
             "", "### Where a step's time goes", "",
             "| stage | steps/s (from the cache, profiled) | " + " | ".join(r.split(".", 1)[-1] for r in STEP_REGIONS) + f" | {LOADER_WAIT} | top ops (self CPU share, calls per step) |",
             "|---|---|" + "---|" * (len(STEP_REGIONS) + 2)]
    for stage, s in stages.items():
        p = s["profile"]
        share = lambda k: f"{p['regions'].get(k, 0.0) / p['wall']:.0%}"  # noqa: E731
        ops = ", ".join(f"{k.removeprefix('aten::')} {f:.0%} ({c:.0f})" for k, c, f in p["ops"][:5])
        lines.append(f"| {stage} | {p['steps'] / p['wall']:.2f} | " + " | ".join(share(r) for r in STEP_REGIONS) + f" | {share(LOADER_WAIT)} | {ops} |")
    lines += ["", "### Candidates (the same held steps, interleaved)", "",
              "| stage | candidate | steps/s (median) | / current | max \\|loss - current's\\| over the steps | note |", "|---|---|---|---|---|---|"]
    for stage, s in stages.items():
        c = s["candidates"]
        base = c["steps_per_s"]["current"]
        for name, v in c["steps_per_s"].items():
            note = f"compile {c['compile_s']:.0f} s once" if name.startswith("torch.compile") and c["compile_s"] else ""
            if name == "current" and c["repeat_diff"] is not None:
                note = f"the same step again: {c['repeat_diff']:.2e}"
            lines.append(f"| {stage} | {name} | {v:.2f} | **{v / base:.2f}** | {c['loss_diff'][name]:.2e} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = bench_parser(__doc__, quick="tiny run (numbers not meaningful)")
    ap.add_argument("--cache", default=None, help="a cache to train from [a built-in one extracted here]")
    ap.add_argument("--n", type=int, default=None, help="built-in samples when building the cache [2000; 200 with --quick]")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the candidates [5; 1 with --quick]")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per candidate and round [20; 2 with --quick]")
    ap.add_argument("--profile-steps", type=int, default=None, help="profiled steps per stage [30; 3 with --quick]")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help=f"comma list of {', '.join(CANDIDATES)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    args = ap.parse_args()
    n = args.n or (200 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 5)
    steps = args.steps or (2 if args.quick else 20)
    prof_steps = args.profile_steps or (3 if args.quick else 30)
    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if unknown := [c for c in names if c not in CANDIDATES]:
        ap.error(f"unknown candidate(s) {unknown}; known: {list(CANDIDATES)}")
    if "current" not in names:
        names.insert(0, "current")
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-train-profile-")))
        cache = args.cache
        if cache is None:
            cache = str(work / "cache")
            run_extract(ExtractConfig(out=cache, run_dir=str(work / "run"), builtin=n, seed=0, progress=False))
        stages = {}
        for stage in (1, 2):
            cfg = make_train_config(cache, work, stage)
            if stage == 2:  # the stage-1 run stage 2 starts from
                train(dataclasses.replace(make_train_config(cache, work, 1), out=str(work / "stage1-run"), max_steps=1))
            setup = prepare_training(cfg, DistContext())
            prof = profile_stage(setup, cfg, warmup=3 if not args.quick else 1, steps=prof_steps)
            held = [micro for _, micro in setup.batches.steps(0, steps)]
            stages[stage] = {"profile": prof, "candidates": compare_candidates(setup, cfg, held, rounds, names)}
            print(f"train_profile: stage {stage}: {stages[stage]['candidates']['steps_per_s']}", flush=True)
        data = f"a {n}-sample built-in cache" if args.cache is None else f"the cache {args.cache} ({FeatureCache(cache).status.size} samples)"
        section = render(command(), stages, data, rounds, steps)
    write_section(args.out, SECTION, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
