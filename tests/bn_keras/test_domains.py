"""Tests for per-domain statistics: `BatchNorm(domains=k)` and its `domain` argument."""

import keras
import numpy as np
import pytest

import bn_keras
from bn_keras import BatchNorm
from tests import reference
from tests.bn_keras.helpers import BACKEND, EPSILON, F32, as64, random_inputs

FEATURES = 4
OPTIONS = {
    "ema": {"momentum": 0.9},
    "cumulative": {"momentum": None},
    "debiased": {"momentum": 0.9, "debias": True},
    "unbiased_variance": {"momentum": 0.5, "unbiased_variance": True},
}


def _batches(rng):
    a = [random_inputs(rng, (16, FEATURES), loc=2.0, scale=3.0) for _ in range(2)]
    b = [random_inputs(rng, (16, FEATURES), loc=-1.0, scale=0.5) for _ in range(2)]
    return a, b


@pytest.mark.parametrize("options", OPTIONS)
def test_each_domain_averages_its_own_batches_as_a_layer_of_its_own(options, rng):
    """Domain d's statistics are those of a one-domain layer fed d's batches."""
    a, b = _batches(rng)
    layer = BatchNorm(domains=2, **OPTIONS[options])
    alone = [BatchNorm(**OPTIONS[options]) for _ in range(2)]
    for x_a, x_b in zip(a, b, strict=True):
        np.testing.assert_allclose(
            as64(layer(x_a, training=True, domain=0)),
            as64(alone[0](x_a, training=True)),
            **F32,
        )
        layer(x_b, training=True, domain=1)
        alone[1](x_b, training=True)
    for d in range(2):
        np.testing.assert_allclose(
            as64(layer.moving_mean)[d], as64(alone[d].moving_mean), **F32
        )
        np.testing.assert_allclose(
            as64(layer.moving_variance)[d], as64(alone[d].moving_variance), **F32
        )


def test_the_statistics_against_the_formulas(rng):
    a, b = _batches(rng)
    layer = BatchNorm(domains=2, momentum=0.9)
    layer(a[0], training=True, domain=1)
    mean, variance, _ = reference.moments(a[0], -1)
    np.testing.assert_allclose(
        as64(layer.moving_mean), [np.zeros(FEATURES), 0.1 * mean], **F32
    )
    np.testing.assert_allclose(
        as64(layer.moving_variance),
        [np.ones(FEATURES), 0.9 + 0.1 * variance],
        **F32,
    )


def test_inference_uses_each_domains_statistics_also_per_example(
    rng, set_random_weights
):
    layer = BatchNorm(domains=3)
    values = set_random_weights(layer, (8, FEATURES))
    x = random_inputs(rng, (8, FEATURES))

    def expected(d, rows=slice(None)):
        return reference.normalize(
            x[rows],
            values["moving_mean"][d],
            values["moving_variance"][d],
            values["gamma"],
            values["beta"],
            EPSILON,
            -1,
        )

    for d in range(3):
        np.testing.assert_allclose(as64(layer(x, domain=d)), expected(d), **F32)
    per_example = np.array([0, 1, 2, 0, 1, 2, 2, 2], "int32")
    y = as64(layer(x, domain=keras.ops.convert_to_tensor(per_example)))
    for i, d in enumerate(per_example):
        np.testing.assert_allclose(y[i], expected(d, slice(i, i + 1))[0], **F32)
    # (batch, 1), as a Keras Input of shape (1,) gives it.
    y_column = layer(x, domain=keras.ops.convert_to_tensor(per_example[:, None]))
    np.testing.assert_allclose(as64(y_column), y, **F32)


