"""Batch renormalization (Ioffe, 2017), with Keras' semantics.

Reference: https://arxiv.org/abs/1702.03275.

In training, `y = gamma * (x_hat * r + d) + beta` with
`r = clip(sigma_B / sigma, rmin, rmax)` and `d = clip((mu_B - mu) / sigma,
-dmax, dmax)` held constant, where `mu` and `sigma` are the `renorm_mean` and
`renorm_stddev` weights (moving averages with `renorm_momentum`). As in
Keras, the population statistics track the standard deviation
(`moving_stddev`), and `moving_variance = moving_stddev**2 - epsilon`.
"""

from keras import ops

from bn_keras.statistics import assign_average


def correction(layer, mean, variance, broadcast_shape):
    """`(r, d)` for a batch of `mean` and `variance`, without gradients."""
    stddev = ops.sqrt(variance + layer.epsilon)
    renorm_mean = ops.reshape(ops.cast(layer.renorm_mean, mean.dtype), broadcast_shape)
    # The floor avoids dividing by zero early in training (as Keras).
    renorm_stddev = ops.maximum(
        ops.reshape(ops.cast(layer.renorm_stddev, mean.dtype), broadcast_shape),
        ops.sqrt(ops.cast(layer.epsilon, mean.dtype)),
    )
    r = stddev / renorm_stddev
    d = (mean - renorm_mean) / renorm_stddev
    clipping = layer.renorm_clipping or {}
    if clipping.get("rmin") is not None:
        r = ops.maximum(r, clipping["rmin"])
    if clipping.get("rmax") is not None:
        r = ops.minimum(r, clipping["rmax"])
    if clipping.get("dmax") is not None:
        d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
    return ops.stop_gradient(r), ops.stop_gradient(d)


def compose(r, d, gamma, beta):
    """`(x_hat * r + d) * gamma + beta` as `x_hat * gamma' + beta'`."""
    d = d if gamma is None else d * gamma
    beta = d if beta is None else d + beta
    gamma = r if gamma is None else r * gamma
    return gamma, beta


def update(layer, mean, variance, rate, keep, ok):
    """Updates the renorm and population statistics where `ok`."""
    stddev = ops.sqrt(variance + layer.epsilon)
    momentum = layer.renorm_momentum
    assign_average(layer.renorm_mean, mean, 1.0 - momentum, momentum, ok)
    assign_average(layer.renorm_stddev, stddev, 1.0 - momentum, momentum, ok)
    assign_average(layer.moving_mean, mean, rate, keep, ok)
    new_stddev = assign_average(layer.moving_stddev, stddev, rate, keep, ok)
    # ReLU guards against rounding making the variance negative.
    new_variance = ops.relu(new_stddev * new_stddev - layer.epsilon)
    old_variance = ops.cast(layer.moving_variance, mean.dtype)
    layer.moving_variance.assign(ops.where(ok, new_variance, old_variance))
