"""`BatchNormLSTM` against the NumPy BN-LSTM of `tests.reference`.

The reference follows Cooijmans et al. (2016), https://arxiv.org/abs/1603.09025:
the BN-LSTM equations (6) to (8), with per-timestep batch moments in training
and per-timestep population statistics (the last slot beyond T_max) in
inference.
"""

import os

import keras
import numpy as np
import pytest

import bn_keras
from bn_keras import BatchNormLSTM
from tests import reference
from tests.bn_keras.helpers import BACKEND, F32_RECURRENT, as64


def _randomize_lstm(layer, input_shape, rng):
    """Random weights and statistics; returns them under the reference's names."""
    if not layer.built:
        layer.build(input_shape)
    values = {
        "kernel": rng.normal(0.0, 0.5, layer.kernel.shape),
        "recurrent_kernel": rng.normal(0.0, 0.5, layer.recurrent_kernel.shape),
        "bias": rng.normal(0.0, 0.5, layer.bias.shape),
        "gamma_x": rng.uniform(0.5, 1.5, layer.input_norm.gamma.shape),
        "gamma_h": rng.uniform(0.5, 1.5, layer.recurrent_norm.gamma.shape),
        "gamma_c": rng.uniform(0.5, 1.5, layer.cell_norm.gamma.shape),
        "beta_c": rng.normal(0.0, 0.5, layer.cell_norm.beta.shape),
    }
    variables = {
        "kernel": layer.kernel,
        "recurrent_kernel": layer.recurrent_kernel,
        "bias": layer.bias,
        "gamma_x": layer.input_norm.gamma,
        "gamma_h": layer.recurrent_norm.gamma,
        "gamma_c": layer.cell_norm.gamma,
        "beta_c": layer.cell_norm.beta,
    }
    for name, variable in variables.items():
        variable.assign(values[name].astype("float32"))
    population = {}
    for name, norm in _norms(layer).items():
        shape = norm.moving_mean.shape
        mean = rng.normal(0.0, 1.0, shape)
        variance = rng.uniform(0.5, 2.0, shape)
        norm.moving_mean.assign(mean.astype("float32"))
        norm.moving_variance.assign(variance.astype("float32"))
        population[name] = (as64(norm.moving_mean), as64(norm.moving_variance))
    values = {name: as64(variable) for name, variable in variables.items()}
    return values, population


def _norms(layer):
    return {
        "input": layer.input_norm,
        "recurrent": layer.recurrent_norm,
        "cell": layer.cell_norm,
    }


def _population(layer):
    return {
        name: (as64(norm.moving_mean), as64(norm.moving_variance))
        for name, norm in _norms(layer).items()
    }


@pytest.mark.parametrize("masked", [False, True])
def test_bn_lstm_training_matches_reference(masked, rng):
    x = rng.normal(size=(6, 5, 3)).astype("float32")
    mask = None
    if masked:
        lengths = np.array([5, 3, 4, 1, 5, 2])
        mask = np.arange(5)[None, :] < lengths[:, None]
    layer = BatchNormLSTM(4, max_timesteps=4, momentum=0.5, return_sequences=True)
    w, population = _randomize_lstm(layer, x.shape, rng)
    y = as64(layer(x, training=True, mask=mask))
    expected, _, _, seen = reference.reference_bn_lstm(x, w, training=True, mask=mask)
    # Padded timesteps repeat the last output (the state is kept).
    np.testing.assert_allclose(y, expected, **F32_RECURRENT)
    counts = np.ones(5) * 6 if mask is None else mask.sum(0)
    ok = counts[:4] > 1
    for name, (mean, variance) in seen.items():
        moving_mean, moving_variance = population[name]
        np.testing.assert_allclose(
            as64(_norms(layer)[name].moving_mean),
            np.where(ok[:, None], 0.5 * moving_mean + 0.5 * mean[:4], moving_mean),
            **F32_RECURRENT,
            err_msg=name,
        )
        np.testing.assert_allclose(
            as64(_norms(layer)[name].moving_variance),
            np.where(
                ok[:, None], 0.5 * moving_variance + 0.5 * variance[:4], moving_variance
            ),
            **F32_RECURRENT,
            err_msg=name,
        )


