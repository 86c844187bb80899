"""Experiment configuration: one flat block of defaults, TOML files that override.

The defaults are this project's reproduction of the paper's Figure 1 (two
hidden layers, N(0, 1) weights, 40,000 steps; configs/paper.toml has the
network the paper's text describes). A config file (TOML) and then
`--set key=value` options override them; an unknown key or a value of the
wrong type is an error, never a silent default.
"""

import json
import math
import tomllib
from pathlib import Path

from experiments.data import DATASETS

DEFAULTS = {
    # Reproducibility: the initial weights and the mini-batch sequence.
    "seed": 0,
    # Figure 1 over several seeds, trained together (each its own draw and
    # mini-batches); `seed` is the first of them, whose networks are saved.
    # Setting one of the two sets the other: seed=3 is seeds=[3].
    "seeds": [0],
    # The network: 784 inputs, sigmoid hidden layers, 10 softmax outputs.
    "hidden_units": [100, 100],
    # Deliberately unscaled N(0, init_stddev) weights: where BN's effect shows.
    "init_stddev": 1.0,
    # Plain SGD on the cross-entropy summed over the mini-batch.
    "learning_rate": 0.01,
    "batch_size": 60,
    "steps": 40000,
    # Evaluate on the whole test set every this many steps (and at step 0).
    "eval_every": 50,
    # Batch normalization: which layer, and its population statistics.
    "bn_impl": "bn_keras",
    "bn_momentum": 0.999,
    "bn_epsilon": 1e-3,
    # Neurons of the last hidden layer whose sigmoid inputs are recorded.
    "neurons": [0, 1, 2, 3, 4],
    # Data: "auto" ($BN_KERAS_MNIST_DIR if set, else "vendored"), "vendored"
    # (data/mnist), "dir" (data_dir), or "tfds" (already prepared; no download).
    "data_source": "auto",
    "data_dir": "",
    # Check the MD5 of each IDX file against the published sums.
    "data_verify": True,
    # Use only the first N training / test examples (0: all); for smoke tests.
    "train_examples": 0,
    "test_examples": 0,
    # "fast": many steps per compiled call; "simple": one call per step.
    "loop": "fast",
    # "shared": one evaluation call for everything; "separate": one per
    # network and mode, as a straightforward script does (the speed baseline).
    "evaluation": "shared",
}

# The population-statistics study (experiments.population_study) adds:
STUDY_DEFAULTS = {
    **{k: v for k, v in DEFAULTS.items() if k != "seeds"},
    # Training batches over which precise BN recomputes the statistics.
    "precise_bn_batches": 50,
}

# The learning-rate sweep (experiments.lr_sweep) replaces the single seed and
# learning rate with lists, and evaluates at the end of each run only:
SWEEP_DEFAULTS = {
    **{
        k: v
        for k, v in DEFAULTS.items()
        if k not in ("seed", "learning_rate", "eval_every")
    },
    "learning_rates": [0.01, 0.03, 0.1, 0.3, 1.0],
    "seeds": [0, 1, 2],
}

