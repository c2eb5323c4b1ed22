"""Training checkpoints: written by every rank in parallel, complete or absent, loadable on any
number of ranks.

    checkpoints/step_00000400/
      .metadata, __*.distcp   model, temperatures and optimizer: torch.distributed.checkpoint (DCP),
                              each rank writing its own shards (FSDP2) or its share (DDP, dedup)
      rank_00000.pt ...       each rank's own state: step, schedule, data position, RNG
      complete                written last (JSON: step, world size), after every rank has finished

A checkpoint is written into `step_XXXXXXXX.partial/` and renamed once `complete` is on disk, so
a crash or SIGKILL mid-write leaves no folder that looks complete and `resume=auto` takes the
previous one. The last `keep` complete ones are kept. DCP reshards on load: a checkpoint written
by N ranks loads on M (FSDP2 or DDP), and on one process (`read_tensors`, export, consolidate).

    python -m mmpretrain.checkpoint consolidate runs/demo/checkpoints/step_00000400 model.safetensors
    python -m mmpretrain.checkpoint info runs/demo/checkpoints/step_00000400

With `train.async_checkpoint`, periodic checkpoints are written in the background
(`AsyncCheckpointer`) and completed at the next one; the last checkpoint of a run is written
at once.

`train.init_from` reads a checkpoint or an export alike (`weight_shapes`, `read_weights`,
`load_weights`); `check_compatible` refuses, before `train.resume` loads anything, a checkpoint
of another model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmpretrain.config import ConfigError

# DCP says so on every single-process save and load, which is this module's ordinary case
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_NAME = re.compile(r"^step_(\d{8})$")
MARKER = "complete"


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name) and is_checkpoint(p))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group)


def _rank() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _tensors(task: nn.Module, optimizer) -> dict:
    """What DCP writes and reads: the task's and the optimizer's state dicts (sharded under FSDP2)."""
    model_state, optim_state = get_state_dict(task, optimizer)
    return {"task": model_state, "optimizer": optim_state}


def save_checkpoint(run_dir: Path, step: int, task: nn.Module, optimizer, local: dict, keep: int) -> Path:
    """Collective: every rank calls it. `local` is this rank's own state (data, RNG, ...)."""
    final, partial = _begin(run_dir, step, local)
    dcp.save(_tensors(task, optimizer), checkpoint_id=partial, no_dist=_rank()[1] == 1)
    return _finish(run_dir, step, final, partial, keep)


def _begin(run_dir: Path, step: int, local: dict) -> tuple[Path, Path]:
    """The partial folder, made by rank 0, with this rank's own state in it."""
    rank, _ = _rank()
    final = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    _fsync_write(partial / f"rank_{rank:05d}.pt", lambda f: torch.save(local, f))
    return final, partial


