"""Figure 1 over several seeds (experiments/mnist_mlp/stacked.py): the run's
stacked path, `train.train_stacked`, against its reference path,
`train.train_each_seed` (the per-network Keras models, one seed after
the other, which the population study and the learning-rate sweep also use).
"""

import keras
import numpy as np
import pytest

from experiments.common.config import ConfigError, load_config
from experiments.common.data import load_for_config
from experiments.common.metrics import BN, PLAIN
from experiments.common.mlp.train import batch_indices
from experiments.common.run import RunDir
from experiments.mnist_mlp import main as mnist_mlp
from experiments.mnist_mlp import stacked
from experiments.mnist_mlp.single_example import single_example_check
from experiments.mnist_mlp.train import train_each_seed, train_stacked
from tests.experiments.helpers import (
    requires_tensorflow,
    schema,
    smoke_config,
    strict_json,
)

pytestmark = requires_tensorflow

MNIST_MLP = schema("mnist_mlp")


def config_of(*overrides):
    return smoke_config("mnist_mlp", "steps=100", *overrides)


@pytest.fixture(scope="module")
def data():
    return load_for_config(config_of())


def train(path, config, data, folder):
    """`path(run_dir, config, data, progress)` into a run folder claimed in
    `folder`: its `train.Trained` (records and single-example check of
    each seed, the first seed's Keras networks, the stacked weights)."""
    run_dir = RunDir.claim("mnist_mlp", folder / "run")
    try:
        return path(run_dir, config, data, progress=False)
    finally:
        run_dir.close()


def curves(records):
    """`{curve: array over evaluations}` of one seed's records."""
    out = {}
    for r in records:
        for curve, value in r["accuracy"].items():
            out.setdefault(f"accuracy {curve}", []).append(value)
        for name, value in r["activations"].items():
            out.setdefault(f"activations {name}", []).append(value)
        out.setdefault("train_loss", []).append(r["train_loss"])
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


@pytest.fixture(scope="module")
def each_seed(data, tmp_path_factory):
    """Seeds 0 and 3 each trained alone on the reference path:
    `{seed: (records, single-example check, Keras networks)}`."""
    references = {}
    for seed in (0, 3):
        config = config_of(f"seed={seed}")
        folder = tmp_path_factory.mktemp(f"seed{seed}")
        (records,), (single,), networks, _ = train(
            train_each_seed, config, data, folder
        )
        references[seed] = records, single, networks
    return references


@pytest.fixture(scope="module")
def two_seeds(data, tmp_path_factory):
    config = config_of("seeds=[0, 3]")
    folder = tmp_path_factory.mktemp("stacked")
    records, singles, first, networks = train(train_stacked, config, data, folder)
    return config, records, singles, first, networks


@pytest.fixture
def no_fused_matmul():
    """Turns off Grappler's remapper while the test runs. On some CPUs (here
    an AMD EPYC with AVX-512) its oneDNN rewrite of the Keras Dense layer's
    MatMul and BiasAdd into one fused kernel rounds the per-network
    evaluation's sigmoid inputs differently in the last bit; the stacked
    path's products are not fused, and both compute as in eager mode."""
    import tensorflow as tf

    before = tf.config.optimizer.get_experimental_options().get("remapping", True)
    tf.config.optimizer.set_experimental_options({"remapping": False})
    yield
    tf.config.optimizer.set_experimental_options({"remapping": before})


def test_one_seed_gives_exactly_the_per_network_numbers(
    data, tmp_path, no_fused_matmul
):
    """Seed 0 alone: the same floats as the per-network loop, bit for bit."""
    config = config_of()
    assert config["seeds"] == [0]
    (got,), _, _, _ = train(train_stacked, config, data, tmp_path / "stacked")
    (expected,), _, _, _ = train(train_each_seed, config, data, tmp_path / "each")
    got, expected = curves(got), curves(expected)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_stacked_seeds_match_each_seed_run_alone(two_seeds, each_seed):
    """Each seed of a stacked run against that seed run alone: the same
    curves up to float rounding (a batched product sums in another order)."""
    _, records, _, _, _ = two_seeds
    assert len(records) == 2
    for index, seed in enumerate((0, 3)):
        got, expected = curves(records[index]), curves(each_seed[seed][0])
        assert got.keys() == expected.keys()
        for key in expected:
            if key.startswith("accuracy"):
                # One test example is 0.002 of the 500: allow a float tie.
                np.testing.assert_allclose(got[key], expected[key], atol=0.0021)
            else:
                np.testing.assert_allclose(
                    got[key], expected[key], rtol=1e-4, atol=1e-4, err_msg=key
                )


