"""Tests for experiments/common/mlp: the Figure-1 networks, their SGD
training and evaluation, on the mnist_mlp smoke config."""

import keras
import numpy as np
import pytest

import bn_keras
from experiments.common.config import ConfigError, load_config
from experiments.common.data import load_for_config
from experiments.common.metrics import (
    ACCURACY_CURVES,
    BATCH_STATS,
    BN,
    PLAIN,
    POPULATION,
    STATISTICS,
)
from experiments.common.mlp.config import BN_IMPLS, BN_KERAS, KERAS, MLP_DEFAULTS
from experiments.common.mlp.evaluate import (
    Evaluator,
    forward,
    normalize_with_batch_stats,
)
from experiments.common.mlp.models import batch_norm_factory, build_networks
from experiments.common.mlp.train import Trainer, batch_indices, train_and_evaluate
from tests.experiments.helpers import requires_tensorflow, schema, smoke_config

pytestmark = requires_tensorflow


def test_networks_start_from_the_same_draw():
    networks = build_networks(smoke_config("mnist_mlp"))
    plain = [w for w in networks.plain.weights if "kernel" in w.path]
    bn = [w for w in networks.bn.weights if "kernel" in w.path]
    assert len(plain) == len(bn) == 3
    for a, b in zip(plain, bn, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # N(0, 1), unscaled.
    assert abs(np.std(plain[0].numpy()) - 1.0) < 0.05
    other = build_networks(smoke_config("mnist_mlp", "seed=5"))
    assert not np.array_equal(other.plain.weights[0].numpy(), plain[0].numpy())


def test_batch_indices_are_reshuffled_epochs():
    indices = batch_indices(120, 30, 10, seed=3)
    assert indices.shape == (10, 30) and indices.dtype == np.int32
    epochs = indices.reshape(-1)[:240].reshape(2, 120)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(120))
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(indices, batch_indices(120, 30, 10, seed=3))


