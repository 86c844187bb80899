"""The sequential-MNIST experiment's config: defaults, and its own checks."""

from pathlib import Path

from experiments.common.config import (
    DATA_DEFAULTS,
    MAX_DIMENSION,
    ConfigError,
    Schema,
    check_at_most,
    check_batch_norm,
    check_memory,
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
    check_at_most(
        config, "hidden_units", MAX_DIMENSION, "TensorFlow's int32 dimensions"
    )
    check_schedule(config)
    check_batch_norm(config)
    check_neurons(config, config["hidden_units"][0])
    check_memory(_memory_needs(config))


# Rough sizes behind the memory estimate, as in `experiments.common.mlp.config`:
# live copies of each weight (variable, gradient, two RMSProp slots, the
# saved model, the precise-BN clone), float32 values kept per unit and
# timestep of a training example (the recurrence's gates, state, cell and
# batch moments, for the backward pass) and of an evaluated one, and the
# bytes of one number of a metrics record.
_WEIGHT_COPIES = 6
_TRAIN_VALUES_PER_UNIT = 12
_EVAL_VALUES_PER_UNIT = 5
_EVAL_BATCH = 1000
_RECORD_NUMBER_BYTES = 100
_FULL_EXAMPLES = 70_000


def _memory_needs(config):
    """`{what (keys): bytes}`: what the two networks' run holds at its peak."""
    units = config["hidden_units"][0]
    timesteps, features = (28, 28) if config["task"] == ROWS else (784, 1)
    # The LSTM and the BN-LSTM: kernels, biases, gammas, and the BN-LSTM's
    # per-timestep statistics of its three normalizations.
    weights = 2 * 4 * units * (features + units + 1) + 2 * timesteps * 9 * units
    examples = (config["train_examples"] or 60_000) + (
        config["test_examples"] or 10_000
    )
    return {
        "weights (hidden_units)": weights * 4 * _WEIGHT_COPIES,
        "training activations (hidden_units, batch_size)": 2
        * config["batch_size"]
        * timesteps
        * units
        * 4
        * _TRAIN_VALUES_PER_UNIT,
        # One network at a time.
        "evaluation activations (hidden_units)": _EVAL_BATCH
        * timesteps
        * units
        * 4
        * _EVAL_VALUES_PER_UNIT,
        # The images and their sequences, float32.
        "data (train_examples, test_examples)": min(examples, _FULL_EXAMPLES)
        * 784
        * 4
        * 2,
        "metrics (steps / eval_every)": (config["steps"] // config["eval_every"] + 1)
        * 16
        * _RECORD_NUMBER_BYTES,
    }


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
