"""Training Figure 1's networks, every seed: stacked, or one seed after another.

The default loop and evaluation train and test every seed's plain and BN
network together in stacked weights (`experiments.mnist_mlp.stacked`); the
per-step loop and the separate evaluation, the speed baselines, run the seeds
one after the other with Keras models (`experiments.common.mlp`).
"""

import typing

import keras

from experiments.common.mlp.evaluate import Evaluator
from experiments.common.mlp.models import Networks, build_networks
from experiments.common.mlp.train import run_schedule, train_and_evaluate
from experiments.mnist_mlp import stacked
from experiments.mnist_mlp.single_example import single_example_check


class Trained(typing.NamedTuple):
    """What training every seed gives.

    Attributes:
        records: Each seed's evaluation records, in the order of `seeds`.
        singles: Each seed's single-example check.
        first: The first seed's `Networks` as Keras models (the run saves them).
        stacked_networks: On the stacked path, the `stacked.StackedNetworks`
            holding every seed's trained weights; None on the per-seed path.
    """

    records: list
    singles: list
    first: Networks
    stacked_networks: stacked.StackedNetworks | None = None


def train(run_dir, config, data, progress=True):
    """Trains and tests every seed of `config["seeds"]`; returns a `Trained`."""
    if config["loop"] == "fast" and config["evaluation"] == "shared":
        return train_stacked(run_dir, config, data, progress)
    return train_each_seed(run_dir, config, data, progress)


def train_stacked(run_dir, config, data, progress):
    """All seeds at once, in stacked weights; returns a `Trained`."""
    keras.utils.set_random_seed(config["seed"])
    networks = stacked.StackedNetworks(config, config["seeds"])
    trainer = stacked.StackedTrainer(networks, data.x_train, data.y_train, config)
    evaluator = stacked.StackedEvaluator(
        networks, data.x_test, data.y_test, config["neurons"], config=config
    )
    k = len(networks)
    try:
        records = run_schedule(
            trainer,
            config,
            evaluator,
            [[float("nan")] * k] * 2,
            progress=progress,
            report=run_dir.progress,
            desc=f"training {2 * k} networks",
            start=evaluator.start,
        )
    finally:
        evaluator.close()
    run_dir.stage("single-example check")
    singles = stacked.single_example_check_by_seed(networks, data.x_test, data.y_test)
    by_seed = [
        [
            {
                "step": r["step"],
                "accuracy": {c: v[i] for c, v in r["accuracy"].items()},
                "activations": {n: a[i] for n, a in r["activations"].items()},
                "train_loss": [loss[i] for loss in r["train_loss"]],
            }
            for r in records
        ]
        for i in range(k)
    ]
    return Trained(by_seed, singles, networks.keras_networks(0), networks)


def train_each_seed(run_dir, config, data, progress):
    """The seeds one after the other, each with Keras models, as a
    straightforward script does (the speed baselines and the reference path);
    returns a `Trained`."""
    records, singles, first = [], [], None
    for seed in config["seeds"]:
        seed_config = {**config, "seed": seed}
        keras.utils.set_random_seed(seed)
        networks = build_networks(seed_config)
        evaluator = Evaluator(
            networks,
            data.x_test,
            data.y_test,
            config["neurons"],
            shared=config["evaluation"] == "shared",
        )
        records.append(
            train_and_evaluate(
                networks,
                data,
                seed_config,
                evaluator,
                progress=progress,
                report=run_dir.progress,
                desc=f"seed {seed}: training 2 networks",
            )
        )
        run_dir.stage("single-example check")
        singles.append(single_example_check(networks.bn, data.x_test, data.y_test))
        first = first or networks
    return Trained(records, singles, first)
