"""Write the kept samples (--keep UIDS) as new shards, every member as it was

The samples of SHARDS that the uid list names (all of them without --keep), in stream order,
every member's bytes unchanged (nothing is decoded or re-encoded), into DIR/shards/ as
`--pattern` says; each shard is written as `<name>.partial` and renamed when complete. keep.txt
lists what was written; removed.jsonl the keys left out (reason `not_in_keep`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mmpretrain.config import ConfigError
from mmpretrain.data.curate.core import Outcome, read_shard


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pattern", default="train-%06d.tar", help="shard file names under DIR/shards/ (a %%d field)")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per new shard (default 10000)")


def check(a: argparse.Namespace) -> None:
    if not re.search(r"%0?\d*d", a.pattern):
        raise ConfigError(f"--pattern {a.pattern!r} needs a %d field for the shard number, e.g. train-%06d.tar")


def run(urls: list[str], a: argparse.Namespace, keep: frozenset[str] | None) -> Outcome:
    from mmpretrain.data.make_shards import write_shards

    outcome = Outcome("reshard", [])
    if keep is not None:  # the keys left out are listed too: removed.jsonl says what the new shards lack
        outcome.removed = [{"key": s.key, "shard": s.shard, "reason": "not_in_keep"}
                           for url in urls for s in read_shard(url, a.caption_keys) if s.key not in keep]

    def samples():
        for url in urls:
            for s in read_shard(url, a.caption_keys, keep):
                outcome.keep.append(s.key)
                yield {"__key__": s.key, **s.members}

    pattern = str(Path(a.out) / "shards" / a.pattern)
    written = write_shards(samples(), pattern, a.max_count, 1e6, progress=sys.stderr.isatty())
    outcome.files = written
    field = re.search(r"%0?(\d*)d", pattern)
    width = int(field.group(1) or 1)
    outcome.stats = {"shards": len(written),
                     "pattern": f"{pattern[:field.start()]}{{{0:0{width}d}..{max(len(written) - 1, 0):0{width}d}}}"
                                f"{pattern[field.end():]}"}
    return outcome
