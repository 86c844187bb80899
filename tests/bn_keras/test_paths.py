"""The closed-form training step and the inference fold: where each runs, its numbers.

Training. On JAX and TensorFlow (where no fused kernel runs) a training call
without a mask, ghost batches or synchronized moments, and not renorm's
update, goes through `bn_keras.closed_form.train`: one function with its
gradient written out. A counting spy on it says whether it ran (in a plain
call, under differentiation, compiled), so the tests fail if it is silently
not used or used where it must not be. Its outputs, gradients and statistics
are compared with the float64 NumPy reference and with the layer's generic
path (`closed_form.applies` patched to say no), and checked on the batches
that stress it: a large mean, an outlier where the shift is taken, magnitude
1e20, a NaN, a batch of one. torch has no closed form.

Inference, every backend. `bn_keras.kernels.subtract_multiply_add` computes
Keras' fold `x * a + (beta - mean * a)` where every mean is within
`kernels.FAR_OUT` spreads of 0, and `(x - mean) * a + beta` beyond. Inputs
that sit on their mean (a few float32 units from it) tell the two apart:
there the fold's rounding is as large as the output itself, and the
subtraction is exact. The tests check which expression ran, eagerly and
compiled, below and above 2**16 values (JAX's `where` and `lax.cond`), and
that one far mean is enough. The "frozen" statistics mode trains through
the same expression: its gradients are checked near and far.
"""

import contextlib

import keras
import numpy as np
import pytest

from bn_keras import BatchNorm, TimestepBatchNorm, closed_form
from tests import reference
from tests.bn_keras.helpers import BACKEND, EPSILON, F32, as64, random_inputs

CLOSED_FORM = pytest.mark.skipif(
    BACKEND == "torch",
    reason="torch trains through its kernel or the layer's operations.",
)
# Float32 gradients against the float64 reference: sums over the batch.
GRADIENTS = {"rtol": 1e-4, "atol": 1e-4}
WEIGHT_GRADIENTS = {"rtol": 1e-4, "atol": 1e-3}
# The closed form against the generic path, both float32.
SAME = {"rtol": 1e-5, "atol": 1e-5}
F64 = {"rtol": 1e-10, "atol": 1e-10}

# How a call runs. "call": a plain call (concrete values, Python branches).
# "grad": differentiated eagerly (tf.GradientTape, torch autograd; on JAX
# value_and_grad over `stateless_call`, which traces the layer as jit does).
# "compiled": jax.jit or tf.function. "xla": TensorFlow's jit_compile.
_MODE_MARKS = {
    "call": (),
    "grad": (),
    "compiled": (pytest.mark.skipif(BACKEND == "torch", reason="torch runs eagerly."),),
    "xla": (pytest.mark.skipif(BACKEND != "tensorflow", reason="jax.jit is JAX's."),),
}
# Every mode for a few cases; the options' other cases compiled, as fit()
# runs the layer (the path is chosen in Python, the same in every mode).
EVERY_MODE = tuple(_MODE_MARKS)
SHORT = ("call", "compiled")
COMPILED = ("compiled",)


def _in_modes(cases, modes):
    """Each `pytest.param` case once per mode, the mode as its last value."""
    return [
        pytest.param(
            *case.values,
            mode,
            id=f"{case.id}-{mode}",
            marks=(*case.marks, *_MODE_MARKS[mode]),
        )
        for case in cases
        for mode in modes
    ]


def _modes(*modes):
    return [pytest.param(m, marks=_MODE_MARKS[m]) for m in modes]


def _layer(kind, **kwargs):
    """A layer of `kind`: "plain", "timestep" or "domains" (two, own gamma/beta).

    `fused=False` keeps TensorFlow's and torch's kernels off the paths under
    test.
    """
    kwargs.setdefault("fused", False)
    if kind == "timestep":
        return TimestepBatchNorm(max_timesteps=kwargs.pop("max_timesteps"), **kwargs)
    if kind == "domains":
        kwargs.setdefault("per_domain_parameters", True)
        return BatchNorm(domains=2, **kwargs)
    return BatchNorm(**kwargs)


def _call_arguments(kind):
    return {"domain": 1} if kind == "domains" else {}


def _float64(dtype):
    """JAX computes in float64 only with x64 on: on for the test's duration."""
    if dtype == "float64" and BACKEND == "jax":
        import jax

        return jax.enable_x64()
    return contextlib.nullcontext()


