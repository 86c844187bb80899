"""Figure 1 over several seeds: every seed's two networks in stacked weights.

Each seed has its own initial weights and its own sequence of mini-batches
(`models.initial_kernels`, `train.BatchIndices`). Their kernels are stacked
on a leading seed axis, `(seeds, fan_in, units)`, and the activations are
laid out `(batch, seeds, units)`, so that one XLA-compiled call trains every
seed's plain and BN network for all the steps between two evaluations. Each
seed's mini-batch goes through its own kernels (`product`).

Batch norm sees the seeds side by side, `(batch, seeds * units)`: statistics
per feature over the batch are exactly each seed's own, so one BN layer over
`seeds * units` features is every seed's layer, with bn_keras' (or Keras')
arithmetic unchanged.

At test time all seeds see the same images, so the first layer of every
seed's network is one `(10000, 784) x (784, seeds * units)` product per
network, shared by the BN network's two modes; the evaluation of one chunk's
weights runs while the next chunk trains (`StackedEvaluator.start`).

With one seed every product is the 2-D product of the Keras models, and the
numbers are those of the per-network loop, bit for bit where TensorFlow does
not fuse a Dense layer's product and bias into one oneDNN kernel (its
"remapping" graph optimization on AVX-512 CPUs, which moves the per-network
evaluation by about 2e-7; tests/experiments/test_mnist_mlp_seeds.py).
"""

import concurrent.futures

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from experiments.common.data import NUM_PIXELS
from experiments.common.metrics import BATCH_STATS, BN, PLAIN, POPULATION
from experiments.common.mlp.evaluate import (
    CURVES,
    normalize_with_batch_stats,
    summarize_activations,
)
from experiments.common.mlp.models import (
    Networks,
    batch_norm_factory,
    build_mlp,
    initial_kernels,
)
from experiments.common.mlp.train import BatchIndices
from experiments.common.quiet import expected_retracing
from experiments.mnist_mlp.single_example import single_example_summary


