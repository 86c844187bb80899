"""End-to-end and unit tests of the MNIST experiment, on the smoke config."""

import json

import keras
import numpy as np
import pytest

from experiments import mnist_mlp
from experiments.config import CONFIG_DIR, load_config
from experiments.evaluate import (
    BATCH_STATS,
    POPULATION,
    forward,
    normalize_with_batch_stats,
    single_example_check,
)
from experiments.experiment import load_data, run
from experiments.models import build_networks
from experiments.train import Trainer, batch_indices, train_and_evaluate

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the experiment's training loop is written for TensorFlow",
)

SMOKE = CONFIG_DIR / "smoke.toml"
REQUIRED_KEYS = [
    ("final_accuracy", "plain"),
    ("final_accuracy", "bn_population"),
    ("final_accuracy", "bn_batch_stats"),
    ("single_example", "population", "accuracy"),
    ("single_example", "batch_stats", "accuracy"),
    ("single_example", "batch_stats", "majority_class_fraction"),
    ("wall_seconds",),
]
OUTPUTS = [
    "config.json",
    "metrics.json",
    "summary.md",
    "plain.keras",
    "bn.keras",
    "accuracy.png",
    "sigmoid_input_percentiles.png",
    "sigmoid_input_means.png",
]


def smoke_config(*overrides):
    return load_config(SMOKE, list(overrides))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smoke"
    status = mnist_mlp.main(["--config", str(SMOKE), "--out", str(out), "--quiet"])
    assert status == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_smoke_run_writes_every_output(smoke_run):
    out, _ = smoke_run
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for name in OUTPUTS[-3:]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text()) == smoke_config()


def test_metrics_keys_and_ranges(smoke_run):
    _, metrics = smoke_run
    for path in REQUIRED_KEYS:
        value = metrics
        for key in path:
            value = value[key]
        assert isinstance(value, float), path
        assert value >= 0 and (path == ("wall_seconds",) or value <= 1), path
    config = smoke_config()
    steps = list(range(0, config["steps"] + 1, config["eval_every"]))
    assert metrics["steps"] == steps
    for curve in metrics["accuracy"].values():
        assert len(curve) == len(steps)
        assert all(0.0 <= a <= 1.0 for a in curve)
    activations = np.asarray(metrics["activations"]["bn"])
    assert activations.shape == (len(steps), len(config["neurons"]), 4)
    # 15th <= 50th <= 85th percentile for every neuron at every evaluation.
    assert np.all(np.diff(activations[:, :, :3], axis=-1) >= 0)
    # Training helped: both networks beat chance (10%) by far on the slice.
    assert metrics["final_accuracy"]["plain"] > 0.3
    assert metrics["final_accuracy"]["bn_batch_stats"] > 0.3


def test_single_example_check_collapses_and_population_matches(smoke_run):
    _, metrics = smoke_run
    single = metrics["single_example"]
    # Each example normalized with its own statistics: every BN output is
    # beta, so every example gets the same class.
    assert single["batch_stats"]["majority_class_fraction"] == 1.0
    assert sum(single["batch_stats"]["predicted_class_histogram"]) == 500
    population = single["population"]
    assert population["agreement_with_batched"] == 1.0
    assert population["accuracy"] == population["batched_accuracy"]
    assert population["accuracy"] == metrics["final_accuracy"]["bn_population"]


def test_saved_models_reload_with_the_same_predictions(smoke_run):
    out, _ = smoke_run
    data = load_data(smoke_config())
    model = keras.saving.load_model(out / "bn.keras")
    predictions = np.argmax(model.predict(data.x_test, verbose=0), axis=-1)
    accuracy = float(np.mean(predictions == data.y_test))
    _, metrics = smoke_run
    assert accuracy == metrics["final_accuracy"]["bn_population"]


def _curves(metrics):
    return {
        "accuracy": metrics["accuracy"],
        "activations": metrics["activations"],
        "single_example": metrics["single_example"],
    }


