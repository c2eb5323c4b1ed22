"""Zero-shot retrieval: R@1/5/10 for every ordered pair of modalities present.

Definitions follow CLIP_benchmark's zero-shot retrieval: each caption is a
query for media retrieval (found when its own item is in the top k); for text
retrieval each item is a query, found when *any* of its captions is in the
top k. Media-to-media queries are found when the same item is in the top k.

    python -m mmpretrain.eval.retrieval --model runs/demo --shards 'eval-{000..003}.tar'

`--model` (or `--run`) is a run folder (its export/, or its newest checkpoint before there is
one), an export/ folder or a checkpoint folder (runs/demo/checkpoints/step_00000400). The
table is written beside the training run's own eval/retrieval.json, never over it,
named after the shards (and the checkpoint): eval/retrieval-eval-000..003.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys
from pathlib import Path

import torch

KS = (1, 5, 10)
SHARED_CAPTIONS = 0.01  # the share of captions that are also another item's above which a warning says so
log = logging.getLogger(__name__)


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks=KS) -> dict[str, float]:
    """scores, positives: (queries, candidates). A query counts when a positive is in its top k."""
    order = scores.argsort(dim=1, descending=True)
    hits = positives.gather(1, order)  # (Q, C) positives in rank order
    return {f"R@{k}": hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def retrieval_metrics(emb: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                      caption_item: torch.Tensor | None = None) -> dict[str, dict]:
    """emb[m]: (N, E) normalised item embeddings; emb["text"]: (T, E) caption embeddings with
    caption_item: (T,) the item of each caption (default: one caption per item).
    present[m]: (N,) which items have modality m. -> {"text->image": {"R@1", "R@5", "R@10", "n"}, ...}"""
    n_text = len(emb["text"]) if "text" in emb else 0
    if caption_item is None:
        caption_item = torch.arange(n_text)
    media = [m for m in emb if m != "text"]
    out = {}
    for m in media:
        items = present[m].nonzero().squeeze(1)  # candidate items that have m
        if len(items) == 0:
            continue  # e.g. audio in an image-text benchmark
        if "text" in emb:
            caps = present[m][caption_item].nonzero().squeeze(1)
            pos = caption_item[caps][:, None] == items[None]  # (captions, items)
            sim = emb["text"][caps] @ emb[m][items].t()
            out[f"text->{m}"] = {**recall_at_k(sim, pos), "n": len(caps)}
            out[f"{m}->text"] = {**recall_at_k(sim.t(), pos.t()), "n": len(items)}
        for other in media:
            if other != m:
                both = (present[m] & present[other]).nonzero().squeeze(1)
                if len(both) == 0:
                    continue
                sim = emb[m][both] @ emb[other][both].t()
                out[f"{m}->{other}"] = {**recall_at_k(sim, torch.eye(len(both), dtype=torch.bool)),
                                        "n": len(both)}
    return out


def warn_shared_captions(captions: list[str], caption_item: torch.Tensor, what: str) -> int:
    """Say so when many captions are word for word another item's caption too: those items tie for
    the caption (text->media) and their captions tie (media->text), so R@1 counts how the set is
    ordered, not what the model learned. -> how many such captions."""
    items = collections.defaultdict(set)
    for text, item in zip(captions, caption_item.tolist()):
        items[text].add(item)
    shared = [text for text in captions if len(items[text]) > 1]
    if len(shared) > SHARED_CAPTIONS * len(captions):
        log.warning("%s: %d of %d captions (%.0f%%) are word for word another item's caption too (%d text(s) "
                    "shared): R@1 is undefined for them (a tie, broken by the order of the set); make the eval "
                    "captions distinct", what, len(shared), len(captions), 100 * len(shared) / len(captions),
                    len(set(shared)))
    return len(shared)


def static_frames(video: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) clips -> each clip's first frame repeated T times: the control that shows
    whether a video model uses motion (its retrieval should drop) or single frames."""
    return video[:, :1].expand_as(video).contiguous()


