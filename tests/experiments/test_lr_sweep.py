"""The learning-rate sweep (experiments/lr_sweep) end to end on its smoke
config; its figure and resume are tested in test_every_experiment.py."""

import pytest

from experiments.common.run import read_state
from experiments.lr_sweep import main as lr_sweep
from experiments.lr_sweep.plots import FIGURES
from tests.experiments.helpers import (
    PNG_SIGNATURE,
    assert_outputs_whole,
    requires_tensorflow,
)

pytestmark = requires_tensorflow


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
    for figure in FIGURES:
        assert (out / figure).read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.stem for p in (out / "cells").iterdir()) == sorted(
        lr_sweep.cell_key(lr, seed) for lr in (0.01, 0.1) for seed in (0, 1)
    )
    assert read_state(out)["state"] == "complete"
    assert_outputs_whole(out)
