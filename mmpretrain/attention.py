"""The one place that picks the attention kernel.

Every caller hands over *packed* sequences: tokens of many sequences laid end
to end, shape (T, heads, head_dim), described by `packing.Packing` (cumulative
sequence lengths). Attention is causal inside each sequence and never crosses
sequences. Kernels:

- "xformers": `memory_efficient_attention` with a `BlockDiagonalCausalMask`,
  used where its CUDA kernels load (xformers 0.0.35 builds them for
  torch 2.10.0 only; elsewhere its ops report "not built").
- "varlen": PyTorch's `torch.nn.attention.varlen.varlen_attn` (flash, CUDA only,
  cumulative lengths; causal is `window_size=(-1, 0)`).
- "flex": FlexAttention with a document mask (`doc[q] == doc[kv] and q >= kv`) as a
  `BlockMask` built once per packed row and shared by every layer (`Packing.block_mask`),
  the kernel compiled once with dynamic shapes. Its blocks skip the masked-out tiles, so
  it does no work across documents. Forward and backward on CUDA; on CPU PyTorch runs
  only its forward (no backward), so training cannot ask for it there.
- "sdpa": PyTorch `scaled_dot_product_attention`. One sequence runs with
  `is_causal=True` (flash/cuDNN on GPU); several are scattered into a padded
  (N, L_max) batch with a causal+padding mask, so memory is O(N * L_max^2), not
  O(T^2) as a single block-diagonal mask over the whole row would be.

`auto` picks by measurement (benchmarks/RESULTS.md; `benchmarks/attention_gpu.py`
re-measures): one sequence per row goes to SDPA `is_causal` (cuDNN, the fastest
measured); packed rows go to xformers where its kernels load, else `varlen_attn` on
CUDA, else SDPA's padded path. The measured rule for FlexAttention (one H100, 64k
tokens, 16 heads x 128, fwd+bwd, against SDPA `is_causal` over the documents as a
batch; benchmarks/RESULTS.md): flex 0.73x / 0.85x / 0.93x vs varlen 0.64x / 0.77x /
0.95x at 2,048 / 512 / 128-token documents, so flex wins once documents average 256
tokens or more. `auto` does not apply that rule until `pytest -m cuda` has passed the
flex kernel on a GPU (see `AttentionConfig.backend`): until then flex runs only when
asked for. It logs once which kernel runs and why. Tests force each path with the
`backend` argument.

Dtypes: each kernel declares what it accepts (`KERNEL_DTYPES`; flash-based
`varlen_attn` takes only fp16/bf16). Inputs in another dtype (fp32 evaluation
or downstream `encode_*` without autocast) are cast to bf16 for the kernel and
the output cast back, here and nowhere else, logged once per (kernel, dtype).
Training under bf16 autocast never needs the cast.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpretrain.packing import Packing

log = logging.getLogger(__name__)
BACKENDS = ("auto", "xformers", "varlen", "flex", "sdpa")


def _sdpa_packed(q, k, v, packing: Packing) -> torch.Tensor:
    """q, k, v: (T, H, D) -> (T, H, D)."""
    if packing.num_seqs == 1:
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), is_causal=True)
        return out[0].transpose(0, 1)
    n, length = packing.num_seqs, packing.max_len
    _, h, d = q.shape

    def grid(t):  # (T, H, D) -> (N, H, L, D), zeros in the padding
        g = t.new_zeros(n * length, h, d).index_copy(0, packing.pad_index, t)
        return g.view(n, length, h, d).transpose(1, 2)

    valid = torch.arange(length, device=q.device)[None] < packing.lengths[:, None]  # (N, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    mask = causal[None] & valid[:, None, :]  # (N, Lq, Lk); padded query rows still see key 0
    out = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), attn_mask=mask[:, None])
    return out.transpose(1, 2).reshape(n * length, h, d)[packing.pad_index]


def _xformers_packed(q, k, v, packing: Packing) -> torch.Tensor:
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

    bias = BlockDiagonalCausalMask.from_seqlens(packing.lengths.tolist())
    return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


def _varlen_packed(q, k, v, packing: Packing) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu = packing.cu_seqlens.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, packing.max_len, packing.max_len, window_size=(-1, 0))


def _document_mask(doc: torch.Tensor):
    def causal_within_document(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
    return causal_within_document


def block_mask(packing: Packing):
    """The row's FlexAttention BlockMask, built on first use and kept by the Packing, which
    every layer of one forward shares."""
    return packing.block_mask(_build_block_mask)


def _build_block_mask(packing: Packing):
    from torch.nn.attention.flex_attention import create_block_mask

    t = int(packing.cu_seqlens[-1])
    doc = torch.repeat_interleave(torch.arange(packing.num_seqs, device=packing.cu_seqlens.device),
                                  packing.lengths)
    return create_block_mask(_document_mask(doc), None, None, t, t, device=packing.cu_seqlens.device)


@functools.cache
def _flex(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":  # inductor's CPU flex template fails to build with dynamic shapes
        return flex_attention  # (torch 2.14); eager flex materialises the scores: forward checks only
    return torch.compile(flex_attention, dynamic=True)  # the kernel; eager flex is a reference


def _flex_packed(q, k, v, packing: Packing) -> torch.Tensor:
    out = _flex(q.device.type)(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask(packing))
    return out[0].transpose(0, 1)


KERNELS = {"xformers": _xformers_packed, "varlen": _varlen_packed, "flex": _flex_packed, "sdpa": _sdpa_packed}
KERNEL_DTYPES = {"xformers": (torch.float16, torch.bfloat16, torch.float32),
                 "varlen": (torch.float16, torch.bfloat16),
                 "flex": (torch.float16, torch.bfloat16, torch.float32),
                 "sdpa": (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


@functools.cache
def _log_cast(kernel: str, dtype: torch.dtype) -> None:
    log.info("attention kernel %s takes %s, not %s: its inputs are cast to bfloat16 and its output "
             "back (bf16 precision inside attention)", kernel,
             "/".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES[kernel]),
             str(dtype).removeprefix("torch."))


@functools.cache
def varlen_status(device_type: str) -> tuple[bool, str]:
    if device_type != "cuda":
        return False, "varlen_attn is CUDA-only"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        return True, "torch varlen_attn available"
    except ImportError as e:
        return False, f"varlen_attn unavailable ({e})"


@functools.cache
def flex_status(device_type: str) -> tuple[bool, str]:
    if device_type != "cuda":
        return False, "FlexAttention has no backward pass on CPU"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        return True, "FlexAttention available"
    except ImportError as e:
        return False, f"FlexAttention unavailable ({e})"


@functools.cache
def xformers_status(device_type: str) -> tuple[bool, str]:
    """(usable, why): whether xformers' memory-efficient kernels run on this device."""
    if device_type != "cuda":
        return False, "xformers has no CPU kernels"
    try:
        import xformers.ops as xops

        x = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(x, x, x)
        return True, "xformers CUDA kernels loaded"
    except Exception as e:  # ImportError, or ops "not built" for this torch version
        return False, f"xformers unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]})"


