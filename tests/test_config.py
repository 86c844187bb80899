"""Tests for experiments.config: defaults, TOML overrides, --set, errors."""

from pathlib import Path

import pytest

from experiments.config import (
    CONFIG_DIR,
    DEFAULTS,
    STUDY_DEFAULTS,
    SWEEP_DEFAULTS,
    ConfigError,
    load_config,
)

# Each shipped config and the defaults of the experiment that reads it.
EXPERIMENT_DEFAULTS = {
    "population_study.toml": STUDY_DEFAULTS,
    "lr_sweep.toml": SWEEP_DEFAULTS,
}
SHIPPED = sorted(CONFIG_DIR.glob("*.toml"))


def test_defaults_are_the_figure_1_reproduction():
    config = load_config()
    assert config == DEFAULTS
    assert config["hidden_units"] == [100, 100]
    assert config["steps"] == 40000 and config["batch_size"] == 60
    assert config["learning_rate"] == 0.01 and config["bn_momentum"] == 0.999


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_and_only_override(path):
    defaults = EXPERIMENT_DEFAULTS.get(path.name, DEFAULTS)
    config = load_config(path, defaults=defaults)
    assert set(config) == set(defaults)
    assert config != defaults


def test_file_then_set_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("steps = 100\neval_every = 10\nhidden_units = [7]\n")
    config = load_config(path, ["steps=200", "bn_impl=keras", "learning_rate=1"])
    assert config["steps"] == 200
    assert config["eval_every"] == 10
    assert config["hidden_units"] == [7]
    assert config["bn_impl"] == "keras"
    assert config["learning_rate"] == 1.0 and isinstance(config["learning_rate"], float)


def test_set_parses_toml_values():
    config = load_config(overrides=["hidden_units=[50, 40]", 'data_source="vendored"'])
    assert config["hidden_units"] == [50, 40]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stepz=10"], "unknown config key 'stepz'"),
        (["steps=ten"], "'steps' in --set steps=ten must be of type int"),
        (["steps=1.5"], "must be of type int"),
        (["learning_rate=true"], "must be of type float"),
        (["hidden_units=[1.5]"], "list of integers"),
        (["bn_impl=torch"], "must be one of ('bn_keras', 'keras')"),
        (["steps"], "--set expects key=value"),
        (["steps=0"], "'steps' must be positive"),
        (["steps=120"], "multiple of 'eval_every'"),
        (["neurons=[100]"], "'neurons' must name neurons of the last hidden layer"),
        (["bn_momentum=1.5"], "'bn_momentum' must be in [0, 1]"),
        (["bn_epsilon=0.0"], "'bn_epsilon' must be positive"),
        (["data_dir=/tmp"], "data_source='dir'"),
        (["batch_size=1"], "'batch_size' must be at least 2"),
    ],
)
def test_bad_overrides_are_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value)


def test_bad_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("steps = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("lr = 0.1\n")
    with pytest.raises(ConfigError, match=f"unknown config key 'lr' in {unknown}"):
        load_config(unknown)


def test_config_dir_is_the_repository_folder():
    assert CONFIG_DIR == Path(__file__).resolve().parents[1] / "configs"


def test_sweep_config_has_lists_instead_of_single_values():
    config = load_config(overrides=["steps=125", "seeds=[4]"], defaults=SWEEP_DEFAULTS)
    assert config["seeds"] == [4] and "seed" not in config
    assert "eval_every" not in config  # the sweep evaluates at the end only
    with pytest.raises(ConfigError, match="unknown config key 'seed'"):
        load_config(overrides=["seed=1"], defaults=SWEEP_DEFAULTS)
    with pytest.raises(ConfigError, match="non-empty list of numbers"):
        load_config(overrides=['learning_rates=["a"]'], defaults=SWEEP_DEFAULTS)
