"""Training-mode batch normalization with its gradient in closed form.

Written with `keras.ops` and differentiated by the backend, the layer's
training step made XLA materialize more full-size tensors than Keras' (the
shift, the scale that guards against overflow, the autodiff of both):
1.3x to 2x Keras' step on JAX on a CPU. Here the forward pass and its
gradient are written out once, as the kernels of TensorFlow and torch are,
and JAX (`jax.custom_vjp`) and TensorFlow (`tf.custom_gradient`, where its
fused kernel is not used) run them:

- forward: `d = x - shift` with `shift` the mean of the batch's first few
  examples per feature (exact for large means, as `bn_keras.moments`), then
  `sum(d)` and `sum(d**2)`, and the output `d * a + (beta - mean(d) * a)`;
- backward: the closed form, `dbeta = sum(dy)`, `dgamma = sum(dy * xhat)`,
  `dx = a * dy + c1 * d + c0`, from `d` and per-feature constants; an input
  gradient nobody asks for (a first layer) is not computed.

The variance `mean(d**2) - mean(d)**2` cancels only where the shift is many
spreads from the mean (outliers among the first examples): such a batch
(and one whose squares overflow float32, as a batch of magnitude 1e20)
takes a second pass, `mean((d - mean(d))**2)` on `d` divided by a power of
two where needed, inside a `cond` that ordinary batches skip (a Python
branch on concrete values); its input gradient is then computed from the
normalized batch, whose values are of order 1.

`BatchNorm` uses it in training where no mask, ghost batches or
synchronized moments change the statistics (`applies`).
"""

from __future__ import annotations

import functools

import keras
from keras import ops

from bn_keras.moments import static_count

# Squared mean of the deviations beyond this many times their variance: the
# one-pass variance lost more than about 3 bits, take the second pass. (At
# 64 it lost 6: 1e-5 to 5e-5 relative error, found by the tests.) With the
# shift the mean of 4 examples, ordinary batches stay far below it.
_CANCELLATION = 8.0
# Entries along the first reduced axis whose mean is the shift.
_SHIFT_ROWS = 4


def applies(mask, ghosts: bool, synchronized: bool) -> bool:
    """Whether a training call can use `train`.

    Args:
        mask: The broadcast mask, or None.
        ghosts: Whether the layer splits the batch into ghost batches.
        synchronized: Whether the layer asks for global moments.

    Returns:
        True on JAX and TensorFlow without a mask, ghost batches or
            synchronized moments.
    """
    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow"):
        return False
    return mask is None and not ghosts and not synchronized


def train(x, axes, gamma, beta, epsilon):
    """Training-mode normalization of `x` over `axes`, with its gradient.

    Args:
        x: The float32 or float64 input.
        axes: The reduction axes (every axis but the features').
        gamma: The scale, broadcastable against `x` (ones when off).
        beta: The offset, broadcastable against `x` (zeros when off).
        epsilon: The layer's `epsilon`.

    Returns:
        `(outputs, mean, variance)`: the batch mean and biased variance in
            the shape of `gamma`, without gradient.
    """
    if keras.backend.backend() == "tensorflow":
        outputs, mean, variance = _tensorflow_normalize(x, gamma, beta, epsilon, axes)
    else:
        normalize = _jax_normalizer()
        outputs, mean, variance = normalize(x, gamma, beta, float(epsilon), axes)
    return outputs, ops.stop_gradient(mean), ops.stop_gradient(variance)


def _count(x, axes):
    """Values per feature: an int, or a float tensor where the shape is dynamic."""
    count = static_count(x, axes)
    return count if isinstance(count, int) else ops.cast(count, x.dtype)


