"""The population-statistics study and the learning-rate sweep, end to end on
their smoke configs, interrupted and resumed."""

import json
from pathlib import Path

import keras
import pytest

from experiments import lr_sweep, population_study
from experiments.common.config import CONFIG_DIR
from experiments.common.run import TEST_SIGNAL_VAR, read_state

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the experiments' training loop is written for TensorFlow",
)

STUDY_SMOKE = CONFIG_DIR / "population_study_smoke.toml"
SWEEP_SMOKE = CONFIG_DIR / "lr_sweep_smoke.toml"


def _reject(name):
    raise ValueError(f"{name} in strict JSON")


def strict_json(path):
    return json.loads(Path(path).read_text(), parse_constant=_reject)


def _all_strict(out):
    for path in out.rglob("*.json"):
        strict_json(path)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    argv = ["--config", str(STUDY_SMOKE), "--out", str(out), "--quiet"]
    assert population_study.main(argv) == 0
    return out, strict_json(out / "metrics.json")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    argv = ["--config", str(SWEEP_SMOKE), "--out", str(out), "--quiet"]
    assert lr_sweep.main(argv) == 0
    return out, strict_json(out / "metrics.json")


def test_population_study_end_to_end(study):
    out, metrics = study
    assert metrics["steps"] == [0, 50, 100, 150]
    assert set(metrics["accuracy"]) == {
        "plain", "ema", "debiased_ema", "cumulative", "precise", "batch_stats",
    }  # fmt: skip
    for curve in metrics["accuracy"].values():
        assert len(curve) == 4 and all(0 <= a <= 1 for a in curve)
    # Population estimates never feed back into training: the BN cells,
    # trained apart, end with the same weights.
    assert metrics["bn_weights_identical"] is True
    # After 150 steps the 0.999 EMA is still mostly its initial value; the
    # debiased and cumulative averages and precise BN are not.
    final = {k: v[-1] for k, v in metrics["accuracy"].items()}
    for name in ("debiased_ema", "cumulative", "precise"):
        assert final[name] > final["ema"] + 0.1, name
    assert metrics["precise_seconds_per_evaluation"] > 0
    assert metrics["cells_from_earlier_sessions"] == 0
    assert (out / "population_study.png").read_bytes()[:4] == b"\x89PNG"
    assert "| precise |" in (out / "summary.md").read_text()
    assert sorted(p.stem for p in (out / "cells").iterdir()) == sorted(
        population_study.CELLS
    )
    assert read_state(out)["state"] == "complete"
    _all_strict(out)


def test_lr_sweep_end_to_end(sweep):
    out, metrics = sweep
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
    assert len(list((out / "cells").iterdir())) == 4
    assert read_state(out)["state"] == "complete"
    _all_strict(out)


def _without_timings(value):
    """Drops the wall-clock fields, which differ between sessions."""
    timing = ("seconds", "wall_seconds", "cell_seconds", "cells_from_earlier_sessions")
    timing += ("precise_seconds_per_evaluation",)
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in timing}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_interrupted_sweep_resumes_to_the_same_numbers(
    sweep, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    argv = ["--config", str(SWEEP_SMOKE), "--out", str(out), "--quiet"]
    monkeypatch.setenv(TEST_SIGNAL_VAR, "cell lr0.01-seed1:SIGINT")
    assert lr_sweep.main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"continue with: python -m experiments.lr_sweep --resume {out}" in err
    state = read_state(out)
    assert state["state"] == "interrupted" and state["cells_done"] == 2
    assert not (out / "metrics.json").exists()
    _all_strict(out)
    monkeypatch.delenv(TEST_SIGNAL_VAR)
    assert lr_sweep.main(["--resume", str(out), "--quiet"]) == 0
    resumed = strict_json(out / "metrics.json")
    assert resumed["cells_from_earlier_sessions"] == 2
    assert _without_timings(resumed) == _without_timings(sweep[1])
    state = read_state(out)
    assert state["state"] == "complete" and state["sessions"] == 2
    # A complete run is not resumed again.
    assert lr_sweep.main(["--resume", str(out)]) == 2
    assert "already complete" in capsys.readouterr().err


def test_interrupted_study_resumes_to_the_same_numbers(
    study, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    argv = ["--config", str(STUDY_SMOKE), "--out", str(out), "--quiet"]
    # Stopped in the middle of the third cell's training.
    calls, stop_in = [], ["debiased_ema"]
    original = population_study.train_cell

    def train_cell(name, *args, **kwargs):
        calls.append(name)
        if name in stop_in:
            monkeypatch.setenv(TEST_SIGNAL_VAR, "step 100:SIGTERM")
        return original(name, *args, **kwargs)

    monkeypatch.setattr(population_study, "train_cell", train_cell)
    assert population_study.main(argv) == 143
    err = capsys.readouterr().err
    assert (
        "interrupted by SIGTERM at cell 3 of 5 (debiased_ema), training step 100" in err
    )
    assert sorted(p.stem for p in (out / "cells").iterdir()) == ["ema", "plain"]
    monkeypatch.delenv(TEST_SIGNAL_VAR)
    stop_in.clear()
    assert population_study.main(["--resume", str(out), "--quiet"]) == 0
    assert calls[3:] == ["debiased_ema", "cumulative", "precise"]
    resumed = strict_json(out / "metrics.json")
    assert resumed["cells_from_earlier_sessions"] == 2
    assert _without_timings(resumed) == _without_timings(study[1])


def test_resume_refuses_a_run_of_another_experiment(study, capsys):
    out, _ = study
    assert lr_sweep.main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and "population_study" in err


def test_study_keys_are_unknown_to_the_main_experiment(capsys, tmp_path):
    from experiments import mnist_mlp

    argv = ["--set", "precise_bn_batches=3", "--out", str(tmp_path / "o")]
    assert mnist_mlp.main(argv) == 2
    assert "unknown config key 'precise_bn_batches'" in capsys.readouterr().err
