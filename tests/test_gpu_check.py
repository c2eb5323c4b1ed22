"""benchmarks/gpu_check.py must be ready to run when a GPU machine comes: it runs on CPU (saying
there is no CUDA), writes its JSON, and reads the figures out of its parts' outputs."""

import json
import sys

import torch

from conftest import ROOT, benchmark, run

gpu_check = benchmark("gpu_check")


def test_runs_on_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "check.json"
    proc = run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--parts", "cuda-tests,attention",
                "--out", str(out)], timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["torch"] == torch.__version__ and set(report["parts"]) == {"cuda-tests", "attention"}
    if not torch.cuda.is_available():
        assert "no CUDA device here" in proc.stdout
        assert report["parts"]["attention"]["status"] == "skipped (no CUDA)"
        assert report["parts"]["cuda-tests"]["status"] == "pass"
        assert report["parts"]["cuda-tests"]["figures"]["skipped"] > 0
    assert proc.stdout.rstrip().splitlines()[-1].startswith("wrote")


def test_reads_figures_from_the_benchmarks_output():
    attention = """NVIDIA H100 80GB HBM3 torch 2.11.0+cu130: 32 docs x 2048 tokens, 16 heads x 128
peer  sdpa is_causal (batched docs):     4.10 ms   380.2 TFLOP/s
xformers: xformers unavailable (NotImplementedError: not built)
packed sdpa     :    13.70 ms   113.8 TFLOP/s  ratio vs peer  0.30  max|diff vs sdpa| 0
packed varlen   :     6.40 ms   243.6 TFLOP/s  ratio vs peer  0.64  max|diff vs sdpa| 0.0078
"""
    figs = gpu_check.attention_figures(attention, None)
    assert figs["varlen"] == {"ms": 6.4, "tflops": 243.6, "vs_sdpa_is_causal": 0.64}
    assert figs["sdpa"]["vs_sdpa_is_causal"] == 0.3 and figs["peer_sdpa_is_causal"]["tflops"] == 380.2
    long = """  8192 tokens, checkpointing none: 45,000 tokens/s, MFU 51.1%, peak memory 30.2 GiB
  8192 tokens, checkpointing full: 33,000 tokens/s, MFU 37.4%, peak memory 12.0 GiB
longest single sequence trained (fwd+bwd, checkpointed): 131,072 tokens"""
    assert gpu_check.long_context_figures(long, None) == {"mfu_ckpt_none": "51.1%", "mfu_ckpt_full": "37.4%",
                                                          "longest_tokens": 131072}
    assert gpu_check.pytest_counts("...\n== 3 passed, 2 skipped in 1.0s ==") == {"passed": 3, "skipped": 2}
    step = """(a) full step: 1512M parameters, batch 32 (image + audio + caption), packed rows of 1700-1800 tokens
       210.5 samples/s      11500 tokens/s  31.2 TFLOP/step  MFU  41.0%  graphs 5, recompiles over 20 steps 0
(b) contrastive step, ViT-B-16 shapes, batch 256: ours 5.10 steps/s, open_clip CLIP 4.20 steps/s, ratio 1.21x"""
    assert gpu_check.multimodal_figures(step, None) == {"samples_per_s": 210.5, "tokens_per_s": 11500.0,
                                                        "mfu": "41.0%", "recompiles": 0, "vs_open_clip": 1.21}
