"""The population-statistics study's config: defaults, and its own checks."""

from pathlib import Path

from experiments.common.config import (
    DATA_DEFAULTS,
    Schema,
    check_positive,
    check_precise_bn_sample,
    check_schedule,
)
from experiments.common.mlp.config import (
    MLP_CHOICES,
    MLP_DEFAULTS,
    check_mlp_memory,
    validate_mlp,
)

DEFAULTS = {
    "seed": 0,
    # Figure 1's network and training, its BN layers bn_keras.BatchNorm (whose
    # options the estimators are), ...
    **MLP_DEFAULTS,
    # ... for 10,000 steps: the estimators differ early in training.
    "steps": 10000,
    # Training batches over which precise BN recomputes the statistics before
    # each evaluation.
    "precise_bn_batches": 50,
    **DATA_DEFAULTS,
}


def validate(config):
    """The study's estimators include a debiased EMA: momentum below 1."""
    validate_mlp(config, debiased=True)
    check_positive(config, "learning_rate", "precise_bn_batches")
    check_schedule(config)
    # A record holds a few numbers per estimator; precise BN's sample is
    # within the training data.
    check_mlp_memory(
        config,
        networks=1,
        chunk_steps=config["eval_every"],
        evaluations=config["steps"] // config["eval_every"] + 1,
        numbers=50,
    )


def check_data(config, num_train):
    """Precise BN draws its batches from the training examples used."""
    check_precise_bn_sample(config, num_train, "used")


SCHEMA = Schema(
    defaults=DEFAULTS,
    configs_dir=Path(__file__).parent / "configs",
    choices=MLP_CHOICES,
    validate=validate,
)
