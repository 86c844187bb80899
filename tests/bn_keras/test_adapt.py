"""Tests for test-time adaptation: adapt_statistics (AdaBN) and Tent."""

import keras
import numpy as np
import pytest

import bn_keras
from bn_keras import BatchNorm, Tent, adapt_statistics, restore_statistics
from tests.bn_keras.helpers import F32, as64, random_inputs

FEATURES = 6


def _model(make_bn=lambda: BatchNorm(name="bn")):
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(8, name="dense"),
            make_bn(),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3, name="head"),
        ]
    )


def _values(model):
    return {v.path: as64(v).copy() for v in model.variables}


def _assert_same(before, model, except_paths=()):
    for variable in model.variables:
        if variable.path in except_paths:
            continue
        np.testing.assert_array_equal(
            as64(variable), before[variable.path], err_msg=variable.path
        )


def _target(rng, n=64):
    return random_inputs(rng, (n, FEATURES), loc=4.0, scale=0.3)


@pytest.mark.parametrize("frozen", [False, True])
def test_adabn_is_recomputation_on_the_target_data(frozen, rng):
    model = _model()
    model.trainable = not frozen
    x = _target(rng)
    before = _values(model)

    saved = adapt_statistics(model, x, batch_size=16, progress=False)

    dense, bn = model.get_layer("dense"), model.get_layer("bn")
    h = x.astype(np.float64) @ as64(dense.kernel) + as64(dense.bias)
    np.testing.assert_allclose(as64(bn.moving_mean), h.mean(0), **F32)
    np.testing.assert_allclose(as64(bn.moving_variance), h.var(0), rtol=1e-4)
    statistics = {f"{bn.path}/moving_mean", f"{bn.path}/moving_variance"}
    _assert_same(before, model, except_paths=statistics)
    assert model.trainable == (not frozen)
    np.testing.assert_array_equal(
        saved["bn"]["moving_mean"], before[f"{bn.path}/moving_mean"]
    )

    restore_statistics(model, saved)
    _assert_same(before, model)


def test_adabn_equals_recompute_statistics(rng):
    x = _target(rng)
    adapted, recomputed = _model(), _model()
    recomputed.set_weights(adapted.get_weights())
    adapt_statistics(adapted, x, batch_size=16, progress=False)
    bn_keras.recompute_statistics(recomputed, x, batch_size=16, progress=False)
    for a, b in zip(adapted.weights, recomputed.weights, strict=True):
        np.testing.assert_array_equal(as64(a), as64(b))


def test_adabn_works_on_keras_layers(rng):
    model = _model(lambda: keras.layers.BatchNormalization(name="bn"))
    x = _target(rng)
    saved = adapt_statistics(model, x, batch_size=16, progress=False)
    dense = model.get_layer("dense")
    h = x.astype(np.float64) @ as64(dense.kernel) + as64(dense.bias)
    np.testing.assert_allclose(
        as64(model.get_layer("bn").moving_mean), h.mean(0), **F32
    )
    restore_statistics(model, saved)
    np.testing.assert_array_equal(as64(model.get_layer("bn").moving_mean), 0.0)


def _labelled_batches(x):
    for i in range(0, len(x), 16):
        yield x[i : i + 16], np.zeros(16)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (lambda x: _labelled_batches(x), "carries labels"),
        (lambda x: np.where(np.arange(len(x))[:, None] == 3, np.nan, x), "NaN"),
        (lambda x: x[:0], "no batch"),
        (lambda x: x[:, :4], "shape"),
    ],
)
def test_bad_target_data_is_an_error_and_changes_nothing(data, match, rng):
    model = _model()
    before = _values(model)
    x = _target(rng)
    data = data(x)
    batch_size = None if not isinstance(data, np.ndarray) else 16
    with pytest.raises(ValueError, match=match):
        adapt_statistics(model, data, batch_size=batch_size, progress=False)
    _assert_same(before, model)


def test_restore_refuses_statistics_of_another_model(rng):
    model = _model()
    saved = adapt_statistics(model, _target(rng), batch_size=16, progress=False)
    before = _values(model)
    with pytest.raises(ValueError, match="must be what"):
        restore_statistics(model, {"other": saved["bn"]})
    wrong = {"bn": {"moving_mean": np.zeros(3), "moving_variance": np.ones(3)}}
    with pytest.raises(ValueError, match="shape"):
        restore_statistics(model, wrong)
    _assert_same(before, model)


def test_models_without_our_bn_layers():
    plain = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="no batch-normalization layer"):
        adapt_statistics(plain, np.zeros((8, FEATURES), "float32"), batch_size=4)
    with pytest.raises(ValueError, match="no batch-normalization layer"):
        Tent(plain)
    keras_bn = _model(lambda: keras.layers.BatchNormalization(name="bn"))
    with pytest.raises(ValueError, match="convert_batch_norms"):
        Tent(keras_bn)
    assert bn_keras.batch_norm_layers(keras_bn)[0].trainable


def _entropy(logits):
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return float(-(p * np.log(p + 1e-12)).sum(-1).mean())


def _trained(rng):
    model = _model()
    x = random_inputs(rng, (128, FEATURES), loc=0.0, scale=1.0)
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    return model


