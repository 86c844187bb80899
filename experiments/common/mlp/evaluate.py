"""Test-set evaluation of the Figure-1 networks.

Three ways to run the BN network on test data:
- population statistics (true inference: `training=False`);
- the batch statistics of the examples given together (what a figure drawn
  with `training=True` on the whole test set shows; it hides the lag of the
  population estimate);
- the batch statistics of each example alone, the broken approach a
  hand-written layer often takes at inference: every BN output is then beta,
  and every example gets the same class.
"""

import keras
import tensorflow as tf
from keras import ops

from experiments.common.metrics import (
    BATCH_STATS,
    BN,
    BN_BATCH_STATS,
    BN_POPULATION,
    PERCENTILES,
    PLAIN,
    POPULATION,
)
from experiments.common.mlp.models import is_batch_norm

# The accuracy curve of each network run in each mode.
CURVES = {
    (PLAIN, POPULATION): PLAIN,
    (BN, POPULATION): BN_POPULATION,
    (BN, BATCH_STATS): BN_BATCH_STATS,
}


def normalize_with_batch_stats(layer, x):
    """What a BN layer computes in training mode, with no state update."""
    mean, variance = ops.moments(x, axes=[0], keepdims=True)
    y = (x - mean) * ops.rsqrt(variance + layer.epsilon)
    if layer.gamma is not None:
        y = y * ops.cast(layer.gamma, y.dtype)
    if layer.beta is not None:
        y = y + ops.cast(layer.beta, y.dtype)
    return y


def forward(model, x, modes=(POPULATION,)):
    """Runs a Sequential MLP on `x` in each mode, sharing the common prefix.

    Returns:
        `{mode: (logits, input of the last sigmoid)}`. Layers before the
        first BN layer run once for all modes.
    """
    hidden = {mode: x for mode in modes}
    sigmoid_inputs = {}
    for layer in model.layers:
        computed = {}
        for mode in modes:
            h = hidden[mode]
            if mode == BATCH_STATS and is_batch_norm(layer):
                hidden[mode] = normalize_with_batch_stats(layer, h)
                continue
            if isinstance(layer, keras.layers.Activation):
                sigmoid_inputs[mode] = h
            if id(h) not in computed:
                computed[id(h)] = layer(h, training=False)
            hidden[mode] = computed[id(h)]
    return {mode: (hidden[mode], sigmoid_inputs.get(mode)) for mode in modes}


def summarize_activations(values):
    """`(N, k)` values -> `(k, 4)`: the `STATISTICS` (15th, 50th, 85th
    percentiles and mean) of each column."""
    quantiles = ops.quantile(values, [p / 100 for p in PERCENTILES], axis=0)
    return ops.concatenate(
        [ops.transpose(quantiles), ops.mean(values, axis=0)[:, None]], axis=1
    )


def correct(logits, labels):
    predictions = ops.cast(ops.argmax(logits, axis=-1), labels.dtype)
    return ops.sum(ops.cast(predictions == labels, "int32"))


class Evaluator:
    """Test accuracy of both networks and sigmoid-input statistics.

    Calling it returns `{"accuracy": {curve: float}, "activations": {network:
    (len(neurons), 4) array}}`, with the curves of `ACCURACY_CURVES` and the
    networks `PLAIN` and `BN` (population statistics); without `neurons`,
    the activations are empty.

    With `shared=True`, one compiled call computes everything, and the BN
    network's population and batch-statistics passes share their first
    layer. With `shared=False`, each network and mode has its own compiled
    call, as a straightforward script would do (the speed baseline).
    """

    def __init__(self, networks, x_test, y_test, neurons=(), shared=True):
        self.networks = networks
        self.x = tf.constant(x_test)
        self.y = tf.constant(y_test)
        self.neurons = tf.constant(neurons, dtype="int32")
        # Graph mode, not XLA: for a (10000, 784) matmul oneDNN is faster here.
        if shared:
            self._parts = [
                tf.function(
                    lambda: self._summaries(
                        {PLAIN: (POPULATION,), BN: (POPULATION, BATCH_STATS)}
                    )
                )
            ]
        else:
            self._parts = [
                tf.function(lambda n=n, m=m: self._summaries({n: (m,)}))
                for n, m in CURVES
            ]

    def _summaries(self, modes_by_network):
        accuracy, activations = {}, {}
        for name, modes in modes_by_network.items():
            outputs = forward(getattr(self.networks, name), self.x, modes)
            for mode, (logits, sigmoid_input) in outputs.items():
                accuracy[CURVES[name, mode]] = correct(logits, self.y)
                if mode == POPULATION and len(self.neurons):
                    activations[name] = summarize_activations(
                        tf.gather(sigmoid_input, self.neurons, axis=1)
                    )
        return {"accuracy": accuracy, "activations": activations}

    def __call__(self):
        accuracy, activations = {}, {}
        for part in self._parts:
            values = part()
            for curve, count in values["accuracy"].items():
                accuracy[curve] = int(count) / len(self.y)
            for name, summary in values["activations"].items():
                activations[name] = summary.numpy()
        return {"accuracy": accuracy, "activations": activations}
