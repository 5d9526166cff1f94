"""Storage benchmark: what quantised (int8, float8_e4m3fn) and layer-subset caches save in bytes and cost in accuracy.

On the embedded default (the shipped pretrained default tower, built-in data, `make extract`'s N):

1. extracts the default cache as float16, int8 and float8_e4m3fn, a layer-subset cache `--layers 'mmfuser;igva;3-18-23'`
   (float16) and `--layers mmfuser --dtype int8`, each with `run_extract` (what `layerfuse extract` runs), and reports
   the on-disk bytes per sample of the feature arrays (features + quant/*) against raw fp16 of all L+1 hidden states
   (T x D x 2 x (L+1)), the whole cache's bytes per sample, and the per-layer quantisation error the extraction recorded
   (storage.quant.errors);
2. times `FeatureCache.features` reading 3 stored layers against all stored layers, on the same rows (contiguous and
   random), float16 and int8, interleaved repeats, median;
3. runs the ablation probe (`run_ablation`, what `layerfuse ablate` runs, probe mode with its defaults) for concat
   3-18-23, mmfuser (its default layers) and igva (its default layers), 3 seeds each, on float16, int8, float8_e4m3fn and
   the subset cache: accuracy per category on the val split, mean and min-max over seeds, and whether each quantised /
   subset mean lies inside float16's seed range.

    python bench/storage.py --out BENCHMARKS.md [--quick] [--work DIR] [--n 6000] [--seeds 3] [--epochs 5]

With --shape vit-l14-336 it measures bytes only, at a real encoder's shape: a random-weight CLIP tower of that shape
(core/benchmarks.py CLIP_SHAPES) over --shape-images built-in images (more than the 32 that calibrate the outlier
channels), extracted as int8 with all layers and with MMFuser's layers, written to its own section. Random weights have
no outlier channels and their codes compress differently from a trained tower's, which the section says.

    python bench/storage.py --out BENCHMARKS.md --shape vit-l14-336 [--shape-images 64]

With --work the caches and sweeps are kept there, and a rerun reuses them (extraction and `ablate` resume); without it
they live in a temporary folder. Never touches runs/default.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import transformers  # noqa: E402

import layerfuse.pipeline.ablation.run as ablation_run  # noqa: E402
from layerfuse.core.benchmarks import bench_parser, CLIP_SHAPES, command, machine, random_clip, write_section  # noqa: E402
from layerfuse.core.timing import time_once  # noqa: E402
from layerfuse.pipeline.ablation.run import AblateOptions, run_ablation  # noqa: E402
from layerfuse.pipeline.ablation.sweep import SweepSpec  # noqa: E402
from layerfuse.pipeline.cache.extract import ExtractConfig, run_extract  # noqa: E402
from layerfuse.pipeline.cache.reader import FeatureCache  # noqa: E402

transformers.logging.disable_progress_bar()
SECTION = "## Storage: quantised and layer-subset caches (`bench/storage.py`)"
SHAPE_SECTION = "## Storage at a real encoder's shape (`bench/storage.py --shape`)"
DOC_SECTION = "### Quantised and layer-subset caches"
DOC = Path(__file__).resolve().parents[1] / "docs" / "ablations.md"

# name -> (extract --dtype, extract --layers, extract --chunk-kib)
CACHES = {
    "float16": ("float16", "all", 256),
    "int8": ("int8", "all", 256),
    "float8_e4m3fn": ("float8_e4m3fn", "all", 256),
    "subset": ("float16", "mmfuser;igva;3-18-23", 256),
    "int8-mmfuser": ("int8", "mmfuser", 256),
}
ABLATED = ("float16", "int8", "float8_e4m3fn", "subset")  # caches the probe runs on; float16 is the reference
PAIRED = ("int8", "float8_e4m3fn")  # float16's chunk layout (storage_layout), so float16's data order seed for seed
# Measured before storage_layout sized quantised chunks as float16's: int8 with 64-row chunks (float16 32) saw another data
# order per seed, and that alone moved concat's count accuracy 0.388 -> 0.284 (int8 with 32-row chunks: inside float16's range)
ORDER_NOTE = ("Quantised caches have float16's rows per chunk and shard (`storage_layout` counts float16 bytes for them), so "
              "phase two's chunk-aligned epoch plan gives them float16's data order seed for seed and the per-seed difference is "
              "the quantisation alone. (Measured on the way: with twice the rows per chunk, the layout 1-byte dtypes had before, the "
              "different data order alone moved concat's count accuracy from 0.388 to 0.284, outside float16's range, while int8 "
              "with float16's layout stayed inside: a 3-seed range understates how much data order moves a category.)")
ARMS = (("concat", "3-18-23"), ("mmfuser", "mmfuser"), ("igva", "igva"))  # (fuser, layer set): each fuser's own
READ_LAYERS = [3, 18, 23]


# -- 1. extraction and bytes ------------------------------------------------------------------------------------------
def extract(work: Path, name: str, n: int, vision: str | None = None) -> tuple[str, float]:
    """The cache `name` in work/cache-<name> (extracted, or the finished one there reused) and its extraction wall
    time (the metadata's created -> completed, so a reused cache reports the time it took). `vision`: a tower folder
    instead of the shipped default."""
    dtype, layers, chunk_kib = CACHES[name]
    out = work / f"cache-{name}"
    tower = {} if vision is None else {"vision": vision}
    run_extract(ExtractConfig(out=str(out), run_dir=str(work / "run"), builtin=n, seed=0, dtype=dtype, layers=layers, chunk_kib=chunk_kib,
                              progress=False, **tower))
    meta = FeatureCache(str(out)).meta
    took = datetime.datetime.fromisoformat(meta["completed"]) - datetime.datetime.fromisoformat(meta["created"])
    return str(out), took.total_seconds()


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def storage_row(name: str, url: str, extract_s: float) -> dict[str, Any]:
    cache = FeatureCache(url)
    root = Path(url)
    n = int(cache.status.size)  # storage rows (every row is stored, usable or not)
    raw_all = cache.num_tokens * cache.hidden_size * 2 * cache.num_layers  # fp16 of every hidden state, per sample
    feat = tree_bytes(root / "features") + (tree_bytes(root / "quant") if (root / "quant").exists() else 0)
    quant = cache.meta["storage"].get("quant", {})
    errs = [e["rel_rms"] for e in quant.get("errors", [])]
    return {
        "name": name, "url": url, "dtype": cache.storage_dtype, "layers": cache.stored_layers, "rows": n, "extract_s": extract_s,
        "chunk_rows": cache.chunk_rows, "shard_rows": cache.shard_rows, "outliers": quant.get("outlier_channels"),
        "raw_fp16_all": raw_all, "raw_stored": cache.num_tokens * cache.hidden_size * len(cache.inputs) * np.dtype(cache.encoding.part_dtypes()["features"]).itemsize,
        "feature_bytes": feat / n, "cache_bytes": tree_bytes(root) / n,
        "rel_rms": (min(errs), statistics.median(errs), max(errs)) if errs else None,
        "cosine_min": min(e["cosine"] for e in quant["errors"]) if errs else None,
        "clip_max": max(e["clip_rate"] for e in quant["errors"]) if errs else None,
    }


def mmfuser_budget(r: dict[str, Any]) -> str:
    """Where the int8 MMFuser-layers cache's bytes go, uncompressed, against raw fp16 of all hidden states."""
    cache = FeatureCache(r["url"])
    k, t, d = len(cache.inputs), cache.num_tokens, cache.hidden_size
    n_out = len(r["outliers"][0]) if r["outliers"] else 0
    raw = r["raw_fp16_all"]
    codes, scales, outl = k * t * d, k * t * 2, k * t * n_out * 2
    return (f"Uncompressed, the int8 cache of MMFuser's {k} layers is int8 codes {codes / raw:.4f} (= {k}/{cache.num_layers} x 1/2) + per-token "
            f"fp16 scales {scales / raw:.4f} + {n_out} fp16 outlier channel(s) {outl / raw:.4f} = {(codes + scales + outl) / raw:.4f} of raw fp16; "
            f"zstd-1 brings it to {r['feature_bytes'] / raw:.4f}. For 5 of 25 hidden states the codes alone are exactly 0.1, so any scale "
            "puts the uncompressed cache above it: the goal is met only when zstd shrinks the codes by more than the scales and outliers "
            f"add ({(scales + outl) / codes:.1%} of the codes at width {d}; 0.2% + 3.1% per 16 outliers at ViT-L's 1024).")


# -- 2. read time -----------------------------------------------------------------------------------------------------
def read_times(urls: dict[str, str], rows: int, repeats: int, seed: int = 0) -> dict[tuple[str, str, str], float]:
    """Median seconds of FeatureCache.features per (cache, row set, layers), all configurations interleaved per repeat."""
    caches = {k: FeatureCache(u) for k, u in urls.items()}
    n = min(len(c) for c in caches.values())
    rng = np.random.default_rng(seed)
    rowsets = {"contiguous": np.arange(min(rows, n)), "random": np.sort(rng.choice(n, size=min(rows, n), replace=False))}
    configs = [(k, r, lay) for k in caches for r in rowsets for lay in ("3 layers", "all stored")]
    call = lambda k, r, lay: caches[k].features(rowsets[r], READ_LAYERS if lay == "3 layers" else None)
    for cfg in configs:  # warm: imports, page cache, checksum tables
        call(*cfg)
    times: dict[tuple[str, str, str], list[float]] = {c: [] for c in configs}
    for _ in range(repeats):
        for cfg in configs:
            times[cfg].append(time_once(lambda: call(*cfg)))
    return {c: statistics.median(v) for c, v in times.items()}


# -- 3. the ablation probe --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def only_arms(arms: tuple[tuple[str, str], ...]) -> Iterator[None]:
    """run_ablation with its sweep cut to these (fuser, layer set) pairs instead of fusers x layer sets: the variants,
    their keys and everything run_ablation does with them are unchanged (a full fusers x layers sweep would train the
    same variants, identically, plus the cross terms)."""
    full = ablation_run.expand_sweep
    ablation_run.expand_sweep = lambda spec, vision, llm: [v for v in full(spec, vision, llm) if (v.fuser, v.layers) in arms]
    try:
        yield
    finally:
        ablation_run.expand_sweep = full


def ablate(url: str, out: Path, seeds: list[int], epochs: float | None) -> dict[str, Any]:
    fields: dict[str, Any] = {} if epochs is None else {"epochs": epochs}
    spec = SweepSpec(cache=url, fusers=[a[0] for a in ARMS], layers=[a[1] for a in ARMS], seeds=seeds, **fields)
    with only_arms(ARMS):
        run_ablation(spec, AblateOptions(out=str(out), progress=False))
    recs = [json.loads(p.read_text()) for p in sorted((out / "variants").glob("*.json"))]
    recs = [r for r in recs if r["variant"]["seed"] in seeds and (r["variant"]["fuser"], r["variant"]["layers"]) in ARMS]
    sweep = json.loads((out / "sweep.json").read_text())
    # each shared pass's training wall as recorded, a pass named by its members (resumed pieces number their groups from 0)
    groups = {tuple(r["group"]["members"]): r["group"]["wall_s"] for r in recs}
    evals = sum(r["eval_s"] for r in recs)
    return {"wall_s": sum(groups.values()) + evals, "trained": len(recs), "groups": len(groups), "records": recs,
            "questions": sweep["questions"],
            "epochs": spec.epochs, "steps": recs[0]["steps"] if recs else None, "batch": spec.batch_size}


def accuracy_table(run: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """fuser -> metric (categories, 'overall') -> accuracies by seed (seed order)."""
    out: dict[str, dict[str, list[float]]] = {}
    for rec in sorted(run["records"], key=lambda r: r["variant"]["seed"]):
        m = out.setdefault(rec["variant"]["fuser"], {})
        for c, r in rec["eval"]["per_category"].items():
            m.setdefault(c, []).append(r["accuracy"])
        m.setdefault("overall", []).append(rec["eval"]["overall"]["accuracy"])
    return out


def identical(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, str]:
    """Whether two sweeps trained the same variants bit for bit: every logged loss and every eval count equal."""
    ra = {r["variant"]["id"]: r for r in a["records"]}
    rb = {r["variant"]["id"]: r for r in b["records"]}
    diffs = []
    for k in sorted(ra):
        if k not in rb:
            diffs.append(f"{k} missing")
            continue
        la, lb = ra[k]["loss"]["curve"], rb[k]["loss"]["curve"]
        ca = {c: r["correct"] for c, r in ra[k]["eval"]["per_category"].items()}
        cb = {c: r["correct"] for c, r in rb[k]["eval"]["per_category"].items()}
        if la != lb or ca != cb:
            first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), None)
            diffs.append(f"{k}: loss curves differ from logged step {first}, eval counts {'equal' if ca == cb else 'differ'}")
    return not diffs, "; ".join(diffs)


