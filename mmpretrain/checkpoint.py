"""Training checkpoints: complete or absent, newest found by `resume=auto`.

A checkpoint is written into `step_XXXXXXXX.partial/` and renamed to
`step_XXXXXXXX/` only once every byte is on disk, so a crash mid-write leaves
no folder that looks complete. The last `keep` complete ones are kept.

Single-writer `torch.save` of full state dicts (rank 0), read back with
`weights_only=True`. Sharded FSDP2 state would go through
torch.distributed.checkpoint here, behind the same three functions.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name) and (p / "state.pt").exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step_{step:08d}"
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with open(partial / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)  # a re-run of the same step replaces it
    os.replace(partial, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "state.pt"
    return torch.load(path, map_location=map_location, weights_only=True)
