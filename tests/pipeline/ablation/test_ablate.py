"""Ablations (pipeline/ablation/sweep.py, questions.py, probe.py, shared_pass.py, variant_groups.py, ablate.py, ablate_lm.py,
report.py, plots.py; `layerfuse ablate` / `layerfuse report`; bench/ablate.py) on the tiny test cache.

The shared-pass tests compare a group against its variants trained alone at the level of the weights; the resume
test kills a real `layerfuse ablate` process with SIGKILL and compares the resumed sweep with an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from layerfuse.fusion import LLMSpec, VisionSpec, build_fuser
from layerfuse.pipeline.ablation.groups import (
    available_memory,
    plan_groups,
    variant_bytes,
)
from layerfuse.pipeline.ablation.probe import (
    ProbeBatches,
    ProbeHead,
    ProbeModel,
    ProbeVariant,
    prepare_batch,
)
from layerfuse.pipeline.ablation.questions import UNKNOWN, question_set
from layerfuse.pipeline.ablation.results import load_results
from layerfuse.pipeline.ablation.run import AblateError, AblateOptions, run_ablation, variant_inputs
from layerfuse.pipeline.ablation import shared_pass
from layerfuse.pipeline.ablation.shared_pass import Alone, MemberStats, train_together, zip_seeds
from layerfuse.pipeline.ablation.sweep import (
    STUDY_LAYERS,
    LMSettings,
    SweepError,
    SweepSpec,
    Variant,
    expand_sweep,
    read_sweep_file,
    spec_from_dict,
    split_layer_sets,
    sweep_from_inputs,
)
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.cli import main
from layerfuse.pipeline.training.evaluate import answer_counts, chance_levels

from tests.support import REPO, layerfuse_cmd

CATEGORIES = ["colour", "count", "detail", "glyph", "position", "shape"]  # the tiny cache is too small for the closed-answer rule
VISION = VisionSpec(num_layers=24, hidden_size=64, grid=(8, 8), has_cls=True, text_dim=384)  # the embedded default's features


def spec(cache: str, **kw) -> SweepSpec:
    base = {"cache": cache, "fusers": ["concat"], "layers": ["3-18-23"], "seeds": [0], "steps": 4, "batch_size": 8, "buffer_rows": 16,
            "categories": CATEGORIES}
    base.update(kw)
    return SweepSpec(**base).check()


def opts(out: Path, **kw) -> AblateOptions:
    return AblateOptions(out=str(out), workers=kw.pop("workers", 0), progress=False, **kw)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- sweep spec and expansion -----------------------------------------------------------------------------------------
def test_expansion_reports_invalid_combinations_with_the_registry_reason():
    s = SweepSpec(cache="c", fusers=["single", "concat", "mmfuser", "igva", "inject", "xattn"], layers=["18", "3-18-23", "former", "penultimate"],
                  seeds=[0, 1]).check()
    variants = expand_sweep(s, VISION, LLMSpec(s.probe.width))
    assert len(variants) == 6 * 4 * 2 and len({v.id for v in variants}) == len(variants) and len({v.key for v in variants}) == len(variants)
    by = {(v.fuser, v.layers): v for v in variants if v.seed == 0}
    assert "exactly one layer" in by[("single", "3-18-23")].reason  # single takes one layer: the multi-layer presets are invalid
    assert by[("single", "penultimate")].valid and by[("single", "penultimate")].required_layers == [23]
    assert "at least 2 layer groups" in by[("igva", "18")].reason and "at least 2" in by[("igva", "former")].reason
    assert "K/V layers" in by[("mmfuser", "penultimate")].reason
    assert all("probe mode has no LLM" in by[(f, l)].reason for f in ("inject", "xattn") for l in s.layers)
    concat = by[("concat", "3-18-23")]
    assert concat.valid and concat.required_layers == [3, 18, 23] and concat.trainable_params > 0 and concat.num_visual_tokens == 64
    assert by[("igva", "3-18-23")].needs_text and by[("igva", "3-18-23")].options == {"allocator_dim": 128, "mode": "allocator"}
    # lm mode: the internal fusers are valid once there is an LLM
    lm = SweepSpec(cache="c", fusers=["inject", "xattn", "igva"], layers=["3-18-23"], mode="lm").check()
    lm_vs = {v.fuser: v for v in expand_sweep(lm, VISION, LLMSpec(128, 4, 4))}
    assert lm_vs["inject"].valid and lm_vs["xattn"].valid and lm_vs["inject"].internal
    assert lm_vs["igva"].options["mode"] == "uniform"  # stage 1, as `layerfuse train` does
    # what a variant reads from a cache that stores group means: the fuser's own inputs (inject splits former into
    # its layers: the stored mean is not what it needs; concat reads the stored mean)
    lm2 = SweepSpec(cache="c", fusers=["inject", "concat"], layers=["former"], mode="lm").check()
    former = tuple(range(1, 13))
    reads = {v.fuser: variant_inputs(v, VISION, LLMSpec(128, 4, 4), [former]) for v in expand_sweep(lm2, VISION, LLMSpec(128, 4, 4))}
    assert reads["inject"] == [*range(1, 13), 23] and reads["concat"] == [23, former]
    # the layer study adds one single-layer probe per hidden state
    study = SweepSpec(cache="c", probe_layers=[0, 12, 24], seeds=[3]).check()
    sv = expand_sweep(study, VISION, LLMSpec(128))
    assert [(v.layers, v.required_layers, v.study) for v in sv] == [("0,", [0], STUDY_LAYERS), ("12,", [12], STUDY_LAYERS), ("24,", [24], STUDY_LAYERS)]
    # a variant's key changes with what it computes, not with the rest of the sweep
    more = SweepSpec(cache="c", fusers=["concat", "single"], layers=["3-18-23", "all"], seeds=[0, 1]).check()
    key = lambda sp: {v.id: v.key for v in expand_sweep(sp, VISION, LLMSpec(128))}
    assert key(more)["concat__3-18-23__s0"] == key(s)["concat__3-18-23__s0"]
    assert key(spec("c", fusers=["concat"], steps=5, categories=None))["concat__3-18-23__s0"] != key(s)["concat__3-18-23__s0"]


def test_sweep_files_yaml_and_toml_and_command_line_overrides(tmp_path):
    yaml_text = """
