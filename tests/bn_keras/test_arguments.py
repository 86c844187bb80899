"""BatchNorm's arguments against Keras' layer; inputs never silently wrong.

Whatever `keras.layers.BatchNormalization` accepts, `BatchNorm` accepts with
the same effect, except for the values listed as stricter here (each of
which Keras turns into a silently wrong layer); whatever `BatchNorm`
rejects, it rejects with a message that names the argument.
"""

import inspect
import json
import re

import keras
import numpy as np
import pytest
from keras import ops

from bn_keras import BatchNorm
from tests import reference
from tests.bn_keras.helpers import BACKEND, EPSILON, F32, as64

NAN, INF = float("nan"), float("inf")
SHAPE = (6, 3, 4)
RENORM = {"renorm": True}

# (kwargs, expectation): "same" (if Keras accepts, BatchNorm accepts with the
# same outputs, weights and statistics; if BatchNorm rejects, Keras rejects
# too), or "stricter" (Keras accepts a value that makes no sense; BatchNorm
# raises a ValueError naming the argument).
CASES = [
    ({"axis": 1}, "same"),
    ({"axis": -1}, "same"),
    ({"axis": 0}, "same"),
    ({"axis": np.int64(1)}, "same"),
    ({"axis": np.int32(-2)}, "same"),
    ({"axis": np.uint8(2)}, "same"),
    ({"axis": np.array(1)}, "same"),
    ({"axis": 3}, "same"),
    ({"axis": -4}, "same"),
    ({"axis": None}, "same"),
    ({"axis": [1]}, "same"),
    ({"axis": "feature"}, "same"),
    # int() in Keras: 1.5 becomes 1, True becomes 1, "1" becomes 1.
    ({"axis": 1.5}, "stricter"),
    ({"axis": 1.0}, "stricter"),
    ({"axis": np.float64(2.0)}, "stricter"),
    ({"axis": True}, "stricter"),
    ({"axis": np.bool_(True)}, "stricter"),
    ({"axis": "1"}, "stricter"),
    ({"momentum": 0.9}, "same"),
    ({"momentum": np.float32(0.5)}, "same"),
    ({"momentum": np.float64(0.5)}, "same"),
    ({"momentum": "0.5"}, "same"),
    ({"momentum": 0}, "same"),
    ({"momentum": 1}, "same"),
    ({"momentum": np.int64(0)}, "same"),
    ({"momentum": "high"}, "same"),
    ({"momentum": True}, "stricter"),
    ({"momentum": 1.5}, "stricter"),
    ({"momentum": -0.1}, "stricter"),
    ({"momentum": NAN}, "stricter"),
    ({"epsilon": 1e-2}, "same"),
    ({"epsilon": np.float32(1e-2)}, "same"),
    ({"epsilon": "0.01"}, "same"),
    ({"epsilon": 1}, "same"),
    ({"epsilon": None}, "same"),
    ({"epsilon": 0}, "stricter"),
    ({"epsilon": -1e-3}, "stricter"),
    ({"epsilon": 1e-50}, "stricter"),
    ({"epsilon": 1e-40}, "stricter"),
    ({"epsilon": 1e39}, "stricter"),
    ({"epsilon": NAN}, "stricter"),
    ({"epsilon": INF}, "stricter"),
    ({"epsilon": True}, "stricter"),
    ({"center": False}, "same"),
    ({"center": 0}, "same"),
    ({"center": np.bool_(False)}, "same"),
    ({"center": None}, "same"),
    ({"scale": False}, "same"),
    ({"scale": 1}, "same"),
    ({"scale": np.bool_(True)}, "same"),
    ({"beta_initializer": "ones"}, "same"),
    ({"beta_initializer": keras.initializers.Constant(0.5)}, "same"),
    (
        {"beta_initializer": {"class_name": "Constant", "config": {"value": 2.0}}},
        "same",
    ),
    ({"beta_initializer": "bogus"}, "same"),
    ({"beta_initializer": 1.5}, "same"),
    ({"gamma_initializer": "zeros"}, "same"),
    ({"gamma_initializer": "bogus"}, "same"),
    ({"moving_mean_initializer": "ones"}, "same"),
    ({"moving_mean_initializer": "bogus"}, "same"),
    ({"moving_variance_initializer": keras.initializers.Constant(4.0)}, "same"),
    ({"moving_variance_initializer": "bogus"}, "same"),
    ({"beta_regularizer": "l2"}, "same"),
    ({"beta_regularizer": keras.regularizers.L1(0.1)}, "same"),
    ({"beta_regularizer": "bogus"}, "same"),
    ({"gamma_regularizer": "l1"}, "same"),
    ({"gamma_regularizer": 0.1}, "same"),
    ({"beta_constraint": "non_neg"}, "same"),
    ({"beta_constraint": "bogus"}, "same"),
    ({"gamma_constraint": keras.constraints.MaxNorm(2.0)}, "same"),
    ({"gamma_constraint": "bogus"}, "same"),
    ({"renorm": True}, "same"),
    ({"renorm": 1}, "same"),
    ({"renorm": np.bool_(True)}, "same"),
    ({"renorm": 0}, "same"),
    ({**RENORM, "renorm_clipping": {}}, "same"),
    ({**RENORM, "renorm_clipping": {"rmax": 1.5, "rmin": 0.5, "dmax": 0.1}}, "same"),
    ({**RENORM, "renorm_clipping": {"rmax": np.float32(1.2)}}, "same"),
    ({**RENORM, "renorm_clipping": {"rmax": 2}}, "same"),
    ({**RENORM, "renorm_clipping": {"rmax": INF, "dmax": INF}}, "same"),
    ({**RENORM, "renorm_clipping": {"rmin": -INF}}, "same"),
    ({**RENORM, "renorm_clipping": {"rmax": None, "dmax": None}}, "same"),
    ({**RENORM, "renorm_clipping": {"rmax": 0.5, "rmin": 2.0}}, "same"),
    ({**RENORM, "renorm_clipping": {"dmax": -1.0}}, "same"),
    ({**RENORM, "renorm_clipping": {"rmaxx": 3.0}}, "same"),
    ({**RENORM, "renorm_clipping": {"rmax": NAN}}, "stricter"),
    ({**RENORM, "renorm_clipping": {"rmin": np.float32(NAN)}}, "stricter"),
    ({**RENORM, "renorm_clipping": {"dmax": NAN}}, "stricter"),
    ({**RENORM, "renorm_clipping": {"rmax": -INF}}, "stricter"),
    ({**RENORM, "renorm_clipping": {"rmin": INF}}, "stricter"),
    ({**RENORM, "renorm_clipping": {"rmax": 0.0}}, "stricter"),
    ({**RENORM, "renorm_clipping": {"rmax": True}}, "stricter"),
    # Keras checks renorm_clipping only with renorm=True.
    ({"renorm_clipping": {"rmax": NAN}}, "stricter"),
    ({**RENORM, "renorm_momentum": 0.5}, "same"),
    ({**RENORM, "renorm_momentum": np.float32(0.5)}, "same"),
    ({**RENORM, "renorm_momentum": 1.5}, "stricter"),
    ({**RENORM, "renorm_momentum": NAN}, "stricter"),
    ({"renorm_momentum": None}, "stricter"),
    ({"synchronized": True}, "same"),
    ({"synchronized": 0}, "same"),
    ({"name": "bn"}, "same"),
    ({"trainable": False}, "same"),
    ({"dtype": "mixed_float16"}, "same"),
    ({"bogus_keyword": 1}, "same"),
]


