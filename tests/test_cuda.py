"""CUDA: every packed kernel against the float64 definition, and the main job's paths in bf16.

Skipped without a CUDA device; `python benchmarks/gpu_check.py` runs them on a GPU machine.
Each CPU-testable behaviour here also has a CPU test (the dtype contract: a bf16-only stand-in
kernel in test_attention.py and test_train.py).
"""

import json
import sys

import pytest
import torch

import mmpretrain
from mmpretrain import train
from mmpretrain.attention import packed_causal_attention, resolve_backend
from mmpretrain.checkpoint import latest_checkpoint
from mmpretrain.packing import Packing

from conftest import ROOT, per_sequence_reference, run, run_until_crash

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "needs a CUDA device; benchmarks/gpu_check.py runs these on a GPU machine"))]

LENGTH_MIXES = [[1], [1, 1, 1], [7, 1, 129, 64], [512, 3, 1000, 1], [2048]]


@pytest.mark.parametrize("lengths", LENGTH_MIXES, ids=lambda l: "+".join(map(str, l)))
@pytest.mark.parametrize("kernel", ["sdpa", "varlen", "xformers", "flex", "auto"])
def test_packed_kernel_matches_float64_reference(kernel, lengths):
    """bf16 forward and backward of each kernel that loads on this card, against the float64
    per-sequence definition."""
    try:
        resolve_backend(kernel, "cuda")
    except RuntimeError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    t, h, d = sum(lengths), 4, 64
    q, k, v = (torch.randn(t, h, d, device="cuda", dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(t, h, d, device="cuda", dtype=torch.float64)
    ref = per_sequence_reference(q, k, v, lengths)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    qb, kb, vb = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    out = packed_causal_attention(qb, kb, vb, Packing.from_lengths(lengths, device="cuda"), kernel)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, (qb, kb, vb), grad_out.bfloat16())
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=5e-2, atol=5e-2, msg=f"d{name}")


def test_fp32_inputs_reach_every_kernel_in_a_dtype_it_takes():
    """Evaluation and downstream encode_* run without autocast: fp32 must work on every kernel."""
    lengths = [33, 1, 70]
    q, k, v = (torch.randn(sum(lengths), 4, 64, device="cuda") for _ in range(3))
    ref = per_sequence_reference(q.double(), k.double(), v.double(), lengths)
    for kernel in ("sdpa", "varlen", "xformers", "flex", "auto"):
        try:
            resolve_backend(kernel, "cuda")
        except RuntimeError:
            continue
        out = packed_causal_attention(q, k, v, Packing.from_lengths(lengths, device="cuda"), kernel)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2, msg=kernel)


def test_tiny_training_on_cuda_in_bf16_with_eval_checkpoint_export(demo_cache, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "mmpretrain.train", str(ROOT / "configs" / "tiny.yaml"),
           f"data.demo.cache_dir={demo_cache}", f"run.dir={runs}", "run.name=cuda", "train.device=cuda",
           "train.precision=bf16", "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2"]
    proc = run(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = runs / "cuda"
    assert "device cuda" in proc.stderr
    history = [json.loads(l) for l in (run_dir / "eval" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]
    assert latest_checkpoint(run_dir).name == "step_00000004"
    model = mmpretrain.load_pretrained(run_dir / "export", device="cuda")
    from PIL import Image
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    embeddings = [model.encode_text(["a red circle", "a blue ring"]), model.encode_image([img, img]),
                  model.encode_audio(torch.randn(2, 22050), sample_rate=22050)]
    for e in embeddings:
        assert e.is_cuda and torch.isfinite(e).all()
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(2, device="cuda"))
    tower = mmpretrain.load_encoder(run_dir / "export" / "image", device="cuda")
    with torch.no_grad():
        alone = tower(tower.preprocess([img]).cuda())[1]
    torch.testing.assert_close(alone[0], embeddings[1][0])


def test_resume_on_cuda_continues_the_same_losses(tiny_cfg):
    steps = ["train.device=cuda", "train.precision=bf16", "train.steps=4", "train.checkpoint_every=2"]
    full = tiny_cfg(*steps, "run.name=full")
    train.run(full)
    reference = [json.loads(l)["loss"] for l in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    cut = tiny_cfg(*steps, "run.name=cut")
    run_until_crash(cut, after_step=2)
    train.run(cut)  # resumes from the step-2 checkpoint
    resumed = [json.loads(l)["loss"] for l in (cut.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(resumed) == 4
    # same data, RNG state and kernels: equal up to CUDA's non-deterministic reductions
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference), rtol=1e-3, atol=1e-5)


def test_tiny_training_compiled_on_cuda(tiny_cfg):
    """parallel.compile=on through training, mid-run eval (fp32) and export on CUDA."""
    from mmpretrain import train

    cfg = tiny_cfg("train.device=cuda", "parallel.compile=on", "train.steps=3", "train.eval_every=2",
                   "run.name=compiled")
    results = train.run(cfg)
    assert results["text->image"]["n"] == 100


def fsdp_one_rank_losses(device: str, compiled: bool, port: int) -> dict[bool, list[float]]:
    """Three bf16 steps of the tiny task unsharded and under FSDP2 on a one-rank mesh (its
    collectives, mixed precision and units, with `compiled` blocks): {sharded: losses}. Each run
    ends with an evaluation-style encode under autocast."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mmpretrain.parallel import DistEnv
    from mmpretrain.parallel.compile import apply_compile
    from mmpretrain.parallel.fsdp import apply_fsdp

    from test_fsdp import _batches, _task

    cfg, _ = _task()
    batches = [b.to(device) for b in _batches(cfg, 3)]
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        env = DistEnv(mesh=init_device_mesh(device, (1, 1), mesh_dim_names=("dp", "sp")))
        losses = {}
        for sharded in (False, True):
            _, task = _task()  # the same initial weights each time
            task.to(device)
            model = task.model
            if compiled:
                apply_compile(model, device, cache=not sharded)
            step = apply_fsdp(task, env, device, bf16=True) if sharded else task
            optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
            losses[sharded] = []
            for batch in batches:
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss, _ = step(batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses[sharded].append(loss.item())
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
                image = batches[0].media["image"][batches[0].present["image"]]
                assert torch.isfinite(model.encode_media("image", image)[1]).all()
        return losses
    finally:
        dist.destroy_process_group()


def test_fsdp2_bf16_compiled_on_one_gpu_follows_the_unsharded_model():
    """FSDP2's CUDA path (NCCL, bf16 compute parameters with fp32 reduction, compiled blocks) on a
    one-rank mesh, as one GPU cannot hold two NCCL ranks: the losses follow the unsharded model's
    under bf16 autocast. (Two CPU ranks test FSDP2 in bf16 in test_fsdp.py.)"""
    from test_distributed import _free_port

    losses = fsdp_one_rank_losses("cuda", compiled=True, port=_free_port())
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-2, atol=0)
