"""WebDataset input benchmark: the bytes `layerfuse extract --wds` reads from its input tars, against their size.

One run of `run_extract` per input kind over the same shards (the built-in synthetic dataset written as WebDataset tars
by `write_dataset`: a .json record and a 96x96 PNG per sample), with the embedded tiny CLIP at random weights and
`ExtractConfig` defaults (2 DataLoader workers, batch 32): local paths, `pipe:cat PATH` commands and fsspec `memory://`
URLs, the last two spooled by planning (the default) and with `--spool none`. The same again with the images re-encoded as 336x336 JPEGs (quality 90), the size of a real
LLaVA-style image, since the plan pass reads a fixed ~1.5 KiB per sample (two 512-byte headers and the .json record)
whatever the image size. Then a resume: the markers of the output shards that hold the last input shard's rows are
removed and the same command run again.

Counting: every shard the plan pass or extraction opens is opened through `sources._open_headers` /
`stream.open_stream` / `stream.open_local` (extraction's reads by offset of a local file); the bench wraps them (DataLoader workers are forked, so they inherit the wrappers) with a file
proxy that counts the bytes it hands to `tarfile`, and also takes the opening thread's `rchar` from
/proc/thread-self/io (bytes returned by its read syscalls, pipe reads included) at open and at close: the bytes the OS
was asked for, buffering included (per thread, since planning reads several shards at once in threads). Each process appends one line per opened shard to a log; the ratios below are their sums over
the total size of the input tars. Extraction's reads of planning's local copies of `pipe:` shards (the spool) are
counted apart from its reads of the input.

    python bench/wds.py --out BENCHMARKS.md [--quick]
"""

from __future__ import annotations

import datetime
import io
import json
import os
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from layerfuse.core.benchmarks import bench_parser, command, machine, write_section  # noqa: E402
from layerfuse.pipeline.cache.extract import ExtractConfig, run_extract  # noqa: E402
from layerfuse.pipeline.data import sources, stream  # noqa: E402
from layerfuse.pipeline.data.synthetic import write_dataset  # noqa: E402
from layerfuse.pipeline.models.default_vision import DefaultVisionConfig, build_default_vision  # noqa: E402
from layerfuse.pipeline.models.encoder import DEFAULT_VISION  # noqa: E402

SECTION = "## WebDataset input: bytes read (`bench/wds.py`)"
SPOOL_SUFFIX = ".spool/"  # ExtractConfig.spool_dir "auto" beside a local --out
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


def _rchar() -> int:
    for line in Path("/proc/thread-self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


class _Counted:
    """A file proxy that counts the bytes it hands out and logs them (and its thread's rchar delta) on close."""

    def __init__(self, f: Any, url: str, phase: str, log: Path):
        self.f, self.url, self.phase, self.log = f, url, phase, log
        self.delivered, self.rchar0, self.closed_once, self.calls = 0, _rchar(), False, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.delivered += len(data)
        self.calls += 1
        return data

    def seek(self, *a: Any) -> int:
        return self.f.seek(*a)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        if not self.closed_once:
            self.closed_once = True
            rchar = _rchar() - self.rchar0
            with open(self.log, "a") as out:
                out.write(json.dumps({"pid": os.getpid(), "phase": self.phase, "url": self.url,
                                      "delivered": self.delivered, "rchar": rchar, "calls": self.calls}) + "\n")
        self.f.close()


def install_counters(log: Path) -> None:
    """Wrap the openers of WebDataset shards (planning's, and extraction's of streams and of local files) with
    `_Counted`."""
    plan_open, plan_stream, read_open, read_local = (sources._open_headers, sources.open_stream, stream.open_stream,
                                                     stream.open_local)

    def wrap(opener: Callable[[str], Any], phase: str) -> Callable[[str], Any]:
        # extraction opens a spool file (a local copy planning made) by its path in the OUT.spool folder
        return lambda url: _Counted(opener(url), url, "spool" if SPOOL_SUFFIX in url else phase, log)

    sources._open_headers = wrap(plan_open, "plan")
    sources.open_stream = wrap(plan_stream, "plan")
    stream.open_stream = wrap(read_open, "extract")
    stream.open_local = wrap(read_local, "extract")


def read_log(log: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return rows


def jpeg_shards(src: list[Path], dst: Path, side: int) -> list[Path]:
    """The shards again with every PNG re-encoded as a side x side JPEG (quality 90, a little noise so it is not flat)."""
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for path in src:
        target = dst / path.name
        with tarfile.open(path) as tin, tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as tout:
            for ti in tin:
                data = tin.extractfile(ti).read()
                name = ti.name
                if name.endswith(".png"):
                    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((side, side), Image.BICUBIC), np.int16)
                    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, "JPEG", quality=90)
                    data, name = buf.getvalue(), name[:-4] + ".jpg"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
        out.append(target)
    return out


