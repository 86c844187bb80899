"""Helpers the experiments' tests share; fixtures are in `conftest.py`.

Test modules import these names from here, never from one another.
"""

import importlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from experiments.common.config import load_config
from experiments.common.data import ENV_VAR
from experiments.common.run import TEST_SIGNAL_VAR

# The repository root: `python -m experiments.NAME` runs from here.
ROOT = Path(__file__).absolute().parents[2]
EXPERIMENTS_DIR = ROOT / "experiments"
# Every experiment package: a folder of experiments/ with an __init__.py,
# except the shared plumbing.
EXPERIMENTS = sorted(
    p.parent.name
    for p in EXPERIMENTS_DIR.glob("*/__init__.py")
    if p.parent.name != "common"
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The mark of the modules that train: the experiments' training loops are
# written for TensorFlow.
requires_tensorflow = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the experiments' training loops are written for TensorFlow",
)


def _reject_constant(name):
    raise ValueError(f"{name} in strict JSON")


def strict_json(path):
    """Parses `path` as RFC 8259 JSON: NaN and Infinity are errors."""
    return json.loads(Path(path).read_text(), parse_constant=_reject_constant)


def assert_outputs_whole(folder):
    """Every JSON file under `folder` parses strictly, every model is a whole
    zip file, every figure a whole PNG, and no temporary file is left."""
    for path in Path(folder).rglob("*"):
        assert ".tmp" not in path.name, path
        if path.suffix == ".json":
            strict_json(path)
        elif path.suffix == ".keras":
            assert zipfile.is_zipfile(path), path
        elif path.suffix == ".png":
            data = path.read_bytes()
            assert data[:8] == PNG_SIGNATURE and data[-8:-4] == b"IEND", path


def one_line(err):
    """`err`, asserted to be one line without a traceback."""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def without_timings(value):
    """`value` without its wall-clock fields, which differ between sessions."""
    timing = ("seconds", "wall_seconds", "cell_seconds", "cells_from_earlier_sessions")
    timing += ("precise_seconds_per_evaluation",)
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in timing}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def schema(name):
    """The config `Schema` of experiment `name`."""
    return importlib.import_module(f"experiments.{name}.config").SCHEMA


def experiment_main(name):
    """The `main(argv)` of experiment `name`, as `python -m experiments.NAME` runs."""
    return importlib.import_module(f"experiments.{name}.main").main


def smoke_config(name, *overrides):
    """Experiment `name`'s shipped smoke config, with `--set` overrides."""
    config_schema = schema(name)
    return load_config(
        config_schema, config_schema.configs_dir / "smoke.toml", overrides
    )


def idx_bytes(array, magic, dims=None):
    """The IDX encoding of a uint8 array; `dims` overrides the header's sizes."""
    dims = np.shape(array) if dims is None else dims
    header = b"".join(int(d).to_bytes(4, "big") for d in (magic, *dims))
    return header + np.asarray(array).astype(np.uint8).tobytes()


def subprocess_env(**extra):
    """The environment of a process as a user starts it, importing from the
    repository: without the user's TF_CPP_MIN_LOG_LEVEL, MNIST folder or a
    test signal, plus `extra`."""
    unset = ("TF_CPP_MIN_LOG_LEVEL", ENV_VAR, TEST_SIGNAL_VAR)
    env = {k: v for k, v in os.environ.items() if k not in unset}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def python(code, *args, cwd=ROOT, env=None, **popen):
    """Starts `python -c code args` in `cwd` (text pipes for stdout and stderr)."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=cwd,
        env=subprocess_env(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def start(name, argv, cwd=ROOT, **env):
    """Starts `python -m experiments.NAME argv` in `cwd`, as a user would."""
    return subprocess.Popen(
        [sys.executable, "-m", f"experiments.{name}", *argv],
        cwd=cwd,
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
