import math

import pytest
import torch
import torch.nn as nn
from open_clip.loss import ClipLoss

from mmpretrain.config import ObjectivesConfig
from mmpretrain.model import ModelOutput
from mmpretrain.objectives import Objectives, clip_loss, contrastive_losses


def unit(n, d=16):
    return nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("n,scale", [(2, 1.0), (8, 14.3), (33, 100.0)])
def test_clip_loss_equals_open_clip(n, scale):
    a, b = unit(n), unit(n)
    s = torch.tensor(scale, dtype=torch.float64)
    torch.testing.assert_close(clip_loss(a, b, s), ClipLoss()(a, b, s))


def _out(n, present):
    emb = {m: unit(n) for m in ("text", "image", "audio")}
    return ModelOutput(emb, present, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))


def test_partly_paired_batch_uses_only_samples_with_both_sides():
    n = 6
    present = {"text": torch.ones(n, dtype=torch.bool),
               "image": torch.tensor([1, 1, 1, 0, 0, 1], dtype=torch.bool),
               "audio": torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.bool)}
    out = _out(n, present)
    scales = nn.ParameterDict({p: nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))
                               for p in ("text-image", "text-audio", "image-audio")})
    losses = contrastive_losses(out, scales)
    assert set(losses) == {"contrastive/text-image", "contrastive/text-audio"}  # image-audio: 1 sample
    im = present["image"]
    torch.testing.assert_close(losses["contrastive/text-image"],
                               ClipLoss()(out.embeddings["text"][im], out.embeddings["image"][im],
                                          torch.tensor(10.0, dtype=torch.float64)))


@pytest.mark.parametrize("start,clamped", [(10.0, math.log(100.0)), (-1.0, 0.0), (2.0, 2.0)])
def test_logit_scale_is_clamped_as_a_parameter_like_open_clip(start, clamped):
    """After the optimizer step the parameter is clamped to [0, ln(max_logit_scale)]; the loss at
    the bound equals ClipLoss at that scale and its gradient is not zero there."""
    objectives = Objectives(["image"], ObjectivesConfig(max_logit_scale=100.0, next_token_weight=0)).double()
    with torch.no_grad():
        objectives.logit_scale["text-image"].fill_(start)
    objectives.clamp_()
    param = objectives.logit_scale["text-image"]
    assert param.item() == pytest.approx(clamped, abs=1e-12)
    out = _out(4, {m: torch.ones(4, dtype=torch.bool) for m in ("text", "image", "audio")})
    out.lm_hidden, out.lm_targets = torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    loss = objectives(out)[0]
    ref = ClipLoss()(out.embeddings["text"], out.embeddings["image"], torch.tensor(math.exp(clamped),
                                                                                   dtype=torch.float64))
    torch.testing.assert_close(loss, ref)
    (grad,) = torch.autograd.grad(loss, param)
    assert grad.abs() > 0


def test_total_loss_weights_terms():
    out = _out(4, {m: torch.ones(4, dtype=torch.bool) for m in ("text", "image", "audio")})
    out.lm_hidden, out.lm_head = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    out.lm_targets = torch.tensor([1, 2, 3, 4, 5])
    objectives = Objectives(["image"], ObjectivesConfig(contrastive_weight=2.0, next_token_weight=0.5)).double()
    assert list(objectives.logit_scale) == ["text-image"]
    loss, terms = objectives(out)
    expected = 2.0 * terms["contrastive/text-image"] + 0.5 * terms["next_token"]
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(terms["next_token"], nn.functional.cross_entropy(out.lm_logits, out.lm_targets))


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_cross_entropy_equals_the_plain_one(chunk):
    from mmpretrain.objectives import chunked_cross_entropy

    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    head = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    plain = nn.functional.cross_entropy(h @ head.t(), targets)
    ours = chunked_cross_entropy(h, head, targets, chunk)
    torch.testing.assert_close(ours, plain)
    for a, b in zip(torch.autograd.grad(ours, (h, head)), torch.autograd.grad(plain, (h, head))):
        torch.testing.assert_close(a, b)


def test_no_caption_rows_and_no_logits_without_the_next_token_objective():
    from mmpretrain.build import build_task
    from mmpretrain.config import load_config

    from conftest import TINY, synthetic_batch

    cfg = load_config(None, TINY + ["objectives.next_token_weight=0"])
    batch, tok = synthetic_batch(cfg, n=4)
    task = build_task(cfg, tok.vocab_size)
    layout = task.layout
    out = task.model(batch, layout)
    assert out.packed_tokens == int(batch.lengths.sum()) and len(out.lm_targets) == 0  # captions alone
    loss, terms = task.objectives(out)
    assert "next_token" not in terms and torch.isfinite(loss)
    assert [layout.pair_tokens(10, 2, i) for i in range(2)] == [10, 10]
