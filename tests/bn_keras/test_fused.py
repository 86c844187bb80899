"""The fused kernels (`fused=`): used where they apply, same numbers, same guards.

TensorFlow's `FusedBatchNormV3` and torch's `native_batch_norm` (through
`torch.batch_norm` in inference) normalize where the layer's options allow
it. The tests ask each backend whether its kernel ran: TensorFlow's traced
graph of the call and its gradient, torch's profiler over the call and its
backward. So they fail if the kernel is silently not used, or used where it
must not be; each path is compared with the float64 NumPy reference and with
the other path. JAX has no kernel: `fused=True` is refused there, and a saved
`fused=True` layer loads without it, with a warning.
"""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

from bn_keras import BatchNorm, TimestepBatchNorm
from tests import reference
from tests.bn_keras.helpers import BACKEND, F32, as64, tensorflow_only

TF_ONLY = tensorflow_only("TensorFlow's kernel.")
NEEDS_KERNEL = pytest.mark.skipif(
    BACKEND == "jax", reason="JAX has no fused kernel: XLA fuses the layer's ops."
)
KERNEL_BACKENDS = ("tensorflow", "torch")
KERNEL = "FusedBatchNormV3"
# What torch's `native_batch_norm` and `batch_norm` run, by device.
TORCH_KERNELS = (
    "aten::native_batch_norm",
    "aten::cudnn_batch_norm",
    "aten::miopen_batch_norm",
)


def _graph_ops(layer, x, training, mask=None, domain=None):
    """The op types of the graph of `layer(x)` and of its gradient to `x`.

    `x` comes through a variable, as the output of a layer with weights:
    `fused=None` trains through the kernel only where the input's gradient
    is needed (see `bn_keras.fused`).
    """
    import tensorflow as tf

    one = tf.Variable(1.0, dtype=x.dtype)

    @tf.function
    def call(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x * one, training=training, mask=mask, domain=domain)
            loss = tf.reduce_sum(y)
        return y, tape.gradient(loss, x)

    graph = call.get_concrete_function(tf.constant(x)).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():  # while/cond bodies
        types |= {node.op for node in function.definition.node_def}
    return types


def _torch_events(layer, x, training, mask=None, domain=None):
    """The names of the torch ops run by `layer(x)` and its gradient to `x`.

    The layer's state (population statistics, counters) is put back as it
    was, so that checking a layer does not change what a test compares.
    """
    import torch

    if not layer.built:
        layer.build(tuple(x.shape))
    state = [keras.ops.convert_to_numpy(v) for v in layer.non_trainable_variables]
    x = torch.tensor(np.asarray(x), requires_grad=True)
    if mask is not None:
        mask = torch.as_tensor(np.asarray(mask))
    with torch.profiler.profile() as profile:
        y = layer(x, training=training, mask=mask, domain=domain)
        torch.autograd.grad(torch.sum(y), x)
    for variable, value in zip(layer.non_trainable_variables, state, strict=True):
        variable.assign(value)
    return {event.name for event in profile.events()}


def _kernel_used(layer, x, training, mask=None, domain=None):
    """Whether `layer(x, training=training)` runs the backend's kernel.

    Forward and backward: the gradient to `x` is taken too, and must go
    through the kernel's own backward whenever the forward did. Skips the
    test on JAX, which has no kernel.
    """
    if BACKEND == "tensorflow":
        ops = _graph_ops(layer, x, training, mask, domain)
        forward, backward = KERNEL in ops, "FusedBatchNormGradV3" in ops
    elif BACKEND == "torch":
        events = _torch_events(layer, x, training, mask, domain)
        forward = any(name in events for name in TORCH_KERNELS)
        backward = any(f"{name}_backward" in events for name in TORCH_KERNELS)
    else:
        pytest.skip("JAX has no fused kernel.")
    assert forward == backward, f"forward through the kernel: {forward}"
    return forward


def _expected(tensorflow, torch):
    """`(training, inference)` kernel use of this backend, from both backends'."""
    return {"tensorflow": tensorflow, "torch": torch}.get(BACKEND)


YES, NO = (True, True), (False, False)
INFERENCE_ONLY = (False, True)


