"""Zero-shot classification on CLIP_benchmark's dataset layout, with its definitions.

    python -m mmpretrain.eval.classify --model runs/demo --dataset DIR [--split test] [--out FILE.json]

DIR is CLIP_benchmark's webdataset layout, read as it is:

    classnames.txt                          one class name per line
    zeroshot_classification_templates.txt   one prompt template per line, {c} for the class name
    test/nshards.txt  test/0.tar 1.tar ...  samples: one media member + .cls (the class index)
    train/ ...                              the same (the linear probe fits on it)

The media member says the modality (.webp/.png/.jpg image, .flac/.wav audio, .mp4 video: each
modality's extensions); the model must have that tower. Classifier weights as CLIP's: each prompt
(template x class name) embedded and normalised, averaged per class, normalised again. Metrics as
CLIP_benchmark's `zeroshot_classification.evaluate`: acc1, acc5 (top-k over the logits; omitted
with fewer than 5 classes) and mean_per_class_recall (sklearn's balanced_accuracy_score: the
mean recall over the classes present), with n, each class's recall and the confusion matrix
(rows: true class, columns: predicted) in the JSON and drawn in a PNG beside it.

`--model` (or `--run`) is a run folder, its export/ or a checkpoint folder; the JSON goes to the
run's eval/classify-<dataset>-<split>.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from pathlib import Path

import torch

from mmpretrain.config import ConfigError
from mmpretrain.data.samples import first_key

CLASSNAMES, TEMPLATES = "classnames.txt", "zeroshot_classification_templates.txt"


# ---------------------------------------------------------------------------- the dataset layout


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"--dataset {path.parent}: no {path.name} (CLIP_benchmark's layout: {CLASSNAMES}, "
                          f"{TEMPLATES}, <split>/nshards.txt, <split>/0.tar ...)")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"--dataset {path.parent}: {path.name} is empty")
    return lines


def read_classnames(dataset: Path) -> list[str]:
    return _lines(Path(dataset) / CLASSNAMES)


def read_templates(dataset: Path) -> list[str]:
    templates = _lines(Path(dataset) / TEMPLATES)
    if missing := [t for t in templates if "{c}" not in t]:
        raise ConfigError(f"--dataset {dataset}: {TEMPLATES}: {missing[0]!r} has no {{c}} for the class name")
    return templates


def split_shards(dataset: Path, split: str) -> list[Path]:
    """DIR/<split>/0.tar ... (nshards.txt of them)."""
    folder = Path(dataset) / split
    if not (folder / "nshards.txt").is_file():
        raise ConfigError(f"--dataset {dataset}: no {split}/nshards.txt (split {split!r})")
    shards = [folder / f"{i}.tar" for i in range(int((folder / "nshards.txt").read_text().strip()))]
    if missing := [p.name for p in shards if not p.is_file()]:
        raise ConfigError(f"--dataset {dataset}: {split}/{missing[0]} is missing ({len(shards)} in nshards.txt)")
    return shards


def read_samples(shards: list[Path]):
    """-> (key, {extension: bytes}) per sample, grouped by webdataset as the trainer's shards are."""
    import webdataset as wds

    for sample in wds.tarfile_to_samples()(iter([{"url": str(p)} for p in shards])):
        yield sample["__key__"], {k.lower(): v for k, v in sample.items() if not k.startswith("__")}


