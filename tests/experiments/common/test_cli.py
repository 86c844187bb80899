"""Tests for experiments/common/cli.py: every user error is one line, exit
status 2, before TensorFlow loads, and leaves no folder behind; --config NAME,
the default folder, the flags each experiment has.

The error cases run in one fresh process (the test process has TensorFlow
loaded already), which reports for each its exit status, its stderr and
whether TensorFlow had been imported by then.
"""

import importlib
import json
import re
import subprocess
import sys
import time

import pytest

from experiments.common import cli
from experiments.common.config import shipped_configs
from experiments.common.data import ENV_VAR
from experiments.common.run import read_state
from tests.experiments.helpers import (
    EXPERIMENTS,
    ROOT,
    experiment_main,
    schema,
    strict_json,
    subprocess_env,
)

CONFIGS = schema("mnist_mlp").configs_dir
SMOKE = str(CONFIGS / "smoke.toml")

RUNNER = """
import contextlib, importlib, io, json, os, sys
results = {}
for name, (experiment, argv, env) in json.loads(sys.stdin.read()).items():
    os.environ.pop("BN_KERAS_MNIST_DIR", None)
    os.environ.update(env)
    main = importlib.import_module(f"experiments.{experiment}.main").main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exit:
            status = exit.code
    results[name] = [status, err.getvalue(), "tensorflow" in sys.modules]
print(json.dumps(results))
"""

