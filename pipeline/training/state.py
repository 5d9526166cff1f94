"""Training checkpoints: everything a killed run needs to continue exactly where it stopped.

    RUN/train/checkpoint/
        trainable.safetensors   trainable parameters by name (fuser, projector, LLM or its LoRA weights)
        optimizer.safetensors   optimizer state tensors, keyed "<param name>/<state name>"
        optimizer.json          the rest of the optimizer state (param groups, scalar state)
        rng-<rank>.safetensors  torch CPU (and CUDA) RNG states of each rank
        rng-<rank>.json         Python and NumPy RNG states of each rank
        state.json              step (next step to run), samples seen, scheduler state, config hash, time

State dicts come from `torch.distributed.checkpoint.state_dict` with full (gathered) tensors, so the same
files serve single-process, DDP and FSDP runs. A checkpoint is written to `.checkpoint.tmp-run/` (every rank
writes into it) and swapped in with renames (core/atomic.py); `checkpoint.old/` is only there for the moment of the
swap and is used if a kill hit it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from layerfuse.core.atomic import fresh_temp_dir, publish_dir, temp_path

NAME = "checkpoint"
STAGING_OWNER = "run"  # the staging folder is shared by all ranks of the run, so its name is not a process id


@dataclass
class TrainState:
    step: int  # the next step to run (= steps done)
    samples: int  # samples trained on so far
    scheduler: dict[str, Any]
    config_hash: str
    elapsed_s: float
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # full optimizer state dict keyed by parameter names
    rng: dict[str, Any] | None  # this rank's RNG states (None if the rank was not in the saving run)


# -- RNG ------------------------------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    plain = {"python": _jsonable(random.getstate()), "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
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


# -- optimizer state <-> flat tensors + JSON ------------------------------------------------------------------------
def _split_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                tensors[f"{name}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[k] = v.item() if isinstance(v, torch.Tensor) else v
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, v in tensors.items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    for name, st in meta["scalars"].items():
        for k, v in st.items():
            state.setdefault(name, {})[k] = torch.tensor(v, dtype=torch.float32)  # Adam's "step" is a float32 tensor
    return {"state": state, "param_groups": meta["param_groups"]}


# -- save / load --------------------------------------------------------------------------------------------------
def save_checkpoint(train_dir: Path, *, step: int, samples: int, scheduler: dict[str, Any], config_hash: str, elapsed_s: float,
                    trainable: dict[str, torch.Tensor] | None, optimizer: dict[str, Any] | None, rank: int, is_main: bool,
                    barrier) -> None:
    """Every rank calls this (its RNG goes in); rank 0 writes the weights and swaps the folder in."""
    final = train_dir / NAME
    tmp = fresh_temp_dir(final, owner=STAGING_OWNER) if is_main else temp_path(final, owner=STAGING_OWNER)
    barrier()
    rng_tensors, rng_plain = capture_rng()
    save_file(rng_tensors, str(tmp / f"rng-{rank}.safetensors"))
    (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_plain))
    if is_main:
        assert trainable is not None and optimizer is not None
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _split_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    barrier()
    if is_main:
        state = {"step": step, "samples": samples, "scheduler": scheduler, "config_hash": config_hash, "elapsed_s": elapsed_s}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        publish_dir(tmp, final, replace=True, previous=train_dir / f"{NAME}.old")
    barrier()


def checkpoint_dir(train_dir: Path) -> Path | None:
    """The folder of the last complete checkpoint, or None."""
    for name in (NAME, f"{NAME}.old"):
        d = train_dir / name
        if (d / "state.json").is_file():
            return d
    return None


def load_checkpoint(train_dir: Path, rank: int) -> TrainState | None:
    d = checkpoint_dir(train_dir)
    if d is None:
        return None
    state = json.loads((d / "state.json").read_text())
    optimizer = _join_optimizer(load_file(str(d / "optimizer.safetensors")), json.loads((d / "optimizer.json").read_text()))
    rng = None
    if (d / f"rng-{rank}.json").is_file():
        rng = {"tensors": load_file(str(d / f"rng-{rank}.safetensors")), "plain": json.loads((d / f"rng-{rank}.json").read_text())}
    return TrainState(state["step"], state["samples"], state["scheduler"], state["config_hash"], state["elapsed_s"],
                      load_file(str(d / "trainable.safetensors")), optimizer, rng)
