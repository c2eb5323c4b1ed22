"""Tensor parallelism of the decoder (parallel.tp): the single-process output and every gradient
on 2 gloo processes, training through torchrun equal to one process, FSDP2 on a 2 x 2 mesh, and a
checkpoint written at tp=2 resumed at tp=1."""

import json
import sys

import pytest
import torch
from torch.distributed.tensor import DTensor

from conftest import ROOT, assert_same_run, run, small_eval_shard
from mmpretrain import parallel
from mmpretrain.config import DecoderConfig
from mmpretrain.decoder import Decoder
from mmpretrain.packing import Packing
from mmpretrain.parallel.tensor import apply_tensor_parallel
from test_distributed import _join, _run_workers, _send, _torchrun

LENGTHS = [1, 7, 30, 13]


def _setup(kv_heads):
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(width=32, layers=2, heads=4, kv_heads=kv_heads, qkv_bias=True), vocab_size=10,
                      backend="sdpa")
    x, weight = torch.randn(sum(LENGTHS), 32), torch.randn(sum(LENGTHS), 32)
    return decoder, x, weight


def _forward_backward(decoder, x, weight):
    x = x.clone().requires_grad_()
    out = decoder(x, Packing.from_lengths(LENGTHS))
    (out * weight).sum().backward()
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for n, p in decoder.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _tp_worker(rank, world, port, kv_heads, queue):
    env = _join(rank, world, port)
    from torch.distributed.device_mesh import init_device_mesh

    decoder, x, weight = _setup(kv_heads)
    apply_tensor_parallel(decoder, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
    sharded = sorted(n for n, p in decoder.named_parameters() if isinstance(p, DTensor))
    _send(queue, rank, sharded, *_forward_backward(decoder, x, weight))
    parallel.cleanup()


@pytest.mark.parametrize("kv_heads", [0, 2], ids=["mha", "gqa"])
def test_tensor_parallel_decoder_equals_one_process(kv_heads):
    ref_out, ref_dx, ref_grads = _forward_backward(*_setup(kv_heads))
    for rank, sharded, out, dx, grads in _run_workers(_tp_worker, kv_heads):
        assert "blocks.0.q.weight" in sharded and "blocks.1.mlp.down.weight" in sharded
        assert "blocks.0.attn_norm.weight" not in sharded  # norms stay replicated
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=f"rank {rank}: output")
        torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: input gradient")
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")


TINY = ["train.log_every=1", "train.warmup_steps=1", "model.decoder.heads=4", "model.decoder.width=32"]


@pytest.mark.parametrize("layout", [[], ["parallel.sp=2"], ["parallel.cp=2"]], ids=["tp2", "tp2xulysses2", "tp2xring2"])
def test_torchrun_tensor_parallel_trains_as_one_process(demo_cache, tmp_path, layout):
    """tp=2 on 2 processes (one data-parallel replica), and with Ulysses or ring attention on 4,
    against 1 process: the same losses."""
    # nothing here checks an evaluation: the reference's, and the 4-process layouts', is of a small
    # shard; tp2's run keeps the demo corpus's (retrieval, classification, probes) under tp
    small = [f"data.eval_sources=[{small_eval_shard(tmp_path)}]"]
    stderr, tp = _torchrun(2 * (1 + len(layout)), "tiny.yaml", demo_cache, tmp_path / "runs" / "tp", "train.steps=3",
                           "parallel.tp=2", *layout, *TINY, *(small if layout else []))
    assert "split over 2 process(es)" in stderr
    one = run([sys.executable, "-m", "mmpretrain.train", str(ROOT / "configs" / "tiny.yaml"),
               f"data.demo.cache_dir={demo_cache}", f"run.dir={tmp_path / 'runs'}", "run.name=one",
               "train.device=cpu", "train.steps=3", *TINY, *small], timeout=240, cpu_only=True)
    assert one.returncode == 0, one.stderr[-2000:]
    alone = [json.loads(l) for l in (tmp_path / "runs" / "one" / "metrics.jsonl").read_text().splitlines()]
    keep = lambda ms: [{k: m[k] for k in ("step", "loss", "next_token")} for m in ms]  # noqa: E731
    for got, want in zip(keep(tp), keep(alone)):
        assert got == pytest.approx(want, rel=1e-4), (got, want)


def test_torchrun_fsdp2_on_a_dp_by_tp_mesh_equals_fsdp2_alone_and_resumes_without_tp(demo_cache, tmp_path):
    """4 processes as dp 2 x tp 2 under FSDP2 (projections split over tp, everything sharded over
    dp) from the same weights (train.init_from) as FSDP2 on 2 processes: the same losses; its
    checkpoint at step 2 resumed by 2 processes at tp=1 (DCP reshards the split weights)."""
    runs = tmp_path / "runs"
    small = f"data.eval_sources=[{small_eval_shard(tmp_path)}]"  # the runs whose evaluation nothing checks
    start = run([sys.executable, "-m", "mmpretrain.train", str(ROOT / "configs" / "tiny.yaml"),
                 f"data.demo.cache_dir={demo_cache}", f"run.dir={runs}", "run.name=start", "train.device=cpu",
                 "train.steps=2", "train.eval_every=0", *TINY, small], timeout=240, cpu_only=True)
    assert start.returncode == 0, start.stderr[-2000:]
    common = ["parallel.dp_shard=fsdp", f"train.init_from={runs / 'start' / 'export'}", *TINY]
    _, alone = _torchrun(2, "tiny.yaml", demo_cache, runs / "alone", "train.steps=2", *common, small)
    stderr, metrics = _torchrun(4, "tiny.yaml", demo_cache, runs / "tp", "train.steps=2", "parallel.tp=2",
                                "train.checkpoint_every=2", *common, small)
    assert "FSDP2: " in stderr and "split over 2 process(es)" in stderr and [m["step"] for m in metrics] == [1, 2]
    keep = lambda ms: [{k: m[k] for k in ("step", "loss", "grad_norm")} for m in ms]  # noqa: E731
    for got, want in zip(keep(metrics), keep(alone)):
        assert got == pytest.approx(want, rel=1e-4), (got, want)
    stderr, metrics = _torchrun(2, "tiny.yaml", demo_cache, runs / "tp", "train.steps=3", *common)
    assert "written by 4 process(es)" in stderr and [m["step"] for m in metrics] == [1, 2, 3]
    assert json.loads((runs / "tp" / "eval" / "retrieval.json").read_text())["text->image"]["n"] == 100