cache: some/cache
mode: probe
fusers: [single, concat, igva]
layers: [penultimate, 3-18-23, "4,12,20", "12,", 18]
seeds: 2
steps: 30
fuser_options:
  igva: {allocator_dim: 64, entropy_lambda: 0.02}
probe: {width: 64, lr: 0.002}
"""
    toml_text = """
cache = "some/cache"
mode = "probe"
fusers = ["single", "concat", "igva"]
layers = ["penultimate", "3-18-23", "4,12,20", "12,", 18]
seeds = 2
steps = 30
[fuser_options.igva]
allocator_dim = 64
entropy_lambda = 0.02
[probe]
width = 64
lr = 0.002
"""
    (tmp_path / "s.yaml").write_text(yaml_text)
    (tmp_path / "s.toml").write_text(toml_text)
    a, b = spec_from_dict(read_sweep_file(tmp_path / "s.yaml")), spec_from_dict(read_sweep_file(tmp_path / "s.toml"))
    assert a == b
    assert a.layers == ["penultimate", "3-18-23", "4,12,20", "12,", "18"] and a.seeds == [0, 1] and a.steps == 30
    assert a.probe.width == 64 and a.fuser_options["igva"] == {"allocator_dim": 64, "entropy_lambda": 0.02}
    # the command line overrides the file; ';' separates layer sets that contain commas
    c = sweep_from_inputs(str(tmp_path / "s.yaml"), {"steps": 7, "seeds": "0,5", "layers": "3-18-23;4,12,20", "probe.lr": 0.01},
                          ["igva.allocator_dim=32", "mmfuser.heads=4"])
    assert c.steps == 7 and c.seeds == [0, 5] and c.layers == ["3-18-23", "4,12,20"] and c.probe.lr == 0.01 and c.probe.width == 64
    assert c.fuser_options == {"igva": {"allocator_dim": 32, "entropy_lambda": 0.02}, "mmfuser": {"heads": 4}}
    assert split_layer_sets("18,3-18-23,former") == ["18", "3-18-23", "former"]
    # the probe study resolves 'all' against the cache's hidden states
    d = sweep_from_inputs(None, {"cache": "x", "probe_layers": "all"}, [], num_states=lambda path: 25)
    assert d.probe_layers == list(range(25)) and not d.fusers
    # a variant-list change keeps the settings hash; a budget change does not
    assert c.settings_hash() != a.settings_hash() and spec_from_dict({**read_sweep_file(tmp_path / "s.yaml"), "seeds": 5}).settings_hash() == a.settings_hash()
    for bad, msg in [("fusers: [concat]\nlayers: [18]\nbogus: 1\n", "'cache' is missing; unknown key 'bogus' (allowed: cache, fusers,"),
                     ("cache: c\nfusers: [concat]\nlayers: [18]\nmode: fast\n", "bad.yaml': mode: Input should be 'probe' or 'lm' (got 'fast')"),
                     ("cache: c\nfusers: [concat]\nlayers: [18]\nsteps: 2.5\n", "steps: Input should be a valid integer"),
                     ("cache: c\nfusers: [concat]\nlayers: [18]\nseeds: 0\n", "seeds: a count of seeds must be >= 1 (got 0)"),
                     ("cache: c\nfusers: [concat]\nlayers: [18]\nlm: {stage: 3}\n", "lm.stage: Input should be 1 or 2 (got 3)"),
                     ("cache: c\nfusers: [nope]\nlayers: [18]\n", "unknown fuser(s) nope"),
                     ("cache: c\nfusers: [igva]\nlayers: [all]\nfuser_options: {igva: {allocator_dm: 3}}\n",
                      "fuser_options.igva: fuser 'igva' has no option(s) allocator_dm; it takes: allocator_blocks, allocator_dim,"),
                     ("cache: c\nfusers: [concat]\n", "give the layer sets"),
                     ("cache: c\nfusers: [concat]\nlayers: [18]\nseeds: [1, 1]\n", "seeds repeat"),
                     ("cache: c\nfusers: [concat]\nlayers: [18]\nprobe: {widht: 3}\n", "unknown key 'probe.widht' (allowed: width, heads, lr, weight_decay)"),
                     ("cache: c\nprobe_layers: [0, 99]\n", "probe_layers: layer 99 does not exist: the cache stores hidden states 0..24"),
                     ("cache: c\nfusers: [concat\n", "cannot read sweep file")]:
        (tmp_path / "bad.yaml").write_text(bad)
        with pytest.raises(SweepError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            sweep_from_inputs(str(tmp_path / "bad.yaml"), {}, [], num_states=lambda path: 25)



def test_a_variant_record_reads_back_strictly():
    v = next(v for v in expand_sweep(SweepSpec(cache="c", fusers=["igva"], layers=["3-18-23"]).check(), VISION, LLMSpec(128)))
    assert Variant.from_json(json.loads(json.dumps(v.to_json()))) == v
    with pytest.raises(SweepError, match=r"sweep.json: variants\[0\]: unknown key 'weight' \(allowed: fuser, layers, seed, options,"):
        Variant.from_json({**v.to_json(), "weight": 1}, where="sweep.json: variants[0]")
    with pytest.raises(SweepError, match="'seed' is missing"):
        Variant.from_json({k: x for k, x in v.to_json().items() if k != "seed"})
    with pytest.raises(SweepError, match="id 'igva__18__s0' is not the variant's"):
        Variant.from_json({**v.to_json(), "id": "igva__18__s0"})

# -- groups -----------------------------------------------------------------------------------------------------------
def test_groups_keep_one_seed_and_fit_the_memory_budget():
    s = SweepSpec(cache="c", fusers=["single", "concat", "mmfuser", "igva"], layers=["penultimate", "3-18-23", "all"], seeds=[0, 1]).check()
    valid = [v for v in expand_sweep(s, VISION, LLMSpec(128)) if v.valid]
    cost = lambda v: variant_bytes(v, VISION, batch=32, width=128)
    assert all(cost(v) > 16 * v.trainable_params for v in valid)
    assert cost(next(v for v in valid if v.fuser == "igva")) > cost(next(v for v in valid if v.fuser == "single"))
    everything = plan_groups(valid, key=lambda v: (v.seed,), cost=cost, budget=10 * sum(map(cost, valid)))
    assert [len(g) for g in everything] == [len(valid) // 2] * 2  # one pass per seed when everything fits
    assert all(len({v.seed for v in g}) == 1 for g in everything)
    budget = 2 * max(map(cost, valid))
    tight = plan_groups(valid, key=lambda v: (v.seed,), cost=cost, budget=budget)
    assert len(tight) > 2 and all(sum(map(cost, g)) <= budget or len(g) == 1 for g in tight)
    assert sorted(v.id for g in tight for v in g) == sorted(v.id for v in valid)
    assert [len(g) for g in plan_groups(valid, key=lambda v: (v.seed,), cost=cost, budget=0, group_size=3)] == [3, 3, 2, 3, 3, 2]
    assert available_memory(torch.device("cpu")) > 0


# -- the probe --------------------------------------------------------------------------------------------------------
def test_probe_head_learns_a_question_dependent_answer():
    """Each of 4 patches carries a class; the question embedding says which patch (by position) is asked about. The
    probe (a `single` fuser + the answer head) must learn to look at the right patch: chance is 1/6, and a
    question-blind or position-blind probe cannot do better either."""
    g = torch.Generator().manual_seed(0)
    vision = VisionSpec(num_layers=2, hidden_size=16, grid=(2, 2), has_cls=True, text_dim=8)
    protos, qembs = torch.randn(6, 16, generator=g), torch.randn(4, 8, generator=g)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        classes = torch.randint(0, 6, (n, 4), generator=g)
        which = torch.randint(0, 4, (n,), generator=g)
        layers = torch.zeros(n, 1, 5, 16)
        layers[:, 0, 1:] = protos[classes] + 0.1 * torch.randn(n, 4, 16, generator=g)
        return layers, qembs[which], classes[torch.arange(n), which]

    torch.manual_seed(0)
    model = ProbeModel(build_fuser("single", vision, LLMSpec(32), layers="1,"), ProbeHead(32, 8, 6, heads=4, num_tokens=4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        layers, text, labels = data(64)
        logits, _ = model(layers, text)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad()
    layers, text, labels = data(512)
    with torch.no_grad():
        acc = (model(layers, text)[0].argmax(-1) == labels).float().mean().item()
    assert acc > 0.9, acc


def test_questions_and_probe_batches(train_cache):
    cache = FeatureCache(train_cache)
    qs = question_set(cache, CATEGORIES)
    assert qs.train_rows.size > 50 and qs.eval_rows.size > 0 and set(qs.eval_categories) <= set(CATEGORIES)
    assert all(cache.splits[qs.train_rows] == "train") and all(cache.splits[qs.eval_rows] == "val")
    assert qs.answers and (qs.eval_labels >= UNKNOWN).all() and set(qs.majority) == set(qs.eval_categories)
    # chance: 1 / the category's distinct training answers, the same numbers `layerfuse eval` prints
    train_answers = [qs.answers[i] for i in qs.train_labels]
    train_cats = cache.categories[qs.train_rows]
    assert qs.chance == {c: 1 / len({a for a, cc in zip(train_answers, train_cats) if cc == c}) for c in set(train_cats.tolist())}
    eval_chance = chance_levels(answer_counts(cache, "train"))
    assert all(qs.chance[c] == pytest.approx(eval_chance[c]) for c in qs.chance)
    convs = cache.conversations(qs.train_rows[:5])
    assert [qs.answers[i] for i in qs.train_labels[:5]] == [c[1]["value"].strip().lower().rstrip(".") for c in convs]
    with pytest.raises(ValueError, match="no category nope"):
        question_set(cache, ["nope"])
    batches = ProbeBatches(cache, qs, layers=[3, 18, 23], need_text=True, batch_size=8, seed=1, workers=0)
    got = [(s, b) for s, b in batches.steps(0, batches.steps_per_epoch + 2)]
    assert [s for s, _ in got] == list(range(batches.steps_per_epoch + 2))
    _, b = got[3]
    assert b.layers.shape == (8, 3, 65, 64) and b.text.shape == (8, 384)
    assert torch.equal(b.layers, cache.features(b.rows.numpy(), [3, 18, 23]))
    assert torch.equal(b.labels, torch.from_numpy(qs.labels_of(b.rows.numpy())))
    again = [b.rows for _, b in ProbeBatches(cache, qs, layers=[0], need_text=False, batch_size=8, seed=1, workers=0).steps(0, 4)]
    assert all(torch.equal(x, y[1].rows) for x, y in zip(again, got))  # the order depends on the seed only
    other = [b.rows for _, b in ProbeBatches(cache, qs, layers=[0], need_text=False, batch_size=8, seed=2, workers=0).steps(0, 4)]
    assert not all(torch.equal(x, y) for x, y in zip(again, other))


# -- the shared pass --------------------------------------------------------------------------------------------------
def _train(cache: FeatureCache, s: SweepSpec, qs, group, steps: int):
    union = sorted({i for v in group for i in v.required_layers})
    batches = ProbeBatches(cache, qs, layers=union, need_text=True, batch_size=s.batch_size, seed=group[0].seed, buffer_rows=16, workers=0)
    members = [ProbeVariant(v, VisionSpec.from_cache(cache), s, qs, union, torch.device("cpu"), steps) for v in group]
    train_together([Alone(m) for m in members], zip_seeds({group[0].seed: batches.steps(0, steps)}), steps,
                   prepare=lambda b: prepare_batch(b, torch.device("cpu")), progress=False)
    return {m.variant.id: m for m in members}


def test_shared_pass_reads_once_and_trains_like_separate_runs(train_cache, monkeypatch):
    cache = FeatureCache(train_cache)
    s = spec(train_cache, fusers=["concat", "igva", "mmfuser"], layers=["3-18-23", "mmfuser"], fuser_options={"mmfuser": {"heads": 4}})
    qs = question_set(cache, CATEGORIES)
    group = [v for v in expand_sweep(s, VisionSpec.from_cache(cache), LLMSpec(128)) if v.valid]
    assert {v.fuser for v in group} == {"concat", "igva", "mmfuser"} and len(group) == 6
    reads: list[list[int]] = []
    original = FeatureCache.features

    def spy(self, rows, layers=None):
        reads.append(list(layers))
        return original(self, rows, layers)

    monkeypatch.setattr(FeatureCache, "features", spy)
    shared = _train(cache, s, qs, group, steps=5)
    union = sorted({i for v in group for i in v.required_layers})
    assert reads and all(r == union for r in reads)  # one read of the union per window, for every variant
    shared_reads, reads[:] = len(reads), []
    for v in group:
        alone = _train(cache, s, qs, [v], steps=5)[v.id]
        a, b = shared[v.id].model.state_dict(), alone.model.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{v.id} {k}")
        assert shared[v.id].stats.losses == pytest.approx(alone.stats.losses, abs=1e-6)
    assert len(reads) == len(group) * shared_reads  # one after another: every variant reads the cache itself


def test_concurrent_seeds_without_a_step_barrier_train_like_separate_runs(train_cache):
    """Units of three seeds on 2 threads (no barrier at each step: each unit at its own pace) end exactly as each
    seed's variant trained alone."""
    cache = FeatureCache(train_cache)
    s = spec(train_cache, fusers=["concat"], layers=["3-18-23"], seeds=[0, 1, 2])
    qs = question_set(cache, CATEGORIES)
    vision = VisionSpec.from_cache(cache)
    group = [v for v in expand_sweep(s, vision, LLMSpec(128)) if v.valid]
    assert sorted(v.seed for v in group) == [0, 1, 2]

    def run(variants, parallel):
        loaders = {v.seed: ProbeBatches(cache, qs, layers=[3, 18, 23], need_text=True, batch_size=8, seed=v.seed, buffer_rows=16, workers=0)
                   for v in variants}
        members = [ProbeVariant(v, vision, s, qs, [3, 18, 23], torch.device("cpu"), 6) for v in variants]
        train_together([Alone(m) for m in members], zip_seeds({seed: ld.steps(0, 6) for seed, ld in loaders.items()}), 6,
                       prepare=lambda b: prepare_batch(b, torch.device("cpu")), progress=False, parallel=parallel)
        return {m.variant.id: m for m in members}

    together = run(group, parallel=2)
    for v in group:
        alone = run([v], parallel=1)[v.id]
        assert together[v.id].stats.steps == 6 and together[v.id].stats.losses == alone.stats.losses
        a, b = together[v.id].model.state_dict(), alone.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), v.id


