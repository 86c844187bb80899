"""The Figure-1 experiment's config: defaults, and the checks of its own keys.

The defaults are this project's reproduction of the paper's Figure 1 (two
hidden layers, N(0, 1) weights, 40,000 steps); `configs/paper.toml` has the
network the paper's text describes, `configs/five_seeds.toml` runs five seeds
and `configs/smoke.toml` is a run of seconds.
"""

from pathlib import Path

from experiments.common.config import (
    DATA_DEFAULTS,
    Schema,
    check_positive,
    check_schedule,
)
from experiments.common.mlp.config import MLP_CHOICES, MLP_DEFAULTS, validate_mlp

DEFAULTS = {
    # Reproducibility: the initial weights and the mini-batch sequence.
    "seed": 0,
    # Figure 1 over several seeds, trained together (each its own draw and
    # mini-batches); `seed` is the first of them, whose networks are saved.
    # Setting one of the two sets the other: seed=3 is seeds=[3].
    "seeds": [0],
    **MLP_DEFAULTS,
    **DATA_DEFAULTS,
}


def validate(config):
    """Checks the network and its schedule (the shared keys are done)."""
    validate_mlp(config)
    check_positive(config, "learning_rate")
    check_schedule(config)


SCHEMA = Schema(
    defaults=DEFAULTS,
    configs_dir=Path(__file__).parent / "configs",
    choices=MLP_CHOICES,
    validate=validate,
)
