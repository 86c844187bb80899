"""The sequential-MNIST experiment (experiments/sequential_mnist) end to end
on its smoke config."""

import keras
import numpy as np
import pytest

import bn_keras
from experiments.common.config import load_config, shipped_configs
from experiments.common.data import load_for_config
from experiments.common.metrics import BATCH_STATS, EMA, METRICS_FILE, PRECISE
from experiments.sequential_mnist import evaluate, models
from experiments.sequential_mnist import main as sequential_mnist
from experiments.sequential_mnist.config import (
    PERMUTED_PIXELS,
    PIXELS,
    ROWS,
    SCHEMA,
    check_data,
)
from experiments.sequential_mnist.metrics import (
    BN_LSTM,
    BN_LSTM_PRECISE,
    CHECKS,
    ESTIMATES,
    NETWORKS,
    ONE_AT_A_TIME,
    PER_TIMESTEP,
    PLOTTED_NORMS,
    SPLITS,
    TEST,
)
from experiments.sequential_mnist.plots import FIGURES, plot_all
from tests import reference
from tests.experiments.helpers import assert_outputs_whole, strict_json


@pytest.fixture(scope="module")
def sequential_run(smoke_run):
    return smoke_run("sequential_mnist")


def _smoke_sequences(config):
    return models.sequences(
        load_for_config(config),
        config["task"],
        config["validation_examples"],
        config["seed"],
    )


def _norms(model):
    layer = model.get_layer("bn_lstm")
    return {
        "input": layer.input_norm,
        "recurrent": layer.recurrent_norm,
        "cell": layer.cell_norm,
    }


def _statistics(norm):
    return (
        keras.ops.convert_to_numpy(norm.moving_mean).astype(np.float64),
        keras.ops.convert_to_numpy(norm.moving_variance).astype(np.float64),
    )


def test_end_to_end(sequential_run):
    out, metrics = sequential_run
    for name in (
        "config.json",
        "metrics.json",
        "summary.md",
        *FIGURES,
        "lstm.keras",
        "bn_lstm.keras",
        "bn_lstm_precise.keras",
    ):
        assert (out / name).is_file(), name
    assert strict_json(out / "run.json")["state"] == "complete"
    assert metrics["steps"] == [0, 10, 20]
    for name in NETWORKS:
        for split in SPLITS:
            curve = metrics["accuracy"][name][split]
            assert len(curve) == 3 and all(0.0 <= a <= 1.0 for a in curve)
    check = metrics["inference_check"]
    assert check["examples"] == 100
    assert 0.0 <= check[BATCH_STATS] <= 1.0
    for estimate in ESTIMATES:
        assert set(CHECKS) <= set(check[estimate]), estimate
        # One sequence at a time is batched inference, example by example,
        # with the moving averages and with the recomputed statistics alike.
        assert check[estimate]["one_at_a_time_agreement"] == 1.0, estimate
        assert check[estimate]["one_at_a_time_max_abs_difference"] < 1e-5, estimate
        assert check[estimate][ONE_AT_A_TIME] == check[estimate][PER_TIMESTEP]
    final = metrics["final_accuracy"]
    assert set(final) == {*NETWORKS, BN_LSTM_PRECISE}
    assert final[BN_LSTM][TEST] == check[EMA][PER_TIMESTEP]
    assert final[BN_LSTM_PRECISE][TEST] == check[PRECISE][PER_TIMESTEP]
    assert metrics["precise_bn"]["sequences"] == 100
    statistics = metrics["population_statistics"]
    for estimate in ESTIMATES:
        for norm in PLOTTED_NORMS:
            assert np.shape(statistics[estimate][norm]["mean"]) == (28, 2)
    summary = (out / "summary.md").read_text()
    assert "| BN-LSTM, moving averages |" in summary
    assert "| BN-LSTM, recomputed from 100 sequences |" in summary
    # Every row of the inference check, each estimate in three ways.
    assert summary.count("| moving averages (momentum 0.99), ") == 3
    assert summary.count("| recomputed after training (100 training sequences), ") == 3
    assert "| each test batch's own statistics (batch 20) |" in summary


def test_saved_models_reproduce_the_check(sequential_run):
    out, metrics = sequential_run
    sequences = _smoke_sequences(metrics["config"])
    check = metrics["inference_check"]
    for name, estimate in ((BN_LSTM, EMA), (BN_LSTM_PRECISE, PRECISE)):
        model = keras.saving.load_model(out / f"{name}.keras")
        assert isinstance(model.get_layer("bn_lstm"), bn_keras.BatchNormLSTM)
        accuracy = evaluate.accuracy(model, sequences.x_test, sequences.y_test)
        assert accuracy == check[estimate][PER_TIMESTEP], name