def measure(label: str, urls: list[str], size: int, run: Callable[[str], Any], log: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = run(",".join(urls))
    seconds = time.perf_counter() - t0
    rows = read_log(log)
    out: dict[str, Any] = {"label": label, "size": size, "seconds": seconds, "summary": res.summary, "shards": len(urls)}
    for phase in ("plan", "extract", "spool"):
        mine = [r for r in rows if r["phase"] == phase]
        out[phase] = {"delivered": sum(r["delivered"] for r in mine), "rchar": sum(r["rchar"] for r in mine),
                      "calls": sum(r["calls"] for r in mine), "opened": len(mine), "urls": sorted({r["url"] for r in mine})}
    return out


LATENCY_S = 0.5  # a stand-in for a store's time to first byte


def plan_latency(paths: list[Path], repeats: int = 3) -> dict[str, float]:
    """Wall seconds of planning `pipe:` shards whose command first waits LATENCY_S (fetching from a store), one shard at
    a time and `sources.PLAN_THREADS` at once (the default); median of `repeats`, interleaved."""
    spec = ",".join(f"pipe:sleep {LATENCY_S}; cat {p}; : {i}" for i, p in enumerate(paths))  # ": i": no two alike
    times: dict[int, list[float]] = {1: [], sources.PLAN_THREADS: []}
    for _ in range(repeats):
        for threads in times:
            t = time.perf_counter()
            sources.plan_webdataset(spec, threads=threads)
            times[threads].append(time.perf_counter() - t)
    return {"shards": len(paths), "one": float(np.median(times[1])), "many": float(np.median(times[sources.PLAN_THREADS])),
            "threads": sources.PLAN_THREADS}


def render(cmd: str, results: list[dict[str, Any]], resume: dict[str, Any], sizes: dict[str, float],
           latency: dict[str, float]) -> str:
    def ratio(x: int, size: int) -> str:
        return f"{x / size:.3f}"

    rows = []
    for r in results:
        p, e, sp = r["plan"], r["extract"], r["spool"]
        total_d, total_r = p["delivered"] + e["delivered"], p["rchar"] + e["rchar"]
        spool = f"{ratio(sp['delivered'], r['size'])} ({sp['opened']} files)" if sp["opened"] else "-"
        rows.append(f"| {r['label']} | {r['size'] / 2**20:.1f} MiB in {r['shards']} | {ratio(p['delivered'], r['size'])} "
                    f"({ratio(p['rchar'], r['size'])}) | {p['calls']} | {ratio(e['delivered'], r['size'])} ({ratio(e['rchar'], r['size'])}) | "
                    f"**{ratio(total_d, r['size'])}** ({ratio(total_r, r['size'])}) | {spool} | {e['opened'] + sp['opened']} | "
                    f"{r['seconds']:.1f} s |")
    rp, re_ = resume["plan"], resume["extract"]
    return "\n".join([
        SECTION, "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine()}  ",
        "Settings: the built-in synthetic dataset written as WebDataset tars (`layerfuse data synthetic`: per sample a .json "
        f"record, mean {sizes['json']:.0f} B, and a 96x96 PNG, mean {sizes['png'] / 1024:.1f} KiB), and the same with the "
        f"PNGs re-encoded as 336x336 JPEGs (mean {sizes['jpg'] / 1024:.1f} KiB); embedded tiny CLIP at random weights, "
        "`ExtractConfig` defaults (2 DataLoader workers, batch 32). Bytes counted at the file objects the plan pass and the "
        "extraction open (what `tarfile` was handed) and, in parentheses, as the reading thread's `rchar` "
        "(/proc/thread-self/io) between opening and closing each shard: bytes returned by its read syscalls, so buffering "
        "counts (per thread: planning reads several shards at once). For `pipe:` shards that is the pipe (the command's "
        "own reads of the file are the `cat` child's). For `memory://` it is ~0: nothing is read from the OS. Plan "
        "pass reads: the read calls made on the shards' file objects; on an fsspec file opened without readahead (the plan "
        "by headers) each is one ranged request to the store, while a streamed fsspec shard is read with 8 MiB "
        "readahead, one request per 8 MiB.", "",
        "| Input | Input size | Plan pass / input | Plan pass reads (calls) | Extraction from the input / input | Total read from the input / input "
        "(goal <= 1.05) | Extraction from the spool / input (local copies) | Shards opened by extraction | `run_extract` |",
        "|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"Resume ({resume['label']}): with the markers of the {resume['redo']} output shard(s) holding the last input "
        f"shard's rows removed, the rerun opens {re_['opened']} of {resume['shards']} input shards and reads "
        f"{ratio(re_['delivered'], resume['size'])} ({ratio(re_['rchar'], resume['size'])}) of the input size "
        f"(its plan is kept in the cache: plan pass {rp['delivered']} bytes); the input shards it opened are "
        f"{resume['opened_size'] / resume['size']:.3f} of the input.", "",
        f"Planning several shards at once: {latency['shards']} `pipe:` shards of the 336-px JPEGs whose command first "
        f"waits {LATENCY_S} s (a stand-in for a store's latency) took {latency['many']:.2f} s to plan with "
        f"{latency['threads']} threads (the default, `sources.PLAN_THREADS`) against {latency['one']:.2f} s one shard at "
        f"a time: **{latency['one'] / latency['many']:.1f}x** (median of 3, interleaved), the same plan (tested).", "",
        "The plan pass reads every member header (512 bytes) and the .json/.txt members. It seeks past image data in "
        "local shards (read unbuffered). It streams `pipe:` shards (a command cannot seek) and remote fsspec shards (one "
        "sequential read instead of a ranged request per header and .json, which on a real store is latency-bound) "
        "whole, copying what it streams to a spool file beside the cache (`--spool`, default auto: OUT.spool). "
        "Extraction reads a local file (an input shard on disk, or a spool copy) by offset: each planned image's "
        "512-byte header, checked, and its data, nothing else; it streams a shard that has no local copy (a command or "
        "an fsspec URL under `--spool none`) once, front to back. With `--spool none` a command runs again, and an "
        "fsspec shard is planned by ranged reads of its headers (cache_type \"none\") and streamed again. So the total "
        "read from the input is about 1 for local shards (plan: headers and records; extraction: the images and their "
        f"headers; the padding to 512-byte blocks is never read), for the 96-px PNGs ({sizes['png_tar'] / 1024:.1f} KiB of tar "
        f"per sample, most of it headers and the record) as for the 336-px JPEGs ({sizes['jpg_tar'] / 1024:.1f} KiB); "
        "1 for spooled `pipe:` and fsspec shards, whatever the sample size, at the cost of local disk for the copies "
        "(the input's size, removed when the cache is complete); 1 + (headers + records) / input for unspooled fsspec "
        "shards; 2 for `pipe:` with `--spool none`.",
    ])


def main() -> None:
    ap = bench_parser(__doc__)
    args = ap.parse_args()
    n, shard_size = (120, 40) if args.quick else (1200, 300)
    cmd = command()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="layerfuse-bench-wds-") as tmp:
        tmp = Path(tmp)
        build_default_vision(tmp / "run" / "vision", DefaultVisionConfig(pretrain_steps=0))
        write_dataset(tmp / "data", n, seed=0, shard_size=shard_size, progress=False)
        png = sorted((tmp / "data" / "wds").glob("*.tar"))
        jpg = jpeg_shards(png, tmp / "jpg", 336)
        log = tmp / "reads.jsonl"
        install_counters(log)

        def extract(name: str, spool: str = "auto") -> Callable[[str], Any]:
            def run(wds: str) -> Any:
                return run_extract(ExtractConfig(out=str(tmp / "caches" / name), wds=wds, builtin=None, vision=DEFAULT_VISION, vision_pretrain_steps=0,
                                                 run_dir=str(tmp / "run"), progress=False, spool=spool))
            return run

        def member_sizes(paths: list[Path], suffix: str) -> float:
            sizes = [ti.size for p in paths for ti in tarfile.open(p) if ti.name.endswith(suffix)]
            return float(np.mean(sizes))

        sizes = {"json": member_sizes(png, ".json"), "png": member_sizes(png, ".png"), "jpg": member_sizes(jpg, ".jpg"),
                 "png_tar": sum(p.stat().st_size for p in png) / n, "jpg_tar": sum(p.stat().st_size for p in jpg) / n}
        extract("warmup")(",".join(map(str, png[:1])))  # imports, file cache
        read_log(log)
        results = []
        for label, paths in (("96-px PNG", png), ("336-px JPEG", jpg)):
            size = sum(p.stat().st_size for p in paths)
            results.append(measure(f"{label}, local paths", [str(p) for p in paths], size, extract(f"{label}-local"), log))
            pipes = [f"pipe:cat {p}" for p in paths]
            results.append(measure(f"{label}, `pipe:cat`", pipes, size, extract(f"{label}-pipe"), log))
            results.append(measure(f"{label}, `pipe:cat`, `--spool none`", pipes, size, extract(f"{label}-pipe-nospool", spool="none"), log))
            base = f"memory://bench-wds-{uuid.uuid4().hex}"
            urls = []
            for p in paths:
                with fsspec.open(f"{base}/{p.name}", "wb") as f:
                    f.write(p.read_bytes())
                urls.append(f"{base}/{p.name}")
            results.append(measure(f"{label}, fsspec `memory://`", urls, size, extract(f"{label}-memory"), log))
            results.append(measure(f"{label}, fsspec `memory://`, `--spool none`", urls, size,
                                   extract(f"{label}-memory-nospool", spool="none"), log))
            fsspec.filesystem("memory").rm(base.replace("memory://", "/"), recursive=True)

        # resume: redo the output shards that hold the last input shard's rows (local JPEG shards)
        cache = tmp / "caches" / "336-px JPEG-local"
        g = __import__("zarr").open_group(str(cache), mode="r+")
        meta = dict(g.attrs["layerfuse"])
        locs = [json.loads(str(x)) for x in g["samples/locator"][:]]
        last = str(jpg[-1])
        rows = [i for i, loc in enumerate(locs) if loc.get("tar") == last]
        s = int(meta["storage"]["shard_samples"])
        redo = sorted({r // s for r in rows})
        for k in redo:
            (cache / "progress" / f"shard-{k:06d}.json").unlink()
        g.attrs["layerfuse"] = {**meta, "complete": False}
        size = sum(p.stat().st_size for p in jpg)
        resume = measure("336-px JPEG, local paths", [str(p) for p in jpg], size, extract("336-px JPEG-local"), log)
        resume.update(redo=len(redo), opened_size=sum(os.path.getsize(u) for u in resume["extract"]["urls"]))
        latency = plan_latency(jpg * 2)  # each shard twice: 12 commands
        section = render(cmd, results, resume, sizes, latency)
    write_section(args.out, SECTION, section)
    print(section)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
