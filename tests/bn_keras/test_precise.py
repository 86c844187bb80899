"""Tests for bn_keras.recompute_statistics (precise BN)."""

import keras
import numpy as np
import pytest

import bn_keras
from bn_keras import BatchNorm, batch_norm_layers, recompute_statistics
from tests import reference

IMPLEMENTATIONS = {
    "bn_keras": lambda: BatchNorm(momentum=0.9),
    "bn_keras_cumulative": lambda: BatchNorm(momentum=None),
    "bn_keras_debiased": lambda: BatchNorm(momentum=0.99, debias=True),
    "bn_keras_renorm": lambda: BatchNorm(renorm=True),
    "keras": lambda: keras.layers.BatchNormalization(),
}


def _np(value):
    return keras.ops.convert_to_numpy(value)


def _model(make_bn, features=6):
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(5, name="dense_1"),
            make_bn(),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(4, name="dense_2"),
            make_bn(),
        ]
    )


def _dense(model, name, x):
    layer = model.get_layer(name)
    return x @ _np(layer.kernel) + _np(layer.bias)


def _train_mode_bn(h, batch_size, layer):
    """NumPy: `layer`'s training-mode output on `h`, batch by batch."""
    gamma, beta = _np(layer.gamma), _np(layer.beta)
    return np.concatenate(
        [
            reference.train_transform(
                h[i : i + batch_size], gamma, beta, layer.epsilon, -1
            )[0]
            for i in range(0, len(h), batch_size)
        ]
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_statistics_are_those_of_the_data(impl, rng):
    """Batches covering the data once give its exact mean and variance."""
    model = _model(IMPLEMENTATIONS[impl])
    first, second = batch_norm_layers(model)
    first.gamma.assign(rng.uniform(0.5, 2.0, 5).astype("float32"))
    first.beta.assign(rng.normal(size=5).astype("float32"))
    x = rng.normal(3.0, 2.0, size=(120, 6)).astype("float32")
    before = [_np(w).copy() for w in model.trainable_weights]

    result = recompute_statistics(model, x, batch_size=20, progress=False)

    h1 = _dense(model, "dense_1", x.astype("float64"))
    np.testing.assert_allclose(_np(first.moving_mean), h1.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(first.moving_variance), h1.var(0), rtol=1e-5)
    np.testing.assert_allclose(result[first.name][0], h1.mean(0), rtol=1e-5, atol=1e-5)
    for a, b in zip(before, model.trainable_weights, strict=True):
        np.testing.assert_array_equal(a, _np(b))
    # The layers' own settings are restored.
    assert first.momentum == IMPLEMENTATIONS[impl]().momentum
    # The second BN layer sees the first one's training-mode output (which
    # batch renormalization corrects with r and d: not modelled here).
    if impl == "bn_keras_renorm":
        return
    h2 = _dense(model, "dense_2", np.tanh(_train_mode_bn(h1, 20, first)))
    np.testing.assert_allclose(
        _np(second.moving_mean), h2.mean(0), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(_np(second.moving_variance), h2.var(0), rtol=1e-4)


def test_inference_uses_the_recomputed_statistics(rng):
    model = _model(lambda: BatchNorm(momentum=0.999))
    x = rng.normal(3.0, 2.0, size=(200, 6)).astype("float32")
    recompute_statistics(model, x, batch_size=50, progress=False)
    first = batch_norm_layers(model)[0]
    h1 = _dense(model, "dense_1", x)
    expected = (h1 - h1.mean(0)) / np.sqrt(h1.var(0) + first.epsilon)
    submodel = keras.Sequential(model.layers[:2])
    np.testing.assert_allclose(_np(submodel(x, training=False)), expected, atol=1e-4)


def test_dataset_and_steps(rng):
    import tensorflow as tf

    model = _model(lambda: BatchNorm())
    x = rng.normal(size=(100, 6)).astype("float32")
    y = rng.integers(0, 4, 100)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(25)
    result = recompute_statistics(model, dataset, steps=2, progress=False)
    h1 = _dense(model, "dense_1", x[:50])
    first = batch_norm_layers(model)[0]
    np.testing.assert_allclose(result[first.name][0], h1.mean(0), atol=1e-5)
    np.testing.assert_allclose(result[first.name][1], h1.var(0), rtol=1e-5)


def test_non_statistics_state_is_untouched(rng):
    model = _model(lambda: BatchNorm(momentum=None))
    x = rng.normal(size=(60, 6)).astype("float32")
    model(x, training=True)
    first = batch_norm_layers(model)[0]
    assert int(_np(first.num_batches)) == 1
    recompute_statistics(model, x, batch_size=20, progress=False)
    assert int(_np(first.num_batches)) == 1


def test_nested_models_are_searched():
    inner = _model(lambda: BatchNorm())
    outer = keras.Sequential([keras.Input((6,)), inner, BatchNorm()])
    assert len(batch_norm_layers(outer)) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": None}, "`batch_size` is needed"),
        ({"batch_size": 10, "steps": 0}, "`steps` must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, message, rng):
    model = _model(lambda: BatchNorm())
    with pytest.raises(ValueError, match=message):
        recompute_statistics(model, rng.normal(size=(30, 6)), progress=False, **kwargs)


def test_a_model_without_batch_norm_is_an_error():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="has no batch-normalization layer"):
        recompute_statistics(model, np.zeros((4, 3)), batch_size=2, progress=False)


def test_empty_data_is_an_error():
    model = _model(lambda: BatchNorm())
    with pytest.raises(ValueError, match="yielded no batch"):
        recompute_statistics(model, [], progress=False)


def test_exported_from_the_package():
    assert bn_keras.recompute_statistics is recompute_statistics


def test_statistics_the_data_never_reach_keep_their_values(rng):
    """Padded timesteps never enter a per-timestep statistic: it is kept, with a
    warning, not replaced by a placeholder."""
    inputs = keras.Input((6, 3))
    masked = keras.layers.Masking()(inputs)
    model = keras.Model(inputs, BatchNorm(axis=1)(masked))
    bn = batch_norm_layers(model)[0]
    old_mean = rng.normal(size=6).astype("float32")
    bn.moving_mean.assign(old_mean)
    x = rng.normal(2.0, 3.0, size=(40, 6, 3)).astype("float32")
    x[:, 4:] = 0.0  # every sequence ends after 4 steps
    with pytest.warns(UserWarning, match="2 of 6 population statistics"):
        recompute_statistics(model, x, batch_size=20, progress=False)
    mean, variance = _np(bn.moving_mean), _np(bn.moving_variance)
    np.testing.assert_allclose(mean[:4], x[:, :4].mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(variance[:4], x[:, :4].var(axis=(0, 2)), rtol=1e-4)
    np.testing.assert_array_equal(mean[4:], old_mean[4:])
    np.testing.assert_array_equal(variance[4:], np.ones(2))


@pytest.mark.parametrize("mode", ["frozen", "batch"])
def test_statistics_modes_frozen_layers_are_kept_batch_layers_measured(mode, rng):
    model = _model(lambda: BatchNorm(momentum=0.9))
    first, second = batch_norm_layers(model)
    bn_keras.set_statistics(model, "update")
    first._statistics = mode
    old_mean = _np(first.moving_mean).copy()
    first.moving_mean.assign(old_mean + 5.0)
    x = rng.normal(3.0, 2.0, size=(120, 6)).astype("float32")

    if mode == "frozen":
        with pytest.warns(UserWarning, match="frozen"):
            result = recompute_statistics(model, x, batch_size=20, progress=False)
        assert first.name not in result
        np.testing.assert_array_equal(_np(first.moving_mean), old_mean + 5.0)
    else:
        result = recompute_statistics(model, x, batch_size=20, progress=False)
        h1 = _dense(model, "dense_1", x.astype("float64"))
        np.testing.assert_allclose(
            _np(first.moving_mean), h1.mean(0), rtol=1e-5, atol=1e-5
        )
    assert first.statistics == mode  # the mode is restored
    assert second.name in result


@pytest.mark.parametrize("impl", ["bn_keras", "keras"])
def test_a_layer_called_twice_in_one_pass_is_an_error_not_one_calls_statistics(
    impl, rng
):
    """A BN shared by two towers: precise BN would fit one tower's data alone."""
    bn = IMPLEMENTATIONS[impl]()
    a, b = keras.Input((6,)), keras.Input((6,))
    towers = keras.Model([a, b], [bn(a), bn(b)])
    x_a = rng.normal(2.0, 1.0, (40, 6)).astype("float32")
    x_b = rng.normal(-1.0, 1.0, (40, 6)).astype("float32")
    before = _np(bn.moving_mean).copy()
    for measure in (recompute_statistics, bn_keras.inspect_statistics):
        with pytest.raises(ValueError, match="called 2 times in one forward pass"):
            measure(towers, [x_a, x_b], batch_size=20, progress=False)
    np.testing.assert_array_equal(_np(bn.moving_mean), before)
    assert "call" not in vars(bn)  # the counting wrapper is gone
