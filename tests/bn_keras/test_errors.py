"""BatchNorm rejects bad arguments and inputs with a ValueError quoting them."""

import re

import keras
import numpy as np
import pytest
from keras import ops

from bn_keras import BatchNorm


def _quoted(text):
    return re.escape(text)


@pytest.mark.parametrize(
    "kwargs, quoted",
    [
        ({"momentum": -0.1}, "momentum=-0.1"),
        ({"momentum": 1.5}, "momentum=1.5"),
        ({"momentum": float("nan")}, "momentum=nan"),
        ({"momentum": "high"}, "momentum='high'"),
        ({"renorm_momentum": 1.01}, "renorm_momentum=1.01"),
        ({"renorm_momentum": None}, "renorm_momentum=None"),
        ({"epsilon": 0.0}, "epsilon=0.0"),
        ({"epsilon": -1e-3}, "epsilon=-0.001"),
        ({"epsilon": float("nan")}, "epsilon=nan"),
        ({"axis": (1, 1)}, "axis=(1, 1)"),
        ({"axis": ()}, "axis=()"),
        ({"axis": 1.0}, "axis=1.0"),
        ({"axis": True}, "axis=True"),
        ({"axis": "channels"}, "axis='channels'"),
        ({"renorm": True, "renorm_clipping": {"rmaxx": 3.0}}, "rmaxx"),
        ({"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 1.0}}, "rmax=0.5"),
        ({"renorm": True, "renorm_clipping": {"dmax": -1.0}}, "dmax=-1.0"),
        ({"renorm": True, "renorm_clipping": [3.0, 0.3]}, "[3.0, 0.3]"),
        ({"momentum": None, "debias": True}, "momentum=None"),
        ({"momentum": 1.0, "debias": True}, "momentum=1.0"),
        ({"virtual_batch_size": 0}, "virtual_batch_size=0"),
        ({"virtual_batch_size": -4}, "virtual_batch_size=-4"),
        ({"virtual_batch_size": 2.5}, "virtual_batch_size=2.5"),
        ({"virtual_batch_size": True}, "virtual_batch_size=True"),
        ({"virtual_batch_size": "4"}, "virtual_batch_size='4'"),
    ],
    ids=str,
)
def test_bad_arguments(kwargs, quoted):
    with pytest.raises(ValueError, match=_quoted(quoted)):
        BatchNorm(**kwargs)


@pytest.mark.parametrize(
    "kwargs, quoted",
    [
        ({"epsilon": "tiny"}, "epsilon='tiny'"),
        ({"epsilon": None}, "epsilon=None"),
        ({"virtual_batch_size": "four"}, "virtual_batch_size='four'"),
        ({"virtual_batch_size": [4]}, "virtual_batch_size=[4]"),
        ({"renorm": True, "renorm_clipping": {"rmax": "big"}}, "renorm_clipping="),
    ],
    ids=str,
)
def test_non_numeric_arguments(kwargs, quoted):
    # As for momentum: a ValueError quoting the value, not a bare float() error.
    with pytest.raises(ValueError, match=_quoted(quoted)):
        BatchNorm(**kwargs)


@pytest.mark.parametrize("momentum", [0.0, 1.0, None])
def test_boundary_momentum_is_accepted(momentum):
    layer = BatchNorm(momentum=momentum)
    assert layer.momentum == momentum


@pytest.mark.parametrize(
    "axis, shape, quoted",
    [
        (2, (4, 3), "axis=2"),
        (-3, (4, 3), "axis=-3"),
        ((1, 3), (4, 3, 2), "axis=(1, 3)"),
        ((1, -1), (4, 3), "axis=(1, -1)"),
        ((0, -3), (4, 3, 2), "axis=(0, -3)"),
    ],
)
def test_axis_out_of_range_or_repeated_for_the_input(axis, shape, quoted):
    with pytest.raises(ValueError, match=_quoted(quoted)):
        BatchNorm(axis=axis)(np.ones(shape, "float32"))


@pytest.mark.parametrize(
    "axis, shape", [(-1, (None, None)), (1, (None, None, 3)), ((1, 2), (None, 4, None))]
)
def test_unknown_feature_dimension(axis, shape):
    with pytest.raises(ValueError, match="known size"):
        BatchNorm(axis=axis).build(shape)
    with pytest.raises(ValueError, match="known size"):
        BatchNorm(axis=axis)(keras.Input(batch_shape=shape))


@pytest.mark.parametrize(
    "axis, first, second",
    [
        (-1, (4, 3), (4, 2, 3)),
        (-1, (4, 3), (4, 5)),
        ((1, 2), (4, 3, 2), (4, 3, 5)),
        (1, (4, 3, 2), (4, 3)),
    ],
)
def test_later_call_with_another_rank_or_feature_size(axis, first, second):
    layer = BatchNorm(axis=axis)
    layer(np.ones(first, "float32"))
    with pytest.raises(ValueError, match="incompatible"):
        layer(np.ones(second, "float32"))


@pytest.mark.parametrize(
    "shape, axis",
    [((1, 100), -1), ((3, 1), 0), ((1, 1, 1, 4), -1), ((1, 4, 1), (1, 2))],
)
def test_single_value_per_feature_in_training(shape, axis):
    layer = BatchNorm(axis=axis)
    x = np.arange(np.prod(shape), dtype="float32").reshape(shape)
    with pytest.raises(ValueError, match="single value per feature"):
        layer(x, training=True)
    y = ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_allclose(y, x / np.sqrt(1.0 + 1e-3), rtol=1e-6)


def test_single_value_per_feature_with_a_mask():
    x = np.arange(100, dtype="float32").reshape(1, 100)
    with pytest.raises(ValueError, match="single value per feature"):
        BatchNorm()(x, training=True, mask=np.ones((1,), bool))


def test_single_value_per_ghost_batch():
    # Ghost batches of one example: every output would equal beta.
    x = np.arange(24, dtype="float32").reshape(8, 3)
    with pytest.raises(ValueError, match="virtual_batch_size=1"):
        BatchNorm(virtual_batch_size=1)(x, training=True)


def test_several_values_per_feature_from_other_axes():
    # A batch of one is fine when the other reduced axes have several values.
    x = np.arange(12, dtype="float32").reshape(1, 4, 3)
    y = ops.convert_to_numpy(BatchNorm()(x, training=True))
    np.testing.assert_allclose(y.std(axis=(0, 1)), 1.0, rtol=1e-3)


@pytest.mark.parametrize("batch, virtual_batch_size", [(8, 3), (6, 4), (2, 4)])
def test_virtual_batch_size_must_divide_the_batch(batch, virtual_batch_size):
    layer = BatchNorm(virtual_batch_size=virtual_batch_size)
    x = np.arange(batch * 3, dtype="float32").reshape(batch, 3)
    with pytest.raises(ValueError, match=f"virtual_batch_size={virtual_batch_size}"):
        layer(x, training=True)
    assert ops.convert_to_numpy(layer(x, training=False)).shape == (batch, 3)


def test_virtual_batch_size_with_the_batch_as_feature_axis():
    with pytest.raises(ValueError, match=_quoted("axis=(0, 1)")):
        BatchNorm(axis=(0, 1), virtual_batch_size=2).build((4, 3, 2))


@pytest.mark.parametrize(
    "axis, shape, mask_shape",
    [
        (-1, (4, 5, 3), (4, 5, 3)),
        (-1, (4, 5, 3), (4,)),
        (1, (4, 5, 3), (4,)),
        ((1, 2), (4, 5, 3), (4,)),
    ],
)
def test_mask_of_the_wrong_rank(axis, shape, mask_shape):
    with pytest.raises(ValueError, match=_quoted(f"mask.shape={mask_shape}")):
        BatchNorm(axis=axis)(
            np.ones(shape, "float32"), training=True, mask=np.ones(mask_shape, bool)
        )


def test_synchronized_is_accepted_on_every_backend(rng):
    # Outside a distributed step there is one replica and nothing to
    # synchronize; tests/bn_keras/test_distributed.py runs the layer inside one. (Not
    # against the fused kernel, which synchronized layers do not use; the
    # plain layer's closed-form step rounds differently from the moments
    # that synchronized layers take.)
    x = rng.normal(3.0, 2.0, (8, 4)).astype("float32")
    synchronized, plain = BatchNorm(synchronized=True), BatchNorm(fused=False)
    for a, b in [
        (synchronized(x, training=True), plain(x, training=True)),
        (synchronized.moving_mean, plain.moving_mean),
        (synchronized.moving_variance, plain.moving_variance),
    ]:
        np.testing.assert_allclose(
            ops.convert_to_numpy(a), ops.convert_to_numpy(b), rtol=1e-6, atol=1e-6
        )
