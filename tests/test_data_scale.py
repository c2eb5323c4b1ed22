"""The stream at scale: weighted sources, resampled mode, equal epochs on uneven ranks, seek-resume."""

import collections
import functools
import json

import pytest
import torch
import webdataset as wds

from mmpretrain import parallel
from mmpretrain.data import BatchStream
from mmpretrain.data.samples import SampleParser
from mmpretrain.data.sources import Source
from mmpretrain.tokenizer import Tokenizer

from conftest import ROOT, run, sample_dict
from test_distributed import _join, _run_workers, _send


def _image_text(i: int) -> dict:
    return {"__key__": f"s{i:06d}", **_rendered(i % 7, i % 3)}


@functools.cache
def _rendered(seed: int, shape: int) -> dict:
    """One of 21 rendered samples (the shards repeat them: rendering is most of writing 12k)."""
    s = sample_dict(seed, shape=("circle", "square", "ring")[shape])
    return {"png": s["png"], "txt": s["txt"]}  # no audio: cheap to decode


def _shards(folder, name: str, sizes: list[int]) -> list[str]:
    """Tar shards of image+text samples, `sizes[i]` samples in shard i."""
    folder.mkdir(parents=True, exist_ok=True)
    urls, n = [], 0
    for i, size in enumerate(sizes):
        url = str(folder / f"{name}-{i:04d}.tar")
        with wds.TarWriter(url) as sink:
            for _ in range(size):
                sink.write({**_image_text(n), "__key__": f"{name}{n:06d}"})
                n += 1
        urls.append(url)
    return urls


def _shares(stream, samples: int) -> dict[str, float]:
    it, seen = iter(stream), 0
    while seen < samples:
        seen += len(next(it))
    total = sum(stream.drawn.values())
    return {k: v / total for k, v in stream.drawn.items()}