def test_per_domain_parameters_train_only_the_domains_row(
    rng, set_random_weights, call_with_gradients
):
    layer = BatchNorm(domains=2, per_domain_parameters=True)
    values = set_random_weights(layer, (8, FEATURES))
    assert tuple(layer.gamma.shape) == (2, FEATURES)
    x = random_inputs(rng, (8, FEATURES))
    upstream = rng.normal(size=(8, FEATURES))

    y, _, grads = call_with_gradients(_Bound(layer, 1), x, upstream, training=True)

    expected, *_ = reference.train_transform(
        x, values["gamma"][1], values["beta"][1], EPSILON, -1
    )
    np.testing.assert_allclose(y, expected, **F32)
    assert np.all(grads["gamma"][0] == 0) and np.all(grads["beta"][0] == 0)
    _, dgamma, dbeta = reference.train_gradients(
        x, upstream, values["gamma"][1], EPSILON, -1
    )
    np.testing.assert_allclose(grads["gamma"][1], dgamma, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["beta"][1], dbeta, rtol=1e-4, atol=1e-4)


class _Bound(keras.layers.Layer):
    """`layer` called with a fixed `domain`, for the gradient fixture."""

    def __init__(self, layer, domain):
        super().__init__()
        self.layer, self.domain = layer, domain

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)

    def call(self, x, training=None, mask=None):
        return self.layer(x, training=training, domain=self.domain)


def test_a_non_finite_batch_leaves_every_domains_statistics(rng):
    a, b = _batches(rng)
    layer = BatchNorm(domains=2, momentum=0.5)
    layer(a[0], training=True, domain=0)
    layer(b[0], training=True, domain=1)
    before = as64(layer.moving_mean), as64(layer.moving_variance)
    bad = b[1].copy()
    bad[3, 2] = np.nan
    layer(bad, training=True, domain=1)
    after = as64(layer.moving_mean), as64(layer.moving_variance)
    np.testing.assert_array_equal(after[0][0], before[0][0])
    np.testing.assert_array_equal(after[0][1, 2], before[0][1, 2])
    assert np.abs(after[0][1, [0, 1, 3]] - before[0][1, [0, 1, 3]]).max() > 1e-3


def test_one_domain_is_the_plain_layer(rng):
    x = random_inputs(rng, (16, FEATURES))
    plain, one = BatchNorm(momentum=0.5), BatchNorm(momentum=0.5, domains=1)
    for training in (True, False):
        np.testing.assert_array_equal(
            as64(one(x, training=training, domain=0)), as64(plain(x, training=training))
        )
    np.testing.assert_array_equal(as64(one.moving_mean), as64(plain.moving_mean))
    assert tuple(one.moving_mean.shape) == (FEATURES,)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        one(x, domain=1)


@pytest.mark.parametrize("domains", [0, -1, 1.5, True, "2", None])
def test_bad_domains_are_value_errors(domains):
    with pytest.raises(ValueError, match="Received: domains="):
        BatchNorm(domains=domains)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"renorm": True}, "does not combine with `renorm=True`"),
        ({"fused": True}, "does not combine with `fused=True`"),
    ],
)
def test_options_that_do_not_combine(kwargs, match):
    if "fused" in kwargs and BACKEND == "jax":
        pytest.skip("fused=True is refused on its own on JAX, which has no kernel")
    with pytest.raises(ValueError, match=match):
        BatchNorm(domains=2, **kwargs)


@pytest.mark.parametrize(
    ("domain", "match"),
    [
        (2, r"in \[0, 2\).*Received: domain=2"),
        (-1, "Received: domain=-1"),
        (None, "call it with `domain="),
        (True, "Received: domain=True"),
        (0.5, "Received: domain=0.5"),
        ("0", "Received: domain='0'"),
    ],
)
def test_a_bad_domain_is_an_error_and_changes_nothing(domain, match, rng):
    layer = BatchNorm(domains=2)
    layer.build((8, FEATURES))
    with pytest.raises(ValueError, match=match):
        layer(random_inputs(rng, (8, FEATURES)), training=True, domain=domain)
    np.testing.assert_array_equal(as64(layer.moving_mean), np.zeros((2, FEATURES)))


