"""One command that checks a GPU machine: CUDA tests, the test suite, the demo job, GPU benchmarks.

    python benchmarks/gpu_check.py                    # everything that fits --budget (default 540 s)
    python benchmarks/gpu_check.py --parts cuda-tests,attention --out check.json

Parts (each in its own process group with its own timeout, so one slow part
cannot eat the others):

    cuda-tests    pytest -m cuda: every packed kernel vs float64, a bf16 training run with eval,
                  checkpoint, export and load_pretrained, resume on CUDA
    test-suite    the whole CPU suite (-m "not cuda"), run in the background beside the GPU parts
    demo          configs/text_image_audio.yaml end to end on the GPU: wall time, held-out R@1
    attention     benchmarks/attention_gpu.py: packed kernels vs SDPA is_causal on the same docs
    long-context  benchmarks/long_context.py --gpu: MFU of a ~1B decoder, longest sequence
    multimodal    benchmarks/multimodal_step.py: the whole step at a realistic size (MFU,
                  recompiles) and the contrastive step against open_clip ViT-B-16

It prints one table last and writes the same as JSON (card, torch version, each
figure, pass/fail per part). Without CUDA it says so, runs only the parts that
mean something there (the CUDA tests, which then skip, and the benchmarks, which
say there is nothing to measure) and exits 0. It installs nothing. Beyond torch
(and torchvision, torchaudio) it needs: timm, open_clip_torch, webdataset,
braceexpand, ftfy, wcwidth, regex, soundfile (with cffi and pycparser), av,
safetensors, pyyaml, tqdm, matplotlib, pillow, numpy, pytest. On a bare GPU image
bring them as wheels and put them on PYTHONPATH (`pip install --no-deps --target DIR
*.whl`), never replacing the machine's torch. HOME is pointed at a scratch folder
for every part, so the demo corpus cache is written there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Part:
    name: str
    cmd: list[str]
    timeout: int
    needs_cuda: bool = False  # without CUDA there is nothing for it to check
    background: bool = False  # runs beside the GPU parts (CPU-bound)
    status: str = "not run"
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    tail: str = ""


def pytest_counts(text: str) -> dict:
    """The counts of pytest's closing line ("3 passed, 1 skipped in 2.0s")."""
    last = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last[-1])} if last else {}


def run_part(part: Part, env: dict, log_dir: Path) -> None:
    start = time.perf_counter()
    log = log_dir / f"{part.name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(part.cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=part.timeout)
            part.status = "pass" if rc == 0 else f"fail (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            part.status = f"timeout ({part.timeout} s)"
    part.seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    part.tail = text[-4000:]
    try:
        part.figures = FIGURES.get(part.name, lambda t, p: {})(text, part)
    except Exception as e:  # a figure we cannot read must not hide the part's status
        part.figures = {"unreadable": repr(e)}


def attention_figures(text: str, part: Part) -> dict:
    out = {m.group(1): {"ms": float(m.group(2)), "tflops": float(m.group(3)), "vs_sdpa_is_causal": float(m.group(4))}
           for m in re.finditer(r"packed (\w+)\s*: +([\d.]+) ms +([\d.]+) TFLOP/s +ratio vs peer +([\d.]+)", text)}
    if m := re.search(r"peer .*?([\d.]+) ms +([\d.]+) TFLOP/s", text):
        out["peer_sdpa_is_causal"] = {"ms": float(m.group(1)), "tflops": float(m.group(2))}
    return out


def multimodal_figures(text: str, part: Part) -> dict:
    out = {}
    if m := re.search(r"([\d.]+) samples/s +([\d.]+) tokens/s .*?MFU +([\d.]+%)", text):
        out.update(samples_per_s=float(m.group(1)), tokens_per_s=float(m.group(2)), mfu=m.group(3))
    if m := re.search(r"recompiles over \d+ steps (\d+)", text):
        out["recompiles"] = int(m.group(1))
    if m := re.search(r"ratio ([\d.]+)x", text):
        out["vs_open_clip"] = float(m.group(1))
    return out


def long_context_figures(text: str, part: Part) -> dict:
    out = {f"mfu_ckpt_{m.group(1)}": m.group(2) for m in re.finditer(r"checkpointing (\w+)\s*:.*MFU ([\d.]+%)", text)}
    if m := re.search(r"longest single sequence trained.*?: ([\d,]+) tokens", text):
        out["longest_tokens"] = int(m.group(1).replace(",", ""))
    return out


