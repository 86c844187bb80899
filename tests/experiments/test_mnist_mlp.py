"""The Figure-1 experiment (experiments/mnist_mlp) end to end on its smoke
config: outputs, metrics, the single-example check, a quiet start, the default
folder, signals, a full disk; unit tests of the shared network are in
common/test_mlp.py, the stacked seeds in test_mnist_mlp_seeds.py."""

import json
import re
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from experiments.common.data import load_for_config
from experiments.common.metrics import METRICS_FILE
from experiments.common.mlp.models import build_networks
from experiments.common.run import TEST_SIGNAL_VAR, read_state
from experiments.mnist_mlp import main as mnist_mlp
from experiments.mnist_mlp.plots import FIGURES, plot_all
from experiments.mnist_mlp.single_example import single_example_check
from tests.experiments.helpers import (
    PNG_SIGNATURE,
    assert_outputs_whole,
    one_line,
    requires_tensorflow,
    smoke_config,
    start,
    strict_json,
)

pytestmark = requires_tensorflow

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
    *FIGURES,
]
SMOKE = ["--config", "smoke", "--quiet"]


@pytest.fixture(scope="module")
def runs(once):
    """Smoke runs as a user starts them, fresh processes, all at once:

    - seeds 0 and 1 started together into the default folder (`runs/...`);
    - one killed (SIGKILL) after writing everything but its final state;
    - one stopped by SIGTERM after loading its data.

    Returns `{name: (folder, exit status, stderr)}`.
    """

    def make(root):
        processes = {
            f"seed {seed}": (
                root,
                start("mnist_mlp", [*SMOKE, "--set", f"seed={seed}"], cwd=root),
            )
            for seed in (0, 1)
        }
        for name, point in (
            ("sigkill", "completing:SIGKILL"),
            ("sigterm", "data loaded:SIGTERM"),
        ):
            out = root / name
            process = start(
                "mnist_mlp", [*SMOKE, "--out", str(out)], **{TEST_SIGNAL_VAR: point}
            )
            processes[name] = (out, process)
        results = {}
        for name, (out, process) in processes.items():
            _, stderr = process.communicate(timeout=600)
            results[name] = (str(out), process.returncode, stderr)
        for folder in sorted((root / "runs").iterdir()):
            seed = strict_json(folder / "config.json")["seed"]
            _, status, stderr = results[f"seed {seed}"]
            results[f"seed {seed}"] = (str(folder), status, stderr)
        (root / "results.json").write_text(json.dumps(results))

    root = once("mnist_mlp runs", make)
    results = json.loads((root / "results.json").read_text())
    return {name: (Path(out), *rest) for name, (out, *rest) in results.items()}


@pytest.fixture(scope="module")
def user_run(runs):
    """Seed 0's run, started as a user does, into the default folder."""
    out, status, stderr = runs["seed 0"]
    assert status == 0, stderr
    return out, strict_json(out / METRICS_FILE), stderr


def test_smoke_run_writes_every_output(user_run):
    out, _, _ = user_run
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for name in OUTPUTS[-3:]:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    # The data source the run resolved ("auto": the vendored copy here).
    assert strict_json(out / "config.json") == {
        **smoke_config("mnist_mlp"),
        "data_source": "vendored",
    }
    assert read_state(out)["state"] == "complete"
    # Nothing but the outputs, the state and the lock: no temporary files.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*OUTPUTS, "run.json", ".lock"]
    )


def test_every_output_file_is_strict_json_or_a_valid_file(user_run):
    out, _, _ = user_run
    for path in out.glob("*.json"):
        strict_json(path)
    for path in out.glob("*.keras"):
        assert zipfile.is_zipfile(path), path


def test_smoke_run_start_is_quiet(user_run):
    """No TensorFlow C++ log line (absl's pre-init warning, cudart, cuInit)."""
    _, _, stderr = user_run
    noise = ("absl::InitializeLog", "cuda", "cuInit", "oneDNN", "cpu_feature_guard")
    lines = stderr.splitlines()
    assert not [line for line in lines if any(n in line for n in noise)], stderr
    assert not [line for line in lines if re.match(r"[IWEF]\d{4} ", line)], stderr
    assert "Traceback" not in stderr


def test_metrics_keys_and_ranges(user_run):
    _, metrics, _ = user_run
    for path in REQUIRED_KEYS:
        value = metrics
        for key in path:
            value = value[key]
        assert isinstance(value, float), path
        assert value >= 0 and (path == ("wall_seconds",) or value <= 1), path
    config = smoke_config("mnist_mlp")
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


def test_single_example_check_collapses_and_population_matches(user_run):
    _, metrics, _ = user_run
    single = metrics["single_example"]
    # Each example normalized with its own statistics: every BN output is
    # beta, so every example gets the same class.
    assert single["batch_stats"]["majority_class_fraction"] == 1.0
    assert sum(single["batch_stats"]["predicted_class_histogram"]) == 500
    population = single["population"]
    assert population["agreement_with_batched"] == 1.0
    assert population["accuracy"] == population["batched_accuracy"]
    assert population["accuracy"] == metrics["final_accuracy"]["bn_population"]


def test_single_example_check_on_an_untrained_network(rng):
    networks = build_networks(smoke_config("mnist_mlp"))
    x = rng.random((40, 784)).astype("float32")
    y = rng.integers(0, 10, 40).astype("int32")
    result = single_example_check(networks.bn, x, y, first=10)
    assert result["batch_stats"]["majority_class_fraction"] == 1.0
    assert result["population"]["agreement_with_batched"] == 1.0
    assert 0.0 <= result["population"]["accuracy_first_10"] <= 1.0