def test_bn_lstm_inference_matches_reference_beyond_max_timesteps(rng):
    x = rng.normal(size=(3, 6, 2)).astype("float32")
    layer = BatchNormLSTM(3, max_timesteps=4, return_sequences=True, return_state=True)
    w, population = _randomize_lstm(layer, x.shape, rng)
    y, h, c = layer(x)
    expected, h_ref, c_ref, _ = reference.reference_bn_lstm(
        x, w, training=False, population=population, max_timesteps=4
    )
    np.testing.assert_allclose(as64(y), expected, **F32_RECURRENT)
    np.testing.assert_allclose(as64(h), h_ref, **F32_RECURRENT)
    np.testing.assert_allclose(as64(c), c_ref, **F32_RECURRENT)
    # Inference changes no statistic.
    for name, (mean, variance) in _population(layer).items():
        np.testing.assert_array_equal(mean, population[name][0])
        np.testing.assert_array_equal(variance, population[name][1])


def test_bn_lstm_single_sequence_inference_equals_batched(rng):
    x = rng.normal(size=(5, 7, 3)).astype("float32")
    layer = BatchNormLSTM(4, max_timesteps=5)
    _randomize_lstm(layer, x.shape, rng)
    batched = as64(layer(x))
    one_at_a_time = np.concatenate([as64(layer(x[i : i + 1])) for i in range(5)])
    np.testing.assert_allclose(one_at_a_time, batched, rtol=1e-6, atol=1e-6)


def test_bn_lstm_masked_inference_keeps_state(rng):
    x = rng.normal(size=(4, 5, 2)).astype("float32")
    lengths = np.array([5, 2, 3, 1])
    mask = np.arange(5)[None, :] < lengths[:, None]
    layer = BatchNormLSTM(3, max_timesteps=5, return_sequences=True)
    w, population = _randomize_lstm(layer, x.shape, rng)
    y = as64(layer(x, mask=mask))
    expected, _, _, _ = reference.reference_bn_lstm(
        x, w, False, mask=mask, population=population, max_timesteps=5
    )
    np.testing.assert_allclose(y, expected, **F32_RECURRENT)
    # The last output of each sequence is that of its last real timestep.
    final = y[np.arange(4), -1]
    np.testing.assert_allclose(
        final, expected[np.arange(4), lengths - 1], **F32_RECURRENT
    )


def test_bn_lstm_go_backwards_is_forward_on_the_reversed_sequence(rng):
    x = rng.normal(size=(4, 5, 2)).astype("float32")
    backward = BatchNormLSTM(3, 5, go_backwards=True, return_sequences=True)
    forward = BatchNormLSTM(3, 5, return_sequences=True)
    backward.build(x.shape)
    forward.build(x.shape)
    _randomize_lstm(backward, x.shape, rng)
    forward.set_weights(backward.get_weights())
    for training in (False, True):
        np.testing.assert_allclose(
            as64(backward(x, training=training)),
            as64(forward(x[:, ::-1], training=training)),
            **F32_RECURRENT,
        )


def test_bn_lstm_initial_state_and_return_state(rng):
    # With T_max = 1 every timestep has the same statistics, so a sequence
    # run in two halves, the second from the first's state, is the whole run.
    x = rng.normal(size=(3, 4, 2)).astype("float32")
    layer = BatchNormLSTM(3, 1, return_state=True)
    _randomize_lstm(layer, x.shape, rng)
    output, h_full, c_full = layer(x)
    _, h_half, c_half = layer(x[:, :2])
    _, h_rest, c_rest = layer(x[:, 2:], initial_state=[h_half, c_half])
    np.testing.assert_allclose(as64(h_rest), as64(h_full), **F32_RECURRENT)
    np.testing.assert_allclose(as64(c_rest), as64(c_full), **F32_RECURRENT)
    np.testing.assert_allclose(as64(output), as64(h_full), **F32_RECURRENT)
    assert tuple(c_full.shape) == (3, 3)


