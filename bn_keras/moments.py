"""The maths of batch normalization: batch moments and the folded transform.

Written in `keras.ops`, for every backend; the few backend kernels that
compute the same values faster are in `bn_keras.kernels`, and TensorFlow's
fused batch-norm kernel is in `bn_keras.fused`.
"""

from typing import NamedTuple

from keras import ops

from bn_keras import kernels
from bn_keras.distributed import all_reduce_sum, num_replicas


class Moments(NamedTuple):
    """Batch moments per feature, kept as size-1 dims over the reduced axes.

    `mean` is the mean of `x - shift`, so that the batch mean is
    `mean + shift`; `variance` is biased (inf where it exceeds the dtype's
    range). `centered` is `(x - shift) / scale`, and `scaled_variance` its
    variance: `scale` is 1 unless the deviations are so large (above 2**40)
    that their squares could overflow, where it is a power of two at least
    the largest deviation. `count` is the number of values per feature: a
    Python int when the shape is static, a scalar tensor when it is known
    only at run time, and a per-feature tensor under a mask or across
    replicas.
    """

    centered: object
    mean: object
    variance: object
    count: object
    shift: object
    scale: object = 1.0
    scaled_variance: object = None


def moments(x, axes, mask=None, synchronized=False):
    """Mean and biased variance of `x` over `axes`, in two passes.

    Two passes (the mean, then the mean squared deviation from it), as
    `tf.nn.moments`, so the variance is never negative. `mask` (boolean, of
    `x`'s shape) selects the values that count; masked entries may hold
    anything, NaN included. With `synchronized`, the sums run over every
    replica of a distributed step (see `bn_keras.distributed`).
    """
    if synchronized and num_replicas() > 1:
        return _global_moments(x, axes, mask)
    if mask is not None:
        return _masked_moments(x, axes, mask)
    # Moments of x - shift, the shift being one of the values: the sums then
    # see deviations of the size of the spread, not of the mean, and stay
    # accurate for a large mean (1e4 with std 1 in float32).
    first = tuple(
        slice(0, 1) if i in axes else slice(None) for i in range(len(x.shape))
    )
    shift = ops.stop_gradient(x[first])
    centered = x - shift
    count = static_count(x, axes)
    # Sums over the count, not ops.mean: Keras' torch backend computes the
    # mean of float64 tensors in float32.
    divisor = count if isinstance(count, int) else ops.cast(count, x.dtype)
    mean = ops.sum(centered, axis=axes, keepdims=True) / divisor
    if not kernels.cheap_cond():
        centered, scaled_variance, scale = _rescaled(centered, mean, axes, divisor)
    else:
        # Only a batch whose squares overflow (its variance is not finite)
        # pays for the scaled second pass; the others keep their one pass.
        variance = _variance(centered, mean, axes, divisor)
        centered, scaled_variance, scale = ops.cond(
            ops.all(ops.isfinite(variance)),
            lambda: (centered, variance, ops.ones_like(variance)),
            lambda: _rescaled(centered, mean, axes, divisor),
        )
    return Moments(
        centered,
        mean,
        scaled_variance * scale * scale,
        count,
        shift,
        scale,
        scaled_variance,
    )


def _variance(centered, mean, axes, divisor):
    squares = kernels.squared_difference(centered, ops.stop_gradient(mean))
    return ops.sum(squares, axis=axes, keepdims=True) / divisor


def _rescaled(centered, mean, axes, divisor):
    """`(centered / scale, its variance, scale)` with `_deviation_scale`."""
    scale = _deviation_scale(centered, axes)
    return (
        centered / scale,
        _variance(centered / scale, mean / scale, axes, divisor),
        scale,
    )


def _deviation_scale(deviations, axes):
    """1, or a power of two at least `max|deviations|` where that exceeds 2**40.

    Float32 squares overflow from deviations of 1.8e19, and their sum over a
    batch earlier: without the scale a batch of magnitude 1e20 has an
    infinite variance and every training output is 0. Dividing by a power of
    two is exact, so ordinary batches (scale 1) get the same values.
    """
    largest = ops.stop_gradient(ops.max(ops.abs(deviations), axis=axes, keepdims=True))
    large = largest > 2.0**40
    # The log of 1 where the scale is not used: no inf or NaN in any branch.
    exponent = ops.ceil(ops.log2(ops.where(large, largest, 1.0)))
    return ops.where(large, ops.power(2.0, exponent), 1.0)


def _masked_moments(x, axes, mask):
    # `where`, not a product with the mask: padding may be NaN or inf.
    count = ops.sum(ops.cast(mask, x.dtype), axis=axes, keepdims=True)
    # Shifted by one of the unmasked values, as the unmasked moments (exact
    # for a constant feature), then scaled as they are.
    largest = ops.max(ops.where(mask, x, float("-inf")), axis=axes, keepdims=True)
    shift = ops.stop_gradient(ops.where(count > 0, largest, 0.0))
    deviations = x - shift
    scale = _deviation_scale(ops.where(mask, deviations, 0.0), axes)
    centered = deviations / scale
    total = ops.sum(ops.where(mask, centered, 0.0), axis=axes, keepdims=True)
    mean = ops.divide_no_nan(total, count)
    squares = ops.where(mask, ops.square(centered - ops.stop_gradient(mean)), 0.0)
    variance = ops.divide_no_nan(ops.sum(squares, axis=axes, keepdims=True), count)
    return Moments(
        centered, mean * scale, variance * scale * scale, count, shift, scale, variance
    )