@NEEDS_KERNEL
@pytest.mark.parametrize(
    "shape, axis, kwargs, tensorflow, torch",
    [
        pytest.param((4, 5, 6, 3), -1, {}, YES, YES, id="NHWC"),
        # TensorFlow: channels-first on request (its CPU kernel transposes).
        pytest.param((4, 3, 5, 6), 1, {}, NO, YES, id="NCHW"),
        pytest.param((4, 3, 5, 6), 1, {"fused": True}, YES, YES, id="NCHW-fused"),
        pytest.param((2, 3, 4, 5, 3), -1, {}, YES, YES, id="NDHWC"),
        pytest.param((2, 3, 4, 5, 3), 1, {}, NO, YES, id="NCDHW"),
        pytest.param((2, 3, 4, 5, 3), 1, {"fused": True}, YES, YES, id="NCDHW-fused"),
        # TensorFlow trains dense and sequence inputs unfused (faster there).
        pytest.param((16, 5), -1, {}, INFERENCE_ONLY, YES, id="dense"),
        pytest.param((16, 5), -1, {"fused": True}, YES, YES, id="dense-fused"),
        pytest.param((8, 4, 3), -1, {}, INFERENCE_ONLY, YES, id="sequence"),
        pytest.param((8, 4, 3), -1, {"fused": True}, YES, YES, id="sequence-fused"),
        pytest.param((8, 4, 3), 1, {}, NO, YES, id="channels-first-1d"),
        pytest.param((8, 4, 3), 1, {"fused": True}, YES, YES, id="ncw-fused"),
        pytest.param((4, 3, 5, 6), 2, {}, NO, NO, id="middle-axis"),
        pytest.param((4, 3, 5, 6), (1, 3), {}, NO, NO, id="two-axes"),
        pytest.param((16, 5), 0, {}, NO, NO, id="axis-0"),
        # Inference with plain population statistics: the kernel applies.
        pytest.param(
            (4, 5, 6, 3),
            -1,
            {"renorm": True},
            INFERENCE_ONLY,
            INFERENCE_ONLY,
            id="renorm",
        ),
        pytest.param(
            (4, 5, 6, 3),
            -1,
            {"virtual_batch_size": 2},
            INFERENCE_ONLY,
            INFERENCE_ONLY,
            id="ghost-batches",
        ),
        pytest.param(
            (4, 5, 6, 3),
            -1,
            {"synchronized": True},
            INFERENCE_ONLY,
            INFERENCE_ONLY,
            id="synchronized",
        ),
        # cuDNN's minimum epsilon binds TensorFlow only.
        pytest.param((4, 5, 6, 3), -1, {"epsilon": 1e-6}, NO, YES, id="epsilon-1e-6"),
        pytest.param((4, 5, 6, 3), -1, {"fused": False}, NO, NO, id="fused-false"),
    ],
)
def test_uses_the_kernel_exactly_where_it_applies(
    rng, shape, axis, kwargs, tensorflow, torch
):
    training, inference = _expected(tensorflow, torch)
    x = rng.normal(size=shape).astype("float32")
    layer = BatchNorm(axis=axis, **kwargs)
    assert _kernel_used(layer, x, training=True) == training
    assert _kernel_used(layer, x, training=False) == inference


@NEEDS_KERNEL
def test_masks_take_the_unfused_path_in_training(rng):
    x = rng.normal(size=(4, 5, 2, 3)).astype("float32")
    mask = rng.uniform(size=(4, 5, 2)) > 0.3
    layer = BatchNorm()
    assert not _kernel_used(layer, x, True, mask)
    assert _kernel_used(layer, x, True)
    # Inference normalizes every value with the population statistics: the
    # mask changes nothing there.
    assert _kernel_used(layer, x, False, mask)


@NEEDS_KERNEL
def test_float64_uses_the_kernel_on_torch_only(rng):
    x = rng.normal(3.0, 2.0, (6, 5, 4, 3))
    layer = BatchNorm(dtype="float64", momentum=0.0)
    for training in (True, False):
        assert _kernel_used(layer, x, training) == (BACKEND == "torch")
    # At float64 precision: the kernel computes in float64 too.
    y, mean, variance, _ = reference.train_transform(x, None, None, 1e-3, -1)
    np.testing.assert_allclose(as64(layer(x, training=True)), y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, rtol=1e-12)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, rtol=1e-10)
    expected = reference.normalize(x, mean, variance, None, None, 1e-3, -1)
    np.testing.assert_allclose(as64(layer(x)), expected, rtol=0, atol=1e-10)


