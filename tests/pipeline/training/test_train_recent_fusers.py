"""`layerfuse train` / `eval` with the fusers from 2024-2026 (tgif, tokenpacker, deepstack, concat on shallow-middle-deep)
on the tiny cache and the tiny 2-layer LLM (docs/methods.md: TGIF, TokenPacker, DeepStack, Shallow, middle and deep)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from layerfuse.pipeline.models.run import read_run_model
from layerfuse.pipeline.training.evaluate import EvalConfig, evaluate
from layerfuse.pipeline.training.train import TrainConfig, train
from safetensors.torch import load_file

# case -> (fuser, options)
CASES = {
    "tgif-llm": ("tgif", {"router_dim": 16}),
    "tgif-sentence": ("tgif", {"router": "sentence", "router_dim": 16}),
    "tokenpacker": ("tokenpacker", {"heads": 4}),  # 16 visual tokens instead of 64
    "deepstack": ("deepstack", {"llm_layers": "0,1,1"}),  # the tiny LLM has 2 decoder layers
    "shallow-middle-deep": ("concat", {"layers": "shallow-middle-deep"}),
}
CHANGES = {"tgif-llm": "router.hidden.weight", "tgif-sentence": "router.hidden.weight", "tokenpacker": "k_proj.0.weight",
           "deepstack": "layer_projectors.0.projector.linear_2.weight", "shallow-middle-deep": "projector.linear_1.weight"}


def config(cache: str, llm_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=cache, out=str(out), llm=str(llm_dir), batch_size=4, max_steps=2, max_length=256, workers=0, log_every=1,
                save_every=0, progress=False, tensorboard=False, buffer_rows=8, template="v1", categories=["colour", "count"])
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("case", list(CASES))
def test_train_then_eval(case, train_cache, tiny_llm_dir, tmp_path):
    fuser, options = CASES[case]
    out = tmp_path / case
    torch.manual_seed(0)
    res = train(config(train_cache, tiny_llm_dir, out, fuser=fuser, fuser_options=dict(options), lr_fuser=1e-2))
    assert res.steps == 2
    model = read_run_model(out)
    assert model.fuser == fuser and all(model.fuser_options[k] == v for k, v in options.items())
    weights = load_file(str(out / "fuser.safetensors"))
    assert weights[CHANGES[case]].abs().sum() > 0  # zero-initialised layers (tgif's router head, deepstack's mergers) moved too
    if case.startswith("tgif"):
        assert weights["router.logits.weight"].abs().sum() > 0
    ev = evaluate(EvalConfig(run=str(out), split="val", limit=4, batch_size=4, max_new_tokens=2, out=str(tmp_path / "ev"), workers=0,
                             progress=False))
    assert ev.overall["n"] == 4


def test_cli_train_with_options_as_users_write_them(train_cache, tiny_llm_dir, tmp_path):
    from click.testing import CliRunner
    from layerfuse.pipeline.cli import main

    out = tmp_path / "cli"
    args = ["train", "--cache", train_cache, "--llm", str(tiny_llm_dir), "--stage", "1", "--fuser", "deepstack", "--fuser-opt", "llm_layers=0,1,1",
            "--categories", "caption", "--max-steps", "1", "--batch-size", "4", "--workers", "0", "--out", str(out), "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert read_run_model(out).fuser_options["llm_layers"] == "0,1,1"
    default = ["train", "--cache", train_cache, "--llm", str(tiny_llm_dir), "--fuser", "deepstack", "--max-steps", "1", "--workers", "0",
               "--out", str(tmp_path / "bad"), "--quiet"]  # the default layers 1, 2, 3 on a 2-layer LLM
    res = CliRunner().invoke(main, default)
    assert res.exit_code != 0 and "do not exist in a 2-layer LLM" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["fusers", "--layers", "tgif", "--depth", "12"])
    assert res.exit_code == 0 and "reads hidden states [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]" in res.output
