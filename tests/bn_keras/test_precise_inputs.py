"""Precise BN on every input structure and data type that `model.fit` takes.

Each model normalizes each of its inputs with a BN layer of its own, sized
differently, so the statistics show which array reached which layer; they are
compared with the pooled statistics of the batches used, computed in NumPy.
"""

import re

import keras
import numpy as np
import pytest

from bn_keras import BatchNorm, recompute_statistics
from tests import reference
from tests.bn_keras.helpers import BACKEND, F32, as64, tensorflow_only

EXAMPLES, BATCH = 60, 20
# Features of each named input; each input has its own BN layer, "bn_<name>".
FEATURES = {"a": 4, "b": 3, "c": 2, "feat": 5}
# How each model takes its inputs (a structure of input names).
STRUCTURES = {
    "array": "a",
    "dict": {"feat": "feat"},
    "tuple": ("a", "b"),
    "list": ["a", "b"],
    "nested": {"a": "a", "rest": ("b", "c")},
}

torch_only = pytest.mark.skipif(BACKEND != "torch", reason="torch DataLoader.")


def _model(structure):
    inputs = keras.tree.map_structure(
        lambda name: keras.Input((FEATURES[name],), name=name), structure
    )
    outputs = [
        BatchNorm(name=f"bn_{tensor.name}")(tensor)
        for tensor in keras.tree.flatten(inputs)
    ]
    return keras.Model(inputs, outputs)


def _arrays(structure, rng):
    """The model's inputs, `(x, y, sample_weight)`."""
    x = keras.tree.map_structure(
        lambda name: rng.normal(2.0, 3.0, (EXAMPLES, FEATURES[name])).astype("float32"),
        structure,
    )
    return x, rng.integers(0, 2, EXAMPLES), np.ones(EXAMPLES, "float32")


def _rows(structure, rows):
    return keras.tree.map_structure(lambda value: value[rows], structure)


def _expected(model, x, batches):
    """`{layer: (mean, variance)}`: the mean of the batch means and the pooled
    variance over `batches` slices of the examples, as precise BN defines."""
    expected = {}
    for tensor, values in zip(model.inputs, keras.tree.flatten(x), strict=True):
        means, variances, counts = [], [], []
        for rows in batches:
            mean, variance, count = reference.moments(values[rows], -1)
            means.append(mean)
            variances.append(variance)
            counts.append(count)
        weights = np.stack(counts) / np.sum(counts, axis=0)
        mean = (weights * np.stack(means)).sum(0)
        spread = (weights * (np.stack(means) - mean) ** 2).sum(0)
        variance = (weights * np.stack(variances)).sum(0) + spread
        expected[f"bn_{tensor.name}"] = (mean, variance)
    return expected


def _batches(count=EXAMPLES, size=BATCH):
    return [slice(start, start + size) for start in range(0, count, size)]


def _assert_statistics(model, expected):
    for name, (mean, variance) in expected.items():
        layer = model.get_layer(name)
        np.testing.assert_allclose(as64(layer.moving_mean), mean, **F32, err_msg=name)
        np.testing.assert_allclose(
            as64(layer.moving_variance), variance, **F32, err_msg=name
        )


def _assert_recomputed(model, result, expected):
    assert set(result) == set(expected)
    _assert_statistics(model, expected)
    for name, (mean, variance) in expected.items():
        np.testing.assert_allclose(result[name][0], mean, **F32, err_msg=name)
        np.testing.assert_allclose(result[name][1], variance, **F32, err_msg=name)


def _generator(make_batch):
    return (make_batch(rows) for rows in _batches())


class _PyDataset(keras.utils.PyDataset):
    def __init__(self, make_batch):
        super().__init__()
        self.make_batch = make_batch

    def __len__(self):
        return len(_batches())

    def __getitem__(self, index):
        return self.make_batch(_batches()[index])


def _tf_dataset(x, y, w):
    import tensorflow as tf

    # tf.data reads a list as one tensor to stack: a tuple keeps the inputs.
    x = tuple(x) if isinstance(x, list) else x
    return tf.data.Dataset.from_tensor_slices((x, y, w)).batch(BATCH)


def _data_loader(x, y, w):
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Examples(Dataset):
        def __len__(self):
            return EXAMPLES

        def __getitem__(self, i):
            inputs = keras.tree.map_structure(lambda v: torch.tensor(v[i]), x)
            return inputs, torch.tensor(y[i]), torch.tensor(w[i])

    return DataLoader(Examples(), batch_size=BATCH)