@NEEDS_KERNEL
@pytest.mark.parametrize("dtype", [None, "mixed_float16"])
def test_half_inputs_are_widened_and_fused(rng, dtype):
    x = rng.normal(size=(4, 5, 2, 3)).astype("float16")
    layer = BatchNorm(dtype=dtype)
    for training in (True, False):
        assert _kernel_used(layer, x, training)
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == (
        "float16" if dtype else "float32"
    )
    expected, *_ = reference.train_transform(x, None, None, 1e-3, -1)
    np.testing.assert_allclose(as64(y), expected, rtol=0, atol=5e-3 if dtype else 1e-5)


@NEEDS_KERNEL
def test_per_timestep_and_per_domain_statistics_take_the_unfused_path(rng):
    x = rng.normal(size=(8, 4, 3)).astype("float32")
    per_timestep = TimestepBatchNorm(max_timesteps=4)
    per_domain = BatchNorm(domains=2)
    for training in (True, False):
        assert not _kernel_used(per_timestep, x, training)
        assert not _kernel_used(per_domain, x, training, domain=1)
    with pytest.raises(ValueError, match="statistics vary along more axes"):
        TimestepBatchNorm(max_timesteps=4, fused=True).build(x.shape)


CASES = [
    ((6, 5, 4, 3), -1, {}),
    ((6, 3, 5, 4), 1, {}),
    ((3, 2, 3, 4, 5), -1, {"center": False}),
    ((3, 4, 3, 2, 3), 1, {"scale": False}),
    ((20, 7), -1, {"momentum": None}),
    ((6, 5, 4, 3), -1, {"debias": True, "momentum": 0.9}),
    ((6, 5, 4, 3), -1, {"unbiased_variance": True, "momentum": 0.5}),
    ((6, 3, 5, 4), 1, {"center": False, "scale": False, "epsilon": 0.1}),
    ((8, 4, 3), -1, {"momentum": 0.5}),
    pytest.param(
        (6, 3, 5, 4),
        1,
        {"epsilon": 1e-6},
        marks=pytest.mark.skipif(
            BACKEND == "tensorflow", reason="cuDNN's minimum epsilon on TensorFlow."
        ),
    ),
]


@NEEDS_KERNEL
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
    x = rng.normal(5.0, 3.0, shape).astype("float32")
    for training in (True, False):
        assert _kernel_used(layers[True], x, training)
        assert not _kernel_used(layers[False], x, training)
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
            results[fused] = (got_y, got_dx, grads.get("gamma"), grads.get("beta"))
        for a, b in zip(results[True], results[False], strict=True):
            if a is not None:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    x = rng.normal(5.0, 3.0, shape).astype("float32")
    expected = reference.normalize(
        x, population.mean, population.variance, gamma, beta, epsilon, axis
    )
    for layer in layers.values():
        np.testing.assert_allclose(as64(layer(x, training=False)), expected, **F32)


@NEEDS_KERNEL
def test_fused_training_matches_keras(rng):
    shape = (8, 6, 6, 4)
    ours = BatchNorm(fused=True, momentum=0.9)
    theirs = keras.layers.BatchNormalization(momentum=0.9)
    for _ in range(5):
        x = rng.normal(-2.0, 4.0, shape).astype("float32")
        np.testing.assert_allclose(
            as64(ours(x, training=True)), as64(theirs(x, training=True)), **F32
        )
    assert _kernel_used(ours, x, True)
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_allclose(as64(a), as64(b), **F32)


