"""Tests for bn_keras.callbacks: PreciseBN and FreezeStatistics inside fit()."""

import keras
import numpy as np
import pytest

from bn_keras import BatchNorm
from bn_keras.callbacks import FreezeStatistics, PreciseBN
from tests.bn_keras.helpers import F32, as64, random_inputs

EXAMPLES, BATCH = 64, 16


def _model(make_bn=BatchNorm):
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, name="dense"),
            make_bn(name="bn"),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3, name="head"),
        ]
    )


def _compiled(make_bn=BatchNorm, **optimizer):
    model = _model(make_bn)
    model.compile(optimizer=keras.optimizers.SGD(0.2, **optimizer), loss="mse")
    return model


def _data(rng):
    x = random_inputs(rng, (EXAMPLES, 6))
    y = rng.normal(size=(EXAMPLES, 3)).astype("float32")
    return x, y


def _data_statistics(model, x):
    """The mean and biased variance of the BN layer's input over `x` (NumPy)."""
    dense = model.get_layer("dense")
    h = x.astype(np.float64) @ as64(dense.kernel) + as64(dense.bias)
    return h.mean(0), h.var(0)


def _statistics(model):
    bn = model.get_layer("bn")
    return as64(bn.moving_mean), as64(bn.moving_variance)


def _assert_measured(model, x):
    mean, variance = _data_statistics(model, x)
    moving_mean, moving_variance = _statistics(model)
    np.testing.assert_allclose(moving_mean, mean, **F32)
    np.testing.assert_allclose(moving_variance, variance, **F32)


def test_precise_bn_leaves_the_statistics_of_the_final_weights(rng):
    model = _compiled()
    x, y = _data(rng)
    callback = PreciseBN(x, batch_size=BATCH, verbose=0)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[callback]
    )
    _assert_measured(model, x)
    seconds = history.history["precise_bn_seconds"]
    assert len(seconds) == 2 and min(seconds) > 0
    assert [r["when"] for r in callback.records] == ["epoch", "epoch"]


def test_validation_sees_the_recomputed_statistics(rng):
    model = _compiled()
    x, y = _data(rng)
    x_val, y_val = _data(rng)
    callback = PreciseBN(x, batch_size=BATCH, verbose=0)
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        verbose=0,
        validation_data=(x_val, y_val),
        callbacks=[callback],
    )
    _assert_measured(model, x)
    after = model.evaluate(x_val, y_val, batch_size=BATCH, verbose=0)
    np.testing.assert_allclose(history.history["val_loss"][-1], after, rtol=1e-5)


def test_every_n_epochs_and_a_final_recomputation(rng):
    model = _compiled()
    x, y = _data(rng)
    callback = PreciseBN(x, every_n_epochs=2, batch_size=BATCH, verbose=0)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[callback]
    )
    seconds = history.history["precise_bn_seconds"]
    assert seconds[0] == 0 and seconds[1] > 0 and seconds[2] == 0
    assert [(r["epoch"], r["when"]) for r in callback.records] == [
        (1, "epoch"),
        (2, "train_end"),
    ]
    _assert_measured(model, x)


def test_steps_per_epoch_and_steps(rng):
    model = _compiled()
    x, y = _data(rng)
    callback = PreciseBN(x, batch_size=BATCH, steps=2, verbose=0)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        steps_per_epoch=2,
        verbose=0,
        callbacks=[callback],
    )
    _assert_measured(model, x[: 2 * BATCH])


def test_with_an_ema_optimizer_the_statistics_are_those_of_the_averaged_weights(rng):
    x, y = _data(rng)
    gaps = {}
    for use_callback in (False, True):
        keras.utils.set_random_seed(1)
        model = _compiled(use_ema=True, ema_momentum=0.9)
        callbacks = [PreciseBN(x, batch_size=BATCH, verbose=0)] if use_callback else []
        model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=callbacks)
        mean, _ = _data_statistics(model, x)
        gaps[use_callback] = np.abs(_statistics(model)[0] - mean).max()
        if use_callback:
            _assert_measured(model, x)
            assert callback_records(callbacks) == ["epoch"] * 3 + ["train_end"]
    assert gaps[False] > 100 * max(gaps[True], 1e-6)


def callback_records(callbacks):
    return [r["when"] for r in callbacks[0].records]


def test_freeze_statistics_fixes_them_for_the_last_epochs_and_restores_modes(rng):
    model = _compiled()
    x, y = _data(rng)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((_statistics(self.model), as64(model.get_layer("bn").gamma)))

    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=3,
        verbose=0,
        callbacks=[FreezeStatistics(last_epochs=1, verbose=0), Record()],
    )
    (mean_0, _), _ = seen[0]
    (mean_1, var_1), gamma_1 = seen[1]
    (mean_2, var_2), gamma_2 = seen[2]
    assert np.abs(mean_1 - mean_0).max() > 1e-5  # updated before the freeze
    np.testing.assert_array_equal(mean_2, mean_1)
    np.testing.assert_array_equal(var_2, var_1)
    assert np.abs(gamma_2 - gamma_1).max() > 1e-5  # gamma still trained
    assert model.get_layer("bn").statistics == "update"


