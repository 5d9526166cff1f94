"""`layerfuse ablate` with the fusers from 2024-2026: sweep expansion (built on the meta device) in probe and lm mode,
and a short probe sweep and LM sweep on the tiny cache."""

from __future__ import annotations

import json

from layerfuse.fusion import LLMSpec, VisionSpec
from layerfuse.pipeline.ablation.run import AblateOptions, run_ablation
from layerfuse.pipeline.ablation.sweep import SweepSpec, expand_sweep, spec_from_dict

CATEGORIES = ["colour", "count", "detail", "glyph", "position", "shape"]
VISION = VisionSpec(num_layers=24, hidden_size=64, grid=(8, 8), has_cls=True, text_dim=384)  # the embedded default's features
FUSERS = ["tgif", "tokenpacker", "deepstack", "concat"]
LAYERS = ["tgif", "tokenpacker", "deepstack", "shallow-middle-deep"]


def test_probe_expansion_accepts_them_and_refuses_what_needs_an_llm():
    s = SweepSpec(cache="c", fusers=FUSERS, layers=LAYERS, fuser_options={"tokenpacker": {"heads": 4}}).check()
    by = {(v.fuser, v.layers): v for v in expand_sweep(s, VISION, LLMSpec(s.probe.width))}
    assert all("probe mode has no LLM" in by[("deepstack", l)].reason for l in LAYERS)  # internal
    assert all("probe mode has none" in by[("tgif", l)].reason for l in LAYERS[:3])  # the llm router reads the LLM's embeddings
    assert "group" in by[("tgif", "shallow-middle-deep")].reason  # the base must be one layer
    packer = by[("tokenpacker", "tokenpacker")]
    assert packer.valid and packer.num_visual_tokens == 16 and packer.required_layers == [12, 16, 22, 23]
    smd = by[("concat", "shallow-middle-deep")]
    assert smd.valid and smd.required_layers == list(range(1, 25)) and smd.num_visual_tokens == 64
    assert "group" in by[("tokenpacker", "shallow-middle-deep")].reason  # a group cannot give the point queries
    # the sentence router works without an LLM
    sentence = SweepSpec(cache="c", fusers=["tgif"], layers=["tgif", "3-18-23"], fuser_options={"tgif": {"router": "sentence"}}).check()
    vs = expand_sweep(sentence, VISION, LLMSpec(sentence.probe.width))
    assert all(v.valid and v.needs_text for v in vs) and vs[0].required_layers == list(range(1, 25))


def test_lm_expansion_accepts_every_one():
    s = SweepSpec(cache="c", fusers=FUSERS, layers=["tokenpacker", "deepstack"], mode="lm",
                  fuser_options={"tokenpacker": {"heads": 4}}).check()
    by = {(v.fuser, v.layers): v for v in expand_sweep(s, VISION, LLMSpec(128, 4, 4))}
    assert all(v.valid for v in by.values()), {k: v.reason for k, v in by.items() if not v.valid}
    assert by[("deepstack", "deepstack")].internal and not by[("tgif", "deepstack")].needs_text
    assert by[("tokenpacker", "tokenpacker")].num_visual_tokens == 16


def test_probe_sweep_trains_them(train_cache, tmp_path):
    s = SweepSpec(cache=train_cache, fusers=["tgif", "tokenpacker", "concat"], layers=["tokenpacker", "shallow-middle-deep"], seeds=[0],
                  steps=3, batch_size=8, buffer_rows=16, categories=CATEGORIES,
                  fuser_options={"tgif": {"router": "sentence", "router_dim": 16}, "tokenpacker": {"heads": 4}}).check()
    res = run_ablation(s, AblateOptions(out=str(tmp_path / "probe"), workers=0, progress=False))
    # tgif and tokenpacker x tokenpacker, concat x both; tgif and tokenpacker refuse the group base of shallow-middle-deep
    assert (res.trained, res.invalid) == (4, 2)
    data = json.loads((tmp_path / "probe" / "results.json").read_text())
    done = {(a["fuser"], a["layers"]) for a in data["arms"] if a["status"] == "done"}
    assert ("tokenpacker", "tokenpacker") in done and ("concat", "shallow-middle-deep") in done and ("tgif", "tokenpacker") in done


def test_lm_sweep_trains_them(train_cache, tiny_llm_dir, tmp_path):
    s = spec_from_dict({"cache": train_cache, "mode": "lm", "fusers": ["tgif", "deepstack", "tokenpacker"], "layers": ["tokenpacker"],
                        "steps": 2, "batch_size": 8, "categories": CATEGORIES, "eval_limit": 4,
                        "fuser_options": {"tgif": {"router_dim": 16}, "deepstack": {"llm_layers": "0,1,1"}, "tokenpacker": {"heads": 4}},
                        "lm": {"llm": str(tiny_llm_dir), "max_length": 256, "max_new_tokens": 2}})
    res = run_ablation(s, AblateOptions(out=str(tmp_path / "lm"), workers=0, progress=False))
    assert (res.trained, res.invalid) == (3, 0)
    data = json.loads((tmp_path / "lm" / "results.json").read_text())
    assert {a["fuser"]: a["status"] for a in data["arms"]} == {"tgif": "done", "deepstack": "done", "tokenpacker": "done"}