FEEDS = {
    "arrays": lambda x, y, w: {"data": x, "batch_size": BATCH},
    "generator of (x,)": lambda x, y, w: {
        "data": _generator(lambda rows: (_rows(x, rows),))
    },
    "generator of (x, y)": lambda x, y, w: {
        "data": _generator(lambda rows: (_rows(x, rows), y[rows]))
    },
    "generator of (x, y, w)": lambda x, y, w: {
        "data": _generator(lambda rows: (_rows(x, rows), y[rows], w[rows]))
    },
    "list of (x, y) batches": lambda x, y, w: {
        "data": iter([(_rows(x, rows), y[rows]) for rows in _batches()])
    },
    "PyDataset of (x, y)": lambda x, y, w: {
        "data": _PyDataset(lambda rows: (_rows(x, rows), y[rows]))
    },
    "tf.data of (x, y, w)": pytest.param(
        lambda x, y, w: {"data": _tf_dataset(x, y, w)},
        marks=tensorflow_only("tf.data is tested on TensorFlow."),
    ),
    "DataLoader of (x, y, w)": pytest.param(
        lambda x, y, w: {"data": _data_loader(x, y, w)}, marks=torch_only
    ),
}


@pytest.mark.parametrize("feed", FEEDS.values(), ids=FEEDS)
@pytest.mark.parametrize("structure", STRUCTURES.values(), ids=STRUCTURES)
def test_every_input_structure(structure, feed, rng):
    model = _model(structure)
    x, y, w = _arrays(structure, rng)
    result = recompute_statistics(model, progress=False, **feed(x, y, w))
    _assert_recomputed(model, result, _expected(model, x, _batches()))


@pytest.mark.parametrize("structure", ["array", "dict"])
def test_batches_of_inputs_alone(structure, rng):
    """A batch that is not a tuple or list is the inputs, as in Keras."""
    model = _model(STRUCTURES[structure])
    x, _, _ = _arrays(STRUCTURES[structure], rng)
    data = (_rows(x, rows) for rows in _batches())
    result = recompute_statistics(model, data, progress=False)
    _assert_recomputed(model, result, _expected(model, x, _batches()))


@pytest.mark.parametrize("structure", ["tuple", "nested"])
def test_a_ragged_last_batch_and_a_last_example_left_out(structure, rng):
    """Array data of 61 examples in batches of 20: batches of 20, 20 and 20,
    the last example (a batch of one, with no spread) left out; 70 examples:
    a last batch of 10, weighted by its size."""
    model = _model(STRUCTURES[structure])
    x, _, _ = _arrays(STRUCTURES[structure], rng)
    more = keras.tree.map_structure(
        lambda value: np.concatenate([value, value[:10] * 2.0 + 1.0]), x
    )
    recompute_statistics(
        model, _rows(more, slice(0, 61)), batch_size=BATCH, progress=False
    )
    _assert_statistics(model, _expected(model, more, _batches(60)))
    result = recompute_statistics(model, more, batch_size=BATCH, progress=False)
    _assert_recomputed(model, result, _expected(model, more, _batches(70)))


def test_steps_with_numpy_integers(rng):
    model = _model(STRUCTURES["tuple"])
    x, _, _ = _arrays(STRUCTURES["tuple"], rng)
    result = recompute_statistics(
        model, x, batch_size=np.int64(BATCH), steps=np.int32(2), progress=False
    )
    _assert_recomputed(model, result, _expected(model, x, _batches()[:2]))


@pytest.mark.parametrize("argument", ["batch_size", "steps"])
@pytest.mark.parametrize("value", [0, -3, 2.5, 20.0, "3", True, float("nan")])
def test_bad_batch_size_and_steps(argument, value, rng):
    model = _model(STRUCTURES["array"])
    x, _, _ = _arrays(STRUCTURES["array"], rng)
    kwargs = {"batch_size": BATCH, argument: value}
    message = f"`{argument}` must be a positive integer. Received: {argument}={value!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        recompute_statistics(model, x, progress=False, **kwargs)


