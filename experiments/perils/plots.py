"""The perils figure, drawn from a run's metrics file: best, median and worst
seed of each variant, per domain, as the post shows them."""

import numpy as np

from experiments.common.plotting import load_metrics, plt, save
from experiments.perils.models import LABELS, SCORE_LABELS, SCORES, VARIANTS

FIGURES = ("perils.png",)
COLORS = dict(zip(VARIANTS, ("C0", "C3", "C2", "C1", "C4"), strict=True))


def plot_all(metrics_path, out_dir=None):
    """Writes `FIGURES` next to `metrics_path` (or into `out_dir`); returns paths."""
    metrics, out_dir = load_metrics(metrics_path, out_dir)
    accuracy = metrics["accuracy"]
    fig, axes = plt.subplots(1, len(SCORES), figsize=(13, 4.6), sharey=False)
    positions = np.arange(len(VARIANTS))
    for ax, score in zip(axes, SCORES, strict=True):
        for position, variant in zip(positions, VARIANTS, strict=True):
            values = 100 * np.sort(np.asarray(accuracy[variant][score], float))
            color = COLORS[variant]
            ax.plot([position, position], [values[0], values[-1]], color=color, lw=2)
            ax.plot(position, values[-1], "^", color=color, ms=7)
            ax.plot(position, np.median(values), "o", color=color, ms=8)
            ax.plot(position, values[0], "v", color=color, ms=7)
            ax.plot(
                np.full(len(values), position + 0.15),
                values,
                ".",
                color="0.5",
                ms=4,
            )
        ax.set_xticks(positions, [LABELS[v].split(" ", 1)[0] for v in VARIANTS])
        ax.set_title(SCORE_LABELS[score])
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("test accuracy (%), population statistics")
    handles = [
        plt.Line2D([], [], color=COLORS[v], marker="o", lw=2, label=LABELS[v])
        for v in VARIANTS
    ]
    handles += [
        plt.Line2D([], [], color="k", marker=m, ls="", label=label)
        for m, label in (("^", "best seed"), ("o", "median"), ("v", "worst seed"))
    ]
    handles.append(
        plt.Line2D([], [], color="0.5", marker=".", ls="", label="each seed")
    )
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=5,
        fontsize=8,
        bbox_to_anchor=(0.5, -0.12),
    )
    fig.suptitle(
        f"BN on two domains (MNIST + UCI digits), {len(metrics['seeds'])} seeds: "
        "best / median / worst"
    )
    return [save(fig, out_dir / FIGURES[0])]
