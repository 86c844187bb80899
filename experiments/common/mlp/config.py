"""The config keys of the Figure-1 network, shared by the experiments that train it."""

from experiments.common.config import check_batch_norm, check_positive

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
    check_batch_norm(config, debiased=debiased)
