"""Tests for bn_keras.diagnosis.inspect_statistics.

The reported numbers are checked against NumPy: in a Dense -> BN model the
BN layer's input is `x @ kernel + bias`, whose mean and variance NumPy
computes, and the population statistics are set to known values.
"""

import json
import re

import keras
import numpy as np
import pytest

from bn_keras import (
    BatchNorm,
    BatchNormLSTM,
    TimestepBatchNorm,
    recompute_statistics,
)
from bn_keras.diagnosis import StatisticsReport, inspect_statistics
from tests import reference
from tests.bn_keras.helpers import EPSILON, as64, tensorflow_only

EXAMPLES, BATCH, FEATURES, UNITS = 120, 30, 6, 4
# Relative tolerance of float32 statistics against float64 NumPy.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
MAKE_BN = {
    "bn_keras": lambda **kwargs: BatchNorm(**kwargs),
    "keras": lambda **kwargs: keras.layers.BatchNormalization(**kwargs),
}


def _dense_bn(make_bn, rng, softmax=False):
    """Dense -> BN (-> softmax) with random weights and statistics."""
    layers = [
        keras.Input((FEATURES,)),
        keras.layers.Dense(UNITS, name="dense"),
        make_bn(name="bn"),
    ]
    if softmax:
        layers.append(keras.layers.Activation("softmax"))
    model = keras.Sequential(layers)
    dense, bn = model.get_layer("dense"), model.get_layer("bn")
    dense.kernel.assign(rng.normal(size=(FEATURES, UNITS)).astype("float32"))
    dense.bias.assign(rng.normal(size=UNITS).astype("float32"))
    bn.gamma.assign(rng.uniform(0.5, 2.0, UNITS).astype("float32"))
    bn.beta.assign(rng.normal(size=UNITS).astype("float32"))
    return model


def _inputs(rng, examples=EXAMPLES):
    return rng.normal(2.0, 3.0, (examples, FEATURES)).astype("float32")


def _bn_input(model, x):
    dense = model.get_layer("dense")
    return x.astype("float64") @ as64(dense.kernel) + as64(dense.bias)


def _compared(moving_mean, moving_variance, mean, variance, epsilon=EPSILON):
    """NumPy: the shift, variance ratio and variance factor of each entry."""
    shift = np.abs(moving_mean - mean) / np.sqrt(variance + epsilon)
    ratio = (moving_variance + epsilon) / (variance + epsilon)
    return shift, ratio, np.maximum(ratio, 1.0 / ratio)


def _batch_outputs(model, h, batch=BATCH):
    """NumPy: the BN layer's outputs with the statistics of each batch."""
    bn = model.get_layer("bn")
    gamma, beta = as64(bn.gamma), as64(bn.beta)
    return np.concatenate(
        [
            reference.train_transform(h[i : i + batch], gamma, beta, bn.epsilon, -1)[0]
            for i in range(0, len(h), batch)
        ]
    )


def _softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _state(model):
    """Everything an inspection must leave as it is."""
    variables = [as64(v) for v in model.variables]
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += [as64(v) for v in optimizer.variables]
    attributes = [
        (
            layer.name,
            layer.trainable,
            getattr(layer, "momentum", None),
            getattr(layer, "debias", None),
            getattr(layer, "unbiased_variance", None),
            getattr(layer, "statistics", None),
            tuple(v.trainable for v in layer.weights),
        )
        for layer in model._flatten_layers(include_self=True, recursive=True)
    ]
    functions = [model.train_function, model.predict_function]
    return variables, attributes, functions