class StackedNetworks:
    """The plain and the BN network of every seed in `seeds`, weights stacked.

    Attributes:
        seeds: The seeds, in the order of the seed axis.
        kernels: `{PLAIN: [...], BN: [...]}`, one `(seeds, fan_in, units)`
            variable per Dense layer.
        biases: `{PLAIN: [...], BN: [...]}`, one `(seeds, units)` variable
            per Dense layer that has a bias (None where BN's beta replaces it).
        bn_layers: One BN layer per hidden layer, over `seeds * units` features.
    """

    def __init__(self, config, seeds):
        self.seeds = list(seeds)
        self.hidden_units = list(config["hidden_units"])
        k = len(self.seeds)
        draws = [initial_kernels(config, seed) for seed in self.seeds]
        layers = len(draws[0])
        self.kernels, self.biases = {}, {}
        for name in (PLAIN, BN):
            self.kernels[name] = [
                tf.Variable(np.stack([d[i] for d in draws]), name=f"{name}_kernel_{i}")
                for i in range(layers)
            ]
            self.biases[name] = [
                None
                if name == BN and i < layers - 1
                else tf.Variable(
                    np.zeros((k, draws[0][i].shape[1]), "float32"),
                    name=f"{name}_bias_{i}",
                )
                for i in range(layers)
            ]
        factory = batch_norm_factory(
            config["bn_impl"], config["bn_momentum"], config["bn_epsilon"]
        )
        self.bn_layers = []
        for i, units in enumerate(self.hidden_units, start=1):
            layer = factory(f"bn_{i}")
            layer.build((None, k * units))
            self.bn_layers.append(layer)

    def __len__(self):
        return len(self.seeds)

    @property
    def trainable_variables(self):
        variables = [
            v
            for name in (PLAIN, BN)
            for pair in zip(self.kernels[name], self.biases[name], strict=True)
            for v in pair
            if v is not None
        ]
        return variables + [
            v for layer in self.bn_layers for v in layer.trainable_variables
        ]

    @property
    def variables(self):
        """Every variable, trainable or not, in a fixed order."""
        return [
            v
            for name in (PLAIN, BN)
            for pair in zip(self.kernels[name], self.biases[name], strict=True)
            for v in pair
            if v is not None
        ] + [v for layer in self.bn_layers for v in layer.weights]

    def forward(self, name, first, modes=(POPULATION,), training=False):
        """Runs network `name` of every seed from its first layer's output.

        Args:
            name: `PLAIN` or `BN`.
            first: `(batch, seeds, units)`, the first layer's product (without
                bias).
            modes: For inference (`training=False`), the BN network's modes:
                `POPULATION` and/or `BATCH_STATS`.
            training: BN in training mode (batch statistics, statistics
                updated); `modes` is then ignored.

        Returns:
            `{mode: (logits, input of the last sigmoid)}`, both
            `(batch, seeds, units)`; with `training`, the one mode `"train"`.
        """
        if training:
            modes = ("train",)
        hidden = {mode: first for mode in modes}
        sigmoid_inputs = {}
        kernels, biases = self.kernels[name], self.biases[name]
        for i, (kernel, bias) in enumerate(zip(kernels, biases, strict=True)):
            if i > 0:
                hidden = {mode: product(h, kernel) for mode, h in hidden.items()}
            if bias is not None:
                hidden = {mode: h + bias for mode, h in hidden.items()}
            if i == len(kernels) - 1:
                break
            if name == BN:
                hidden = {
                    mode: self._batch_norm(i, h, mode) for mode, h in hidden.items()
                }
            sigmoid_inputs = hidden
            hidden = {mode: tf.sigmoid(h) for mode, h in hidden.items()}
        return {mode: (hidden[mode], sigmoid_inputs[mode]) for mode in modes}

    def _batch_norm(self, index, h, mode):
        """BN of `(batch, seeds, units)` as `(batch, seeds * units)` features."""
        layer = self.bn_layers[index]
        shape = tf.shape(h)
        flat = tf.reshape(h, (shape[0], -1))
        if mode == "train":
            flat = layer(flat, training=True)
        elif mode == BATCH_STATS:
            flat = normalize_with_batch_stats(layer, flat)
        else:
            flat = layer(flat, training=False)
        return tf.reshape(flat, shape)

    def first_layer_train(self, x):
        """`(batch, seeds, 784)` -> `{name: (batch, seeds, units)}`: each seed's
        own mini-batch through its own first layers."""
        return {name: product(x, self.kernels[name][0]) for name in (PLAIN, BN)}

    def first_layer_shared(self, x, names=(PLAIN, BN)):
        """`(n, 784)` -> `{name: (n, seeds, units)}`: the same examples through
        every seed's first layer, one `(n, 784) x (784, seeds * units)` product
        per network. (Plain and BN in one product would be no faster here,
        and would round differently from a one-seed run.)"""
        k, units = len(self.seeds), self.hidden_units[0]
        return {
            name: tf.reshape(
                tf.matmul(
                    x, tf.reshape(tf.transpose(kernel[0], (1, 0, 2)), (NUM_PIXELS, -1))
                ),
                (-1, k, units),
            )
            for name, kernel in self.kernels.items()
            if name in names
        }

    def keras_networks(self, index=0):
        """The seed at `index` as the Keras models of `models.build_networks`."""
        plain = build_mlp(self.hidden_units, name=PLAIN)
        bn_layers = {}

        def factory(name):
            layer = type(self.bn_layers[0]).from_config(
                {**self.bn_layers[0].get_config(), "name": name}
            )
            bn_layers[name] = layer
            return layer

        bn = build_mlp(self.hidden_units, factory, name=BN)
        for name, model in ((PLAIN, plain), (BN, bn)):
            dense = [x for x in model.layers if isinstance(x, keras.layers.Dense)]
            for layer, kernel, bias in zip(
                dense, self.kernels[name], self.biases[name], strict=True
            ):
                layer.kernel.assign(kernel[index])
                if bias is not None:
                    layer.bias.assign(bias[index])
        for i, (stacked, units) in enumerate(
            zip(self.bn_layers, self.hidden_units, strict=True), start=1
        ):
            layer = bn_layers[f"bn_{i}"]
            for target, source in zip(layer.weights, stacked.weights, strict=True):
                value = ops.convert_to_numpy(source)
                if value.shape and value.shape[-1] == len(self.seeds) * units:
                    value = value.reshape(*value.shape[:-1], len(self.seeds), units)
                    value = value[..., index, :]
                target.assign(value)
        return Networks(plain=plain, bn=bn)


