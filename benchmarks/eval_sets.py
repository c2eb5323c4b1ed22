"""Eval time of the main job's eval sets, per 1,000 samples, on 1 process and split over 2 (CPU, gloo).

    python benchmarks/eval_sets.py [--config configs/text_image_audio.yaml] [--repeats 3]

The sets a run of `--config` evaluates at its end (`mmpretrain.eval.sets.run_sets`: the retrieval
on data.eval_sources and, on the demo corpus, the zero-shot classification sets and their linear
probes), on the model that config builds (freshly initialised: the time does not depend on the
weights). One process with every core's threads (torch's default), against 2 gloo ranks with
half the threads each, the sets split across them as in training (each rank embeds every other
sample, the parts are gathered, both ranks compute the metrics). Per set: the median seconds of
`--repeats` evaluations after one warm-up, the samples it embeds (a probe embeds train/ and
test/), and seconds per 1,000 samples; then the 1-rank / 2-rank ratio (the speed-up of the split).
The last row is all the sets in one evaluation, as a run's end does them.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALL = "(all, one evaluation)"


def _samples(s) -> int:
    """How many samples evaluating set `s` embeds (media and captions of one sample count once)."""
    from mmpretrain.eval.classify import read_samples, split_shards

    if s.kind == "retrieval":
        import webdataset as wds

        return sum(1 for _ in wds.WebDataset(s.urls, shardshuffle=False))
    splits = (s.split, "train") if s.kind == "linear_probe" else (s.split,)
    return sum(sum(1 for _ in read_samples(split_shards(s.folder, split))) for split in splits)


def _time_sets(config: str, repeats: int, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Median seconds per set over `repeats` evaluations (after one warm-up) in this process."""
    from mmpretrain import parallel
    from mmpretrain.config import load_config
    from mmpretrain.eval.sets import Evaluator, run_sets
    from mmpretrain.model import MultimodalModel
    from mmpretrain.tokenizer import Tokenizer

    cfg = load_config(config, ["train.device=cpu"])
    torch.manual_seed(0)
    tok = Tokenizer(cfg.model.text)
    model = MultimodalModel(cfg.model, tok.vocab_size)
    group = parallel.init_distributed("cpu", cfg.parallel).group("dp") if world > 1 else None
    evaluator = Evaluator(model, cfg, tok, "cpu", rank, world, lambda obj: parallel.gather_objects(obj, group))
    sets = run_sets(cfg)
    seconds: dict[str, list[float]] = {}
    for repeat in range(repeats + 1):
        # each set alone (its own embeddings), then all in one evaluation as a run's end does them
        # (a demo set's zero-shot and probe share their test/ embeddings there)
        for name, some in [(s.name, [s]) for s in sets] + [(ALL, sets)]:
            if world > 1:
                torch.distributed.barrier()
            start = time.perf_counter()
            evaluator.evaluate(some)
            if repeat:  # the first pass warms up (allocator, decoders, file cache)
                seconds.setdefault(name, []).append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in seconds.items()}


def _rank(rank: int, world: int, port: int, config: str, repeats: int, threads: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(threads)
    result = _time_sets(config, repeats, rank, world)
    if rank == 0:
        queue.put(result)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "text_image_audio.yaml"))
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    from mmpretrain.config import load_config
    from mmpretrain.eval.sets import run_sets

    cores = torch.get_num_threads()
    sets = run_sets(load_config(a.config, ["train.device=cpu"]))  # generates the demo corpus if needed
    samples = {s.name: _samples(s) for s in sets}
    one = _time_sets(a.config, a.repeats)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, a.config, a.repeats, max(1, cores // 2), queue))
             for r in range(2)]
    for proc in procs:
        proc.start()
    two = queue.get()
    for proc in procs:
        proc.join()

    print(f"\n{a.config}: {len(sets)} eval sets, torch {torch.__version__}, {cores} threads (1 process) / "
          f"{max(1, cores // 2)} each (2 gloo ranks), median of {a.repeats}")
    print(f"{'set':<22} {'kind':<13} {'samples':>7} {'1 rank s':>9} {'s/1k':>7} {'2 ranks s':>10} {'s/1k':>7} "
          f"{'1/2':>6}")
    samples[ALL] = sum(samples.values())
    for name, kind in [(s.name, s.kind) for s in sets] + [(ALL, "")]:
        n, t1, t2 = samples[name], one[name], two[name]
        print(f"{name:<22} {kind:<13} {n:>7} {t1:>9.2f} {t1 / n * 1000:>7.2f} {t2:>10.2f} {t2 / n * 1000:>7.2f} "
              f"{t1 / t2:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
