"""What the experiments share, tested on each one's smoke run: every metrics
file records the environment; the resumable experiments (lr_sweep,
population_study) draw their figure from the metrics file alone, resume an
interrupted run to the same numbers, and refuse to resume another's run."""

import importlib
import typing

import pytest

from experiments.common.metrics import METRICS_FILE, environment
from experiments.common.run import TEST_SIGNAL_VAR, read_state
from experiments.lr_sweep.main import cell_key
from experiments.population_study.main import CELLS
from tests.experiments.helpers import (
    EXPERIMENTS,
    assert_outputs_whole,
    one_line,
    requires_tensorflow,
    strict_json,
    without_timings,
)

pytestmark = requires_tensorflow


class Interruption(typing.NamedTuple):
    """How a resumable experiment's smoke run is stopped, and what it says."""

    cells: tuple  # the smoke run's cells, in the order they are trained
    cell_of: typing.Callable  # train_cell's positional arguments -> its cell
    signal: str  # the TEST_SIGNAL_VAR value, "point:SIGNAL"
    armed_in: str | None  # the cell whose start sets it; None: from the start
    started: int  # the cells the first session begins
    status: int
    where: str  # what the one line says


RESUMABLE = {
    # Ctrl-C between cells, once the second is written.
    "lr_sweep": Interruption(
        cells=tuple(cell_key(lr, seed) for lr in (0.01, 0.1) for seed in (0, 1)),
        cell_of=lambda config, data, learning_rate, seed, *rest: cell_key(
            learning_rate, seed
        ),
        signal="cell lr0.01-seed1:SIGINT",
        armed_in=None,
        started=2,
        status=130,
        # Nothing after "cells done": the finished cell's training step is
        # not where the run stopped.
        where="interrupted by Ctrl-C (SIGINT) at 2 of 4 cells done;",
    ),
    # SIGTERM in the middle of the third cell's training.
    "population_study": Interruption(
        cells=CELLS,
        cell_of=lambda name, *rest: name,
        signal="step 100:SIGTERM",
        armed_in="debiased_ema",
        started=3,
        status=143,
        where=(
            "interrupted by SIGTERM at cell 3 of 5 (debiased_ema), training step 100"
        ),
    ),
}


def _main(name):
    return importlib.import_module(f"experiments.{name}.main")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_metrics_record_the_environment(smoke_run, name):
    """`RunDir.write_outputs` adds it for every experiment, TensorFlow's
    version included (each run trained with it)."""
    import tensorflow as tf

    recorded = smoke_run(name).metrics["environment"]
    assert recorded == environment()
    assert recorded["tensorflow"] == tf.__version__


@pytest.mark.parametrize("name", RESUMABLE)
def test_figure_is_drawn_from_the_metrics_file_alone(smoke_run, name, tmp_path):
    plots = importlib.import_module(f"experiments.{name}.plots")
    (figure,) = plots.FIGURES
    out, _ = smoke_run(name)
    assert plots.plot_all(out / METRICS_FILE, tmp_path) == tmp_path / figure
    assert [p.name for p in tmp_path.iterdir()] == [figure]
    assert_outputs_whole(tmp_path)


@pytest.mark.parametrize("name", RESUMABLE)
def test_interrupted_run_resumes_to_the_same_numbers(
    smoke_run, name, tmp_path, monkeypatch, capsys
):
    spec, module = RESUMABLE[name], _main(name)
    complete = smoke_run(name).metrics
    out = tmp_path / "run"
    calls, armed = [], {spec.armed_in}
    original = module.train_cell

    def train_cell(*args, **kwargs):
        cell = spec.cell_of(*args)
        calls.append(cell)
        if cell in armed:
            monkeypatch.setenv(TEST_SIGNAL_VAR, spec.signal)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "train_cell", train_cell)
    if spec.armed_in is None:
        monkeypatch.setenv(TEST_SIGNAL_VAR, spec.signal)
    assert module.main(["--config", "smoke", "--out", str(out), "--quiet"]) == (
        spec.status
    )
    err = one_line(capsys.readouterr().err)
    assert spec.where in err
    assert f"continue with: python -m experiments.{name} --resume {out}" in err
    assert calls == list(spec.cells[: spec.started])
    state = read_state(out)
    assert state["state"] == "interrupted" and state["cells_done"] == 2
    assert sorted(p.stem for p in (out / "cells").iterdir()) == sorted(spec.cells[:2])
    assert not (out / METRICS_FILE).exists()
    assert_outputs_whole(out)

    monkeypatch.delenv(TEST_SIGNAL_VAR)
    armed.clear()
    calls.clear()
    assert module.main(["--resume", str(out), "--quiet"]) == 0
    assert calls == list(spec.cells[2:])
    resumed = strict_json(out / METRICS_FILE)
    assert resumed["cells_from_earlier_sessions"] == 2
    assert without_timings(resumed) == without_timings(complete)
    state = read_state(out)
    assert state["state"] == "complete" and state["sessions"] == 2
    # A complete run is not resumed again.
    assert module.main(["--resume", str(out)]) == 2
    assert "already complete" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, other", [("lr_sweep", "population_study"), ("population_study", "lr_sweep")]
)
def test_resume_refuses_a_run_of_another_experiment(smoke_run, name, other, capsys):
    out, _ = smoke_run(other)
    assert _main(name).main(["--resume", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("error: cannot resume") and other in err
    assert read_state(out)["state"] == "complete"
