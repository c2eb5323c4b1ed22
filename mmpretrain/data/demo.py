"""The built-in demo corpus: real WebDataset tar shards, generated once and cached.

Every sample shows one *concept*, a triple of independent attributes, in three
modalities at once:

    attribute   image                       audio                         caption words
    colour      fill colour (8)             pitch of the tone (8 notes)   "red"
    shape       drawn shape (6)             rhythm: number of beats (6)   "circle"
    place       where it is drawn (5)       timbre: harmonic recipe (5)   "in the top left"

so the caption "a red circle in the top left" names the picture and, through
the fixed mapping above, the sound. A model that reads one attribute alone
cannot retrieve the right item. The eval split holds concepts (attribute
combinations) that never occur in the train split, one sample each with a
distinct caption, so retrieval on it is zero-shot. Images are PNG (Pillow) and
audio FLAC (soundfile): the data pipeline decodes them like anyone's shards.

A third split, "docs", holds interleaved documents over train concepts:
text segments with images and audio between them, ordered by a `doc.json`
member ("look: <image> that was a red circle in the top left. listen: ...").

Beside the shards, classify/ holds the eval split (test/) and up to 500 training samples (train/,
a linear probe's) labelled by one attribute, as classification sets in CLIP_benchmark's layout (the
same media bytes; see eval/classify.py):
classify/image-shape (the drawn shape, 6 classes) and classify/audio-rhythm (the number of beats,
named by the shape word the captions pair it with). A set's folder is named <modality>-<attribute>.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import soundfile as sf
import webdataset as wds
from PIL import Image, ImageDraw

from mmpretrain.config import ConfigError

log = logging.getLogger(__name__)

VERSION = 5  # 3: whole-second member times (plain ustar headers); 4: classify/ sets; 5: their train/
IMAGE_SIZE = 32
SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0
EVAL_CONCEPTS = 100
SHARD_SIZE = 500
DOCS_PER_CONCEPT = 2  # interleaved documents (train concepts only)

COLOURS = {  # name -> (RGB, MIDI note of the tone)
    "red": ((230, 40, 40), 57),
    "green": ((40, 200, 60), 61),
    "blue": ((50, 80, 240), 65),
    "yellow": ((240, 220, 40), 69),
    "purple": ((160, 60, 220), 73),
    "cyan": ((40, 220, 230), 77),
    "white": ((245, 245, 245), 81),
    "orange": ((250, 140, 20), 85),
}
SHAPES = {"circle": 1, "square": 2, "triangle": 3, "cross": 4, "ring": 6, "diamond": 8}  # -> beats
PLACES = {  # phrase -> (centre x, centre y) as fractions of the canvas, harmonic recipe
    "in the top left": ((0.3, 0.3), [(1, 1.0)]),
    "in the top right": ((0.7, 0.3), [(1, 1.0), (3, 0.5), (5, 0.3), (7, 0.2)]),
    "in the bottom left": ((0.3, 0.7), [(k, 1.0 / k) for k in range(1, 9)]),
    "in the bottom right": ((0.7, 0.7), [(1, 1.0), (2, 0.8), (4, 0.6)]),
    "in the centre": ((0.5, 0.5), [(1, 1.0), (1.25, 0.8), (1.5, 0.8)]),
}


def describe(*words: str) -> str:
    """"a red circle in the top left", "an orange ring moving up": the words with their article."""
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


@dataclass(frozen=True)
class Concept:
    colour: str
    shape: str
    place: str

    @property
    def caption(self) -> str:
        return describe(self.colour, self.shape, self.place)


def all_concepts() -> list[Concept]:
    return [Concept(*c) for c in itertools.product(COLOURS, SHAPES, PLACES)]


def hold_out(concepts: list, n: int, rng: random.Random, attributes: dict[str, object]) -> tuple[list, list]:
    """(seen, held): n concepts held out at random, redrawn until every value of every attribute
    (name -> its values) still occurs among the seen ones, so held-out combinations are zero-shot
    but every single value was learnable."""
    while True:
        order = concepts[:]
        rng.shuffle(order)
        held, seen = order[:n], order[n:]
        if all({getattr(c, a) for c in seen} == set(values) for a, values in attributes.items()):
            return seen, held


def split_concepts(seed: int) -> tuple[list[Concept], list[Concept]]:
    """Hold out EVAL_CONCEPTS combinations; every single attribute value stays in train."""
    return hold_out(all_concepts(), EVAL_CONCEPTS, random.Random(seed),
                    {"colour": COLOURS, "shape": SHAPES, "place": PLACES})


def render_image(c: Concept, rng: random.Random) -> Image.Image:
    """Draw at 4x and downsample (antialiased edges), with jittered place, size and colour."""
    s = IMAGE_SIZE * 4
    bg = rng.randint(0, 60)
    img = Image.new("RGB", (s, s), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    (fx, fy), _ = PLACES[c.place]
    cx = (fx + rng.uniform(-0.05, 0.05)) * s
    cy = (fy + rng.uniform(-0.05, 0.05)) * s
    r = s * rng.uniform(0.15, 0.2)
    rgb = tuple(int(np.clip(v + rng.randint(-20, 20), 0, 255)) for v in COLOURS[c.colour][0])
    draw_shape(draw, c.shape, cx, cy, r, rgb)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "ring":
        draw.ellipse(box, outline=rgb, width=int(r * 0.35))
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=rgb)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=rgb)


def render_audio(c: Concept, rng: random.Random) -> np.ndarray:
    """A tone (pitch <- colour, timbre <- place) beating SHAPES[shape] times in the clip."""
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    t = np.arange(n) / SAMPLE_RATE
    note = COLOURS[c.colour][1] + rng.uniform(-0.3, 0.3)
    f0 = 440.0 * 2 ** ((note - 69) / 12)
    _, recipe = PLACES[c.place]
    phase = rng.uniform(0, 2 * np.pi)
    tone = sum(a * np.sin(2 * np.pi * f0 * k * t + phase * k) for k, a in recipe)
    beats = SHAPES[c.shape]
    period = n / beats
    on = int(period * 0.6)
    env = np.zeros(n)
    start = rng.randint(0, int(period * 0.3))
    ramp = np.minimum(1.0, np.minimum(np.arange(on), np.arange(on)[::-1]) / (0.005 * SAMPLE_RATE))
    for b in range(beats):
        s0 = int(start + b * period)
        seg = env[s0 : s0 + on]
        seg[:] = ramp[: len(seg)]
    wave = tone * env
    wave = wave / (np.abs(wave).max() + 1e-8) * rng.uniform(0.3, 0.9)
    wave += np.random.default_rng(rng.getrandbits(32)).normal(0, 0.005, n)
    return np.clip(wave, -1, 1).astype(np.float32)


def encode_sample(key: str, c: Concept, rng: random.Random) -> dict:
    png, flac = io.BytesIO(), io.BytesIO()
    render_image(c, rng).save(png, format="PNG")
    sf.write(flac, render_audio(c, rng), SAMPLE_RATE, format="FLAC")
    meta = {"colour": c.colour, "shape": c.shape, "place": c.place}
    return {"__key__": key, "png": png.getvalue(), "flac": flac.getvalue(),
            "txt": c.caption, "json": json.dumps(meta)}


def encode_document(key: str, concepts: list[Concept], rng: random.Random) -> dict:
    """An interleaved document: each item is introduced, shown (image) or played (audio),
    then described. `doc.json` lists the order; media are members of the same sample."""
    sample, segments = {"__key__": key}, []
    for i, c in enumerate(concepts):
        if rng.random() < 0.5:
            name, buf = f"m{i}.png", io.BytesIO()
            render_image(c, rng).save(buf, format="PNG")
            segments += [{"text": "look:"}, {"image": name}, {"text": f"that was {c.caption}."}]
        else:
            name, buf = f"m{i}.flac", io.BytesIO()
            sf.write(buf, render_audio(c, rng), SAMPLE_RATE, format="FLAC")
            segments += [{"text": "listen:"}, {"audio": name}, {"text": f"that was {c.caption}."}]
        sample[name] = buf.getvalue()
    sample["doc.json"] = json.dumps({"interleaved": segments})
    return sample


def write_shards(folder: Path, split: str, samples: Iterable[dict]) -> str:
    """Write samples (made as they are drawn) to folder/<split>-000000.tar, ... of SHARD_SIZE
    each -> the shards' brace pattern. Every built-in corpus writes its splits with it."""
    n = 0
    # a fixed whole-second member time: the corpus comes out byte-for-byte the same, and its tar
    # headers stay plain ustar (webdataset's default, a float time.time(), puts a pax header
    # before every member, which doubles the cost of reading the shards)
    with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=SHARD_SIZE, verbose=0,
                         mtime=946684800) as sink:
        for n, sample in enumerate(samples, 1):
            sink.write(sample)
    return str(folder / f"{split}-{{000000..{(n + SHARD_SIZE - 1) // SHARD_SIZE - 1:06d}}}.tar")


