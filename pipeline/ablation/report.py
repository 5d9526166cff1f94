"""`layerfuse report DIR`: the tables of a sweep (finished or partial), rebuilt from its folder alone.

    DIR/sweep.json + DIR/variants/*.json, read by pipeline/ablation/results.py
      -> arms: one row per (fuser, layer set): mean +- std over the finished seeds of the accuracy per category and
         overall, trainable parameters, train time, samples/s; invalid arms with the registry's reason; unfinished
         ones marked
      -> the layer-probe table (docs/methods.md#reference-numbers): accuracy per hidden state per category, raw and
         normalised per category (divided by the category's best layer)
      -> DIR/results.md, results.csv, results.json and the plots (pipeline/ablation/plots.py) in DIR/plots/
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerfuse.core.atomic import write_json, write_text
from layerfuse.pipeline.ablation.plots import draw_plots
from layerfuse.pipeline.ablation.results import Stat, SweepResults, layer_probe_table, load_results
from layerfuse.pipeline.ablation.sweep import STUDY_LAYERS
from layerfuse.pipeline.training.evaluate import CHANCE_HEADER


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
            rows.append([a.fuser, f"`{a.layers}`" + (f" (same as {a.same_as})" if a.same_as else ""), seeds, f"**{a.overall.text()}**", *(a.per_category[c].text() for c in cats),
                         _params(a.trainable_params), a.train_s.text(1), a.samples_per_s.text(0)])
        rows.append(["majority baseline", "", "", _overall_majority(res), *(f"{res.majority.get(c, 0):.3f}" for c in cats), "", "", ""])
        chance = res.sweep["questions"].get("chance", {})  # absent from sweeps written before it was recorded
        rows.append([CHANCE_HEADER, "", "", "", *("-" if c not in chance else f"{chance[c]:.3f}" for c in cats), "", "", ""])
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
                  "Normalised per category (divided by the category's best layer, as in the single-layer study of "
                  "docs/methods.md, Reference numbers):", "", _table(hdr, norm), ""]
        if missing:
            parts += [f"Not finished yet: hs{missing}.", ""]
    same = [a for a in valid if a.same_as]
    if same:
        parts += ["## Equivalent variants (trained once)", "",
                  ("These compute the same function as another variant (same fuser computation on the same layers, same "
                   "options, same initialisation under each seed; docs/ablations.md): their numbers are that variant's, not "
                   "a second run."), "",
                  _table(["fuser", "layers", "same as"], [[a.fuser, f"`{a.layers}`", a.same_as] for a in same]), ""]
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
            d["same_as"] = a.same_as
            d.update({"overall": _stat_json(a.overall), "macro": _stat_json(a.macro),
                      "per_category": {c: _stat_json(s) for c, s in a.per_category.items()}, "trainable_params": a.trainable_params,
                      "train_s": _stat_json(a.train_s), "samples_per_s": _stat_json(a.samples_per_s)})
            if a.igva_weights:
                d["igva_weights"] = a.igva_weights
        arms.append(d)
    runs = [{"id": vid, "fuser": r["variant"]["fuser"], "layers": r["variant"]["layers"], "seed": r["variant"]["seed"],
             "overall": r["eval"]["overall"], "per_category": r["eval"]["per_category"], "trainable_params": r["trainable_params"],
             "train_s": r["train_s"], "samples_per_s": r["samples_per_s"], "steps": r["steps"], "final_loss": r["loss"]["last"],
             "group": r["group"], "same_as": r.get("same_as")} for vid, r in res.records.items()]
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
    res = load_results(out)
    plots = draw_plots(res, res.out / "plots")
    md = res.out / "results.md"
    write_text(md, markdown(res, plots))
    write_text(res.out / "results.csv", results_csv(res))
    write_json(res.out / "results.json", results_json(res), indent=1)
    return ReportFiles(md, res.out / "results.csv", res.out / "results.json", plots)
