"""Remove exact, near and semantic duplicates

Three passes, each keeping the first of a group in stream order (the semantic pass: the one closest
to its cluster's centroid), each its own reason:

  exact_duplicate      the same decoded media (every member, as training's decoders read them in
                       evaluation mode: a PNG saved again is the same image) and the same
                       normalised captions (case, punctuation, spaces)
  near_duplicate       an image (a video: its middle frame) whose perceptual hash (imagehash's pHash,
                       64 bits) is within --max-hamming bits of an earlier kept one: re-encoded,
                       resized, brightened or slightly cropped copies. The default, 6, is read off
                       benchmarks/dedup_threshold.py's curve (RESULTS.md): on 5,400 generated files
                       of 24-256 px it finds 99-100% of copies 8% brighter, re-encoded as JPEG 70 or
                       resized to 75% and half of those cropped by 2 px, and is the largest threshold
                       at which none of dedup's removals was a distinct picture; each 2 bits more
                       find 2-5% more copies (crops of small images) and make 2-5x more pairs of
                       distinct pictures match. The report says what the threshold given means
  semantic_duplicate   with --semantic MODEL: SemDeDup (Abbas et al. 2023): the media embeddings of
                       an mmpretrain export clustered by k-means (scikit-learn), and within each
                       cluster a sample whose cosine similarity to a kept one closer to the centroid
                       is above --threshold removed; per modality, so audio is deduplicated by its
                       embedding too

The exact and near passes need no model. The semantic pass holds one embedding per sample in memory
(N x E floats, not the media).
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import re
import sys

import numpy as np

from mmpretrain.config import ConfigError
from mmpretrain.data.curate.core import Outcome, flatten, map_shards, parsed_samples

HASH_BITS = 64  # imagehash.phash's default hash_size 8
DEFAULT_MAX_HAMMING = 6
# benchmarks/dedup_threshold.py (RESULTS.md): --max-hamming -> (share of the edited copies found,
# precision of dedup's removals, share of look-alike pairs of distinct scenes merged) on its
# 5,400 files. pHash sets the 32 of its 64 bits above the median, so distances are even: an odd
# threshold acts as the even one below it.
MEASURED = {0: (0.413, 1.0, 0.0), 2: (0.654, 1.0, 0.0), 4: (0.743, 1.0, 0.0), 6: (0.805, 1.0, 0.002),
            8: (0.855, 0.9945, 0.013), 10: (0.893, 0.9889, 0.018), 12: (0.931, 0.976, 0.044),
            14: (0.958, 0.9174, 0.071), 16: (0.976, 0.8163, 0.113)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-exact", action="store_true", help="skip the exact-duplicate pass")
    p.add_argument("--no-near", action="store_true", help="skip the perceptual-hash pass")
    p.add_argument("--max-hamming", type=int, default=DEFAULT_MAX_HAMMING,
                   help=f"near duplicates: pHash bits that may differ (of 64; default {DEFAULT_MAX_HAMMING}, "
                        f"from a measured recall/precision curve: see the report)")
    p.add_argument("--semantic", default=None, metavar="MODEL",
                   help="an mmpretrain run, export or checkpoint folder: also remove semantic duplicates by its "
                        "embeddings")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="semantic duplicates: cosine similarity above which two samples are one (default 0.95)")
    p.add_argument("--clusters", type=int, default=0,
                   help="semantic duplicates: k-means clusters (default: about sqrt of the samples)")


def check(a: argparse.Namespace) -> None:
    if not 0 <= a.max_hamming < HASH_BITS // 2:
        raise ConfigError(f"--max-hamming {a.max_hamming}: expected 0 to {HASH_BITS // 2 - 1} bits of {HASH_BITS}")
    if not -1 < a.threshold < 1:
        raise ConfigError(f"--threshold {a.threshold}: expected a cosine similarity below 1")
    if a.clusters < 0:
        raise ConfigError(f"--clusters {a.clusters}: expected a positive count (0: automatic)")
    if a.no_exact and a.no_near and not a.semantic:
        raise ConfigError("nothing to do: --no-exact and --no-near without --semantic MODEL")
    if a.semantic:
        from mmpretrain.model_folder import find_model

        find_model(a.semantic, "--semantic")


def threshold_meaning(bits: int) -> str:
    """What --max-hamming `bits` means, in the report's words."""
    text = f"an image whose 64-bit pHash differs from an earlier kept one's in at most {bits} bits is removed"
    if bits % 2:
        text += f" (pHash distances are even: {bits} acts as {bits - 1})"
    if (measured := MEASURED.get(bits - bits % 2)) is not None:
        found, precision, merged = measured
        text += (f"; on generated scenes of 24-256 px (benchmarks/dedup_threshold.py) this finds {found:.0%} of "
                 f"their copies (cropped by 2 px, 8% brighter, re-encoded as JPEG 70, resized to 75%, or all "
                 f"three), {precision:.1%} of its removals are copies, and {merged:.1%} of look-alike pairs of "
                 f"distinct pictures match")
    return text


