"""Tests for experiments/common/config.py: each experiment's defaults, TOML
overrides and --set against its Schema, shipped configs by name, errors."""

import importlib

import pytest

from experiments.common.config import (
    ConfigError,
    check_data_size,
    check_precise_bn_sample,
    config_from_mapping,
    load_config,
    shipped_configs,
)
from tests.experiments.helpers import (
    EXPERIMENTS,
    EXPERIMENTS_DIR,
    schema,
    smoke_config,
)

MNIST_MLP = schema("mnist_mlp")
POPULATION_STUDY = schema("population_study")
LR_SWEEP = schema("lr_sweep")
# Every shipped config, as (experiment, name).
SHIPPED = [
    (name, config)
    for name in EXPERIMENTS
    for config in shipped_configs(schema(name).configs_dir)
]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_experiment_loads_its_own_defaults(name):
    config_schema = schema(name)
    defaults = importlib.import_module(f"experiments.{name}.config").DEFAULTS
    assert config_schema.defaults is defaults
    assert load_config(config_schema) == defaults


def test_defaults_are_the_figure_1_reproduction():
    config = load_config(MNIST_MLP)
    assert config["hidden_units"] == [100, 100]
    assert config["steps"] == 40000 and config["batch_size"] == 60
    assert config["learning_rate"] == 0.01 and config["bn_momentum"] == 0.999
    assert config["seed"] == 0 and config["seeds"] == [0]


def test_study_and_sweep_defaults_are_their_full_runs():
    """The defaults are the full study and sweep; their smoke configs shrink them."""
    study = load_config(POPULATION_STUDY)
    assert study["steps"] == 10000 and study["precise_bn_batches"] == 50
    assert study["hidden_units"] == [100, 100] and study["eval_every"] == 50
    sweep = load_config(LR_SWEEP)
    assert sweep["steps"] == 10000
    assert sweep["learning_rates"] == [0.01, 0.03, 0.1, 0.3, 1.0]
    assert sweep["seeds"] == [0, 1, 2]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_configs_dir_is_the_experiment_packages_folder(name):
    configs_dir = schema(name).configs_dir
    assert configs_dir.resolve() == (EXPERIMENTS_DIR / name / "configs").resolve()
    assert "smoke" in shipped_configs(configs_dir)


@pytest.mark.parametrize("name, config", SHIPPED, ids="/".join)
def test_shipped_configs_load_and_only_override(name, config):
    config_schema = schema(name)
    loaded = load_config(config_schema, config)
    assert loaded == load_config(
        config_schema, config_schema.configs_dir / f"{config}.toml"
    )
    assert set(loaded) == set(config_schema.defaults)
    assert loaded != config_schema.defaults
    # Runnable on the full data set, as far as the config alone can tell.
    check_data_size(loaded, 60000, 10000)
    check = importlib.import_module(f"experiments.{name}.main").EXPERIMENT.check
    if check is not None:
        check(loaded, loaded["train_examples"] or 60000)