class _Uneven:
    """A unit whose steps take `cost` seconds; it records the steps it ran and the furthest lead over the others."""

    exclusive = False

    def __init__(self, name: str, cost: float, log: dict, fail_at: int | None = None):
        self.name, self.cost, self.log, self.fail_at = name, cost, log, fail_at
        self.members = [SimpleNamespace(variant=SimpleNamespace(seed=0), stats=MemberStats())]

    def train_step(self, batches):
        step = batches[0]
        if step == self.fail_at:
            raise RuntimeError(f"{self.name} fails at step {step}")
        time.sleep(self.cost)
        self.log[self.name].append(step)
        return [0.0]


def test_unbarriered_pass_keeps_each_units_order_bounds_the_lead_and_raises_errors(monkeypatch):
    monkeypatch.setattr(shared_pass, "_size", lambda batch: 1)
    log = {"slow": [], "fast1": [], "fast2": []}
    units = [_Uneven("slow", 0.02, log), _Uneven("fast1", 0.001, log), _Uneven("fast2", 0.001, log)]
    lead = []
    steps = ((i, {0: i}) for i in range(20))

    def watched():
        for item in steps:
            lead.append(item[0] - len(log["slow"]))  # how far reading is ahead of the slowest unit
            yield item

    timing = train_together(units, watched(), 20, progress=False, parallel=2)
    assert all(v == list(range(20)) for v in log.values()) and timing.steps == 20
    assert 1 < max(lead) <= shared_pass.LEAD_STEPS  # no barrier at each step; the batches held are bounded
    broken = [_Uneven("ok", 0.001, {"ok": []}), _Uneven("bad", 0.001, {"bad": []}, fail_at=3)]
    with pytest.raises(RuntimeError, match="bad fails at step 3"):
        train_together(broken, ((i, {0: i}) for i in range(20)), 20, progress=False, parallel=2)