def test_seeds_have_their_own_draw_and_mini_batches(two_seeds, data):
    config, records, _, _, networks = two_seeds
    trainer = stacked.StackedTrainer(networks, data.x_train, data.y_train, config)
    for index, seed in enumerate((0, 3)):
        np.testing.assert_array_equal(
            trainer.indices[:, :, index],
            batch_indices(len(data.x_train), 60, config["steps"], seed),
        )
    assert not np.array_equal(trainer.indices[:, :, 0], trainer.indices[:, :, 1])
    first, second = curves(records[0]), curves(records[1])
    assert not np.array_equal(first["activations bn"], second["activations bn"])


def _assert_same_weights(got, expected):
    for name in (PLAIN, BN):
        a, b = getattr(got, name).weights, getattr(expected, name).weights
        assert [w.path for w in a] == [w.path for w in b]
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-4, atol=1e-4)


def test_keras_networks_are_the_seed_networks(two_seeds, each_seed):
    """Seed 3 as Keras models has the weights of seed 3 trained alone; the
    networks `train_stacked` returns (and the run saves) are seed 0's."""
    _, _, _, first, networks = two_seeds
    _assert_same_weights(networks.keras_networks(1), each_seed[3][2])
    _assert_same_weights(first, each_seed[0][2])


def test_saved_seed_network_reloads(two_seeds, data, tmp_path):
    _, _, _, _, networks = two_seeds
    model = networks.keras_networks(1).bn
    path = tmp_path / "bn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.predict(data.x_test, verbose=0), model.predict(data.x_test, verbose=0)
    )


def test_single_example_check_of_every_seed(two_seeds, data):
    _, _, singles, _, networks = two_seeds
    assert singles == stacked.single_example_check_by_seed(
        networks, data.x_test, data.y_test
    )
    assert len(singles) == 2
    for index, result in enumerate(singles):
        model = networks.keras_networks(index).bn
        assert result == single_example_check(model, data.x_test, data.y_test)
        assert result["batch_stats"]["majority_class_fraction"] == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["seeds=[]"], "'seeds' in --set seeds=[] must be a non-empty list"),
        (["seeds=[1, 2, 1]"], "'seeds' lists 1 more than once"),
        (["seeds=[0, -2]"], "'seeds' must hold seeds from 0 to 2**32 - 1"),
        (["seeds=[0, 1.5]"], "must be a non-empty list of integers"),
        (["seeds=0"], "'seeds' in --set seeds=0 must be of type list"),
        # Both given and agreeing: each keeps its value.
        (["seeds=[0, 1]", "seed=0"], None),
    ],
)
def test_bad_seeds_are_one_line_errors(overrides, message):
    if message is None:
        assert load_config(MNIST_MLP, overrides=overrides)["seeds"] == [0, 1]
        return
    with pytest.raises(ConfigError) as info:
        load_config(MNIST_MLP, overrides=overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_seeds_flag(capsys, tmp_path):
    out = tmp_path / "run"
    assert mnist_mlp.main(["--seeds", "0,0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key 'seeds'") and err.count("\n") == 1
    assert not out.exists()


def test_run_over_two_seeds_writes_means_and_each_seed(smoke_run):
    out, metrics = smoke_run("mnist_mlp", "--set", "steps=100", "--seeds", "0,3")
    assert metrics["seeds"] == [0, 3] and metrics["config"]["seed"] == 0
    by_seed = metrics["by_seed"]
    assert [s["seed"] for s in by_seed] == [0, 3]
    for curve, values in metrics["accuracy"].items():
        np.testing.assert_allclose(
            values, np.mean([s["accuracy"][curve] for s in by_seed], axis=0)
        )
    np.testing.assert_allclose(
        metrics["activations"]["bn"],
        np.mean([s["activations"]["bn"] for s in by_seed], axis=0),
    )
    histograms = [
        s["single_example"]["batch_stats"]["predicted_class_histogram"] for s in by_seed
    ]
    assert metrics["single_example"]["batch_stats"]["predicted_class_histogram"] == (
        np.sum(histograms, axis=0).tolist()
    )
    summary = (out / "summary.md").read_text()
    assert "over 2 seeds (0, 3)" in summary and " ± " in summary
    assert strict_json(out / "metrics.json") == metrics
    # The saved networks are the first seed's.
    data = load_for_config(metrics["config"])
    model = keras.saving.load_model(out / "bn.keras")
    accuracy = np.mean(
        np.argmax(model.predict(data.x_test, verbose=0), -1) == data.y_test
    )
    assert accuracy == by_seed[0]["final_accuracy"]["bn_population"]
