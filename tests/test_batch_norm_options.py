"""BatchNorm's options against the NumPy reference.

Population statistics (`momentum=None`, `debias`, `unbiased_variance`), ghost
batches (`virtual_batch_size`), batch renormalization and masking.
"""

import keras
import numpy as np
import pytest
import reference
from keras import ops

from bn_keras import BatchNorm

F32 = {"rtol": 1e-5, "atol": 1e-5}


def _data(rng, shape, loc=2.0, scale=3.0):
    return rng.normal(loc, scale, shape).astype("float32")


def _as64(value):
    return ops.convert_to_numpy(value).astype(np.float64)


def _assert_statistics(layer, population):
    np.testing.assert_allclose(_as64(layer.moving_mean), population.mean, **F32)
    np.testing.assert_allclose(_as64(layer.moving_variance), population.variance, **F32)


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
        x = _data(rng, shape, loc=step)
        y = layer(x, training=True)
        # The transform itself always uses the biased batch variance.
        expected, mean, variance, count = reference.train_transform(
            x, w["gamma"], w["beta"], 1e-3, axis
        )
        np.testing.assert_allclose(_as64(y), expected, **F32)
        if unbiased_variance:
            variance = reference.unbiased(variance, count)
        population.update(mean, variance)
        _assert_statistics(layer, population)
        if momentum is None or debias:
            assert int(ops.convert_to_numpy(layer.num_batches)) == step
    x = _data(rng, shape)
    expected = reference.normalize(
        x, population.mean, population.variance, w["gamma"], w["beta"], 1e-3, axis
    )
    np.testing.assert_allclose(_as64(layer(x, training=False)), expected, **F32)


