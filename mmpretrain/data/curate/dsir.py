"""Importance resampling toward a target: keep the samples whose captions read like the target's (DSIR).

Xie et al. 2023, "Data Selection for Language Models via Importance Resampling". A caption (a
sample's captions joined by " ") is a bag of hashed unigrams and bigrams (`--buckets` buckets,
nltk's WordPunctTokenizer on the lowercased text: the `data-selection` package's HashedNgramDSIR
featurizer). Two bag-of-buckets models are fitted, one on the target's text (--target), one on the
raw corpus (the shards, after --keep), and each raw sample's log importance weight is

    log w = sum over its n-grams of  log p_target(bucket) - log p_raw(bucket)      (eps 1e-8 in both logs)

Then --size N (or --fraction F of the samples) are drawn without replacement with probability
proportional to w: the top N of log w + Gumbel noise (seeded by --seed). It is sampling, not a
top-N cut: the kept keep some raw diversity, and a few low-weight samples are kept by chance.

    --target target.txt                one caption per line
    --target target.jsonl              one {"text": ...} (or {"caption": ...}) per line
    --target 'clean/train-{0000..0009}.tar'   the captions of shards (data.caption_keys)

Writes DIR/log_weights.jsonl ({"key", "log_weight"} per sample weighed, in stream order) beside the
usual files; removed samples have reason dsir_not_selected and their log weight as detail.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np

from mmpretrain.config import ConfigError
from mmpretrain.data.curate import core

NGRAMS = 2  # unigrams and bigrams, as HashedNgramDSIR's default
EPS = 1e-8  # HashedNgramDSIR's smoothing: a bucket the target never has costs log(1e-8) per n-gram
TEXT_TARGETS = (".txt", ".jsonl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, metavar="FILE_OR_SHARDS",
                   help="the text to resample toward: a .txt (a caption a line), a .jsonl (\"text\" or "
                        "\"caption\" fields) or shard patterns whose captions are the target")
    p.add_argument("--size", type=int, default=None, metavar="N", help="samples to keep")
    p.add_argument("--fraction", type=float, default=None, metavar="F",
                   help="share of the samples to keep, in (0, 1]")
    p.add_argument("--buckets", type=int, default=10000,
                   help="hash buckets of the n-gram features (default 10000)")


def check(a: argparse.Namespace) -> None:
    if (a.size is None) == (a.fraction is None):
        raise ConfigError("dsir: give exactly one of --size N and --fraction F")
    if a.size is not None and a.size < 1:
        raise ConfigError(f"--size {a.size}: expected at least 1")
    if a.fraction is not None and not 0 < a.fraction <= 1:
        raise ConfigError(f"--fraction {a.fraction}: expected a share in (0, 1]")
    if a.buckets < 1:
        raise ConfigError(f"--buckets {a.buckets}: expected at least 1")
    if a.target.endswith(TEXT_TARGETS):
        path = Path(a.target).expanduser()
        if not path.is_file() or path.stat().st_size == 0:
            raise ConfigError(f"--target {a.target!r}: {'is empty' if path.is_file() else 'not found'} "
                              f"(a .txt with a caption a line, or a .jsonl with \"text\" fields)")
    else:
        from mmpretrain.data.sources import expand

        expand([a.target], "--target")


def run(urls: list[str], a: argparse.Namespace, keep: frozenset[str] | None) -> core.Outcome:
    target, target_texts = _target_counts(a)
    job = functools.partial(_job, caption_keys=a.caption_keys, keep=keep, buckets=a.buckets)
    per_shard = core.map_shards(job, urls, a.workers, progress=sys.stderr.isatty(), what="dsir: n-grams")
    rows = core.flatten(rows for rows, _ in per_shard)
    raw = sum(counts for _, counts in per_shard)
    weighed = [r for r in rows if r[0].bad is None]
    log_w = np.zeros(len(weighed))
    if weighed:  # every caption has an n-gram, so raw.sum() > 0
        log_diff = np.log(target / target.sum() + EPS) - np.log(raw / raw.sum() + EPS)
        log_w = np.array([log_diff[idx] @ cnt for _, idx, cnt in weighed])
    n = len(weighed)
    k = min(n, a.size if a.size is not None else round(a.fraction * n))
    # Gumbel top-k: the k largest of log w + Gumbel(0, 1) are a draw of k without replacement, each
    # next one with probability proportional to w among those left (DSIR.resample's way)
    noisy = log_w + np.random.default_rng(a.seed).gumbel(size=n)
    chosen = np.zeros(n, dtype=bool)
    chosen[np.argsort(-noisy, kind="stable")[:k]] = True

    kept, removed, weights = [], [], iter(zip(log_w, chosen))
    for sample, _, _ in rows:
        if sample.bad is not None:
            removed.append(core.removal(sample, *sample.bad))
            continue
        w, selected = next(weights)
        if selected:
            kept.append(sample.key)
        else:
            removed.append(core.removal(sample, "dsir_not_selected", f"log weight {w:.4f}"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    core.atomic_write(out / "log_weights.jsonl", "".join(
        json.dumps({"key": s.key, "log_weight": float(w)}) + "\n" for (s, _, _), w in zip(weighed, log_w)))
    stats = {"target": a.target, "target_texts": target_texts, "target_ngrams": int(target.sum()),
             "raw_ngrams": int(raw.sum()) if weighed else 0, "weighed": n, "selected": k,
             "requested": a.size if a.size is not None else f"{a.fraction:g} of {n}",
             "log_weight_kept": _quantiles(log_w[chosen]), "log_weight_removed": _quantiles(log_w[~chosen])}
    return core.Outcome("dsir", kept, removed, stats, [str(out / "log_weights.jsonl")])


def _features(text: str, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (bucket indices, counts): the nonzero entries of HashedNgramDSIR's feature vector. We call
    its featurizer, not its DSIR.resample: that reads and writes jsonl files and returns the chosen
    texts, while a step streams tar shards and needs the chosen keys."""
    from data_selection.hashed_ngram_dsir import get_ngram_counts, wpt

    counts = get_ngram_counts(text, n=NGRAMS, num_buckets=buckets, tokenizer=wpt.tokenize)
    idx = np.flatnonzero(counts)
    return idx.astype(np.int32), counts[idx].astype(np.int32)