def test_lm_mode_shared_llm_with_internal_fuser_trains_like_separate_runs(train_cache, tiny_llm_dir):
    """lm mode with the LLM frozen: one LLM for the group, an internal fuser's hooks attached only while it runs."""
    from layerfuse.fusion.internal import decoder_layers
    from layerfuse.pipeline.ablation.lm import LMVariant, token_settings
    from layerfuse.pipeline.models.llm import load_llm
    from layerfuse.pipeline.training.epoch_plan import BatchShape
    from layerfuse.pipeline.training.loader import (
        CacheBatches,
        ConversationFormat,
        scan_training_set,
    )

    cache = FeatureCache(train_cache)
    vision = VisionSpec.from_cache(cache)
    s = spec(train_cache, fusers=["concat", "inject", "xattn"], layers=["3-18-23"], mode="lm", lm=LMSettings(llm=str(tiny_llm_dir), max_length=256))
    qs = question_set(cache, CATEGORIES)
    bundle = load_llm(str(tiny_llm_dir))
    base = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    group = [v for v in expand_sweep(s, vision, LLMSpec.from_config(bundle.model.config)) if v.valid]
    assert [v.fuser for v in group] == ["concat", "inject", "xattn"]
    settings = token_settings(s, bundle, 64)
    ts = scan_training_set(cache, qs.train_rows, bundle.tokenizer, settings, progress=False)

    def run(members_of):
        union = sorted({i for v in members_of for i in v.required_layers})
        batches = CacheBatches(cache, ts.rows, ConversationFormat(bundle.tokenizer, settings, False), layers=union,
                               shape=BatchShape(8, 4, 1), seed=0, buffer_rows=16, workers=0)
        ms = [LMVariant(v, vision, s, bundle, union, torch.device("cpu"), 3, cache.sample_ids(qs.eval_rows)) for v in members_of]
        train_together([Alone(m) for m in ms], zip_seeds({0: batches.steps(0, 3)}), 3, progress=False)
        return {m.variant.id: m for m in ms}

    shared = run(group)
    for v in group:
        alone = run([v])[v.id]
        a, b = shared[v.id].vlm.fuser.state_dict(), alone.vlm.fuser.state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{v.id} {k}")
        assert not any(layer._forward_pre_hooks for layer in decoder_layers(bundle.model))  # hooks are off the shared LLM between steps
    assert all(torch.equal(v, base[k]) for k, v in bundle.model.state_dict().items())  # the frozen LLM is untouched


