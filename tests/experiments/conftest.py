"""Fixtures the experiments' tests share: smoke runs, a tiny file system."""

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import typing
from pathlib import Path

import pytest

from experiments.common.metrics import METRICS_FILE
from tests.experiments.helpers import experiment_main, strict_json

# The module whose tests read every experiment's smoke run.
EVERY_EXPERIMENT = Path(__file__).with_name("test_every_experiment.py")


def pytest_collection_modifyitems(items):
    """Puts `test_every_experiment.py` after the experiments' own modules.

    A smoke run is made once, by the first pytest-xdist worker that asks for
    it (`once`); another worker that asks meanwhile waits. That module asks
    for every experiment's run: first in the order, one worker made them all
    in a row while the other waited at the next module that needed one.
    Last, each run is made by the worker that reaches its experiment's
    module, and that module finds them made.
    """
    last = [item for item in items if item.path == EVERY_EXPERIMENT]
    if last:
        items[:] = [item for item in items if item.path != EVERY_EXPERIMENT] + last


class SmokeRun(typing.NamedTuple):
    """A finished run: its folder and its metrics file's contents."""

    out: Path
    metrics: dict


@pytest.fixture(scope="session")
def once(tmp_path_factory):
    """`once(key, make) -> folder`: the folder `make(folder)` filled, made once
    per test session for each `key`.

    Under pytest-xdist the workers share it: the first to ask makes it while
    the others wait for it, so that an expensive run is not repeated on
    every worker. A `make` that fails leaves nothing behind for the next.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's, shared by its workers
    shared = base / "once"
    shared.mkdir(exist_ok=True)

    def get(key, make):
        name = hashlib.sha256(key.encode()).hexdigest()[:16]
        folder, done = shared / name, shared / f"{name}.done"
        with open(shared / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                make(folder)
                done.touch()
        return folder

    return get


@pytest.fixture(scope="session")
def smoke_run(once):
    """`smoke_run(name, *argv) -> SmokeRun`: `python -m experiments.NAME
    --config smoke argv --quiet` into a new folder, run by `main` in this
    process, once per test session for the same arguments.

    The folder is shared by the tests that ask for the same run: read it,
    never write into it.
    """

    def run(name, *argv):
        def make(folder):
            out = folder / "run"
            argv_out = ["--config", "smoke", *argv, "--out", str(out), "--quiet"]
            assert experiment_main(name)(argv_out) == 0

        out = once(f"smoke_run {name} {argv!r}", make) / "run"
        return SmokeRun(out, strict_json(out / METRICS_FILE))

    return run


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """`mount(size) -> folder`: a real file system of `size` ("64k"), unmounted
    after the test; the test is skipped where none can be mounted (it needs
    root on Linux). The ENOSPC paths are also tested with a simulated full
    disk, which runs everywhere."""
    mounted = []

    def mount(size):
        point = tmp_path / f"tmpfs-{len(mounted)}"
        point.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"cannot mount a tmpfs here ({err})")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(point)], check=False, timeout=30)
