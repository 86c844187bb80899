"""The Figure-1 experiment's command line, run, metrics file and summary.

python -m experiments.mnist_mlp                      # this project's Figure 1
python -m experiments.mnist_mlp --config paper       # the paper's 3 hidden layers
python -m experiments.mnist_mlp --config smoke --out runs/smoke
python -m experiments.mnist_mlp --set steps=2000 --set bn_impl=keras
"""

import time

import numpy as np

from experiments.common import cli
from experiments.common.metrics import (
    ACCURACY_CURVES,
    BATCH_STATS,
    BN,
    BN_BATCH_STATS,
    BN_POPULATION,
    PLAIN,
    POPULATION,
    STATISTICS,
    finite_lists,
    finite_or_none,
)
from experiments.mnist_mlp.config import SCHEMA


def run(run_dir, config, data, progress=True):
    """Runs the experiment described by `config` on `data`, writing into `run_dir`.

    Every seed of `config["seeds"]` trains its own plain and BN network
    (`train.train`); the first seed's are saved, every seed's curves go into
    the metrics file, from which the figures and the summary are drawn.

    Args:
        run_dir: The claimed `experiments.common.run.RunDir`.
        config: The run's config (see `experiments.mnist_mlp.config.DEFAULTS`).
        data: The `Mnist` arrays to train and test on.
        progress: Whether to show a progress bar and print the summary.

    Returns:
        The metrics dict, also written to `metrics.json`.
    """
    from experiments.mnist_mlp import plots, train  # imports TensorFlow

    start = time.perf_counter()
    trained = train.train(run_dir, config, data, progress)
    run_dir.stage("saving models")
    # The first seed's networks: those a one-seed run with that seed saves.
    for name, model in zip((PLAIN, BN), trained.first, strict=True):
        with run_dir.atomic(f"{name}.keras") as path:
            model.save(path)
    run_dir.checkpoint("models saved")
    metrics = collect_metrics(config, trained.records, trained.singles)
    metrics["wall_seconds"] = time.perf_counter() - start
    run_dir.write_outputs(metrics, plots.plot_all, summary_table(metrics), progress)
    return metrics


EXPERIMENT = cli.Experiment(
    name="mnist_mlp",
    description=(
        "Train a sigmoid MLP (784-100-100-10 by default) on MNIST with and "
        "without batch normalization from the same initial weights, record test "
        "accuracy and sigmoid-input statistics, plot the paper's Figure 1, and "
        "run the single-example inference check."
    ),
    schema=SCHEMA,
    body=run,
)


def main(argv=None):
    """Runs the experiment from the command line; returns the exit status."""
    return cli.main(argv, EXPERIMENT)


def collect_metrics(config, records, singles):
    """The metrics file's content; every float is finite or None (null).

    Args:
        config: The run's config.
        records: Per seed, the evaluation records of `train.run_schedule`.
        singles: Per seed, the single-example check's dict.

    Returns:
        `by_seed` holds each seed's curves; the keys above it hold their mean
        over the seeds (with one seed, that seed's values): `null` where a
        seed's value is not finite. `single_example`'s class histogram is
        counted over every seed's predictions.
    """
    by_seed = [
        {"seed": seed, **_seed_metrics(r, single)}
        for seed, r, single in zip(config["seeds"], records, singles, strict=True)
    ]
    return {
        "config": config,
        "seeds": list(config["seeds"]),
        "steps": [r["step"] for r in records[0]],
        "accuracy": {
            curve: finite_lists(_mean([s["accuracy"][curve] for s in by_seed]))
            for curve in ACCURACY_CURVES
        },
        "train_loss": {
            name: finite_lists(_mean([s["train_loss"][name] for s in by_seed]))
            for name in (PLAIN, BN)
        },
        "activations": {
            "neurons": list(config["neurons"]),
            "statistics": list(STATISTICS),
            **{
                name: finite_lists(_mean([s["activations"][name] for s in by_seed]))
                for name in (PLAIN, BN)
            },
        },
        "final_accuracy": {
            curve: float(np.mean([s["final_accuracy"][curve] for s in by_seed]))
            for curve in ACCURACY_CURVES
        },
        "single_example": _mean_single(singles),
        "by_seed": by_seed,
    }


