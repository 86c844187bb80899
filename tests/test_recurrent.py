"""Tests of `TimestepBatchNorm` and `BatchNormLSTM` against a NumPy reference.

The reference follows Cooijmans et al. (2016), https://arxiv.org/abs/1603.09025:
per-timestep batch moments in training, per-timestep population statistics
(the last slot beyond T_max) in inference, the BN-LSTM equations (6) to (8).
"""

import os

import keras
import numpy as np
import pytest
from keras import ops

import bn_keras
from bn_keras import BatchNorm, BatchNormLSTM, TimestepBatchNorm
from tests import reference
from tests.conftest import BACKEND
from tests.reference import reference_bn_lstm

F32 = {"rtol": 2e-5, "atol": 2e-5}
EPSILON = 1e-3


def _numpy(value):
    return ops.convert_to_numpy(value).astype(np.float64)


def _ema(moving, batch, momentum, ok):
    """The population statistics after one guarded EMA update, per slot."""
    updated = momentum * moving + (1.0 - momentum) * batch
    return np.where(ok[:, None], updated, moving)


def _randomize_lstm(layer, input_shape, rng):
    """Random weights and statistics; returns them under the reference's names."""
    if not layer.built:
        layer.build(input_shape)
    values = {
        "kernel": rng.normal(0.0, 0.5, layer.kernel.shape),
        "recurrent_kernel": rng.normal(0.0, 0.5, layer.recurrent_kernel.shape),
        "bias": rng.normal(0.0, 0.5, layer.bias.shape),
        "gamma_x": rng.uniform(0.5, 1.5, layer.input_norm.gamma.shape),
        "gamma_h": rng.uniform(0.5, 1.5, layer.recurrent_norm.gamma.shape),
        "gamma_c": rng.uniform(0.5, 1.5, layer.cell_norm.gamma.shape),
        "beta_c": rng.normal(0.0, 0.5, layer.cell_norm.beta.shape),
    }
    variables = {
        "kernel": layer.kernel,
        "recurrent_kernel": layer.recurrent_kernel,
        "bias": layer.bias,
        "gamma_x": layer.input_norm.gamma,
        "gamma_h": layer.recurrent_norm.gamma,
        "gamma_c": layer.cell_norm.gamma,
        "beta_c": layer.cell_norm.beta,
    }
    for name, variable in variables.items():
        variable.assign(values[name].astype("float32"))
    population = {}
    for name, norm in _norms(layer).items():
        shape = norm.moving_mean.shape
        mean = rng.normal(0.0, 1.0, shape)
        variance = rng.uniform(0.5, 2.0, shape)
        norm.moving_mean.assign(mean.astype("float32"))
        norm.moving_variance.assign(variance.astype("float32"))
        population[name] = (_numpy(norm.moving_mean), _numpy(norm.moving_variance))
    values = {name: _numpy(variable) for name, variable in variables.items()}
    return values, population


def _norms(layer):
    return {
        "input": layer.input_norm,
        "recurrent": layer.recurrent_norm,
        "cell": layer.cell_norm,
    }


def _population(layer):
    return {
        name: (_numpy(norm.moving_mean), _numpy(norm.moving_variance))
        for name, norm in _norms(layer).items()
    }


# TimestepBatchNorm