def test_weighted_sources_reach_their_proportions_over_10k_samples(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.batch_size=100")
    sources = [Source("big", 0.7, _shards(tmp_path, "big", [2000] * 4)),
               Source("small", 0.3, _shards(tmp_path, "small", [2000] * 2))]
    stream = BatchStream(sources, cfg, Tokenizer(cfg.model.text), 100)
    shares = _shares(stream, 10_000)
    assert stream.epoch == 0  # 10k samples fit in one epoch: the first source runs out at ~11.4k
    assert abs(shares["big"] - 0.7) < 0.02 and abs(shares["small"] - 0.3) < 0.02, shares


def test_resampled_mode_is_endless_and_keeps_the_weights(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.batch_size=50", "data.resampled=true")
    sources = [Source("a", 0.7, _shards(tmp_path, "a", [20, 20])), Source("b", 0.3, _shards(tmp_path, "b", [20]))]
    stream = BatchStream(sources, cfg, Tokenizer(cfg.model.text), 50)
    shares = _shares(stream, 2_000)  # 33x the data
    assert stream.epoch == 0
    assert abs(shares["a"] - 0.7) < 0.035, shares


def test_realised_shares_reach_metrics(demo_cache, tmp_path):
    proc = run(["python", "-m", "mmpretrain.train", str(ROOT / "configs" / "tiny.yaml"),
                f"data.demo.cache_dir={demo_cache}", f"run.dir={tmp_path}", "train.device=cpu", "train.steps=2",
                "train.log_every=1", "data.sources=[{pattern: demo, weight: 3, name: a}, {pattern: demo, name: b}]"],
               timeout=240, cpu_only=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").open()]
    assert [sorted(r["source_share"]) for r in records] == [["a", "b"]] * 2
    assert all(abs(sum(r["source_share"].values()) - 1) < 1e-9 for r in records)
    from PIL import Image

    from mmpretrain.plots import _configured_shares

    assert _configured_shares(tmp_path / "tiny") == {"a": 0.75, "b": 0.25}  # the dashed lines
    # loss, retrieval, the demo's zero-shot classification sets, and a fourth panel: the mix
    assert Image.open(tmp_path / "tiny" / "curves.png").size[0] == 4 * 600


def _uneven_worker(rank, world, port, urls, batches, queue):
    """Each rank reads its own shards (of very different sizes) and trains in lockstep: a
    collective per batch, as a training step has."""
    env = _join(rank, world, port)
    from mmpretrain.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["data.shuffle_buffer=0"])
    stream = BatchStream(urls, cfg, Tokenizer(cfg.model.text), 4, env.dp_rank, env.dp_size,
                         agree=lambda ended: parallel.any_rank(torch.tensor(ended)))
    seen, error = [], None
    try:
        for batch, _ in zip(stream, range(batches)):
            parallel.all_reduce_mean(torch.tensor(float(len(batch))))
            seen.append((stream.epoch, stream.batch_in_epoch))
    except RuntimeError as e:
        error = str(e)
    _send(queue, rank, seen, error)
    parallel.cleanup()


def test_uneven_shards_give_every_rank_the_same_epochs_and_never_hang(tmp_path):
    urls = _shards(tmp_path, "u", [40, 8])  # rank 0: 10 batches of 4 per epoch, rank 1: 2
    results = _run_workers(_uneven_worker, urls, 9)
    (_, seen0, err0), (_, seen1, err1) = results
    assert err0 is None and err1 is None
    assert seen0 == seen1 == [(e, b) for e in range(5) for b in (1, 2)][:9]  # the short rank sets the pace
    # a rank with no full batch at all: every rank stops with the same error (none waits)
    results = _run_workers(_uneven_worker, _shards(tmp_path / "tiny", "t", [40, 2]), 3)
    assert all(seen == [] and "no full batch" in err for _, seen, err in results)


def _positions_equal(a, b):
    return a.keys == b.keys and torch.equal(a.media["image"], b.media["image"]) and torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_seeks_equals_uninterrupted_and_decodes_nothing_it_skips(tiny_cfg, tmp_path, monkeypatch, workers):
    cfg = tiny_cfg("train.batch_size=8", f"data.num_workers={workers}", "data.shuffle_buffer=30")
    sources = [Source("a", 0.6, _shards(tmp_path, "a", [20] * 4)), Source("b", 0.4, _shards(tmp_path, "b", [25] * 2))]
    tok = Tokenizer(cfg.model.text)
    whole = BatchStream(sources, cfg, tok, 8)
    it = iter(whole)
    expected = [next(it) for _ in range(12)]  # 2 epochs and a bit
    for cut in (1, 5, 7):
        stream = BatchStream(sources, cfg, tok, 8)
        it = iter(stream)
        for _ in range(cut):
            next(it)
        state = stream.state_dict()
        decoded = collections.Counter()
        parse = SampleParser.__call__
        monkeypatch.setattr(SampleParser, "__call__", lambda self, raw, rng: decoded.update([raw["__key__"]])
                            or parse(self, raw, rng))
        resumed = BatchStream(sources, cfg, tok, 8)
        resumed.load_state_dict(state)
        it = iter(resumed)
        first = next(it)
        assert _positions_equal(first, expected[cut])
        if workers == 0:  # counted in this process: only the samples of the batch it delivered
            assert sorted(decoded) == sorted(first.keys)
        monkeypatch.setattr(SampleParser, "__call__", parse)
        for want in expected[cut + 1:]:
            assert _positions_equal(next(it), want)


def _drain_epoch(stream) -> list[str]:
    """Keys of the batches `stream` delivers until its epoch ends."""
    it, epoch, keys = iter(stream), stream.epoch, []
    for batch in it:
        if stream.epoch != epoch:
            break
        keys += batch.keys
    return keys


@pytest.mark.parametrize("new_world,new_workers", [(1, 2), (4, 1), (3, 1), (1, 0)])
def test_resume_on_another_number_of_ranks_repeats_and_drops_nothing(tiny_cfg, tmp_path, new_world, new_workers):
    """Written by 2 ranks x 2 workers (4 logical readers) 3 batches into the epoch; resumed on
    `new_world` ranks: the epoch's samples are those of the uninterrupted run, each once."""
    cfg = tiny_cfg("train.batch_size=4", "data.num_workers=2", "data.shuffle_buffer=10")
    urls = _shards(tmp_path, "r", [13] * 5)
    tok = Tokenizer(cfg.model.text)
    whole = [k for r in range(2) for k in _drain_epoch(BatchStream(urls, cfg, tok, 4, r, 2))]
    assert len(whole) == len(set(whole)) and len(whole) >= 48  # each reader drops < one batch
    before, states = [], []
    for r in range(2):
        stream = BatchStream(urls, cfg, tok, 4, r, 2)
        it = iter(stream)
        before += [k for _ in range(3) for k in next(it).keys]
        states.append(stream.state_dict())
    cfg.data.num_workers = new_workers
    after = []
    for r in range(new_world):
        stream = BatchStream(urls, cfg, tok, 4, r, new_world)
        stream.reshard(states)
        assert stream.epoch == 0
        after += _drain_epoch(stream)
    assert sorted(before + after) == sorted(whole)


def test_resume_on_more_ranks_than_logical_readers_starts_the_next_epoch(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.batch_size=4")
    urls = _shards(tmp_path, "n", [13] * 3)
    stream = BatchStream(urls, cfg, Tokenizer(cfg.model.text), 4, 0, 1)  # one logical reader
    next(iter(stream))
    wider = BatchStream(urls, cfg, Tokenizer(cfg.model.text), 4, 1, 2)
    wider.reshard([stream.state_dict()])
    assert (wider.epoch, wider.positions, wider.drawn) == (1, {}, {})  # rank 1 carries no counts


def test_auto_workers_feed_a_gpu_and_stay_out_of_the_way_on_a_cpu(tiny_cfg, monkeypatch):
    from mmpretrain.data.stream import worker_count

    cfg = tiny_cfg("data.num_workers=-1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_count(cfg) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert worker_count(cfg) == 3  # 16 CPUs over 4 processes, one left to each training loop
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert worker_count(cfg) == 8
    assert worker_count(tiny_cfg("data.num_workers=2")) == 2
