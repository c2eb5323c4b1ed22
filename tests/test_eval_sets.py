"""Named eval sets (mmpretrain/eval/sets.py): their config, their intervals and records in a run,
and their split across data-parallel ranks."""

import json

import pytest
import torch

from mmpretrain import train
from mmpretrain.config import ConfigError
from mmpretrain.data.sources import demo_classification_sets
from mmpretrain.eval.classify import write_dataset
from mmpretrain.eval.sets import Evaluator, run_sets
from mmpretrain.model import MultimodalModel
from mmpretrain.tokenizer import Tokenizer


def _sets_yaml(*sets: dict) -> str:
    return "eval.sets=[" + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in s.items()) + "}" for s in sets) + "]"


def test_a_run_evaluates_each_named_set_at_its_interval_and_records_it(tiny_cfg):
    shapes = demo_classification_sets(tiny_cfg().data, ["image"])["image-shape"]
    cfg = tiny_cfg("train.steps=4", "train.eval_every=2", "run.name=sets",
                   _sets_yaml({"name": "shapes", "kind": "classification", "path": shapes, "every": 1},
                              {"name": "audio-only", "kind": "retrieval", "path": "demo", "modality": "audio"}))
    retrieval = train.run(cfg)
    assert retrieval["text->image"]["n"] == 100  # data.eval_sources' set, as before
    history = [json.loads(line) for line in (cfg.run_dir / "eval" / "history.jsonl").read_text().splitlines()]
    every_two = {"retrieval", "image-shape", "audio-rhythm", "audio-only", "shapes"}
    probes = {"image-shape-probe", "audio-rhythm-probe"}  # the demo's linear probes: at the end only
    assert [set(h) - {"step"} for h in history] == [{"shapes"}, every_two, {"shapes"}, every_two | probes]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert set(history[0]["shapes"]) == {"acc1", "acc5", "mean_per_class_recall", "n", "classes"}
    assert history[-1]["shapes"] == {k: history[-1]["image-shape"][k] for k in history[-1]["shapes"]}  # same data
    assert set(history[-1]["audio-only"]) == {"text->audio", "audio->text", "image->audio", "audio->image"}
    for name in every_two | probes:  # the last result in full, its confusion matrix drawn
        result = json.loads((cfg.run_dir / "eval" / f"{name}.json").read_text())
        if name not in ("retrieval", "audio-only"):
            assert len(result["confusion_matrix"]) == len(result["per_class_recall"]) == 6
            assert (cfg.run_dir / "eval" / f"{name}.png").is_file()
    probe = json.loads((cfg.run_dir / "eval" / "image-shape-probe.json").read_text())
    assert probe["n_train"] > 0 and probe["n"] == 100 and "weight_decay" in probe

    from mmpretrain.plots import curves_figure
    from test_train import assert_in_tensorboard

    titles = [ax.get_title() for ax in curves_figure(cfg.run_dir).axes]
    assert titles[2].startswith("classification"), titles
    tags = assert_in_tensorboard(history, cfg.run_dir / "tb" / "eval")
    assert {"retrieval/text->image/R@1", "shapes/acc1", "audio-only/audio->text/R@5", "image-shape-probe/acc1"} <= tags


def test_eval_sets_config_errors_name_the_set(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="named alike"):
        tiny_cfg(_sets_yaml({"name": "retrieval", "kind": "retrieval", "path": "demo"}))
    with pytest.raises(ConfigError, match=r"eval.sets\[0\].modality: 'video' is not one of"):
        tiny_cfg(_sets_yaml({"name": "v", "kind": "retrieval", "path": "demo", "modality": "video"}))
    with pytest.raises(ConfigError, match=r"eval.sets\[0\] \(c\).path: .* is not a folder"):
        run_sets(tiny_cfg(_sets_yaml({"name": "c", "kind": "classification", "path": tmp_path / "none"})))
    half = write_dataset(tmp_path / "half", ["a", "b"], ["a {c}"], {"test": [("png", b"", 0)]})
    with pytest.raises(ConfigError, match="no train/nshards.txt"):
        run_sets(tiny_cfg(_sets_yaml({"name": "p", "kind": "linear_probe", "path": half})))
    with pytest.raises(ConfigError, match="named as one the run already has"):
        run_sets(tiny_cfg(_sets_yaml({"name": "image-shape", "kind": "retrieval", "path": "demo"})))


def test_retrieval_is_zero_shot_only_on_a_corpus_that_says_so(tiny_cfg, tmp_path):
    """The built-in corpora's eval splits hold combinations never trained on; own shards are held out."""
    import webdataset as wds

    from conftest import sample_dict

    with wds.ShardWriter(str(tmp_path / "own-%06d.tar"), maxcount=10, verbose=0) as sink:
        sink.write(sample_dict(0))
    own = str(tmp_path / "own-000000.tar")
    cfg = tiny_cfg(_sets_yaml({"name": "relations", "kind": "retrieval", "path": "demo-relations"},
                              {"name": "own", "kind": "retrieval", "path": own}))
    assert {s.name: s.zero_shot for s in run_sets(cfg) if s.kind == "retrieval"} == {
        "retrieval": True, "relations": True, "own": False}
    assert not run_sets(tiny_cfg(f"data.eval_sources=[{own}]"))[0].zero_shot
    assert not run_sets(tiny_cfg(f"data.eval_sources=[demo, {own}]"))[0].zero_shot


def test_ranks_embed_disjoint_parts_whose_union_is_the_one_rank_result(tiny_cfg):
    """Evaluator(rank r of 2) embeds every other sample; gathered, the parts give the metrics one
    rank computes alone: the split covers the set once, nothing repeated (the gather is handed in)."""
    cfg = tiny_cfg()
    tok = Tokenizer(cfg.model.text)
    model = MultimodalModel(cfg.model, tok.vocab_size)
    sets = [s for s in run_sets(cfg) if s.name in ("retrieval", "image-shape", "audio-rhythm-probe")]
    alone = Evaluator(model, cfg, tok, "cpu").evaluate(sets)

    sent = []  # rank 1's part of each gather, in call order (its own metrics, of its part twice, unused)
    Evaluator(model, cfg, tok, "cpu", rank=1, world=2,
              gather=lambda part: sent.append(part) or [part, part]).evaluate(sets)
    received = iter(sent)
    parts = []
    split = Evaluator(model, cfg, tok, "cpu", rank=0, world=2,
                      gather=lambda part: parts.append((part, next(received))) or list(parts[-1])).evaluate(sets)

    keys = [set(mine[3]) for mine in parts[0]]  # retrieval's parts: (emb, present, caption_item, keys)
    assert keys[0] and keys[1] and not keys[0] & keys[1] and len(keys[0] | keys[1]) == 100
    assert [len(mine[1]) for mine in parts[-1]] == [50, 50]  # image-shape (the last set): 100 labels, two halves
    assert split["retrieval"].keys() == alone["retrieval"].keys()
    for direction, r in alone["retrieval"].items():
        assert split["retrieval"][direction] == pytest.approx(r, abs=0.011), direction  # one near-tie may flip
    for name in ("image-shape", "audio-rhythm-probe"):
        for k in ("acc1", "mean_per_class_recall", "n"):
            assert split[name][k] == pytest.approx(alone[name][k], abs=0.011), (name, k)
    assert model.training  # evaluation leaves the model as it found it
