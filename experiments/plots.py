"""Figure 1 of the BN paper, drawn from a run's metrics file."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FIGURES = ("accuracy.png", "sigmoid_input_percentiles.png", "sigmoid_input_means.png")


def plot_all(metrics_path, out_dir=None):
    """Writes the three figures next to `metrics_path` (or into `out_dir`).

    Returns the paths written.
    """
    metrics_path = Path(metrics_path)
    out_dir = Path(out_dir) if out_dir is not None else metrics_path.parent
    metrics = json.loads(metrics_path.read_text())
    paths = []
    for name, draw in zip(FIGURES, (_accuracy, _percentiles, _means), strict=True):
        fig = draw(metrics)
        path = out_dir / name
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _accuracy(metrics):
    steps = np.asarray(metrics["steps"])
    accuracy = metrics["accuracy"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(steps, accuracy["plain"], label="Without BN", color="tab:blue")
    ax.plot(
        steps,
        accuracy["bn_population"],
        label="With BN (population statistics)",
        color="tab:red",
    )
    ax.plot(
        steps,
        accuracy["bn_batch_stats"],
        label="With BN (test-set batch statistics)",
        color="tab:red",
        linestyle=":",
        alpha=0.8,
    )
    ax.set_xlabel("Training steps")
    ax.set_ylabel("Test accuracy")
    sizes = "-".join(map(str, [784, *metrics["config"]["hidden_units"], 10]))
    ax.set_title(f"(a) MNIST test accuracy, {sizes} sigmoid MLP")
    low = min(min(v[len(v) // 10 :]) for v in accuracy.values())
    ax.set_ylim(max(0.0, low - 0.02), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def _percentiles(metrics):
    steps = np.asarray(metrics["steps"])
    activations = metrics["activations"]
    neuron = activations["neurons"][0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in zip(
        axes, ("plain", "bn"), ("(b) Without BN", "(c) With BN"), strict=True
    ):
        values = np.asarray(activations[key])[:, 0, :]  # (evaluations, statistic)
        ax.fill_between(
            steps,
            values[:, 0],
            values[:, 2],
            alpha=0.2,
            color="tab:gray",
            label="15th to 85th percentile",
        )
        for column, (style, label) in enumerate(
            [("--", "15th"), ("-", "50th"), ("--", "85th")]
        ):
            ax.plot(
                steps,
                values[:, column],
                style,
                color="black",
                linewidth=1,
                label=f"{label} percentile",
            )
        ax.set_title(f"{title}: input to sigmoid, neuron {neuron}")
        ax.set_xlabel("Training steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Sigmoid input over the test set")
    axes[1].legend(loc="lower right", fontsize="small")
    return fig


def _means(metrics):
    steps = np.asarray(metrics["steps"])
    activations = metrics["activations"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in zip(
        axes, ("plain", "bn"), ("Without BN", "With BN"), strict=True
    ):
        means = np.asarray(activations[key])[:, :, 3]  # (evaluations, neuron)
        for i, neuron in enumerate(activations["neurons"]):
            ax.plot(steps, means[:, i], linewidth=1, label=f"neuron {neuron}")
        ax.set_title(f"{title}: mean sigmoid input over the test set")
        ax.set_xlabel("Training steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Mean sigmoid input")
    axes[1].legend(loc="best", fontsize="small")
    return fig


STUDY_STYLES = {
    "plain": ("Without BN", "tab:blue", "-"),
    "ema": ("EMA (momentum {momentum})", "tab:red", "-"),
    "debiased_ema": ("Debiased EMA", "tab:orange", "-"),
    "cumulative": ("Cumulative average", "tab:green", "-"),
    "precise": ("Precise BN", "tab:purple", "-"),
    "batch_stats": ("Test-set batch statistics", "black", ":"),
}


def plot_population_study(metrics_path, out_dir=None):
    """The study's figure: accuracy by population-statistics source."""
    metrics_path = Path(metrics_path)
    out_dir = Path(out_dir) if out_dir is not None else metrics_path.parent
    metrics = json.loads(metrics_path.read_text())
    steps = np.asarray(metrics["steps"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    early = steps <= min(2000, steps[-1])
    for ax, keep, title in zip(
        axes, (early, steps >= 0), ("First 2,000 steps", "Whole run"), strict=True
    ):
        for name, curve in metrics["accuracy"].items():
            label, color, style = STUDY_STYLES.get(name, (name, None, "-"))
            label = label.format(momentum=metrics["config"]["bn_momentum"])
            ax.plot(
                steps[keep],
                np.asarray(curve)[keep],
                style,
                color=color,
                label=label,
                linewidth=1.2,
            )
        ax.set_title(title)
        ax.set_xlabel("Training steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Test accuracy (inference)")
    axes[1].set_ylim(0.8, 1.0)
    axes[0].legend(loc="lower right", fontsize="small")
    fig.suptitle("BN network: where the population statistics come from")
    path = out_dir / "population_study.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_lr_sweep(metrics_path, out_dir=None):
    """Final test accuracy against learning rate: mean over seeds, min to max."""
    metrics_path = Path(metrics_path)
    out_dir = Path(out_dir) if out_dir is not None else metrics_path.parent
    metrics = json.loads(metrics_path.read_text())
    entries = metrics["by_learning_rate"]
    rates = np.array([e["learning_rate"] for e in entries])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, color in (
        ("plain", "Without BN", "tab:blue"),
        ("bn", "With BN", "tab:red"),
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
    path = out_dir / "lr_sweep.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
