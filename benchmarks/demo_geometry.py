"""Which attribute does a model trained on the demo corpus tell apart, and which not? The geometry of
an export's text, image and audio embeddings over the demo's concepts (CPU, seconds).

    python benchmarks/demo_geometry.py runs/demo/export [more exports ...]

Every one of the demo's 240 concepts (colour x shape x place, train and held-out) is rendered once
afresh (fixed seed) and embedded with its caption. For text->image and text->audio it prints the
mean cosine of the pairs, and for the negatives that differ from the query's concept in exactly one
attribute (the hard ones: the two others are shared) their mean cosine and the mean of each query's
closest such negative, per attribute; text-text likewise, for the captions alone. A model that
ranks the pair first keeps every attribute's closest negative below the pair; R@1 over the 240
concepts is printed beside it (not the training run's held-out figure: more candidates, other
renderings).
"""

from __future__ import annotations

import argparse
import random

import torch

from mmpretrain import load_pretrained
from mmpretrain.data import demo
from mmpretrain.eval.retrieval import recall_at_k

ATTRIBUTES = ("colour", "shape", "place")


def differs_only_in(concepts: list, attribute: str) -> torch.Tensor:
    """(n, n) bool: concept j differs from concept i in `attribute` and in no other."""
    return torch.tensor([[getattr(a, attribute) != getattr(b, attribute)
                          and all(getattr(a, o) == getattr(b, o) for o in ATTRIBUTES if o != attribute)
                          for b in concepts] for a in concepts])


def geometry(export: str) -> dict[str, dict[str, float]]:
    """-> {pair: {"pair": mean cosine, "R@1": ..., "<attribute>": mean, "<attribute> closest": ...}}."""
    concepts = demo.all_concepts()
    rng = random.Random(0)
    images = [demo.render_image(c, rng) for c in concepts]
    waves = [torch.from_numpy(demo.render_audio(c, rng)) for c in concepts]
    model = load_pretrained(export)
    with torch.no_grad():
        text = model.encode_text([c.caption for c in concepts])
        media = {"image": model.encode_image(images), "audio": model.encode_audio(waves, demo.SAMPLE_RATE),
                 "text": text}  # text-text: how far apart the text tower puts captions (its pair: 1)
    masks = {attribute: differs_only_in(concepts, attribute) for attribute in ATTRIBUTES}
    pairs = torch.eye(len(concepts), dtype=torch.bool)
    out = {}
    for modality, emb in media.items():
        sim = text @ emb.t()
        row = {"pair": sim.diag().mean().item(), **recall_at_k(sim, pairs, ks=(1,))}
        for attribute, mask in masks.items():
            row[attribute] = sim[mask].mean().item()
            row[f"{attribute} closest"] = torch.where(mask, sim, -2.0).max(1).values.mean().item()
        out[f"text-{modality}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", help="export folders of runs on the demo corpus")
    args = parser.parse_args()
    head = "| export | pair | R@1 (240) | pair cos | " + " | ".join(
        f"{a} (closest)" for a in ATTRIBUTES) + " |"
    print(head)
    print("|---|---|---:|---:|" + "---:|" * len(ATTRIBUTES))
    for export in args.exports:
        for pair, row in geometry(export).items():
            cells = " | ".join(f"{row[a]:.2f} ({row[a + ' closest']:.2f})" for a in ATTRIBUTES)
            print(f"| {export} | {pair} | {row['R@1']:.2f} | {row['pair']:.2f} | {cells} |")


if __name__ == "__main__":
    main()
