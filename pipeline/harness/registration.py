"""The lmms-eval model name `layerfuse`, as lmms-eval's lookup reads it.

lmms-eval (0.7) builds its model registry when `lmms_eval.models` is imported: its built-in models, then every entry
point of the group `lmms_eval.models`. pyproject.toml declares ours (`layerfuse = ...registration:lmms_eval_models`);
the payload names the class by its import path, so lmms-eval imports layerfuse (torch, transformers) only when a run
asks for `--model layerfuse`, not at every start.
"""

from __future__ import annotations

from typing import Any

LMMS_EVAL_NAME = "layerfuse"
LMMS_EVAL_CLASS = "layerfuse.pipeline.harness.lmms.LayerfuseLMM"


def lmms_eval_models() -> list[Any]:
    """-> [ModelManifest] for lmms-eval's registry (called by lmms-eval while it imports `lmms_eval.models`)."""
    # lmms-eval is optional (the `eval` extra) and is the only caller; importing it at module level would make this
    # module re-enter lmms_eval.models while that package is still initialising
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=LMMS_EVAL_NAME, simple_class_path=LMMS_EVAL_CLASS)]