@pytest.mark.parametrize(
    "shape, axis",
    [((6, 4, 3), -1), ((5, 3, 2, 4), -1), ((5, 3, 4, 2), 2), ((4, 3, 2, 3), (2, 3))],
)
def test_timestep_training_and_ema_match_reference(shape, axis, rng):
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    layer = TimestepBatchNorm(5, axis=axis, momentum=0.9)
    layer.build(shape)
    gamma = rng.uniform(0.5, 1.5, layer.gamma.shape)
    beta = rng.normal(0.0, 1.0, layer.beta.shape)
    layer.gamma.assign(gamma.astype("float32"))
    layer.beta.assign(beta.astype("float32"))
    assert layer.gamma.shape == layer.beta.shape == reference.param_shape(shape, axis)
    assert layer.moving_mean.shape == (5,) + reference.param_shape(shape, axis)

    y = _numpy(layer(x, training=True))

    # Moments over every axis but time and the features, per timestep.
    feature = reference.feature_axes(axis, len(shape))
    stat_axes = (1,) + feature
    reduced = tuple(i for i in range(len(shape)) if i not in stat_axes)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=reduced, keepdims=True)
    variance = x64.var(axis=reduced, keepdims=True)
    expand = [shape[i] if i in feature else 1 for i in range(len(shape))]
    expected = (x64 - mean) / np.sqrt(variance + EPSILON) * gamma.reshape(
        expand
    ) + beta.reshape(expand)
    np.testing.assert_allclose(y, expected, **F32)
    steps = shape[1]
    moving_mean = _numpy(layer.moving_mean)
    moving_variance = _numpy(layer.moving_variance)
    per_step = (steps,) + reference.param_shape(shape, axis)
    np.testing.assert_allclose(moving_mean[:steps], 0.1 * mean.reshape(per_step), **F32)
    np.testing.assert_allclose(
        moving_variance[:steps], 0.9 + 0.1 * variance.reshape(per_step), **F32
    )
    # The slots no timestep of the batch reached keep their initial values.
    np.testing.assert_array_equal(moving_mean[steps:], 0.0)
    np.testing.assert_array_equal(moving_variance[steps:], 1.0)


def test_timestep_ema_of_each_timestep_over_batches(rng):
    layer = TimestepBatchNorm(4, momentum=0.8)
    moving_mean = np.zeros((4, 3))
    moving_variance = np.ones((4, 3))
    for scale in (1.0, 2.0, 0.5):
        # Each timestep with its own distribution.
        x = rng.normal(np.arange(4)[None, :, None], scale, (8, 4, 3))
        layer(x.astype("float32"), training=True)
        mean, variance, _ = reference.timestep_moments(x.astype("float32"))
        ok = np.ones(4, bool)
        moving_mean = _ema(moving_mean, mean, 0.8, ok)
        moving_variance = _ema(moving_variance, variance, 0.8, ok)
    np.testing.assert_allclose(_numpy(layer.moving_mean), moving_mean, **F32)
    np.testing.assert_allclose(_numpy(layer.moving_variance), moving_variance, **F32)


def test_timestep_matches_batch_norm_over_time_and_features(call_with_gradients, rng):
    # With static T = T_max, per-timestep statistics are those of
    # BatchNorm(axis=(1, -1)); only gamma/beta are shared across time.
    x = rng.normal(1.0, 2.0, (6, 4, 3)).astype("float32")
    upstream = rng.normal(size=x.shape)
    ours = TimestepBatchNorm(4, momentum=0.7)
    ours.build(x.shape)
    gamma = rng.uniform(0.5, 1.5, (3,)).astype("float32")
    ours.gamma.assign(gamma)
    full = BatchNorm(axis=(1, -1), momentum=0.7)
    full.build(x.shape)
    full.gamma.assign(np.tile(gamma, (4, 1)))

    y, dx, grads = call_with_gradients(ours, x, upstream)
    y_full, dx_full, grads_full = call_with_gradients(full, x, upstream)
    np.testing.assert_allclose(y, y_full, **F32)
    np.testing.assert_allclose(dx, dx_full, **F32)
    np.testing.assert_allclose(grads["gamma"], grads_full["gamma"].sum(0), **F32)
    np.testing.assert_allclose(grads["beta"], grads_full["beta"].sum(0), **F32)
    np.testing.assert_allclose(
        _numpy(ours.moving_mean), _numpy(full.moving_mean), **F32
    )
    np.testing.assert_allclose(
        _numpy(ours.moving_variance), _numpy(full.moving_variance), **F32
    )
    np.testing.assert_allclose(_numpy(ours(x)), _numpy(full(x)), **F32)


