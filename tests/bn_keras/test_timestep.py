"""`TimestepBatchNorm` against a NumPy reference.

The reference follows Cooijmans et al. (2016), https://arxiv.org/abs/1603.09025:
per-timestep batch moments in training, per-timestep population statistics
(the last slot beyond T_max) in inference.
"""

import os

import keras
import numpy as np
import pytest
from keras import ops

from bn_keras import BatchNorm, TimestepBatchNorm
from tests import reference
from tests.bn_keras.helpers import BACKEND, EPSILON, F32_RECURRENT, as64


def _ema(moving, batch, momentum, ok):
    """The population statistics after one guarded EMA update, per slot."""
    return np.where(ok[:, None], reference.ema(moving, batch, momentum), moving)


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

    y = as64(layer(x, training=True))

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
    np.testing.assert_allclose(y, expected, **F32_RECURRENT)
    steps = shape[1]
    moving_mean = as64(layer.moving_mean)
    moving_variance = as64(layer.moving_variance)
    per_step = (steps,) + reference.param_shape(shape, axis)
    np.testing.assert_allclose(
        moving_mean[:steps], 0.1 * mean.reshape(per_step), **F32_RECURRENT
    )
    np.testing.assert_allclose(
        moving_variance[:steps], 0.9 + 0.1 * variance.reshape(per_step), **F32_RECURRENT
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
    np.testing.assert_allclose(as64(layer.moving_mean), moving_mean, **F32_RECURRENT)
    np.testing.assert_allclose(
        as64(layer.moving_variance), moving_variance, **F32_RECURRENT
    )


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
    np.testing.assert_allclose(y, y_full, **F32_RECURRENT)
    np.testing.assert_allclose(dx, dx_full, **F32_RECURRENT)
    np.testing.assert_allclose(
        grads["gamma"], grads_full["gamma"].sum(0), **F32_RECURRENT
    )
    np.testing.assert_allclose(
        grads["beta"], grads_full["beta"].sum(0), **F32_RECURRENT
    )
    np.testing.assert_allclose(
        as64(ours.moving_mean), as64(full.moving_mean), **F32_RECURRENT
    )
    np.testing.assert_allclose(
        as64(ours.moving_variance), as64(full.moving_variance), **F32_RECURRENT
    )
    np.testing.assert_allclose(as64(ours(x)), as64(full(x)), **F32_RECURRENT)


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
    np.testing.assert_allclose(as64(layer(x)), expected, **F32_RECURRENT)
    np.testing.assert_allclose(
        as64(layer(x, training=False)), expected, **F32_RECURRENT
    )
    # A batch of one is normalized as in the batch.
    np.testing.assert_allclose(as64(layer(x[1:2])), expected[1:2], **F32_RECURRENT)


def test_timestep_beyond_max_timesteps_in_training(rng):
    # Training with T > T_max: every timestep normalized with its own batch
    # moments; only timesteps below T_max enter the statistics.
    layer = TimestepBatchNorm(2, momentum=0.0)
    x = rng.normal(np.arange(5)[None, :, None], 1.0, (8, 5, 3)).astype("float32")
    y = as64(layer(x, training=True))
    mean, variance, _ = reference.timestep_moments(x)
    expected = (x - mean) / np.sqrt(variance + EPSILON)
    np.testing.assert_allclose(y, expected, **F32_RECURRENT)
    np.testing.assert_allclose(as64(layer.moving_mean), mean[:2], **F32_RECURRENT)
    np.testing.assert_allclose(
        as64(layer.moving_variance), variance[:2], **F32_RECURRENT
    )


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
    y = as64(layer(x, training=True, mask=mask))
    mean, variance, count = reference.timestep_moments(x, mask)
    expected = (x - mean) / np.sqrt(variance + EPSILON)
    np.testing.assert_allclose(y[mask], expected[mask], **F32_RECURRENT)
    # Timesteps 0-3 reached by two sequences or more; timestep 4 by none.
    ok = count > 1
    assert list(ok) == [True, True, True, True, False]
    moving_mean = np.where(ok[:, None], 0.5 * initial_mean + 0.5 * mean, initial_mean)
    np.testing.assert_allclose(as64(layer.moving_mean), moving_mean, **F32_RECURRENT)
    moving_variance = np.where(ok[:, None], 0.5 + 0.5 * variance, 1.0)
    np.testing.assert_allclose(
        as64(layer.moving_variance), moving_variance, **F32_RECURRENT
    )


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
            as64(layer.moving_mean)[t], np.mean(means, axis=0), **F32_RECURRENT
        )