def _seed_metrics(records, single):
    """One seed's curves, final accuracies and single-example check."""
    last = records[-1]
    return {
        "accuracy": {
            curve: [r["accuracy"][curve] for r in records] for curve in ACCURACY_CURVES
        },
        # null at step 0 (no training yet) and where the loss was not finite.
        "train_loss": {
            name: [finite_or_none(r["train_loss"][i]) for r in records]
            for i, name in enumerate((PLAIN, BN))
        },
        # null where the sigmoid input was not finite (a diverged network).
        "activations": {
            name: finite_lists([r["activations"][name] for r in records])
            for name in (PLAIN, BN)
        },
        "final_accuracy": {curve: last["accuracy"][curve] for curve in ACCURACY_CURVES},
        "single_example": single,
    }


def _mean(values):
    """The mean over the first axis; NaN where any value is None or NaN."""
    array = np.asarray([np.asarray(v, dtype=object) for v in values], dtype=object)
    array = np.where(array == None, np.nan, array).astype(np.float64)  # noqa: E711
    return array.mean(axis=0)


def _mean_single(singles):
    """The single-example dicts' mean over seeds; the class histogram summed."""
    result = {}
    for mode, values in singles[0].items():
        result[mode] = {
            key: (
                np.sum([s[mode][key] for s in singles], axis=0).tolist()
                if isinstance(value, list)
                else float(np.mean([s[mode][key] for s in singles]))
            )
            for key, value in values.items()
        }
    return result


def summary_table(metrics):
    """The run's table; over several seeds, mean ± sample standard deviation."""
    by_seed = metrics["by_seed"]
    steps = metrics["steps"][-1]
    rows = [
        ("Without BN", lambda s: s["final_accuracy"][PLAIN]),
        (
            "With BN, population statistics (inference)",
            lambda s: s["final_accuracy"][BN_POPULATION],
        ),
        (
            "With BN, test-set batch statistics",
            lambda s: s["final_accuracy"][BN_BATCH_STATS],
        ),
        (
            "With BN, one example at a time, population statistics",
            lambda s: s["single_example"][POPULATION]["accuracy"],
        ),
        (
            "With BN, one example at a time, its own batch statistics",
            lambda s: s["single_example"][BATCH_STATS]["accuracy"],
        ),
    ]
    single = metrics["single_example"]
    own = single[BATCH_STATS]
    if len(by_seed) == 1:
        title = f"Test accuracy after {steps} steps ({metrics['wall_seconds']:.0f} s)"
        histogram = own["predicted_class_histogram"]
        collapse = (
            f"predicts class {histogram.index(max(histogram))} for "
            f"{own['majority_class_fraction']:.1%} of the test set"
        )
    else:
        title = (
            f"Test accuracy after {steps} steps ({metrics['wall_seconds']:.0f} s), "
            f"mean ± standard deviation (n - 1) over {len(by_seed)} seeds "
            f"({', '.join(str(s['seed']) for s in by_seed)})"
        )
        collapse = (
            "predicts one class for "
            f"{own['majority_class_fraction']:.1%} of the test set (mean over seeds)"
        )
    lines = [
        title,
        "",
        "| network | test accuracy |",
        "|---|---|",
        *(f"| {name} | {_mean_std(value, by_seed)} |" for name, value in rows),
        "",
        f"One example at a time with its own batch statistics {collapse}; "
        "with population statistics its predictions agree with batched "
        f"inference on {single[POPULATION]['agreement_with_batched']:.2%} of it.",
    ]
    return "\n".join(lines) + "\n"


def _mean_std(value, by_seed):
    values = [value(s) for s in by_seed]
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