def test_timestep_inference_uses_each_timesteps_statistics(rng):
    layer = TimestepBatchNorm(3)
    layer.build((None, None, 2))
    mean = rng.normal(0.0, 2.0, (3, 2))
    variance = rng.uniform(0.5, 2.0, (3, 2))
    layer.moving_mean.assign(mean.astype("float32"))
    layer.moving_variance.assign(variance.astype("float32"))
    # Five timesteps, T_max = 3: timesteps 3 and 4 use the statistics of slot 2.
    x = rng.normal(size=(4, 5, 2)).astype("float32")
    slots = [0, 1, 2, 2, 2]
    expected = (x - mean[slots]) / np.sqrt(variance[slots] + EPSILON)
    np.testing.assert_allclose(_numpy(layer(x)), expected, **F32)
    np.testing.assert_allclose(_numpy(layer(x, training=False)), expected, **F32)
    # A batch of one is normalized as in the batch.
    np.testing.assert_allclose(_numpy(layer(x[1:2])), expected[1:2], **F32)


def test_timestep_beyond_max_timesteps_in_training(rng):
    # Training with T > T_max: every timestep normalized with its own batch
    # moments; only timesteps below T_max enter the statistics.
    layer = TimestepBatchNorm(2, momentum=0.0)
    x = rng.normal(np.arange(5)[None, :, None], 1.0, (8, 5, 3)).astype("float32")
    y = _numpy(layer(x, training=True))
    mean, variance, _ = reference.timestep_moments(x)
    expected = (x - mean) / np.sqrt(variance + EPSILON)
    np.testing.assert_allclose(y, expected, **F32)
    np.testing.assert_allclose(_numpy(layer.moving_mean), mean[:2], **F32)
    np.testing.assert_allclose(_numpy(layer.moving_variance), variance[:2], **F32)


def test_timestep_masked_steps_do_not_enter_statistics(rng):
    layer = TimestepBatchNorm(5, momentum=0.5)
    layer.build((None, None, 3))
    initial_mean = rng.normal(size=(5, 3))
    layer.moving_mean.assign(initial_mean.astype("float32"))
    x = rng.normal(1.0, 2.0, (6, 5, 3)).astype("float32")
    lengths = np.array([4, 3, 3, 1, 2, 4])
    mask = np.arange(5)[None, :] < lengths[:, None]
    # Padding holds garbage, NaN included: it must not leak anywhere.
    x[~mask] = np.nan
    y = _numpy(layer(x, training=True, mask=mask))
    mean, variance, count = reference.timestep_moments(x, mask)
    expected = (x - mean) / np.sqrt(variance + EPSILON)
    np.testing.assert_allclose(y[mask], expected[mask], **F32)
    # Timesteps 0-3 reached by two sequences or more; timestep 4 by none.
    ok = count > 1
    assert list(ok) == [True, True, True, True, False]
    moving_mean = np.where(ok[:, None], 0.5 * initial_mean + 0.5 * mean, initial_mean)
    np.testing.assert_allclose(_numpy(layer.moving_mean), moving_mean, **F32)
    moving_variance = np.where(ok[:, None], 0.5 + 0.5 * variance, 1.0)
    np.testing.assert_allclose(_numpy(layer.moving_variance), moving_variance, **F32)


def test_timestep_cumulative_average_counts_each_timestep(rng):
    # momentum=None: a timestep reached by fewer batches averages over those.
    layer = TimestepBatchNorm(3, momentum=None)
    batches = []
    for length in (3, 1, 3, 2):
        x = rng.normal(size=(4, 3, 2)).astype("float32")
        mask = np.broadcast_to(np.arange(3) < length, (4, 3))
        layer(x, training=True, mask=mask)
        batches.append((x, length))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer.num_batches).reshape(-1), [4, 3, 2]
    )
    for t in range(3):
        means = [x[:, t].mean(0) for x, length in batches if t < length]
        np.testing.assert_allclose(
            _numpy(layer.moving_mean)[t], np.mean(means, axis=0), **F32
        )


