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