# -- rendering --------------------------------------------------------------------------------------------------------
def _kib(b: float) -> str:
    return f"{b / 1024:.1f} KiB"


def _acc(v: list[float]) -> str:
    return f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" if len(v) > 1 else f"{v[0]:.3f}"


def verdicts(tables: dict[str, dict], ref: str = "float16") -> dict[tuple[str, str], dict[str, Any]]:
    """(cache, fuser) -> where the overall mean lies against ref's seed range (inside, above, below), how many
    categories' means are inside theirs, the overall mean difference in units of ref's std over seeds."""
    out = {}
    for cache, table in tables.items():
        if cache == ref:
            continue
        for fuser, metrics in table.items():
            base = tables[ref].get(fuser)
            if not base:
                continue
            inside = {m: min(base[m]) <= float(np.mean(v)) <= max(base[m]) for m, v in metrics.items() if m in base}
            std = float(np.std(base["overall"], ddof=1)) if len(base["overall"]) > 1 else float("nan")
            diff = float(np.mean(metrics["overall"]) - np.mean(base["overall"]))
            side = "inside" if inside["overall"] else "above" if diff > 0 else "below"  # above the range is no loss
            out[cache, fuser] = {"side": side, "categories_inside": sum(inside[m] for m in inside if m != "overall"),
                                 "categories": len(inside) - 1, "diff": diff, "diff_std": diff / std if std > 0 else float("nan"),
                                 "outside": sorted(m for m, ok in inside.items() if not ok and m != "overall")}
    return out