@NEEDS_KERNEL
@pytest.mark.parametrize(
    "shape, axis", [((6, 5, 4, 3), -1), ((6, 3, 5, 4), 1), ((12, 3), -1)]
)
def test_frozen_statistics_on_the_kernel_path(
    rng, call_with_gradients, set_random_weights, shape, axis
):
    # "frozen" normalizes with the population statistics in training too
    # (torch: its inference kernel under autograd); gamma and beta train.
    layers = {
        fused: BatchNorm(axis=axis, statistics="frozen", fused=fused)
        for fused in (True, False)
    }
    weights = set_random_weights(layers[True], shape)
    layers[False].build(shape)
    layers[False].set_weights(layers[True].get_weights())
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    assert _kernel_used(layers[True], x, True)
    assert not _kernel_used(layers[False], x, True)

    reduced = reference.reduction_axes(axis, len(shape))
    upstream = rng.normal(size=shape)
    mean, variance = weights["moving_mean"], weights["moving_variance"]
    inverse_std = reference.expand(1.0 / np.sqrt(variance + 1e-3), shape, axis)
    x_hat = (x - reference.expand(mean, shape, axis)) * inverse_std
    gamma = reference.expand(weights["gamma"], shape, axis)
    y = gamma * x_hat + reference.expand(weights["beta"], shape, axis)
    dx = upstream * gamma * inverse_std
    dgamma, dbeta = np.sum(upstream * x_hat, reduced), np.sum(upstream, reduced)
    results = {}
    for fused, layer in layers.items():
        got_y, got_dx, grads = call_with_gradients(layer, x, upstream)
        np.testing.assert_allclose(got_y, y, **F32)
        np.testing.assert_allclose(got_dx, dx, **F32)
        np.testing.assert_allclose(grads["gamma"], dgamma, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(grads["beta"], dbeta, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(as64(layer.moving_mean), mean)
        np.testing.assert_array_equal(as64(layer.moving_variance), variance)
        results[fused] = (got_y, got_dx, grads["gamma"], grads["beta"])
    for a, b in zip(results[True], results[False], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@NEEDS_KERNEL
@pytest.mark.parametrize(
    "jit_compile",
    [
        False,
        pytest.param(True, marks=TF_ONLY),
    ],
)
def test_fused_guards_hold_in_fit(jit_compile):
    # The ragged last batch of one: an error in a graph and in eager torch,
    # a skipped update under XLA; either way the statistics are the first
    # 60 examples'.
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, (61, 1, 1, 4)).astype("float32")
    bn = BatchNorm(momentum=0.0, fused=True)
    model = keras.Sequential([keras.Input((1, 1, 4)), bn])
    model.compile("sgd", "mse", jit_compile=jit_compile)
    assert _kernel_used(bn, x[:60], True)
    if jit_compile:
        model.fit(x, x, batch_size=60, epochs=1, verbose=0, shuffle=False)
    else:
        with pytest.raises(Exception, match="single value per feature"):
            model.fit(x, x, batch_size=60, epochs=1, verbose=0, shuffle=False)
    first = x[:60].reshape(60, 4)
    np.testing.assert_allclose(as64(bn.moving_mean), first.mean(0), **F32)
    np.testing.assert_allclose(as64(bn.moving_variance), first.var(0), **F32)


@NEEDS_KERNEL
@pytest.mark.parametrize(
    "shape, axis", [((1, 3), -1), ((1, 1, 1, 4), -1), ((1, 3, 1), 1)]
)
def test_fused_single_value_per_feature_is_an_error(rng, shape, axis):
    layer = BatchNorm(axis=axis, momentum=0.5, fused=True)
    layer.build(shape)
    x = rng.normal(size=shape).astype("float32")
    with pytest.raises(ValueError, match="single value per feature"):
        layer(x, training=True)
    features = shape[axis]
    np.testing.assert_array_equal(as64(layer.moving_mean), np.zeros(features))
    np.testing.assert_array_equal(as64(layer.moving_variance), np.ones(features))
    # Two examples are a batch: the kernel takes them.
    assert _kernel_used(layer, np.concatenate([x, x + 1.0]), True)


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


@NEEDS_KERNEL
@pytest.mark.parametrize("shape, axis", [((4, 3, 3, 2), -1), ((4, 2, 3, 3), 1)])
def test_fused_non_finite_batch_leaves_its_features(rng, shape, axis):
    layer = BatchNorm(axis=axis, momentum=0.5, fused=True)
    clean = rng.normal(size=shape).astype("float32")
    assert _kernel_used(layer, clean, True)
    layer(clean, training=True)
    before = as64(layer.moving_mean), as64(layer.moving_variance)
    bad = rng.normal(size=shape).astype("float32")
    index = [1, 2, 0, 0]
    index[axis] = 0  # a NaN in feature 0 only
    bad[tuple(index)] = np.nan
    y = as64(layer(bad, training=True))
    # Feature 0 kept; feature 1 updated from the bad batch's own values.
    feature_1 = np.take(bad, 1, axis=axis)
    for got, old, new in zip(
        (as64(layer.moving_mean), as64(layer.moving_variance)),
        before,
        (feature_1.mean(), feature_1.var()),
        strict=True,
    ):
        assert got[0] == old[0]
        np.testing.assert_allclose(got[1], 0.5 * old[1] + 0.5 * new, **F32)
    expected, *_ = reference.train_transform(bad, None, None, 1e-3, axis)
    np.testing.assert_allclose(np.take(y, 1, axis), np.take(expected, 1, axis), **F32)


@NEEDS_KERNEL
@pytest.mark.parametrize("shape, axis", [((64, 3), -1), ((8, 3, 2, 2), 1)])
def test_fused_batch_whose_variance_overflows_float32(rng, shape, axis):
    # Values of 1e20: a variance of about 1e40, past float32's range. The
    # outputs stay finite, as the unfused path's; the statistics are left
    # as the unfused path leaves them.
    x = (rng.normal(size=shape) * 1e20).astype("float32")
    layers = {
        fused: BatchNorm(axis=axis, momentum=0.5, fused=fused)
        for fused in (True, False)
    }
    assert _kernel_used(layers[True], x, True)
    outputs = {fused: as64(layer(x, training=True)) for fused, layer in layers.items()}
    assert np.all(np.isfinite(outputs[True]))
    np.testing.assert_allclose(outputs[True], outputs[False], rtol=1e-5, atol=1e-5)
    expected, *_ = reference.train_transform(x, None, None, 1e-3, axis)
    np.testing.assert_allclose(outputs[True], expected, **F32)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_array_equal(
            as64(getattr(layers[True], name)), as64(getattr(layers[False], name))
        )


@NEEDS_KERNEL
@pytest.mark.parametrize(
    "mode",
    [
        "eager",
        pytest.param("graph", marks=TF_ONLY),
        pytest.param("xla", marks=TF_ONLY),
    ],
)
@pytest.mark.parametrize("axis", [-1, 1])
def test_fused_training_is_exact_at_large_means(rng, axis, mode):
    # The kernels alone lose about |mean| / std float32 ulps here (3 in the
    # output, as Keras' layer); fed deviations from one of the batch's values
    # they do not.
    x = rng.normal(1e6, 1e-2, (100, 10, 10, 8)).astype("float32")
    if axis == 1:
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    layer = BatchNorm(axis=axis, momentum=0.0, fused=True)
    assert _kernel_used(layer, x, True)
    call = lambda x: layer(x, training=True)  # noqa: E731
    if mode != "eager":
        import tensorflow as tf

        call = tf.function(call, jit_compile=mode == "xla")
    y = as64(call(x))
    expected, mean, variance, _ = reference.train_transform(x, None, None, 1e-3, axis)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, rtol=1e-7)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, rtol=1e-4)


