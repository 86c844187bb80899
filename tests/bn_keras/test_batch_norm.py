"""BatchNorm against the float64 NumPy reference: transforms, updates, gradients.

Also the drop-in contract with `keras.layers.BatchNormalization` that needs no
training (signature, weights, config), dtypes, mixed precision and numerics.
"""

import inspect

import keras
import numpy as np
import pytest
from keras import ops

from bn_keras import BatchNorm
from tests import reference
from tests.bn_keras.helpers import BACKEND, F32, as64, random_inputs


def _float64_computes_in_float64():
    if BACKEND != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


FLOAT64 = pytest.mark.skipif(
    not _float64_computes_in_float64(),
    reason="JAX computes float64 layers in float32 unless jax_enable_x64 is set.",
)

# Explicit tolerances, one per compute precision. Inputs have a spread of a
# few units, so outputs are O(1).
F64 = {"rtol": 1e-10, "atol": 1e-10}
F16 = {"rtol": 1e-2, "atol": 1e-2}
BF16 = {"rtol": 3e-2, "atol": 3e-2}

# Ranks 2 to 5; last, negative, non-last and tuple axes (one unsorted).
SHAPES_AND_AXES = [
    ((16, 5), -1),
    ((16, 5), 1),
    ((8, 4, 3), -1),
    ((8, 4, 3), 1),
    ((8, 4, 3), -2),
    ((8, 4, 3), (1, 2)),
    ((4, 3, 5, 2), -1),
    ((4, 3, 5, 2), 1),
    ((4, 3, 5, 2), (1, -1)),
    ((4, 3, 5, 2), (2, 1)),
    ((3, 2, 3, 4, 2), -1),
    ((3, 2, 3, 4, 2), 1),
    ((3, 2, 3, 4, 2), (-1, 2)),
]


@pytest.mark.parametrize("shape, axis", SHAPES_AND_AXES)
def test_training_and_inference_match_reference(shape, axis, rng, set_random_weights):
    momentum, epsilon = 0.9, 1e-3
    layer = BatchNorm(axis=axis, momentum=momentum, epsilon=epsilon)
    w = set_random_weights(layer, shape)
    assert tuple(layer.moving_mean.shape) == reference.param_shape(shape, axis)
    mean, variance = w["moving_mean"], w["moving_variance"]
    for _ in range(3):
        x = random_inputs(rng, shape)
        y = layer(x, training=True)
        expected, batch_mean, batch_var, _ = reference.train_transform(
            x, w["gamma"], w["beta"], epsilon, axis
        )
        np.testing.assert_allclose(as64(y), expected, **F32)
        mean = reference.ema(mean, batch_mean, momentum)
        variance = reference.ema(variance, batch_var, momentum)
        np.testing.assert_allclose(as64(layer.moving_mean), mean, **F32)
        np.testing.assert_allclose(as64(layer.moving_variance), variance, **F32)

    x = random_inputs(rng, shape)
    expected = reference.normalize(
        x, mean, variance, w["gamma"], w["beta"], epsilon, axis
    )
    np.testing.assert_allclose(as64(layer(x, training=False)), expected, **F32)
    np.testing.assert_allclose(as64(layer(x)), expected, **F32)


@pytest.mark.parametrize(
    "center, scale", [(False, True), (True, False), (False, False)]
)
def test_center_and_scale_off(center, scale, rng, set_random_weights):
    shape, axis, epsilon = (8, 4, 3), -1, 1e-3
    layer = BatchNorm(center=center, scale=scale)
    w = set_random_weights(layer, shape)
    assert ("gamma" in w) == scale and ("beta" in w) == center
    x = random_inputs(rng, shape)
    gamma, beta = w.get("gamma"), w.get("beta")
    expected = reference.normalize(
        x, w["moving_mean"], w["moving_variance"], gamma, beta, epsilon, axis
    )
    np.testing.assert_allclose(as64(layer(x, training=False)), expected, **F32)
    expected, *_ = reference.train_transform(x, gamma, beta, epsilon, axis)
    np.testing.assert_allclose(as64(layer(x, training=True)), expected, **F32)


