import itertools
import json
import re
import io
import random
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from mmpretrain.config import ConfigError, SourceConfig
from mmpretrain.data import BatchStream, eval_batches, resolve_sources
from mmpretrain.data.demo import EVAL_CONCEPTS, demo_corpus, split_concepts
from mmpretrain.tokenizer import Tokenizer

from conftest import flac_bytes, png_bytes, run_until_crash, sample_dict


def write_shardwriter(folder, samples, maxcount=8):
    with wds.ShardWriter(str(folder / "sw-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    n = (len(samples) + maxcount - 1) // maxcount
    return str(folder / f"sw-{{000000..{n - 1:06d}}}.tar")


def write_tarfile(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def all_eval(cfg, pattern):
    cfg.data.eval_sources = [pattern]
    tok = Tokenizer(cfg.model.text)
    return list(eval_batches(resolve_sources(cfg.data, "eval"), cfg, tok, batch_size=4))


def test_tokenizer_equals_open_clips_and_caches_per_caption(tiny_cfg):
    from open_clip.tokenizer import SimpleTokenizer

    tok = Tokenizer(tiny_cfg().model.text)
    ref = SimpleTokenizer(context_length=tok.context_length)
    texts = ["a red circle", "", "  Café &amp; crème\u2019s   ", "one " * 40, "a red circle"]
    tokens, lengths = tok(texts)
    assert torch.equal(tokens, ref(texts)) and tokens.dtype == torch.long
    assert lengths.tolist() == [int((row != 0).sum()) for row in tokens]
    assert lengths[3] == tok.context_length and tokens[3, -1] == tok.eot_id  # truncated, eot kept
    assert tok._caption_ids.cache_info().hits == 1  # the repeated caption


def test_reads_shardwriter_shards(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    samples = [sample_dict(i) for i in range(10)]
    batches = all_eval(cfg, write_shardwriter(tmp_path, samples, maxcount=4))  # 3 shards via braces
    assert [len(b) for b in batches] == [4, 4, 2]
    b = batches[0]
    assert b.media["image"].shape == (4, 3, 16, 16) and b.media["audio"].shape == (4, 8000)
    assert b.present["image"].all() and b.present["audio"].all()
    assert b.tokens[0, 0] == 49406 and b.lengths[0] == (b.tokens[0] != 0).sum()
    assert sorted(k for b in batches for k in b.keys) == sorted(s["__key__"] for s in samples)


def test_reads_plain_tarfile_with_partial_modalities(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    path = write_tarfile(tmp_path / "plain.tar", [
        ("a.txt", b"a red circle"), ("a.png", png_bytes()), ("a.wav", flac_bytes()),  # .wav key, flac bytes
        ("b.txt", b"only an image"), ("b.jpg", png_bytes(20, 12)),
        ("c.txt", b"only a sound"), ("c.flac", flac_bytes(2.0, 8000)),  # resampled, cropped
    ])
    (b,) = all_eval(cfg, path)
    assert b.keys == ["a", "b", "c"]
    assert b.present["image"].tolist() == [True, True, False]
    assert b.present["audio"].tolist() == [True, False, True]
    assert b.media["audio"].shape == (3, 8000)
    assert torch.count_nonzero(b.media["image"][2]) == 0  # absent media are zeros


def test_bad_samples_are_skipped_and_counted(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    good = sample_dict(0)
    path = write_tarfile(tmp_path / "bad.tar", [
        ("g.txt", good["txt"].encode()), ("g.png", good["png"]), ("g.flac", good["flac"]),
        ("x.txt", b"broken image"), ("x.png", b"not a png at all"),
        ("y.png", good["png"]),  # no caption
        ("z.txt", b"broken audio"), ("z.flac", b"RIFF....garbage"),
        ("e.txt", b"   "), ("e.png", good["png"]),  # empty caption
        ("n.txt", b"caption with no media"),
        ("p.pyd", b"\x80\x04pickled"), ("p.txt", b"pickle is ignored"), ("p.png", good["png"]),
    ])
    batches = all_eval(cfg, path)
    keys = [k for b in batches for k in b.keys]
    assert keys == ["g", "p"]
    skipped = {}
    for b in batches:
        for k, v in b.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped == {"bad_image": 1, "missing_text": 1, "bad_audio": 1, "empty_text": 1, "no_media": 1}


def test_truncated_tar_does_not_stop_the_stream(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    good = write_shardwriter(tmp_path, [sample_dict(i) for i in range(6)], maxcount=6)
    data = (tmp_path / "sw-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    cfg.data.eval_sources = [str(tmp_path / "cut.tar"), good]
    tok = Tokenizer(cfg.model.text)
    batches = list(eval_batches(resolve_sources(cfg.data, "eval"), cfg, tok, batch_size=64))
    keys = [k for b in batches for k in b.keys]
    assert keys[-6:] == [f"s{i:05d}" for i in range(6)]  # the good shard is read in full
    assert sum(b.skipped.get("bad_tar", 0) for b in batches) >= 1


def test_image_pixel_limit(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model.image.max_pixels=100")
    path = write_tarfile(tmp_path / "big.tar", [("a.txt", b"big"), ("a.png", png_bytes(20, 20)),
                                                ("b.txt", b"small"), ("b.png", png_bytes(10, 10))])
    (batch,) = all_eval(cfg, path)
    assert batch.keys == ["b"] and batch.skipped == {"image_too_large": 1}


def test_stream_is_deterministic_and_resumes_exactly(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.batch_size=8")
    pattern = write_shardwriter(tmp_path, [sample_dict(i, shape=s) for i, s in
                                           enumerate(["circle", "square", "ring"] * 12)], maxcount=10)
    cfg.data.sources = [SourceConfig(pattern)]
    tok = Tokenizer(cfg.model.text)
    urls = resolve_sources(cfg.data, "train")
    first = iter(BatchStream(urls, cfg, tok, 8))
    seq = [next(first) for _ in range(10)]  # 4 batches per epoch: crosses epochs
    again = iter(BatchStream(urls, cfg, tok, 8))
    assert all(a.keys == b.keys and torch.equal(a.media["image"], b.media["image"])
               for a, b in zip(seq, (next(again) for _ in range(10))))
    assert seq[0].keys != seq[4].keys  # a new epoch reshuffles
    stream = BatchStream(urls, cfg, tok, 8)
    it = iter(stream)
    for _ in range(6):
        next(it)
    state = stream.state_dict()
    resumed = BatchStream(urls, cfg, tok, 8)
    resumed.load_state_dict(state)
    rest = iter(resumed)
    for expected in seq[6:]:
        got = next(rest)
        assert got.keys == expected.keys
        assert torch.equal(got.media["audio"], expected.media["audio"])


def _two_epochs(tiny_cfg, tmp_path):
    """30 samples in 6 shards of 5, batches of 4: one reader's epoch is 7 batches with 2 samples
    left over; two readers' (one each of 2 ranks) 3 batches each with 3 left over; three
    readers' 2 with 2 left over (so every rank of a run gets the same number of batches: agreeing
    on an epoch's end, as `agree` does across processes, changes nothing here)."""
    cfg = tiny_cfg("train.batch_size=4", "data.shuffle_buffer=10")
    cfg.data.sources = [SourceConfig(write_shardwriter(tmp_path, [sample_dict(i) for i in range(30)], maxcount=5))]
    return cfg, resolve_sources(cfg.data, "train"), Tokenizer(cfg.model.text)


def _batches(stream, n: int) -> list[tuple[int, list[str]]]:
    """(epoch, keys) of the next `n` batches of `stream`."""
    return [(stream.epoch, batch.keys) for batch in itertools.islice(stream, n)]


def test_resume_at_every_cut_of_two_epochs_on_one_process(tiny_cfg, tmp_path):
    """Cut after every batch of two epochs, both epoch ends included (the resumed epoch has less
    than a batch left: it goes on to the next): the resumed batches are the uninterrupted ones."""
    cfg, urls, tok = _two_epochs(tiny_cfg, tmp_path)
    whole = _batches(BatchStream(urls, cfg, tok, 4), 15)
    assert [epoch for epoch, _ in whole] == [0] * 7 + [1] * 7 + [2]
    for cut in range(1, 15):
        stream = BatchStream(urls, cfg, tok, 4)
        _batches(stream, cut)
        resumed = BatchStream(urls, cfg, tok, 4)
        resumed.load_state_dict(stream.state_dict())
        assert _batches(resumed, 15 - cut) == whole[cut:], f"cut after batch {cut}"


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_from_two_ranks_at_every_cut_of_two_epochs(tiny_cfg, tmp_path, new_world):
    """Two ranks cut after every batch of two epochs (both epoch ends included), resumed on
    `new_world` ranks: on 1, the interrupted epoch goes on with the old readers' batches not yet
    delivered, each once (none at an epoch's end, where each holds less than a batch); on 3 (more
    ranks than old readers) it ends there. Then the next epoch is the new ranks' own."""
    cfg, urls, tok = _two_epochs(tiny_cfg, tmp_path)
    old = [_batches(BatchStream(urls, cfg, tok, 4, r, 2), 6) for r in range(2)]  # 3 batches an epoch
    per_epoch = 30 // new_world // 4
    own = [_batches(BatchStream(urls, cfg, tok, 4, r, new_world), 3 * per_epoch) for r in range(new_world)]
    for cut in range(1, 7):
        states = []
        for r in range(2):
            stream = BatchStream(urls, cfg, tok, 4, r, 2)
            _batches(stream, cut)
            states.append(stream.state_dict())
        epoch = (cut - 1) // 3
        left = sorted(keys for r in range(2) for _, keys in old[r][cut:3 * epoch + 3]) if new_world == 1 else []
        for r in range(new_world):
            resumed = BatchStream(urls, cfg, tok, 4, r, new_world)
            resumed.reshard(states)
            got = _batches(resumed, len(left) + per_epoch)
            assert sorted(keys for e, keys in got[:len(left)] if e == epoch) == left, f"cut after batch {cut}"
            assert got[len(left):] == [b for b in own[r] if b[0] == epoch + 1], f"cut after batch {cut}"


def test_demo_corpus_is_zero_shot(demo_cache, tmp_path):
    seen, held = split_concepts(0)
    assert len(held) == EVAL_CONCEPTS >= 100
    assert not set(seen) & set(held)
    assert len({c.caption for c in held}) == len(held)  # distinct captions
    for attr in ("colour", "shape", "place"):  # every attribute value is learnable from train
        assert {getattr(c, attr) for c in held} <= {getattr(c, attr) for c in seen}
    paths = demo_corpus(demo_cache, variants_per_concept=1)
    assert demo_corpus(demo_cache, variants_per_concept=1) == paths  # cached, not regenerated
    captions = []
    for url in __import__("braceexpand").braceexpand(paths["eval"]):
        for s in wds.WebDataset(url, shardshuffle=False):
            captions.append(s["txt"].decode())
            assert {"png", "flac", "txt", "json"} <= set(s)
    assert sorted(captions) == sorted(c.caption for c in held)
    # byte-for-byte reproducible, with plain ustar headers (no pax header per member)
    again = demo_corpus(str(tmp_path / "again"), variants_per_concept=1)["eval"].replace("{000000..000000}", "000000")
    first = paths["eval"].replace("{000000..000000}", "000000")
    assert Path(again).read_bytes() == Path(first).read_bytes()
    with tarfile.open(first) as tar:
        assert all(not m.pax_headers for m in tar.getmembers())


@pytest.mark.parametrize("corpus", ["demo", "demo-video"])
def test_demo_corpora_write_their_eval_split_as_classification_sets(tiny_cfg, corpus):
    """classify/<modality>-<attribute>/ in CLIP_benchmark's layout: the eval samples' own media bytes, each
    labelled by the attribute its caption names (and the shape's beats for audio)."""
    from mmpretrain.data.demo import PROBE_TRAIN_SAMPLES
    from mmpretrain.data.sources import demo_classification_sets
    from mmpretrain.eval.classify import read_classnames, read_samples, read_templates, split_shards

    cfg = tiny_cfg(f"data.eval_sources=[{corpus}]", f"data.sources=[{corpus}]")
    sets = demo_classification_sets(cfg.data, ["image", "audio", "video"])
    expected = {"demo": {"image-shape": ("png", "shape"), "audio-rhythm": ("flac", "shape")},
                "demo-video": {"video-direction": ("mp4", "motion")}}[corpus]
    assert set(sets) == set(expected)
    assert demo_classification_sets(cfg.data, ["audio"]).keys() == set(expected) & {"audio-rhythm"}
    eval_samples = {s[ext]: json.loads(s["json"]) for ext, _ in expected.values()
                    for _, s in read_samples([Path(u) for u in resolve_sources(cfg.data, "eval")])}
    for name, (ext, attribute) in expected.items():
        classnames = read_classnames(sets[name])
        assert len(read_templates(sets[name])) >= 3
        labels = []
        for _, s in read_samples(split_shards(sets[name], "test")):
            assert set(s) == {ext, "cls"}
            labels.append(int(s["cls"]))
            # the eval sample's own bytes, labelled by the class its caption names
            assert eval_samples[s[ext]][attribute] == classnames[labels[-1]]
        assert len(labels) == EVAL_CONCEPTS and set(labels) == set(range(len(classnames)))
        assert len(classnames) == {"shape": 6, "motion": 4}[attribute]
        # train/ (the linear probe's): training samples spread over the split, labelled alike
        train_samples = {s[ext]: json.loads(s["json"]) for _, s in
                         read_samples([Path(u) for u in resolve_sources(cfg.data, "train")]) if ext in s}
        train = [(s[ext], int(s["cls"])) for _, s in read_samples(split_shards(sets[name], "train"))]
        assert len(train) == min(len(train_samples), PROBE_TRAIN_SAMPLES)
        assert all(train_samples[media][attribute] == classnames[label] for media, label in train)
        assert set(label for _, label in train) == set(range(len(classnames)))


def _budget_batches(tiny_cfg, tmp_path, budget, samples):
    from mmpretrain.data.stream import _EpochDataset

    cfg = tiny_cfg(f"data.max_tokens={budget}", "train.batch_size=100", "data.shuffle_buffer=0")
    cfg.data.sources = [SourceConfig(write_shardwriter(tmp_path, samples, maxcount=20))]
    tok = Tokenizer(cfg.model.text)
    media = len(cfg.model.modalities) * cfg.model.fusion.num_latents
    return list(_EpochDataset(resolve_sources(cfg.data, "train"), cfg, tok, 100, epoch=0, train=True)), media


def test_token_budget_rows_are_full(tiny_cfg, tmp_path):
    samples = [sample_dict(i) for i in range(12)]
    samples[5]["txt"] = "a red circle " * 20  # truncated to the 16-token context: 36 decoder tokens
    batches, media = _budget_batches(tiny_cfg, tmp_path, 60, samples)
    sizes = [[int(2 * n) + media for n in b.lengths] for b in batches]
    assert [b.keys[0] for b in batches] == ["s00000", "s00003", "s00005", "s00007"]
    for row, following in zip(sizes, sizes[1:]):
        assert sum(row) <= 60 < sum(row) + following[0]  # closed only when the next would overflow
    assert sizes[2] == [36, 20]


def test_sample_over_token_budget_is_skipped(tiny_cfg, tmp_path):
    samples = [sample_dict(i) for i in range(4)]  # pairs of 20 tokens; a budget fits any pair
    samples[1] = {"__key__": "s00001", "doc.json": json.dumps({"interleaved": [{"text": "a red circle " * 20}]})}
    batches, _ = _budget_batches(tiny_cfg, tmp_path, 36, samples)
    assert [b.keys for b in batches] == [["s00000"], ["s00002"]]  # the last row is dropped (train)
    assert sum(b.skipped.get("over_token_budget", 0) for b in batches) == 1


def test_interleaved_documents(tiny_cfg, tmp_path, demo_cache):
    cfg = tiny_cfg()
    docs = demo_corpus(demo_cache, variants_per_concept=1)["docs"]
    good = next(iter(wds.WebDataset(docs, shardshuffle=False)))
    order = json.loads(good["doc.json"])["interleaved"]
    broken = {"__key__": "broken", "doc.json": json.dumps({"interleaved": [{"text": "a"}, {"image": "gone.png"}]})}
    members = [(f"{good['__key__']}.{k}", v) for k, v in good.items() if not k.startswith("__")]
    members += [("broken.doc.json", broken["doc.json"].encode()), ("pair.txt", b"a red circle"),
                ("pair.png", png_bytes())]
    (batch,) = all_eval(cfg, write_tarfile(tmp_path / "docs.tar", members))
    assert batch.keys == ["pair"] and len(batch) == 2 and batch.skipped == {"bad_document": 1}
    (doc,) = batch.documents
    assert [k for k, _ in doc] == [next(iter(seg)) for seg in order]
    tok = Tokenizer(cfg.model.text)
    texts = [seg["text"] for seg in order if "text" in seg]
    assert all(torch.equal(a, b) for a, b in zip([v for k, v in doc if k == "text"], tok.document_ids(texts)))
    assert tok.decode(torch.cat([v for k, v in doc if k == "text"])).startswith(texts[0][:-1])
    media = [v for k, v in doc if k != "text"]
    assert all(v.shape in ((3, 16, 16), (8000,)) for v in media)


def test_document_only_batch_trains(tiny_cfg, demo_cache):
    from mmpretrain.build import build_task

    cfg = tiny_cfg("data.eval_sources=[demo-docs]")
    tok = Tokenizer(cfg.model.text)
    batch = next(iter(eval_batches(resolve_sources(cfg.data, "eval"), cfg, tok, batch_size=4)))
    assert len(batch.keys) == 0 and len(batch.documents) == 4
    task = build_task(cfg, tok.vocab_size)
    loss, terms = task(batch)
    assert set(terms) == {"next_token"} and torch.isfinite(loss)  # no pairs: nothing to contrast
    loss.backward()
    assert task.model.towers["image"].encoder.vit.blocks[0].attn.qkv.weight.grad is not None


def test_worker_processes_split_shards_deterministically(tiny_cfg, tmp_path):
    cfg = tiny_cfg("data.num_workers=2", "data.shuffle_buffer=8")
    cfg.data.sources = [SourceConfig(write_shardwriter(tmp_path, [sample_dict(i) for i in range(24)], maxcount=6))]
    tok = Tokenizer(cfg.model.text)
    urls = resolve_sources(cfg.data, "train")

    def epoch_keys():
        it = iter(BatchStream(urls, cfg, tok, 4))
        return [next(it).keys for _ in range(6)]  # 24 samples, 4 shards over 2 workers

    first = epoch_keys()
    assert epoch_keys() == first
    assert sorted(k for keys in first for k in keys) == [f"s{i:05d}" for i in range(24)]


def test_several_captions_per_item_clip_benchmark_layout(tiny_cfg, tmp_path):
    path = write_tarfile(tmp_path / "multi.tar", [
        ("a.txt", b"a red circle\nthe circle is red, said\\nwith a newline\n\n"), ("a.png", png_bytes()),
        ("b.txt", b"one caption"), ("b.png", png_bytes())])
    (batch,) = all_eval(tiny_cfg(), path)
    assert batch.captions == [["a red circle", "the circle is red, said with a newline"], ["one caption"]]
    tok = Tokenizer(tiny_cfg().model.text)
    assert torch.equal(batch.tokens[0], tok(["a red circle"])[0][0])  # eval: the first caption


def test_eval_counts_every_caption_as_a_query(tiny_cfg, tmp_path):
    from mmpretrain.eval.retrieval import evaluate
    from mmpretrain.model import MultimodalModel

    cfg = tiny_cfg()
    samples = [sample_dict(i, colour=c) for i, c in enumerate(["red", "green", "blue"])]
    samples[0]["txt"] += "\nanother caption\nand a third"
    cfg.data.eval_sources = [write_shardwriter(tmp_path, samples)]
    tok = Tokenizer(cfg.model.text)
    model = MultimodalModel(cfg.model, tok.vocab_size)
    r = evaluate(model, cfg, tok, resolve_sources(cfg.data, "eval"), "cpu")
    assert r["text->image"]["n"] == 5 and r["image->text"]["n"] == 3 and r["image->audio"]["n"] == 3


# --------------------------------------------------------------------------- public layouts, counting


def jpg_bytes(colour=(0, 0, 255)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 12), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_public_shard_layouts_train_without_skips(tiny_cfg, tmp_path):
    """img2dataset (jpg + txt + json), LAION-CLAP / audio-630k (flac + json "text", a list or a
    string, no txt), a json "caption" alone (WebVid exports), `.caption` members, and joint
    jpg + flac + txt, all in one stream."""
    img2dataset = [{"__key__": f"i{i}", "jpg": jpg_bytes(), "txt": "a blue square",
                    "json": json.dumps({"caption": "ignored: txt comes first", "width": 20, "status": "success"})}
                   for i in range(4)]
    clap = [{"__key__": f"c{i}", "flac": flac_bytes(), "json": json.dumps(
        {"text": ["a dog barks", "barking"] if i % 2 else "rain on a roof", "original_data": {"fs": 16000}})}
        for i in range(4)]
    caption_json = [{"__key__": f"w{i}", "jpg": jpg_bytes(), "json": json.dumps({"caption": "a red frame"})}
                    for i in range(4)]
    dot_caption = [{"__key__": f"d{i}", "png": png_bytes(), "caption": "a caption member"} for i in range(2)]
    joint = [sample_dict(i) for i in range(4)]
    cfg = tiny_cfg("data.shuffle_buffer=0")
    cfg.data.sources = [SourceConfig(write_shardwriter(tmp_path, img2dataset + clap + caption_json + dot_caption + joint,
                                          maxcount=5))]
    stream = BatchStream(resolve_sources(cfg.data, "train"), cfg, Tokenizer(cfg.model.text), 6)
    it = iter(stream)
    batches = [next(it) for _ in range(3)]  # one epoch of 18 samples
    assert sum(len(b) for b in batches) == 18 and not stream.skipped
    captions = {k: c for b in batches for k, c in zip(b.keys, b.captions)}
    assert captions["i0"] == ["a blue square"] and captions["w0"] == ["a red frame"]
    assert captions["c0"] == ["rain on a roof"] and captions["c1"] == ["a dog barks", "barking"]
    assert captions["d0"] == ["a caption member"]
    present = {k: (bool(b.present["image"][j]), bool(b.present["audio"][j]))
               for b in batches for j, k in enumerate(b.keys)}
    assert present["i0"] == (True, False) and present["c0"] == (False, True) and present["s00000"] == (True, True)


def test_caption_keys_are_configurable(tiny_cfg, tmp_path):
    path = write_tarfile(tmp_path / "alt.tar", [("a.json", json.dumps({"alt": "from alt"}).encode()),
                                                ("a.png", png_bytes()), ("a.txt", b"from txt")])
    (batch,) = all_eval(tiny_cfg("data.caption_keys=[json:alt, txt]"), path)
    assert batch.captions == [["from alt"]]
    (batch,) = all_eval(tiny_cfg("data.caption_keys=[json:caption]"), path)  # none of them: skipped
    assert batch.keys == [] and batch.skipped == {"missing_text": 1}


def test_too_short_audio_is_skipped_not_padded_from_nothing(tiny_cfg, tmp_path):
    path = write_tarfile(tmp_path / "short.tar", [
        ("a.txt", b"a blip"), ("a.flac", flac_bytes(seconds=0.02)),
        ("b.txt", b"long enough"), ("b.flac", flac_bytes(seconds=0.3))])
    batches = all_eval(tiny_cfg(), path)
    assert [k for b in batches for k in b.keys] == ["b"]
    assert sum(b.skipped.get("audio_too_short", 0) for b in batches) == 1
    (batch,) = all_eval(tiny_cfg("model.audio.min_seconds=0.5"), path)
    assert batch.keys == [] and batch.skipped == {"audio_too_short": 2}


def test_skips_are_counted_exactly_once_across_epochs_and_resume(tiny_cfg, tmp_path):
    """Bad samples after an epoch's last full batch count too, each once per epoch it is read,
    and a resumed stream neither loses nor repeats them."""
    samples = [sample_dict(i) for i in range(10)]
    for i in (2, 8, 9):  # 8 and 9 come after the last full batch of 3 (7 good samples)
        samples[i]["png"] = b"not an image"
    samples[5]["txt"] = "   "
    cfg = tiny_cfg("data.shuffle_buffer=0")
    cfg.data.sources = [SourceConfig(write_shardwriter(tmp_path, samples, maxcount=10))]
    urls, tok = resolve_sources(cfg.data, "train"), Tokenizer(cfg.model.text)
    stream = BatchStream(urls, cfg, tok, 3)
    it = iter(stream)
    for _ in range(2):  # epoch 0: 6 samples in 2 batches, the 7th good one left over
        next(it)
    next(it)  # epoch 1's first batch: epoch 0's trailing skips are in by now
    per_epoch = {"bad_image": 3, "empty_text": 1}
    first_batch_skips = {"bad_image": 1}  # sample 2, inside epoch 1's first batch
    expect = {k: v + first_batch_skips.get(k, 0) for k, v in per_epoch.items()}
    assert dict(stream.skipped) == expect
    resumed = BatchStream(urls, cfg, tok, 3)
    resumed.load_state_dict(stream.state_dict())
    assert next(iter(resumed)).keys == next(it).keys
    assert resumed.skipped == stream.skipped  # replayed batches are not counted again


def test_metrics_sum_to_the_run_summary_and_hold_each_step_once(tiny_cfg, tmp_path, caplog):
    """Killed before the first checkpoint, the rerun starts over and metrics.jsonl holds each step
    once; its per-record skip counts add up to the end-of-run summary."""
    from mmpretrain import train

    samples = [sample_dict(i) for i in range(24)]
    for i in (3, 11, 23):
        samples[i]["png"] = b"broken"
    cfg = tiny_cfg("train.steps=6", "train.batch_size=4", "run.name=skips", "data.shuffle_buffer=0")
    cfg.data.sources = [SourceConfig(write_shardwriter(tmp_path, samples, maxcount=24))]
    run_until_crash(cfg, after_step=3, exc=KeyboardInterrupt)
    with caplog.at_level("WARNING"):
        train.run(cfg)
    records = [json.loads(l) for l in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    summed = {}
    for r in records:
        for k, v in r["skipped_samples"].items():
            summed[k] = summed.get(k, 0) + v
    summary = next(r.message for r in caplog.records if "bad samples skipped" in r.message)
    assert summed == {"bad_image": 4} and str(summed) in summary  # 3 in epoch 0, 1 in epoch 1 so far


def test_retrieval_cli_on_unreadable_shards_is_a_clear_error(tiny_cfg, tmp_path):
    import sys

    from mmpretrain import train
    from conftest import run

    cfg = tiny_cfg("train.steps=1", "run.name=cli")
    train.run(cfg)
    junk = write_tarfile(tmp_path / "junk.tar", [("a.txt", b"caption"), ("a.png", b"not a png")])
    proc = run([sys.executable, "-m", "mmpretrain.eval.retrieval", "--run", str(cfg.run_dir), "--shards", junk,
                "--device", "cpu"], timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--shards: no readable media-caption sample in 1 shard(s) (skipped: {'bad_image': 1})" in proc.stderr


def test_relations_corpus_holds_out_object_pairs_in_every_arrangement(tmp_path):
    import random

    from mmpretrain.data.demo_relations import EVAL_PAIRS, RELATIONS, encode_sample, split_scenes

    train, held = split_scenes(0)
    assert len(held) == 4 * EVAL_PAIRS and not set(train) & set(held)
    pairs = lambda scenes: {frozenset((s.first, s.second)) for s in scenes}  # noqa: E731
    assert not pairs(train) & pairs(held)  # the objects of a held-out scene never meet in training
    for s in held:  # its swapped twin and its other relation are candidates too
        assert {(s.second, s.first), (s.first, s.second)} <= {(h.first, h.second) for h in held if h.relation == s.relation}
    assert {s.relation for s in held} == set(RELATIONS)
    assert {s.first for s in held} <= {s.first for s in train}  # every object is learnable
    s = held[0]
    first, converse = s.captions
    assert first.endswith(" ".join(s.second)) and converse.startswith(("a " if s.second[0][0] not in "aeiou"
                                                                        else "an ") + " ".join(s.second))
    rng = random.Random(0)
    assert encode_sample("k", s, rng, train=False)["txt"] == f"{first}\n{converse}"  # both, one per line
    assert encode_sample("k", s, rng, train=True)["txt"] in s.captions  # one per training sample


def test_image_preprocessing_equals_torchvisions_transforms():
    """The crop-and-resize is one Pillow call; torchvision's resized_crop (train) and resize +
    center_crop (eval) on the decoded tensor are the reference: equal up to rounding."""
    from torchvision.transforms.v2 import functional as TF

    from mmpretrain.encoders.image import ImageEncoderConfig, ImagePreprocess

    cfg = ImageEncoderConfig(image_size=32, mean=[0.48, 0.46, 0.41], std=[0.27, 0.26, 0.28])
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(32, 32), (48, 40), (100, 64), (24, 30)]):
        pixels = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        img = TF.to_pil_image(TF.resize(pixels, [h // 4, w // 4], antialias=True)).resize((w, h))  # smooth
        x = TF.pil_to_tensor(img)
        train = ImagePreprocess(cfg, train=True)
        ref = {"train": TF.resized_crop(x, *train.crop_box(w, h, random.Random(i)), [32, 32], antialias=True),
               "eval": TF.center_crop(TF.resize(x, [32], antialias=True), [32, 32])}
        got = {"train": train(img, random.Random(i)), "eval": ImagePreprocess(cfg, train=False)(img)}
        for split in ("train", "eval"):
            levels = (got[split] * std + mean) * 255 - ref[split].float()  # in grey levels
            assert got[split].shape == (3, 32, 32) and got[split].dtype == torch.float32
            assert levels.abs().mean() < 0.1 and levels.abs().max() < 3.5, (split, (w, h))


class ModelBuilt(Exception):
    """The trainer got as far as building the model: the data checks passed."""


def trainer_until_model(cfg, monkeypatch, dp_size=1):
    """Trainer(cfg) up to its model: the data checks' ConfigError, or ModelBuilt once they pass."""
    from mmpretrain import parallel, train

    def built(*args, **kwargs):
        raise ModelBuilt

    monkeypatch.setattr(train, "build", built)
    train.Trainer(cfg, parallel.DistEnv(dp_size=dp_size), torch.device("cpu"))


def own_data_cfg(tiny_cfg, *patterns, overrides=()):
    cfg = tiny_cfg(*overrides)
    cfg.data.sources = [SourceConfig(p) for p in patterns]
    return cfg


def test_data_smaller_than_one_global_batch_is_refused_before_the_model(tiny_cfg, tmp_path, monkeypatch,
                                                                        demo_cache, capsys):
    from mmpretrain import train

    pattern = write_shardwriter(tmp_path, [sample_dict(i) for i in range(10)], maxcount=4)  # 3 shards
    monkeypatch.setattr(train, "build", lambda *a, **k: pytest.fail("the model was built"))
    tiny = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    code = train.main([tiny, f"data.sources=[{pattern!r}]", f"data.demo.cache_dir={demo_cache}",
                       f"run.dir={tmp_path / 'runs'}", "train.device=cpu", "data.num_workers=0",
                       "train.batch_size=16"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "config error: data.sources: 10 sample(s) in 3 shard(s)" in err and "train.batch_size=16" in err
    cfg = own_data_cfg(tiny_cfg, pattern, overrides=["train.batch_size=8"])
    with pytest.raises(ModelBuilt):  # 10 samples hold a batch of 8 on one rank ...
        trainer_until_model(cfg, monkeypatch)
    with pytest.raises(ConfigError, match=r"10 sample\(s\).*train.batch_size=8 x 2 data-parallel ranks = 16"):
        trainer_until_model(cfg, monkeypatch, dp_size=2)  # ... not on two


def test_data_check_reads_only_until_one_global_batch(tiny_cfg, tmp_path, monkeypatch):
    from mmpretrain.data import sources

    pattern = write_shardwriter(tmp_path, [sample_dict(i) for i in range(40)], maxcount=10)  # 4 shards
    opened = []  # the shards the check opens by name (webdataset's reader opens streams)
    real_open = sources.tarfile.open
    monkeypatch.setattr(sources.tarfile, "open",
                        lambda *a, **k: opened.append(k.get("name")) or real_open(*a, **k))
    cfg = own_data_cfg(tiny_cfg, pattern, overrides=["train.batch_size=12"])
    cfg.data.eval_sources = [str(tmp_path / "sw-000003.tar")]
    with pytest.raises(ModelBuilt):
        trainer_until_model(cfg, monkeypatch)
    # 10 + 10 samples >= 12: the third training shard is never opened; then the eval shard (the
    # media check opens each first shard again, for its first sample's member names)
    assert list(dict.fromkeys(Path(n).name for n in opened if n)) == ["sw-000000.tar", "sw-000001.tar",
                                                                     "sw-000003.tar"]


def test_own_data_evaluated_on_the_demo_corpus_says_so_before_training(tiny_cfg, tmp_path, monkeypatch,
                                                                       caplog):
    pattern = write_shardwriter(tmp_path, [sample_dict(i) for i in range(16)], maxcount=16)
    note = "data.eval_sources is the built-in demo corpus"
    for eval_sources, said in ((["demo"], True), ([pattern], False)):
        cfg = own_data_cfg(tiny_cfg, pattern)
        cfg.data.eval_sources = eval_sources
        caplog.clear()
        with caplog.at_level("INFO"), pytest.raises(ModelBuilt):
            trainer_until_model(cfg, monkeypatch)
        lines = [r.getMessage() for r in caplog.records if note in r.getMessage()]
        assert len(lines) == (1 if said else 0) and "\n" not in "".join(lines)
    caplog.clear()
    with caplog.at_level("INFO"), pytest.raises(ModelBuilt):  # the demo on both sides: nothing to say
        trainer_until_model(tiny_cfg(), monkeypatch)
    assert not [r for r in caplog.records if note in r.getMessage()]


def test_shard_paths_that_are_globs_folders_or_home_relative(tiny_cfg, tmp_path, monkeypatch):
    write_shardwriter(tmp_path, [sample_dict(i) for i in range(16)], maxcount=8)
    cases = {str(tmp_path / "sw-*.tar"): r"a glob.*2 file\(s\) match.*brace pattern",
             str(tmp_path): r"is a folder.*2 \.tar file\(s\).*brace pattern",
             "~/nowhere/sw-000000.tar":
                 rf"'{tmp_path}/nowhere/sw-000000.tar' \(from '~/nowhere/sw-000000.tar'\)"}
    monkeypatch.setenv("HOME", str(tmp_path))
    for pattern, hint in cases.items():
        with pytest.raises(ConfigError, match=hint) as e:
            trainer_until_model(own_data_cfg(tiny_cfg, pattern), monkeypatch)
        assert "\n" not in str(e.value)
    cfg = own_data_cfg(tiny_cfg, "~/sw-{000000..000001}.tar")
    assert resolve_sources(cfg.data, "train") == [str(tmp_path / f"sw-00000{i}.tar") for i in range(2)]
    with pytest.raises(ModelBuilt):
        trainer_until_model(cfg, monkeypatch)


def test_a_glob_or_a_folder_is_answered_with_the_brace_pattern_of_its_files(tiny_cfg, tmp_path, monkeypatch):
    write_shardwriter(tmp_path, [sample_dict(i) for i in range(4)], maxcount=1)  # sw-000000 ... sw-000003
    pattern = repr(str(tmp_path / "sw-{000000..000003}.tar"))
    for given in (str(tmp_path / "sw-*.tar"), str(tmp_path)):
        with pytest.raises(ConfigError, match=re.escape(f"e.g. {pattern}")):
            trainer_until_model(own_data_cfg(tiny_cfg, given), monkeypatch)
    (tmp_path / "sw-000002.tar").unlink()
    with pytest.raises(ConfigError, match=re.escape(repr(str(tmp_path / "sw-{{000000..000001},000003}.tar")))):
        trainer_until_model(own_data_cfg(tiny_cfg, str(tmp_path / "sw-*.tar")), monkeypatch)


def test_data_without_the_models_media_says_what_it_holds_before_any_sample_is_skipped(tiny_cfg, tmp_path,
                                                                                       monkeypatch, caplog):
    images = [{k: v for k, v in sample_dict(i).items() if k != "flac"} for i in range(16)]  # png, txt, json
    (tmp_path / "img").mkdir()
    image_only = write_shardwriter(tmp_path / "img", images)
    both = write_shardwriter(tmp_path, [sample_dict(i) for i in range(16)])
    cases = [(image_only, image_only, "video", r"data.sources: the data has no video \(found: image, text in its "
                                               r"first 16 sample\(s\)\); .*\(model.modalities=\[image\]\)"),
             (both, image_only, "audio", r"data.eval_sources: the data has no audio \(found: image, text")]
    for train_pattern, eval_pattern, modality, says in cases:
        cfg = own_data_cfg(tiny_cfg, train_pattern, overrides=[f"model.modalities=[{modality}]"])
        cfg.data.eval_sources = [eval_pattern]
        caplog.clear()
        with caplog.at_level("INFO"), pytest.raises(ConfigError, match=says):
            trainer_until_model(cfg, monkeypatch)
        assert not [r for r in caplog.records if "skipping" in r.getMessage()]
    cfg = own_data_cfg(tiny_cfg, both, overrides=["model.modalities=[audio]"])
    cfg.data.eval_sources = [both]
    with pytest.raises(ModelBuilt):  # data with some of the model's media passes
        trainer_until_model(cfg, monkeypatch)


def _serve(folder):
    """An HTTP server on a free local port serving `folder`, in a thread -> (server, base URL)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_url_and_pipe_sources_that_cannot_be_opened_fail_at_once_naming_them(tiny_cfg, tmp_path, monkeypatch):
    write_shardwriter(tmp_path, [sample_dict(i) for i in range(16)], maxcount=16)
    server, base = _serve(tmp_path)
    try:
        for good in (f"{base}/sw-000000.tar", f"pipe:cat {tmp_path}/sw-000000.tar"):
            with pytest.raises(ModelBuilt):
                trainer_until_model(own_data_cfg(tiny_cfg, good), monkeypatch)
        bad = {f"{base}/missing.tar": "HTTP 404",
               f"http://127.0.0.1:{_closed_port()}/sw-000000.tar": "cannot be opened",
               f"pipe:cat {tmp_path}/missing.tar": "exit status 1"}
        for key in ("sources", "eval_sources"):
            for url, why in bad.items():
                cfg = tiny_cfg()
                setattr(cfg.data, key, [SourceConfig(url)] if key == "sources" else [url])
                with pytest.raises(ConfigError, match=re.escape(f"data.{key}: {url!r}") + f".*{why}") as e:
                    trainer_until_model(cfg, monkeypatch)
                assert "\n" not in str(e.value)
    finally:
        server.shutdown()


def test_shards_with_no_usable_sample_are_one_line_naming_the_shard(tiny_cfg, tmp_path, monkeypatch):
    write_shardwriter(tmp_path, [sample_dict(0)], maxcount=1)
    whole = (tmp_path / "sw-000000.tar").read_bytes()
    (tmp_path / "junk.tar").write_bytes(b"<html>403 Forbidden</html>" * 40)
    (tmp_path / "zero.tar").write_bytes(b"")
    with tarfile.open(tmp_path / "sw-000000.tar") as tar:
        second = tar.getmembers()[1]
    (tmp_path / "cut.tar").write_bytes(whole[:second.offset_data + second.size // 2])  # inside sample 1
    write_tarfile(tmp_path / "empty.tar", [])
    write_tarfile(tmp_path / "names.tar", [("README", b"no extension"), ("LICENSE", b"none either")])
    cases = {"junk.tar": "is not a tar file", "zero.tar": r"is empty \(0 bytes\)",
             "empty.tar": "is an empty tar", "cut.tar": "holds no complete sample",
             "names.tar": "holds no sample"}
    for name, why in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(ConfigError, match=re.escape(f"data.sources: {path!r} ") + why) as e:
            trainer_until_model(own_data_cfg(tiny_cfg, path), monkeypatch)
        assert "\n" not in str(e.value)
    with pytest.raises(ModelBuilt):  # a bad shard among good ones is skipped at run time, as before
        trainer_until_model(own_data_cfg(tiny_cfg, f"{tmp_path}/{{junk,sw-000000}}.tar",
                                         overrides=["train.batch_size=1"]), monkeypatch)


def test_unbalanced_braces_and_an_unwritable_demo_cache_are_config_errors(tiny_cfg, tmp_path):
    from mmpretrain.data.sources import train_sources

    cfg = own_data_cfg(tiny_cfg, str(tmp_path / "train-{000..003.tar"))
    with pytest.raises(ConfigError, match=r"data.sources\[0\]: .*unbalanced braces"):
        train_sources(cfg.data)
    (tmp_path / "a-file").write_text("")
    cfg = tiny_cfg()
    cfg.data.demo.cache_dir = str(tmp_path / "a-file" / "cache")
    with pytest.raises(ConfigError, match=r"data.demo.cache_dir: cannot write .*a-file/cache") as e:
        train_sources(cfg.data)
    assert "\n" not in str(e.value)
