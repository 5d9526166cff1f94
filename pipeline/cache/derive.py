"""`layerfuse cache derive SRC --out DST [--layers ...] [--dtype ...]`: a smaller cache from a bigger one.

    SRC (finished, every read checked) --shard by shard: the kept layers, converted--> DST (the writing protocol of
    docs/cache-format.md section 5: markers per shard, so a killed derive resumes where it stopped) --> finalize

Shard k+1 is read and converted while a writer thread compresses and writes shard k (at most one converted shard
waits). Under torchrun rank r takes DST's shards k = r (mod world), as extraction does; rank 0 plans and finalizes.

DST keeps SRC's samples, rows, shards, conversations, embeddings, group-mean views and issue records; only the stored
layers and the data type change. A row whose values DST's dtype cannot hold finite (a float32 or bfloat16 SRC with |x|
>= 65520, derived to float16) is stored as skipped with an `encoder` issue, as extraction in that dtype would have. To
int8, the outlier channels are calibrated on SRC's first images as extraction does (on SRC's stored values: a float16
SRC gives what extraction in float16 compute would), and DST records its own quantisation error against SRC's values.
Its config record is SRC's plus `derived_from` (SRC's URL and config hash) and the new `layers` / `dtype`; its
fingerprint is therefore its own, and a rerun with other settings is refused unless `overwrite`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from layerfuse.core.distributed import DistContext
from layerfuse.core.dtypes import StorageDtype
from layerfuse.core.errors import StateError
from layerfuse.core.fingerprint import fingerprint
from layerfuse.pipeline.cache.encoding import CALIBRATION_IMAGES, FeatureEncoding, running_absmax
from layerfuse.pipeline.cache.quantize import ErrorStats
from layerfuse.pipeline.cache.reader import ATTRS_KEY, OK, SKIPPED, FeatureCache, open_group
from layerfuse.pipeline.cache.selection import input_name, stored_layers
from layerfuse.pipeline.cache.writer import CacheWriter, FeaturePool, ShardResult, ShardWriterPool
from layerfuse.pipeline.data.records import SampleIssue, SampleRecord

PROVENANCE_KEY = "derived_from"


class DeriveError(StateError):
    """A derive that cannot run as asked (layers the source lacks, a destination of other settings)."""


@dataclass
class DeriveResult:
    url: str
    shards_written: int
    already_complete: bool
    summary: dict[str, Any]


def derive_cache(src: str, out: str, *, layers: str | None = None, dtype: str | None = None, overwrite: bool = False,
                 progress: bool = True) -> DeriveResult:
    """Write (or resume writing) DST = SRC restricted to `layers` (a --layers spec; None: SRC's) in `dtype` (None: SRC's).
    Under torchrun every rank calls this with the same arguments and writes its own shards."""
    ctx = DistContext.from_env()
    try:
        return _derive(src, out, layers, dtype, overwrite, progress, ctx)
    finally:
        ctx.close()


def _derive(src: str, out: str, layers: str | None, dtype: str | None, overwrite: bool, progress: bool, ctx: DistContext) -> DeriveResult:
    source = FeatureCache(src)
    smeta = source.meta
    depth = source.num_layers - 1
    keep = source.stored_layers if layers is None else stored_layers(layers, depth)
    missing = sorted(set(keep) - set(source.stored_layers))
    if missing:
        raise DeriveError(f"cannot derive: {source.missing_layers_message(missing)}")
    new_dtype = StorageDtype.parse(dtype or source.storage_dtype, "--dtype").value
    config = {**smeta["config"], "dtype": new_dtype, PROVENANCE_KEY: {"url": source.url, "config_hash": smeta["config_hash"]}}
    if keep != list(range(depth + 1)):
        config["layers"] = keep
    chash = fingerprint(config)

    if ctx.is_main:
        old = _existing_meta(out)
        if old and not overwrite and old.get("planned"):
            if old.get("config_hash") != chash:
                raise DeriveError(f"'{out}' holds a cache made with other settings; pass --overwrite to replace it, or choose another --out")
        else:
            _plan(source, out, config, chash, keep, new_dtype)
    ctx.barrier()
    writer = CacheWriter(out)
    if writer.meta.get("complete"):
        return DeriveResult(out, 0, True, writer.meta.get("summary", {}))
    pending = writer.pending_shards(ctx.rank, ctx.world)
    errors = _image_errors(source)
    encoding = FeatureEncoding.from_storage(writer.meta["storage"])
    inputs = [*keep, *source.views]
    pool = FeaturePool(encoding, (len(inputs), source.num_tokens, source.hidden_size), pin=False)
    sink = ShardWriterPool(writer, depth=1, done=pool.give)
    desc = "derive" if ctx.world == 1 else f"derive[rank {ctx.rank}]"
    try:
        with tqdm(total=len(pending), unit="shard", desc=desc, disable=not progress, position=ctx.rank if ctx.world > 1 else None) as bar:
            for k in pending:
                sink.submit(_shard(source, writer, k, inputs, encoding, pool, errors))
                bar.update(1)
    finally:
        sink.close()
    ctx.barrier()
    summary = writer.finalize() if ctx.is_main else {}
    ctx.barrier()
    return DeriveResult(out, len(pending), False, summary)


def _existing_meta(url: str) -> dict[str, Any] | None:
    try:
        return dict(open_group(url, "r").attrs.get(ATTRS_KEY) or {}) or None
    except (FileNotFoundError, KeyError):
        return None


def _plan(source: FeatureCache, out: str, config: dict[str, Any], chash: str, keep: list[int], dtype: str) -> None:
    """Create DST's layout and per-sample tables from SRC's (checked) tables."""
    smeta = source.meta
    rows = np.arange(source.group["samples/status"].shape[0])
    convs = source.checked_rows("samples/conversations", rows)
    columns = {f: source.table(f"samples/{f}") for f in ("id", "source", "category", "split", "image_ref", "locator")}
    records = []
    for i in rows:
        locator = json.loads(str(columns["locator"][i]))
        records.append(SampleRecord(
            id=str(columns["id"][i]), source=str(columns["source"][i]), locator=locator,
            conversations=json.loads(str(convs[i])), has_image=bool(locator), category=str(columns["category"][i]),
            split=str(columns["split"][i]), image_ref=str(columns["image_ref"][i]),
        ))
    plan_issues = [SampleIssue(i["id"], "", i["stage"], i["reason"], i["where"]) for i in source.issues() if i["row"] < 0]
    keys = ("layerfuse_version", "encoder", "processor", "text")
    meta = {k: smeta[k] for k in keys if k in smeta}
    storage = {k: v for k, v in smeta["storage"].items() if k != "quant"}
    storage.update(dtype=dtype, layers=keep)  # views kept
    inputs = [*keep, *source.views]
    storage.update(FeatureEncoding.calibrate(dtype, _calibration_absmax(source, inputs) if dtype == "int8" else None, len(inputs))
                   .storage_record(len(inputs)))
    meta.update(config=config, config_hash=chash, storage=storage, **{PROVENANCE_KEY: config[PROVENANCE_KEY]})
    CacheWriter.create(out, meta, records, plan_issues)


def _calibration_absmax(source: FeatureCache, inputs: list[int | tuple[int, ...]]) -> torch.Tensor | None:
    """absmax [K, D] over SRC's first CALIBRATION_IMAGES images (storage order) of the layers/views DST keeps."""
    rows = np.flatnonzero(source.table("samples/status") == OK)[:CALIBRATION_IMAGES]
    x = source.features_at(rows, inputs)
    x = x[FeatureEncoding(StorageDtype.INT8).check(x)[1]]  # rows DST will not store do not calibrate it
    return running_absmax(None, x) if len(x) else None


