"""The population statistics against the NumPy reference.

`momentum` (Keras' EMA), `momentum=None` (the cumulative average), `debias`
(the zero-debiased EMA) and `unbiased_variance`: `bn_keras.statistics`.
"""

import numpy as np
import pytest
from keras import ops

from bn_keras import BatchNorm
from tests import reference
from tests.bn_keras.helpers import F32, as64, assert_statistics, random_inputs


@pytest.mark.parametrize(
    "shape, axis", [((16, 5), -1), ((6, 3, 4), 1), ((4, 3, 2, 5), (1, 3))]
)
@pytest.mark.parametrize(
    "momentum, debias",
    [(None, False), (0.9, True), (0.999, True), (0.5, False)],
)
@pytest.mark.parametrize("unbiased_variance", [False, True])
def test_population_statistics(
    shape, axis, momentum, debias, unbiased_variance, rng, set_random_weights
):
    layer = BatchNorm(
        axis=axis, momentum=momentum, debias=debias, unbiased_variance=unbiased_variance
    )
    w = set_random_weights(layer, shape)
    population = reference.PopulationStatistics(
        w["moving_mean"], w["moving_variance"], momentum, debias
    )
    for step in range(1, 6):
        x = random_inputs(rng, shape, loc=step)
        y = layer(x, training=True)
        # The transform itself always uses the biased batch variance.
        expected, mean, variance, count = reference.train_transform(
            x, w["gamma"], w["beta"], 1e-3, axis
        )
        np.testing.assert_allclose(as64(y), expected, **F32)
        if unbiased_variance:
            variance = reference.unbiased(variance, count)
        population.update(mean, variance)
        assert_statistics(layer, population)
        if momentum is None or debias:
            assert int(ops.convert_to_numpy(layer.num_batches)) == step
    x = random_inputs(rng, shape)
    expected = reference.normalize(
        x, population.mean, population.variance, w["gamma"], w["beta"], 1e-3, axis
    )
    np.testing.assert_allclose(as64(layer(x, training=False)), expected, **F32)


@pytest.mark.parametrize("momentum, debias", [(None, False), (0.999, True)])
def test_first_update_is_the_first_batch(momentum, debias, rng):
    # Neither estimate is dragged toward the initializers (zeros and ones).
    x = random_inputs(rng, (32, 4), loc=10.0)
    layer = BatchNorm(momentum=momentum, debias=debias)
    layer(x, training=True)
    np.testing.assert_allclose(as64(layer.moving_mean), x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(as64(layer.moving_variance), x.var(0), rtol=1e-5)


def test_debias_with_momentum_zero(rng):
    # m = 0: the debiased average is the last batch's statistic.
    layer = BatchNorm(momentum=0.0, debias=True)
    for step in range(2):
        x = random_inputs(rng, (16, 3), loc=step)
        layer(x, training=True)
        np.testing.assert_allclose(as64(layer.moving_mean), x.mean(0), rtol=1e-6)
        np.testing.assert_allclose(as64(layer.moving_variance), x.var(0), rtol=1e-5)


def test_cumulative_average_over_many_batches(rng):
    # 1 / t must not stall: after 300 batches every batch still weighs 1/300.
    layer = BatchNorm(momentum=None)
    means = rng.normal(0.0, 5.0, size=(300, 1, 2)).astype("float32")
    for mean in means:
        layer(mean + np.array([[-1.0, 1.0], [1.0, -1.0]], "float32"), training=True)
    np.testing.assert_allclose(as64(layer.moving_mean), means.mean((0, 1)), atol=1e-4)
    np.testing.assert_allclose(as64(layer.moving_variance), 1.0, rtol=1e-5)
