"""The fused kernel (`fused=`): used where it applies, same numbers, same guards.

On TensorFlow, `fused=None` puts training and inference through
`FusedBatchNormV3` for one channels-last or channels-first feature axis; the
tests look for the kernel in the traced graph, so they fail if the kernel is
silently not used (or used where it must not be), and compare each path with
the float64 NumPy reference and with the other path. On JAX and torch the
argument is accepted (`None`, `False`) or refused (`True`).
"""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

from bn_keras import BatchNorm
from tests import reference
from tests.bn_keras.helpers import BACKEND, F32, as64, tensorflow_only

TF_ONLY = tensorflow_only("TensorFlow's kernel.")
KERNEL = "FusedBatchNormV3"


def _graph_ops(layer, x, training, mask=None):
    """The op types of the graph of `layer(x)` (and its gradient in training)."""
    import tensorflow as tf

    @tf.function
    def call(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training, mask=mask)
            loss = tf.reduce_sum(y)
        return y, tape.gradient(loss, x)

    graph = call.get_concrete_function(tf.constant(x)).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():  # while/cond bodies
        types |= {node.op for node in function.definition.node_def}
    return types


@TF_ONLY
@pytest.mark.parametrize(
    "shape, axis, kwargs, fused_kernel",
    [
        ((4, 5, 6, 3), -1, {}, True),  # NHWC
        ((4, 3, 5, 6), 1, {}, False),  # NCHW: on request (slow on CPU)
        ((4, 3, 5, 6), 1, {"fused": True}, True),
        ((2, 3, 4, 5, 3), -1, {}, True),  # NDHWC
        ((2, 3, 4, 5, 3), 1, {"fused": True}, True),  # NCDHW
        ((16, 5), -1, {}, False),  # dense: on request, as (values, 1, 1, channels)
        ((16, 5), -1, {"fused": True}, True),
        ((8, 4, 3), -1, {}, False),  # sequences: on request
        ((8, 4, 3), -1, {"fused": True}, True),
        ((8, 4, 3), 1, {"fused": True}, True),  # channels-first 1-D
        ((4, 3, 5, 6), 2, {}, False),  # a middle axis
        ((4, 3, 5, 6), (1, 3), {}, False),  # two feature axes
        ((16, 5), 0, {}, False),  # axis 0 of a 2-D input
        ((4, 5, 6, 3), -1, {"renorm": True}, False),
        ((4, 5, 6, 3), -1, {"virtual_batch_size": 2}, False),
        ((4, 5, 6, 3), -1, {"synchronized": True}, False),
        ((4, 5, 6, 3), -1, {"epsilon": 1e-6}, False),
        ((4, 5, 6, 3), -1, {"fused": False}, False),
    ],
)
def test_auto_uses_the_kernel_exactly_where_it_applies(
    rng, shape, axis, kwargs, fused_kernel
):
    x = rng.normal(size=shape).astype("float32")
    layer = BatchNorm(axis=axis, **kwargs)
    assert (KERNEL in _graph_ops(layer, x, training=True)) == fused_kernel
    # Inference: channels-last inputs of any rank (renorm and ghost batches
    # infer with plain population statistics; synchronized too).
    inference = fused_kernel or (
        axis == -1 and kwargs.get("epsilon", 1.0) > 1e-5 and "fused" not in kwargs
    )
    assert (KERNEL in _graph_ops(layer, x, training=False)) == inference


@TF_ONLY
def test_masks_and_float64_take_the_unfused_path(rng):
    x = rng.normal(size=(4, 5, 2, 3)).astype("float32")
    mask = rng.uniform(size=(4, 5, 2)) > 0.3
    assert KERNEL not in _graph_ops(BatchNorm(), x, True, mask)
    wide = x.astype("float64")
    assert KERNEL not in _graph_ops(BatchNorm(dtype="float64"), wide, True)
    # Half inputs are widened to float32 first, and fused.
    assert KERNEL in _graph_ops(BatchNorm(), x.astype("float16"), True)


