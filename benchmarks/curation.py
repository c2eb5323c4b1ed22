"""Curation throughput: samples/s of each step on the noisy demo corpus, 1 worker against 2.

    python benchmarks/curation.py [--workers 1 2] [--copies 4] [--export runs/x/export]

The corpus (2,464 samples in 5 shards) is read --copies times over (the same shards listed again:
more shards than workers, as on a real corpus). Each step runs through the real command line
(`python -m mmpretrain.data.curate`), in a fresh process, timed from its report (the step's own
time, without the interpreter's start); `score` and semantic `dedup` need --export (a run's
export/; skipped without). Prints samples/s per step and worker count, and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--export", default=None)
    a = p.parse_args()
    from mmpretrain.config import DataConfig
    from mmpretrain.data.demo_noisy import demo_noisy_corpus

    corpus = demo_noisy_corpus(DataConfig().demo.cache_dir)
    shards = [corpus["train"]] * a.copies
    steps = {"dedup": [], "filter": ["--min-tokens", "3", "--max-repeat", "5", "--lang", "en"],
             "dsir": ["--target", corpus["target"], "--fraction", "0.8"]}
    if a.export:
        steps["score"] = ["--model", a.export, "--top-fraction", "0.7"]
        steps["dedup --semantic"] = ["--semantic", a.export, "--no-exact", "--no-near"]
    rates: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in steps.items():
            for w in a.workers:
                out = Path(tmp) / f"{name.split()[0]}-{w}"
                cmd = [sys.executable, "-m", "mmpretrain.data.curate", name.split()[0], *shards, "--out", str(out),
                       "--workers", str(w), *options]
                subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
                report = json.loads((out / "report.json").read_text())
                rates.setdefault(name, {})[w] = report["samples"] / report["seconds"]
                print(f"{name:<18} workers {w}: {report['samples']} samples in {report['seconds']:.1f} s, "
                      f"{rates[name][w]:.0f} samples/s", flush=True)
    base = a.workers[0]
    print(f"\n{'step':<18}" + "".join(f"{f'{w} worker(s)':>14}" for w in a.workers) + f"{'speed-up':>10}")
    for name, r in rates.items():
        print(f"{name:<18}" + "".join(f"{r[w]:>14.0f}" for w in a.workers) + f"{r[a.workers[-1]] / r[base]:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
