"""LeNet with batch normalization (Dive into Deep Learning, section 7.5).

The chapter's network: sigmoid LeNet on 28 x 28 images with a BN layer after
every convolution and dense layer but the last. `build_lenet` (shared, in
`experiments.common.lenet`) makes it with one of `VERSIONS`' BN layers
(`batch_norm_factory`), or none (`PLAIN`, the baseline);
`copy_initial_weights` gives every version the plain network's seeded
convolution and dense weights. `ScratchBatchNorm` is the chapter's
from-scratch layer rewritten with `keras.ops`; `batch_norm` is its maths.

Reference:
    A. Zhang, Z. C. Lipton, M. Li, A. J. Smola, "Dive into Deep Learning",
    section 7.5 (8.5 in the PyTorch-first edition), https://d2l.ai
"""

from __future__ import annotations

import keras
from keras import ops

import bn_keras

# The network itself is shared with other experiments; this experiment's
# modules and tests find it here too.
from experiments.common.lenet import NORMALIZED as NORMALIZED
from experiments.common.lenet import build_lenet as build_lenet
from experiments.common.lenet import copy_initial_weights as copy_initial_weights
from experiments.common.metrics import PLAIN

# The versions, as the metrics file and the saved models name them.
SCRATCH = "scratch"
BN_KERAS = "bn_keras"
KERAS = "keras"
VERSIONS = (SCRATCH, BN_KERAS, KERAS, PLAIN)
LABELS = {
    SCRATCH: "from scratch (keras.ops)",
    BN_KERAS: "bn_keras.BatchNorm",
    KERAS: "keras.layers.BatchNormalization",
    PLAIN: "plain LeNet (no BN)",
}


def batch_norm(x, gamma, beta, moving_mean, moving_var, eps, momentum, training):
    """The chapter's `batch_norm` function: normalizes `x` over all but its last axis.

    Training: `y = gamma * (x - mean_B) / sqrt(var_B + eps) + beta` with the
    batch mean and biased variance, and the moving statistics become
    `(1 - momentum) * moving + momentum * batch` (d2l's convention: its
    momentum 0.1 is Keras' momentum 0.9). Inference: the same with the moving
    statistics, which stay as they are.

    Returns:
        `(y, new_moving_mean, new_moving_var)`.
    """
    if not training:
        mean, var = moving_mean, moving_var
    else:
        axes = tuple(range(len(x.shape) - 1))
        mean = ops.mean(x, axis=axes)
        var = ops.mean(ops.square(x - mean), axis=axes)
        moving_mean = (1.0 - momentum) * moving_mean + momentum * mean
        moving_var = (1.0 - momentum) * moving_var + momentum * var
    y = gamma * (x - mean) / ops.sqrt(var + eps) + beta
    return y, moving_mean, moving_var


@keras.saving.register_keras_serializable(package="experiments")
class ScratchBatchNorm(keras.layers.Layer):
    """The chapter's from-scratch `BatchNorm` layer, channels last.

    `gamma * (x - mean) / sqrt(var + epsilon) + beta` per channel; see
    `batch_norm`.

    Args:
        momentum: d2l's momentum: the weight of the new batch in the moving
            statistics, in `[0, 1]`.
        epsilon: Small positive float added to the variance.
        **kwargs: Base layer keyword arguments.
    """

    def __init__(self, momentum: float = 0.1, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(
                f"momentum must be in [0, 1]. Received: momentum={momentum}"
            )
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be positive. Received: epsilon={epsilon}")

    def build(self, input_shape):
        shape = (input_shape[-1],)
        self.gamma = self.add_weight(shape=shape, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=shape, initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(
            shape=shape, initializer="zeros", name="moving_mean", trainable=False
        )
        self.moving_variance = self.add_weight(
            shape=shape, initializer="ones", name="moving_variance", trainable=False
        )

    def call(self, inputs, training=None):
        y, mean, var = batch_norm(
            inputs,
            self.gamma,
            self.beta,
            self.moving_mean,
            self.moving_variance,
            self.epsilon,
            self.momentum,
            bool(training),
        )
        if training:
            self.moving_mean.assign(mean)
            self.moving_variance.assign(var)
        return y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "momentum": self.momentum,
            "epsilon": self.epsilon,
        }


def batch_norm_factory(version: str, momentum: float, epsilon: float, **options):
    """A function making the BN layer of `version` (None for `PLAIN`).

    Args:
        version: One of `VERSIONS`.
        momentum: Keras' momentum (`moving = momentum * moving + (1 - momentum)
            * batch`); the scratch layer gets d2l's `1 - momentum`.
        epsilon: Added to the variance.
        **options: Extra `bn_keras.BatchNorm` arguments (`debias=True`).
    """
    if version == PLAIN:
        return None
    if version == SCRATCH:
        return lambda name: ScratchBatchNorm(1.0 - momentum, epsilon, name=name)
    if version == BN_KERAS:
        return lambda name: bn_keras.BatchNorm(
            momentum=momentum, epsilon=epsilon, name=name, **options
        )
    if version == KERAS:
        return lambda name: keras.layers.BatchNormalization(
            momentum=momentum, epsilon=epsilon, name=name
        )
    raise ValueError(f"unknown version {version!r}; choose one of {VERSIONS}")


def first_batch_norm(model: keras.Model) -> keras.layers.Layer:
    """The BN layer after the first convolution (the chapter prints its gamma, beta)."""
    return model.get_layer("conv1_bn")
