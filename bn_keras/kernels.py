"""Backend kernels for two expressions of the maths: the same values, fewer passes.

`bn_keras.moments` is written in `keras.ops`; where a backend has one kernel
for what `keras.ops` computes in two, these functions use it, and fall back
to the `keras.ops` expression elsewhere.
"""

import keras
from keras import ops


def squared_difference(x, y):
    """`(x - y) ** 2`, elementwise.

    Args:
        x: A tensor.
        y: A tensor that broadcasts against `x`.

    Returns:
        The squared difference, of the broadcast shape.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # One fused kernel, forward and backward, where ops.square(x - y)
        # makes two passes over the tensor (as Keras does through tf.nn.moments).
        return tf.math.squared_difference(x, y)
    return ops.square(x - y)


def subtract_multiply_add(x, mean, multiplier, beta):
    """`(x - mean) * multiplier + beta`, the mean subtracted first.

    Args:
        x: A tensor.
        mean: A tensor that broadcasts against `x`.
        multiplier: A tensor that broadcasts against `x`.
        beta: A tensor that broadcasts against `x`, or None for 0.

    Returns:
        The result, of `x`'s shape.
    """
    if keras.backend.backend() == "torch" and beta is not None:
        import torch

        # Two kernels, as Keras' own: torch runs eagerly, op by op.
        return torch.addcmul(beta, x - mean, multiplier)
    outputs = (x - mean) * multiplier
    return outputs if beta is None else outputs + beta


def cheap_cond() -> bool:
    """Whether a data-dependent `ops.cond` costs little on this backend.

    Not on JAX, which compiles both branches at every eager call; under jit
    XLA fuses a computation done unconditionally into the passes it makes.
    """
    return keras.backend.backend() != "jax"
