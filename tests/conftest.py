import importlib.util
import io
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image

from mmpretrain.batch import collate
from mmpretrain.config import load_config
from mmpretrain.data.demo import Concept, encode_sample
from mmpretrain.data.samples import SampleParser
from mmpretrain.tokenizer import Tokenizer

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def benchmark(name: str):
    """benchmarks/<name>.py imported as module `name` (not a package: loaded from its file), registered
    in sys.modules, where dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def run(cmd: list[str], timeout: float, env: dict | None = None, cpu_only: bool = False,
        **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run that cannot hang a test: on timeout the child's whole process group (torchrun
    and its workers included) is killed and the test fails. `cpu_only` hides every GPU from it."""
    env = {**os.environ, **(env or {})}
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_same_run(resumed: list, whole: list) -> None:
    """A resumed run's logged values (floats, or dicts of them per step) are the uninterrupted
    run's, bit for bit: the same steps, keys and values. (They once parted by an ulp: the resumed
    session counted its FLOPs on its own first step, and the kernels under FlopCounterMode round
    differently; the count now travels in the checkpoint.)"""
    rows = lambda run: [m if isinstance(m, dict) else {"value": m} for m in run]  # noqa: E731
    assert rows(resumed) == rows(whole)


class Interrupt(Exception):
    """A crash injected into a training run."""


def run_until_crash(cfg, after_step: int, exc=Interrupt) -> None:
    """train.run(cfg), crashing with `exc` once `after_step` steps are done (before the next)."""
    from mmpretrain import train

    original = train.Trainer.train_step

    def crash(self, batches):
        if self.step == after_step:
            raise exc
        return original(self, batches)

    train.Trainer.train_step = crash
    try:
        with pytest.raises(exc):
            train.run(cfg)
    finally:
        train.Trainer.train_step = original


def pytest_configure(config):
    """Under pytest-xdist (the `-n 2` of pyproject's addopts) each worker gets its share of the
    cores, for its own torch and, through OMP_NUM_THREADS, for the processes its tests start:
    workers x threads = cores, so no core is oversubscribed (OpenMP threads spin while they wait)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One tiny demo corpus shared by the whole session."""
    return str(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory):
    """The compile tests' inductor cache folder, shared by the session and new in each: they compile
    tiny.yaml's image-only model, so the C++ kernels the first builds (g++ is most of a cold compile
    on CPU) the others load, and no session finds kernels an earlier one left in /tmp."""
    return str(tmp_path_factory.mktemp("inductor"))


@pytest.fixture
def tiny_cfg(demo_cache, tmp_path):
    def make(*overrides):
        # CPU tests stay on CPU, and decode in-process, on a GPU machine too (auto would fork);
        # a test's own value for one of these keys replaces it (a key given twice is an error)
        given = {o.split("=", 1)[0] for o in overrides}
        defaults = [f"data.demo.cache_dir={demo_cache}", f"run.dir={tmp_path / 'runs'}", "train.device=cpu",
                    "data.num_workers=0"]
        return load_config(ROOT / "configs" / "tiny.yaml",
                           [d for d in defaults if d.split("=", 1)[0] not in given] + list(overrides))
    return make


def sample_dict(i: int, colour="red", shape="circle", place="in the centre") -> dict:
    """A real (PNG + FLAC + txt) sample from the demo renderer."""
    return encode_sample(f"s{i:05d}", Concept(colour, shape, place), random.Random(i))


TINY = ["model.image.width=32", "model.image.depth=1", "model.image.heads=2",
        "model.audio.width=32", "model.audio.depth=1", "model.audio.heads=2",
        "model.fusion.heads=2", "model.fusion.embed_dim=16",
        "model.video.width=32", "model.video.depth=1", "model.video.heads=2",
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


def per_sequence_reference(q, k, v, lengths):
    """Each sequence alone through SDPA with is_causal (the definition packing must match)."""
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        o = F.scaled_dot_product_attention(*(t[sl].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True)
        outs.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


@pytest.fixture
def bf16_only_varlen(monkeypatch):
    """Stand in for CUDA's flash `varlen_attn` on CPU: "available", and like flash it refuses
    anything but fp16/bf16 (the error the GPU raised), so the dtype contract is tested here."""
    from mmpretrain import attention

    calls = []

    def fake(q, k, v, packing):
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        calls.append(q.dtype)
        return attention._sdpa_packed(q, k, v, packing)

    monkeypatch.setitem(attention.KERNELS, "varlen", fake)
    monkeypatch.setattr(attention, "varlen_status", lambda device_type: (True, "bf16-only stand-in"))
    attention.resolve_backend.cache_clear()
    attention._log_cast.cache_clear()  # each test sees its own "logged once"
    yield calls
    attention.resolve_backend.cache_clear()


def small_eval_shard(folder, n: int = 8) -> str:
    """A shard of n demo samples (image, audio, caption; n distinct concepts) -> its path: for
    `data.eval_sources` of a run whose test asserts nothing about its evaluation. The run's final
    evaluation still runs, on these n samples, and no longer on the demo corpus's 100 held-out
    samples, its classification sets and linear probes (which only the demo eval source adds)."""
    import itertools

    import webdataset as wds

    from mmpretrain.data.demo import COLOURS, PLACES, SHAPES

    concepts = itertools.islice(itertools.product(COLOURS, SHAPES, PLACES), n)
    path = str(folder / "small-eval.tar")
    with wds.TarWriter(path) as sink:
        for i, c in enumerate(concepts):
            sink.write(encode_sample(f"e{i:05d}", Concept(*c), random.Random(i)))
    return path


def png_bytes(w=8, h=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def flac_bytes(seconds=0.5, sr=16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * sr), dtype=np.float32), sr, format="FLAC")
    return buf.getvalue()


def pytest_collection_modifyitems(items):
    """The two compile tests first, the single-process one before the FSDP one: its kernels, in
    the shared `inductor_cache`, save the FSDP one's two ranks most of a cold compile; and under
    xdist their worker (one `xdist_group`) starts the longest chain of the suite at once."""
    order = ["test_compiled_blocks_equal_eager_without_graph_breaks",
             "test_torchrun_fsdp_with_compiled_blocks_matches_eager"]
    first = sorted((i for i in items if i.name in order), key=lambda i: order.index(i.name))
    items[:] = first + [i for i in items if i not in first]