def test_bn_lstm_paper_initialization():
    layer = BatchNormLSTM(3, 4)
    layer.build((None, 4, 2))
    for norm in _norms(layer).values():
        np.testing.assert_allclose(as64(norm.gamma), 0.1)
    assert layer.input_norm.beta is None and layer.recurrent_norm.beta is None
    np.testing.assert_array_equal(as64(layer.cell_norm.beta), 0.0)
    assert layer.input_norm.moving_mean.shape == (4, 12)
    assert layer.recurrent_norm.moving_mean.shape == (4, 12)
    assert layer.cell_norm.moving_mean.shape == (4, 3)
    # Keras' unit_forget_bias: the forget gate (second quarter) starts at 1.
    np.testing.assert_array_equal(as64(layer.bias), [0] * 3 + [1] * 3 + [0] * 6)


def test_bn_lstm_nan_leaves_the_statistics_it_reaches(rng):
    layer = BatchNormLSTM(3, 4)
    x = rng.normal(size=(4, 4, 2)).astype("float32")
    layer(x, training=True)
    before = _population(layer)
    # A NaN in the first input of one sequence spoils that sequence's input
    # pre-activation at timestep 0, then its state and cell from timestep 0
    # on: every statistic it reaches stays as it was; the others move.
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    layer(bad, training=True)
    after = _population(layer)
    spoiled = {"input": [0], "recurrent": [1, 2, 3], "cell": [0, 1, 2, 3]}
    for name, steps in spoiled.items():
        for i in range(2):
            assert np.isfinite(after[name][i]).all(), name
            np.testing.assert_array_equal(
                after[name][i][steps], before[name][i][steps], err_msg=name
            )
    # The input pre-activations of timesteps 1 to 3 are clean.
    for i in range(2):
        assert (after["input"][i][1:] != before["input"][i][1:]).all()


def test_bn_lstm_batch_of_one_raises(rng):
    layer = BatchNormLSTM(3, 4)
    with pytest.raises(ValueError, match="single value per feature"):
        layer(rng.normal(size=(1, 4, 2)).astype("float32"), training=True)


def _sequence_model(steps=5, features=2):
    inputs = keras.Input((steps, features))
    hidden = keras.layers.Masking(mask_value=0.0)(inputs)
    # Debiased: after a few steps the statistics are already an average.
    hidden = BatchNormLSTM(4, steps, debias=True, return_sequences=True, name="first")(
        hidden
    )
    hidden = BatchNormLSTM(3, steps, debias=True, name="second")(hidden)
    outputs = keras.layers.Dense(2)(hidden)
    return keras.Model(inputs, outputs)


def test_bn_lstm_stacked_model_trains_and_round_trips(tmp_path, rng):
    x = rng.normal(size=(32, 5, 2)).astype("float32")
    x[::3, 3:] = 0.0
    y = np.stack([x[:, :, 0].sum(1), x[:, :, 1].mean(1)], axis=1)
    model = _sequence_model()
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=15, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0]
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("first"), BatchNormLSTM)
    assert (
        loaded.get_layer("second").get_config()
        == model.get_layer("second").get_config()
    )
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )
    for a, b in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(as64(a), as64(b))


