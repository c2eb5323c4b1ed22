"""Peak memory per rank of the contrastive losses against world size and global batch (CPU, gloo).

    python benchmarks/contrastive_memory.py [--local-batches 1024 4096 16384] [--worlds 1 2 4] [--dim 64]

One forward and backward of each loss over random normalised (per-rank batch, --dim) features on
each of 1, 2, 4 ranks (so global batches of 1k to 64k at the defaults): ours' InfoNCE (rows all-gathered, the global logits on every rank), ours'
SigLIP with the all-gather exchange and with the bidirectional ring (both recompute each block's
logits in backward, --chunk columns at a time), and open_clip's `SigLipLoss` (its `bidir` ring on
more than one rank) in the same run. Each case runs in fresh processes; the figure is the peak
resident memory of rank 0 over its resident memory once its features exist (ru_maxrss, MiB), so
it counts logits, received features and autograd's saved tensors. Cases whose logits alone would
pass --max-gib a rank are not run (shown as "-"). A row is one per-rank batch: flat across it
means memory independent of world size (open_clip #942: theirs grows with it).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("infonce", "siglip-gather", "siglip-ring", "open_clip-siglip")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rank(rank, world, port, method, n, dim, chunk, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from mmpretrain.objectives import clip_loss, gather_with_grad, siglip_loss

    dist.init_process_group("gloo")
    group = dist.group.WORLD if world > 1 else None
    g = torch.Generator().manual_seed(rank)
    a = F.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_()
    scale, bias = torch.tensor([10.0], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    dist.barrier()
    base = _rss_mib()
    if method == "infonce":
        rows = gather_with_grad({"a": a, "b": b}, group)
        loss = clip_loss(rows["a"], rows["b"], scale)
    elif method.startswith("siglip"):
        loss = siglip_loss(a, b, scale, bias, group, method.split("-")[1], chunk)
    else:
        from open_clip.loss import SigLipLoss

        loss = SigLipLoss(rank=rank, world_size=world, dist_impl="bidir")(a, b, scale, bias)
    loss.backward()
    dist.barrier()
    if rank == 0:
        queue.put(_peak_mib() - base)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(method: str, world: int, n: int, dim: int, chunk: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, method, n, dim, chunk, queue)) for r in range(world)]
    for p in procs:
        p.start()
    peak = queue.get()
    for p in procs:
        p.join()
    return peak


def logits_gib(method: str, world: int, n: int, chunk: int) -> float:
    """The logits a rank of `method` holds at once at per-rank batch `n`, GiB (fp32): InfoNCE the
    global batch's square, open_clip every block it received (kept for autograd), ours one chunk."""
    cells = {"infonce": (n * world) ** 2, "open_clip-siglip": n * n * world}.get(method, n * min(chunk or n, n))
    return cells * 4 / 2**30


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-batches", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=2048, help="ours' SigLIP: logit columns at a time")
    p.add_argument("--max-gib", type=float, default=2.0, help="skip cases whose logits (x3) pass this a rank")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    a = p.parse_args()
    print(f"peak RSS growth of rank 0, MiB (one forward + backward; --dim {a.dim}, ours' SigLIP chunk {a.chunk}; "
          f"torch {torch.__version__}, 1 thread a rank; global batch = per-rank x ranks)")
    print(f"{'method':<18} {'per-rank batch':>14} " + " ".join(f"{f'{w} rank(s)':>11}" for w in a.worlds))
    for method in a.methods:
        for n in a.local_batches:
            cells = []
            for world in a.worlds:
                if logits_gib(method, world, n, a.chunk) * 3 > a.max_gib:  # logits, sigmoid, gradient
                    cells.append(f"{'-':>11}")
                    continue
                cells.append(f"{measure(method, world, n, a.dim, a.chunk):>11.0f}")
            print(f"{method:<18} {n:>14} " + " ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
