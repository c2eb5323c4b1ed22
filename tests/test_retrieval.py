import torch

from mmpretrain.eval.retrieval import recall_at_k, retrieval_metrics


def test_recall_hand_worked():
    # 3 queries x 4 candidates; positives marked. Ranks of first positive: 1, 3, 2.
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3],
                           [0.5, 0.4, 0.1, 0.6],
                           [0.2, 0.8, 0.7, 0.1]])
    pos = torch.tensor([[1, 0, 0, 0],
                        [0, 1, 0, 0],
                        [0, 0, 1, 1]], dtype=torch.bool)
    r = recall_at_k(scores, pos, ks=(1, 2, 3))
    assert r == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0}


def test_text_retrieval_counts_any_caption_clip_benchmark_style():
    # 2 images, 3 captions: captions 0,1 describe image 0, caption 2 describes image 1.
    e = lambda *rows: torch.tensor(rows, dtype=torch.float32)  # noqa: E731
    image = e([1.0, 0.0], [0.0, 1.0])
    text = e([0.0, 1.0],   # caption 0 (image 0) looks like image 1: text->image miss
             [1.0, 0.0],   # caption 1 (image 0): hit
             [0.0, 1.0])   # caption 2 (image 1): hit
    r = retrieval_metrics({"text": text, "image": image}, {"image": torch.tensor([True, True])},
                          caption_item=torch.tensor([0, 0, 1]))
    assert r["text->image"]["R@1"] == 2 / 3 and r["text->image"]["n"] == 3
    # image 0's best caption is caption 1 (its own) -> hit; image 1's best is caption 0 or 2:
    # scores tie at 1.0 between captions 0 and 2; argsort is stable, caption 0 (not its own) first.
    assert r["image->text"]["n"] == 2
    assert r["image->text"]["R@1"] == 0.5 and r["image->text"]["R@5"] == 1.0


def test_media_pairs_only_over_items_with_both():
    emb = {"text": torch.eye(3), "image": torch.eye(3), "audio": torch.eye(3)}
    present = {"image": torch.tensor([True, True, False]), "audio": torch.tensor([True, False, True])}
    r = retrieval_metrics(emb, present)
    assert r["image->audio"]["n"] == 1 and r["text->audio"]["n"] == 2
    assert all(v["R@1"] == 1.0 for v in r.values())


def test_absent_modality_is_left_out_not_nan():
    emb = {"text": torch.eye(2), "image": torch.eye(2), "audio": torch.zeros(2, 2)}
    present = {"image": torch.tensor([True, True]), "audio": torch.tensor([False, False])}
    assert set(retrieval_metrics(emb, present)) == {"text->image", "image->text"}


def test_captions_shared_between_items_are_counted_and_warned_about(caplog):
    from mmpretrain.eval.retrieval import warn_shared_captions

    caplog.set_level("WARNING")
    captions = ["a red circle", "a red circle", "a blue ring", "a red circle", "a green star"]
    assert warn_shared_captions(captions, torch.tensor([0, 1, 2, 3, 4]), "eval set own") == 3
    [record] = caplog.records
    assert record.getMessage().startswith("eval set own: 3 of 5 captions (60%) are word for word another item's "
                                          "caption too (1 text(s) shared): R@1 is undefined")
    caplog.clear()  # one item's captions alike, and one shared caption in over a hundred: nothing to say
    assert warn_shared_captions(["a", "a", "b"], torch.tensor([0, 0, 1]), "x") == 0
    many = [f"caption {i}" for i in range(199)] + ["caption 0"]
    assert warn_shared_captions(many, torch.arange(200), "x") == 2
    assert not caplog.records


def test_cli_reads_run_export_and_checkpoint_folders_and_keeps_the_runs_result(tiny_cfg, tmp_path, capsys):
    import json

    import webdataset as wds

    from conftest import sample_dict
    from mmpretrain import train
    from mmpretrain.checkpoint import latest_checkpoint
    from mmpretrain.eval.retrieval import main

    cfg = tiny_cfg("train.steps=1", "run.name=ev")
    train.run(cfg)
    run_dir, evals = cfg.run_dir, cfg.run_dir / "eval"
    own = (evals / "retrieval.json").read_bytes()
    with wds.ShardWriter(str(tmp_path / "held-%06d.tar"), maxcount=100, verbose=0) as sink:
        for i in range(6):
            sink.write(sample_dict(i))
    shards = str(tmp_path / "held-{000000..000000}.tar")

    assert main(["--run", str(run_dir), "--device", "cpu"]) == 0  # the run's eval set, named after it
    assert (evals / "retrieval.json").read_bytes() == own
    assert json.loads((evals / "retrieval-demo.json").read_text()) == json.loads(own)
    assert main(["--run", str(run_dir / "export"), "--shards", shards, "--device", "cpu"]) == 0
    named = evals / f"retrieval-{tmp_path.name}-held-000000..000000.json"
    assert json.loads(named.read_text())["text->image"]["n"] == 6
    assert main(["--run", str(latest_checkpoint(run_dir)), "--shards", shards, "--device", "cpu"]) == 0
    step = evals / f"retrieval-{tmp_path.name}-held-000000..000000-step_00000001.json"
    assert json.loads(step.read_text()) == json.loads(named.read_text())  # the same weights
    assert (evals / "retrieval.json").read_bytes() == own
    capsys.readouterr()

    for wrong in (tmp_path / "nope", tmp_path):  # missing; a folder that is none of the three
        assert main(["--run", str(wrong), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(wrong) in err and "Traceback" not in err
