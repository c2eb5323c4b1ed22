"""Score every (caption, media) pair with a model and keep the well-matched ones

DataComp's CLIP-score filter: the cosine similarity between a sample's caption (its first, as
evaluation reads it) and each of its media, by an mmpretrain export (--model: every modality pair
it has, text-image, text-audio, text-video) or by an open_clip CLIP built from a local
checkpoint (--open-clip-model NAME or config .json, --open-clip-checkpoint FILE: text-image;
nothing is downloaded). A sample is kept when every pair it has scores at least --threshold, or
is in the top --top-fraction of that pair's scores (DataComp's baseline keeps the top 30%).
Removed: `low_score`, with the pair, its score and the cutoff. Written besides: scores.jsonl
(key and score per pair) and scores.png (each pair's score histogram and its cutoff).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mmpretrain.config import ConfigError
from mmpretrain.data.curate.core import Outcome, flatten, map_shards, read_shard


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mmpretrain.model_folder import add_model_argument

    add_model_argument(p, default=None)
    p.add_argument("--open-clip-model", default=None, metavar="NAME",
                   help="an open_clip model name or model config .json (with --open-clip-checkpoint)")
    p.add_argument("--open-clip-checkpoint", default=None, metavar="FILE", help="its local checkpoint file")
    p.add_argument("--threshold", type=float, default=None, help="keep pairs scoring at least this cosine")
    p.add_argument("--top-fraction", type=float, default=None, help="keep the top fraction of each pair's scores")
    p.add_argument("--batch-size", type=int, default=64, help="samples embedded at once (default 64)")


def check(a: argparse.Namespace) -> None:
    if (a.model is None) == (a.open_clip_model is None):
        raise ConfigError("give one scorer: --model FOLDER or --open-clip-model NAME --open-clip-checkpoint FILE")
    if a.model:
        from mmpretrain.model_folder import find_model

        find_model(a.model, "--model")
    if a.open_clip_model and not (a.open_clip_checkpoint and Path(a.open_clip_checkpoint).is_file()):
        raise ConfigError(f"--open-clip-checkpoint {a.open_clip_checkpoint!r}: not a file (nothing is downloaded)")
    if (a.threshold is None) == (a.top_fraction is None):
        raise ConfigError("give one rule: --threshold COSINE or --top-fraction F")
    if a.top_fraction is not None and not 0 < a.top_fraction <= 1:
        raise ConfigError(f"--top-fraction {a.top_fraction}: expected a fraction in (0, 1]")


def score_records(records: list[dict]) -> list[dict]:
    """Embedded records (embed.embed_shard) -> {"key", "shard", "caption", "scores": {pair: cosine}}
    (or "bad", or "document": kept unscored)."""
    from mmpretrain.data.curate.embed import unit

    out = []
    for r in records:
        row = {k: r[k] for k in ("key", "shard", "caption")}
        if r.get("document"):
            row["document"] = True
        elif "bad" in r or not r.get("media"):
            row["bad"] = r.get("bad", ("no_media", "no medium the model reads"))
        else:
            t = unit([r["text"]])[0]
            row["scores"] = {f"text-{m}": float(unit([e])[0] @ t) for m, e in r["media"].items()}
        out.append(row)
    return out


def score_shard(url: str, model: str, caption_keys: list[str], keep, batch_size: int) -> list[dict]:
    from mmpretrain.data.curate.embed import embed_shard

    return score_records(embed_shard(url, model, caption_keys, keep, True, batch_size))


@functools.cache
def _open_clip(name: str, checkpoint: str):
    import open_clip

    if name.endswith(".json"):
        open_clip.add_model_config(name)
        name = Path(name).stem
    if name not in open_clip.list_models():
        raise ConfigError(f"--open-clip-model {name!r}: neither a model open_clip knows nor a model config .json")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoint)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def open_clip_shard(url: str, name: str, checkpoint: str, caption_keys: list[str], keep, batch_size: int) -> list[dict]:
    """score_shard with an open_clip CLIP: text-image only, images decoded by training's decoder."""
    from mmpretrain.config import ImageEncoderConfig
    from mmpretrain.data.samples import BadSample
    from mmpretrain.encoders import MODALITIES
    from mmpretrain.encoders.image import open_image

    model, preprocess, tokenizer = _open_clip(name, checkpoint)
    out, pending = [], []

    def flush():
        if pending:
            img = model.encode_image(torch.stack([x for _, x, _ in pending]), normalize=True)
            txt = model.encode_text(tokenizer([c for _, _, c in pending]), normalize=True)
            for (row, _, _), s in zip(pending, (img * txt).sum(-1).tolist()):
                row["scores"] = {"text-image": s}
            pending.clear()

    for s in read_shard(url, caption_keys, keep):
        row = {"key": s.key, "shard": s.shard, "caption": s.captions[0] if s.captions else ""}
        out.append(row)
        if s.document:
            row["document"] = True
            continue
        ext = next((e for e in MODALITIES["image"].extensions if e in s.members), None)
        if s.bad or ext is None:
            row["bad"] = s.bad or ("no_media", "no image (an open_clip scorer reads images)")
            continue
        try:
            pending.append((row, preprocess(open_image(s.members[ext], ImageEncoderConfig())), s.captions[0]))
        except BadSample as e:
            row["bad"] = (e.reason, e.detail)
        if len(pending) == batch_size:
            flush()
    flush()
    return out


