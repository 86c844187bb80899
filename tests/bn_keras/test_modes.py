"""Tests for the statistics modes: `statistics`, `set_statistics`, `statistics_mode`."""

import warnings

import keras
import numpy as np
import pytest

import bn_keras
from bn_keras import BatchNorm, BatchNormLSTM, TimestepBatchNorm
from tests import reference
from tests.bn_keras.helpers import (
    BACKEND,
    EPSILON,
    F32,
    F32_RECURRENT,
    as64,
    random_inputs,
)

SHAPE = (16, 5)
MODES = ("update", "frozen", "batch")


def _expected(mode, training, trainable, x, values, axis=-1):
    """`(outputs, moving_mean, moving_variance)` by the modes' table."""
    gamma, beta = values["gamma"], values["beta"]
    mean, variance = values["moving_mean"], values["moving_variance"]
    batch = mode == "batch" or (mode == "update" and training and trainable)
    if batch:
        y, batch_mean, batch_variance, _ = reference.train_transform(
            x, gamma, beta, EPSILON, axis
        )
    else:
        y = reference.normalize(x, mean, variance, gamma, beta, EPSILON, axis)
    if mode == "update" and training and trainable:
        momentum = 0.9
        mean = reference.ema(mean, batch_mean, momentum)
        variance = reference.ema(variance, batch_variance, momentum)
    return y, mean, variance


@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("training", [True, False, None])
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_normalizes_and_updates_as_its_table_says(
    mode, training, trainable, rng, set_random_weights
):
    layer = BatchNorm(momentum=0.9, statistics=mode)
    values = set_random_weights(layer, SHAPE)
    layer.trainable = trainable
    x = random_inputs(rng, SHAPE)

    y = layer(x, training=training)

    expected, mean, variance = _expected(mode, training, trainable, x, values)
    np.testing.assert_allclose(as64(y), expected, **F32)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, **F32)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, **F32)


@pytest.mark.parametrize("mode", MODES)
def test_gamma_and_beta_get_their_gradients_in_every_mode(
    mode, rng, set_random_weights, call_with_gradients
):
    layer = BatchNorm(statistics=mode)
    values = set_random_weights(layer, SHAPE)
    x = random_inputs(rng, SHAPE)
    upstream = rng.normal(size=SHAPE)

    y, dx, grads = call_with_gradients(layer, x, upstream, training=True)

    if mode != "frozen":
        dx_ref, dgamma, dbeta = reference.train_gradients(
            x, upstream, values["gamma"], EPSILON, -1
        )
    else:
        scale = 1.0 / np.sqrt(values["moving_variance"] + EPSILON)
        x_hat = (x - values["moving_mean"]) * scale
        dx_ref = upstream * values["gamma"] * scale
        dgamma, dbeta = (upstream * x_hat).sum(0), upstream.sum(0)
    np.testing.assert_allclose(grads["gamma"], dgamma, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["beta"], dbeta, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(BACKEND == "jax", reason="TensorFlow's and torch's kernels.")
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_modes_hold_on_the_fused_path(mode, training, rng, set_random_weights):
    shape = (4, 3, 3, 6)
    layer = BatchNorm(momentum=0.9, statistics=mode, fused=True)
    values = set_random_weights(layer, shape)
    x = random_inputs(rng, shape)

    y = layer(x, training=training)

    expected, mean, variance = _expected(mode, training, True, x, values)
    np.testing.assert_allclose(as64(y), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, **F32)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, rtol=1e-4)


def test_batch_mode_refuses_a_batch_of_one_in_inference_too(rng):
    layer = BatchNorm(statistics="batch")
    layer.build(SHAPE)
    with pytest.raises(Exception, match="single value per feature|one value"):
        keras.ops.convert_to_numpy(layer(random_inputs(rng, (1, 5)), training=False))


def test_batch_mode_explains_a_last_predict_batch_of_one(rng):
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4), BatchNorm(statistics="batch")]
    )
    # The backend's own error type: a ValueError, or TensorFlow's assertion.
    with pytest.raises(Exception, match="mode `batch` got a single value"):
        model.predict(random_inputs(rng, (65, 5)), batch_size=64, verbose=0)
    with pytest.raises(ValueError, match="mode `batch` got an empty batch"):
        model.layers[-1](random_inputs(rng, (0, 4)), training=False)


def test_batch_mode_ignores_renorm_corrections(rng):
    x = random_inputs(rng, SHAPE)
    layer = BatchNorm(renorm=True, statistics="batch", center=False, scale=False)
    layer.build(SHAPE)
    layer.moving_stddev.assign(np.full(5, 7.0, "float32"))
    expected, *_ = reference.train_transform(x, None, None, EPSILON, -1)
    np.testing.assert_allclose(as64(layer(x, training=True)), expected, **F32)


