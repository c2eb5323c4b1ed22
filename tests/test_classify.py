"""Zero-shot classification and linear probes on CLIP_benchmark's dataset layout: its metric
definitions, its weight-decay search, the CLIs, their errors and the feature cache."""

import io
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import mmpretrain
from mmpretrain.build import build_task
from mmpretrain.config import load_config
from mmpretrain.eval import classify, linear_probe
from mmpretrain.eval.classify import classification_metrics, classifier_weights, write_dataset
from mmpretrain.export import export_model
from mmpretrain.tokenizer import Tokenizer

from conftest import ROOT, flac_bytes

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def square(rgb, seed) -> bytes:
    noise = np.random.default_rng(seed).integers(-20, 21, (12, 12, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def squares(n_per_class, seed=0):
    return [("png", square(rgb, seed + 10 * i + c), c) for i in range(n_per_class)
            for c, rgb in enumerate(COLOURS.values())]


@pytest.fixture
def colours(tmp_path):
    return write_dataset(tmp_path / "colours", list(COLOURS), ["a {c} square", "a photo of something {c}"],
                         {"train": squares(8), "test": squares(3, seed=1000)}, per_shard=10)


def export(tmp_path, *overrides):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", list(overrides))
    return export_model(build_task(cfg, Tokenizer(cfg.model.text).vocab_size).state_dict(), cfg,
                        tmp_path / "run" / "export")


# ---------------------------------------------------------------------------- CLIP_benchmark's definitions


def clip_benchmark_reference(logits, target, n_classes):
    """CLIP_benchmark's zeroshot_classification.evaluate, re-derived: `accuracy` (top-k over the logits:
    pred = output.topk(max(topk), 1, True, True)[1].t(); correct = pred.eq(target); correct[:k].sum() / n),
    acc5 only when len(classes) >= 5, and sklearn's balanced_accuracy_score(target, argmax): the
    confusion matrix over the labels seen in target or pred, recall diag / row sum per row, rows with
    no true sample (nan) dropped, averaged."""
    pred = logits.topk(min(5, n_classes), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    ref = {"acc1": float(correct[:1].reshape(-1).float().sum()) / len(target)}
    if n_classes >= 5:
        ref["acc5"] = float(correct[:5].reshape(-1).float().sum()) / len(target)
    top1 = logits.argmax(axis=1).numpy()
    labels = sorted(set(target.tolist()) | set(top1.tolist()))
    cm = np.array([[np.sum((target.numpy() == a) & (top1 == b)) for b in labels] for a in labels])
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.diag(cm) / cm.sum(axis=1)
    ref["mean_per_class_recall"] = float(per_class[~np.isnan(per_class)].mean())
    return ref


@pytest.mark.parametrize("n_classes", [3, 7])
def test_metrics_are_clip_benchmarks_definitions(n_classes):
    g = torch.Generator().manual_seed(n_classes)
    target = torch.randint(0, n_classes - 1, (60,), generator=g)  # the last class never true, still predicted
    logits = torch.randn(60, n_classes, generator=g) + 1.5 * torch.nn.functional.one_hot(target, n_classes)
    logits[:5, -1] = 10.0
    r = classification_metrics(logits, target, [f"c{i}" for i in range(n_classes)])
    ref = clip_benchmark_reference(logits, target, n_classes)
    assert {k: r[k] for k in ref} == pytest.approx(ref) and ("acc5" in r) == (n_classes >= 5)
    assert r["per_class_recall"][f"c{n_classes - 1}"] is None and r["n"] == 60
    cm = torch.tensor(r["confusion_matrix"])
    assert cm.sum() == 60 and cm[:, -1].sum() >= 5 and cm.diag().sum() / 60 == pytest.approx(r["acc1"])


class FixedText:
    """encode_text from fixed prompt embeddings (not normalised: the classifier must normalise them)."""

    def __init__(self, table):
        self.table, self.index = table, {p: i for i, p in enumerate(table)}

    def encode_text(self, texts):  # mmpretrain's Pretrained: strings in
        return torch.stack([self.table[t] for t in texts])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # a class never true
def test_zero_shot_classifier_and_recall_equal_clip_benchmarks_on_the_same_embeddings():
    """Its own zero_shot_classifier, run_classification and balanced_accuracy_score (its `accuracy`,
    hence its `evaluate`, fails under NumPy 2.4: float() of a 1-element array; the re-derivation
    above covers it)."""
    zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    g = torch.Generator().manual_seed(0)
    classnames, templates = [f"class{i}" for i in range(6)], ["a {c}", "the {c} here", "{c}!"]
    prompts = [t.format(c=c) for c in classnames for t in templates]
    text = FixedText({p: 3 * torch.randn(8, generator=g) for p in prompts})
    images = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    target = torch.randint(0, 6, (40,), generator=g)

    class Model:  # CLIP_benchmark's side: tokens in (here prompt indices), images are row indices
        encode_text = staticmethod(lambda tokens: torch.stack([text.table[prompts[i]] for i in tokens.tolist()]))
        encode_image = staticmethod(lambda idx: images[idx])

    theirs = zsc.zero_shot_classifier(Model, lambda texts: torch.tensor([prompts.index(t) for t in texts]),
                                      classnames, templates, "cpu", amp=False)
    batches = [(torch.arange(i, min(i + 16, 40)), target[i : i + 16]) for i in range(0, 40, 16)]
    logits, true = zsc.run_classification(Model, theirs, batches, "cpu", amp=False)
    weights = classifier_weights(text, classnames, templates)
    torch.testing.assert_close(weights, theirs.T)
    ours = classification_metrics(images @ weights.T, target, classnames)
    torch.testing.assert_close(100 * images @ weights.T, logits)
    assert ours["mean_per_class_recall"] == pytest.approx(zsc.balanced_accuracy_score(true, logits.argmax(1)))
    ref = clip_benchmark_reference(logits, true, 6)
    assert {k: ours[k] for k in ref} == pytest.approx(ref)


def test_weight_decay_search_is_clip_benchmarks_find_peak(monkeypatch):
    """Validation accuracy as a function of the weight decay; the value picked must be the one
    CLIP_benchmark's search picks (7 spread values, then spans 8, 4, 2, 1 around the best)."""
    wds = np.logspace(-6, 2, num=97).tolist()
    acc = lambda wd: round(100 * math.exp(-((math.log10(wd) + 2.7) ** 2) / 2)) / 100  # noqa: E731

    def reference():  # CLIP_benchmark's evaluate + find_peak, with acc standing in for train + infer
        def find_peak(idxs):
            best, best_acc = 0, 0
            for i in idxs:
                if best_acc < acc(wds[i]):
                    best, best_acc = i, acc(wds[i])
            return best
        init = [i for i, v in enumerate(wds) if v in np.logspace(-6, 2, num=7).tolist()]
        peak, span = find_peak(init), 8
        while span > 0:
            peak = find_peak([max(peak - span, 0), peak, min(peak + span, len(wds) - 1)])
            span //= 2
        return wds[peak]

    n_val = 100

    def fake_fit(x, y, n_classes, weight_decay, **_):  # right on the first acc * 100 validation samples
        right = round(acc(weight_decay) * n_val)
        return lambda xv: torch.nn.functional.one_hot((torch.arange(n_val) >= right).long(), 2).float()

    monkeypatch.setattr(linear_probe, "fit_head", fake_fit)
    picked = linear_probe.sweep_weight_decay(None, None, None, torch.zeros(n_val, dtype=torch.long), 2)
    assert picked == reference() and picked not in np.logspace(-6, 2, num=7).tolist()


def test_linear_probe_separates_separable_embeddings_and_leaves_the_rng_alone():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    y = torch.arange(200) % 4
    x = torch.nn.functional.normalize(centres[y] + 0.1 * torch.randn(200, 16, generator=g), dim=-1)
    state = torch.get_rng_state()
    head = linear_probe.fit_head(x[:150], y[:150], 4, 1e-4)
    assert torch.equal(torch.get_rng_state(), state)
    assert (head(x[150:]).argmax(1) == y[150:]).all()


def test_linear_probe_shows_a_bar_of_its_fits(monkeypatch, capsys):
    """The weight-decay sweep (a dozen fits, then the refit) shows its progress when asked (the CLI
    asks on a terminal), counting each fit, and ends complete; nothing when not asked."""
    fits, fit = [], linear_probe.fit_head
    monkeypatch.setattr(linear_probe, "fit_head", lambda *a, **kw: fits.append(a[3]) or fit(*a, **kw))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=g), torch.arange(40) % 3
    linear_probe.probe_features(x, y, x, y, ["a", "b", "c"], epochs=1)
    assert capsys.readouterr().err == ""
    fits.clear()
    linear_probe.probe_features(x, y, x, y, ["a", "b", "c"], progress=True, epochs=1)
    shown = [tuple(map(int, c)) for c in re.findall(r"linear probe:.*?(\d+)/(\d+) \[", capsys.readouterr().err)]
    assert shown[0] == (0, linear_probe.MAX_FITS) and len(fits) > 7 and shown[-1] == (len(fits), len(fits))


# ---------------------------------------------------------------------------- the CLIs


def test_classify_and_linear_probe_clis_write_json_png_and_reuse_the_cached_features(tmp_path, colours, monkeypatch,
                                                                                    capsys):
    run = export(tmp_path).parent
    out = tmp_path / "zs.json"
    assert classify.main(["--model", str(run), "--dataset", str(colours), "--out", str(out), "--batch-size", "4",
                          "--device", "cpu"]) == 0
    r = json.loads(out.read_text())
    assert set(r) == {"acc1", "mean_per_class_recall", "n", "per_class_recall", "confusion_matrix", "modality"}
    assert r["n"] == 9 and r["modality"] == "image" and list(r["per_class_recall"]) == list(COLOURS)
    assert out.with_suffix(".png").stat().st_size > 0

    assert linear_probe.main(["--model", str(run / "export"), "--dataset", str(colours), "--device", "cpu"]) == 0
    default = run / "eval" / "linear_probe-colours-test.json"
    first = json.loads(default.read_text())
    assert first["n"] == 9 and first["n_train"] == 24 and first["weight_decay"] in linear_probe.WEIGHT_DECAYS
    assert default.with_suffix(".png").is_file()
    assert len(list((run / "eval" / "features").glob("*.pt"))) == 2  # train and test

    encoded = linear_probe.embed_split(mmpretrain.load_pretrained(run / "export"), colours, "train", 64)

    def no_encoding(*args):
        raise AssertionError("encoded again")

    monkeypatch.setattr(linear_probe, "embed_split", no_encoding)
    cached = linear_probe.cached_features(mmpretrain.load_pretrained(run / "export"), colours, "train", 64,
                                          run / "eval" / "features")
    assert all(torch.equal(a, b) for a, b in zip(cached[:2], encoded[:2])) and cached[2] == "image"
    capsys.readouterr()

    sounds = write_dataset(tmp_path / "sounds", ["short", "long"], ["a {c} sound"],
                           {"test": [("flac", flac_bytes(0.2 + 0.2 * i), i % 2) for i in range(4)]})
    r = classify.zero_shot_classify(mmpretrain.load_pretrained(run / "export"), sounds)
    assert r["modality"] == "audio" and r["n"] == 4


def test_dataset_errors_are_one_line(tmp_path, colours, capsys):
    run = export(tmp_path, "model.modalities=[image]").parent
    (colours / "classnames.txt").unlink()
    assert classify.main(["--model", str(run), "--dataset", str(colours), "--device", "cpu"]) == 2
    assert "no classnames.txt" in capsys.readouterr().err

    sounds = write_dataset(tmp_path / "sounds", ["quiet", "loud"], ["a {c} sound"],
                           {"test": [("flac", flac_bytes(), 0), ("flac", flac_bytes(), 1)]})
    assert classify.main(["--model", str(run), "--dataset", str(sounds), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "samples are audio (.flac), which this model has no tower for (its modalities: image)" in err
    assert len(err.strip().splitlines()) == 1
    assert classify.main(["--model", str(run), "--dataset", str(sounds), "--split", "val", "--device", "cpu"]) == 2
    assert "no val/nshards.txt" in capsys.readouterr().err


# ---------------------------------------------------------------------------- CLIP_benchmark's own evaluation


def test_clip_benchmark_evaluates_an_export_through_load_mmpretrain(tmp_path, colours):
    """Its zeroshot_retrieval.evaluate, and its classifier + run_classification, on an export: the
    numbers mmpretrain's own retrieval and zero-shot classification give."""
    zsr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    from mmpretrain.eval.clip_benchmark import load_mmpretrain
    from mmpretrain.eval.retrieval import retrieval_metrics

    path = export(tmp_path)
    model, transform, tokenizer = load_mmpretrain(pretrained=str(path))
    pictures = [Image.open(io.BytesIO(square(rgb, i))) for i in range(3) for rgb in COLOURS.values()]
    captions = [[f"a {c} square", f"something {c}"] for _ in range(3) for c in COLOURS]
    batches = [(torch.stack([transform(p) for p in pictures[i : i + 4]]), captions[i : i + 4]) for i in range(0, 9, 4)]
    theirs = zsr.evaluate(model, batches, tokenizer, "cpu", amp=False, recall_k_list=[1, 5])

    ours = mmpretrain.load_pretrained(path)
    emb = {"image": ours.encode_image(pictures), "text": ours.encode_text([c for caps in captions for c in caps])}
    r = retrieval_metrics(emb, {"image": torch.ones(9, dtype=torch.bool)}, torch.arange(9).repeat_interleave(2))
    for k in (1, 5):
        assert theirs[f"image_retrieval_recall@{k}"] == pytest.approx(r["text->image"][f"R@{k}"])
        assert theirs[f"text_retrieval_recall@{k}"] == pytest.approx(r["image->text"][f"R@{k}"])

    classnames, templates = classify.read_classnames(colours), classify.read_templates(colours)
    weights = zsc.zero_shot_classifier(model, tokenizer, classnames, templates, "cpu", amp=False)
    torch.testing.assert_close(weights.T, classifier_weights(ours, classnames, templates))
    test = [(transform(Image.open(io.BytesIO(s["png"]))), int(s["cls"])) for _, s in
            classify.read_samples(classify.split_shards(colours, "test"))]
    batch = (torch.stack([x for x, _ in test]), torch.tensor([y for _, y in test]))
    logits, target = zsc.run_classification(model, weights, [batch], "cpu", amp=False)
    result = classify.zero_shot_classify(ours, colours)
    assert result["acc1"] == (logits.argmax(1) == target).double().mean().item()
    assert result["mean_per_class_recall"] == pytest.approx(zsc.balanced_accuracy_score(target, logits.argmax(1)))
