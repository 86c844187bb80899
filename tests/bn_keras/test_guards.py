"""The population statistics are never silently corrupted, on every backend.

A ragged batch of one (statically known or not), a NaN or inf in a batch, a
mask that leaves a feature with a single value, an empty batch, ghost batches
that do not divide the batch: each is an error or leaves the statistics as
they were, and inference stays accurate at large means.
"""

import keras
import numpy as np
import pytest

from bn_keras import BatchNorm, recompute_statistics
from tests import reference
from tests.bn_keras.helpers import BACKEND, F32, as64, tensorflow_only

TF_ONLY = tensorflow_only("tf.function case.")


def _statistics(layer):
    return as64(layer.moving_mean), as64(layer.moving_variance)


def _fit_on_61(bn, jit_compile=False):
    """`fit()` on 61 examples with batch_size=60; returns the error or None."""
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, (61, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), bn])
    model.compile("sgd", "mse", jit_compile=jit_compile)
    try:
        model.fit(x, x, batch_size=60, epochs=1, verbose=0, shuffle=False)
    except Exception as error:  # the backend's own error type
        return x, error
    return x, None


def test_fit_with_a_ragged_batch_of_one_keeps_the_statistics():
    bn = BatchNorm(momentum=0.0)
    x, error = _fit_on_61(bn)
    # momentum 0: the statistics are those of the last batch that updated them,
    # the first 60 examples, not the variance 0 of the single last example.
    mean, variance = _statistics(bn)
    np.testing.assert_allclose(mean, x[:60].mean(0), **F32)
    np.testing.assert_allclose(variance, x[:60].var(0), **F32)
    # Every backend can raise here: JAX and torch see the shape (1, 4) in
    # Python, TensorFlow asserts at run time in its graph.
    assert error is not None
    assert "single value per feature" in str(error)