def accuracy_markdown(tables: dict[str, dict], verdict: dict, runs: dict[str, dict], seeds: list[int], same: tuple[bool, str] | None,
                      heading: str = "####") -> list[str]:
    cats = sorted({c for t in tables.values() for m in t.values() for c in m if c != "overall"})
    lines = []
    for cache, table in tables.items():
        r = runs[cache]
        lines += [f"{heading} {cache} cache ({r['wall_s'] / 60:.1f} min for {r['trained']} variants in {r['groups']} shared pass{'es' if r['groups'] != 1 else ''})", "",
                  "| fuser (layers) | overall | " + " | ".join(cats) + " | verdict vs float16 |",
                  "|---|---|" + "---|" * len(cats) + "---|"]
        for fuser, layers in ARMS:
            if fuser not in table:
                lines.append(f"| {fuser} ({layers}) | not run |" + " |" * (len(cats) + 1))
                continue
            m = table[fuser]
            v = verdict_text(None if cache == "float16" else verdict[cache, fuser], detailed=True)
            lines.append(f"| {fuser} ({layers}) | {_acc(m['overall'])} | " + " | ".join(_acc(m[c]) if c in m else "-" for c in cats) + f" | {v} |")
        lines.append("")
    if same is not None:
        lines += [("**The subset cache's results are bit-identical to float16's** (every logged loss and every evaluation count of "
                   "all variants and seeds)." if same[0] else f"**The subset cache's results differ from float16's**: {same[1]}."), ""]
    return lines