def _differentiate(layer, x, upstream, mode, training=True, steps=None, **call):
    """`(outputs, d/dx, {weight name: gradient})` of `sum(outputs * upstream)`.

    Conftest's `call_with_gradients` in the modes above, with any call
    argument (`domain`, `mask`). Mode "call" only calls the layer: the
    gradients are None. The layer's state updates are applied. `steps`, a
    dict, keeps a compiled step per layer for the next call (not traced
    again).
    """
    if mode == "call":
        return as64(layer(x, training=training, **call)), None, None
    if not layer.built:
        layer.build(x.shape)
    steps = {} if steps is None else steps
    if id(layer) not in steps:
        steps[id(layer)] = _step(layer, mode, training, call)
    upstream = np.asarray(upstream, x.dtype)
    variables = layer.trainable_variables
    if BACKEND == "jax":
        (_, (y, state)), (dx, dweights) = steps[id(layer)](
            x,
            upstream,
            [v.value for v in variables],
            [v.value for v in layer.non_trainable_variables],
        )
        for variable, value in zip(layer.non_trainable_variables, state, strict=True):
            variable.assign(value)
    elif BACKEND == "tensorflow":
        y, dx, dweights = steps[id(layer)](x, upstream)
    else:
        import torch

        for variable in variables:
            variable.value.grad = None
        x = torch.tensor(x, requires_grad=True)
        y = layer(x, training=training, **call)
        torch.sum(y * torch.as_tensor(upstream)).backward()
        dx = x.grad
        dweights = [
            torch.zeros_like(v.value) if v.value.grad is None else v.value.grad
            for v in variables
        ]
    grads = {v.name: as64(g) for v, g in zip(variables, dweights, strict=True)}
    return as64(y), as64(dx), grads


def _step(layer, mode, training, call):
    """The backend's function of `_differentiate`, compiled as `mode` says."""
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        def loss(x, upstream, trainable, non_trainable):
            y, state = layer.stateless_call(
                trainable, non_trainable, x, training=training, **call
            )
            return jnp.sum(y * upstream), (y, state)

        step = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)
        return step if mode == "grad" else jax.jit(step)
    import tensorflow as tf

    variables = layer.trainable_variables

    def step(x, upstream):
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training, **call)
            loss = tf.reduce_sum(y * upstream)
        dx, *dweights = tape.gradient(loss, [x, *variables])
        dweights = [
            tf.zeros_like(v.value) if g is None else tf.convert_to_tensor(g)
            for v, g in zip(variables, dweights, strict=True)
        ]
        return y, dx, dweights

    return step if mode == "grad" else tf.function(step, jit_compile=mode == "xla")


def _statistics(layer):
    return as64(layer.moving_mean), as64(layer.moving_variance)


@pytest.fixture
def closed_form_calls(monkeypatch):
    """The reduction axes of every `closed_form.train` call (or trace), in order."""
    calls = []
    train = closed_form.train

    def spy(x, axes, *args):
        calls.append(tuple(axes))
        return train(x, axes, *args)

    monkeypatch.setattr(closed_form, "train", spy)
    return calls


