"""A run's named eval sets, evaluated during training and at its end.

A run has: the retrieval on `data.eval_sources` (named "retrieval"); when a built-in demo corpus is
among them, the classification sets it writes beside its eval split (`<modality>-<attribute>`,
zero-shot every `train.eval_every` steps, and `<modality>-<attribute>-probe`, a linear probe, at the
end only); and every entry of `eval.sets` (retrieval on shards, zero-shot classification or a linear
probe on CLIP_benchmark's layout), each every its `every` steps (0: `train.eval_every`). Every set
runs at the end.

A set is split across the data-parallel ranks: each embeds its own part (every dp-th sample, or its
own shards), the parts are gathered and the metrics computed from all of them, so every rank holds
the same result. Under FSDP2 each unit's parameters are gathered for the evaluation
(`parallel.fsdp.gathered`): the parts may differ in batches and modalities without any forward
waiting on another rank. Sequence-parallel peers (parallel.sp) embed the same part together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmpretrain.config import Config, ConfigError

KINDS = ("retrieval", "classification", "linear_probe")


@dataclass
class EvalSet:
    name: str
    kind: str  # one of KINDS
    every: int  # steps between evaluations (0: at the end only)
    urls: list[str] | None = None  # retrieval: the shards
    folder: Path | None = None  # classification, linear_probe: CLIP_benchmark's layout
    modality: str = ""
    split: str = "test"
    zero_shot: bool = False  # retrieval: its corpus says it is (sources.zero_shot), not only held out

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0


def run_sets(cfg: Config) -> list[EvalSet]:
    """The run's sets, resolved and checked (shards found, dataset folders in the layout)."""
    from mmpretrain.data.sources import demo_classification_sets, eval_urls, zero_shot
    from mmpretrain.eval.classify import read_classnames, read_templates, split_shards

    every = cfg.train.eval_every
    sets = [EvalSet("retrieval", "retrieval", every, urls=eval_urls(cfg.data, cfg.data.eval_sources),
                    zero_shot=zero_shot(cfg.data.eval_sources))]
    for name, folder in demo_classification_sets(cfg.data, cfg.model.modalities).items():
        sets.append(EvalSet(name, "classification", every, folder=folder))
        if (folder / "train").is_dir():  # at the end only: it embeds the train/ split too
            sets.append(EvalSet(f"{name}-probe", "linear_probe", 0, folder=folder))
    for i, s in enumerate(cfg.eval.sets):
        where = f"eval.sets[{i}] ({s.name})"
        one = EvalSet(s.name, s.kind, s.every or every, modality=s.modality, split=s.split)
        if s.kind == "retrieval":
            one.urls, one.zero_shot = eval_urls(cfg.data, [s.path], f"{where}.path"), zero_shot([s.path])
        else:
            one.folder = Path(s.path).expanduser()
            if not one.folder.is_dir():
                raise ConfigError(f"{where}.path: {s.path!r} is not a folder; a {s.kind} set is a folder in "
                                  f"CLIP_benchmark's layout (classnames.txt, {s.split}/nshards.txt, ...)")
            read_classnames(one.folder), read_templates(one.folder)  # each raises naming what is missing
            for split in (s.split, "train") if s.kind == "linear_probe" else (s.split,):
                split_shards(one.folder, split)
        sets.append(one)
    if len({s.name for s in sets}) < len(sets):
        names = [s.name for s in sets]
        raise ConfigError(f"eval.sets: a set is named as one the run already has ({names}); rename it")
    return sets


def headline(kind: str, result: dict) -> dict:
    """What history.jsonl and TensorBoard keep of a result: retrieval's recalls; a classification's
    acc1, acc5, mean_per_class_recall, n and classes (not each class's recall nor the confusion matrix)."""
    if kind == "retrieval":
        return result
    kept = {k: result[k] for k in ("acc1", "acc5", "mean_per_class_recall", "n", "weight_decay") if k in result}
    return {**kept, "classes": len(result["per_class_recall"])}


