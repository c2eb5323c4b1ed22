"""The noisy demo corpus: every planted fault is where truth.json says, the rest is the demo's own,
and the corpus is reproducible and resolves as a source."""

import io
import json
import tarfile
from pathlib import Path

import braceexpand
import pytest
from PIL import Image

from mmpretrain.data.demo import IMAGE_SIZE, Concept, all_concepts, demo_corpus, split_concepts
from mmpretrain.data.demo_noisy import (EXACT_DUPLICATES, MISMATCHED, NEAR, NEAR_DUPLICATES, OFF_TARGET,
                                        demo_noisy_corpus)
from mmpretrain.data.sources import demo_classification_sets, resolve_sources, train_sources

VARIANTS = 2  # 280 originals


def read_shards(pattern: str) -> dict[str, dict[str, bytes]]:
    """key -> {extension: member bytes}."""
    samples = {}
    for url in braceexpand.braceexpand(pattern):
        with tarfile.open(url) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def noisy(demo_cache):
    paths = demo_noisy_corpus(demo_cache, VARIANTS)
    return paths, json.loads(Path(paths["truth"]).read_text()), read_shards(paths["train"])


def true_caption(sample: dict) -> str:
    return Concept(**json.loads(sample["json"])).caption


def test_truth_counts_match_the_planted_fractions(noisy):
    _, truth, samples = noisy
    originals = len(split_concepts(0)[0]) * VARIANTS
    copies = {**truth["exact_duplicate"], **truth["near_duplicate"]}
    assert truth["total"] == len(samples) == originals + len(copies)
    assert len(truth["exact_duplicate"]) / originals == pytest.approx(EXACT_DUPLICATES, abs=0.01)
    assert len(truth["near_duplicate"]) / originals == pytest.approx(NEAR_DUPLICATES, abs=0.01)
    # the fault lists hold the copies of faulty originals too
    faulty = {k for k in truth["mismatched"] + truth["off_target"] if k not in copies}
    assert len(faulty & set(truth["mismatched"])) / originals == pytest.approx(MISMATCHED, abs=0.01)
    assert len(faulty & set(truth["off_target"])) / originals == pytest.approx(OFF_TARGET, abs=0.01)
    assert truth["clean"] == originals - len(faulty)
    assert not set(truth["mismatched"]) & set(truth["off_target"])  # at most one fault each
    assert set(truth["mismatched"] + truth["off_target"]) | set(copies) <= set(samples)


def test_duplicates_are_copies_of_their_originals(noisy):
    _, truth, samples = noisy
    originals = set(truth["exact_duplicate"].values()) | {v["of"] for v in truth["near_duplicate"].values()}
    assert not originals & (set(truth["exact_duplicate"]) | set(truth["near_duplicate"]))
    for dup, of in truth["exact_duplicate"].items():
        assert samples[dup] == samples[of]  # every member byte for byte
    assert {v["how"] for v in truth["near_duplicate"].values()} == set(NEAR)
    for dup, v in truth["near_duplicate"].items():
        copy, original = samples[dup], samples[v["of"]]
        image = "jpg" if v["how"] == "reencoded" else "png"
        assert set(copy) == {image, "flac", "txt", "json"}
        assert copy[image] != original["png"]
        assert Image.open(io.BytesIO(copy[image])).size == (IMAGE_SIZE, IMAGE_SIZE)
        assert all(copy[m] == original[m] for m in ("flac", "txt", "json"))


def test_captions_are_faulty_exactly_where_truth_says(noisy):
    paths, truth, samples = noisy
    seen, _ = split_concepts(0)
    demo_style = {c.caption for c in all_concepts()}
    mismatched, off_target = set(truth["mismatched"]), set(truth["off_target"])
    for key, s in samples.items():
        caption, meta = s["txt"].decode(), json.loads(s["json"])
        if key in mismatched:  # another train concept's caption; the meta keeps the true one
            assert caption != true_caption(s) and caption in {c.caption for c in seen}
        elif key in off_target:  # the concept's words, not in the demo's style
            assert caption not in demo_style and not caption.startswith(("a ", "an "))
            assert meta["colour"] in caption and meta["shape"] in caption
        else:
            assert caption == true_caption(s)
    target = Path(paths["target"]).read_text().splitlines()
    assert len(target) == 200 and set(target) <= {c.caption for c in seen}


def test_generation_is_deterministic_and_eval_is_the_demo_split(noisy, demo_cache, tmp_path):
    paths, _, _ = noisy
    again = demo_noisy_corpus(str(tmp_path), VARIANTS)
    assert again["train"] != paths["train"]  # a second corpus, in another folder
    for first, second in zip(braceexpand.braceexpand(paths["train"]), braceexpand.braceexpand(again["train"])):
        assert Path(first).read_bytes() == Path(second).read_bytes()
    assert all(Path(paths[f]).read_bytes() == Path(again[f]).read_bytes() for f in ("truth", "target"))
    assert paths["eval"] == demo_corpus(demo_cache, VARIANTS)["eval"]  # the clean zero-shot split, shared


def test_demo_noisy_resolves_as_a_source(tiny_cfg, noisy):
    paths, _, _ = noisy
    cfg = tiny_cfg("data.sources=[demo-noisy]", "data.eval_sources=[demo-noisy]",
                   f"data.demo.variants_per_concept={VARIANTS}")
    (source,) = train_sources(cfg.data)
    assert source.name == "demo-noisy" and source.urls == list(braceexpand.braceexpand(paths["train"]))
    assert resolve_sources(cfg.data, "train") == source.urls
    assert resolve_sources(cfg.data, "eval") == list(braceexpand.braceexpand(paths["eval"]))
    # its eval split is the demo's, and so are its classification sets
    assert set(demo_classification_sets(cfg.data, ["image", "audio"])) == {"image-shape", "audio-rhythm"}
