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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from layerfuse.core.atomic import fresh_temp_dir, publish_dir, temp_path
from layerfuse.core.resume_state import capture_rng, join_optimizer, split_optimizer

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
        opt_tensors, opt_meta = split_optimizer(optimizer)
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
    optimizer = join_optimizer(load_file(str(d / "optimizer.safetensors")), json.loads((d / "optimizer.json").read_text()))
    rng = None
    if (d / f"rng-{rank}.json").is_file():
        rng = {"tensors": load_file(str(d / f"rng-{rank}.safetensors")), "plain": json.loads((d / f"rng-{rank}.json").read_text())}
    return TrainState(state["step"], state["samples"], state["scheduler"], state["config_hash"], state["elapsed_s"],
                      load_file(str(d / "trainable.safetensors")), optimizer, rng)