class Evaluator:
    """Runs sets on a model in training: `evaluate(sets)` -> {name: result}. `rank`/`world`: this
    process's data-parallel coordinates; `gather(obj)` -> every dp rank's obj in rank order."""

    def __init__(self, model, cfg: Config, tokenizer, device, rank: int = 0, world: int = 1, gather=None):
        from mmpretrain.pretrained import Pretrained

        self.model, self.cfg, self.tokenizer, self.device = model, cfg, tokenizer, device
        self.rank, self.world, self.gather = rank, world, gather or (lambda obj: [obj])
        was_training = model.training
        self.pretrained = Pretrained(model, cfg.model)  # a view of the model in training, not a copy
        model.train(was_training)
        self._warned: set[str] = set()  # retrieval sets whose shared captions were checked

    def evaluate(self, sets: list[EvalSet]) -> dict[str, dict]:
        was_training = self.model.training
        self.model.eval()
        self._embedded = {}  # (folder, split) -> its embeddings, for this call's weights only
        try:
            return {s.name: getattr(self, s.kind)(s) for s in sets}
        finally:
            self._embedded = {}
            self.model.train(was_training)

    def retrieval(self, s: EvalSet) -> dict:
        from mmpretrain.data import eval_batches
        from mmpretrain.eval.retrieval import embed_batches, retrieval_metrics, warn_shared_captions

        batches = eval_batches(s.urls, self.cfg, self.tokenizer, rank=self.rank, world=self.world)
        emb, present, caption_item, _, captions = _merge(self.gather(embed_batches(self.model, self.tokenizer,
                                                                                   batches, self.device)))
        if self.rank == 0 and s.name not in self._warned:  # the set's captions are the same at every evaluation
            self._warned.add(s.name)
            warn_shared_captions(captions, caption_item, f"eval set {s.name}")
        results = retrieval_metrics(emb, present, caption_item)
        return {k: v for k, v in results.items() if not s.modality or s.modality in k.split("->")}

    def _embed(self, s: EvalSet, split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The split's embeddings, each encoded once per `evaluate` (a demo set's zero-shot and
        linear probe read the same test/ split), checked against the set's modality."""
        from mmpretrain.eval.classify import embed_split

        key = (Path(s.folder).resolve(), split)
        if key not in self._embedded:
            parts = self.gather(embed_split(self.pretrained, s.folder, split, rank=self.rank, world=self.world))
            modality = next((m for _, _, m in parts if m is not None), None)
            if modality is None:
                raise ConfigError(f"eval set {s.name}: {s.folder}/{split} holds no samples")
            emb = torch.empty(sum(len(e) for e, _, _ in parts), self.model.embed_dim)
            labels = torch.empty(len(emb), dtype=torch.long)
            for r, (e, y, _) in enumerate(parts):  # part r holds samples r, r + world, ...: the set's order back
                emb[r :: self.world], labels[r :: self.world] = e, y
            self._embedded[key] = emb, labels, modality
        emb, labels, modality = self._embedded[key]
        if s.modality and modality != s.modality:
            raise ConfigError(f"eval set {s.name}: its samples are {modality}, eval.sets says {s.modality}")
        return emb, labels, modality

    def classification(self, s: EvalSet) -> dict:
        from mmpretrain.eval.classify import read_classnames, read_templates, zero_shot_metrics

        emb, labels, modality = self._embed(s, s.split)
        metrics = zero_shot_metrics(self.pretrained, emb, labels, read_classnames(s.folder), read_templates(s.folder))
        return {**metrics, "modality": modality}

    def linear_probe(self, s: EvalSet) -> dict:
        from mmpretrain.eval.classify import read_classnames
        from mmpretrain.eval.linear_probe import probe_features

        x, y, modality = self._embed(s, "train")
        x_test, y_test, _ = self._embed(s, s.split)
        return {**probe_features(x, y, x_test, y_test, read_classnames(s.folder)), "modality": modality}


def _merge(parts: list[tuple]) -> tuple[dict, dict, torch.Tensor, list, list]:
    """embed_batches' outputs of the ranks' parts -> one set's (items renumbered in rank order)."""
    emb, present, caption_item, keys, captions = {}, {}, [], [], []
    for e, p, c, k, t in parts:
        for m, v in e.items():
            emb.setdefault(m, []).append(v)
        for m, v in p.items():
            present.setdefault(m, []).append(v)
        caption_item.append(c + len(keys))
        keys += k
        captions += t
    return ({m: torch.cat(v) for m, v in emb.items()}, {m: torch.cat(v) for m, v in present.items()},
            torch.cat(caption_item), keys, captions)


def format_classification(results: dict[str, dict], sets: list[EvalSet]) -> str:
    """The classification sets' table: set, kind, modality, classes, top-1, chance."""
    lines = [f"{'set':<24}{'kind':<16}{'modality':<10}{'classes':>8}{'top-1':>8}{'chance':>8}"]
    for s in sets:
        if s.kind != "retrieval" and s.name in results:
            r = results[s.name]
            classes = len(r["per_class_recall"])
            kind = "zero-shot" if s.kind == "classification" else "linear-probe"
            lines.append(f"{s.name:<24}{kind:<16}{r['modality']:<10}{classes:>8}{r['acc1']:>8.3f}{1 / classes:>8.3f}")
    return "\n".join(lines)
