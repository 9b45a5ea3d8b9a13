"""Data parallelism under torchrun: which shard this process takes, and waiting for the others.

`torchrun --nproc_per_node N -m idefics3.eval ...` starts N processes with RANK / WORLD_SIZE in their
environment; each joins a gloo process group (used only for barriers, so it works beside CUDA too), takes a
contiguous 1/N of the selected samples (neighbours share images, which keeps the image caches useful), writes its
own part file, and waits at a barrier; rank 0 then merges and scores. Without those variables everything here is
a single-process no-op. The output folder must be one all ranks see (a shared file system across nodes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

T = TypeVar("T")
BARRIER_TIMEOUT = timedelta(days=7)  # the last rank may finish hours after the first


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join() -> World:
    """This process's place under torchrun (joining the process group), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    return World(rank, size, local)


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def leave(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard(items: Sequence[T], world: World) -> list[T]:
    """This rank's contiguous share: rank r of n takes items[r*len/n : (r+1)*len/n]."""
    n = len(items)
    return list(items[world.rank * n // world.size:(world.rank + 1) * n // world.size])
