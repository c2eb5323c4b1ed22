"""FSDP2 (`parallel.dp_shard=fsdp`): parameters, gradients and optimizer state sharded over ranks.

`fully_shard` per decoder block, per encoder block (those its modality's spec names), per fusion,
on the decoder's final norm, on the model and at the root (the task, which adds the
temperatures), as torchtitan does. The shards span every process: with Ulysses (sp > 1) the
ranks of a sequence-parallel group shard the parameters too, so the mesh is the (dp, sp) mesh
flattened. Their gradients are then reduce-scattered over all ranks; inside the token-sharded
region (decoder blocks and final norm) each sp rank holds a partial gradient that must be summed
over sp and averaged over dp, which the divide factor of those units (dp instead of dp x sp)
does, in place of Ulysses' own sum hooks.

A model built on the meta device (no memory) is parallelised first and then materialised shard
by shard (`materialize`): every module's own initialisation runs on its local shards.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from mmpretrain.encoders import MODALITIES

log = logging.getLogger(__name__)


def shard_mesh(env, device_type: str):
    """The 1-D mesh the parameters are sharded over: dp, or every process when sp > 1 (dp x sp,
    flattened, under tensor parallelism: FSDP2 composes with tp only over a mesh of the same root)."""
    if env.sp == 1:
        return env.mesh["dp"]
    if env.tp > 1:
        return env.mesh["dp", "sp"]._flatten("dp_sp")  # torch's (private) flattening, as torchtitan uses
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (env.world_size,), mesh_dim_names=("shard",))


def apply_fsdp(task: nn.Module, env, device_type: str, bf16: bool) -> nn.Module:
    model = task.model
    mesh = shard_mesh(env, device_type)
    # bf16 parameters for compute, fp32 gradient reduction and fp32 sharded parameters (the
    # optimizer's); `bf16` is train.precision's choice (auto: on CUDA only)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()

    units = []  # (unit, its reshard_after_forward), for `gathered`

    def shard(module: nn.Module, **kw) -> None:
        fully_shard(module, mesh=mesh, mp_policy=mp, **kw)
        units.append((module, kw.get("reshard_after_forward", True)))
        # a batch without some modality pair (or a documents-only rank) leaves parameters without
        # gradient on some ranks: they reduce as zeros there (DDP's find_unused_parameters)
        module.set_reduce_scatter_unused_params(True)

    for m, tower in model.towers.items():
        for block in MODALITIES[m].blocks(tower.encoder):
            shard(block)
        shard(tower.fusion)
    token_sharded = list(model.decoder.blocks) + [model.decoder.norm]
    for i, block in enumerate(token_sharded):
        shard(block, reshard_after_forward=i < len(token_sharded) - 1)  # the last is needed at once
        if env.sp > 1:  # partial sums over the sequence shards: sum over sp, mean over dp
            block.set_gradient_divide_factor(float(env.dp_size))
            if device_type == "cpu":  # gloo has no pre-multiplied sum: scale, then sum
                block.set_force_sum_reduction_for_comms(True)
    # the model's own unit (embedding, tied output head, patch embeddings, text projection) stays
    # gathered from forward to backward: the objectives use the tied head after forward returns
    shard(model, reshard_after_forward=False)
    for method in ("encode_text", "encode_media"):  # eval and export call these, not forward
        register_fsdp_forward_method(model, method)
    shard(task, reshard_after_forward=False)
    task.fsdp_units = units
    log.info("FSDP2: %d units sharded over %d process(es)", 3 + len(token_sharded), mesh.size())
    return task


@contextlib.contextmanager
def gathered(task: nn.Module):
    """Every FSDP2 unit of `task` holds its full parameters until exit (one all-gather each, on every
    rank at once; nothing under plain DDP), so the forwards inside need no collective: each rank may
    evaluate its own part of an eval set, whatever number of batches and modalities that part has."""
    units = getattr(task, "fsdp_units", [])
    for unit, _ in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, reshard in units:
            unit.set_reshard_after_forward(reshard, recurse=False)
            unit.reshard()


@torch.no_grad()
def materialize(task: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a meta-built (and possibly sharded) task on `device` and initialise it: PyTorch's
    `reset_parameters` on every module that has one (linear, norm, embedding and conv layers),
    then the task's `init_weights` (`PretrainingTask.init_weights`: each part's own, called
    explicitly from the top down; constants such as rotary frequencies and mel filterbanks;
    towers copied from others). `seed` should differ per rank: each rank draws its own shards."""
    task.to_empty(device=device)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # DTensor warns that CPU meshes have no RNG tracker: none is needed, each rank draws its
        # own shards from its own seed
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        for m in task.modules():
            if hasattr(m, "reset_parameters"):  # PyTorch's protocol for its layers
                m.reset_parameters()
        task.init_weights()


@torch.no_grad()
def sync_over_tp(task: nn.Module, env) -> None:
    """After `materialize` under tensor parallelism: what the tp ranks hold as copies (every
    parameter and buffer that is not split over tp: norms, embeddings, encoders, experts) made
    equal to tp rank 0's draw. Each rank drew its own shards from its own seed, which the split
    projections need (their shards must differ) and the copies must not."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    group = env.mesh.get_group("tp")
    source = dist.get_global_rank(group, 0)
    for t in list(task.parameters()) + list(task.buffers()):
        if isinstance(t, DTensor) and "tp" in (t.device_mesh.mesh_dim_names or ()):
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        dist.broadcast(local, src=source, group=group)
