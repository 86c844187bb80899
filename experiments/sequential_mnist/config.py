"""The sequential-MNIST experiment's config: defaults, and its own checks."""

from pathlib import Path

from experiments.common.config import (
    DATA_DEFAULTS,
    ConfigError,
    Schema,
    check_batch_norm,
    check_neurons,
    check_positive,
    check_precise_bn_sample,
    check_schedule,
)

# The tasks: how an image becomes a sequence.
ROWS = "rows"
PIXELS = "pixels"
PERMUTED_PIXELS = "permuted_pixels"
TASKS = (ROWS, PIXELS, PERMUTED_PIXELS)

DEFAULTS = {
    "seed": 0,
    **DATA_DEFAULTS,
    # "rows": 28 steps of 28 pixels (fast); "pixels": 784 steps of 1 pixel;
    # "permuted_pixels": the same in a fixed random order (the paper's tasks).
    "task": ROWS,
    # The recurrent layer's units (one layer), as in the paper.
    "hidden_units": [100],
    # The paper's optimizer: RMSProp, gradient norm clipped at 1, batch 100.
    "learning_rate": 1e-3,
    "clipnorm": 1.0,
    "batch_size": 100,
    # About 3.7 epochs: minutes for both networks on two CPU cores (the
    # run time is on the experiment's docs page).
    "steps": 2000,
    "eval_every": 200,
    # The last training images, held out for the validation curve.
    "validation_examples": 5000,
    # The BN-LSTM's population statistics.
    "bn_momentum": 0.99,
    "bn_epsilon": 1e-3,
    # Precise BN after training: batches of batch_size training sequences
    # whose moments replace the moving averages. 200 batches of 100 are
    # 20,000 sequences, a third of the training set: the sampling error of a
    # timestep's mean is 1/sqrt(20,000) < 1% of its spread, well past where
    # accuracy levels off (on the default run, 500 sequences gave 97.90%,
    # 5,000 98.04%, 20,000 and all 55,000 98.02%), and the pass takes
    # seconds (7 s on two CPU cores), against minutes of training.
    "precise_bn_batches": 200,
    # Units whose per-timestep population statistics are plotted.
    "neurons": [0, 1, 2, 3, 4],
}


def validate(config):
    """Checks the network, its training and the statistics' keys."""
    check_positive(
        config, "hidden_units", "learning_rate", "clipnorm", "precise_bn_batches"
    )
    if len(config["hidden_units"]) != 1:
        raise ConfigError(
            "config key 'hidden_units' holds the units of the one recurrent "
            f"layer, e.g. [100]. Received: {config['hidden_units']!r}"
        )
    check_schedule(config)
    check_batch_norm(config)
    check_neurons(config, config["hidden_units"][0])


def check_data(config, num_train):
    """Validation and precise BN take their examples from the training set."""
    left = num_train - config["validation_examples"]
    if config["validation_examples"] < 1 or left < config["batch_size"]:
        raise ConfigError(
            "config key 'validation_examples' must be at least 1 and leave a "
            f"batch of training examples out of {num_train}. "
            f"Received: {config['validation_examples']!r}"
        )
    check_precise_bn_sample(config, left, "left after validation")


SCHEMA = Schema(
    defaults=DEFAULTS,
    configs_dir=Path(__file__).parent / "configs",
    choices={"task": TASKS},
    validate=validate,
)
