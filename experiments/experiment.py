"""One run of the MNIST experiment: config -> data -> networks -> train -> outputs.

Everything a run produces goes into one folder: the resolved config, the
metrics file, the figures, both trained networks and a summary table.
"""

import json
import math
import platform
import time
from pathlib import Path

import keras
import tensorflow as tf

from experiments import plots
from experiments.data import load_mnist
from experiments.evaluate import Evaluator, single_example_check
from experiments.models import build_networks
from experiments.train import train_and_evaluate

STATISTICS = ("p15", "p50", "p85", "mean")


def prepare_output_dir(out_dir):
    """Creates `out_dir`; refuses one that already holds files (no overwrite)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(
            f"output folder {out_dir} is a file; choose another --out"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"output folder {out_dir} already holds files; choose another --out "
            "(runs are never overwritten)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def start_run(config, out_dir):
    """Prepares `out_dir`, loads the data, then records the config there.

    Returns `(out_dir, data)`. The config is written only once the data has
    loaded, so a run stopped by a data error leaves the folder empty.
    """
    out_dir = prepare_output_dir(out_dir)
    data = load_data(config)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir, data


def finish_run(out_dir, metrics, plot, summary, progress):
    """Writes `metrics.json`, draws its figures with `plot(path)`, and writes
    (and prints, if `progress`) the summary table."""
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    plot(metrics_path)
    (out_dir / "summary.md").write_text(summary)
    if progress:
        print(summary)
        print(f"Outputs in {out_dir}")


def load_data(config):
    data = load_mnist(
        config["data_source"], config["data_dir"] or None, verify=config["data_verify"]
    )
    train, test = config["train_examples"] or None, config["test_examples"] or None
    return type(data)(
        data.x_train[:train],
        data.y_train[:train],
        data.x_test[:test],
        data.y_test[:test],
    )


def run(config, out_dir, progress=True):
    """Runs the experiment described by `config`, writing into `out_dir`.

    Returns the metrics dict, also written to `out_dir/metrics.json`.
    """
    start = time.perf_counter()
    out_dir, data = start_run(config, out_dir)
    keras.utils.set_random_seed(config["seed"])
    networks = build_networks(config)
    evaluator = Evaluator(
        networks,
        data.x_test,
        data.y_test,
        config["neurons"],
        shared=config["evaluation"] == "shared",
    )
    records = train_and_evaluate(networks, data, config, evaluator, progress=progress)
    single = single_example_check(networks.bn, data.x_test, data.y_test)
    networks.plain.save(out_dir / "plain.keras")
    networks.bn.save(out_dir / "bn.keras")

    metrics = collect_metrics(config, records, single)
    metrics["wall_seconds"] = time.perf_counter() - start
    finish_run(out_dir, metrics, plots.plot_all, summary_table(metrics), progress)
    return metrics


def collect_metrics(config, records, single):
    last = records[-1]
    return {
        "config": config,
        "steps": [r["step"] for r in records],
        "accuracy": {
            "plain": [float(r["accuracy_plain"]) for r in records],
            "bn_population": [float(r["accuracy_bn_population"]) for r in records],
            "bn_batch_stats": [float(r["accuracy_bn_batch_stats"]) for r in records],
        },
        "train_loss": {
            "plain": [finite_or_none(r["train_loss"][0]) for r in records],
            "bn": [finite_or_none(r["train_loss"][1]) for r in records],
        },
        "activations": {
            "neurons": list(config["neurons"]),
            "statistics": list(STATISTICS),
            "plain": [r["activations_plain"].tolist() for r in records],
            "bn": [r["activations_bn"].tolist() for r in records],
        },
        "final_accuracy": {
            "plain": float(last["accuracy_plain"]),
            "bn_population": float(last["accuracy_bn_population"]),
            "bn_batch_stats": float(last["accuracy_bn_batch_stats"]),
        },
        "single_example": single,
        "environment": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
    }


def finite_or_none(value):
    """JSON has no NaN: a loss that is not a number is written as null."""
    return value if math.isfinite(value) else None


def summary_table(metrics):
    final = metrics["final_accuracy"]
    single = metrics["single_example"]
    steps = metrics["steps"][-1]
    own = single["batch_stats"]
    histogram = own["predicted_class_histogram"]
    majority = histogram.index(max(histogram))
    rows = [
        ("Without BN", final["plain"]),
        ("With BN, population statistics (inference)", final["bn_population"]),
        ("With BN, test-set batch statistics", final["bn_batch_stats"]),
        (
            "With BN, one example at a time, population statistics",
            single["population"]["accuracy"],
        ),
        (
            "With BN, one example at a time, its own batch statistics",
            single["batch_stats"]["accuracy"],
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
        f"inference on {single['population']['agreement_with_batched']:.2%} of it.",
    ]
    return "\n".join(lines) + "\n"