def product(h, kernel):
    """`(batch, seeds, fan_in)` by `(seeds, fan_in, units)`, seed by seed.

    One 2-D product per seed, as a Dense layer computes it: a one-seed run
    then rounds exactly as the Keras models do, and on two CPU cores this
    was faster than a batched product (`einsum`, `BatchMatMul`) by about 35%.
    """
    return tf.stack(
        [tf.matmul(h[:, s], kernel[s]) for s in range(kernel.shape[0])], axis=1
    )


def summed_cross_entropy(logits, labels):
    """`(batch, seeds, classes)` logits -> `(seeds,)` losses summed over the batch."""
    return tf.reduce_sum(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits),
        axis=0,
    )


class StackedIndices:
    """Several seeds' `BatchIndices` read together: `(steps, batch, seeds)`."""

    def __init__(self, per_seed):
        self.per_seed = tuple(per_seed)
        self.shape = self.per_seed[0].shape + (len(self.per_seed),)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        stacked = np.stack([indices[key] for indices in self.per_seed], axis=-1)
        return stacked[(slice(None),) * (stacked.ndim - 2) + rest] if rest else stacked


class StackedTrainer:
    """SGD on every seed's networks; each seed on its own mini-batches.

    `train(start, stop)` performs steps `start` to `stop - 1` in one
    XLA-compiled call and returns the mean training loss over them,
    `(2, seeds)`: plain, then BN.
    """

    def __init__(self, networks, x_train, y_train, config):
        self.networks = networks
        self.learning_rate = float(config["learning_rate"])
        # (steps, batch, seeds): seed s's mini-batches are those a one-seed
        # run with seed s takes, drawn as they are trained.
        self.indices = StackedIndices(
            [
                BatchIndices(len(x_train), config["batch_size"], config["steps"], seed)
                for seed in networks.seeds
            ]
        )
        self.x = tf.constant(x_train)
        self.y = tf.constant(y_train)
        self._chunk = tf.function(self._chunk_graph, jit_compile=True)

    def _step(self, x, y):
        networks = self.networks
        variables = networks.trainable_variables
        with tf.GradientTape() as tape:
            first = networks.first_layer_train(x)
            losses = tf.stack(
                [
                    summed_cross_entropy(
                        networks.forward(name, first[name], training=True)["train"][0],
                        y,
                    )
                    for name in (PLAIN, BN)
                ]
            )
            total = tf.reduce_sum(losses)
        gradients = tape.gradient(total, variables)
        for variable, gradient in zip(variables, gradients, strict=True):
            variable.assign(variable - self.learning_rate * gradient)
        return losses

    def _chunk_graph(self, indices):
        total = tf.zeros((2, len(self.networks)))
        for i in tf.range(tf.shape(indices)[0]):
            batch = indices[i]
            total += self._step(tf.gather(self.x, batch), tf.gather(self.y, batch))
        return total / tf.cast(tf.shape(indices)[0], total.dtype)

    def train(self, start, stop):
        with expected_retracing():
            return self._chunk(tf.constant(self.indices[start:stop])).numpy()


