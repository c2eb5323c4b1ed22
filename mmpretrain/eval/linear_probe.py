"""Linear probe on CLIP_benchmark's dataset layout, with its protocol (metrics/linear_probe.py).

    python -m mmpretrain.eval.linear_probe --model runs/demo --dataset DIR [--split test] [--out FILE.json]

Frozen, normalised embeddings of DIR/train/ (the layout: see mmpretrain.eval.classify) feed a
logistic-regression head (a torch Linear, AdamW at lr 0.1 on a cosine schedule without warm-up,
10 epochs of batches of 64, cross-entropy). The weight decay is swept as CLIP_benchmark does it
with a validation split (here 20% of train, held out with a fixed seed): 97 values
logspace(-6, 2), first 7 evenly spread ones, then around the best at spans 8, 4, 2, 1, keeping
the one with the best validation top-1; the head is then refitted on all of train with it and
reported on --split (acc1, acc5, mean_per_class_recall, as zero-shot classification reports them).
On a terminal a progress bar counts the fits.

Embeddings are cached under the run's eval/features/, keyed by a hash of the model's weights,
the dataset folder and its shards, and the split: a second probe (or a sweep) does not re-encode.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmpretrain.eval.classify import classification_metrics, cli, embed_split, read_classnames, split_shards

LR, EPOCHS, BATCH_SIZE, VAL_PROPORTION, SEED = 0.1, 10, 64, 0.2, 0
WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()
MAX_FITS = 7 + 2 * 4 + 1  # the sweep's first 7, two new neighbours at each of 4 spans, the refit


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cached_features(pretrained, dataset: Path, split: str, batch_size: int, cache_dir: Path | None):
    """embed_split, kept in cache_dir/<weights>-<dataset>-<split>-<shards>.pt (None: no cache)."""
    if cache_dir is None:
        return embed_split(pretrained, dataset, split, batch_size)
    shards = hashlib.sha256()
    for shard in split_shards(dataset, split):
        stat = shard.stat()
        shards.update(f"{shard.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    path = (Path(cache_dir) / f"{weights_hash(pretrained.model)[:16]}-{Path(dataset).resolve().name}-{split}-"
                              f"{shards.hexdigest()[:12]}.pt")
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        return cached["features"], cached["labels"], cached["modality"]
    features, labels, modality = embed_split(pretrained, dataset, split, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"features": features, "labels": labels, "modality": modality}, path)
    return features, labels, modality


def fit_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float, lr: float = LR,
             epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, seed: int = SEED) -> torch.nn.Linear:
    """CLIP_benchmark's `train`: Linear, AdamW, cosine lr from `lr` to 0 over every step, shuffled
    batches; seeded (the caller's RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(x.shape[1], n_classes)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = -(-len(x) // batch_size)
        total = epochs * steps_per_epoch
        for epoch in range(epochs):
            order = torch.randperm(len(x))
            for i in range(steps_per_epoch):
                for group in opt.param_groups:
                    group["lr"] = 0.5 * (1 + np.cos(np.pi * (epoch * steps_per_epoch + i) / total)) * lr
                idx = order[i * batch_size : (i + 1) * batch_size]
                opt.zero_grad()
                F.cross_entropy(head(x[idx]), y[idx]).backward()
                opt.step()
    return head.eval()


def sweep_weight_decay(x_train, y_train, x_val, y_val, n_classes: int, bar=None, **fit) -> float:
    """CLIP_benchmark's search: 7 of WEIGHT_DECAYS, then the best and its neighbours at spans 8, 4, 2, 1
    (`find_peak`: the first best validation top-1 wins; index 0 when none is above 0). `bar`: a
    tqdm bar advanced by each fit."""
    accuracy = {}

    def val_acc1(i):
        if i not in accuracy:
            head = fit_head(x_train, y_train, n_classes, WEIGHT_DECAYS[i], **fit)
            with torch.no_grad():
                accuracy[i] = (head(x_val).argmax(dim=1) == y_val).double().mean().item()
            if bar is not None:
                bar.update(1)
        return accuracy[i]

    def find_peak(idxs):
        best, best_acc = 0, 0
        for i in idxs:
            if best_acc < val_acc1(i):
                best, best_acc = i, val_acc1(i)
        return best

    peak = find_peak(range(0, len(WEIGHT_DECAYS), 16))  # the 7 of logspace(-6, 2, 7)
    span = 8
    while span:
        peak = find_peak([max(peak - span, 0), peak, min(peak + span, len(WEIGHT_DECAYS) - 1)])
        span //= 2
    return WEIGHT_DECAYS[peak]


def linear_probe(pretrained, dataset: str | Path, split: str = "test", batch_size: int = 64,
                 cache_dir: Path | None = None, progress: bool = False, **fit) -> dict:
    """Fit on DIR/train with the swept weight decay, report on DIR/<split>; `progress`: a bar of the fits."""
    dataset = Path(dataset)
    classnames = read_classnames(dataset)
    x, y, modality = cached_features(pretrained, dataset, "train", batch_size, cache_dir)
    x_test, y_test, _ = cached_features(pretrained, dataset, split, batch_size, cache_dir)
    return {**probe_features(x, y, x_test, y_test, classnames, progress, **fit), "modality": modality}


def probe_features(x, y, x_test, y_test, classnames: list[str], progress: bool = False, **fit) -> dict:
    """The protocol on embeddings: the weight decay swept on 20% of (x, y) held out, the head refitted
    on all of it, reported on (x_test, y_test). `progress`: a bar of the fits on stderr."""
    from tqdm.auto import tqdm

    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    n_val = int(round(VAL_PROPORTION * len(x)))
    val, train = perm[:n_val], perm[n_val:]
    # MAX_FITS at most: the sweep skips the neighbours it has fitted, so the total is set at the end
    with tqdm(total=MAX_FITS, desc="linear probe", unit="fit", disable=not progress) as bar:
        wd = sweep_weight_decay(x[train], y[train], x[val], y[val], len(classnames), bar, **fit)
        bar.set_postfix(weight_decay=f"{wd:.1e}")
        head = fit_head(x, y, len(classnames), wd, **fit)
        bar.update(1)
        bar.total = bar.n
    with torch.no_grad():
        logits = head(x_test)
    return {**classification_metrics(logits, y_test, classnames), "weight_decay": wd, "n_train": len(x)}


def main(argv: list[str] | None = None) -> int:
    def run(model, dataset, split, batch_size, eval_dir):  # a bar of the sweep's fits on a terminal
        return linear_probe(model, dataset, split, batch_size, eval_dir / "features", progress=sys.stderr.isatty())

    return cli("linear_probe", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
