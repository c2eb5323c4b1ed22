"""The optimizer step alone: AdamW's default per-tensor loop against foreach and the fused kernel
that `mmpretrain.optim.build_optimizer` picks, on the main job's parameters.

    python benchmarks/optimizer_step.py [--config configs/text_image_audio.yaml] [--steps 30]

Prints ms per step for each implementation and the ratio of the default loop to ours (fused).
Gradients are random; the step's cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/text_image_audio.yaml")
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    from mmpretrain.build import build_task
    from mmpretrain.config import load_config
    from mmpretrain.optim import build_optimizer
    from mmpretrain.tokenizer import Tokenizer

    cfg = load_config(a.config)
    task = build_task(cfg, Tokenizer(cfg.model.text).vocab_size)
    params = [p for p in task.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    ours = build_optimizer(task, cfg.train)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in ours.param_groups]
    variants = {"default loop": torch.optim.AdamW(groups, lr=cfg.train.lr, foreach=False),
                "foreach": torch.optim.AdamW(groups, lr=cfg.train.lr, foreach=True),
                "ours (build_optimizer)": ours}
    ms = {}
    for name, opt in variants.items():
        for _ in range(3):
            opt.step()
        start = time.perf_counter()
        for _ in range(a.steps):
            opt.step()
        ms[name] = (time.perf_counter() - start) / a.steps * 1000
    n = sum(p.numel() for p in params)
    print(f"{n / 1e6:.1f}M parameters ({a.config}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fused: {ours.defaults.get('fused')}")
    for name, t in ms.items():
        print(f"{name:<24}{t:8.1f} ms/step")
    print(f"default loop / ours: {ms['default loop'] / ms['ours (build_optimizer)']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