def _image_errors(source: FeatureCache) -> dict[int, dict[str, Any]]:
    """SRC's per-row issue records (skipped images), by storage row."""
    return {int(i["row"]): i for i in source.issues() if i["row"] >= 0}


def _shard(source: FeatureCache, writer: CacheWriter, k: int, inputs: list[int | tuple[int, ...]], encoding: FeatureEncoding,
           pool: FeaturePool, errors: dict[int, dict[str, Any]]) -> ShardResult:
    """Shard k of DST from the same rows of SRC (every read checked); its feature parts in a recycled buffer."""
    a, b = writer.shard_rows(k)
    rows = np.arange(a, b)
    status = source.table("samples/status")[a:b].astype(np.uint8)  # a copy: refused rows become SKIPPED below
    x = source.features_at(rows, inputs)  # [n, K+V, T, D]: SRC's values
    stats = ErrorStats(x.shape[1]) if encoding.scheme is not None else None
    parts = pool.take(b - a)
    images = np.flatnonzero(status == OK)
    issues = [{k2: errors[r][k2] for k2 in ("row", "id", "stage", "reason", "where")} for r in range(a, b) if r in errors]
    turns = np.asarray(source.checked_rows("text/turns", rows))
    mean = np.asarray(source.checked_rows("text/mean", rows))
    num_turns = source.table("text/num_turns")[a:b].astype(np.int16)
    if images.size:  # (every row an image, the usual case: x itself, not a copy of its rows)
        block = x if images.size == len(rows) else x[torch.from_numpy(images)]
        absmax, valid = encoding.check(block)
        encoding.encode_rows(block, parts, images, stats, valid)
        refused = encoding.refusals(absmax, valid, [input_name(j) for j in inputs])
        for i, why in refused.items():  # as extraction in DST's dtype records it: no features, no instruction embedding
            r = int(images[i])
            status[r], turns[r], mean[r], num_turns[r] = SKIPPED, 0, 0, 0
            issues.append({"row": a + r, "id": str(source.table("samples/id")[a + r]), "stage": "encoder", "reason": why,
                           "where": str(source.table("samples/image_ref")[a + r])})
    FeaturePool.blank(parts, status)  # rows without an image are zeros, as extraction leaves them
    parts = dict(parts)
    data = parts.pop("features")
    return ShardResult(
        k, a, b, data, turns, mean, num_turns, status, source.table("samples/image_size")[a:b].astype(np.int32), issues,
        parts, stats,
    )
