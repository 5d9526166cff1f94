"""`layerfuse cache info` and `layerfuse cache verify`: a cache's summary, and a full integrity check."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from layerfuse.pipeline.cache.reader import (
    DIGESTED_TABLES,
    FEATURE_CHECKSUMS,
    OK,
    ROW_CHECKSUMS,
    SAMPLE_FIELDS,
    SKIPPED,
    STATUS_NAMES,
    TEXT_ONLY,
    CacheError,
    CorruptRowsError,
    FeatureCache,
    split_url,
)
from layerfuse.pipeline.cache.selection import describe_layers, input_name
from layerfuse.pipeline.cache.writer import CacheWriter
from layerfuse.pipeline.data.records import SKIP_STAGES


def cache_info(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cache summary as a JSON-serialisable dict (also for incomplete caches)."""
    cache = FeatureCache(url, storage_options, allow_incomplete=True)
    m = cache.meta
    writer = CacheWriter(url, storage_options)
    done = sum(writer.read_marker(k) is not None for k in range(writer.num_shards))
    fs, root = split_url(url, storage_options)
    info: dict[str, Any] = {
        "url": url,
        "complete": bool(m.get("complete")),
        "shards_written": done,
        "num_shards": writer.num_shards,
        "num_samples": m.get("num_samples") if m.get("complete") else None,
        "num_samples_planned": m["num_samples_planned"],
        "num_layers": cache.num_layers,
        "stored_layers": cache.stored_layers,
        "views": [list(v) for v in cache.views],
        "num_tokens": cache.num_tokens,
        "hidden_size": cache.hidden_size,
        "has_cls": cache.has_cls,
        "dtype": cache.storage_dtype,
        "quantization": _quantization(cache),
        "encoder": m["encoder"]["name"],
        "encoder_path": m["encoder"].get("path"),
        "encoder_config_hash": m["encoder"]["config_hash"],
        "text_encoder": m["text"]["model"],
        "text_dim": m["text"]["dim"],
        "layerfuse_version": m.get("layerfuse_version"),
        "created": m.get("created"),
        "completed": m.get("completed"),
        "bytes": int(fs.du(root)),
    }
    if m.get("complete"):
        info["summary"] = m.get("summary", {})
        info["splits"] = dict(Counter(map(str, cache.splits)))
        info["categories"] = dict(Counter(map(str, cache.categories)))
        issues = cache.issues()
        info["skipped"] = [i for i in issues if i["stage"] == "plan" or i["stage"] in SKIP_STAGES]
        info["skipped_reasons"] = dict(Counter(_reason_kind(i["reason"]) for i in info["skipped"]))
        info["notes"] = [i for i in issues if i["stage"] == "note"]
    return info


def _quantization(cache: FeatureCache) -> dict[str, Any] | None:
    """A quantised cache's scheme, outlier channels and per-input error (storage.quant), by input name."""
    quant = cache.meta["storage"].get("quant")
    if not quant:
        return None
    names = [input_name(i) for i in cache.inputs]
    errors = quant.get("errors") or [None] * len(names)
    channels = quant.get("outlier_channels") or [[] for _ in names]
    return {"scheme": quant["scheme"], "outliers": cache.encoding.num_outliers,
            "layers": [{"input": name, **(e or {}), "outlier_channels": ch} for name, e, ch in zip(names, errors, channels)]}


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].strip()


