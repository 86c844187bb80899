"""End-to-end and unit tests of the MNIST experiment, on the smoke config."""

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from experiments import mnist_mlp
from experiments.common.cli import execute
from experiments.common.config import CONFIG_DIR, load_config
from experiments.common.data import load_mnist, select
from experiments.common.mlp.evaluate import (
    forward,
    normalize_with_batch_stats,
    single_example_check,
)
from experiments.common.metrics import BATCH_STATS, POPULATION
from experiments.common.mlp.models import build_networks
from experiments.common.run import TEST_SIGNAL_VAR, read_state
from experiments.common.mlp.train import Trainer, batch_indices, train_and_evaluate

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the experiment's training loop is written for TensorFlow",
)

ROOT = Path(__file__).resolve().parents[1]
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


def load_data(config):
    data = load_mnist(config["data_source"], verify=config["data_verify"])
    return select(data, config["train_examples"], config["test_examples"])


def run(config, out):
    return execute(mnist_mlp.EXPERIMENT, config, out, progress=False)


def _reject(name):
    raise ValueError(f"{name} in strict JSON")


def strict_json(path):
    """Parses `path` as RFC 8259 JSON: NaN and Infinity are errors."""
    return json.loads(Path(path).read_text(), parse_constant=_reject)


def subprocess_env(**extra):
    """The environment of an experiment run as a user starts it: from the
    repository root, with the user's TF_CPP_MIN_LOG_LEVEL unset."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.pop("BN_KERAS_MNIST_DIR", None)
    env.pop(TEST_SIGNAL_VAR, None)
    return {**env, **extra}


def start(argv, cwd=ROOT, **env):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.mnist_mlp", *argv],
        cwd=cwd,
        env=subprocess_env(PYTHONPATH=str(ROOT), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Smoke runs as a user starts them, fresh processes, all at once:

    - seeds 0 and 1 started together into the default folder (`runs/...`);
    - one killed (SIGKILL) after writing everything but its final state;
    - one stopped by SIGTERM after loading its data.

    Returns `{name: (folder, exit status, stderr)}`.
    """
    root = tmp_path_factory.mktemp("runs")
    argv = ["--config", str(SMOKE), "--quiet"]
    processes = {
        f"seed {seed}": (root, start([*argv, "--set", f"seed={seed}"], cwd=root))
        for seed in (0, 1)
    }
    for name, point in (
        ("sigkill", "completing:SIGKILL"),
        ("sigterm", "data loaded:SIGTERM"),
    ):
        out = root / name
        process = start([*argv, "--out", str(out)], **{TEST_SIGNAL_VAR: point})
        processes[name] = (out, process)
    results = {}
    for name, (out, process) in processes.items():
        _, stderr = process.communicate(timeout=600)
        results[name] = (out, process.returncode, stderr)
    folders = sorted((root / "runs").iterdir())
    for folder in folders:
        seed = strict_json(folder / "config.json")["seed"]
        out, status, stderr = results[f"seed {seed}"]
        results[f"seed {seed}"] = (folder, status, stderr)
    return results


@pytest.fixture(scope="module")
def smoke_run(runs):
    out, status, stderr = runs["seed 0"]
    assert status == 0, stderr
    return out, strict_json(out / "metrics.json"), stderr


def test_smoke_run_writes_every_output(smoke_run):
    out, _, _ = smoke_run
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for name in OUTPUTS[-3:]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The data source the run resolved ("auto": the vendored copy here).
    assert strict_json(out / "config.json") == {
        **smoke_config(),
        "data_source": "vendored",
    }
    assert read_state(out)["state"] == "complete"
    # Nothing but the outputs, the state and the lock: no temporary files.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*OUTPUTS, "run.json", ".lock"]
    )


def test_every_output_file_is_strict_json_or_a_valid_file(smoke_run):
    out, _, _ = smoke_run
    for path in out.glob("*.json"):
        strict_json(path)
    for path in out.glob("*.keras"):
        assert zipfile.is_zipfile(path), path


def test_smoke_run_start_is_quiet(smoke_run):
    """No TensorFlow C++ log line (absl's pre-init warning, cudart, cuInit)."""
    _, _, stderr = smoke_run
    noise = ("absl::InitializeLog", "cuda", "cuInit", "oneDNN", "cpu_feature_guard")
    lines = stderr.splitlines()
    assert not [line for line in lines if any(n in line for n in noise)], stderr
    assert not [line for line in lines if re.match(r"[IWEF]\d{4} ", line)], stderr
    assert "Traceback" not in stderr


def test_metrics_keys_and_ranges(smoke_run):
    _, metrics, _ = smoke_run
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
    _, metrics, _ = smoke_run
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
    out, _, _ = smoke_run
    data = load_data(smoke_config())
    model = keras.saving.load_model(out / "bn.keras")
    predictions = np.argmax(model.predict(data.x_test, verbose=0), axis=-1)
    accuracy = float(np.mean(predictions == data.y_test))
    _, metrics, _ = smoke_run
    assert accuracy == metrics["final_accuracy"]["bn_population"]


def _curves(metrics):
    return {
        "accuracy": metrics["accuracy"],
        "activations": metrics["activations"],
        "single_example": metrics["single_example"],
    }


