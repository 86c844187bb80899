"""The population-statistics study (experiments/population_study) end to end
on its smoke config; its figure and resume are tested in
test_every_experiment.py."""

import pytest

from experiments.common.run import read_state
from experiments.population_study import main as population_study
from experiments.population_study.plots import FIGURES
from tests.experiments.helpers import (
    PNG_SIGNATURE,
    assert_outputs_whole,
    experiment_main,
    requires_tensorflow,
)

pytestmark = requires_tensorflow


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
    for figure in FIGURES:
        assert (out / figure).read_bytes()[:8] == PNG_SIGNATURE
    assert "| precise |" in (out / "summary.md").read_text()
    assert sorted(p.stem for p in (out / "cells").iterdir()) == sorted(
        population_study.CELLS
    )
    assert read_state(out)["state"] == "complete"
    assert_outputs_whole(out)


def test_study_keys_are_unknown_to_the_main_experiment(capsys, tmp_path):
    argv = ["--set", "precise_bn_batches=3", "--out", str(tmp_path / "o")]
    assert experiment_main("mnist_mlp")(argv) == 2
    assert "unknown config key 'precise_bn_batches'" in capsys.readouterr().err
