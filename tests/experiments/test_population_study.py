"""The population-statistics study (experiments/population_study) end to end
on its smoke config, interrupted and resumed."""

import pytest

from experiments.common.metrics import METRICS_FILE
from experiments.common.run import TEST_SIGNAL_VAR, read_state
from experiments.population_study import main as population_study
from experiments.population_study.plots import plot_all
from tests.experiments.helpers import (
    PNG_SIGNATURE,
    assert_outputs_whole,
    experiment_main,
    strict_json,
    tensorflow_only,
    without_timings,
)

pytestmark = tensorflow_only


@pytest.fixture(scope="module")
def study(smoke_run):
    return smoke_run("population_study")


def test_population_study_end_to_end(study):
    out, metrics = study
    assert metrics["steps"] == [0, 50, 100, 150]
    assert set(metrics["accuracy"]) == {
        "plain", "ema", "debiased_ema", "cumulative", "precise", "batch_stats",
    }  # fmt: skip
    assert tuple(metrics["accuracy"]) == population_study.CURVES
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
    assert (out / "population_study.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "| precise |" in (out / "summary.md").read_text()
    assert sorted(p.stem for p in (out / "cells").iterdir()) == sorted(
        population_study.CELLS
    )
    assert read_state(out)["state"] == "complete"
    assert_outputs_whole(out)


def test_figure_is_drawn_from_the_metrics_file_alone(study, tmp_path):
    out, _ = study
    assert plot_all(out / METRICS_FILE, tmp_path) == tmp_path / "population_study.png"
    assert [p.name for p in tmp_path.iterdir()] == ["population_study.png"]
    assert_outputs_whole(tmp_path)


def test_interrupted_study_resumes_to_the_same_numbers(
    study, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    argv = ["--config", "smoke", "--out", str(out), "--quiet"]
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
    assert without_timings(resumed) == without_timings(study.metrics)


def test_study_keys_are_unknown_to_the_main_experiment(capsys, tmp_path):
    argv = ["--set", "precise_bn_batches=3", "--out", str(tmp_path / "o")]
    assert experiment_main("mnist_mlp")(argv) == 2
    assert "unknown config key 'precise_bn_batches'" in capsys.readouterr().err