def _assert_same_state(before, after):
    for a, b in zip(before[0], after[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert before[1] == after[1]
    assert all(a is b for a, b in zip(before[2], after[2], strict=True))


@pytest.mark.parametrize("impl", MAKE_BN)
def test_numbers_against_numpy(impl, rng):
    model = _dense_bn(MAKE_BN[impl], rng)
    bn = model.get_layer("bn")
    x = _inputs(rng)
    h = _bn_input(model, x)
    moving_mean = h.mean(0) + rng.normal(0.0, 0.3, UNITS) * h.std(0)
    moving_variance = h.var(0) * rng.uniform(0.5, 2.0, UNITS)
    bn.moving_mean.assign(moving_mean.astype("float32"))
    bn.moving_variance.assign(moving_variance.astype("float32"))
    moving_mean, moving_variance = as64(bn.moving_mean), as64(bn.moving_variance)

    report = inspect_statistics(model, x, batch_size=BATCH, progress=False)

    assert isinstance(report, StatisticsReport)
    (layer,) = report.layers
    shift, ratio, factor = _compared(moving_mean, moving_variance, h.mean(0), h.var(0))
    assert (layer.name, layer.type, layer.shape) == ("bn", type(bn).__name__, (4,))
    assert (layer.entries, layer.nonfinite, layer.unreached) == (UNITS, 0, 0)
    assert not layer.frozen
    np.testing.assert_allclose(layer.mean_shift_max, shift.max(), **TOLERANCE)
    np.testing.assert_allclose(layer.mean_shift_median, np.median(shift), **TOLERANCE)
    np.testing.assert_allclose(layer.variance_ratio_min, ratio.min(), **TOLERANCE)
    np.testing.assert_allclose(layer.variance_ratio_max, ratio.max(), **TOLERANCE)
    np.testing.assert_allclose(
        layer.variance_ratio_median, np.median(ratio), **TOLERANCE
    )
    np.testing.assert_allclose(layer.variance_factor_max, factor.max(), **TOLERANCE)
    np.testing.assert_allclose(
        layer.variance_factor_median, np.median(factor), **TOLERANCE
    )
    assert layer.stale == (shift.max() > 0.1 or factor.max() > 1.25)
    assert layer.stale

    # The model level: the BN layer is the output, in NumPy both ways.
    inference = reference.normalize(
        h, moving_mean, moving_variance, as64(bn.gamma), as64(bn.beta), bn.epsilon, -1
    )
    batch = _batch_outputs(model, h)
    np.testing.assert_allclose(
        report.output_gap, np.abs(inference - batch).mean() / batch.std(), rtol=1e-4
    )
    expected = (inference.argmax(-1) != batch.argmax(-1)).mean()
    assert report.disagreement == pytest.approx(expected)
    assert (report.examples, report.batches) == (EXAMPLES, EXAMPLES // BATCH)
    assert report.accuracy_inference is None and report.accuracy_gap is None
    assert report.nonfinite_outputs == 0
    assert report.training_mode_layers == ()


def _deep_model(dropout=False):
    layers = [
        keras.Input((FEATURES,)),
        keras.layers.Dense(5),
        BatchNorm(momentum=None, name="ours"),
        keras.layers.Activation("relu"),
    ]
    if dropout:
        layers.append(keras.layers.Dropout(0.3, name="drop"))
    layers += [keras.layers.Dense(3), keras.layers.BatchNormalization(name="keras")]
    return keras.Sequential(layers)


def test_fresh_statistics_are_not_stale(rng):
    model = _deep_model()
    x = _inputs(rng)
    recompute_statistics(model, x, batch_size=BATCH, progress=False)
    report = inspect_statistics(model, x, batch_size=BATCH, progress=False)
    assert not report.stale and report.stale_layers == ()
    for layer in report.layers:
        assert layer.mean_shift_max < 1e-4
        assert layer.variance_factor_max < 1 + 1e-4
    assert "STALE" not in str(report)
    assert "Recompute" not in str(report)


@pytest.mark.parametrize(
    "shift, factor, thresholds, stale",
    [
        (0.05, 1.0, {}, False),
        (0.2, 1.0, {}, True),
        (0.2, 1.0, {"max_shift": 0.3}, False),
        (0.0, 1.2, {}, False),
        (0.0, 1.5, {}, True),
        # The variance too small counts as too large.
        (0.0, 0.7, {}, True),
        (0.0, 0.7, {"max_variance_factor": 1.5}, False),
    ],
)
def test_shifted_statistics_are_stale(shift, factor, thresholds, stale, rng):
    """Fresh statistics, one entry moved by `shift` data std and its variance
    (plus epsilon) scaled by `factor`."""
    model = _dense_bn(MAKE_BN["bn_keras"], rng)
    x = _inputs(rng)
    recompute_statistics(model, x, batch_size=BATCH, progress=False)
    bn = model.get_layer("bn")
    mean, variance = as64(bn.moving_mean), as64(bn.moving_variance)
    mean[2] += shift * np.sqrt(variance[2] + EPSILON)
    variance[2] = (variance[2] + EPSILON) * factor - EPSILON
    bn.moving_mean.assign(mean.astype("float32"))
    bn.moving_variance.assign(variance.astype("float32"))

    report = inspect_statistics(
        model, x, batch_size=BATCH, progress=False, **thresholds
    )

    (layer,) = report.layers
    assert layer.mean_shift_max == pytest.approx(shift, abs=1e-4)
    assert layer.variance_factor_max == pytest.approx(max(factor, 1 / factor), 1e-4)
    assert layer.stale is stale and report.stale is stale
    assert (report.max_shift, report.max_variance_factor) == (
        thresholds.get("max_shift", 0.1),
        thresholds.get("max_variance_factor", 1.25),
    )
    text = str(report)
    assert ("STALE" in text) is stale
    if stale:
        assert "bn_keras.recompute_statistics(model" in text
        assert "more data or steps" in text
        assert "domain shift" in text


def test_non_finite_statistics_are_stale_and_json_stays_strict(rng):
    model = _dense_bn(MAKE_BN["bn_keras"], rng)
    x = _inputs(rng)
    recompute_statistics(model, x, batch_size=BATCH, progress=False)
    bn = model.get_layer("bn")
    mean, variance = as64(bn.moving_mean), as64(bn.moving_variance)
    mean[0], variance[1], variance[2] = np.nan, np.inf, np.nan
    bn.moving_mean.assign(mean.astype("float32"))
    bn.moving_variance.assign(variance.astype("float32"))

    report = inspect_statistics(model, x, batch_size=BATCH, progress=False)

    (layer,) = report.layers
    assert layer.nonfinite == 3 and layer.stale
    # The one finite entry is fresh.
    assert layer.mean_shift_max < 1e-4
    # An infinite variance normalizes to 0; a NaN statistic gives NaN.
    assert report.nonfinite_outputs == 2 * EXAMPLES
    assert np.isnan(report.output_gap)
    # Each prediction has a NaN score: none agrees.
    assert report.disagreement == 1.0
    values = report.to_dict()
    text = json.dumps(values, allow_nan=False)
    assert json.loads(text) == values == json.loads(report.to_json())
    assert values["output_gap"] == "nan"
    assert values["stale"] is True and values["stale_layers"] == ["bn"]
    assert values["layers"][0]["nonfinite"] == 3
    assert "STALE" in str(report)


def test_a_negative_variance_is_an_infinite_factor(rng):
    model = _dense_bn(MAKE_BN["keras"], rng)
    x = _inputs(rng)
    model.get_layer("bn").moving_variance.assign(np.full(UNITS, -1.0, "float32"))
    report = inspect_statistics(model, x, batch_size=BATCH, progress=False)
    assert report.layers[0].variance_factor_max == np.inf
    assert report.layers[0].stale
    assert report.to_dict()["layers"][0]["variance_factor_max"] == "inf"
    json.dumps(report.to_dict(), allow_nan=False)


def test_nested_and_frozen_layers(rng):
    """Every BN layer at any depth, in the model's order; a frozen one is
    measured on its input like the others (x itself here), and stays frozen."""
    inner = keras.Sequential(
        [keras.Input((FEATURES,)), BatchNorm(name="inner_bn")], name="inner"
    )
    inner.trainable = False
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            inner,
            keras.layers.Dense(UNITS, name="dense"),
            keras.layers.BatchNormalization(name="outer_bn"),
        ]
    )
    frozen = inner.get_layer("inner_bn")
    frozen.moving_mean.assign(rng.normal(size=FEATURES).astype("float32"))
    x = _inputs(rng)
    before = _state(model)

    report = inspect_statistics(model, x, batch_size=BATCH, progress=False)

    _assert_same_state(before, _state(model))
    assert not frozen.trainable and not inner.trainable
    assert [layer.name for layer in report.layers] == ["inner_bn", "outer_bn"]
    assert [layer.frozen for layer in report.layers] == [True, False]
    x64 = x.astype("float64")
    shift, _, factor = _compared(
        as64(frozen.moving_mean), as64(frozen.moving_variance), x64.mean(0), x64.var(0)
    )
    np.testing.assert_allclose(
        report.layers[0].mean_shift_max, shift.max(), **TOLERANCE
    )
    np.testing.assert_allclose(
        report.layers[0].variance_factor_max, factor.max(), **TOLERANCE
    )
    assert report.layers[0].stale
    text = str(report)
    assert "frozen" in text and "keep their statistics" in text


def test_timesteps_the_data_never_reach(rng):
    """Sequences of 4 steps reach 4 of the 6 timestep slots."""
    inputs = keras.Input((None, 3))
    model = keras.Model(inputs, TimestepBatchNorm(max_timesteps=6, name="tbn")(inputs))
    bn = model.get_layer("tbn")
    moving_mean = rng.normal(size=(6, 3))
    bn.moving_mean.assign(moving_mean.astype("float32"))
    x = rng.normal(2.0, 3.0, (EXAMPLES, 4, 3)).astype("float32")

    report = inspect_statistics(model, x, batch_size=BATCH, progress=False)

    (layer,) = report.layers
    assert (layer.shape, layer.entries, layer.unreached) == ((6, 3), 18, 6)
    assert layer.nonfinite == 0
    x64 = x.astype("float64")
    shift, _, factor = _compared(
        as64(bn.moving_mean)[:4], np.ones((4, 3)), x64.mean(0), x64.var(0)
    )
    np.testing.assert_allclose(layer.mean_shift_max, shift.max(), **TOLERANCE)
    np.testing.assert_allclose(layer.mean_shift_median, np.median(shift), **TOLERANCE)
    np.testing.assert_allclose(layer.variance_factor_max, factor.max(), **TOLERANCE)
    assert "6/18" in str(report)


def test_statistics_modes(rng):
    """A layer in the "frozen" mode is measured like a frozen one; one in the
    "batch" mode normalizes with the batch statistics in the inference run,
    as the model does."""
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            BatchNorm(statistics="frozen", name="first"),
            keras.layers.Dense(UNITS, name="dense"),
            BatchNorm(statistics="batch", name="bn"),
        ]
    )
    first, bn = model.get_layer("first"), model.get_layer("bn")
    first.moving_mean.assign(rng.normal(2.0, 1.0, FEATURES).astype("float32"))
    first.moving_variance.assign(rng.uniform(1.0, 9.0, FEATURES).astype("float32"))
    x = _inputs(rng)
    before = _state(model)

    report = inspect_statistics(model, x, batch_size=BATCH, progress=False)

    _assert_same_state(before, _state(model))
    assert (first.statistics, bn.statistics) == ("frozen", "batch")
    assert [layer.frozen for layer in report.layers] == [True, False]
    x64 = x.astype("float64")
    population = (as64(first.moving_mean), as64(first.moving_variance))
    shift, _, factor = _compared(*population, x64.mean(0), x64.var(0))
    np.testing.assert_allclose(
        report.layers[0].mean_shift_max, shift.max(), **TOLERANCE
    )
    np.testing.assert_allclose(
        report.layers[0].variance_factor_max, factor.max(), **TOLERANCE
    )
    # The second layer sees the first one's batch-normalized output.
    gamma, beta = as64(first.gamma), as64(first.beta)
    normalized = np.concatenate(
        [
            reference.train_transform(x64[i : i + BATCH], gamma, beta, EPSILON, -1)[0]
            for i in range(0, EXAMPLES, BATCH)
        ]
    )
    h = _bn_input(model, normalized)
    shift, _, _ = _compared(
        as64(bn.moving_mean), as64(bn.moving_variance), *(h.mean(0), h.var(0))
    )
    np.testing.assert_allclose(
        report.layers[1].mean_shift_max, shift.max(), **TOLERANCE
    )
    # Inference: the first layer with its population statistics, the second
    # with the batch's.
    inference = _batch_outputs(
        model,
        _bn_input(
            model, reference.normalize(x64, *population, gamma, beta, EPSILON, -1)
        ),
    )
    batch = _batch_outputs(model, h)
    np.testing.assert_allclose(
        report.output_gap, np.abs(inference - batch).mean() / batch.std(), rtol=1e-4
    )


