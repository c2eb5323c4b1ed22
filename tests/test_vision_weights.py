"""Towers from pretrained vision checkpoints (model.<modality>.pretrained): a timm ViT's and an
open_clip CLIP's weights give their own features through our image tower; audio starts from
them the AST way and video by inflation."""

import json

import open_clip
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mmpretrain.build import load_pretrained_parts
from mmpretrain.config import ConfigError, load_config
from mmpretrain.model import MultimodalModel

from conftest import TINY

IMAGE = ["model.image.image_size=16", "model.image.patch_size=4"]  # TINY's towers: width 32, depth 1, heads 2


def _model(*overrides):
    given = {o.split("=")[0] for o in overrides}
    cfg = load_config(None, [o for o in TINY + IMAGE if o.split("=")[0] not in given] + list(overrides))
    torch.manual_seed(0)
    model = MultimodalModel(cfg.model, 49408).eval()
    load_pretrained_parts(model, cfg)
    return model


def _open_clip(tmp_path, quick_gelu=True):
    name = "tiny-clip-vision"
    (tmp_path / f"{name}.json").write_text(json.dumps({
        "embed_dim": 16, "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(str(tmp_path / f"{name}.json"))
    torch.manual_seed(1)
    clip = open_clip.create_model(name).eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    return clip, tmp_path / "clip.pt"


def test_a_timm_checkpoint_gives_its_own_features(tmp_path):
    torch.manual_seed(2)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=10).eval()
    path = tmp_path / "vit.pt"
    torch.save({"state_dict": vit.state_dict()}, path)  # as training scripts wrap it
    model = _model(f"model.image.pretrained={path}", "model.image.pre_norm=false")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.towers["image"].encoder(x), vit.forward_features(x))
    bigger = _model(f"model.image.pretrained={path}", "model.image.pre_norm=false", "model.image.image_size=32")
    assert bigger.towers["image"].encoder(torch.randn(1, 3, 32, 32)).shape == (1, 1 + 64, 32)  # positions resampled


def test_an_open_clip_checkpoint_gives_its_own_tokens_and_its_pooled_feature(tmp_path):
    clip, path = _open_clip(tmp_path)
    model = _model(f"model.image.pretrained={path}", "model.image.act=quick_gelu", "model.image.norm_eps=1e-5")
    x = torch.randn(3, 3, 16, 16)
    clip.visual.output_tokens = True
    with torch.no_grad():
        pooled, tokens = clip.visual(x)
        ours = model.towers["image"].encoder(x)
    torch.testing.assert_close(ours[:, 1:], tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:, 0] @ clip.visual.proj, pooled, rtol=1e-5, atol=1e-5)


def test_audio_starts_from_image_weights_the_ast_way_and_video_by_inflation(tmp_path):
    clip, path = _open_clip(tmp_path, quick_gelu=False)
    model = _model(f"model.audio.pretrained={path}", "model.audio.patch_freq=4", "model.audio.patch_time=4",
                   "model.audio.pre_norm=true",
                   "model.modalities=[image, audio, video]", f"model.video.pretrained={path}",
                   "model.video.frame_size=16", "model.video.patch_size=4", "model.video.tubelet=2")
    kernel = clip.visual.conv1.weight  # (32, 3, 4, 4)
    audio, video = model.towers["audio"].encoder.vit, model.towers["video"].encoder
    torch.testing.assert_close(audio.patch_embed.proj.weight, kernel.mean(dim=1, keepdim=True))
    grid = audio.patch_embed.grid_size
    assert audio.pos_embed.shape == (1, 1 + grid[0] * grid[1], 32) and grid[0] != grid[1]  # the spectrogram's grid
    torch.testing.assert_close(audio.blocks[0].mlp.fc1.weight, clip.visual.transformer.resblocks[0].mlp.c_fc.weight)
    torch.testing.assert_close(video.patch_embed.weight.sum(dim=2), kernel)  # spread over the tubelet
    torch.testing.assert_close(video.blocks[0].attn.qkv.weight, clip.visual.transformer.resblocks[0].attn.in_proj_weight)


def test_a_checkpoint_that_does_not_fit_is_named(tmp_path):
    _, path = _open_clip(tmp_path)
    with pytest.raises(ConfigError, match=r"missing \['blocks.1"):
        _model(f"model.image.pretrained={path}", "model.image.depth=2")
    with pytest.raises(ConfigError, match="is not a file"):
        _model(f"model.image.pretrained={tmp_path / 'none.pt'}")