def cutoffs(rows: list[dict], threshold: float | None, top_fraction: float | None) -> dict[str, float]:
    """pair -> the lowest score kept."""
    pairs = sorted({p for r in rows for p in r.get("scores", {})})
    if threshold is not None:
        return {p: threshold for p in pairs}
    out = {}
    for p in pairs:
        s = np.sort([r["scores"][p] for r in rows if p in r.get("scores", {})])[::-1]
        out[p] = float(s[max(0, int(np.ceil(top_fraction * len(s))) - 1)])
    return out


def plot(rows: list[dict], cut: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cut), figsize=(4.5 * len(cut), 3.2), squeeze=False)
    for ax, (pair, c) in zip(axes[0], cut.items()):
        scores = [r["scores"][pair] for r in rows if pair in r.get("scores", {})]
        ax.hist(scores, bins=40, color="tab:blue", alpha=0.8)
        ax.axvline(c, color="tab:red", label=f"cutoff {c:.3f}")
        kept = sum(s >= c for s in scores)
        ax.set(title=f"{pair}: {kept} of {len(scores)} kept", xlabel="cosine similarity", ylabel="samples")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(urls: list[str], a: argparse.Namespace, keep: frozenset[str] | None) -> Outcome:
    if a.model:
        job = functools.partial(score_shard, model=a.model, caption_keys=a.caption_keys, keep=keep,
                                batch_size=a.batch_size)
    else:
        job = functools.partial(open_clip_shard, name=a.open_clip_model, checkpoint=a.open_clip_checkpoint,
                                caption_keys=a.caption_keys, keep=keep, batch_size=a.batch_size)
    rows = flatten(map_shards(job, urls, a.workers, sys.stderr.isatty(), "scoring"))
    cut = cutoffs(rows, a.threshold, a.top_fraction)
    outcome = Outcome("score", [])
    for r in rows:
        low = [(p, s) for p, s in r.get("scores", {}).items() if s < cut[p]]
        if "bad" in r:
            outcome.removed.append({**{k: r[k] for k in ("key", "shard")}, "reason": r["bad"][0], "detail": r["bad"][1]})
        elif low:
            outcome.removed.append({"key": r["key"], "shard": r["shard"], "reason": "low_score",
                                    "detail": ", ".join(f"{p} {s:.3f} < {cut[p]:.3f}" for p, s in low),
                                    "caption": r["caption"]})
        else:
            outcome.keep.append(r["key"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.jsonl").write_text("".join(json.dumps({"key": r["key"], **r.get("scores", {})}) + "\n" for r in rows))
    outcome.files = [str(out / "scores.jsonl")]
    if cut:
        plot(rows, cut, out / "scores.png")
        outcome.files.append(str(out / "scores.png"))
    outcome.stats = {"cutoffs": cut, **{f"{p} quantiles (10/50/90%)": [round(float(q), 4) for q in np.quantile(
        [r["scores"][p] for r in rows if p in r.get("scores", {})], [0.1, 0.5, 0.9])] for p in cut}}
    return outcome