def test_timestep_non_finite_batch_leaves_statistics(rng):
    layer = TimestepBatchNorm(3, momentum=0.5)
    x = rng.normal(size=(4, 3, 2)).astype("float32")
    layer(x, training=True)
    before_mean = _numpy(layer.moving_mean)
    before_variance = _numpy(layer.moving_variance)
    bad = rng.normal(size=(4, 3, 2)).astype("float32")
    bad[1, 1, 0] = np.nan
    bad[2, 2, 1] = np.inf
    layer(bad, training=True)
    after_mean = _numpy(layer.moving_mean)
    after_variance = _numpy(layer.moving_variance)
    assert np.isfinite(after_mean).all() and np.isfinite(after_variance).all()
    for t, f in [(1, 0), (2, 1)]:
        assert after_mean[t, f] == before_mean[t, f]
        assert after_variance[t, f] == before_variance[t, f]
    mean, variance, _ = reference.timestep_moments(bad)
    np.testing.assert_allclose(
        after_mean[0], 0.5 * before_mean[0] + 0.5 * mean[0], **F32
    )


def test_timestep_batch_of_one_raises(rng):
    layer = TimestepBatchNorm(3)
    with pytest.raises(ValueError, match="single value per feature"):
        layer(rng.normal(size=(1, 3, 2)).astype("float32"), training=True)


def test_timestep_unbiased_variance_and_debias(rng):
    layer = TimestepBatchNorm(2, momentum=0.9, debias=True, unbiased_variance=True)
    x = rng.normal(size=(5, 2, 3)).astype("float32")
    layer(x, training=True)
    _, variance, _ = reference.timestep_moments(x)
    # Debiased after one batch: exactly that batch's (unbiased) statistics.
    np.testing.assert_allclose(_numpy(layer.moving_variance), variance * 5 / 4, **F32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_timesteps": 0}, "max_timesteps"),
        ({"max_timesteps": 2.5}, "max_timesteps"),
        ({"max_timesteps": 3, "renorm": True}, "renorm"),
        ({"max_timesteps": 3, "momentum": 2.0}, "momentum"),
    ],
)
def test_timestep_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TimestepBatchNorm(**kwargs)


@pytest.mark.parametrize("axis, shape", [(1, (2, 3, 4)), (0, (2, 3, 4)), (-1, (2, 3))])
def test_timestep_bad_axes(axis, shape):
    with pytest.raises(ValueError, match="TimestepBatchNorm"):
        TimestepBatchNorm(3, axis=axis).build(shape)


def test_timestep_unknown_time_dimension_in_a_model(rng):
    # The time dimension is None in the model: statistics are gathered, not sliced.
    inputs = keras.Input((None, 3))
    norm = TimestepBatchNorm(4, momentum=0.0)
    model = keras.Model(inputs, norm(inputs))
    for steps in (2, 6):
        x = rng.normal(size=(8, steps, 3)).astype("float32")
        model.predict(x, verbose=0, batch_size=8)
    x = rng.normal(np.arange(6)[None, :, None], 1.0, (8, 6, 3)).astype("float32")
    model.compile(loss="mse")
    model.fit(x, x, batch_size=8, epochs=1, verbose=0)
    mean, _, _ = reference.timestep_moments(x)
    np.testing.assert_allclose(_numpy(norm.moving_mean), mean[:4], **F32)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function with None dims.")
