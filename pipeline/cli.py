"""The `layerfuse` command line (click)."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from typing import Any

import click

from layerfuse.core import __version__
from layerfuse.core.errors import LayerfuseError, StateError
from layerfuse.core.dtypes import StorageDtype
from layerfuse.core.options import option_pair
from layerfuse.pipeline.models.text import DEFAULT_SUFFIXES, DEFAULT_TEXT_MODEL


class UserError(click.ClickException):
    """A `LayerfuseError` as the CLI shows it: `layerfuse <command>: <message>` on stderr, exit status 1."""

    def __init__(self, command: str, error: LayerfuseError):
        super().__init__(str(error))
        self.command = command

    def show(self, file: Any = None) -> None:
        click.echo(f"{self.command}: {self.format_message()}", file=file, err=file is None)


def _command_path(ctx: click.Context) -> str:
    """"layerfuse cache info" for the `info` command, whatever name the program was started under (torchrun -m ...)."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name or ctx.command.name or "")
        ctx = ctx.parent
    return " ".join(["layerfuse", *reversed(names)])


class _OneLineUserErrors:
    """Command mixin: a `LayerfuseError` (an error the user can fix) becomes a `UserError`; every other exception
    keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except LayerfuseError as e:
            raise UserError(_command_path(ctx), e) from e


class LayerfuseCommand(_OneLineUserErrors, click.Command):
    pass


class LayerfuseGroup(_OneLineUserErrors, click.Group):
    command_class = LayerfuseCommand
    group_class = type  # subgroups (cache, data, export, bench) are LayerfuseGroups too


@click.group(cls=LayerfuseGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="layerfuse")
def main() -> None:
    """layerfuse: multi-layer visual feature fusion for LLaVA-style VLMs on a cached-feature pipeline.

    \b
    Phase one:  layerfuse extract      every vision-encoder layer + instruction embeddings -> zarr cache
    Inspect:    layerfuse cache info | verify
    Data:       layerfuse data synthetic  (the built-in dataset)
    Fusion:     layerfuse fusers          (registered fusers, their options, layer-spec resolution)
    Phase two:  layerfuse train | eval | infer
    Ablations:  layerfuse ablate | report
    Deploy:     layerfuse export onnx | engine,  layerfuse bench engine

    \b
    Example (the embedded default, what `make extract` and `make train` run):
      layerfuse extract --run-dir runs/default --builtin 6000
      layerfuse train --cache runs/default/cache --stage 1 --out runs/default/stage1 ...
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
    from layerfuse.pipeline.data.synthetic import write_dataset

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
@click.option("--vision", default="default", show_default=True, help="Vision tower: HF hub id or local folder; 'default' = the embedded tiny CLIP, pretrained on built-in renders into RUN_DIR/vision.")
@click.option("--vision-revision", default=None, help="Hub revision of --vision.")
@click.option("--vision-pretrain-steps", type=click.IntRange(min=0), default=None, help="Pretraining steps of the default tower (--vision default only); 0 = random weights. [default: 2000]")
@click.option("--pad-to-square/--no-pad-to-square", default=False, show_default=True, help="LLaVA's expand2square before the processor.")
@click.option("--dtype", type=click.Choice(StorageDtype.names()), default="float16", show_default=True, help="Stored feature dtype.")
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
@click.option("--compute-dtype", type=click.Choice(["auto", *StorageDtype.names()]), default="auto", show_default=True, help="Encoder dtype (auto: bf16 on CUDA, fp32 on CPU).")
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
      layerfuse extract                                  # built-in data, tiny pretrained CLIP -> runs/default/cache
      layerfuse extract --llava llava_v1_5_mix665k.json --image-root data/ \\
          --vision openai/clip-vit-large-patch14-336 --pad-to-square --out /data/cache/clip336
      layerfuse extract --wds 'shards/train-{000000..000099}.tar' --vision google/siglip-so400m-patch14-384 --out s3://bucket/cache
      torchrun --nproc_per_node 8 -m layerfuse.pipeline.cli extract --llava mix665k.json --image-root data/ --out /data/cache
    """
    import transformers

    from layerfuse.pipeline.cache.extract import ExtractConfig, run_extract

    transformers.logging.disable_progress_bar()  # per-file weight-loading bars would drown the extraction bar

    names = {f.name for f in fields(ExtractConfig)}
    cfg = ExtractConfig(
        out=out or f"{run_dir.rstrip('/')}/cache",
        run_dir=run_dir,
        suffixes=tuple(suffixes) if suffixes else DEFAULT_SUFFIXES,
        progress=not quiet,
        **{k: v for k, v in kw.items() if k in names},
    )
    res = run_extract(cfg)
    if not res.summary and not res.already_complete:
        return  # a non-zero rank under torchrun: rank 0 reports
    if res.already_complete:
        click.echo(f"{res.url} is already complete ({res.summary.get('ok', 0)} images); nothing to do.")
        return
    s = res.summary
    tower = "" if res.tower_seconds is None else f"tower ready in {res.tower_seconds:.1f} s; "
    click.echo(
        f"cache {res.url}: {s['ok']} images, {s['text_only']} text-only, {s['skipped']} skipped at decode, "
        f"{s['plan_skipped']} malformed records, {s['notes']} repaired; {tower}extracted in {res.seconds:.1f} s"
    )
    if s["skipped"] or s["plan_skipped"] or s["notes"]:
        from layerfuse.pipeline.cache.reader import FeatureCache

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
    from layerfuse.pipeline.cache.verify import cache_info, format_info

    info = cache_info(path)
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
    from layerfuse.pipeline.cache.verify import report_json, verify_cache

    rep = verify_cache(path, progress=not quiet)
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

    from layerfuse.fusion import fuser_class, list_fusers, parse_layers

    listing = {}
    for name in list_fusers():
        cls = fuser_class(name)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        opts = {f.name: f.default for f in fields(cls.config_class) if f.default is not MISSING}
        listing[name] = {"summary": doc[0] if doc else "", "internal": cls.internal, "options": opts}
    resolved = None
    if spec is not None:
        if cache_path is not None:
            from layerfuse.pipeline.cache.reader import FeatureCache

            depth = FeatureCache(cache_path).num_layers - 1
        sel = parse_layers(spec, depth)
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


# --- phase two ------------------------------------------------------------------------------------------------------
def _fuser_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """--fuser-opt KEY=VALUE pairs as options (values as core/options.py reads them)."""
    out = {}
    for pair in pairs:
        try:
            key, value = option_pair(pair)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--fuser-opt") from None
        out[key] = value
    return out


@main.command("train")
@click.option("--cache", required=True, help="Feature cache (phase one output).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--stage", type=click.IntRange(1, 2), default=1, show_default=True, help="1: fuser + projector, LLM frozen. 2: also the LLM (from --init-from).")
@click.option("--fuser", default="concat", show_default=True, help="Fuser name (`layerfuse fusers` lists them).")
@click.option("--layers", default=None, help="Layer spec (preset, dash list, explicit list, groups). [default: the fuser's]")
@click.option("--fuser-opt", "fuser_opts", multiple=True, metavar="KEY=VALUE", help="Another fuser option, e.g. heads=4 (repeat).")
@click.option("--llm", default="default", show_default=True, help="Causal LM: hub id or folder; 'default' = the embedded tiny Llama (random weights).")
@click.option("--llm-default-dir", default=None, help="Where the embedded default LLM is built. [default: OUT/default-llm]")
@click.option("--init-from", default=None, type=click.Path(file_okay=False), help="Stage 2: the stage-1 run to start from.")
@click.option("--template", type=click.Choice(["plain", "v1", "chat"]), default=None, help="Conversation template. [default: plain (stage 1), v1 (stage 2)]")
@click.option("--split", default="train", show_default=True, help="Cache split to train on.")
@click.option("--categories", default=None, help="Only these sample categories (comma-separated), e.g. caption for stage 1.")
@click.option("--max-length", type=click.IntRange(min=8), default=2048, show_default=True, help="Max tokens per sample (image span included); longer ones are cut, never inside the image.")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Global batch (all ranks x accumulation).")
@click.option("--micro-batch-size", type=click.IntRange(min=1), default=None, help="Per rank and forward pass; the rest is gradient accumulation. [default: batch/world]")
@click.option("--lr-fuser", type=float, default=None, help="[default: 1e-3 stage 1, 2e-5 stage 2]")
@click.option("--lr-projector", type=float, default=None, help="[default: 1e-3 stage 1, 2e-5 stage 2]")
@click.option("--lr-llm", type=float, default=None, help="[default: 2e-5 in stage 2]")
@click.option("--llm-mode", type=click.Choice(["frozen", "full", "lora"]), default=None, help="What stage 2 does to the LLM. [default: full]")
@click.option("--lora-r", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lora-alpha", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lora-dropout", type=float, default=0.05, show_default=True)
@click.option("--lora-targets", default="all-linear", show_default=True, help="'all-linear' or module names, comma-separated.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True, help="auto = bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute LLM activations in the backward pass.")
@click.option("--fsdp", is_flag=True, help="Shard the model over torchrun ranks (FSDP2) instead of DDP.")
@click.option("--attn-implementation", default="auto", show_default=True, help="auto (flash_attention_2 when installed on CUDA, else sdpa) | sdpa | eager | ...")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--buffer-rows", type=click.IntRange(min=1), default=1024, show_default=True, help="Shuffle buffer in samples (whole global batches).")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="DataLoader workers reading the cache.")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--save-every", type=click.IntRange(min=0), default=200, show_default=True, help="Checkpoint every N steps (0: only at the end).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--no-tensorboard", "tensorboard", flag_value=False, default=True, help="Do not write TensorBoard events.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start over in an --out that holds a run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_cmd(fuser_opts: tuple[str, ...], categories: str | None, resume: bool, overwrite: bool, quiet: bool, **kw: Any) -> None:
    """Phase two: train fuser + projector (stage 1) or the whole model (stage 2) from the cache.

    Reads only the layers the fuser needs; the vision encoder never runs. Checkpoints every --save-every
    steps; a killed run continues exactly with --resume. Under torchrun it trains with DDP (or --fsdp).

    \b
    Examples:
      layerfuse train --cache runs/default/cache --stage 1 --categories caption --out runs/default/stage1
      layerfuse train --cache runs/default/cache --stage 2 --init-from runs/default/stage1 --out runs/default/stage2
      layerfuse train --cache /data/cache/clip336 --fuser mmfuser --llm lmsys/vicuna-7b-v1.5 --batch-size 256 \\
          --micro-batch-size 16 --out runs/mmfuser-s1
      torchrun --nproc_per_node 8 -m layerfuse.pipeline.cli train --cache ... --stage 2 --init-from ... --out ...
    """
    import os

    import transformers

    from layerfuse.pipeline.training.train import TrainConfig, train

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after the tokenizer is loaded
    transformers.logging.disable_progress_bar()
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(
        fuser_options=_fuser_options(fuser_opts),
        categories=[c.strip() for c in categories.split(",") if c.strip()] if categories else None,
        progress=not quiet,
        **{k: v for k, v in kw.items() if k in names},
    )
    res = train(cfg, resume=resume, overwrite=overwrite)
    if not res.is_main:
        return  # under torchrun, rank 0 reports
    if res.resumed_from >= res.steps:
        click.echo(f"{res.run_dir}: already trained for {res.steps} steps; nothing to do.")
        return
    loss = f"{res.final_loss:.4f}" if res.final_loss is not None else "-"
    resumed = f" (resumed at step {res.resumed_from})" if res.resumed_from else ""
    click.echo(f"trained {res.run_dir}: {res.steps} steps{resumed}, {res.samples} samples, final loss {loss}, {res.elapsed_s:.0f}s")


@main.command("eval")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True), help="A trained run folder.")
@click.option("--cache", default=None, help="Cache to evaluate on. [default: the run's training cache]")
@click.option("--split", default="val", show_default=True)
@click.option("--categories", default=None, help="Only these categories (comma-separated).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N samples of the split.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output folder. [default: RUN/eval/SPLIT]")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of the table.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_cmd(run_dir: str, categories: str | None, as_json: bool, quiet: bool, **kw: Any) -> None:
    """Greedy answers on a cache split: exact-match accuracy per task category and overall.

    Writes RUN/eval/SPLIT/results.{json,md} and answers.jsonl (LLaVA's answer-file format). The majority
    column is the accuracy of always giving the training split's most frequent answer of that category; chance
    is 1 / the number of distinct answers the training split gives in that category.

    \b
    Example:
      layerfuse eval --run runs/default/stage2 --split val
    """
    import os

    import transformers

    from layerfuse.pipeline.training.evaluate import EvalConfig, evaluate

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.disable_progress_bar()
    cfg = EvalConfig(run=run_dir, categories=[c.strip() for c in categories.split(",")] if categories else None, progress=not quiet, **kw)
    res = evaluate(cfg)
    if as_json:
        click.echo((res.out_dir / "results.json").read_text())
        return
    click.echo(f"{run_dir} on {cfg.split}:")
    click.echo(res.table())
    if res.skipped:
        click.echo(f"({len(res.skipped)} samples without an answerable first question were not scored; see results.json)")
    click.echo(f"written to {res.out_dir}")


@main.command("infer")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True), help="A trained run folder.")
@click.option("--image", "images", required=True, multiple=True, type=click.Path(dir_okay=False, exists=True), help="Image file (repeat for several).")
@click.option("--question", "questions", required=True, multiple=True, help="Question (one, or one per --image).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
def infer_cmd(run_dir: str, images: tuple[str, ...], questions: tuple[str, ...], max_new_tokens: int, device: str) -> None:
    """Answer questions about raw images with a trained run, live: the vision encoder runs, no cache.

    \b
    Example:
      layerfuse infer --run runs/default/stage2 --image photo.png --question "What colour is the circle?"
    """
    import transformers

    from layerfuse.core.distributed import DistContext
    from layerfuse.pipeline.training.infer import LivePipeline, load_image
    from layerfuse.pipeline.data.records import SampleError

    transformers.logging.disable_progress_bar()
    if len(questions) not in (1, len(images)):
        raise click.BadParameter(f"give one --question, or one per --image ({len(images)})", param_hint="--question")
    qs = list(questions) * len(images) if len(questions) == 1 else list(questions)
    loaded = []
    for path in images:
        try:
            loaded.append(load_image(path))
        except SampleError as e:
            raise SampleError(f"{path}: {e.reason}") from e
    pipe = LivePipeline(run_dir, device=DistContext().device(device))
    for path, q, a in zip(images, qs, pipe.answer(loaded, qs, max_new_tokens)):
        click.echo(a if len(images) == 1 else f"{path}\t{q}\t{a}")


# --- ablations ------------------------------------------------------------------------------------------------------
@main.command("ablate")
@click.option("--cache", default=None, help="Feature cache to sweep on (or `cache:` in the sweep file).")
@click.option("--sweep", "sweep_file", default=None, type=click.Path(dir_okay=False), help="YAML or TOML sweep file; command-line values override it.")
@click.option("--fusers", default=None, help="Fusers, comma-separated, e.g. single,concat,mmfuser,igva.")
@click.option("--layers", default=None, help="Layer sets, comma-separated (e.g. 18,3-18-23,all); separate with ';' when a set has commas ('4,12,20;12,').")
@click.option("--seeds", default=None, help="A count (3 = seeds 0,1,2) or a comma list (0,5). [default: 1]")
@click.option("--probe-layers", default=None, help="Layer-probe study: one single-layer probe per hidden state: 'all' or e.g. 0,3,12,23.")
@click.option("--mode", type=click.Choice(["probe", "lm"]), default=None, help="probe: fuser + small answer head (minutes); lm: fuser + projector + LLM, greedy exact match. [default: probe]")
@click.option("--epochs", type=float, default=None, help="Epochs over the training questions. [default: 5]")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps per variant (overrides --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[default: 32]")
@click.option("--lr", type=float, default=None, help="Probe mode learning rate (fuser, projector, head). [default: 1e-3]")
@click.option("--probe-width", type=click.IntRange(min=4), default=None, help="Probe mode: the fuser's output width and the head's. [default: 128]")
@click.option("--fuser-opt", "fuser_opts", multiple=True, metavar="FUSER.KEY=VALUE", help="A fuser option for the whole sweep, e.g. mmfuser.heads=4 (repeat).")
@click.option("--categories", default=None, help="Train and evaluate on these categories (comma-separated). [default: the closed-answer ones]")
@click.option("--eval-split", default=None, help="Split to evaluate on. [default: val]")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None, help="Evaluate on at most N questions.")
@click.option("--llm", default=None, help="lm mode: causal LM, hub id or folder; 'default' = the embedded tiny Llama. [default: default]")
@click.option("--stage", type=click.IntRange(1, 2), default=None, help="lm mode: phase two's stage defaults (1: LLM frozen, lr 1e-3; 2: all trained, 2e-5). [default: 1]")
@click.option("--llm-mode", type=click.Choice(["frozen", "full", "lora"]), default=None, help="lm mode: what happens to the LLM. [default: the stage's]")
@click.option("--template", type=click.Choice(["plain", "v1", "chat"]), default=None, help="lm mode: conversation template. [default: v1]")
@click.option("--max-length", type=click.IntRange(min=8), default=None, help="lm mode: max tokens per sample. [default: 2048]")
@click.option("--micro-batch-size", type=click.IntRange(min=1), default=None, help="lm mode: forward-pass batch (gradient accumulation). [default: batch]")
@click.option("--group-size", type=click.IntRange(min=1), default=None, help="Variants per shared pass. [default: as many as fit the memory estimate]")
@click.option("--memory-fraction", type=click.FloatRange(0.01, 1.0), default=0.5, show_default=True, help="Share of the available memory the groups may use.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="DataLoader reader processes. [default: 1, 2 from 8 cores]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads. [default: cores - workers]")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep folder (results, plots, per-variant files).")
@click.option("--overwrite", is_flag=True, help="Start over in an --out that holds a sweep with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def ablate_cmd(sweep_file: str | None, fuser_opts: tuple[str, ...], group_size: int | None, memory_fraction: float, workers: int | None,
               threads: int | None, device: str, out: str, overwrite: bool, quiet: bool, **cli: Any) -> None:
    """Fusion ablations: train fusers x layer sets x seeds on one cache, many variants per pass over it.

    Variants that fit in memory together share one pass: each batch is read once (the union of their layers) and
    fed to every variant, each with its own optimizer, in the same order. Combinations the registry refuses
    (single x 3-18-23, igva x 18, internal fusers in probe mode) are listed as invalid. A killed sweep continues
    where it stopped: rerun the same command. Results: OUT/results.{md,csv,json} and OUT/plots/*.png.

    \b
    Examples:
      layerfuse ablate --cache runs/default/cache --fusers single,concat,mmfuser,igva \\
          --layers penultimate,3-18-23,all --seeds 2 --out runs/default/ablate
      layerfuse ablate --cache runs/default/cache --probe-layers all --seeds 2 --out runs/default/layer-probe
      layerfuse ablate --sweep sweep.yaml --out runs/ablate-lm --mode lm --steps 200
      layerfuse report runs/default/ablate
    """
    import os

    import transformers

    from layerfuse.pipeline.ablation.run import AblateOptions, run_ablation
    from layerfuse.pipeline.cache.reader import FeatureCache
    from layerfuse.pipeline.ablation.sweep import sweep_from_inputs

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.disable_progress_bar()
    spec = sweep_from_inputs(sweep_file, cli, list(fuser_opts), num_states=lambda path: FeatureCache(path).num_layers)
    opts = AblateOptions(out=out, group_size=group_size, memory_fraction=memory_fraction, workers=workers, threads=threads, device=device,
                         overwrite=overwrite, progress=not quiet)
    res = run_ablation(spec, opts)
    click.echo(f"ablate: {res.trained} variant(s) trained in {res.groups} shared pass(es), {res.reused} finished earlier, "
               f"{res.invalid} invalid; {res.wall_s:.0f}s")
    click.echo(f"results: {res.out / 'results.md'} (also .csv, .json), plots in {res.out / 'plots'}")


@main.command("report")
@click.argument("out", type=click.Path(file_okay=False))
def report_cmd(out: str) -> None:
    """Rebuild the tables and plots of an ablation sweep (finished or partial) from its folder.

    \b
    Example:
      layerfuse report runs/default/ablate
    """
    from layerfuse.pipeline.ablation.report import write_report
    from layerfuse.pipeline.ablation.results import load_results

    files = write_report(out)
    res = load_results(out)
    valid = [a for a in res.arms if a.status != "invalid"]
    done = sum(len(a.seeds_done) for a in valid)
    total = sum(len(a.seeds) for a in valid)
    click.echo(f"{out}: {done} of {total} variants finished" + ("" if done == total else " (partial: rerun the sweep's command to finish it)"))
    click.echo(f"wrote {files.markdown}, {files.csv.name}, {files.json.name}" + (f" and {len(files.plots)} plot(s) in {files.plots[0].parent}" if files.plots else ""))


# --- deployment -----------------------------------------------------------------------------------------------------
@main.group("export")
def export_group() -> None:
    """Deploy a trained run's visual front end: ONNX graphs and TensorRT engines.

    \b
    Examples:
      layerfuse export onnx --run runs/default/stage2 --out front.onnx --msda hybrid
      layerfuse export engine --onnx front.onnx --precision fp16 --out front.plan --run runs/default/stage2
    """


def _encoder_of(run_dir: str):
    from layerfuse.pipeline.models.encoder import load_vision_encoder
    from layerfuse.pipeline.models.run import read_run_model

    enc = read_run_model(run_dir).encoder
    if not enc.get("path"):
        raise StateError(f"run {run_dir} does not record its vision encoder; export without --with-encoder")
    return load_vision_encoder(enc["path"], revision=enc.get("revision"))


@export_group.command("onnx")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True), help="A trained run folder.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--msda", type=click.Choice(["gather", "custom", "hybrid"]), default="gather", show_default=True,
              help="MSDeformAttn as plain ops, as one custom node (TensorRT plugin), or the node carrying its gather graph.")
@click.option("--with-encoder", is_flag=True, help="Put the vision encoder in front (input: pixel_values).")
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True)
@click.option("--check-batches", default="1,3", show_default=True, help="Batch sizes to compare with PyTorch after export ('' to skip).")
def export_onnx_cmd(run_dir: str, out: str, msda: str, with_encoder: bool, opset: int, check_batches: str) -> None:
    """The run's fuser + projector (and, with --with-encoder, the vision tower) as an ONNX graph.

    Inputs: layers [B, k, T, D] (or pixel_values), text [B, d_s] for igva; outputs: tokens [B, N, d] (igva: weights,
    internal fusers: their per-LLM-layer features). Dynamic batch. The file is checked with onnx.checker and shape
    inference and compared with PyTorch (onnxruntime, or onnx.reference for --msda custom).
    """
    from layerfuse.export.onnx import export_onnx
    from layerfuse.export.verify import verify_onnx
    from layerfuse.pipeline.models.run import load_run_fuser

    fuser, _ = load_run_fuser(run_dir)
    encoder = _encoder_of(run_dir) if with_encoder else None
    path = export_onnx(fuser, out, msda=msda, encoder=encoder, opset=opset)
    click.echo(f"wrote {path} ({fuser.name}, msda={msda}{', with encoder' if encoder is not None else ''})")
    batches = [int(b) for b in check_batches.split(",") if b.strip()]
    if batches:
        report = verify_onnx(path, fuser, encoder=encoder, batch_sizes=batches)
        click.echo(report.summary())
        if not report.ok:
            sys.exit(1)


@export_group.command("engine")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False, exists=True), help="An exported front end.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Engine (.plan) to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--plugin-library", default=None, type=click.Path(dir_okay=False, exists=True),
              help="libmsda_plugin.so (make kernel with TensorRT). [default: plugins_trt/build/ when built]")
@click.option("--min-batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--opt-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--run", "run_dir", default=None, type=click.Path(file_okay=False, exists=True), help="Also compare the engine with this run in PyTorch.")
def export_engine_cmd(onnx_path: str, out: str, precision: str, plugin_library: str | None, min_batch: int, opt_batch: int,
                      max_batch: int, run_dir: str | None) -> None:
    """Build a TensorRT engine from an exported front end (with our MSDeformAttn plugin), run it, compare it.

    Needs TensorRT (pip install tensorrt, or TENSORRT_ROOT) and a GPU; not installable on the project's CI machines.
    """
    from layerfuse.export.engine import BatchProfile, build_engine, compare_engine, default_plugin_library

    library = plugin_library or default_plugin_library()
    info = build_engine(onnx_path, out, precision, library, batch=BatchProfile(min_batch, opt_batch, max_batch))
    click.echo(f"wrote {out} ({precision}, batch {min_batch}..{max_batch}, TensorRT {info.tensorrt_version})")
    for note in info.notes:
        click.echo(f"  note: {note}")
    if run_dir:
        from layerfuse.pipeline.models.run import load_run_fuser

        fuser, _ = load_run_fuser(run_dir)
        report = compare_engine(out, fuser, onnx_path=onnx_path, plugin_library=library)
        click.echo(report.summary())
        if not report.ok:
            sys.exit(1)


@main.group("bench")
def bench_group() -> None:
    """Deployment benchmarks (the repository's bench/ scripts cover the rest: make bench)."""


@bench_group.command("engine")
@click.option("--plan", required=True, type=click.Path(dir_okay=False, exists=True), help="A built engine.")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True), help="The run it was exported from.")
@click.option("--batch-sizes", default="1,8", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--plugin-library", default=None, type=click.Path(dir_okay=False, exists=True))
def bench_engine_cmd(plan: str, run_dir: str, batch_sizes: str, repeats: int, plugin_library: str | None) -> None:
    """TensorRT engine latency against PyTorch eager on the same GPU (median of CUDA-event timings)."""
    from layerfuse.export.engine import bench_engine, default_plugin_library
    from layerfuse.pipeline.models.run import load_run_fuser

    fuser, _ = load_run_fuser(run_dir)
    rows = bench_engine(plan, fuser, batch_sizes=[int(b) for b in batch_sizes.split(",")], repeats=repeats,
                       plugin_library=plugin_library or default_plugin_library())
    click.echo("| batch | TensorRT ms | PyTorch ms | speed-up |\n|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r.batch} | {r.tensorrt_ms:.3f} | {r.torch_ms:.3f} | {r.speedup:.2f}x |")


if __name__ == "__main__":  # `torchrun -m layerfuse.pipeline.cli extract ...`
    main()