def test_timestep_non_finite_batch_leaves_statistics(rng):
    layer = TimestepBatchNorm(3, momentum=0.5)
    x = rng.normal(size=(4, 3, 2)).astype("float32")
    layer(x, training=True)
    before_mean = as64(layer.moving_mean)
    before_variance = as64(layer.moving_variance)
    bad = rng.normal(size=(4, 3, 2)).astype("float32")
    bad[1, 1, 0] = np.nan
    bad[2, 2, 1] = np.inf
    layer(bad, training=True)
    after_mean = as64(layer.moving_mean)
    after_variance = as64(layer.moving_variance)
    assert np.isfinite(after_mean).all() and np.isfinite(after_variance).all()
    for t, f in [(1, 0), (2, 1)]:
        assert after_mean[t, f] == before_mean[t, f]
        assert after_variance[t, f] == before_variance[t, f]
    mean, variance, _ = reference.timestep_moments(bad)
    np.testing.assert_allclose(
        after_mean[0], 0.5 * before_mean[0] + 0.5 * mean[0], **F32_RECURRENT
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
    np.testing.assert_allclose(
        as64(layer.moving_variance), variance * 5 / 4, **F32_RECURRENT
    )


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
    np.testing.assert_allclose(as64(norm.moving_mean), mean[:4], **F32_RECURRENT)


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
    np.testing.assert_allclose(as64(layer.moving_mean)[:2], mean, **F32_RECURRENT)
    np.testing.assert_array_equal(as64(layer.moving_mean)[2], 0.0)
    long = rng.normal(size=(3, 5, 2)).astype("float32")
    slots = [0, 1, 2, 2, 2]
    statistics = as64(layer.moving_mean), as64(layer.moving_variance)
    expected = (long - statistics[0][slots]) / np.sqrt(statistics[1][slots] + EPSILON)
    np.testing.assert_allclose(as64(infer(long)), expected, **F32_RECURRENT)


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


def test_timestep_empty_sequence_raises_in_training(rng):
    # As an empty batch: no timestep to take moments of, a clear error on
    # every backend (before: gather or index errors); inference is empty.
    layer = TimestepBatchNorm(4)
    x = rng.normal(size=(3, 0, 5)).astype("float32")
    with pytest.raises(
        ValueError, match=r"sequence of length 0 \(input shape \(3, 0, 5\)"
    ):
        layer(x, training=True)
    assert tuple(layer(x, training=False).shape) == (3, 0, 5)
    layer(rng.normal(size=(3, 2, 5)).astype("float32"), training=True)
    with pytest.raises(ValueError, match="sequence of length 0"):
        layer(x, training=True)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function with None dims.")
def test_timestep_empty_sequence_raises_in_a_graph(rng):
    import tensorflow as tf

    layer = TimestepBatchNorm(3)
    layer.build((None, None, 2))
    signature = [tf.TensorSpec((None, None, 2))]
    train = tf.function(lambda x: layer(x, training=True), input_signature=signature)
    with pytest.raises(tf.errors.InvalidArgumentError, match="sequence of length 0"):
        train(np.zeros((4, 0, 2), "float32"))
    np.testing.assert_array_equal(as64(layer.moving_mean), 0.0)


def test_timestep_weights_of_another_max_timesteps_name_it(tmp_path):
    # Before: Keras' shape mismatch of `moving_mean`, not naming max_timesteps.
    def model(max_timesteps):
        inputs = keras.Input((None, 5))
        return keras.Model(
            inputs, TimestepBatchNorm(max_timesteps, name="norm")(inputs)
        )

    path = os.path.join(tmp_path, "norm.weights.h5")
    model(4).save_weights(path)
    match = r"norm were saved with max_timesteps=4 .* has max_timesteps=5"
    with pytest.raises(ValueError, match=match):
        model(5).load_weights(path)
    model(4).load_weights(path)