def _cond(predicate, true_fn, false_fn, *operands):
    """A `cond` in a compiled graph; a Python branch on concrete values."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return tf.cond(
                predicate, lambda: true_fn(*operands), lambda: false_fn(*operands)
            )
    else:
        import jax

        if isinstance(predicate, jax.core.Tracer):
            return jax.lax.cond(predicate, true_fn, false_fn, *operands)
    return true_fn(*operands) if bool(predicate) else false_fn(*operands)


def _moments(d, axes, count):
    """`(mean(d), var(d), scale)`: `d / scale` gave them where squares overflow."""
    mean = ops.sum(d, axis=axes, keepdims=True) / count
    squares = ops.sum(ops.square(d), axis=axes, keepdims=True) / count
    variance = squares - ops.square(mean)
    ordinary = ops.logical_or(
        ops.all(
            ops.logical_and(
                ops.isfinite(squares),
                ops.square(mean) <= _CANCELLATION * variance,
            )
        ),
        ops.logical_not(ops.all(ops.isfinite(mean))),
    )

    def one_pass(d, mean, variance):
        return mean, ops.maximum(variance, 0.0), ops.ones_like(mean)

    def two_passes(d, mean, variance):
        largest = ops.max(ops.abs(d), axis=axes, keepdims=True)
        large = largest > 2.0**40
        exponent = ops.ceil(ops.log2(ops.where(large, largest, 1.0)))
        scale = ops.cast(ops.where(large, ops.power(2.0, exponent), 1.0), d.dtype)
        scaled = d / scale
        mean = ops.sum(scaled, axis=axes, keepdims=True) / count
        variance = ops.sum(ops.square(scaled - mean), axis=axes, keepdims=True)
        return mean, variance / count, scale

    return _cond(ordinary, one_pass, two_passes, d, mean, variance)


def _forward(x, gamma, beta, epsilon, axes):
    count = _count(x, axes)
    # The shift: the mean of the first few entries along the first reduced
    # axis (a few examples, a small part of the batch). Within the spread of
    # the data, so that d is exact however large the mean, and near the
    # batch mean, so that the one-pass variance does not cancel.
    leading = tuple(
        slice(0, _SHIFT_ROWS) if i == axes[0] else slice(None)
        for i in range(len(x.shape))
    )
    shift = ops.stop_gradient(ops.mean(x[leading], axis=axes, keepdims=True))
    d = x - shift
    # mean and variance of d / scale (scale 1 but for overflowing batches);
    # the multiplier a = gamma / sqrt(var + eps) in unscaled terms.
    mean, variance, scale = _moments(d, axes, count)
    # scale * scale, not square(scale): 2**128 is beyond float32.
    inverse = ops.rsqrt(variance + epsilon / scale / scale) / scale
    multiplier = inverse * gamma
    outputs = d * multiplier + (beta - mean * scale * multiplier)
    statistics = (mean * scale + shift, variance * scale * scale)
    return outputs, statistics, (d, mean * scale, inverse, gamma, scale)


def _tensorflow_normalize(x, gamma, beta, epsilon, axes):
    import tensorflow as tf

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        outputs, statistics, residuals = _forward(x, gamma, beta, epsilon, axes)

        def gradient(upstream, *_):  # the statistics have no gradient
            return _backward(axes, residuals, upstream)

        return (outputs, *statistics), gradient

    return normalize(x, gamma, beta)


@functools.cache
def _jax_normalizer():
    """JAX's custom-gradient function, made on first use (JAX imported then)."""
    import jax

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def normalize(x, gamma, beta, epsilon, axes):
        outputs, (mean, variance), _ = _forward(x, gamma, beta, epsilon, axes)
        return outputs, mean, variance

    normalize.defvjp(_normalize_forward, _normalize_backward)
    return normalize


def _normalize_forward(x, gamma, beta, epsilon, axes):
    outputs, (mean, variance), residuals = _forward(x, gamma, beta, epsilon, axes)
    return (outputs, mean, variance), residuals


def _normalize_backward(epsilon, axes, residuals, cotangents):
    return _backward(axes, residuals, cotangents[0])  # statistics: no gradient


def _backward(axes, residuals, dy):
    d, mean, inverse, gamma, scale = residuals
    count = _count(d, axes)
    dbeta = ops.sum(dy, axis=axes, keepdims=True)
    dgamma = inverse * (ops.sum(dy * d, axis=axes, keepdims=True) - mean * dbeta)
    multiplier = gamma * inverse

    # dx = a/n (n dy - dbeta - xhat dgamma), xhat = (d - mean) * inverse.
    def ordinary(dy, d):
        # As a * dy + c1 * d + c0: per-feature constants, two passes fewer.
        c1 = -multiplier * inverse * dgamma / count
        c0 = -multiplier * dbeta / count - c1 * mean
        return multiplier * dy + c1 * d + c0

    def scaled(dy, d):
        # Deviations beyond 2**40 (their squares overflowed): c1 would be a
        # float32 subnormal; xhat is of order 1.
        normalized = (d / scale - mean / scale) * (inverse * scale)
        return multiplier * (dy - dbeta / count - normalized * (dgamma / count))

    dx = _cond(ops.all(scale == 1.0), ordinary, scaled, dy, d)
    return dx, _unbroadcast(dgamma, gamma), _unbroadcast(dbeta, gamma)


def _unbroadcast(gradient, like):
    """`gradient` summed to `like`'s shape (gamma and beta broadcast against x)."""
    if tuple(gradient.shape) == tuple(like.shape):
        return gradient
    extra = len(gradient.shape) - len(like.shape)
    gradient = ops.sum(gradient, axis=tuple(range(extra))) if extra else gradient
    axes = tuple(
        i
        for i, (g, s) in enumerate(zip(gradient.shape, like.shape, strict=True))
        if s == 1 and g != 1
    )
    return ops.sum(gradient, axis=axes, keepdims=True) if axes else gradient
