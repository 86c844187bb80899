"""The learning-rate sweep (experiments/lr_sweep) end to end on its smoke
config, interrupted and resumed."""

import pytest

from experiments.common.metrics import METRICS_FILE
from experiments.common.run import TEST_SIGNAL_VAR, read_state
from experiments.lr_sweep import main as lr_sweep
from experiments.lr_sweep.plots import plot_all
from tests.experiments.helpers import (
    PNG_SIGNATURE,
    assert_outputs_whole,
    one_line,
    strict_json,
    tensorflow_only,
    without_timings,
)

pytestmark = tensorflow_only


@pytest.fixture(scope="module")
def sweep(smoke_run):
    return smoke_run("lr_sweep")


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
    assert (out / "lr_sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.stem for p in (out / "cells").iterdir()) == sorted(
        lr_sweep.cell_key(lr, seed) for lr in (0.01, 0.1) for seed in (0, 1)
    )
    assert read_state(out)["state"] == "complete"
    assert_outputs_whole(out)


def test_figure_is_drawn_from_the_metrics_file_alone(sweep, tmp_path):
    out, _ = sweep
    assert plot_all(out / METRICS_FILE, tmp_path) == tmp_path / "lr_sweep.png"
    assert [p.name for p in tmp_path.iterdir()] == ["lr_sweep.png"]
    assert_outputs_whole(tmp_path)


def test_interrupted_sweep_resumes_to_the_same_numbers(
    sweep, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    argv = ["--config", "smoke", "--out", str(out), "--quiet"]
    monkeypatch.setenv(TEST_SIGNAL_VAR, "cell lr0.01-seed1:SIGINT")
    assert lr_sweep.main(argv) == 130
    err = one_line(capsys.readouterr().err)
    assert f"continue with: python -m experiments.lr_sweep --resume {out}" in err
    state = read_state(out)
    assert state["state"] == "interrupted" and state["cells_done"] == 2
    assert not (out / "metrics.json").exists()
    assert_outputs_whole(out)
    monkeypatch.delenv(TEST_SIGNAL_VAR)
    assert lr_sweep.main(["--resume", str(out), "--quiet"]) == 0
    resumed = strict_json(out / "metrics.json")
    assert resumed["cells_from_earlier_sessions"] == 2
    assert without_timings(resumed) == without_timings(sweep.metrics)
    state = read_state(out)
    assert state["state"] == "complete" and state["sessions"] == 2
    # A complete run is not resumed again.
    assert lr_sweep.main(["--resume", str(out)]) == 2
    assert "already complete" in capsys.readouterr().err


def test_resume_refuses_a_run_of_another_experiment(smoke_run, capsys):
    out, _ = smoke_run("population_study")
    assert lr_sweep.main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and "population_study" in err
