"""Masked modelling (objectives.masked_weight): patches in the towers' token order, the loss on
dropped patches only, the decoder's placement of kept tokens, and a real run with its figure."""

import pytest
import torch
from safetensors.torch import load_file

from mmpretrain import train
from mmpretrain.build import build_task
from mmpretrain.config import ConfigError, load_config
from mmpretrain.encoders.spec import Patches
from mmpretrain.objectives.masked import MaskedDecoder, dropped_mask, masked_loss, reconstruct, targets

from conftest import TINY, synthetic_batch
from test_train import read_metrics

MASKED = ["model.modalities=[image,audio,video]", "model.image.token_dropout=0.75", "model.audio.token_dropout=0.5",
          "model.video.token_dropout=0.5", "objectives.masked_weight=1.0"]


@pytest.mark.parametrize("grid,size", [((4, 4), (4, 4)), ((2, 3, 4), (2, 2, 2)), ((2, 5), (8, 10))])
def test_patches_are_in_the_patch_embeddings_token_order_and_join_back(grid, size):
    """A strided convolution's output tokens (the towers' patch embedding) are each patch's
    values times its kernel, in `split`'s order; `join` undoes `split`."""
    spec = Patches(grid, size, 3)
    x = torch.randn(2, 3, *(g * s for g, s in zip(grid, size)), dtype=torch.float64)
    conv = (torch.nn.Conv2d if len(grid) == 2 else torch.nn.Conv3d)(3, 5, size, size, bias=False).double()
    tokens = conv(x).flatten(2).transpose(1, 2)
    kernel = conv.weight.permute(0, *range(2, 2 + len(grid)), 1).reshape(5, -1)  # (out, *size, C)
    torch.testing.assert_close(spec.split(x) @ kernel.T, tokens)
    assert torch.equal(spec.join(spec.split(x)), x)


def test_the_loss_counts_dropped_patches_only():
    spec = Patches((4, 4), (2, 2), 3)
    patches = torch.randn(3, 16, 12)
    keep = torch.stack([torch.randperm(16)[:4] for _ in range(3)])
    pred = torch.randn(3, 16, 12, requires_grad=True)
    loss = masked_loss(pred, patches, keep, spec)
    loss.backward()
    kept = ~dropped_mask(keep, 16).bool()
    assert (pred.grad[kept] == 0).all() and (pred.grad[~kept] != 0).all()
    changed = pred.detach().clone()
    changed[kept] += 100.0  # any prediction at a kept patch: the same loss
    torch.testing.assert_close(masked_loss(changed, patches, keep, spec), loss.detach())
    expected = (pred.detach() - targets(patches, spec)).pow(2).mean(-1)[~kept].mean()
    torch.testing.assert_close(loss.detach(), expected)
    # pixels: each patch normalised by its own statistics; log-mel (normalise=False): as is
    t = targets(patches, spec)
    torch.testing.assert_close(t.mean(-1), torch.zeros(3, 16), atol=1e-5, rtol=0)
    assert torch.equal(targets(patches, Patches((4, 4), (2, 2), 3, normalise=False)), patches)
    assert masked_loss(pred[:0], patches[:0], keep[:0], spec).item() == 0.0  # a batch without the modality


def test_the_decoder_puts_kept_tokens_in_place_and_mask_tokens_elsewhere():
    spec = Patches((3, 3), (2, 2), 1)
    torch.manual_seed(0)
    decoder = MaskedDecoder(8, spec, width=16, depth=1, heads=2)
    tokens, keep = torch.randn(2, 1 + 4, 8), torch.tensor([[0, 5, 2, 8], [7, 1, 3, 4]])
    seen = {}
    decoder.blocks.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    assert decoder(tokens, keep).shape == (2, 9, 4)
    x = seen["x"] - decoder.pos_embed
    embedded = decoder.embed(tokens)
    torch.testing.assert_close(x[:, 0], embedded[:, 0])
    for b in range(2):
        for j, i in enumerate(keep[b].tolist()):
            torch.testing.assert_close(x[b, 1 + i], embedded[b, 1 + j])
        for i in set(range(9)) - set(keep[b].tolist()):
            torch.testing.assert_close(x[b, 1 + i], decoder.mask_token[0, 0])


