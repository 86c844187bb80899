"""The population-statistics study's config: defaults, and its own checks."""

from pathlib import Path

from experiments.common.config import (
    DATA_DEFAULTS,
    ConfigError,
    Schema,
    check_positive,
    check_schedule,
)
from experiments.common.mlp.config import MLP_CHOICES, MLP_DEFAULTS, validate_mlp

DEFAULTS = {
    "seed": 0,
    # Figure 1's network and training, ...
    **MLP_DEFAULTS,
    # ... for 10,000 steps: the estimators differ early in training.
    "steps": 10000,
    # Training batches over which precise BN recomputes the statistics before
    # each evaluation.
    "precise_bn_batches": 50,
    **DATA_DEFAULTS,
}


def validate(config):
    """The study compares bn_keras' estimators, a debiased EMA among them."""
    validate_mlp(config, debiased=True)
    check_positive(config, "learning_rate", "precise_bn_batches")
    check_schedule(config)
    if config["bn_impl"] != "bn_keras":
        raise ConfigError(
            "the study compares bn_keras.BatchNorm's population estimators; "
            f"set bn_impl='bn_keras'. Received: {config['bn_impl']!r}"
        )


def check_data(config, num_train):
    """Precise BN draws its batches from the training examples used."""
    sample = config["precise_bn_batches"] * config["batch_size"]
    if sample > num_train:
        raise ConfigError(
            f"precise BN draws precise_bn_batches * batch_size = {sample} "
            f"training examples, more than the {num_train} used; lower "
            "precise_bn_batches"
        )


SCHEMA = Schema(
    defaults=DEFAULTS,
    configs_dir=Path(__file__).parent / "configs",
    choices=MLP_CHOICES,
    validate=validate,
)
