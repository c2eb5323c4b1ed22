"""The noisy demo corpus: the main demo's training concepts with planted faults, generated once into
tar shards. It is the built-in input of data curation (deduplication, image-text filtering,
importance resampling): its tests check what a step removes against what was planted, and the
raw-vs-curated benchmark trains on the raw shards and on the curated ones and compares retrieval
on the main demo's clean, zero-shot eval split (the "eval" returned here is that split, not a copy).

Every sample is first made as in the main demo (a training concept's PNG, FLAC, caption and json
meta, the meta always naming the true concept); then each gets at most one fault, at random:

    fault             how many                   what changes
    mismatched        30% of the originals       the caption is another concept's
    off-target        20% of the originals       the caption is web alt-text ("stock photo: red
                                                 circle, top left, free download")
    exact duplicate   + 5% of the originals      a byte-identical copy, under its own key
    near duplicate    + 5% of the originals      a copy whose image is re-encoded as JPEG (member
                                                 `jpg`), cropped (90-95% of the side), or recoloured

Duplicates copy their original's caption, fault included, and sit anywhere in the stream. Beside
the shards, target.txt holds captions in the demo's own style ("a red circle in the top left"),
one per line: the target of an importance-resampling (DSIR) step. truth.json records the faults:

    {"exact_duplicate": {key: original's key},
     "near_duplicate": {key: {"of": original's key, "how": "reencoded" | "cropped" | "recoloured"}},
     "mismatched": [keys], "off_target": [keys],     (duplicates of such samples included)
     "clean": samples without a fault (originals of duplicates count), "total": samples in the shards}
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageEnhance

from mmpretrain.data.demo import (IMAGE_SIZE, Concept, cached_corpus, demo_corpus, encode_sample,
                                  split_concepts, write_shards)

VERSION = 2  # 2: a smooth background of its own per sample; milder crops
MISMATCHED = 0.3  # of the originals, like the fractions below
OFF_TARGET = 0.2
EXACT_DUPLICATES = 0.05
NEAR_DUPLICATES = 0.05
NEAR = ("reencoded", "cropped", "recoloured")
TARGET_CAPTIONS = 200
OFF_TARGET_TEMPLATES = ["stock photo: {colour} {shape}, {where}, free download",
                        "{shape} icon {colour} {where} vector clipart png",
                        "image may contain: {shape}, {colour}, {where}",
                        "{colour} {shape} wallpaper hd ({where}) | best price online",
                        "buy {colour} {shape} poster {where} - free shipping"]


def off_target_caption(c: Concept, rng: random.Random) -> str:
    """The concept's words in web boilerplate: right content, wrong style."""
    return rng.choice(OFF_TARGET_TEMPLATES).format(colour=c.colour, shape=c.shape,
                                                   where=c.place.removeprefix("in the "))


def textured(png: bytes, rng: random.Random) -> bytes:
    """The image with a smooth random background of its own (a 4 x 4 grid of grey levels, upsampled):
    the main demo's variants of a concept differ by little more than a jitter, so that a
    perceptual hash would rightly call most of them duplicates of each other; with this, only
    the planted copies are."""
    import numpy as np

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    grid = Image.fromarray(np.array([[rng.randint(0, 90) for _ in range(4)] for _ in range(4)], dtype=np.uint8))
    field = np.asarray(grid.resize((IMAGE_SIZE,) * 2, Image.Resampling.BICUBIC), dtype=np.int16)
    grey = (img.max(-1) - img.min(-1) < 12) & (img.max(-1) < 70)  # the demo's background, not the shape
    img = np.where(grey[..., None], np.clip(img + field[..., None], 0, 255), img)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def near_duplicate(sample: dict, how: str, rng: random.Random) -> dict:
    """A copy of `sample` with its image altered `how` (one of NEAR); every other member the same."""
    img, buf, ext = Image.open(io.BytesIO(sample["png"])).convert("RGB"), io.BytesIO(), "png"
    if how == "reencoded":  # the same pixels, lossy
        img.save(buf, format="JPEG", quality=85)
        ext = "jpg"
    else:
        if how == "cropped":
            side = round(IMAGE_SIZE * rng.uniform(0.9, 0.95))
            x, y = rng.randint(0, IMAGE_SIZE - side), rng.randint(0, IMAGE_SIZE - side)
            img = img.crop((x, y, x + side, y + side)).resize((IMAGE_SIZE,) * 2, Image.Resampling.LANCZOS)
        else:  # a few percent brighter or darker, and more or less saturated
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Color):
                img = enhance(img).enhance(1 + rng.choice((-1, 1)) * rng.uniform(0.03, 0.08))
        img.save(buf, format="PNG")
    return {(ext if k == "png" else k): (buf.getvalue() if k == "png" else v) for k, v in sample.items()}


