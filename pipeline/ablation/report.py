"""`layerfuse report DIR`: the tables of a sweep (finished or partial), rebuilt from its folder alone.

    DIR/sweep.json + DIR/variants/*.json
      -> arms: one row per (fuser, layer set): mean +- std over the finished seeds of the accuracy per category and
         overall, trainable parameters, train time, samples/s; invalid arms with the registry's reason; unfinished
         ones marked
      -> the layer-probe table (SPEC section 8): accuracy per hidden state per category, raw and normalised per
         category (divided by the category's best layer)
      -> DIR/results.md, results.csv, results.json and the plots (pipeline/ablation/plots.py) in DIR/plots/
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layerfuse.core.atomic import write_json, write_text
from layerfuse.pipeline.ablation.sweep import STUDY_LAYERS, Variant


SWEEP_FILE = "sweep.json"
VARIANTS_DIR = "variants"


class ReportError(RuntimeError):
    """DIR is not a sweep folder (or its sweep.json cannot be read)."""


@dataclass
class Stat:
    mean: float | None
    std: float | None  # sample std over seeds; None with fewer than two
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        v = [x for x in values if x is not None]
        if not v:
            return cls(None, None, 0)
        return cls(float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None, len(v))

    def text(self, digits: int = 3) -> str:
        if self.mean is None:
            return "-"
        return f"{self.mean:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.std is not None else "")


@dataclass
class Arm:
    """One (fuser, layer set) of the sweep, over its seeds."""

    fuser: str
    layers: str
    study: str
    status: str  # done | partial | pending | invalid
    seeds: list[int]
    seeds_done: list[int]
    reason: str | None = None
    describe: str = ""
    required_layers: list[int] = field(default_factory=list)
    overall: Stat = field(default_factory=lambda: Stat(None, None, 0))
    macro: Stat = field(default_factory=lambda: Stat(None, None, 0))
    per_category: dict[str, Stat] = field(default_factory=dict)
    trainable_params: int | None = None
    train_s: Stat = field(default_factory=lambda: Stat(None, None, 0))
    samples_per_s: Stat = field(default_factory=lambda: Stat(None, None, 0))
    igva_weights: dict[str, Any] | None = None  # groups, categories, weights [n, K] pooled over seeds

    @property
    def name(self) -> str:
        return f"{self.fuser} {self.layers}"


@dataclass
class SweepResults:
    out: Path
    sweep: dict[str, Any]
    variants: list[Variant]
    records: dict[str, dict[str, Any]]  # variant id -> finished record (key matching the sweep)
    arms: list[Arm]

    @property
    def categories(self) -> list[str]:
        return list(self.sweep["questions"]["categories"])

    @property
    def majority(self) -> dict[str, float]:
        return dict(self.sweep["questions"]["majority"])


def load_results(out: str | Path) -> SweepResults:
    out = Path(out)
    path = out / SWEEP_FILE
    if not path.is_file():
        raise ReportError(f"'{out}' is not an ablation folder: {SWEEP_FILE} is missing (run `layerfuse ablate --out {out}` first)")
    try:
        sweep = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"cannot read {path}: {e}") from None
    variants = [Variant.from_json(v) for v in sweep["variants"]]
    records = {}
    for v in variants:
        p = out / VARIANTS_DIR / f"{v.id}.json"
        if v.valid and p.is_file():
            try:
                rec = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue
            if rec.get("key") == v.key:
                records[v.id] = rec
    return SweepResults(out, sweep, variants, records, _arms(variants, records, list(sweep["questions"]["categories"])))


def _arms(variants: list[Variant], records: dict[str, dict[str, Any]], categories: list[str]) -> list[Arm]:
    by_arm: dict[tuple[str, str], list[Variant]] = {}
    for v in variants:
        by_arm.setdefault(v.arm, []).append(v)
    arms = []
    for (fuser, layers), vs in by_arm.items():
        first = vs[0]
        arm = Arm(fuser, layers, first.study, "invalid", [v.seed for v in vs], [], reason=first.reason, describe=first.describe,
                  required_layers=list(first.required_layers))
        if first.valid:
            recs = [records[v.id] for v in vs if v.id in records]
            arm.seeds_done = [r["variant"]["seed"] for r in recs]
            arm.status = "done" if len(recs) == len(vs) else "partial" if recs else "pending"
            arm.overall = Stat.of([r["eval"]["overall"]["accuracy"] for r in recs])
            arm.macro = Stat.of([r["eval"]["overall"]["macro"] for r in recs])
            arm.per_category = {c: Stat.of([r["eval"]["per_category"][c]["accuracy"] for r in recs if c in r["eval"]["per_category"]])
                                for c in categories}
            arm.trainable_params = recs[0]["trainable_params"] if recs else first.trainable_params
            arm.train_s = Stat.of([r["train_s"] for r in recs])
            arm.samples_per_s = Stat.of([r["samples_per_s"] for r in recs])
            weights = [r["igva_weights"] for r in recs if r.get("igva_weights")]
            if weights:
                arm.igva_weights = {"groups": weights[0]["groups"], "categories": [c for w in weights for c in w["categories"]],
                                    "weights": [x for w in weights for x in w["weights"]]}
        arms.append(arm)
    return arms


# -- the layer-probe table --------------------------------------------------------------------------------------------
def layer_probe_table(res: SweepResults) -> dict[str, Any] | None:
    """{layers: [i...], categories, raw: {cat: [mean per layer]}, normalised: {...}, overall: [...]}; None without a study.

    Every single-layer `single` arm counts (explicit `i,` specs, the layer study's), by its one hidden state."""
    arms = [a for a in res.arms if a.fuser == "single" and a.status in ("done", "partial") and len(a.required_layers) == 1]
    if not any(a.study == STUDY_LAYERS for a in res.arms):
        return None
    by_layer: dict[int, Arm] = {}
    for a in arms:
        by_layer.setdefault(a.required_layers[0], a)
    layers = sorted(by_layer)
    raw = {c: [by_layer[i].per_category[c].mean for i in layers] for c in res.categories}
    normalised = {}
    for c, vals in raw.items():
        best = max((v for v in vals if v is not None), default=None)
        normalised[c] = [None if v is None or not best else v / best for v in vals]
    planned = sorted({a.required_layers[0] for a in res.arms if a.study == STUDY_LAYERS and a.required_layers})
    return {"layers": layers, "planned": planned, "categories": res.categories, "raw": raw, "normalised": normalised,
            "overall": [by_layer[i].overall.mean for i in layers]}


# -- writing ----------------------------------------------------------------------------------------------------------
def _settings_line(res: SweepResults) -> str:
    s = res.sweep["settings"]
    q = res.sweep["questions"]
    budget = f"{s['steps']} steps" if s.get("steps") else f"{s['epochs']:g} epochs"
    mode = s["mode"]
    extra = (f"probe width {s['probe']['width']}, lr {s['probe']['lr']:g}" if mode == "probe"
             else f"LLM {s['lm']['llm']}, stage {s['lm']['stage']}, template {s['lm']['template']}")
    return (f"Cache `{s['cache']}` · mode **{mode}** ({extra}) · {budget} of batch {s['batch_size']} · seeds "
            f"{', '.join(map(str, res.sweep['spec']['seeds']))} · trained on {q['train']} `{s['train_split']}` questions, "
            f"evaluated on {q['eval']} `{q['eval_split']}` questions ({', '.join(q['categories'])})")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def markdown(res: SweepResults, plots: list[Path]) -> str:
    cats = res.categories
    valid = [a for a in res.arms if a.status != "invalid"]
    done = sum(len(a.seeds_done) for a in valid)
    total = sum(len(a.seeds) for a in valid)
    invalid = [a for a in res.arms if a.status == "invalid"]
    parts = ["# Ablation results", "", _settings_line(res), "",
             f"Finished: **{done} of {total}** trainable variants"
             + (f" ({len(invalid)} fuser x layer-set combinations are invalid, listed below)." if invalid else ".")
             + ("" if done == total else " The sweep is partial: rerun its command to finish it."), ""]
    sweep_arms = [a for a in valid if a.study != STUDY_LAYERS]
    if sweep_arms:
        rows = []
        for a in sorted(sweep_arms, key=lambda a: -(a.overall.mean if a.overall.mean is not None else -1)):
            seeds = f"{len(a.seeds_done)}/{len(a.seeds)}"
            rows.append([a.fuser, f"`{a.layers}`", seeds, f"**{a.overall.text()}**", *(a.per_category[c].text() for c in cats),
                         _params(a.trainable_params), a.train_s.text(1), a.samples_per_s.text(0)])
        rows.append(["majority baseline", "", "", _overall_majority(res), *(f"{res.majority.get(c, 0):.3f}" for c in cats), "", "", ""])
        parts += ["## Accuracy per variant (mean ± std over seeds)", "",
                  _table(["fuser", "layers", "seeds", "overall", *cats, "trainable params", "train s", "samples/s"], rows), "",
                  ("Overall = over all evaluation questions. Train s = the variant's own compute plus its share of the pass's data "
                   "wait; samples/s = training samples / train s."), ""]
    table = layer_probe_table(res)
    if table:
        hdr = ["category", *(f"hs[{i}]" for i in table["layers"])]
        fmt = lambda x: "-" if x is None else f"{x:.2f}"
        raw = [[c, *(fmt(x) for x in table["raw"][c])] for c in table["categories"]]
        raw.append(["**overall**", *(fmt(x) for x in table["overall"])])
        norm = [[c, *(fmt(x) for x in table["normalised"][c])] for c in table["categories"]]
        missing = sorted(set(table["planned"]) - set(table["layers"]))
        parts += ["## Layer probe: one `single` probe per hidden state", "",
                  "Accuracy (mean over seeds):", "", _table(hdr, raw), "",
                  "Normalised per category (divided by the category's best layer, as in SPEC section 8):", "", _table(hdr, norm), ""]
        if missing:
            parts += [f"Not finished yet: hs{missing}.", ""]
    if invalid:
        parts += ["## Invalid combinations", "", _table(["fuser", "layers", "reason"], [[a.fuser, f"`{a.layers}`", a.reason or ""] for a in invalid]), ""]
    unfinished = [a for a in valid if a.status in ("pending", "partial")]
    if unfinished:
        parts += ["## Not finished", "", _table(["fuser", "layers", "seeds finished"],
                                                 [[a.fuser, f"`{a.layers}`", f"{len(a.seeds_done)}/{len(a.seeds)}"] for a in unfinished]), ""]
    igva = [a for a in valid if a.igva_weights]
    if igva:
        parts += ["## IGVA group weights on the evaluation split (mean per category)", ""]
        for a in igva:
            w = np.asarray(a.igva_weights["weights"])
            c = np.asarray(a.igva_weights["categories"])
            rows = [[cat, *(f"{x:.3f}" for x in w[c == cat].mean(axis=0))] for cat in cats if (c == cat).any()]
            parts += [f"`{a.layers}`:", "", _table(["category", *a.igva_weights["groups"]], rows), ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    return "\n".join(parts)


def _overall_majority(res: SweepResults) -> str:
    q = res.sweep["questions"]
    # weighted by evaluation questions per category, from the finished records when available
    counts = {}
    for rec in res.records.values():
        counts = {c: r["n"] for c, r in rec["eval"]["per_category"].items()}
        break
    if not counts:
        return "-"
    n = sum(counts.values())
    return f"{sum(q['majority'].get(c, 0) * k for c, k in counts.items()) / n:.3f}"


def _stat_json(s: Stat) -> dict[str, Any]:
    return asdict(s)


def results_json(res: SweepResults) -> dict[str, Any]:
    arms = []
    for a in res.arms:
        d = {"fuser": a.fuser, "layers": a.layers, "study": a.study, "status": a.status, "reason": a.reason, "describe": a.describe,
             "required_layers": a.required_layers, "seeds": a.seeds, "seeds_done": a.seeds_done}
        if a.status != "invalid":
            d.update({"overall": _stat_json(a.overall), "macro": _stat_json(a.macro),
                      "per_category": {c: _stat_json(s) for c, s in a.per_category.items()}, "trainable_params": a.trainable_params,
                      "train_s": _stat_json(a.train_s), "samples_per_s": _stat_json(a.samples_per_s)})
            if a.igva_weights:
                d["igva_weights"] = a.igva_weights
        arms.append(d)
    runs = [{"id": vid, "fuser": r["variant"]["fuser"], "layers": r["variant"]["layers"], "seed": r["variant"]["seed"],
             "overall": r["eval"]["overall"], "per_category": r["eval"]["per_category"], "trainable_params": r["trainable_params"],
             "train_s": r["train_s"], "samples_per_s": r["samples_per_s"], "steps": r["steps"], "final_loss": r["loss"]["last"],
             "group": r["group"]} for vid, r in res.records.items()]
    return {"settings": res.sweep["settings"], "questions": res.sweep["questions"], "arms": arms, "runs": runs,
            "layer_probe": layer_probe_table(res)}


def results_csv(res: SweepResults) -> str:
    cats = res.categories
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["fuser", "layers", "study", "status", "seeds_done", "seeds", "overall_mean", "overall_std", "macro_mean",
                *(f"{c}_{k}" for c in cats for k in ("mean", "std")), "trainable_params", "train_s_mean", "samples_per_s_mean", "reason"])
    num = lambda x: "" if x is None else f"{x:.6g}"
    for a in res.arms:
        per = [num(x) for c in cats for x in ((a.per_category[c].mean, a.per_category[c].std) if c in a.per_category else (None, None))]
        w.writerow([a.fuser, a.layers, a.study, a.status, len(a.seeds_done), len(a.seeds), num(a.overall.mean), num(a.overall.std),
                    num(a.macro.mean), *per, a.trainable_params if a.trainable_params is not None else "", num(a.train_s.mean),
                    num(a.samples_per_s.mean), a.reason or ""])
    return buf.getvalue()


@dataclass
class ReportFiles:
    markdown: Path
    csv: Path
    json: Path
    plots: list[Path]


def write_report(out: str | Path) -> ReportFiles:
    """Rebuild DIR/results.{md,csv,json} and DIR/plots/*.png from the sweep folder."""
    from layerfuse.pipeline.ablation.plots import draw_plots

    res = load_results(out)
    plots = draw_plots(res, res.out / "plots")
    md = res.out / "results.md"
    write_text(md, markdown(res, plots))
    write_text(res.out / "results.csv", results_csv(res))
    write_json(res.out / "results.json", results_json(res), indent=1)
    return ReportFiles(md, res.out / "results.csv", res.out / "results.json", plots)
