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
