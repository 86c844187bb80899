"""The command line shared by the experiments: config, overrides, output folder.

A user error (a bad config, a bad data file, an output folder in use) prints
one line, `error: ...`, and exits with status 2, without a traceback.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from experiments.config import CHOICES, ConfigError, load_config
from experiments.data import DataError


def parse_args(argv, prog, description, defaults):
    parser = argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=description,
        epilog="Config keys and defaults: "
        + ", ".join(f"{k}={v!r}" for k, v in defaults.items()),
    )
    parser.add_argument(
        "--config", type=Path, help="TOML file overriding the defaults (see configs/)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set steps=2000",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder, which must not hold files yet "
        f"(default: runs/<config name>-<date>-<time>, config name "
        f"{prog.rsplit('.', 1)[-1]} without --config)",
    )
    parser.add_argument(
        "--data-source",
        choices=CHOICES["data_source"],
        help="where MNIST comes from: the repository's copy (default), a folder "
        "(--data-dir or $BN_KERAS_MNIST_DIR), or TensorFlow Datasets",
    )
    parser.add_argument(
        "--data-dir",
        help="folder of the four MNIST IDX files (implies --data-source dir "
        "unless tfds is chosen, for which it is TFDS' data_dir)",
    )
    parser.add_argument(
        "--bn-impl",
        choices=CHOICES["bn_impl"],
        help="batch-norm layer: bn_keras.BatchNorm (default) or "
        "keras.layers.BatchNormalization, for comparison",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar or summary"
    )
    args = parser.parse_args(argv)
    if args.data_dir and not args.data_source:
        args.data_source = "dir"
    for key in ("data_source", "data_dir", "bn_impl"):
        value = getattr(args, key)
        if value:
            args.overrides.append(f"{key}={_toml_string(value)}")
    if args.out is None:
        name = args.config.stem if args.config else prog.rsplit(".", 1)[-1]
        args.out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def _toml_string(value):
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main(argv, prog, description, defaults, run):
    """Parses `argv`, loads the config and calls `run(config, out, progress)`.

    `run` should import TensorFlow only when called, so that `--help` and
    config errors answer at once. Returns the exit status.
    """
    args = parse_args(argv, prog, description, defaults)
    try:
        config = load_config(args.config, args.overrides, defaults)
        # TensorFlow loads only now, with fewer C++ log lines.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        run(config, args.out, progress=not args.quiet)
    except (ConfigError, DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