def test_bad_domain_tensors(rng):
    layer = BatchNorm(domains=2)
    x = random_inputs(rng, (4, FEATURES))
    tensor = keras.ops.convert_to_tensor
    with pytest.raises(ValueError, match=r"Received: domain=\[3\]"):
        layer(x, domain=tensor(np.array([0, 1, 3, 1], "int32")))
    with pytest.raises(ValueError, match="integer tensor"):
        layer(x, domain=tensor(np.zeros(4, "float32")))
    with pytest.raises(ValueError, match=r"shape \(4, 2\)"):
        layer(x, domain=tensor(np.zeros((4, 2), "int32")))
    with pytest.raises(ValueError, match="several domains"):
        layer(x, training=True, domain=tensor(np.array([0, 1, 0, 1], "int32")))
    np.testing.assert_array_equal(as64(layer.moving_mean), np.zeros((2, FEATURES)))


def _two_towers(make=lambda: BatchNorm(domains=2, name="bn")):
    dense = keras.layers.Dense(FEATURES, name="dense")
    bn = make()
    a, b = keras.Input((FEATURES,), name="a"), keras.Input((FEATURES,), name="b")
    outputs = [bn(dense(a), domain=0), bn(dense(b), domain=1)]
    return keras.Model([a, b], outputs), dense, bn


def _dense(dense, x):
    return x.astype(np.float64) @ as64(dense.kernel) + as64(dense.bias)


def test_two_towers_train_their_own_statistics_in_fit(rng):
    model, dense, bn = _two_towers()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    a, b = _batches(rng)
    model.fit([a[0], b[0]], [a[0], b[0]], batch_size=16, epochs=3, verbose=0)
    # Each row moved, each its own way (the domains' means are 2 and -1).
    mean = as64(bn.moving_mean)
    assert np.abs(mean).min(axis=1).min() > 0
    assert np.abs(mean[0] - mean[1]).max() > 1e-2

    bn_keras.recompute_statistics(model, [a[0], b[0]], batch_size=16, progress=False)
    for d, x in enumerate((a[0], b[0])):
        h = _dense(dense, x)
        np.testing.assert_allclose(as64(bn.moving_mean)[d], h.mean(0), **F32)
        np.testing.assert_allclose(as64(bn.moving_variance)[d], h.var(0), rtol=1e-4)
    report = bn_keras.inspect_statistics(
        model, [a[1], b[1]], batch_size=16, progress=False
    )
    assert report.layers[0].shape == (2, FEATURES)


def test_recompute_and_inspect_one_domain_through_a_single_tower(rng):
    x = keras.Input((FEATURES,))
    dense = keras.layers.Dense(FEATURES)
    bn = BatchNorm(domains=2, momentum=0.9)
    model = keras.Model(x, bn(dense(x), domain=0))
    a, b = _batches(rng)
    before = as64(bn.moving_mean)

    bn_keras.recompute_statistics(model, b[0], batch_size=16, progress=False, domain=1)

    np.testing.assert_array_equal(as64(bn.moving_mean)[0], before[0])
    np.testing.assert_allclose(
        as64(bn.moving_mean)[1], _dense(dense, b[0]).mean(0), **F32
    )
    fresh = bn_keras.inspect_statistics(
        model, b[0], batch_size=16, progress=False, domain=1
    )
    assert not fresh.stale and fresh.layers[0].mean_shift_max < 1e-4
    assert fresh.layers[0].unreached == 0
    stale = bn_keras.inspect_statistics(
        model, a[0], batch_size=16, progress=False, domain=0
    )
    assert stale.stale
    assert bn._domain_override is None


def test_per_domain_work_refuses_shared_layers_and_bad_domains(rng):
    model, _, _ = _two_towers(lambda: BatchNorm(name="bn"))
    a, b = _batches(rng)
    with pytest.raises(ValueError, match="keep one set for every domain"):
        bn_keras.recompute_statistics(model, [a[0], b[0]], batch_size=16, domain=0)
    model, _, bn = _two_towers()
    before = as64(bn.moving_mean)
    for domain, match in ((2, "out of range"), (-1, "non-negative"), ("0", "non-neg")):
        with pytest.raises(ValueError, match=match):
            bn_keras.recompute_statistics(
                model, [a[0], b[0]], batch_size=16, domain=domain
            )
        with pytest.raises(ValueError, match=match):
            bn_keras.inspect_statistics(
                model, [a[0], b[0]], batch_size=16, domain=domain
            )
    np.testing.assert_array_equal(as64(bn.moving_mean), before)


