"""What curation buys: the main job on the noisy demo corpus, raw against curated, at equal steps.

    python benchmarks/curation_gain.py [--seeds 0 1 2] [--steps 400] [--dir runs/curation_gain]

The noisy corpus (`demo-noisy`: the demo's training concepts with planted exact and near
duplicates, 30% mismatched captions and 20% off-target captions; truth.json says which) is
curated by one plan, `python -m mmpretrain.data.curate run`:

    dedup  --max-hamming 2    exact and perceptual-hash duplicates (2 bits: this corpus' distinct
                              samples are one concept drawn again, look-alikes the default 6 merges)
    dsir   --target target.txt --fraction 0.8    importance resampling toward the demo's caption style
    score  --model <raw seed 0's export> --top-fraction 0.7    the pair-quality filter

(the scorer is the model the first raw run trained on the noisy shards: a user without a clean
model of their own can bootstrap one). Each step's removals are scored against the planted truth
(precision and recall), then `configs/text_image_audio.yaml` trains on the raw shards and on the
curated uid list (`data.sources: [{pattern: ..., keep: keep.txt}]`), same steps and seeds, and
both are measured on the demo's clean held-out split. Prints the tables; writes <dir>/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIRECTIONS = ("text->image", "image->text", "text->audio", "audio->text", "image->audio", "audio->image")


def train(out: Path, name: str, seed: int, steps: int, source: str) -> tuple[dict, float]:
    """One run of the main job -> (R@1 per direction, seconds)."""
    cmd = [sys.executable, "-m", "mmpretrain.train", "configs/text_image_audio.yaml", f"run.dir={out}",
           f"run.name={name}", f"run.seed={seed}", f"train.steps={steps}", f"data.sources=[{source}]",
           "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false"]
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode:
            sys.exit(f"failed: {' '.join(cmd)} (see {out / f'{name}.log'})")
    seconds = time.perf_counter() - start
    retrieval = json.loads((out / name / "eval" / "retrieval.json").read_text())
    return {d: retrieval[d]["R@1"] for d in DIRECTIONS if d in retrieval}, seconds


def precision_recall(removed: set[str], truth: set[str]) -> str:
    hit = len(removed & truth)
    return f"precision {hit / max(1, len(removed)):.3f}, recall {hit / max(1, len(truth)):.3f} ({hit} of {len(truth)})"


def judge(plan_dir: Path, truth: dict) -> dict:
    """Each step's removals against the planted faults."""
    removed = [json.loads(line) for line in (plan_dir / "removed.jsonl").read_text().splitlines()]
    by_step = {s: {r["key"] for r in removed if r["step"] == s} for s in ("dedup", "dsir", "score")}
    copies = {**truth["exact_duplicate"], **{k: v["of"] for k, v in truth["near_duplicate"].items()}}
    groups = {frozenset(p) for p in copies.items()}
    found = {frozenset((r["key"], r["detail"].split()[1])) for r in removed
             if r["reason"] in ("exact_duplicate", "near_duplicate")}
    hit = len(found & groups)
    out = {"dedup": f"pairs: precision {hit / max(1, len(found)):.3f}, recall {hit / len(groups):.3f} "
                    f"({hit} of {len(groups)} planted pairs)",
           "dsir": "off-target " + precision_recall(by_step["dsir"], set(truth["off_target"])),
           "score": "mismatched " + precision_recall(by_step["score"], set(truth["mismatched"]))}
    kept = set((plan_dir / "keep.txt").read_text().split())
    out["kept"] = {"samples": len(kept), "mismatched": len(kept & set(truth["mismatched"])),
                   "off_target": len(kept & set(truth["off_target"])), "of": truth["total"]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--dir", default="runs/curation_gain")
    a = p.parse_args()
    from mmpretrain.config import DataConfig
    from mmpretrain.data.demo_noisy import demo_noisy_corpus

    out = Path(a.dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = demo_noisy_corpus(DataConfig().demo.cache_dir)
    truth = json.loads(Path(corpus["truth"]).read_text())
    rows = {"raw": [], "curated": []}
    first = a.seeds[0]
    rows["raw"].append(train(out, f"raw-{first}", first, a.steps, "demo-noisy"))
    plan = out / "plan.yaml"
    plan.write_text(json.dumps({"shards": corpus["train"], "out": str(out / "curated"), "workers": 2, "steps": [
        {"dedup": {"max_hamming": 2}}, {"dsir": {"target": corpus["target"], "fraction": 0.8}},
        {"score": {"model": str(out / f"raw-{first}" / "export"), "top_fraction": 0.7}}]}))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmpretrain.data.curate", "run", str(plan)], check=True, cwd=ROOT)
    curate_seconds = time.perf_counter() - start
    judged = judge(out / "curated", truth)
    print(json.dumps(judged, indent=1), flush=True)
    keep = out / "curated" / "keep.txt"
    curated = f"{{pattern: '{corpus['train']}', keep: '{keep}'}}"
    for seed in a.seeds:
        if seed != first:
            rows["raw"].append(train(out, f"raw-{seed}", seed, a.steps, "demo-noisy"))
        rows["curated"].append(train(out, f"curated-{seed}", seed, a.steps, curated))
        print(f"seed {seed} done", flush=True)
    print(f"\n{a.steps} steps, seeds {a.seeds}; curation took {curate_seconds:.0f} s")
    print(f"{'data':<10}" + "".join(f"{d:>14}" for d in DIRECTIONS) + f"{'mean':>8}{'s/run':>8}")
    summary = {}
    for name, runs in rows.items():
        means = {d: statistics.mean(r[d] for r, _ in runs) for d in DIRECTIONS}
        summary[name] = {"mean": means, "per_seed": [r for r, _ in runs], "seconds": [s for _, s in runs]}
        print(f"{name:<10}" + "".join(f"{means[d]:>14.3f}" for d in DIRECTIONS)
              + f"{statistics.mean(means.values()):>8.3f}{statistics.mean(s for _, s in runs):>8.0f}")
    (out / "results.json").write_text(json.dumps({"judged": judged, "runs": summary, "seeds": a.seeds,
                                                  "steps": a.steps, "curate_seconds": curate_seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
