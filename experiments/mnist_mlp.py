"""Reproduce Figure 1 of the batch-normalization paper on MNIST.

python -m experiments.mnist_mlp                      # the paper's setting
python -m experiments.mnist_mlp --config configs/smoke.toml --out runs/smoke
python -m experiments.mnist_mlp --set steps=2000 --set bn_impl=keras
"""

import argparse
import os
import sys
import time
from pathlib import Path

from experiments.config import DEFAULTS, ConfigError, load_config
from experiments.data import DataError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.mnist_mlp",
        description=(
            "Train a 784-100-100-10 sigmoid MLP on MNIST with and without batch "
            "normalization from the same initial weights, record test accuracy "
            "and sigmoid-input statistics, plot the paper's Figure 1, and run the "
            "single-example inference check."
        ),
        epilog="Config keys and defaults: "
        + ", ".join(f"{k}={v!r}" for k, v in DEFAULTS.items()),
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
        "(default: runs/<config name>-<date>-<time>)",
    )
    parser.add_argument(
        "--data-source",
        choices=("vendored", "dir", "tfds"),
        help="where MNIST comes from: the repository's copy (default), a folder "
        "(--data-dir or $BN_KERAS_MNIST_DIR), or TensorFlow Datasets",
    )
    parser.add_argument(
        "--data-dir",
        help="folder of the four MNIST IDX files (implies "
        "--data-source dir unless tfds is chosen, for which it is TFDS' data_dir)",
    )
    parser.add_argument(
        "--bn-impl",
        choices=("bn_keras", "keras"),
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
            args.overrides.append(f"{key}={value!r}".replace("'", '"'))
    if args.out is None:
        name = args.config.stem if args.config else "mnist_mlp"
        args.out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        # TensorFlow loads only now, with fewer C++ log lines.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from experiments.experiment import run

        run(config, args.out, progress=not args.quiet)
    except (ConfigError, DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
