import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mmpretrain import packing
from mmpretrain.config import ConfigError, load_config
from mmpretrain.decoder import Decoder
from mmpretrain.encoders import ImageEncoder
from mmpretrain.build import build_task
from mmpretrain.model import MultimodalModel
from mmpretrain.packing import Packing, RowLayout

from conftest import CONFIGS, ROOT, TINY, synthetic_batch

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("partial", [False, True], ids=["paired", "partly-paired"])
def test_forward_backward_every_config(path, partial):
    cfg = load_config(path, TINY)
    batch, tok = synthetic_batch(cfg, partial=partial)
    task = build_task(cfg, tok.vocab_size)
    model = task.model
    out = model(batch, task.layout)
    for e in out.embeddings.values():
        assert e.shape == (len(batch), cfg.model.fusion.embed_dim)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(batch)))
    loss, terms = task.objectives(out)
    assert torch.isfinite(loss) and "next_token" in terms
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("towers", "decoder.blocks")):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_pack_targets_stay_inside_each_sequence():
    e = lambda n: torch.zeros(n, 4)  # noqa: E731
    seqs = [[(e(2), None), (e(3), torch.tensor([-1, 5, 6]))],  # media, then sot + 2 caption tokens
            [(e(2), None)],                                      # caption only: no targets
            [(e(1), torch.tensor([-1])), (e(2), None), (e(2), torch.tensor([7, 8]))]]  # a document
    x, row, idx, targets = packing.pack(seqs)
    assert row.lengths.tolist() == [5, 2, 5] and len(x) == 12
    assert idx.tolist() == [2, 3, 9, 10] and targets.tolist() == [5, 6, 7, 8]