@pytest.mark.parametrize(
    "structure, make_data, message",
    [
        # (x, y) as the data argument is two inputs, as in model.fit(x=...).
        (
            "array",
            lambda x, y: {"data": (x, y), "batch_size": BATCH},
            "The model takes 1 input array(s), but `data` holds 2. Array `data` "
            "is the model's inputs",
        ),
        # A batch (a, b) is (x, y), as in Keras: one input for two.
        (
            "tuple",
            lambda x, y: {"data": _generator(lambda rows: _rows(x, rows))},
            "The model takes 2 input array(s), but batch 0 of `data` holds 1. "
            "Each batch is unpacked as in `model.fit`",
        ),
        (
            "array",
            lambda x, y: {"data": _generator(lambda rows: (x[rows],) * 4)},
            "Batch 0 of `data` is a tuple of 4 elements.",
        ),
        # A list is the model's inputs, not a list of batches.
        (
            "array",
            lambda x, y: {"data": [x[rows] for rows in _batches()]},
            "pass a list of batches as `iter(batches)`",
        ),
        (
            "array",
            lambda x, y: {"data": "x_train"},
            "`data` must be the model's inputs as arrays",
        ),
        ("array", lambda x, y: {"data": None}, "Received: data=None"),
        (
            "dict",
            lambda x, y: {"data": {"fet": x["feat"]}, "batch_size": BATCH},
            "`data` lacks the model's input(s) ['feat']. Received: "
            "{'fet': 'array(60, 5)'}",
        ),
        # Examples one by one, not batches.
        (
            "tuple",
            lambda x, y: {"data": (((x[0][i], x[1][i]), y[i]) for i in range(3))},
            "The model's input 'a' takes shape (None, 4), but batch 0 of `data` "
            "gives it an array of shape (4,); is the data batched?",
        ),
        (
            "array",
            lambda x, y: {"data": iter([x]), "batch_size": BATCH},
            "`batch_size` applies to array data only (arrays or tensors, or a "
            "dict, list or tuple of them); batch the dataset itself. Received: "
            "batch_size=20 with data of type list_iterator",
        ),
    ],
    ids=[
        "(x, y) as arrays",
        "(x1, x2) batches",
        "4-tuples",
        "list",
        "string",
        "None",
        "dict key",
        "unbatched",
        "batch_size with batches",
    ],
)
def test_data_that_does_not_fit_the_model(structure, make_data, message, rng):
    model = _model(STRUCTURES[structure])
    x, y, _ = _arrays(STRUCTURES[structure], rng)
    before = [as64(v) for v in model.non_trainable_variables]
    with pytest.raises(ValueError, match=re.escape(message)):
        recompute_statistics(model, progress=False, **make_data(x, y))
    for a, b in zip(before, model.non_trainable_variables, strict=True):
        np.testing.assert_array_equal(a, as64(b))


FROZEN = {"bn_keras": BatchNorm, "keras": keras.layers.BatchNormalization}


@pytest.mark.parametrize("make", FROZEN.values(), ids=FROZEN)
def test_frozen_layers_are_skipped(make, rng):
    """A frozen layer keeps its statistics and normalizes with them (as in
    `model.fit`); the layers after it are recomputed from that output."""
    model = keras.Sequential(
        [
            keras.Input((4,)),
            make(name="frozen"),
            keras.layers.Dense(3, name="dense"),
            BatchNorm(name="after"),
        ]
    )
    frozen = model.get_layer("frozen")
    frozen.moving_mean.assign(rng.normal(size=4).astype("float32"))
    frozen.moving_variance.assign(rng.uniform(0.5, 2.0, 4).astype("float32"))
    frozen.trainable = False
    statistics = [as64(frozen.moving_mean), as64(frozen.moving_variance)]
    x = rng.normal(2.0, 3.0, (EXAMPLES, 4)).astype("float32")

    with pytest.warns(
        UserWarning, match=re.escape("frozen (`trainable=False`) layers ['frozen']")
    ):
        result = recompute_statistics(model, x, batch_size=BATCH, progress=False)

    assert set(result) == {"after"}
    np.testing.assert_array_equal(as64(frozen.moving_mean), statistics[0])
    np.testing.assert_array_equal(as64(frozen.moving_variance), statistics[1])
    normalized = reference.normalize(
        x.astype("float64"),
        *statistics,
        as64(frozen.gamma),
        as64(frozen.beta),
        frozen.epsilon,
        -1,
    )
    dense = model.get_layer("dense")
    h = normalized @ as64(dense.kernel) + as64(dense.bias)
    after = model.get_layer("after")
    np.testing.assert_allclose(as64(after.moving_mean), h.mean(0), **F32)
    np.testing.assert_allclose(as64(after.moving_variance), h.var(0), **F32)


def test_a_frozen_model_is_an_error(rng):
    model = _model(STRUCTURES["tuple"])
    model.trainable = False
    x, _, _ = _arrays(STRUCTURES["tuple"], rng)
    with pytest.raises(ValueError, match=re.escape("is frozen (`trainable=False`)")):
        recompute_statistics(model, x, batch_size=BATCH, progress=False)


def test_the_layers_of_a_frozen_submodel_are_skipped(rng):
    inner = keras.Sequential([keras.Input((4,)), BatchNorm(name="inner")])
    inner.trainable = False
    model = keras.Sequential([keras.Input((4,)), inner, BatchNorm(name="outer")])
    x = rng.normal(2.0, 3.0, (EXAMPLES, 4)).astype("float32")
    with pytest.warns(UserWarning, match=re.escape("layers ['inner']")):
        result = recompute_statistics(model, x, batch_size=BATCH, progress=False)
    assert set(result) == {"outer"}
    frozen = inner.get_layer("inner")
    np.testing.assert_array_equal(as64(frozen.moving_mean), np.zeros(4))
    np.testing.assert_array_equal(as64(frozen.moving_variance), np.ones(4))
    # The frozen layer's initial statistics leave x almost as it is.
    outer = model.get_layer("outer")
    h = x.astype("float64") / np.sqrt(1.0 + frozen.epsilon)
    np.testing.assert_allclose(as64(outer.moving_mean), h.mean(0), **F32)
    np.testing.assert_allclose(as64(outer.moving_variance), h.var(0), **F32)
