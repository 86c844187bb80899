"""The paper's MNIST networks: sigmoid MLPs without and with batch normalization."""

from typing import NamedTuple

import keras
import numpy as np

import bn_keras

NUM_PIXELS = 784
NUM_CLASSES = 10


class Networks(NamedTuple):
    plain: keras.Model
    bn: keras.Model


def build_mlp(
    hidden_units,
    batch_norm,
    bn_impl="bn_keras",
    momentum=0.999,
    epsilon=1e-3,
    name=None,
):
    """A 784-...-10 sigmoid MLP that outputs logits.

    Without batch norm each hidden layer is `Dense (with bias) -> sigmoid`.
    With it, `Dense (no bias) -> BN -> sigmoid`: BN's beta takes the bias'
    role, as in the paper. The sigmoid is its own layer, so that its input
    (what Figure 1 (b, c) plots) can be read off.
    """
    layers = [keras.Input((NUM_PIXELS,), name="pixels")]
    for i, units in enumerate(hidden_units, start=1):
        layers.append(
            keras.layers.Dense(units, use_bias=not batch_norm, name=f"dense_{i}")
        )
        if batch_norm:
            layers.append(_batch_norm(bn_impl, momentum, epsilon, name=f"bn_{i}"))
        layers.append(keras.layers.Activation("sigmoid", name=f"sigmoid_{i}"))
    layers.append(keras.layers.Dense(NUM_CLASSES, name="logits"))
    return keras.Sequential(layers, name=name or ("bn" if batch_norm else "plain"))


def _batch_norm(impl, momentum, epsilon, name):
    if impl == "bn_keras":
        return bn_keras.BatchNorm(momentum=momentum, epsilon=epsilon, name=name)
    if impl == "keras":
        return keras.layers.BatchNormalization(
            momentum=momentum, epsilon=epsilon, name=name
        )
    raise ValueError(f"bn_impl must be 'bn_keras' or 'keras'. Received: {impl!r}")


def build_networks(config):
    """Both networks, their Dense kernels from the same N(0, stddev) draw.

    Biases start at zero, BN at gamma=1, beta=0, so both networks compute
    the same pre-activations `x W` at the start.
    """
    seed = config["seed"]
    plain = build_mlp(config["hidden_units"], batch_norm=False)
    bn = build_mlp(
        config["hidden_units"],
        batch_norm=True,
        bn_impl=config["bn_impl"],
        momentum=config["bn_momentum"],
        epsilon=config["bn_epsilon"],
    )
    rng = np.random.default_rng(seed)
    sizes = [NUM_PIXELS, *config["hidden_units"], NUM_CLASSES]
    kernels = [
        (config["init_stddev"] * rng.standard_normal((n_in, n_out))).astype("float32")
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    for model in (plain, bn):
        dense = [
            layer for layer in model.layers if isinstance(layer, keras.layers.Dense)
        ]
        for layer, kernel in zip(dense, kernels, strict=True):
            layer.kernel.assign(kernel)
            if layer.use_bias:
                layer.bias.assign(np.zeros(layer.bias.shape, "float32"))
    return Networks(plain=plain, bn=bn)


def is_batch_norm(layer):
    return isinstance(layer, (bn_keras.BatchNorm, keras.layers.BatchNormalization))