@pytest.mark.parametrize("training", [False, None])
def test_inference_updates_nothing(training, rng, set_random_weights):
    layer = BatchNorm()
    w = set_random_weights(layer, (16, 5))
    layer(random_inputs(rng, (16, 5)), training=training)
    np.testing.assert_array_equal(as64(layer.moving_mean), w["moving_mean"])
    np.testing.assert_array_equal(as64(layer.moving_variance), w["moving_variance"])


def test_trainable_false_means_inference(rng, set_random_weights):
    layer = BatchNorm()
    w = set_random_weights(layer, (16, 5))
    layer.trainable = False
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 4
    x = random_inputs(rng, (16, 5))
    expected = reference.normalize(
        x, w["moving_mean"], w["moving_variance"], w["gamma"], w["beta"], 1e-3, -1
    )
    np.testing.assert_allclose(as64(layer(x, training=True)), expected, **F32)
    np.testing.assert_array_equal(as64(layer.moving_mean), w["moving_mean"])
    np.testing.assert_array_equal(as64(layer.moving_variance), w["moving_variance"])

    layer.trainable = True
    expected, *_ = reference.train_transform(x, w["gamma"], w["beta"], 1e-3, -1)
    np.testing.assert_allclose(as64(layer(x, training=True)), expected, **F32)
    assert not np.allclose(as64(layer.moving_mean), w["moving_mean"])


def test_momentum_zero_and_one(rng):
    x = random_inputs(rng, (32, 4))
    _, mean, variance, _ = reference.train_transform(x, None, None, 1e-3, -1)
    fast = BatchNorm(momentum=0.0)
    fast(x, training=True)
    np.testing.assert_allclose(as64(fast.moving_mean), mean, **F32)
    np.testing.assert_allclose(as64(fast.moving_variance), variance, **F32)
    frozen = BatchNorm(momentum=1.0)
    frozen(x, training=True)
    np.testing.assert_array_equal(as64(frozen.moving_mean), np.zeros(4))
    np.testing.assert_array_equal(as64(frozen.moving_variance), np.ones(4))