def _id(case):
    """A test id that is the same in every process (pytest-xdist compares the
    workers' collections): objects are named by their class, not by `repr`,
    which holds their memory address."""
    (kwargs, expectation) = case

    def name(value):
        if isinstance(value, str | int | float | bool | type(None) | tuple | list):
            return repr(value)
        if isinstance(value, np.generic | np.ndarray):
            return f"{type(value).__name__}({value.tolist()!r})"
        return type(value).__name__

    items = ", ".join(f"{key}={name(value)}" for key, value in kwargs.items())
    return f"{expectation}-{items}"


def _inputs():
    rng = np.random.default_rng(7)
    return rng.normal(2.0, 3.0, SHAPE).astype("float32")


def _run(layer_class, kwargs):
    """`(effect, None)` or `(None, error)`: the layer made, built and called."""
    try:
        layer = layer_class(**kwargs)
        x = _inputs()
        initial = {w.name: as64(w) for w in _built(layer, x).weights}
        trained = ops.convert_to_numpy(layer(x, training=True))
        statistics = {w.name: as64(w) for w in layer.non_trainable_weights}
        inferred = ops.convert_to_numpy(layer(x, training=False))
        losses = [float(ops.convert_to_numpy(loss)) for loss in layer.losses]
    except Exception as error:  # noqa: BLE001 - recorded and compared below
        return None, error
    return (initial, trained, statistics, inferred, losses), None


