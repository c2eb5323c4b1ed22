import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mmpretrain.attention import Packing
from mmpretrain.config import load_config
from mmpretrain.data.batch import collate
from mmpretrain.data.shards import SampleDecoder
from mmpretrain.decoder import Decoder
from mmpretrain.encoders import ImageEncoder, Tokenizer
from mmpretrain.model import MultimodalModel
from mmpretrain.objectives import total_loss

from conftest import CONFIGS

TINY = ["model.image.width=32", "model.image.depth=1", "model.image.heads=2",
        "model.audio.width=32", "model.audio.depth=1", "model.audio.heads=2",
        "model.fusion.heads=2", "model.fusion.embed_dim=16",
        "model.decoder.width=32", "model.decoder.layers=1", "model.decoder.heads=2"]


def synthetic_batch(cfg, n=6, partial=False):
    tok = Tokenizer(cfg.model.text)
    shapes = SampleDecoder(cfg, train=False).media_shapes()
    samples = []
    for i in range(n):
        s = {"__key__": str(i), "text": " ".join(["a red circle"] * (1 + i % 3))}
        for j, m in enumerate(cfg.model.modalities):
            if not partial or (i + j) % 3:
                s[m] = torch.randn(shapes[m])
        samples.append(s)
    return collate(samples, cfg.model.modalities, tok, shapes), tok


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("partial", [False, True], ids=["paired", "partly-paired"])
def test_forward_backward_every_config(path, partial):
    cfg = load_config(path, TINY)
    batch, tok = synthetic_batch(cfg, partial=partial)
    model = MultimodalModel(cfg.model, tok.vocab_size)
    out = model(batch, cfg.objectives.next_token_max_samples)
    for m, e in out.embeddings.items():
        assert e.shape == (len(batch), cfg.model.fusion.embed_dim)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(batch)))
    loss, terms = total_loss(out, model, cfg.objectives)
    assert torch.isfinite(loss) and "next_token" in terms
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("towers", "decoder.blocks")):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_next_token_targets_follow_media():
    cfg = load_config(CONFIGS[0], TINY)
    batch, tok = synthetic_batch(cfg, n=3)
    model = MultimodalModel(cfg.model, tok.vocab_size)
    prefix = [torch.zeros(2, cfg.model.decoder.width)] * 3
    x, packing, (idx, targets) = model._pack(batch.tokens, batch.lengths, prefix)
    lengths = batch.lengths.tolist()
    assert packing.lengths.tolist() == lengths + [2 + n for n in lengths]
    assert len(targets) == sum(n - 1 for n in lengths)
    # the first target of sample 0 is its first word, predicted from the sot position after its media
    first = packing.cu_seqlens[3].item() + 2
    assert idx[0].item() == first and targets[0].item() == batch.tokens[0, 1].item()
    assert torch.equal(x[first], model.decoder.embed.weight[tok.sot_id])


def test_decoder_packed_equals_separate():
    cfg = load_config(None, ["model.decoder.width=32", "model.decoder.heads=4", "model.decoder.layers=2"])
    dec = Decoder(cfg.model.decoder, vocab_size=50).double()
    seqs = [torch.randn(n, 32, dtype=torch.float64) for n in (5, 2, 9)]
    packed = dec(torch.cat(seqs), Packing.from_lengths([5, 2, 9]))
    alone = torch.cat([dec(s, Packing.from_lengths([len(s)])) for s in seqs])
    torch.testing.assert_close(packed, alone)


def test_image_encoder_is_timm_vit():
    cfg = load_config(None, ["model.image.width=32", "model.image.heads=2", "model.image.depth=2"]).model.image
    ours = ImageEncoder(cfg)
    ref = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, num_classes=0, global_pool="",
                            embed_dim=32, depth=2, num_heads=2)
    ref.load_state_dict(ours.vit.state_dict())
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    torch.testing.assert_close(ours(x), ref.forward_features(x))
    assert ours(x).shape == (2, 1 + (cfg.image_size // cfg.patch_size) ** 2, 32)


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of patch_size 4"):
        ImageEncoder(load_config(None, ["model.image.image_size=30"]).model.image)
    with pytest.raises(ValueError, match="width 30 must split into 4 heads"):
        Decoder(load_config(None, ["model.decoder.width=30"]).model.decoder, 10)
