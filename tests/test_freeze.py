"""train.freeze and train.lr_scale: frozen parts stay bitwise as they were, hold no optimizer
state and stay in eval mode; each part steps at its own learning rate."""

import itertools

import pytest
import torch

from mmpretrain import parallel
from mmpretrain.build import build, train_step
from mmpretrain.config import ConfigError, load_config

from conftest import ROOT, synthetic_batch


def _built(*overrides):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.device=cpu", "train.grad_clip=0", *overrides])
    env = parallel.init_distributed("cpu", cfg.parallel)
    return cfg, build(cfg, env, torch.device("cpu"))


def _steps(cfg, built, n=2):
    torch.manual_seed(0)
    batches = itertools.cycle([synthetic_batch(cfg, n=6, partial=True)[0]])
    built.task.train()
    for i in range(n):
        train_step(built.task, built.wrapped, built.optimizer, built.scheduler, built.autocast, batches, cfg.train, i)


def test_frozen_parts_are_unchanged_without_optimizer_state_and_in_eval_mode():
    cfg, built = _built("train.freeze=[decoder, image, fusion]", "model.image.token_dropout=0.5")
    model = built.task.model
    before = {n: p.detach().clone() for n, p in built.task.named_parameters()}
    _steps(cfg, built)
    frozen = ("model.decoder.", "model.towers.image.encoder.", "model.towers.image.fusion.", "model.towers.audio.fusion.")
    after = dict(built.task.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before if n.startswith(frozen))
    assert any(not torch.equal(after[n], before[n]) for n in before if n.startswith("model.towers.audio.encoder."))
    state = {id(p) for p in built.optimizer.state}
    assert not any(id(after[n]) in state for n in before if n.startswith(frozen))
    assert all(not m.training for m in model.decoder.modules()) and model.towers["audio"].encoder.training
    assert not model.towers["image"].encoder.vit.patch_drop.training  # no token dropout in a frozen tower


def test_each_part_steps_at_its_own_learning_rate():
    cfg, built = _built("train.lr_scale={decoder: 0.0, audio: 0.5}", "train.warmup_steps=0")
    lrs = {p: g["lr"] for g in built.optimizer.param_groups for p in g["params"]}
    named = dict(built.task.named_parameters())
    assert lrs[named["model.decoder.embed.weight"]] == 0.0
    assert lrs[named["model.towers.audio.encoder.vit.cls_token"]] == pytest.approx(0.5 * cfg.train.lr)
    assert lrs[named["model.towers.image.encoder.vit.cls_token"]] == pytest.approx(cfg.train.lr)
    before = named["model.decoder.blocks.0.q.weight"].detach().clone()
    _steps(cfg, built)
    assert torch.equal(named["model.decoder.blocks.0.q.weight"], before)  # lr 0: the schedule keeps the factor


def test_part_names_are_checked():
    with pytest.raises(ConfigError, match=r"train.freeze: \['vision'\] are not parts of this model"):
        load_config(None, ["train.freeze=[vision]"])
    with pytest.raises(ConfigError, match="train.lr_scale"):
        load_config(None, ["train.lr_scale={video: 0.1}"])
    with pytest.raises(ConfigError, match="freezes every part"):
        load_config(None, ["train.freeze=[decoder, fusion, image, audio]"])