def test_recompute_statistics_sets_each_timestep(rng):
    # One pass over the data: each timestep's statistics become exactly the
    # moments of that timestep's pre-activations over the data.
    x = rng.normal(size=(12, 4, 2)).astype("float32")
    inputs = keras.Input((4, 2))
    lstm = BatchNormLSTM(3, 4, momentum=0.9, name="lstm")
    model = keras.Model(inputs, lstm(inputs))
    model(x[:2])
    w, _ = _randomize_lstm(lstm, x.shape, rng)
    result = bn_keras.recompute_statistics(model, x, batch_size=12, progress=False)
    _, _, _, seen = reference.reference_bn_lstm(x, w, training=True)
    assert set(result) == {"input_norm", "recurrent_norm", "cell_norm"}
    for name, (mean, variance) in seen.items():
        np.testing.assert_allclose(
            as64(_norms(lstm)[name].moving_mean), mean, **F32_RECURRENT, err_msg=name
        )
        np.testing.assert_allclose(
            as64(_norms(lstm)[name].moving_variance),
            variance,
            **F32_RECURRENT,
            err_msg=name,
        )
    # The recompute changed only statistics: momentum is back.
    assert lstm.recurrent_norm.momentum == 0.9
    np.testing.assert_allclose(as64(lstm.kernel), w["kernel"], **F32_RECURRENT)


def test_bn_lstm_bad_arguments():
    with pytest.raises(ValueError, match="units"):
        BatchNormLSTM(0, 3)
    with pytest.raises(ValueError, match="max_timesteps"):
        BatchNormLSTM(3, None)
    with pytest.raises(ValueError, match="momentum"):
        BatchNormLSTM(3, 4, momentum=-1)
    with pytest.raises(ValueError, match="initial_state"):
        BatchNormLSTM(3, 4)(np.zeros((2, 3, 2), "float32"), initial_state=[None])


def test_exported_from_the_package():
    assert bn_keras.BatchNormLSTM is BatchNormLSTM
    assert "TimestepBatchNorm" in bn_keras.__all__


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_bn_lstm_empty_sequence_raises(training, return_sequences):
    # Keras' LSTM fails on a length-0 sequence on every backend; so does this
    # one, with the same clear error on each (before: torch failed, TF and JAX
    # returned an empty sequence or the initial state).
    layer = BatchNormLSTM(3, 4, return_sequences=return_sequences)
    with pytest.raises(ValueError, match=r"at least one timestep.*\(2, 0, 5\)"):
        layer(np.zeros((2, 0, 5), "float32"), training=training)


def test_bn_lstm_empty_batch_raises_in_training():
    with pytest.raises(ValueError, match=r"empty batch \(input shape \(0, 3, 5\)"):
        BatchNormLSTM(3, 4)(np.zeros((0, 3, 5), "float32"), training=True)


def _states(*shapes):
    return [np.zeros(shape, "float32") for shape in shapes]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(
    "initial_state, received",
    [
        (_states((2, 4), (2, 4)), r"\[\(2, 4\), \(2, 4\)\]"),
        (_states((2, 3), (2, 4)), r"\[\(2, 3\), \(2, 4\)\]"),
        (_states((5, 3), (5, 3)), r"\[\(5, 3\), \(5, 3\)\]"),
        (_states((2, 1, 3), (2, 1, 3)), r"\[\(2, 1, 3\), \(2, 1, 3\)\]"),
        (_states((2, 3)), r"\[\(2, 3\)\]"),
        (_states((2, 3), (2, 3), (2, 3)), r"\[\(2, 3\), \(2, 3\), \(2, 3\)\]"),
        (np.zeros((2, 3), "float32"), r"of shape \(2, 3\), not a list"),
    ],
)
def test_bn_lstm_bad_initial_state_names_it(initial_state, received, training):
    # Before: a matmul or dot_general shape error, or (torch, a bare tensor)
    # a silently broadcast state.
    layer = BatchNormLSTM(3, 4)
    x = np.zeros((2, 4, 5), "float32")
    match = r"`initial_state` .* shape \(batch, units\) = \(2, 3\)\. Received: .*"
    with pytest.raises(ValueError, match=match + received):
        layer(x, initial_state=initial_state, training=training)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function with None dims.")