def test_saving_and_loading_keep_every_domain(tmp_path, rng):
    model, _, bn = _two_towers()
    a, b = _batches(rng)
    bn.moving_mean.assign(rng.normal(size=(2, FEATURES)).astype("float32"))
    path = tmp_path / "towers.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded_bn = loaded.get_layer("bn")
    assert loaded_bn.domains == 2 and not loaded_bn.per_domain_parameters
    np.testing.assert_array_equal(as64(loaded_bn.moving_mean), as64(bn.moving_mean))
    for x, y in zip(
        loaded.predict([a[0], b[0]], verbose=0),
        model.predict([a[0], b[0]], verbose=0),
        strict=True,
    ):
        np.testing.assert_allclose(x, y, **F32)

    three, _, _ = _two_towers(lambda: BatchNorm(domains=3, name="bn"))
    three.save_weights(tmp_path / "three.weights.h5")
    with pytest.raises(ValueError, match="domains"):
        model.load_weights(tmp_path / "three.weights.h5")
    np.testing.assert_array_equal(as64(bn.moving_mean), as64(loaded_bn.moving_mean))


def test_folding_one_domain(rng):
    x = keras.Input((FEATURES,))
    dense = keras.layers.Dense(FEATURES)
    bn = BatchNorm(domains=2, per_domain_parameters=True)
    model = keras.Model(x, bn(dense(x), domain=1))
    for variable in bn.weights:
        if variable.name == "moving_variance":
            variable.assign(rng.uniform(0.5, 2.0, variable.shape).astype("float32"))
        elif "int" not in variable.dtype:
            variable.assign(rng.normal(size=variable.shape).astype("float32"))
    data = random_inputs(rng, (8, FEATURES))

    kept = bn_keras.fold_batch_norms(model)
    assert any(isinstance(layer, BatchNorm) for layer in kept.layers)
    with pytest.raises(ValueError, match="per-domain statistics"):
        bn_keras.fold_batch_norms(model, strict=True)
    folded = bn_keras.fold_batch_norms(model, domain=1, strict=True)
    assert not any(isinstance(layer, BatchNorm) for layer in folded.layers)
    np.testing.assert_allclose(
        folded.predict(data, verbose=0), model.predict(data, verbose=0), **F32
    )


def test_conversion_to_keras_refuses_domains():
    x = keras.Input((FEATURES,))
    model = keras.Model(x, BatchNorm(domains=2, name="bn")(x, domain=0))
    with pytest.raises(ValueError, match="domains=2"):
        bn_keras.convert_batch_norms(model, to="keras")


def test_a_mixed_training_batch_in_fit_never_touches_any_domains_statistics(rng):
    x, d = keras.Input((FEATURES,)), keras.Input((), dtype="int32")
    bn = BatchNorm(domains=2)
    model = keras.Model([x, d], bn(x, domain=d))
    model.compile("sgd", "mse")
    data = random_inputs(rng, (16, FEATURES))
    mixed = np.array([0, 1] * 8, "int32")
    if BACKEND == "jax":
        # A traced value cannot raise: the batch updates no statistics.
        model.fit([data, mixed], data, batch_size=16, verbose=0)
    else:
        with pytest.raises(Exception, match="several domains"):
            model.fit([data, mixed], data, batch_size=16, verbose=0)
    np.testing.assert_array_equal(as64(bn.moving_mean), np.zeros((2, FEATURES)))
    np.testing.assert_array_equal(as64(bn.moving_variance), np.ones((2, FEATURES)))
    # One domain per batch trains that domain's set.
    model.fit([data, np.ones(16, "int32")], data, batch_size=16, verbose=0)
    assert np.abs(as64(bn.moving_mean)[1]).max() > 0
    np.testing.assert_array_equal(as64(bn.moving_mean)[0], np.zeros(FEATURES))