def _built(layer, x):
    layer.build(x.shape)
    return layer


def _names_the_argument(error, kwargs):
    text = str(error)
    return any(name in text for name in kwargs)


def _assert_same_effect(ours, theirs):
    (initial, trained, statistics, inferred, losses) = ours
    (k_initial, k_trained, k_statistics, k_inferred, k_losses) = theirs
    assert set(k_initial) <= set(initial)
    for name, value in k_initial.items():
        np.testing.assert_allclose(initial[name], value, **F32, err_msg=name)
    for name, value in k_statistics.items():
        np.testing.assert_allclose(statistics[name], value, **F32, err_msg=name)
    tolerance = F32 if trained.dtype == np.float32 else {"rtol": 1e-2, "atol": 1e-2}
    np.testing.assert_allclose(trained, k_trained, **tolerance)
    np.testing.assert_allclose(inferred, k_inferred, **tolerance)
    np.testing.assert_allclose(sorted(losses), sorted(k_losses), **F32)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_arguments_as_keras(case):
    kwargs, expectation = case
    ours, our_error = _run(BatchNorm, kwargs)
    theirs, keras_error = _run(keras.layers.BatchNormalization, kwargs)
    if expectation == "stricter":
        assert keras_error is None, f"Keras rejects it too: {keras_error}"
        assert isinstance(our_error, ValueError), our_error
        assert _names_the_argument(our_error, kwargs), our_error
        return
    if our_error is not None:
        assert keras_error is not None, (
            f"Keras accepts it, BatchNorm raises {our_error!r}"
        )
        assert _names_the_argument(our_error, kwargs), our_error
        return
    if keras_error is None:
        _assert_same_effect(ours, theirs)


def test_cases_cover_every_argument_of_keras_layer():
    names = set(inspect.signature(keras.layers.BatchNormalization.__init__).parameters)
    covered = {name for kwargs, _ in CASES for name in kwargs}
    assert names - {"self", "kwargs"} <= covered


@pytest.mark.parametrize(
    "axis, stored",
    [
        (np.int64(1), 1),
        (np.int32(-1), -1),
        (np.array(2), 2),
        ((np.int64(1), np.int8(2)), (1, 2)),
        ([np.uint16(2)], (2,)),
    ],
    ids=repr,
)
def test_numpy_integer_axes_are_stored_as_python_ints(axis, stored):
    layer = BatchNorm(axis=axis)
    assert layer.axis == stored
    assert json.loads(json.dumps(layer.get_config()))["axis"] == (
        list(stored) if isinstance(stored, tuple) else stored
    )


@pytest.mark.parametrize(
    "value", [np.int64(4), np.int32(2), np.uint8(2), np.array(4), np.float32(4.0)]
)
def test_numpy_integer_virtual_batch_size(value):
    assert BatchNorm(virtual_batch_size=value).virtual_batch_size == int(value)


@pytest.mark.parametrize("value", [np.bool_(True), np.float32(2.5), np.int64(0)])
def test_bad_numpy_virtual_batch_size(value):
    with pytest.raises(ValueError, match=re.escape(f"virtual_batch_size={value!r}")):
        BatchNorm(virtual_batch_size=value)


@pytest.mark.parametrize(
    "clipping, key",
    [
        ({"rmax": NAN}, "rmax"),
        ({"rmin": NAN}, "rmin"),
        ({"dmax": NAN}, "dmax"),
        ({"rmax": np.float32(NAN)}, "rmax"),
        ({"dmax": "nan"}, "dmax"),
        ({"rmax": 3.0, "rmin": NAN}, "rmin"),
        ({"rmax": True}, "rmax"),
    ],
    ids=repr,
)
def test_renorm_clipping_nan_is_rejected(clipping, key):
    message = f"`renorm_clipping['{key}']` must"
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        BatchNorm(renorm=True, renorm_clipping=clipping)
    assert f"Received: renorm_clipping={clipping!r}" in str(error.value)


