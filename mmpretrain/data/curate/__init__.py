"""Data curation at shard scale: duplicates, pair quality, importance resampling, caption filters.

    python -m mmpretrain.data.curate dedup  'raw/train-{000000..000099}.tar' --out cur/dedup
    python -m mmpretrain.data.curate score  'raw/train-{000000..000099}.tar' --out cur/score --model runs/x/export --top-fraction 0.7
    python -m mmpretrain.data.curate dsir   'raw/train-{000000..000099}.tar' --out cur/dsir --target target.txt --size 50000
    python -m mmpretrain.data.curate filter 'raw/train-{000000..000099}.tar' --out cur/filter --min-tokens 3 --lang en
    python -m mmpretrain.data.curate reshard 'raw/train-{000000..000099}.tar' --keep cur/filter/keep.txt --out cur/shards
    python -m mmpretrain.data.curate run plan.yaml

Every step reads the shards as training does (data.caption_keys, the modalities' decoders, the
same skip reasons), one shard per worker process (`--workers`, default every core), streaming,
and writes into --out:

    keep.txt        the kept keys, one a line (a uid list: DataComp's convention; `.npy` reads too)
    removed.jsonl   one line per removed key: {"key", "shard", "reason", "detail", "caption"}
    report.json     counts per reason, a few examples of each, the step's figures, time
    report.md       the same, to read

`--keep UIDS` restricts a step to the samples of a uid list (steps compose by hand; `run` does it
for a plan). A run trains on a curated subset without rewriting shards through
`data.sources: [{pattern: 'raw/train-{000000..000099}.tar', keep: cur/keep.txt}]`; `reshard`
writes the kept samples as new shards, every member as it was. Deterministic: rerunning a step
(an interrupted one too: keep.txt is written last, each file atomically) gives the same lists.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmpretrain.config import ConfigError

STEPS = ("dedup", "score", "dsir", "filter", "reshard")


def _module(step: str):
    import importlib

    return importlib.import_module(f"mmpretrain.data.curate.{'quality' if step == 'score' else step}")


def parser() -> argparse.ArgumentParser:
    from mmpretrain.config import DataConfig

    p = argparse.ArgumentParser(prog="python -m mmpretrain.data.curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True, metavar="STEP")
    for step in STEPS:
        module = _module(step)
        s = sub.add_parser(step, help=module.__doc__.splitlines()[0], description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("shards", nargs="+", help="shard patterns (brace ranges like train-{000000..000099}.tar)")
        s.add_argument("--out", required=True, help="folder for keep.txt, removed.jsonl, report.json/.md")
        s.add_argument("--keep", default=None, metavar="UIDS",
                       help="only the samples of this uid list (a keep.txt of an earlier step, or a .npy)")
        s.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: every core)")
        s.add_argument("--caption-keys", nargs="+", default=DataConfig().caption_keys, metavar="KEY",
                       help="where captions are, as the training run's data.caption_keys")
        s.add_argument("--seed", type=int, default=0, help="for every random choice (default 0)")
        module.add_arguments(s)
    r = sub.add_parser("run", help="apply a plan's steps in order, each on what the one before kept",
                       description=_plan_doc())
    r.add_argument("plan", help="a YAML plan")
    r.add_argument("shards", nargs="*", help="shard patterns (default: the plan's `shards`)")
    r.add_argument("--out", default=None, help="folder (default: the plan's `out`)")
    return p


def _plan_doc() -> str:
    from mmpretrain.data.curate import plan

    return plan.__doc__


def run_step(a: argparse.Namespace) -> dict:
    """One step from its parsed arguments -> its report (written into a.out)."""
    from mmpretrain.data.curate.core import read_uids, timed, write_outcome
    from mmpretrain.data.sources import expand

    if a.workers < 1:
        raise ConfigError(f"--workers {a.workers}: expected at least 1")
    urls = expand(a.shards, "shards")
    keep = frozenset(read_uids(a.keep)) if a.keep else None
    for name in ("model", "semantic", "open_clip_checkpoint"):  # the folders and files a step loads
        if isinstance(getattr(a, name, None), str):
            setattr(a, name, os.path.expanduser(getattr(a, name)))
    module = _module(a.step)
    module.check(a)
    outcome, seconds = timed(lambda: module.run(urls, a, keep))
    return write_outcome(Path(a.out), outcome, urls, seconds, params_of(a))


def params_of(a: argparse.Namespace) -> dict:
    """A step's options as its report records them; with --keep, a digest of the list's contents
    too (a plan run again reruns a step whose input list changed)."""
    import hashlib
    import json

    params = {k: v for k, v in vars(a).items() if k not in ("shards", "out", "step")}
    if a.keep:
        params["keep_sha1"] = hashlib.sha1(Path(a.keep).read_bytes()).hexdigest()
    return json.loads(json.dumps(params, default=str))


def summary(report: dict, out: str) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in report["reasons"].items())
    return (f"{report['step']}: {report['samples']} sample(s), kept {report['kept']}, removed {report['removed']}"
            f"{f' ({reasons})' if reasons else ''} in {report['seconds']:.1f} s -> {out}/keep.txt")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        if a.step == "run":
            from mmpretrain.data.curate.plan import run_plan

            report = run_plan(a.plan, a.shards, a.out)
            print(summary(report, report["out"]))
            return 0
        report = run_step(a)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(report, a.out))
    return 0
