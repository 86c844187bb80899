"""Ghost batches (`virtual_batch_size`) against the NumPy reference.

Each run of consecutive examples is normalized on its own and the population
statistics take their average: `bn_keras.virtual_batch`.
"""

import numpy as np
import pytest

from bn_keras import BatchNorm
from tests import reference
from tests.bn_keras.helpers import F32, as64, assert_statistics, random_inputs


@pytest.mark.parametrize(
    "shape, axis, virtual_batch_size",
    [
        ((12, 5), -1, 4),
        ((12, 5), -1, 3),
        ((8, 3, 4), 1, 2),
        ((8, 3, 4, 2), (1, 3), 4),
        ((6, 2, 3), -1, 6),
    ],
)
@pytest.mark.parametrize("unbiased_variance", [False, True])
def test_ghost_batches(
    shape, axis, virtual_batch_size, unbiased_variance, rng, set_random_weights
):
    momentum = 0.8
    layer = BatchNorm(
        axis=axis,
        momentum=momentum,
        virtual_batch_size=virtual_batch_size,
        unbiased_variance=unbiased_variance,
    )
    w = set_random_weights(layer, shape)
    population = reference.PopulationStatistics(
        w["moving_mean"], w["moving_variance"], momentum
    )
    # Each ghost batch has its own offset, so mixing them up would show.
    offsets = np.repeat(np.arange(shape[0] // virtual_batch_size), virtual_batch_size)
    for _ in range(3):
        x = random_inputs(rng, shape) + 4.0 * offsets.reshape(
            (-1,) + (1,) * (len(shape) - 1)
        )
        x = x.astype("float32")
        y = layer(x, training=True)
        expected, mean, variance = reference.ghost_batch_transform(
            x,
            virtual_batch_size,
            w["gamma"],
            w["beta"],
            1e-3,
            axis,
            unbiased_variance=unbiased_variance,
        )
        np.testing.assert_allclose(as64(y), expected, **F32)
        population.update(mean, variance)
        assert_statistics(layer, population)
    # Inference ignores ghost batches: any batch size works.
    x = random_inputs(rng, (5,) + shape[1:])
    expected = reference.normalize(
        x, population.mean, population.variance, w["gamma"], w["beta"], 1e-3, axis
    )
    np.testing.assert_allclose(as64(layer(x, training=False)), expected, **F32)


@pytest.mark.parametrize("unbiased_variance", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("empty_ghost", [False, True], ids=["", "empty_ghost"])
def test_ghost_batches_with_mask(
    unbiased_variance, empty_ghost, rng, set_random_weights
):
    shape, axis, momentum = (8, 5, 2), -1, 0.5
    layer = BatchNorm(
        momentum=momentum, virtual_batch_size=4, unbiased_variance=unbiased_variance
    )
    w = set_random_weights(layer, shape)
    # Three unmasked steps out of five per example: every ghost batch has 12
    # values per feature, unless the first ghost batch is masked out entirely.
    mask = np.zeros(shape[:2], bool)
    for row in mask:
        row[rng.choice(5, size=3, replace=False)] = True
    if empty_ghost:
        mask[:4] = False
    x = random_inputs(rng, shape)
    y = layer(x, training=True, mask=mask)
    expected, mean, variance = reference.ghost_batch_transform(
        x, 4, w["gamma"], w["beta"], 1e-3, axis, mask, unbiased_variance
    )
    valid = reference.expand_mask(mask, shape, axis)
    np.testing.assert_allclose(as64(y)[valid], expected[valid], **F32)
    np.testing.assert_allclose(
        as64(layer.moving_mean), reference.ema(w["moving_mean"], mean, momentum), **F32
    )
    np.testing.assert_allclose(
        as64(layer.moving_variance),
        reference.ema(w["moving_variance"], variance, momentum),
        **F32,
    )


def test_ghost_batch_of_whole_batch_is_plain_batch_norm(rng):
    x = random_inputs(rng, (8, 3, 4))
    ghost = BatchNorm(axis=1, virtual_batch_size=8)
    plain = BatchNorm(axis=1)
    np.testing.assert_allclose(
        as64(ghost(x, training=True)), as64(plain(x, training=True)), **F32
    )
    np.testing.assert_allclose(as64(ghost.moving_mean), as64(plain.moving_mean), **F32)
    np.testing.assert_allclose(
        as64(ghost.moving_variance), as64(plain.moving_variance), **F32
    )
