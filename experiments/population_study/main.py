"""Where the BN network's population statistics come from, and what it costs.

    python -m experiments.population_study

In training mode a BN layer normalizes with batch statistics, so its
population estimate never changes the weights. The study trains the BN network
of Figure 1 once per estimator, from the same draw on the same mini-batches,
differing only in how its layers estimate the population statistics (the run
checks that the trained weights come out identical), and tests it at every
evaluation with its own estimate:

- `ema`: the exponential moving average (momentum `bn_momentum`), Keras';
- `debiased_ema`: the same, zero-debiased (`debias=True`);
- `cumulative`: the equal-weight average of all batches (`momentum=None`);
- `precise`: recomputed just before the evaluation from
  `precise_bn_batches` training batches with the weights frozen
  (`bn_keras.recompute_statistics`, "precise BN");
- `batch_stats`: the whole test set normalized with its own batch statistics,
  an upper reference that needs the test set at once (recorded with `ema`);
- `plain`: the network without BN, for scale.

Each of the five trainings is a cell, written to `cells/` as soon as it is
done; `--resume DIR` continues an interrupted study with the cells missing.
"""

import hashlib
import time

import numpy as np

from experiments.common import cli
from experiments.common.metrics import (
    BATCH_STATS,
    CUMULATIVE,
    DEBIASED_EMA,
    EMA,
    ESTIMATORS,
    PLAIN,
    POPULATION,
    PRECISE,
    wall_time_note,
)
from experiments.common.run import RunError
from experiments.population_study.config import SCHEMA, check_data

# The bn_keras.BatchNorm options of each estimator.
OPTIONS = {
    EMA: {},
    DEBIASED_EMA: {"debias": True},
    CUMULATIVE: {"momentum": None},
    PRECISE: {},
}
CELLS = (PLAIN, *ESTIMATORS)
# The figure's and summary's curves: each cell's, and the reference.
CURVES = (*CELLS, BATCH_STATS)
MILESTONES = (100, 250, 500, 1000, 2000, 5000)


def run(run_dir, config, data, progress=True):
    """Runs the study (the cells not yet in `run_dir`), writing metrics, a
    figure and a summary into `run_dir`."""
    from experiments.population_study import plots

    start = time.perf_counter()
    results = run_dir.finished_cells()
    earlier = len(results)
    for key, result in results.items():
        if key not in CELLS or result.get("cell") != key:
            raise RunError(
                f"cannot resume {run_dir.path}: {run_dir.path}/cells/{key}.json is "
                "not a cell of this study; move it away"
            )
    for name in CELLS:
        if name in results:
            continue
        run_dir.stage("training", cell=name, cells=len(CELLS), cells_done=len(results))
        results[name] = train_cell(
            name, config, data, progress=progress, report=run_dir.progress
        )
        run_dir.write_cell(name, results[name], done=len(results), total=len(CELLS))
    metrics = collect_metrics(config, results)
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["cells_from_earlier_sessions"] = earlier
    run_dir.write_outputs(metrics, plots.plot_all, summary_table(metrics), progress)
    return metrics