# name: (experiment, arguments, environment, what the line must say). Each
# case writes (if at all) under its own --out, <tmp>/<name>/out, unless it
# gives --out itself; {tmp} is the case's folder.
CASES = {
    "seed below 0": (
        "mnist_mlp",
        ["--set", "seed=-1"],
        {},
        "'seed' must hold seeds from 0 to 2**32 - 1 = 4294967295. Received: -1",
    ),
    "seed above 2**32 - 1": (
        "mnist_mlp",
        ["--set", "seed=4294967296"],
        {},
        "Received: 4294967296",
    ),
    "sweep seed below 0": (
        "lr_sweep",
        ["--set", "seeds=[-3]"],
        {},
        "'seeds' must hold seeds from 0",
    ),
    "duplicate seeds": (
        "lr_sweep",
        ["--set", "seeds=[0, 0]"],
        {},
        "'seeds' lists 0 more than once",
    ),
    "duplicate learning rates": (
        "lr_sweep",
        ["--set", "learning_rates=[0.1, 0.1]"],
        {},
        "'learning_rates' lists 0.1 more than once",
    ),
    "infinite learning rate": (
        "mnist_mlp",
        ["--set", "learning_rate=inf"],
        {},
        "'learning_rate' must hold finite numbers. Received: inf",
    ),
    "NaN learning rate": (
        "mnist_mlp",
        ["--set", "learning_rate=nan"],
        {},
        "'learning_rate' must hold finite numbers",
    ),
    "zero learning rate": (
        "mnist_mlp",
        ["--set", "learning_rate=0"],
        {},
        "'learning_rate' must be positive",
    ),
    "negative learning rate": (
        "mnist_mlp",
        ["--set", "learning_rate=-0.1"],
        {},
        "'learning_rate' must be positive",
    ),
    "infinite sweep learning rate": (
        "lr_sweep",
        ["--set", "learning_rates=[0.1, inf]"],
        {},
        "'learning_rates' must hold finite numbers",
    ),
    "negative sweep learning rate": (
        "lr_sweep",
        ["--set", "learning_rates=[0.1, -1]"],
        {},
        "'learning_rates' must be positive",
    ),
    "train_examples beyond the data": (
        "mnist_mlp",
        ["--set", "train_examples=100000"],
        {},
        "'train_examples' (100000) is larger than the 60000 training examples",
    ),
    "study train_examples beyond the data": (
        "population_study",
        ["--set", "train_examples=100000"],
        {},
        "'train_examples' (100000) is larger than the 60000 training examples",
    ),
    "test_examples beyond the data": (
        "lr_sweep",
        ["--set", "test_examples=20000"],
        {},
        "'test_examples' (20000) is larger than the 10000 test examples",
    ),
    "batch_size beyond train_examples": (
        "mnist_mlp",
        ["--config", "smoke", "--set", "batch_size=5000"],
        {},
        "'batch_size' (5000) is larger than the 3000 training examples used",
    ),
    "batch_size beyond the data": (
        "mnist_mlp",
        ["--set", "batch_size=70000", "--set", "steps=50"],
        {},
        "'batch_size' (70000) is larger than the 60000 training examples used",
    ),
    "precise BN beyond the data": (
        "population_study",
        ["--set", "train_examples=100", "--set", "precise_bn_batches=5"],
        {},
        "more than the 100 used; lower 'precise_bn_batches'. "
        "Received: precise_bn_batches=5",
    ),
    "study with Keras' layer": (
        "population_study",
        ["--set", "bn_impl='keras'"],
        {},
        "unknown config key 'bn_impl'",
    ),
    "config is a folder": (
        "mnist_mlp",
        ["--config", str(CONFIGS)],
        {},
        f"config file {CONFIGS} is a folder",
    ),
    "config is not UTF-8": (
        "mnist_mlp",
        ["--config", str(ROOT / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz")],
        {},
        "is not UTF-8 text",
    ),
    "config is not TOML": (
        "mnist_mlp",
        ["--config", "{tmp}/file"],
        {},
        "config file {tmp}/file is not valid TOML",
    ),
    "config does not exist": (
        "mnist_mlp",
        ["--config", "nope.toml"],
        {},
        "config file nope.toml does not exist",
    ),
    "config name not shipped": (
        "mnist_mlp",
        ["--config", "nope"],
        {},
        "config file nope does not exist; this experiment ships five_seeds, paper, "
        f"smoke (give the name, or a path such as {SMOKE})",
    ),
    "config name of another experiment": (
        "lr_sweep",
        ["--config", "paper"],
        {},
        "config file paper does not exist; this experiment ships smoke ",
    ),
    "config path in another experiment": (
        "sequential_mnist",
        ["--config", "experiments/lenet_bn/configs/smoke.toml"],
        {},
        "unknown config key 'epochs' in experiments/lenet_bn/configs/smoke.toml "
        "(is it a config for another experiment?)",
    ),
    "--seeds and --set seed disagree": (
        "mnist_mlp",
        ["--seeds", "3", "--set", "seed=4"],
        {},
        "config keys 'seed' (4) and 'seeds' ([3]) disagree",
    ),
    "--set seed and seeds disagree": (
        "mnist_mlp",
        ["--set", "seed=4", "--set", "seeds=[3]"],
        {},
        "config keys 'seed' (4) and 'seeds' ([3]) disagree",
    ),
    "seeds of a config and --set seed disagree": (
        "mnist_mlp",
        ["--config", "five_seeds", "--set", "seed=3"],
        {},
        "config keys 'seed' (3) and 'seeds' ([0, 1, 2, 3, 4]) disagree",
    ),
    "--set seed and --seeds disagree over a config": (
        "mnist_mlp",
        ["--config", "smoke", "--set", "seed=1", "--seeds", "2,1"],
        {},
        "config keys 'seed' (1) and 'seeds' ([2, 1]) disagree",
    ),
    "config of another experiment": (
        "lr_sweep",
        ["--config", SMOKE],
        {},
        "unknown config key 'eval_every' in "
        f"{SMOKE} (is it a config for another experiment?)",
    ),
    "unknown key": (
        "mnist_mlp",
        ["--set", "stepz=3"],
        {},
        "unknown config key 'stepz'",
    ),
    "wrong type": ("mnist_mlp", ["--set", "steps=x"], {}, "must be of type int"),
    "out is a file": (
        "mnist_mlp",
        ["--out", "{tmp}/file"],
        {},
        "output folder {tmp}/file is a file",
    ),
    "out under a file": (
        "mnist_mlp",
        ["--out", "{tmp}/file/run"],
        {},
        "{tmp}/file is a file, not a folder",
    ),
    "out under /proc": (
        "mnist_mlp",
        ["--out", "/proc/x/run"],
        {},
        "cannot create output folder /proc/x/run",
    ),
    "out holds files": (
        "mnist_mlp",
        ["--out", "{tmp}/busy"],
        {},
        "output folder {tmp}/busy already holds files (notes.txt, ...)",
    ),
    "data dir missing": (
        "mnist_mlp",
        ["--data-dir", "{tmp}/nowhere"],
        {},
        "{tmp}/nowhere: no such folder",
    ),
    "environment data dir empty": (
        "mnist_mlp",
        [],
        {"BN_KERAS_MNIST_DIR": "{tmp}/empty"},
        "BN_KERAS_MNIST_DIR={tmp}/empty (set in the environment): ",
    ),
    "resume a folder that holds no run": (
        "lr_sweep",
        ["--resume", "{tmp}/busy"],
        {},
        "cannot resume {tmp}/busy: not a run folder",
    ),
    # Before: a 38-line MemoryError traceback; an index array of (steps,
    # batch_size) that grew until the OOM killer ended the run.
    "network larger than memory": (
        "mnist_mlp",
        ["--set", "hidden_units=[100000000]"],
        {},
        "this config needs about ",
    ),
    "steps whose records exceed memory": (
        "mnist_mlp",
        ["--set", "steps=1000000000000000000"],
        {},
        "of memory (metrics (steps / eval_every) ",
    ),
    "steps of one call beyond int32": (
        "mnist_mlp",
        ["--set", "steps=4294967296", "--set", "eval_every=4294967296"],
        {},
        "'eval_every' must be at most 2147483647 (the steps of one compiled call)",
    ),
    "sweep network larger than memory": (
        "lr_sweep",
        ["--set", "hidden_units=[100000000]"],
        {},
        "this config needs about ",
    ),
    "study network larger than memory": (
        "population_study",
        ["--set", "hidden_units=[100000000]"],
        {},
        "this config needs about ",
    ),
}


def _case_folder(root, name):
    return root / re.sub(r"[^\w-]", "_", name)


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cases = {}
    for name, (experiment, argv, env, _) in CASES.items():
        tmp = _case_folder(root, name)
        tmp.mkdir()
        (tmp / "file").write_text("x")
        (tmp / "busy").mkdir()
        (tmp / "busy" / "notes.txt").write_text("mine")
        (tmp / "empty").mkdir()
        argv = [a.replace("{tmp}", str(tmp)) for a in argv]
        if "--out" not in argv and "--resume" not in argv:
            argv += ["--out", str(tmp / "out")]
        env = {k: v.replace("{tmp}", str(tmp)) for k, v in env.items()}
        cases[name] = (experiment, [*argv, "--quiet"], env)
    done = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(cases),
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return root, json.loads(done.stdout)


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_before_tensorflow(answers, name):
    root, results = answers
    status, err, tensorflow_loaded = results[name]
    tmp = _case_folder(root, name)
    expected = CASES[name][3].replace("{tmp}", str(tmp))
    assert status == 2, err
    assert err.startswith("error: ") and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not tensorflow_loaded
    # Nothing left behind: no new folder, and the existing ones untouched.
    assert not (tmp / "out").exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["busy", "empty", "file"]
    assert [p.name for p in (tmp / "busy").iterdir()] == ["notes.txt"]


def test_resume_cannot_take_other_settings(capsys):
    with pytest.raises(SystemExit) as info:
        experiment_main("lr_sweep")(["--resume", "x", "--set", "steps=10"])
    assert info.value.code == 2
    assert "--resume continues DIR with its own config and folder; drop --set" in (
        capsys.readouterr().err
    )


def test_mnist_mlp_has_no_resume(capsys):
    with pytest.raises(SystemExit):
        experiment_main("mnist_mlp")(["--resume", "x"])
    assert "unrecognized arguments: --resume" in capsys.readouterr().err


def test_population_study_has_no_bn_impl_flag(capsys):
    """The study always uses bn_keras.BatchNorm: no flag to swap the layer."""
    with pytest.raises(SystemExit) as info:
        experiment_main("population_study")(["--bn-impl", "keras"])
    assert info.value.code == 2
    assert "unrecognized arguments: --bn-impl keras" in capsys.readouterr().err


@pytest.fixture(scope="module")
def helps():
    """`python -m experiments.NAME --help` of every experiment, started
    together: `{name: (exit status, stdout, stderr)}`."""
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"experiments.{name}", "--help"],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in EXPERIMENTS
    }
    answers = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=120)
        answers[name] = (process.returncode, out, err)
    return answers


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_help_names_the_shipped_configs_and_the_flags_it_has(helps, name):
    status, out, err = helps[name]
    assert status == 0 and err == "", err
    text = " ".join(out.split())  # argparse wraps lines
    assert text.startswith(f"usage: python -m experiments.{name} ")
    # The folder relative to the repository root, the working directory.
    shipped = ", ".join(shipped_configs(schema(name).configs_dir))
    configs = re.escape(f"experiments/{name}/configs/ ({shipped})")
    assert re.search(rf"shipped in (\S+/)?{configs}", text), text
    assert f"runs/{name}-<config name>-<date>-<time> with --config" in text
    experiment = importlib.import_module(f"experiments.{name}.main").EXPERIMENT
    assert experiment.name == name and experiment.schema is schema(name)
    assert ("--resume DIR" in text) == experiment.resumable
    assert ("--seeds S,S,..." in text) == ("seeds" in experiment.defaults)
    assert ("--bn-impl" in text) == ("bn_impl" in experiment.schema.choices)
    for key in experiment.defaults:
        assert f"{key}=" in text, key


