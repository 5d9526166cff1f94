"""Options bound to config fields (pipeline/cli.py `config_option`): each default lives once, in the config
dataclass; --help shows it; the commands build their configs from the fields the options are bound to."""

from __future__ import annotations

from dataclasses import asdict, fields
from types import SimpleNamespace

import click
import pytest
import torch
from click.testing import CliRunner

from layerfuse.core.config import choices
from layerfuse.pipeline.cli import FieldOption, attribute, main


def bound_options() -> list[tuple[str, click.Command, FieldOption]]:
    found = []

    def walk(cmd: click.Command, path: str) -> None:
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub, f"{path} {sub.name}".strip())
        found.extend((path, cmd, p) for p in cmd.params if isinstance(p, FieldOption))

    walk(main, "")
    return found


BOUND = bound_options()


# the fields a command sets otherwise (from another option or not at all)
UNBOUND = {
    "extract": {"out", "suffixes", "progress", "text_batch_size", "storage_options"},  # --out: [RUN_DIR/cache]; --suffix; --quiet
    "train": {"fuser_options", "categories", "progress", "prefetch"},  # --fuser-opt, --categories (a comma list), --quiet
    "eval": {"categories", "progress"},
}


@pytest.mark.parametrize("path", sorted(UNBOUND))
def test_every_config_field_has_its_option(path):
    options = [o for p, _, o in BOUND if p == path]
    config = {o.field.config for o in options}
    assert len(config) == 1
    names = {f.name for f in fields(attribute(config.pop()))}
    assert {o.field.path for o in options} == names - UNBOUND[path]
    assert {p for p, _, _ in BOUND} == {"extract", "train", "eval", "ablate", "cache plan"}  # cache plan: extract's layout options


@pytest.mark.parametrize("path, command, option", BOUND, ids=[f"{p}{' '.join(o.opts)}" for p, _, o in BOUND])
def test_every_bound_option_shows_its_fields_default_and_choices(path, command, option):
    field, annotation = option.field.resolve()
    default = option.field.default()
    ctx = click.Context(command, info_name=path)
    assert option.get_default(ctx) == default
    help_text = option.get_help_record(ctx)[1]
    if option.default_text is not None:
        assert f"[default: {option.default_text(default)}]" in help_text
    elif option.is_bool_flag and option.secondary_opts:
        assert f"default: {(option.opts if default else option.secondary_opts)[0].lstrip('-')}" in help_text
    elif option.is_flag:
        assert default is (not option.flag_value if option.flag_value is not None else False)  # a flag switches away from it
    elif default not in (None, []):
        shown = ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        assert f"default: {shown}" in " ".join(help_text.split()), help_text
    allowed = choices(annotation)
    if allowed is not None:
        assert isinstance(option.type.resolved, click.Choice) and list(option.type.resolved.choices) == [str(c) for c in allowed]
        assert option.type.convert(str(allowed[-1]), option, ctx) == allowed[-1]  # the Literal's value, also an int


def captured(monkeypatch, target: str, result) -> list:
    seen = []

    def fake(cfg, *args, **kwargs):
        seen.append(cfg)
        return result

    monkeypatch.setattr(target, fake)
    return seen


def test_make_extract_builds_the_config_it_always_did(monkeypatch):
    """`make extract`'s command with the CLI defaults as they were written in the options before they moved."""
    seen = captured(monkeypatch, "layerfuse.pipeline.cache.extract.run_extract", SimpleNamespace(summary={}, already_complete=False))
    r = CliRunner().invoke(main, ["extract", "--run-dir", "runs/default", "--builtin", "6000", "--seed", "0"])
    assert r.exit_code == 0, r.output
    before = dict(out="runs/default/cache", llava=None, image_root=None, wds=None, builtin=6000, seed=0, split="train", vision="default",
                  vision_revision=None, vision_pretrain_steps=None, pad_to_square=False, dtype="float16",
                  text_model="all-MiniLM-L6-v2", shard_samples=None, shard_mib=512, chunk_kib=256,
                  codec="zstd", clevel=1,  # was blosc zstd-3 until BENCHMARKS.md "Codecs" chose zstd-1
                  max_pixels=89_478_485, run_dir="runs/default", batch_size=None, device="auto", compute_dtype="auto",
                  workers=None,  # was 2; None is still 2 on a CPU (ExtractConfig.loader_workers), more on a GPU
                  strict=False, overwrite=False, progress=True)
    got = asdict(seen[0])
    assert seen[0].loader_workers(torch.device("cpu")) == 2
    assert {k: got[k] for k in before} == before
    assert got["suffixes"] == seen[0].__class__().suffixes and got["storage_options"] == {}