def test_bn_lstm_initial_state_of_another_batch_size_in_a_graph():
    # The batch sizes are known only when the step runs: an assertion.
    import tensorflow as tf

    layer = BatchNormLSTM(3, 4)
    layer.build((None, None, 5))
    signature = [tf.TensorSpec((None, 4, 5)), tf.TensorSpec((None, 3))]
    run = tf.function(
        lambda x, s: layer(x, initial_state=[s, s]), input_signature=signature
    )
    run(np.zeros((2, 4, 5), "float32"), np.zeros((2, 3), "float32"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="initial_state"):
        run(np.zeros((2, 4, 5), "float32"), np.zeros((3, 3), "float32"))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(3, 4), (2, 5), (2, 4, 5), (2,)])
def test_bn_lstm_mask_of_the_wrong_shape_names_it(shape, training):
    # Before: broadcast errors from the input normalization that never
    # mention the mask, or its last axis taken for the features.
    layer = BatchNormLSTM(3, 4)
    x = np.zeros((2, 4, 5), "float32")
    match = r"mask must have the shape \(batch, time\) of its inputs, \(2, 4\)"
    with pytest.raises(ValueError, match=match):
        layer(x, mask=np.ones(shape, bool), training=training)


@pytest.mark.parametrize("training", [False, True])
def test_bn_lstm_wrong_feature_size_on_a_later_call(training):
    # Before: a matmul shape error; now Keras' input check, as its own layers.
    layer = BatchNormLSTM(3, 4)
    layer(np.zeros((2, 4, 5), "float32"))
    with pytest.raises(
        ValueError, match="expected axis -1 of input shape to have value 5"
    ):
        layer(np.zeros((2, 4, 6), "float32"), training=training)
    with pytest.raises(ValueError, match="expected ndim=3"):
        layer(np.zeros((2, 4), "float32"), training=training)


def _twin_lstms(rng, input_shape, **kwargs):
    """Two `BatchNormLSTM`s with the same random weights and statistics."""
    layer = BatchNormLSTM(4, max_timesteps=4, momentum=0.5, **kwargs)
    _randomize_lstm(layer, input_shape, rng)
    twin = BatchNormLSTM(4, max_timesteps=4, momentum=0.5, **kwargs)
    twin.build(input_shape)
    twin.set_weights(layer.get_weights())
    return layer, twin


@pytest.mark.parametrize("statistics", ["update", "batch"])
def test_bn_lstm_unmasked_training_takes_the_backend_recurrence(
    statistics, rng, monkeypatch
):
    # Without a mask the training recurrence is the backend's own
    # (`_unmasked_train_recurrence`, see benchmarks/bench_recurrent.py): a
    # change that sent it back to the general path would be slow, not wrong.
    def general_path(*args, **kwargs):
        raise AssertionError("the unmasked training call took the general path")

    layer = BatchNormLSTM(4, max_timesteps=4, statistics=statistics)
    x = rng.normal(size=(6, 5, 3)).astype("float32")
    layer(x)
    monkeypatch.setattr(layer, "_train_recurrence", general_path)
    layer(x, training=True)
    with pytest.raises(AssertionError, match="general path"):
        layer(x, training=True, mask=np.ones((6, 5), bool))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"return_sequences": True},
        {"return_sequences": False, "go_backwards": True},
    ],
)
def test_bn_lstm_unmasked_recurrence_equals_the_general_one(
    kwargs, rng, call_with_gradients
):
    # An all-True mask takes the general path (the input normalization by
    # `input_norm`, the recurrence by `_train_recurrence`): outputs, every
    # gradient and the statistics must not tell them apart.
    x = rng.normal(size=(6, 5, 3)).astype("float32")
    upstream = rng.normal(size=(6, 5, 4) if kwargs["return_sequences"] else (6, 4))
    layer, general = _twin_lstms(rng, x.shape, **kwargs)
    y, dx, grads = call_with_gradients(layer, x, upstream)
    y_general, dx_general, grads_general = call_with_gradients(
        general, x, upstream, mask=np.ones((6, 5), bool)
    )
    np.testing.assert_allclose(y, y_general, **F32_RECURRENT)
    scale = np.abs(dx_general).max()
    np.testing.assert_allclose(dx / scale, dx_general / scale, **F32_RECURRENT)
    assert set(grads) == set(grads_general)
    for name, grad in grads.items():
        scale = np.abs(grads_general[name]).max()
        np.testing.assert_allclose(
            grad / scale, grads_general[name] / scale, **F32_RECURRENT, err_msg=name
        )
    for a, b in zip(
        layer.non_trainable_variables, general.non_trainable_variables, strict=True
    ):
        np.testing.assert_allclose(as64(a), as64(b), rtol=1e-5, atol=1e-5)