def test_saved_models_reload_with_the_same_predictions(user_run):
    out, _, _ = user_run
    data = load_for_config(smoke_config("mnist_mlp"))
    model = keras.saving.load_model(out / "bn.keras")
    predictions = np.argmax(model.predict(data.x_test, verbose=0), axis=-1)
    accuracy = float(np.mean(predictions == data.y_test))
    _, metrics, _ = user_run
    assert accuracy == metrics["final_accuracy"]["bn_population"]


def _curves(metrics):
    return {
        "accuracy": metrics["accuracy"],
        "activations": metrics["activations"],
        "single_example": metrics["single_example"],
    }


def test_same_seed_gives_the_same_metrics(user_run, smoke_run):
    """The same config run again, in this process: the same numbers."""
    _, first, _ = user_run
    second = smoke_run("mnist_mlp").metrics
    assert second["config"]["seed"] == 0
    assert _curves(second) == _curves(first)


def test_another_seed_gives_other_metrics(user_run, runs):
    _, first, _ = user_run
    out, status, stderr = runs["seed 1"]
    assert status == 0, stderr
    assert strict_json(out / "metrics.json")["accuracy"] != first["accuracy"]


@pytest.mark.parametrize(
    "override", ["loop=simple", "evaluation=separate", "bn_impl=keras"]
)
def test_variants_give_the_same_curves(user_run, smoke_run, override):
    """The per-step loop and Keras' BN layer reproduce the fast loop's numbers."""
    _, reference, _ = user_run
    metrics = smoke_run("mnist_mlp", "--set", override).metrics
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
    argv = [*SMOKE, "--out", str(out)]
    assert mnist_mlp.main(argv) == status
    err = one_line(capsys.readouterr().err)
    said = "Ctrl-C (SIGINT)" if signame == "SIGINT" else signame
    assert f"interrupted by {said} {where}" in err
    assert f"partial outputs in {out}" in err
    state = read_state(out)
    assert state["state"] == "interrupted" and state["signal"] == signame
    assert_outputs_whole(out)
    # The folder is kept for inspection and never overwritten.
    monkeypatch.delenv(TEST_SIGNAL_VAR)
    assert mnist_mlp.main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert "already holds a mnist_mlp run interrupted at" in err


def test_interrupt_before_the_data_keeps_nothing(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(TEST_SIGNAL_VAR, "claimed:SIGINT")
    assert mnist_mlp.main([*SMOKE, "--out", str(out)]) == 130
    assert "nothing was kept" in one_line(capsys.readouterr().err)
    assert not out.exists()


def test_sigkill_before_the_final_state_never_looks_complete(capsys, runs):
    """Killed after every output but run.json's "complete": the folder says
    the run was killed, and a rerun into it is refused."""
    out, status, _ = runs["sigkill"]
    assert status == -9
    assert read_state(out)["state"] == "killed"
    assert strict_json(out / "run.json")["state"] == "running"
    assert_outputs_whole(out)
    assert mnist_mlp.main([*SMOKE, "--out", str(out)]) == 2
    assert "run that was killed at" in one_line(capsys.readouterr().err)


def test_sigterm_is_one_line_and_exit_143(runs):
    out, status, stderr = runs["sigterm"]
    assert status == 143
    assert stderr.startswith("python -m experiments.mnist_mlp: interrupted by SIGTERM")
    one_line(stderr)
    assert read_state(out)["state"] == "interrupted"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json", "run.json"]


def test_concurrent_default_folder_runs_never_share_a_folder(runs):
    folders = set()
    for seed in (0, 1):
        folder, status, stderr = runs[f"seed {seed}"]
        assert status == 0, stderr
        assert folder.parent.name == "runs" and re.fullmatch(
            r"mnist_mlp-smoke-\d{8}-\d{6}(-1)?", folder.name
        )
        config = strict_json(folder / "config.json")
        assert config["seed"] == seed
        assert strict_json(folder / "metrics.json")["config"] == config
        assert read_state(folder)["state"] == "complete"
        folders.add(folder)
    assert len(folders) == 2


def test_full_disk_is_one_line_and_leaves_no_truncated_file(capsys, tiny_tmpfs):
    """A 160 KiB file system: room for the config, the state and a model, not
    more (common/test_run.py simulates a full disk where none can be mounted)."""
    out = tiny_tmpfs("160k") / "run"
    argv = [*SMOKE, "--out", str(out)]
    assert mnist_mlp.main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("error: cannot write ")
    assert "No space left on device" in err and "is marked failed" in err
    assert_outputs_whole(out)
    state = read_state(out)
    assert state["state"] == "failed" and "No space left" in state["error"]


def test_cli_unknown_data_source_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        mnist_mlp.main(["--data-source", "s3"])
    assert info.value.code == 2
    assert "invalid choice: 's3'" in capsys.readouterr().err


def test_figures_are_drawn_from_the_metrics_file_alone(user_run, tmp_path):
    out, _, _ = user_run
    paths = plot_all(out / METRICS_FILE, tmp_path)
    assert paths == [tmp_path / name for name in FIGURES]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FIGURES)
    assert_outputs_whole(tmp_path)