def test_a_frozen_batch_norm_lstm(rng):
    """The LSTM decides for its normalizations: it runs its training
    recurrence for the inspection, and stays frozen."""
    inputs = keras.Input((4, 2))
    lstm = BatchNormLSTM(3, max_timesteps=6, name="lstm")
    model = keras.Model(inputs, lstm(inputs))
    lstm.trainable = False
    x = rng.normal(1.0, 2.0, (EXAMPLES, 4, 2)).astype("float32")
    before = _state(model)

    report = inspect_statistics(model, x, batch_size=BATCH, progress=False)

    _assert_same_state(before, _state(model))
    layers = {layer.name: layer for layer in report.layers}
    norms = (lstm.input_norm, lstm.recurrent_norm, lstm.cell_norm)
    assert all(layers[norm.name].frozen for norm in norms)
    assert [layers[norm.name].unreached for norm in norms] == [24, 24, 6]
    assert all(layer.mean_shift_max is not None for layer in report.layers)
    # The input normalization's input: x @ kernel, per timestep.
    gates = x.astype("float64") @ as64(lstm.kernel)
    shift, _, factor = _compared(
        np.zeros((4, 12)), np.ones((4, 12)), gates.mean(0), gates.var(0)
    )
    measured = layers[lstm.input_norm.name]
    np.testing.assert_allclose(measured.mean_shift_max, shift.max(), **TOLERANCE)
    np.testing.assert_allclose(measured.variance_factor_max, factor.max(), **TOLERANCE)