@pytest.mark.parametrize("batch", [64, 7])
def test_single_example_inference_equals_batch_inference(
    batch, rng, set_random_weights
):
    layer = BatchNorm(axis=1)
    set_random_weights(layer, (batch, 3, 4))
    for _ in range(3):
        layer(random_inputs(rng, (batch, 3, 4)), training=True)
    x = random_inputs(rng, (batch, 3, 4))
    whole = ops.convert_to_numpy(layer(x, training=False))
    for i in (0, batch // 2, batch - 1):
        single = ops.convert_to_numpy(layer(x[i : i + 1], training=False))
        np.testing.assert_allclose(single[0], whole[i], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape, axis", SHAPES_AND_AXES[::2])
@pytest.mark.parametrize("scale", [True, False])
def test_training_gradients_match_reference(
    shape, axis, scale, rng, set_random_weights, call_with_gradients
):
    layer = BatchNorm(axis=axis, scale=scale)
    w = set_random_weights(layer, shape)
    x = random_inputs(rng, shape)
    dy = rng.normal(size=shape)
    y, dx, grads = call_with_gradients(layer, x, dy)
    gamma = w.get("gamma")
    expected_dx, dgamma, dbeta = reference.train_gradients(x, dy, gamma, 1e-3, axis)
    np.testing.assert_allclose(
        y, reference.train_transform(x, gamma, w["beta"], 1e-3, axis)[0], **F32
    )
    # Gradients cancel out partly: tolerance relative to their largest entry.
    atol = 1e-5 * np.abs(expected_dx).max()
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(grads["beta"], dbeta, rtol=1e-5, atol=1e-4)
    if scale:
        np.testing.assert_allclose(grads["gamma"], dgamma, rtol=1e-5, atol=1e-4)
    else:
        assert set(grads) == {"beta"}


def test_inference_gradients_match_reference(
    rng, set_random_weights, call_with_gradients
):
    shape, axis = (8, 3, 4), 1
    layer = BatchNorm(axis=axis)
    w = set_random_weights(layer, shape)
    x = random_inputs(rng, shape)
    dy = rng.normal(size=shape)
    _, dx, grads = call_with_gradients(layer, x, dy, training=False)
    inv = reference.expand(1.0 / np.sqrt(w["moving_variance"] + 1e-3), shape, axis)
    x_hat = (x - reference.expand(w["moving_mean"], shape, axis)) * inv
    np.testing.assert_allclose(
        dx, dy * inv * reference.expand(w["gamma"], shape, axis), **F32
    )
    np.testing.assert_allclose(
        grads["gamma"], np.sum(dy * x_hat, (0, 2)), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(grads["beta"], np.sum(dy, (0, 2)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "input_dtype, layer_dtype, output_dtype, tol",
    [
        ("float32", None, "float32", F32),
        ("float16", None, "float32", F32),
        pytest.param("float64", "float64", "float64", F64, marks=FLOAT64),
        ("float16", "float16", "float16", F16),
        ("float32", "mixed_float16", "float16", F16),
        ("float16", "mixed_float16", "float16", F16),
        ("float32", "mixed_bfloat16", "bfloat16", BF16),
    ],
)
def test_dtypes(input_dtype, layer_dtype, output_dtype, tol, rng, set_random_weights):
    shape, axis = (16, 3, 4), (1, 2)
    layer = BatchNorm(axis=axis, momentum=0.5, dtype=layer_dtype)
    w = set_random_weights(layer, shape)
    x = random_inputs(rng, shape, dtype=input_dtype)
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == output_dtype
    expected, mean, variance, _ = reference.train_transform(
        x, w["gamma"], w["beta"], 1e-3, axis
    )
    np.testing.assert_allclose(as64(y), expected, **tol)
    # Statistics are at least float32, whatever the input.
    stat_tol = (
        F64 if layer_dtype == "float64" else F16 if layer_dtype == "float16" else F32
    )
    expected_mean = reference.ema(w["moving_mean"], mean, 0.5)
    np.testing.assert_allclose(as64(layer.moving_mean), expected_mean, **stat_tol)
    y = layer(x, training=False)
    assert keras.backend.standardize_dtype(y.dtype) == output_dtype
    expected = reference.normalize(
        x,
        as64(layer.moving_mean),
        as64(layer.moving_variance),
        w["gamma"],
        w["beta"],
        1e-3,
        axis,
    )
    np.testing.assert_allclose(as64(y), expected, **tol)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("renorm", [False, True])
def test_mixed_precision_keeps_weights_float32(policy, renorm):
    keras.config.set_dtype_policy(policy)
    layer = BatchNorm(renorm=renorm, momentum=None)
    layer.build((None, 3))
    for variable in layer.weights:
        expected = "int32" if variable.name == "num_batches" else "float32"
        assert variable.dtype == expected, variable.name
    y = layer(np.ones((4, 3), "float32") * np.arange(4)[:, None], training=True)
    assert keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]


@pytest.mark.parametrize("dtype", [None, "mixed_float16", "float16"])
def test_float16_inputs_near_float16_max(dtype, rng):
    # float16 spacing near 6e4 is 32, so 60000 + 32k is exact; squares overflow.
    x = (60000.0 + 32.0 * rng.integers(-4, 5, size=(64, 3))).astype("float16")
    assert np.isinf(np.square(x)).all()
    expected, mean, variance, _ = reference.train_transform(x, None, None, 1e-3, -1)
    layer = BatchNorm(momentum=0.0, dtype=dtype)
    y = as64(layer(x, training=True))
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, expected, **F16)
    # float16 statistics (plain float16 policy) hold 6e4 to within 16.
    stat_tol = F16 if dtype == "float16" else F32
    np.testing.assert_allclose(as64(layer.moving_mean), mean, **stat_tol)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, **stat_tol)
    if dtype != "float16":
        y = as64(layer(x, training=False))
        assert np.isfinite(y).all()
        np.testing.assert_allclose(y, expected, **F16)


def test_float32_inputs_above_float16_max_under_mixed_float16(rng):
    x = rng.normal(7e4, 100.0, size=(32, 3)).astype("float32")
    layer = BatchNorm(momentum=0.0, dtype="mixed_float16")
    y = as64(layer(x, training=True))
    expected, mean, variance, _ = reference.train_transform(x, None, None, 1e-3, -1)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, expected, **F16)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, rtol=1e-6)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, rtol=1e-4)
    np.testing.assert_allclose(as64(layer(x, training=False)), expected, **F16)


