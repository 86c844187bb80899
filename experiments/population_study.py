"""Where the BN network's population statistics come from, and what it costs.

    python -m experiments.population_study --config configs/population_study.toml

One training run serves every estimator: in training mode a BN layer
normalizes with batch statistics, so its population estimate never changes
the weights. Four BN networks start from the same draw and see the same
mini-batches, differing only in how their layers estimate the population
statistics; the run checks that their weights stay identical. At every
evaluation each is tested with its own estimate:

- `ema`: the exponential moving average (momentum `bn_momentum`), Keras';
- `debiased_ema`: the same, zero-debiased (`debias=True`);
- `cumulative`: the equal-weight average of all batches (`momentum=None`);
- `precise`: recomputed just before the evaluation from
  `precise_bn_batches` training batches with the weights frozen
  (`bn_keras.recompute_statistics`, "precise BN");
- `batch_stats`: the whole test set normalized with its own batch statistics,
  an upper reference that needs the test set at once;
- `plain`: the network without BN, for scale.
"""

import sys
import time

import numpy as np

from experiments import cli
from experiments.config import STUDY_DEFAULTS, ConfigError

ESTIMATORS = {
    "ema": {},
    "debiased_ema": {"debias": True},
    "cumulative": {"momentum": None},
    "precise": {},
}
MILESTONES = (100, 250, 500, 1000, 2000, 5000)


def run(config, out_dir, progress=True):
    """Runs the study, writing metrics, a figure and a summary into `out_dir`."""
    import tensorflow as tf

    import bn_keras
    from experiments import plots
    from experiments.evaluate import BATCH_STATS, POPULATION, correct, forward
    from experiments.experiment import finish_run, start_run
    from experiments.models import batch_norm_factory, build_mlp, initialize
    from experiments.train import train_and_evaluate

    check_config(config)
    start = time.perf_counter()
    out_dir, data = start_run(config, out_dir)
    models = {"plain": build_mlp(config["hidden_units"], name="plain")}
    for name, options in ESTIMATORS.items():
        factory = batch_norm_factory(config, **options)
        models[name] = build_mlp(config["hidden_units"], factory, name=name)
    initialize(models.values(), config)

    x_test, y_test = tf.constant(data.x_test), tf.constant(data.y_test)

    @tf.function
    def test_correct():
        counts = {
            name: correct(forward(model, x_test)[POPULATION][0], y_test)
            for name, model in models.items()
        }
        reference = forward(models["ema"], x_test, modes=(BATCH_STATS,))
        counts["batch_stats"] = correct(reference[BATCH_STATS][0], y_test)
        return counts

    rng = np.random.default_rng([config["seed"], 2])
    sample = config["precise_bn_batches"] * config["batch_size"]
    precise_seconds = []

    def evaluate():
        begin = time.perf_counter()
        chosen = rng.choice(len(data.x_train), size=sample, replace=False)
        bn_keras.recompute_statistics(
            models["precise"],
            data.x_train[chosen],
            batch_size=config["batch_size"],
            progress=False,
        )
        precise_seconds.append(time.perf_counter() - begin)
        counts = test_correct()
        return {
            f"accuracy_{name}": int(count) / len(data.y_test)
            for name, count in counts.items()
        }

    records = train_and_evaluate(
        tuple(models.values()), data, config, evaluate, progress=progress
    )
    reference = [w.numpy() for w in models["ema"].trainable_weights]
    identical = all(
        all(
            np.array_equal(a, w.numpy())
            for a, w in zip(reference, model.trainable_weights, strict=True)
        )
        for name, model in models.items()
        if name != "plain"
    )
    names = [*models, "batch_stats"]
    metrics = {
        "config": config,
        "steps": [r["step"] for r in records],
        "accuracy": {name: [r[f"accuracy_{name}"] for r in records] for name in names},
        "bn_weights_identical": identical,
        "precise_seconds_per_evaluation": float(np.median(precise_seconds)),
        "wall_seconds": time.perf_counter() - start,
    }
    finish_run(
        out_dir, metrics, plots.plot_population_study, summary_table(metrics), progress
    )
    return metrics


def check_config(config):
    """The study needs bn_keras' options and enough data for precise BN."""
    if config["bn_impl"] != "bn_keras":
        raise ConfigError(
            "the study compares bn_keras.BatchNorm's population estimators; "
            f"set bn_impl='bn_keras'. Received: {config['bn_impl']!r}"
        )
    if config["bn_momentum"] >= 1.0:
        raise ConfigError(
            "the study's debiased EMA needs bn_momentum < 1. "
            f"Received: {config['bn_momentum']!r}"
        )
    sample = config["precise_bn_batches"] * config["batch_size"]
    available = config["train_examples"] or 60000
    if sample > available:
        raise ConfigError(
            f"precise BN draws precise_bn_batches * batch_size = {sample} "
            f"training examples, more than the {available} used; lower "
            "precise_bn_batches"
        )


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
        f"Precise BN costs {metrics['precise_seconds_per_evaluation'] * 1e3:.0f} ms "
        f"per evaluation ({metrics['config']['precise_bn_batches']} batches of "
        f"{metrics['config']['batch_size']}); the BN networks' weights stayed "
        f"{'identical' if metrics['bn_weights_identical'] else 'DIFFERENT (a bug)'}.",
    ]
    return "\n".join(lines) + "\n"


DESCRIPTION = (
    "Compare the BN network's inference accuracy over training when its "
    "population statistics come from an EMA, a debiased EMA, the cumulative "
    "average, precise BN, or the test set's own batch statistics."
)


def main(argv=None):
    return cli.main(
        argv, "experiments.population_study", DESCRIPTION, STUDY_DEFAULTS, run
    )


if __name__ == "__main__":
    sys.exit(main())