class StackedEvaluator:
    """Test accuracy and sigmoid-input statistics of every seed, in one call.

    Calling it returns `{"accuracy": {curve: (seeds,) floats}, "activations":
    {network: (seeds, len(neurons), 4) array}}`.

    `start()` instead copies the weights into a snapshot and evaluates the
    snapshot on a worker thread, returning a future of the same dict: the
    next training chunk can run meanwhile (each of the two mostly waits on
    its own small or large products, so the two cores share them better),
    with the same numbers.
    """

    def __init__(self, networks, x_test, y_test, neurons, config=None):
        self.live = networks
        # The snapshot the evaluation reads; the networks themselves without
        # a config to build one.
        self.networks = (
            networks if config is None else StackedNetworks(config, networks.seeds)
        )
        self.x = tf.constant(x_test)
        self.y = tf.constant(y_test)
        self.neurons = tf.constant(neurons, dtype="int32")
        # Graph mode, not XLA: for a (10000, 784) matmul oneDNN is faster here.
        self._evaluate = tf.function(self._summaries)
        self._copy = tf.function(self._copy_graph)
        self._pool = None

    def _copy_graph(self):
        for target, source in zip(
            self.networks.variables, self.live.variables, strict=True
        ):
            target.assign(source)

    def _summaries(self):
        networks = self.networks
        k = len(networks)
        first = networks.first_layer_shared(self.x)
        accuracy, activations = {}, {}
        for name, modes in ((PLAIN, (POPULATION,)), (BN, (POPULATION, BATCH_STATS))):
            outputs = networks.forward(name, first[name], modes)
            for mode, (logits, sigmoid_input) in outputs.items():
                accuracy[CURVES[name, mode]] = correct_by_seed(logits, self.y)
                if mode == POPULATION:
                    chosen = tf.gather(sigmoid_input, self.neurons, axis=2)
                    summary = summarize_activations(
                        tf.reshape(chosen, (tf.shape(chosen)[0], -1))
                    )
                    activations[name] = tf.reshape(summary, (k, len(self.neurons), -1))
        return {"accuracy": accuracy, "activations": activations}

    def _values(self):
        values = self._evaluate()
        return {
            "accuracy": {
                curve: (count.numpy() / len(self.y)).tolist()
                for curve, count in values["accuracy"].items()
            },
            "activations": {
                name: summary.numpy() for name, summary in values["activations"].items()
            },
        }

    def __call__(self):
        if self.networks is not self.live:
            self._copy()
        return self._values()

    def start(self):
        """Snapshots the weights and evaluates them on a worker thread; the
        previous `start()`'s future must be done."""
        if self.networks is self.live:
            raise ValueError("start() needs a snapshot: pass config= to build one")
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="evaluation"
            )
        self._copy()
        return self._pool.submit(self._values)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()


def correct_by_seed(logits, labels):
    """`(n, seeds, classes)` logits -> `(seeds,)` counts of correct predictions."""
    predictions = ops.cast(ops.argmax(logits, axis=-1), labels.dtype)
    return ops.sum(ops.cast(predictions == labels[:, None], "int32"), axis=0)


def single_example_check_by_seed(networks, x_test, y_test, first=100):
    """`single_example.single_example_check` for every seed's BN network at once.

    Each test example goes alone (a batch of one) through all the seeds' BN
    networks, with population statistics and with its own batch statistics.

    Returns:
        One dict per seed, as `single_example.single_example_check` returns.
    """
    x = tf.constant(x_test)
    labels = np.asarray(y_test)
    k = len(networks)

    def predictions(inputs, mode):
        first_layer = networks.first_layer_shared(inputs, names=(BN,))[BN]
        logits = networks.forward(BN, first_layer, modes=(mode,))[mode][0]
        return tf.argmax(logits, axis=-1, output_type=tf.int32)

    @tf.function
    def one_at_a_time(mode):
        return tf.map_fn(
            lambda example: predictions(example[None, :], mode)[0],
            x,
            fn_output_signature=tf.TensorSpec((k,), tf.int32),
        )

    population = one_at_a_time(POPULATION).numpy()
    own_stats = one_at_a_time(BATCH_STATS).numpy()
    batched = tf.function(predictions)(x, POPULATION).numpy()
    return [
        single_example_summary(
            population[:, i], own_stats[:, i], batched[:, i], labels, first
        )
        for i in range(k)
    ]