def test_large_mean_small_spread(rng):
    x = rng.normal(1e4, 1.0, size=(256, 4)).astype("float32")
    layer = BatchNorm(momentum=0.0)
    y = as64(layer(x, training=True))
    expected, mean, variance, _ = reference.train_transform(x, None, None, 1e-3, -1)
    # One-pass E[x^2] - E[x]^2 in float32 is off by units here (ulp of 1e8 is
    # 8), so these bounds need the two-pass variance. The output bound, 1% of
    # the spread, leaves room for the float32 mean of 1e4-sized values.
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-2)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, rtol=1e-6)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, rtol=1e-3)


@pytest.mark.parametrize("renorm", [False, True])
def test_variance_never_negative(renorm):
    # Identical values: any cancellation error would show as a negative variance.
    x = np.full((64, 5), 12345.678, "float32")
    layer = BatchNorm(momentum=0.0, renorm=renorm)
    y = as64(layer(x, training=True))
    assert np.isfinite(y).all()
    variance = as64(layer.moving_variance)
    assert (variance >= 0.0).all()
    # Zero up to the float32 rounding of the mean of 12345.678 (ulp ~1e-3).
    np.testing.assert_allclose(variance, 0.0, atol=1e-4)


def test_signature_matches_keras():
    ours = inspect.signature(BatchNorm).parameters
    theirs = inspect.signature(keras.layers.BatchNormalization).parameters
    for name, parameter in theirs.items():
        assert name in ours, name
        assert ours[name].default == parameter.default, name
    assert list(ours)[: len(theirs) - 1] == list(theirs)[:-1]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"center": False}, {"scale": False}, {"renorm": True}, {"axis": 1}],
)
def test_weights_match_keras(kwargs):
    ours = BatchNorm(**kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours.build((None, 4, 3))
    theirs.build((None, 4, 3))
    for a, b in [
        (ours.weights, theirs.weights),
        (ours.trainable_weights, theirs.trainable_weights),
        (ours.non_trainable_weights, theirs.non_trainable_weights),
    ]:
        assert [(v.name, tuple(v.shape), v.dtype) for v in a] == [
            (v.name, tuple(v.shape), v.dtype) for v in b
        ]
    for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_matches_keras_defaults():
    ours = BatchNorm(name="bn").get_config()
    theirs = keras.layers.BatchNormalization(name="bn").get_config()
    for key, value in theirs.items():
        assert ours[key] == value, key


def test_regularizers(rng, set_random_weights):
    layer = BatchNorm(
        beta_regularizer=keras.regularizers.L1(0.1),
        gamma_regularizer=keras.regularizers.L2(0.2),
    )
    w = set_random_weights(layer, (8, 3))
    layer(random_inputs(rng, (8, 3)), training=True)
    losses = sorted(float(ops.convert_to_numpy(loss)) for loss in layer.losses)
    expected = sorted([0.1 * np.abs(w["beta"]).sum(), 0.2 * (w["gamma"] ** 2).sum()])
    np.testing.assert_allclose(losses, expected, rtol=1e-6)


def test_constraints_are_applied_in_fit(rng):
    layer = BatchNorm(
        beta_constraint="non_neg", gamma_constraint=keras.constraints.MaxNorm(0.5)
    )
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    x = random_inputs(rng, (32, 3))
    model.fit(x, x * 0.0 - 5.0, batch_size=8, epochs=1, verbose=0)
    assert (as64(layer.beta) >= 0.0).all()
    assert np.linalg.norm(as64(layer.gamma)) <= 0.5 + 1e-6


@pytest.mark.parametrize("kwargs", [{"momentum": None}, {"debias": True}])
def test_batch_counter_weight(kwargs):
    layer = BatchNorm(**kwargs)
    layer.build((None, 3))
    assert [v.name for v in layer.weights][-1] == "num_batches"
    assert layer.num_batches.dtype == "int32"
    assert layer.num_batches.shape == ()
    assert "num_batches" in [v.name for v in layer.non_trainable_weights]
    plain = BatchNorm()
    plain.build((None, 3))
    assert "num_batches" not in [v.name for v in plain.weights]