def test_timestep_tf_function_with_dynamic_shapes(rng):
    import tensorflow as tf

    layer = TimestepBatchNorm(3, momentum=0.0)
    layer.build((None, None, 2))
    signature = [tf.TensorSpec((None, None, 2))]
    train = tf.function(lambda x: layer(x, training=True), input_signature=signature)
    infer = tf.function(lambda x: layer(x), input_signature=signature)
    short = rng.normal(size=(4, 2, 2)).astype("float32")
    train(short)
    mean, variance, _ = reference.timestep_moments(short)
    np.testing.assert_allclose(_numpy(layer.moving_mean)[:2], mean, **F32)
    np.testing.assert_array_equal(_numpy(layer.moving_mean)[2], 0.0)
    long = rng.normal(size=(3, 5, 2)).astype("float32")
    slots = [0, 1, 2, 2, 2]
    statistics = _numpy(layer.moving_mean), _numpy(layer.moving_variance)
    expected = (long - statistics[0][slots]) / np.sqrt(statistics[1][slots] + EPSILON)
    np.testing.assert_allclose(_numpy(infer(long)), expected, **F32)


# BatchNormLSTM


@pytest.mark.parametrize("masked", [False, True])
def test_bn_lstm_training_matches_reference(masked, rng):
    x = rng.normal(size=(6, 5, 3)).astype("float32")
    mask = None
    if masked:
        lengths = np.array([5, 3, 4, 1, 5, 2])
        mask = np.arange(5)[None, :] < lengths[:, None]
    layer = BatchNormLSTM(4, max_timesteps=4, momentum=0.5, return_sequences=True)
    w, population = _randomize_lstm(layer, x.shape, rng)
    y = _numpy(layer(x, training=True, mask=mask))
    expected, _, _, seen = reference_bn_lstm(x, w, training=True, mask=mask)
    # Padded timesteps repeat the last output (the state is kept).
    np.testing.assert_allclose(y, expected, **F32)
    counts = np.ones(5) * 6 if mask is None else mask.sum(0)
    ok = counts[:4] > 1
    for name, (mean, variance) in seen.items():
        moving_mean, moving_variance = population[name]
        np.testing.assert_allclose(
            _numpy(_norms(layer)[name].moving_mean),
            np.where(ok[:, None], 0.5 * moving_mean + 0.5 * mean[:4], moving_mean),
            **F32,
            err_msg=name,
        )
        np.testing.assert_allclose(
            _numpy(_norms(layer)[name].moving_variance),
            np.where(
                ok[:, None], 0.5 * moving_variance + 0.5 * variance[:4], moving_variance
            ),
            **F32,
            err_msg=name,
        )


def test_bn_lstm_inference_matches_reference_beyond_max_timesteps(rng):
    x = rng.normal(size=(3, 6, 2)).astype("float32")
    layer = BatchNormLSTM(3, max_timesteps=4, return_sequences=True, return_state=True)
    w, population = _randomize_lstm(layer, x.shape, rng)
    y, h, c = layer(x)
    expected, h_ref, c_ref, _ = reference_bn_lstm(
        x, w, training=False, population=population, max_timesteps=4
    )
    np.testing.assert_allclose(_numpy(y), expected, **F32)
    np.testing.assert_allclose(_numpy(h), h_ref, **F32)
    np.testing.assert_allclose(_numpy(c), c_ref, **F32)
    # Inference changes no statistic.
    for name, (mean, variance) in _population(layer).items():
        np.testing.assert_array_equal(mean, population[name][0])
        np.testing.assert_array_equal(variance, population[name][1])


def test_bn_lstm_single_sequence_inference_equals_batched(rng):
    x = rng.normal(size=(5, 7, 3)).astype("float32")
    layer = BatchNormLSTM(4, max_timesteps=5)
    _randomize_lstm(layer, x.shape, rng)
    batched = _numpy(layer(x))
    one_at_a_time = np.concatenate([_numpy(layer(x[i : i + 1])) for i in range(5)])
    np.testing.assert_allclose(one_at_a_time, batched, rtol=1e-6, atol=1e-6)