@pytest.mark.parametrize("given", ["smoke", "smoke.toml"])
def test_a_bare_name_is_a_shipped_config(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = MNIST_MLP.configs_dir / "smoke.toml"
    assert load_config(MNIST_MLP, given) == load_config(MNIST_MLP, shipped)
    assert load_config(MNIST_MLP, given)["steps"] == 200


def test_a_file_of_that_name_here_is_read_instead(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke.toml").write_text("steps = 100\n")
    assert load_config(MNIST_MLP, "smoke.toml")["steps"] == 100
    # A path with a folder is never looked up among the shipped configs.
    with pytest.raises(ConfigError, match="config file configs/smoke.toml does not"):
        load_config(MNIST_MLP, "configs/smoke.toml")


@pytest.mark.parametrize(
    "name, listed",
    [
        ("mnist_mlp", "five_seeds, paper, smoke"),
        ("sequential_mnist", "permuted, pixels, smoke"),
        ("lr_sweep", "smoke"),
    ],
)
def test_an_unknown_name_lists_the_shipped_configs(name, listed):
    config_schema = schema(name)
    with pytest.raises(ConfigError) as info:
        load_config(config_schema, "nope")
    message = str(info.value)
    assert message.startswith(
        f"config file nope does not exist; this experiment ships {listed} "
    )
    assert str(config_schema.configs_dir / "smoke.toml") in message
    assert "\n" not in message


def test_file_then_set_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("steps = 100\neval_every = 10\nhidden_units = [7]\n")
    config = load_config(
        MNIST_MLP, path, ["steps=200", "bn_impl=keras", "learning_rate=1"]
    )
    assert config["steps"] == 200
    assert config["eval_every"] == 10
    assert config["hidden_units"] == [7]
    assert config["bn_impl"] == "keras"
    assert config["learning_rate"] == 1.0 and isinstance(config["learning_rate"], float)


def test_set_parses_toml_values():
    config = load_config(
        MNIST_MLP, overrides=["hidden_units=[50, 40]", 'data_source="vendored"']
    )
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
        load_config(MNIST_MLP, overrides=overrides)
    assert message in str(info.value)


def test_momentum_one_only_where_no_debiased_average_is_taken():
    assert load_config(MNIST_MLP, overrides=["bn_momentum=1.0"])["bn_momentum"] == 1
    with pytest.raises(ConfigError, match="debiased moving averages need momentum < 1"):
        load_config(POPULATION_STUDY, overrides=["bn_momentum=1.0"])


def test_bad_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(MNIST_MLP, tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("steps = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(MNIST_MLP, broken)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("lr = 0.1\n")
    with pytest.raises(ConfigError, match=f"unknown config key 'lr' in {unknown}"):
        load_config(MNIST_MLP, unknown)


def test_unusable_config_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder"):
        load_config(MNIST_MLP, tmp_path)
    latin = tmp_path / "latin.toml"
    latin.write_bytes("# caf\xe9\nsteps = 100\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(MNIST_MLP, latin)


def test_sweep_lists_are_checked():
    for overrides, message in [
        (["seeds=[0, 0]"], "'seeds' lists 0 more than once"),
        (["seeds=[-3]"], "'seeds' must hold seeds from 0"),
        (["learning_rates=[0.1, inf]"], "'learning_rates' must hold finite numbers"),
        (["learning_rates=[0.3, 0.3]"], "'learning_rates' lists 0.3 more than once"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_config(LR_SWEEP, overrides=overrides)


def test_data_size_is_checked_against_the_data():
    config = load_config(MNIST_MLP, overrides=["train_examples=100000"])
    with pytest.raises(ConfigError, match="larger than the 60000 training examples"):
        check_data_size(config, 60000, 10000)
    config = load_config(MNIST_MLP, overrides=["batch_size=70"])
    with pytest.raises(ConfigError, match="larger than the 50 training examples"):
        check_data_size(config, 50, 10)
    check_data_size(load_config(MNIST_MLP), 60000, 10000)


def test_precise_bn_sample_is_checked_against_the_examples_available():
    config = {"precise_bn_batches": 4, "batch_size": 25}
    check_precise_bn_sample(config, 100, "used")  # exactly enough
    with pytest.raises(ConfigError) as info:
        check_precise_bn_sample(config, 99, "in the pool")
    assert str(info.value) == (
        "precise BN draws precise_bn_batches * batch_size = 100 training "
        "examples, more than the 99 in the pool; lower 'precise_bn_batches'. "
        "Received: precise_bn_batches=4"
    )


# The experiments that recompute population statistics from training
# examples: (name, the training examples that just serve its smoke config's
# precise BN sample, what the error says with one fewer).
PRECISE_BN = [
    # 5 batches of 60, from the training examples used.
    ("population_study", 300, "300 training examples, more than the 299 used"),
    # 5 batches of 20, from what the 100 validation sequences leave.
    (
        "sequential_mnist",
        200,
        "100 training examples, more than the 99 left after validation",
    ),
]


@pytest.mark.parametrize("name, enough, says", PRECISE_BN)
def test_precise_bn_sample_beyond_the_training_examples(name, enough, says):
    config = smoke_config(name)
    check_data = importlib.import_module(f"experiments.{name}.config").check_data
    experiment = importlib.import_module(f"experiments.{name}.main").EXPERIMENT
    assert experiment.check is check_data
    check_data(config, enough)
    with pytest.raises(ConfigError) as info:
        check_data(config, enough - 1)
    assert str(info.value) == (
        f"precise BN draws precise_bn_batches * batch_size = {says}; lower "
        "'precise_bn_batches'. Received: precise_bn_batches=5"
    )


def test_a_recorded_config_is_checked_again():
    config = load_config(MNIST_MLP)
    assert config_from_mapping(config, MNIST_MLP, "in config.json") == config
    with pytest.raises(ConfigError, match="lacks the keys seed"):
        config_from_mapping(
            {k: v for k, v in config.items() if k != "seed"}, MNIST_MLP, "x"
        )
    with pytest.raises(ConfigError, match="must hold seeds"):
        config_from_mapping({**config, "seed": -1}, MNIST_MLP, "x")
    with pytest.raises(ConfigError, match="'seed' is the first of 'seeds'"):
        config_from_mapping({**config, "seeds": [1]}, MNIST_MLP, "x")


def test_sweep_config_has_lists_instead_of_single_values():
    config = load_config(LR_SWEEP, overrides=["steps=125", "seeds=[4]"])
    assert config["seeds"] == [4] and "seed" not in config
    assert "eval_every" not in config  # the sweep evaluates at the end only
    with pytest.raises(ConfigError, match="unknown config key 'seed'"):
        load_config(LR_SWEEP, overrides=["seed=1"])
    with pytest.raises(ConfigError, match="non-empty list of numbers"):
        load_config(LR_SWEEP, overrides=['learning_rates=["a"]'])


# Ways of giving `seed` and `seeds` together: (TOML file or None, --set
# overrides). The keys given add up over the file and the overrides.
DISAGREEING = {
    "both in --set": (None, ["seed=4", "seeds=[3]"]),
    "both in --set, seeds first": (None, ["seeds=[3]", "seed=4"]),
    "both in the file": ("seed = 2\nseeds = [0, 2]\n", []),
    "seeds in the file, seed in --set": ("seeds = [5, 6]\n", ["seed=7"]),
    "seed in the file, seeds in --set": ("seed = 5\n", ["seeds=[6, 5]"]),
    "seeds in the shipped file, seed in --set": ("five_seeds", ["seed=3"]),
    "seeds from the file, both in --set": ("seeds = [1]\n", ["seed=1", "seeds=[2]"]),
}
AGREEING = {
    "seed alone": (None, ["seed=3"], 3, [3]),
    "seeds alone": (None, ["seeds=[4, 1]"], 4, [4, 1]),
    "both in --set": (None, ["seeds=[4, 1]", "seed=4"], 4, [4, 1]),
    "both in the file": ("seed = 2\nseeds = [2, 0]\n", [], 2, [2, 0]),
    "seeds in the file, seed in --set": ("seeds = [5, 6]\n", ["seed=5"], 5, [5, 6]),
    "seed in the file, seeds in --set": ("seed = 5\n", ["seeds=[5]"], 5, [5]),
    "seeds in the shipped file": ("five_seeds", [], 0, [0, 1, 2, 3, 4]),
    "set twice, the last wins": (None, ["seed=1", "seed=2"], 2, [2]),
}


def _config_file(text, tmp_path):
    if text is None or "=" not in text:
        return text  # no file, or a shipped config's name
    path = tmp_path / "seeds.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("way", list(DISAGREEING))
def test_seed_and_seeds_that_disagree_are_an_error(way, tmp_path):
    text, overrides = DISAGREEING[way]
    with pytest.raises(ConfigError) as info:
        load_config(MNIST_MLP, _config_file(text, tmp_path), overrides)
    message = str(info.value)
    assert "config keys 'seed' (" in message and ") disagree" in message
    assert "'seed' is the first of 'seeds'; set only one of them" in message


@pytest.mark.parametrize("way", list(AGREEING))
def test_seed_and_seeds_set_each_other(way, tmp_path):
    text, overrides, seed, seeds = AGREEING[way]
    config = load_config(MNIST_MLP, _config_file(text, tmp_path), overrides)
    assert (config["seed"], config["seeds"]) == (seed, seeds)
