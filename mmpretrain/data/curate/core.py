"""What every curation step shares: reading shards as training reads them, one shard per worker
process, and writing the step's outcome (uid lists, the removal reasons, the report).

A step maps each shard to small per-sample records (a hash, a score, a verdict; never the media)
in worker processes, then decides in the main process over those records, so a corpus is
streamed shard by shard and only the records of all samples are held at once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from mmpretrain.config import ConfigError

EXAMPLES = 3  # removed samples listed per reason in the report


@dataclass
class Sample:
    """One sample as a curation step sees it: its key and shard, its captions (as training finds
    them: data.caption_keys; [] when it has none) and its members' bytes."""

    key: str
    shard: str
    captions: list[str]
    members: dict[str, bytes]
    bad: tuple[str, str] | None = None  # (reason, detail) training would skip it for, or None

    @property
    def document(self) -> bool:
        """An interleaved document (doc.json): its text is not a caption, and steps keep it."""
        from mmpretrain.data.samples import DOC_KEY

        return DOC_KEY in self.members


def read_shard(url: str, caption_keys: list[str], keep: frozenset[str] | None = None,
               media: bool = True) -> Iterator[Sample]:
    """The samples of one shard in order (those in `keep` only, when given). A sample training
    would skip for its text keeps the reason in `bad`; an unreadable tar raises ConfigError.
    media=False: only the caption members (data.caption_keys') are read; the others are in
    `members` by name, with None for bytes (a step that reads captions alone)."""
    import webdataset as wds

    from mmpretrain.data.samples import DOC_KEY, BadSample, describe, find_captions

    def fail(e: BaseException) -> bool:
        raise ConfigError(f"{url}: cannot be read as a tar shard ({describe(e)})")

    if media:
        raws = wds.tarfile_to_samples(handler=fail)(iter([{"url": url}]))
    else:
        wanted = {k.partition(":")[0] for k in caption_keys}  # "json:caption" is read from .json
        raws = wds.tariterators.group_by_keys(_named_members(url, wanted, fail), handler=fail)
    for raw in raws:
        key = raw["__key__"]
        if keep is not None and key not in keep:
            continue
        members = {k: v for k, v in raw.items() if not k.startswith("__")}
        if DOC_KEY in members:
            yield Sample(key, url, [], members)
            continue
        try:
            yield Sample(key, url, find_captions(raw, caption_keys), members)
        except BadSample as e:
            yield Sample(key, url, [], members, (e.reason, e.detail))


def _named_members(url: str, wanted: set[str], fail: Callable) -> Iterator[dict]:
    """A tar's members as webdataset's group_by_keys takes them ({"fname", "data", "__url__"}),
    with the bytes of those whose extension is in `wanted` only (None for the others, which are
    never read: tarfile seeks past them in a local shard; a member cut short fails all the same)."""
    import re
    import tarfile

    import webdataset as wds
    from webdataset.tariterators import base_plus_ext

    try:
        with wds.gopen(url) as stream:
            seekable = getattr(stream, "seekable", lambda: False)()
            with tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*") as tar:
                for m in tar:
                    if not m.isreg() or re.match(r"__[^/]*__($|/)", m.name):  # webdataset's skip_meta
                        continue
                    ext = (base_plus_ext(m.name)[1] or "").lower()
                    data = tar.extractfile(m).read() if ext in wanted else None
                    yield {"fname": m.name, "data": data, "__url__": url}
    except Exception as e:  # noqa: BLE001 (tarfile, the stream and the OS raise many types)
        fail(e)


def parsed_samples(url: str, caption_keys: list[str], keep: frozenset[str] | None, parser):
    """(record, parsed sample or None) per sample of the shard, parsed by training's `parser`
    (data/samples.py) in evaluation mode: record {"key", "shard", "caption"} and "bad": (reason,
    detail) where training would skip it, or "document": True for an interleaved document (not
    parsed: steps that read pairs keep documents as they are)."""
    import random

    from mmpretrain.data.samples import BadSample

    for s in read_shard(url, caption_keys, keep):
        record = {"key": s.key, "shard": s.shard, "caption": s.captions[0] if s.captions else ""}
        parsed = None
        if s.bad:
            record["bad"] = s.bad
        elif s.document:
            record["document"] = True
        else:
            try:
                parsed = parser({"__key__": s.key, **s.members}, random.Random(0))
            except BadSample as e:
                record["bad"] = (e.reason, e.detail)
        yield record, parsed, s


