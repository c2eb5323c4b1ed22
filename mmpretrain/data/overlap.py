"""Train/eval contamination: which eval items also appear in the training shards.

    python -m mmpretrain.data.overlap --train '/data/train-{000000..000127}.tar' --eval '/data/eval-000000.tar'

For every eval sample it looks for training samples with
  - identical media bytes (any media member: a copied image, a re-shared audio file),
  - a near-duplicate image: 256-bit difference hashes within `--max-hamming` bits and
    quadrant mean colours within `--max-colour` levels (survives re-encoding,
    resizing and small colour changes; the same drawing in another colour is not one),
  - an identical caption after normalisation (case, punctuation, spaces), or a
    near-identical one: word-set Jaccard similarity >= `--min-jaccard`.
It prints how many eval items are affected by each kind and lists them with the
training keys they match; `--json` writes the full report. `--fail-above 0.01` exits 1
when more than 1% of the eval items overlap, so the check can gate a pipeline.

A retrieval score on a contaminated eval set measures memory, not zero-shot
transfer; clean the eval set (or the training set) before trusting it.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import re
import sys

from mmpretrain.config import ConfigError

HASH_SIDE = 16  # a HASH_SIDE x HASH_SIDE bit difference hash
HASH_BITS = HASH_SIDE * HASH_SIDE


def image_signature(data: bytes) -> tuple[int, tuple[int, ...]] | None:
    """(difference hash, colour): the hash has one bit per horizontal gradient sign of a 17x16 grey
    thumbnail; the colour is the mean RGB of each quadrant (a grey hash alone calls the same
    shape in red and in blue duplicates). Written here, a few lines of Pillow, rather than
    adding a dependency for it."""
    import numpy as np
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        grey = np.asarray(img.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.LANCZOS),
                          dtype=np.int16)
        quads = np.asarray(img.resize((2, 2), Image.Resampling.BOX), dtype=np.int16)
    except Exception:
        return None
    bits = (grey[:, :-1] > grey[:, 1:]).flatten()
    return sum(1 << i for i, b in enumerate(bits) if b), tuple(int(v) for v in quads.flatten())


def normalise(caption: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", caption.lower()).split())


def _chunks(h: int, max_hamming: int) -> list[tuple[int, int]]:
    """Pigeonhole: hashes within max_hamming bits share at least one of max_hamming + 1 chunks
    exactly, so candidates come from an index of chunks, not from comparing every pair."""
    n = max_hamming + 1
    bounds = [round(i * HASH_BITS / n) for i in range(n + 1)]
    return [(i, (h >> bounds[i]) & ((1 << (bounds[i + 1] - bounds[i])) - 1)) for i in range(n)]


def read_items(urls: list[str], caption_keys: list[str], progress: bool):
    """-> [(key, {"bytes": set of sha1, "dhash": [int], "captions": [str]})] per sample."""
    import webdataset as wds
    from tqdm.auto import tqdm

    from mmpretrain.data.samples import BadSample, find_captions
    from mmpretrain.encoders import MODALITIES

    media_exts = {e for spec in MODALITIES.values() for e in spec.extensions}
    image_exts = set(MODALITIES["image"].extensions)
    items = []
    for url in tqdm(urls, desc="shards", unit="shard", disable=not progress):
        for raw in wds.tarfile_to_samples(handler=lambda e: True)(iter([{"url": url}])):
            members = {k: v for k, v in raw.items() if k.split(".")[-1] in media_exts}
            try:
                captions = find_captions(raw, caption_keys)
            except BadSample:
                captions = []
            hashes = [h for k, v in members.items() if k.split(".")[-1] in image_exts
                      if (h := image_signature(v)) is not None]
            items.append((raw["__key__"], {"bytes": {hashlib.sha1(v).hexdigest() for v in members.values()},
                                           "dhash": hashes, "captions": captions}))
    return items


def _near(a, b, max_hamming: int, max_colour: int) -> bool:
    return (bin(a[0] ^ b[0]).count("1") <= max_hamming
            and max(abs(x - y) for x, y in zip(a[1], b[1])) <= max_colour)


def find_overlap(train, evals, max_hamming: int = 12, min_jaccard: float = 0.8,
                 max_colour: int = 16) -> dict[str, dict]:
    """eval key -> {kind: [train keys]} for every eval item that matches something."""
    by_bytes, by_caption, by_chunk, by_word = (collections.defaultdict(set) for _ in range(4))
    word_sets, hashes = {}, {}
    for key, item in train:
        for digest in item["bytes"]:
            by_bytes[digest].add(key)
        for h in item["dhash"]:
            hashes.setdefault(key, []).append(h)
            for chunk in _chunks(h[0], max_hamming):
                by_chunk[chunk].add(key)
        for cap in item["captions"]:
            norm = normalise(cap)
            by_caption[norm].add(key)
            words = frozenset(norm.split())
            word_sets.setdefault(key, []).append(words)
            for w in words:
                by_word[w].add(key)
    report = {}
    for key, item in evals:
        found = collections.defaultdict(set)
        for digest in item["bytes"]:
            found["identical_media"] |= by_bytes.get(digest, set())
        for h in item["dhash"]:
            candidates = set().union(*(by_chunk.get(c, set()) for c in _chunks(h[0], max_hamming)))
            found["near_duplicate_image"] |= {k for k in candidates
                                               if any(_near(h, t, max_hamming, max_colour) for t in hashes[k])}
        for cap in item["captions"]:
            norm = normalise(cap)
            found["identical_caption"] |= by_caption.get(norm, set())
            words = frozenset(norm.split())
            # Jaccard >= t leaves at most (1 - t) * n of these n words out of a match, so a match holds
            # one of the (1 - t) * n + 1 rarest of them: candidates come from those words' postings.
            rarest = sorted(words, key=lambda w: len(by_word.get(w, ())))[: int((1 - min_jaccard) * len(words)) + 1]
            candidates = set().union(*(by_word.get(w, set()) for w in rarest)) - found["identical_caption"]
            found["near_identical_caption"] |= {
                k for k in candidates if any(len(words & s) / len(words | s) >= min_jaccard for s in word_sets[k])}
        found["near_duplicate_image"] -= found["identical_media"]
        if any(found.values()):
            report[key] = {kind: sorted(keys) for kind, keys in found.items() if keys}
    return report


def main(argv: list[str] | None = None) -> int:
    from mmpretrain.config import DataConfig
    from mmpretrain.data.sources import expand

    p = argparse.ArgumentParser(prog="python -m mmpretrain.data.overlap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="training shard pattern")
    p.add_argument("--eval", required=True, help="eval shard pattern")
    p.add_argument("--max-hamming", type=int, default=12, help="near-duplicate image: hash bits that may differ")
    p.add_argument("--max-colour", type=int, default=16, help="near-duplicate image: quadrant colour levels")
    p.add_argument("--min-jaccard", type=float, default=0.8, help="near-identical caption: word-set Jaccard")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--fail-above", type=float, default=None, metavar="FRACTION",
                   help="exit 1 when more than this fraction of eval items overlap (0: any), to gate a pipeline")
    args = p.parse_args(argv)
    try:
        if args.fail_above is not None and not 0 <= args.fail_above <= 1:
            raise ConfigError(f"--fail-above {args.fail_above}: expected a fraction of eval items, 0 to 1")
        train_urls, eval_urls = expand([args.train], "--train"), expand([args.eval], "--eval")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys, tty = DataConfig().caption_keys, sys.stderr.isatty()
    train, evals = read_items(train_urls, keys, tty), read_items(eval_urls, keys, tty)
    report = find_overlap(train, evals, args.max_hamming, args.min_jaccard, args.max_colour)
    kinds = collections.Counter(kind for found in report.values() for kind in found)
    print(f"{len(report)} of {len(evals)} eval item(s) overlap {len(train)} training sample(s)")
    for kind in ("identical_media", "near_duplicate_image", "identical_caption", "near_identical_caption"):
        print(f"  {kind:<24}{kinds.get(kind, 0):>8}")
    for key, found in list(report.items())[:50]:
        print(f"{key}: " + "; ".join(f"{kind} {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}"
                                     for kind, v in found.items()))
    if len(report) > 50:
        print(f"... {len(report) - 50} more (--json for all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"eval_items": len(evals), "train_samples": len(train), "overlap": report}, f, indent=1)
    share = len(report) / max(1, len(evals))
    if args.fail_above is not None and share > args.fail_above:
        print(f"contaminated: {share:.1%} of eval items overlap, above --fail-above {args.fail_above:g}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
