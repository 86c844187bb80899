"""Tests for `bn_keras.fold_batch_norms` against a float64 NumPy reference.

The reference computes the *original* model (linear layers, then batch norm
at inference, Algorithm 2 of Ioffe & Szegedy, 2015) in float64 from the
layers' weights; both the original and the folded model must be within
`TOLERANCE` of it. Every test sets random kernels, biases and BN
statistics (variances from 0.1 to 4, gammas of both signs), never the
initializers' values.
"""

import functools
import itertools
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from bn_keras import BatchNorm, fold_batch_norms
from tests import reference
from tests.bn_keras.helpers import BACKEND

L = keras.layers

# Largest error relative to the largest output, max|y - ref| / max|ref|, for
# float32 models against the float64 reference. Measured over these tests on
# TensorFlow, JAX and torch: at most 2.1e-7 for the original model and 1.4e-7
# for the folded one.
TOLERANCE = 1e-6

BATCH_NORMS = {"bn_keras": BatchNorm, "keras": L.BatchNormalization}


class Zero:
    """The producer layers with zero kernels, which `_randomize` replaces.

    On JAX a random initializer costs a compilation per shape, which was
    most of this file's run time.
    """

    Dense = functools.partial(L.Dense, kernel_initializer="zeros")
    Conv1D = functools.partial(L.Conv1D, kernel_initializer="zeros")
    Conv2D = functools.partial(L.Conv2D, kernel_initializer="zeros")
    Conv3D = functools.partial(L.Conv3D, kernel_initializer="zeros")
    DepthwiseConv1D = functools.partial(
        L.DepthwiseConv1D, depthwise_initializer="zeros"
    )
    DepthwiseConv2D = functools.partial(
        L.DepthwiseConv2D, depthwise_initializer="zeros"
    )
    SeparableConv1D = functools.partial(
        L.SeparableConv1D,
        depthwise_initializer="zeros",
        pointwise_initializer="zeros",
    )
    SeparableConv2D = functools.partial(
        L.SeparableConv2D,
        depthwise_initializer="zeros",
        pointwise_initializer="zeros",
    )
    Conv1DTranspose = functools.partial(L.Conv1DTranspose, kernel_initializer="zeros")
    Conv2DTranspose = functools.partial(L.Conv2DTranspose, kernel_initializer="zeros")
    Conv3DTranspose = functools.partial(L.Conv3DTranspose, kernel_initializer="zeros")


# TensorFlow's CPU kernels for these convolutions support only channels_last;
# the other layers run channels_first there too.
TF_CPU_CHANNELS_LAST_ONLY = {
    "conv1d",
    "conv2d",
    "conv1d_transpose",
    "conv2d_transpose",
    "conv3d_transpose",
}

# name: (producer factory, input shape for channels_last). No output's last
# spatial size equals its channel count: there, on TensorFlow, Keras 3.15 adds
# a channels_first bias along the last axis (`ops.add` takes the bias for a
# channels_last one), so the original and folded models would both be wrong.
PRODUCERS = {
    "dense": (lambda: Zero.Dense(5), (7,)),
    "dense_rank3": (lambda: Zero.Dense(5, use_bias=False), (3, 4)),
    "conv1d": (lambda **k: Zero.Conv1D(4, 3, strides=2, padding="same", **k), (9, 3)),
    "conv2d": (lambda **k: Zero.Conv2D(4, 3, dilation_rate=2, **k), (7, 6, 3)),
    "conv2d_groups": (
        lambda **k: Zero.Conv2D(4, 3, strides=2, padding="same", groups=2, **k),
        (7, 6, 4),
    ),
    "conv3d": (lambda **k: Zero.Conv3D(3, 2, use_bias=False, **k), (4, 5, 5, 2)),
    "depthwise_conv1d": (
        lambda **k: Zero.DepthwiseConv1D(3, depth_multiplier=2, **k),
        (9, 3),
    ),
    "depthwise_conv2d": (
        lambda **k: Zero.DepthwiseConv2D(
            3, depth_multiplier=2, padding="same", use_bias=False, **k
        ),
        (6, 5, 3),
    ),
    "separable_conv1d": (
        lambda **k: Zero.SeparableConv1D(4, 3, depth_multiplier=2, **k),
        (8, 3),
    ),
    "separable_conv2d": (
        lambda **k: Zero.SeparableConv2D(4, 3, padding="same", use_bias=False, **k),
        (6, 5, 3),
    ),
    "conv1d_transpose": (
        lambda **k: Zero.Conv1DTranspose(4, 3, strides=2, padding="same", **k),
        (5, 3),
    ),
    "conv2d_transpose": (
        lambda **k: Zero.Conv2DTranspose(4, (3, 2), strides=2, **k),
        (4, 5, 3),
    ),
    "conv3d_transpose": (
        lambda **k: Zero.Conv3DTranspose(
            3, 2, strides=2, padding="same", use_bias=False, **k
        ),
        (3, 2, 3, 2),
    ),
}
CONVOLUTIONS = [name for name in PRODUCERS if not name.startswith("dense")]