@pytest.mark.parametrize("mode", ["update", 3, None, "Frozen", ""])
def test_an_unknown_mode_is_a_value_error(mode):
    if mode == "update":
        assert BatchNorm(statistics=mode).statistics == "update"
        return
    with pytest.raises(ValueError, match="Received: statistics="):
        BatchNorm(statistics=mode)
    layer = BatchNorm()
    with pytest.raises(ValueError, match="Received: statistics="):
        layer.statistics = mode
    assert layer.statistics == "update"


def test_setting_the_mode_of_a_built_layer_warns_about_compiled_functions():
    layer = BatchNorm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.statistics = "frozen"  # not built: nothing compiled yet
    layer.build(SHAPE)
    with pytest.warns(UserWarning, match="set_statistics"):
        layer.statistics = "batch"
    assert layer.statistics == "batch"


@pytest.mark.parametrize("mode", MODES)
def test_the_mode_is_saved_and_loaded(mode, tmp_path, rng):
    model = keras.Sequential([keras.Input((5,)), BatchNorm(statistics=mode)])
    config = model.layers[0].get_config()
    assert config["statistics"] == mode
    assert BatchNorm.from_config(config).statistics == mode
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[0].statistics == mode
    x = random_inputs(rng, SHAPE)
    np.testing.assert_allclose(
        as64(loaded(x, training=True)), as64(model(x, training=True)), **F32
    )


def _model(make_bn=BatchNorm):
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, name="dense"),
            make_bn(name="bn"),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3, name="head"),
        ]
    )


def _data(rng, n=64):
    x = random_inputs(rng, (n, 6))
    y = rng.integers(0, 3, n)
    return x, y


def _reference_outputs(model, x, batch_statistics):
    """The model's outputs in NumPy: BN with the batch's or population statistics."""
    dense, bn, head = (model.get_layer(n) for n in ("dense", "bn", "head"))
    h = x @ as64(dense.kernel) + as64(dense.bias)
    if batch_statistics:
        mean, variance, _ = reference.moments(h, -1)
    else:
        mean, variance = as64(bn.moving_mean), as64(bn.moving_variance)
    h = reference.normalize(
        h, mean, variance, as64(bn.gamma), as64(bn.beta), EPSILON, -1
    )
    return np.tanh(h) @ as64(head.kernel) + as64(head.bias)


def test_a_switch_takes_effect_in_compiled_functions_without_recompiling(rng):
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, _ = _data(rng)
    y = rng.normal(size=(64, 3)).astype("float32")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    np.testing.assert_allclose(
        model.predict(x, batch_size=64, verbose=0),
        _reference_outputs(model, x, batch_statistics=False),
        **F32,
    )

    # predict() now normalizes each batch with its own statistics.
    bn_keras.set_statistics(model, "batch")
    np.testing.assert_allclose(
        model.predict(x, batch_size=64, verbose=0),
        _reference_outputs(model, x, batch_statistics=True),
        **F32,
    )
    # evaluate() as well: its loss is that of the batch-statistics outputs.
    loss = model.evaluate(x, y, batch_size=64, verbose=0)
    expected = np.mean((_reference_outputs(model, x, True) - y) ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-4)

    # fit() in the frozen mode trains gamma but keeps the statistics.
    bn_keras.set_statistics(model, "frozen")
    bn = model.get_layer("bn")
    mean, variance, gamma = (
        as64(v) for v in (bn.moving_mean, bn.moving_variance, bn.gamma)
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    np.testing.assert_array_equal(as64(bn.moving_mean), mean)
    np.testing.assert_array_equal(as64(bn.moving_variance), variance)
    assert np.abs(as64(bn.gamma) - gamma).max() > 1e-4

    bn_keras.set_statistics(model, "update")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.abs(as64(bn.moving_mean) - mean).max() > 1e-4


def test_a_callback_can_switch_modes_during_fit(rng):
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, _ = _data(rng)
    y = rng.normal(size=(64, 3)).astype("float32")
    bn = model.get_layer("bn")
    seen = {}

    class Switch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen[epoch] = as64(bn.moving_mean)
            if epoch == 1:
                bn_keras.set_statistics(self.model, "frozen")

    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[Switch()])
    assert np.abs(seen[1] - seen[0]).max() > 1e-4  # epoch 0 updated
    np.testing.assert_array_equal(seen[2], seen[1])  # epoch 1 did not
    np.testing.assert_array_equal(as64(bn.moving_mean), seen[1])


def test_statistics_mode_restores_the_previous_modes_also_on_an_error(rng):
    model = _model()
    bn = model.get_layer("bn")
    bn._statistics = "frozen"
    x, _ = _data(rng)
    with bn_keras.statistics_mode(model, "batch") as same:
        assert same is model
        assert bn.statistics == "batch"
        np.testing.assert_allclose(
            as64(model(x)), _reference_outputs(model, x, True), **F32
        )
    assert bn.statistics == "frozen"
    with pytest.raises(KeyboardInterrupt):
        with bn_keras.statistics_mode(model, "update"):
            raise KeyboardInterrupt
    assert bn.statistics == "frozen"