def _write_train(folder: Path, seen: list[Concept], variants: int, seed: int) -> tuple[str, dict]:
    """The training shards and their truth (see the module docstring)."""
    rng = random.Random(f"{seed}-noisy")
    concepts = [c for c in seen for _ in range(variants)]
    n = len(concepts)
    captions, fault = [c.caption for c in concepts], {}
    order = rng.sample(range(n), n)
    n_mismatched, n_off = round(MISMATCHED * n), round(OFF_TARGET * n)
    for i in order[:n_mismatched]:
        captions[i], fault[i] = rng.choice([d for d in seen if d != concepts[i]]).caption, "mismatched"
    for i in order[n_mismatched : n_mismatched + n_off]:
        captions[i], fault[i] = off_target_caption(concepts[i], rng), "off_target"
    n_exact = round(EXACT_DUPLICATES * n)
    originals = rng.sample(range(n), n_exact + round(NEAR_DUPLICATES * n))
    # the stream: (original's index, None for itself, "exact" or one of NEAR for a copy); each
    # alteration equally often, and keys in stream order, so a key says nothing of what it holds
    entries = ([(i, None) for i in range(n)] + [(i, "exact") for i in originals[:n_exact]]
               + [(i, NEAR[j % len(NEAR)]) for j, i in enumerate(originals[n_exact:])])
    rng.shuffle(entries)
    keys = {e: f"noisy-{p:06d}" for p, e in enumerate(entries)}
    copied, kept = set(originals), {}  # those copied are encoded once: a copy may come before its original

    def sample(i: int) -> dict:
        if i in kept:
            return kept[i]
        # a sample's own rng: its bytes do not depend on where it sits
        own = random.Random(f"{seed}-noisy-{i}")
        s = {**encode_sample("", concepts[i], own), "txt": captions[i]}
        s["png"] = textured(s["png"], own)
        if i in copied:
            kept[i] = s
        return s

    def stream():
        for i, how in entries:
            s = sample(i)
            if how in NEAR:
                s = near_duplicate(s, how, random.Random(f"{seed}-{how}-{i}"))
            yield {**s, "__key__": keys[i, how]}

    truth = {"exact_duplicate": {keys[i, how]: keys[i, None] for i, how in entries if how == "exact"},
             "near_duplicate": {keys[i, how]: {"of": keys[i, None], "how": how}
                                for i, how in entries if how in NEAR},
             **{name: [keys[e] for e in entries if fault.get(e[0]) == name]
                for name in ("mismatched", "off_target")},
             "clean": n - len(fault), "total": len(entries)}
    return write_shards(folder, "train", stream()), truth


def demo_noisy_corpus(cache_dir: str, variants_per_concept: int = 16, seed: int = 0) -> dict[str, str]:
    """Generate the corpus once (atomically) -> {"train": shard pattern, "eval": the main demo's eval
    pattern, "truth": truth.json, "target": target.txt}. The main demo corpus of the same arguments
    is generated too, for its eval split."""
    tag = hashlib.sha1(f"{VERSION}-{variants_per_concept}-{seed}".encode()).hexdigest()[:10]

    def write(folder: Path) -> dict[str, str]:
        seen, _ = split_concepts(seed)
        train, truth = _write_train(folder, seen, variants_per_concept, seed)
        (folder / "truth.json").write_text(json.dumps(truth, indent=1))
        target = random.Random(f"{seed}-noisy-target").choices(seen, k=TARGET_CAPTIONS)
        (folder / "target.txt").write_text("".join(c.caption + "\n" for c in target))
        return {"train": train, "truth": str(folder / "truth.json"), "target": str(folder / "target.txt")}

    noisy = cached_corpus(cache_dir, f"noisy-v{VERSION}-{tag}", write)
    return {**noisy, "eval": demo_corpus(cache_dir, variants_per_concept, seed)["eval"]}
