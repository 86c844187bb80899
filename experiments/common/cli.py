"""The command line shared by the experiments, and its Python equivalent.

`main` parses the arguments and calls `execute`, which takes a run from its
config to a complete folder: config checks, claiming the folder, the data,
`config.json`, TensorFlow, the experiment, `run.json` marked complete.

A user error (a bad config, a bad data file, an output folder that cannot be
used or written) prints one line, `error: ...`, and exits with status 2,
without a traceback, before TensorFlow starts wherever the error can be seen
earlier. SIGINT (Ctrl-C) and SIGTERM print one line saying what stopped where,
mark the folder interrupted, and exit with 130 and 143.
"""

import argparse
import dataclasses
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from experiments.common import data as data_lib
from experiments.common.config import (
    DATA_CHOICES,
    ConfigError,
    Schema,
    check_data_size,
    config_from_mapping,
    load_config,
    shipped_configs,
)
from experiments.common.data import DataError
from experiments.common.metrics import CONFIG_FILE
from experiments.common.run import (
    Interrupted,
    RunDir,
    RunError,
    interrupt_on_signals,
    read_json,
)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What the shared command line needs to know about one experiment.

    Attributes:
        name: The package name under `experiments.` (`"mnist_mlp"`).
        description: One paragraph for `--help`.
        schema: The config's keys, defaults and checks
            (`experiments.common.config.Schema`).
        body: `body(run, config, data, progress) -> metrics`: trains and
            writes every output into `run` (a `RunDir`); imports TensorFlow.
        check: `check(config, num_train)` raises `ConfigError` for a config
            the experiment cannot run on `num_train` training examples;
            called before the folder is claimed where it can be.
        resumable: Whether the experiment writes cells and takes `--resume`.
    """

    name: str
    description: str
    schema: Schema
    body: Callable
    check: Callable | None = None
    resumable: bool = False

    @property
    def defaults(self):
        """The config defaults; they define the known keys."""
        return self.schema.defaults


def parse_args(argv, experiment):
    defaults = experiment.defaults
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{experiment.name}",
        description=experiment.description,
        epilog="Config keys and defaults: "
        + ", ".join(f"{k}={v!r}" for k, v in defaults.items()),
    )
    configs_dir = experiment.schema.configs_dir
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML file overriding the defaults: a path, or the name of one "
        f"shipped in {_relative(configs_dir)}/ "
        f"({', '.join(shipped_configs(configs_dir))})",
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
        help="output folder, new or empty; it is claimed atomically and never "
        f"overwritten (default: runs/{experiment.name}-<date>-<time>, or "
        f"runs/{experiment.name}-<config name>-<date>-<time> with --config; "
        "with -1, -2, ... if taken)",
    )
    if experiment.resumable:
        parser.add_argument(
            "--resume",
            type=Path,
            metavar="DIR",
            help="continue the interrupted, failed or killed run in DIR with its "
            "own config, computing only the cells it has not finished",
        )
    parser.add_argument(
        "--data-source",
        choices=DATA_CHOICES["data_source"],
        help="where MNIST comes from: auto (default: $BN_KERAS_MNIST_DIR if set, "
        "else the repository's copy), vendored (the repository's copy), dir "
        "(--data-dir or $BN_KERAS_MNIST_DIR), or tfds (TensorFlow Datasets, "
        "prepared beforehand; never downloaded)",
    )
    parser.add_argument(
        "--data-dir",
        help="folder of the four MNIST IDX files (implies --data-source dir "
        "unless tfds is chosen, for which it is TFDS' data_dir)",
    )
    if "bn_impl" in experiment.schema.choices:
        parser.add_argument(
            "--bn-impl",
            choices=experiment.schema.choices["bn_impl"],
            help="batch-norm layer: bn_keras.BatchNorm (default) or "
            "keras.layers.BatchNormalization, for comparison",
        )
    if "seeds" in defaults:
        parser.add_argument(
            "--seeds",
            metavar="S,S,...",
            help="the seeds to run, comma-separated (--seeds 0,1,2,3,4); the "
            "same as --set seeds=[0,1,2,3,4]",
        )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar or summary"
    )
    args = parser.parse_args(argv)
    args.resume = getattr(args, "resume", None)
    args.seeds = getattr(args, "seeds", None)
    args.bn_impl = getattr(args, "bn_impl", None)
    if args.resume is not None:
        given = [
            flag
            for flag, value in (
                ("--config", args.config),
                ("--set", args.overrides),
                ("--out", args.out),
                ("--data-source", args.data_source),
                ("--data-dir", args.data_dir),
                ("--bn-impl", args.bn_impl),
                ("--seeds", args.seeds),
            )
            if value
        ]
        if given:
            parser.error(
                f"--resume continues DIR with its own config and folder; drop "
                f"{', '.join(given)}"
            )
    if args.data_dir and not args.data_source:
        args.data_source = "dir"
    for key in ("data_source", "data_dir", "bn_impl"):
        value = getattr(args, key)
        if value:
            args.overrides.append(f"{key}={_toml_string(value)}")
    if args.seeds is not None:
        args.overrides.append(f"seeds=[{args.seeds}]")
    return args


def _relative(path):
    """`path` relative to the working directory where it is inside it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def _toml_string(value):
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def resumed_config(folder, schema):
    """The config recorded in `folder/config.json`, checked again."""
    path = Path(folder) / CONFIG_FILE
    try:
        values = read_json(path)
    except FileNotFoundError:
        raise RunError(
            f"cannot resume {folder}: it has no {CONFIG_FILE} (the run stopped "
            "before its data loaded); delete it and start a new run"
        ) from None
    except (OSError, ValueError) as err:
        raise RunError(f"cannot resume {folder}: {path} is unreadable ({err})") from err
    if not isinstance(values, dict):
        raise RunError(f"cannot resume {folder}: {path} does not hold a config")
    return config_from_mapping(values, schema, f"in {path}")