def normalise(caption: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", caption.lower()).split())


@functools.cache
def _parser(caption_keys: tuple[str, ...]):
    """Training's parser in evaluation mode for every modality (the default towers' sizes)."""
    from mmpretrain.config import Config
    from mmpretrain.data.curate.embed import parser_for
    from mmpretrain.encoders import MODALITIES
    from mmpretrain.tokenizer import Tokenizer

    cfg = Config().model
    cfg.modalities = list(MODALITIES)
    return parser_for(cfg, list(caption_keys), Tokenizer(cfg.text))


def phash(image) -> int:
    import imagehash

    bits = imagehash.phash(image).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _frame_image(frames):
    """A decoded clip's (T, 3, S, S) middle frame as a PIL image (scaled to 0-255: pHash compares
    gradients, not levels)."""
    from PIL import Image

    x = frames[len(frames) // 2].float()
    x = (x - x.min()) / (x.max() - x.min() + 1e-8) * 255
    return Image.fromarray(x.permute(1, 2, 0).byte().numpy())


def hash_shard(url: str, caption_keys: list[str], keep: frozenset[str] | None, near: bool) -> list[dict]:
    """One record per sample (core.parsed_samples'), with "exact": digest and "phash": [int, ...]
    where it parsed."""
    from mmpretrain.data.samples import BadSample
    from mmpretrain.encoders import MODALITIES
    from mmpretrain.encoders.image import open_image

    parser = _parser(tuple(caption_keys))
    records = []
    for record, parsed, s in parsed_samples(url, caption_keys, keep, parser):
        records.append(record)
        if parsed is None:
            continue
        digest = hashlib.sha1()
        for m in parser.specs:
            if m in parsed:
                digest.update(m.encode() + str(tuple(parsed[m].shape)).encode() + parsed[m].numpy().tobytes())
        digest.update("\n".join(map(normalise, s.captions)).encode())
        record["exact"], record["phash"] = digest.hexdigest(), []
        if near:
            try:
                image_ext = next((e for e in MODALITIES["image"].extensions if e in s.members), None)
                if image_ext:
                    record["phash"].append(phash(open_image(s.members[image_ext], parser.sections["image"])))
                if "video" in parsed:
                    record["phash"].append(phash(_frame_image(parsed["video"])))
            except BadSample as e:
                record["bad"] = (e.reason, e.detail)
    return records


def _chunks(h: int, max_hamming: int) -> list[tuple[int, int]]:
    """Pigeonhole: hashes within max_hamming bits share at least one of max_hamming + 1 chunks
    exactly, so candidates come from an index of chunks, not from comparing every pair."""
    n = max_hamming + 1
    bounds = [round(i * HASH_BITS / n) for i in range(n + 1)]
    return [(i, (h >> bounds[i]) & ((1 << (bounds[i + 1] - bounds[i])) - 1)) for i in range(n)]


def near_pass(records: list[dict], max_hamming: int) -> dict[str, str]:
    """key -> "of <earlier key> (<d> bits)" for each record near an earlier kept one."""
    index, hashes, found = collections.defaultdict(list), {}, {}
    for r in records:
        best = None
        for h in r["phash"]:
            for chunk in _chunks(h, max_hamming):
                for other in index.get(chunk, ()):
                    d = min(bin(h ^ o).count("1") for o in hashes[other])
                    if d <= max_hamming and (best is None or d < best[1]):
                        best = (other, d)
        if best:
            found[r["key"]] = f"of {best[0]} ({best[1]} bits)"
            continue
        hashes[r["key"]] = r["phash"]
        for h in r["phash"]:
            for chunk in _chunks(h, max_hamming):
                index[chunk].append(r["key"])
    return found


def semantic_pass(records: list[dict], threshold: float, clusters: int, seed: int) -> dict[str, str]:
    """SemDeDup over each modality's embeddings: key -> "of <key> (cos ..., <modality>)"."""
    from sklearn.cluster import KMeans

    from mmpretrain.data.curate.embed import unit

    found = {}
    modalities = sorted({m for r in records for m in r.get("media", {})})
    for m in modalities:
        rows = [r for r in records if m in r.get("media", {}) and r["key"] not in found]
        if len(rows) < 2:
            continue
        x = unit([r["media"][m] for r in rows])
        k = min(len(rows), clusters or max(1, round(len(rows) ** 0.5)))
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x)
        centres = km.cluster_centers_ / np.maximum(np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True), 1e-12)
        for c in range(k):
            members = np.flatnonzero(km.labels_ == c)
            # closest to the centroid first (stable: ties in stream order): the one a group keeps
            members = members[np.argsort(-(x[members] @ centres[c]), kind="stable")]
            sim = x[members] @ x[members].T
            kept: list[int] = []
            for i in range(len(members)):
                j = max(kept, key=lambda j: sim[i, j]) if kept else None
                if j is not None and sim[i, j] > threshold:
                    found[rows[members[i]]["key"]] = f"of {rows[members[j]]['key']} (cos {sim[i, j]:.3f}, {m})"
                else:
                    kept.append(i)
    return found


