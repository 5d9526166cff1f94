"""A sweep folder read back: the arms of a sweep (finished or partial) and its layer-probe table.

    DIR/sweep.json          the sweep's settings, variants and question set (written by `layerfuse ablate`)
    DIR/variants/<id>.json  one finished variant: its evaluation, timings and losses
      -> `SweepResults`: one `Arm` per (fuser, layer set) with mean +- std over its finished seeds
      -> `layer_probe_table`: accuracy per hidden state per category (docs/methods.md#reference-numbers)

`pipeline/ablation/report.py` writes the tables from these, `pipeline/ablation/plots.py` the figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layerfuse.core.atomic import read_json
from layerfuse.core.errors import StateError
from layerfuse.pipeline.ablation.sweep import STUDY_LAYERS, Variant

SWEEP_FILE = "sweep.json"
VARIANTS_DIR = "variants"


class ReportError(StateError):
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
    same_as: str | None = None  # every finished seed is a copy of another variant's (the same function): that variant's arm

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
    missing = ReportError(f"'{out}' is not an ablation folder: {SWEEP_FILE} is missing (run `layerfuse ablate --out {out}` first)")
    sweep = read_json(path, missing=missing, error=ReportError)
    variants = [Variant.from_json(v, where=f"{path}: variants[{i}]", error=ReportError) for i, v in enumerate(sweep["variants"])]
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
            same = {r.get("same_as") for r in recs}
            if recs and None not in same:
                arms_of = {v.id: v for v in variants}
                names = sorted({f"{arms_of[i].fuser} {arms_of[i].layers}" for i in same if i in arms_of})
                arm.same_as = ", ".join(names) or None
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
