"""Packed causal attention on a GPU: parity of every kernel with SDPA, and speed.

    python benchmarks/attention_gpu.py [--tokens 65536] [--doc-len 2048] [--heads 16] [--head-dim 128]

For one row of `tokens` packed documents of `doc-len` tokens (bf16, forward +
backward) it prints, per kernel our attention module offers (SDPA's padded path, torch varlen_attn,
xformers where its kernels load, FlexAttention's document mask), the time and TFLOP/s of useful (causal,
within-document) work, and the ratio against the peer: plain SDPA `is_causal`
over the same documents laid out as a (docs, doc-len) batch, which packing
cannot beat. On CPU it says so and exits 0 (nothing to measure).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from mmpretrain.attention import flex_status, packed_causal_attention, varlen_status, xformers_status
from mmpretrain.packing import Packing


def bench(fn, iters=10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--doc-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU")
        return 0
    docs = a.tokens // a.doc_len
    lengths = [a.doc_len] * docs
    packing = Packing.from_lengths(lengths, device="cuda")
    q, k, v = (torch.randn(docs * a.doc_len, a.heads, a.head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    flops = 4 * docs * a.doc_len * a.doc_len / 2 * a.heads * a.head_dim * 3.5  # causal fwd (2 GEMMs) + bwd
    bq, bk, bv = (t.detach().view(docs, a.doc_len, a.heads, a.head_dim).transpose(1, 2).requires_grad_()
                  for t in (q, k, v))
    peer = bench(lambda: F.scaled_dot_product_attention(bq, bk, bv, is_causal=True).sum().backward())
    ref = packed_causal_attention(q, k, v, packing, "sdpa")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}: {docs} docs x {a.doc_len} tokens, "
          f"{a.heads} heads x {a.head_dim}")
    print(f"peer  sdpa is_causal (batched docs): {peer * 1e3:8.2f} ms  {flops / peer / 1e12:6.1f} TFLOP/s")
    kernels = ["sdpa"]
    for name, (ok, why) in (("varlen", varlen_status("cuda")), ("xformers", xformers_status("cuda")),
                            ("flex", flex_status("cuda"))):
        if ok:
            kernels.append(name)
        else:
            print(f"{name}: {why}")
    for name in kernels:
        out = packed_causal_attention(q, k, v, packing, name)
        err = (out.float() - ref.float()).abs().max().item()
        t = bench(lambda name=name: packed_causal_attention(q, k, v, packing, name).sum().backward())
        print(f"packed {name:<9}: {t * 1e3:8.2f} ms  {flops / t / 1e12:6.1f} TFLOP/s  "
              f"ratio vs peer {peer / t:5.2f}  max|diff vs sdpa| {err:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