def _instant_experiment(name="instant"):
    """An experiment that trains nothing: its run is the shared plumbing alone."""

    def body(run, config, data, progress):
        return {}

    return cli.Experiment(
        name=name, description="", schema=schema("mnist_mlp"), body=body
    )


def test_default_folder_is_named_after_the_experiment_and_config(tmp_path, monkeypatch):
    """runs/<experiment>-<date>-<time>, and with --config
    runs/<experiment>-<config name>-<date>-<time>."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    experiment = _instant_experiment()
    quick = ["--set", "data_verify=false", "--quiet"]
    for argv, prefix, steps in (
        ([], "instant-", 40000),
        (["--config", "smoke"], "instant-smoke-", 200),
        (["--config", str(CONFIGS / "paper.toml")], "instant-paper-", 50000),
    ):
        before = time.strftime("%Y%m%d-%H%M%S")
        assert cli.main([*argv, *quick], experiment) == 0
        after = time.strftime("%Y%m%d-%H%M%S")
        (folder,) = (tmp_path / "runs").iterdir()
        match = re.fullmatch(re.escape(prefix) + r"(\d{8}-\d{6})", folder.name)
        assert match and before <= match[1] <= after, folder.name
        assert read_state(folder)["state"] == "complete"
        assert strict_json(folder / "config.json")["steps"] == steps
        folder.rename(tmp_path / folder.name)


def test_default_folder_takes_the_next_free_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment = _instant_experiment()
    argv = ["--config", "smoke", "--set", "data_verify=false", "--quiet"]
    for _ in range(2):
        assert cli.main(argv, experiment) == 0
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(names) == 2 and all(n.startswith("instant-smoke-") for n in names)
