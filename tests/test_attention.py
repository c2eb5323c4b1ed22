import pytest
import torch

from mmpretrain.attention import packed_causal_attention, resolve_backend, xformers_status
from mmpretrain.packing import Packing

from conftest import per_sequence_reference


@pytest.mark.parametrize("lengths", [[5], [3, 7, 1, 4], [1, 1, 1], [16, 2]])
def test_packed_sdpa_equals_per_sequence(lengths):
    t, h, d = sum(lengths), 3, 8
    q, k, v = (torch.randn(t, h, d, dtype=torch.float64) for _ in range(3))
    packing = Packing.from_lengths(lengths)
    out = packed_causal_attention(q, k, v, packing, backend="sdpa")
    torch.testing.assert_close(out, per_sequence_reference(q, k, v, lengths), rtol=1e-12, atol=1e-12)


def test_packing_layout():
    p = Packing.from_lengths([3, 1, 2])
    assert p.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert p.positions.tolist() == [0, 1, 2, 0, 0, 1]  # restart per sequence
    assert p.max_len == 3 and p.num_seqs == 3
    assert p.pad_index.tolist() == [0, 1, 2, 3, 6, 7]


def test_no_attention_across_sequences():
    """Perturbing one packed sequence leaves every other one bit-identical."""
    lengths = [4, 6, 3]
    q, k, v = (torch.randn(13, 2, 8) for _ in range(3))
    packing = Packing.from_lengths(lengths)
    base = packed_causal_attention(q, k, v, packing, backend="sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[4:10] += torch.randn(6, 2, 8)
    v2[4:10] += torch.randn(6, 2, 8)
    out = packed_causal_attention(q, k2, v2, packing, backend="sdpa")
    assert torch.equal(out[:4], base[:4]) and torch.equal(out[10:], base[10:])
    assert not torch.equal(out[4:10], base[4:10])


def test_gradients_match_reference():
    lengths = [3, 5]
    q, k, v = (torch.randn(8, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    packed = packed_causal_attention(q, k, v, Packing.from_lengths(lengths), backend="sdpa")
    g1 = torch.autograd.grad(packed.square().sum(), (q, k, v))
    g2 = torch.autograd.grad(per_sequence_reference(q, k, v, lengths).square().sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_xformers_mask_matches_our_layout():
    """xformers' block-diagonal causal mask (pure Python, materialised on CPU) is our layout."""
    attn_bias = pytest.importorskip("xformers.ops.fmha.attn_bias")
    lengths = [3, 1, 4]
    mask = attn_bias.BlockDiagonalCausalMask.from_seqlens(lengths).materialize((8, 8))
    p = Packing.from_lengths(lengths)
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    ours = (seq[:, None] == seq[None]) & (p.positions[:, None] >= p.positions[None])
    assert torch.equal(mask == 0, ours)


def test_auto_falls_back_to_sdpa_on_cpu():
    ok, why = xformers_status("cpu")
    assert not ok and "CPU" in why
    assert resolve_backend("auto", "cpu") == "sdpa"
    with pytest.raises(RuntimeError, match="'xformers' was requested but xformers has no CPU kernels"):
        resolve_backend("xformers", "cpu")
    with pytest.raises(RuntimeError, match="'varlen' was requested but varlen_attn is CUDA-only"):
        resolve_backend("varlen", "cpu")


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
@pytest.mark.parametrize("lengths", [[37], [5, 1, 30, 2]])
def test_every_cpu_path_matches_float64_reference(backend, lengths):
    """float32 kernels against the float64 per-sequence definition."""
    q, k, v = (torch.randn(sum(lengths), 4, 16, dtype=torch.float64) for _ in range(3))
    ref = per_sequence_reference(q, k, v, lengths)
    out = packed_causal_attention(q.float(), k.float(), v.float(), Packing.from_lengths(lengths), backend)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_kernel_gets_a_dtype_it_supports(bf16_only_varlen, caplog):
    """fp32 inputs (eval, downstream) reach a bf16-only kernel as bf16 and come back as fp32."""
    lengths = [5, 1, 9]
    q, k, v = (torch.randn(sum(lengths), 2, 8, dtype=torch.float64) for _ in range(3))
    ref = per_sequence_reference(q, k, v, lengths)
    with caplog.at_level("INFO", logger="mmpretrain.attention"):
        for _ in range(2):
            out = packed_causal_attention(q.float(), k.float(), v.float(), Packing.from_lengths(lengths), "varlen")
    assert out.dtype == torch.float32 and bf16_only_varlen == [torch.bfloat16] * 2
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    assert sum("cast to bfloat16" in r.message for r in caplog.records) == 1  # logged once
    bf16 = packed_causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), Packing.from_lengths(lengths),
                                   "varlen")
    assert bf16.dtype == torch.bfloat16  # what the kernel supports passes through uncast


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (xformers kernels); "
                    "benchmarks/attention_gpu.py runs the same check on a lent GPU")
def test_xformers_equals_sdpa_on_cuda():
    if not xformers_status("cuda")[0]:
        pytest.skip(xformers_status("cuda")[1])
    lengths = [100, 37, 250]
    q, k, v = (torch.randn(sum(lengths), 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    p = Packing.from_lengths(lengths, device="cuda")
    torch.testing.assert_close(packed_causal_attention(q, k, v, p, "xformers"),
                               packed_causal_attention(q, k, v, p, "sdpa"), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("lengths", [[37], [5, 1, 30, 2], [130, 7, 200]])
def test_flex_document_mask_forward_matches_float64_reference(lengths):
    """FlexAttention runs forward on CPU (its backward is CUDA-only: tests/test_cuda.py): the
    document mask against the per-sequence definition, one BlockMask shared by every call."""
    from mmpretrain.attention import KERNELS, block_mask

    q, k, v = (torch.randn(sum(lengths), 4, 16, dtype=torch.float64) for _ in range(3))
    ref = per_sequence_reference(q, k, v, lengths)
    packing = Packing.from_lengths(lengths)
    for _ in range(2):  # a second layer reuses the row's mask
        out = KERNELS["flex"](q.float(), k.float(), v.float(), packing)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert block_mask(packing) is packing.block_mask(lambda p: pytest.fail("built again")) is not None


def test_flex_is_refused_for_training_on_cpu():
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        resolve_backend("flex", "cpu")