def test_bn_lstm_unmasked_training_inputs_of_a_large_mean(rng):
    # Inputs of mean 1e3 and spread 1: the input pre-activations are
    # normalized from inputs shifted by a sequence, as accurate as for
    # centred inputs (in float32, `x @ W_x` itself would be off by about
    # 1e-4, as the general path's is).
    x = (1e3 + rng.normal(size=(6, 5, 3))).astype("float32")
    layer = BatchNormLSTM(4, max_timesteps=4, momentum=0.5, return_sequences=True)
    w, population = _randomize_lstm(layer, x.shape, rng)
    y = as64(layer(x, training=True))
    expected, _, _, seen = reference.reference_bn_lstm(x, w, training=True)
    np.testing.assert_allclose(y, expected, **F32_RECURRENT)
    mean, _ = seen["input"]
    moving_mean, _ = population["input"]
    np.testing.assert_allclose(
        as64(layer.input_norm.moving_mean),
        0.5 * moving_mean + 0.5 * mean[:4],
        rtol=1e-6,
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function with None dims.")
def test_bn_lstm_unmasked_training_in_a_graph_of_unknown_sizes(rng):
    import tensorflow as tf

    x = rng.normal(size=(6, 5, 3)).astype("float32")
    layer, twin = _twin_lstms(rng, x.shape, return_sequences=True)
    run = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec((None, None, 3))],
    )
    np.testing.assert_allclose(
        as64(run(x)), as64(twin(x, training=True)), **F32_RECURRENT
    )
    for a, b in zip(
        layer.non_trainable_variables, twin.non_trainable_variables, strict=True
    ):
        np.testing.assert_allclose(as64(a), as64(b), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA through tf.function.")
@pytest.mark.parametrize("return_sequences", [False, True])
def test_bn_lstm_unmasked_training_compiles_with_xla(return_sequences, rng):
    # Keras compiles with XLA where a GPU is (`jit_compile="auto"`); the
    # recurrence's loop must carry no list it leaves unwritten, which XLA
    # cannot differentiate (before: "TensorList input for ZerosLike op is an
    # uninitialized list").
    import tensorflow as tf

    x = rng.normal(size=(6, 5, 3)).astype("float32")
    layer, twin = _twin_lstms(rng, x.shape, return_sequences=return_sequences)
    upstream = rng.normal(size=(6, 5, 4) if return_sequences else (6, 4))

    def run(layer, x):
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * upstream)
        return y, tape.gradient(loss, layer.trainable_variables)

    y, grads = tf.function(lambda x: run(layer, x), jit_compile=True)(x)
    y_eager, grads_eager = run(twin, x)
    np.testing.assert_allclose(as64(y), as64(y_eager), **F32_RECURRENT)
    for grad, grad_eager in zip(grads, grads_eager, strict=True):
        scale = np.abs(as64(grad_eager)).max()
        np.testing.assert_allclose(
            as64(grad) / scale, as64(grad_eager) / scale, **F32_RECURRENT
        )
    for a, b in zip(
        layer.non_trainable_variables, twin.non_trainable_variables, strict=True
    ):
        np.testing.assert_allclose(as64(a), as64(b), rtol=1e-5, atol=1e-5)
