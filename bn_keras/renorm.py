"""Batch renormalization (Ioffe, 2017), with Keras' semantics.

Reference: https://arxiv.org/abs/1702.03275.

In training, `y = gamma * (x_hat * r + d) + beta` with
`r = clip(sigma_B / sigma, rmin, rmax)` and `d = clip((mu_B - mu) / sigma,
-dmax, dmax)` held constant, where `mu` and `sigma` are the `renorm_mean` and
`renorm_stddev` weights (moving averages with `renorm_momentum`). As in
Keras, the population statistics track the standard deviation
(`moving_stddev`), and `moving_variance = moving_stddev**2 - epsilon`.
"""

from collections.abc import Callable
from typing import Any

from keras import ops

from bn_keras.statistics import assign_average
from bn_keras.validation import clone_initializer


class Renorm:
    """The renorm weights of one `BatchNorm` layer, and their maths.

    Creates `moving_stddev`, `renorm_mean` and `renorm_stddev` (in that
    order, after the layer's `moving_mean` and `moving_variance`) and is the
    only one to update them. The layer exposes them under the same names.

    Args:
        add_statistic: The layer's `f(name, initializer) -> variable`, which
            adds a population statistic (non-trainable, float32).
        moving_mean_initializer: The layer's initializer of `moving_mean`,
            cloned for `renorm_mean`.
        moving_variance_initializer: The layer's initializer of
            `moving_variance`, whose square root initializes `moving_stddev`
            and `renorm_stddev`.
        epsilon: The layer's `epsilon`.
        momentum: The momentum of `renorm_mean` and `renorm_stddev`
            (`renorm_momentum`).
        clipping: The validated `renorm_clipping` dict, or None.
    """

    def __init__(
        self,
        add_statistic: Callable[[str, Any], Any],
        moving_mean_initializer: Any,
        moving_variance_initializer: Any,
        epsilon: float,
        momentum: float,
        clipping: dict[str, float | None] | None,
    ) -> None:
        self.epsilon = epsilon
        self.momentum = momentum
        self.clipping = clipping or {}

        # Keras tracks the population standard deviation under renorm
        # (the paper's formulation); moving_variance is derived from it.
        def stddev_initializer(shape, dtype=None):
            initializer = clone_initializer(moving_variance_initializer)
            return ops.sqrt(initializer(shape, dtype=dtype))

        self.moving_stddev = add_statistic("moving_stddev", stddev_initializer)
        self.renorm_mean = add_statistic(
            "renorm_mean", clone_initializer(moving_mean_initializer)
        )
        self.renorm_stddev = add_statistic("renorm_stddev", stddev_initializer)

    def correction(self, mean, variance, broadcast_shape):
        """The corrections `(r, d)` for a batch, without gradients.

        Args:
            mean: The batch mean.
            variance: The biased batch variance.
            broadcast_shape: The shape that `renorm_mean` and `renorm_stddev`
                take to broadcast against `mean`.

        Returns:
            `(r, d)`, clipped as `renorm_clipping` asks.
        """
        epsilon = self.epsilon
        stddev = ops.sqrt(variance + epsilon)
        renorm_mean = ops.reshape(
            ops.cast(self.renorm_mean, mean.dtype), broadcast_shape
        )
        # The floor avoids dividing by zero early in training (as Keras).
        renorm_stddev = ops.maximum(
            ops.reshape(ops.cast(self.renorm_stddev, mean.dtype), broadcast_shape),
            ops.sqrt(ops.cast(epsilon, mean.dtype)),
        )
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        clipping = self.clipping
        if clipping.get("rmin") is not None:
            r = ops.maximum(r, clipping["rmin"])
        if clipping.get("rmax") is not None:
            r = ops.minimum(r, clipping["rmax"])
        if clipping.get("dmax") is not None:
            d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
        return ops.stop_gradient(r), ops.stop_gradient(d)

    def update(self, mean, variance, rate, keep, ok):
        """Updates the renorm weights where `ok`; returns the new `moving_variance`.

        `renorm_mean` and `renorm_stddev` move with the renorm momentum,
        `moving_stddev` with the layer's averaging rule (`rate`, `keep`).

        Args:
            mean: The batch mean, in the statistics' shape.
            variance: The biased batch variance, in the statistics' shape.
            rate: The weight of the batch in the population average.
            keep: The weight of the old population statistic.
            ok: Boolean, False where the statistics must stay as they are.

        Returns:
            `moving_stddev**2 - epsilon` (floored at 0) from the updated
                `moving_stddev`: the value of `moving_variance` where `ok`.
        """
        stddev = ops.sqrt(variance + self.epsilon)
        momentum = self.momentum
        assign_average(self.renorm_mean, mean, 1.0 - momentum, momentum, ok)
        assign_average(self.renorm_stddev, stddev, 1.0 - momentum, momentum, ok)
        new_stddev = assign_average(self.moving_stddev, stddev, rate, keep, ok)
        # ReLU guards against rounding making the variance negative.
        return ops.relu(new_stddev * new_stddev - self.epsilon)


def compose(r, d, gamma, beta):
    """`(x_hat * r + d) * gamma + beta` as `x_hat * gamma' + beta'`.

    Args:
        r: The scale correction.
        d: The shift correction.
        gamma: The layer's scale, or None for 1.
        beta: The layer's offset, or None for 0.

    Returns:
        `(gamma', beta')`.
    """
    d = d if gamma is None else d * gamma
    beta = d if beta is None else d + beta
    gamma = r if gamma is None else r * gamma
    return gamma, beta
