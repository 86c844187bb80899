"""BatchNorm inside models: fit/evaluate/predict, freezing, saving."""

import inspect
import json
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

import bn_keras
from bn_keras import BatchNorm
from tests import reference
from tests.bn_keras.helpers import F32, as64, tensorflow_only

TF_ONLY = tensorflow_only("SavedModel export needs TensorFlow.")
BATCH = 16


def _regression_data(rng, n=64, features=4):
    x = rng.normal(3.0, 2.0, (n, features)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return x, y


class Regressor(keras.Model):
    def __init__(self, **kwargs):
        super().__init__()
        self.norm = BatchNorm(**kwargs)
        self.head = keras.layers.Dense(1)

    def call(self, inputs, training=None):
        return self.head(self.norm(inputs, training=training))


def _sequential(**kwargs):
    norm = BatchNorm(**kwargs)
    return keras.Sequential([keras.Input((4,)), norm, keras.layers.Dense(1)]), norm


def _functional(**kwargs):
    inputs = keras.Input((4,))
    norm = BatchNorm(**kwargs)
    return keras.Model(inputs, keras.layers.Dense(1)(norm(inputs))), norm


def _subclassed(**kwargs):
    model = Regressor(**kwargs)
    model(np.zeros((2, 4), "float32"))
    return model, model.norm


BUILDERS = {
    "sequential": _sequential,
    "functional": _functional,
    "subclassed": _subclassed,
}


def _expected_statistics(batches, kwargs):
    """moving_mean and moving_variance after training on `batches` in order.

    The layer sits first in the model, so its inputs do not depend on the
    training: the reference needs only the batches.
    """
    momentum = kwargs.get("momentum", 0.99)
    ghosts = kwargs.get("virtual_batch_size")
    if kwargs.get("renorm"):
        shape = batches[0].shape[-1:]
        state = {
            "moving_mean": np.zeros(shape),
            "moving_stddev": np.ones(shape),
            "renorm_mean": np.zeros(shape),
            "renorm_stddev": np.ones(shape),
        }
        for x in batches:
            _, state = reference.renorm_train_step(
                x, state, None, None, 1e-3, -1, momentum, 0.99
            )
        return state["moving_mean"], state["moving_variance"]
    population = reference.PopulationStatistics(
        0.0, 1.0, momentum, kwargs.get("debias", False)
    )
    for x in batches:
        if ghosts:
            _, mean, variance = reference.ghost_batch_transform(
                x, ghosts, None, None, 1e-3, -1
            )
            count = ghosts
        else:
            mean, variance, count = reference.moments(x, -1)
        if kwargs.get("unbiased_variance"):
            variance = reference.unbiased(variance, count)
        population.update(mean, variance)
    return population.mean, population.variance


def _fit_evaluate_predict(model, norm, x, y, kwargs):
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    batches = [x[i : i + BATCH] for i in range(0, len(x), BATCH)] * 2
    mean, variance = _expected_statistics(batches, kwargs)
    np.testing.assert_allclose(as64(norm.moving_mean), mean, **F32)
    np.testing.assert_allclose(as64(norm.moving_variance), variance, **F32)

    trained = [ops.convert_to_numpy(v) for v in norm.non_trainable_weights]
    model.evaluate(x, y, batch_size=BATCH, verbose=0)
    predictions = model.predict(x, batch_size=BATCH, verbose=0)
    for before, variable in zip(trained, norm.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), before)

    gamma = as64(norm.gamma) if norm.scale else None
    beta = as64(norm.beta) if norm.center else None
    normalized = reference.normalize(x, mean, variance, gamma, beta, 1e-3, -1)
    kernel, bias = (as64(w) for w in model.layers[-1].weights)
    np.testing.assert_allclose(predictions, normalized @ kernel + bias, **F32)


