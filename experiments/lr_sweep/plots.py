"""The learning-rate sweep's figure, drawn from its metrics file."""

import numpy as np

from experiments.common.metrics import BN, PLAIN
from experiments.common.plotting import load_metrics, plt, save

FIGURES = ("lr_sweep.png",)


def plot_all(metrics_path, out_dir=None):
    """Final test accuracy against learning rate: mean over seeds, min to max."""
    metrics, out_dir = load_metrics(metrics_path, out_dir)
    entries = metrics["by_learning_rate"]
    rates = np.array([e["learning_rate"] for e in entries])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, color in (
        (PLAIN, "Without BN", "tab:blue"),
        (BN, "With BN", "tab:red"),
    ):
        mean = np.array([e[key]["mean"] for e in entries])
        low = np.array([e[key]["min"] for e in entries])
        high = np.array([e[key]["max"] for e in entries])
        ax.errorbar(
            rates,
            mean,
            yerr=[mean - low, high - mean],
            marker="o",
            capsize=3,
            color=color,
            label=f"{label} (mean, min to max)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("Learning rate (SGD on the loss summed over the mini-batch)")
    ax.set_ylabel("Final test accuracy")
    seeds = len(metrics["config"]["seeds"])
    ax.set_title(f"{metrics['config']['steps']} steps, {seeds} seeds per point")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left")
    return save(fig, out_dir / FIGURES[0])