def test_make_train_builds_the_config_it_always_did(monkeypatch):
    seen = captured(monkeypatch, "layerfuse.pipeline.training.train.train", SimpleNamespace(is_main=False))
    r = CliRunner().invoke(main, ["train", "--cache", "runs/default/cache", "--stage", "1", "--categories", "caption", "--fuser", "concat",
                                  "--layers", "3-18-23", "--out", "runs/default/stage1"])
    assert r.exit_code == 0, r.output
    before = dict(cache="runs/default/cache", out="runs/default/stage1", stage=1, fuser="concat", layers="3-18-23", fuser_options={},
                  llm="default", llm_default_dir=None, init_from=None, template=None, split="train", categories=["caption"], max_length=2048,
                  epochs=1.0, max_steps=None, batch_size=32, micro_batch_size=None, lr_fuser=None, lr_projector=None, lr_llm=None,
                  llm_mode=None, lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_targets="all-linear", weight_decay=0.0,
                  warmup_ratio=0.03, max_grad_norm=1.0, precision="auto", gradient_checkpointing=False, fsdp=False,
                  attn_implementation="auto", seed=0, buffer_rows=1024, workers=2, prefetch=2, log_every=10, save_every=200,
                  device="auto", progress=True, tensorboard=True)
    assert asdict(seen[0]) == {**before, "on_corrupt": "stop", "compile": False}  # runtime fields added since keep their defaults
    r = CliRunner().invoke(main, ["train", "--cache", "c", "--out", "o", "--stage", "2", "--no-tensorboard", "--llm-mode", "lora", "--fsdp"])
    assert r.exit_code == 0, r.output
    assert (seen[1].stage, seen[1].tensorboard, seen[1].llm_mode, seen[1].fsdp) == (2, False, "lora", True)
    r = CliRunner().invoke(main, ["train", "--cache", "c", "--out", "o", "--stage", "3"])
    assert r.exit_code == 2 and "'3' is not one of '1', '2'" in r.output


def test_eval_builds_its_config_from_the_bound_options(monkeypatch):
    seen = captured(monkeypatch, "layerfuse.pipeline.training.evaluate.evaluate",
                    SimpleNamespace(table=lambda: "", skipped=[], out_dir="x"))
    r = CliRunner().invoke(main, ["eval", "--run", ".", "--split", "test", "--limit", "5"])
    assert r.exit_code == 0, r.output
    assert asdict(seen[0]) == dict(run=".", cache=None, split="test", categories=None, batch_size=32, max_new_tokens=16, limit=5, out=None,
                                   device="auto", workers=2, progress=True)


def test_ablate_sets_only_the_given_options_over_the_sweep_file_by_field_name(monkeypatch, tmp_path):
    seen = captured(monkeypatch, "layerfuse.pipeline.ablation.run.run_ablation", None)
    (tmp_path / "s.yaml").write_text("cache: c\nfusers: [concat]\nlayers: [18]\nepochs: 2\nbatch_size: 8\nprobe: {width: 16}\n"
                                     "lm: {template: chat}\n")

    def spec(*args: str):
        def fake(spec, opts):
            seen.append((spec, opts))
            raise SystemExit(0)

        monkeypatch.setattr("layerfuse.pipeline.ablation.run.run_ablation", fake)
        r = CliRunner().invoke(main, ["ablate", "--sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), *args])
        assert r.exit_code == 0, r.output
        return seen[-1]

    s, opts = spec()
    assert (s.epochs, s.batch_size, s.probe.width, s.probe.lr, s.lm.template, s.seeds) == (2.0, 8, 16, 1e-3, "chat", [0])
    assert (opts.memory_fraction, opts.device, opts.workers, opts.progress) == (0.5, "auto", None, True)
    s, opts = spec("--epochs", "5", "--probe-width", "32", "--lr", "0.01", "--template", "v1", "--stage", "2", "--seeds", "2",
                   "--memory-fraction", "0.25", "--quiet")
    assert (s.epochs, s.batch_size, s.probe.width, s.probe.lr, s.lm.template, s.lm.stage, s.seeds) == (5.0, 8, 32, 0.01, "v1", 2, [0, 1])
    assert (opts.memory_fraction, opts.progress) == (0.25, False)


def test_an_unknown_fuser_option_is_an_error_naming_it_and_the_options_there_are():
    r = CliRunner().invoke(main, ["train", "--cache", "c", "--out", "o", "--fuser-opt", "heads=4"])
    assert r.exit_code == 1
    assert "layerfuse train: --fuser-opt: fuser 'concat' has no option(s) heads; it takes: layers, projector_depth" in r.output
