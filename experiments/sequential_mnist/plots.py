"""The sequential-MNIST figures, drawn from the run's metrics file."""

from experiments.common.metrics import EMA, PRECISE
from experiments.common.plotting import load_metrics, plt, save
from experiments.sequential_mnist.metrics import (
    BN_LSTM,
    BN_LSTM_PRECISE,
    ESTIMATES,
    LSTM,
    NETWORKS,
    PLOTTED_NORMS,
    SPLITS,
    TEST,
)

FIGURES = ("accuracy.png", "population_statistics.png")
LABELS = {LSTM: "LSTM", BN_LSTM: "BN-LSTM, moving averages"}
COLORS = {LSTM: "tab:blue", BN_LSTM: "tab:red"}
LINESTYLES = {EMA: "--", PRECISE: "-"}
NORM_LABELS = {
    "recurrent_norm": "hidden-to-hidden pre-activation (input gate)",
    "cell_norm": "cell state",
}


def plot_all(metrics_path, out_dir=None):
    """Writes the accuracy curves and the statistics figure; returns the paths."""
    metrics, out_dir = load_metrics(metrics_path, out_dir)
    return [
        save(_accuracy(metrics), out_dir / FIGURES[0]),
        save(_statistics(metrics), out_dir / FIGURES[1]),
    ]


def _accuracy(metrics):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = metrics["steps"]
    for name in NETWORKS:
        for split in SPLITS:
            ax.plot(
                steps,
                metrics["accuracy"][name][split],
                color=COLORS[name],
                linestyle="-" if split == TEST else "--",
                label=f"{LABELS[name]}, {split}",
            )
    # The BN-LSTM's curves use its moving averages; the markers give its
    # final accuracy with the statistics recomputed after training.
    for split in SPLITS:
        ax.plot(
            steps[-1],
            metrics["final_accuracy"][BN_LSTM_PRECISE][split],
            marker="*" if split == TEST else "o",
            markersize=11 if split == TEST else 7,
            markerfacecolor=COLORS[BN_LSTM] if split == TEST else "none",
            color=COLORS[BN_LSTM],
            linestyle="none",
            label=f"BN-LSTM, recomputed after training, {split}",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(f"Sequential MNIST ({metrics['config']['task']})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _statistics(metrics):
    statistics = metrics["population_statistics"]
    neurons = metrics["config"]["neurons"]
    fig, axes = plt.subplots(2, len(PLOTTED_NORMS), figsize=(11, 6), squeeze=False)
    for column, norm in enumerate(PLOTTED_NORMS):
        for row, key in enumerate(("mean", "variance")):
            ax = axes[row][column]
            for estimate in ESTIMATES:
                values = statistics[estimate][norm][key]
                for i, unit in enumerate(neurons):
                    ax.plot(
                        [v[i] for v in values],
                        color=f"C{i}",
                        linestyle=LINESTYLES[estimate],
                        label=f"unit {unit}" if estimate == PRECISE else None,
                    )
            ax.set_xlabel("timestep")
            ax.set_ylabel(f"population {key}")
            ax.set_title(NORM_LABELS[norm], fontsize=10)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(neurons), fontsize=8)
    fig.suptitle(
        "BN-LSTM population statistics by timestep: moving averages (dashed) "
        "and recomputed after training (solid)"
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
