"""Steps per second of the main job's training step at token dropout 0, 0.5 and 0.75 (CPU).

    python benchmarks/token_dropout.py [--config configs/text_image_audio.yaml] [--steps 30] [--rates 0 0.5 0.75]

The trainer's own step (`build.train_step`: both objectives, clipping, schedule) of `--config`'s
model with `model.<each media modality>.token_dropout` at each rate, on the same real batches of
its data (the built-in demo corpus by default), decoded before the clock starts so that only the
step is timed. One warm-up step, then the median seconds of `--steps` steps; prints steps/s and the
speed-up over no dropout. (FLIP reports 2-3x on GPUs at 50-75%; on CPU the towers' share of the
step bounds the gain: the decoder, the fusion and the next-token head keep their cost.)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def seconds_per_step(config: str, rate: float, batches: list, steps: int) -> float:
    from mmpretrain import parallel
    from mmpretrain.build import build, train_step
    from mmpretrain.config import load_config

    cfg = load_config(config, ["train.device=cpu"])
    cfg = load_config(config, ["train.device=cpu"] + [f"model.{m}.token_dropout={rate}" for m in cfg.model.modalities])
    env = parallel.init_distributed("cpu", cfg.parallel)
    built = build(cfg, env, torch.device("cpu"))
    times = []
    feed = itertools.cycle(batches)
    for i in range(steps + 1):
        start = time.perf_counter()
        train_step(built.task, built.wrapped, built.optimizer, built.scheduler, built.autocast, feed, cfg.train, i)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "text_image_audio.yaml"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    a = p.parse_args()

    from mmpretrain.config import load_config
    from mmpretrain.data import BatchStream
    from mmpretrain.data.sources import train_sources
    from mmpretrain.tokenizer import Tokenizer

    cfg = load_config(a.config, ["train.device=cpu", "data.num_workers=0"])
    stream = iter(BatchStream(train_sources(cfg.data), cfg, Tokenizer(cfg.model.text), cfg.train.batch_size))
    batches = [next(stream) for _ in range(4)]
    print(f"{a.config}: modalities {cfg.model.modalities}, batch {cfg.train.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {a.steps} steps")
    print(f"{'token dropout':>13} {'s/step':>8} {'steps/s':>8} {'speed-up':>9}")
    base = None
    for rate in a.rates:
        s = seconds_per_step(a.config, rate, batches, a.steps)
        base = base or s
        print(f"{rate:>13.2f} {s:>8.3f} {1 / s:>8.2f} {base / s:>8.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