@NEEDS_KERNEL
@pytest.mark.parametrize("axis", [-1, 1])
def test_fused_inference_is_exact_at_large_means(rng, axis):
    # TensorFlow's kernel subtracts the mean first; torch's folds it into an
    # offset and would lose accuracy, so the layer uses its own ops there.
    x = rng.normal(1e6, 1e-2, (100, 2, 2, 8)).astype("float32")
    if axis == 1:
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    reduced = reference.reduction_axes(axis, x.ndim)
    layer = BatchNorm(axis=axis, fused=True)
    layer.build(x.shape)
    for statistics, far in (
        ((x.astype(np.float64).mean(reduced), x.astype(np.float64).var(reduced)), True),
        # Four spreads from 0: the kernel's own fold is accurate.
        ((np.full(8, 4.0), np.full(8, 1.0 - 1e-3)), False),
    ):
        layer.moving_mean.assign(statistics[0].astype("float32"))
        layer.moving_variance.assign(statistics[1].astype("float32"))
        assert _kernel_used(layer, x, False) == (BACKEND == "tensorflow" or not far)
        inputs = x if far else rng.normal(4.0, 1.0, x.shape).astype("float32")
        expected = reference.normalize(
            inputs,
            as64(layer.moving_mean),
            as64(layer.moving_variance),
            as64(layer.gamma),
            as64(layer.beta),
            1e-3,
            axis,
        )
        np.testing.assert_allclose(as64(layer(inputs)), expected, rtol=0, atol=1e-5)