def map_shards(job: Callable, urls: list[str], workers: int, progress: bool, what: str = "shards") -> list:
    """[job(url) for url in urls], `workers` processes at a time (1: in this process), in order,
    with a progress bar. `job` is a picklable callable (a module-level function or a
    functools.partial of one). Workers are spawned, not forked: a forked copy of a process that
    has started torch's threads can hang."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(urls), desc=what, unit="shard", disable=not progress)
    try:
        if workers <= 1 or len(urls) == 1:
            out = []
            for url in urls:
                out.append(job(url))
                bar.update()
            return out
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(urls)), mp_context=ctx,
                                                    initializer=_one_thread) as pool:
            futures = [pool.submit(job, url) for url in urls]
            for f in concurrent.futures.as_completed(futures):
                f.result()  # a worker's error, at once
                bar.update()
            return [f.result() for f in futures]
    finally:
        bar.close()


def _one_thread() -> None:
    """A worker process computes with one thread: the workers are the parallelism."""
    import torch

    torch.set_num_threads(1)


def read_uids(path: str | os.PathLike) -> list[str]:
    """A uid list: one key per line (.txt, blank lines ignored) or a NumPy array of keys (.npy,
    DataComp's convention)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"uid list {str(path)!r} not found (a keep.txt a curation step wrote, or a .npy of keys)")
    if path.suffix == ".npy":
        return [str(k) for k in np.load(path, allow_pickle=False).tolist()]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Outcome:
    """What a step decided: the kept keys in stream order, and per removed key why.
    `stats`: the step's own figures for the report; `files`: other files it wrote."""

    step: str
    keep: list[str]
    removed: list[dict] = field(default_factory=list)  # {"key", "shard", "reason", "detail"?, "caption"?}
    stats: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def removal(sample: Sample, reason: str, detail: str = "", **extra) -> dict:
    out = {"key": sample.key, "shard": sample.shard, "reason": reason}
    if detail:
        out["detail"] = detail
    if sample.captions:
        out["caption"] = sample.captions[0]
    return {**out, **extra}


def atomic_write(path: Path, text: str) -> None:
    """Written whole or not at all: an interrupted step leaves its previous outcome, not half of one."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outcome(out: Path, outcome: Outcome, inputs: list[str], seconds: float, params: dict,
                  steps: list[dict] | None = None) -> dict:
    """DIR/keep.txt (kept keys, one a line), DIR/removed.jsonl (one removed key a line, with its
    reason), DIR/report.json and DIR/report.md -> the report."""
    out.mkdir(parents=True, exist_ok=True)
    total = len(outcome.keep) + len(outcome.removed)
    reasons = collections.Counter(r["reason"] for r in outcome.removed)
    examples = collections.defaultdict(list)
    for r in outcome.removed:
        if len(examples[r["reason"]]) < EXAMPLES:
            examples[r["reason"]].append(r)
    report = {"step": outcome.step, "inputs": inputs, "samples": total, "kept": len(outcome.keep),
              "removed": len(outcome.removed), "reasons": dict(reasons.most_common()), "examples": dict(examples),
              "seconds": round(seconds, 2), "samples_per_s": round(total / seconds, 1) if seconds > 0 else None,
              "params": params, "stats": outcome.stats, "files": outcome.files}
    if steps is not None:
        report["steps"] = steps
    atomic_write(out / "removed.jsonl", "".join(json.dumps(r) + "\n" for r in outcome.removed))
    atomic_write(out / "report.json", json.dumps(report, indent=1, default=str))
    atomic_write(out / "report.md", markdown(report))
    atomic_write(out / "keep.txt", "".join(k + "\n" for k in outcome.keep))  # last: it marks the step done
    return report


def markdown(report: dict) -> str:
    lines = [f"# curate {report['step']}", "",
             f"{report['samples']} samples in, {report['kept']} kept, {report['removed']} removed "
             f"({report['seconds']} s, {report['samples_per_s']} samples/s)", ""]
    for s in report.get("steps", []):
        lines.append(f"- {s['step']}: {s['samples']} in, {s['kept']} kept, {s['removed']} removed "
                     f"({', '.join(f'{k} {v}' for k, v in s['reasons'].items()) or 'none'})")
    if report.get("steps"):
        lines.append("")
    if report["reasons"]:
        lines += ["| reason | removed | examples |", "|---|---:|---|"]
        for reason, n in report["reasons"].items():
            shown = "; ".join(f"`{e['key']}`" + (f" {e['caption'][:60]!r}" if "caption" in e else "")
                              + (f" ({e['detail'][:80]})" if "detail" in e else "")
                              for e in report["examples"][reason])
            lines.append(f"| {reason} | {n} | {shown.replace('|', '/')} |")
        lines.append("")
    for k, v in report["stats"].items():
        lines.append(f"- {k}: {json.dumps(v, default=str)}")
    return "\n".join(lines) + "\n"


def timed(fn: Callable[[], Outcome]) -> tuple[Outcome, float]:
    start = time.perf_counter()
    outcome = fn()
    return outcome, time.perf_counter() - start


def flatten(per_shard: Iterable[list]) -> list:
    return [r for rows in per_shard for r in rows]