def _write_split(folder: Path, split: str, concepts: list[Concept], variants: int, seed: int) -> str:
    rng = random.Random(f"{seed}-{split}")
    items = [(c, v) for c in concepts for v in range(variants)]
    rng.shuffle(items)  # shards hold a mix of concepts, as a real crawl would
    if split == "docs":  # a few concepts per document
        samples = (encode_document(f"{split}-{i:06d}", rng.sample(concepts, rng.randint(2, 4)), rng)
                   for i in range(len(items)))
    else:
        samples = (encode_sample(f"{split}-{i:06d}", c, rng) for i, (c, _) in enumerate(items))
    return write_shards(folder, split, samples)


SHAPE_TEMPLATES = ["a {c}", "a red {c}", "a blue {c} in the centre", "a yellow {c} in the top left",
                   "a white {c} in the bottom right"]


PROBE_TRAIN_SAMPLES = 500  # at most, spread over the training shards: a linear probe's train/ split


def write_classification_sets(folder: Path, patterns: dict[str, str], sets: dict[str, tuple]) -> None:
    """The samples labelled by one attribute: folder/classify/<name>/ in CLIP_benchmark's layout,
    test/ the whole eval split, train/ up to PROBE_TRAIN_SAMPLES of the training split (every k-th),
    for each set name -> (media extension, attribute of the .json member, its values = the class
    names, prompt templates). The media are the shards' own bytes."""
    import braceexpand

    from mmpretrain.eval.classify import read_samples, write_dataset

    def samples(pattern):
        return [s for _, s in read_samples([Path(u) for u in braceexpand.braceexpand(pattern)])]

    test, train = samples(patterns["eval"]), samples(patterns["train"])
    for name, (ext, attribute, classnames, templates) in sets.items():
        media = [s for s in train if ext in s]  # (the video corpus also trains on stills)
        splits = {"test": test, "train": media[:: max(1, len(media) // PROBE_TRAIN_SAMPLES)][:PROBE_TRAIN_SAMPLES]}
        write_dataset(folder / "classify" / name, classnames, templates,
                      {split: [(ext, s[ext], classnames.index(json.loads(s["json"])[attribute])) for s in rows]
                       for split, rows in splits.items()})


def cached_corpus(cache_dir: str, name: str, write: Callable[[Path], dict[str, str]]) -> dict[str, str]:
    """Shard patterns by split of the corpus `name` under cache_dir, generated once: `write(folder)`
    writes every split into a temporary folder and returns their patterns; the folder is renamed
    into place only when complete, so a crash or a concurrent generator never leaves half a corpus."""
    root = Path(os.path.expanduser(cache_dir)) / name
    index = root / "index.json"
    if not index.exists():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            log.info("generating the demo corpus into %s (once)", root)
            patterns = write(tmp)
            names = {k: Path(p).name for k, p in patterns.items()}
            (tmp / "index.json").write_text(json.dumps(names, indent=1))
        except OSError as e:  # a read-only or full disk, a file where a folder should be
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError(f"data.demo.cache_dir: cannot write the demo corpus into {root} "
                              f"({e.strerror or e}); point it at a writable folder") from None
        try:
            tmp.rename(root)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    names = json.loads(index.read_text())
    return {split: str(root / name) for split, name in names.items()}


def demo_corpus(cache_dir: str, variants_per_concept: int = 16, seed: int = 0) -> dict[str, str]:
    """Generate the corpus once (atomically) and return shard patterns by split."""
    tag = hashlib.sha1(f"{VERSION}-{variants_per_concept}-{seed}".encode()).hexdigest()[:10]

    def write(folder: Path) -> dict[str, str]:
        seen, held = split_concepts(seed)
        patterns = {"train": _write_split(folder, "train", seen, variants_per_concept, seed),
                    "eval": _write_split(folder, "eval", held, 1, seed),
                    "docs": _write_split(folder, "docs", seen, DOCS_PER_CONCEPT, seed)}
        write_classification_sets(folder, patterns,
                                  {"image-shape": ("png", "shape", list(SHAPES), SHAPE_TEMPLATES),
                                   "audio-rhythm": ("flac", "shape", list(SHAPES), SHAPE_TEMPLATES)})
        return patterns

    return cached_corpus(cache_dir, f"v{VERSION}-{tag}", write)
