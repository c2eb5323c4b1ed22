"""Memory per rank with DDP against FSDP2 (`parallel.dp_shard`) at 1, 2 and 4 processes (CPU, gloo).

    python benchmarks/fsdp_memory.py [--procs 1 2 4] [--width 512] [--layers 8]

One model of fixed size (image + audio towers, a decoder of `--width` x `--layers`, the
49,408-token vocabulary), two AdamW training steps on the same synthetic batch on every rank.
Per rank it reports (a) the training state it holds: parameters + gradients + optimizer state,
counted from the local tensors (a DTensor's local shard under FSDP2); (b) the peak resident memory
growth of the process over its state before the model was built (ru_maxrss), which adds
activations, communication buffers and allocator slack. FSDP2 builds the model on the meta device
and allocates only its shards; DDP builds the whole model in every process. The "state" column is
the sharding itself: about 1/N of DDP's at N processes.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _batch(cfg, tok, n: int = 8):
    from mmpretrain.batch import collate
    from mmpretrain.data.samples import SampleParser

    shapes = SampleParser(cfg, False, tok).media_shapes()
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        tokens, length = tok(["a red circle in the centre " * (1 + i % 3)])
        samples.append({"__key__": str(i), "tokens": tokens[0], "length": int(length[0]), "captions": [""],
                        **{m: torch.randn(shape, generator=g) for m, shape in shapes.items()}})
    return collate(samples, shapes, tok.context_length)


def _worker(rank: int, world: int, port: int, mode: str, width: int, layers: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    from mmpretrain import parallel
    from mmpretrain.build import build
    from mmpretrain.config import load_config
    from mmpretrain.tokenizer import Tokenizer

    cfg = load_config(None, [f"model.decoder.width={width}", f"model.decoder.layers={layers}",
                             f"model.decoder.heads={width // 64}", f"parallel.dp_shard={mode}", "train.device=cpu"])
    env = parallel.init_distributed("cpu", cfg.parallel)
    tok = Tokenizer(cfg.model.text)
    batch = _batch(cfg, tok)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    built = build(cfg, env, torch.device("cpu"), tok)  # FSDP2: on meta, sharded, then allocated shard by shard
    task, optimizer = built.task, built.optimizer
    for _ in range(2):
        loss, _ = built.wrapped(batch)
        loss.backward()
        optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(_local(p).numel() * p.element_size() for p in task.parameters())
    grads = sum(_local(p.grad).numel() * p.grad.element_size() for p in task.parameters() if p.grad is not None)
    opt = sum(_local(v).numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
              if torch.is_tensor(v))
    n = sum(p.numel() for p in task.parameters())
    queue.put((rank, n, params, grads, opt, (peak - before) * 1024))
    parallel.cleanup()


def measure(procs: int, mode: str, width: int, layers: int) -> list[tuple]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(r, procs, port, mode, width, layers, queue)) for r in range(procs)]
    for w in workers:
        w.start()
    results = sorted(queue.get(timeout=900) for _ in workers)
    for w in workers:
        w.join()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args()
    mib = 2**20
    print(f"{'procs':>5} {'mode':>5} {'params (M)':>10} {'state/rank MiB':>15} {'vs ddp':>7} "
          f"{'peak RSS growth/rank MiB':>25} {'vs ddp':>7}")
    for procs in args.procs:
        ddp = None
        for mode in ("ddp", "fsdp"):
            rows = measure(procs, mode, args.width, args.layers)
            state = max(r[2] + r[3] + r[4] for r in rows)
            rss = max(r[5] for r in rows)
            ddp = ddp or (state, rss)
            print(f"{procs:>5} {mode:>5} {rows[0][1] / 1e6:>10.1f} {state / mib:>15.0f} {state / ddp[0]:>7.2f} "
                  f"{rss / mib:>25.0f} {rss / ddp[1]:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
