"""SigLIP: the loss and every gradient against a dense float64 reference over the global batch, on
1, 2 and 4 gloo ranks, ring and gather exchanges, chunked and not; open_clip's SigLipLoss on one."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmpretrain import train
from mmpretrain.objectives import Objectives, contrastive_losses, siglip_loss
from mmpretrain.config import ObjectivesConfig
from mmpretrain.model import ModelOutput

from test_distributed import _join, _run_workers, _send
from test_train import read_metrics


def _dense(a, b, scale, bias):
    """The sigmoid loss as its paper writes it, over the whole batch at once."""
    logits = scale * a @ b.t() + bias
    z = 2 * torch.eye(len(a), dtype=a.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / len(a)


def _features(n: int, e: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a, b = (F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    return a, b, torch.tensor([math.log(10.0)], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)


def _reference(a, b, log_scale, bias):
    leaves = [t.clone().requires_grad_() for t in (a, b, log_scale, bias)]
    loss = _dense(leaves[0], leaves[1], leaves[2].exp(), leaves[3])
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("chunk", [0, 3])
def test_one_process_equals_the_dense_loss_and_open_clips(chunk):
    from open_clip.loss import SigLipLoss

    a, b, log_scale, bias = _features(10)
    ref, ref_grads = _reference(a, b, log_scale, bias)
    leaves = [t.clone().requires_grad_() for t in (a, b, log_scale, bias)]
    loss = siglip_loss(leaves[0], leaves[1], leaves[2].exp(), leaves[3], chunk=chunk)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(leaves, ref_grads):
        torch.testing.assert_close(got.grad, want, rtol=1e-5, atol=1e-7)
    theirs = SigLipLoss()(a, b, log_scale.exp(), bias)  # image, text, scale, bias
    torch.testing.assert_close(loss.double(), theirs, rtol=1e-6, atol=1e-6)


def _siglip_worker(rank, world, port, feats, split, mode, chunk, queue):
    env = _join(rank, world, port)
    a, b, log_scale, bias = feats
    rows = split[rank]
    leaves = [a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_(),
              log_scale.clone().requires_grad_(), bias.clone().requires_grad_()]
    loss = siglip_loss(leaves[0], leaves[1], leaves[2].exp(), leaves[3], env.group("dp"), mode, chunk)
    loss.backward()
    _send(queue, rank, loss.detach(), [t.grad for t in leaves])


@pytest.mark.parametrize("world,mode,chunk", [(2, "ring", 0), (2, "gather", 2), (4, "ring", 2), (4, "gather", 0),
                                              (3, "ring", 0)])
def test_ranks_give_the_dense_loss_and_every_gradient(world, mode, chunk):
    """Each rank's rows against all ranks' (uneven counts, one rank with a single row): the ranks'
    mean loss is the dense loss, and the data-parallel average of each rank's gradients (what DDP
    and FSDP2 compute) is the dense gradient; each rank's own rows get W x theirs (W ranks)."""
    feats = _features(13)
    cuts = {2: [0, 5, 13], 3: [0, 1, 7, 13], 4: [0, 1, 5, 10, 13]}[world]
    split = [list(range(cuts[r], cuts[r + 1])) for r in range(world)]
    ref, (ga, gb, gs, gbias) = _reference(*feats)
    results = _run_workers(_siglip_worker, feats, split, mode, chunk, world=world)
    losses = torch.stack([loss for _, loss, _ in results]).double()
    torch.testing.assert_close(losses.mean(), ref, rtol=1e-5, atol=1e-6)
    for r, (_, _, (da, db, ds, dbias)) in enumerate(results):
        torch.testing.assert_close(da.double() / world, ga[split[r]], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(db.double() / world, gb[split[r]], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.stack([g[2] for _, _, g in results]).double().mean(0), gs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.stack([g[3] for _, _, g in results]).double().mean(0), gbias,
                               rtol=1e-5, atol=1e-7)


def test_objectives_siglip_takes_the_pairs_with_both_sides_and_the_papers_initialisation():
    cfg = ObjectivesConfig(contrastive="siglip", media_pairs=False, next_token_weight=0.0)
    objectives = Objectives(["image", "audio"], cfg)
    assert torch.allclose(objectives.logit_scale["text-image"].exp(), torch.tensor([10.0]))
    assert objectives.logit_bias["text-audio"].item() == -10.0
    a, b, _, _ = _features(6)
    present = torch.tensor([True, True, False, True, True, True])
    out = ModelOutput(embeddings={"text": a.float(), "image": b.float(), "audio": b.float()},
                      present={"text": torch.ones(6, dtype=torch.bool), "image": present,
                               "audio": torch.zeros(6, dtype=torch.bool)},
                      lm_hidden=torch.zeros(0, 4), lm_head=torch.zeros(3, 4), lm_targets=torch.zeros(0, dtype=torch.long))
    terms = contrastive_losses(out, objectives.logit_scale, None, objectives.logit_bias)
    assert set(terms) == {"contrastive/text-image"}  # no sample has audio
    want = _dense(a[present], b[present], torch.tensor(10.0, dtype=torch.float64), -10.0)
    torch.testing.assert_close(terms["contrastive/text-image"].double(), want, rtol=1e-5, atol=1e-5)


def test_a_siglip_run_logs_each_pairs_bias_beside_its_temperature(tiny_cfg):
    """`objectives.contrastive=siglip` through the trainer: each logged record carries the learned
    bias of every pair (what a user reads to see SigLIP calibrate), moving from the paper's -10."""
    cfg = tiny_cfg("train.steps=2", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0",
                   "objectives.contrastive=siglip", "run.name=siglip")
    train.run(cfg)
    metrics = read_metrics(cfg.run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["bias"].keys() == m["temperature"].keys() == {"text-image", "text-audio", "image-audio"}
    assert all(b != -10.0 and abs(b + 10) < 0.1 for b in metrics[-1]["bias"].values())
