"""The paper's MNIST networks: sigmoid MLPs without and with batch normalization."""

from typing import NamedTuple

import keras
import numpy as np

import bn_keras
from experiments.common.data import NUM_CLASSES, NUM_PIXELS
from experiments.common.metrics import BN, PLAIN
from experiments.common.mlp.config import BN_KERAS


class Networks(NamedTuple):
    plain: keras.Model
    bn: keras.Model


def build_mlp(hidden_units, batch_norm=None, name="mlp"):
    """A 784-...-10 sigmoid MLP that outputs logits.

    Without batch norm each hidden layer is `Dense (with bias) -> sigmoid`.
    With it, `Dense (no bias) -> BN -> sigmoid`: BN's beta takes the bias'
    role, as in the paper. The sigmoid is its own layer, so that its input
    (what Figure 1 (b, c) plots) can be read off.

    Args:
        hidden_units: Sizes of the hidden layers.
        batch_norm: None, or a function of a layer name returning a new BN
            layer (see `batch_norm_factory`).
        name: The model's name.
    """
    layers = [keras.Input((NUM_PIXELS,), name="pixels")]
    for i, units in enumerate(hidden_units, start=1):
        layers.append(
            keras.layers.Dense(units, use_bias=batch_norm is None, name=f"dense_{i}")
        )
        if batch_norm is not None:
            layers.append(batch_norm(f"bn_{i}"))
        layers.append(keras.layers.Activation("sigmoid", name=f"sigmoid_{i}"))
    layers.append(keras.layers.Dense(NUM_CLASSES, name="logits"))
    return keras.Sequential(layers, name=name)


def batch_norm_factory(impl, momentum, epsilon, **options):
    """Returns `name -> BN layer` of `impl` (one of `config.BN_IMPLS`).

    `options` are extra `bn_keras.BatchNorm` arguments (`debias=True`, ...).
    """
    kwargs = {"momentum": momentum, "epsilon": epsilon, **options}
    if impl == BN_KERAS:
        return lambda name: bn_keras.BatchNorm(name=name, **kwargs)
    if options:
        raise ValueError(
            f"keras.layers.BatchNormalization has no options {sorted(options)}; "
            f"use bn_impl={BN_KERAS!r}"
        )
    return lambda name: keras.layers.BatchNormalization(name=name, **kwargs)


def initialize(models, config):
    """Gives every model's Dense kernels the same N(0, init_stddev) draw.

    Biases start at zero, BN at gamma=1, beta=0, so all the networks compute
    the same pre-activations `x W` at the start.
    """
    kernels = initial_kernels(config, config["seed"])
    for model in models:
        dense = [
            layer for layer in model.layers if isinstance(layer, keras.layers.Dense)
        ]
        for layer, kernel in zip(dense, kernels, strict=True):
            layer.kernel.assign(kernel)
            if layer.use_bias:
                layer.bias.assign(np.zeros(layer.bias.shape, "float32"))
    return models


def initial_kernels(config, seed):
    """The N(0, init_stddev) draw of `seed`: one float32 kernel per Dense layer."""
    rng = np.random.default_rng(seed)
    sizes = [NUM_PIXELS, *config["hidden_units"], NUM_CLASSES]
    return [
        (config["init_stddev"] * rng.standard_normal(shape)).astype("float32")
        for shape in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def build_networks(config):
    """The plain and the BN network of Figure 1, from the same initial draw."""
    networks = Networks(
        plain=build_mlp(config["hidden_units"], name=PLAIN),
        bn=build_mlp(
            config["hidden_units"],
            batch_norm_factory(
                config["bn_impl"], config["bn_momentum"], config["bn_epsilon"]
            ),
            name=BN,
        ),
    )
    initialize(networks, config)
    return networks


def is_batch_norm(layer):
    return isinstance(layer, (bn_keras.BatchNorm, keras.layers.BatchNormalization))
