"""Population statistics: how a training batch enters the moving statistics.

Every update has the form `moving = keep * moving + rate * batch_statistic`:

- exponential moving average (Keras' rule): `rate = 1 - momentum`;
- zero-debiased EMA (`debias=True`): `rate = (1 - m) / (1 - m^t)` after `t`
  batches, so that the estimate is a weighted average of the batches seen;
- cumulative average (`momentum=None`): `rate = 1 / t`.

Guards, feature by feature: a batch statistic that is not finite, or that
comes from at most one value (a masked feature, a ragged batch of one in a
graph whose batch size is unknown), leaves the moving statistics as they
were. With `keep == 0` (momentum 0, as precise BN uses) the statistic
replaces the old value outright, so a NaN state is repaired.
"""

import math

from bn_keras import kernels, virtual_batch
from bn_keras.moments import bessel_factor


def batch_contribution(moments, param_shape, unbiased_variance, ghosts):
    """The batch's mean, variance and usability, in the statistics' shape.

    Args:
        moments: the layer's `Moments` (sub-batches on axis 0 with `ghosts`).
        param_shape: the shape of `moving_mean`.
        unbiased_variance: scale each (sub-)batch variance by `n / (n - 1)`.
        ghosts: whether axis 0 holds ghost batches, to be averaged.

    Returns:
        `(mean, variance, ok)`: `ok` is False for features whose statistics
            must stay as they are.
    """
    ops = kernels.update_ops()
    mean = moments.mean + moments.shift
    variance = moments.variance
    finite = ops.logical_and(ops.isfinite(mean), ops.isfinite(variance))
    if isinstance(moments.count, int):
        ok = finite  # more than one value: the layer checked it
    else:
        ok = ops.logical_and(finite, moments.count > 1)
    if unbiased_variance:
        variance = variance * ops.cast(bessel_factor(moments.count), variance.dtype)
    if ghosts:
        # Sub-batches without values (masked) do not enter the average; one
        # that is not finite spoils the whole batch's feature.
        mean, used = virtual_batch.average(mean, ok)
        variance, _ = virtual_batch.average(variance, ok)
        ok = ops.logical_and(used, ops.all(finite, axis=0))
    return (
        ops.reshape(mean, param_shape),
        ops.reshape(variance, param_shape),
        ops.reshape(ok, param_shape),
    )


def average_rate(momentum, debias, num_batches=None):
    """`(rate, keep)` for the next update; `num_batches` counts earlier ones.

    Python floats for the plain EMA (Keras' exact expression, bit for bit),
    tensors when they depend on the batch count.
    """
    if momentum is not None and not debias:
        return 1.0 - momentum, momentum
    if momentum == 0.0:
        return 1.0, 0.0
    ops = kernels.update_ops()
    t = ops.cast(num_batches, "float32") + 1.0
    if momentum is None:
        rate = 1.0 / t
    else:
        # 1 - m^t as -expm1(t log m): accurate in float32 when m is near 1,
        # so the first update gives exactly the first batch's statistics.
        debiasing = -ops.expm1(t * math.log(momentum))
        rate = ops.minimum((1.0 - momentum) / debiasing, 1.0)
    return rate, 1.0 - rate


def any_updated(ok, counter_shape):
    """Whether the batch updates anything, per entry of a counter of `counter_shape`.

    `()`: any feature at all. `(n, 1, ..., 1)`: per slice along the first axis
    of the statistics (one counter per timestep), with the size-1 axes kept so
    that the averaging rate broadcasts against the statistics.
    """
    ops = kernels.update_ops()
    if not counter_shape:
        return ops.any(ok)
    axes = tuple(i for i, size in enumerate(counter_shape) if size == 1)
    return ops.any(ok, axis=axes, keepdims=True) if axes else ok


def assign_average(variable, value, rate, keep, ok):
    """Assigns `keep * variable + rate * value` where `ok`; returns the result."""
    ops = kernels.update_ops()
    old = ops.cast(variable, value.dtype)
    if isinstance(keep, float) and keep == 0.0:
        # A replacement, not a blend: 0 * NaN would keep a NaN state.
        new = value
    else:
        if not isinstance(rate, float):
            rate, keep = ops.cast(rate, value.dtype), ops.cast(keep, value.dtype)
        new = old * keep + value * rate
    new = ops.where(ok, new, old)
    variable.assign(new)
    return new