def test_set_statistics_returns_the_previous_modes_and_reaches_nested_layers():
    inner = _model()
    outer = keras.Sequential([keras.Input((6,)), inner, BatchNorm(name="outer_bn")])
    previous = bn_keras.set_statistics(outer, "frozen")
    assert previous == {"bn": "update", "outer_bn": "update"}
    assert inner.get_layer("bn").statistics == "frozen"
    assert bn_keras.set_statistics(outer, "update") == {
        "bn": "frozen",
        "outer_bn": "frozen",
    }


def test_set_statistics_takes_a_bn_layer_itself():
    layer = BatchNorm(name="alone")
    assert bn_keras.set_statistics(layer, "frozen") == {"alone": "update"}
    assert layer.statistics == "frozen"
    with bn_keras.statistics_mode(layer, "batch"):
        assert layer.statistics == "batch"
    assert layer.statistics == "frozen"
    with pytest.raises(ValueError, match="convert_batch_norms"):
        bn_keras.set_statistics(keras.layers.BatchNormalization(), "frozen")


def test_set_statistics_refuses_keras_layers_and_changes_nothing():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            BatchNorm(name="ours"),
            keras.layers.BatchNormalization(name="theirs"),
        ]
    )
    with pytest.raises(ValueError, match=r"convert_batch_norms.*\n?.*|theirs"):
        bn_keras.set_statistics(model, "frozen")
    assert model.get_layer("ours").statistics == "update"


def test_set_statistics_refuses_a_model_without_bn_and_an_unknown_mode():
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no batch-normalization layer"):
        bn_keras.set_statistics(plain, "frozen")
    model = _model()
    with pytest.raises(ValueError, match="Received: statistics='eval'"):
        bn_keras.set_statistics(model, "eval")
    with pytest.raises(ValueError, match="Received: statistics='eval'"):
        with bn_keras.statistics_mode(model, "eval"):
            pass
    assert model.get_layer("bn").statistics == "update"


@pytest.mark.parametrize("mode", MODES)
def test_timestep_batch_norm_takes_the_modes(mode, rng, set_random_weights):
    shape = (6, 4, 3)
    layer = TimestepBatchNorm(4, momentum=0.5, statistics=mode)
    values = set_random_weights(layer, shape)
    x = random_inputs(rng, shape)

    y = layer(x, training=False)

    if mode == "batch":
        mean, variance = x.mean(0, keepdims=True), x.var(0, keepdims=True)
    else:
        mean = values["moving_mean"][None]
        variance = values["moving_variance"][None]
    expected = (x - mean) / np.sqrt(variance + EPSILON) * values["gamma"]
    expected = expected + values["beta"]
    np.testing.assert_allclose(as64(y), expected, **F32)
    layer(x, training=True)
    changed = np.abs(as64(layer.moving_mean) - values["moving_mean"]).max()
    assert (changed > 1e-4) == (mode == "update")


@pytest.mark.parametrize("mode", MODES)
def test_the_bn_lstm_takes_the_modes(mode, rng):
    x = random_inputs(rng, (5, 4, 3), loc=0.0, scale=1.0)
    lstm = BatchNormLSTM(6, max_timesteps=4, statistics=mode, momentum=0.5)
    lstm.build(x.shape)
    for norm in (lstm.input_norm, lstm.recurrent_norm, lstm.cell_norm):
        norm.moving_mean.assign(rng.normal(size=norm.moving_mean.shape))
        norm.moving_variance.assign(rng.uniform(0.5, 2, norm.moving_variance.shape))
    assert lstm.get_config()["statistics"] == mode
    before = [as64(v) for v in lstm.non_trainable_variables]
    reference_lstm = BatchNormLSTM(6, max_timesteps=4)
    reference_lstm.build(x.shape)
    reference_lstm.set_weights(lstm.get_weights())

    trained = as64(lstm(x, training=True))
    inferred = as64(lstm(x, training=False))

    with_batch = as64(reference_lstm(x, training=True))
    reference_lstm.set_weights(lstm.get_weights())
    with_population = as64(reference_lstm(x, training=False))
    after = [as64(v) for v in lstm.non_trainable_variables]
    if mode == "update":
        np.testing.assert_allclose(trained, with_batch, **F32_RECURRENT)
        moved = [np.abs(a - b).max() for a, b in zip(after, before, strict=True)]
        assert max(moved) > 1e-4
        return
    expected = with_batch if mode == "batch" else with_population
    np.testing.assert_allclose(trained, expected, **F32_RECURRENT)
    np.testing.assert_allclose(inferred, expected, **F32_RECURRENT)
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bn_lstm_normalizations_with_different_modes_are_an_error(rng):
    lstm = BatchNormLSTM(4, max_timesteps=3)
    lstm.build((2, 3, 2))
    lstm.cell_norm._statistics = "frozen"
    with pytest.raises(ValueError, match="different statistics modes"):
        lstm(random_inputs(rng, (2, 3, 2)), training=True)
    with pytest.warns(UserWarning, match="set_statistics"):
        lstm.statistics = "frozen"
    assert {n.statistics for n in lstm._norms} == {"frozen"}
