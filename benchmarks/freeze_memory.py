"""Memory of the main job's training step with the decoder frozen (train.freeze=[decoder]) against
trained (CPU).

    python benchmarks/freeze_memory.py [--width 512] [--layers 8] [--steps 2]

`configs/text_image_audio.yaml`'s model with a decoder of `--width` x `--layers` (larger than the
demo's, so that the decoder dominates as a pretrained LLM would), `--steps` AdamW steps of the
trainer's own step (`build.train_step`) on one synthetic batch of 32 pairs, each setting in a fresh
process. Reports (a) the training state held: parameters + gradients + optimizer state, from the
tensors; (b) the peak resident memory growth of the process over its state before the model was
built (ru_maxrss), which adds activations and allocator slack; and the ratio frozen / trained. A
frozen decoder keeps its weights and activations for the backward into the encoders, and drops
its gradients and AdamW's two moments: 3 of the 4 copies of its weights.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fresh_process import result_of  # noqa: E402


def _worker(freeze: bool, width: int, layers: int, steps: int, queue) -> None:
    from fsdp_memory import _batch

    from mmpretrain import parallel
    from mmpretrain.build import build, train_step
    from mmpretrain.config import load_config
    from mmpretrain.tokenizer import Tokenizer

    cfg = load_config(ROOT / "configs" / "text_image_audio.yaml",
                      [f"model.decoder.width={width}", f"model.decoder.layers={layers}",
                       f"model.decoder.heads={width // 64}", "train.device=cpu", "train.batch_size=32",
                       f"train.freeze={'[decoder]' if freeze else '[]'}"])
    env = parallel.init_distributed("cpu", cfg.parallel)
    tok = Tokenizer(cfg.model.text)
    batches = itertools.cycle([_batch(cfg, tok, n=32)])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    built = build(cfg, env, torch.device("cpu"), tok)
    for i in range(steps):
        train_step(built.task, built.wrapped, built.optimizer, built.scheduler, built.autocast, batches, cfg.train, i)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    task, opt = built.task, built.optimizer
    params = sum(p.numel() * p.element_size() for p in task.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in task.parameters() if p.grad is not None)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    queue.put((params + grads + state, (peak - before) * 1024, sum(p.numel() for p in task.model.decoder.parameters())))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    rows = {name: result_of(_worker, name == "frozen", a.width, a.layers, a.steps) for name in ("trained", "frozen")}
    mib = 2 ** 20
    print(f"decoder {a.width} x {a.layers} ({rows['trained'][2] / 1e6:.1f}M parameters), batch 32, {a.steps} steps, "
          f"torch {torch.__version__}")
    print(f"{'decoder':<10}{'state MiB':>12}{'peak growth MiB':>18}")
    for name, (state, peak, _) in rows.items():
        print(f"{name:<10}{state / mib:>12.0f}{peak / mib:>18.0f}")
    (st, pt, _), (sf, pf, _) = rows["trained"], rows["frozen"]
    print(f"{'frozen / trained':<10}{sf / st:>8.2f}x{pf / pt:>17.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
