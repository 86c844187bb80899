"""One run of the MNIST experiment (Figure 1): networks -> train -> outputs.

The run folder, the data and the config come from `experiments.cli.execute`;
this module trains, evaluates and writes the models, the metrics file, the
figures and a summary table into the folder.
"""

import platform
import time

import keras
import tensorflow as tf

from experiments import plots
from experiments.evaluate import Evaluator, single_example_check
from experiments.metrics import (
    ACCURACY_CURVES,
    BATCH_STATS,
    BN,
    BN_BATCH_STATS,
    BN_POPULATION,
    METRICS_FILE,
    PLAIN,
    POPULATION,
    STATISTICS,
    SUMMARY_FILE,
    finite_lists,
    finite_or_none,
)
from experiments.models import build_networks
from experiments.train import train_and_evaluate


def run(run_dir, config, data, progress=True):
    """Runs the experiment described by `config` on `data`, writing into `run_dir`.

    Args:
        run_dir: The claimed `experiments.run.RunDir`.
        config: The run's config (see `experiments.config.DEFAULTS`).
        data: The `Mnist` arrays to train and test on.
        progress: Whether to show a progress bar and print the summary.

    Returns:
        The metrics dict, also written to `metrics.json`.
    """
    start = time.perf_counter()
    keras.utils.set_random_seed(config["seed"])
    networks = build_networks(config)
    evaluator = Evaluator(
        networks,
        data.x_test,
        data.y_test,
        config["neurons"],
        shared=config["evaluation"] == "shared",
    )
    records = train_and_evaluate(
        networks, data, config, evaluator, progress=progress, report=run_dir.progress
    )
    run_dir.stage("single-example check")
    single = single_example_check(networks.bn, data.x_test, data.y_test)
    run_dir.stage("saving models")
    for name, model in zip((PLAIN, BN), networks, strict=True):
        with run_dir.atomic(f"{name}.keras") as path:
            model.save(path)
    run_dir.checkpoint("models saved")
    metrics = collect_metrics(config, records, single)
    metrics["wall_seconds"] = time.perf_counter() - start
    write_outputs(run_dir, metrics, plots.plot_all, summary_table(metrics), progress)
    return metrics


def write_outputs(run_dir, metrics, plot, summary, progress):
    """Writes `metrics.json`, then the figures `plot(path, out_dir)` draws from
    it, then `summary.md`; prints the summary if `progress`."""
    run_dir.stage("writing outputs")
    run_dir.write_json(METRICS_FILE, metrics)
    run_dir.checkpoint("metrics written")
    plot(run_dir.file(METRICS_FILE), run_dir.path)
    run_dir.checkpoint("figures written")
    run_dir.write_text(SUMMARY_FILE, summary)
    run_dir.checkpoint("summary written")
    if progress:
        print(summary)
        print(f"Outputs in {run_dir.path}")


def collect_metrics(config, records, single):
    """The metrics file's content; every float is finite or None (null)."""
    last = records[-1]
    return {
        "config": config,
        "steps": [r["step"] for r in records],
        "accuracy": {
            curve: [r["accuracy"][curve] for r in records] for curve in ACCURACY_CURVES
        },
        # null at step 0 (no training yet) and where the loss was not finite.
        "train_loss": {
            name: [finite_or_none(r["train_loss"][i]) for r in records]
            for i, name in enumerate((PLAIN, BN))
        },
        "activations": {
            "neurons": list(config["neurons"]),
            "statistics": list(STATISTICS),
            # null where the sigmoid input was not finite (a diverged network).
            **{
                name: finite_lists([r["activations"][name] for r in records])
                for name in (PLAIN, BN)
            },
        },
        "final_accuracy": {curve: last["accuracy"][curve] for curve in ACCURACY_CURVES},
        "single_example": single,
        "environment": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
    }


def summary_table(metrics):
    final = metrics["final_accuracy"]
    single = metrics["single_example"]
    steps = metrics["steps"][-1]
    own = single[BATCH_STATS]
    histogram = own["predicted_class_histogram"]
    majority = histogram.index(max(histogram))
    rows = [
        ("Without BN", final[PLAIN]),
        ("With BN, population statistics (inference)", final[BN_POPULATION]),
        ("With BN, test-set batch statistics", final[BN_BATCH_STATS]),
        (
            "With BN, one example at a time, population statistics",
            single[POPULATION]["accuracy"],
        ),
        (
            "With BN, one example at a time, its own batch statistics",
            single[BATCH_STATS]["accuracy"],
        ),
    ]
    lines = [
        f"Test accuracy after {steps} steps ({metrics['wall_seconds']:.0f} s)",
        "",
        "| network | test accuracy |",
        "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in rows),
        "",
        f"One example at a time with its own batch statistics predicts class "
        f"{majority} for {own['majority_class_fraction']:.1%} of the test set; "
        "with population statistics its predictions agree with batched "
        f"inference on {single[POPULATION]['agreement_with_batched']:.2%} of it.",
    ]
    return "\n".join(lines) + "\n"
