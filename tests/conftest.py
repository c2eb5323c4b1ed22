import io
import random

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmpretrain.config import load_config
from mmpretrain.data.demo import Concept, encode_sample

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


def png_bytes(w=8, h=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def flac_bytes(seconds=0.5, sr=16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * sr), dtype=np.float32), sr, format="FLAC")
    return buf.getvalue()
