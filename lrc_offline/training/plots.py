"""PNG plots of training runs (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curves", "plot_sweep"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: dict[str, list[dict]], out_png: str | Path, key: str = "loss", title: str = "") -> Path:
    """One line per run: `key` against training tokens (held-out points drawn as markers if present)."""
    plt = _pyplot()
    many = len(runs) > 8  # a wide figure, the legend beside the axes and 20 distinct colours
    fig, ax = plt.subplots(figsize=(12, 5.5) if many else (7, 4.5))
    colours = plt.get_cmap("tab20").colors if many else plt.get_cmap("tab10").colors
    for index, (label, records) in enumerate(runs.items()):
        rows = [r for r in records if key in r]
        name = label if key == "heldout_ce" else f"{label} {key}"
        line = ax.plot([r["tokens"] for r in rows], [r[key] for r in rows], ".-", label=name,
                       color=colours[index % len(colours)])[0]  # fmt: skip
        held = [r for r in records if "heldout_ce" in r]
        if held and key != "heldout_ce":
            ax.plot([r["tokens"] for r in held], [r["heldout_ce"] for r in held], "o--", color=line.get_color(),
                    label=f"{label} held-out CE")  # fmt: skip
    ax.set_xlabel("training tokens")
    ax.set_ylabel("nats")
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


def plot_sweep(rows: list[dict], runs: dict[str, list[dict]], out_png: str | Path, metric: str) -> Path:
    """Left: final `metric` against student hidden size. Right: training loss against tokens per size."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    sizes = [r["hidden_size"] for r in rows]
    left.plot(sizes, [r[metric] for r in rows], "o-")
    left.set_xlabel("student hidden size d_S")
    left.set_ylabel(metric)
    left.set_title(f"{metric} against student size")
    left.grid(alpha=0.3)
    for label, records in runs.items():
        trained = [r for r in records if "loss" in r]
        right.plot([r["tokens"] for r in trained], [r["loss"] for r in trained], label=label)
    right.set_xlabel("training tokens")
    right.set_ylabel("training loss")
    right.set_title("loss against tokens")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
