"""Process-group context for `torchrun`: rank/world from the environment, gloo barriers, clean shutdown."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE)
    owns_group: bool = False

    @classmethod
    def from_env(cls, timeout_s: float = 24 * 3600, backend: str = "gloo") -> "DistContext":
        """Join the process group that torchrun describes in WORLD_SIZE/RANK/MASTER_ADDR; a no-op otherwise.

        Extraction only needs barriers, so its group is gloo even on GPU machines (the long default timeout
        covers ranks that finish their shards hours apart). Training all-reduces gradients: backend "auto" is
        NCCL when CUDA is available, else gloo.
        """
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
        if not dist.is_initialized():
            if backend == "nccl":
                torch.cuda.set_device(local % torch.cuda.device_count())
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            owns = True
        return cls(rank=rank, world=world, local_rank=local, local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), owns_group=owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def device(self, requested: str = "auto") -> torch.device:
        """`auto` is this rank's GPU when CUDA is available, else the CPU."""
        if requested != "auto":
            return torch.device(requested)
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over ranks (x itself on one process)."""
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