@pytest.mark.parametrize(
    "clipping, quoted",
    [
        ({"rmax": -INF}, "rmax=-inf"),
        ({"rmax": 0.0}, "rmax=0.0"),
        ({"rmax": -2.0}, "rmax=-2.0"),
        ({"rmin": INF}, "rmin=inf"),
        ({"rmin": 1e39}, "rmin=1e+39"),
        ({"rmax": 1e-50}, "rmax=1e-50"),
        ({"dmax": -INF}, "dmax=-inf"),
    ],
    ids=repr,
)
def test_renorm_clipping_that_clips_every_correction_is_rejected(clipping, quoted):
    with pytest.raises(ValueError, match=re.escape(f"Received: {quoted}")):
        BatchNorm(renorm=True, renorm_clipping=clipping)


@pytest.mark.parametrize(
    "clipping",
    [{"rmax": INF}, {"dmax": INF}, {"rmin": -INF}, {"rmax": INF, "rmin": -INF}],
    ids=repr,
)
def test_infinite_open_bounds_clip_nothing(clipping, rng):
    x = rng.normal(2.0, 3.0, (16, 4)).astype("float32")
    layer = BatchNorm(renorm=True, renorm_clipping=clipping)
    plain = BatchNorm(renorm=True)
    y = ops.convert_to_numpy(layer(x, training=True))
    expected = ops.convert_to_numpy(plain(x, training=True))
    np.testing.assert_allclose(y, expected, **F32)
    assert np.isfinite(y).all()
    config = layer.get_config()
    assert config["renorm_clipping"] == dict.fromkeys(clipping)
    json.dumps(config, allow_nan=False)


@pytest.mark.parametrize(
    "epsilon",
    [1e-50, np.float64(1e-50), "1e-50", 1e-45, 1e-40, 1e-39, 1e39, 1e300],
    ids=repr,
)
def test_epsilon_that_vanishes_or_overflows_in_float32(epsilon):
    with pytest.raises(ValueError, match=re.escape(f"Received: epsilon={epsilon!r}")):
        BatchNorm(epsilon=epsilon)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_smallest_accepted_epsilon_on_a_constant_feature(policy):
    epsilon = float(np.finfo(np.float32).tiny)
    x = np.full((8, 2), 3.0, "float32")
    layer = BatchNorm(epsilon=epsilon, dtype=policy)
    y = ops.convert_to_numpy(layer(x, training=True)).astype(np.float64)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y, 0.0)


@pytest.mark.parametrize("magnitude", [1e20, -1e20, 1e30, 1e36])
@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((8, 3), {}),
        ((4, 3, 3, 2), {}),
        ((4, 3, 3, 2), {"fused": False}),
        ((4, 2, 3, 5), {"axis": 1}),
        ((8, 3), {"virtual_batch_size": 4}),
        ((8, 3), {"momentum": None}),
    ],
    ids=repr,
)
def test_batch_whose_variance_overflows_float32(magnitude, shape, kwargs, rng):
    x = (rng.normal(0.0, 1.0, shape) * magnitude).astype("float32")
    layer = BatchNorm(**kwargs)
    y = ops.convert_to_numpy(layer(x, training=True))
    axis = kwargs.get("axis", -1)
    if "virtual_batch_size" in kwargs:
        ghosts = x.reshape(2, 4, 3).astype(np.float64)
        expected = (ghosts - ghosts.mean(1, keepdims=True)) / ghosts.std(
            1, keepdims=True
        )
        expected = expected.reshape(shape)
    else:
        mean, variance, _ = reference.moments(x, axis)
        expected = reference.normalize(x, mean, variance, None, None, EPSILON, axis)
    np.testing.assert_allclose(y, expected, **F32)
    # The batch variance (over 1e38) is not a float32: the population
    # statistics are left as they were.
    np.testing.assert_array_equal(as64(layer.moving_mean), 0.0)
    np.testing.assert_array_equal(as64(layer.moving_variance), 1.0)


