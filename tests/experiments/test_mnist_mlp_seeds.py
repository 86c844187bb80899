"""Figure 1 over several seeds: the stacked networks against one-seed runs.

The reference path is the per-network one (`models.build_networks`,
`train.Trainer`, `evaluate.Evaluator`), which the population study and the
learning-rate sweep still use and which a one-seed run used before seeds were
stacked.
"""

import json

import keras
import numpy as np
import pytest

from experiments import mnist_mlp, stacked
from experiments.common.cli import execute
from experiments.common.config import CONFIG_DIR, ConfigError, load_config
from experiments.common.data import load_mnist, select
from experiments.common.mlp.evaluate import Evaluator, single_example_check
from experiments.common.metrics import BN, PLAIN
from experiments.common.mlp.models import build_networks
from experiments.common.mlp.train import batch_indices, run_schedule, train_and_evaluate

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the experiment's training loop is written for TensorFlow",
)

SMOKE = CONFIG_DIR / "smoke.toml"
NAN = float("nan")


def smoke_config(*overrides):
    return load_config(SMOKE, ["steps=100", *overrides])


@pytest.fixture(scope="module")
def data():
    config = smoke_config()
    return select(
        load_mnist("vendored"), config["train_examples"], config["test_examples"]
    )


def reference_run(config, data, seed):
    """One seed through the per-network Keras models (the reference path)."""
    config = {**config, "seed": seed, "seeds": [seed]}
    networks = build_networks(config)
    evaluator = Evaluator(networks, data.x_test, data.y_test, config["neurons"])
    records = train_and_evaluate(networks, data, config, evaluator, progress=False)
    return networks, records


def stacked_run(config, data):
    """All seeds together, each evaluation overlapping the next chunk (the
    default run's path)."""
    networks = stacked.StackedNetworks(config, config["seeds"])
    trainer = stacked.StackedTrainer(networks, data.x_train, data.y_train, config)
    evaluator = stacked.StackedEvaluator(
        networks, data.x_test, data.y_test, config["neurons"], config=config
    )
    k = len(networks)
    try:
        records = run_schedule(
            trainer,
            config,
            evaluator,
            [[NAN] * k] * 2,
            False,
            None,
            "",
            start=evaluator.start,
        )
    finally:
        evaluator.close()
    return networks, records


def curves(records, index=None):
    """`{curve: array over evaluations}`: seed `index`'s of a stacked run, or
    those of a one-seed run (`index=None`)."""

    def pick(value, axis=0):
        value = np.asarray(value, dtype=float)
        return value if index is None else np.take(value, index, axis=axis)

    out = {}
    for r in records:
        for curve, value in r["accuracy"].items():
            out.setdefault(f"accuracy {curve}", []).append(pick(value))
        for name, value in r["activations"].items():
            out.setdefault(f"activations {name}", []).append(pick(value))
        out.setdefault("train_loss", []).append(pick(r["train_loss"], axis=-1))
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def two_seeds(data):
    config = smoke_config("seeds=[0, 3]")
    networks, records = stacked_run(config, data)
    references = {seed: reference_run(config, data, seed) for seed in (0, 3)}
    return config, networks, records, references


def test_one_seed_gives_exactly_the_per_network_numbers(data):
    """Seed 0 alone: the same floats as the per-network loop, bit for bit."""
    config = smoke_config()
    assert config["seeds"] == [0]
    _, got = stacked_run(config, data)
    _, expected = reference_run(config, data, 0)
    got, expected = curves(got, 0), curves(expected)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_stacked_seeds_match_each_seed_run_alone(two_seeds):
    """Each seed of a stacked run against that seed run alone: the same
    curves up to float rounding (a batched product sums in another order)."""
    _, _, records, references = two_seeds
    for index, seed in enumerate((0, 3)):
        got, expected = curves(records, index), curves(references[seed][1])
        for key in expected:
            if key.startswith("accuracy"):
                # One test example is 0.002 of the 500: allow a float tie.
                np.testing.assert_allclose(got[key], expected[key], atol=0.0021)
            else:
                np.testing.assert_allclose(
                    got[key], expected[key], rtol=1e-4, atol=1e-4, err_msg=key
                )


def test_seeds_have_their_own_draw_and_mini_batches(two_seeds, data):
    config, networks, records, _ = two_seeds
    trainer = stacked.StackedTrainer(networks, data.x_train, data.y_train, config)
    for index, seed in enumerate((0, 3)):
        np.testing.assert_array_equal(
            trainer.indices[:, :, index],
            batch_indices(len(data.x_train), 60, config["steps"], seed),
        )
    assert not np.array_equal(trainer.indices[:, :, 0], trainer.indices[:, :, 1])
    first = curves(records, 0)
    second = curves(records, 1)
    assert not np.array_equal(first["activations bn"], second["activations bn"])


def test_keras_networks_are_the_seed_networks(two_seeds):
    """Seed 3 as Keras models has the weights of seed 3 trained alone, and
    survives a .keras round trip."""
    _, networks, _, references = two_seeds
    got = networks.keras_networks(1)
    expected = references[3][0]
    for name in (PLAIN, BN):
        a, b = getattr(got, name).weights, getattr(expected, name).weights
        assert [w.path for w in a] == [w.path for w in b]
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-4, atol=1e-4)


def test_saved_seed_network_reloads(two_seeds, data, tmp_path):
    _, networks, _, _ = two_seeds
    model = networks.keras_networks(1).bn
    path = tmp_path / "bn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.predict(data.x_test, verbose=0), model.predict(data.x_test, verbose=0)
    )


def test_single_example_check_of_every_seed(two_seeds, data):
    _, networks, _, _ = two_seeds
    got = stacked.single_example_check(networks, data.x_test, data.y_test)
    assert len(got) == 2
    for index, result in enumerate(got):
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
        (["seeds=[0, 1]", "seed=0"], None),
    ],
)
def test_bad_seeds_are_one_line_errors(overrides, message):
    if message is None:
        assert load_config(overrides=overrides)["seeds"] == [0]
        return
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_seed_and_seeds_set_each_other(tmp_path):
    assert load_config(overrides=["seed=3"])["seeds"] == [3]
    config = load_config(overrides=["seeds=[4, 1]"])
    assert config["seed"] == 4 and config["seeds"] == [4, 1]
    path = tmp_path / "both.toml"
    path.write_text("seed = 2\nseeds = [0, 2]\n")
    with pytest.raises(ConfigError, match="'seed' is the first of 'seeds'"):
        load_config(path)
    path.write_text("seeds = [5, 6]\n")
    assert load_config(path, ["seed=7"])["seeds"] == [7]


def test_cli_seeds_flag(capsys, tmp_path):
    out = tmp_path / "run"
    assert mnist_mlp.main(["--seeds", "0,0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key 'seeds'") and err.count("\n") == 1
    assert not out.exists()


def test_run_over_two_seeds_writes_means_and_each_seed(tmp_path):
    config = smoke_config("seeds=[0, 3]")
    metrics = execute(mnist_mlp.EXPERIMENT, config, tmp_path / "run", progress=False)
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
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "over 2 seeds (0, 3)" in summary and " ± " in summary
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    # The saved networks are the first seed's.
    data = select(load_mnist("vendored"), 3000, 500)
    model = keras.saving.load_model(tmp_path / "run" / "bn.keras")
    accuracy = np.mean(
        np.argmax(model.predict(data.x_test, verbose=0), -1) == data.y_test
    )
    assert accuracy == by_seed[0]["final_accuracy"]["bn_population"]
