"""Batch renormalization (`renorm=True`) against the NumPy reference.

Keras' semantics (Ioffe, 2017): the corrections `r` and `d`, their clipping,
and the renorm and population statistics: `bn_keras.renorm`.
"""

import keras
import numpy as np
import pytest

from bn_keras import BatchNorm
from tests import reference
from tests.bn_keras.helpers import F32, as64, random_inputs

CLIPPINGS = [
    None,
    {"rmax": 1.1, "rmin": 0.9, "dmax": 0.1},
    {"rmax": 3.0},
    {"rmin": 1.5},
    {"dmax": 0.0},
]


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("shape, axis", [((16, 4), -1), ((4, 3, 2, 5), (1, 3))])
def test_renorm(clipping, shape, axis, rng, set_random_weights):
    momentum, renorm_momentum, epsilon = 0.9, 0.7, 1e-3
    layer = BatchNorm(
        axis=axis,
        momentum=momentum,
        renorm=True,
        renorm_clipping=clipping,
        renorm_momentum=renorm_momentum,
    )
    state = set_random_weights(layer, shape)
    gamma, beta = state.pop("gamma"), state.pop("beta")
    for step in range(4):
        x = random_inputs(rng, shape, loc=step, scale=1.0 + step)
        y = layer(x, training=True)
        expected, state = reference.renorm_train_step(
            x, state, gamma, beta, epsilon, axis, momentum, renorm_momentum, clipping
        )
        np.testing.assert_allclose(as64(y), expected, **F32)
        for name, value in state.items():
            np.testing.assert_allclose(
                as64(getattr(layer, name)), value, err_msg=name, **F32
            )
    x = random_inputs(rng, shape)
    expected = reference.normalize(
        x, state["moving_mean"], state["moving_variance"], gamma, beta, epsilon, axis
    )
    np.testing.assert_allclose(as64(layer(x, training=False)), expected, **F32)


def test_renorm_with_mask(rng, set_random_weights):
    shape, axis = (6, 5, 3), -1
    layer = BatchNorm(renorm=True, momentum=0.8, renorm_clipping={"rmax": 1.5})
    state = set_random_weights(layer, shape)
    gamma, beta = state.pop("gamma"), state.pop("beta")
    for _ in range(3):
        x = random_inputs(rng, shape)
        mask = rng.random(shape[:2]) < 0.6
        y = layer(x, training=True, mask=mask)
        expected, state = reference.renorm_train_step(
            x, state, gamma, beta, 1e-3, axis, 0.8, 0.99, {"rmax": 1.5}, mask
        )
        valid = reference.expand_mask(mask, shape, axis)
        np.testing.assert_allclose(as64(y)[valid], expected[valid], **F32)
        for name, value in state.items():
            np.testing.assert_allclose(
                as64(getattr(layer, name)), value, err_msg=name, **F32
            )


@pytest.mark.parametrize("clipping", [None, {"rmax": 3.0, "dmax": 2.0}])
def test_renorm_from_zero_stddev(clipping, rng):
    # moving_variance_initializer="zeros": the sqrt(epsilon) floor keeps r and
    # d finite on the first step.
    shape = (16, 3)
    layer = BatchNorm(
        renorm=True, renorm_clipping=clipping, moving_variance_initializer="zeros"
    )
    state = {
        "moving_mean": np.zeros(3),
        "moving_stddev": np.zeros(3),
        "renorm_mean": np.zeros(3),
        "renorm_stddev": np.zeros(3),
    }
    for _ in range(2):
        x = random_inputs(rng, shape)
        y = as64(layer(x, training=True))
        expected, state = reference.renorm_train_step(
            x, state, np.ones(3), np.zeros(3), 1e-3, -1, 0.99, 0.99, clipping
        )
        assert np.isfinite(y).all()
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)
        for name, value in state.items():
            np.testing.assert_allclose(
                as64(getattr(layer, name)), value, err_msg=name, **F32
            )


def test_renorm_with_cumulative_average(rng):
    layer = BatchNorm(renorm=True, momentum=None)
    means, stddevs = [], []
    for step in range(4):
        x = random_inputs(rng, (16, 3), loc=step, scale=1.0 + step)
        layer(x, training=True)
        mean, variance, _ = reference.moments(x, -1)
        means.append(mean)
        stddevs.append(np.sqrt(variance + 1e-3))
    stddev = reference.cumulative_average(stddevs)
    np.testing.assert_allclose(
        as64(layer.moving_mean), reference.cumulative_average(means), **F32
    )
    np.testing.assert_allclose(as64(layer.moving_stddev), stddev, **F32)
    np.testing.assert_allclose(
        as64(layer.moving_variance), np.maximum(stddev**2 - 1e-3, 0.0), **F32
    )


def test_renorm_gradients_hold_r_and_d_constant(
    rng, set_random_weights, call_with_gradients
):
    shape, axis, epsilon = (16, 3), -1, 1e-3
    layer = BatchNorm(renorm=True, renorm_clipping={"rmax": 1.2, "dmax": 0.5})
    state = set_random_weights(layer, shape)
    x = random_inputs(rng, shape)
    dy = rng.normal(size=shape)
    y, dx, grads = call_with_gradients(layer, x, dy)
    clipping = {"rmax": 1.2, "dmax": 0.5}
    _, mean, variance, _ = reference.train_transform(x, None, None, epsilon, axis)
    sigma = np.maximum(state["renorm_stddev"], np.sqrt(epsilon))
    r = np.minimum(np.sqrt(variance + epsilon) / sigma, clipping["rmax"])
    d = np.clip((mean - state["renorm_mean"]) / sigma, -0.5, 0.5)
    x_hat = reference.normalize(x, mean, variance, None, None, epsilon, axis)
    # y = gamma * r * x_hat + (gamma * d + beta), with r and d constants.
    expected_dx, _, dbeta = reference.train_gradients(
        x, dy, state["gamma"] * r, epsilon, axis
    )
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        grads["gamma"], np.sum(dy * (x_hat * r + d), 0), atol=1e-4
    )
    np.testing.assert_allclose(grads["beta"], dbeta, atol=1e-4)


def test_renorm_stddev_initializer():
    layer = BatchNorm(
        renorm=True, moving_variance_initializer=keras.initializers.Constant(4.0)
    )
    layer.build((None, 5))
    np.testing.assert_allclose(as64(layer.moving_stddev), 2.0)
    np.testing.assert_allclose(as64(layer.renorm_stddev), 2.0)
    np.testing.assert_allclose(as64(layer.moving_variance), 4.0)
