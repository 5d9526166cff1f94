"""The `layerfuse` command line (click)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types
import typing
from dataclasses import MISSING, Field, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import click
from click.core import ParameterSource

from layerfuse.core import __version__
from layerfuse.core.config import choices, field_types
from layerfuse.core.errors import LayerfuseError, StateError
from layerfuse.core.dtypes import StorageDtype
from layerfuse.core.options import option_pair


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


# --- options bound to config fields ---------------------------------------------------------------------------------
# A command's settings live once, in its config dataclass; an option names the field (`module:Class` + field path)
# and takes its default, its choices (a Literal annotation) and its type from there. The config module is imported
# when click first needs the field (a command's --help or run), so `layerfuse --help` stays fast.
EXTRACT = "layerfuse.pipeline.cache.extract:ExtractConfig"
TRAIN = "layerfuse.pipeline.training.train:TrainConfig"
EVAL = "layerfuse.pipeline.training.evaluate:EvalConfig"
SWEEP = "layerfuse.pipeline.ablation.sweep:SweepSpec"
ABLATE = "layerfuse.pipeline.ablation.run:AblateOptions"


@dataclass(frozen=True)
class ConfigField:
    """One field of a config dataclass: `config` is "module:Class", `path` the field name (dotted into a nested
    config dataclass: "probe.width")."""

    config: str
    path: str

    def resolve(self) -> tuple[Field, Any]:
        """The dataclass field and its annotation (string annotations evaluated)."""
        cls = attribute(self.config)
        *outer, last = self.path.split(".")
        for part in outer:
            cls = field_types(cls)[part]
        found = {f.name: f for f in fields(cls)}
        if last not in found:
            raise TypeError(f"{self.config} has no field {self.path!r}")
        return found[last], field_types(cls)[last]

    def default(self) -> Any:
        """The field's default (None for a field without one: the option is then required or derived)."""
        f, _ = self.resolve()
        if f.default is not MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not MISSING else None


class FieldType(click.ParamType):
    """The click type of a config field, from its annotation when first needed: a Literal is a click.Choice of its
    values; int, float, str (also as `X | None`) are click's."""

    def __init__(self, option: FieldOption):
        self.option = option

    @property
    def choices(self) -> tuple[Any, ...] | None:
        return choices(self.option.field.resolve()[1])

    @property
    def resolved(self) -> click.ParamType:
        allowed = self.choices
        if allowed is not None:
            return click.Choice([str(c) for c in allowed])
        annotation = self.option.field.resolve()[1]
        optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        base = [a for a in (typing.get_args(annotation) if optional else (annotation,)) if a is not type(None)]
        return click.types.convert_type(base[0] if len(base) == 1 and base[0] in (int, float, str) else str)  # a list: its text

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.resolved.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        converted = self.resolved.convert(value, param, ctx)
        allowed = self.choices  # the Literal's own value (Literal[1, 2] gives the int 1, not "1")
        return converted if allowed is None else next(c for c in allowed if str(c) == str(converted))

    def get_metavar(self, *args: Any, **kwargs: Any) -> str | None:
        return self.resolved.get_metavar(*args, **kwargs)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        return self.resolved.shell_complete(ctx, param, incomplete)


class FieldOption(click.Option):
    """A click option bound to a config field (`config_option`): its default is the field's (shown in --help), its
    type the field's (FieldType) unless the option gives one (an IntRange, say); flags keep click's bool type.
    `default_text` turns the field's default into what --help shows, for a default that the field only stands for
    (None = "the stage's": "plain (stage 1), v1 (stage 2)")."""

    def __init__(self, param_decls: Sequence[str], *, config: str, path: str | None = None,
                 default_text: Callable[[Any], Any] | None = None, **attrs: Any):
        flag = attrs.get("is_flag") or "flag_value" in attrs or any("/" in d for d in param_decls)
        if not flag:
            attrs.setdefault("type", FieldType(self))
        attrs.setdefault("show_default", default_text is None and (not flag or any("/" in d for d in param_decls)))
        super().__init__(param_decls, **attrs)
        self.field = ConfigField(config, path or str(self.name))
        self.default_text = default_text

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        return self.field.default()

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None or self.default_text is None:
            return record
        return record[0], f"{record[1]}  [default: {self.default_text(self.field.default())}]".lstrip()


