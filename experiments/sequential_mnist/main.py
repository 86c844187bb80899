"""Sequential MNIST: an LSTM and a BN-LSTM (Cooijmans et al., 2016) read digits in time.

python -m experiments.sequential_mnist             # row by row, minutes
python -m experiments.sequential_mnist --config pixels
python -m experiments.sequential_mnist --config smoke

Both networks (100 units, a softmax on the last state) start from the same
seed and train on the same mini-batches with RMSProp. The run records
validation (a held-out slice of the training set) and test accuracy, then
recomputes the BN-LSTM's population statistics from training sequences
(precise BN) and tests it with its moving averages and with the recomputed
statistics, each per timestep, shared by all timesteps, and one sequence at a
time, and with each test batch's own statistics; it plots both estimates
against the timestep.
"""

import time

from experiments.common import cli
from experiments.common.metrics import BATCH_STATS, EMA, PRECISE
from experiments.sequential_mnist.config import SCHEMA, check_data
from experiments.sequential_mnist.metrics import (
    BN_LSTM,
    BN_LSTM_PRECISE,
    ESTIMATES,
    LSTM,
    NETWORKS,
    ONE_AT_A_TIME,
    PER_TIMESTEP,
    SHARED,
    SPLITS,
    TEST,
    VALIDATION,
)


def run(run_dir, config, data, progress=True):
    """Trains both networks, runs the inference check, writes every output."""

    from experiments.sequential_mnist import evaluate, models, train
    from experiments.sequential_mnist.plots import plot_all

    start = time.perf_counter()
    sequences = models.sequences(
        data, config["task"], config["validation_examples"], config["seed"]
    )
    _, timesteps, features = sequences.x_train.shape
    networks = models.build_models(config, timesteps, features)
    records = train.train_and_evaluate(
        networks, sequences, config, progress=progress, report=run_dir.progress
    )
    run_dir.stage("precise BN")
    begin = time.perf_counter()
    precise = evaluate.recompute(
        networks[BN_LSTM],
        sequences.x_train,
        config["precise_bn_batches"],
        config["batch_size"],
        config["seed"],
        progress=progress,
    )
    precise_seconds = time.perf_counter() - begin
    by_estimate = {EMA: networks[BN_LSTM], PRECISE: precise}
    run_dir.stage("inference check")
    check = evaluate.inference_check(
        by_estimate,
        sequences.x_test,
        sequences.y_test,
        config["batch_size"],
        progress=progress,
    )
    run_dir.stage("saving models")
    for name, model in {**networks, BN_LSTM_PRECISE: precise}.items():
        with run_dir.atomic(f"{name}.keras") as path:
            model.save(path)
    run_dir.checkpoint("models saved")
    final = dict(records[-1]["accuracy"])
    final[BN_LSTM_PRECISE] = {
        VALIDATION: evaluate.accuracy(
            precise, sequences.x_validation, sequences.y_validation
        ),
        TEST: check[PRECISE][PER_TIMESTEP],
    }
    metrics = {
        "config": config,
        "steps": [r["step"] for r in records],
        "accuracy": {
            name: {
                split: [r["accuracy"][name][split] for r in records] for split in SPLITS
            }
            for name in NETWORKS
        },
        "train_loss": {
            name: [r["train_loss"][name] for r in records] for name in NETWORKS
        },
        "final_accuracy": final,
        "inference_check": check,
        "precise_bn": {
            "sequences": config["precise_bn_batches"] * config["batch_size"],
            "seconds": precise_seconds,
        },
        "population_statistics": evaluate.population_statistics(
            by_estimate, config["neurons"]
        ),
        "wall_seconds": time.perf_counter() - start,
    }
    run_dir.write_outputs(metrics, plot_all, summary_table(metrics), progress)
    return metrics


def summary_table(metrics):

    final = metrics["final_accuracy"]
    check = metrics["inference_check"]
    config = metrics["config"]
    sequences = f"{metrics['precise_bn']['sequences']:,}"
    networks = {
        LSTM: "LSTM",
        BN_LSTM: "BN-LSTM, moving averages",
        BN_LSTM_PRECISE: f"BN-LSTM, recomputed from {sequences} sequences",
    }
    estimates = {
        EMA: f"moving averages (momentum {config['bn_momentum']})",
        PRECISE: f"recomputed after training ({sequences} training sequences)",
    }
    kinds = {
        PER_TIMESTEP: "per timestep (inference)",
        SHARED: "one statistic shared by all timesteps",
        ONE_AT_A_TIME: "per timestep, one sequence at a time",
    }
    rows = [
        f"| {estimates[estimate]}, {label} | {check[estimate][kind]:.4f} |"
        for estimate in ESTIMATES
        for kind, label in kinds.items()
    ]
    rows.insert(
        len(kinds),
        f"| each test batch's own statistics (batch {config['batch_size']}) | "
        f"{check[BATCH_STATS]:.4f} |",
    )
    agreement = [
        f"One sequence at a time agrees with batched inference on "
        f"{check[estimate]['one_at_a_time_agreement']:.2%} of the "
        f"{check['examples']:,} test examples with the {short} (largest "
        "probability difference "
        f"{check[estimate]['one_at_a_time_max_abs_difference']:.1e})."
        for estimate, short in (
            (EMA, "moving averages"),
            (PRECISE, "recomputed statistics"),
        )
    ]
    lines = [
        f"Sequential MNIST ({config['task']}), {metrics['steps'][-1]} steps of "
        f"batch {config['batch_size']} ({metrics['wall_seconds']:.0f} s; precise "
        f"BN {metrics['precise_bn']['seconds']:.0f} s)",
        "",
        "| network | validation accuracy | test accuracy |",
        "|---|---|---|",
        *(
            f"| {label} | {final[name][VALIDATION]:.4f} | {final[name][TEST]:.4f} |"
            for name, label in networks.items()
        ),
        "",
        "BN-LSTM test accuracy by normalization statistics:",
        "",
        "| statistics | test accuracy |",
        "|---|---|",
        *rows,
        "",
        *agreement,
    ]
    return "\n".join(lines) + "\n"


EXPERIMENT = cli.Experiment(
    name="sequential_mnist",
    description=(
        "Train an LSTM and a BN-LSTM with per-timestep population statistics "
        "on MNIST read as a sequence (row by row, or pixel by pixel), record "
        "validation and test accuracy, recompute the BN-LSTM's statistics "
        "after training (precise BN), and test it with per-timestep and shared "
        "moving averages and recomputed statistics, one sequence at a time, "
        "and each test batch's own statistics."
    ),
    schema=SCHEMA,
    body=run,
    check=check_data,
)


def main(argv=None):
    """Runs the experiment from the command line; returns the exit status."""
    return cli.main(argv, EXPERIMENT)
