"""The built-in video corpus: short H.264 clips of a shape moving, generated once into tar shards.

Each clip shows one concept (colour, shape, motion): a shape of a colour that
glides across a 32 x 32 canvas in one of four directions, wrapping around at the
edges, from a random start. Any single frame is consistent with every direction
(the start is uniform over the canvas), so the motion words of the caption
("a red circle moving left") can only be learned from the order of frames. The
clip's own audio track sounds the concept as in the image/audio corpus (pitch
<- colour, beats <- shape, timbre <- motion), and a `.png` still (the first
frame) stands beside it, so one sample holds text, image, audio and video:

    key.mp4   H.264 video (8 fps, 2 s) with an AAC audio track
    key.png   the first frame
    key.txt   "a red circle moving left"
    key.json  {"colour": ..., "shape": ..., "motion": ...}

The eval split holds 100 (colour, shape, motion) combinations that never occur
in training, one clip each with a distinct caption; every single attribute
value occurs in training. classify/video-direction holds the eval clips (test/) and up to 500
training clips (train/) labelled by their motion (4 classes), a classification set in
CLIP_benchmark's layout (see demo.py).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmpretrain.data.demo import (COLOURS, PLACES, SAMPLE_RATE, SHAPES, Concept, cached_corpus, describe,
                                  draw_shape, hold_out, render_audio, write_classification_sets, write_shards)

VERSION = 6  # 4: whole-second member times (plain ustar headers); 5: classify/ set; 6: its train/
SIZE = 32
FPS = 8
FRAMES = 16  # 2 s
SPEED = 2.5  # pixels per frame
EVAL_CONCEPTS = 100
MOTIONS = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}
MOTION_TEMPLATES = ["a circle {c}", "a red square {c}", "a blue triangle {c}", "a white ring {c}",
                    "a green cross {c}"]
TIMBRE = dict(zip(MOTIONS, PLACES))  # motion -> the harmonic recipe of a place in the image/audio corpus


@dataclass(frozen=True)
class VideoConcept:
    colour: str
    shape: str
    motion: str

    @property
    def caption(self) -> str:
        return describe(self.colour, self.shape, self.motion)


def split_concepts(seed: int) -> tuple[list[VideoConcept], list[VideoConcept]]:
    """Hold out EVAL_CONCEPTS combinations; every single attribute value stays in train."""
    concepts = [VideoConcept(*c) for c in itertools.product(COLOURS, SHAPES, MOTIONS)]
    return hold_out(concepts, EVAL_CONCEPTS, random.Random(f"video-{seed}"),
                    {"colour": COLOURS, "shape": SHAPES, "motion": MOTIONS})


def render_frames(c: VideoConcept, rng: random.Random) -> list[np.ndarray]:
    """FRAMES RGB frames (SIZE, SIZE, 3) uint8: drawn at 4x and downsampled, wrapping at the edges."""
    s = SIZE * 4
    bg = rng.randint(0, 60)
    x, y = rng.uniform(0, s), rng.uniform(0, s)
    dx, dy = MOTIONS[c.motion]
    speed = SPEED * 4 * rng.uniform(0.8, 1.2)
    r = s * rng.uniform(0.15, 0.2)
    rgb = tuple(int(np.clip(v + rng.randint(-20, 20), 0, 255)) for v in COLOURS[c.colour][0])
    frames = []
    for t in range(FRAMES):
        img = Image.new("RGB", (s, s), (bg, bg, bg))
        draw = ImageDraw.Draw(img)
        cx, cy = (x + dx * speed * t) % s, (y + dy * speed * t) % s
        for ox, oy in itertools.product((-s, 0, s), repeat=2):  # wrap around the edges
            draw_shape(draw, c.shape, cx + ox, cy + oy, r, rgb)
        frames.append(np.asarray(img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)))
    return frames


def encode_mp4(frames: list[np.ndarray], wave: np.ndarray | None) -> bytes:
    """H.264 (yuv420p) at FPS, with an AAC track when `wave` (mono float at SAMPLE_RATE) is given."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        video.options = {"crf": "18", "preset": "veryfast", "g": str(FPS)}
        audio = container.add_stream("aac", rate=SAMPLE_RATE) if wave is not None else None
        for f in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(video.encode())
        if audio is not None:
            frame = av.AudioFrame.from_ndarray(wave[None].astype(np.float32), format="fltp", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            container.mux(audio.encode(frame))
            container.mux(audio.encode())
    return buf.getvalue()


def encode_sample(key: str, c: VideoConcept, rng: random.Random) -> dict:
    frames = render_frames(c, rng)
    wave = render_audio(Concept(c.colour, c.shape, TIMBRE[c.motion]), rng)
    png = io.BytesIO()
    Image.fromarray(frames[0]).save(png, format="PNG")
    meta = {"colour": c.colour, "shape": c.shape, "motion": c.motion}
    return {"__key__": key, "mp4": encode_mp4(frames, wave), "png": png.getvalue(), "txt": c.caption,
            "json": json.dumps(meta)}


def _write_split(folder: Path, split: str, concepts: list[VideoConcept], variants: int, seed: int) -> str:
    rng = random.Random(f"video-{seed}-{split}")
    items = [c for c in concepts for _ in range(variants)]
    rng.shuffle(items)
    return write_shards(folder, split, (encode_sample(f"{split}-{i:06d}", c, rng) for i, c in enumerate(items)))


def demo_video_corpus(cache_dir: str, variants_per_concept: int = 16, seed: int = 0) -> dict[str, str]:
    """Generate the corpus once (atomically) and return shard patterns by split."""
    tag = hashlib.sha1(f"{VERSION}-{variants_per_concept}-{seed}".encode()).hexdigest()[:10]

    def write(folder: Path) -> dict[str, str]:
        seen, held = split_concepts(seed)
        patterns = {"train": _write_split(folder, "train", seen, variants_per_concept, seed),
                    "eval": _write_split(folder, "eval", held, 1, seed)}
        write_classification_sets(folder, patterns,
                                  {"video-direction": ("mp4", "motion", list(MOTIONS), MOTION_TEMPLATES)})
        return patterns

    return cached_corpus(cache_dir, f"video-v{VERSION}-{tag}", write)
