import io
import random

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmpretrain.batch import collate
from mmpretrain.config import load_config
from mmpretrain.data.demo import Concept, encode_sample
from mmpretrain.data.samples import SampleParser
from mmpretrain.tokenizer import Tokenizer

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One tiny demo corpus shared by the whole session."""
    return str(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture
def tiny_cfg(demo_cache, tmp_path):
    def make(*overrides):
        return load_config(ROOT / "configs" / "tiny.yaml",
                           [f"data.demo.cache_dir={demo_cache}", f"run.dir={tmp_path / 'runs'}", *overrides])
    return make


def sample_dict(i: int, colour="red", shape="circle", place="in the centre") -> dict:
    """A real (PNG + FLAC + txt) sample from the demo renderer."""
    return encode_sample(f"s{i:05d}", Concept(colour, shape, place), random.Random(i))


TINY = ["model.image.width=32", "model.image.depth=1", "model.image.heads=2",
        "model.audio.width=32", "model.audio.depth=1", "model.audio.heads=2",
        "model.fusion.heads=2", "model.fusion.embed_dim=16",
        "model.decoder.width=32", "model.decoder.layers=1", "model.decoder.heads=2"]


def synthetic_batch(cfg, n=6, partial=False):
    """n pairs of random media with captions of 1-3 phrases; `partial`: some media missing."""
    tok = Tokenizer(cfg.model.text)
    shapes = SampleParser(cfg, False, tok).media_shapes()
    samples = []
    for i in range(n):
        text = " ".join(["a red circle"] * (1 + i % 3))
        tokens, length = tok([text])
        s = {"__key__": str(i), "tokens": tokens[0], "length": int(length[0]), "captions": [text]}
        for j, m in enumerate(cfg.model.modalities):
            if not partial or (i + j) % 3:
                s[m] = torch.randn(shapes[m])
        samples.append(s)
    return collate(samples, shapes, tok.context_length), tok


def png_bytes(w=8, h=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def flac_bytes(seconds=0.5, sr=16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * sr), dtype=np.float32), sr, format="FLAC")
    return buf.getvalue()
