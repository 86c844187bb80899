"""The sequential-MNIST experiment end to end on its smoke config."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

import bn_keras
from experiments import recurrent_models as rm
from experiments import sequential_mnist
from experiments.config import CONFIG_DIR, load_config

SMOKE = CONFIG_DIR / "sequential_mnist_smoke.toml"


def _reject(name):
    raise ValueError(f"{name} in strict JSON")


def strict_json(path):
    return json.loads(Path(path).read_text(), parse_constant=_reject)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential") / "run"
    argv = ["--config", str(SMOKE), "--out", str(out), "--quiet"]
    assert sequential_mnist.main(argv) == 0
    return out, strict_json(out / "metrics.json")


def test_end_to_end(smoke_run):
    out, metrics = smoke_run
    for name in (
        "config.json",
        "metrics.json",
        "summary.md",
        "accuracy.png",
        "population_statistics.png",
        "lstm.keras",
        "bn_lstm.keras",
    ):
        assert (out / name).is_file(), name
    assert strict_json(out / "run.json")["state"] == "complete"
    assert metrics["steps"] == [0, 10, 20]
    for name in rm.NETWORKS:
        for split in rm.SPLITS:
            curve = metrics["accuracy"][name][split]
            assert len(curve) == 3 and all(0.0 <= a <= 1.0 for a in curve)
    check = metrics["inference_check"]
    assert set(rm.CHECKS) <= set(check)
    assert check["examples"] == 100
    # One sequence at a time is batched inference, example by example.
    assert check["one_at_a_time_agreement"] == 1.0
    assert check["one_at_a_time_max_abs_difference"] < 1e-5
    assert check[rm.ONE_AT_A_TIME] == check[rm.PER_TIMESTEP]
    statistics = metrics["population_statistics"]
    for norm in rm.PLOTTED_NORMS:
        assert np.shape(statistics[norm]["mean"]) == (28, 2)
    assert "| BN-LSTM |" in (out / "summary.md").read_text()


def test_saved_model_reproduces_the_check(smoke_run):
    out, metrics = smoke_run
    model = keras.saving.load_model(out / "bn_lstm.keras")
    assert isinstance(model.get_layer("bn_lstm"), bn_keras.BatchNormLSTM)
    config = metrics["config"]
    from experiments.data import load_mnist, select

    data = select(
        load_mnist(config["data_source"], config["data_dir"] or None),
        config["train_examples"],
        config["test_examples"],
    )
    sequences = rm.sequences(
        data, config["task"], config["validation_examples"], config["seed"]
    )
    accuracy = rm.accuracy(model, sequences.x_test, sequences.y_test)
    assert accuracy == metrics["inference_check"][rm.PER_TIMESTEP]


def test_sequences_of_each_task():
    data = type(
        "Data", (), {"x_train": np.arange(3 * 784).reshape(3, 784) % 255 / 255.0}
    )
    data.y_train = np.arange(3)
    data.x_test, data.y_test = data.x_train[:1], data.y_train[:1]
    rows = rm.sequences(data, rm.ROWS, 1, 0)
    assert rows.x_train.shape == (2, 28, 28) and rows.x_validation.shape == (1, 28, 28)
    np.testing.assert_array_equal(rows.x_train[0, 1], data.x_train[0, 28:56])
    pixels = rm.sequences(data, rm.PIXELS, 1, 0)
    assert pixels.x_test.shape == (1, 784, 1)
    permuted = rm.sequences(data, rm.PERMUTED_PIXELS, 1, 0)
    # One fixed permutation, the same for every image and split.
    order = np.random.default_rng([0, 784]).permutation(784)
    np.testing.assert_array_equal(permuted.x_train[1, :, 0], data.x_train[1, order])
    np.testing.assert_array_equal(permuted.x_test[0, :, 0], data.x_test[0, order])
    assert not np.array_equal(order, np.arange(784))


@pytest.mark.parametrize(
    "override, message",
    [
        ("task=columns", "task"),
        ("hidden_units=[8, 8]", "hidden_units"),
        ("validation_examples=499", "validation_examples"),
    ],
)
def test_config_errors_are_one_line(override, message, tmp_path, capsys):
    argv = ["--config", str(SMOKE), "--set", override, "--out", str(tmp_path / "r")]
    assert sequential_mnist.main(argv + ["--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and message in error and "\n" not in error


def test_shipped_configs_load():
    for name in ("smoke", "pixels", "permuted"):
        path = CONFIG_DIR / f"sequential_mnist_{name}.toml"
        config = load_config(path, defaults=sequential_mnist.DEFAULTS)
        sequential_mnist.check_config(config, 60000)
