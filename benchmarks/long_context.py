"""Long-context decoder: memory against sequence length, and GPU throughput.

CPU mode (default) — a fixed small decoder (width 128, 4 layers, 2 heads of 64),
one sequence of S tokens, forward + backward, each point in a fresh process:
peak resident memory above the set-up baseline, with and without activation
checkpointing, for S = 1k ... 32k, and bytes per token to show linear growth.
The peer is the same decoder with attention through SDPA and an explicit
(S, S) causal mask, the layout a naive block-diagonal packing uses: its
memory grows quadratically, so it runs up to 8k only.

    python benchmarks/long_context.py                 # CPU table
    python benchmarks/long_context.py --parallel      # CPU, gloo: per-rank memory under sp / cp
    python benchmarks/long_context.py --gpu           # on a GPU: ~1B decoder

Parallel mode (CPU, gloo) — the same decoder, one document of S tokens shared by the ranks of
one row: sp=1 (one process), Ulysses 2, ring attention 2 (parallel.cp=2) and Ulysses 2 x ring 2
(4 processes); each rank's peak resident memory above its baseline (the largest rank's), and the
step's seconds. With `--gpu --parallel` the same on torchrun's GPUs (one process per GPU, NCCL):
`torchrun --nproc_per_node 4 benchmarks/long_context.py --gpu --parallel`.

GPU mode — a ~1B decoder (width 2048, 20 layers, 16 heads of 128, bf16):
tokens/s and MFU at 8k tokens per checkpointing mode (none, full, selective,
offload; one sequence; MFU counts 6N + 12*L*d*S FLOPs per token against the
card's dense bf16 peak), and the longest single sequence that trains (forward +
backward; checkpointed blocks with their inputs offloaded to host memory and the
MLP in 8k-token tiles, as ALST) on the card.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mmpretrain.config import DecoderConfig
from mmpretrain.decoder import Decoder
from mmpretrain.packing import Packing
from mmpretrain.parallel.activation_checkpointing import apply_activation_checkpointing

CPU_MODEL = DecoderConfig(width=128, layers=4, heads=2)
GPU_MODEL = DecoderConfig(width=2048, layers=20, heads=16)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM


class MaskedSDPA(torch.nn.Module):
    """The peer: causal attention through an explicit (S, S) boolean mask."""

    def forward(self, q, k, v, packing):
        s = len(q)
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask)
        return out[0].transpose(0, 1)


def build(cfg: DecoderConfig, ckpt: str, peer: bool, device, dtype, tiled_mlp: int = 0) -> Decoder:
    torch.manual_seed(0)
    dec = Decoder(cfg, vocab_size=256).to(device=device, dtype=dtype)
    if peer:
        for block in dec.blocks:
            block.attention = MaskedSDPA()
    return apply_activation_checkpointing(dec, ckpt, tiled_mlp)


def fwd_bwd(dec: Decoder, x: torch.Tensor, packing: Packing) -> None:
    dec(x, packing).float().square().mean().backward()


def one_cpu_point(seq: int, ckpt: str, peer: bool) -> dict:
    """Runs in its own process: peak RSS of one forward+backward above the baseline. `ckpt` may
    end in "+tiled": the MLPs run over 1,024-token tiles (parallel.tiled_mlp)."""
    torch.set_num_threads(2)
    mode, tiled = ckpt.removesuffix("+tiled"), 1024 if ckpt.endswith("+tiled") else 0
    dec = build(CPU_MODEL, mode, peer, "cpu", torch.float32, tiled)
    fwd_bwd(dec, torch.randn(64, CPU_MODEL.width, requires_grad=True), Packing.from_lengths([64]))  # lazy inits
    dec.zero_grad(set_to_none=False)  # gradient buffers belong to the baseline, not to activations
    x = torch.randn(seq, CPU_MODEL.width, requires_grad=True)
    packing = Packing.from_lengths([seq])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    fwd_bwd(dec, x, packing)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seq": seq, "ckpt": ckpt, "peer": peer, "mib": (peak - base) / 2**20, "s": seconds}


def cpu_table(lengths: list[int], peer_max: int) -> None:
    print(f"CPU, torch {torch.__version__}: decoder width {CPU_MODEL.width}, {CPU_MODEL.layers} layers, "
          f"{CPU_MODEL.heads} heads; one sequence; forward+backward; peak RSS above baseline")
    print(f"{'tokens':>7} {'no ckpt MiB':>12} {'KiB/token':>10} {'ckpt MiB':>10} {'KiB/token':>10} "
          f"{'selective MiB':>14} {'full+tiled MiB':>15} {'peer MiB':>10} {'ours/peer':>10} "
          f"{'s none/full/sel/tiled':>22}")
    for seq in lengths:
        rows = {}
        for ckpt, peer in (("none", False), ("full", False), ("selective", False), ("full+tiled", False),
                           ("none", True)):
            if peer and seq > peer_max:
                continue
            out = subprocess.run([sys.executable, __file__, "--point", str(seq), ckpt, str(int(peer))],
                                 capture_output=True, text=True, check=True)
            rows[(ckpt, peer)] = json.loads(out.stdout.strip().splitlines()[-1])
        a, c, sel, til = (rows[(m, False)] for m in ("none", "full", "selective", "full+tiled"))
        p = rows.get(("none", True))
        peer_cols = f"{p['mib']:>10.1f} {a['mib'] / p['mib']:>10.2f}" if p else f"{'-':>10} {'-':>10}"
        times = f"{a['s']:.1f}/{c['s']:.1f}/{sel['s']:.1f}/{til['s']:.1f}"
        print(f"{seq:>7} {a['mib']:>12.1f} {a['mib'] * 1024 / seq:>10.1f} {c['mib']:>10.1f} "
              f"{c['mib'] * 1024 / seq:>10.1f} {sel['mib']:>14.1f} {til['mib']:>15.1f} {peer_cols} {times:>22}",
              flush=True)


PARALLEL = (("sp=1", 1, 1), ("ulysses 2", 2, 1), ("ring 2", 1, 2), ("ulysses 2 x ring 2", 2, 2))


def parallel_point(rank: int, world: int, port: int, seq: int, sp: int, cp: int, device: str, queue) -> None:
    """One rank of one row's group: peak memory above baseline and seconds of one forward+backward."""
    import os

    from mmpretrain import parallel
    from mmpretrain.config import ParallelConfig
    from mmpretrain.parallel.sequence import apply_ulysses

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = parallel.init_distributed(device, ParallelConfig(sp=sp, cp=cp))
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    cfg, dtype = (GPU_MODEL, torch.bfloat16) if device == "cuda" else (CPU_MODEL, torch.float32)
    dec = build(cfg, "full", False, dev, dtype)
    if world > 1:
        apply_ulysses(dec, env.group("sp"), ring_group=env.ring_group, ulysses_group=env.ulysses_group)
    warm = torch.randn(64 * world, cfg.width, device=dev, dtype=dtype, requires_grad=True)
    fwd_bwd(dec, warm, Packing.from_lengths([64 * world], device=dev))  # lazy inits
    dec.zero_grad(set_to_none=False)
    x = torch.randn(seq, cfg.width, device=dev, dtype=dtype, requires_grad=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    fwd_bwd(dec, x, Packing.from_lengths([seq], device=dev))
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((rank, (peak - base) / 2**20, time.perf_counter() - t))
    parallel.cleanup()


def parallel_table(lengths: list[int]) -> None:
    import socket

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    print(f"CPU (gloo), torch {torch.__version__}: decoder width {CPU_MODEL.width}, {CPU_MODEL.layers} layers, "
          f"{CPU_MODEL.heads} heads, blocks checkpointed; one document of S tokens over the row's ranks; "
          f"largest rank's peak RSS above its baseline (MiB), seconds of one forward+backward")
    print(f"{'tokens':>7}" + "".join(f"{name + ' MiB':>24}{'s':>7}" for name, _, _ in PARALLEL) +
          f"{'ring 2 / sp=1':>15}{'usp / sp=1':>12}")
    for seq in lengths:
        row = {}
        for name, sp, cp in PARALLEL:
            world = sp * cp
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            queue = ctx.Queue()
            procs = [ctx.Process(target=parallel_point, args=(r, world, port, seq, sp, cp, "cpu", queue))
                     for r in range(world)]
            for proc in procs:
                proc.start()
            results = [queue.get(timeout=1800) for _ in procs]
            for proc in procs:
                proc.join()
            row[name] = (max(r[1] for r in results), max(r[2] for r in results))
        one = row["sp=1"][0]
        print(f"{seq:>7}" + "".join(f"{row[n][0]:>24.0f}{row[n][1]:>7.1f}" for n, _, _ in PARALLEL) +
              f"{row['ring 2'][0] / one:>14.2f}x{row['ulysses 2 x ring 2'][0] / one:>11.2f}x", flush=True)


def gpu_parallel() -> None:
    """Under torchrun on GPUs: this rank's row of the sp / cp layouts that fit the world size."""
    import os

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").Queue()
    for name, sp, cp in PARALLEL:
        if sp * cp != world:
            continue
        for seq in (32_768, 65_536, 131_072):
            parallel_point(rank, world, int(os.environ["MASTER_PORT"]), seq, sp, cp, "cuda", queue)
            _, mib, seconds = queue.get()
            if rank == 0:
                print(f"{name}: {seq} tokens, rank 0 peak {mib / 1024:.1f} GiB above baseline, {seconds:.2f} s")


def gpu_report(seq: int, peak: float | None, max_seq: int) -> None:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = peak or next((v for k, v in PEAK_BF16.items() if k in name), None)
    cfg = GPU_MODEL
    dec = build(cfg, "none", False, dev, torch.bfloat16)
    n_params = sum(p.numel() for p in dec.parameters()) - dec.embed.weight.numel()
    print(f"{name}, torch {torch.__version__}: decoder {n_params / 1e9:.2f}B non-embedding params, "
          f"width {cfg.width}, {cfg.layers} layers, {cfg.heads} heads, bf16")
    for ckpt in ("none", "full", "selective", "offload"):
        dec = build(cfg, ckpt, False, dev, torch.bfloat16)
        x = torch.randn(seq, cfg.width, device=dev, dtype=torch.bfloat16, requires_grad=True)
        packing = Packing.from_lengths([seq], device=dev)
        for _ in range(2):
            fwd_bwd(dec, x, packing)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        iters, t = 5, time.perf_counter()
        for _ in range(iters):
            fwd_bwd(dec, x, packing)
        torch.cuda.synchronize()
        tok_s = iters * seq / (time.perf_counter() - t)
        flops_per_token = 6 * n_params + 12 * cfg.layers * cfg.width * seq
        mfu = f"{tok_s * flops_per_token / peak:.1%}" if peak else "n/a (pass --peak-tflops)"
        print(f"  {seq} tokens, checkpointing {ckpt:<4}: {tok_s:,.0f} tokens/s, MFU {mfu}, "
              f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        del dec, x
        torch.cuda.empty_cache()
    longest = 0
    for s in (n for n in (16_384, 32_768, 65_536, 131_072, 262_144, 524_288) if n <= max_seq):
        try:
            dec = build(cfg, "offload", False, dev, torch.bfloat16, tiled_mlp=8192)
            x = torch.randn(s, cfg.width, device=dev, dtype=torch.bfloat16, requires_grad=True)
            fwd_bwd(dec, x, Packing.from_lengths([s], device=dev))
            torch.cuda.synchronize()
            longest = s
            print(f"  {s:>7} tokens in one sequence: fits, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        except torch.OutOfMemoryError:
            print(f"  {s:>7} tokens in one sequence: out of memory")
            break
        finally:
            dec = x = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(f"longest single sequence trained (fwd+bwd, checkpointed): {longest:,} tokens "
          f"(blocks' inputs offloaded to host memory, MLP in 8k-token tiles)")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--point":
        print(json.dumps(one_cpu_point(int(sys.argv[2]), sys.argv[3], bool(int(sys.argv[4])))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--peer-max", type=int, default=8192)
    p.add_argument("--seq", type=int, default=8192, help="GPU throughput sequence length")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--max-seq", type=int, default=524_288, help="longest sequence to try on the GPU")
    p.add_argument("--parallel", action="store_true", help="per-rank memory under Ulysses / ring (gloo, or --gpu)")
    a = p.parse_args()
    if a.parallel:
        if a.gpu:
            gpu_parallel()
        else:
            parallel_table([int(x) for x in a.lengths.split(",") if int(x) <= 16_384])
        return 0
    if a.gpu:
        if not torch.cuda.is_available():
            print("--gpu: no CUDA device here, nothing to measure")
            return 0
        gpu_report(a.seq, a.peak_tflops * 1e12 if a.peak_tflops else None, a.max_seq)
    else:
        cpu_table([int(x) for x in a.lengths.split(",")], a.peer_max)
    return 0


if __name__ == "__main__":
    sys.exit(main())
