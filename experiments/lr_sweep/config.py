"""The learning-rate sweep's config: defaults, and its own checks."""

from pathlib import Path

from experiments.common.config import (
    DATA_DEFAULTS,
    MAX_DIMENSION,
    Schema,
    check_at_most,
    check_distinct,
    check_positive,
)
from experiments.common.mlp.config import (
    BN_IMPLS,
    BN_KERAS,
    MLP_CHOICES,
    MLP_DEFAULTS,
    check_mlp_memory,
    validate_mlp,
)

DEFAULTS = {
    # Figure 1's network and training, with lists of learning rates and seeds
    # in place of one of each, evaluated at the end of each training only ...
    **{
        key: value
        for key, value in MLP_DEFAULTS.items()
        if key not in ("learning_rate", "eval_every")
    },
    "bn_impl": BN_KERAS,
    "learning_rates": [0.01, 0.03, 0.1, 0.3, 1.0],
    "seeds": [0, 1, 2],
    # ... for 10,000 steps: enough to separate stable from unstable rates,
    # short enough for 5 rates x 3 seeds x 2 networks.
    "steps": 10000,
    **DATA_DEFAULTS,
}


def validate(config):
    """Checks the network and the grid of learning rates."""
    validate_mlp(config)
    check_positive(config, "learning_rates")
    check_distinct(config, "learning_rates")
    # One cell at a time, all its steps in one compiled call.
    check_at_most(config, "steps", MAX_DIMENSION, "the steps of one compiled call")
    cells = len(config["learning_rates"]) * len(config["seeds"])
    check_mlp_memory(
        config, networks=1, chunk_steps=config["steps"], evaluations=cells, numbers=8
    )


SCHEMA = Schema(
    defaults=DEFAULTS,
    configs_dir=Path(__file__).parent / "configs",
    choices={**MLP_CHOICES, "bn_impl": BN_IMPLS},
    validate=validate,
)
