"""The shift experiment (experiments/shift): test-time adaptation of BN
(source, test-batch statistics, AdaBN, TENT) under MNIST-C-style shifts."""

import keras
import numpy as np
import pytest

import bn_keras
from experiments.common import lenet, shifts
from experiments.common.data import load_mnist, select
from experiments.common.metrics import METRICS_FILE
from experiments.shift import data as sdata
from experiments.shift import main as shift_main
from experiments.shift import methods, study
from experiments.shift.plots import FIGURES, plot_all
from tests.experiments.helpers import (
    assert_outputs_whole,
    one_line,
    requires_tensorflow,
    smoke_config,
    strict_json,
)

pytestmark = requires_tensorflow


@pytest.fixture(scope="module")
def shift_run(smoke_run):
    return smoke_run("shift")


@pytest.fixture(scope="module")
def tiny():
    """An untrained LeNet-BN, a config, and two settings of 16 test images."""
    config = smoke_config("shift")
    keras.utils.set_random_seed(0)
    model = lenet.build_lenet(lambda name: bn_keras.BatchNorm(name=name))
    data = select(load_mnist("vendored"), 0, 16)
    x, y = data.x_test, data.y_test
    settings = [
        sdata.Setting(
            sdata.setting_name(shift, 5),
            shift,
            5,
            lenet.images(shifts.corrupt(x, shift, 5)),
            y,
        )
        for shift in ("brightness", "gaussian_noise")
    ]
    return model, config, settings


def test_end_to_end(shift_run):
    out, metrics = shift_run
    for name in ("config.json", "summary.md", "source_model.keras", *FIGURES):
        assert (out / name).is_file(), name
    assert strict_json(out / "run.json")["state"] == "complete"
    assert_outputs_whole(out)
    # Clean MNIST, every shift of the config at each of its severities, the
    # digits.
    config = metrics["config"]
    names = metrics["settings"]
    assert names[0] == sdata.CLEAN and names[-1] == sdata.DIGITS
    assert names[1:-1] == [
        f"{shift}-{severity}"
        for shift in config["shifts"]
        for severity in config["severities"]
    ]
    assert set(metrics["mean_error_by_severity"]) == {
        str(v) for v in config["severities"]
    }
    for method in methods.METHODS:
        for name in names:
            (value,) = metrics["error"][method][name]
            assert 0.0 <= value <= 100.0
    summary = (out / "summary.md").read_text()
    assert "| **mean over shifts** |" in summary
    assert "all of them BN gamma or beta: yes" in summary
    assert "restored after every method: yes" in summary


def test_source_model_is_good_on_clean_data(shift_run):
    _, metrics = shift_run
    (clean,) = metrics["error"][methods.SOURCE][sdata.CLEAN]
    assert clean < 15.0


def test_new_statistics_undo_a_brightness_shift(shift_run):
    # Brightness moves the first layer's inputs by a constant: statistics of
    # the shifted data take it out, the source statistics do not.
    _, metrics = shift_run
    error = {m: metrics["error"][m]["brightness-5"][0] for m in methods.METHODS}
    assert error[methods.SOURCE] > 50.0
    for method in (methods.BATCH_STATS, methods.ADABN, methods.TENT_ONLINE):
        assert error[method] < error[methods.SOURCE] - 30.0, method


def test_batch_of_one_is_refused_and_the_rest_measured(shift_run):
    _, metrics = shift_run
    curve = metrics["curve"]
    assert curve["batch_sizes"] == metrics["config"]["curve_batch_sizes"]
    assert curve["batch_sizes"][0] == 1 and len(curve["batch_sizes"]) > 1
    for method in methods.CURVE_METHODS:
        values = curve["error"][method]
        assert values[0] == [None]
        assert all(v is not None and 0.0 <= v <= 100.0 for (v,) in values[1:])
        assert "1" in curve["refused"][method]
    assert "2 or more examples" in curve["refused"][methods.TENT_ONLINE]["1"]
    assert "single value" in curve["refused"][methods.BATCH_STATS]["1"]