def test_fast_and_simple_loops_take_the_same_steps():
    """The weights and losses after 20 steps of each loop: a tighter
    comparison than the end-to-end curves of `loop=simple` (test_mnist_mlp.py)."""
    config = smoke_config("mnist_mlp")
    data = load_for_config(config)
    indices = batch_indices(len(data.x_train), 60, 20, seed=0)
    weights = []
    for loop in ("fast", "simple"):
        networks = build_networks(config)
        trainer = Trainer(networks, data.x_train, data.y_train, indices, 0.01, loop)
        losses = trainer.train(0, 20)
        weights.append(([w.numpy() for w in networks.bn.weights], losses))
    (fast, fast_loss), (simple, simple_loss) = weights
    np.testing.assert_allclose(fast_loss, simple_loss, rtol=1e-4)
    for a, b in zip(fast, simple, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_normalize_with_batch_stats_matches_keras_training_mode(rng):
    layer = keras.layers.BatchNormalization()
    x = rng.normal(2.0, 3.0, size=(32, 6)).astype("float32")
    layer.build(x.shape)
    layer.gamma.assign(rng.normal(size=6).astype("float32"))
    layer.beta.assign(rng.normal(size=6).astype("float32"))
    expected, _ = layer.stateless_call(
        layer.trainable_variables, layer.non_trainable_variables, x, training=True
    )
    np.testing.assert_allclose(
        normalize_with_batch_stats(layer, x), expected, rtol=1e-5, atol=1e-5
    )
    # A batch of one is normalized to zero: the output is beta, whatever x is.
    np.testing.assert_array_equal(
        normalize_with_batch_stats(layer, x[:1]), layer.beta.numpy()[None]
    )


def test_forward_modes_share_the_prefix_and_differ_after_bn(rng):
    networks = build_networks(smoke_config("mnist_mlp"))
    x = rng.random((50, 784)).astype("float32")
    outputs = forward(networks.bn, x, modes=(POPULATION, BATCH_STATS))
    np.testing.assert_allclose(
        outputs[POPULATION][0], networks.bn(x, training=False), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(outputs[POPULATION][0], outputs[BATCH_STATS][0])


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_evaluator_without_neurons_gives_the_accuracy_alone(rng, shared):
    """`neurons` is optional (the learning-rate sweep records none): the same
    accuracies as with neurons, and no activations."""
    networks = build_networks(smoke_config("mnist_mlp"))
    x = rng.random((60, 784)).astype("float32")
    y = rng.integers(0, 10, 60).astype("int32")
    alone = Evaluator(networks, x, y, shared=shared)()
    assert set(alone) == {"accuracy", "activations"}
    assert alone["activations"] == {}
    assert tuple(alone["accuracy"]) == ACCURACY_CURVES
    with_neurons = Evaluator(networks, x, y, [0, 3], shared=shared)()
    assert alone["accuracy"] == with_neurons["accuracy"]
    for name in (PLAIN, BN):
        assert with_neurons["activations"][name].shape == (2, len(STATISTICS))
    # The plain curve is the plain network's accuracy at inference.
    logits = networks.plain.predict(x, verbose=0)
    expected = float(np.mean(np.argmax(logits, axis=-1) == y))
    assert alone["accuracy"][PLAIN] == expected


def test_batch_norm_factory_makes_the_layer_of_each_impl():
    assert BN_IMPLS == (BN_KERAS, KERAS) == ("bn_keras", "keras")
    ours = batch_norm_factory(BN_KERAS, 0.9, 1e-4, debias=True)("bn_1")
    assert type(ours) is bn_keras.BatchNorm and ours.name == "bn_1"
    assert (ours.momentum, ours.epsilon, ours.debias) == (0.9, 1e-4, True)
    # No momentum: the cumulative average (the population study's estimator).
    cumulative = batch_norm_factory(BN_KERAS, momentum=None, epsilon=1e-4)("b")
    assert cumulative.momentum is None
    theirs = batch_norm_factory(KERAS, 0.9, 1e-4)("bn_2")
    assert type(theirs) is keras.layers.BatchNormalization and theirs.name == "bn_2"
    assert (theirs.momentum, theirs.epsilon) == (0.9, 1e-4)


def test_keras_layer_with_bn_keras_options_is_an_error():
    with pytest.raises(ValueError) as info:
        batch_norm_factory(KERAS, 0.9, 1e-3, debias=True)
    assert str(info.value) == (
        "keras.layers.BatchNormalization has no options ['debias']; "
        "use bn_impl='bn_keras'"
    )
    with pytest.raises(ValueError, match=r"no options \['debias', 'renorm'\]"):
        batch_norm_factory(KERAS, 0.9, 1e-3, renorm=True, debias=True)


def test_train_and_evaluate_records_every_evaluation():
    config = smoke_config("mnist_mlp", "steps=100")
    data = load_for_config(config)
    networks = build_networks(config)
    calls = []

    def evaluate():
        calls.append(1)
        return {"accuracy": {"plain": 0.5, "bn_population": 0.25}}

    reports = []
    records = train_and_evaluate(
        networks,
        data,
        config,
        evaluate,
        progress=False,
        report=lambda step, steps: reports.append((step, steps)),
    )
    assert [r["step"] for r in records] == [0, 50, 100]
    assert len(calls) == 3
    assert reports == [(0, 100), (50, 100), (100, 100)]
    assert all(np.isfinite(r["train_loss"]).all() for r in records[1:])


def test_the_experiments_that_train_it_share_its_keys():
    for name, replaced in (
        ("mnist_mlp", set()),
        ("population_study", {"steps"}),
        ("lr_sweep", {"steps", "learning_rate", "eval_every"}),
    ):
        defaults = schema(name).defaults
        for key, value in MLP_DEFAULTS.items():
            if key not in replaced:
                assert defaults[key] == value, (name, key)


# The keys an experiment has only where it uses them: which BN layer, the
# recorded neurons, the evaluation's speed baseline; a value of each.
KEYS_WHERE_USED = {
    "mnist_mlp": {"bn_impl", "neurons", "evaluation"},
    "lr_sweep": {"bn_impl"},
    "population_study": set(),
}
VALUES = {"bn_impl": '"keras"', "neurons": "[0]", "evaluation": '"separate"'}


@pytest.mark.parametrize("name", list(KEYS_WHERE_USED))
def test_keys_only_where_used(name):
    """The population study always uses bn_keras (its estimators are
    bn_keras.BatchNorm options) and records no neurons; the sweep records no
    neurons; only mnist_mlp has the separate evaluation. Elsewhere each is an
    unknown key."""
    config_schema = schema(name)
    assert not VALUES.keys() & MLP_DEFAULTS.keys()
    has = KEYS_WHERE_USED[name]
    assert VALUES.keys() & config_schema.defaults.keys() == has
    if "bn_impl" in has:
        assert config_schema.defaults["bn_impl"] == BN_KERAS
        assert config_schema.choices["bn_impl"] == BN_IMPLS
    for key, value in VALUES.items():
        override = f"{key}={value}"
        if key in has:
            assert (
                load_config(config_schema, overrides=[override])[key]
                != (config_schema.defaults[key])
            )
        else:
            with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
                load_config(config_schema, overrides=[override])
