"""How much each library learns per step: ours against open_clip's CLIP on the relations corpus.

    python benchmarks/learning_vs_openclip.py [--seeds 0 1 2] [--steps 400] [--ours key=value ...]

Both sides train on the same shards (the built-in `demo-relations` corpus: two objects side by
side or one above the other, captions that bind colour to shape and name the relation), at
matched sizes: ViT 32 px / patch 4 / width 96 / 3 layers / 4 heads, a text path of width 128,
2 layers, 4 heads over open_clip's BPE with a 16-token context, embedding 128; the same batch
(128), steps, eps (1e-8) and random resized crops of 85-100% area, and the learning rate, warm-up,
weight decay and AdamW betas of ours' config (with the `--ours` overrides) passed to open_clip.
Ours is `python -m mmpretrain.train configs/text_image_audio.yaml` with the image modality and the
relations corpus (its shipped defaults otherwise; `--ours` adds overrides, for ablations);
open_clip's CLIP is trained by open_clip's own entry point (`open_clip_train.main`, the `bench`
extra) with a model config of those sizes written here. Both are then scored by the same code
(`mmpretrain.eval.retrieval`'s CLIP_benchmark definitions) on the 240 held-out scenes, each with
both phrasings as queries.
Wall-clock is each training command's, start to exit, run one at a time.

Prints text->image R@1 / R@5 and image->text R@1 per seed and side, the means, and the ratios;
writes everything to --out (JSON).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "text_image_audio.yaml"  # ours; its optimizer settings are open_clip's too
OPENCLIP_MODEL = "mmp-relations-vit"
OPENCLIP_CFG = {  # the sizes of ours under configs/text_image_audio.yaml's towers
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 96, "layers": 3, "head_width": 24},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
MEAN_STD = (0.5, 0.5, 0.5)  # ours' image normalisation; open_clip is told it by --image-mean / --image-std
# open_clip_train's own tar grouping stage fails on the installed webdataset (its end-of-shard
# markers carry no "fname": KeyError in group_by_keys_nothrow); webdataset's tarfile_to_samples with
# open_clip's log_and_continue handler stands in for that one stage (its own comment names it)
OPENCLIP_DATA_SHIM = ("import webdataset as wds, open_clip_train.data as d; "
                      "d.tarfile_to_samples_nothrow = wds.tarfile_to_samples(handler=d.log_and_continue)")
# One change at a time against ours' defaults (`--ablate NAME ...`: ours only, one seed each).
BEFORE = ["model.text.position_embedding=none", "model.image.init=timm", "model.image.pre_norm=false",
          "objectives.next_token_max_samples=32"]  # the defaults before this benchmark existed
ABLATIONS = {
    "defaults": [],
    "before": BEFORE,
    "learned_caption_positions": ["model.text.position_embedding=learned"],
    "vit_timm_init": ["model.image.init=timm"],
    "vit_no_pre_norm": ["model.image.pre_norm=false"],
    "caption_32": ["objectives.next_token_max_samples=32"],
    "contrastive_only": ["objectives.next_token_weight=0"],
    "no_grad_clip": ["train.grad_clip=0"],
    "min_lr_0": ["train.min_lr_ratio=0"],
    "pool_cls": ["model.fusion.embed_pool=cls"],
    "pool_attention": ["model.fusion.embed_pool=attention"],
}
SAMPLES_PER_EPOCH = 6400  # 50 batches of 128 per open_clip epoch (the corpus has 6,976 pairs)


def corpus() -> dict[str, str]:
    from mmpretrain.config import DataConfig
    from mmpretrain.data.demo_relations import demo_relations_corpus

    return demo_relations_corpus(DataConfig().demo.cache_dir)


def timed(cmd: list[str], log_file: Path, run_dir: Path) -> float:
    """Seconds `cmd` takes to train afresh in `run_dir` (removed first: neither side may resume)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    with open(log_file, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n  see {log_file}")
    return time.perf_counter() - start


def train_ours(out: Path, seed: int, steps: int, overrides: list[str]) -> tuple[float, Path]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mmpretrain.train", str(CONFIG), f"run.dir={out}",
           f"run.name=ours-{seed}", f"run.seed={seed}", "model.modalities=[image]",
           "data.sources=[demo-relations]", "data.eval_sources=[demo-relations]", f"train.steps={steps}",
           "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false", *overrides]
    return timed(cmd, out / f"ours-{seed}.log", out / f"ours-{seed}"), out / f"ours-{seed}" / "export"


def optimizer_flags(overrides: list[str]) -> list[str]:
    """open_clip's optimizer flags from ours' config and overrides (train.steps among them: the
    warm-up is a share of the run): both sides train alike."""
    from mmpretrain.config import load_config

    t = load_config(CONFIG, overrides).train
    return ["--lr", str(t.lr), "--warmup", str(t.warmup_steps), "--wd", str(t.weight_decay),
            "--beta1", str(t.betas[0]), "--beta2", str(t.betas[1])]


