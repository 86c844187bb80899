"""The perils experiment's config: defaults, and the checks of its own keys."""

from pathlib import Path

from experiments.common.config import (
    DATA_DEFAULTS,
    MAX_DIMENSION,
    ConfigError,
    Schema,
    check_at_most,
    check_batch_norm,
    check_positive,
)
from experiments.common.digits import NUM_TRAIN

# The activations the network may use (keras.layers.Activation names).
ACTIVATIONS = ("relu", "sigmoid", "tanh")
# The learning rate over training: constant, or a cosine decay to zero over
# the run's updates (train.py).
CONSTANT = "constant"
COSINE = "cosine"
LR_SCHEDULES = (CONSTANT, COSINE)

DEFAULTS = {
    # Each seed draws the initial weights (the same for every variant) and
    # the batches of both domains (the same for every variant).
    "seeds": [0, 1, 2, 3, 4],
    **DATA_DEFAULTS,
    # The Figure-1 style network: 784 -> [Dense -> BN -> activation] x 2 -> 10.
    "hidden_units": [100, 100],
    "activation": "relu",
    # Examples of EACH domain per step: a merged batch holds 2 x batch_size,
    # a tower batch_size.
    "batch_size": 50,
    # Steps of one batch of each domain: 100,000 examples of each, 1.7
    # epochs of MNIST, 83 of the 1,198 digits.
    "steps": 2000,
    # SGD with momentum on the cross-entropy, every example weighted 1 / (2 x
    # batch_size) in every variant (see train.py).
    "learning_rate": 0.05,
    "sgd_momentum": 0.9,
    # "cosine": the learning rate decays to zero over the run (cosine), so
    # that at the end the weights stand still and the moving averages catch
    # up with them: what is left is the domains' mismatch, not the EMA's lag.
    # "constant" keeps it.
    "lr_schedule": "cosine",
    # The BN layers' moving averages.
    "bn_momentum": 0.99,
    "bn_epsilon": 1e-3,
    # Training examples of each domain (default: all 1,198 digits, and as
    # many MNIST images drawn by the seed) that (d) recomputes its per-domain
    # statistics from (bn_keras.recompute_statistics) and that the diagnosis
    # (bn_keras.inspect_statistics, first seed) compares the statistics with,
    # in batches of batch_size.
    "statistics_examples": 1198,
    # Steps trained per compiled call (and per progress-bar update).
    "chunk_steps": 500,
}


def validate(config):
    """Checks the network, training and sample keys."""
    check_positive(
        config,
        "hidden_units",
        "steps",
        "learning_rate",
        "statistics_examples",
        "chunk_steps",
    )
    check_at_most(
        config, "hidden_units", MAX_DIMENSION, "TensorFlow's int32 dimensions"
    )
    check_at_most(config, "chunk_steps", MAX_DIMENSION, "the steps of one call")
    check_batch_norm(config)
    if not 0.0 <= config["sgd_momentum"] < 1.0:
        raise ConfigError(
            "config key 'sgd_momentum' must be in [0, 1). Received: "
            f"{config['sgd_momentum']!r}"
        )
    for key in ("batch_size", "statistics_examples"):
        if config[key] > NUM_TRAIN:
            raise ConfigError(
                f"config key {key!r} ({config[key]}) is larger than the "
                f"{NUM_TRAIN} training images of the UCI digits, which every "
                f"batch and sample of that domain comes from; use at most "
                f"{NUM_TRAIN}"
            )
    if config["statistics_examples"] < 2 * config["batch_size"]:
        raise ConfigError(
            f"config key 'statistics_examples' ({config['statistics_examples']}) "
            f"must be at least 2 x 'batch_size' ({2 * config['batch_size']}): it is "
            "read in batches of that size, merged batches of twice that"
        )


def check_data(config, num_train):
    """The MNIST sample of precise BN and the diagnosis is within the
    training examples used."""
    if config["statistics_examples"] > num_train:
        raise ConfigError(
            f"config key 'statistics_examples' ({config['statistics_examples']}) "
            f"is larger than the {num_train} MNIST training examples used; lower "
            "it or raise 'train_examples'"
        )


SCHEMA = Schema(
    defaults=DEFAULTS,
    configs_dir=Path(__file__).parent / "configs",
    choices={"activation": ACTIVATIONS, "lr_schedule": LR_SCHEDULES},
    validate=validate,
)
