"""`curate dedup`'s near-duplicate threshold: recall and precision of its perceptual-hash match
against --max-hamming, over generated pictures and the edits copies in a corpus go through (CPU).

    python benchmarks/dedup_threshold.py [--per-size 150] [--sizes 24 32 48 64 128 256] [--plot FILE]

The generator draws photo-like scenes: a soft horizon between two random colours at a random height,
a smooth random texture over the whole, and 1-4 random ellipses and rectangles, drawn at 4x and
downsampled, saved as PNG, --per-size of them at each of --sizes (pixels a side). Each scene is
copied once under each edit:

    crop2      2 pixels cut from every side
    bright8    8% brighter (PIL's ImageEnhance.Brightness 1.08)
    jpeg70     re-encoded as JPEG, quality 70
    resize75   scaled to 75% a side (bicubic)
    combined   crop2, then bright8, saved as JPEG quality 70

Every file is hashed as dedup hashes it (`dedup.phash` of `open_image`: imagehash's 64-bit pHash).
recall(T): the share of copies within T bits of their scene's original. precision(T): dedup's own
decision on the whole corpus (every original and copy, shuffled; each image removed when within T
bits of an earlier kept one, as `dedup.near_pass` decides, which this checks at the chosen default):
the share of its removals whose kept match is the same scene. `distinct/M`: pairs of different
scenes within T bits, per million such pairs. Prints both tables and writes the curves to --plot.
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

EDITS = ("crop2", "bright8", "jpeg70", "resize75", "combined")
# pHash sets the 32 of its 64 bits above the median: every hash has 32 ones, so distances are even
# and an odd threshold decides as the even one below it
THRESHOLDS = range(0, 17, 2)


def layout(rng: np.random.Generator) -> tuple:
    """Where a scene's horizon and shapes are: (horizon height, [(ellipse?, box), ...])."""
    shapes = []
    for _ in range(rng.integers(1, 5)):
        x0, y0 = rng.uniform(0, 0.75, 2)
        w, h = rng.uniform(0.125, 0.5, 2)
        shapes.append((rng.random() < 0.5, (x0, y0, x0 + w, y0 + h)))
    return rng.uniform(0.2, 0.8), shapes


def scene(rng: np.random.Generator, size: int, where: tuple) -> Image.Image:
    """A photo-like picture, size x size, of a layout: sky and ground of random colours, a random
    texture, shapes of random colours; drawn at 2x and downsampled."""
    big = 2 * size
    horizon, shapes = where
    y = np.linspace(0, 1, big, dtype=np.float32)[:, None, None]
    ground = 1 / (1 + np.exp(-(y - horizon) * 30))  # a soft horizon
    base = (1 - ground) * rng.integers(0, 256, 3) + ground * rng.integers(0, 256, 3)
    texture = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((big, big), Image.BICUBIC)
    pixels = np.clip(base + (np.asarray(texture, dtype=np.float32) - 128) * 0.3, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    for ellipse, box in shapes:
        (draw.ellipse if ellipse else draw.rectangle)([v * big for v in box],
                                                      fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img.resize((size, size), Image.LANCZOS)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 70} if fmt == "JPEG" else {}))
    return buf.getvalue()


def edited(img: Image.Image, edit: str) -> bytes:
    """The file of a copy of `img` under one of EDITS."""
    w, h = img.size
    if edit == "crop2":
        return encode(img.crop((2, 2, w - 2, h - 2)))
    if edit == "bright8":
        return encode(ImageEnhance.Brightness(img).enhance(1.08))
    if edit == "jpeg70":
        return encode(img, "JPEG")
    if edit == "resize75":
        return encode(img.resize((round(w * 0.75), round(h * 0.75)), Image.BICUBIC))
    if edit == "combined":
        return encode(ImageEnhance.Brightness(img.crop((2, 2, w - 2, h - 2))).enhance(1.08), "JPEG")
    raise ValueError(edit)


def file_hash(data: bytes) -> int:
    """dedup's hash of an image file, decoded as dedup decodes it."""
    from mmpretrain.data.curate.dedup import phash
    from mmpretrain.encoders.image import ImageEncoderConfig, open_image

    return phash(open_image(data, ImageEncoderConfig()))


def corpus(sizes: list[int], per_size: int, seed: int = 0) -> list[dict]:
    """Every original and copy: {"scene", "size", "edit" ("" for the original), "hash"}."""
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        for k in range(per_size):
            if k % 2 == 0:  # scenes in pairs of one layout: look-alikes, distinct pictures all the same
                where = layout(rng)
            img, n = scene(rng, size, where), len(rows) // (1 + len(EDITS))
            rows.append({"scene": n, "size": size, "edit": "", "hash": file_hash(encode(img))})
            rows += [{"scene": n, "size": size, "edit": e, "hash": file_hash(edited(img, e))} for e in EDITS]
    return rows


def distances(hashes: list[int]) -> np.ndarray:
    """(N, N) uint8 Hamming distances between 64-bit hashes."""
    h = np.array(hashes, dtype=np.uint64)
    return np.stack([np.bitwise_count(row ^ h) for row in h]).astype(np.uint8)


def greedy(d: np.ndarray, order: np.ndarray, t: int) -> dict[int, int]:
    """dedup.near_pass's decision: removed index -> the kept index it is within t bits of (the closest)."""
    kept, removed = [], {}
    for i in order:
        if kept:
            near = d[i, kept]
            j = int(np.argmin(near))
            if near[j] <= t:
                removed[int(i)] = kept[j]
                continue
        kept.append(int(i))
    return removed