def demo_figures(text: str, part: Part) -> dict:
    run_dir = Path(part.cmd[-1].split("=", 1)[1]) / "gpu_check"
    out = {"wall_s": round(part.seconds, 1)}
    results = run_dir / "eval" / "retrieval.json"
    if results.exists():
        r = json.loads(results.read_text())
        out.update({f"R@1 {k}": v["R@1"] for k, v in r.items() if k.startswith("text->")})
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rates = sorted(json.loads(l)["samples_per_s"] for l in metrics.read_text().splitlines()[1:])
        if rates:
            out["samples_per_s min/median/max"] = [round(rates[0]), round(rates[len(rates) // 2]), round(rates[-1])]
    if m := re.search(r"attention kernel: (.*)", text):
        out["attention"] = m.group(1)[:120]
    return out


FIGURES = {"cuda-tests": lambda t, p: pytest_counts(t), "test-suite": lambda t, p: pytest_counts(t),
           "attention": attention_figures, "long-context": long_context_figures, "demo": demo_figures,
           "multimodal": multimodal_figures}


def parts(scratch: Path) -> list[Part]:
    return [
        Part("cuda-tests", [PY, "-m", "pytest", "-q", "-m", "cuda", "tests"], 150),
        Part("test-suite", [PY, "-m", "pytest", "-q", "-m", "not cuda", "tests"], 420, background=True),
        Part("demo", [PY, "-m", "mmpretrain.train", "configs/text_image_audio.yaml", "run.name=gpu_check",
                      "train.progress=false", "data.num_workers=6", f"run.dir={scratch / 'runs'}"], 200,
             needs_cuda=True),
        Part("attention", [PY, "benchmarks/attention_gpu.py"], 90, needs_cuda=True),
        Part("long-context", [PY, "benchmarks/long_context.py", "--gpu", "--max-seq", "131072"], 150,
             needs_cuda=True),
        Part("multimodal", [PY, "benchmarks/multimodal_step.py"], 240, needs_cuda=True),
    ]


def table(rows: list[Part]) -> str:
    lines = [f"{'part':<14}{'status':<48}{'seconds':>8}  figures"]
    for p in rows:
        figs = json.dumps(p.figures)
        lines.append(f"{p.name:<14}{p.status:<48}{p.seconds:>8.0f}  {figs[:300]}")
    return "\n".join(lines)


def write_report(out: str, card: str, torch_version: str, log_dir: Path, chosen: list[Part]) -> None:
    report = {"card": card, "torch": torch_version, "date": time.strftime("%Y-%m-%d"), "logs": str(log_dir),
              "parts": {p.name: {"status": p.status, "seconds": round(p.seconds, 1), "figures": p.figures}
                        for p in chosen}}
    Path(out).write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=None, help="comma-separated subset of the parts (default: all)")
    ap.add_argument("--out", default="gpu_check.json", help="JSON report (default: gpu_check.json)")
    ap.add_argument("--budget", type=float, default=540,
                    help="seconds for the whole check (default 540, under a 10-minute device call): a part "
                         "gets at most what is left; one that would get under 30 s is skipped")
    a = ap.parse_args(argv)
    started = time.time()
    import torch

    cuda = torch.cuda.is_available()
    card = torch.cuda.get_device_name() if cuda else "no CUDA device"
    print(f"gpu_check: {card}, torch {torch.__version__}, Python {sys.version.split()[0]}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    env = {**os.environ, "HOME": str(scratch), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    chosen = parts(scratch)
    if a.parts:
        names = a.parts.split(",")
        unknown = set(names) - {p.name for p in chosen}
        if unknown:
            ap.error(f"unknown part(s) {sorted(unknown)}; known: {[p.name for p in chosen]}")
        chosen = [p for p in chosen if p.name in names]
    chosen_run = chosen
    if not cuda:
        print("no CUDA device here: running only what means something without one", flush=True)
        for p in chosen:
            if p.needs_cuda:
                p.status = "skipped (no CUDA)"
            elif p.background and not a.parts:  # the CPU suite is `pytest` itself; ask for it by name
                p.status = "skipped (no CUDA; --parts test-suite runs it)"
        chosen_run = [p for p in chosen if not p.status.startswith("skipped")]
    log_dir = scratch / "logs"
    log_dir.mkdir()
    for p in chosen_run:
        if p.background:
            p.timeout = min(p.timeout, a.budget - 20)
    background = [threading.Thread(target=run_part, args=(p, env, log_dir)) for p in chosen_run if p.background]
    for t in background:
        t.start()
    for p in chosen_run:
        if not p.background:
            left = a.budget - (time.time() - started) - 20  # 20 s kept for the report
            if left < 30:
                p.status = "skipped (out of --budget)"
                continue
            p.timeout = min(p.timeout, left)
            print(f"-- {p.name} (timeout {p.timeout:.0f} s)", flush=True)
            run_part(p, env, log_dir)
            print(f"   {p.status} in {p.seconds:.0f} s", flush=True)
            write_report(a.out, card, torch.__version__, log_dir, chosen)  # kept if the call is cut off
    for t in background:
        t.join()
    for p in chosen:
        if p.status not in ("pass",) and not p.status.startswith("skipped") and p.tail:
            print(f"\n---- {p.name}: last lines ----\n{p.tail[-2000:]}")
    write_report(a.out, card, torch.__version__, log_dir, chosen)
    print("\n" + table(chosen))
    print(f"\nwrote {a.out}")
    failed = [p.name for p in chosen if not (p.status == "pass" or p.status.startswith("skipped"))]
    return 1 if (cuda and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