def test_tent_changed_only_gamma_and_beta(shift_run):
    _, metrics = shift_run
    changed = metrics["tent_changed"]
    # Four BN layers, each with a gamma and a beta.
    assert len(changed) == 8
    assert {path.rsplit("/", 1)[-1] for path in changed} == {"gamma", "beta"}
    assert metrics["restored"] == [True]


def test_figures_are_drawn_from_the_metrics_file_alone(shift_run, tmp_path):
    out, _ = shift_run
    assert plot_all(out / METRICS_FILE, tmp_path) == [tmp_path / n for n in FIGURES]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FIGURES)
    assert_outputs_whole(tmp_path)


def test_saved_source_model_gives_the_same_errors(shift_run):
    out, metrics = shift_run
    config = {**metrics["config"], "source_model": str(out / "source_model.keras")}
    model, seconds = study.source_model(config, None, 0)
    assert seconds == 0.0
    data = select(load_mnist("vendored"), 0, config["test_examples"])
    (clean,) = sdata.make_settings(data, {**config, "shifts": [], "digits": False}, 0)
    errors = methods.errors(model, methods.SOURCE, [clean], 50, config)
    assert errors[sdata.CLEAN] == metrics["error"][methods.SOURCE][sdata.CLEAN][0]


@pytest.mark.parametrize("method", methods.METHODS)
def test_every_method_leaves_the_source_model(tiny, method):
    model, config, settings = tiny
    before = methods.snapshot(model)
    methods.errors(model, method, settings, 8, config)
    assert methods.changed(before, methods.snapshot(model)) == []


@pytest.mark.parametrize("method", [methods.ADABN, methods.TENT_ONLINE])
def test_each_setting_starts_from_the_source_model(tiny, method):
    # AdaBN restores the source statistics, TENT resets gamma and beta (and
    # Adam) between settings: the second setting's error does not depend on
    # the first having been adapted to.
    model, config, settings = tiny
    together = methods.errors(model, method, settings, 8, config)
    alone = methods.errors(model, method, settings[1:], 8, config)
    assert together[settings[1].name] == alone[settings[1].name]


def test_tent_changes_gamma_and_beta_and_nothing_else(tiny):
    model, config, settings = tiny
    before = methods.snapshot(model)
    observe = {}
    methods.errors(model, methods.TENT_ONLINE, settings, 8, config, observe)
    gammas_betas = {
        v.path
        for layer in bn_keras.batch_norm_layers(model)
        for v in (layer.gamma, layer.beta)
    }
    assert set(observe["changed"]) == gammas_betas
    assert set(before["values"]) > gammas_betas


def test_adabn_uses_the_shifted_statistics(tiny):
    # The layer after conv1 sees the brightness as a shift of its mean: AdaBN
    # measures the shifted mean, and puts the source mean back after.
    model, config, settings = tiny
    layer = model.get_layer("conv1_bn")
    source_mean = keras.ops.convert_to_numpy(layer.moving_mean).copy()
    saved = bn_keras.adapt_statistics(
        model, settings[0].x, batch_size=8, progress=False
    )
    adapted = keras.ops.convert_to_numpy(layer.moving_mean).copy()
    bn_keras.restore_statistics(model, saved)
    assert not np.allclose(adapted, source_mean)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer.moving_mean), source_mean
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("shifts=['snow']", "unknown shifts ['snow']"),
        ("severities=[6]", "severities from 1 to 5"),
        ("test_batch_size=1", "'test_batch_size' must be at least 2"),
        ("test_batch_size=199", "leave a last batch of one example"),
        ("curve_examples=41", "leaves a last batch of one example"),
        ("source_model='missing.keras'", "'source_model' must name a saved"),
        ("source_statistics='median'", "must be one of"),
    ],
)
def test_cli_errors(capsys, tmp_path, override, message):
    argv = ["--config", "smoke", "--set", override, "--out", str(tmp_path / "r")]
    assert shift_main.main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert message in err, err
    assert not (tmp_path / "r").exists()