@contextlib.contextmanager
def _generic_path():
    """The layer's generic training path: `closed_form.applies` says no."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(closed_form, "applies", lambda *args: False)
        yield


@CLOSED_FORM
@pytest.mark.parametrize(
    "kind, shape, kwargs, axes, mode",
    _in_modes(
        [
            pytest.param("plain", (8, 5), {}, (0,), id="dense"),
            pytest.param(
                "timestep", (6, 4, 3), {"max_timesteps": 4}, (0,), id="timestep"
            ),
            pytest.param("domains", (8, 5), {}, (0,), id="domains"),
        ],
        EVERY_MODE,
    )
    + _in_modes(
        [
            pytest.param("plain", (4, 3, 3, 2), {}, (0, 1, 2), id="NHWC"),
            pytest.param("plain", (4, 2, 3, 3), {"axis": 1}, (0, 2, 3), id="NCHW"),
            pytest.param("plain", (6, 4, 3), {}, (0, 1), id="sequence"),
            pytest.param(
                "plain", (4, 3, 5, 2), {"axis": (1, 3)}, (0, 2), id="two-axes"
            ),
            pytest.param(
                "timestep",
                (6, 4, 2, 3),
                {"max_timesteps": 2},
                (0, 2),
                id="timestep-4d",
            ),
            pytest.param(
                "plain", (8, 5), {"statistics": "batch"}, (0,), id="batch-mode"
            ),
            # Without the update renorm applies no correction.
            pytest.param(
                "plain",
                (8, 5),
                {"renorm": True, "statistics": "batch"},
                (0,),
                id="renorm-batch-mode",
            ),
        ],
        COMPILED,
    )
    # fused=None: TensorFlow's kernel does not train dense or channels-first
    # inputs, nor a compiled first layer (an input no variable feeds).
    + _in_modes(
        [
            pytest.param("plain", (8, 5), {"fused": None}, (0,), id="default-dense"),
            pytest.param(
                "plain",
                (4, 2, 3, 3),
                {"fused": None, "axis": 1},
                (0, 2, 3),
                id="default-NCHW",
            ),
        ],
        SHORT,
    )
    + _in_modes(
        [
            pytest.param(
                "plain",
                (4, 3, 3, 2),
                {"fused": None},
                (0, 1, 2),
                id="default-NHWC-first-layer",
            )
        ],
        ("compiled", "xla"),
    ),
)
def test_training_goes_through_the_closed_form(
    rng, closed_form_calls, kind, shape, kwargs, axes, mode
):
    layer = _layer(kind, **kwargs)
    x = random_inputs(rng, shape)
    y, _, _ = _differentiate(
        layer, x, rng.normal(size=shape), mode, **_call_arguments(kind)
    )
    assert closed_form_calls == [axes]
    assert np.all(np.isfinite(y))


@CLOSED_FORM
@pytest.mark.parametrize(
    "kwargs, call, mode",
    _in_modes(
        [
            pytest.param({}, {"mask": np.arange(24).reshape(6, 4) % 5 > 0}, id="mask"),
            pytest.param({"virtual_batch_size": 2}, {}, id="ghost-batches"),
            pytest.param({"synchronized": True}, {}, id="synchronized"),
            pytest.param({"renorm": True}, {}, id="renorm"),
            pytest.param({}, {"training": False}, id="inference"),
            pytest.param({"statistics": "frozen"}, {}, id="frozen"),
        ],
        COMPILED,
    )
    # TensorFlow's kernel trains images where fused=None, in eager calls
    # (where the input's gradient may be needed).
    + _in_modes(
        [
            pytest.param(
                {"fused": None},
                {},
                marks=pytest.mark.skipif(
                    BACKEND != "tensorflow", reason="TensorFlow's kernel."
                ),
                id="fused-kernel",
            )
        ],
        ("call", "grad"),
    ),
)
def test_training_takes_another_path_where_the_closed_form_does_not_apply(
    rng, closed_form_calls, kwargs, call, mode
):
    shape = (6, 4, 2, 3) if "fused" in kwargs else (6, 4, 3)
    layer = _layer("plain", **kwargs)
    x = random_inputs(rng, shape)
    y, _, _ = _differentiate(layer, x, rng.normal(size=shape), mode, **call)
    assert closed_form_calls == []
    assert np.all(np.isfinite(y))


def _reference_step(kind, x, upstream, gamma, beta, epsilon, axis):
    """The float64 reference of one training step of a layer of `kind`.

    Returns `(y, dx, dgamma, dbeta, mean, variance, count)`, the moments in
    the shape of the statistics. Per-timestep statistics are the reference
    with the time and feature axes kept, gamma and beta repeated over time
    (their gradients summed over it).
    """
    if kind == "timestep":
        axis = (1, x.ndim - 1)
        steps = x.shape[1]

        def per_step(value):
            return (
                None if value is None else np.broadcast_to(value, (steps, *value.shape))
            )

        gamma, beta = per_step(gamma), per_step(beta)
    y, mean, variance, count = reference.train_transform(x, gamma, beta, epsilon, axis)
    dx, dgamma, dbeta = reference.train_gradients(x, upstream, gamma, epsilon, axis)
    if kind == "timestep":
        dgamma, dbeta = dgamma.sum(0), dbeta.sum(0)
    return y, dx, dgamma, dbeta, mean, variance, count


@CLOSED_FORM
@pytest.mark.parametrize(
    "kind, shape, kwargs, mode",
    _in_modes([pytest.param("plain", (16, 5), {}, id="dense")], EVERY_MODE)
    + _in_modes(
        [
            pytest.param(
                "timestep",
                (6, 4, 3),
                {"max_timesteps": 4, "momentum": 0.5},
                id="timestep",
            ),
            pytest.param("domains", (16, 5), {"momentum": 0.5}, id="domains"),
        ],
        SHORT,
    )
    + _in_modes(
        [
            pytest.param("plain", (4, 3, 3, 4), {}, id="NHWC"),
            pytest.param("plain", (4, 4, 3, 3), {"axis": 1}, id="NCHW"),
            pytest.param("plain", (6, 4, 3), {}, id="sequence"),
            pytest.param("plain", (6, 4, 3), {"center": False}, id="center-off"),
            pytest.param("plain", (6, 4, 3), {"scale": False}, id="scale-off"),
            pytest.param(
                "plain",
                (16, 5),
                {"center": False, "scale": False, "epsilon": 0.1},
                id="both-off",
            ),
            pytest.param("plain", (16, 5), {"momentum": None}, id="cumulative"),
            pytest.param(
                "plain", (4, 3, 3, 4), {"debias": True, "momentum": 0.9}, id="debias"
            ),
            pytest.param(
                "plain",
                (4, 3, 3, 4),
                {"unbiased_variance": True, "momentum": 0.5},
                id="unbiased-variance",
            ),
            pytest.param("plain", (4, 3, 3, 4), {"dtype": "float64"}, id="float64"),
            pytest.param(
                "timestep",
                (6, 4, 2, 3),
                {"max_timesteps": 4, "momentum": None},
                id="timestep-4d",
            ),
        ],
        COMPILED,
    ),
)
def test_closed_form_matches_the_reference_and_the_generic_path(
    rng, set_random_weights, closed_form_calls, kind, shape, kwargs, mode
):
    dtype = kwargs.get("dtype", "float32")
    tolerances = (
        (F64,) * 4 if dtype == "float64" else (F32, GRADIENTS, WEIGHT_GRADIENTS, SAME)
    )
    outputs, gradients, weight_gradients, same = tolerances
    with _float64(dtype):
        layers = {path: _layer(kind, **kwargs) for path in ("closed form", "generic")}
        weights = set_random_weights(layers["closed form"], shape)
        layers["generic"].build(shape)
        layers["generic"].set_weights(layers["closed form"].get_weights())
        # A per-domain layer uses and updates row 1 only.
        row = (lambda value: value[1]) if kind == "domains" else (lambda value: value)
        gamma = row(weights["gamma"]) if "gamma" in weights else None
        beta = row(weights["beta"]) if "beta" in weights else None
        epsilon = kwargs.get("epsilon", EPSILON)
        population = reference.PopulationStatistics(
            row(weights["moving_mean"]),
            row(weights["moving_variance"]),
            kwargs.get("momentum", 0.99),
            kwargs.get("debias", False),
        )
        # A second batch where the update depends on the batches counted.
        counted = kwargs.get("momentum", 0.99) is None or kwargs.get("debias")
        steps = {}
        for step in range(2 if counted else 1):
            x = random_inputs(rng, shape, dtype=dtype)
            upstream = rng.normal(size=shape)
            y, dx, dgamma, dbeta, mean, variance, count = _reference_step(
                kind, x, upstream, gamma, beta, epsilon, kwargs.get("axis", -1)
            )
            if kwargs.get("unbiased_variance"):
                variance = reference.unbiased(variance, count)
            population.update(mean, variance)
            results = {}
            for path, layer in layers.items():
                calls = len(closed_form_calls)
                with _generic_path() if path == "generic" else contextlib.nullcontext():
                    got_y, got_dx, grads = _differentiate(
                        layer, x, upstream, mode, steps=steps, **_call_arguments(kind)
                    )
                # A compiled step runs again untraced.
                traced = step == 0 or mode in ("call", "grad")
                ran = len(closed_form_calls) > calls
                assert ran == (traced and path == "closed form")
                np.testing.assert_allclose(got_y, y, **outputs)
                statistics = _statistics(layer)
                for got, expected, initial in zip(
                    statistics,
                    (population.mean, population.variance),
                    (weights["moving_mean"], weights["moving_variance"]),
                    strict=True,
                ):
                    np.testing.assert_allclose(row(got), expected, **outputs)
                    if kind == "domains":
                        np.testing.assert_array_equal(got[0], initial[0])
                results[path] = [got_y, *statistics]
                if grads is None:
                    continue
                np.testing.assert_allclose(got_dx, dx, **gradients)
                for name, expected in (("gamma", dgamma), ("beta", dbeta)):
                    if name in grads:
                        np.testing.assert_allclose(
                            row(grads[name]), expected, **weight_gradients
                        )
                        if kind == "domains":
                            np.testing.assert_array_equal(grads[name][0], 0.0)
                results[path] += [got_dx, *grads.values()]
            for a, b in zip(results["closed form"], results["generic"], strict=True):
                np.testing.assert_allclose(a, b, **same)


@CLOSED_FORM
@pytest.mark.parametrize("mode", _modes("call", "compiled", "xla"))
@pytest.mark.parametrize("axis", [-1, 1], ids=["NHWC", "NCHW"])
def test_closed_form_is_exact_at_large_means(rng, axis, mode):
    # Float32 values of mean 1e6 and std 1e-2: the sums see deviations from
    # a shift within the spread, not values of 1e6.
    x = rng.normal(1e6, 1e-2, (64, 4, 4, 3)).astype("float32")
    if axis == 1:
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    layer = _layer("plain", axis=axis, momentum=0.0)
    upstream = rng.normal(size=x.shape)
    y, dx, grads = _differentiate(layer, x, upstream, mode)
    expected, mean, variance, _ = reference.train_transform(
        x, None, None, EPSILON, axis
    )
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(as64(layer.moving_mean), mean, rtol=1e-7, atol=0)
    np.testing.assert_allclose(as64(layer.moving_variance), variance, rtol=1e-4)
    if dx is not None:
        expected_dx, dgamma, dbeta = reference.train_gradients(
            x, upstream, np.ones(3), EPSILON, axis
        )
        np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(grads["gamma"], dgamma, **WEIGHT_GRADIENTS)
        np.testing.assert_allclose(grads["beta"], dbeta, **WEIGHT_GRADIENTS)


@CLOSED_FORM
@pytest.mark.parametrize("mode", _modes("call", "compiled", "xla"))
@pytest.mark.parametrize(
    "batch",
    [
        16,
        256,
        # The shift, the mean of the first 4 examples, is about 64 spreads
        # from the batch mean: with the second pass from 8 squared spreads
        # of cancellation on, the variance keeps float32 accuracy (the
        # one-pass variance lost 6 bits here, 1e-5 to 5e-5 relative).
        1024,
        2048,
    ],
)
def test_closed_form_outliers_where_the_shift_is_taken(rng, batch, mode):
    x = rng.normal(size=(batch, 16)).astype("float32")
    x[0] = 1e4 * rng.uniform(0.3, 3.0, 16) * rng.choice([-1.0, 1.0], 16)
    layer = _layer("plain", momentum=0.0)
    y, _, _ = _differentiate(layer, x, rng.normal(size=x.shape), mode)
    expected, mean, variance, _ = reference.train_transform(x, None, None, EPSILON, -1)
    np.testing.assert_allclose(y, expected, **F32)
    # The mean to the outliers' float32 rounding; the variance relative.
    outliers = np.abs(x[0]).max()
    np.testing.assert_allclose(
        as64(layer.moving_mean), mean, rtol=0, atol=outliers * 1e-6
    )
    np.testing.assert_allclose(as64(layer.moving_variance), variance, rtol=1e-5)


@CLOSED_FORM
@pytest.mark.parametrize("mode", _modes("call", "compiled", "xla"))
@pytest.mark.parametrize(
    "shape, axis",
    [
        pytest.param((64, 3), -1, id="dense"),
        pytest.param((8, 3, 2, 2), 1, id="NCHW"),
    ],
)
def test_closed_form_batch_of_magnitude_1e20(rng, shape, axis, mode):
    # Squares of 1e40 overflow float32: the outputs and gradients come from
    # the deviations divided by a power of two; the variance itself is not
    # a float32, so the statistics are left as they were.
    x = (rng.normal(size=shape) * 1e20).astype("float32")
    layer = _layer("plain", axis=axis, momentum=0.5)
    upstream = rng.normal(size=shape)
    y, dx, grads = _differentiate(layer, x, upstream, mode)
    assert np.all(np.isfinite(y))
    expected, *_ = reference.train_transform(x, None, None, EPSILON, axis)
    np.testing.assert_allclose(y, expected, **F32)
    np.testing.assert_array_equal(as64(layer.moving_mean), np.zeros(3))
    np.testing.assert_array_equal(as64(layer.moving_variance), np.ones(3))
    if dx is not None:
        # Of order 1e-20: relative to the largest.
        expected_dx, dgamma, dbeta = reference.train_gradients(
            x, upstream, np.ones(3), EPSILON, axis
        )
        scale = np.abs(expected_dx).max()
        np.testing.assert_allclose(dx / scale, expected_dx / scale, **GRADIENTS)
        np.testing.assert_allclose(grads["gamma"], dgamma, **WEIGHT_GRADIENTS)
        np.testing.assert_allclose(grads["beta"], dbeta, **WEIGHT_GRADIENTS)


@CLOSED_FORM
@pytest.mark.parametrize("mode", _modes("call", "compiled", "xla"))
def test_closed_form_nan_leaves_its_feature_only(rng, set_random_weights, mode):
    layer = _layer("plain", momentum=0.5)
    weights = set_random_weights(layer, (8, 3))
    x = random_inputs(rng, (8, 3))
    x[2, 0] = np.nan
    upstream = rng.normal(size=x.shape)
    y, dx, _ = _differentiate(layer, x, upstream, mode)
    expected, mean, variance, _ = reference.train_transform(
        x, weights["gamma"], weights["beta"], EPSILON, -1
    )
    assert np.all(np.isnan(y[:, 0]))
    np.testing.assert_allclose(y[:, 1:], expected[:, 1:], **F32)
    for got, initial, batch in zip(
        _statistics(layer),
        (weights["moving_mean"], weights["moving_variance"]),
        (mean, variance),
        strict=True,
    ):
        assert got[0] == initial[0]
        np.testing.assert_allclose(got[1:], 0.5 * initial[1:] + 0.5 * batch[1:], **F32)
    if dx is not None:
        expected_dx, *_ = reference.train_gradients(
            x, upstream, weights["gamma"], EPSILON, -1
        )
        np.testing.assert_allclose(dx[:, 1:], expected_dx[:, 1:], **GRADIENTS)


@CLOSED_FORM
@pytest.mark.parametrize("mode", _modes("call", "compiled", "xla"))
@pytest.mark.parametrize(
    "kind, shape, kwargs, axes",
    [
        pytest.param("plain", (1, 3), {}, (0,), id="dense"),
        pytest.param("plain", (1, 1, 1, 3), {}, (0, 1, 2), id="NHWC"),
        pytest.param("timestep", (1, 4, 3), {"max_timesteps": 4}, (0,), id="timestep"),
    ],
)
def test_closed_form_batch_of_one_is_an_error(
    rng, closed_form_calls, kind, shape, kwargs, axes, mode
):
    layer = _layer(kind, momentum=0.5, **kwargs)
    layer.build(shape)
    before = _statistics(layer)
    x = random_inputs(rng, shape)
    with pytest.raises(ValueError, match="single value per feature"):
        _differentiate(layer, x, rng.normal(size=shape), mode)
    for got, old in zip(_statistics(layer), before, strict=True):
        np.testing.assert_array_equal(got, old)
    # Two examples are a batch, through the closed form.
    _differentiate(layer, np.concatenate([x, x + 1.0]), np.ones((2, *shape[1:])), mode)
    assert closed_form_calls == [axes]


# Inference: `subtract_multiply_add` through `normalize_broadcast`.

SMALL, LARGE = "small", "large"
# Shapes of more than 2**16 values: JAX's lax.cond rather than where.
INFERENCE_SHAPES = {
    ("plain", SMALL): (8, 5),
    ("plain", LARGE): (32, 17, 17, 8),
    ("timestep", SMALL): (4, 3, 5),
    ("timestep", LARGE): (32, 17, 17, 8),
    ("domains", SMALL): (8, 5),
}
MAX_TIMESTEPS = {SMALL: 2, LARGE: 12}


def _population(rng, shape, where):
    """Float32 `(mean, variance)` of `shape`, `where` far from 0 or near.

    Near: means 1 to 7 spreads from 0 (within `kernels.FAR_OUT`). Far: means
    of magnitude 1e6 and std 1e-2. "one" makes the first entry far, the
    rest near.
    """
    variance = rng.uniform(0.5, 2.0, shape)
    spreads = rng.uniform(1.0, 7.0, shape) * rng.choice([-1.0, 1.0], shape)
    mean = spreads * np.sqrt(variance + EPSILON)
    far = np.full(shape, where == "far")
    if where == "one":
        far.flat[0] = True
    mean = np.where(far, rng.choice([-1e6, 1e6], shape), mean)
    variance = np.where(far, 1e-4, variance)
    return mean.astype("float32"), variance.astype("float32")


def _set_population(layer, kind, mean, variance, rng):
    """Puts `(mean, variance)` where a call with `_call_arguments(kind)` reads them."""
    if kind == "domains":
        # Row 0, which domain 1 does not read: near statistics of its own.
        other_mean, other_variance = _population(rng, mean.shape, "near")
        mean, variance = (
            np.stack([other_mean, mean]),
            np.stack([other_variance, variance]),
        )
    layer.moving_mean.assign(mean)
    layer.moving_variance.assign(variance)


def _reference_statistics(kind, shape, mean, variance):
    """`(mean, variance, axis)` of the reference for inputs of `shape`.

    Per-timestep statistics: the slot of each timestep (the last one for
    those beyond), with the time and feature axes kept.
    """
    if kind != "timestep":
        return mean, variance, -1
    slots = np.minimum(np.arange(shape[1]), len(mean) - 1)
    return mean[slots], variance[slots], (1, len(shape) - 1)


def _expected_inference(kind, x, mean, variance, gamma, beta):
    """The float64 `gamma * (x - mean) / sqrt(variance + epsilon) + beta`."""
    mean, variance, axis = _reference_statistics(kind, x.shape, mean, variance)
    if kind == "timestep":
        gamma, beta = (np.broadcast_to(v, mean.shape) for v in (gamma, beta))
    return reference.normalize(x, mean, variance, gamma, beta, EPSILON, axis)


def _inference(layer, mode, **call):
    """`f(x)`: `layer(x)` in inference as a float64 array, run as `mode` says."""
    if mode == "call":
        return lambda x: as64(layer(x, training=False, **call))
    if BACKEND == "jax":
        import jax

        compiled = jax.jit(
            lambda t, n, x: layer.stateless_call(t, n, x, training=False, **call)[0]
        )
        return lambda x: as64(
            compiled(
                [v.value for v in layer.trainable_variables],
                [v.value for v in layer.non_trainable_variables],
                x,
            )
        )
    import tensorflow as tf

    compiled = tf.function(
        lambda x: layer(x, training=False, **call), jit_compile=mode == "xla"
    )
    return lambda x: as64(compiled(tf.constant(x)))


def _on_the_mean(rng, mean):
    """Float32 inputs 1 to 4 float32 units from `mean` (float32, broadcast)."""
    mean = mean.astype(np.float32)
    units = rng.integers(1, 5, mean.shape) * rng.choice([-1, 1], mean.shape)
    return (mean + units * np.spacing(np.abs(mean))).astype(np.float32)


def _relative_error(got, expected):
    return np.max(np.abs(got - expected) / np.abs(expected))


@pytest.mark.parametrize("where", ["near", "far", "one"])
@pytest.mark.parametrize(
    "kind, size, mode",
    _in_modes(
        [pytest.param("plain", size, id=f"plain-{size}") for size in (SMALL, LARGE)],
        ("call", "compiled", "xla"),
    )
    + _in_modes(
        [
            pytest.param("timestep", SMALL, id="timestep-small"),
            pytest.param("timestep", LARGE, id="timestep-large"),
            pytest.param("domains", SMALL, id="domains-small"),
        ],
        SHORT,
    ),
)
def test_inference_subtracts_the_mean_first_where_one_is_far(
    rng, kind, size, where, mode
):
    shape = INFERENCE_SHAPES[kind, size]
    kwargs = {
        "plain": {},
        "timestep": {"max_timesteps": MAX_TIMESTEPS[size]},
        "domains": {"per_domain_parameters": False},
    }[kind]
    layer = _layer(kind, **kwargs)
    layer.build(shape)
    statistics_shape = tuple(layer.moving_mean.shape)[1 if kind == "domains" else 0 :]
    mean, variance = _population(rng, statistics_shape, where)
    _set_population(layer, kind, mean, variance, rng)
    gamma = rng.uniform(0.5, 2.0, shape[-1]).astype("float32")
    beta = rng.normal(size=shape[-1]).astype("float32")
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    infer = _inference(layer, mode, **_call_arguments(kind))
    rows_mean, rows_variance, axis = _reference_statistics(kind, shape, mean, variance)
    broadcast_mean = reference.expand(rows_mean, shape, axis)
    spread = np.sqrt(reference.expand(rows_variance, shape, axis))

    # Data around the statistics: within 1e-5 of the reference either way.
    x = rng.normal(broadcast_mean, spread, shape).astype("float32")
    expected = _expected_inference(kind, x, mean, variance, gamma, beta)
    np.testing.assert_allclose(infer(x), expected, rtol=0, atol=1e-5)

    # Data on the mean, beta 0: the outputs are a few float32 units of the
    # mean times a; the fold gets them off by its own rounding, about as
    # large, and the subtraction exact.
    layer.beta.assign(np.zeros_like(beta))
    x = _on_the_mean(rng, np.broadcast_to(broadcast_mean, shape))
    expected = _expected_inference(kind, x, mean, variance, gamma, np.zeros_like(beta))
    error = _relative_error(infer(x), expected)
    if where == "near":
        assert error > 1e-2, "subtracted first, where the fold applies"
    else:
        assert error < 1e-5, "folded, where a mean is far"


FROZEN_SHAPES = {SMALL: (8, 5), LARGE: (32, 17, 17, 8)}


@pytest.mark.parametrize("mode", _modes("grad", "compiled", "xla"))
@pytest.mark.parametrize("where", ["near", "far"])
@pytest.mark.parametrize("size", [SMALL, LARGE])
def test_frozen_statistics_gradients(rng, size, where, mode):
    # The inference expression, trained: d/dx = gamma * inverse_std,
    # dgamma = sum(dy * x_hat), dbeta = sum(dy). Near, the fold's terms;
    # far, the subtraction's (the fold's dgamma would cancel sums of
    # dy * x of 1e6 against dy * mean).
    shape = FROZEN_SHAPES[size]
    features = shape[-1]
    layer = _layer("plain", statistics="frozen")
    layer.build(shape)
    mean, variance = _population(rng, (features,), where)
    _set_population(layer, "plain", mean, variance, rng)
    gamma = rng.uniform(0.5, 2.0, features).astype("float32")
    beta = rng.normal(size=features).astype("float32")
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    x = rng.normal(mean, np.sqrt(variance), shape).astype("float32")
    upstream = rng.normal(size=shape)

    reduced = tuple(range(len(shape) - 1))
    inverse_std = 1.0 / np.sqrt(variance.astype(np.float64) + EPSILON)
    x_hat = (x - mean.astype(np.float64)) * inverse_std
    y, dx, grads = _differentiate(layer, x, upstream, mode)
    np.testing.assert_allclose(y, gamma * x_hat + beta, rtol=0, atol=1e-5)
    np.testing.assert_allclose(dx, upstream * gamma * inverse_std, **F32)
    np.testing.assert_allclose(
        grads["gamma"], np.sum(upstream * x_hat, reduced), **WEIGHT_GRADIENTS
    )
    np.testing.assert_allclose(
        grads["beta"], np.sum(upstream, reduced), **WEIGHT_GRADIENTS
    )
    # Frozen: the statistics stay.
    np.testing.assert_array_equal(as64(layer.moving_mean), mean)
    np.testing.assert_array_equal(as64(layer.moving_variance), variance)


class _Wrapped(keras.Model):
    def __init__(self):
        super().__init__()
        self.bn = BatchNorm()

    def call(self, x):
        return self.bn(x)


def test_inference_with_a_symbolic_batch_size():
    # A subclassed model's output shape is inferred by tracing its call with
    # symbolic dimensions (on JAX, shape polymorphism): the fold's choice of
    # `where` or `cond` by size must not compare a symbolic size.
    model = _Wrapped()
    spec = model.compute_output_spec(keras.KerasTensor((None, 3)))
    assert tuple(spec.shape) == (None, 3)
    x = np.arange(12, dtype="float32").reshape(4, 3)
    expected = reference.normalize(x, np.zeros(3), np.ones(3), None, None, EPSILON, -1)
    np.testing.assert_allclose(as64(model(x)), expected, **F32)
