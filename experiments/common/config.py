"""Experiment configuration: each experiment's flat defaults, TOML files that override.

Each experiment declares its own `Schema` in its `config.py`: its defaults
(one flat block, composed of the shared blocks below where it shares keys with
others), the choices of its string keys, and `validate`, the checks of its own
keys. A config file (TOML) and then `--set key=value` options override the
defaults; an unknown key or a value of the wrong type is an error, never a
silent default. The checks every experiment needs (finite numbers, the data
keys, the batch size) are done here; the rest of this module are helpers the
experiments' `validate` functions share, so that one rule has one wording.
"""

import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path

from experiments.common.data import DATASETS, SOURCES

# The keys every experiment has: where its data comes from and how much of it.
DATA_DEFAULTS = {
    # Data: "auto" ($BN_KERAS_MNIST_DIR if set, else "vendored"), "vendored"
    # (data/mnist), "dir" (data_dir), or "tfds" (already prepared; no download).
    "data_source": "auto",
    "data_dir": "",
    # Check the MD5 of each IDX file against the published sums.
    "data_verify": True,
    # Use only the first N training / test examples (0: all); for smoke tests.
    "train_examples": 0,
    "test_examples": 0,
}
DATA_CHOICES = {"data_source": SOURCES, "dataset": DATASETS}