@torch.no_grad()
def embed_batches(model, tokenizer, batches, device, static: bool = False) -> tuple[dict, dict, torch.Tensor, list,
                                                                                  list]:
    """Run the model's encoders over eval batches -> item embeddings (text: one row per
    caption), presence masks, the item of each caption, keys, the captions. `static`: video as
    static_frames."""
    was_training = model.training
    model.eval()
    emb, present, caption_item, keys, texts = {}, {}, [], [], []
    for batch in batches:
        if not batch.keys:  # only interleaved documents: nothing to retrieve
            continue
        batch = batch.to(device)
        if static and "video" in batch.media:
            batch.media["video"] = static_frames(batch.media["video"])
        captions = [c for caps in batch.captions for c in caps]
        caption_item += [len(keys) + i for i, caps in enumerate(batch.captions) for _ in caps]
        keys += batch.keys
        texts += captions
        tokens, lengths = tokenizer(captions)
        parts = {"text": model.encode_text(tokens.to(device), lengths.to(device))}
        for m in model.modalities:
            has = batch.present[m]
            vec = torch.zeros(len(batch.keys), model.embed_dim, device=device)
            if has.any():
                vec[has] = model.encode_media(m, batch.media[m][has])[1].float()
            parts[m] = vec
            present.setdefault(m, []).append(has.cpu())
        for m, v in parts.items():
            emb.setdefault(m, []).append(v.float().cpu())
    model.train(was_training)
    emb = {m: torch.cat(v) for m, v in emb.items()}
    present = {m: torch.cat(v) for m, v in present.items()}
    return emb, present, torch.tensor(caption_item, dtype=torch.long), keys, texts


def evaluate(model, cfg, tokenizer, urls: list[str], device, static: bool = False,
             what: str = "retrieval") -> dict[str, dict]:
    from mmpretrain.data import eval_batches

    emb, present, caption_item, _, captions = embed_batches(model, tokenizer, eval_batches(urls, cfg, tokenizer),
                                                            device, static)
    warn_shared_captions(captions, caption_item, what)
    return retrieval_metrics(emb, present, caption_item)


def probe_eval(urls: list[str], cfg, tokenizer, what: str = "data.eval_sources") -> None:
    """Read eval shards until one media-caption sample decodes: an unusable eval set is a config
    error before training, not a crash after it."""
    from mmpretrain.config import ConfigError
    from mmpretrain.data import eval_batches

    skipped = collections.Counter()
    for batch in eval_batches(urls, cfg, tokenizer, batch_size=1):
        skipped.update(batch.skipped)
        if batch.keys:
            return
    detail = f" (skipped: {dict(skipped)})" if skipped else ""
    raise ConfigError(f"{what}: no readable media-caption sample in {len(urls)} shard(s){detail}")


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'direction':<16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'n':>7}{'chance@1':>10}"]
    for name, r in results.items():
        chance = 1 / max(1, r["n"])
        lines.append(f"{name:<16}{r['R@1']:>8.3f}{r['R@5']:>8.3f}{r['R@10']:>8.3f}{r['n']:>7}{chance:>10.3f}")
    return "\n".join(lines)


def default_out(eval_dir: Path, patterns: list[str], suffix: str = "") -> Path:
    """eval/retrieval-<shards><suffix>.json, named after the shard patterns' last two path parts
    ('/data/coco/test-{000..003}.tar' -> retrieval-coco-test-000..003.json): beside the training
    run's own eval/retrieval.json, never over it."""
    names = []
    for pattern in patterns:
        name = "-".join([part for part in re.split(r"[/\\]", pattern) if part][-2:])
        name = name.replace("{", "").replace("}", "").replace(",", "+").removesuffix(".tar")
        names.append(re.sub(r"[^\w.+-]+", "_", name))
    return eval_dir / f"retrieval-{'+'.join(names)[:150]}{suffix}.json"


def main(argv: list[str] | None = None) -> int:
    from mmpretrain.config import ConfigError
    from mmpretrain.data.sources import check_media, expand, resolve_sources
    from mmpretrain.model_folder import add_model_argument
    from mmpretrain.pretrained import open_model

    p = argparse.ArgumentParser(prog="python -m mmpretrain.eval.retrieval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p, required=True)
    p.add_argument("--shards", default=None,
                   help="shard pattern (brace expansion); default: the run's data.eval_sources")
    p.add_argument("--out", default=None, help="JSON output (default: <run>/eval/retrieval-<shards>.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--static-frames", action="store_true",
                   help="control: every clip shows its first frame throughout (a model that learned motion "
                        "should drop); the default output's name ends in -static")
    args = p.parse_args(argv)

    try:
        pretrained, cfg, where = open_model(args.model, args.device, "--model")
        urls = expand([args.shards], "--shards") if args.shards else resolve_sources(cfg.data, "eval")
        what = "--shards" if args.shards else "data.eval_sources"
        check_media(cfg, [urls], what)
        probe_eval(urls, cfg, pretrained.tokenizer, what)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = evaluate(pretrained.model, cfg, pretrained.tokenizer, urls, args.device, args.static_frames, what)
    print(format_table(results))
    patterns = [args.shards] if args.shards else cfg.data.eval_sources
    suffix = where.suffix + "-static" * args.static_frames
    out = Path(args.out) if args.out else default_out(where.run / "eval", patterns, suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
