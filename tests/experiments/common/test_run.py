"""Tests for experiments/common/run.py: claiming folders, atomic writes, run
state, signals. None needs TensorFlow; the processes started here import only
the standard library and experiments.common.run."""

import errno
import fcntl
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from experiments.common import run as run_lib
from experiments.common.metrics import METRICS_FILE, SUMMARY_FILE, environment
from experiments.common.run import (
    TEST_SIGNAL_VAR,
    Interrupted,
    RunDir,
    RunError,
    interrupt_on_signals,
    read_state,
    write_json,
)
from tests.experiments.helpers import python, strict_json

NOW = 1_700_000_000.0  # a fixed clock: every default claim wants the same name


def _leftovers(folder):
    return [p.name for p in Path(folder).rglob("*") if ".tmp" in p.name]


def test_write_json_is_strict_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"accuracy": [0.5, None]})
    assert strict_json(path) == {"accuracy": [0.5, None]}
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            write_json(path, {"accuracy": [bad]})
    assert strict_json(path) == {"accuracy": [0.5, None]}
    assert _leftovers(tmp_path) == []


def test_read_json_rejects_nan_and_infinity(tmp_path):
    path = tmp_path / "x.json"
    for text in ('{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}'):
        path.write_text(text)
        with pytest.raises(ValueError, match="not valid JSON"):
            run_lib.read_json(path)


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RunError) as info:
        with run_lib.atomic_path(path) as temp:
            temp.write_text("half of the new")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message = str(info.value)
    assert message.startswith(f"cannot write {path}: No space left on device")
    assert "free some space" in message and "\n" not in message
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


class _FullDisk:
    """A file whose writes stop with ENOSPC after `room` bytes, as on a full disk."""

    def __init__(self, path, mode, room=4096):
        self.file = open(path, mode)
        self.room = room

    def write(self, data):
        self.file.write(data[: self.room])
        if len(data) > self.room:
            self.file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return len(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_simulated_full_disk_leaves_no_truncated_file(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted, this is the full-disk test."""
    monkeypatch.setattr(run_lib, "open", _FullDisk, raising=False)
    path = tmp_path / "metrics.json"
    with pytest.raises(RunError, match="No space left on device"):
        write_json(path, {"curve": list(range(5000))})
    assert not path.exists()
    assert _leftovers(tmp_path) == []


def test_real_full_disk_leaves_no_truncated_file(tiny_tmpfs):
    """A real 64 KiB file system (test_simulated_full_disk_... runs everywhere)."""
    folder = tiny_tmpfs("64k")
    path = folder / "bn.keras"
    with pytest.raises(RunError, match="No space left on device"):
        run_lib.write_bytes(path, b"x" * 200_000)
    assert list(folder.iterdir()) == []
    # The space is given back: a small file still fits.
    write_json(folder / "run.json", {"state": "failed"})
    assert strict_json(folder / "run.json") == {"state": "failed"}


def test_default_claims_take_the_next_free_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    claims = [RunDir.claim("exp", now=NOW) for _ in range(3)]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(NOW))
    assert [str(c.path) for c in claims] == [
        f"runs/exp-{stamp}",
        f"runs/exp-{stamp}-1",
        f"runs/exp-{stamp}-2",
    ]
    for claim in claims:
        assert strict_json(claim.path / "run.json")["state"] == "running"
        claim.close()


CLAIM = """
import fcntl, sys
from experiments.common.run import RunDir, RunError
gate, out = sys.argv[1], sys.argv[2]
with open(gate) as f:
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        print("waiting", flush=True)
    else:
        print("not held", flush=True)
    fcntl.flock(f, fcntl.LOCK_SH)  # the barrier: the test holds LOCK_EX
try:
    run = RunDir.claim("exp", None if out == "-" else out, now=1_700_000_000.0)
except RunError as err:
    print("refused", err, flush=True)
else:
    print("claimed", run.path, flush=True)
    sys.stdin.read()  # hold the folder until the test has every answer
"""


def _claim_all_at_once(tmp_path, target, count=6):
    """Starts `count` processes that claim `target` ("-": the default folder)
    at one release: each imports, reports that it waits at a barrier (a lock
    the test holds), and claims when the test lets them all go. Returns each
    one's answer, "claimed PATH" or "refused MESSAGE"."""
    gate = tmp_path / "gate"
    gate.touch()
    processes = []
    try:
        with open(gate) as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            # In tmp_path: the default folder is runs/ under the working directory.
            processes = [
                python(CLAIM, gate, target, cwd=tmp_path, stdin=subprocess.PIPE)
                for _ in range(count)
            ]
            for p in processes:
                line = p.stdout.readline()
                assert line == "waiting\n", (line, p.stderr.read())
            fcntl.flock(held, fcntl.LOCK_UN)  # all of them go at once
        answers = [p.stdout.readline().strip() for p in processes]
    finally:
        for p in processes:
            p.stdin.close()
    for p in processes:
        assert p.wait(timeout=60) == 0, p.stderr.read()
        p.stdout.close()
        p.stderr.close()
    return answers


@pytest.mark.parametrize("explicit", [False, True], ids=["default", "same --out"])
def test_concurrent_claims_never_share_a_folder(tmp_path, explicit):
    """Processes claiming at the same instant: each default run gets its own
    folder; of those given one existing empty --out, exactly one gets it."""
    out = tmp_path / "shared"
    out.mkdir()
    outputs = _claim_all_at_once(tmp_path, out if explicit else "-")
    claimed = [line.split(" ", 1)[1] for line in outputs if line.startswith("claimed")]
    if explicit:
        assert len(claimed) == 1, outputs
        refused = [line for line in outputs if line.startswith("refused")]
        assert len(refused) == 5
        assert all(f"output folder {out} already holds" in r for r in refused)
    else:
        assert len(claimed) == len(set(claimed)) == 6, outputs
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
            Path(c).name for c in claimed
        )


def test_claim_refuses_a_folder_with_files_or_a_run(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="already holds files"):
        RunDir.claim("exp", busy)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]

    done = RunDir.claim("exp", tmp_path / "done")
    done.complete()
    with pytest.raises(RunError, match="already holds a complete exp run"):
        RunDir.claim("exp", tmp_path / "done")

    stopped = RunDir.claim("exp", tmp_path / "stopped")
    stopped.stage("training", step=300, steps=1000)
    stopped.interrupted(signal.SIGINT)
    with pytest.raises(RunError) as info:
        RunDir.claim("exp", tmp_path / "stopped")
    assert "interrupted at training step 300 of 1,000" in str(info.value)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: t / "file", "is a file; choose another --out"),
        (lambda t: t / "file" / "run", "file is a file, not a folder"),
        (lambda t: t / "file" / "a" / "b", "file is a file, not a folder"),
    ],
    ids=["a file", "under a file", "deep under a file"],
)
def test_claim_path_problems_are_one_line(tmp_path, make, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError) as info:
        RunDir.claim("exp", make(tmp_path))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="no /proc here")
