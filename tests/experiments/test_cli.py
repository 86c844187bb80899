"""Tests for experiments/cli.py: every user error is one line, exit status 2,
before TensorFlow loads, and leaves no folder behind.

The cases run in one fresh process (the test process has TensorFlow loaded
already), which reports for each its exit status, its stderr and whether
TensorFlow had been imported by then.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SMOKE = str(CONFIGS / "smoke.toml")

RUNNER = """
import contextlib, io, json, os, sys
from experiments import lr_sweep, mnist_mlp, population_study
modules = {m.EXPERIMENT.name: m for m in (mnist_mlp, population_study, lr_sweep)}
results = {}
for name, (module, argv, env) in json.loads(sys.stdin.read()).items():
    os.environ.pop("BN_KERAS_MNIST_DIR", None)
    os.environ.update(env)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = modules[module].main(argv)
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
        ["--config", SMOKE, "--set", "batch_size=5000"],
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
        "more than the 100 used",
    ),
    "study with Keras' layer": (
        "population_study",
        ["--bn-impl", "keras"],
        {},
        "set bn_impl='bn_keras'",
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
        ["--config", str(ROOT / "README.md")],
        {},
        "is not valid TOML",
    ),
    "config does not exist": (
        "mnist_mlp",
        ["--config", "nope.toml"],
        {},
        "config file nope.toml does not exist",
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
}


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cases = {}
    for name, (module, argv, env, _) in CASES.items():
        tmp = root / name.replace(" ", "_").replace("/", "_")
        tmp.mkdir()
        (tmp / "file").write_text("x")
        (tmp / "busy").mkdir()
        (tmp / "busy" / "notes.txt").write_text("mine")
        (tmp / "empty").mkdir()
        argv = [a.replace("{tmp}", str(tmp)) for a in argv]
        if "--out" not in argv and "--resume" not in argv:
            argv += ["--out", str(tmp / "out")]
        env = {k: v.replace("{tmp}", str(tmp)) for k, v in env.items()}
        cases[name] = (module, [*argv, "--quiet"], env)
    process_env = {k: v for k, v in os.environ.items() if k != "BN_KERAS_MNIST_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(cases),
        cwd=ROOT,
        env={**process_env, "PYTHONPATH": str(ROOT)},
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
    tmp = root / name.replace(" ", "_").replace("/", "_")
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
    from experiments import lr_sweep

    with pytest.raises(SystemExit) as info:
        lr_sweep.main(["--resume", "x", "--set", "steps=10"])
    assert info.value.code == 2
    assert "--resume continues DIR with its own config and folder; drop --set" in (
        capsys.readouterr().err
    )


def test_mnist_mlp_has_no_resume(capsys):
    from experiments import mnist_mlp

    with pytest.raises(SystemExit):
        mnist_mlp.main(["--resume", "x"])
    assert "unrecognized arguments: --resume" in capsys.readouterr().err