def test_reconstruct_keeps_the_seen_patches_and_puts_predictions_at_the_patches_scale():
    spec = Patches((2, 2), (2, 2), 1)
    patches = torch.randn(1, 4, 4)
    keep = torch.tensor([[1, 2]])
    original, seen, shown = reconstruct(targets(patches, spec), patches, keep, spec)  # a perfect prediction
    torch.testing.assert_close(shown, original)
    torch.testing.assert_close(original, spec.join(patches))
    assert (spec.split(seen)[0, [0, 3]] == 0).all() and torch.equal(spec.split(seen)[0, [1, 2]], patches[0, [1, 2]])


def test_every_tower_gives_its_patches_and_kept_indices_in_training_only():
    cfg = load_config(None, TINY + MASKED)
    task = build_task(cfg, 49408).train()
    batch, _ = synthetic_batch(cfg, n=3)
    for m, decoder in task.objectives.masked_decoders.items():
        encoder = task.model.towers[m].encoder
        tokens, keep, patches = encoder(batch.media[m], masked=True)
        n = encoder.patches.count
        assert patches.shape == (3, n, encoder.patches.dim)
        assert keep.shape == (3, tokens.shape[1] - 1) and int(keep.max()) < n
        assert encoder.eval()(batch.media[m]).shape[1] == 1 + n  # every patch a token: the grid's
        assert encoder(batch.media[m], masked=True)[1] is None
    loss, terms = task.train()(batch)
    assert {"masked/image", "masked/audio", "masked/video"} <= set(terms)
    loss.backward()
    assert all(p.grad is not None for p in task.objectives.masked_decoders.parameters())
    assert not set(task.eval()(batch)[1]) & {"masked/image", "masked/audio", "masked/video"}


def test_the_decoder_learns_to_reconstruct():
    """Masked modelling trains: on images whose dropped patches follow from the kept ones (a ramp
    of random direction per image, so every patch has the same normalised pixels), the masked loss
    falls far below where it starts (noise images would leave it at 1, the targets' variance)."""
    cfg = load_config(None, TINY + ["model.modalities=[image]", "model.image.token_dropout=0.5",
                                    "objectives.masked_weight=1.0", "objectives.next_token_weight=0",
                                    "objectives.contrastive_weight=0"])
    torch.manual_seed(0)
    task = build_task(cfg, 49408).train()
    batch, _ = synthetic_batch(cfg, n=8)
    s = cfg.model.image.image_size
    ramp = torch.linspace(-1, 1, s)
    slope = torch.randn(8, 2, 1, 1, 1)
    batch.media["image"] = (slope[:, 0] * ramp.view(1, 1, s, 1) + slope[:, 1] * ramp.view(1, 1, 1, s)).expand(-1, 3, -1, -1)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = task(batch)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5, losses


def test_it_needs_token_dropout_to_mask_with():
    with pytest.raises(ConfigError, match="objectives.masked_weight: 1.0 needs token dropout"):
        load_config(None, TINY + ["objectives.masked_weight=1.0"])
    with pytest.raises(ConfigError, match="masked_decoder_heads: 3 does not divide"):
        load_config(None, TINY + MASKED + ["objectives.masked_decoder_heads=3"])


def test_a_run_logs_the_masked_loss_draws_reconstructions_and_exports_no_decoder(tiny_cfg):
    cfg = tiny_cfg("train.steps=3", "train.log_every=1", "train.eval_every=2", "model.modalities=[image]",
                   "model.image.token_dropout=0.75", "objectives.masked_weight=1.0", "run.name=masked")
    train.run(cfg)
    assert all("masked/image" in m for m in read_metrics(cfg.run_dir))
    figures = sorted(p.name for p in (cfg.run_dir / "eval" / "reconstructions").iterdir())
    assert figures == ["step000002.png", "step000003.png"]
    assert not any("masked" in k for k in load_file(cfg.run_dir / "export" / "model.safetensors"))
