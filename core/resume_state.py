"""What a training loop needs to continue after a kill, as plain files: tensors for safetensors, the rest for JSON.

Never pickle: loading a saved state runs no code. Both the phase-two checkpoints (pipeline/training/state.py) and
the default tower's pretraining (pipeline/models/default_vision.py) save through these functions:

    optimizer  `split_optimizer(opt.state_dict())` -> ({"<param>/<state name>": tensor}, {param_groups, scalars})
    RNG        `capture_rng()` -> ({"torch": ..., "cuda.<i>": ...}, {"python": ..., "numpy": ...})

and read back with `join_optimizer` / `restore_rng`, which give exactly what was captured.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's torch CPU (and initialised CUDA) generator states as tensors; Python's and NumPy's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    plain = {"python": _jsonable(random.getstate()), "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    """Set every generator `capture_rng` captured back to its saved state."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    return x


def split_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict -> (its non-scalar state tensors keyed "<param>/<state name>", on the CPU;
    the JSON-able rest: param groups and scalar state such as Adam's step)."""
    tensors, scalars = {}, {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                tensors[f"{name}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(name), {})[k] = v.item() if isinstance(v, torch.Tensor) else v
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `split_optimizer`: a state dict for `Optimizer.load_state_dict`. Parameters keep the key
    type of the param groups (names from torch.distributed.checkpoint, or a plain optimizer's integer indices)."""
    key = {str(p): p for g in meta["param_groups"] for p in g["params"]}
    state: dict[Any, dict[str, Any]] = {}
    for path, v in tensors.items():
        name, k = path.rsplit("/", 1)
        state.setdefault(key.get(name, name), {})[k] = v
    for name, st in meta["scalars"].items():
        for k, v in st.items():
            state.setdefault(key.get(name, name), {})[k] = torch.tensor(v, dtype=torch.float32)  # Adam's "step" is a float32 tensor
    return {"state": state, "param_groups": meta["param_groups"]}