def config_option(config: str, *param_decls: str, path: str | None = None, **attrs: Any) -> Callable[[Any], Any]:
    """`@config_option(TRAIN, "--epochs", help=...)`: an option bound to the field it is named after (or `path`)."""
    return click.option(*param_decls, cls=FieldOption, config=config, path=path, **attrs)


def attribute(ref: str) -> Any:
    """"module:name.attr" -> that object; the module is imported on first use (see ConfigField)."""
    module, _, name = ref.partition(":")
    found: Any = importlib.import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    return found


def stage_defaults(key: str) -> Callable[[Any], str]:
    """default_text of a TrainConfig setting whose None means the stage's: "plain (stage 1), v1 (stage 2)"."""
    return lambda _: ", ".join(f"{d[key]} (stage {s})" for s, d in attribute("layerfuse.pipeline.training.train:STAGE_DEFAULTS").items())


def bound_values(ctx: click.Context, config: str, *, given_only: bool = False) -> dict[str, Any]:
    """Field path -> value of the command's options bound to `config` (`given_only`: those given on the command line
    or through their environment variable, to set over a file's values)."""
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {p.field.path: ctx.params[p.name] for p in ctx.command.params
            if isinstance(p, FieldOption) and p.field.config == config and (not given_only or ctx.get_parameter_source(p.name) in given)}