def curves(rows: list[dict], seed: int = 0) -> dict:
    """Per threshold: recall per edit and per size, overall recall, precision, distinct pairs per million."""
    d = distances([r["hash"] for r in rows])
    scene_of = np.array([r["scene"] for r in rows])
    original = {r["scene"]: i for i, r in enumerate(rows) if not r["edit"]}
    copies = [(i, r) for i, r in enumerate(rows) if r["edit"]]
    to_original = np.array([d[i, original[r["scene"]]] for i, r in copies])
    edits, sizes = np.array([r["edit"] for _, r in copies]), np.array([r["size"] for _, r in copies])
    different = scene_of[:, None] != scene_of[None, :]
    distinct = d[np.triu(different, 1)]
    look_alikes = np.array([d[original[n], original[n + 1]] for n in original if n % 2 == 0])
    order = np.random.default_rng(seed).permutation(len(rows))
    out = {}
    for t in THRESHOLDS:
        removed = greedy(d, order, t)
        right = int(sum(scene_of[i] == scene_of[j] for i, j in removed.items()))
        out[t] = {"recall": {e: float((to_original[edits == e] <= t).mean()) for e in EDITS},
                  "by_size": {int(s): float((to_original[sizes == s] <= t).mean()) for s in np.unique(sizes)},
                  "all": float((to_original <= t).mean()),
                  "precision": right / len(removed) if removed else 1.0, "removed": len(removed),
                  "wrong": len(removed) - right,
                  "distinct_per_million": float((distinct <= t).mean() * 1e6),
                  "look_alikes": float((look_alikes <= t).mean())}
    out["order"] = order
    return out


def check_against_dedup(rows: list[dict], order: np.ndarray, t: int) -> None:
    """The greedy decision above is dedup.near_pass's own at threshold t (its chunk index finds every
    kept hash within t bits, and it keeps the first of a group in stream order)."""
    from mmpretrain.data.curate.dedup import near_pass

    records = [{"key": str(i), "phash": [rows[i]["hash"]]} for i in order]
    ours = greedy(distances([r["hash"] for r in rows]), order, t)
    assert set(near_pass(records, t)) == {str(i) for i in ours}, "the benchmark's greedy pass is not dedup's"


def table(result: dict, sizes: list[int]) -> str:
    """One row per threshold: recall per edit and in all, dedup's precision, removals and wrong ones,
    distinct pairs per million, look-alike pairs merged, recall per size."""
    columns = ([(e, 9, ".3f", lambda r, e=e: r["recall"][e]) for e in EDITS] + [
        ("all", 7, ".3f", lambda r: r["all"]), ("precision", 10, ".4f", lambda r: r["precision"]),
        ("removed", 8, "d", lambda r: r["removed"]), ("wrong", 6, "d", lambda r: r["wrong"]),
        ("distinct/M", 11, ".1f", lambda r: r["distinct_per_million"]),
        ("look-alike", 11, ".3f", lambda r: r["look_alikes"])]
        + [(f"{s}px", 7, ".3f", lambda r, s=s: r["by_size"][s]) for s in sizes])
    head = f"{'T':>3}" + "".join(f"{name:>{w}}" for name, w, _, _ in columns)
    rows = [f"{t:>3}" + "".join(f"{get(result[t]):>{w}{fmt}}" for _, w, fmt, get in columns) for t in THRESHOLDS]
    return "\n".join([head, "-" * len(head), *rows])


def plot(result: dict, path: str, default: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = list(THRESHOLDS)
    fig, (ax, cost) = plt.subplots(1, 2, figsize=(11, 4.5))
    for e in EDITS:
        ax.plot(ts, [result[t]["recall"][e] for t in ts], marker=".", label=f"recall: {e}")
    ax.plot(ts, [result[t]["precision"] for t in ts], "k-", lw=2.5, label="precision (dedup's removals)")
    cost.semilogy(ts, [max(result[t]["distinct_per_million"], 0.01) for t in ts], "k-", marker=".",
                  label="pairs of distinct scenes within T, per million")
    cost.semilogy(ts, [max(result[t]["look_alikes"] * 1e6, 0.01) for t in ts], "r--", marker=".",
                  label="look-alike pairs within T, per million")
    for a in (ax, cost):
        a.axvline(default, color="grey", ls=":", label=f"default --max-hamming {default}")
        a.set(xlabel="--max-hamming (pHash bits of 64)", xticks=ts)
        a.legend(fontsize=7, loc="lower right" if a is ax else "upper left")
    ax.set(ylabel="share", ylim=(0, 1.02), title="copies found, and dedup's precision")
    cost.set(ylabel="per million pairs (0 drawn at 0.01)", title="what a larger threshold costs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from mmpretrain.data.curate.dedup import DEFAULT_MAX_HAMMING

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-size", type=int, default=150, help="scenes per size (default 150)")
    p.add_argument("--sizes", type=int, nargs="+", default=[24, 32, 48, 64, 128, 256])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="dedup_threshold.png", help="the curves' PNG (default dedup_threshold.png)")
    a = p.parse_args(argv)
    start = time.perf_counter()
    rows = corpus(a.sizes, a.per_size, a.seed)
    result = curves(rows, a.seed)
    check_against_dedup(rows, result["order"], DEFAULT_MAX_HAMMING)
    print(f"{a.per_size} scenes x {len(a.sizes)} sizes, {len(EDITS)} copies each: {len(rows)} files; "
          f"recall per edit and size, dedup's precision on all of them ({time.perf_counter() - start:.0f} s)\n")
    print(table(result, a.sizes))
    measured = {t: (round(result[t]["all"], 3), round(result[t]["precision"], 4),
                    round(result[t]["look_alikes"], 3)) for t in THRESHOLDS}
    print(f"\nas dedup.MEASURED (found, precision, look-alikes merged): {measured}")
    plot(result, a.plot, DEFAULT_MAX_HAMMING)
    print(f"\nwrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
