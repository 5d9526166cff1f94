"""A run's saved model record (RUN/config.json, pipeline/models/run.py) is read strictly: an unknown or missing key,
a wrong type or mode is an error naming the file and the key, never dropped or carried on silently."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from layerfuse.core.errors import StateError
from layerfuse.pipeline.models.run import CONFIG, RunModel, read_run_model

RECORD = {"fuser": "concat", "fuser_options": {"layers": "3-18-23", "projector_depth": 2}, "llm": "/runs/x/default-llm",
          "vision": {"num_layers": 24, "hidden_size": 64, "grid": [8, 8], "has_cls": True, "text_dim": 384},
          "image_token_id": 7, "template": "plain", "max_length": 2048, "stage": 1, "llm_mode": "frozen",
          "feature_dtype": "float16", "encoder": {"path": "/runs/x/vision"}, "text_model": {}, "cache": "/runs/x/cache"}


def write(tmp_path, record) -> str:
    (tmp_path / CONFIG).write_text(json.dumps(record))
    return str(tmp_path)


def test_a_saved_record_reads_back_as_written(tmp_path):
    model = read_run_model(write(tmp_path, RECORD))
    assert asdict(model) == RECORD and model.vision_spec().grid == (8, 8)


@pytest.mark.parametrize("change, message", [
    ({"fuser_mode": "x"}, "unknown key 'fuser_mode' (allowed: fuser, fuser_options, llm, vision, image_token_id, template,"),
    ({"llm_mode": "half"}, "llm_mode: Input should be 'frozen', 'full' or 'lora' (got 'half')"),
    ({"template": "vicuna"}, "template: Input should be 'plain', 'v1' or 'chat' (got 'vicuna')"),
    ({"stage": 3}, "stage: Input should be 1 or 2 (got 3)"),
    ({"image_token_id": "seven"}, "image_token_id: Input should be a valid integer"),
])
def test_an_unknown_key_or_a_bad_value_is_an_error_naming_the_file_and_the_key(tmp_path, change, message):
    path = write(tmp_path, {**RECORD, **change})
    with pytest.raises(StateError) as e:
        read_run_model(path)
    assert str(e.value).startswith(f"{tmp_path / CONFIG}: ") and message in str(e.value)


def test_a_missing_key_and_a_broken_file_are_errors_naming_the_file(tmp_path):
    with pytest.raises(StateError, match="'llm_mode' is missing"):
        read_run_model(write(tmp_path, {k: v for k, v in RECORD.items() if k != "llm_mode"}))
    (tmp_path / CONFIG).write_text("{")
    with pytest.raises(StateError, match=f"cannot read {tmp_path / CONFIG}"):
        read_run_model(str(tmp_path))
    with pytest.raises(StateError, match="run config: 'fuser' is missing"):
        RunModel.from_dict({})


@pytest.mark.parametrize("fuser", ["inject", "xattn"])
def test_an_internal_run_saved_before_group_mode_reads_as_group_means(tmp_path, fuser):
    """Runs written before `group_mode` existed fused `former`/`latter`/`all` as one group mean: their record (no
    group_mode) must rebuild that fuser, not the per-layer default with other parameters."""
    old = {**RECORD, "fuser": fuser, "fuser_options": {"layers": "former"}}
    assert read_run_model(write(tmp_path, old)).fuser_options == {"layers": "former", "group_mode": "mean"}
    new = {**old, "fuser_options": {"layers": "former", "group_mode": "per_layer"}}
    assert read_run_model(write(tmp_path, new)).fuser_options["group_mode"] == "per_layer"
    assert "group_mode" not in read_run_model(write(tmp_path, RECORD)).fuser_options  # concat has no such option


def test_the_recorded_encoder_loads_only_when_it_matches_the_trained_features(tmp_path):
    """load_run_encoder: the one home of the run's vision tower for live inference and exports (a run without one,
    or a tower whose (layers, hidden, grid, CLS) differ from the cache the run trained on, is a StateError)."""
    import transformers

    from layerfuse.pipeline.models.run import load_run_encoder

    tower = tmp_path / "tower"
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16)
    transformers.CLIPVisionModel(cfg).save_pretrained(tower)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tower)
    vision = {"num_layers": 2, "hidden_size": 32, "grid": [2, 2], "has_cls": True, "text_dim": 0}
    model = RunModel.from_dict({**RECORD, "vision": vision, "encoder": {"path": str(tower)}})
    assert load_run_encoder(model, "runs/x").info.grid == (2, 2)
    with pytest.raises(StateError, match=r"gives \(layers, hidden, grid, CLS\) = \(2, 32, \(2, 2\), True\); run runs/x was trained on "
                                         r"\(24, 64, \(8, 8\), True\)"):
        load_run_encoder(RunModel.from_dict({**RECORD, "encoder": {"path": str(tower)}}), "runs/x")
    with pytest.raises(StateError, match="run runs/x does not record its vision encoder"):
        load_run_encoder(RunModel.from_dict({**RECORD, "encoder": {}}), "runs/x")