CASES = [
    ((6, 5, 4, 3), -1, {}),
    ((6, 3, 5, 4), 1, {}),
    ((3, 2, 3, 4, 5), -1, {"center": False}),
    ((3, 4, 3, 2, 3), 1, {"scale": False}),
    ((20, 7), -1, {"momentum": None}),
    ((6, 5, 4, 3), -1, {"debias": True, "momentum": 0.9}),
    ((6, 5, 4, 3), -1, {"unbiased_variance": True, "momentum": 0.5}),
    ((6, 3, 5, 4), 1, {"center": False, "scale": False, "epsilon": 0.1}),
]


@TF_ONLY
@pytest.mark.parametrize("shape, axis, kwargs", CASES)
def test_fused_training_matches_the_reference_and_the_unfused_path(
    rng, call_with_gradients, shape, axis, kwargs
):
    layers = {
        fused: BatchNorm(axis=axis, fused=fused, **kwargs) for fused in (True, False)
    }
    momentum = kwargs.get("momentum", 0.99)
    population = reference.PopulationStatistics(
        np.zeros(shape[axis]), np.ones(shape[axis]), momentum, kwargs.get("debias")
    )
    gamma = rng.uniform(0.5, 2.0, shape[axis])
    beta = rng.uniform(-1.0, 1.0, shape[axis])
    for layer in layers.values():
        layer.build(shape)
        if layer.gamma is not None:
            layer.gamma.assign(gamma)
        if layer.beta is not None:
            layer.beta.assign(beta)
    gamma = gamma if kwargs.get("scale", True) else None
    beta = beta if kwargs.get("center", True) else None
    epsilon = kwargs.get("epsilon", 1e-3)
    for _ in range(3):
        x = rng.normal(5.0, 3.0, shape).astype("float32")
        upstream = rng.normal(size=shape)
        y, mean, variance, count = reference.train_transform(
            x, gamma, beta, epsilon, axis
        )
        dx, dgamma, dbeta = reference.train_gradients(x, upstream, gamma, epsilon, axis)
        if kwargs.get("unbiased_variance"):
            variance = reference.unbiased(variance, count)
        population.update(mean, variance)
        results = {}
        for fused, layer in layers.items():
            got_y, got_dx, grads = call_with_gradients(layer, x, upstream)
            np.testing.assert_allclose(got_y, y, **F32)
            np.testing.assert_allclose(got_dx, dx, rtol=1e-4, atol=1e-4)
            if gamma is not None:
                np.testing.assert_allclose(grads["gamma"], dgamma, rtol=1e-4, atol=1e-3)
            if beta is not None:
                np.testing.assert_allclose(grads["beta"], dbeta, rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(as64(layer.moving_mean), population.mean, **F32)
            np.testing.assert_allclose(
                as64(layer.moving_variance), population.variance, **F32
            )
            results[fused] = (got_y, got_dx)
        for a, b in zip(results[True], results[False], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    x = rng.normal(5.0, 3.0, shape).astype("float32")
    expected = reference.normalize(
        x, population.mean, population.variance, gamma, beta, epsilon, axis
    )
    for layer in layers.values():
        np.testing.assert_allclose(as64(layer(x, training=False)), expected, **F32)


@TF_ONLY
def test_fused_training_matches_keras(rng):
    shape = (8, 6, 6, 4)
    ours = BatchNorm(fused=True, momentum=0.9)
    theirs = keras.layers.BatchNormalization(momentum=0.9)
    for _ in range(5):
        x = rng.normal(-2.0, 4.0, shape).astype("float32")
        np.testing.assert_allclose(
            as64(ours(x, training=True)), as64(theirs(x, training=True)), **F32
        )
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_allclose(as64(a), as64(b), **F32)


@TF_ONLY
@pytest.mark.parametrize("jit_compile", [False, True])
def test_fused_guards_hold_in_fit(jit_compile):
    # The ragged last batch of one: an error in a graph, a skipped update
    # under XLA; either way the statistics are the first 60 examples'.
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, (61, 1, 1, 4)).astype("float32")
    bn = BatchNorm(momentum=0.0, fused=True)
    model = keras.Sequential([keras.Input((1, 1, 4)), bn])
    model.compile("sgd", "mse", jit_compile=jit_compile)
    if jit_compile:
        model.fit(x, x, batch_size=60, epochs=1, verbose=0, shuffle=False)
    else:
        with pytest.raises(Exception, match="single value per feature"):
            model.fit(x, x, batch_size=60, epochs=1, verbose=0, shuffle=False)
    first = x[:60].reshape(60, 4)
    np.testing.assert_allclose(as64(bn.moving_mean), first.mean(0), **F32)
    np.testing.assert_allclose(as64(bn.moving_variance), first.var(0), **F32)


@TF_ONLY
def test_fused_batch_of_one_through_an_unknown_batch_size():
    import tensorflow as tf

    layer = BatchNorm(momentum=0.5, fused=True)
    layer.build((None, 3))

    @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32)])
    def step(x):
        return layer(x, training=True)

    with pytest.raises(tf.errors.InvalidArgumentError, match="single value"):
        step(np.array([[1.0, 2.0, 3.0]], "float32"))
    np.testing.assert_array_equal(as64(layer.moving_mean), np.zeros(3))
    np.testing.assert_array_equal(as64(layer.moving_variance), np.ones(3))