@pytest.mark.parametrize("momentum, debias", [(None, False), (0.999, True)])
def test_first_update_is_the_first_batch(momentum, debias, rng):
    # Neither estimate is dragged toward the initializers (zeros and ones).
    x = _data(rng, (32, 4), loc=10.0)
    layer = BatchNorm(momentum=momentum, debias=debias)
    layer(x, training=True)
    np.testing.assert_allclose(_as64(layer.moving_mean), x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(_as64(layer.moving_variance), x.var(0), rtol=1e-5)


def test_debias_with_momentum_zero(rng):
    # m = 0: the debiased average is the last batch's statistic.
    layer = BatchNorm(momentum=0.0, debias=True)
    for step in range(2):
        x = _data(rng, (16, 3), loc=step)
        layer(x, training=True)
        np.testing.assert_allclose(_as64(layer.moving_mean), x.mean(0), rtol=1e-6)
        np.testing.assert_allclose(_as64(layer.moving_variance), x.var(0), rtol=1e-5)


def test_cumulative_average_over_many_batches(rng):
    # 1 / t must not stall: after 300 batches every batch still weighs 1/300.
    layer = BatchNorm(momentum=None)
    means = rng.normal(0.0, 5.0, size=(300, 1, 2)).astype("float32")
    for mean in means:
        layer(mean + np.array([[-1.0, 1.0], [1.0, -1.0]], "float32"), training=True)
    np.testing.assert_allclose(_as64(layer.moving_mean), means.mean((0, 1)), atol=1e-4)
    np.testing.assert_allclose(_as64(layer.moving_variance), 1.0, rtol=1e-5)


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
        x = _data(rng, shape) + 4.0 * offsets.reshape((-1,) + (1,) * (len(shape) - 1))
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
        np.testing.assert_allclose(_as64(y), expected, **F32)
        population.update(mean, variance)
        _assert_statistics(layer, population)
    # Inference ignores ghost batches: any batch size works.
    x = _data(rng, (5,) + shape[1:])
    expected = reference.normalize(
        x, population.mean, population.variance, w["gamma"], w["beta"], 1e-3, axis
    )
    np.testing.assert_allclose(_as64(layer(x, training=False)), expected, **F32)


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
    x = _data(rng, shape)
    y = layer(x, training=True, mask=mask)
    expected, mean, variance = reference.ghost_batch_transform(
        x, 4, w["gamma"], w["beta"], 1e-3, axis, mask, unbiased_variance
    )
    valid = reference.expand_mask(mask, shape, axis)
    np.testing.assert_allclose(_as64(y)[valid], expected[valid], **F32)
    np.testing.assert_allclose(
        _as64(layer.moving_mean), reference.ema(w["moving_mean"], mean, momentum), **F32
    )
    np.testing.assert_allclose(
        _as64(layer.moving_variance),
        reference.ema(w["moving_variance"], variance, momentum),
        **F32,
    )


def test_ghost_batch_of_whole_batch_is_plain_batch_norm(rng):
    x = _data(rng, (8, 3, 4))
    ghost = BatchNorm(axis=1, virtual_batch_size=8)
    plain = BatchNorm(axis=1)
    np.testing.assert_allclose(
        _as64(ghost(x, training=True)), _as64(plain(x, training=True)), **F32
    )
    np.testing.assert_allclose(
        _as64(ghost.moving_mean), _as64(plain.moving_mean), **F32
    )
    np.testing.assert_allclose(
        _as64(ghost.moving_variance), _as64(plain.moving_variance), **F32
    )


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
        x = _data(rng, shape, loc=step, scale=1.0 + step)
        y = layer(x, training=True)
        expected, state = reference.renorm_train_step(
            x, state, gamma, beta, epsilon, axis, momentum, renorm_momentum, clipping
        )
        np.testing.assert_allclose(_as64(y), expected, **F32)
        for name, value in state.items():
            np.testing.assert_allclose(
                _as64(getattr(layer, name)), value, err_msg=name, **F32
            )
    x = _data(rng, shape)
    expected = reference.normalize(
        x, state["moving_mean"], state["moving_variance"], gamma, beta, epsilon, axis
    )
    np.testing.assert_allclose(_as64(layer(x, training=False)), expected, **F32)


def test_renorm_with_mask(rng, set_random_weights):
    shape, axis = (6, 5, 3), -1
    layer = BatchNorm(renorm=True, momentum=0.8, renorm_clipping={"rmax": 1.5})
    state = set_random_weights(layer, shape)
    gamma, beta = state.pop("gamma"), state.pop("beta")
    for _ in range(3):
        x = _data(rng, shape)
        mask = rng.random(shape[:2]) < 0.6
        y = layer(x, training=True, mask=mask)
        expected, state = reference.renorm_train_step(
            x, state, gamma, beta, 1e-3, axis, 0.8, 0.99, {"rmax": 1.5}, mask
        )
        valid = reference.expand_mask(mask, shape, axis)
        np.testing.assert_allclose(_as64(y)[valid], expected[valid], **F32)
        for name, value in state.items():
            np.testing.assert_allclose(
                _as64(getattr(layer, name)), value, err_msg=name, **F32
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
        x = _data(rng, shape)
        y = _as64(layer(x, training=True))
        expected, state = reference.renorm_train_step(
            x, state, np.ones(3), np.zeros(3), 1e-3, -1, 0.99, 0.99, clipping
        )
        assert np.isfinite(y).all()
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)
        for name, value in state.items():
            np.testing.assert_allclose(
                _as64(getattr(layer, name)), value, err_msg=name, **F32
            )


def test_renorm_with_cumulative_average(rng):
    layer = BatchNorm(renorm=True, momentum=None)
    means, stddevs = [], []
    for step in range(4):
        x = _data(rng, (16, 3), loc=step, scale=1.0 + step)
        layer(x, training=True)
        mean, variance, _ = reference.moments(x, -1)
        means.append(mean)
        stddevs.append(np.sqrt(variance + 1e-3))
    stddev = reference.cumulative_average(stddevs)
    np.testing.assert_allclose(
        _as64(layer.moving_mean), reference.cumulative_average(means), **F32
    )
    np.testing.assert_allclose(_as64(layer.moving_stddev), stddev, **F32)
    np.testing.assert_allclose(
        _as64(layer.moving_variance), np.maximum(stddev**2 - 1e-3, 0.0), **F32
    )


def test_renorm_gradients_hold_r_and_d_constant(
    rng, set_random_weights, call_with_gradients
):
    shape, axis, epsilon = (16, 3), -1, 1e-3
    layer = BatchNorm(renorm=True, renorm_clipping={"rmax": 1.2, "dmax": 0.5})
    state = set_random_weights(layer, shape)
    x = _data(rng, shape)
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
    np.testing.assert_allclose(_as64(layer.moving_stddev), 2.0)
    np.testing.assert_allclose(_as64(layer.renorm_stddev), 2.0)
    np.testing.assert_allclose(_as64(layer.moving_variance), 4.0)


@pytest.mark.parametrize(
    "shape, axis, mask_shape",
    [
        ((6, 5, 3), -1, (6, 5)),
        ((6, 3, 5), 1, (6, 3)),
        ((4, 3, 5), 1, (4, 3)),
        ((4, 3, 5, 6), 1, (4, 3, 5)),
        ((4, 3, 2, 5), (1, 3), (4, 3, 2)),
        ((4, 5, 2, 3), -1, (4, 5, 2)),
    ],
)
@pytest.mark.parametrize("unbiased_variance", [False, True])
def test_mask(shape, axis, mask_shape, unbiased_variance, rng, set_random_weights):
    momentum = 0.5
    layer = BatchNorm(axis=axis, momentum=momentum, unbiased_variance=unbiased_variance)
    w = set_random_weights(layer, shape)
    x = _data(rng, shape)
    mask = rng.random(mask_shape) < 0.6
    # Masked-out entries are far away: including them would show.
    x = np.where(reference.expand_mask(mask, shape, axis), x, 1e3).astype("float32")
    y = layer(x, training=True, mask=mask)
    mean, variance, count = reference.moments(x, axis, mask)
    expected = reference.normalize(x, mean, variance, w["gamma"], w["beta"], 1e-3, axis)
    valid = reference.expand_mask(mask, shape, axis)
    np.testing.assert_allclose(_as64(y)[valid], expected[valid], **F32)
    if unbiased_variance:
        variance = reference.unbiased(variance, count)
    np.testing.assert_allclose(
        _as64(layer.moving_mean), reference.ema(w["moving_mean"], mean, momentum), **F32
    )
    np.testing.assert_allclose(
        _as64(layer.moving_variance),
        reference.ema(w["moving_variance"], variance, momentum),
        **F32,
    )


def test_float_mask_equals_bool_mask(rng):
    x = _data(rng, (4, 5, 3))
    mask = rng.random((4, 5)) < 0.5
    layers = {"bool": BatchNorm(), "float": BatchNorm(), "none": BatchNorm()}
    masks = {"bool": mask, "float": mask.astype("float32"), "none": None}
    outputs = {k: _as64(layers[k](x, training=True, mask=masks[k])) for k in layers}
    variances = {k: _as64(layer.moving_variance) for k, layer in layers.items()}
    np.testing.assert_array_equal(outputs["float"], outputs["bool"])
    np.testing.assert_array_equal(variances["float"], variances["bool"])
    assert not np.allclose(variances["float"], variances["none"])


def test_mask_is_ignored_in_inference(rng, set_random_weights):
    layer = BatchNorm()
    set_random_weights(layer, (4, 5, 3))
    x = _data(rng, (4, 5, 3))
    mask = rng.random((4, 5)) < 0.5
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer(x, training=False, mask=mask)),
        ops.convert_to_numpy(layer(x, training=False)),
    )