def render(cmd: str, args: argparse.Namespace, rows: list[dict], reads: dict | None, runs: dict[str, dict], tables: dict, verdict: dict,
           same: tuple[bool, str] | None, seeds: list[int], total_s: float) -> str:
    ref = next(r for r in rows if r["name"] == "float16")
    f = lambda name: next(r for r in rows if r["name"] == name)
    lines = [SECTION, "",
             f"Command: `{cmd}`  ", f"Date: {datetime.date.today().isoformat()}  ", f"Machine: {machine()}  ",
             (f"Data: the embedded default (`layerfuse extract` with no --vision: the shipped pretrained default tower, {ref['rows']} "
              f"built-in samples, seed 0), every cache extracted with `run_extract` (the CLI's code). Recorded time of the whole run (extractions, reads, probe training and evaluation): {total_s / 60:.1f} min"
              + (" on 2 cores shared with other jobs (timings are noisy; the byte counts and accuracies are not)." if (os.cpu_count() or 0) <= 2 else ".")
              + (f" {args.note}" if args.note else "")),
             "", "### Bytes per sample", "",
             f"Raw fp16 of all {ref['layers'][-1] + 1} hidden states (T x D x 2 x (L+1)) = {ref['raw_fp16_all']:,} B = {_kib(ref['raw_fp16_all'])} per sample.",
             "",
             "| cache | extract options | stored layers | feature arrays on disk / sample | / raw fp16 (all L+1) | / float16 cache's | whole cache / sample | chunk rows | extraction |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dtype, layers, chunk_kib = CACHES[r["name"]]
        opts = f"`--dtype {dtype}`" + (f" `--layers '{layers}'`" if layers != "all" else "") + (f" `--chunk-kib {chunk_kib}`" if chunk_kib != 256 else "")
        lines.append(f"| {r['name']} | {opts} | {len(r['layers'])} | {_kib(r['feature_bytes'])} | **{r['feature_bytes'] / r['raw_fp16_all']:.3f}** | "
                     f"{r['feature_bytes'] / ref['feature_bytes']:.3f} | {_kib(r['cache_bytes'])} | {r['chunk_rows']} | {r['extract_s']:.0f} s |")
    i8, i8m = f("int8"), f("int8-mmfuser")
    lines += ["",
              (f"Goals (issue 15): int8 at most 0.5 of raw fp16: **{i8['feature_bytes'] / i8['raw_fp16_all']:.4f}** "
               f"({'met' if i8['feature_bytes'] / i8['raw_fp16_all'] <= 0.5 else 'NOT met'}); int8 with only MMFuser's layers at most 0.1 for "
               f"a 24-block tower: **{i8m['feature_bytes'] / i8m['raw_fp16_all']:.4f}** "
               f"({'met' if i8m['feature_bytes'] / i8m['raw_fp16_all'] <= 0.1 else 'NOT met'} at this tower's width; at ViT-L/14-336's: "
               f"\"{SHAPE_SECTION.removeprefix('## ')}\"). Feature arrays = `features/` + `quant/` "
               "(per-token fp16 scales, fp16 outlier channels) as zstd-1 compressed shards; the whole cache adds the text embeddings "
               "(384 float32 per turn and the mean), the sample tables and checksums, which do not shrink with the dtype."),
              "", mmfuser_budget(i8m),
              "",
              "Quantisation error recorded at extraction (`storage.quant.errors`, per stored layer over every value written):", "",
              "| cache | outlier channels per layer | relative RMS min / median / max over layers | lowest mean token cosine | highest clip rate |",
              "|---|---|---|---|---|"]
    for r in rows:
        if r["rel_rms"]:
            n_out = len(r["outliers"][0]) if r["outliers"] else 0
            lo, med, hi = r["rel_rms"]
            lines.append(f"| {r['name']} | {n_out if r['dtype'] == 'int8' else '-'} | {lo:.2%} / {med:.2%} / {hi:.2%} | {r['cosine_min']:.5f} | {r['clip_max']:.1e} |")
    if reads:
        lines += ["", "### Read time: 3 stored layers vs all stored layers", "",
                  (f"`FeatureCache.features(rows, layers=[3, 18, 23])` against `layers=None` (all 25 stored), {args.read_rows} rows, warm page "
                   f"cache, checksums checked, int8 dequantised to float16 in the call; {args.read_repeats} interleaved repeats, median."), "",
                  "| rows | float16: 3 layers | float16: all | **float16 3 / all** | int8: 3 layers | int8: all | **int8 3 / all** | int8 / float16 (all) |",
                  "|---|---|---|---|---|---|---|---|"]
        for rs in ("contiguous", "random"):
            t = {(k, l): reads[k, rs, l] for k in ("float16", "int8") for l in ("3 layers", "all stored")}
            lines.append(f"| {rs} | {t['float16', '3 layers'] * 1e3:.0f} ms | {t['float16', 'all stored'] * 1e3:.0f} ms | "
                         f"**{t['float16', '3 layers'] / t['float16', 'all stored']:.3f}** | {t['int8', '3 layers'] * 1e3:.0f} ms | "
                         f"{t['int8', 'all stored'] * 1e3:.0f} ms | **{t['int8', '3 layers'] / t['int8', 'all stored']:.3f}** | "
                         f"{t['int8', 'all stored'] / t['float16', 'all stored']:.2f} |")
        lines.append(f"\n3 / 25 layers = {3 / 25:.3f} is the ratio of bytes read.")
    if runs:
        r0 = runs["float16"]
        q = r0["questions"]
        lines += ["", "### Ablation probe accuracy per cache", "",
                  (f"`run_ablation` (what `layerfuse ablate` runs), probe mode with its defaults ({r0['epochs']:g} epochs = {r0['steps']} steps of "
                   f"{r0['batch']}, width 128, lr 1e-3), seeds {', '.join(map(str, seeds))}; {q['train']} training and {q['eval']} {q['eval_split']} "
                   "questions. The sweep is cut to each fuser with its own default layers (concat 3-18-23, mmfuser `mmfuser` = "
                   "hs[3, 8, 13, 18, 23], igva `igva` = 4 group means of hs[1..24] + hs[23]); the three share one pass per seed. "
                   "Cells: mean over seeds (min-max)."), "",
                  ("**Rule**: a quantised or subset cache is *within the seed spread* of float16 for a (fuser, metric) when its mean over the "
                   "seeds lies inside float16's min-max over the same seeds; the verdict is on overall accuracy, with the count of "
                   "categories whose mean is inside too and the overall difference in float16 standard deviations (over seeds). "
                   f"int8 and float8 caches have chunks of {f('int8')['chunk_rows']} rows like float16's ({ref['chunk_rows']}). " + ORDER_NOTE), ""]
        lines += accuracy_markdown(tables, verdict, runs, seeds, same)
        lines += [criterion_line(verdict), ""]
        lines += paired_lines(tables, q["eval"])
    return "\n".join(lines) + "\n"


# where a row's overall mean lies against float16's seed range, as BENCHMARKS.md (detailed) and docs/ablations.md say it
SIDE_DETAILED = {"inside": "inside the range", "above": "**above** the range, no loss", "below": "**below** the range, a loss"}
SIDE_SHORT = {"inside": "yes", "above": "above it: no loss", "below": "**no**: below it"}


def verdict_text(vd: dict[str, Any] | None, *, detailed: bool) -> str:
    """A cache x fuser row's verdict against float16's seed range (None: the float16 reference itself); detailed for
    BENCHMARKS.md, short for docs/ablations.md."""
    if vd is None:
        return "reference"
    numbers = f"{vd['diff']:+.3f}, {vd['diff_std']:+.1f} std"
    inside = f"{vd['categories_inside']}/{vd['categories']} categories inside"
    if detailed:
        return (f"overall {SIDE_DETAILED[vd['side']]} ({numbers}); {inside}" + (f" (not: {', '.join(vd['outside'])})" if vd["outside"] else ""))
    return f"{SIDE_SHORT[vd['side']]} ({numbers}; {inside})"


def criterion_line(verdict: dict[tuple[str, str], dict[str, Any]]) -> str:
    """Issue 15's accuracy criterion over every quantised / subset row: no loss outside float16's seed spread."""
    by = {side: [f"{c} {f}" for (c, f), vd in verdict.items() if vd["side"] == side] for side in ("inside", "above", "below")}
    met = "**met**" if not by["below"] else "**NOT met**"
    return (f"Criterion (issue 15: no loss outside float16's seed spread): {met}. Of {len(verdict)} cache x fuser rows, "
            f"{len(by['inside'])} lie inside float16's range, {len(by['above'])} above it"
            + (f" ({', '.join(by['above'])})" if by["above"] else "") + f", {len(by['below'])} below it"
            + (f" ({', '.join(by['below'])})" if by["below"] else "") + ". A range over 3 seeds can be narrower than what "
            "rounding alone moves a result: the paired differences below show the per-seed effect.")


def paired_lines(tables: dict[str, dict], eval_n: int, ref: str = "float16") -> list[str]:
    """Per-seed overall differences from float16 of the quantised caches, which see float16's data order seed for seed."""
    return [line for cache in PAIRED if cache in tables for line in _paired(tables, cache, eval_n, ref)]


def _paired(tables: dict[str, dict], cache: str, eval_n: int, ref: str) -> list[str]:
    parts = []
    for fuser, _ in ARMS:
        a, b = tables[cache].get(fuser, {}).get("overall"), tables[ref].get(fuser, {}).get("overall")
        if a and b and len(a) == len(b):
            d = np.asarray(a) - np.asarray(b)
            parts.append(f"{fuser} {', '.join(f'{x:+.3f}' for x in d)} (mean {d.mean():+.3f})")
    if not parts:
        return []
    worst = max(((abs(np.mean(np.asarray(v) - np.asarray(tables[ref][f][c]))), f, c, float(np.mean(np.asarray(v) - np.asarray(tables[ref][f][c]))))
                 for f, m in tables[cache].items() for c, v in m.items() if c != "overall" and len(v) == len(tables[ref][f][c])), default=None)
    tail = f" Largest per-category mean paired difference: {worst[1]} {worst[2]} {worst[3]:+.3f}." if worst else ""
    return [f"**Paired** (same data order): {cache} minus float16, overall accuracy per seed: " + "; ".join(parts)
            + f". One evaluation question is 1/{eval_n} = {1 / eval_n:.4f}.{tail}", ""]


def doc_section(cmd: str, rows: list[dict], runs: dict, tables: dict, verdict: dict, seeds: list[int], same: tuple[bool, str] | None) -> str:
    f = lambda name: next(r for r in rows if r["name"] == name)
    r0 = runs["float16"]
    lines = [DOC_SECTION, "",
             ("Does a cache stored as int8 or float8_e4m3fn (`layerfuse extract --dtype ...`, or `layerfuse cache derive SRC --dtype ...`), "
              "or one that keeps only the layers a study needs (`--layers`), change what the probe measures? Measured by "
              f"`{cmd}` (BENCHMARKS.md \"Storage\"): the default cache ({f('float16')['rows']} built-in samples, shipped default tower) "
              "extracted as below, then the probe with its defaults "
              f"({r0['epochs']:g} epochs = {r0['steps']} steps of {r0['batch']}) for concat 3-18-23, mmfuser and igva (each on its own "
              f"default layers), seeds {', '.join(map(str, seeds))}, on the val split. Feature bytes per sample against raw fp16 of all 25 "
              f"hidden states: int8 {f('int8')['feature_bytes'] / f('int8')['raw_fp16_all']:.3f}, float8 "
              f"{f('float8_e4m3fn')['feature_bytes'] / f('float8_e4m3fn')['raw_fp16_all']:.3f}, float16 "
              f"{f('float16')['feature_bytes'] / f('float16')['raw_fp16_all']:.3f} (zstd), subset "
              f"{f('subset')['feature_bytes'] / f('subset')['raw_fp16_all']:.3f} (`mmfuser;igva;3-18-23` is 24 of the 25 hidden states: "
              f"IGVA reads hs[1..24]), int8 with MMFuser's 5 layers {f('int8-mmfuser')['feature_bytes'] / f('int8-mmfuser')['raw_fp16_all']:.3f}."),
             "",
             ("Overall: mean over seeds (min-max); categories: mean over seeds. Verdict: is the cache's mean overall accuracy inside float16's min-max over the same "
              "seeds, or above it (no loss), or below it (a loss); and how many categories' means are inside theirs. The difference is in float16 standard deviations over seeds. "
              + ORDER_NOTE), ""]
    cats = sorted({c for t in tables.values() for m in t.values() for c in m if c != "overall"})
    lines += ["| cache | fuser (layers) | overall | " + " | ".join(cats) + " | overall inside float16's range? |",
              "|---|---|---|" + "---|" * len(cats) + "---|"]
    for cache, table in tables.items():
        for fuser, layers in ARMS:
            if fuser not in table:
                continue
            m = table[fuser]
            v = verdict_text(None if cache == "float16" else verdict[cache, fuser], detailed=False)
            lines.append(f"| {cache} | {fuser} ({layers}) | {_acc(m['overall'])} | " + " | ".join(f"{np.mean(m[c]):.3f}" if c in m else "-" for c in cats)
                         + f" | {v} |")
    lines += ["", criterion_line(verdict), ""]
    lines += paired_lines(tables, r0["questions"]["eval"])
    if same is not None:
        lines += [("The subset cache gives bit-identical results to float16 (same values, same chunk layout, so the same data "
                   "order)." if same[0] else f"The subset cache's results differ from float16's: {same[1]}."), ""]
    return "\n".join(lines) + "\n"


def write_doc(section: str) -> None:
    """Replace the subsection in docs/ablations.md (up to the next `## ` or `### ` heading), or append it at the end (the
    last section is "What the built-in toy shows")."""
    text = DOC.read_text()
    start = text.find("\n" + DOC_SECTION + "\n")
    if start >= 0:
        stops = [e for e in (text.find("\n## ", start + 1), text.find("\n### ", start + 1)) if e >= 0]
        end = min(stops) if stops else len(text)
        text = text[:start + 1] + section.rstrip("\n") + "\n" + ("\n" + text[end:].lstrip("\n") if end < len(text) else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    DOC.write_text(text)


# -- bytes at a real encoder's shape ------------------------------------------------------------------------------------
SHAPE_CACHES = ("int8", "int8-mmfuser")


def shape_rows(work: Path, shape: str, n: int) -> list[dict[str, Any]]:
    """int8 caches (all layers, MMFuser's layers) of a random-weight tower of `shape` over n built-in images."""
    tower = work / f"tower-{shape}"
    if not (tower / "config.json").exists():
        random_clip(tower, CLIP_SHAPES[shape])
    rows = []
    for name in SHAPE_CACHES:
        url, s = extract(work, name, n, vision=str(tower))
        rows.append(storage_row(name, url, s))
        print(f"storage ({shape}): {name}: {rows[-1]['feature_bytes'] / rows[-1]['raw_fp16_all']:.4f} of raw fp16, extracted in {s:.0f} s", flush=True)
    return rows


def render_shape(cmd: str, shape: str, rows: list[dict], note: str) -> str:
    f = lambda name: next(r for r in rows if r["name"] == name)
    ref, i8m = f("int8"), f("int8-mmfuser")
    cfg = CLIP_SHAPES[shape]
    lines = [SHAPE_SECTION, "",
             f"Command: `{cmd}`  ", f"Date: {datetime.date.today().isoformat()}  ", f"Machine: {machine()}  ",
             (f"Data: a random-weight CLIP tower of the {shape} shape ({cfg['num_hidden_layers']} blocks, width {cfg['hidden_size']}, "
              f"{ref['raw_fp16_all'] // (2 * cfg['hidden_size'] * (cfg['num_hidden_layers'] + 1))} tokens) over {ref['rows']} built-in images, "
              "extracted with `run_extract`; the first 32 calibrate the outlier channels. Random weights lack the strong outlier channels "
              f"of a trained ViT-L (the 2x-median rule picked {len(ref['outliers'][0]) if ref['outliers'] else 0} per layer here; at most 16 "
              "are kept) and their codes are closer to Gaussian than a trained tower's heavy-tailed ones: a trained tower's cache can "
              "hold up to 15 more fp16 channels per layer (+0.003 of raw fp16 for MMFuser's layers) and compresses its codes better."
              + (f" {note}" if note else "")),
             "", f"Raw fp16 of all hidden states per sample: {ref['raw_fp16_all'] / 2**20:.2f} MiB.", "",
             "| cache | extract options | stored layers | outlier channels per layer | feature arrays on disk / sample | / raw fp16 (all L+1) | extraction |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        dtype, layers, _ = CACHES[r["name"]]
        opts = f"`--dtype {dtype}`" + (f" `--layers '{layers}'`" if layers != "all" else "")
        n_out = len(r["outliers"][0]) if r["outliers"] else 0
        lines.append(f"| {r['name']} | {opts} | {len(r['layers'])} | {n_out} | {_kib(r['feature_bytes'])} | **{r['feature_bytes'] / r['raw_fp16_all']:.4f}** | "
                     f"{r['extract_s']:.0f} s |")
    ratio = i8m["feature_bytes"] / i8m["raw_fp16_all"]
    lines += ["", (f"Goal (issue 15): int8 with only MMFuser's layers at most 0.1 of raw fp16 for a 24-block tower: **{ratio:.4f}** "
                   f"({'met' if ratio <= 0.1 else 'NOT met'}) at this shape."), "", mmfuser_budget(i8m), ""]
    return "\n".join(lines)


def main() -> None:
    ap = bench_parser(__doc__, quick="a small cache, 2 seeds, few steps: a smoke run (numbers are not meaningful)")
    ap.add_argument("--work", type=Path, default=None, help="keep caches and sweeps here (a rerun resumes) [a temporary folder]")
    ap.add_argument("--n", type=int, default=None, help="built-in samples [6000, as make extract; 400 with --quick]")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per variant [3; 2 with --quick]")
    ap.add_argument("--epochs", type=float, default=None, help="probe epochs [ablate's default, 5; 0.3 with --quick]")
    ap.add_argument("--subset-seeds", type=int, default=None, help="seeds on the subset cache [all]; its results should equal float16's")
    ap.add_argument("--read-rows", type=int, default=256)
    ap.add_argument("--read-repeats", type=int, default=None, help="[9; 3 with --quick]")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/ablations.md")
    ap.add_argument("--shape", choices=sorted(CLIP_SHAPES), default=None,
                    help="bytes only, at this encoder shape with random weights (its own section); skips everything else")
    ap.add_argument("--shape-images", type=int, default=64, help="built-in images for --shape [64]")
    ap.add_argument("--note", default="", help="a sentence on how this run was made, added to the section (e.g. resumed, shared machine)")
    args = ap.parse_args()
    n = args.n or (400 if args.quick else 6000)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    epochs = args.epochs if args.epochs is not None else (0.3 if args.quick else None)
    args.read_repeats = args.read_repeats or (3 if args.quick else 9)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-storage-")))
        work.mkdir(parents=True, exist_ok=True)
        if args.shape:
            section = render_shape(command(), args.shape, shape_rows(work, args.shape, args.shape_images), args.note)
            write_section(args.out, SHAPE_SECTION, section)
            print(section)
            return
        rows, urls = [], {}
        for name in CACHES:
            url, s = extract(work, name, n)
            urls[name] = url
            rows.append(storage_row(name, url, s))
            print(f"storage: {name}: {rows[-1]['feature_bytes'] / rows[-1]['raw_fp16_all']:.3f} of raw fp16, extracted in {s:.0f} s", flush=True)
        t_read = time.perf_counter()
        reads = read_times({k: urls[k] for k in ("float16", "int8")}, args.read_rows, args.read_repeats)
        t_read = time.perf_counter() - t_read
        print("storage: read times measured", flush=True)
        runs = {}
        for name in ABLATED:
            runs[name] = ablate(urls[name], work / f"ablate-{name}", seeds[: args.subset_seeds] if name == "subset" and args.subset_seeds else seeds, epochs)
            print(f"storage: ablate on {name}: {runs[name]['wall_s'] / 60:.1f} min", flush=True)
        tables = {k: accuracy_table(r) for k, r in runs.items()}
        verdict = verdicts(tables)
        same = identical(runs["subset"], runs["float16"])
        # the recorded times (a rerun with --work reuses finished caches and variants and reports the times they took)
        total = sum(r["extract_s"] for r in rows) + t_read + sum(r["wall_s"] for r in runs.values())
        print(f"storage: this invocation {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        cmd = command()
        section = render(cmd, args, rows, reads, runs, tables, verdict, same, seeds, total)
        write_section(args.out, SECTION, section)
        if not args.no_doc and not args.quick:
            plain = [a for i, a in enumerate(sys.argv) if a != "--note" and (i == 0 or sys.argv[i - 1] != "--note")]
            write_doc(doc_section(shlex.join(["python", *plain]), rows, runs, tables, verdict, seeds, same))
        (work / "storage.json").write_text(json.dumps({"rows": rows, "reads": {" | ".join(k): v for k, v in reads.items()},
                                                      "tables": tables, "total_s": total}, indent=1, default=str)) if args.work else None
    print(section)


if __name__ == "__main__":
    sys.exit(main())