def train_open_clip(out: Path, seed: int, steps: int, shards: str, overrides: list[str]) -> tuple[float, Path]:
    epochs = steps * 128 // SAMPLES_PER_EPOCH
    if epochs * SAMPLES_PER_EPOCH != steps * 128:
        sys.exit(f"--steps must be a multiple of {SAMPLES_PER_EPOCH // 128} (open_clip trains whole epochs)")
    cfg_dir = out / "open_clip_config"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / f"{OPENCLIP_MODEL}.json").write_text(json.dumps(OPENCLIP_CFG, indent=1))
    args = ["--model", OPENCLIP_MODEL, "--train-data", shards, "--dataset-type", "webdataset",
            "--train-num-samples", str(SAMPLES_PER_EPOCH), "--epochs", str(epochs), "--batch-size", "128",
            *optimizer_flags([f"train.steps={steps}", *overrides]), "--eps", "1e-8",
            "--aug-cfg", "scale=(0.85,1.0)", "ratio=(0.9,1.1)",
            "--image-mean", *map(str, MEAN_STD), "--image-std", *map(str, MEAN_STD), "--workers", "1", "--precision", "fp32",
            "--device", "cpu", "--seed", str(seed), "--logs", str(out), "--name", f"open_clip-{seed}",
            "--save-frequency", str(epochs), "--zeroshot-frequency", "0", "--val-frequency", "0",
            "--log-every-n-steps", "50", "--report-to", ""]
    code = (f"import sys, open_clip; open_clip.add_model_config({str(cfg_dir)!r}); "
            f"{OPENCLIP_DATA_SHIM}; from open_clip_train.main import main; main(sys.argv[1:])")
    return (timed([sys.executable, "-c", code, *args], out / f"open_clip-{seed}.log", out / f"open_clip-{seed}"),
            open_clip_checkpoint(out, seed, steps))


def open_clip_checkpoint(out: Path, seed: int, steps: int) -> Path:
    return out / f"open_clip-{seed}" / "checkpoints" / f"epoch_{steps * 128 // SAMPLES_PER_EPOCH}.pt"


def eval_set(pattern: str) -> tuple[list, list[str], torch.Tensor]:
    """The eval shard's images (PIL), every caption, and the image of each caption."""
    from PIL import Image

    from mmpretrain.data.sources import expand

    members: dict[str, dict] = {}
    for url in expand([pattern], "eval"):
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    images, captions, item = [], [], []
    for i, key in enumerate(sorted(members)):
        images.append(Image.open(io.BytesIO(members[key]["png"])).convert("RGB"))
        lines = members[key]["txt"].decode().splitlines()
        captions += lines
        item += [i] * len(lines)
    return images, captions, torch.tensor(item)


def score(image_emb: torch.Tensor, text_emb: torch.Tensor, data) -> dict:
    from mmpretrain.eval.retrieval import retrieval_metrics

    _, captions, item = data
    r = retrieval_metrics({"image": image_emb.float(), "text": text_emb.float()},
                          {"image": torch.ones(len(image_emb), dtype=torch.bool)}, item)
    return {"t2i_R@1": r["text->image"]["R@1"], "t2i_R@5": r["text->image"]["R@5"],
            "i2t_R@1": r["image->text"]["R@1"],
            **within_pair(text_emb.float() @ image_emb.float().t(), captions, item)}


def within_pair(sim: torch.Tensor, captions: list[str], item: torch.Tensor) -> dict:
    """Where text->image retrieval goes wrong: among the 4 held-out scenes of each caption's object
    pair (2 orders x 2 relations), how often the best-scoring image has the caption's layout
    (side by side or one above the other; chance 0.5) and how often it is the right scene (chance 0.25)."""
    from mmpretrain.data.demo_relations import split_scenes

    scene_of = {sc.captions[0]: sc for sc in split_scenes(0)[1]}
    first = {}
    for caption, i in zip(captions, item.tolist()):
        first.setdefault(i, caption)
    scenes = [scene_of[first[i]] for i in range(len(first))]
    pairs = [frozenset((sc.first, sc.second)) for sc in scenes]
    same_pair = torch.tensor([[pairs[i] == p for p in pairs] for i in item.tolist()])  # (captions, items)
    best = sim.masked_fill(~same_pair, float("-inf")).argmax(dim=1).tolist()
    truth = item.tolist()
    return {"layout": statistics.mean(scenes[b].relation == scenes[t].relation for b, t in zip(best, truth)),
            "scene_of_4": statistics.mean(b == t for b, t in zip(best, truth))}


@torch.no_grad()
def score_ours(export: Path, data) -> dict:
    from mmpretrain import load_pretrained

    images, captions, item = data
    model = load_pretrained(export)
    return score(model.encode_image(images), model.encode_text(captions), data)


@torch.no_grad()
def score_open_clip(checkpoint: Path, out: Path, data) -> dict:
    import open_clip

    open_clip.add_model_config(str(out / "open_clip_config"))
    model, _, preprocess = open_clip.create_model_and_transforms(OPENCLIP_MODEL, pretrained=str(checkpoint),
                                                                 image_mean=MEAN_STD, image_std=MEAN_STD)
    tokenizer = open_clip.get_tokenizer(OPENCLIP_MODEL)
    model.eval()
    images, captions, item = data
    img = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
    return score(img, model.encode_text(tokenizer(captions), normalize=True), data)