def test_masking_layer_upstream(rng):
    x = _data(rng, (6, 7, 3))
    x[:, 4:] = 0.0
    x[0, 2] = 0.0
    inputs = keras.Input((7, 3))
    layer = BatchNorm(momentum=0.0)
    model = keras.Model(inputs, layer(keras.layers.Masking(0.0)(inputs)))
    model(x, training=True)
    mask = np.any(x != 0.0, axis=-1)
    mean, variance, _ = reference.moments(x, -1, mask)
    np.testing.assert_allclose(_as64(layer.moving_mean), mean, **F32)
    np.testing.assert_allclose(_as64(layer.moving_variance), variance, **F32)


def test_embedding_mask_zero_upstream(rng):
    tokens = rng.integers(1, 10, size=(5, 8))
    tokens[:, 5:] = 0
    tokens[1, 2:] = 0
    inputs = keras.Input((8,), dtype="int32")
    embedding = keras.layers.Embedding(10, 4, mask_zero=True)
    layer = BatchNorm(momentum=0.0)
    model = keras.Model(inputs, layer(embedding(inputs)))
    model(tokens, training=True)
    embedded = ops.convert_to_numpy(embedding(tokens))
    mean, variance, _ = reference.moments(embedded, -1, tokens != 0)
    np.testing.assert_allclose(_as64(layer.moving_mean), mean, **F32)
    np.testing.assert_allclose(_as64(layer.moving_variance), variance, **F32)


FULL_MASK_OPTIONS = [
    {},
    {"momentum": None},
    {"debias": True},
    {"unbiased_variance": True},
    {"renorm": True},
    {"virtual_batch_size": 2},
    {"axis": (1, 2), "center": False, "scale": False},
]


@pytest.mark.parametrize("kwargs", FULL_MASK_OPTIONS, ids=str)
def test_fully_masked_batch(kwargs, rng, set_random_weights):
    shape = (4, 3, 2)
    layer = BatchNorm(**kwargs)
    w = set_random_weights(layer, shape)
    mask = np.zeros((4, 3), bool)
    y = _as64(layer(_data(rng, shape), training=True, mask=mask))
    assert np.isfinite(y).all()
    for variable in layer.non_trainable_weights:
        if variable.name in w:
            np.testing.assert_array_equal(
                _as64(variable), w[variable.name], err_msg=variable.name
            )


@pytest.mark.parametrize("momentum, debias", [(None, False), (0.9, True)])
def test_fully_masked_batch_does_not_count(momentum, debias, rng):
    # A batch without values leaves the statistics as if it never happened.
    batches = [_data(rng, (4, 3), loc=i) for i in range(3)]
    skipping = BatchNorm(momentum=momentum, debias=debias)
    plain = BatchNorm(momentum=momentum, debias=debias)
    skipping(batches[0], training=True)
    skipping(batches[1], training=True, mask=np.zeros(4, bool))
    skipping(batches[2], training=True)
    plain(batches[0], training=True)
    plain(batches[2], training=True)
    np.testing.assert_allclose(
        _as64(skipping.moving_mean), _as64(plain.moving_mean), **F32
    )
    np.testing.assert_allclose(
        _as64(skipping.moving_variance), _as64(plain.moving_variance), **F32
    )
