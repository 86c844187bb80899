"""The population-statistics study's figure, drawn from its metrics file."""

import numpy as np

from experiments.common.metrics import (
    BATCH_STATS,
    CUMULATIVE,
    DEBIASED_EMA,
    EMA,
    PLAIN,
    PRECISE,
)
from experiments.common.plotting import load_metrics, plt, save

FIGURES = ("population_study.png",)

STUDY_STYLES = {
    PLAIN: ("Without BN", "tab:blue", "-"),
    EMA: ("EMA (momentum {momentum})", "tab:red", "-"),
    DEBIASED_EMA: ("Debiased EMA", "tab:orange", "-"),
    CUMULATIVE: ("Cumulative average", "tab:green", "-"),
    PRECISE: ("Precise BN", "tab:purple", "-"),
    BATCH_STATS: ("Test-set batch statistics", "black", ":"),
}


def plot_all(metrics_path, out_dir=None):
    """The study's figure: accuracy by population-statistics source."""
    metrics, out_dir = load_metrics(metrics_path, out_dir)
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
    return save(fig, out_dir / FIGURES[0])