def _job(url: str, caption_keys: list[str], keep: frozenset[str] | None,
         buckets: int) -> tuple[list, np.ndarray]:
    """One shard -> ([(sample without its members, bucket indices, counts)], the shard's bucket counts)."""
    rows, total = [], np.zeros(buckets, dtype=np.int64)
    for s in core.read_shard(url, caption_keys, keep):
        s.members = {}
        idx, cnt = _features(" ".join(s.captions), buckets) if s.bad is None else (None, None)
        if idx is not None:
            total[idx] += cnt
        rows.append((s, idx, cnt))
    return rows, total


def _target_job(url: str, caption_keys: list[str], buckets: int) -> tuple[np.ndarray, int]:
    total, texts = np.zeros(buckets, dtype=np.int64), 0
    for s in core.read_shard(url, caption_keys):
        if s.bad is None:
            idx, cnt = _features(" ".join(s.captions), buckets)
            total[idx] += cnt
            texts += 1
    return total, texts


def _target_counts(a: argparse.Namespace) -> tuple[np.ndarray, int]:
    """The target's bucket counts and how many texts it has."""
    if not a.target.endswith(TEXT_TARGETS):
        from mmpretrain.data.sources import expand

        job = functools.partial(_target_job, caption_keys=a.caption_keys, buckets=a.buckets)
        per_shard = core.map_shards(job, expand([a.target], "--target"), a.workers,
                                    progress=sys.stderr.isatty(), what="dsir: target")
        total, texts = sum(c for c, _ in per_shard), sum(n for _, n in per_shard)
    else:
        total, texts = np.zeros(a.buckets, dtype=np.int64), 0
        for text in _target_texts(Path(a.target).expanduser()):
            idx, cnt = _features(text, a.buckets)
            total[idx] += cnt
            texts += 1
    if texts == 0:
        raise ConfigError(f"--target {a.target!r}: has no text to fit the target model on")
    return total, texts


def _target_texts(path: Path):
    jsonl = path.suffix == ".jsonl"
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not jsonl:
                yield line.strip()
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--target {path}:{n}: not a JSON line ({e.msg})") from None
            fields = row if isinstance(row, dict) else {}
            text = next((fields[f] for f in ("text", "caption") if isinstance(fields.get(f), str)), None)
            if text is None:
                raise ConfigError(f"--target {path}:{n}: has no \"text\" or \"caption\" string field")
            yield text


def _quantiles(x: np.ndarray) -> dict | None:
    if not len(x):
        return None
    q = np.quantile(x, [0, 0.1, 0.5, 0.9, 1])
    return dict(zip(("min", "p10", "median", "p90", "max"), (round(float(v), 4) for v in q)))
