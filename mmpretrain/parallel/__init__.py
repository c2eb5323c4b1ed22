"""Distribution, applied to a finished single-device model from outside.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; torch.distributed does the rest
(NCCL on GPU, gloo on CPU). The processes form a (dp, sp) device mesh: data
parallel replicas (DDP), or shards (FSDP2, `parallel.dp_shard=fsdp`), of
sequence-parallel groups (Ulysses, ring attention, or both). Activation
checkpointing and sequence parallelism wrap decoder parts in place; model
files stay single-device.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from mmpretrain.config import ConfigError, ParallelConfig
from mmpretrain.parallel.activation_checkpointing import apply_activation_checkpointing
from mmpretrain.parallel.compile import apply_compile
from mmpretrain.parallel.sequence import apply_ulysses


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sp: int = 1  # processes sharing a packed row (parallel.sp x parallel.cp)
    tp: int = 1  # tensor-parallel degree (the mesh's innermost dimension)
    mesh: object = None  # torch DeviceMesh with dims ("dp", "sp") when distributed
    dp_rank: int = 0  # data-parallel coordinates: who reads which data
    dp_size: int = 1
    gather_group: object = None  # the contrastive gather's own dp communicator (None: dp_size 1)
    ring_group: object = None  # parallel.cp > 1: this process's ring (context parallelism)
    ulysses_group: object = None  # with cp > 1 and sp > 1: its Ulysses group inside the row's group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def group(self, dim: str):
        return self.mesh.get_group(dim) if self.mesh is not None else None


def init_distributed(device_type: str, cfg: ParallelConfig) -> DistEnv:
    """Join the process group torchrun describes (a no-op when alone) and build the mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    seq = cfg.sp * cfg.cp  # the processes that share a packed row
    replica = seq * cfg.tp  # the processes that share a batch
    if world % replica:
        raise ConfigError(f"parallel.sp x parallel.cp x parallel.tp: {cfg.sp} x {cfg.cp} x {cfg.tp} does not divide "
                          f"the {world} process(es)")
    if world == 1:
        return DistEnv()
    from torch.distributed.device_mesh import init_device_mesh

    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), seq, tp=cfg.tp)
    if device_type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"train.device: process {env.rank} has LOCAL_RANK {env.local_rank} but this node "
                              f"has {torch.cuda.device_count()} CUDA device(s); start at most that many "
                              f"processes per node, or set train.device=cpu")
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    env.mesh = init_device_mesh(device_type, (world // replica, seq, cfg.tp), mesh_dim_names=("dp", "sp", "tp"))
    # The loss's gathers get communicators of their own: their backward runs inside autograd,
    # where DDP's bucket all-reduces on the mesh's dp group may come in another order on each
    # rank (graphs differ when batches do), and one communicator must see one order everywhere.
    # One per place in a replica (sp and tp peers compute the same embeddings).
    gathers = [dist.new_group(list(range(j, world, replica))) for j in range(replica)]
    env.dp_rank, env.dp_size = env.mesh["dp"].get_local_rank(), world // replica
    if env.dp_size > 1:
        env.gather_group = gathers[env.rank % replica]
    if cfg.cp > 1:  # within each row's group (sp rank = ring rank x sp + Ulysses rank): every
        # process creates every subgroup, in one order, as torch.distributed requires
        ranks = env.mesh.mesh  # (dp, sp x cp, tp) global ranks
        for d in range(ranks.shape[0]):
            for t in range(ranks.shape[2]):
                row = ranks[d, :, t].tolist()
                for u in range(cfg.sp):
                    members = [row[r * cfg.sp + u] for r in range(cfg.cp)]
                    ring = dist.new_group(members)
                    env.ring_group = ring if env.rank in members else env.ring_group
                for r in range(cfg.cp):
                    members = row[r * cfg.sp : (r + 1) * cfg.sp]
                    uly = dist.new_group(members) if cfg.sp > 1 else None
                    env.ulysses_group = uly if env.rank in members else env.ulysses_group
    return env


def sharded(env: DistEnv, cfg: ParallelConfig) -> bool:
    """Whether FSDP2 shards the model (dp_shard=fsdp with more than one process)."""
    return cfg.dp_shard == "fsdp" and env.world_size > 1


def parallelize(task: nn.Module, env: DistEnv, cfg: ParallelConfig, device_type: str = "cpu",
                bf16: bool = False, find_unused: bool = True) -> nn.Module:
    """Compile, sequence parallelism and checkpointing on the blocks, then FSDP2 (dp_shard=fsdp)
    or DDP over the dp dimension around `task` (the module whose forward uses every parameter).
    `task` may still be on the meta device for FSDP2 (`fsdp.materialize` allocates it
    afterwards). `find_unused`: whether some parameter may get no gradient in a step (DDP's
    find_unused_parameters; `build.unused_parameter_keys` decides it from the config). Returns
    what to call."""
    decoder = task.model.decoder
    fsdp = sharded(env, cfg)
    if cfg.compile == "on":  # the blocks themselves, before wrappers reach into them (auto: off, see config)
        apply_compile(task.model, device_type, cache=not fsdp)
    if env.tp > 1:  # the decoder's projections split over the tp ranks (before FSDP2 shards them over dp)
        from mmpretrain.parallel.tensor import apply_tensor_parallel

        apply_tensor_parallel(decoder, env.mesh["tp"])
    if env.sp > 1:  # before checkpointing, which wraps the blocks this reaches into; under FSDP2
        # the sp sum of the blocks' gradients is part of its reduce-scatter
        apply_ulysses(decoder, env.group("sp"), sum_grads=not fsdp, ring_group=env.ring_group,
                      ulysses_group=env.ulysses_group)
    apply_activation_checkpointing(decoder, cfg.activation_checkpointing, cfg.tiled_mlp)
    if fsdp:
        from mmpretrain.parallel.fsdp import apply_fsdp

        return apply_fsdp(task, env, device_type, bf16)
    if env.dp_size == 1:
        return task
    if env.tp > 1:
        raise ConfigError("parallel.tp with data parallelism needs parallel.dp_shard=fsdp (FSDP2 on the dp x tp mesh); "
                          "DDP does not take tensor-parallel parameters")
    ids = [env.local_rank] if device_type == "cuda" else None
    # Without find_unused_parameters a parameter that gets no gradient (a tower whose modality a
    # batch lacks, that pair's temperature) fails the next step; with it DDP walks the autograd
    # graph every step, and warns when it finds nothing.
    return nn.parallel.DistributedDataParallel(task, device_ids=ids, process_group=env.group("dp"),
                                               find_unused_parameters=find_unused)


def log_level() -> int:
    """INFO on the first process (or alone), WARNING and above on torchrun's others: each INFO
    line once, not once per rank. Read from torchrun's RANK, before the process group exists."""
    return logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over plain and DTensor gradients alike -> the total norm (a plain
    tensor). Gradients on one kind of tensor (one mesh) go to clip_grad_norm_ as they are; mixed
    ones (tensor parallelism: DTensors on the dp x tp mesh beside dp-only or plain ones) are normed
    per mesh, which torch's foreach kernels need, then scaled by one factor."""
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    kinds = collections.defaultdict(list)
    for p in params:
        kinds[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p.grad)
    if len(kinds) <= 1:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    norms = []
    for grads in kinds.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.stack(norms).norm()
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    if coef < 1.0:
        for grads in kinds.values():
            torch._foreach_mul_(grads, coef)
    return total


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def any_rank(flag: torch.Tensor) -> bool:
    """True on every rank when `flag` (a bool scalar) is true on any rank."""
    if dist.is_initialized():
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def gather_objects(obj, group) -> list:
    """Every rank of `group`'s `obj` (picklable), in rank order, on every rank; [obj] when alone."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def sum_counts(counts: collections.Counter, group) -> collections.Counter:
    """A Counter summed over the ranks of `group` (every rank gets the sum)."""
    return sum((collections.Counter(p) for p in gather_objects(dict(counts), group)), collections.Counter())


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
