"""curves.png: training losses and held-out recall against step."""

from __future__ import annotations

import json
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_curves(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    evals = _read_jsonl(run_dir / "eval" / "history.jsonl")
    fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [m["step"] for m in metrics]
    terms = [k for k in (metrics[0] if metrics else {}) if k == "loss" or "/" in k or k == "next_token"]
    for k in terms:
        ax_loss.plot(steps, [m.get(k, float("nan")) for m in metrics], label=k, lw=2 if k == "loss" else 1)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    ax_loss.legend(fontsize=8)
    directions = [k for k in (evals[-1] if evals else {}) if "->" in k]
    for k in directions:
        ax_r1.plot([e["step"] for e in evals], [e[k]["R@1"] for e in evals], marker="o", label=k)
    if evals:
        n = evals[-1][directions[0]]["n"]
        ax_r1.axhline(1 / n, color="gray", ls=":", label=f"chance (1/{n})")
    ax_r1.set(xlabel="step", ylabel="R@1", title="held-out zero-shot retrieval", ylim=(0, 1))
    ax_r1.legend(fontsize=8)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
