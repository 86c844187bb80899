"""Masks in Keras' convention against the NumPy reference.

Masked entries enter no batch statistic; a feature (or a whole batch) left
with no value leaves the population statistics as they were:
`bn_keras.masking`.
"""

import re

import keras
import numpy as np
import pytest
from keras import ops

from bn_keras import BatchNorm
from tests import reference
from tests.bn_keras.helpers import F32, as64, random_inputs, tensorflow_only


@pytest.mark.parametrize(
    "shape, axis, mask_shape",
    [
        ((6, 5, 3), -1, (6, 5)),
        ((6, 3, 5), 1, (6, 3)),
        ((4, 3, 5), 1, (4, 3)),
        ((4, 3, 5, 6), 1, (4, 3, 5)),
        ((4, 3, 2, 5), (1, 3), (4, 3, 2)),
        ((4, 5, 2, 3), -1, (4, 5, 2)),
    ],
)
@pytest.mark.parametrize("unbiased_variance", [False, True])
def test_mask(shape, axis, mask_shape, unbiased_variance, rng, set_random_weights):
    momentum = 0.5
    layer = BatchNorm(axis=axis, momentum=momentum, unbiased_variance=unbiased_variance)
    w = set_random_weights(layer, shape)
    x = random_inputs(rng, shape)
    mask = rng.random(mask_shape) < 0.6
    # Masked-out entries are far away: including them would show.
    x = np.where(reference.expand_mask(mask, shape, axis), x, 1e3).astype("float32")
    y = layer(x, training=True, mask=mask)
    mean, variance, count = reference.moments(x, axis, mask)
    expected = reference.normalize(x, mean, variance, w["gamma"], w["beta"], 1e-3, axis)
    valid = reference.expand_mask(mask, shape, axis)
    np.testing.assert_allclose(as64(y)[valid], expected[valid], **F32)
    if unbiased_variance:
        variance = reference.unbiased(variance, count)
    np.testing.assert_allclose(
        as64(layer.moving_mean), reference.ema(w["moving_mean"], mean, momentum), **F32
    )
    np.testing.assert_allclose(
        as64(layer.moving_variance),
        reference.ema(w["moving_variance"], variance, momentum),
        **F32,
    )


def test_float_mask_equals_bool_mask(rng):
    x = random_inputs(rng, (4, 5, 3))
    mask = rng.random((4, 5)) < 0.5
    layers = {"bool": BatchNorm(), "float": BatchNorm(), "none": BatchNorm()}
    masks = {"bool": mask, "float": mask.astype("float32"), "none": None}
    outputs = {k: as64(layers[k](x, training=True, mask=masks[k])) for k in layers}
    variances = {k: as64(layer.moving_variance) for k, layer in layers.items()}
    np.testing.assert_array_equal(outputs["float"], outputs["bool"])
    np.testing.assert_array_equal(variances["float"], variances["bool"])
    assert not np.allclose(variances["float"], variances["none"])


def test_mask_is_ignored_in_inference(rng, set_random_weights):
    layer = BatchNorm()
    set_random_weights(layer, (4, 5, 3))
    x = random_inputs(rng, (4, 5, 3))
    mask = rng.random((4, 5)) < 0.5
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer(x, training=False, mask=mask)),
        ops.convert_to_numpy(layer(x, training=False)),
    )


def test_masking_layer_upstream(rng):
    x = random_inputs(rng, (6, 7, 3))
    x[:, 4:] = 0.0
    x[0, 2] = 0.0
    inputs = keras.Input((7, 3))
    layer = BatchNorm(momentum=0.0)
    model = keras.Model(inputs, layer(keras.layers.Masking(0.0)(inputs)))
    model(x, training=True)
    mask = np.any(x != 0.0, axis=-1)
    mean, variance, _ = reference.moments(x, -1, mask)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, **F32)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, **F32)


def test_embedding_mask_zero_upstream(rng):
    tokens = rng.integers(1, 10, size=(5, 8))
    tokens[:, 5:] = 0
    tokens[1, 2:] = 0
    inputs = keras.Input((8,), dtype="int32")
    embedding = keras.layers.Embedding(10, 4, mask_zero=True)
    layer = BatchNorm(momentum=0.0)
    model = keras.Model(inputs, layer(embedding(inputs)))
    model(tokens, training=True)
    embedded = ops.convert_to_numpy(embedding(tokens))
    mean, variance, _ = reference.moments(embedded, -1, tokens != 0)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, **F32)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, **F32)