@NEEDS_KERNEL
@pytest.mark.parametrize(
    "kwargs, why",
    [
        ({"renorm": True}, "renorm"),
        ({"virtual_batch_size": 2}, "ghost batch"),
        ({"synchronized": True}, "global batch"),
        pytest.param({"epsilon": 1e-6}, r"epsilon >= 1\.001e-05", marks=TF_ONLY),
    ],
)
def test_fused_true_refuses_options_the_kernel_cannot_honour(kwargs, why):
    with pytest.raises(
        ValueError,
        match=f"^`fused=True`, but the fused kernel cannot be used: .*{why}.*"
        "Received: fused=True$",
    ):
        BatchNorm(fused=True, **kwargs)


@NEEDS_KERNEL
def test_fused_true_refuses_inputs_the_kernel_cannot_take(rng):
    refused = "`fused=True`, but the fused kernel cannot be used: "
    with pytest.raises(ValueError, match=f"{refused}.*axis 2 of an input of rank 4"):
        BatchNorm(axis=2, fused=True).build((2, 3, 4, 5))
    with pytest.raises(ValueError, match=f"{refused}.*one feature axis"):
        BatchNorm(axis=(1, 2), fused=True).build((2, 3, 4, 5))
    with pytest.raises(ValueError, match=f"{refused}.*axis 0 of an input of rank 2"):
        BatchNorm(axis=0, fused=True).build((4, 5))
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    layer = BatchNorm(fused=True)
    with pytest.raises(ValueError, match=f"{refused}a mask selects"):
        layer(x, training=True, mask=np.ones((4, 5), bool))
    np.testing.assert_array_equal(as64(layer.moving_mean), np.zeros(3))
    # Inference takes a mask: it changes nothing there.
    expected = reference.normalize(x, np.zeros(3), np.ones(3), None, None, 1e-3, -1)
    np.testing.assert_allclose(
        as64(layer(x, mask=np.ones((4, 5), bool))), expected, **F32
    )


@TF_ONLY
def test_fused_true_refuses_float64_training_on_tensorflow(rng):
    x = rng.normal(size=(4, 5, 3))
    layer = BatchNorm(fused=True, dtype="float64")
    with pytest.raises(ValueError, match="no float64 version"):
        layer(x, training=True)
    # Inference takes float64 unfused, silently, at float64 precision.
    assert not _kernel_used(layer, x, False)
    expected = reference.normalize(x, np.zeros(3), np.ones(3), None, None, 1e-3, -1)
    np.testing.assert_allclose(as64(layer(x)), expected, rtol=0, atol=1e-12)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX has no kernel.")
def test_fused_true_is_refused_on_jax(rng):
    with pytest.raises(
        ValueError,
        match="^`fused=True`, but the fused kernel cannot be used: the fused "
        "kernels are TensorFlow's and torch's, and the backend is jax",
    ):
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
    fused = BACKEND in KERNEL_BACKENDS
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
    # speed: torch loads it with its own kernel; JAX without one, and warns.
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
    if BACKEND in KERNEL_BACKENDS:
        assert messages == []
        assert layer.fused is True
        assert _kernel_used(layer, x, False)
        assert _kernel_used(layer, x, True)
    else:
        assert len(messages) == 1
        assert "TensorFlow's and torch's, and the backend is jax" in messages[0]
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
    assert len(warned) == (0 if BACKEND in KERNEL_BACKENDS else 1)
    assert layer.fused is (True if BACKEND in KERNEL_BACKENDS else None)


def test_a_fused_config_the_kernel_cannot_take_here_loads_without_it():
    # Saved on torch, which takes both, and loaded elsewhere: on TensorFlow
    # an epsilon below cuDNN's minimum or a float64 layer rules the kernel
    # out, on JAX there is none. The layer loads, warns, and trains.
    rng = np.random.default_rng(0)
    for extra in ({"epsilon": 1e-6}, {"dtype": "float64"}):
        config = {**BatchNorm(name="bn").get_config(), "fused": True, **extra}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer = BatchNorm.from_config(config)
        warned = [w for w in caught if "saved with fused=True" in str(w.message)]
        if BACKEND == "torch":
            assert warned == [] and layer.fused is True
        else:
            assert len(warned) == 1 and layer.fused is None
        assert layer.get_config()["fused"] is True
        x = rng.normal(3.0, 2.0, (6, 4)).astype(layer.dtype)
        epsilon = extra.get("epsilon", 1e-3)
        expected, *_ = reference.train_transform(x, None, None, epsilon, -1)
        np.testing.assert_allclose(as64(layer(x, training=True)), expected, **F32)