def train_cell(name, config, data, progress=True, report=None):
    """Trains the network of one cell (`PLAIN` or an estimator) and tests it at
    every evaluation; returns the cell's JSON-ready result."""
    import tensorflow as tf

    import bn_keras
    from experiments.common.mlp.config import BN_KERAS
    from experiments.common.mlp.evaluate import correct, forward
    from experiments.common.mlp.models import batch_norm_factory, build_mlp, initialize
    from experiments.common.mlp.train import train_and_evaluate

    start = time.perf_counter()
    factory = None
    if name != PLAIN:
        # The estimator's options may replace the momentum (None: cumulative).
        options = {"momentum": config["bn_momentum"], **OPTIONS[name]}
        factory = batch_norm_factory(BN_KERAS, epsilon=config["bn_epsilon"], **options)
    model = build_mlp(config["hidden_units"], factory, name=name)
    initialize([model], config)
    x_test, y_test = tf.constant(data.x_test), tf.constant(data.y_test)
    # The EMA network also gives the batch-statistics reference: the weights
    # are the same in every BN cell.
    modes = (POPULATION, BATCH_STATS) if name == EMA else (POPULATION,)
    curves = {POPULATION: name, BATCH_STATS: BATCH_STATS}

    @tf.function
    def test_correct():
        outputs = forward(model, x_test, modes=modes)
        return {curves[m]: correct(outputs[m][0], y_test) for m in modes}

    rng = np.random.default_rng([config["seed"], 2])
    sample = config["precise_bn_batches"] * config["batch_size"]
    precise_seconds = []

    def evaluate():
        if name == PRECISE:
            begin = time.perf_counter()
            chosen = rng.choice(len(data.x_train), size=sample, replace=False)
            bn_keras.recompute_statistics(
                model,
                data.x_train[chosen],
                batch_size=config["batch_size"],
                progress=False,
            )
            precise_seconds.append(time.perf_counter() - begin)
        counts = test_correct()
        return {"accuracy": {k: int(v) / len(data.y_test) for k, v in counts.items()}}

    records = train_and_evaluate(
        (model,), data, config, evaluate, progress=progress, report=report, desc=name
    )
    digest = hashlib.sha256()
    for weight in model.trainable_weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    result = {
        "cell": name,
        "steps": [r["step"] for r in records],
        "accuracy": {
            curve: [r["accuracy"][curve] for r in records]
            for curve in records[0]["accuracy"]
        },
        "trainable_weights_sha256": digest.hexdigest(),
        "seconds": time.perf_counter() - start,
    }
    if precise_seconds:
        result["precise_seconds_per_evaluation"] = float(np.median(precise_seconds))
    return result


def collect_metrics(config, results):
    """The study's metrics from its cells."""
    accuracy = {}
    for name in CELLS:
        accuracy.update(results[name]["accuracy"])
    bn_digests = {results[name]["trainable_weights_sha256"] for name in ESTIMATORS}
    return {
        "config": config,
        "steps": results[PLAIN]["steps"],
        "accuracy": {curve: accuracy[curve] for curve in CURVES},
        "bn_weights_identical": len(bn_digests) == 1,
        "precise_seconds_per_evaluation": results[PRECISE][
            "precise_seconds_per_evaluation"
        ],
        "cell_seconds": {name: results[name]["seconds"] for name in CELLS},
    }


def summary_table(metrics):
    steps = metrics["steps"]
    columns = [s for s in MILESTONES if s in steps] + [steps[-1]]
    columns = sorted(set(columns))
    lines = [
        "Test accuracy of the BN network by source of its population statistics",
        "",
        "| statistics | " + " | ".join(f"step {s}" for s in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, curve in metrics["accuracy"].items():
        values = [curve[steps.index(s)] for s in columns]
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    lines += [
        "",
        wall_time_note(metrics),
        "",
        f"Precise BN costs {metrics['precise_seconds_per_evaluation'] * 1e3:.0f} ms "
        f"per evaluation ({metrics['config']['precise_bn_batches']} batches of "
        f"{metrics['config']['batch_size']}); the BN networks' weights stayed "
        f"{'identical' if metrics['bn_weights_identical'] else 'DIFFERENT (a bug)'}.",
    ]
    return "\n".join(lines) + "\n"


EXPERIMENT = cli.Experiment(
    name="population_study",
    description=(
        "Compare the BN network's inference accuracy over training when its "
        "population statistics come from an EMA, a debiased EMA, the cumulative "
        "average, precise BN, or the test set's own batch statistics."
    ),
    schema=SCHEMA,
    body=run,
    check=check_data,
    resumable=True,
)


def main(argv=None):
    """Runs the study from the command line; returns the exit status."""
    return cli.main(argv, EXPERIMENT)
