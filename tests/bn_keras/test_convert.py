"""Tests for `convert_batch_norms`: Keras' BN to `bn_keras.BatchNorm` and back.

Every converted model is compared with its original: the same predictions
and the same training steps, within float32 rounding. Every test gives the
BN layers random gamma, beta and statistics first, never the initializers'
ones and zeros, which would hide a weight that was not copied.
"""

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

from bn_keras import BatchNorm, BatchNormLSTM, TimestepBatchNorm, convert_batch_norms
from bn_keras.precise import batch_norm_layers
from tests.bn_keras.helpers import BACKEND

L = keras.layers

# (source class, target class) of each direction.
CLASSES = {
    "bn_keras": (L.BatchNormalization, BatchNorm),
    "keras": (BatchNorm, L.BatchNormalization),
}

# Small models: both BN classes round alike to a few float32 ulps.
CLOSE = {"rtol": 1e-6, "atol": 1e-6}
# ResNet50 and MobileNetV2 (53 and 52 BN layers) add up those roundings:
# measured at most 3.1e-6 on logits of up to 3.3 on TensorFlow, JAX and torch.
DEEP = {"rtol": 1e-5, "atol": 1e-5}
# Training steps: the two classes' batch moments and gradients differ by
# float32 rounding (as in test_keras_parity.py), which three SGD steps
# through `_residual` (a BN over 8 examples, in a block applied twice) grow.
# Measured on torch, the largest: 1.1e-5 on weights of up to 3, 3.1e-5 on
# the outputs of up to 1.5 after training. A changed semantics (momentum,
# variance, renorm) moves the statistics by 1e-2 or more.
TRAINED = {"rtol": 1e-4, "atol": 1e-4}

DOCS = Path(__file__).resolve().parents[2] / "docs" / "conversion.md"


