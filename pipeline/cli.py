"""The `layerfuse` command line (click)."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from typing import Any

import click

from layerfuse.pipeline import __version__
from layerfuse.pipeline.text import DEFAULT_SUFFIXES, DEFAULT_TEXT_MODEL


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input, shown as one clean line instead of a traceback."""
    from layerfuse.pipeline.cache import CacheError
    from layerfuse.pipeline.checkpoints import CheckpointError
    from layerfuse.pipeline.extract import ExtractError
    from layerfuse.pipeline.records import SampleError

    return (CacheError, CheckpointError, ExtractError, SampleError, FileNotFoundError)


def _run_cli(fn, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except _user_errors() as e:
        raise click.ClickException(str(e)) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="layerfuse")
def main() -> None:
    """layerfuse: multi-layer visual feature fusion for LLaVA-style VLMs on a cached-feature pipeline.

    \b
    Phase one:  layerfuse extract      every vision-encoder layer + instruction embeddings -> zarr cache
    Inspect:    layerfuse cache info | verify
    Data:       layerfuse data synthetic  (the built-in dataset)
    Fusion:     layerfuse fusers          (registered fusers, their options, layer-spec resolution)

    \b
    Example (the embedded default, what `make extract` runs):
      layerfuse extract --run-dir runs/default --builtin 2000
    """


# --- data -----------------------------------------------------------------------------------------------------------
@main.group()
def data() -> None:
    """Datasets: the built-in synthetic set.

    \b
    Example:
      layerfuse data synthetic --out data/synthetic --n 2000 --seed 0
    """


@data.command("synthetic")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--n", type=click.IntRange(min=1), default=2000, show_default=True, help="Number of samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Dataset seed (sample i depends only on seed and i).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Samples per WebDataset tar.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_synthetic(out_dir: str, n: int, seed: int, shard_size: int, quiet: bool) -> None:
    """Render the built-in dataset: procedural images with single-answer questions.

    Categories: colour, shape, count, position, glyph (a small digit), detail (a small dot or thin stripe
    on one object), plus caption samples for stage-1 pretraining. Splits train/val/test (80/10/10).
    Writes OUT/images/ + OUT/llava.json (+ llava_<split>.json) and WebDataset shards OUT/wds/<split>-NNNNNN.tar.

    \b
    Example:
      layerfuse data synthetic --out data/synthetic --n 2000 --seed 0
      layerfuse extract --llava data/synthetic/llava.json --image-root data/synthetic/images --out runs/syn/cache
    """
    from layerfuse.pipeline.synthetic import write_dataset

    manifest = write_dataset(out_dir, n=n, seed=seed, shard_size=shard_size, progress=not quiet)
    counts = manifest["counts"]
    click.echo(f"wrote {n} samples to {out_dir}: " + ", ".join(f"{s} {sum(c.values())}" for s, c in counts.items()))


