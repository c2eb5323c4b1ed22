"""A mixture-of-experts decoder's training step against the dense decoder of the same active
parameters (CPU).

    python benchmarks/moe_step.py [--width 256] [--layers 4] [--experts 8] [--top-k 2] [--tokens 4096]

The decoder alone (mmpretrain.decoder.Decoder, SDPA on packed rows of 16 documents), a next-token
loss through its tied head, fused AdamW; each setting in a fresh process. The MoE layers have
`--experts` SwiGLU experts of hidden H each, `--top-k` per token; the dense decoder's SwiGLU has
hidden top_k x H, so both run the same MLP FLOPs per token (the router's E x C more aside).
Reports parameters (all and active per token), seconds per step (median of `--steps` after 2
warm-up steps), training state (parameters + gradients + AdamW moments) and the peak resident
memory growth over the process's state before the model was built (ru_maxrss). The row "moe,
per-expert loop" is the MoE with torch._grouped_mm turned off (one matmul per expert).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fresh_process import result_of  # noqa: E402


def _worker(kind: str, a, queue) -> None:
    import torch.nn.functional as F

    from mmpretrain import moe
    from mmpretrain.config import DecoderConfig, MoEConfig
    from mmpretrain.decoder import Decoder
    from mmpretrain.packing import Packing

    if kind == "moe, per-expert loop":
        moe._grouped_mm_fits = lambda x, w: False
    hidden = 8 * round(2.75 * a.width / 8 / a.top_k)  # each expert's hidden width
    experts = MoEConfig(experts=a.experts, top_k=a.top_k, hidden=hidden) if kind != "dense" else MoEConfig()
    cfg = DecoderConfig(width=a.width, layers=a.layers, heads=a.width // 64, mlp_hidden=a.top_k * hidden, moe=experts)
    torch.manual_seed(0)
    vocab = 8192
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    decoder = Decoder(cfg, vocab, backend="sdpa").train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-4, fused=True)
    packing = Packing.from_lengths([a.tokens // 16] * 16, device="cpu")
    tokens = torch.randint(0, vocab, (a.tokens,))
    targets = torch.randint(0, vocab, (a.tokens,))
    times = []
    for i in range(2 + a.steps):
        start = time.perf_counter()
        hidden_states = decoder(decoder.embed(tokens), packing)
        F.cross_entropy(hidden_states @ decoder.output_weight.t(), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moe.balance(decoder)
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in decoder.parameters())
    expert_params = sum(p.numel() for m in moe.moe_layers(decoder) for p in (m.gate_up, m.down))
    active = params - expert_params + expert_params * a.top_k // max(a.experts, 1) if expert_params else params
    state = sum(p.numel() * p.element_size() * 2 for p in decoder.parameters())  # parameters + gradients
    state += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.dim())
    queue.put((params, active, statistics.median(times), state, (peak - before) * 1024))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    kinds = ("dense", "moe", "moe, per-expert loop")
    rows = {kind: result_of(_worker, kind, a) for kind in kinds}
    mib = 2 ** 20
    print(f"decoder {a.width} x {a.layers}, {a.experts} experts top-{a.top_k} against dense of the same active "
          f"parameters, {a.tokens} tokens a step, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'decoder':<22}{'params M':>10}{'active M':>10}{'s/step':>9}{'state MiB':>11}{'peak growth MiB':>17}")
    for kind, (params, active, step, state, peak) in rows.items():
        print(f"{kind:<22}{params / 1e6:>10.2f}{active / 1e6:>10.2f}{step:>9.3f}{state / mib:>11.0f}{peak / mib:>17.0f}")
    d, m, loop = rows["dense"], rows["moe"], rows["moe, per-expert loop"]
    print(f"moe / dense: {m[2] / d[2]:.2f}x step time, {m[3] / d[3]:.2f}x state, {m[4] / d[4]:.2f}x peak growth; "
          f"grouped kernel / per-expert loop: {m[2] / loop[2]:.2f}x step time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
