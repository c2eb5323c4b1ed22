"""The built-in relations corpus: two objects side by side or one above the other, generated once
into tar shards. Retrieval on it needs what CLIP-style models are known to lack: binding each
colour to its shape and reading which object is where.

An object is a colour and a shape (8 x 4); a scene is two distinct objects and a relation:

    a red circle left of a blue cross      (= a blue cross right of a red circle)
    a red circle above a blue cross        (= a blue cross below a red circle)

drawn on a noisy background. A training sample holds one of the scene's two phrasings (drawn at
random), so a plain `.txt` reader (open_clip's) sees one caption per image. The eval split holds
scenes of object pairs that never meet in training, in both orders and both relations (so every
held-out scene has its swapped twin among the candidates: "a blue cross left of a red circle"),
one sample each with both phrasings in its `.txt`, one per line (CLIP_benchmark's retrieval
layout). Every single object occurs in training, with other partners.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmpretrain.data.demo import COLOURS, cached_corpus, describe, draw_shape, write_shards

VERSION = 2  # 2: whole-second member times (plain ustar headers)
IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
RELATIONS = {  # relation -> (its converse, where the first object sits, where the second does)
    "left of": ("right of", (0.27, 0.5), (0.73, 0.5)),
    "above": ("below", (0.5, 0.27), (0.5, 0.73)),
}
EVAL_PAIRS = 60  # unordered object pairs held out: x 2 orders x 2 relations = 240 eval scenes

Object = tuple[str, str]  # (colour, shape)


@dataclass(frozen=True)
class Scene:
    first: Object
    relation: str
    second: Object

    @property
    def captions(self) -> list[str]:
        """The scene's two phrasings: as drawn, and from the second object's side."""
        converse = RELATIONS[self.relation][0]
        return [f"{describe(*self.first)} {self.relation} {describe(*self.second)}",
                f"{describe(*self.second)} {converse} {describe(*self.first)}"]


def split_scenes(seed: int) -> tuple[list[Scene], list[Scene]]:
    """(train, eval) scenes: EVAL_PAIRS unordered object pairs held out in every arrangement."""
    objects = list(itertools.product(COLOURS, SHAPES))
    pairs = list(itertools.combinations(objects, 2))
    random.Random(f"relations-{seed}").shuffle(pairs)
    held = set(pairs[:EVAL_PAIRS])

    def scenes(pair_set):
        return [Scene(a, r, b) for x, y in pair_set for a, b in ((x, y), (y, x)) for r in RELATIONS]

    return scenes(pairs[EVAL_PAIRS:]), scenes(sorted(held))


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Both objects drawn at 4x and downsampled, with jittered places, sizes and colours, on a
    background of grey noise."""
    s = IMAGE_SIZE * 4
    noise = np.random.default_rng(rng.getrandbits(32)).normal(rng.randint(20, 60), 12, (IMAGE_SIZE, IMAGE_SIZE))
    bg = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8)).convert("RGB").resize((s, s), Image.NEAREST)
    draw = ImageDraw.Draw(bg)
    _, *places = RELATIONS[scene.relation]
    for (colour, shape), (fx, fy) in zip((scene.first, scene.second), places):
        cx, cy = (fx + rng.uniform(-0.04, 0.04)) * s, (fy + rng.uniform(-0.04, 0.04)) * s
        rgb = tuple(int(np.clip(v + rng.randint(-20, 20), 0, 255)) for v in COLOURS[colour][0])
        draw_shape(draw, shape, cx, cy, s * rng.uniform(0.13, 0.18), rgb)
    return bg.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def encode_sample(key: str, scene: Scene, rng: random.Random, train: bool) -> dict:
    png = io.BytesIO()
    render(scene, rng).save(png, format="PNG")
    captions = [rng.choice(scene.captions)] if train else scene.captions
    return {"__key__": key, "png": png.getvalue(), "txt": "\n".join(captions)}


def _write_split(folder: Path, split: str, scenes: list[Scene], variants: int, seed: int) -> str:
    rng = random.Random(f"{seed}-relations-{split}")
    items = [s for s in scenes for _ in range(variants)]
    rng.shuffle(items)
    return write_shards(folder, split, (encode_sample(f"{split}-{i:06d}", scene, rng, train=split == "train")
                                        for i, scene in enumerate(items)))


def demo_relations_corpus(cache_dir: str, variants_per_scene: int = 4, seed: int = 0) -> dict[str, str]:
    """Generate the corpus once (atomically) and return shard patterns by split ("train", "eval").
    About 7,000 training pairs at the default 4 variants per scene (1,744 scenes)."""
    tag = hashlib.sha1(f"{VERSION}-{variants_per_scene}-{seed}".encode()).hexdigest()[:10]

    def write(folder: Path) -> dict[str, str]:
        train, held = split_scenes(seed)
        return {"train": _write_split(folder, "train", train, variants_per_scene, seed),
                "eval": _write_split(folder, "eval", held, 1, seed)}

    return cached_corpus(cache_dir, f"relations-v{VERSION}-{tag}", write)