def summary(rows: list[dict]) -> dict:
    keys = ("t2i_R@1", "t2i_R@5", "i2t_R@1", "layout", "scene_of_4", "seconds")
    return {k: statistics.mean(r[k] for r in rows) for k in keys}


def ablate(a, out: Path, data) -> int:
    seed, rows = a.seeds[0], {}
    for name in a.ablate:
        seconds, export = train_ours(out / name, seed, a.steps, a.ours + ABLATIONS[name])
        rows[name] = {"seed": seed, "overrides": a.ours + ABLATIONS[name], **score_ours(export, data),
                      "seconds": seconds}
        print(f"{name:<20} {json.dumps(rows[name])}", flush=True)
    print(f"\n{'ablation':<20}{'t2i R@1':>10}{'t2i R@5':>10}{'i2t R@1':>10}{'layout':>8}{'of 4':>8}{'seconds':>10}"
          f"  overrides")
    for name, r in rows.items():
        print(f"{name:<20}{r['t2i_R@1']:>10.3f}{r['t2i_R@5']:>10.3f}{r['i2t_R@1']:>10.3f}{r['layout']:>8.2f}"
              f"{r['scene_of_4']:>8.2f}{r['seconds']:>10.0f}  {' '.join(r['overrides'])}")
    Path(a.out or out / "ablations.json").write_text(json.dumps(rows, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for ours (ablations)")
    p.add_argument("--ablate", nargs="+", choices=list(ABLATIONS), metavar="NAME",
                   help=f"ours only, one run per named change (after --ours), first seed: {', '.join(ABLATIONS)}")
    p.add_argument("--sides", nargs="+", choices=["ours", "open_clip"], default=["ours", "open_clip"])
    p.add_argument("--dir", default="runs/learning_vs_openclip", help="where both sides' runs go")
    p.add_argument("--rescore", action="store_true",
                   help="score the runs already in --dir again (keeping their recorded seconds), train nothing")
    p.add_argument("--out", default=None, help="JSON results (default: <dir>/results.json)")
    a = p.parse_args()
    out = Path(a.dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards = corpus()  # generated before any clock starts
    data = eval_set(shards["eval"])
    if a.ablate:
        return ablate(a, out, data)
    rows: dict[str, list[dict]] = {side: [] for side in a.sides}
    timed_before = json.loads((out / "results.json").read_text())["runs"] if a.rescore else {}
    for seed in a.seeds:  # the sides alternate, so drifting machine load hits both alike
        for side in a.sides:
            if a.rescore:  # the runs already in --dir, and the seconds their training took then
                seconds = next(r["seconds"] for r in timed_before[side] if r["seed"] == seed)
            else:
                seconds, _ = (train_ours(out, seed, a.steps, a.ours) if side == "ours" else
                              train_open_clip(out, seed, a.steps, shards["train"], a.ours))
            scores = (score_ours(out / f"ours-{seed}" / "export", data) if side == "ours" else
                      score_open_clip(open_clip_checkpoint(out, seed, a.steps), out, data))
            rows[side].append({"seed": seed, **scores, "seconds": seconds})
            print(f"{side:<10} seed {seed}: {json.dumps(rows[side][-1])}", flush=True)
    means = {side: summary(r) for side, r in rows.items()}
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {a.steps} steps, seeds {a.seeds}, "
          f"{len(data[1])} held-out captions over {len(data[0])} scenes; ours: {' '.join(a.ours) or 'defaults'}")
    print(f"{'system':<12}{'t2i R@1':>10}{'(per seed)':>22}{'t2i R@5':>10}{'i2t R@1':>10}{'layout':>8}"
          f"{'of 4':>8}{'seconds':>10}")
    for side, r in rows.items():
        seeds = " / ".join(f"{x['t2i_R@1']:.2f}" for x in r)
        m = means[side]
        print(f"{side:<12}{m['t2i_R@1']:>10.3f}{seeds:>22}{m['t2i_R@5']:>10.3f}{m['i2t_R@1']:>10.3f}"
              f"{m['layout']:>8.2f}{m['scene_of_4']:>8.2f}{m['seconds']:>10.0f}")
    print("layout: the best of a caption's 4 same-pair scenes has its layout (chance 0.5); of 4: it is the "
          "right scene (chance 0.25)")
    if len(rows) == 2:
        o, t = means["ours"], means["open_clip"]
        print(f"ratio ours / open_clip: t2i R@1 {o['t2i_R@1'] / max(t['t2i_R@1'], 1e-9):.2f}x, "
              f"wall-clock {o['seconds'] / t['seconds']:.2f}x")
    result = {"steps": a.steps, "seeds": a.seeds, "ours_overrides": a.ours, "runs": rows, "means": means,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    Path(a.out or out / "results.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
