"""BatchNorm is a drop-in for `keras.layers.BatchNormalization`: same numbers.

Both layers get the same weights (via `set_weights`), then many training steps
on different random batches; outputs, input and parameter gradients, moving
statistics and inference outputs must agree to float32 precision.
"""

import keras
import numpy as np
import pytest
from keras import ops

from bn_keras import BatchNorm

# Both layers compute in float32 with the same two-pass moments and the same
# folded multiply-add, so they agree to a few ulps; gradients, which cancel
# out partly, get an absolute tolerance relative to their scale.
RTOL, ATOL = 1e-5, 1e-5
STEPS = 20

CASES = [
    ((16, 5), -1, {}),
    ((16, 5), 0, {}),
    ((8, 4, 3), -1, {}),
    ((8, 4, 3), 1, {}),
    ((4, 3, 4, 3), -1, {}),
    ((4, 3, 4, 3), 1, {}),
    ((4, 3, 4, 3), 2, {}),
    ((2, 3, 2, 3, 4), -1, {}),
    ((2, 3, 2, 3, 4), 1, {}),
    ((8, 4, 3), -1, {"center": False}),
    ((8, 4, 3), -1, {"scale": False}),
    ((8, 4, 3), 1, {"center": False, "scale": False}),
    ((8, 4, 3), -1, {"momentum": 0.9, "epsilon": 1e-5}),
    ((8, 4, 3), -2, {"momentum": 0.5, "epsilon": 0.1}),
    ((8, 4, 3), -1, {"moving_mean_initializer": "ones", "gamma_initializer": "zeros"}),
    ((16, 5), -1, {"renorm": True}),
    ((8, 4, 3), -1, {"renorm": True, "center": False, "scale": False}),
    (
        (4, 3, 4, 3),
        1,
        {
            "renorm": True,
            "renorm_clipping": {"rmax": 1.2, "rmin": 0.8, "dmax": 0.3},
            "renorm_momentum": 0.9,
            "momentum": 0.9,
        },
    ),
]


def _pair(shape, axis, kwargs, rng):
    ours = BatchNorm(axis=axis, **kwargs)
    theirs = keras.layers.BatchNormalization(axis=axis, **kwargs)
    ours.build(shape)
    theirs.build(shape)
    weights = []
    for variable in theirs.weights:
        low = 0.5 if "variance" in variable.name or "stddev" in variable.name else -1.0
        weights.append(rng.uniform(low, 2.0, variable.shape).astype("float32"))
    theirs.set_weights(weights)
    ours.set_weights(weights)
    return ours, theirs


def _assert_close(actual, expected, name, step):
    atol = ATOL * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(
        actual, expected, rtol=RTOL, atol=atol, err_msg=f"{name} at step {step}"
    )


def _compare_training(ours, theirs, batches, call_with_gradients, rng, masks=None):
    for step, x in enumerate(batches):
        mask = None if masks is None else masks[step]
        dy = rng.normal(size=x.shape)
        y, dx, grads = call_with_gradients(ours, x, dy, mask=mask)
        y_k, dx_k, grads_k = call_with_gradients(theirs, x, dy, mask=mask)
        _assert_close(y, y_k, "outputs", step)
        _assert_close(dx, dx_k, "input gradients", step)
        assert grads.keys() == grads_k.keys()
        for name in grads:
            _assert_close(grads[name], grads_k[name], f"{name} gradient", step)
        for a, b in zip(ours.weights, theirs.weights, strict=True):
            _assert_close(
                ops.convert_to_numpy(a), ops.convert_to_numpy(b), a.name, step
            )


@pytest.mark.parametrize("shape, axis, kwargs", CASES, ids=str)
def test_matches_keras(shape, axis, kwargs, rng, call_with_gradients):
    ours, theirs = _pair(shape, axis, kwargs, rng)
    # Batches drift in location and scale, so the statistics keep moving.
    batches = [
        rng.normal(0.3 * step, 1.0 + 0.1 * step, shape).astype("float32")
        for step in range(STEPS)
    ]
    _compare_training(ours, theirs, batches, call_with_gradients, rng)
    x = rng.normal(2.0, 1.5, shape).astype("float32")
    _assert_close(
        ops.convert_to_numpy(ours(x, training=False)),
        ops.convert_to_numpy(theirs(x, training=False)),
        "inference outputs",
        STEPS,
    )
    dy = rng.normal(size=shape)
    for a, b in zip(
        call_with_gradients(ours, x, dy, training=False),
        call_with_gradients(theirs, x, dy, training=False),
        strict=True,
    ):
        if isinstance(a, dict):
            for name in a:
                _assert_close(a[name], b[name], f"inference {name} gradient", STEPS)
        else:
            _assert_close(a, b, "inference outputs and input gradients", STEPS)


def test_matches_keras_with_mask(rng, call_with_gradients):
    shape = (6, 5, 3)
    ours, theirs = _pair(shape, -1, {"momentum": 0.8}, rng)
    batches = [rng.normal(1.0, 2.0, shape).astype("float32") for _ in range(5)]
    masks = [rng.random(shape[:2]) < 0.7 for _ in range(5)]
    _compare_training(ours, theirs, batches, call_with_gradients, rng, masks)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_matches_keras_under_mixed_precision(policy, rng):
    shape = (8, 4, 3)
    ours = BatchNorm(momentum=0.8, dtype=policy)
    theirs = keras.layers.BatchNormalization(momentum=0.8, dtype=policy)
    for step in range(5):
        # Half inputs: Keras rounds float32 inputs to the compute dtype first,
        # BatchNorm keeps them (more accurate, so not comparable).
        x = ops.cast(rng.normal(step, 2.0, shape), ours.compute_dtype)
        y, y_k = ours(x, training=True), theirs(x, training=True)
        assert y.dtype == y_k.dtype
        # Both round the same float32 result to the half type.
        np.testing.assert_allclose(
            ops.convert_to_numpy(ops.cast(y, "float32")),
            ops.convert_to_numpy(ops.cast(y_k, "float32")),
            rtol=1e-2,
            atol=1e-2,
        )
        for a, b in zip(ours.weights, theirs.weights, strict=True):
            assert a.dtype == b.dtype == "float32"
            _assert_close(
                ops.convert_to_numpy(a), ops.convert_to_numpy(b), a.name, step
            )


def test_fit_matches_keras(rng):
    def build(norm):
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(4),
                norm,
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        return model

    ours = build(BatchNorm(momentum=0.9))
    theirs = build(keras.layers.BatchNormalization(momentum=0.9))
    ours.set_weights(theirs.get_weights())
    x = rng.normal(1.0, 2.0, (96, 6)).astype("float32")
    y = rng.normal(size=(96, 1)).astype("float32")
    history = ours.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    history_k = theirs.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        history.history["loss"], history_k.history["loss"], rtol=1e-5
    )
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        assert a.name == b.name
        _assert_close(ops.convert_to_numpy(a), ops.convert_to_numpy(b), a.name, 18)
    _assert_close(
        ours.predict(x, verbose=0), theirs.predict(x, verbose=0), "predictions", 18
    )
