"""Tests for experiments.common.config: defaults, TOML overrides, --set, errors."""

from pathlib import Path

import pytest

from experiments.common.config import (
    CONFIG_DIR,
    DEFAULTS,
    STUDY_DEFAULTS,
    SWEEP_DEFAULTS,
    ConfigError,
    check_data_size,
    config_from_mapping,
    load_config,
)

# Each shipped config and the defaults of the experiment that reads it: each
# experiment's configs are named after it, the rest are mnist_mlp's.
SHIPPED = sorted(CONFIG_DIR.glob("*.toml"))


def _defaults_for(path):
    if path.name.startswith("population_study"):
        return STUDY_DEFAULTS
    if path.name.startswith("lr_sweep"):
        return SWEEP_DEFAULTS
    if path.name.startswith("sequential_mnist"):
        from experiments.sequential_mnist import DEFAULTS as SEQUENTIAL_DEFAULTS

        return SEQUENTIAL_DEFAULTS
    if path.name.startswith("lenet_bn"):
        from experiments.lenet_bn import DEFAULTS as LENET_DEFAULTS

        return LENET_DEFAULTS
    return DEFAULTS


def test_defaults_are_the_figure_1_reproduction():
    config = load_config()
    assert config == DEFAULTS
    assert config["hidden_units"] == [100, 100]
    assert config["steps"] == 40000 and config["batch_size"] == 60
    assert config["learning_rate"] == 0.01 and config["bn_momentum"] == 0.999


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_and_only_override(path):
    defaults = _defaults_for(path)
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
        (["seed=-1"], "'seed' must hold seeds from 0 to 2**32 - 1"),
        (["seed=4294967296"], "Received: 4294967296"),
        (["learning_rate=inf"], "'learning_rate' must hold finite numbers"),
        (["learning_rate=nan"], "'learning_rate' must hold finite numbers"),
        (["learning_rate=-inf"], "'learning_rate' must hold finite numbers"),
        (["init_stddev=inf"], "'init_stddev' must hold finite numbers"),
        (["bn_epsilon=inf"], "'bn_epsilon' must hold finite numbers"),
        (["neurons=[1, 1]"], "'neurons' lists 1 more than once"),
        (
            ["train_examples=100", "batch_size=200"],
            "'batch_size' (200) is larger than the 100 training examples used",
        ),
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


def test_unusable_config_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder"):
        load_config(tmp_path)
    latin = tmp_path / "latin.toml"
    latin.write_bytes("# caf\xe9\nsteps = 100\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(latin)


def test_sweep_lists_are_checked():
    for overrides, message in [
        (["seeds=[0, 0]"], "'seeds' lists 0 more than once"),
        (["seeds=[-3]"], "'seeds' must hold seeds from 0"),
        (["learning_rates=[0.1, inf]"], "'learning_rates' must hold finite numbers"),
        (["learning_rates=[0.3, 0.3]"], "'learning_rates' lists 0.3 more than once"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_config(overrides=overrides, defaults=SWEEP_DEFAULTS)


def test_data_size_is_checked_against_the_data():
    config = load_config(overrides=["train_examples=100000"])
    with pytest.raises(ConfigError, match="larger than the 60000 training examples"):
        check_data_size(config, 60000, 10000)
    config = load_config(overrides=["batch_size=70"])
    with pytest.raises(ConfigError, match="larger than the 50 training examples"):
        check_data_size(config, 50, 10)
    check_data_size(load_config(), 60000, 10000)


def test_a_recorded_config_is_checked_again():
    config = load_config()
    assert config_from_mapping(config, DEFAULTS, "in config.json") == config
    with pytest.raises(ConfigError, match="lacks the keys seed"):
        config_from_mapping(
            {k: v for k, v in config.items() if k != "seed"}, DEFAULTS, "x"
        )
    with pytest.raises(ConfigError, match="must hold seeds"):
        config_from_mapping({**config, "seed": -1}, DEFAULTS, "x")


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
