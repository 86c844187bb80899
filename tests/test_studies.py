"""The population-statistics study and the learning-rate sweep, end to end."""

import json

import keras
import pytest

from experiments import lr_sweep, population_study
from experiments.config import CONFIG_DIR

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the experiments' training loop is written for TensorFlow",
)

TINY = [
    "--set", "hidden_units=[16, 16]",
    "--set", "neurons=[0]",
    "--set", "train_examples=2000",
    "--set", "test_examples=300",
]  # fmt: skip


def test_population_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    argv = ["--config", str(CONFIG_DIR / "population_study.toml"), *TINY]
    argv += ["--set", "steps=150", "--set", "precise_bn_batches=5"]
    assert population_study.main([*argv, "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == [0, 50, 100, 150]
    assert set(metrics["accuracy"]) == {
        "plain", "ema", "debiased_ema", "cumulative", "precise", "batch_stats",
    }  # fmt: skip
    for curve in metrics["accuracy"].values():
        assert len(curve) == 4 and all(0 <= a <= 1 for a in curve)
    # Population estimates never feed back into training.
    assert metrics["bn_weights_identical"] is True
    # After 150 steps the 0.999 EMA is still mostly its initial value; the
    # debiased and cumulative averages and precise BN are not.
    final = {k: v[-1] for k, v in metrics["accuracy"].items()}
    for name in ("debiased_ema", "cumulative", "precise"):
        assert final[name] > final["ema"] + 0.1, name
    assert metrics["precise_seconds_per_evaluation"] > 0
    assert (out / "population_study.png").read_bytes()[:4] == b"\x89PNG"
    assert "| precise |" in (out / "summary.md").read_text()


def test_lr_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    argv = ["--config", str(CONFIG_DIR / "lr_sweep.toml"), *TINY]
    argv += ["--set", "steps=100"]
    argv += ["--set", "learning_rates=[0.01, 0.1]", "--set", "seeds=[0, 1]"]
    assert lr_sweep.main([*argv, "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(r["learning_rate"], r["seed"]) for r in metrics["runs"]] == [
        (0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1),
    ]  # fmt: skip
    for entry in metrics["by_learning_rate"]:
        assert entry["seeds"] == 2
        for key in ("plain", "bn"):
            stats = entry[key]
            assert stats["min"] <= stats["mean"] <= stats["max"]
    assert metrics["runs"][0]["bn"] != metrics["runs"][1]["bn"]  # seeds differ
    assert (out / "lr_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_rejects_a_bad_learning_rate(capsys, tmp_path):
    argv = ["--set", "learning_rates=[0.1, -1]", "--out", str(tmp_path / "o")]
    assert lr_sweep.main(argv) == 2
    assert "'learning_rates' must be positive" in capsys.readouterr().err


def test_study_keys_are_unknown_to_the_main_experiment(capsys, tmp_path):
    from experiments import mnist_mlp

    argv = ["--set", "precise_bn_batches=3", "--out", str(tmp_path / "o")]
    assert mnist_mlp.main(argv) == 2
    assert "unknown config key 'precise_bn_batches'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bn-impl", "keras"], "set bn_impl='bn_keras'"),
        (["--set", "bn_momentum=1.0"], "needs bn_momentum < 1"),
        (
            ["--set", "train_examples=100", "--set", "precise_bn_batches=5"],
            "more than the 100 used",
        ),
    ],
)
def test_study_config_errors_are_one_line(capsys, tmp_path, argv, message):
    assert population_study.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
