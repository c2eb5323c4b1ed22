"""curves.png: training losses and held-out recall against step (and the realised mix of the
data sources, when a run has several)."""

from __future__ import annotations

import json
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _configured_shares(run_dir: Path) -> dict[str, float]:
    """{source name: weight / total} from the run's config.yaml ({} if it cannot be read)."""
    import yaml

    try:
        sources = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["sources"]
        weights = {s["name"] or s["pattern"]: float(s["weight"]) for s in sources if float(s["weight"]) > 0}
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return {}
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def plot_curves(run_dir: Path) -> Path:
    """Write run_dir/curves.png from the run's records so far."""
    import matplotlib.pyplot as plt

    fig = curves_figure(run_dir)
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def curves_figure(run_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    evals = _read_jsonl(run_dir / "eval" / "history.jsonl")
    mixed = any("source_share" in m for m in metrics)  # several data.sources: a third panel
    fig, axes = plt.subplots(1, 3 if mixed else 2, figsize=(18 if mixed else 12, 4.5), sharex=True)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps (the axes share it)
    ax_loss, ax_r1 = axes[:2]
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
    if evals:
        ax_r1.legend(fontsize=8)
    if mixed:
        shares = [m for m in metrics if "source_share" in m]
        target = _configured_shares(run_dir)
        for i, name in enumerate(shares[-1]["source_share"]):
            colour = f"C{i}"
            axes[2].plot([m["step"] for m in shares], [m["source_share"].get(name, 0.0) for m in shares],
                         color=colour, label=name)
            if name in target:
                axes[2].axhline(target[name], color=colour, ls="--", lw=1, label=f"{name} (configured)")
        axes[2].set(xlabel="step", ylabel="share of samples so far", title="data sources (realised mix)",
                    ylim=(0, 1))
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig
