"""Keras' own BatchNormalization tests, run against bn_keras.BatchNorm.

The cases of keras/src/layers/normalization/batch_normalization_test.py (Keras
3), with `layers.BatchNormalization` replaced by ours: a drop-in must meet the
expectations Keras sets for its own layer, including `run_layer_test`'s
checks (symbolic call, serialization, masking support, training step).
"""

import keras
import numpy as np
import pytest
from keras import ops
from keras.src import testing

from bn_keras import BatchNorm


class KerasBatchNormalizationTests(testing.TestCase):
    def test_bn_basics(self):
        for kwargs, shape, losses in [
            ({"center": True, "scale": True}, (2, 3), 0),
            ({"center": False, "scale": False}, (2, 3), 0),
            ({"beta_regularizer": "l2", "gamma_regularizer": "l2"}, (2, 4, 4, 3), 2),
        ]:
            self.run_layer_test(
                BatchNorm,
                init_kwargs=kwargs,
                call_kwargs={"training": True},
                input_shape=shape,
                expected_output_shape=shape,
                expected_num_trainable_weights=2 if kwargs.get("scale", True) else 0,
                expected_num_non_trainable_weights=2,
                expected_num_seed_generators=0,
                expected_num_losses=losses,
                supports_masking=True,
            )

    def test_renorm_basics(self):
        self.run_layer_test(
            BatchNorm,
            init_kwargs={
                "renorm": True,
                "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
            },
            call_kwargs={"training": True},
            input_shape=(2, 4, 4, 3),
            expected_output_shape=(2, 4, 4, 3),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=5,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=True,
        )

    def test_input_fully_masked(self):
        norm = BatchNorm(scale=False, center=False)
        x = np.zeros((4, 5))
        mask = np.zeros((4,), dtype=np.float32)
        y = norm(x, mask=mask, training=True)
        self.assertAllClose(y, np.zeros_like(x, dtype=np.float32))

    def test_trainable_behavior(self):
        layer = BatchNorm(axis=-1, momentum=0.8, epsilon=1e-7)
        layer.build((1, 4, 4, 3))
        layer.trainable = False
        self.assertEqual(len(layer.trainable_weights), 0)
        self.assertEqual(len(layer.non_trainable_weights), 4)
        x = np.random.normal(loc=5.0, scale=10.0, size=(200, 4, 4, 3))
        self.assertAllClose(layer(x, training=True), x)
        layer.trainable = True
        self.assertEqual(len(layer.trainable_weights), 2)
        for _ in range(10):
            out = layer(x, training=True)
        out = ops.convert_to_numpy(out)
        out = (out - ops.convert_to_numpy(layer.beta)) / ops.convert_to_numpy(
            layer.gamma
        )
        self.assertAllClose(np.mean(out, axis=(0, 1, 2)), 0.0, atol=1e-3)
        self.assertAllClose(np.std(out, axis=(0, 1, 2)), 1.0, atol=1e-3)

    def test_masked_broadcast_normalization(self):
        x = ops.ones((1, 2, 3, 4))
        mask = ops.ones((1, 2, 1))
        layer = BatchNorm(axis=-1, momentum=0.0, epsilon=1e-3)
        y = layer(x, training=True, mask=mask)
        self.assertAllClose(y, ops.zeros_like(y), atol=1e-6)
        self.assertAllClose(layer.moving_mean, ops.ones((4,)), atol=1e-6)
        self.assertAllClose(layer.moving_variance, ops.zeros((4,)), atol=1e-6)

    def test_renorm_inference(self):
        bn, bn_renorm = BatchNorm(renorm=False), BatchNorm(renorm=True)
        bn.build((None, 10))
        bn_renorm.build((None, 10))
        for attr in ["gamma", "beta", "moving_mean", "moving_variance"]:
            getattr(bn, attr).assign(keras.random.normal(shape=(10,)))
            getattr(bn_renorm, attr).assign(getattr(bn, attr))
        x = np.random.normal(size=(4, 10))
        self.assertAllClose(
            bn(x, training=False), bn_renorm(x, training=False), atol=1e-5, rtol=1e-5
        )

    def test_renorm_invalid_clipping_keys(self):
        with self.assertRaisesRegex(ValueError, "Received invalid keys"):
            BatchNorm(renorm=True, renorm_clipping={"random_key": 1.0})
        with self.assertRaisesRegex(ValueError, "rmax should be"):
            BatchNorm(renorm=True, renorm_clipping={"rmax": 0.0, "rmin": 1.0})
        with self.assertRaisesRegex(ValueError, "dmax should be non-negative"):
            BatchNorm(renorm=True, renorm_clipping={"rmax": 1.0, "dmax": -1.0})

    def test_invalid_momentum(self):
        for momentum in (-0.1, 1.5):
            with self.assertRaisesRegex(ValueError, "`momentum` must be"):
                BatchNorm(momentum=momentum)
        BatchNorm(momentum=0.0)
        BatchNorm(momentum=1.0)

    def test_serialization(self):
        layer = BatchNorm(
            renorm=True,
            renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
            renorm_momentum=0.95,
        )
        config = layer.get_config()
        self.assertEqual(BatchNorm.from_config(config).get_config(), config)


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("input_shape", [(5, 2, 3), (5, 3, 3, 2)])
@pytest.mark.parametrize("moving_mean_initializer", ["zeros", "ones"])
@pytest.mark.parametrize("moving_variance_initializer", ["zeros", "ones"])
def test_correctness(
    axis, input_shape, moving_mean_initializer, moving_variance_initializer
):
    layer = BatchNorm(
        axis=axis,
        momentum=0,
        moving_mean_initializer=moving_mean_initializer,
        moving_variance_initializer=moving_variance_initializer,
    )
    x = np.random.normal(loc=5.0, scale=10.0, size=input_shape)
    out = x
    for _ in range(3):
        out = layer(out, training=True)
    broadcast_shape = [1] * len(input_shape)
    broadcast_shape[axis] = input_shape[axis]
    out = ops.convert_to_numpy(out)
    out = out - np.reshape(ops.convert_to_numpy(layer.beta), broadcast_shape)
    out = out / np.reshape(ops.convert_to_numpy(layer.gamma), broadcast_shape)
    reduction_axes = list(range(len(input_shape)))
    del reduction_axes[axis]
    np.testing.assert_allclose(np.mean(out, axis=tuple(reduction_axes)), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.std(out, axis=tuple(reduction_axes)), 1.0, atol=1e-3)
    np.testing.assert_allclose(ops.convert_to_numpy(layer.moving_mean), 0.0, atol=1e-3)
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer.moving_variance), 1.0, atol=1e-3
    )
    inference_out = ops.convert_to_numpy(layer(x, training=False))
    training_out = ops.convert_to_numpy(layer(x, training=True))
    assert not np.allclose(inference_out, training_out, atol=1e-6, rtol=1e-6)
    training_out = ops.convert_to_numpy(layer(x, training=True))
    inference_out = ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_allclose(inference_out, training_out, atol=1e-4, rtol=1e-4)
    # A Masking layer's mask (the input's shape without the last axis).
    x[:, 1, :] = 0.0
    masked = keras.layers.Masking()(x)
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer(masked, training=False)),
        ops.convert_to_numpy(layer(x, training=False)),
        atol=1e-5,
    )
    unmasked_out = ops.convert_to_numpy(layer(x, training=False))
    masked_out = ops.convert_to_numpy(layer(masked, training=True))
    assert not np.allclose(unmasked_out, masked_out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("run_eagerly", [True, False])
@pytest.mark.parametrize("mask_value", [0.0, 0.1, 1])
def test_ignore_masked_values_in_fit(run_eagerly, mask_value):
    row = [[1, 5], [2, 5], [mask_value, mask_value], [mask_value, mask_value]]
    padded = np.array([row for _ in range(10)], dtype="float32")
    inputs = keras.layers.Input((None, 2))
    masked = keras.layers.Masking(mask_value=mask_value)(inputs)
    model = keras.Model(inputs, BatchNorm(momentum=0.0)(masked))
    model.compile("rmsprop", loss="mse", run_eagerly=run_eagerly)
    model.fit(x=padded, y=padded, batch_size=10, epochs=5, verbose=0)
    bn = model.layers[2]
    np.testing.assert_allclose(ops.convert_to_numpy(bn.moving_mean), [1.5, 5.0])
    np.testing.assert_allclose(
        ops.convert_to_numpy(bn.moving_variance), [0.25, 0.0], atol=1e-6
    )