def write_dataset(out: Path, classnames: list[str], templates: list[str],
                  splits: dict[str, list[tuple[str, bytes, int]]], per_shard: int = 1000) -> Path:
    """Write CLIP_benchmark's layout: splits = {"test": [(extension, media bytes, class index), ...]}."""
    import io

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CLASSNAMES).write_text("".join(f"{c}\n" for c in classnames))
    (out / TEMPLATES).write_text("".join(f"{t}\n" for t in templates))
    for split, samples in splits.items():
        (out / split).mkdir(exist_ok=True)
        starts = range(0, len(samples), per_shard)
        for n, start in enumerate(starts):
            with tarfile.open(out / split / f"{n}.tar", "w") as tar:
                for i, (ext, data, label) in enumerate(samples[start : start + per_shard], start):
                    for name, payload in ((f"s{i:08d}.{ext}", data), (f"s{i:08d}.cls", str(label).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
        (out / split / "nshards.txt").write_text(f"{len(starts)}\n")
    return out


# ---------------------------------------------------------------------------- embeddings


def sample_modality(sample: dict[str, bytes], modalities: list[str], where: str) -> str:
    """-> the modality of a sample's media member; the model must have it."""
    from mmpretrain.encoders import MODALITIES

    for name, spec in MODALITIES.items():
        if ext := first_key(sample, spec.extensions):
            if name not in modalities:
                raise ConfigError(f"{where}: its samples are {name} (.{ext}), which this model has no tower for "
                                  f"(its modalities: {', '.join(modalities)})")
            return name
    raise ConfigError(f"{where}: a sample with no media member (members: {', '.join(sorted(sample))})")


@torch.no_grad()
def embed_split(pretrained, dataset: Path, split: str, batch_size: int = 64, rank: int = 0,
                world: int = 1) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """-> normalised media embeddings (N, E), class indices (N,), the modality: of every `world`-th
    sample from the `rank`-th (all by default; a part with no sample gives (0, E), (0,), None)."""
    import itertools

    from mmpretrain.encoders import MODALITIES, BadSample

    where = f"--dataset {dataset}/{split}"
    model, device = pretrained.model, pretrained.device
    modality, section, emb, labels, batch = None, None, [], [], []

    def flush():
        emb.append(model.encode_media(modality, torch.stack(batch).to(device))[1].float().cpu())
        batch.clear()

    for key, sample in itertools.islice(read_samples(split_shards(dataset, split)), rank, None, world):
        if modality is None:
            modality = sample_modality(sample, model.modalities, where)
            spec = MODALITIES[modality]
            section = spec.section(pretrained.cfg)
        ext = first_key(sample, spec.extensions)
        if ext is None or "cls" not in sample:
            raise ConfigError(f"{where}: sample {key} has no {modality} member or no .cls "
                              f"(members: {', '.join(sorted(sample))})")
        try:
            batch.append(spec.decode(sample[ext], section, None))
        except BadSample as e:
            raise ConfigError(f"{where}: sample {key}: {e}") from None
        labels.append(int(sample["cls"].decode().strip()))
        if len(batch) == batch_size:
            flush()
    if modality is None:
        if world > 1:  # the other parts may hold the set's few samples
            return torch.zeros(0, model.embed_dim), torch.zeros(0, dtype=torch.long), None
        raise ConfigError(f"{where}: no samples")
    if batch:
        flush()
    return torch.cat(emb), torch.tensor(labels, dtype=torch.long), modality


@torch.no_grad()
def classifier_weights(pretrained, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """(C, E): each class's prompts embedded and normalised, averaged, normalised again (CLIP's)."""
    rows = []
    for name in classnames:
        prompts = torch.nn.functional.normalize(pretrained.encode_text([t.format(c=name) for t in templates]).float(),
                                                dim=-1)
        rows.append(torch.nn.functional.normalize(prompts.mean(dim=0), dim=0))
    return torch.stack(rows).cpu()


# ---------------------------------------------------------------------------- metrics


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classnames: list[str]) -> dict:
    """CLIP_benchmark's definitions: acc1/acc5 top-k over the logits (acc5 only with 5 classes or more),
    mean_per_class_recall over the classes present in labels (balanced_accuracy_score)."""
    n_classes = len(classnames)
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise ConfigError(f"a .cls label {int(labels.max())} is outside the {n_classes} classes of {CLASSNAMES}")
    top = logits.topk(min(5, n_classes), dim=1).indices
    hits = top == labels[:, None]
    pred = top[:, 0]
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(dim=1)
    recall = confusion.diag().double() / support.clamp(min=1)
    out = {"acc1": hits[:, :1].any(dim=1).double().mean().item()}
    if n_classes >= 5:
        out["acc5"] = hits.any(dim=1).double().mean().item()
    out["mean_per_class_recall"] = recall[support > 0].mean().item()
    out["n"] = len(labels)
    out["per_class_recall"] = {c: (r if s else None) for c, r, s in zip(classnames, recall.tolist(), support.tolist())}
    out["confusion_matrix"] = confusion.tolist()
    return out


def zero_shot_classify(pretrained, dataset: str | Path, split: str = "test", batch_size: int = 64) -> dict:
    """A `Pretrained` (load_pretrained) on CLIP_benchmark's layout -> classification_metrics + modality."""
    dataset = Path(dataset)
    classnames, templates = read_classnames(dataset), read_templates(dataset)  # their errors before any encoding
    emb, labels, modality = embed_split(pretrained, dataset, split, batch_size)
    return {**zero_shot_metrics(pretrained, emb, labels, classnames, templates), "modality": modality}


def zero_shot_metrics(pretrained, emb: torch.Tensor, labels: torch.Tensor, classnames: list[str],
                      templates: list[str]) -> dict:
    """Media embeddings and their labels scored against CLIP's classifier of the class prompts."""
    weights = classifier_weights(pretrained, classnames, templates)
    return classification_metrics(emb @ weights.T, labels, classnames)


# ---------------------------------------------------------------------------- outputs


def plot_confusion(confusion: list[list[int]], classnames: list[str], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classnames)
    fig, ax = plt.subplots(figsize=(max(4, 2 + 0.4 * n), max(3.5, 1.5 + 0.4 * n)))
    ax.imshow(confusion, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true")
    ax.set_title(title, fontsize=9)
    ax.set_xticklabels(classnames, rotation=90)
    ax.set_yticklabels(classnames)
    if n <= 30:
        top = max(max(row) for row in confusion)
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                ax.text(j, i, count, ha="center", va="center", fontsize=7,
                        color="white" if count > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_result(r: dict) -> str:
    acc5 = f"  acc5 {r['acc5']:.3f}" if "acc5" in r else ""
    chance = 1 / len(r["per_class_recall"])
    return (f"acc1 {r['acc1']:.3f}{acc5}  mean_per_class_recall {r['mean_per_class_recall']:.3f}  "
            f"n {r['n']}  chance {chance:.3f}")


def cli(kind: str, doc: str, run, argv: list[str] | None) -> int:
    """The shared CLI of classify and linear_probe: run(pretrained, dataset, split, batch_size, eval_dir)
    -> result; writes eval/<kind>-<dataset>-<split>.json (or --out) and its confusion-matrix PNG."""
    from mmpretrain.model_folder import add_model_argument
    from mmpretrain.pretrained import open_model

    p = argparse.ArgumentParser(prog=f"python -m mmpretrain.eval.{kind}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p, required=True)
    p.add_argument("--dataset", required=True, help="a folder in CLIP_benchmark's layout")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None, help=f"JSON output (default: <run>/eval/{kind}-<dataset>-<split>.json)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    dataset = Path(args.dataset)
    try:
        if not dataset.is_dir():
            raise ConfigError(f"--dataset {dataset}: no such folder")
        pretrained, _, where = open_model(args.model, args.device, "--model")
        eval_dir, suffix = where.run / "eval", where.suffix
        result = run(pretrained, dataset, args.split, args.batch_size, eval_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_result(result))
    name = dataset.resolve().name
    out = Path(args.out) if args.out else eval_dir / f"{kind}-{name}-{args.split}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    png = plot_confusion(result["confusion_matrix"], list(result["per_class_recall"]),
                         f"{kind} {name}/{args.split}: acc1 {result['acc1']:.3f}", out.with_suffix(".png"))
    print(f"wrote {out} and {os.path.basename(png)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli("classify", __doc__, lambda model, dataset, split, bs, _: zero_shot_classify(model, dataset, split, bs),
               argv)


if __name__ == "__main__":
    sys.exit(main())