def test_claim_under_proc_is_one_line():
    with pytest.raises(RunError, match="cannot create output folder /proc/x/run"):
        RunDir.claim("exp", "/proc/x/run")


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    # Root writes through permissions: a read-only bind mount instead.
    done = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(folder), str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"root cannot mount read-only here: {done.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_claim_on_a_read_only_file_system_is_one_line(read_only_folder):
    with pytest.raises(RunError) as info:
        RunDir.claim("exp", read_only_folder / "run")
    message = str(info.value)
    assert message.startswith(f"cannot create output folder {read_only_folder}/run")
    assert "choose another --out" in message
    assert list(read_only_folder.iterdir()) == []


def test_abandon_gives_the_folder_back(tmp_path):
    new = RunDir.claim("exp", tmp_path / "new")
    new.abandon()
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    RunDir.claim("exp", existing).abandon()
    assert existing.is_dir() and list(existing.iterdir()) == []


def test_state_running_then_complete_written_last(tmp_path):
    run = RunDir.claim("exp", tmp_path / "run")
    assert read_state(run.path)["state"] == "running"  # we hold the lock
    run.write_json("metrics.json", {"a": 1})
    run.complete()
    state = read_state(run.path)
    assert state["state"] == "complete" and state["experiment"] == "exp"
    assert "step" not in state


def test_write_outputs_records_the_environment(tmp_path, capsys):
    """The metrics file gains `environment`; the figures are drawn from the
    file written, then the summary is written (and printed with progress)."""
    run = RunDir.claim("exp", tmp_path / "run")
    metrics = {"accuracy": 0.5}
    drawn = []

    def plot(path, out_dir):
        drawn.append((strict_json(path), out_dir))

    run.write_outputs(metrics, plot, "| summary |\n", progress=True)
    run.complete()
    expected = {"accuracy": 0.5, "environment": environment()}
    assert strict_json(run.path / METRICS_FILE) == expected == metrics
    assert drawn == [(expected, run.path)]
    assert (run.path / SUMMARY_FILE).read_text() == "| summary |\n"
    assert capsys.readouterr().out == f"| summary |\n\nOutputs in {run.path}\n"