# --- extract --------------------------------------------------------------------------------------------------------
@main.command()
@click.option("--out", default=None, help="Cache URL: a local path or fsspec URL (memory://, s3://...). [default: RUN_DIR/cache]")
@click.option("--run-dir", default="runs/default", show_default=True, type=click.Path(file_okay=False), help="Run folder; the default vision tower is saved here.")
@click.option("--llava", default=None, help="Source: LLaVA JSON/JSONL file (path or URL).")
@click.option("--image-root", default=None, help="Folder the LLaVA 'image' paths are relative to. [default: the JSON's folder]")
@click.option("--wds", default=None, help="Source: WebDataset shards: paths, globs or brace patterns, comma-separated.")
@click.option("--builtin", type=click.IntRange(min=1), default=None, help="Source: N built-in synthetic samples (the default source, N=2000).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the built-in dataset.")
@click.option("--split", default="train", show_default=True, help="Split recorded for samples whose record names none.")
@click.option("--vision", default="default", show_default=True, help="Vision tower: HF hub id or local folder; 'default' = tiny random CLIP.")
@click.option("--vision-revision", default=None, help="Hub revision of --vision.")
@click.option("--pad-to-square/--no-pad-to-square", default=False, show_default=True, help="LLaVA's expand2square before the processor.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True, help="Stored feature dtype.")
@click.option("--text-model", default=DEFAULT_TEXT_MODEL, show_default=True, help="sentence-transformers model (id or folder) for instructions.")
@click.option("--suffix", "suffixes", multiple=True, help="Answer-format suffix to strip before embedding (repeat; replaces the LLaVA defaults).")
@click.option("--shard-samples", type=click.IntRange(min=1), default=None, help="Samples per output shard. [default: from --shard-mib]")
@click.option("--shard-mib", type=click.IntRange(min=1), default=512, show_default=True, help="Target uncompressed size of an output shard.")
@click.option("--chunk-kib", type=click.IntRange(min=1), default=256, show_default=True, help="Target size of a chunk (one layer of several samples, for tiny encoders).")
@click.option("--clevel", type=click.IntRange(0, 9), default=3, show_default=True, help="zstd level (blosc, byte shuffle); 5 stores ~12% less at half the write speed.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=89_478_485, show_default=True, help="Decompression-bomb guard: larger images are skipped.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="DataLoader workers for decoding.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--compute-dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True, help="Encoder dtype (auto: bf16 on CUDA, fp32 on CPU).")
@click.option("--strict", is_flag=True, help="Stop at the first bad sample instead of skipping and recording it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(out: str | None, run_dir: str, suffixes: tuple[str, ...], quiet: bool, **kw: Any) -> None:
    """Phase one: store every vision-encoder layer and the instruction embeddings in a zarr v3 cache.

    Reads one source (LLaVA JSON + images, WebDataset shards, or the built-in dataset), runs the frozen
    vision tower once and writes all L+1 hidden states (every token, CLS included) plus sentence-transformers
    embeddings of the human turns. Killed runs resume: run the same command again. Under torchrun each rank
    extracts its own shards of the same cache.

    \b
    Examples:
      layerfuse extract                                  # built-in data, tiny random CLIP -> runs/default/cache
      layerfuse extract --llava llava_v1_5_mix665k.json --image-root data/ \\
          --vision openai/clip-vit-large-patch14-336 --pad-to-square --out /data/cache/clip336
      layerfuse extract --wds 'shards/train-{000000..000099}.tar' --vision google/siglip-so400m-patch14-384 --out s3://bucket/cache
      torchrun --nproc_per_node 8 -m layerfuse.pipeline.cli extract --llava mix665k.json --image-root data/ --out /data/cache
    """
    import transformers

    from layerfuse.pipeline.extract import ExtractConfig, run_extract

    transformers.logging.disable_progress_bar()  # per-file weight-loading bars would drown the extraction bar

    names = {f.name for f in fields(ExtractConfig)}
    cfg = ExtractConfig(
        out=out or f"{run_dir.rstrip('/')}/cache",
        run_dir=run_dir,
        suffixes=tuple(suffixes) if suffixes else DEFAULT_SUFFIXES,
        progress=not quiet,
        **{k: v for k, v in kw.items() if k in names},
    )
    res = _run_cli(run_extract, cfg)
    if not res.summary and not res.already_complete:
        return  # a non-zero rank under torchrun: rank 0 reports
    if res.already_complete:
        click.echo(f"{res.url} is already complete ({res.summary.get('ok', 0)} images); nothing to do.")
        return
    s = res.summary
    click.echo(
        f"cache {res.url}: {s['ok']} images, {s['text_only']} text-only, {s['skipped']} skipped at decode, "
        f"{s['plan_skipped']} malformed records, {s['notes']} repaired; {res.seconds:.1f}s"
    )
    if s["skipped"] or s["plan_skipped"] or s["notes"]:
        from layerfuse.pipeline.cache import FeatureCache

        issues = FeatureCache(res.url).issues()
        for i in issues[:10]:
            what = "repaired" if i["stage"] == "note" else "skipped"
            click.echo(f"  {what}: {i['id']}: {i['reason']}" + (f" ({i['where']})" if i["where"] else ""))
        if len(issues) > 10:
            click.echo(f"  ... {len(issues) - 10} more: `layerfuse cache info {res.url} --json` lists all")


# --- cache ----------------------------------------------------------------------------------------------------------
@main.group()
def cache() -> None:
    """Inspect and check a feature cache.

    \b
    Examples:
      layerfuse cache info runs/default/cache
      layerfuse cache info runs/default/cache --json
      layerfuse cache verify runs/default/cache
    """


@cache.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (lists every skipped sample).")
def cache_info_cmd(path: str, as_json: bool) -> None:
    """Print a cache's summary: samples, layers, tokens, hidden size, dtype, encoders, skipped samples.

    \b
    Example:
      layerfuse cache info runs/default/cache --json | jq .num_samples
    """
    from layerfuse.pipeline.verify import cache_info, format_info

    info = _run_cli(cache_info, path)
    click.echo(json.dumps(info, indent=1) if as_json else format_info(info))


@cache.command("verify")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cache_verify_cmd(path: str, as_json: bool, quiet: bool) -> None:
    """Check completeness, shapes, NaN/Inf and every row's checksums; exit status 1 on any problem.

    \b
    Example:
      layerfuse cache verify runs/default/cache && echo cache ok
    """
    from layerfuse.pipeline.verify import report_json, verify_cache

    rep = _run_cli(verify_cache, path, progress=not quiet)
    if as_json:
        click.echo(report_json(rep))
    elif rep.ok:
        click.echo(f"OK: {path} ({rep.rows_checked} rows checked)")
    else:
        click.echo(f"FAILED: {path}: {len(rep.problems)} problem(s)", err=True)
        for p in rep.problems:
            click.echo(f"  - {p}", err=True)
    if not rep.ok:
        sys.exit(1)


@main.command("fusers")
@click.option("--layers", "spec", default=None, help="Also resolve this layer spec (preset, dash list, explicit list or groups).")
@click.option("--depth", type=click.IntRange(min=1), default=24, show_default=True, help="Encoder blocks L to resolve --layers against.")
@click.option("--cache", "cache_path", default=None, help="Resolve --layers against this cache's encoder instead of --depth.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def fusers_cmd(spec: str | None, depth: int, cache_path: str | None, as_json: bool) -> None:
    """List the registered fusers with their options, and resolve a layer spec.

    \b
    Examples:
      layerfuse fusers
      layerfuse fusers --layers 3-18-23 --depth 32
      layerfuse fusers --layers igva --cache runs/default/cache
    """
    from dataclasses import MISSING

    from layerfuse.fusion import LayerSpecError, fuser_class, list_fusers, parse_layers

    listing = {}
    for name in list_fusers():
        cls = fuser_class(name)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        opts = {f.name: f.default for f in fields(cls.config_class) if f.default is not MISSING}
        listing[name] = {"summary": doc[0] if doc else "", "internal": cls.internal, "options": opts}
    resolved = None
    if spec is not None:
        if cache_path is not None:
            from layerfuse.pipeline.cache import FeatureCache

            depth = _run_cli(FeatureCache, cache_path).num_layers - 1
        try:
            sel = parse_layers(spec, depth)
        except LayerSpecError as e:
            raise click.ClickException(str(e)) from e
        resolved = {"spec": spec, "depth": depth, "terms": [list(t) for t in sel.terms], "read": sel.layers, "text": sel.describe()}
    if as_json:
        click.echo(json.dumps({"fusers": listing, "layers": resolved}, indent=1, default=str))
        return
    for name, info in listing.items():
        kind = "internal" if info["internal"] else "external"
        click.echo(f"{name:8s} ({kind}) {info['summary']}")
        click.echo("         options: " + ", ".join(f"{k}={v!r}" for k, v in info["options"].items()))
    if resolved:
        click.echo(f"\nlayers {resolved['text']}\n  reads hidden states {resolved['read']}")


if __name__ == "__main__":  # `torchrun -m layerfuse.pipeline.cli extract ...`
    main()
