"""Distribution, applied to a finished single-device model from outside.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; torch.distributed does the rest
(NCCL on GPU, gloo on CPU). Data-parallel only for now; FSDP2 and sequence
parallelism slot in here as further `parallelize` steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group torchrun describes in the environment (a no-op when alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    return env


def parallelize(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP across ranks. find_unused_parameters: a batch may lack a modality pair, leaving
    that pair's temperature (and a tower) without gradient on some steps."""
    if env.world_size == 1:
        return model
    ids = [env.local_rank] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
