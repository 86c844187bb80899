"""The LeNet-BN figures, drawn from a run's metrics file."""

from experiments.common.metrics import BATCH_STATS, DEBIASED_EMA, EMA, PRECISE
from experiments.common.plotting import load_metrics, plt, save
from experiments.lenet_bn.models import LABELS, VERSIONS

FIGURES = ("curves.png", "statistics.png")
CURVES = {
    "train_loss": "training loss",
    "train_accuracy": "training accuracy",
    "test_accuracy": "test accuracy",
}
STATISTICS_LABELS = {
    EMA: "moving averages (EMA)",
    DEBIASED_EMA: "debiased EMA",
    PRECISE: "recomputed after the epoch (precise BN)",
    BATCH_STATS: "each test batch's own statistics",
}


def plot_all(metrics_path, out_dir=None):
    """Writes `FIGURES` next to `metrics_path` (or into `out_dir`); returns paths."""
    metrics, out_dir = load_metrics(metrics_path, out_dir)
    return [
        save(draw(metrics), out_dir / name)
        for name, draw in zip(FIGURES, (_curves, _statistics), strict=True)
    ]


def _curves(metrics):
    epochs = metrics["epochs"]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, CURVES.items(), strict=True):
        for version in VERSIONS:
            values = [
                float("nan") if v is None else v
                for v in metrics["versions"][version][key]
            ]
            ax.plot(epochs, values, marker="o", ms=3, label=LABELS[version])
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.suptitle(
        f"LeNet on {metrics['config']['dataset']}, learning rate "
        f"{metrics['config']['learning_rate']}"
    )
    return fig


def _statistics(metrics):
    epochs = metrics["epochs"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, values in metrics["statistics"].items():
        ax.plot(epochs, values, marker="o", ms=3, label=STATISTICS_LABELS[name])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title("bn_keras LeNet-BN: test accuracy by population statistics")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