def test_an_interrupt_leaves_the_model_frozen_and_restore_gives_modes_back(rng):
    model = _compiled()
    x, y = _data(rng)
    freeze = FreezeStatistics(last_epochs=2, verbose=0)

    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if model.get_layer("bn").statistics == "frozen":
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.fit(
            x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[freeze, Interrupt()]
        )
    assert model.get_layer("bn").statistics == "frozen"
    freeze.restore()
    assert model.get_layer("bn").statistics == "update"
    freeze.restore()  # nothing left to restore
    assert model.get_layer("bn").statistics == "update"


def test_early_stopping_before_the_last_epochs_freezes_nothing(rng):
    model = _compiled()
    x, y = _data(rng)
    modes = []

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            modes.append(model.get_layer("bn").statistics)
            self.model.stop_training = True

    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=5,
        verbose=0,
        callbacks=[FreezeStatistics(last_epochs=2, verbose=0), Stop()],
    )
    assert modes == ["update"]
    assert model.get_layer("bn").statistics == "update"


@pytest.mark.parametrize("precise_first", [True, False])
def test_precise_bn_keeps_what_freeze_statistics_froze_in_either_order(
    rng, precise_first
):
    model = _compiled()
    x, y = _data(rng)
    frozen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            frozen.append(_statistics(self.model))

    callbacks = [
        PreciseBN(x, every_n_epochs=5, batch_size=BATCH, verbose=0),
        FreezeStatistics(last_epochs=1, verbose=0),
    ]
    if not precise_first:
        callbacks.reverse()
    model.fit(
        x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[*callbacks, Record()]
    )
    # The end of training does not measure the layers frozen in the last epoch.
    np.testing.assert_array_equal(_statistics(model)[0], frozen[-1][0])
    np.testing.assert_array_equal(_statistics(model)[0], frozen[0][0])
    assert model.get_layer("bn").statistics == "update"


def test_freeze_statistics_names_the_conversion_for_keras_layers(rng):
    model = _compiled(make_bn=keras.layers.BatchNormalization)
    x, y = _data(rng)
    with pytest.raises(ValueError, match="convert_batch_norms"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[FreezeStatistics(1, verbose=0)])


def test_precise_bn_works_with_keras_layers(rng):
    model = _compiled(make_bn=keras.layers.BatchNormalization)
    x, y = _data(rng)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        verbose=0,
        callbacks=[PreciseBN(x, batch_size=BATCH, verbose=0)],
    )
    _assert_measured(model, x)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda x: PreciseBN(None), "data=None"),
        (lambda x: PreciseBN(x, every_n_epochs=0), "every_n_epochs"),
        (lambda x: PreciseBN(x, steps=-1), "steps"),
        (lambda x: PreciseBN(x, batch_size=1.5), "batch_size"),
        (lambda x: FreezeStatistics(last_epochs=0), "last_epochs"),
    ],
)
def test_bad_arguments_are_value_errors(make, match, rng):
    with pytest.raises(ValueError, match=match):
        make(random_inputs(rng, (4, 6)))


def test_a_model_without_bn_is_an_error_before_training(rng):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data(rng)
    weights = [as64(w) for w in model.weights]
    for callback in (PreciseBN(x, batch_size=BATCH), FreezeStatistics(1)):
        with pytest.raises(ValueError, match="no batch-normalization layer"):
            model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    for before, after in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(before, as64(after))


def test_precise_bn_prints_its_cost(rng, capsys):
    model = _compiled()
    x, y = _data(rng)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        verbose=0,
        callbacks=[PreciseBN(x, batch_size=BATCH)],
    )
    assert (
        "PreciseBN: recomputed the statistics of 1 BN layers" in capsys.readouterr().out
    )


def _batches(x):
    return (x[i : i + BATCH] for i in range(0, EXAMPLES, BATCH))


def test_a_generator_serves_one_recomputation_and_a_second_is_a_clear_error(rng):
    model = _compiled()
    x, y = _data(rng)
    weights = [as64(w) for w in model.weights]
    # Two due epochs: refused before training.
    with pytest.raises(ValueError, match="iterator .*used up by the first"):
        model.fit(
            x, y, epochs=2, verbose=0, callbacks=[PreciseBN(_batches(x), verbose=0)]
        )
    for before, after in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(before, as64(after))
    # One: it is read once, and measured.
    callback = PreciseBN(_batches(x), verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])
    _assert_measured(model, x)
    # A second fit() would read it again.
    with pytest.raises(ValueError, match="iterator .*used up by the first"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])