@pytest.mark.parametrize("labels", ["array y", "one-hot y", "(x, y) batches"])
def test_accuracy_with_labels(labels, rng):
    """Inference accuracy from `model.predict`, batch-statistics accuracy
    from NumPy."""
    model = _dense_bn(MAKE_BN["bn_keras"], rng, softmax=True)
    bn = model.get_layer("bn")
    x = _inputs(rng)
    h = _bn_input(model, x)
    bn.moving_mean.assign((h.mean(0) + 0.5 * h.std(0)).astype("float32"))
    bn.moving_variance.assign((h.var(0) * 3.0).astype("float32"))
    y = rng.integers(0, UNITS, EXAMPLES)
    # Labels that the batch statistics mostly get right.
    y[::2] = _batch_outputs(model, h).argmax(-1)[::2]
    if labels == "array y":
        kwargs = {"data": x, "y": y, "batch_size": BATCH}
    elif labels == "one-hot y":
        kwargs = {"data": x, "y": np.eye(UNITS)[y], "batch_size": BATCH}
    else:
        kwargs = {
            "data": ((x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, 120, 30))
        }

    report = inspect_statistics(model, progress=False, **kwargs)

    inference = model.predict(x, batch_size=BATCH, verbose=0).argmax(-1)
    batch = _softmax(_batch_outputs(model, h)).argmax(-1)
    assert report.accuracy_inference == pytest.approx((inference == y).mean())
    assert report.accuracy_batch == pytest.approx((batch == y).mean())
    assert report.accuracy_gap == pytest.approx(
        (batch == y).mean() - (inference == y).mean()
    )
    assert report.accuracy_gap > 0
    assert "accuracy" in str(report)