def test_bn_lstm_masked_inference_keeps_state(rng):
    x = rng.normal(size=(4, 5, 2)).astype("float32")
    lengths = np.array([5, 2, 3, 1])
    mask = np.arange(5)[None, :] < lengths[:, None]
    layer = BatchNormLSTM(3, max_timesteps=5, return_sequences=True)
    w, population = _randomize_lstm(layer, x.shape, rng)
    y = _numpy(layer(x, mask=mask))
    expected, _, _, _ = reference_bn_lstm(
        x, w, False, mask=mask, population=population, max_timesteps=5
    )
    np.testing.assert_allclose(y, expected, **F32)
    # The last output of each sequence is that of its last real timestep.
    final = y[np.arange(4), -1]
    np.testing.assert_allclose(final, expected[np.arange(4), lengths - 1], **F32)


def test_bn_lstm_go_backwards_is_forward_on_the_reversed_sequence(rng):
    x = rng.normal(size=(4, 5, 2)).astype("float32")
    backward = BatchNormLSTM(3, 5, go_backwards=True, return_sequences=True)
    forward = BatchNormLSTM(3, 5, return_sequences=True)
    backward.build(x.shape)
    forward.build(x.shape)
    _randomize_lstm(backward, x.shape, rng)
    forward.set_weights(backward.get_weights())
    for training in (False, True):
        np.testing.assert_allclose(
            _numpy(backward(x, training=training)),
            _numpy(forward(x[:, ::-1], training=training)),
            **F32,
        )


def test_bn_lstm_initial_state_and_return_state(rng):
    # With T_max = 1 every timestep has the same statistics, so a sequence
    # run in two halves, the second from the first's state, is the whole run.
    x = rng.normal(size=(3, 4, 2)).astype("float32")
    layer = BatchNormLSTM(3, 1, return_state=True)
    _randomize_lstm(layer, x.shape, rng)
    output, h_full, c_full = layer(x)
    _, h_half, c_half = layer(x[:, :2])
    _, h_rest, c_rest = layer(x[:, 2:], initial_state=[h_half, c_half])
    np.testing.assert_allclose(_numpy(h_rest), _numpy(h_full), **F32)
    np.testing.assert_allclose(_numpy(c_rest), _numpy(c_full), **F32)
    np.testing.assert_allclose(_numpy(output), _numpy(h_full), **F32)
    assert tuple(c_full.shape) == (3, 3)


def test_bn_lstm_paper_initialization():
    layer = BatchNormLSTM(3, 4)
    layer.build((None, 4, 2))
    for norm in _norms(layer).values():
        np.testing.assert_allclose(_numpy(norm.gamma), 0.1)
    assert layer.input_norm.beta is None and layer.recurrent_norm.beta is None
    np.testing.assert_array_equal(_numpy(layer.cell_norm.beta), 0.0)
    assert layer.input_norm.moving_mean.shape == (4, 12)
    assert layer.recurrent_norm.moving_mean.shape == (4, 12)
    assert layer.cell_norm.moving_mean.shape == (4, 3)
    # Keras' unit_forget_bias: the forget gate (second quarter) starts at 1.
    np.testing.assert_array_equal(_numpy(layer.bias), [0] * 3 + [1] * 3 + [0] * 6)


def test_bn_lstm_nan_leaves_the_statistics_it_reaches(rng):
    layer = BatchNormLSTM(3, 4)
    x = rng.normal(size=(4, 4, 2)).astype("float32")
    layer(x, training=True)
    before = _population(layer)
    # A NaN in the first input of one sequence spoils that sequence's input
    # pre-activation at timestep 0, then its state and cell from timestep 0
    # on: every statistic it reaches stays as it was; the others move.
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    layer(bad, training=True)
    after = _population(layer)
    spoiled = {"input": [0], "recurrent": [1, 2, 3], "cell": [0, 1, 2, 3]}
    for name, steps in spoiled.items():
        for i in range(2):
            assert np.isfinite(after[name][i]).all(), name
            np.testing.assert_array_equal(
                after[name][i][steps], before[name][i][steps], err_msg=name
            )
    # The input pre-activations of timesteps 1 to 3 are clean.
    for i in range(2):
        assert (after["input"][i][1:] != before["input"][i][1:]).all()


