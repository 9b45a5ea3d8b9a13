"""Data-parallel plumbing: the process group under torchrun, wrapping (DDP or FSDP2), and small collectives.

Run the same command under `torchrun --nproc_per_node N`: each process finds RANK/WORLD_SIZE/LOCAL_RANK in its
environment, joins a process group (NCCL on GPUs, gloo on CPU) and trains on its share of every step. Without
those variables everything here degrades to single-process no-ops, so the loop has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> World:
    """Join the torchrun process group if there is one; pick this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local if size > 1 else torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return World(rank, size, local, dev)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(world: World, *values: float) -> list[float]:
    """Sum numbers over ranks (float64)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def any_rank(world: World, flag: bool) -> bool:
    return bool(all_sum(world, float(flag))[0] > 0)


def gather_objects(world: World, obj: Any) -> list[Any]:
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def wrap(module: nn.Module, world: World, fsdp: bool, shard_units: list[nn.Module]) -> nn.Module:
    """DDP around `module`, or FSDP2 (`fully_shard`) on each unit in `shard_units` and then on `module`."""
    if not world.distributed:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for unit in shard_units:
            fully_shard(unit)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    # Text-only batches leave the vision tower (and its adapters) without gradients.
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


# ---------------------------------------------------------------------------------------------- state dicts
# Checkpoints always hold full (unsharded) tensors under the model's own names, so that a run can resume with or
# without FSDP's sharding being the same; under FSDP these calls are collectives (every rank must call them).

def full_trainable_state(model: nn.Module, wrapped: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The trainable parameters, unsharded, on CPU when sharded."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                      ignore_frozen_params=True))
        return {k.removeprefix("model."): v for k, v in full.items()}
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(wrapped, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_training_state(model: nn.Module, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                        trainable: dict[str, torch.Tensor], optimizer_state: dict[str, Any], sharded: bool) -> None:
    """Put checkpointed trainable weights and optimiser state back (every rank reads the same full state)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(wrapped, {"model." + k: v for k, v in trainable.items()}, options=options)
        set_optimizer_state_dict(wrapped, optimizer, optimizer_state, options=options)
        return
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(params):
        raise ValueError(f"the checkpoint holds other trainable weights than this run ({len(trainable)} tensors vs "
                         f"{len(params)}); was it made with other settings?")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    optimizer.load_state_dict(optimizer_state)