def _randomize(model, rng):
    """Random kernels, biases and BN weights (statistics, gamma, beta)."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for v in layer.weights:
            shape = v.shape
            if v.name == "kernel":
                value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
            elif v.name in ("moving_mean", "renorm_mean"):
                value = rng.normal(0.0, 0.5, shape)
            elif v.name == "moving_variance":
                value = rng.uniform(0.5, 2.0, shape)
            elif v.name in ("moving_stddev", "renorm_stddev"):
                value = rng.uniform(0.7, 1.4, shape)
            elif v.name == "gamma":
                value = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
            elif v.name in ("beta", "bias"):
                value = rng.normal(0.0, 0.5, shape)
            else:
                continue
            v.assign(value.astype(v.dtype))


def _randomize_network(model, rng):
    """Random kernels and BN weights that keep a deep network's scale.

    Kernels of variance 1 / fan-in, positive gammas, statistics near 0 and 1.
    """
    for layer in _layers(model):
        for v in layer.weights:
            shape = v.shape
            if v.name == "kernel":
                # A depthwise kernel (..., in, multiplier) sums over space only.
                depthwise = isinstance(layer, L.DepthwiseConv2D)
                fan_in = np.prod(shape[:-2] if depthwise else shape[:-1])
                value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
            elif v.name in ("gamma", "moving_variance"):
                value = rng.uniform(0.5, 1.5, shape)
            elif v.name in ("beta", "moving_mean"):
                value = rng.normal(0.0, 0.2, shape)
            else:
                continue
            v.assign(value.astype(v.dtype))


def _predict(model, x, training=False):
    outputs = keras.tree.flatten(model(x, training=training))
    return [keras.ops.convert_to_numpy(y).astype(np.float64) for y in outputs]


def _assert_predicts_alike(converted, model, x, tolerance=CLOSE, training=False):
    for y, expected in zip(
        _predict(converted, x, training),
        _predict(model, x, training),
        strict=True,
    ):
        np.testing.assert_allclose(y, expected, **tolerance)


def _values(model):
    return [(v.name, keras.ops.convert_to_numpy(v)) for v in model.weights]


def _layers(model):
    return model._flatten_layers(include_self=False, recursive=True)


def _bn_types(model):
    return {layer.name: type(layer) for layer in batch_norm_layers(model)}


def _sequential(bn):
    """Dense and BN layers with every argument both BN classes share."""
    return keras.Sequential(
        [
            keras.Input((3, 5), name="features"),
            L.Dense(4, kernel_initializer="zeros", name="dense_1"),
            bn(
                axis=1,
                momentum=0.9,
                epsilon=0.01,
                center=False,
                gamma_regularizer=keras.regularizers.L2(0.01),
                gamma_constraint=keras.constraints.NonNeg(),
                moving_variance_initializer="zeros",
                name="bn_axis_1",
            ),
            L.Dense(4, kernel_initializer="zeros", name="dense_2"),
            bn(
                scale=False,
                beta_initializer="ones",
                beta_regularizer="l1",
                beta_constraint=keras.constraints.MaxNorm(2.0),
                name="bn_last",
            ),
            L.Flatten(),
            L.Dense(2, kernel_initializer="zeros", name="head"),
        ],
        name="small",
    )


def _residual(bn):
    """A functional graph: a residual add, nested models two deep, renorm.

    The nested functional model `block` holds a nested Sequential `inner`
    and is called twice (shared weights).
    """
    inner = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(4, kernel_initializer="zeros", name="inner_dense"),
            bn(momentum=0.5, name="inner_bn"),
        ],
        name="inner",
    )
    block_inputs = keras.Input((4,))
    block = keras.Model(
        block_inputs,
        L.Activation("relu")(inner(block_inputs)),
        name="block",
    )
    inputs = keras.Input((6, 6, 3), name="image")
    y = L.Conv2D(4, 3, padding="same", kernel_initializer="zeros", name="conv")(inputs)
    y = bn(momentum=0.5, name="bn_conv")(y)
    y = L.Activation("relu")(y)
    shortcut = L.Conv2D(4, 1, kernel_initializer="zeros", name="shortcut")(inputs)
    shortcut = bn(
        momentum=0.5,
        renorm=True,
        renorm_clipping={"rmax": 1.5, "rmin": 0.5, "dmax": 0.5},
        renorm_momentum=0.9,
        name="bn_renorm",
    )(shortcut)
    pooled = L.GlobalAveragePooling2D()(L.Add()([y, shortcut]))
    outputs = L.Dense(2, kernel_initializer="zeros", name="head")(block(block(pooled)))
    return keras.Model(inputs, outputs, name="residual")


@pytest.mark.parametrize("to", CLASSES)
def test_converts_a_sequential_model(to, rng):
    source, target = CLASSES[to]
    model = _sequential(source)
    _randomize(model, rng)
    x = rng.normal(0.0, 2.0, (4, 3, 5)).astype("float32")

    converted = convert_batch_norms(model, to=to)

    assert isinstance(converted, keras.Sequential)
    assert converted.name == "small"
    assert [layer.name for layer in converted.layers] == [
        layer.name for layer in model.layers
    ]
    assert _bn_types(converted) == {"bn_axis_1": target, "bn_last": target}
    for name in ("bn_axis_1", "bn_last"):
        config = converted.get_layer(name).get_config()
        for key, value in model.get_layer(name).get_config().items():
            if key in config:
                assert config[key] == value, key
    for (name, value), (expected_name, expected) in zip(
        _values(converted), _values(model), strict=True
    ):
        assert name == expected_name
        np.testing.assert_array_equal(value, expected)
    _assert_predicts_alike(converted, model, x)
    # Control: the BN layers matter far beyond the tolerance.
    converted.get_layer("bn_last").moving_mean.assign(keras.ops.zeros((4,)))
    with pytest.raises(AssertionError):
        _assert_predicts_alike(converted, model, x)


@pytest.mark.parametrize("to", CLASSES)
def test_converts_a_functional_graph_with_nested_models(to, rng):
    source, target = CLASSES[to]
    model = _residual(source)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    _randomize(model, rng)
    x = rng.normal(0.0, 1.0, (3, 6, 6, 3)).astype("float32")

    converted = convert_batch_norms(model, to=to)

    assert type(converted) is type(model)
    assert isinstance(converted.get_layer("block"), keras.Model)
    assert isinstance(converted.get_layer("block").get_layer("inner"), keras.Sequential)
    assert _bn_types(converted) == {
        "bn_conv": target,
        "bn_renorm": target,
        "inner_bn": target,
    }
    assert {v.name for v in converted.get_layer("bn_renorm").weights} >= {
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
    }
    assert converted.compiled
    assert converted.get_compile_config() == model.get_compile_config()
    _assert_predicts_alike(converted, model, x)


@pytest.mark.parametrize("to", CLASSES)
def test_trains_as_the_original(to, rng):
    source, _ = CLASSES[to]
    model = _residual(source)
    _randomize(model, rng)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    converted = convert_batch_norms(model, to=to)
    before = _values(model)

    for _ in range(3):
        x = rng.normal(1.0, 2.0, (8, 6, 6, 3)).astype("float32")
        y = rng.normal(0.0, 1.0, (8, 2)).astype("float32")
        model.train_on_batch(x, y)
        converted.train_on_batch(x, y)

    for (name, value), (expected_name, expected) in zip(
        _values(converted), _values(model), strict=True
    ):
        assert name == expected_name
        np.testing.assert_allclose(value, expected, **TRAINED)
    # Control: the steps moved the weights, the statistics included. (A
    # bias or beta whose shift a later BN layer removes gets no gradient.)
    for (name, value), (_, old) in zip(_values(model), before, strict=True):
        if name not in ("bias", "beta"):
            assert np.max(np.abs(value - old)) > 1e-3, name
    x = rng.normal(1.0, 2.0, (2, 6, 6, 3)).astype("float32")
    _assert_predicts_alike(converted, model, x, TRAINED)


def test_leaves_the_original_untouched(rng):
    model = _residual(L.BatchNormalization)
    _randomize(model, rng)
    config = model.get_config()
    before = _values(model)
    x = rng.normal(0.0, 1.0, (2, 6, 6, 3)).astype("float32")
    expected = _predict(model, x)

    converted = convert_batch_norms(model)
    for v in converted.weights:
        v.assign(keras.ops.ones(v.shape, v.dtype))

    assert model.get_config() == config
    assert _bn_types(model) == dict.fromkeys(
        ("bn_conv", "bn_renorm", "inner_bn"), L.BatchNormalization
    )
    for (_, value), (_, old) in zip(_values(model), before, strict=True):
        np.testing.assert_array_equal(value, old)
    for y, old in zip(_predict(model, x), expected, strict=True):
        np.testing.assert_array_equal(y, old)
    assert not {id(v) for v in model.weights} & {id(v) for v in converted.weights}
    assert not {id(layer) for layer in _layers(model)} & {
        id(layer) for layer in _layers(converted)
    }


@pytest.mark.parametrize("to", CLASSES)
def test_keeps_trainable_flags_and_dtype_policies(to, rng):
    source, target = CLASSES[to]
    inputs = keras.Input((4,))
    y = L.Dense(3, kernel_initializer="zeros", dtype="mixed_float16")(inputs)
    y = source(dtype="mixed_float16", name="mixed_bn")(y)
    y = L.Dense(3, kernel_initializer="zeros")(y)
    y = source(trainable=False, name="frozen_bn")(y)
    block = keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(3, kernel_initializer="zeros", name="unfrozen"),
            source(name="block_bn"),
        ],
        name="block",
    )
    # A frozen model holding a layer unfrozen after it.
    block.trainable = False
    block.get_layer("unfrozen").trainable = True
    model = keras.Model(inputs, block(y))
    _randomize(model, rng)
    x = rng.normal(0.0, 2.0, (8, 4)).astype("float32")

    converted = convert_batch_norms(model, to=to)

    assert isinstance(converted.get_layer("mixed_bn"), target)
    assert converted.get_layer("mixed_bn").dtype_policy.name == "mixed_float16"
    assert converted.get_layer("mixed_bn").variable_dtype == "float32"
    assert not converted.get_layer("frozen_bn").trainable
    assert not converted.get_layer("block").trainable
    assert converted.get_layer("block").get_layer("unfrozen").trainable
    assert not converted.get_layer("block").get_layer("block_bn").trainable
    for original, copy in zip(_layers(model), _layers(converted), strict=True):
        assert copy.name == original.name
        assert copy.dtype_policy.name == original.dtype_policy.name
        # An input layer's flag changes nothing.
        if not isinstance(original, L.InputLayer):
            assert copy.trainable == original.trainable, original.name
    assert [v.name for v in converted.trainable_weights] == [
        v.name for v in model.trainable_weights
    ]
    # Frozen BN layers normalize with their statistics in training mode too.
    _assert_predicts_alike(converted, model, x)
    _assert_predicts_alike(converted, model, x, training=True)


APPLICATIONS = {
    "ResNet50": (keras.applications.ResNet50, 53),
    "MobileNetV2": (keras.applications.MobileNetV2, 52),
}


def _application(name):
    """`name` for 32x32 images and 10 classes, its output the logits.

    Built with zero kernels, which `_randomize_network` replaces: on JAX each
    shape of a random initializer costs a compilation, most of a build.
    """
    build, _ = APPLICATIONS[name]
    with (
        warnings.catch_warnings(),
        keras.saving.custom_object_scope({"glorot_uniform": keras.initializers.Zeros}),
    ):
        # MobileNetV2's note that no ImageNet weights fit a 32x32 input.
        warnings.simplefilter("ignore", UserWarning)
        return build(
            weights=None,
            input_shape=(32, 32, 3),
            classes=10,
            classifier_activation=None,
        )


def _logits(model, x):
    # On JAX an eager call compiles every operation; `predict`, the model once.
    if BACKEND == "jax":
        return model.predict(x, verbose=0).astype(np.float64)
    return _predict(model, x)[0]


@pytest.mark.parametrize("name", APPLICATIONS)
def test_converts_keras_applications_and_back(name, rng):
    model = _application(name)
    _randomize_network(model, rng)
    x = rng.uniform(0.0, 1.0, (2, 32, 32, 3)).astype("float32")
    expected = _logits(model, x)

    converted = convert_batch_norms(model)

    types = _bn_types(converted)
    assert len(types) == APPLICATIONS[name][1]
    assert set(types.values()) == {BatchNorm}
    assert list(types) == list(_bn_types(model))
    np.testing.assert_allclose(_logits(converted, x), expected, **DEEP)
    # Keras' layers again, with the same weights: the very same computation.
    back = convert_batch_norms(converted, to="keras")
    assert set(_bn_types(back).values()) == {L.BatchNormalization}
    np.testing.assert_array_equal(_logits(back, x), expected)
    np.testing.assert_array_equal(_logits(model, x), expected)
    # Control: one BN layer's statistics move the logits beyond the tolerance.
    last = batch_norm_layers(converted)[-1]
    last.moving_mean.assign(last.moving_mean + 1.0)
    assert np.max(np.abs(_logits(converted, x) - expected)) > 1e-3


_LOAD_WITHOUT_BN_KERAS = textwrap.dedent(
    """
    import sys

    sys.modules["bn_keras"] = None  # `import bn_keras` now fails.
    import keras
    import numpy as np

    model_path, x_path, y_path = sys.argv[1:]
    model = keras.saving.load_model(model_path)
    np.save(y_path, keras.ops.convert_to_numpy(model(np.load(x_path))))
    """
)


def test_converted_back_model_loads_without_bn_keras(tmp_path, rng):
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            L.Conv2D(4, 3, kernel_initializer="zeros"),
            # `fused` picks the backend's kernel only: it is dropped.
            BatchNorm(fused=True if BACKEND != "jax" else None),
            L.Flatten(),
            L.Dense(5, kernel_initializer="zeros"),
            BatchNorm(axis=(1,), renorm=True, synchronized=BACKEND == "tensorflow"),
        ]
    )
    _randomize(model, rng)
    x = rng.normal(0.0, 1.0, (3, 6, 6, 3)).astype("float32")

    back = convert_batch_norms(model, to="keras")

    assert "bn_keras>" in model.to_json()  # Control.
    assert "bn_keras" not in back.to_json()
    assert back.layers[-1].axis == 1
    assert back.layers[-1].synchronized == (BACKEND == "tensorflow")
    paths = [tmp_path / name for name in ("model.keras", "x.npy", "y.npy")]
    back.save(paths[0])
    np.save(paths[1], x)
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_BN_KERAS, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr
    (expected,) = _predict(model, x)
    np.testing.assert_allclose(np.load(paths[2]), expected, **CLOSE)


def _one_bn(bn):
    return keras.Sequential([keras.Input((3, 4)), bn, L.Dense(2)])


@pytest.mark.parametrize(
    "options, reason",
    [
        ({"momentum": None}, "momentum=None"),
        ({"momentum": 0.9, "debias": True}, "debias=True"),
        ({"unbiased_variance": True}, "unbiased_variance=True"),
        ({"virtual_batch_size": 2}, "virtual_batch_size=2"),
        ({"axis": (1, 2)}, r"axis=\(1, 2\)"),
    ],
)
def test_refuses_options_keras_lacks(options, reason):
    model = _one_bn(BatchNorm(name="special", **options))
    with pytest.raises(ValueError, match=f"'special': {reason} "):
        convert_batch_norms(model, to="keras")


@pytest.mark.parametrize("mode", ["frozen", "batch"])
def test_refuses_a_statistics_mode_keras_lacks(mode):
    bn = BatchNorm(name="special")
    bn.statistics = mode
    model = _one_bn(bn)
    with pytest.raises(ValueError, match=f"'special': statistics='{mode}'") as error:
        convert_batch_norms(model, to="keras")
    # Given once, with its reason, not again as an unknown option.
    assert str(error.value).count("statistics=") == 1


def test_names_every_layer_and_option_it_refuses():
    inputs = keras.Input((3, 4))
    y = BatchNorm(momentum=None, unbiased_variance=True, name="first")(inputs)
    y = BatchNorm(name="fine")(y)
    y = BatchNorm(virtual_batch_size=2, axis=(1, 2), name="second")(y)
    model = keras.Model(inputs, y, name="net")

    with pytest.raises(ValueError) as error:
        convert_batch_norms(model, to="keras")

    message = str(error.value)
    assert message.startswith(
        "Cannot convert the BN layers of model 'net' to "
        "keras.layers.BatchNormalization: 'first': momentum=None"
    )
    for part in ("unbiased_variance=True", "'second': virtual_batch_size=2"):
        assert part in message
    assert re.search(r"'second': .*axis=\(1, 2\)", message)
    assert "'fine'" not in message


@pytest.mark.skipif(
    BACKEND == "tensorflow", reason="Keras' layer is synchronized on TensorFlow"
)
def test_refuses_synchronized_where_keras_cannot():
    model = _one_bn(BatchNorm(synchronized=True, name="special"))
    with pytest.raises(
        ValueError, match=f"'special': synchronized=True .* not on {BACKEND}"
    ):
        convert_batch_norms(model, to="keras")


def test_refuses_recurrent_batch_norms():
    inputs = keras.Input((5, 3))
    y = TimestepBatchNorm(5, name="per_step")(inputs)
    y = BatchNormLSTM(4, 5, name="lstm")(y)
    model = keras.Model(inputs, BatchNorm(name="fine")(y))

    with pytest.raises(ValueError) as error:
        convert_batch_norms(model, to="keras")

    assert "'per_step' is a TimestepBatchNorm: it keeps one population" in str(
        error.value
    )
    assert "'lstm' is a BatchNormLSTM: its batch normalizations run" in str(error.value)
    # To bn_keras, they are kept as they are.
    with pytest.raises(ValueError, match="holds no keras.layers.BatchNormalization"):
        convert_batch_norms(model)


class _KerasBNSubclass(L.BatchNormalization):
    pass


def test_refuses_a_subclass_and_a_batch_norm_inside_a_layer():
    inputs = keras.Input((5, 3))
    y = _KerasBNSubclass(name="custom")(inputs)
    y = L.TimeDistributed(L.BatchNormalization(name="wrapped"), name="wrapper")(y)
    model = keras.Model(inputs, L.BatchNormalization(name="fine")(y))

    with pytest.raises(ValueError) as error:
        convert_batch_norms(model)

    message = str(error.value)
    assert "'custom' is a _KerasBNSubclass, a subclass of" in message
    assert "'wrapper' (TimeDistributed) holds 'wrapped' inside it" in message
    assert "'fine'" not in message


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.bn = L.BatchNormalization(name="hidden")

    def call(self, inputs):
        return self.bn(inputs)


def test_refuses_a_subclassed_model():
    model = _Subclassed()
    model(np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="subclassed model 'subclassed'"):
        convert_batch_norms(model)
    inputs = keras.Input((3,))
    with pytest.raises(
        ValueError, match="'subclassed' is a subclassed model .* holding 'hidden'"
    ):
        convert_batch_norms(keras.Model(inputs, model(inputs)))


def test_refuses_a_model_that_is_not_built():
    model = keras.Sequential([L.Dense(3), L.BatchNormalization()])
    with pytest.raises(ValueError, match="is not built"):
        convert_batch_norms(model)
    # Control: the same model once built converts.
    model.build((None, 4))
    assert set(_bn_types(convert_batch_norms(model)).values()) == {BatchNorm}


def test_refuses_a_model_without_a_batch_norm_to_convert():
    plain = keras.Sequential([keras.Input((3,)), L.Dense(2)], name="plain")
    with pytest.raises(
        ValueError,
        match=r"Model 'plain' holds no keras.layers.BatchNormalization layer "
        r"to convert to bn_keras.BatchNorm \(it holds no batch-normalization",
    ):
        convert_batch_norms(plain)
    ours = keras.Sequential([keras.Input((3,)), BatchNorm(name="ours")])
    with pytest.raises(ValueError, match=r"BN layers it holds: 'ours' \(BatchNorm\)"):
        convert_batch_norms(ours)


def test_refuses_bad_arguments():
    model = _one_bn(L.BatchNormalization())
    with pytest.raises(ValueError, match="Received: to='torch'"):
        convert_batch_norms(model, to="torch")
    with pytest.raises(ValueError, match="Received: model=<Dense"):
        convert_batch_norms(L.Dense(3))


def _docs_example():
    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/conversion.md lost its example"
    return blocks[0]


def test_docs_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_docs_example(), str(DOCS), "exec"), namespace)
    assert set(_bn_types(namespace["converted"]).values()) == {BatchNorm}
    assert set(_bn_types(namespace["back"]).values()) == {L.BatchNormalization}
    assert (tmp_path / "model.keras").exists()