def test_bn_lstm_batch_of_one_raises(rng):
    layer = BatchNormLSTM(3, 4)
    with pytest.raises(ValueError, match="single value per feature"):
        layer(rng.normal(size=(1, 4, 2)).astype("float32"), training=True)


def _sequence_model(steps=5, features=2):
    inputs = keras.Input((steps, features))
    hidden = keras.layers.Masking(mask_value=0.0)(inputs)
    # Debiased: after a few steps the statistics are already an average.
    hidden = BatchNormLSTM(4, steps, debias=True, return_sequences=True, name="first")(
        hidden
    )
    hidden = BatchNormLSTM(3, steps, debias=True, name="second")(hidden)
    outputs = keras.layers.Dense(2)(hidden)
    return keras.Model(inputs, outputs)


def test_bn_lstm_stacked_model_trains_and_round_trips(tmp_path, rng):
    x = rng.normal(size=(32, 5, 2)).astype("float32")
    x[::3, 3:] = 0.0
    y = np.stack([x[:, :, 0].sum(1), x[:, :, 1].mean(1)], axis=1)
    model = _sequence_model()
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=15, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0]
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("first"), BatchNormLSTM)
    assert (
        loaded.get_layer("second").get_config()
        == model.get_layer("second").get_config()
    )
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )
    for a, b in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(_numpy(a), _numpy(b))


def test_timestep_round_trip(tmp_path, rng):
    inputs = keras.Input((None, 3))
    model = keras.Model(
        inputs, TimestepBatchNorm(4, momentum=None, name="norm")(inputs)
    )
    x = rng.normal(size=(6, 4, 3)).astype("float32")
    model.compile(loss="mse")
    model.fit(x, x, batch_size=6, epochs=2, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("norm")
    assert isinstance(layer, TimestepBatchNorm) and layer.max_timesteps == 4
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_recompute_statistics_sets_each_timestep(rng):
    # One pass over the data: each timestep's statistics become exactly the
    # moments of that timestep's pre-activations over the data.
    x = rng.normal(size=(12, 4, 2)).astype("float32")
    inputs = keras.Input((4, 2))
    lstm = BatchNormLSTM(3, 4, momentum=0.9, name="lstm")
    model = keras.Model(inputs, lstm(inputs))
    model(x[:2])
    w, _ = _randomize_lstm(lstm, x.shape, rng)
    result = bn_keras.recompute_statistics(model, x, batch_size=12, progress=False)
    _, _, _, seen = reference_bn_lstm(x, w, training=True)
    assert set(result) == {"input_norm", "recurrent_norm", "cell_norm"}
    for name, (mean, variance) in seen.items():
        np.testing.assert_allclose(
            _numpy(_norms(lstm)[name].moving_mean), mean, **F32, err_msg=name
        )
        np.testing.assert_allclose(
            _numpy(_norms(lstm)[name].moving_variance), variance, **F32, err_msg=name
        )
    # The recompute changed only statistics: momentum is back.
    assert lstm.recurrent_norm.momentum == 0.9
    np.testing.assert_allclose(_numpy(lstm.kernel), w["kernel"], **F32)


def test_bn_lstm_bad_arguments():
    with pytest.raises(ValueError, match="units"):
        BatchNormLSTM(0, 3)
    with pytest.raises(ValueError, match="max_timesteps"):
        BatchNormLSTM(3, None)
    with pytest.raises(ValueError, match="momentum"):
        BatchNormLSTM(3, 4, momentum=-1)
    with pytest.raises(ValueError, match="initial_state"):
        BatchNormLSTM(3, 4)(np.zeros((2, 3, 2), "float32"), initial_state=[None])


def test_exported_from_the_package():
    assert bn_keras.BatchNormLSTM is BatchNormLSTM
    assert "TimestepBatchNorm" in bn_keras.__all__