CHOICES = {
    "bn_impl": ("bn_keras", "keras"),
    "data_source": ("auto", "vendored", "dir", "tfds"),
    "dataset": DATASETS,
    "loop": ("fast", "simple"),
    "evaluation": ("shared", "separate"),
}

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# Seeds feed NumPy's and Keras' generators, which take 32-bit unsigned seeds.
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says why."""


def load_config(path=None, overrides=(), defaults=DEFAULTS):
    """Returns `defaults`, updated by the TOML file at `path` and `overrides`.

    Args:
        path: Optional path of a TOML file of `key = value` lines.
        overrides: `key=value` strings; values are parsed as TOML values
            (`steps=100`, `hidden_units=[50, 50]`, `bn_impl="keras"`), and a
            bare word is taken as a string (`bn_impl=keras`).
        defaults: The experiment's defaults; they define the known keys.
    """
    config = dict(defaults)
    if path is not None:
        path = Path(path)
        values = read_config_file(path)
        for key, value in values.items():
            config[key] = _checked(key, value, f"in {path}", defaults)
        _link_seeds(config, values)
    for item in overrides:
        key, value = _parse_override(item)
        config[key] = _checked(key, value, f"in --set {item}", defaults)
        _link_seeds(config, (key,))
    _validate(config)
    return config


def _link_seeds(config, given):
    """Where the defaults have both, `seed` is the first of `seeds`: setting
    one sets the other (seed=3 is seeds=[3]); setting both, they must agree."""
    if not {"seed", "seeds"} <= config.keys():
        return
    if "seed" in given and "seeds" not in given:
        config["seeds"] = [config["seed"]]
    elif "seeds" in given and "seed" not in given:
        config["seed"] = config["seeds"][0]


def config_from_mapping(values, defaults, where):
    """Checks a whole config read back (a run's config.json) like a new one.

    Raises:
        ConfigError: A key is unknown or missing, or a value is invalid.
    """
    missing = sorted(set(defaults) - set(values))
    if missing:
        raise ConfigError(f"config {where} lacks the keys {', '.join(missing)}")
    config = {
        key: _checked(key, value, where, defaults) for key, value in values.items()
    }
    _validate(config)
    return config


def read_config_file(path):
    """The `key = value` table of the TOML file at `path`; ConfigError if unusable."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist; the shipped ones are in {CONFIG_DIR}"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"config file {path} is a folder; give a .toml file such as "
            f"{CONFIG_DIR / 'smoke.toml'}"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {e.start}); a config is "
            "a TOML file of key = value lines"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _parse_override(item):
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value. Received: {item!r}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def _checked(key, value, where, defaults):
    if key not in defaults:
        from_file = not where.startswith("in --set")
        hint = " (is it a config for another experiment?)" if from_file else ""
        raise ConfigError(
            f"unknown config key {key!r} {where}{hint}; known keys: "
            f"{', '.join(sorted(defaults))}"
        )
    default = defaults[key]
    if (
        isinstance(default, float)
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        value = float(value)
    if type(value) is not type(default):
        raise ConfigError(
            f"config key {key!r} {where} must be of type "
            f"{type(default).__name__} (like {json.dumps(default)}). "
            f"Received: {value!r}"
        )
    if isinstance(default, list):
        value = _checked_list(key, value, where, type(default[0]))
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(
            f"config key {key!r} {where} must be one of {CHOICES[key]}. "
            f"Received: {value!r}"
        )
    return value


def _checked_list(key, values, where, kind):
    if kind is float:
        values = [float(v) if type(v) is int else v for v in values]
    if not values or not all(type(v) is kind for v in values):
        raise ConfigError(
            f"config key {key!r} {where} must be a non-empty list of "
            f"{'integers' if kind is int else 'numbers'}. Received: {values!r}"
        )
    return values


def _validate(config):
    """Checks that need the whole config; raises ConfigError naming the key."""
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(
                f"config key {key!r} must hold finite numbers. Received: {value!r}"
            )
    positive = ("batch_size", "steps", "eval_every", "learning_rate", "init_stddev")
    for key in positive:
        if key in config and not config[key] > 0:
            raise ConfigError(
                f"config key {key!r} must be positive. Received: {config[key]!r}"
            )
    for key in ("seed", "seeds"):
        values = config.get(key, [])
        values = values if isinstance(values, list) else [values]
        if not all(0 <= v <= MAX_SEED for v in values):
            raise ConfigError(
                f"config key {key!r} must hold seeds from 0 to 2**32 - 1 = "
                f"{MAX_SEED}. Received: {config[key]!r}"
            )
    for key in ("seeds", "learning_rates", "neurons"):
        values = config.get(key, [])
        if len(set(values)) != len(values):
            repeated = sorted({v for v in values if values.count(v) > 1})
            raise ConfigError(
                f"config key {key!r} lists {repeated[0]!r} more than once; each "
                f"value counts once. Received: {config[key]!r}"
            )
    if "seed" in config and "seeds" in config and config["seeds"][0] != config["seed"]:
        raise ConfigError(
            f"config keys 'seed' ({config['seed']}) and 'seeds' "
            f"({config['seeds']}) disagree: 'seed' is the first of 'seeds'; set "
            "only one of them"
        )
    if "hidden_units" in config and min(config["hidden_units"]) < 1:
        raise ConfigError(
            "config key 'hidden_units' must list at least one positive layer "
            f"size. Received: {config['hidden_units']!r}"
        )
    if not 0.0 <= config["bn_momentum"] <= 1.0:
        raise ConfigError(
            f"config key 'bn_momentum' must be in [0, 1]. Received: "
            f"{config['bn_momentum']!r}"
        )
    if not config["bn_epsilon"] > 0:
        raise ConfigError(
            f"config key 'bn_epsilon' must be positive. Received: "
            f"{config['bn_epsilon']!r}"
        )
    last = config.get("hidden_units", [0])[-1]
    bad = [n for n in config.get("neurons", []) if not 0 <= n < last]
    if bad:
        raise ConfigError(
            f"config key 'neurons' must name neurons of the last hidden layer, "
            f"0 to {last - 1}. Received: {config['neurons']!r}"
        )
    if config["batch_size"] < 2:
        raise ConfigError(
            "config key 'batch_size' must be at least 2: batch norm in training "
            f"mode needs two examples to normalize. Received: {config['batch_size']}"
        )
    steps = config.get("steps", 1)
    if steps % config.get("eval_every", steps):
        raise ConfigError(
            f"config key 'steps' ({config['steps']}) must be a multiple of "
            f"'eval_every' ({config.get('eval_every')})"
        )
    for key in ("train_examples", "test_examples"):
        if config[key] < 0:
            raise ConfigError(
                f"config key {key!r} must be >= 0 (0: all). Received: {config[key]!r}"
            )
    if 0 < config["train_examples"] < config["batch_size"]:
        _batch_too_large(config, config["train_examples"])
    if min(config.get("learning_rates", [1.0])) <= 0:
        raise ConfigError(
            f"config key 'learning_rates' must be positive. Received: "
            f"{config['learning_rates']!r}"
        )
    if config.get("precise_bn_batches", 1) < 1:
        raise ConfigError(
            f"config key 'precise_bn_batches' must be positive. Received: "
            f"{config['precise_bn_batches']!r}"
        )
    if config["data_source"] in ("vendored", "auto") and config["data_dir"]:
        raise ConfigError(
            f"config key 'data_dir' is set but 'data_source' is "
            f"{config['data_source']!r}; use data_source='dir' (or --data-dir) to "
            "read your own folder"
        )


def _batch_too_large(config, available):
    raise ConfigError(
        f"config key 'batch_size' ({config['batch_size']}) is larger than the "
        f"{available} training examples used; a mini-batch would repeat "
        "examples. Lower batch_size or raise train_examples"
    )


def check_data_size(config, num_train, num_test):
    """Checks the config against the data actually loaded.

    Args:
        config: A validated config.
        num_train: Number of training examples the source holds.
        num_test: Number of test examples the source holds.

    Raises:
        ConfigError: `train_examples` or `test_examples` asks for more
            examples than there are, or `batch_size` exceeds the training
            examples used.
    """
    for key, available, split in (
        ("train_examples", num_train, "training"),
        ("test_examples", num_test, "test"),
    ):
        if config[key] > available:
            raise ConfigError(
                f"config key {key!r} ({config[key]}) is larger than the "
                f"{available} {split} examples of the data; use at most "
                f"{available} (0: all)"
            )
    used = config["train_examples"] or num_train
    if config["batch_size"] > used:
        _batch_too_large(config, used)