KILLED_AT = """
import sys
from experiments.common.run import RunDir
run = RunDir.claim("exp", sys.argv[1])
run.write_json("config.json", {"seed": 0})
run.stage("training", cell="a")
run.progress(1, 2)
run.write_cell("a", {"cell": "a"}, done=1, total=2)
run.write_json("metrics.json", {"accuracy": 0.5})
run.checkpoint("metrics written")
run.complete()
"""


@pytest.mark.parametrize(
    "point", ["step 1", "cell a", "metrics written", "completing", None]
)
def test_sigkill_at_any_point_never_leaves_complete(tmp_path, point):
    out = tmp_path / "run"
    env = {TEST_SIGNAL_VAR: f"{point}:SIGKILL"} if point else {}
    process = python(KILLED_AT, out, env=env)
    _, stderr = process.communicate(timeout=60)
    if point is None:
        assert process.returncode == 0, stderr
        assert read_state(out)["state"] == "complete"
        return
    assert process.returncode == -signal.SIGKILL
    state = read_state(out)
    assert state["state"] == "killed"
    for path in out.rglob("*.json"):
        strict_json(path)
    assert _leftovers(out) == []


def test_reopen_takes_over_an_unfinished_run_only(tmp_path):
    run = RunDir.claim("exp", tmp_path / "run")
    with pytest.raises(RunError, match="in progress"):
        RunDir.reopen(run.path, "exp")
    run.interrupted(signal.SIGTERM)
    with pytest.raises(RunError, match="holds a exp run, not other"):
        RunDir.reopen(run.path, "other")
    again = RunDir.reopen(run.path, "exp")
    state = strict_json(run.path / "run.json")
    assert state["state"] == "running" and state["sessions"] == 2
    assert "signal" not in state
    again.complete()
    with pytest.raises(RunError, match="already complete"):
        RunDir.reopen(run.path, "exp")
    with pytest.raises(RunError, match="not a run folder"):
        RunDir.reopen(tmp_path, "exp")


def test_abandoning_a_reopened_run_restores_its_state(tmp_path):
    run = RunDir.claim("exp", tmp_path / "run")
    run.interrupted(signal.SIGINT)
    RunDir.reopen(run.path, "exp").abandon()
    assert read_state(run.path)["state"] == "interrupted"


def test_cells_are_written_at_once_and_read_back(tmp_path):
    run = RunDir.claim("exp", tmp_path / "run")
    run.write_cell("lr0.1-seed0", {"bn": 0.9}, done=1, total=4)
    assert run.finished_cells() == {"lr0.1-seed0": {"bn": 0.9}}
    assert strict_json(run.path / "run.json")["cells_done"] == 1
    (run.path / "cells" / "broken.json").write_text('{"bn": 0.')
    with pytest.raises(RunError, match="broken.json is unreadable"):
        run.finished_cells()


def test_signals_become_interrupted_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    for signum, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        with pytest.raises(Interrupted) as info:
            with interrupt_on_signals():
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler raises before this ends
        assert info.value.signum == signum and info.value.exit_status == status
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_checkpoint_sends_the_named_signal_only(monkeypatch, tmp_path):
    run = RunDir.claim("exp", tmp_path / "run")
    monkeypatch.setenv(TEST_SIGNAL_VAR, "step 100:SIGTERM")
    with interrupt_on_signals():
        run.progress(50, 200)
        with pytest.raises(Interrupted):
            run.progress(100, 200)
    run.close()


def test_where_says_what_the_run_was_doing():
    assert run_lib.where({"stage": "training", "step": 1200, "steps": 40000}) == (
        "training step 1,200 of 40,000"
    )
    state = {"stage": "training", "step": 5, "steps": 10, "cells": 4, "cells_done": 1}
    state["cell"] = "learning_rate=0.1, seed=0"
    assert run_lib.where(state) == (
        "cell 2 of 4 (learning_rate=0.1, seed=0), training step 5 of 10"
    )
    assert run_lib.where({"stage": "writing outputs"}) == "writing outputs"


def test_wall_time_note_says_how_many_cells_came_from_earlier():
    from experiments.common.metrics import wall_time_note

    fresh = {"wall_seconds": 92.6, "cells_from_earlier_sessions": 0}
    resumed = {"wall_seconds": 12.2, "cells_from_earlier_sessions": 2}
    assert wall_time_note(fresh) == "Wall time 93 s."
    assert wall_time_note(resumed) == (
        "Wall time 12 s (2 cells from an earlier session)."
    )
