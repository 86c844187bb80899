"""Training-mode batch normalization on JAX: one function with its own gradient.

JAX has no batch-norm kernel; XLA compiles what the layer writes. Written
with `keras.ops` and differentiated by JAX, the layer's training step made
XLA materialize more full-size tensors than Keras' (the shift, the scale
that guards against overflow, the autodiff of both): 1.3x to 2x Keras' step
on a CPU. Here the forward pass and its gradient are written out once
(`jax.custom_vjp`), as the kernels of TensorFlow and torch are:

- forward: `d = x - shift` with `shift` one of the batch's values per
  feature (exact for large means, as `bn_keras.moments`), then `sum(d)` and
  `sum(d**2)`, and the output `d * a + (beta - mean(d) * a)`;
- backward: the closed form, `dbeta = sum(dy)`, `dgamma = sum(dy * xhat)`,
  `dx = a * dy + c1 * d + c0`, from `d` and per-feature constants.

The variance `mean(d**2) - mean(d)**2` cancels only where the shift is many
spreads from the mean (an outlier as the first value of a feature): such a
batch (and one whose squares overflow float32, as a batch of magnitude 1e20)
takes a second pass, `mean((d - mean(d))**2)` on `d` divided by a power of
two where needed, inside a `lax.cond` that ordinary batches skip.

`BatchNorm` uses it on JAX in training where no mask, ghost batches or
synchronized moments change the statistics (`applies`).
"""

from __future__ import annotations

import functools

# Squared mean of the deviations beyond this many times their variance: the
# one-pass variance lost digits, take the second pass.
_CANCELLATION = 64.0


def applies(mask, ghosts: bool, synchronized: bool) -> bool:
    """Whether a JAX training call can use `train`.

    Args:
        mask: The broadcast mask, or None.
        ghosts: Whether the layer splits the batch into ghost batches.
        synchronized: Whether the layer asks for global moments.

    Returns:
        True without a mask, ghost batches or synchronized moments.
    """
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
    import jax

    normalize = _normalizer()
    outputs, mean, variance = normalize(x, gamma, beta, float(epsilon), tuple(axes))
    return outputs, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(variance)


def _count(x, axes):
    count = 1
    for axis in axes:
        count *= x.shape[axis]
    return count


def _cond(predicate, true_fn, false_fn, *operands):
    """`lax.cond` under tracing; a Python branch on concrete (eager) values."""
    import jax

    if isinstance(predicate, jax.core.Tracer):
        return jax.lax.cond(predicate, true_fn, false_fn, *operands)
    return true_fn(*operands) if bool(predicate) else false_fn(*operands)


def _moments(d, axes, count):
    """`(mean(d), var(d), scale)`: `d / scale` gave them where squares overflow."""
    import jax.numpy as jnp

    mean = jnp.sum(d, axis=axes, keepdims=True) / count
    squares = jnp.sum(jnp.square(d), axis=axes, keepdims=True) / count
    variance = squares - jnp.square(mean)
    ordinary = jnp.all(
        jnp.isfinite(squares) & (jnp.square(mean) <= _CANCELLATION * variance)
    ) | ~jnp.all(jnp.isfinite(mean))

    def one_pass(d, mean, variance):
        return mean, jnp.maximum(variance, 0.0), jnp.ones_like(mean)

    def two_passes(d, mean, variance):
        largest = jnp.max(jnp.abs(d), axis=axes, keepdims=True)
        large = largest > 2.0**40
        exponent = jnp.ceil(jnp.log2(jnp.where(large, largest, 1.0)))
        scale = jnp.where(large, jnp.power(2.0, exponent), 1.0).astype(d.dtype)
        scaled = d / scale
        mean = jnp.sum(scaled, axis=axes, keepdims=True) / count
        variance = jnp.sum(jnp.square(scaled - mean), axis=axes, keepdims=True)
        return mean, variance / count, scale

    return _cond(ordinary, one_pass, two_passes, d, mean, variance)


def _forward(x, gamma, beta, epsilon, axes):
    import jax
    import jax.numpy as jnp

    count = _count(x, axes)
    first = tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))
    shift = jax.lax.stop_gradient(x[first])
    d = x - shift
    # mean and variance of d / scale (scale 1 but for overflowing batches);
    # the multiplier a = gamma / sqrt(var + eps) in unscaled terms.
    mean, variance, scale = _moments(d, axes, count)
    inverse = jax.lax.rsqrt(variance + epsilon / jnp.square(scale)) / scale
    multiplier = inverse * gamma
    outputs = d * multiplier + (beta - mean * scale * multiplier)
    statistics = (mean * scale + shift, variance * jnp.square(scale))
    return outputs, statistics, (d, mean * scale, inverse, gamma)


@functools.cache
def _normalizer():
    """The custom-gradient function, made on first use (JAX imported then)."""
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
    import jax.numpy as jnp

    d, mean, inverse, gamma = residuals
    dy = cotangents[0]  # the statistics have no gradient
    count = _count(d, axes)
    dbeta = jnp.sum(dy, axis=axes, keepdims=True)
    dgamma = inverse * (jnp.sum(dy * d, axis=axes, keepdims=True) - mean * dbeta)
    multiplier = gamma * inverse
    # dx = a/n (n dy - dbeta - xhat dgamma), xhat = (d - mean) * inverse.
    c1 = -multiplier * inverse * dgamma / count
    c0 = -multiplier * dbeta / count - c1 * mean
    dx = multiplier * dy + c1 * d + c0
    return dx, _unbroadcast(dgamma, gamma), _unbroadcast(dbeta, gamma)


def _unbroadcast(gradient, like):
    """`gradient` summed to `like`'s shape (gamma and beta broadcast against x)."""
    import jax.numpy as jnp

    if gradient.shape == like.shape:
        return gradient
    extra = gradient.ndim - like.ndim
    gradient = jnp.sum(gradient, axis=tuple(range(extra))) if extra else gradient
    axes = tuple(
        i
        for i, (g, s) in enumerate(zip(gradient.shape, like.shape, strict=True))
        if s == 1 and g != 1
    )
    return jnp.sum(gradient, axis=axes, keepdims=True) if axes else gradient