def _weights(layer):
    return {
        v.name: np.asarray(keras.ops.convert_to_numpy(v), np.float64)
        for v in layer.weights
    }


def _geometry(size, kernel, stride, dilation, padding):
    """Output size and padding before, as Keras (TensorFlow's "same")."""
    span = (kernel - 1) * dilation + 1
    if padding == "valid":
        return (size - span) // stride + 1, 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
    return out, total // 2, total - total // 2


def _patches(x, kernel_shape, strides, dilations, padding):
    """Yields `(kernel offset, x at that offset for every output position)`."""
    geometry = [
        _geometry(n, k, s, d, padding)
        for n, k, s, d in zip(
            x.shape[1:-1], kernel_shape, strides, dilations, strict=True
        )
    ]
    pads = [(0, 0)] + [(lo, hi) for _, lo, hi in geometry] + [(0, 0)]
    x = np.pad(x, pads)
    for offset in np.ndindex(*kernel_shape):
        window = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, (n, _, _), s in zip(
                offset, dilations, geometry, strides, strict=True
            )
        )
        yield offset, x[(slice(None), *window)]


def _convolution(x, w, layer):
    groups = getattr(layer, "groups", 1)
    kernel = w["kernel"]
    spatial = kernel.shape[:-2]
    cin, cout = kernel.shape[-2], kernel.shape[-1]
    y = 0.0
    for offset, patch in _patches(
        x, spatial, layer.strides, layer.dilation_rate, layer.padding
    ):
        parts = [
            patch[..., g * cin : (g + 1) * cin]
            @ kernel[offset][:, g * cout // groups : (g + 1) * cout // groups]
            for g in range(groups)
        ]
        y = y + np.concatenate(parts, axis=-1)
    return y


def _depthwise(x, kernel, layer):
    y = 0.0
    for offset, patch in _patches(
        x, kernel.shape[:-2], layer.strides, layer.dilation_rate, layer.padding
    ):
        y = y + (patch[..., :, None] * kernel[offset]).reshape(*patch.shape[:-1], -1)
    return y


def _transposed(x, w, layer):
    """Each input position scatters `x @ kernel.T` to `i * stride + offset`.

    Without dilation, which these tests do not use.
    """
    kernel = w["kernel"]
    spatial = kernel.shape[:-2]
    sizes, starts = [], []
    for n, k, s in zip(x.shape[1:-1], spatial, layer.strides, strict=True):
        if layer.padding == "valid":
            sizes.append(n * s + max(k - s, 0))
            starts.append(0)
        else:
            sizes.append(n * s)
            starts.append(max(k - s, 0) // 2)
    full = [
        max((n - 1) * s + k, start + size)
        for n, s, k, start, size in zip(
            x.shape[1:-1], layer.strides, spatial, starts, sizes, strict=True
        )
    ]
    y = np.zeros((x.shape[0], *full, kernel.shape[-2]))
    for offset in np.ndindex(*spatial):
        window = tuple(
            slice(o, o + (n - 1) * s + 1, s)
            for o, n, s in zip(offset, x.shape[1:-1], layer.strides, strict=True)
        )
        y[(slice(None), *window)] += x @ kernel[offset].T
    crop = tuple(
        slice(start, start + size) for start, size in zip(starts, sizes, strict=True)
    )
    return y[(slice(None), *crop)]


def _channels_last(fn):
    """Runs a channels-last reference on channels_first data if the layer is."""

    def wrapped(x, layer):
        if getattr(layer, "data_format", None) != "channels_first":
            return fn(x, layer)
        to_last = (0, *range(2, x.ndim), 1)
        y = fn(np.transpose(x, to_last), layer)
        return np.transpose(y, (0, y.ndim - 1, *range(1, y.ndim - 1)))

    return wrapped


@_channels_last
def _linear(x, layer):
    """A producer layer's output, float64."""
    w = _weights(layer)
    if isinstance(layer, L.Dense):
        y = x @ w["kernel"]
    elif isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
        y = _transposed(x, w, layer)
    elif isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        y = (
            _depthwise(x, w["depthwise_kernel"], layer)
            @ w["pointwise_kernel"][(0,) * (w["pointwise_kernel"].ndim - 2)]
        )
    elif isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        y = _depthwise(x, w["kernel"], layer)
    else:
        y = _convolution(x, w, layer)
    return y + w.get("bias", 0.0)


@_channels_last
def _average_pooling(x, layer):
    (size,) = set(layer.pool_size)
    b, h, w, c = x.shape
    x = x[:, : h // size * size, : w // size * size]
    return x.reshape(b, h // size, size, w // size, size, c).mean(axis=(2, 4))


def _batch_norm(x, layer):
    w = _weights(layer)
    return reference.normalize(
        x,
        w["moving_mean"],
        w["moving_variance"],
        w.get("gamma"),
        w.get("beta"),
        layer.epsilon,
        layer.axis,
    )


def _forward(layer, x):
    """`layer(x)` at inference in float64, for the layers these tests use."""
    if isinstance(layer, tuple(BATCH_NORMS.values())):
        return _batch_norm(x, layer)
    if isinstance(layer, L.Activation):
        return {"sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)), "relu": _relu}[
            keras.activations.serialize(layer.activation)
        ](x)
    if isinstance(layer, L.AveragePooling2D):
        return _average_pooling(x, layer)
    if isinstance(layer, L.Flatten):
        return x.reshape(len(x), -1)
    return _linear(x, layer)


def _relu(x):
    return np.maximum(x, 0.0)


def _sequential_reference(model, x):
    y = np.asarray(x, np.float64)
    for layer in model.layers:
        y = _forward(layer, y)
    return y


def _randomize(model, rng):
    """Random kernels, biases and BN statistics, gamma and beta."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for v in layer.weights:
            shape = v.shape
            if v.name in ("kernel", "depthwise_kernel", "pointwise_kernel"):
                value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
            elif v.name == "moving_mean":
                value = rng.normal(0.0, 2.0, shape)
            elif v.name == "moving_variance":
                value = rng.uniform(0.1, 4.0, shape)
            elif v.name == "gamma":
                value = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
            elif v.name in ("beta", "bias"):
                value = rng.normal(0.0, 1.0, shape)
            else:
                continue
            v.assign(value.astype(v.dtype))


def _predict(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


def _error(y, expected):
    """max|y - expected| / max|expected|."""
    return np.max(np.abs(y - expected)) / np.max(np.abs(expected))


def _batch_norm_names(model):
    return [
        layer.name
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, tuple(BATCH_NORMS.values()))
    ]


def _assert_folds_exactly(model, x, expected=None):
    """Folds `model` and checks both models against the float64 reference.

    Returns the folded model. `expected` defaults to the Sequential reference.
    """
    folded = fold_batch_norms(model)
    if expected is None:
        expected = _sequential_reference(model, x)
    assert _error(_predict(model, x), expected) <= TOLERANCE
    assert _error(_predict(folded, x), expected) <= TOLERANCE
    return folded


def _skip_unsupported(name, data_format):
    if (
        data_format == "channels_first"
        and BACKEND == "tensorflow"
        and name in TF_CPU_CHANNELS_LAST_ONLY
    ):
        pytest.skip(f"TensorFlow's CPU {name} kernel supports only channels_last")


def _channels_first(shape):
    return (shape[-1], *shape[:-1])


@pytest.mark.parametrize(
    "name, data_format, impl",
    [(name, "channels_last", impl) for name in PRODUCERS for impl in BATCH_NORMS]
    # One BN class each, in turn: the fold reads both alike.
    + [
        (name, "channels_first", impl)
        for name, impl in zip(CONVOLUTIONS, itertools.cycle(BATCH_NORMS))
    ],
)
def test_folds_each_producer(name, data_format, impl, rng):
    _skip_unsupported(name, data_format)
    factory, shape = PRODUCERS[name]
    if data_format == "channels_first":
        producer, shape = factory(data_format=data_format), _channels_first(shape)
        axis = 1
    else:
        producer, axis = factory(), -1
    model = keras.Sequential(
        [keras.Input(shape), producer, BATCH_NORMS[impl](axis=axis)]
    )
    _randomize(model, rng)
    x = rng.normal(0.0, 1.0, (3, *shape)).astype("float32")

    folded = _assert_folds_exactly(model, x)

    assert [type(layer) for layer in folded.layers] == [type(producer)]
    assert folded.layers[0].use_bias
    # Control: the BN changes the output far beyond the tolerance.
    unnormalized = _forward(model.layers[0], np.asarray(x, np.float64))
    assert _error(unnormalized, _sequential_reference(model, x)) > 1e3 * TOLERANCE


@pytest.mark.parametrize(
    "impl, use_bias, options",
    [
        ("bn_keras", False, {"center": False}),
        ("bn_keras", True, {"scale": False}),
        ("bn_keras", False, {"center": False, "scale": False, "epsilon": 0.5}),
        ("bn_keras", True, {"center": False, "scale": False}),
        ("bn_keras", False, {"renorm": True, "renorm_clipping": {"rmax": 2.0}}),
        ("bn_keras", True, {"momentum": None}),
        ("bn_keras", False, {"momentum": 0.9, "debias": True}),
        ("bn_keras", True, {"unbiased_variance": True, "trainable": False}),
        ("bn_keras", False, {"virtual_batch_size": 2, "axis": (3,)}),
        ("keras", False, {"center": False, "scale": False}),
        ("keras", True, {"renorm": True}),
        ("keras", False, {"scale": False, "epsilon": 0.5}),
    ],
)
def test_folds_every_batch_norm_option(impl, use_bias, options, rng):
    model = keras.Sequential(
        [
            keras.Input((6, 5, 3)),
            Zero.Conv2D(4, 3, use_bias=use_bias),
            BATCH_NORMS[impl](**options),
        ]
    )
    _randomize(model, rng)
    # A training step, so that the extra state of renorm and debias is as in use.
    model.layers[1](rng.normal(3.0, 2.0, (4, 4, 3, 4)).astype("float32"), training=True)
    x = rng.normal(0.0, 1.0, (2, 6, 5, 3)).astype("float32")

    folded = _assert_folds_exactly(model, x)

    assert _batch_norm_names(folded) == []
    unnormalized = _forward(model.layers[0], np.asarray(x, np.float64))
    assert _error(unnormalized, _sequential_reference(model, x)) > 1e3 * TOLERANCE


def _lenet_bn(impl, shape=(12, 12, 1)):
    """d2l 7.5's LeNet-BN, narrower: no activation before a BN."""
    bn = BATCH_NORMS[impl]
    return keras.Sequential(
        [
            keras.Input(shape),
            Zero.Conv2D(6, 5, padding="same"),
            bn(),
            L.Activation("sigmoid"),
            L.AveragePooling2D(2, strides=2),
            Zero.Conv2D(16, 3),
            bn(),
            L.Activation("sigmoid"),
            L.AveragePooling2D(2, strides=2),
            L.Flatten(),
            Zero.Dense(12),
            bn(),
            L.Activation("sigmoid"),
            Zero.Dense(8),
            bn(),
            L.Activation("sigmoid"),
            Zero.Dense(10),
        ],
        name="lenet_bn",
    )


@pytest.mark.parametrize("impl", BATCH_NORMS)
def test_folds_a_sequential_lenet(impl, rng):
    model = _lenet_bn(impl)
    model.compile(optimizer="sgd", loss="mse")
    _randomize(model, rng)
    x = rng.uniform(0.0, 1.0, (4, 12, 12, 1)).astype("float32")

    folded = _assert_folds_exactly(model, x)

    assert isinstance(folded, keras.Sequential)
    assert folded.name == "lenet_bn"
    assert folded.compiled
    assert _batch_norm_names(folded) == []
    assert len(folded.layers) == len(model.layers) - 4


def _residual_model(rng):
    """A functional graph: branches, a shared BN output, a nested Sequential."""
    inputs = keras.Input((6, 6, 3), name="image")
    shortcut = BatchNorm(name="bn_shortcut")(Zero.Conv2D(4, 1, name="shortcut")(inputs))
    y = Zero.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    y = L.BatchNormalization(name="bn_conv")(y)
    y = L.Activation("relu")(y)
    added = L.Add()([y, shortcut])
    block = keras.Sequential(
        [keras.Input((4,)), Zero.Dense(3, name="inner"), BatchNorm(name="bn_inner")],
        name="block",
    )
    pooled = L.GlobalAveragePooling2D()(added)
    outputs = [block(pooled), Zero.Dense(2, name="head")(shortcut)]
    model = keras.Model(inputs, outputs)
    _randomize(model, rng)
    return model


def _residual_reference(model, x):
    layer = model.get_layer
    shortcut = _forward(layer("bn_shortcut"), _forward(layer("shortcut"), x))
    y = _relu(_forward(layer("bn_conv"), _forward(layer("conv"), x)))
    pooled = (y + shortcut).mean(axis=(1, 2))
    block = layer("block")
    return [
        _sequential_reference(block, pooled),
        _forward(layer("head"), shortcut),
    ]


def test_folds_a_functional_graph(rng):
    model = _residual_model(rng)
    x = rng.normal(0.0, 1.0, (3, 6, 6, 3)).astype("float32")
    expected = _residual_reference(model, np.asarray(x, np.float64))

    folded = fold_batch_norms(model)

    assert _batch_norm_names(folded) == []
    assert folded.get_layer("conv").use_bias
    assert isinstance(folded.get_layer("block"), keras.Sequential)
    for original_output, folded_output, ref in zip(
        model(x), folded(x), expected, strict=True
    ):
        assert _error(keras.ops.convert_to_numpy(original_output), ref) <= TOLERANCE
        assert _error(keras.ops.convert_to_numpy(folded_output), ref) <= TOLERANCE


def test_leaves_the_input_model_untouched(rng):
    model = _residual_model(rng)
    model.compile(optimizer="sgd", loss="mse")
    before = [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]
    config = model.get_config()
    x = rng.normal(0.0, 1.0, (2, 6, 6, 3)).astype("float32")
    outputs = [keras.ops.convert_to_numpy(y) for y in model(x)]

    folded = fold_batch_norms(model)
    for v in folded.weights:
        v.assign(keras.ops.zeros(v.shape, v.dtype))

    assert model.get_config() == config
    assert len(before) == len(model.weights) > len(folded.weights)
    for value, variable in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)
    for expected, y in zip(outputs, model(x), strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(y), expected)
    assert not {id(v) for v in model.weights} & {id(v) for v in folded.weights}


def test_merges_lora_into_the_folded_kernel(rng):
    model = keras.Sequential(
        [keras.Input((6,)), Zero.Dense(4, lora_rank=2), BatchNorm()]
    )
    _randomize(model, rng)
    dense = model.layers[0]
    dense.lora_kernel_b.assign(rng.normal(0.0, 1.0, (2, 4)).astype("float32"))
    x = rng.normal(0.0, 1.0, (3, 6)).astype("float32")
    w = _weights(dense)
    kernel = w["kernel"] + dense.lora_alpha / dense.lora_rank * (
        w["lora_kernel_a"] @ w["lora_kernel_b"]
    )
    expected = _batch_norm(x @ kernel + w["bias"], model.layers[1])
    # Control: the LoRA update matters.
    assert (
        _error(_batch_norm(x @ w["kernel"] + w["bias"], model.layers[1]), expected)
        > 1e-2
    )

    folded = _assert_folds_exactly(model, x, expected)

    assert not folded.layers[0].lora_enabled
    assert [v.name for v in folded.weights] == ["kernel", "bias"]


def _after_relu():
    return keras.Sequential(
        [keras.Input((5,)), Zero.Dense(4, activation="relu"), BatchNorm(name="kept")]
    )


def _after_activation_layer():
    return keras.Sequential(
        [keras.Input((5,)), Zero.Dense(4), L.Activation("tanh"), BatchNorm(name="kept")]
    )


def _on_an_input():
    return keras.Sequential([keras.Input((5,)), BatchNorm(name="kept"), Zero.Dense(3)])


def _producer_output_shared():
    inputs = keras.Input((5,))
    x = Zero.Dense(4)(inputs)
    return keras.Model(inputs, L.Add()([BatchNorm(name="kept")(x), Zero.Dense(4)(x)]))


def _producer_output_is_a_model_output():
    inputs = keras.Input((5,))
    x = Zero.Dense(4)(inputs)
    return keras.Model(inputs, [L.BatchNormalization(name="kept")(x), x])


def _producer_called_twice():
    inputs = keras.Input((5,))
    dense = Zero.Dense(4)
    return keras.Model(
        inputs, [BatchNorm(name="kept")(dense(inputs)), dense(2.0 * inputs)]
    )


def _batch_norm_called_twice():
    inputs = keras.Input((5,))
    bn = BatchNorm(name="kept")
    return keras.Model(inputs, [bn(Zero.Dense(4)(inputs)), bn(Zero.Dense(4)(inputs))])


def _training_true():
    inputs = keras.Input((5,))
    return keras.Model(
        inputs, BatchNorm(name="kept")(Zero.Dense(4)(inputs), training=True)
    )


def _axis_not_channels():
    return keras.Sequential(
        [keras.Input((3, 5)), Zero.Dense(4), L.BatchNormalization(axis=1, name="kept")]
    )


def _tuple_axis():
    return keras.Sequential(
        [keras.Input((3, 5)), Zero.Dense(4), BatchNorm(axis=(1, 2), name="kept")]
    )


def _channels_first_batch_norm_after_channels_last_conv():
    return keras.Sequential(
        [
            keras.Input((5, 4, 2)),
            Zero.DepthwiseConv2D(3),
            BatchNorm(axis=1, name="kept"),
        ]
    )


def _other_dtype():
    return keras.Sequential(
        [keras.Input((5,)), Zero.Dense(4), BatchNorm(dtype="float16", name="kept")]
    )


def _subclass_of_dense():
    class ScaledDense(L.Dense):
        def call(self, inputs):
            return 2.0 * super().call(inputs)

    return keras.Sequential([keras.Input((5,)), ScaledDense(4), BatchNorm(name="kept")])


@pytest.mark.parametrize(
    "build, reason",
    [
        (_after_relu, "activation 'relu'"),
        (_after_activation_layer, "comes from Activation"),
        (_on_an_input, "comes from a model input"),
        (_producer_output_shared, "also feeds other layers"),
        (_producer_output_is_a_model_output, "the model output"),
        (_producer_called_twice, "producer '.*' is called more than once"),
        (_batch_norm_called_twice, "it is called more than once"),
        (_training_true, "training=True"),
        (_axis_not_channels, "axis=1 is not the output-channel axis 2"),
        (_tuple_axis, r"axis=\(1, 2\) names several axes"),
        (_channels_first_batch_norm_after_channels_last_conv, "axis=1 is not"),
        (_other_dtype, "compute dtype float16"),
        (_subclass_of_dense, "comes from ScaledDense"),
    ],
)
def test_keeps_a_batch_norm_that_cannot_fold(build, reason, rng):
    model = build()
    _randomize(model, rng)
    shape = model.inputs[0].shape[1:]
    x = rng.normal(0.0, 1.0, (4, *shape)).astype("float32")

    folded = fold_batch_norms(model)

    assert "kept" in _batch_norm_names(folded)
    # No `training` argument: a call's `training=False` would override the
    # `training=True` recorded in the graph.
    for original, kept in zip(
        keras.tree.flatten(model(x)), keras.tree.flatten(folded(x)), strict=True
    ):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(kept),
            keras.ops.convert_to_numpy(original),
            rtol=1e-6,
            atol=1e-6,
        )
    with pytest.raises(ValueError, match=f"'kept': .*{reason}"):
        fold_batch_norms(model, strict=True)


@pytest.mark.parametrize("functional", [False, True])
def test_keeps_the_trainable_flags(functional, rng):
    model = _residual_model(rng) if functional else _lenet_bn("keras")
    frozen = model.get_layer("conv") if functional else model.layers[0]
    frozen.trainable = False

    folded = fold_batch_norms(model)

    assert not folded.get_layer(frozen.name).trainable
    assert len(folded.trainable_weights) > 0
    model.trainable = False
    folded = fold_batch_norms(model)
    assert not folded.trainable
    assert folded.trainable_weights == []


def test_partial_fold_folds_the_others(rng):
    inputs = keras.Input((5,))
    x = Zero.Dense(4)(inputs)
    kept = BatchNorm(name="kept")(x)
    folded_away = BatchNorm(name="folded")(Zero.Dense(4)(L.Add()([kept, x])))
    model = keras.Model(inputs, folded_away)
    _randomize(model, rng)

    assert _batch_norm_names(fold_batch_norms(model)) == ["kept"]


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = Zero.Dense(3)
        self.bn = BatchNorm()

    def call(self, inputs):
        return self.bn(self.dense(inputs))


def test_refuses_a_subclassed_model():
    model = _Subclassed()
    model(np.zeros((2, 4), "float32"))
    with pytest.raises(ValueError, match="subclassed model"):
        fold_batch_norms(model)
    # Also inside a functional model.
    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match="subclassed model"):
        fold_batch_norms(keras.Model(inputs, model(inputs)))


def test_refuses_a_model_that_is_not_built():
    model = keras.Sequential([Zero.Dense(3), BatchNorm()])
    with pytest.raises(ValueError, match="is not built"):
        fold_batch_norms(model)
    # Control: the same model once built folds.
    model.build((None, 4))
    assert _batch_norm_names(fold_batch_norms(model)) == []


def test_refuses_what_is_not_a_model():
    with pytest.raises(ValueError, match="Received: model=<Dense"):
        fold_batch_norms(Zero.Dense(3))


_LOAD_WITHOUT_BN_KERAS = textwrap.dedent(
    """
    import sys

    sys.modules["bn_keras"] = None  # `import bn_keras` now fails.
    import keras
    import numpy as np

    folded_path, unfolded_path, x_path, y_path = sys.argv[1:]
    model = keras.models.load_model(folded_path)
    y = model(np.load(x_path), training=False)
    np.save(y_path, keras.ops.convert_to_numpy(y))
    try:
        keras.models.load_model(unfolded_path)
    except Exception as error:
        print("unfolded model failed:", type(error).__name__)
    """
)


def test_folded_model_loads_without_bn_keras(tmp_path, rng):
    model = _lenet_bn("bn_keras")
    _randomize(model, rng)
    folded = fold_batch_norms(model)
    x = rng.uniform(0.0, 1.0, (4, 12, 12, 1)).astype("float32")
    paths = [tmp_path / n for n in ("folded.keras", "unfolded.keras", "x.npy", "y.npy")]
    folded.save(paths[0])
    model.save(paths[1])
    np.save(paths[2], x)

    done = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_BN_KERAS, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )

    assert done.returncode == 0, done.stderr
    # Control: the unfolded model needs bn_keras, so the block above works.
    assert "unfolded model failed" in done.stdout
    loaded = np.load(paths[3])
    np.testing.assert_allclose(loaded, _predict(folded, x), rtol=1e-6, atol=1e-6)
    assert _error(loaded, _sequential_reference(model, x)) <= TOLERANCE