FULL_MASK_OPTIONS = [
    {},
    {"momentum": None},
    {"debias": True},
    {"unbiased_variance": True},
    {"renorm": True},
    {"virtual_batch_size": 2},
    {"axis": (1, 2), "center": False, "scale": False},
]


@pytest.mark.parametrize("kwargs", FULL_MASK_OPTIONS, ids=str)
def test_fully_masked_batch(kwargs, rng, set_random_weights):
    shape = (4, 3, 2)
    layer = BatchNorm(**kwargs)
    w = set_random_weights(layer, shape)
    mask = np.zeros((4, 3), bool)
    y = as64(layer(random_inputs(rng, shape), training=True, mask=mask))
    assert np.isfinite(y).all()
    for variable in layer.non_trainable_weights:
        if variable.name in w:
            np.testing.assert_array_equal(
                as64(variable), w[variable.name], err_msg=variable.name
            )


@pytest.mark.parametrize("momentum, debias", [(None, False), (0.9, True)])
def test_fully_masked_batch_does_not_count(momentum, debias, rng):
    # A batch without values leaves the statistics as if it never happened.
    batches = [random_inputs(rng, (4, 3), loc=i) for i in range(3)]
    skipping = BatchNorm(momentum=momentum, debias=debias)
    plain = BatchNorm(momentum=momentum, debias=debias)
    skipping(batches[0], training=True)
    skipping(batches[1], training=True, mask=np.zeros(4, bool))
    skipping(batches[2], training=True)
    plain(batches[0], training=True)
    plain(batches[2], training=True)
    np.testing.assert_allclose(
        as64(skipping.moving_mean), as64(plain.moving_mean), **F32
    )
    np.testing.assert_allclose(
        as64(skipping.moving_variance), as64(plain.moving_variance), **F32
    )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mask_shape", [(5, 5), (7, 5), (6, 3), (2, 5), (6, 10)])
def test_a_mask_of_another_shape_is_named(mask_shape, training, rng):
    # Another batch size or length: the error names the mask and both
    # shapes, not a broadcast deep inside.
    x = random_inputs(rng, (6, 5, 4))
    mask = np.ones(mask_shape, bool)
    expected = f"mask.shape={mask_shape}, inputs.shape=(6, 5, 4)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        BatchNorm()(x, training=training, mask=mask)


@tensorflow_only("tf.function.")
def test_a_mask_of_another_batch_size_in_a_graph(rng):
    import tensorflow as tf

    layer = BatchNorm(momentum=0.0)
    layer.build((None, 5, 4))
    step = tf.function(
        lambda x, m: layer(x, training=True, mask=m),
        input_signature=[
            tf.TensorSpec((None, 5, 4), tf.float32),
            tf.TensorSpec((None, None), tf.bool),
        ],
    )
    x = random_inputs(rng, (6, 5, 4))
    expected = "mask.shape=(5, 5), inputs.shape=(6, 5, 4)"
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(expected)):
        step(x, np.ones((5, 5), bool))
    # The right shape goes through the same graph.
    mask = rng.random((6, 5)) < 0.7
    step(x, mask)
    mean, _, _ = reference.moments(x, -1, mask)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, **F32)


@pytest.mark.parametrize("mask_shape", [(1, 5), (6, 1), (1, 1)])
def test_a_mask_that_broadcasts_is_the_full_mask(mask_shape, rng):
    # As NumPy broadcasts it; Keras' layer accepts it too (but counts the
    # values of the small mask only, so its moments are off).
    x = random_inputs(rng, (6, 5, 4))
    small = rng.random(mask_shape) < 0.7
    small.flat[0] = True
    full = np.broadcast_to(small, (6, 5))
    outputs = []
    for mask in (small, full):
        layer = BatchNorm(momentum=0.5)
        outputs.append(as64(layer(x, training=True, mask=mask)))
        outputs.append(as64(layer.moving_mean))
    for a, b in zip(outputs[:2], outputs[2:], strict=True):
        np.testing.assert_allclose(a, b, **F32)
    mean, _, _ = reference.moments(x, -1, full)
    np.testing.assert_allclose(outputs[1], 0.5 * mean, **F32)