@pytest.mark.parametrize("builder", BUILDERS)
def test_fit_evaluate_predict(builder, rng):
    x, y = _regression_data(rng)
    kwargs = {"momentum": 0.8}
    model, norm = BUILDERS[builder](**kwargs)
    _fit_evaluate_predict(model, norm, x, y, kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"momentum": None},
        {"momentum": 0.9, "debias": True},
        {"momentum": 0.8, "unbiased_variance": True},
        {"momentum": 0.8, "virtual_batch_size": 4},
        {"momentum": 0.8, "renorm": True, "renorm_clipping": {"rmax": 2.0}},
        {"momentum": 0.8, "center": False, "scale": False},
    ],
    ids=str,
)
def test_fit_with_options(kwargs, rng):
    x, y = _regression_data(rng)
    model, norm = _functional(**kwargs)
    _fit_evaluate_predict(model, norm, x, y, kwargs)
    if "num_batches" in [v.name for v in norm.weights]:
        assert int(ops.convert_to_numpy(norm.num_batches)) == 2 * len(x) // BATCH


@pytest.mark.parametrize("builder", BUILDERS)
def test_trainable_false_is_inference_inside_fit(builder, rng):
    x, y = _regression_data(rng)
    model, norm = BUILDERS[builder](momentum=0.5)
    norm.moving_mean.assign(np.arange(1.0, 5.0).astype("float32"))
    norm.moving_variance.assign(np.arange(4.0, 0.0, -1.0).astype("float32"))
    norm.trainable = False
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [ops.convert_to_numpy(v) for v in norm.weights]
    head = ops.convert_to_numpy(model.layers[-1].kernel)
    # One batch: fit reports the loss of the forward pass before its update.
    loss = model.evaluate(x, y, batch_size=len(x), verbose=0)
    history = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], loss, rtol=1e-5)
    for value, variable in zip(before, norm.weights, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), value)
    assert not np.allclose(ops.convert_to_numpy(model.layers[-1].kernel), head)
    mean, variance = np.arange(1.0, 5.0), np.arange(4.0, 0.0, -1.0)
    expected = reference.normalize(x, mean, variance, None, None, 1e-3, -1)
    np.testing.assert_allclose(as64(norm(x, training=True)), expected, **F32)


def test_mixed_precision_model_fits(rng):
    keras.config.set_dtype_policy("mixed_float16")
    norm = BatchNorm()
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            norm,
            keras.layers.Dense(1, dtype="float32"),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    x, y = _regression_data(rng)
    x = x * 100.0
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert [v.dtype for v in norm.weights] == ["float32"] * 4
    assert np.isfinite(as64(norm.moving_variance)).all()
    outputs = norm(np.ones((2, 8), "float32"), training=True)
    assert keras.backend.standardize_dtype(outputs.dtype) == "float16"


def test_registered_name():
    assert keras.saving.get_registered_name(BatchNorm) == "bn_keras>BatchNorm"
    assert keras.saving.get_registered_object("bn_keras>BatchNorm") is BatchNorm
    assert bn_keras.BatchNorm is BatchNorm


FULL_OPTIONS = {
    "axis": (1, 2),
    "momentum": None,
    "epsilon": 0.01,
    "center": False,
    "scale": True,
    "beta_initializer": "ones",
    "gamma_initializer": keras.initializers.Constant(1.5),
    "moving_mean_initializer": "ones",
    "moving_variance_initializer": keras.initializers.Constant(2.0),
    "beta_regularizer": "l1",
    "gamma_regularizer": keras.regularizers.L2(0.01),
    "beta_constraint": "non_neg",
    "gamma_constraint": keras.constraints.MaxNorm(2.0),
    "renorm": True,
    "renorm_clipping": {"rmax": 3.0, "rmin": 0.5, "dmax": 1.0},
    "renorm_momentum": 0.9,
    "synchronized": True,
    "debias": False,
    "unbiased_variance": True,
    "virtual_batch_size": 4,
    "name": "norm",
    "trainable": False,
}


def test_get_config_holds_every_argument():
    config = BatchNorm(**FULL_OPTIONS).get_config()
    for name in inspect.signature(BatchNorm).parameters:
        assert name == "kwargs" or name in config, name
    for name in (
        "axis",
        "momentum",
        "epsilon",
        "renorm_clipping",
        "virtual_batch_size",
    ):
        assert config[name] == FULL_OPTIONS[name], name
    assert config["trainable"] is False
    assert config["gamma_regularizer"]["config"]["l2"] == pytest.approx(0.01)


def test_config_round_trip():
    layer = BatchNorm(**FULL_OPTIONS)
    config = layer.get_config()
    clone = BatchNorm.from_config(config)
    assert clone.get_config() == config
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(restored, BatchNorm)
    assert restored.get_config() == config
    json.dumps(config)  # Plain data: a .keras file can hold it.