def format_info(info: dict[str, Any]) -> str:
    """The summary as text: every skipped sample is listed with its reason (repairs are counted; --json lists them)."""
    lines = [
        f"cache            {info['url']}",
        f"complete         {info['complete']}  ({info['shards_written']}/{info['num_shards']} shards written)",
        f"num_samples      {info['num_samples'] if info['num_samples'] is not None else '-'} of {info['num_samples_planned']} planned",
        f"num_layers       {info['num_layers']}  (hidden states hs[0..{info['num_layers'] - 1}])",
        f"stored layers    {describe_layers(info['stored_layers'], info['num_layers'] - 1)}"
        + (f" + group means of {', '.join(f'{v[0]}..{v[-1]}' for v in info['views'])}" if info["views"] else ""),
        f"num_tokens       {info['num_tokens']}  ({'CLS + ' if info['has_cls'] else ''}patches)",
        f"hidden_size      {info['hidden_size']}",
        f"dtype            {info['dtype']}" + (f" ({q['scheme']}, {q['outliers']} fp16 outlier channel(s) per layer; read as float16)"
                                                   if (q := info.get("quantization")) else ""),
        f"encoder          {info['encoder']}  (config {info['encoder_config_hash']})",
        f"text_encoder     {info['text_encoder']}",
        f"text_dim         {info['text_dim']}",
        f"size on disk     {info['bytes'] / 2**20:.1f} MiB",
        f"layerfuse        {info['layerfuse_version']}, created {info['created']}",
    ]
    if (q := info.get("quantization")) and info["complete"]:
        lines.append("quantisation error per stored input (every stored image; rel RMS = ||x - x^|| / ||x||):")
        lines.append(f"  {'input':<16} {'rel RMS':>8} {'max |err|':>10} {'cosine':>9} {'clipped':>8}  outlier channels")
        for row in q["layers"]:
            if "rel_rms" in row:
                lines.append(f"  {row['input']:<16} {row['rel_rms']:>8.2%} {row['max_abs']:>10.4g} {row['cosine']:>9.6f} "
                             f"{row['clip_rate']:>8.1e}  {row['outlier_channels'] or '-'}")
    if info["complete"]:
        s = info["summary"]
        lines.append(f"samples          ok {s['ok']}, text-only {s['text_only']}, skipped {s['skipped'] + s['plan_skipped']}, repaired {s['notes']}")
        lines.append("splits           " + ", ".join(f"{k} {v}" for k, v in sorted(info["splits"].items())))
        lines.append("categories       " + ", ".join(f"{k or '-'} {v}" for k, v in sorted(info["categories"].items())))
        skipped = info["skipped"]
        lines.append(f"skipped          {len(skipped)}" + (": " + ", ".join(f"{k} x{v}" for k, v in info["skipped_reasons"].items()) if skipped else ""))
        for i in skipped:
            lines.append(f"  - {i['id']} [{i['stage']}] {i['reason']}" + (f" ({i['where']})" if i["where"] else ""))
    return "\n".join(lines)