def test_same_seed_gives_the_same_metrics(smoke_run, tmp_path):
    _, first = smoke_run
    second = run(smoke_config(), tmp_path / "again", progress=False)
    assert _curves(second) == _curves(first)


def test_another_seed_gives_other_metrics(smoke_run, tmp_path):
    _, first = smoke_run
    other = run(smoke_config("seed=1"), tmp_path / "other", progress=False)
    assert other["accuracy"] != first["accuracy"]


@pytest.mark.parametrize(
    "override", ["loop=simple", "evaluation=separate", "bn_impl=keras"]
)
def test_variants_give_the_same_curves(smoke_run, tmp_path, override):
    """The per-step loop and Keras' BN layer reproduce the fast loop's numbers."""
    _, reference = smoke_run
    metrics = run(smoke_config(override), tmp_path / "variant", progress=False)
    for key, curve in reference["accuracy"].items():
        # One test example is 0.002 of the 500: allow a float tie or two.
        np.testing.assert_allclose(metrics["accuracy"][key], curve, atol=0.0041)
    for key in ("plain", "bn"):
        np.testing.assert_allclose(
            metrics["activations"][key],
            reference["activations"][key],
            rtol=1e-3,
            atol=1e-3,
        )


def test_networks_start_from_the_same_draw():
    networks = build_networks(smoke_config())
    plain = [w for w in networks.plain.weights if "kernel" in w.path]
    bn = [w for w in networks.bn.weights if "kernel" in w.path]
    assert len(plain) == len(bn) == 3
    for a, b in zip(plain, bn, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # N(0, 1), unscaled.
    assert abs(np.std(plain[0].numpy()) - 1.0) < 0.05
    other = build_networks(smoke_config("seed=5"))
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
    config = smoke_config()
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
    networks = build_networks(smoke_config())
    x = rng.random((50, 784)).astype("float32")
    outputs = forward(networks.bn, x, modes=(POPULATION, BATCH_STATS))
    np.testing.assert_allclose(
        outputs[POPULATION][0], networks.bn(x, training=False), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(outputs[POPULATION][0], outputs[BATCH_STATS][0])


def test_single_example_check_on_an_untrained_network(rng):
    networks = build_networks(smoke_config())
    x = rng.random((40, 784)).astype("float32")
    y = rng.integers(0, 10, 40).astype("int32")
    result = single_example_check(networks.bn, x, y, first=10)
    assert result["batch_stats"]["majority_class_fraction"] == 1.0
    assert result["population"]["agreement_with_batched"] == 1.0
    assert 0.0 <= result["population"]["accuracy_first_10"] <= 1.0


def test_train_and_evaluate_records_every_evaluation():
    config = smoke_config("steps=100")
    data = load_data(config)
    networks = build_networks(config)
    calls = []

    def evaluate():
        calls.append(1)
        return {"accuracy_plain": 0.5, "accuracy_bn_population": 0.25}

    records = train_and_evaluate(networks, data, config, evaluate, progress=False)
    assert [r["step"] for r in records] == [0, 50, 100]
    assert len(calls) == 3
    assert all(np.isfinite(r["train_loss"]).all() for r in records[1:])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "stepz=3"], "unknown config key 'stepz'"),
        (["--set", "steps=x"], "must be of type int"),
        (["--config", "nope.toml"], "config file nope.toml does not exist"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(capsys, tmp_path, argv, message):
    status = mnist_mlp.main([*argv, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_data_error_exits_2(capsys, tmp_path):
    argv = ["--config", str(SMOKE), "--data-dir", str(tmp_path), "--quiet"]
    status = mnist_mlp.main([*argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and str(tmp_path) in err and "not found" in err


def test_cli_refuses_to_overwrite_a_run(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    status = mnist_mlp.main(["--config", str(SMOKE), "--out", str(out), "--quiet"])
    assert status == 2
    assert "already holds files" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "{}"


def test_cli_unknown_data_source_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        mnist_mlp.main(["--data-source", "s3"])
    assert info.value.code == 2
    assert "invalid choice: 's3'" in capsys.readouterr().err