def test_from_keras_batch_normalization_config():
    theirs = keras.layers.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-5)
    ours = BatchNorm.from_config(theirs.get_config())
    for key, value in theirs.get_config().items():
        assert ours.get_config()[key] == value, key


def _saveable_model():
    inputs = keras.Input((6, 4))
    hidden = BatchNorm(
        axis=1,
        momentum=None,
        unbiased_variance=True,
        virtual_batch_size=2,
        epsilon=1e-2,
        gamma_regularizer="l2",
        beta_constraint="non_neg",
    )(inputs)
    hidden = keras.layers.Dense(3)(hidden)
    hidden = BatchNorm(
        axis=(1, 2),
        renorm=True,
        renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
        renorm_momentum=0.9,
    )(hidden)
    hidden = BatchNorm(momentum=0.9, debias=True)(hidden)
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse")
    return model


def test_keras_file_round_trip(tmp_path, rng):
    x = rng.normal(2.0, 3.0, (16, 6, 4)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    model = _saveable_model()
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)

    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    for a, b in zip(model.layers, loaded.layers, strict=True):
        assert type(a) is type(b)
        if isinstance(a, BatchNorm):
            assert a.get_config() == b.get_config()
            names = [v.name for v in a.weights]
            assert names == [v.name for v in b.weights]
            for v, w in zip(a.weights, b.weights, strict=True):
                np.testing.assert_array_equal(
                    ops.convert_to_numpy(v), ops.convert_to_numpy(w), err_msg=v.name
                )
    # The counters came back too: the next training step is the same.
    x_next = x[:4]
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(x_next, training=True)),
        ops.convert_to_numpy(model(x_next, training=True)),
        **F32,
    )
    for a, b in zip(
        model.non_trainable_weights, loaded.non_trainable_weights, strict=True
    ):
        np.testing.assert_allclose(as64(a), as64(b), **F32)


@TF_ONLY
def test_export_serves_inference_outputs(tmp_path, rng):
    import tensorflow as tf

    x = rng.normal(2.0, 3.0, (16, 4)).astype("float32")
    model, norm = _functional(axis=-1, momentum=0.0)
    model(x, training=True)
    model.export(str(tmp_path / "exported"), verbose=False)
    # Keep the loaded object alive: its functions reference its variables.
    loaded = tf.saved_model.load(str(tmp_path / "exported"))
    served = loaded.serve(x).numpy()
    np.testing.assert_allclose(
        served, ops.convert_to_numpy(model(x, training=False)), **F32
    )
    # Inference with the population statistics (here those of x), not x's batch
    # statistics: single examples come out as inside the batch.
    single = loaded.serve(x[:1]).numpy()
    np.testing.assert_allclose(single[0], served[0], **F32)


def _edited_keras_file(tmp_path, **changes):
    """A saved model whose BatchNorm config holds `changes`, as a hand edit would."""
    model = keras.Sequential([keras.Input((4,)), BatchNorm(name="bn")])
    path = tmp_path / "model.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    config["config"]["layers"][1]["config"].update(changes)
    files["config.json"] = json.dumps(config).encode()
    edited = tmp_path / "edited.keras"
    with zipfile.ZipFile(edited, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return edited


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"momentum": 7.0}, "Received: momentum=7.0"),
        ({"epsilon": -1.0}, "Received: epsilon=-1.0"),
        ({"bogus": 1}, "{'bogus': 1}"),
    ],
)
def test_a_bad_config_says_why_first(tmp_path, changes, reason):
    # Keras' own from_config ends in a 2-6k-character "could not be
    # deserialized" TypeError with the reason last; ours is one line.
    config = {**BatchNorm(name="bn").get_config(), **changes}
    serialized = keras.saving.serialize_keras_object(BatchNorm(name="bn"))
    edited = _edited_keras_file(tmp_path, **changes)
    for load in (
        lambda: BatchNorm.from_config(config),
        lambda: keras.layers.deserialize({**serialized, "config": config}),
        lambda: keras.saving.load_model(edited),
    ):
        with pytest.raises(ValueError) as info:
            load()
        message = str(info.value)
        assert message.startswith("Cannot create BatchNorm layer 'bn' from its config")
        assert reason in message
        assert "\n" not in message and len(message) < 300