def _global_moments(x, axes, mask):
    """Moments over the global batch of a distributed step."""
    if mask is None:
        mask = ops.ones_like(x, dtype="bool")
    local_total = ops.sum(ops.where(mask, x, 0.0), axis=axes, keepdims=True)
    local_count = ops.sum(ops.cast(mask, x.dtype), axis=axes, keepdims=True)
    total, count = all_reduce_sum([local_total, local_count])
    mean = ops.divide_no_nan(total, count)
    squares = ops.where(mask, ops.square(x - ops.stop_gradient(mean)), 0.0)
    (sum_of_squares,) = all_reduce_sum([ops.sum(squares, axis=axes, keepdims=True)])
    return Moments(x, mean, ops.divide_no_nan(sum_of_squares, count), count, 0.0)


def static_count(x, axes):
    """Values per feature from the shape: an int, or a scalar tensor if dynamic."""
    sizes = [x.shape[a] for a in axes]
    if None in sizes:
        dynamic = ops.shape(x)
        sizes = [dynamic[a] for a in axes]
    count = 1
    for size in sizes:
        count = count * size
    return count


def fold_centered(batch_moments, gamma, beta, epsilon):
    """`fold` for `batch_moments.centered`, which may be scaled (see `Moments`).

    Returns `(a, b)` with `centered * a + b` the normalized batch: with
    `centered = (x - shift) / scale`, the variance and epsilon are divided by
    `scale**2`, so that a batch whose variance overflows is still normalized.
    """
    if batch_moments.scaled_variance is None:
        return fold(batch_moments.mean, batch_moments.variance, gamma, beta, epsilon)
    inverse = 1.0 / batch_moments.scale
    return fold(
        batch_moments.mean * inverse,
        batch_moments.scaled_variance,
        gamma,
        beta,
        epsilon * inverse * inverse,
    )


def fold(mean, variance, gamma, beta, epsilon):
    """`gamma * (x - mean) / sqrt(variance + epsilon) + beta` as `x * a + b`.

    Returns `(a, b)`. Exact when `x` is centred near 0 (training mode applies
    it to `x - shift`); for raw inputs of a large mean, `normalize` avoids the
    cancellation of `x * a` against `b`.
    """
    multiplier = ops.rsqrt(variance + epsilon)
    if gamma is not None:
        multiplier = multiplier * gamma
    offset = -mean * multiplier if beta is None else beta - mean * multiplier
    return multiplier, offset


def normalize(x, axes, mean, variance, gamma, beta, epsilon):
    """`gamma * (x - mean) / sqrt(variance + epsilon) + beta` with statistics.

    The mean is subtracted first, exact for inputs near it (Sterbenz): Keras'
    fold `x * a + (beta - mean * a)` cancels two terms of the size of
    `mean * a`, and for float32 inputs of mean 1e6 and std 1e-2 it is off by
    about 2.

    Args:
        x: The input.
        axes: The sorted, non-negative feature axes of `x`.
        mean: The mean, of the shape of the feature axes.
        variance: The variance, of the shape of the feature axes.
        gamma: The scale, of the shape of the feature axes, or None for 1.
        beta: The offset, of the shape of the feature axes, or None for 0.
        epsilon: Small positive float added to the variance.

    Returns:
        The normalized `x`.
    """
    rank = len(x.shape)
    broadcast_shape = [x.shape[i] if i in axes else 1 for i in range(rank)]

    def expand(value):
        return None if value is None else ops.reshape(value, broadcast_shape)

    return normalize_broadcast(
        x, expand(mean), expand(variance), expand(gamma), expand(beta), epsilon
    )


def normalize_broadcast(x, mean, variance, gamma, beta, epsilon):
    """`normalize` for statistics and `gamma`/`beta` that broadcast against `x`.

    For statistics that vary along more axes than the parameters (one per
    timestep, with `gamma` and `beta` shared across time).

    Args:
        x: The input.
        mean: The mean, broadcastable against `x`.
        variance: The variance, broadcastable against `x`.
        gamma: The scale, broadcastable against `x`, or None for 1.
        beta: The offset, broadcastable against `x`, or None for 0.
        epsilon: Small positive float added to the variance.

    Returns:
        The normalized `x`.
    """
    inverse_std = ops.rsqrt(variance + epsilon)
    multiplier = inverse_std if gamma is None else inverse_std * gamma
    return kernels.subtract_multiply_add(x, mean, multiplier, beta, inverse_std)


def bessel_factor(count):
    """`n / (n - 1)`, the unbiased-variance correction; 1 where n <= 1."""
    if isinstance(count, int):
        return count / (count - 1) if count > 1 else 1.0
    count = ops.cast(count, "float32")
    return ops.where(count > 1.0, count / ops.maximum(count - 1.0, 1.0), 1.0)