@click.group(cls=LayerfuseGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="layerfuse")
def main() -> None:
    """layerfuse: multi-layer visual feature fusion for LLaVA-style VLMs on a cached-feature pipeline.

    \b
    Phase one:  layerfuse extract      every vision-encoder layer + instruction embeddings -> zarr cache
    Inspect:    layerfuse cache info | verify
    Data:       layerfuse data synthetic  (the built-in dataset)
    Tower:      layerfuse tower rebuild | record  (the shipped pretrained default vision tower)
    Fusion:     layerfuse fusers          (registered fusers, their options, layer-spec resolution)
    Phase two:  layerfuse train | eval | infer
    Ablations:  layerfuse ablate | report
    Deploy:     layerfuse export hf | onnx | engine,  layerfuse bench engine

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
@config_option(EXTRACT, "--run-dir", type=click.Path(file_okay=False), help="Run folder; the default vision tower is saved here.")
@config_option(EXTRACT, "--llava", help="Source: LLaVA JSON/JSONL file (path or URL).")
@config_option(EXTRACT, "--image-root", help="Folder the LLaVA 'image' paths are relative to. [default: the JSON's folder]")
@config_option(EXTRACT, "--wds", help="Source: WebDataset shards: paths, globs or brace patterns, comma-separated.")
@config_option(EXTRACT, "--builtin", type=click.IntRange(min=1), default_text=lambda _: attribute("layerfuse.pipeline.cache.extract:BUILTIN_SAMPLES"),
               help="Source: N built-in synthetic samples (the default source).")
@config_option(EXTRACT, "--seed", help="Seed of the built-in dataset.")
@config_option(EXTRACT, "--split", help="Split recorded for samples whose record names none.")
@config_option(EXTRACT, "--vision", help="Vision tower: HF hub id or local folder; 'default' = the embedded tiny CLIP, pretrained on built-in renders into RUN_DIR/vision.")
@config_option(EXTRACT, "--vision-revision", help="Hub revision of --vision.")
@config_option(EXTRACT, "--vision-pretrain-steps", type=click.IntRange(min=0),
               default_text=lambda _: attribute("layerfuse.pipeline.models.default_vision:DefaultVisionConfig.pretrain_steps"),
               help="Pretraining steps of the default tower (--vision default only); 0 = random weights.")
@config_option(EXTRACT, "--pad-to-square/--no-pad-to-square", help="LLaVA's expand2square before the processor.")
@config_option(EXTRACT, "--layers", metavar="SPEC[;SPEC...]",
               help="Hidden states to store: 'all', or the union of fuser names and layer specs, e.g. 'mmfuser;igva;3-18-23'.")
@config_option(EXTRACT, "--views", metavar="SPEC[;SPEC...]",
               help="Group means to store beside the layers (the group terms of fuser names / layer specs), e.g. 'igva' (4 means) or 'all'.")
@config_option(EXTRACT, "--dtype", type=click.Choice(StorageDtype.names()),
               help="Stored feature dtype; int8 (per-token scales + fp16 outlier channels) and float8_e4m3fn (per-token scales) "
                    "are quantised on the device and read back as float16 (docs/cache-format.md).")
@config_option(EXTRACT, "--text-model", help="sentence-transformers model (id or folder) for instructions.")
@click.option("--suffix", "suffixes", multiple=True, help="Answer-format suffix to strip before embedding (repeat; replaces the LLaVA defaults).")
@config_option(EXTRACT, "--shard-samples", type=click.IntRange(min=1), help="Samples per output shard. [default: from --shard-mib]")
@config_option(EXTRACT, "--shard-mib", type=click.IntRange(min=1), help="Target uncompressed size of an output shard.")
@config_option(EXTRACT, "--chunk-kib", type=click.IntRange(min=1), help="Target size of a chunk (one layer of several samples, for tiny encoders).")
@config_option(EXTRACT, "--codec", help="Chunk compressor (BENCHMARKS.md, Codecs): zstd stores what blosc-zstd did at 1.6x its write speed per core.")
@config_option(EXTRACT, "--clevel", type=click.IntRange(0, 22), help="The codec's level (zstd 1..22; blosc 0..9, which runs zstd at 2c-1).")
@config_option(EXTRACT, "--max-pixels", type=click.IntRange(min=1),
               help="Decompression-bomb guard: images whose decoded size or preprocessing working size (pad to square, resize) is larger are skipped.")
@config_option(EXTRACT, "--max-image-bytes", type=click.IntRange(min=1), help="Largest image file or tar member read; larger ones are skipped.")
@config_option(EXTRACT, "--batch-size", type=click.IntRange(min=1),
               help="Images per encoder forward. [default: 32 on a GPU; on a CPU as many as hold 4096 tokens, at most 32]")
@config_option(EXTRACT, "--workers", type=click.IntRange(min=0),
               help="DataLoader workers for decoding. [default: 2 on a CPU; on a GPU the usable cores minus 4, split among a node's ranks]")
@config_option(EXTRACT, "--device", help="auto | cpu | cuda | cuda:N")
@config_option(EXTRACT, "--compute-dtype", type=click.Choice(["auto", *StorageDtype.float_names()]), help="Encoder dtype (auto: bf16 on CUDA, fp32 on CPU).")
@config_option(EXTRACT, "--strict", is_flag=True, help="Stop at the first bad or repaired sample instead of skipping or repairing and recording it.")
@config_option(EXTRACT, "--allow-urls", metavar="SCHEMES",
               help="URL schemes LLaVA image values may use, comma-separated (e.g. s3,gs,https); other URL images are skipped. [default: none]")
@config_option(EXTRACT, "--overwrite", is_flag=True, help="Replace an existing cache made with other settings.")
@config_option(EXTRACT, "--force", is_flag=True, help="Extract even when the target has less free space than the size estimate.")
@config_option(EXTRACT, "--spool", metavar="auto|none|DIR",
               help="Where planning copies the pipe: and remote shards it streams, so extraction reads the input once "
                    "(auto: OUT.spool beside a local --out; none: no copy, commands run again and remote shards are read "
                    "twice). Removed when the cache is complete.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(out: str | None, suffixes: tuple[str, ...], quiet: bool, **settings: Any) -> None:
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

    values = bound_values(click.get_current_context(), EXTRACT)
    cfg = ExtractConfig(out=out or f"{values['run_dir'].rstrip('/')}/cache", progress=not quiet,
                        **({"suffixes": tuple(suffixes)} if suffixes else {}), **values)
    res = run_extract(cfg)
    if not res.summary and not res.already_complete:
        return  # a non-zero rank under torchrun: rank 0 reports
    if res.already_complete:
        click.echo(f"{res.url} is already complete ({res.summary.get('ok', 0)} images); nothing to do.")
        return
    s = res.summary
    tower = "" if res.tower_seconds is None else f"tower ready in {res.tower_seconds:.1f} s; "
    click.echo(
        f"cache {res.url}: {s['ok']} images, {s['text_only']} text-only, {s['skipped'] - s['refused']} skipped at decode, "
        f"{s['refused']} refused after the encoder (nan, inf or out of the dtype's range), {s['plan_skipped']} malformed "
        f"records, {s['notes']} repaired; {tower}extracted in {res.seconds:.1f} s"
    )
    if s["skipped"] or s["plan_skipped"] or s["notes"]:
        from layerfuse.pipeline.cache.reader import FeatureCache

        issues = FeatureCache(res.url).issues()
        for i in issues[:10]:
            what = "repaired" if i["stage"] == "note" else "skipped"
            click.echo(f"  {what}: {i['id']}: {i['reason']}" + (f" ({i['where']})" if i["where"] else ""))
        if len(issues) > 10:
            click.echo(f"  ... {len(issues) - 10} more: `layerfuse cache info {res.url} --json` lists all")


# --- the shipped default tower --------------------------------------------------------------------------------------
@main.group()
def tower() -> None:
    """The default vision tower the package ships (pipeline/models/default_tower/): `layerfuse extract` installs it
    instead of pretraining when the settings are its recipe's.

    \b
    Examples:
      layerfuse tower rebuild                  # pretrain it again (~9 min on 2 cores), compare with the shipped files
      layerfuse tower record runs/default/vision --commit $(git rev-parse HEAD)
    """


def _git_commit() -> str:
    """This checkout's commit (+uncommitted when tracked files changed), or 'unknown' outside git."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout
    return res.stdout.strip() + ("+uncommitted" if dirty.strip() else "")


