"""The LeNet-BN figures, drawn from a run's metrics file."""

from matplotlib.ticker import MaxNLocator

from experiments.common.metrics import BATCH_STATS, DEBIASED_EMA, EMA, PRECISE
from experiments.common.plotting import load_metrics, plt, save
from experiments.lenet_bn import callbacks_study as cs
from experiments.lenet_bn.models import LABELS, VERSIONS

FIGURES = ("curves.png", "statistics.png", "callbacks.png")
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
    """Writes `FIGURES` next to `metrics_path` (or into `out_dir`), the last
    only for a run with the callbacks study; returns their paths."""
    metrics, out_dir = load_metrics(metrics_path, out_dir)
    draw = dict(zip(FIGURES, (_curves, _statistics, _callbacks), strict=True))
    names = FIGURES if "callbacks" in metrics else FIGURES[:-1]
    return [save(draw[name](metrics), out_dir / name) for name in names]


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


def _callbacks(metrics):
    """The callbacks study: accuracy per epoch by callback, the diagnosis per
    epoch, and use_ema's test accuracy by weights and statistics."""
    config, epochs = metrics["config"], metrics["epochs"]
    fig, (runs_ax, diagnosis_ax, ema_ax) = plt.subplots(
        1, 3, figsize=(17, 4.4), gridspec_kw={"width_ratios": [1.2, 1.1, 1.0]}
    )
    for ax in (runs_ax, diagnosis_ax):
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    frozen_from = epochs[-1] - config["freeze_last_epochs"] + 0.5
    runs_ax.axvspan(frozen_from, epochs[-1] + 0.5, color="0.9", zorder=0)
    for run in cs.CALLBACK_RUNS:
        accuracy = metrics["callbacks"][run][cs.TEST_ACCURACY]
        runs_ax.plot(
            epochs,
            [1.0 - a for a in accuracy],
            marker="o",
            ms=3,
            ls="--" if run in cs.FROZEN_RUNS else "-",
            label=cs.run_label(run, config),
        )
    runs_ax.set_yscale("log")
    runs_ax.set_xlabel("epoch (shaded: frozen or decayed)")
    runs_ax.set_ylabel("test error (1 - accuracy)")
    runs_ax.set_title("test error with callbacks")
    runs_ax.grid(alpha=0.3, which="both")
    runs_ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))

    diagnosis = metrics["diagnosis"]
    for field, style in (
        ("mean_shift_max", "o-"),
        ("variance_factor_max", "s-"),
    ):
        values = [float("nan") if v is None else v for v in diagnosis[field]]
        diagnosis_ax.plot(epochs, values, style, ms=3, label=cs.DIAGNOSIS_FIELDS[field])
    diagnosis_ax.axhline(
        diagnosis["max_shift"], color="C0", ls=":", label="mean shift threshold"
    )
    diagnosis_ax.axhline(
        diagnosis["max_variance_factor"],
        color="C1",
        ls=":",
        label="variance factor threshold",
    )
    diagnosis_ax.set_yscale("log")
    diagnosis_ax.set_xlabel("epoch")
    diagnosis_ax.set_title("diagnosis of the moving averages (worst layer)")
    diagnosis_ax.grid(alpha=0.3)
    diagnosis_ax.legend(fontsize=8)

    ema = metrics["use_ema"]["runs"]
    last = {
        run: metrics["callbacks"][run][cs.TEST_ACCURACY][-1]
        for run in (cs.NO_CALLBACK, cs.PRECISE_BN)
    }
    bars = {
        "last step's\nweights,\nmoving averages": last[cs.NO_CALLBACK],
        "last step's\nweights,\nPreciseBN": last[cs.PRECISE_BN],
        "averaged\nweights,\nmoving averages": ema[cs.EMA_STALE][
            cs.FINAL_TEST_ACCURACY
        ],
        "averaged\nweights,\nPreciseBN": ema[cs.EMA_PRECISE][cs.FINAL_TEST_ACCURACY],
    }
    positions = range(len(bars))
    ema_ax.bar(positions, list(bars.values()), color=["C0", "C1", "C3", "C2"])
    for position, value in zip(positions, bars.values(), strict=True):
        ema_ax.text(position, value, f"{value:.3f}", ha="center", va="bottom")
    ema_ax.set_xticks(list(positions), list(bars), fontsize=8)
    ema_ax.set_ylim(0, 1.05)
    ema_ax.set_ylabel("test accuracy after fit()")
    ema_ax.set_title(f"use_ema (ema_momentum {config['ema_momentum']})")
    fig.suptitle(
        f"bn_keras LeNet-BN on {config['dataset']}: steering the population statistics"
    )
    return fig