def test_forward_targets_are_captions_after_media_and_document_text():
    cfg = load_config(CONFIGS[0], TINY + ["objectives.next_token_max_samples=2"])
    batch, tok = synthetic_batch(cfg, n=3)
    image = torch.randn(3, cfg.model.image.image_size, cfg.model.image.image_size)
    first, last = tok.document_ids(["look:", "that was red."])
    batch.documents = [[("text", first), ("image", image), ("text", last)]]
    model = MultimodalModel(cfg.model, tok.vocab_size)
    out = model(batch, RowLayout.from_config(cfg))
    captions = [batch.tokens[i, 1 : batch.lengths[i]] for i in range(2)]  # first 2 pairs only
    doc = [batch.documents[0][0][1][1:], batch.documents[0][2][1]]  # all but the leading sot
    assert torch.equal(out.lm_targets, torch.cat(captions + doc))
    k, lengths = cfg.model.fusion.num_latents, batch.lengths.tolist()
    caption_only = sum(lengths)
    media_caption = sum(2 * k + n for n in lengths[:2])  # image and audio tokens, then the caption
    document = sum(len(v) for kind, v in batch.documents[0] if kind == "text") + k
    assert out.packed_tokens == caption_only + media_caption + document


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
                            embed_dim=32, depth=2, num_heads=2, pre_norm=cfg.pre_norm)
    ref.load_state_dict(ours.vit.state_dict())
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    torch.testing.assert_close(ours(x), ref.forward_features(x))
    assert ours(x).shape == (2, 1 + (cfg.image_size // cfg.patch_size) ** 2, 32)


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(ConfigError, match="patch_size: 4 does not divide model.image.image_size=30"):
        load_config(None, ["model.image.image_size=30"])
    with pytest.raises(ConfigError, match="does not split model.decoder.width=30 into heads"):
        load_config(None, ["model.decoder.width=30"])


def test_packed_samples_never_see_each_other():
    """Perturb one sample of a packed batch: every other sample's embeddings and logits are
    bit-identical (no attention across packed sequences, positions restart per sample)."""
    cfg = load_config(CONFIGS[0], TINY)
    batch, tok = synthetic_batch(cfg, n=4)
    model = MultimodalModel(cfg.model, tok.vocab_size).eval()
    layout = RowLayout.from_config(cfg)
    with torch.no_grad():
        base = model(batch, layout)
        batch.tokens[2, 1:4] = torch.tensor([320, 1746, 2368])  # another caption for sample 2
        batch.media["image"][2] += 1.0
        out = model(batch, layout)
    others = torch.tensor([0, 1, 3])
    for m in ("text", "image", "audio"):
        assert torch.equal(out.embeddings[m][others], base.embeddings[m][others])
        assert not torch.equal(out.embeddings[m][2], base.embeddings[m][2]) or m == "audio"
    lengths = batch.lengths.tolist()
    spans = torch.split(torch.arange(len(base.lm_targets)), [n - 1 for n in lengths])
    for i in (0, 1, 3):
        assert torch.equal(out.lm_hidden[spans[i]], base.lm_hidden[spans[i]])


def test_activation_checkpointing_modes_and_tiled_mlp_give_the_same_gradients():
    import copy

    from mmpretrain.parallel.activation_checkpointing import apply_activation_checkpointing

    cfg = load_config(None, ["model.decoder.width=32", "model.decoder.heads=4", "model.decoder.layers=2"])
    base = Decoder(cfg.model.decoder, vocab_size=50).double()
    x = torch.randn(20, 32, dtype=torch.float64)
    packing = Packing.from_lengths([7, 1, 12])
    results = {}
    modes = [("none", 0), ("full", 0), ("selective", 0), ("offload", 0), ("none", 6), ("offload", 6)]
    for mode in modes:  # (checkpointing, MLP tile): offload and tiles of 6 of the 20 tokens
        dec = apply_activation_checkpointing(copy.deepcopy(base), *mode)
        xi = x.clone().requires_grad_()
        out = dec(xi, packing)
        out.square().sum().backward()
        results[mode] = (out.detach(), xi.grad, [p.grad for p in dec.parameters()])
        assert dec.state_dict().keys() == base.state_dict().keys()  # checkpoints load across modes
    results["none"] = results[("none", 0)]
    for mode in modes[1:]:
        torch.testing.assert_close(results[mode][0], results["none"][0])
        torch.testing.assert_close(results[mode][1], results["none"][1])
        for a, b in zip(results[mode][2], results["none"][2]):
            torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.xdist_group("inductor")  # one worker: the FSDP compile test after it loads its kernels
def test_compiled_blocks_equal_eager_without_graph_breaks(inductor_cache, monkeypatch):
    """train.compile: every block compiled (dynamic shapes) gives the eager losses and gradients
    over batches whose packed rows differ in length, with no graph break inside a block."""
    import copy

    import torch._dynamo

    from mmpretrain.parallel.compile import apply_compile

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    # the model test_torchrun_fsdp_with_compiled_blocks_matches_eager compiles: the kernels are shared
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.modalities=[image]", "objectives.next_token_max_samples=2"])
    torch.manual_seed(0)
    batches = [synthetic_batch(cfg, n=n)[0] for n in (4, 6, 5)]
    tok_vocab = synthetic_batch(cfg, n=1)[1].vocab_size
    eager = build_task(cfg, tok_vocab)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled.model, "cpu")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for batch in batches:
        results = []
        for task in (eager, compiled):
            task.zero_grad()
            loss, _ = task(batch)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in task.parameters() if p.grad is not None]))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_learned_caption_positions_enter_every_caption():
    """model.text.position_embedding=learned adds caption_pos[j] to the j-th caption token, in
    the caption-only and the media+caption sequences; none builds no such parameter and, with the
    same other weights, equals learned with caption_pos at zero."""
    cfg = load_config(None, [*TINY, "model.text.position_embedding=learned"])
    none_cfg = load_config(None, [*TINY, "model.text.position_embedding=none"])
    batch, tok = synthetic_batch(cfg)
    torch.manual_seed(0)
    model = MultimodalModel(cfg.model, tok.vocab_size)
    plain = MultimodalModel(none_cfg.model, tok.vocab_size)
    assert plain.decoder.caption_pos is None
    assert model.decoder.caption_pos.shape == (cfg.model.text.context_length, cfg.model.decoder.width)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "decoder.caption_pos"})
    layout = RowLayout.from_config(cfg)
    with torch.no_grad():
        differs = model(batch, layout).embeddings["text"]
        model.decoder.caption_pos.zero_()
        same, ref = model(batch, layout), plain(batch, layout)
    torch.testing.assert_close(same.embeddings["text"], ref.embeddings["text"])
    torch.testing.assert_close(same.lm_hidden, ref.lm_hidden)
    assert (differs - ref.embeddings["text"]).abs().max() > 1e-3
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(model.decoder.embed_caption(ids), model.decoder.embed(ids))