def test_tent_trains_gamma_and_beta_only_and_lowers_the_entropy(rng):
    model = _trained(rng)
    before = _values(model)
    modes, flags = (
        model.get_layer("bn").statistics,
        [v.trainable for v in model.variables],
    )
    shifted = _target(rng, 32)
    tent = Tent(model, optimizer=keras.optimizers.SGD(0.5), steps=1)
    first = _entropy(np.asarray(tent(shifted)))
    for _ in range(10):
        last = _entropy(np.asarray(tent(shifted)))
    assert last < first - 1e-3

    bn = model.get_layer("bn")
    adapted = {f"{bn.path}/gamma", f"{bn.path}/beta"}
    _assert_same(before, model, except_paths=adapted)
    assert np.abs(as64(bn.gamma) - before[f"{bn.path}/gamma"]).max() > 1e-4

    tent.restore()
    _assert_same(before, model)
    assert model.get_layer("bn").statistics == modes
    assert [v.trainable for v in model.variables] == flags
    with pytest.raises(ValueError, match="restored"):
        tent.predict(shifted)


def test_tent_first_predictions_are_the_test_batch_statistics_ones(rng):
    model = _trained(rng)
    shifted = _target(rng, 32)
    with bn_keras.statistics_mode(model, "batch"):
        expected = model.predict(shifted, batch_size=32, verbose=0)
    with Tent(model) as tent:
        np.testing.assert_allclose(np.asarray(tent(shifted)), expected, **F32)


def test_episodic_tent_resets_before_every_batch_and_online_does_not(rng):
    model = _trained(rng)
    shifted = _target(rng, 32)
    with Tent(model, optimizer=keras.optimizers.SGD(0.5), episodic=True) as tent:
        first, second = np.asarray(tent(shifted)), np.asarray(tent(shifted))
        np.testing.assert_allclose(first, second, **F32)
    with Tent(model, optimizer=keras.optimizers.SGD(0.5)) as tent:
        first, second = np.asarray(tent(shifted)), np.asarray(tent(shifted))
        assert np.abs(first - second).max() > 1e-5
        tent.reset()
        np.testing.assert_allclose(np.asarray(tent(shifted)), first, **F32)
        assert int(as64(tent._optimizer.iterations)) == 1


def test_tent_predict_goes_batch_by_batch_and_refuses_a_batch_of_one(rng):
    model = _trained(rng)
    before = _values(model)
    shifted = _target(rng, 64)
    with Tent(model) as tent:
        for n, batch_size in ((65, 32), (1, 1), (64, 1), (0, 8)):
            with pytest.raises(ValueError, match="2 or more|no example"):
                tent.predict(
                    shifted[:n] if n <= 64 else np.concatenate([shifted, shifted[:1]]),
                    batch_size=batch_size,
                )
            _assert_same(before, model)
        with pytest.raises(ValueError, match="NaN"):
            tent(np.full((4, FEATURES), np.nan, "float32"))
        _assert_same(before, model)
        predictions = tent.predict(shifted, batch_size=32)
    assert predictions.shape == (64, 3)
    _assert_same(before, model)


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"steps": 1.5}])
def test_tent_bad_arguments(kwargs, rng):
    model = _trained(rng)
    with pytest.raises(ValueError, match="steps"):
        Tent(model, **kwargs)
    with pytest.raises(ValueError, match="built"):
        Tent(keras.Sequential([BatchNorm()]))


def test_a_second_tent_on_an_open_one_is_refused(rng):
    # It took the first one's adapted gamma, beta and "batch" mode for the
    # source model: restoring both in creation order left the model adapted.
    model = _model()
    before = _values(model)
    shifted = _target(rng, 8)
    first = Tent(model, optimizer=keras.optimizers.SGD(0.5))
    first(shifted)
    with pytest.raises(ValueError, match="already adapted by an open Tent"):
        Tent(model)
    first.restore()
    _assert_same(before, model)
    with Tent(model) as second:
        second(shifted)
    _assert_same(before, model)
    assert model.get_layer("bn").statistics == "update"


def _with_head(activation, units=3):
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(8),
            BatchNorm(name="bn"),
            keras.layers.Dense(units, activation=activation),
        ]
    )


@pytest.mark.parametrize(
    "activation, units, from_logits, match",
    [
        ("softmax", 3, True, "from_logits=False"),
        (None, 3, False, "from_logits=True"),
        (None, 1, True, "2 or more classes"),
    ],
)
def test_tent_refuses_outputs_that_do_not_fit_from_logits(
    activation, units, from_logits, match, rng
):
    # The step lowered another quantity: the entropy of a softmax of
    # probabilities, or of a single score (always 0, nothing adapted).
    model = _with_head(activation, units)
    before = _values(model)
    with Tent(model, from_logits=from_logits) as tent:
        with pytest.raises(ValueError, match=match):
            tent(_target(rng, 8))
        _assert_same(before, model)


def test_batches_of_one_are_refused_up_front(rng):
    model = _model()
    before = _values(model)
    for measure in (
        adapt_statistics,
        bn_keras.recompute_statistics,
        bn_keras.inspect_statistics,
    ):
        with pytest.raises(ValueError, match="batches of one example"):
            measure(model, _target(rng, 8), batch_size=1, progress=False)
    _assert_same(before, model)


def test_an_interrupt_in_the_middle_of_adaptation_can_be_undone(rng):
    model = _trained(rng)
    before = _values(model)
    shifted = _target(rng, 96)
    tent = Tent(model, optimizer=keras.optimizers.SGD(0.5))
    original = tent._wrapper.train_on_batch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    tent._wrapper.train_on_batch = interrupted
    with pytest.raises(KeyboardInterrupt):
        tent.predict(shifted, batch_size=32)
    bn = model.get_layer("bn")
    assert np.abs(as64(bn.gamma) - before[f"{bn.path}/gamma"]).max() > 0
    tent.reset()
    _assert_same(before, model)
    tent.restore()
    _assert_same(before, model)
    assert bn.statistics == "update"