def test_gradients_of_a_batch_whose_variance_overflows(call_with_gradients, rng):
    x = (rng.normal(0.0, 1.0, (8, 3)) * 1e20).astype("float32")
    upstream = rng.normal(size=(8, 3))
    layer = BatchNorm()
    y, dx, grads = call_with_gradients(layer, x, upstream)
    gamma = np.ones(3)
    expected_dx, dgamma, dbeta = reference.train_gradients(
        x, upstream, gamma, EPSILON, -1
    )
    # dx is of the order of 1e-20: compared relative to its size.
    np.testing.assert_allclose(dx * 1e20, expected_dx * 1e20, **F32)
    np.testing.assert_allclose(grads["gamma"], dgamma, **F32)
    np.testing.assert_allclose(grads["beta"], dbeta, **F32)


def test_large_batch_variance_that_float32_holds_updates_the_statistics(rng):
    # Squares of 5e18 sum beyond float32 over 64 values; their mean does not.
    x = (rng.normal(0.0, 1.0, (64, 3)) * 5e18).astype("float32")
    layer = BatchNorm(momentum=0.0)
    layer(x, training=True)
    mean, variance, _ = reference.moments(x, -1)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, rtol=1e-5)


def test_ordinary_batches_are_not_scaled(rng):
    x = rng.normal(2.0, 3.0, (16, 4)).astype("float32")
    layer = BatchNorm()
    y = ops.convert_to_numpy(layer(x, training=True))
    mean, variance, _ = reference.moments(x, -1)
    expected = reference.normalize(x, mean, variance, None, None, EPSILON, -1)
    np.testing.assert_allclose(y, expected, **F32)
    np.testing.assert_allclose(
        as64(layer.moving_variance), 0.99 + 0.01 * variance, **F32
    )


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_complex_inputs_are_rejected(dtype, training, kind, rng):
    x = (rng.normal(size=(8, 3)) + 1j * rng.normal(size=(8, 3))).astype(dtype)
    if kind == "tensor":
        # complex64 on JAX without x64.
        x = ops.convert_to_tensor(x)
        dtype = keras.backend.standardize_dtype(x.dtype)
    layer = BatchNorm()
    with pytest.raises(ValueError, match=f"Received: inputs.dtype={dtype}"):
        layer(x, training=training)
    with pytest.raises(ValueError, match=f"Received: inputs.dtype={dtype}"):
        layer(inputs=x, training=training)


def test_complex_symbolic_input_is_rejected():
    with pytest.raises(ValueError, match="Received: inputs.dtype=complex64"):
        BatchNorm()(keras.Input((3,), dtype="complex64"))


@pytest.mark.skipif(BACKEND == "jax", reason="JAX has no float64 without x64")
def test_real_inputs_of_every_float_dtype_are_accepted(rng):
    for dtype in ("float16", "bfloat16", "float32", "float64", "int32"):
        x = ops.cast(rng.normal(size=(8, 3)) * 4, dtype)
        y = BatchNorm()(x, training=True)
        assert np.isfinite(ops.convert_to_numpy(ops.cast(y, "float32"))).all()


@pytest.mark.parametrize("magnitude", [1e20, 1e36])
def test_masked_batch_whose_variance_overflows_float32(magnitude, rng):
    x = (rng.normal(0.0, 1.0, (4, 6, 3)) * magnitude).astype("float32")
    mask = np.ones((4, 6), bool)
    mask[:, 4:] = False
    x[:, 4:] = 3e38  # padding, as large as float32 goes
    x[..., 2] = 5.0 * magnitude  # a constant feature: normalized to 0
    layer = BatchNorm()
    y = ops.convert_to_numpy(layer(x, training=True, mask=mask))
    mean, variance, _ = reference.moments(x, -1, mask)
    expected = reference.normalize(x, mean, variance, None, None, EPSILON, -1)
    np.testing.assert_allclose(y[:, :4], expected[:, :4], **F32)
    # Variances of 1e40 are not float32: left as they were; the constant
    # feature's (0) is.
    np.testing.assert_array_equal(as64(layer.moving_variance)[:2], 1.0)
    np.testing.assert_allclose(as64(layer.moving_variance)[2], 0.99, **F32)
