"""curves.png: training losses, held-out recall and classification top-1 against step (and the
realised mix of the data sources, when a run has several)."""

from __future__ import annotations

import json
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _by_set(record: dict) -> dict:
    """A history.jsonl record as {"step", set name: result}; records written before eval sets had
    names hold the retrieval's directions at the top."""
    if any("->" in k for k in record):
        return {"step": record["step"], "retrieval": {k: v for k, v in record.items() if "->" in k}}
    return record


def _items(result: dict, direction: str) -> int:
    """The candidates a query of `direction` ranks, by which chance R@1 is 1 / items: a retrieval
    result's n counts queries, so text->image takes image->text's n (its images, where several
    captions may share one), the other directions their own."""
    a, b = direction.split("->")
    return result.get(f"{b}->{a}", result[direction])["n"] if a == "text" else result[direction]["n"]


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
    evals = [_by_set(e) for e in _read_jsonl(run_dir / "eval" / "history.jsonl")]
    classified = sorted({name for e in evals for name, r in e.items() if name != "step" and "acc1" in r})  # a panel of their own
    mixed = any("source_share" in m for m in metrics)  # several data.sources: a panel
    panels = 2 + bool(classified) + mixed
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), sharex=True)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps (the axes share it)
    ax_loss, ax_r1 = axes[:2]
    steps = [m["step"] for m in metrics]
    terms = [k for k in (metrics[0] if metrics else {}) if k == "loss" or "/" in k or k == "next_token"]
    for k in terms:
        ax_loss.plot(steps, [m.get(k, float("nan")) for m in metrics], label=k, lw=2 if k == "loss" else 1)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    ax_loss.legend(fontsize=8)
    retrieval = sorted({name for e in evals for name, r in e.items() if name != "step" and "acc1" not in r})
    # a colour per (set, pair), its two directions told apart by line and marker so that equal curves
    # stay visible; chance is 1 / the items a pair ranks, a line per distinct count
    pairs, chances = {}, {}  # (set, {a, b}) -> "text-image"; items -> those pairs
    for name in retrieval:
        runs = [e for e in evals if name in e]
        prefix = "" if retrieval == ["retrieval"] else f"{name} "
        for k in runs[-1][name]:
            pair = (name, frozenset(k.split("->")))
            style = {"ls": "--", "marker": "s", "ms": 9, "mfc": "none"} if pair in pairs else {"marker": "o"}
            pairs.setdefault(pair, prefix + k.replace("->", "-"))
            ax_r1.plot([e["step"] for e in runs], [e[name][k]["R@1"] for e in runs], label=prefix + k,
                       color=f"C{list(pairs).index(pair)}", **style)
            chances.setdefault(_items(runs[-1][name], k), set()).add(pairs[pair])
    for n, which in sorted(chances.items()):
        ax_r1.axhline(1 / n, color="gray", ls=":", lw=1,
                      label=f"chance (1/{n})" + (f": {', '.join(sorted(which))}" if len(chances) > 1 else ""))
    ax_r1.set(xlabel="step", ylabel="R@1", title="held-out retrieval", ylim=(0, 1))
    if retrieval:
        ax_r1.legend(fontsize=8)
    if classified:
        ax = axes[2]
        for i, name in enumerate(classified):
            runs = [e for e in evals if name in e]
            ax.plot([e["step"] for e in runs], [e[name]["acc1"] for e in runs], marker="o", color=f"C{i}", label=name)
            ax.axhline(1 / runs[-1][name]["classes"], color=f"C{i}", ls=":", lw=1)
        ax.set(xlabel="step", ylabel="top-1", title="classification (dotted: chance)", ylim=(0, 1))
        ax.legend(fontsize=8)
    if mixed:
        shares = [m for m in metrics if "source_share" in m]
        target = _configured_shares(run_dir)
        for i, name in enumerate(shares[-1]["source_share"]):
            colour = f"C{i}"
            axes[-1].plot([m["step"] for m in shares], [m["source_share"].get(name, 0.0) for m in shares],
                          color=colour, label=name)
            if name in target:
                axes[-1].axhline(target[name], color=colour, ls="--", lw=1, label=f"{name} (configured)")
        axes[-1].set(xlabel="step", ylabel="share of samples so far", title="data sources (realised mix)",
                     ylim=(0, 1))
        axes[-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_reconstructions(examples: dict, model_cfg, title: str, path: Path) -> Path:
    """Masked modelling's held-out reconstructions (objectives/masked.py `examples`): a row per
    sample and modality, showing the input, what the encoder saw (dropped patches blank) and the
    reconstruction (kept patches with the predicted ones). Images and video frames in colour (a
    video's first and last frame side by side), spectrograms as heat maps on the input's scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    rows = [(m, i) for m, (x, _, _) in examples.items() for i in range(len(x))]
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.2 * len(rows)), squeeze=False)
    for r, (m, i) in enumerate(rows):
        pictures = [t[i].float().cpu() for t in examples[m]]
        section = model_cfg.sections[m]
        for c, (pic, label) in enumerate(zip(pictures, ("input", "seen by the encoder", "reconstruction"))):
            ax = axes[r, c]
            if pic.shape[0] == 1:  # a spectrogram (1, mel bins, frames)
                ax.imshow(pic[0], origin="lower", aspect="auto", cmap="magma",
                          vmin=float(pictures[0].min()), vmax=float(pictures[0].max()))
            else:
                if pic.ndim == 4:  # video (3, T, S, S): first and last frame
                    pic = torch.cat([pic[:, 0], pic[:, -1]], dim=-1)
                mean, std = (torch.tensor(v).view(3, 1, 1) for v in (section.mean, section.std))
                ax.imshow((pic * std + mean).clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(m, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title above the columns
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