def test_an_out_of_range_domain_in_a_compiled_predict(rng):
    x, d = keras.Input((FEATURES,)), keras.Input((), dtype="int32")
    model = keras.Model([x, d], BatchNorm(domains=2)(x, domain=d))
    data = random_inputs(rng, (8, FEATURES))
    bad = np.array([0, 1, 5, 1, 0, 0, 1, 1], "int32")
    if BACKEND == "jax":
        # A traced value cannot raise: NaN where the domain is out of range.
        y = model.predict([data, bad], batch_size=8, verbose=0)
        assert np.isnan(y[2]).all()
        assert np.isfinite(np.delete(y, 2, axis=0)).all()
    else:
        with pytest.raises(Exception, match=r"must be in \[0, 2\)|domain=\[5\]"):
            model.predict([data, bad], batch_size=8, verbose=0)


def test_an_int64_domain_past_the_int32_range_is_refused(rng):
    # A cast to int32 before the check wrapped 2**32 + 1 to a valid 1.
    layer = BatchNorm(domains=2)
    x = random_inputs(rng, (2, FEATURES))
    with pytest.raises(ValueError, match=r"Received: domain=\[4294967297\]"):
        layer(x, domain=np.array([0, 2**32 + 1], "int64"))


@pytest.mark.parametrize("training", [False, True])
def test_a_domain_of_another_length_than_the_batch_is_refused(training, rng):
    # One example with three domains broadcast to three outputs.
    layer = BatchNorm(domains=3)
    with pytest.raises(ValueError, match=r"one entry per example.*\(1, 4\).*\(3,\)"):
        layer(
            random_inputs(rng, (1, FEATURES)),
            training=training,
            domain=np.array([0, 1, 2], "int32"),
        )
    with pytest.raises(ValueError, match="one entry per example"):
        layer(random_inputs(rng, (6, FEATURES)), domain=np.array([1], "int32"))
    np.testing.assert_array_equal(as64(layer.moving_mean), np.zeros((3, FEATURES)))


@pytest.mark.parametrize("options", ["ema", "cumulative"])
def test_timestep_batch_norm_keeps_per_timestep_statistics_per_domain(options, rng):
    """Each domain's (timesteps, features) set is that of a layer of its own."""
    a = random_inputs(rng, (8, 5, 3), loc=2.0)  # beyond max_timesteps=4
    b = random_inputs(rng, (8, 3, 3), loc=-1.0)  # short of it
    layer = bn_keras.TimestepBatchNorm(4, domains=2, **OPTIONS[options])
    alone = [bn_keras.TimestepBatchNorm(4, **OPTIONS[options]) for _ in range(2)]
    for _ in range(2):
        layer(a, training=True, domain=0)
        alone[0](a, training=True)
        layer(b, training=True, domain=1)
        alone[1](b, training=True)
    assert tuple(layer.moving_mean.shape) == (2, 4, 3)
    for d in range(2):
        np.testing.assert_allclose(
            as64(layer.moving_mean)[d], as64(alone[d].moving_mean), **F32
        )
        np.testing.assert_allclose(
            as64(layer.moving_variance)[d], as64(alone[d].moving_variance), **F32
        )
        if layer.num_batches is not None:
            np.testing.assert_array_equal(
                as64(layer.num_batches)[d], as64(alone[d].num_batches)
            )
    for d, x in ((0, a), (1, b)):
        np.testing.assert_allclose(as64(layer(x, domain=d)), as64(alone[d](x)), **F32)
    per_example = np.array([0, 1, 1, 0], "int32")
    x = a[:4]
    y = as64(layer(x, domain=keras.ops.convert_to_tensor(per_example)))
    for i, d in enumerate(per_example):
        np.testing.assert_allclose(y[i : i + 1], as64(alone[d](x[i : i + 1])), **F32)
