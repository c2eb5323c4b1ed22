"""Distillation from a frozen mmpretrain export: open_clip's DistillClipLoss, and a run with a teacher."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmpretrain import train
from mmpretrain.config import ConfigError
from mmpretrain.objectives.distill import distill_loss


def test_distill_loss_is_open_clips():
    from open_clip.loss import DistillClipLoss

    g = torch.Generator().manual_seed(0)
    a, b, ta, tb = (F.normalize(torch.randn(9, 16, generator=g), dim=-1) for _ in range(4))
    ours = distill_loss(a, b, torch.tensor(20.0), ta, tb, 50.0)
    _, theirs = DistillClipLoss()(a, b, torch.tensor(20.0), ta, tb, torch.tensor(50.0))  # image, text, ...
    torch.testing.assert_close(ours, theirs)
    # a student that agrees with its teacher has reached the teacher's own entropy: the minimum
    assert distill_loss(ta, tb, torch.tensor(50.0), ta, tb, 50.0) < ours


def test_a_run_distils_from_an_export_which_stays_frozen_and_outside_the_checkpoint(tiny_cfg):
    teacher_cfg = tiny_cfg("train.steps=2", "run.name=teacher")
    train.run(teacher_cfg)
    export = teacher_cfg.run_dir / "export"
    before = load_file(export / "model.safetensors")

    cfg = tiny_cfg("train.steps=2", "train.log_every=1", "run.name=student", f"objectives.distill.teacher={export}",
                   "objectives.distill.weight=2.0")
    train.run(cfg)
    records = [json.loads(l) for l in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["distill/text-image"] > 0 and "distill/text-audio" in r for r in records)
    after = load_file(export / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = load_file(cfg.run_dir / "export" / "model.safetensors")
    assert saved.keys() == before.keys()  # the student's own weights only: no teacher.* tensors

    with pytest.raises(ConfigError, match="not an export folder"):
        train.run(tiny_cfg("run.name=nowhere", f"objectives.distill.teacher={cfg.run_dir}"))
    with pytest.raises(ConfigError, match="model.text"):
        train.run(tiny_cfg("run.name=other-text", "model.text.context_length=12",
                           f"objectives.distill.teacher={export}"))
