"""Several curation steps in order, each on the samples the one before kept, and one report.

    python -m mmpretrain.data.curate run plan.yaml

plan.yaml:

    shards: 'raw/train-{000000..000099}.tar'   # or a list of patterns
    out: curated                              # the plan's folder
    workers: 2                                # options every step takes (workers, caption_keys, seed)
    steps:
      - filter: {min_tokens: 3, max_repeat: 5}
      - dedup: {}
      - score: {model: runs/main/export, top_fraction: 0.7}
      - reshard: {}                           # the survivors as new shards (optional)

A step's options are its command-line options (`top_fraction: 0.7` is `--top-fraction 0.7`;
`true` a bare flag). Step i writes into OUT/<i>-<step>/; OUT/keep.txt is the last step's kept
keys, OUT/removed.jsonl every removed key with the step and reason that removed it, OUT/report.json
and report.md the counts of every step. A step whose folder already holds the outcome of the same
options on the same input (an interrupted plan run again) is not run again.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mmpretrain.config import ConfigError

COMMON = ("workers", "caption_keys", "seed")


def _argv(options: dict) -> list[str]:
    argv = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not None and v is not False:
            argv += [flag, *map(str, v if isinstance(v, list) else [v])]
    return argv


def load_plan(path: str) -> dict:
    try:
        plan = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"plan {path!r} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"plan {path!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("steps"), list) or not plan["steps"]:
        raise ConfigError(f"plan {path!r}: expected a mapping with a non-empty `steps:` list")
    unknown = set(plan) - {"shards", "out", "steps", *COMMON}
    if unknown:
        raise ConfigError(f"plan {path!r}: unknown key(s) {sorted(unknown)}; a plan holds shards, out, steps, "
                          f"{', '.join(COMMON)}")
    return plan


def run_plan(path: str, shards: list[str], out: str | None) -> dict:
    from mmpretrain.data.curate import STEPS, parser, run_step
    from mmpretrain.data.curate.core import Outcome, read_uids, write_outcome

    plan = load_plan(path)
    shards = shards or plan.get("shards")
    shards = [shards] if isinstance(shards, str) else shards
    out = out or plan.get("out")
    if not shards or not out:
        raise ConfigError(f"plan {path!r}: no shards or no out folder (give them in the plan or on the command line)")
    common = _argv({k: plan[k] for k in COMMON if k in plan})
    keep, reports, removed = None, [], []
    for i, entry in enumerate(plan["steps"], 1):
        if not (isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in STEPS):
            raise ConfigError(f"plan {path!r}: step {i} is {entry!r}; a step reads `- <step>: {{options}}` "
                              f"with <step> one of {', '.join(STEPS)}")
        (step, options), = entry.items()
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"plan {path!r}: step {i} ({step}): its options must be a mapping, not {options!r}")
        folder = Path(out) / f"{i:02d}-{step}"
        argv = [step, *shards, "--out", str(folder), *common, *(["--keep", str(keep)] if keep else []),
                *_argv(options or {})]
        try:
            a = parser().parse_args(argv)
        except SystemExit:  # argparse said what is wrong on stderr
            raise ConfigError(f"plan {path!r}: step {i} ({step}): bad options {options!r}") from None
        report = _done(folder, a) or run_step(a)
        reports.append({k: report[k] for k in ("step", "samples", "kept", "removed", "reasons", "seconds")})
        if step != "reshard":  # its removed.jsonl lists what the steps before removed
            removed += [{**json.loads(line), "step": step}
                        for line in (folder / "removed.jsonl").read_text().splitlines() if line]
        keep = folder / "keep.txt"
    outcome = Outcome("run", read_uids(keep), removed, {"plan": str(path)})
    seconds = sum(r["seconds"] for r in reports)
    report = write_outcome(Path(out), outcome, shards, seconds, {"plan": plan}, steps=reports)
    return {**report, "out": out}


def _done(folder: Path, a) -> dict | None:
    """The report of this step already in `folder` for the same options, or None."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    from mmpretrain.data.curate import params_of

    return report if (folder / "keep.txt").is_file() and report.get("params") == params_of(a) else None