def run(urls: list[str], a: argparse.Namespace, keep: frozenset[str] | None) -> Outcome:
    progress = sys.stderr.isatty()
    records = flatten(map_shards(functools.partial(hash_shard, caption_keys=a.caption_keys, keep=keep,
                                                   near=not a.no_near),
                                 urls, a.workers, progress, "hashing"))
    removed: dict[str, dict] = {}
    for r in records:
        if "bad" in r:
            removed[r["key"]] = {"key": r["key"], "shard": r["shard"], "reason": r["bad"][0], "detail": r["bad"][1]}
    good = [r for r in records if "bad" not in r and "document" not in r]
    by_key = {r["key"]: r for r in good}
    first: dict[str, str] = {}
    if not a.no_exact:
        for r in good:
            if r["exact"] in first:
                removed[r["key"]] = _removed(r, "exact_duplicate", f"of {first[r['exact']]}")
            else:
                first[r["exact"]] = r["key"]
    if not a.no_near:
        for key, detail in near_pass([r for r in good if r["key"] not in removed], a.max_hamming).items():
            removed[key] = _removed(by_key[key], "near_duplicate", detail)
    stats = {"hashed": len(good)}
    if not a.no_near:
        stats["near_duplicate_threshold"] = threshold_meaning(a.max_hamming)
    if a.semantic:
        from mmpretrain.data.curate.embed import embed_shard

        survivors = frozenset(r["key"] for r in good if r["key"] not in removed)
        embedded = flatten(map_shards(functools.partial(embed_shard, export=a.semantic, caption_keys=a.caption_keys,
                                                        keep=survivors, text=False),
                                      urls, a.workers, progress, "embedding"))
        for key, detail in semantic_pass([r for r in embedded if "media" in r], a.threshold, a.clusters,
                                         a.seed).items():
            removed[key] = _removed(by_key[key], "semantic_duplicate", detail)
        stats["embedded"] = sum("media" in r for r in embedded)
    kept = [r["key"] for r in records if r["key"] not in removed]
    ordered = [removed[r["key"]] for r in records if r["key"] in removed]
    return Outcome("dedup", kept, ordered, stats)


def _removed(r: dict, reason: str, detail: str) -> dict:
    out = {"key": r["key"], "shard": r["shard"], "reason": reason, "detail": detail}
    if r.get("caption"):
        out["caption"] = r["caption"]
    return out