@tensorflow_only("tf.data.")
def test_labels_from_a_dataset(rng):
    import tensorflow as tf

    model = _dense_bn(MAKE_BN["keras"], rng, softmax=True)
    x = _inputs(rng)
    y = rng.integers(0, UNITS, EXAMPLES)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    report = inspect_statistics(model, dataset, progress=False)
    expected = inspect_statistics(model, x, y, batch_size=BATCH, progress=False)
    assert report.accuracy_inference is not None
    assert report.to_dict() == expected.to_dict()


def test_the_last_example_left_out_with_its_label(rng):
    """121 examples in batches of 30: the last batch of one example, and its
    label, are left out."""
    model = _dense_bn(MAKE_BN["bn_keras"], rng)
    x = _inputs(rng, EXAMPLES + 1)
    y = rng.integers(0, UNITS, EXAMPLES + 1)
    report = inspect_statistics(model, x, y, batch_size=BATCH, progress=False)
    expected = inspect_statistics(
        model, x[:EXAMPLES], y[:EXAMPLES], batch_size=BATCH, progress=False
    )
    assert (report.examples, report.batches) == (EXAMPLES, 4)
    assert report.to_dict() == expected.to_dict()


def test_targets_that_are_not_labels(rng):
    """Regression targets in batches give no accuracy; as `y`, an error."""
    model = _dense_bn(MAKE_BN["bn_keras"], rng)
    x = _inputs(rng)
    targets = rng.normal(size=(EXAMPLES, UNITS - 1))
    batches = ((x[i : i + BATCH], targets[i : i + BATCH]) for i in range(0, 120, 30))
    report = inspect_statistics(model, batches, progress=False)
    assert report.accuracy_inference is None and report.accuracy_gap is None
    with pytest.raises(ValueError, match=re.escape("is not class labels")):
        inspect_statistics(model, x, targets, batch_size=BATCH, progress=False)