@dataclass
class VerifyReport:
    url: str
    rows_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(url: str, storage_options: dict[str, Any] | None = None, *, progress: bool = True, max_problems: int = 100) -> VerifyReport:
    """Check a finished cache in full: the manifest (attributes, every array's metadata, every table's digest),
    shapes, completeness, status/issue consistency, and every row: its (row, layer) feature checksums, text and
    conversation checksums, NaN/Inf, zeros where there is no image. Damage is reported, never raised."""
    rep = VerifyReport(url)

    def problem(msg: str) -> None:
        if len(rep.problems) < max_problems:
            rep.problems.append(msg)

    try:
        cache = FeatureCache(url, storage_options, allow_incomplete=True)
    except CacheError as e:
        rep.problems.append(str(e))
        return rep
    g, m = cache.group, cache.meta
    if not cache.complete:
        rep.problems.append(f"cache '{url}' is incomplete: rerun the same `layerfuse extract` command to finish it")
        return rep
    tables: dict[str, np.ndarray] = {}
    for path in DIGESTED_TABLES + tuple(ROW_CHECKSUMS.values()):
        try:
            tables[path] = cache.table(path)
        except CacheError as e:
            problem(str(e))
    if rep.problems:
        return rep
    n = int(m["num_samples_planned"])
    enc = m["encoder"]
    want = {
        **{path: (n, len(cache.inputs), *shape) for path, shape in cache.encoding.part_shapes(enc["num_tokens"], enc["hidden_size"]).items()},
        "text/turns": (n, m["text"]["max_turns"], m["text"]["dim"]),
        "text/mean": (n, m["text"]["dim"]),
        FEATURE_CHECKSUMS: (n, len(cache.inputs)),
        **{p: (n,) for p in ROW_CHECKSUMS.values()},
        **{p: (n, 2) if p == "samples/image_size" else (n,) for p in DIGESTED_TABLES if not p.startswith("issues/")},
        **{f"samples/{f}": (n,) for f in SAMPLE_FIELDS},
    }
    for name, shape in want.items():
        got = tuple(g[name].shape)
        if got != shape:
            problem(f"array '{name}' has shape {got}, expected {shape}")
    if rep.problems:
        return rep
    writer = CacheWriter(url, storage_options)
    missing = [k for k in range(writer.num_shards) if writer.read_marker(k) is None]
    if missing:
        problem(f"{len(missing)} shard markers missing: {missing[:10]}")
    status = tables["samples/status"]
    bad_status = np.flatnonzero(~np.isin(status, (OK, TEXT_ONLY, SKIPPED)))
    if bad_status.size:
        problem(f"{bad_status.size} rows have no final status (e.g. row {bad_status[0]}: {STATUS_NAMES.get(int(status[bad_status[0]]), status[bad_status[0]])})")
    issue_rows = Counter(r for r, st in zip(tables["issues/row"], tables["issues/stage"]) if str(st) in SKIP_STAGES)
    for r in np.flatnonzero(status == SKIPPED):
        if issue_rows.get(int(r), 0) != 1:
            problem(f"row {r} is skipped but has {issue_rows.get(int(r), 0)} issue records")
    if m.get("num_samples") != int(((status == OK) | (status == TEXT_ONLY)).sum()):
        problem(f"num_samples {m.get('num_samples')} disagrees with the status array")
    num_turns, ids = tables["text/num_turns"], tables["samples/id"]
    all_layers = cache.inputs
    bar = tqdm(total=n, unit="row", desc="verify", disable=not progress)
    for k in range(writer.num_shards):
        a, b = writer.shard_rows(k)
        rows = np.arange(a, b)
        read: dict[str, Any] = {}  # what the checked reads returned, reused by the value checks below
        for path in (*ROW_CHECKSUMS, "features"):
            try:
                read[path] = cache.features_at(rows, all_layers) if path == "features" else cache.checked_rows(path, rows)
            except CorruptRowsError as e:
                by_reason: dict[str, list[int]] = {}
                for r, why in zip(e.storage_rows, e.reasons):
                    by_reason.setdefault(why, []).append(int(r))
                for why, rs in by_reason.items():  # one line per row, or per shard when a whole read failed alike
                    if len(rs) == 1:
                        problem(f"row {rs[0]} ({ids[rs[0]]}), shard {k}: {why}")
                    else:
                        problem(f"rows {rs[0]}..{rs[-1]} ({len(rs)} rows, {ids[rs[0]]} ...), shard {k}: {why}")
                if path == "features":
                    try:
                        read[path] = cache.features_at(rows, all_layers, check=False)  # the values, for the checks below
                    except CorruptRowsError:
                        pass
        feats = read.get("features")
        turns = np.asarray(read["text/turns"] if "text/turns" in read else g["text/turns"][a:b])
        means = np.asarray(read["text/mean"] if "text/mean" in read else g["text/mean"][a:b])
        for i in range(b - a):
            row = a + i
            where = f"row {row} ({ids[row]})"
            if feats is not None:
                if status[row] == OK and not torch.isfinite(feats[i].float()).all():
                    problem(f"{where}: features contain NaN or Inf")
                if status[row] != OK and feats[i].any():
                    problem(f"{where}: {STATUS_NAMES.get(int(status[row]))} row has non-zero features")
            if not (np.isfinite(turns[i]).all() and np.isfinite(means[i]).all()):
                problem(f"{where}: text embeddings contain NaN or Inf")
            nt = int(num_turns[row])
            if turns[i, nt:].any() or (nt == 0 and means[i].any()):
                problem(f"{where}: text embedding beyond num_turns={nt} is not zero")
            if nt and not np.allclose(turns[i, :nt].mean(0), means[i], atol=1e-5):
                problem(f"{where}: text/mean is not the mean of its turns")
        rep.rows_checked += b - a
        bar.update(b - a)
    bar.close()
    return rep


def report_json(rep: VerifyReport) -> str:
    return json.dumps({"url": rep.url, "ok": rep.ok, "rows_checked": rep.rows_checked, "problems": rep.problems}, indent=1)