@functools.cache
def resolve_backend(requested: str, device_type: str) -> str:
    """The kernel for packed rows on this device type (logged once per choice)."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r}: expected one of {BACKENDS}")
    status = {"xformers": xformers_status(device_type), "varlen": varlen_status(device_type),
              "flex": flex_status(device_type), "sdpa": (True, "PyTorch SDPA")}
    if requested != "auto":
        ok, why = status[requested]
        if not ok:
            raise RuntimeError(f"attention backend {requested!r} was requested but {why}")
        log.info("attention kernel: %s on %s (requested in the config)", requested, device_type)
        return requested
    chosen = next(k for k in ("xformers", "varlen", "sdpa") if status[k][0])
    skipped = "; ".join(status[k][1] for k in ("xformers", "varlen") if not status[k][0])
    log.info("attention kernel: %s on %s for packed rows, SDPA is_causal for single sequences%s",
             chosen, device_type, f" ({skipped})" if skipped else "")
    return chosen


def packed_causal_attention(q, k, v, packing: Packing, backend: str = "auto",
                            resolved: str | None = None) -> torch.Tensor:
    """Causal attention within each packed sequence. q, k, v: (T, H, D) -> (T, H, D).
    `resolved`: the kernel `resolve_backend` chose, when the caller resolved it already (a
    compiled region must not call it: it logs)."""
    kernel = resolved or resolve_backend(backend, q.device.type)
    if backend == "auto" and packing.num_seqs == 1:
        kernel = "sdpa"
    if q.dtype in KERNEL_DTYPES[kernel]:
        return KERNELS[kernel](q, k, v, packing)
    _log_cast(kernel, q.dtype)
    out = KERNELS[kernel](q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), packing)
    return out.to(q.dtype)


class PackedAttention(nn.Module):
    """The decoder's attention kernel as a module, so that parallelism (e.g. Ulysses
    sequence parallelism) can wrap it from outside without touching model code."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.resolved: str | None = None  # set by resolve() before compiling

    def resolve(self, device_type: str) -> None:
        """Choose the kernel now, outside any compiled region."""
        self.resolved = resolve_backend(self.backend, device_type)

    def forward(self, q, k, v, packing: Packing) -> torch.Tensor:
        return packed_causal_attention(q, k, v, packing, self.backend, self.resolved)