@TF_ONLY
def test_fit_under_xla_after_another_layer():
    """The check's message, formatted with string ops XLA cannot compile,
    is not built under XLA (a ragged last batch of 2 with a Dense first)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(130, 5)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(5), BatchNorm()])
    model.compile("sgd", "mse", jit_compile=True)
    model.fit(x, x, batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(as64(model.layers[1].moving_mean)).all()
    assert np.abs(as64(model.layers[1].moving_mean)).max() > 0


@TF_ONLY
def test_fit_under_xla_skips_the_update():
    # XLA drops assertions: the update is skipped in the graph instead.
    bn = BatchNorm(momentum=0.0)
    x, error = _fit_on_61(bn, jit_compile=True)
    assert error is None
    mean, variance = _statistics(bn)
    np.testing.assert_allclose(mean, x[:60].mean(0), **F32)
    np.testing.assert_allclose(variance, x[:60].var(0), **F32)


@TF_ONLY
@pytest.mark.parametrize("jit_compile", [False, True])
def test_tf_function_with_an_unknown_batch_size(jit_compile):
    import tensorflow as tf

    layer = BatchNorm(momentum=0.5)
    layer.build((None, 3))
    before = _statistics(layer)

    @tf.function(
        input_signature=[tf.TensorSpec((None, 3), tf.float32)],
        jit_compile=jit_compile,
    )
    def step(x):
        return layer(x, training=True)

    one = np.array([[1.0, 2.0, 3.0]], "float32")
    if jit_compile:
        step(one)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="single value"):
            step(one)
    for got, expected in zip(_statistics(layer), before, strict=True):
        np.testing.assert_array_equal(got, expected)
    # A proper batch through the same graph still updates them.
    batch = np.arange(12, dtype="float32").reshape(4, 3)
    step(batch)
    np.testing.assert_allclose(as64(layer.moving_mean), 0.5 * batch.mean(0), **F32)


def test_jax_jit_or_torch_batch_of_one_raises():
    layer = BatchNorm()
    layer.build((None, 3))
    x = np.ones((1, 3), "float32")
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        call = jax.jit(lambda t, n, x: layer.stateless_call(t, n, x, training=True))
        with pytest.raises(ValueError, match="single value per feature"):
            call(trainable, non_trainable, x)
    else:
        with pytest.raises(ValueError, match="single value per feature"):
            layer(x, training=True)


def test_empty_batch_is_an_error():
    layer = BatchNorm()
    with pytest.raises(ValueError, match="empty batch"):
        layer(np.zeros((0, 3), "float32"), training=True)
    # Inference on an empty batch is fine: nothing to normalize, no state.
    assert tuple(layer(np.zeros((0, 3), "float32")).shape) == (0, 3)


@TF_ONLY
def test_empty_batch_in_a_graph():
    import tensorflow as tf

    layer = BatchNorm()
    layer.build((None, 3))
    step = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec((None, 3), tf.float32)],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty batch"):
        step(np.zeros((0, 3), "float32"))


@TF_ONLY
def test_ghost_batches_that_do_not_divide_a_dynamic_batch():
    import tensorflow as tf

    layer = BatchNorm(virtual_batch_size=4)
    layer.build((None, 3))
    step = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec((None, 3), tf.float32)],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="virtual_batch_size=4"):
        step(np.ones((6, 3), "float32"))
    step(np.arange(24, dtype="float32").reshape(8, 3))  # a multiple is fine


def test_ghost_batches_that_do_not_divide_the_batch():
    with pytest.raises(ValueError, match="not a multiple of virtual_batch_size=4"):
        BatchNorm(virtual_batch_size=4)(np.ones((6, 3), "float32"), training=True)


GUARDED_OPTIONS = [
    {},
    {"momentum": None},
    {"debias": True},
    {"unbiased_variance": True},
    {"renorm": True},
    {"virtual_batch_size": 4},
]


@pytest.mark.parametrize("kwargs", GUARDED_OPTIONS, ids=str)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_batch_leaves_those_features_alone(kwargs, bad, rng):
    layer = BatchNorm(**kwargs)
    clean = rng.normal(1.0, 2.0, (8, 4)).astype("float32")
    layer(clean, training=True)
    before = {v.name: as64(v) for v in layer.non_trainable_weights}
    dirty = rng.normal(1.0, 2.0, (8, 4)).astype("float32")
    dirty[3, 2] = bad  # feature 2 only
    layer(dirty, training=True)
    for variable in layer.non_trainable_weights:
        if variable.name == "num_batches":
            continue  # other features did update
        after = as64(variable)
        assert np.isfinite(after).all(), variable.name
        np.testing.assert_array_equal(after[2], before[variable.name][2])
        assert not np.array_equal(after[[0, 1, 3]], before[variable.name][[0, 1, 3]])


def test_a_nan_batch_does_not_poison_later_inference(rng):
    """The measured failure: one NaN batch, 50 clean ones, NaN outputs for good."""
    layer = BatchNorm()
    nan_batch = np.full((16, 4), np.nan, "float32")
    layer(rng.normal(size=(16, 4)).astype("float32"), training=True)
    layer(nan_batch, training=True)
    for _ in range(50):
        layer(rng.normal(size=(16, 4)).astype("float32"), training=True)
    outputs = as64(layer(rng.normal(size=(100, 4)).astype("float32")))
    assert np.isfinite(outputs).all()


def test_finite_batches_equal_keras_exactly(rng):
    """The guards change nothing for finite inputs with default arguments."""
    ours, theirs = BatchNorm(), keras.layers.BatchNormalization()
    for step in range(5):
        x = rng.normal(step, 2.0, (16, 4)).astype("float32")
        np.testing.assert_allclose(
            as64(ours(x, training=True)), as64(theirs(x, training=True)), **F32
        )
    for a, b in zip(_statistics(ours), _statistics(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_masked_feature_with_one_value_keeps_its_statistics(rng):
    # (batch, time, features): example 0 has one unmasked step, example 1 none.
    x = rng.normal(size=(2, 3, 4)).astype("float32")
    mask = np.array([[True, False, False], [False, False, False]])
    layer = BatchNorm()
    layer(x, training=True, mask=mask)
    mean, variance = _statistics(layer)
    np.testing.assert_array_equal(mean, np.zeros(4))
    np.testing.assert_array_equal(variance, np.ones(4))


def test_nan_padding_under_a_mask_does_not_leak(rng):
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    mask = rng.random((4, 5)) < 0.6
    mask[:, 0] = True
    padded = np.where(mask[..., None], x, np.nan).astype("float32")
    layer = BatchNorm(momentum=0.0)
    y = as64(layer(padded, training=True, mask=mask))
    assert np.isfinite(y[mask]).all()
    mean, variance, _ = reference.moments(x, -1, mask)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, **F32)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, **F32)


@pytest.mark.parametrize("shape", [(4, 3, 5), (4, 3, 5, 6)], ids=["rank3", "rank4"])
def test_keras_mask_for_a_channels_first_axis(shape, rng):
    """Keras' mask has the input's shape without its LAST axis, for any axis."""
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    mask = rng.random(shape[:-1]) < 0.7
    ours, theirs = BatchNorm(axis=1), keras.layers.BatchNormalization(axis=1)
    np.testing.assert_allclose(
        as64(ours(x, training=True, mask=mask)),
        as64(theirs(x, training=True, mask=mask)),
        rtol=1e-4,
        atol=1e-4,
    )
    for a, b in zip(_statistics(ours), _statistics(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_masking_layer_upstream_of_a_channels_first_bn(rng):
    x = rng.normal(size=(4, 6, 3)).astype("float32")
    x[:, 4:] = 0.0  # padded steps, masked by Masking
    inputs = keras.Input((6, 3))
    outputs = BatchNorm(axis=1, momentum=0.0)(keras.layers.Masking()(inputs))
    model = keras.Model(inputs, outputs)
    model(x, training=True)
    mask = np.any(x != 0.0, axis=-1)
    valid = reference.expand_mask(mask, x.shape)
    # axis=1: statistics per step over the batch and features, unmasked only.
    expected = [
        x[:, t][valid[:, t]].mean() if valid[:, t].any() else 0.0 for t in range(6)
    ]
    np.testing.assert_allclose(as64(model.layers[-1].moving_mean), expected, **F32)


@pytest.mark.parametrize("make", [BatchNorm, keras.layers.BatchNormalization])
def test_recompute_statistics_repairs_a_nan_state(make, rng):
    model = keras.Sequential([keras.Input((4,)), make()])
    bn = model.layers[-1]
    bn.moving_mean.assign(np.full(4, np.nan, "float32"))
    bn.moving_variance.assign(np.full(4, np.inf, "float32"))
    x = rng.normal(3.0, 2.0, (120, 4)).astype("float32")
    recompute_statistics(model, x, batch_size=40, progress=False)
    np.testing.assert_allclose(as64(bn.moving_mean), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(as64(bn.moving_variance), x.var(0), rtol=1e-5)


def test_recompute_statistics_refuses_non_finite_data(rng):
    model = keras.Sequential([keras.Input((4,)), BatchNorm()])
    x = rng.normal(size=(40, 4)).astype("float32")
    x[25, 1] = np.nan
    before = _statistics(model.layers[-1])
    with pytest.raises(ValueError, match="Batch 1 of `data` holds a NaN"):
        recompute_statistics(model, x, batch_size=20, progress=False)
    for got, expected in zip(_statistics(model.layers[-1]), before, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_inference_at_a_large_mean_is_accurate(rng):
    """Mean 1e6, std 1e-2, float32: as accurate as training mode."""
    x = rng.normal(1e6, 1e-2, (2000, 50)).astype("float32")
    layer = BatchNorm(momentum=0.0)
    layer(x, training=True)
    mean, variance = _statistics(layer)
    y = as64(layer(x, training=False))
    expected = reference.normalize(x, mean, variance, None, None, 1e-3, -1)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-3)
    # Control: the usual fold x * a + (beta - mean * a) in float32 (Keras'
    # inference on TensorFlow and JAX) cancels terms of ~3e7: 3.7e-2 here.
    a = (1.0 / np.sqrt(variance + 1e-3)).astype("float32")
    folded = x * a + (-mean.astype("float32") * a)
    assert np.abs(folded - expected).max() > 1e-2


def _fit_error(bn, n, batch_size, features=4):
    """The error of `fit()` on `n` examples in batches of `batch_size`."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, features)).astype("float32")
    model = keras.Sequential([keras.Input((features,)), bn])
    model.compile("sgd", "mse")
    with pytest.raises(Exception) as info:  # the backend's own error type
        model.fit(x, x, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    return str(info.value)


@pytest.mark.parametrize(
    "kwargs, n, batch_size, expected",
    [
        # The last batch of fit() is ragged: its size is known only at run
        # time inside TensorFlow's graph, and printed as numbers there too.
        ({}, 61, 60, "single value per feature (input shape (1, 4)"),
        ({"virtual_batch_size": 4}, 18, 8, "input shape (2, 4)) is not a multiple"),
        # Known when the step is traced: a ValueError on every backend.
        ({}, 1, 1, "single value per feature (input shape (1, 4)"),
        ({"virtual_batch_size": 4}, 10, 10, "input shape (10, 4)) is not a multiple"),
    ],
)
def test_fit_errors_print_the_input_shape_as_numbers(kwargs, n, batch_size, expected):
    message = _fit_error(BatchNorm(**kwargs), n, batch_size)
    assert expected in message
    assert "Tensor" not in message.split(expected)[0].splitlines()[-1]
    assert "strided_slice" not in message


@pytest.mark.parametrize("method", ["fit", "predict"])
def test_a_wrong_feature_size_is_named_after_running_on_other_data(method):
    # Without an Input, TensorFlow's step is traced again with the feature
    # size unknown, and Keras' input spec lets the input through (to a
    # broadcast error in fit, a TypeError in the fused kernel in predict).
    rng = np.random.default_rng(3)
    model = keras.Sequential([BatchNorm()])
    model.compile("sgd", "mse")
    run = {
        "fit": lambda x: model.fit(x, x, verbose=0),
        "predict": lambda x: model.predict(x, verbose=0),
    }[method]
    run(rng.normal(size=(8, 4)).astype("float32"))
    with pytest.raises(Exception) as info:  # the backend's own error type
        run(rng.normal(size=(8, 5)).astype("float32"))
    message = str(info.value)
    assert "(8, 5)" in message
    assert "Incompatible shapes" not in message
    assert "Failed to convert" not in message


@TF_ONLY
@pytest.mark.parametrize(
    "kwargs, spec, x, expected",
    [
        ({}, (None, 3), np.ones((1, 3)), "(input shape (1, 3), reduced over"),
        ({}, (None, 3), np.ones((0, 3)), "empty batch (input shape (0, 3))"),
        ({"virtual_batch_size": 4}, (None, 3), np.ones((6, 3)), "shape (6, 3))"),
        (
            {"fused": True},
            (None, 1, 1, 3),
            np.ones((1, 1, 1, 3)),
            "(input shape (1, 1, 1, 3), reduced over",
        ),
        (
            {},
            (None, None),
            np.ones((4, 5)),
            "built for inputs with 3 features on axis 1, and this input has "
            "another number. Received: inputs.shape=(4, 5)",
        ),
    ],
)
def test_graph_assertions_print_the_run_time_shape(kwargs, spec, x, expected):
    import tensorflow as tf

    layer = BatchNorm(**kwargs)
    layer.build(spec[:-1] + (3,))
    step = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec(spec, tf.float32)],
    )
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        step(x.astype("float32"))
    assert expected in str(info.value)
    assert "Tensor" not in str(info.value).split("assertion failed")[-1]
