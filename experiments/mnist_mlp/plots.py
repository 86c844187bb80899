"""Figure 1's three figures, drawn from a run's metrics file."""

import matplotlib.ticker
import numpy as np

from experiments.common.metrics import (
    BN,
    BN_BATCH_STATS,
    BN_POPULATION,
    MEAN,
    P15,
    P50,
    P85,
    PLAIN,
)
from experiments.common.plotting import load_metrics, plt, save

FIGURES = ("accuracy.png", "sigmoid_input_percentiles.png", "sigmoid_input_means.png")


def plot_all(metrics_path, out_dir=None):
    """Writes Figure 1's three figures next to `metrics_path` (or into `out_dir`).

    Returns the paths written.
    """
    metrics, out_dir = load_metrics(metrics_path, out_dir)
    return [
        save(draw(metrics), out_dir / name)
        for name, draw in zip(FIGURES, (_accuracy, _percentiles, _means), strict=True)
    ]


ACCURACY_STYLES = {
    PLAIN: ("Without BN", "tab:blue", "-"),
    BN_POPULATION: ("With BN (population statistics)", "tab:red", "-"),
    BN_BATCH_STATS: ("With BN (test-set batch statistics)", "tab:red", ":"),
}


def _by_seed(metrics, *keys):
    """`(seeds, ...)` float array of one curve of every seed (null: NaN)."""
    values = []
    for seed in metrics["by_seed"]:
        for key in keys:
            seed = seed[key]
        values.append(seed)
    return np.asarray(values, dtype=float)


def _seeds_note(metrics):
    seeds = len(metrics["by_seed"])
    return f"mean of {seeds} seeds, band: min to max" if seeds > 1 else ""


def _accuracy(metrics):
    """Panel (a): the whole run on a logarithmic step axis and the whole
    accuracy range, so that the early lag of the population estimate shows,
    with an inset zooming on the last 90% of training. Over several seeds:
    the mean, and a band from the lowest to the highest seed."""
    steps = np.asarray(metrics["steps"])
    accuracy = {k: np.asarray(v, dtype=float) for k, v in metrics["accuracy"].items()}
    several = len(metrics["by_seed"]) > 1
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    after_start = steps > 0  # step 0 has no place on a log axis
    late = steps >= steps[-1] / 10
    inset = ax.inset_axes([0.47, 0.08, 0.5, 0.45])
    for target, keep in ((ax, after_start), (inset, late)):
        for curve, (label, color, style) in ACCURACY_STYLES.items():
            target.plot(
                steps[keep],
                accuracy[curve][keep],
                style,
                color=color,
                label=label,
                linewidth=1,
            )
            if several:
                curves = _by_seed(metrics, "accuracy", curve)
                target.fill_between(
                    steps[keep],
                    np.nanmin(curves, axis=0)[keep],
                    np.nanmax(curves, axis=0)[keep],
                    color=color,
                    alpha=0.12 if style == "-" else 0.06,
                    linewidth=0,
                )
        target.grid(alpha=0.3)
    ax.set_xscale("log")
    ax.set_xlim(steps[after_start][0], steps[-1])
    low = min(v[after_start].min() for v in accuracy.values())
    ax.set_ylim(max(0.0, low - 0.03), 1.0)
    late_values = np.concatenate([v[late] for v in accuracy.values()])
    inset.set_ylim(late_values.min() - 0.005, min(1.0, late_values.max() + 0.005))
    inset.set_xlim(steps[late][0], steps[-1])
    inset.set_title(f"steps {int(steps[late][0]):,} to {int(steps[-1]):,}", fontsize=8)
    inset.tick_params(labelsize=7)
    inset.xaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k")
    )
    ax.set_xlabel("Training steps (log scale)")
    ax.set_ylabel("Test accuracy" + (f" ({_seeds_note(metrics)})" if several else ""))
    sizes = "-".join(map(str, [784, *metrics["config"]["hidden_units"], 10]))
    ax.set_title(f"(a) MNIST test accuracy, {sizes} sigmoid MLP")
    # Below the axes: inside, it would cover the early curves.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small")
    return fig


PERCENTILE_STYLES = (
    (P15, "15th percentile", "--"),
    (P50, "50th percentile (median)", "-"),
    (P85, "85th percentile", ":"),
)


def _percentiles(metrics):
    """Panels (b, c). Over several seeds: each percentile's mean over the
    seeds, and a band from the lowest to the highest seed."""
    steps = np.asarray(metrics["steps"])
    activations = metrics["activations"]
    neuron = activations["neurons"][0]
    several = len(metrics["by_seed"]) > 1
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in zip(
        axes, (PLAIN, BN), ("(b) Without BN", "(c) With BN"), strict=True
    ):
        # (evaluations, statistic); null (a diverged network) becomes NaN.
        values = np.asarray(activations[key], dtype=float)[:, 0, :]
        if several:
            seeds = _by_seed(metrics, "activations", key)[:, :, 0, :]
            for column, _, _ in PERCENTILE_STYLES:
                ax.fill_between(
                    steps,
                    np.nanmin(seeds[:, :, column], axis=0),
                    np.nanmax(seeds[:, :, column], axis=0),
                    alpha=0.15,
                    color="tab:gray",
                    linewidth=0,
                    label="min to max over seeds" if column == P15 else None,
                )
        else:
            ax.fill_between(
                steps,
                values[:, P15],
                values[:, P85],
                alpha=0.15,
                color="tab:gray",
                label="15th to 85th percentile",
            )
        for column, label, style in PERCENTILE_STYLES:
            ax.plot(
                steps,
                values[:, column],
                style,
                color="black",
                linewidth=1.2 if column == P50 else 1,
                label=f"{label}, mean" if several else label,
            )
        ax.set_title(f"{title}: input to sigmoid, neuron {neuron}")
        ax.set_xlabel("Training steps")
        ax.grid(alpha=0.3)
    ylabel = "Sigmoid input over the test set"
    if several:
        ylabel += f"\n({len(metrics['by_seed'])} seeds' networks)"
    axes[0].set_ylabel(ylabel)
    axes[1].legend(loc="lower right", fontsize="small")
    return fig


def _means(metrics):
    """The mean sigmoid input of each recorded neuron: the first seed's
    networks (a neuron of one seed has no counterpart in another)."""
    steps = np.asarray(metrics["steps"])
    first = metrics["by_seed"][0]
    several = len(metrics["by_seed"]) > 1
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in zip(
        axes, (PLAIN, BN), ("Without BN", "With BN"), strict=True
    ):
        means = np.asarray(first["activations"][key], dtype=float)[:, :, MEAN]
        for i, neuron in enumerate(metrics["activations"]["neurons"]):
            ax.plot(steps, means[:, i], linewidth=1, label=f"neuron {neuron}")
        ax.set_title(f"{title}: mean sigmoid input over the test set")
        ax.set_xlabel("Training steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Mean sigmoid input")
    axes[1].legend(loc="best", fontsize="small")
    if several:
        fig.suptitle(f"The networks of seed {first['seed']}")
    return fig