def test_same_seed_gives_the_same_metrics(smoke_run, tmp_path):
    _, first, _ = smoke_run
    second = run(smoke_config(), tmp_path / "again")
    assert _curves(second) == _curves(first)


def test_another_seed_gives_other_metrics(smoke_run, runs):
    _, first, _ = smoke_run
    out, status, stderr = runs["seed 1"]
    assert status == 0, stderr
    assert strict_json(out / "metrics.json")["accuracy"] != first["accuracy"]


@pytest.mark.parametrize(
    "override", ["loop=simple", "evaluation=separate", "bn_impl=keras"]
)
def test_variants_give_the_same_curves(smoke_run, tmp_path, override):
    """The per-step loop and Keras' BN layer reproduce the fast loop's numbers."""
    _, reference, _ = smoke_run
    metrics = run(smoke_config(override), tmp_path / "variant")
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


def _assert_no_output_looks_valid_unless_it_is(out):
    """Every JSON file parses strictly, every model is a whole zip file, every
    figure a whole PNG, and no temporary file is left."""
    for path in out.rglob("*"):
        assert ".tmp" not in path.name, path
        if path.suffix == ".json":
            strict_json(path)
        elif path.suffix == ".keras":
            assert zipfile.is_zipfile(path), path
        elif path.suffix == ".png":
            data = path.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND"


def _one_line(err):
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "point, signame, status, where",
    [
        ("data loaded", "SIGINT", 130, "at loading data"),
        ("step 100", "SIGINT", 130, "at training step 100 of 200"),
        ("metrics written", "SIGTERM", 143, "at writing outputs"),
    ],
)
def test_interrupt_marks_the_folder_interrupted(
    capsys, tmp_path, monkeypatch, point, signame, status, where
):
    out = tmp_path / "run"
    monkeypatch.setenv(TEST_SIGNAL_VAR, f"{point}:{signame}")
    argv = ["--config", str(SMOKE), "--out", str(out), "--quiet"]
    assert mnist_mlp.main(argv) == status
    err = _one_line(capsys.readouterr().err)
    said = "Ctrl-C (SIGINT)" if signame == "SIGINT" else signame
    assert f"interrupted by {said} {where}" in err
    assert f"partial outputs in {out}" in err
    state = read_state(out)
    assert state["state"] == "interrupted" and state["signal"] == signame
    _assert_no_output_looks_valid_unless_it_is(out)
    # The folder is kept for inspection and never overwritten.
    monkeypatch.delenv(TEST_SIGNAL_VAR)
    assert mnist_mlp.main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert "already holds a mnist_mlp run interrupted at" in err


def test_interrupt_before_the_data_keeps_nothing(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(TEST_SIGNAL_VAR, "claimed:SIGINT")
    assert mnist_mlp.main(["--config", str(SMOKE), "--out", str(out), "--quiet"]) == 130
    assert "nothing was kept" in _one_line(capsys.readouterr().err)
    assert not out.exists()


def test_sigkill_before_the_final_state_never_looks_complete(capsys, runs):
    """Killed after every output but run.json's "complete": the folder says
    the run was killed, and a rerun into it is refused."""
    out, status, _ = runs["sigkill"]
    assert status == -9
    assert read_state(out)["state"] == "killed"
    assert strict_json(out / "run.json")["state"] == "running"
    _assert_no_output_looks_valid_unless_it_is(out)
    assert mnist_mlp.main(["--config", str(SMOKE), "--out", str(out)]) == 2
    assert "run that was killed at" in _one_line(capsys.readouterr().err)


def test_sigterm_is_one_line_and_exit_143(runs):
    out, status, stderr = runs["sigterm"]
    assert status == 143
    assert stderr.startswith("python -m experiments.mnist_mlp: interrupted by SIGTERM")
    _one_line(stderr)
    assert read_state(out)["state"] == "interrupted"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json", "run.json"]


def test_concurrent_default_folder_runs_never_share_a_folder(runs):
    folders = set()
    for seed in (0, 1):
        folder, status, stderr = runs[f"seed {seed}"]
        assert status == 0, stderr
        assert folder.parent.name == "runs" and folder.name.startswith("smoke-")
        config = strict_json(folder / "config.json")
        assert config["seed"] == seed
        assert strict_json(folder / "metrics.json")["config"] == config
        assert read_state(folder)["state"] == "complete"
        folders.add(folder)
    assert len(folders) == 2


@pytest.fixture
def tiny_file_system(tmp_path):
    """A 160 KiB tmpfs: room for the config, the state and a model, not more."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount_point)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err}); test_run.py simulates ENOSPC")
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip()}); test_run.py "
            "simulates ENOSPC instead"
        )
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_is_one_line_and_leaves_no_truncated_file(capsys, tiny_file_system):
    out = tiny_file_system / "run"
    argv = ["--config", str(SMOKE), "--out", str(out), "--quiet"]
    assert mnist_mlp.main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("error: cannot write ")
    assert "No space left on device" in err and "is marked failed" in err
    _assert_no_output_looks_valid_unless_it_is(out)
    state = read_state(out)
    assert state["state"] == "failed" and "No space left" in state["error"]


def test_cli_unknown_data_source_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        mnist_mlp.main(["--data-source", "s3"])
    assert info.value.code == 2
    assert "invalid choice: 's3'" in capsys.readouterr().err