def execute(
    experiment, config=None, out=None, *, resume=None, progress=True, name=None
):
    """Runs `experiment` into a new folder, or continues the run in `resume`.

    Args:
        experiment: The `Experiment` to run.
        config: A config from `load_config` (ignored with `resume`).
        out: The output folder; None for `runs/<name>-<date>-<time>`.
        resume: A folder an interrupted, failed or killed run left; its
            `config.json` is the config.
        progress: Whether to show a progress bar and print the summary.
        name: The default folder's prefix (default: the experiment's name).

    Returns:
        The metrics dict, also written to the folder's `metrics.json`.

    Raises:
        ConfigError, DataError, RunError: A one-line user error; a folder
            claimed for it is given back.
        Interrupted: SIGINT or SIGTERM (with handlers from
            `experiments.common.run.interrupt_on_signals`); the folder is marked
            interrupted and the exception's `message` says so.
    """
    if resume is not None:
        run = RunDir.reopen(resume, experiment.name)
        try:
            config = resumed_config(resume, experiment.schema)
        except BaseException:
            run.abandon()
            raise
    else:
        if config is None:
            config = load_config(experiment.schema)
        run = RunDir.claim(experiment.name, out, name=name)
    note = data_lib.environment_note(config["data_source"])
    if note:
        print(f"note: {note}", file=sys.stderr)
    source, data_dir = data_lib.resolve_source(
        config["data_source"], config["data_dir"] or None
    )
    command = f"python -m experiments.{experiment.name}"
    kept = False
    try:
        run.checkpoint("claimed")
        run.stage("loading data")

        def check(num_train, num_test):
            check_data_size(config, num_train, num_test)
            if experiment.check is not None:
                experiment.check(config, config["train_examples"] or num_train)

        data = data_lib.load_for_config(config, check)
        if resume is None:
            config = {**config, "data_source": source, "data_dir": data_dir or ""}
            run.write_json(CONFIG_FILE, config)
        kept = True
        run.checkpoint("data loaded")
        run.stage("starting TensorFlow")
        from experiments.common.quiet import import_tensorflow

        import_tensorflow()
        metrics = experiment.body(run, config, data, progress)
        run.complete()
    except (Interrupted, KeyboardInterrupt) as err:
        signum = getattr(err, "signum", 2)
        at = run.where()
        if not kept:
            run.abandon()
            err.message = (
                f"{command}: interrupted by {_signal_name(signum)} at {at}; "
                "nothing was kept"
            )
            raise
        recorded = run.interrupted(signum)
        if experiment.resumable:
            after = f"continue with: {command} --resume {run.path}"
        else:
            after = f"delete it to run again from the start ({command} cannot resume)"
        state = "marked interrupted" if recorded else "run.json not updated"
        err.message = (
            f"{command}: interrupted by {_signal_name(signum)} at {at}; partial "
            f"outputs in {run.path} ({state}); {after}"
        )
        raise
    except (ConfigError, DataError) as err:
        if kept:
            run.failed(str(err))
        else:
            run.abandon()
        raise
    except RunError as err:
        if not kept:
            run.abandon()
            raise
        recorded = run.failed(str(err))
        then = f"; after fixing it: {command} --resume {run.path}"
        state = f"{run.path} is marked failed" if recorded else "run.json not updated"
        raise RunError(f"{err}; {state}{then if experiment.resumable else ''}") from err
    except BaseException as err:
        if kept:
            run.failed(f"{type(err).__name__}: {err}")
        else:
            run.abandon()
        raise
    return metrics


def _signal_name(signum):
    name = signal.Signals(signum).name
    return "Ctrl-C (SIGINT)" if name == "SIGINT" else name


def main(argv, experiment):
    """The command line of `experiment`; returns the exit status."""
    args = parse_args(argv, experiment)
    try:
        with interrupt_on_signals():
            config = None
            if args.resume is None:
                config = load_config(experiment.schema, args.config, args.overrides)
            # runs/mnist_mlp-smoke-<date>-<time> for --config smoke.
            name = f"{experiment.name}-{args.config.stem}" if args.config else None
            execute(
                experiment,
                config,
                args.out,
                resume=args.resume,
                progress=not args.quiet,
                name=name,
            )
    except (Interrupted, KeyboardInterrupt) as err:
        message = getattr(err, "message", None) or (
            f"python -m experiments.{experiment.name}: interrupted before the run "
            "started; nothing was written"
        )
        print(message, file=sys.stderr)
        return getattr(err, "exit_status", 130)
    except (ConfigError, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.stdout.flush()
    return 0