@pytest.mark.parametrize("pool", ["latents", "cls", "attention"])
def test_embedding_pools_train_and_pool_what_they_name(pool):
    cfg = load_config(None, [*TINY, f"model.fusion.embed_pool={pool}"])
    batch, tok = synthetic_batch(cfg)
    task = build_task(cfg, tok.vocab_size)
    model = task.model
    tower = model.towers["image"]
    tokens = tower.encoder(batch.media["image"])
    fusion = tower.fusion
    pooled = {"latents": lambda: fusion.pool(tokens).mean(dim=1), "cls": lambda: tokens[:, 0],
              "attention": lambda: fusion.embed_attention(tokens)}[pool]()
    expected = torch.nn.functional.normalize(fusion.to_embedding(fusion.embed_norm(pooled)), dim=-1)
    torch.testing.assert_close(model.encode_media("image", batch.media["image"])[1], expected)
    loss, _ = task(batch)
    loss.backward()
    assert fusion.to_embedding.weight.grad is not None
    if pool == "attention":  # its own pool learns from the contrastive loss
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.embed_attention.parameters())


@pytest.mark.parametrize("init", ["clip", "timm"])
def test_image_tower_takes_open_clips_or_timms_initialisation(init):
    """clip: as open_clip's VisionTransformer draws its weights (Xavier attention input, PyTorch's
    default linear layers, class token and position embedding with std width^-0.5); timm: 0.02."""
    cfg = load_config(None, [f"model.image.init={init}", "model.image.width=96", "model.image.heads=4"])
    torch.manual_seed(0)
    vit = ImageEncoder(cfg.model.image).vit
    w = cfg.model.image.width
    expected = {"clip": {"qkv": (6 / (w + 3 * w)) ** 0.5 / 3 ** 0.5, "fc2": 1 / (3 * 4 * w) ** 0.5, "pos": w ** -0.5},
                "timm": {"qkv": 0.02, "fc2": 0.02, "pos": 0.02}}[init]
    got = {"qkv": vit.blocks[0].attn.qkv.weight, "fc2": vit.blocks[0].mlp.fc2.weight, "pos": vit.pos_embed}
    for name, p in got.items():
        assert abs(float(p.std()) / expected[name] - 1) < 0.1, (name, float(p.std()))
    assert isinstance(vit.norm_pre, torch.nn.LayerNorm) and vit.patch_embed.proj.bias is None  # pre_norm


def test_a_decoder_state_with_the_earlier_fused_projections_loads():
    """Exports written before q/k/v and gate/up were separate (one fused linear each) load into
    the separate projections, rows split in the fused order: the same outputs."""
    from mmpretrain.config import DecoderConfig
    from mmpretrain.decoder import Decoder
    from mmpretrain.packing import Packing

    cfg = DecoderConfig(width=32, layers=2, heads=4, kv_heads=2, qkv_bias=True)
    torch.manual_seed(0)
    new = Decoder(cfg, vocab_size=20, backend="sdpa")
    old = dict(new.state_dict())
    for i in range(cfg.layers):
        p = f"blocks.{i}."
        for suffix in ("weight", "bias"):
            old[f"{p}qkv.{suffix}"] = torch.cat([old.pop(f"{p}{x}.{suffix}") for x in "qkv"])
        old[f"{p}mlp.gate_up.weight"] = torch.cat([old.pop(f"{p}mlp.gate.weight"), old.pop(f"{p}mlp.up.weight")])
    loaded = Decoder(cfg, vocab_size=20, backend="sdpa")
    loaded.load_state_dict(old)  # strict: every key placed
    x, packing = torch.randn(9, 32), Packing.from_lengths([4, 5])
    torch.testing.assert_close(loaded(x, packing), new(x, packing))
