"""Tests for experiments/common/mlp: the Figure-1 networks, their SGD
training and evaluation, on the mnist_mlp smoke config."""

import keras
import numpy as np

from experiments.common.metrics import BATCH_STATS, POPULATION
from experiments.common.mlp.evaluate import (
    forward,
    normalize_with_batch_stats,
    single_example_check,
)
from experiments.common.mlp.models import build_networks
from experiments.common.mlp.train import Trainer, batch_indices, train_and_evaluate
from tests.experiments.helpers import load_data, smoke_config, tensorflow_only

pytestmark = tensorflow_only


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
    """Per-step comparison of the weights, tighter than the curves above."""
    config = smoke_config("mnist_mlp")
    data = load_data(config)
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


def test_single_example_check_on_an_untrained_network(rng):
    networks = build_networks(smoke_config("mnist_mlp"))
    x = rng.random((40, 784)).astype("float32")
    y = rng.integers(0, 10, 40).astype("int32")
    result = single_example_check(networks.bn, x, y, first=10)
    assert result["batch_stats"]["majority_class_fraction"] == 1.0
    assert result["population"]["agreement_with_batched"] == 1.0
    assert 0.0 <= result["population"]["accuracy_first_10"] <= 1.0


def test_train_and_evaluate_records_every_evaluation():
    config = smoke_config("mnist_mlp", "steps=100")
    data = load_data(config)
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
    from experiments.common.mlp.config import MLP_DEFAULTS
    from tests.experiments.helpers import schema

    for name, replaced in (
        ("mnist_mlp", set()),
        ("population_study", {"steps"}),
        ("lr_sweep", {"steps", "learning_rate", "eval_every"}),
    ):
        defaults = schema(name).defaults
        for key, value in MLP_DEFAULTS.items():
            if key not in replaced:
                assert defaults[key] == value, (name, key)