def _finish(run_dir: Path, step: int, final: Path, partial: Path, keep: int, group=None) -> Path:
    _barrier(group)  # every shard and every rank file is on disk
    rank, world = _rank()
    if rank == 0:
        write_marker(partial, {"step": step, "world_size": world})
        shutil.rmtree(final, ignore_errors=True)  # a re-run of the same step replaces it
        os.replace(partial, final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(group)
    return final


class AsyncCheckpointer:
    """Checkpoints written in the background: `save` returns once the state is staged in host
    memory; the write goes on in a thread (DCP's `async_save`, on a gloo group of its own so its
    collectives never interleave with the training's), and the checkpoint is completed (marker,
    rename, keep-k) at the next `save` or `wait`. Until then it is a `.partial` folder: a crash
    leaves the previous complete checkpoint to resume from."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.pending = None

    def save(self, run_dir: Path, step: int, task: nn.Module, optimizer, local: dict, keep: int) -> None:
        self.wait()
        final, partial = _begin(run_dir, step, local)
        future = dcp.async_save(_tensors(task, optimizer), checkpoint_id=partial, process_group=self.group,
                                no_dist=self.group is None)
        self.pending = (future, run_dir, step, final, partial, keep)

    def wait(self) -> Path | None:
        """Complete the checkpoint in flight, if any (collective)."""
        if self.pending is None:
            return None
        future, run_dir, step, final, partial, keep = self.pending
        self.pending = None
        future.result()
        return _finish(run_dir, step, final, partial, keep, self.group)


def write_marker(folder: Path, info: dict) -> None:
    _fsync_write(folder / MARKER, lambda f: f.write(json.dumps(info).encode()))


def tensor_shapes(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds, as meta tensors of its (global) shape and dtype."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: torch.empty(m.size, dtype=m.properties.dtype, device="meta")
            for k, m in meta.items() if isinstance(m, TensorStorageMetadata)}


def read_tensors(path: Path, prefix: str = "task.") -> dict[str, torch.Tensor]:
    """The full tensors under `prefix` of a checkpoint, in this process alone (no process group
    needed, whatever number of ranks wrote it): for export, init_from and consolidate."""
    flat = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in tensor_shapes(path).items() if k.startswith(prefix)}
    dcp.load(flat, checkpoint_id=Path(path), no_dist=True)
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def load_checkpoint(path: Path, task: nn.Module, optimizer) -> dict:
    """Collective: load the task's tensors and optimizer state (resharded to this run's ranks)
    and return this rank's own state (that of rank 0 where the writer had fewer ranks), with
    `writers` (the writing run's rank count) and, when that differs from this run's, `all`:
    every writer's state (the data stream shares theirs out)."""
    path = Path(path)
    rank, world = _rank()
    state = _tensors(task, optimizer)
    _only_saved_optimizer_state(state["optimizer"], tensor_shapes(path))
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_model_state_dict(task, state["task"])
    # not strict: parameters without saved state (above) are expected
    set_optimizer_state_dict(task, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    writers = json.loads((path / MARKER).read_text())["world_size"]
    if writers == world:
        return torch.load(path / f"rank_{rank:05d}.pt", weights_only=True) | {"writers": writers}
    every = [torch.load(f, weights_only=True) for f in sorted(path.glob("rank_*.pt"))]
    return every[rank if rank < writers else 0] | {"writers": writers, "all": every}


def _only_saved_optimizer_state(optim_state: dict, saved: dict) -> None:
    """Drop from `optim_state` (what the fresh optimizer would load: `get_state_dict` gives every
    parameter a state) the parameters the checkpoint holds no state for: those that never had a
    gradient in the writing run (a tower, or a pair's temperature, that saw no data). They stay
    without state, as in the uninterrupted run, where AdamW creates it at their first gradient."""
    for name in [n for n, s in optim_state["state"].items()
                 if not any(f"optimizer.state.{n}.{k}" in saved for k in s)]:
        del optim_state["state"][name]


def weight_shapes(path: Path) -> dict[str, torch.Tensor]:
    """`read_weights`' tensors as meta tensors of their shapes, from the source's metadata alone
    (an export's dtypes are not read: only shapes are compared)."""
    if is_checkpoint(path):
        return {k[len("task."):]: v for k, v in tensor_shapes(path).items() if k.startswith("task.")}
    from safetensors import safe_open

    with safe_open(Path(path) / "model.safetensors", framework="pt") as f:
        return {f"model.{k}": torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}


def read_weights(path: Path, keep) -> dict[str, torch.Tensor]:
    """The task tensors named in `keep` ("model.*", "objectives.*") of a checkpoint, or of an
    export (its model's)."""
    if is_checkpoint(path):
        tensors = read_tensors(path, "task.")
    else:
        from safetensors.torch import load_file

        tensors = {f"model.{k}": v for k, v in load_file(Path(path) / "model.safetensors").items()}
    return {k: v for k, v in tensors.items() if k in keep}


def module_of(key: str) -> str:
    """A task parameter's module, two levels into the model: towers.video, decoder.blocks,
    objectives.logit_scale, ..."""
    return ".".join(key.removeprefix("model.").split(".")[:2])


def state_differences(expected: dict, found: dict) -> dict[str, list[str]]:
    """What keeps `found` from loading where `expected` is: missing, unexpected, reshaped keys."""
    return {"missing": [k for k in expected if k not in found],
            "unexpected": [k for k in found if k not in expected],
            "shape": [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                      if k in found and found[k].shape != v.shape]}


def describe_differences(differences: dict[str, list[str]], kinds=("missing", "unexpected", "shape")) -> str:
    """"missing: a, b; shape: c (2,) vs (3,) ..." for the given kinds; "" when there are none."""
    return "; ".join(f"{kind}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                     for kind in kinds if (keys := differences[kind]))


def check_compatible(task: nn.Module, path: Path) -> None:
    """`train.resume`: refuse a checkpoint of another model than `task` (names, shapes), before
    anything is loaded."""
    if differ := describe_differences(state_differences(task.state_dict(), weight_shapes(path))):
        raise ConfigError(f"train.resume: the checkpoint holds another model than this config builds "
                          f"({differ}); point run.name elsewhere, or train.resume=none to start afresh")


def load_weights(task: nn.Module, path: Path, rank: int, world_size: int) -> str:
    """`train.init_from`: every tensor of the source (a checkpoint or an export) that `task` has,
    same name and shape, is loaded; the rest keeps its fresh initialisation. Collective: every
    rank checks the shapes from the source's metadata, rank 0 alone reads the tensors and
    `set_model_state_dict` broadcasts them one by one, each rank keeping its shard (FSDP2) or its
    copy (DDP): no rank but the first holds the full model in memory. Returns the line to log:
    what was loaded, what starts afresh, what the source holds beyond this model."""
    found = weight_shapes(path)
    own = task.state_dict()
    differ = state_differences(own, found)
    if reshaped := describe_differences(differ, ("shape",)):
        raise ConfigError(f"train.init_from: {path} holds tensors of other shapes than this config "
                          f"builds ({reshaped})")
    tensors = read_weights(path, keep=own.keys()) if rank == 0 else {}
    set_model_state_dict(task, tensors, options=StateDictOptions(
        full_state_dict=True, strict=False, broadcast_from_rank0=world_size > 1))
    new = sorted({module_of(k) for k in differ["missing"]})
    unused = sorted({module_of(k) for k in differ["unexpected"]})
    return (f"train.init_from {path}: {sum(k in found for k in own)} of {len(own)} tensors loaded"
            + (f"; initialised afresh: {', '.join(new)}" if new else "")
            + (f"; in the source but not in this model: {', '.join(unused)}" if unused else ""))


def consolidate(path: Path, out: Path) -> Path:
    """One safetensors file of the model's full tensors (the temperatures and optimizer left out)."""
    from mmpretrain.export import save_weights

    tensors = read_tensors(path, prefix="task.model.")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return save_weights({k: v.contiguous() for k, v in tensors.items()}, out)


def describe(path: Path) -> str:
    """What a checkpoint holds, in a few lines (for `info`)."""
    path = Path(path)
    shapes, state = tensor_shapes(path), torch.load(path / "rank_00000.pt", weights_only=True)
    marker = json.loads((path / MARKER).read_text())
    step, writers = marker["step"], marker["world_size"]
    model = {k: v for k, v in shapes.items() if k.startswith("task.model.")}
    towers = sorted({k.split(".")[3] for k in model if k.startswith("task.model.towers.")})
    params = sum(v.numel() for v in model.values())
    data = state.get("data", {})
    lines = [f"{path}: step {step}, written by {writers} process(es) ({len(list(path.glob('*.distcp')))} shard files)",
             f"model: {params / 1e6:.1f}M parameters in {len(model)} tensors; towers: {', '.join(towers)}",
             f"optimizer: {sum(1 for k in shapes if k.startswith('optimizer.'))} state tensors",
             f"data: epoch {data.get('epoch', '?')}, {data.get('batch_in_epoch', '?')} batches into it"
             + (f", readers {data['readers'][0]} rank(s) x {data['readers'][1]} worker(s)" if "readers" in data else "")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmpretrain.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="a checkpoint folder -> one safetensors file of the model")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("out", type=Path)
    i = sub.add_parser("info", help="what a checkpoint folder holds: step, writers, model, data position")
    i.add_argument("checkpoint", type=Path)
    args = p.parse_args(argv)
    if not is_checkpoint(args.checkpoint):
        print(f"error: {args.checkpoint} is not a complete checkpoint folder", file=sys.stderr)
        return 2
    if args.command == "info":
        print(describe(args.checkpoint))
        return 0
    out = consolidate(args.checkpoint, args.out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
