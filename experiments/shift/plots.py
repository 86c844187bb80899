"""The shift experiment's figures, drawn from a run's metrics file."""

import numpy as np

from experiments.common.plotting import load_metrics, plt, save
from experiments.shift import data as sdata
from experiments.shift import methods

FIGURES = ("errors.png", "batch_size.png")


def plot_all(metrics_path, out_dir=None):
    """Writes `FIGURES` next to `metrics_path` (or into `out_dir`); returns paths."""
    metrics, out_dir = load_metrics(metrics_path, out_dir)
    return [
        save(draw(metrics), out_dir / name)
        for name, draw in zip(FIGURES, (_errors, _batch_size), strict=True)
    ]


def _errors(metrics):
    """A heatmap of the mean error over seeds: settings by methods."""
    names = metrics["settings"]
    rows = [*names, "mean over shifts"]
    table = np.array(
        [[np.mean(metrics["error"][m][n]) for m in methods.METHODS] for n in names]
        + [[np.mean(metrics["mean_error"][m]) for m in methods.METHODS]]
    )
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.6))
    image = ax.imshow(table, cmap="magma_r", vmin=0.0, vmax=100.0, aspect="auto")
    for (i, j), value in np.ndenumerate(table):
        ax.text(
            j,
            i,
            f"{value:.1f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if value > 55 else "black",
        )
    ax.set_xticks(range(len(methods.METHODS)))
    ax.set_xticklabels([methods.SHORT_LABELS[m] for m in methods.METHODS])
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([sdata.label(n) for n in names] + [rows[-1]])
    ax.axhline(len(names) - 0.5, color="black", linewidth=1.0)
    seeds = len(metrics["seeds"])
    ax.set_title(
        f"Test error (%), mean of {seeds} seed{'s' * (seeds > 1)}, test batch "
        f"{metrics['config']['test_batch_size']}",
        pad=28,
    )
    fig.colorbar(image, ax=ax, label="test error (%)", fraction=0.04)
    return fig


def _batch_size(metrics):
    """Error against the test batch size; a refused size is marked, not drawn."""
    curve = metrics["curve"]
    sizes = curve["batch_sizes"]
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for method in methods.CURVE_METHODS:
        values = [
            np.nan if any(v is None for v in per_seed) else np.mean(per_seed)
            for per_seed in curve["error"][method]
        ]
        (line,) = ax.plot(sizes, values, marker="o", label=methods.SHORT_LABELS[method])
        for size, value in zip(sizes, values, strict=True):
            if np.isnan(value):
                ax.plot(
                    [size], [100.0], marker="x", color=line.get_color(), markersize=9
                )
    ax.axhline(
        np.mean(curve["source"]),
        color="gray",
        linestyle="--",
        label="source (population statistics)",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_ylim(0.0, 102.0)
    ax.set_xlabel("test batch size")
    ax.set_ylabel("test error (%)")
    ax.set_title(
        f"Mean over the shifts at severity {curve['severity']}; x at 100: "
        "refused by bn_keras",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
