"""Ring attention (parallel.cp) and Ulysses x ring (USP) over packed rows of awkward document
lengths, 2 and 4 gloo processes: the single-process decoder's output and every gradient."""

import pytest
import torch

from mmpretrain import parallel
from mmpretrain.config import DecoderConfig
from mmpretrain.decoder import Decoder
from mmpretrain.packing import Packing
from mmpretrain.parallel.ring import zigzag
from mmpretrain.parallel.sequence import apply_ulysses
import test_distributed
from test_distributed import _join, _run_workers, _send, _sp_worker

# one token, a document longer than any rank's slice (300 of 367 tokens; 4 ranks hold ~92 each),
# lengths that divide nothing: the row is padded inside
LENGTHS = [1, 7, 300, 13, 5, 41]


def _decoder_setup(kv_heads=0):
    torch.manual_seed(0)
    cfg = DecoderConfig(width=32, layers=2, heads=4, kv_heads=kv_heads)
    decoder = Decoder(cfg, vocab_size=10, backend="sdpa")
    x = torch.randn(sum(LENGTHS), 32)
    weight = torch.randn(sum(LENGTHS), 32)  # a loss that weighs every output differently
    return decoder, x, weight


def _forward_backward(decoder, x, weight):
    x = x.clone().requires_grad_()
    out = decoder(x, Packing.from_lengths(LENGTHS))
    (out * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in decoder.named_parameters() if p.grad is not None}


def _decoder_worker(rank, world, port, sp, cp, kv_heads, chunk, queue):
    from mmpretrain.parallel import ring

    ring.QUERY_CHUNK = chunk
    env = _join(rank, world, port, sp=sp, cp=cp)
    decoder, x, weight = _decoder_setup(kv_heads)
    apply_ulysses(decoder, env.group("sp"), ring_group=env.ring_group, ulysses_group=env.ulysses_group)
    _send(queue, rank, *_forward_backward(decoder, x, weight))
    parallel.cleanup()


@pytest.mark.parametrize("world,sp,cp,kv_heads,chunk", [(2, 1, 2, 0, 1024), (4, 1, 4, 2, 1024), (4, 2, 2, 0, 1024),
                                                        (2, 1, 2, 0, 24)],
                         ids=["ring2", "ring4-gqa", "ulysses2xring2", "ring2-query-chunks"])
def test_ring_attention_equals_one_process_on_awkward_documents(world, sp, cp, kv_heads, chunk):
    ref_out, ref_dx, ref_grads = _forward_backward(*_decoder_setup(kv_heads))
    for rank, out, dx, grads in _run_workers(_decoder_worker, sp, cp, kv_heads, chunk, world=world):
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=f"rank {rank}: output")
        torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: input gradient")
        for name, g in grads.items():  # each rank's share; summed over the group by the hooks
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")


def test_zigzag_gives_every_ring_rank_an_early_and_a_late_chunk():
    order = zigzag(16, 2)
    assert order.view(2, -1).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]
    assert sorted(order.tolist()) == list(range(16))


def test_the_whole_task_under_ring_attention_matches_one_process(monkeypatch):
    """Model, objectives and both losses at cp=2 (no Ulysses): as test_ulysses_matches_single_process."""
    monkeypatch.setattr(test_distributed, "_run_workers",
                        lambda target, *args, world=2: _run_workers(_ring_task_worker, *args, world=world))
    test_distributed.test_ulysses_matches_single_process("full", "infonce")


def _ring_task_worker(rank, world, port, ckpt, contrastive, queue):
    _sp_worker(rank, world, port, ckpt, contrastive, queue, sp=1, cp=2)


def test_torchrun_long_context_with_ring_attention_then_resumed_under_ulysses(demo_cache, tmp_path):
    """configs/long_context.yaml at parallel.cp=2 (token-budget rows, checkpointed blocks), its
    checkpoint resumed at sp=2: the ring changes no state, so the layouts share checkpoints."""
    from conftest import small_eval_shard
    from test_distributed import _torchrun

    run = tmp_path / "runs" / "ring"
    common = ["train.warmup_steps=1", "train.log_every=1", "data.max_tokens=512", "model.decoder.layers=2",
              "train.checkpoint_every=2"]
    _, metrics = _torchrun(2, "long_context.yaml", demo_cache, run, "train.steps=2", "parallel.sp=1",
                           "parallel.cp=2", *common)
    assert [m["step"] for m in metrics] == [1, 2] and all(m["tokens"] <= 512 for m in metrics)
    stderr, metrics = _torchrun(2, "long_context.yaml", demo_cache, run, "train.steps=3", *common,
                                f"data.eval_sources=[{small_eval_shard(tmp_path)}]")  # the demo's: under cp above
    assert "resumed from" in stderr and [m["step"] for m in metrics] == [1, 2, 3]
