"""Token dropout (FLIP) in every media tower: open_clip's keep rule, training only, the same kept
count in every batch, and the unmasked phase at the end of a run."""

import pytest
import torch

from mmpretrain import train
from mmpretrain.build import build_task
from mmpretrain.config import load_config
from mmpretrain.model import MultimodalModel

from conftest import TINY, synthetic_batch
from test_train import read_metrics

TOWERS = {"image": "model.modalities=[image]", "audio": "model.modalities=[audio]",
          "video": "model.modalities=[video]"}


def _tower(modality: str, p: float):
    cfg = load_config(None, TINY + [TOWERS[modality], f"model.{modality}.token_dropout={p}"])
    torch.manual_seed(0)
    model = MultimodalModel(cfg.model, 49408)
    batch, _ = synthetic_batch(cfg, n=3)
    return model.towers[modality].encoder, batch.media[modality]


@pytest.mark.parametrize("modality", list(TOWERS))
def test_each_tower_drops_tokens_in_training_only_keeping_a_fixed_count(modality):
    tower, x = _tower(modality, 0.5)
    tower.eval()
    full = tower(x).shape[1]  # 1 class token + L patch tokens
    tower.train()
    kept = {tower(x).shape[1] for _ in range(3)}
    assert kept == {1 + max(1, int((full - 1) * 0.5))}  # every batch alike: no recompiles
    none, _ = _tower(modality, 0.0)
    none.train()
    assert none(x).shape[1] == full


@pytest.mark.parametrize("tokens,p", [(64, 0.5), (64, 0.75), (7, 0.9), (3, 0.5), (100, 0.33)])
def test_keep_rule_is_open_clips_and_keeps_the_class_token_and_real_rows(tokens, p):
    """timm's PatchDropout as the towers apply it (`drop_tokens`) keeps what open_clip's keeps:
    max(1, int(L(1-p))) patch tokens after the class token, each one of the input's, none twice,
    and the indices it returns name them (masked modelling reconstructs the others)."""
    from open_clip.transformer import PatchDropout as OpenClipPatchDropout
    from timm.layers import PatchDropout

    from mmpretrain.encoders.spec import drop_tokens

    x = torch.randn(4, 1 + tokens, 8)
    ours, keep = drop_tokens(PatchDropout(p, num_prefix_tokens=1).train(), x)
    assert torch.equal(ours[:, 1:], x[:, 1:].gather(1, keep[..., None].expand(-1, -1, 8)))
    theirs = OpenClipPatchDropout(p, exclude_first_token=True).train()(x)
    assert ours.shape == theirs.shape
    assert torch.equal(ours[:, 0], x[:, 0])
    for b in range(len(x)):
        match = (ours[b, 1:, None] == x[b, None, 1:]).all(-1)  # (kept, L): which input row each is
        assert (match.sum(1) == 1).all() and len(set(match.int().argmax(1).tolist())) == len(match)


def test_a_run_drops_tokens_until_token_dropout_until_then_keeps_them_all(tiny_cfg, monkeypatch):
    """The real loop with packing: image tokens dropped for steps 1-2, none from step 3 on, and
    evaluation never drops (the end-of-run eval equals the export's)."""
    cfg = tiny_cfg("train.steps=4", "train.log_every=1", "model.image.token_dropout=0.75",
                   "train.token_dropout_until=2", "run.name=drop")
    from mmpretrain.encoders import spec

    seen = []  # the tokens each training forward of the image tower kept
    original = spec.patch_dropout_forward

    def spy(x, prob, prefix, ordered, training):
        out = original(x, prob, prefix, ordered, training)
        if training:
            seen.append(out[0].shape[1])
        return out

    monkeypatch.setattr(spec, "patch_dropout_forward", spy)
    train.run(cfg)
    grid = (cfg.model.image.image_size // cfg.model.image.patch_size) ** 2
    assert seen == [1 + grid // 4] * 2 + [1 + grid] * 2
    assert [m["step"] for m in read_metrics(cfg.run_dir)] == [1, 2, 3, 4]


def test_eval_mode_embeddings_ignore_the_dropout_setting():
    cfg = load_config(None, TINY + ["model.modalities=[image]"])
    torch.manual_seed(0)
    plain = build_task(cfg, 49408).model.eval()
    cfg_drop = load_config(None, TINY + ["model.modalities=[image]", "model.image.token_dropout=0.5"])
    torch.manual_seed(0)
    dropping = build_task(cfg_drop, 49408).model.eval()
    batch, _ = synthetic_batch(cfg, n=3)
    x = batch.media["image"]
    torch.testing.assert_close(dropping.encode_media("image", x), plain.encode_media("image", x))
