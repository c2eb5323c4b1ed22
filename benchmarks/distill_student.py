"""Does distillation help? A smaller student of the main job, trained with and without the main
job's export as its teacher, at equal steps, several seeds (CPU).

    python benchmarks/distill_student.py [--teacher runs/demo/export] [--seeds 0 1 2] [--weight 1.0]
        [--temperature 4.0] [--alone runs/distill_student/results.json]

The teacher is `--teacher` (an export of `configs/text_image_audio.yaml`), or trained here first
with that config's defaults. The student is the same config at a smaller size (`STUDENT`: towers
of width 48 and 2 layers, a decoder of width 64 and 1 layer), trained by `python -m
mmpretrain.train` for the config's steps once without a teacher and once with
`objectives.distill.teacher=<export>` per seed. Prints the final held-out R@1 of every direction per
run, the means per side and the difference; `--out` writes them as JSON. `--alone` takes the runs
without a teacher from an earlier results file instead of training them again (the same student
and seeds, so only what is distilled differs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/text_image_audio.yaml"
STUDENT = ["model.image.width=48", "model.image.depth=2", "model.audio.width=48", "model.audio.depth=2",
           "model.decoder.width=64", "model.decoder.layers=1"]


def train(run_dir: Path, name: str, overrides: list[str]) -> dict[str, float]:
    """One run of the main job -> its final held-out R@1 per direction."""
    cmd = [sys.executable, "-m", "mmpretrain.train", CONFIG, f"run.dir={run_dir}", f"run.name={name}",
           "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false", "train.resume=none", *overrides]
    log = run_dir / f"{name}.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"failed: {' '.join(cmd)}\n  see {log}")
    result = json.loads((run_dir / name / "eval" / "retrieval.json").read_text())
    return {k: v["R@1"] for k, v in result.items() if "->" in k}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="an export of the main job (default: train one first)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--weight", type=float, default=1.0, help="objectives.distill.weight")
    p.add_argument("--temperature", type=float, default=4.0, help="objectives.distill.temperature")
    p.add_argument("--alone", default=None, help="a previous run's results.json: its runs without the teacher "
                   "(the same student, seeds and machine) instead of training them again")
    p.add_argument("--dir", default="runs/distill_student")
    p.add_argument("--out", default=None, help="JSON results (default: <dir>/results.json)")
    a = p.parse_args()
    out = Path(a.dir).resolve()
    teacher = Path(a.teacher).resolve() if a.teacher else None
    if teacher is None:
        print("training the teacher (the main job's defaults) ...", flush=True)
        print("teacher:", train(out, "teacher", []), flush=True)
        teacher = out / "teacher" / "export"
    runs = {"alone": [], "distilled": []}
    if a.alone:
        before = json.loads(Path(a.alone).read_text())
        if before["student"] != STUDENT or before["seeds"] != a.seeds:
            sys.exit(f"--alone {a.alone}: another student or other seeds than this run's")
        runs["alone"] = before["runs"]["alone"]
    for seed in a.seeds:  # the sides alternate, so a drifting machine hits both alike
        for side in ["distilled"] if a.alone else runs:
            extra = [] if side == "alone" else [f"objectives.distill.teacher={teacher}",
                                                f"objectives.distill.weight={a.weight}",
                                                f"objectives.distill.temperature={a.temperature}"]
            r1 = train(out, f"{side}-{seed}", [*STUDENT, f"run.seed={seed}", *extra])
            runs[side].append(r1)
            print(f"{side:<10} seed {seed}: " + "  ".join(f"{k} {v:.2f}" for k, v in r1.items()), flush=True)
    directions = list(runs["alone"][0])
    means = {side: {k: statistics.mean(r[k] for r in rs) for k in directions} for side, rs in runs.items()}
    print(f"\nstudent {' '.join(STUDENT)}, teacher {teacher}, weight {a.weight}, temperature {a.temperature}, "
          f"seeds {a.seeds}")
    print(f"{'direction':<14}{'alone':>8}{'distilled':>11}{'difference':>12}   per seed (alone / distilled)")
    for k in directions:
        seeds = "  ".join(f"{x[k]:.2f}/{y[k]:.2f}" for x, y in zip(runs["alone"], runs["distilled"]))
        print(f"{k:<14}{means['alone'][k]:>8.3f}{means['distilled'][k]:>11.3f}"
              f"{means['distilled'][k] - means['alone'][k]:>+12.3f}   {seeds}")
    mean = {side: statistics.mean(m.values()) for side, m in means.items()}
    print(f"{'mean':<14}{mean['alone']:>8.3f}{mean['distilled']:>11.3f}{mean['distilled'] - mean['alone']:>+12.3f}")
    Path(a.out or out / "results.json").write_text(json.dumps(
        {"teacher": str(teacher), "student": STUDENT, "weight": a.weight, "temperature": a.temperature,
         "seeds": a.seeds, "runs": runs, "means": means}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