# Seeds feed NumPy's and Keras' generators, which take 32-bit unsigned seeds.
MAX_SEED = 2**32 - 1
# TensorFlow counts a tensor's dimensions (units, the steps of one compiled
# chunk) in int32.
MAX_DIMENSION = 2**31 - 1
# The memory a run may use, instead of what the machine has available: bytes,
# with an optional K, M, G or T suffix ("16G"), or "none" for no check.
MEMORY_ENV_VAR = "BN_KERAS_MEMORY_LIMIT"
_MEMORY_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass(frozen=True)
class Schema:
    """One experiment's config keys, their defaults and their checks.

    Attributes:
        defaults: Every key with its default; a key's type is its default's.
            It holds `DATA_DEFAULTS`' keys and `batch_size`.
        configs_dir: The experiment's folder of shipped TOML files, where a
            bare `--config NAME` is looked up.
        choices: The allowed values of string keys, `{key: (value, ...)}`.
        validate: `validate(config)` raises `ConfigError` for values that are
            wrong for this experiment (after the shared checks).
    """

    defaults: Mapping
    configs_dir: Path
    choices: Mapping = dataclasses.field(default_factory=dict)
    validate: Callable | None = None


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says why."""


def load_config(schema, path=None, overrides=()):
    """Returns `schema.defaults`, updated by the TOML file at `path` and `overrides`.

    Args:
        schema: The experiment's `Schema`.
        path: Optional path of a TOML file of `key = value` lines, or the bare
            name of one of the experiment's shipped configs (`"smoke"`).
        overrides: `key=value` strings; values are parsed as TOML values
            (`steps=100`, `hidden_units=[50, 50]`, `bn_impl="keras"`), and a
            bare word is taken as a string (`bn_impl=keras`).

    Raises:
        ConfigError: A key is unknown, a value has the wrong type or is
            invalid, or the file cannot be used; the message says which.
    """
    config = dict(schema.defaults)
    given = set()
    if path is not None:
        path = resolve_config_path(path, schema.configs_dir)
        values = read_config_file(path, schema.configs_dir)
        for key, value in values.items():
            config[key] = _checked(key, value, f"in {path}", schema)
        given |= values.keys()
        _link_seeds(config, given)
    for item in overrides:
        key, value = _parse_override(item)
        config[key] = _checked(key, value, f"in --set {item}", schema)
        given.add(key)
        _link_seeds(config, given)
    validate(config, schema)
    return config


def _link_seeds(config, given):
    """Where the defaults have both, `seed` is the first of `seeds`: setting
    one sets the other (seed=3 is seeds=[3]); setting both, in a file or on
    the command line in any order, they must agree (checked by `validate`)."""
    if not {"seed", "seeds"} <= config.keys():
        return
    if "seed" in given and "seeds" not in given:
        config["seeds"] = [config["seed"]]
    elif "seeds" in given and "seed" not in given:
        config["seed"] = config["seeds"][0]


def config_from_mapping(values, schema, where):
    """Checks a whole config read back (a run's config.json) like a new one.

    Raises:
        ConfigError: A key is unknown or missing, or a value is invalid.
    """
    missing = sorted(set(schema.defaults) - set(values))
    if missing:
        raise ConfigError(f"config {where} lacks the keys {', '.join(missing)}")
    config = {key: _checked(key, value, where, schema) for key, value in values.items()}
    validate(config, schema)
    return config


def resolve_config_path(path, configs_dir):
    """`path` itself, or for a bare name (`smoke`, `smoke.toml`) that is not a
    file here, the shipped config of that name in `configs_dir`."""
    path = Path(path)
    if path.exists() or len(path.parts) != 1:
        return path
    shipped = configs_dir / path.with_suffix(".toml").name
    return shipped if shipped.is_file() else path


def shipped_configs(configs_dir):
    """The names of the TOML files in `configs_dir`, sorted."""
    return sorted(p.stem for p in Path(configs_dir).glob("*.toml"))


def read_config_file(path, configs_dir):
    """The `key = value` table of the TOML file at `path`; ConfigError if unusable."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist; this experiment ships "
            f"{', '.join(shipped_configs(configs_dir))} (give the name, or a "
            f"path such as {configs_dir / 'smoke.toml'})"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"config file {path} is a folder; give a .toml file such as "
            f"{configs_dir / 'smoke.toml'}"
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


def _checked(key, value, where, schema):
    defaults = schema.defaults
    choices = {**DATA_CHOICES, **schema.choices}
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
    if key in choices and value not in choices[key]:
        raise ConfigError(
            f"config key {key!r} {where} must be one of {choices[key]}. "
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


def validate(config, schema):
    """The checks every experiment gets, then the experiment's own.

    Raises:
        ConfigError: A value is invalid; the message names the key.
    """
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(
                f"config key {key!r} must hold finite numbers. Received: {value!r}"
            )
    # `seed` and `seeds` mean the same wherever an experiment has them.
    for key in ("seed", "seeds"):
        values = config.get(key, [])
        values = values if isinstance(values, list) else [values]
        if not all(0 <= v <= MAX_SEED for v in values):
            raise ConfigError(
                f"config key {key!r} must hold seeds from 0 to 2**32 - 1 = "
                f"{MAX_SEED}. Received: {config[key]!r}"
            )
    check_distinct(config, *(k for k in ("seeds",) if k in config))
    if "seed" in config and "seeds" in config and config["seeds"][0] != config["seed"]:
        raise ConfigError(
            f"config keys 'seed' ({config['seed']}) and 'seeds' "
            f"({config['seeds']}) disagree: 'seed' is the first of 'seeds'; set "
            "only one of them"
        )
    if config["batch_size"] < 2:
        raise ConfigError(
            "config key 'batch_size' must be at least 2: batch norm in training "
            f"mode needs two examples to normalize. Received: {config['batch_size']}"
        )
    for key in ("train_examples", "test_examples"):
        if config[key] < 0:
            raise ConfigError(
                f"config key {key!r} must be >= 0 (0: all). Received: {config[key]!r}"
            )
    if 0 < config["train_examples"] < config["batch_size"]:
        _batch_too_large(config, config["train_examples"])
    if config["data_source"] in ("vendored", "auto") and config["data_dir"]:
        raise ConfigError(
            f"config key 'data_dir' is set but 'data_source' is "
            f"{config['data_source']!r}; use data_source='dir' (or --data-dir) to "
            "read your own folder"
        )
    if schema.validate is not None:
        schema.validate(config)


def check_positive(config, *keys):
    """Raises ConfigError unless each of `keys` (a number or a list) is > 0."""
    for key in keys:
        value = config[key]
        if not all(v > 0 for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(
                f"config key {key!r} must be positive. Received: {value!r}"
            )


def check_distinct(config, *keys):
    """Raises ConfigError where one of the lists `keys` repeats a value."""
    for key in keys:
        values = config[key]
        if len(set(values)) != len(values):
            repeated = sorted({v for v in values if values.count(v) > 1})
            raise ConfigError(
                f"config key {key!r} lists {repeated[0]!r} more than once; each "
                f"value counts once. Received: {values!r}"
            )


def check_batch_norm(config, *, debiased=False):
    """`bn_momentum` in [0, 1] (in [0, 1) where a debiased average is taken of
    it, which divides by 1 - momentum**t) and a positive `bn_epsilon`."""
    momentum = config["bn_momentum"]
    if debiased and not 0.0 <= momentum < 1.0:
        raise ConfigError(
            "config key 'bn_momentum' must be in [0, 1): the debiased moving "
            f"averages need momentum < 1. Received: {momentum!r}"
        )
    if not 0.0 <= momentum <= 1.0:
        raise ConfigError(
            f"config key 'bn_momentum' must be in [0, 1]. Received: {momentum!r}"
        )
    if not config["bn_epsilon"] > 0:
        raise ConfigError(
            f"config key 'bn_epsilon' must be positive. Received: "
            f"{config['bn_epsilon']!r}"
        )


def check_schedule(config):
    """Positive `steps` and `eval_every`, the first a multiple of the second."""
    check_positive(config, "steps", "eval_every")
    check_at_most(config, "eval_every", MAX_DIMENSION, "the steps of one compiled call")
    if config["steps"] % config["eval_every"]:
        raise ConfigError(
            f"config key 'steps' ({config['steps']}) must be a multiple of "
            f"'eval_every' ({config['eval_every']})"
        )


def check_neurons(config, units):
    """`neurons` lists distinct neurons of a layer of `units` units."""
    check_distinct(config, "neurons")
    bad = [n for n in config["neurons"] if not 0 <= n < units]
    if bad:
        raise ConfigError(
            f"config key 'neurons' must name neurons of the last hidden layer, "
            f"0 to {units - 1}. Received: {config['neurons']!r}"
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


def check_precise_bn_sample(config, available, which):
    """Precise BN draws `precise_bn_batches * batch_size` of the `available`
    training examples (`which` says which ones: "used", ...)."""
    sample = config["precise_bn_batches"] * config["batch_size"]
    if sample > available:
        raise ConfigError(
            f"precise BN draws precise_bn_batches * batch_size = {sample} "
            f"training examples, more than the {available} {which}; lower "
            "'precise_bn_batches'. "
            f"Received: precise_bn_batches={config['precise_bn_batches']!r}"
        )


def check_at_most(config, key, limit, why):
    """Raises ConfigError unless `key` (a number or a list) is at most `limit`."""
    value = config[key]
    if any(v > limit for v in (value if isinstance(value, list) else [value])):
        raise ConfigError(
            f"config key {key!r} must be at most {limit} ({why}). Received: {value!r}"
        )


def available_memory():
    """`(bytes, where they come from)`; bytes is None where nothing is checked.

    `$BN_KERAS_MEMORY_LIMIT` if set, else MemAvailable in /proc/meminfo
    (Linux: free memory and what the kernel can reclaim), else the physical
    memory, else unknown (None).
    """
    text = os.environ.get(MEMORY_ENV_VAR, "").strip()
    if text:
        if text.lower() == "none":
            return None, f"{MEMORY_ENV_VAR}=none"
        number, suffix = text[:-1], text[-1].upper()
        if suffix not in _MEMORY_SUFFIXES:
            number, suffix = text, ""
        try:
            limit = int(float(number) * _MEMORY_SUFFIXES[suffix])
        except ValueError:
            limit = -1
        if limit <= 0:
            raise ConfigError(
                f"${MEMORY_ENV_VAR} must be a number of bytes with an optional "
                f'K, M, G or T suffix ("16G"), or "none". Received: {text!r}'
            )
        return limit, f"${MEMORY_ENV_VAR}"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size, "the physical memory"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def check_memory(needs):
    """Raises ConfigError where a run would need more memory than is available.

    Args:
        needs: `{what (the keys that set it): estimated bytes}`.

    Raises:
        ConfigError: One line: the estimate, its largest parts, the memory
            available and how to override the check.
    """
    available, where = available_memory()
    total = sum(needs.values())
    if available is None or total <= available:
        return
    largest = sorted(needs.items(), key=lambda item: -item[1])[:3]
    parts = ", ".join(f"{what} {_gigabytes(size)}" for what, size in largest)
    raise ConfigError(
        f"this config needs about {_gigabytes(total)} of memory ({parts}), more "
        f"than the {_gigabytes(available)} available ({where}); lower the keys "
        f"named, or set ${MEMORY_ENV_VAR} (e.g. 64G, or none) to override"
    )


def _gigabytes(size):
    return f"{size / 2**30:.3g} GiB"
