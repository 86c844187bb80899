"""The config keys of the Figure-1 network, shared by the experiments that train it."""

from experiments.common.config import (
    MAX_DIMENSION,
    check_at_most,
    check_batch_norm,
    check_memory,
    check_positive,
)
from experiments.common.data import NUM_CLASSES, NUM_PIXELS

MLP_DEFAULTS = {
    # The network: 784 inputs, sigmoid hidden layers, 10 softmax outputs.
    "hidden_units": [100, 100],
    # Deliberately unscaled N(0, init_stddev) weights: where BN's effect shows.
    "init_stddev": 1.0,
    # Plain SGD on the cross-entropy summed over the mini-batch.
    "learning_rate": 0.01,
    "batch_size": 60,
    "steps": 40000,
    # Evaluate on the whole test set every this many steps (and at step 0).
    "eval_every": 50,
    # The BN layers' population statistics.
    "bn_momentum": 0.999,
    "bn_epsilon": 1e-3,
    # "fast": many steps per compiled call; "simple": one call per step.
    "loop": "fast",
}
MLP_CHOICES = {"loop": ("fast", "simple")}

# The `bn_impl` key of the experiments that can swap the BN layer, for
# comparison: bn_keras.BatchNorm or keras.layers.BatchNormalization.
BN_KERAS = "bn_keras"
KERAS = "keras"
BN_IMPLS = (BN_KERAS, KERAS)

# The examples of MNIST and Fashion-MNIST, where a config uses them all (0).
FULL_TRAIN, FULL_TEST = 60_000, 10_000
# Rough sizes behind `check_mlp_memory`'s estimate, in float32 values: the
# live copies of each weight (the variable, its gradient, the initial draw in
# float64, the evaluation's snapshot, the saved model), of each activation of
# the test set (the three evaluation passes, each with its pre-activation,
# normalized and activated values) and of each training activation (forward
# and backward); and the bytes of one number of a metrics record (Python
# object, list slot, JSON text).
_WEIGHT_COPIES = 6
_TEST_ACTIVATION_COPIES = 9
_TRAIN_ACTIVATION_COPIES = 6
_RECORD_NUMBER_BYTES = 100


def validate_mlp(config, *, debiased=False):
    """Checks the network keys every experiment training it has.

    `learning_rate` and `eval_every`, which the learning-rate sweep replaces,
    are checked by the experiments that have them (`check_schedule`).

    Args:
        config: A config holding `MLP_DEFAULTS`' keys (the sweep's lacks
            `learning_rate` and `eval_every`).
        debiased: Whether a debiased moving average is taken of
            `bn_momentum`, which then must be below 1.

    Raises:
        ConfigError: A value is invalid; the message names the key.
    """
    check_positive(config, "init_stddev", "steps", "hidden_units")
    check_at_most(
        config, "hidden_units", MAX_DIMENSION, "TensorFlow's int32 dimensions"
    )
    check_batch_norm(config, debiased=debiased)


def check_mlp_memory(config, *, networks, chunk_steps, evaluations, numbers):
    """Refuses a config whose networks, data and records cannot fit in memory.

    A rough, somewhat generous estimate: what the run holds at its peak.

    Args:
        config: A config holding `MLP_DEFAULTS`' keys, checked otherwise.
        networks: How many pairs (plain, BN) of networks are held at once
            (the seeds trained stacked).
        chunk_steps: The steps trained in one compiled call, whose
            mini-batch indices are on the device together.
        evaluations: How many evaluation records the run keeps.
        numbers: How many numbers one record holds.

    Raises:
        ConfigError: The estimate exceeds the memory available
            (`experiments.common.config.check_memory`).
    """
    hidden = config["hidden_units"]
    sizes = [NUM_PIXELS, *hidden, NUM_CLASSES]
    weights = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
    weights += 4 * sum(hidden)
    train = config["train_examples"] or FULL_TRAIN
    test = config["test_examples"] or FULL_TEST
    batch = config["batch_size"]
    units = sum(hidden) + NUM_CLASSES
    check_memory(
        {
            "weights (hidden_units)": 2 * networks * weights * 4 * _WEIGHT_COPIES,
            "test-set activations (hidden_units, test_examples)": networks
            * test
            * units
            * 4
            * _TEST_ACTIVATION_COPIES,
            "training activations (hidden_units, batch_size)": 2
            * networks
            * batch
            * (units + NUM_PIXELS)
            * 4
            * _TRAIN_ACTIVATION_COPIES,
            # The images as NumPy and TensorFlow float32 arrays, the labels.
            "data (train_examples, test_examples)": (train + test)
            * (2 * 4 * NUM_PIXELS + 8),
            # int64 and int32 on the host, int32 on the device; one epoch's
            # order per seed.
            "mini-batch indices (steps per evaluation, batch_size)": networks
            * (16 * chunk_steps * batch + 8 * train),
            "metrics (steps / eval_every)": evaluations
            * networks
            * numbers
            * _RECORD_NUMBER_BYTES,
        }
    )