@tower.command("rebuild")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Folder to build into (kept). [default: a temporary folder]")
@click.option("--device", default="cpu", show_default=True, help="Where to pretrain; the shipped tower was built on the CPU.")
@click.option("--record", is_flag=True, help="Make the rebuilt tower the shipped one (rewrites pipeline/models/default_tower/).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def tower_rebuild(out: str | None, device: str, record: bool, quiet: bool) -> None:
    """Pretrain the default tower from the shipped recipe with this code and compare every file's sha256 (and the
    held-out accuracies) with the shipped ones; exits 1 when they differ (unless --record). Bit-identical files
    need the recipe's torch version, CPU and thread count (`recipe.json` "built_with"); elsewhere expect the
    weights to differ while the held-out accuracies stay close.

    \b
    Examples:
      layerfuse tower rebuild                          # what `make default-tower` runs
      layerfuse tower rebuild --out /tmp/tower --record   # and make it the shipped tower
    """
    import tempfile

    from layerfuse.pipeline.models.default_vision import (
        DefaultVisionConfig,
        build_default_vision,
        read_recipe,
        record_shipped,
        shipped_differences,
    )

    recipe = read_recipe()
    cfg = DefaultVisionConfig(**recipe["config"]) if recipe else DefaultVisionConfig()
    with tempfile.TemporaryDirectory(prefix="layerfuse-tower-") as tmp:
        folder = Path(out) if out else Path(tmp) / "vision"
        build_default_vision(folder, cfg, progress=not quiet, device=device, shipped=None)
        diffs = shipped_differences(folder)
        click.echo(f"rebuilt default tower in {folder}: " + ("identical to the shipped one" if not diffs else f"{len(diffs)} difference(s) from the shipped one"))
        for d in diffs:
            click.echo(f"  {d}")
        if record:
            record_shipped(folder, commit=_git_commit(), device=device)
            click.echo("recorded it as the shipped tower (pipeline/models/default_tower/)")
        elif diffs:
            raise SystemExit(1)


@tower.command("record")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--commit", default=None, help="The code version that built FOLDER. [default: this checkout's git commit]")
@click.option("--device", default="cpu", show_default=True, help="Where FOLDER was pretrained.")
def tower_record(folder: str, commit: str | None, device: str) -> None:
    """Make the default tower built in FOLDER (default settings, on this machine) the shipped one: copy its files to
    pipeline/models/default_tower/ with a new recipe.json (settings, code version, machine, sha256, held-out
    accuracies, and a fingerprint of the first pretraining steps, rerun here in seconds).

    \b
    Example:
      layerfuse tower rebuild --out /tmp/tower     # differs from the shipped tower after a deliberate change
      layerfuse tower record /tmp/tower
    """
    from layerfuse.pipeline.models.default_vision import record_shipped, shipped_summary

    recipe = record_shipped(folder, commit=commit or _git_commit(), device=device)
    click.echo(shipped_summary(recipe).replace("installed the shipped one", "recorded as the shipped one"))


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


@cache.command("derive")
@click.argument("src")
@click.option("--out", required=True, help="The smaller cache to write (rerun the same command to resume it).")
@click.option("--layers", default=None, metavar="SPEC[;SPEC...]", help="Hidden states to keep, as extract --layers takes them. [default: all of SRC's]")
@click.option("--dtype", default=None, type=click.Choice(StorageDtype.names()), help="Stored feature dtype. [default: SRC's]")
@click.option("--overwrite", is_flag=True, help="Replace a cache at --out made with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cache_derive_cmd(src: str, out: str, layers: str | None, dtype: str | None, overwrite: bool, quiet: bool) -> None:
    """Write a smaller cache from SRC: fewer layers and/or another dtype, shard by shard, every read checked.

    \b
    Example:
      layerfuse cache derive runs/default/cache --out runs/default/cache-mmfuser --layers mmfuser
    """
    from layerfuse.pipeline.cache.derive import derive_cache

    res = derive_cache(src, out, layers=layers, dtype=dtype, overwrite=overwrite, progress=not quiet)
    what = "already complete" if res.already_complete else f"{res.shards_written} shards written"
    click.echo(f"derive: {out} ({what}); check it with `layerfuse cache verify {out}`")


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


@cache.command("plan")
@click.option("--vision", default="default", show_default=True,
              help="Vision tower: 'default' (the embedded tiny CLIP), a local folder with config.json, a config.json file, or a hub id "
                   "(needs network). Only its config is read, never its weights.")
@click.option("--samples", type=click.IntRange(min=1), required=True, help="Number of samples N to extract.")
@click.option("--layers", "layers_spec", default=None,
              help="Hidden states to store, as extract --layers takes them: all, fuser names, layer specs, ';' for a union. [default: all]")
@click.option("--views", "views_spec", default=None, help="Group means to store beside them, as extract --views takes them. [default: none]")
@click.option("--dtype", default="float16", show_default=True,
              help="Storage dtype: float16 | bfloat16 | float32 | int8 | float8_e4m3fn (quantised, docs/cache-format.md).")
@click.option("--images-per-s", type=click.FloatRange(min=0, min_open=True), default=500.0, show_default=True,
              help="Extraction rate the write bandwidth is quoted at.")
@click.option("--max-turns", type=click.IntRange(min=0), default=1, show_default=True, help="Most human turns of any sample (M of text/turns).")
@click.option("--text-dim", type=click.IntRange(min=1), default=384, show_default=True, help="Sentence-embedding width (all-MiniLM-L6-v2: 384).")
@click.option("--string-bytes", type=click.IntRange(min=0), default=1024, show_default=True,
              help="Assumed bytes of a sample's strings (id, image path, conversation JSON, locator).")
@config_option(EXTRACT, "--shard-samples", type=click.IntRange(min=1), help="Samples per output shard. [default: from --shard-mib]")
@config_option(EXTRACT, "--shard-mib", type=click.IntRange(min=1), help="Target uncompressed size of an output shard.")
@config_option(EXTRACT, "--chunk-kib", type=click.IntRange(min=1), help="Target size of a chunk (one layer of several samples, for tiny encoders).")
@click.option("--out", default=None, help="Where the cache will go: also prints the free space there (local paths).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache_plan_cmd(vision: str, samples: int, layers_spec: str | None, views_spec: str | None, dtype: str, images_per_s: float, max_turns: int, text_dim: int,
                   string_bytes: int, out: str | None, as_json: bool, **layout: Any) -> None:
    """Estimate a cache before extracting it: bytes per sample and in all, files, write bandwidth. Loads no weights.

    \b
    Examples:
      layerfuse cache plan --samples 6000
      layerfuse cache plan --vision /models/clip-vit-large-patch14-336 --samples 1223000 --layers mmfuser --out /data/cache
      layerfuse cache plan --vision /models/siglip-so400m-patch14-384/config.json --samples 665000 --dtype int8 --json
    """
    from layerfuse.pipeline.cache.extract import ExtractConfig, storage_layout
    from layerfuse.pipeline.cache.plan import encoder_shape, plan_cache
    from layerfuse.pipeline.cache.selection import ALL

    shape = encoder_shape(vision)
    cfg = ExtractConfig(dtype=dtype, layers=layers_spec or ALL, views=views_spec, **layout)  # extract's layout rule
    shard, chunk = storage_layout(cfg, shape)
    plan = plan_cache(shape, samples, shard_samples=shard, chunk_samples=chunk, layers=cfg.stored_layers(shape), dtype=dtype,
                      views=len(cfg.view_groups(shape)), max_turns=max_turns, text_dim=text_dim, string_bytes=string_bytes, images_per_s=images_per_s)
    click.echo(json.dumps(plan.to_json(out), indent=1) if as_json else plan.format(out))


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
@config_option(TRAIN, "--cache", required=True, help="Feature cache (phase one output).")
@config_option(TRAIN, "--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@config_option(TRAIN, "--stage", help="1: fuser + projector, LLM frozen. 2: also the LLM (from --init-from).")
@config_option(TRAIN, "--fuser", help="Fuser name (`layerfuse fusers` lists them).")
@config_option(TRAIN, "--layers", help="Layer spec (preset, dash list, explicit list, groups). [default: the fuser's]")
@click.option("--fuser-opt", "fuser_opts", multiple=True, metavar="KEY=VALUE", help="Another fuser option, e.g. heads=4 (repeat).")
@config_option(TRAIN, "--llm", help="Causal LM: hub id or folder; 'default' = the embedded tiny Llama (random weights).")
@config_option(TRAIN, "--llm-default-dir", help="Where the embedded default LLM is built. [default: OUT/default-llm]")
@config_option(TRAIN, "--init-from", type=click.Path(file_okay=False), help="Stage 2: the stage-1 run to start from.")
@config_option(TRAIN, "--template", default_text=stage_defaults("template"), help="Conversation template.")
@config_option(TRAIN, "--split", help="Cache split to train on.")
@click.option("--categories", default=None, help="Only these sample categories (comma-separated), e.g. caption for stage 1.")
@config_option(TRAIN, "--max-length", type=click.IntRange(min=8), help="Max tokens per sample (image span included); longer ones are cut, never inside the image.")
@config_option(TRAIN, "--epochs")
@config_option(TRAIN, "--max-steps", type=click.IntRange(min=1), help="Optimizer steps (overrides --epochs).")
@config_option(TRAIN, "--batch-size", type=click.IntRange(min=1), help="Global batch (all ranks x accumulation).")
@config_option(TRAIN, "--micro-batch-size", type=click.IntRange(min=1), help="Per rank and forward pass; the rest is gradient accumulation. [default: batch/world]")
@config_option(TRAIN, "--lr-fuser", default_text=stage_defaults("lr_fuser"))
@config_option(TRAIN, "--lr-projector", default_text=stage_defaults("lr_projector"))
@config_option(TRAIN, "--lr-llm", default_text=stage_defaults("lr_llm"))
@config_option(TRAIN, "--llm-mode", default_text=stage_defaults("llm_mode"), help="What stage 2 does to the LLM.")
@config_option(TRAIN, "--lora-r", type=click.IntRange(min=1))
@config_option(TRAIN, "--lora-alpha", type=click.IntRange(min=1))
@config_option(TRAIN, "--lora-dropout")
@config_option(TRAIN, "--lora-targets", help="'all-linear' or module names, comma-separated.")
@config_option(TRAIN, "--weight-decay")
@config_option(TRAIN, "--warmup-ratio")
@config_option(TRAIN, "--max-grad-norm")
@config_option(TRAIN, "--precision", help="auto = bf16 autocast on CUDA, fp32 on CPU.")
@config_option(TRAIN, "--gradient-checkpointing", is_flag=True, help="Recompute LLM activations in the backward pass.")
@config_option(TRAIN, "--fsdp", is_flag=True, help="Shard the model over torchrun ranks (FSDP2) instead of DDP.")
@config_option(TRAIN, "--compile", is_flag=True, help="torch.compile the LLM's forward (~10 s once; 1.24x faster steps on the CPU default; last bits differ from eager).")
@config_option(TRAIN, "--attn-implementation", help="auto (flash_attention_2 when installed on CUDA, else sdpa) | sdpa | eager | ...")
@config_option(TRAIN, "--seed")
@config_option(TRAIN, "--buffer-rows", type=click.IntRange(min=1), help="Shuffle buffer in samples (whole global batches).")
@config_option(TRAIN, "--workers", type=click.IntRange(min=0), help="DataLoader workers reading the cache.")
@config_option(TRAIN, "--log-every", type=click.IntRange(min=1))
@config_option(TRAIN, "--save-every", type=click.IntRange(min=0), help="Checkpoint every N steps (0: only at the end).")
@config_option(TRAIN, "--device", help="auto | cpu | cuda | cuda:N")
@config_option(TRAIN, "--no-tensorboard", "tensorboard", flag_value=False, help="Do not write TensorBoard events.")
@config_option(TRAIN, "--on-corrupt", help="A cache row that fails its checksum: stop (one line naming sample, shard, cache) or skip it and record it in train/damaged.jsonl.")
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
    cfg = TrainConfig(
        fuser_options=_fuser_options(fuser_opts),
        categories=[c.strip() for c in categories.split(",") if c.strip()] if categories else None,
        progress=not quiet,
        **bound_values(click.get_current_context(), TRAIN),
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
@config_option(EVAL, "--run", "run_dir", path="run", required=True, type=click.Path(file_okay=False, exists=True), help="A trained run folder.")
@config_option(EVAL, "--cache", help="Cache to evaluate on. [default: the run's training cache]")
@config_option(EVAL, "--split")
@click.option("--categories", default=None, help="Only these categories (comma-separated).")
@config_option(EVAL, "--batch-size", type=click.IntRange(min=1))
@config_option(EVAL, "--max-new-tokens", type=click.IntRange(min=1))
@config_option(EVAL, "--limit", type=click.IntRange(min=1), help="Only the first N samples of the split.")
@config_option(EVAL, "--out", type=click.Path(file_okay=False), help="Output folder. [default: RUN/eval/SPLIT]")
@config_option(EVAL, "--device")
@config_option(EVAL, "--workers", type=click.IntRange(min=0))
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
    cfg = EvalConfig(categories=[c.strip() for c in categories.split(",")] if categories else None, progress=not quiet,
                     **bound_values(click.get_current_context(), EVAL))
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
@config_option(SWEEP, "--cache", help="Feature cache to sweep on (or `cache:` in the sweep file).")
@click.option("--sweep", "sweep_file", default=None, type=click.Path(dir_okay=False), help="YAML or TOML sweep file; command-line values override it.")
@config_option(SWEEP, "--fusers", help="Fusers, comma-separated, e.g. single,concat,mmfuser,igva.")
@config_option(SWEEP, "--layers", help="Layer sets, comma-separated (e.g. 18,3-18-23,all); separate with ';' when a set has commas ('4,12,20;12,').")
@config_option(SWEEP, "--seeds", default_text=lambda seeds: "seed " + ",".join(map(str, seeds)), help="A count (3 = seeds 0,1,2) or a comma list (0,5).")
@config_option(SWEEP, "--probe-layers", help="Layer-probe study: one single-layer probe per hidden state: 'all' or e.g. 0,3,12,23.")
@config_option(SWEEP, "--mode", help="probe: fuser + small answer head (minutes); lm: fuser + projector + LLM, greedy exact match.")
@config_option(SWEEP, "--epochs", help="Epochs over the training questions.")
@config_option(SWEEP, "--steps", type=click.IntRange(min=1), help="Optimizer steps per variant (overrides --epochs).")
@config_option(SWEEP, "--batch-size", type=click.IntRange(min=1))
@config_option(SWEEP, "--lr", path="probe.lr", help="Probe mode learning rate (fuser, projector, head).")
@config_option(SWEEP, "--probe-width", path="probe.width", type=click.IntRange(min=4), help="Probe mode: the fuser's output width and the head's.")
@click.option("--fuser-opt", "fuser_opts", multiple=True, metavar="FUSER.KEY=VALUE", help="A fuser option for the whole sweep, e.g. mmfuser.heads=4 (repeat).")
@config_option(SWEEP, "--categories", help="Train and evaluate on these categories (comma-separated). [default: the closed-answer ones]")
@config_option(SWEEP, "--eval-split", help="Split to evaluate on.")
@config_option(SWEEP, "--eval-limit", type=click.IntRange(min=1), help="Evaluate on at most N questions.")
@config_option(SWEEP, "--llm", path="lm.llm", help="lm mode: causal LM, hub id or folder; 'default' = the embedded tiny Llama.")
@config_option(SWEEP, "--stage", path="lm.stage", help="lm mode: phase two's stage defaults (1: LLM frozen, lr 1e-3; 2: all trained, 2e-5).")
@config_option(SWEEP, "--llm-mode", path="lm.llm_mode", help="lm mode: what happens to the LLM. [default: the stage's]")
@config_option(SWEEP, "--template", path="lm.template", help="lm mode: conversation template.")
@config_option(SWEEP, "--max-length", path="lm.max_length", type=click.IntRange(min=8), help="lm mode: max tokens per sample.")
@config_option(SWEEP, "--micro-batch-size", path="lm.micro_batch_size", type=click.IntRange(min=1), help="lm mode: forward-pass batch (gradient accumulation). [default: batch]")
@config_option(ABLATE, "--group-size", type=click.IntRange(min=1), help="Variants per shared pass. [default: as many as fit the memory estimate]")
@config_option(ABLATE, "--memory-fraction", type=click.FloatRange(0.01, 1.0), help="Share of the available memory the groups may use.")
@config_option(ABLATE, "--workers", type=click.IntRange(min=0), help="DataLoader reader processes. [default: 1, 2 from 8 cores]")
@config_option(ABLATE, "--threads", type=click.IntRange(min=1),
               help="torch CPU threads. [default: cores / --concurrent while variants train at once, else cores - workers]")
@config_option(ABLATE, "--concurrent", type=click.IntRange(min=1), help="Probe mode on CPU: variants (or stacks) of a pass trained at once, on threads. [default: the cores]")
@config_option(ABLATE, "--stack/--no-stack", default_text=lambda _: "on CUDA only",
               help="Probe mode: train variants of one architecture (seeds, layer sets of one shape) as one batched model (vmap).")
@config_option(ABLATE, "--device", help="auto | cpu | cuda | cuda:N")
@config_option(ABLATE, "--out", required=True, type=click.Path(file_okay=False), help="Sweep folder (results, plots, per-variant files).")
@config_option(ABLATE, "--overwrite", is_flag=True, help="Start over in an --out that holds a sweep with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def ablate_cmd(sweep_file: str | None, fuser_opts: tuple[str, ...], quiet: bool, **settings: Any) -> None:
    """Fusion ablations: train fusers x layer sets x seeds on one cache, many variants per pass over it.

    Variants that fit in memory together share one pass: each batch is read once per seed (the union of their layers)
    and fed to every variant of that seed, each with its own optimizer, in the same order; on CPU they train
    concurrently, one per core. Variants that compute the same function (concat on one layer = single on it) train
    once. Combinations the registry refuses (single x 3-18-23, igva x 18, internal fusers in probe mode) are listed
    as invalid. A killed sweep continues where it stopped: rerun the same command. Results:
    OUT/results.{md,csv,json} and OUT/plots/*.png.

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
    ctx = click.get_current_context()
    spec = sweep_from_inputs(sweep_file, bound_values(ctx, SWEEP, given_only=True), list(fuser_opts),
                             num_states=lambda path: FeatureCache(path).num_layers)
    opts = AblateOptions(progress=not quiet, **bound_values(ctx, ABLATE))
    res = run_ablation(spec, opts)
    same = f", {res.same} the same as another (not trained again)" if res.same else ""
    click.echo(f"ablate: {res.trained} variant(s) trained in {res.groups} shared pass(es), {res.reused} finished earlier{same}, "
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
    """Deploy a trained run: transformers checkpoints, ONNX graphs of the visual front end, TensorRT engines.

    \b
    Examples:
      layerfuse export hf --run runs/default/stage2 --out hf-model
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
@click.option("--msda", type=click.Choice(["gather", "custom", "hybrid", "grid_sample"]), default="gather", show_default=True,
              help="MSDeformAttn as plain ops, as one custom node (TensorRT plugin), the node carrying its gather graph, or "
                   "one standard GridSample per level (fastest in onnxruntime on CPU for small models).")
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


@export_group.command("hf")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True), help="A trained run folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to write.")
@click.option("--format", "fmt", type=click.Choice(["auto", "llava", "layerfuse"]), default="auto", show_default=True,
              help="llava: transformers' LlavaForConditionalGeneration (single/concat only); layerfuse: the layerfuse_vlm "
                   "class (any fuser); auto: llava where the model can be one, else layerfuse.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
def export_hf_cmd(run_dir: str, out: str, fmt: str, dtype: str) -> None:
    """The whole run (vision tower, fuser, projector, LLM) as a transformers checkpoint with its processor.

    A layerfuse_vlm checkpoint loads with transformers.AutoModelForImageTextToText / AutoProcessor after
    `import layerfuse.export` (no trust_remote_code); a llava one with transformers alone.
    """
    import torch

    from layerfuse.export.hf import export_run

    path, written = export_run(run_dir, out, format=fmt, dtype=getattr(torch, dtype))  # type: ignore[arg-type]
    load = "transformers.LlavaForConditionalGeneration" if written == "llava" else "import layerfuse.export; transformers.AutoModelForImageTextToText"
    click.echo(f"wrote {path} ({written}; load with {load}.from_pretrained)")


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