def test_recomputed_statistics_match_a_numpy_reference(sequential_run):
    # Precise BN gives each timestep the moments of its pre-activations over
    # the drawn training sequences, batch by batch in training mode with the
    # trained weights: the mean of the batch means and the pooled variance.
    out, metrics = sequential_run
    config = metrics["config"]
    batches, batch_size = config["precise_bn_batches"], config["batch_size"]
    ema = keras.saving.load_model(out / "bn_lstm.keras")
    precise = keras.saving.load_model(out / "bn_lstm_precise.keras")
    for trained, copied in zip(ema.weights, precise.weights, strict=True):
        if trained.trainable:
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(copied), keras.ops.convert_to_numpy(trained)
            )
    layer = ema.get_layer("bn_lstm")
    w = {
        name: keras.ops.convert_to_numpy(variable).astype(np.float64)
        for name, variable in (
            ("kernel", layer.kernel),
            ("recurrent_kernel", layer.recurrent_kernel),
            ("bias", layer.bias),
            ("gamma_x", layer.input_norm.gamma),
            ("gamma_h", layer.recurrent_norm.gamma),
            ("gamma_c", layer.cell_norm.gamma),
            ("beta_c", layer.cell_norm.beta),
        )
    }
    x_train = _smoke_sequences(config).x_train
    sample = evaluate.precise_sample(x_train, batches * batch_size, config["seed"])
    assert sample.shape == (batches * batch_size, 28, 28)
    assert len(np.unique(sample.reshape(len(sample), -1), axis=0)) == len(sample)
    per_batch = [
        reference.reference_bn_lstm(batch, w, training=True)[3]
        for batch in np.split(sample, batches)
    ]
    for name, norm in _norms(precise).items():
        means = np.stack([moments[name][0] for moments in per_batch])
        variances = np.stack([moments[name][1] for moments in per_batch])
        mean, variance = _statistics(norm)
        np.testing.assert_allclose(mean, means.mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            variance, variances.mean(0) + means.var(0), rtol=1e-4, atol=1e-6
        )
        # The moving averages lag: the recompute changed them.
        moving_mean, _ = _statistics(_norms(ema)[name])
        assert np.abs(moving_mean - mean).max() > 1e-3, name


def test_sequences_of_each_task():
    data = type(
        "Data", (), {"x_train": np.arange(3 * 784).reshape(3, 784) % 255 / 255.0}
    )
    data.y_train = np.arange(3)
    data.x_test, data.y_test = data.x_train[:1], data.y_train[:1]
    rows = models.sequences(data, ROWS, 1, 0)
    assert rows.x_train.shape == (2, 28, 28) and rows.x_validation.shape == (1, 28, 28)
    np.testing.assert_array_equal(rows.x_train[0, 1], data.x_train[0, 28:56])
    pixels = models.sequences(data, PIXELS, 1, 0)
    assert pixels.x_test.shape == (1, 784, 1)
    permuted = models.sequences(data, PERMUTED_PIXELS, 1, 0)
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
        ("precise_bn_batches=0", "precise_bn_batches"),
        # 21 batches of 20 are more than the 400 training sequences.
        ("precise_bn_batches=21", "precise_bn_batches"),
    ],
)
def test_config_errors_are_one_line(override, message, tmp_path, capsys):
    argv = ["--config", "smoke", "--set", override, "--out", str(tmp_path / "r")]
    assert sequential_mnist.main(argv + ["--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and message in error and "\n" not in error


def test_shipped_configs_load():
    assert shipped_configs(SCHEMA.configs_dir) == ["permuted", "pixels", "smoke"]
    for name in ("smoke", "pixels", "permuted"):
        config = load_config(SCHEMA, name)
        check_data(config, config["train_examples"] or 60000)


def test_the_batch_statistics_result_has_the_shared_name(sequential_run):
    """`inference_check.batch_stats`, the name of common.metrics.BATCH_STATS."""
    _, metrics = sequential_run
    assert evaluate.BATCH_STATS is BATCH_STATS == "batch_stats"
    check = metrics["inference_check"]
    assert set(check) == {"examples", BATCH_STATS, *ESTIMATES}
    assert "test_batch_statistics" not in check


def test_figures_are_drawn_from_the_metrics_file_alone(sequential_run, tmp_path):
    out, _ = sequential_run
    assert plot_all(out / METRICS_FILE, tmp_path) == [tmp_path / n for n in FIGURES]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FIGURES)
    assert_outputs_whole(tmp_path)