# -- whole sweeps -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_sweep(train_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ablate") / "sweep"
    s = spec(train_cache, fusers=["single", "concat", "igva"], layers=["penultimate", "3-18-23", "former"], seeds=[0, 1], probe_layers=[0, 12, 24],
             steps=6)
    res = run_ablation(s, opts(out))
    # concat x penultimate is single x penultimate (one layer, same init): trained once per seed
    assert (res.variants, res.invalid, res.trained, res.reused, res.same) == (2 * (1 + 3 + 1) + 2 * 3, 2 * 4, 14, 0, 2)
    return out


def test_sweep_writes_tables_plots_and_igva_weights(finished_sweep):
    out = finished_sweep
    md = (out / "results.md").read_text()
    assert "Finished: **16 of 16**" in md and "## Invalid combinations" in md and "## Layer probe" in md
    assert "| single | `3-18-23` | single reads exactly one layer" in md and "| igva | `former` | igva weighs at least 2 layer groups" in md
    data = json.loads((out / "results.json").read_text())
    chance = data["questions"]["chance"]
    assert set(chance) == set(data["questions"]["categories"]) and all(0 < x <= 1 for x in chance.values())
    row = "| chance (1 / answers) |  |  |  | " + " | ".join(f"{chance[c]:.3f}" for c in data["questions"]["categories"]) + " |"
    assert row in md and md.index("| majority baseline |") < md.index(row)  # under the majority baseline, as in the README
    arms = {(a["fuser"], a["layers"]): a for a in data["arms"]}
    concat = arms[("concat", "3-18-23")]
    assert concat["status"] == "done" and concat["seeds_done"] == [0, 1] and concat["overall"]["n"] == 2
    runs = [r for r in data["runs"] if r["fuser"] == "concat" and r["layers"] == "3-18-23"]
    accs = [r["overall"]["accuracy"] for r in runs]
    assert concat["overall"]["mean"] == pytest.approx(np.mean(accs)) and concat["overall"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert concat["trainable_params"] > 0 and concat["samples_per_s"]["mean"] > 0 and concat["train_s"]["mean"] > 0
    assert arms[("single", "3-18-23")]["status"] == "invalid" and "exactly one layer" in arms[("single", "3-18-23")]["reason"]
    w = arms[("igva", "3-18-23")]["igva_weights"]
    n_eval = data["questions"]["eval"]
    assert w["groups"] == ["3", "18"] and len(w["weights"]) == 2 * n_eval == len(w["categories"])
    assert np.allclose(np.asarray(w["weights"]).sum(axis=1), 1.0, atol=1e-3)
    probe = data["layer_probe"]
    assert probe["layers"] == [0, 12, 23, 24]  # the study's 0, 12, 24 and `single penultimate` (hs[23])
    for vals in probe["normalised"].values():
        finite = [v for v in vals if v is not None]
        assert not finite or max(finite) == pytest.approx(1.0)
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 * 3 + 3 and rows[0].startswith("fuser,layers,study,status")
    for name in ("heatmap_overall", "categories", "layer_probe", "igva_weights"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{name}.png" in md
    rec = json.loads((out / "variants" / "igva__3-18-23__s1.json").read_text())
    assert rec["steps"] == 6 and rec["samples"] == 48 and len(rec["loss"]["curve"]) == 6 and rec["group"]["size"] == 14  # seeds share a pass


def test_equivalent_variants_train_once_and_say_so(finished_sweep):
    out = finished_sweep
    for seed in (0, 1):
        single = json.loads((out / "variants" / f"single__penultimate__s{seed}.json").read_text())
        concat = json.loads((out / "variants" / f"concat__penultimate__s{seed}.json").read_text())
        assert concat["same_as"] == f"single__penultimate__s{seed}" and "same_as" not in single
        assert concat["eval"] == single["eval"] and concat["loss"] == single["loss"] and concat["variant"]["fuser"] == "concat"
    md = (out / "results.md").read_text()
    assert "## Equivalent variants (trained once)" in md and "| concat | `penultimate` | single penultimate |" in md
    assert "| concat | `penultimate` (same as single penultimate) |" in md
    arms = {(a["fuser"], a["layers"]): a for a in json.loads((out / "results.json").read_text())["arms"]}
    assert arms[("concat", "penultimate")]["same_as"] == "single penultimate" and arms[("single", "penultimate")]["same_as"] is None


def test_equivalence_needs_the_same_function_and_init():
    from layerfuse.pipeline.ablation.equivalent import equivalents

    s = SweepSpec(cache="c", fusers=["single", "concat", "igva"], layers=["penultimate", "23,", "3-18-23", "igva", "1:6,7:12,13:18,19:24,23"],
                  seeds=[0, 1]).check()
    variants = expand_sweep(s, VISION, LLMSpec(s.probe.width))
    same = {k: v.id for k, v in equivalents(variants, VISION, LLMSpec(s.probe.width)).items()}
    assert same == {f"{f}__{l}__s{i}": f"single__penultimate__s{i}" for i in (0, 1) for f, l in
                    [("single", "23_"), ("concat", "penultimate"), ("concat", "23_")]} | {
                        f"{f}__1-6_7-12_13-18_19-24_23__s{i}": f"{f}__igva__s{i}" for i in (0, 1) for f in ("concat", "igva")}  # the preset written out
    other = SweepSpec(cache="c", fusers=["single", "concat"], layers=["penultimate"], fuser_options={"concat": {"projector_depth": 1}}).check()
    assert not equivalents(expand_sweep(other, VISION, LLMSpec(128)), VISION, LLMSpec(128))  # another projector: another function


def test_report_rebuilds_from_a_partial_sweep(finished_sweep, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(finished_sweep, out)
    for name in ("results.md", "results.csv", "results.json"):
        (out / name).unlink()
    shutil.rmtree(out / "plots")
    for vid in ("concat__3-18-23__s1", "igva__3-18-23__s0", "igva__3-18-23__s1", "single__12___s0", "single__12___s1"):
        (out / "variants" / f"{vid}.json").unlink()
    r = CliRunner().invoke(main, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert "11 of 16 variants finished (partial" in r.output
    md = (out / "results.md").read_text()
    assert "## Not finished" in md and "| igva | `3-18-23` | 0/2 |" in md and "| concat | `3-18-23` | 1/2 |" in md
    data = json.loads((out / "results.json").read_text())
    arms = {(a["fuser"], a["layers"]): a for a in data["arms"]}
    assert arms[("concat", "3-18-23")]["status"] == "partial" and arms[("concat", "3-18-23")]["overall"]["std"] is None
    assert arms[("igva", "3-18-23")]["status"] == "pending" and "igva_weights" not in arms[("igva", "3-18-23")]
    assert data["layer_probe"]["layers"] == [0, 23, 24] and "Not finished yet: hs[12]" in md
    assert (out / "plots" / "heatmap_overall.png").exists() and not (out / "plots" / "igva_weights.png").exists()
    res = load_results(out)
    assert len(res.records) == 11


def test_rerun_reuses_finished_variants_and_refuses_other_settings(train_cache, tmp_path):
    out = tmp_path / "s"
    first = run_ablation(spec(train_cache, fusers=["concat"], layers=["3-18-23"], steps=3), opts(out))
    assert (first.trained, first.reused) == (1, 0)
    before = (out / "variants" / "concat__3-18-23__s0.json").read_text()
    again = run_ablation(spec(train_cache, fusers=["concat"], layers=["3-18-23"], steps=3), opts(out))
    assert (again.trained, again.reused) == (0, 1) and (out / "variants" / "concat__3-18-23__s0.json").read_text() == before
    more = run_ablation(spec(train_cache, fusers=["concat", "single"], layers=["3-18-23", "penultimate"], steps=3), opts(out))
    assert (more.trained, more.reused, more.invalid, more.same) == (1, 1, 1, 1)  # only the new variants train (single = concat on penultimate)
    with pytest.raises(AblateError, match=r"other settings \(changed: steps\)"):
        run_ablation(spec(train_cache, fusers=["concat"], layers=["3-18-23"], steps=4), opts(out))
    fresh = run_ablation(spec(train_cache, fusers=["concat"], layers=["3-18-23"], steps=4), opts(out, overwrite=True))
    assert (fresh.trained, fresh.reused) == (1, 0) and not (out / "variants" / "single__penultimate__s0.json").exists()


def test_lm_mode_sweep_end_to_end(train_cache, tiny_llm_dir, tmp_path):
    s = spec_from_dict({"cache": train_cache, "mode": "lm", "fusers": ["concat", "inject"], "layers": ["3-18-23"], "steps": 2, "batch_size": 8,
                        "categories": CATEGORIES, "eval_limit": 6, "lm": {"llm": str(tiny_llm_dir), "max_length": 256, "max_new_tokens": 4}})
    res = run_ablation(s, opts(tmp_path / "lm"))
    assert (res.trained, res.invalid) == (2, 0)
    data = json.loads((tmp_path / "lm" / "results.json").read_text())
    assert {a["fuser"]: a["status"] for a in data["arms"]} == {"concat": "done", "inject": "done"}
    assert all(r["overall"]["n"] == 6 for r in data["runs"])
    assert data["settings"]["lm"]["template"] == "v1" and data["settings"]["mode"] == "lm"


# -- the command line -------------------------------------------------------------------------------------------------
def test_cli_ablate_and_its_errors_are_clean(train_cache, tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(main, ["ablate", "--cache", train_cache, "--steps", "2", "--batch-size", "8", "--categories", ",".join(CATEGORIES),
                                  "--workers", "0", "--quiet", "--fusers", "concat,xattn", "--layers", "3-18-23", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 variant(s) trained" in r.output and "1 invalid" in r.output and "results.md" in r.output
    (tmp_path / "bad.toml").write_text('cache = "x"\nfusers = ["concat"]\nlayers = ["18"]\nsteps = "many"\n')
    for args, msg in [
        (["--fusers", "concat,nope", "--layers", "18"], "unknown fuser(s) nope"),
        (["--fusers", "concat"], "give the layer sets"),
        (["--fusers", "concat", "--layers", "18", "--fuser-opt", "heads=4"], "FUSER.KEY=VALUE"),
        (["--fusers", "concat", "--layers", "18", "--probe-layers", "99"], "probe_layers: layer 99 does not exist"),
        (["--fusers", "concat", "--layers", "18", "--steps", "3", "--batch-size", "8"], "other settings (changed: steps)"),
        (["--sweep", str(tmp_path / "bad.toml")], "bad.toml' with the command line: steps: Input should be a valid integer"),
        (["--sweep", str(tmp_path / "missing.yaml")], "does not exist"),
    ]:
        r = CliRunner().invoke(main, ["ablate", "--cache", train_cache, "--categories", ",".join(CATEGORIES), "--quiet", *args, "--out", str(out)])
        assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output, (args, r.output)
    r = CliRunner().invoke(main, ["ablate", "--cache", str(tmp_path / "nocache"), "--fusers", "concat", "--layers", "18", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "no layerfuse cache" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code != 0 and "not an ablation folder" in r.output and "Traceback" not in r.output
    for cmd in (["ablate"], ["report"]):
        r = CliRunner().invoke(main, [*cmd, "--help"])
        assert r.exit_code == 0 and "Example" in r.output


# -- real processes ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_sweep_then_rerun_finishes_with_the_same_results(train_cache, tmp_path):
    def cmd(out: Path) -> list[str]:
        return layerfuse_cmd("ablate", "--cache", train_cache, "--fusers", "concat,single,igva", "--layers", "3-18-23,all,penultimate",
                             "--seeds", "2", "--steps", "15", "--batch-size", "8", "--categories", ",".join(CATEGORIES),
                             "--group-size", "1", "--workers", "1", "--quiet", "--out", str(out))

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(cmd(ref), check=True, env=env(), capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd(killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    variants = killed / "variants"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if variants.exists() and len(list(variants.glob("*.json"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in variants.glob("*.json"))
    assert 2 <= len(finished) < 12 and not (killed / "results.md").exists()
    partial = CliRunner().invoke(main, ["report", str(killed)])
    assert partial.exit_code == 0 and "(partial" in partial.output
    done = subprocess.run(cmd(killed), check=False, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(finished)} finished earlier" in done.stdout
    a, b = json.loads((ref / "results.json").read_text()), json.loads((killed / "results.json").read_text())
    runs = lambda d: {r["id"]: (r["overall"], r["per_category"], r["steps"], r["final_loss"]) for r in d["runs"]}
    assert runs(a) == runs(b) and len(runs(a)) == 12  # the deterministic parts, variant by variant
    strip = lambda d: [{k: v for k, v in arm.items() if k not in ("train_s", "samples_per_s")} for arm in d["arms"]]
    assert strip(a) == strip(b)
    for name in finished:  # what was finished before the kill is kept as it was
        assert (killed / "variants" / name).stat().st_mtime < (killed / "results.md").stat().st_mtime


@pytest.mark.slow
def test_bench_quick_writes_its_section(tmp_path):
    out = tmp_path / "BENCH.md"
    out.write_text("# layerfuse benchmarks\n\n## Other section\n\nkept\n")
    r = subprocess.run([sys.executable, "bench/ablate.py", "--quick", "--out", str(out)], check=False, cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "## Other section\n\nkept" in text and "## Ablations: shared pass (`bench/ablate.py`)" in text
    assert "Sequential / shared training wall:" in text and "identical" in text and "| shared pass (group of 3) | 1 |" in text