def test_nothing_changes(rng):
    """Weights, statistics, counters, optimizer, attributes and compiled
    functions, on a trained model with a frozen layer and dropout."""
    model = _deep_model(dropout=True)
    model.compile(optimizer="adam", loss="mse")
    x = _inputs(rng)
    model.fit(x, rng.normal(size=(EXAMPLES, 3)), batch_size=BATCH, verbose=0)
    model.get_layer("keras").trainable = False
    before = _state(model)

    report = inspect_statistics(model, x, batch_size=BATCH, progress=False)
    _assert_same_state(before, _state(model))
    assert report.training_mode_layers == ("drop",)
    assert "drop" in str(report)

    bad = x.copy()
    bad[70, 1] = np.nan
    with pytest.raises(ValueError, match="Batch 2 of `data` holds a NaN or inf"):
        inspect_statistics(model, bad, batch_size=BATCH, progress=False)
    _assert_same_state(before, _state(model))


def _unbuilt():
    return keras.Sequential([keras.layers.Dense(3), BatchNorm()])


def _no_bn():
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(3)])


@pytest.mark.parametrize(
    "make_model, kwargs, message",
    [
        (None, {"data": []}, "`data` yielded no batch"),
        (None, {"data": iter([])}, "`data` yielded no batch"),
        (
            None,
            {"data": np.zeros((EXAMPLES, FEATURES + 1)), "batch_size": BATCH},
            "takes shape (None, 6), but `data` gives it an array of shape (120, 7)",
        ),
        (
            None,
            {"data": np.zeros((EXAMPLES, 2, FEATURES)), "batch_size": BATCH},
            "is the data batched?",
        ),
        (
            None,
            {"data": np.full((EXAMPLES, FEATURES), np.inf), "batch_size": BATCH},
            "Batch 0 of `data` holds a NaN or inf",
        ),
        (_no_bn, {}, "has no batch-normalization layer to inspect"),
        (_unbuilt, {}, "must be built before you inspect it"),
        (None, {"steps": 0}, "`steps` must be a positive integer. Received: steps=0"),
        (None, {"batch_size": -1}, "`batch_size` must be a positive integer"),
        (None, {"batch_size": 2.5}, "`batch_size` must be a positive integer"),
        (None, {"max_shift": 0.0}, "`max_shift` must be a positive number"),
        (None, {"max_variance_factor": 1}, "`max_variance_factor` must be a number"),
        (None, {"y": np.zeros(EXAMPLES - 1)}, "one target per example"),
        (None, {"y": np.zeros(UNITS)}, "one target per example"),
        (
            None,
            {"data": iter([np.zeros((4, FEATURES))]), "y": np.zeros(4)},
            "`y` goes with array `data` only",
        ),
    ],
    ids=[
        "empty list",
        "empty iterator",
        "features",
        "rank",
        "inf",
        "no BN",
        "unbuilt",
        "steps",
        "negative batch_size",
        "float batch_size",
        "max_shift",
        "max_variance_factor",
        "short y",
        "y of the wrong length",
        "y with batches",
    ],
)
def test_bad_input_is_one_clear_error(make_model, kwargs, message, rng):
    model = _dense_bn(MAKE_BN["keras"], rng) if make_model is None else make_model()
    arguments = {"data": _inputs(rng), "batch_size": BATCH, **kwargs}
    if isinstance(arguments["data"], (list, type(iter([])))):
        arguments.pop("batch_size")
    before = [as64(v) for v in model.variables]
    with pytest.raises(ValueError, match=re.escape(message)):
        inspect_statistics(model, progress=False, **arguments)
    for a, b in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(a, as64(b))