@TF_ONLY
def test_fused_non_finite_batch_leaves_its_features(rng):
    layer = BatchNorm(momentum=0.5, fused=True)
    clean = rng.normal(size=(4, 3, 3, 2)).astype("float32")
    layer(clean, training=True)
    before = as64(layer.moving_mean), as64(layer.moving_variance)
    bad = rng.normal(size=(4, 3, 3, 2)).astype("float32")
    bad[1, 2, 0, 0] = np.nan
    layer(bad, training=True)
    # Channel 0 kept; channel 1 updated from the bad batch's own values.
    for got, old, new in zip(
        (as64(layer.moving_mean), as64(layer.moving_variance)),
        before,
        (bad[..., 1].mean(), bad[..., 1].var()),
        strict=True,
    ):
        assert got[0] == old[0]
        np.testing.assert_allclose(got[1], 0.5 * old[1] + 0.5 * new, **F32)


@TF_ONLY
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_fused_training_is_exact_at_large_means(rng, axis, mode):
    # The kernel alone sums raw values and is off by about 3 here (as Keras'
    # layer); fed deviations from one of the batch's values it is not.
    import tensorflow as tf

    x = rng.normal(1e6, 1e-2, (100, 10, 10, 8)).astype("float32")
    if axis == 1:
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    layer = BatchNorm(axis=axis, momentum=0.0, fused=True)
    call = lambda x: layer(x, training=True)  # noqa: E731
    if mode != "eager":
        call = tf.function(call, jit_compile=mode == "xla")
    y = as64(call(x))
    expected, mean, variance, _ = reference.train_transform(x, None, None, 1e-3, axis)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, rtol=1e-7)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, rtol=1e-4)


@TF_ONLY
def test_fused_inference_is_exact_at_large_means(rng):
    x = rng.normal(1e6, 1e-2, (100, 2, 2, 8)).astype("float32")
    mean = x.astype(np.float64).mean((0, 1, 2))
    variance = x.astype(np.float64).var((0, 1, 2))
    layer = BatchNorm(fused=True)
    layer.build(x.shape)
    layer.moving_mean.assign(mean.astype("float32"))
    layer.moving_variance.assign(variance.astype("float32"))
    expected = reference.normalize(
        x,
        as64(layer.moving_mean),
        as64(layer.moving_variance),
        None,
        None,
        1e-3,
        -1,
    )
    np.testing.assert_allclose(as64(layer(x)), expected, atol=1e-5)


@TF_ONLY
@pytest.mark.parametrize(
    "kwargs, why",
    [
        ({"renorm": True}, "renorm"),
        ({"virtual_batch_size": 2}, "ghost batch"),
        ({"synchronized": True}, "global batch"),
        ({"epsilon": 1e-6}, "epsilon >= 1.001e-05"),
    ],
)
def test_fused_true_refuses_options_the_kernel_cannot_honour(kwargs, why):
    with pytest.raises(ValueError, match=f"fused kernel cannot be used: .*{why}"):
        BatchNorm(fused=True, **kwargs)


