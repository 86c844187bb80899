"""Fixtures of the layer's suite: gradients on every backend, random weights.

Plain helpers (constants, conversions) are in `tests.bn_keras.helpers`; the
NumPy references in `tests.reference`.
"""

import keras
import numpy as np
import pytest

from tests.bn_keras.helpers import BACKEND


def _tf_call_with_gradients(layer, x, upstream, training, mask):
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training, mask=mask)
        loss = tf.reduce_sum(tf.cast(y, upstream.dtype) * upstream)
    variables = layer.trainable_variables
    dx, *dweights = tape.gradient(loss, [x, *variables])
    return y, dx, dweights, variables


def _jax_call_with_gradients(layer, x, upstream, training, mask):
    import jax
    import jax.numpy as jnp

    if not layer.built:
        layer.build(x.shape)
    variables = layer.trainable_variables
    trainable = [v.value for v in variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss_fn(x, trainable):
        y, state = layer.stateless_call(
            trainable, non_trainable, x, training=training, mask=mask
        )
        return jnp.sum(y.astype(upstream.dtype) * upstream), (y, state)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (_, (y, state)), (dx, dweights) = grad_fn(jnp.asarray(x), trainable)
    for variable, value in zip(layer.non_trainable_variables, state, strict=True):
        variable.assign(value)
    return y, dx, dweights, variables


def _torch_call_with_gradients(layer, x, upstream, training, mask):
    import torch

    if not layer.built:
        layer.build(x.shape)
    variables = layer.trainable_variables
    for variable in variables:
        variable.value.grad = None
    x = torch.tensor(np.asarray(x), requires_grad=True)
    if mask is not None:
        mask = torch.as_tensor(np.asarray(mask))
    y = layer(x, training=training, mask=mask)
    loss = torch.sum(
        y.to(torch.float64) * torch.as_tensor(upstream, dtype=torch.float64)
    )
    loss.backward()
    dweights = [
        torch.zeros_like(v.value) if v.value.grad is None else v.value.grad
        for v in variables
    ]
    return y, x.grad, dweights, variables


def _call_with_gradients(layer, x, upstream, training=True, mask=None):
    """Calls `layer` on `x` and differentiates `sum(outputs * upstream)`.

    Returns NumPy `(outputs, d/dx, {weight name: d/dweight})` for the trainable
    weights. The layer's state updates (moving statistics) are applied, as in
    a plain call, on every backend: `tf.GradientTape` on TensorFlow,
    `jax.grad` over `layer.stateless_call` on JAX, autograd on torch.
    """
    upstream = np.asarray(upstream, np.float32)
    if BACKEND == "tensorflow":
        impl = _tf_call_with_gradients
    elif BACKEND == "jax":
        impl = _jax_call_with_gradients
    else:
        impl = _torch_call_with_gradients
    y, dx, dweights, variables = impl(layer, x, upstream, training, mask)
    grads = {
        v.name: keras.ops.convert_to_numpy(g)
        for v, g in zip(variables, dweights, strict=True)
    }
    return keras.ops.convert_to_numpy(y), keras.ops.convert_to_numpy(dx), grads


@pytest.fixture
def call_with_gradients():
    """`f(layer, x, upstream, training=True, mask=None) -> (y, dx, grads)`.

    Differentiates `sum(y * upstream)` on TensorFlow, JAX and torch alike; see
    `_call_with_gradients`.
    """
    return _call_with_gradients


@pytest.fixture
def set_random_weights(rng):
    """`f(layer, input_shape) -> {name: float64 array}`: random weight values.

    Builds `layer` and gives every float weight a random, valid value
    (variances and standard deviations positive), so that no test passes by
    relying on the initializers.
    """

    def assign(layer, input_shape):
        if not layer.built:
            layer.build(input_shape)
        values = {}
        for variable in layer.weights:
            if "int" in variable.dtype:
                continue
            shape = variable.shape
            if variable.name in ("gamma", "moving_variance"):
                value = rng.uniform(0.5, 2.0, shape)
            elif variable.name in ("moving_stddev", "renorm_stddev"):
                value = rng.uniform(0.7, 1.4, shape)
            else:
                value = rng.normal(0.0, 1.0, shape)
            variable.assign(value.astype(variable.dtype))
            values[variable.name] = keras.ops.convert_to_numpy(variable).astype(
                np.float64
            )
        return values

    return assign