@TF_ONLY
def test_fused_true_refuses_inputs_the_kernel_cannot_take(rng):
    with pytest.raises(ValueError, match="axis 2 of an input of rank 4"):
        BatchNorm(axis=2, fused=True).build((2, 3, 4, 5))
    with pytest.raises(ValueError, match="one feature axis"):
        BatchNorm(axis=(1, 2), fused=True).build((2, 3, 4, 5))
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    with pytest.raises(ValueError, match="a mask selects"):
        BatchNorm(fused=True)(x, training=True, mask=np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="no float64 version"):
        BatchNorm(fused=True, dtype="float64")(x.astype("float64"), training=True)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="JAX and torch.")
def test_fused_true_needs_tensorflow(rng):
    with pytest.raises(ValueError, match=f"TensorFlow's, and the backend is {BACKEND}"):
        BatchNorm(fused=True)
    # None and False are accepted, and mean the same: no kernel to use.
    x = rng.normal(size=(6, 4)).astype("float32")
    auto, off = BatchNorm(fused=None), BatchNorm(fused=False)
    np.testing.assert_array_equal(
        as64(auto(x, training=True)), as64(off(x, training=True))
    )


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_fused_must_be_a_bool_or_none(value):
    with pytest.raises(ValueError, match=f"Received: fused={value!r}"):
        BatchNorm(fused=value)


def test_fused_round_trips_through_config_and_saving(rng, tmp_path):
    fused = True if BACKEND == "tensorflow" else False
    layer = BatchNorm(fused=fused)
    assert layer.get_config()["fused"] is fused
    assert BatchNorm.from_config(layer.get_config()).fused is fused
    model = keras.Sequential([keras.Input((3, 3, 2)), layer])
    x = rng.normal(size=(5, 3, 3, 2)).astype("float32")
    model(x, training=True)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[0].fused is fused
    np.testing.assert_allclose(as64(loaded(x)), as64(model(x)), **F32)


_SAVE_ON_TENSORFLOW = """
import sys
import keras
import numpy as np
from bn_keras import BatchNorm

model = keras.Sequential([keras.Input((3, 3, 2)), BatchNorm(fused=True, name="bn")])
x = np.load(sys.argv[2])
model(x, training=True)
np.save(sys.argv[3], keras.ops.convert_to_numpy(model(x)))
model.save(sys.argv[1])
"""


def test_a_fused_model_saved_on_tensorflow_loads_on_every_backend(tmp_path, rng):
    # A .keras file is portable across backends, and fused only changes the
    # speed: on JAX and torch the layer loads without the kernel, and warns.
    paths = [tmp_path / n for n in ("fused.keras", "x.npy", "y.npy")]
    x = rng.normal(1.0, 2.0, (5, 3, 3, 2)).astype("float32")
    np.save(paths[1], x)
    done = subprocess.run(
        [sys.executable, "-c", _SAVE_ON_TENSORFLOW, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.saving.load_model(paths[0])
    messages = [str(w.message) for w in caught if "fused=True" in str(w.message)]
    layer = loaded.layers[0]
    if BACKEND == "tensorflow":
        assert messages == []
        assert layer.fused is True
    else:
        assert len(messages) == 1
        assert f"TensorFlow's, and the backend is {BACKEND}" in messages[0]
        assert "'bn'" in messages[0]
        assert layer.fused is None
    # Saved again, it is still fused=True for TensorFlow.
    assert layer.get_config()["fused"] is True
    np.testing.assert_allclose(as64(loaded(x)), np.load(paths[2]), **F32)
    expected = reference.normalize(
        x, as64(layer.moving_mean), as64(layer.moving_variance), None, None, 1e-3, -1
    )
    np.testing.assert_allclose(as64(loaded(x)), expected, **F32)
    loaded(x, training=True)  # and it trains


def test_fused_true_from_config_on_every_backend():
    config = {**BatchNorm(name="bn").get_config(), "fused": True}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = BatchNorm.from_config(config)
    assert layer.get_config() == config
    warned = [w for w in caught if "saved with fused=True" in str(w.message)]
    assert len(warned) == (0 if BACKEND == "tensorflow" else 1)
