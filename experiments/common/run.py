"""Run folders that never lose or fake a result, shared by the three experiments.

A run owns one folder:

    run.json     the run's state, rewritten at each stage; "complete" last
    .lock        created exclusively when the folder is claimed, and held
                 (`flock`) while a process works in the folder
    config.json, metrics.json, summary.md, figures, models
    cells/       the finished cells of a resumable experiment, one file each

The folder is claimed atomically: the default folder with an exclusive
`mkdir` (the next free name if another run took it in the same second), and
any folder by creating `.lock` with `O_CREAT | O_EXCL`. Every file is written
to a temporary name in the same folder, fsync'd and renamed into place, so a
file either holds what was meant or does not exist.

`run.json` says `running`, `complete`, `interrupted` or `failed`, with the
stage and step reached. `complete` is written after every other file, so a
killed run (SIGKILL, power loss) can never look complete: its `run.json`
still says `running` while no process holds `.lock`, which `describe` reports
as killed.

Test hook: with `BN_KERAS_TEST_SIGNAL=<point>:<SIGNAL>` in the environment
(e.g. `step 100:SIGINT`, `metrics written:SIGKILL`), the process sends itself
that signal when it reaches the point, so tests can stop a run at an exact
place. The points are the `checkpoint` calls: `claimed`, `data loaded`,
`step <n>`, `cell <key>`, `models saved`, `metrics written`,
`figures written`, `summary written`, `completing`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

STATE_FILE = "run.json"
LOCK_FILE = ".lock"
CELLS_DIR = "cells"
RUNNING, COMPLETE, INTERRUPTED, FAILED = "running", "complete", "interrupted", "failed"
STATES = (RUNNING, COMPLETE, INTERRUPTED, FAILED)
# Not written by anyone: `describe` reports a `running` folder whose lock no
# process holds as killed.
KILLED = "killed"
TEST_SIGNAL_VAR = "BN_KERAS_TEST_SIGNAL"
# How often, at most, training progress is written to run.json.
PROGRESS_EVERY_SECONDS = 10.0

_ERRNO_HINTS = {
    errno.ENOSPC: "the disk is full; free some space",
    errno.EDQUOT: "the disk quota is exhausted; free some space",
    errno.EFBIG: "the file is larger than this process may write",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.EACCES: "permission denied; choose another --out",
    errno.EPERM: "permission denied; choose another --out",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another --out",
    errno.ENOENT: "the path cannot be created there; choose another --out",
}


class RunError(Exception):
    """An output folder that cannot be claimed or written; one line for the user."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; like KeyboardInterrupt, not an `Exception`."""

    def __init__(self, signum):
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_status(self):
        """128 + the signal number, as a shell reports a process it stopped."""
        return 128 + self.signum


@contextlib.contextmanager
def interrupt_on_signals():
    """Turns SIGINT and SIGTERM into `Interrupted` while the block runs.

    After the first signal both are ignored until the block ends, so that the
    clean-up (marking the folder interrupted) cannot itself be cut short.
    """
    watched = (signal.SIGINT, signal.SIGTERM)

    def handler(signum, frame):
        for s in watched:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in watched}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def os_error_message(what, err):
    """`what: reason; what to do` for an OSError, on one line."""
    reason = err.strerror or str(err)
    hint = _ERRNO_HINTS.get(err.errno)
    return f"{what}: {reason}" + (f" ({hint})" if hint else "")


def _fsync_path(path, *, folder=False):
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    except OSError:
        if folder:
            return  # some platforms cannot open a folder; the rename still holds
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        # Some file systems cannot sync a folder; a file must sync.
        if not folder or err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def temporary_name(path):
    """The temporary name `path` is written under: hidden, same folder, same
    suffix (Keras and Matplotlib choose the format by it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path to write `path` under, then renames it into place.

    The file written there is fsync'd, renamed over `path` and the folder
    fsync'd. If the block fails (a full disk, a signal) the temporary file is
    removed and `path` is left as it was. An OSError becomes a one-line
    `RunError` naming `path`.
    """
    path = Path(path)
    temp = temporary_name(path)
    try:
        yield temp
        _fsync_path(temp)
        os.replace(temp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(err, OSError):
            raise RunError(os_error_message(f"cannot write {path}", err)) from err
        raise
    with contextlib.suppress(OSError):
        _fsync_path(path.parent, folder=True)


def write_bytes(path, data):
    """Writes `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as temp, open(temp, "xb") as f:
        f.write(data)


def dumps_json(value):
    """Strict JSON text: NaN or Infinity raise ValueError instead of being written."""
    return json.dumps(value, indent=1, allow_nan=False) + "\n"


def write_json(path, value):
    write_bytes(path, dumps_json(value).encode())


def write_text(path, text):
    write_bytes(path, text.encode())


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def read_json(path):
    """Parses a JSON file strictly (NaN and Infinity are errors)."""
    return json.loads(Path(path).read_text(), parse_constant=_reject_constant)


def default_folder(name, now=None):
    """`runs/<name>-<date>-<time>`, relative to the working directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return Path("runs") / f"{name}-{stamp}"


def _now():
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _lock_is_held(folder):
    """Whether a process holds `folder/.lock` (a run working there)."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def read_state(folder):
    """The run state recorded in `folder/run.json`, or None if there is none.

    A `running` state whose lock no process holds is returned as `killed`.
    """
    path = Path(folder) / STATE_FILE
    try:
        state = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return {"state": "unreadable", "error": f"{path}: {err}"}
    if state.get("state") == RUNNING and not _lock_is_held(folder):
        state = {**state, "state": KILLED}
    return state


def where(state):
    """What a run was doing, from its state: 'training step 1,200 of 40,000'."""
    parts = []
    if state.get("cells"):
        done = state.get("cells_done", 0)
        cell = state.get("cell")
        if cell is not None and done < state["cells"]:
            parts.append(f"cell {done + 1} of {state['cells']} ({cell})")
        else:
            parts.append(f"{done} of {state['cells']} cells done")
    stage = state.get("stage", "")
    between_cells = state.get("cells") and state.get("cell") is None
    if state.get("step") is not None and stage == "training":
        parts.append(f"training step {state['step']:,} of {state['steps']:,}")
    elif stage and not (stage == "training" and between_cells):
        parts.append(stage)
    return ", ".join(parts) or "the start"


def describe(folder):
    """One phrase saying what `folder` holds, for messages."""
    state = read_state(folder)
    if state is None:
        return "a run being claimed by another process (no run.json yet)"
    kind = state.get("state")
    name = state.get("experiment", "an experiment")
    if kind == COMPLETE:
        return f"a complete {name} run"
    if kind == RUNNING:
        return f"a {name} run in progress (pid {state.get('pid')}, at {where(state)})"
    if kind == KILLED:
        return f"a {name} run that was killed at {where(state)}"
    if kind == INTERRUPTED:
        return f"a {name} run interrupted at {where(state)}"
    if kind == FAILED:
        return f"a {name} run that failed at {where(state)}"
    return f"an unreadable run state ({state.get('error')})"


class RunDir:
    """A claimed run folder: its state file, atomic writes and progress.

    Create one with `RunDir.claim` (a new run) or `RunDir.reopen` (resuming an
    unfinished one); it holds `.lock` until `close`.
    """

    def __init__(self, path, lock_fd, state, *, created, previous=None):
        self.path = Path(path)
        self._lock_fd = lock_fd
        self.state = state
        self._created = created
        self._previous = previous
        self._last_progress_write = time.monotonic()

    @classmethod
    def claim(cls, experiment, out=None, *, name=None, now=None):
        """Claims a new folder for `experiment`: `out`, or the default one,
        `runs/<name>-<date>-<time>` (`name` defaults to `experiment`).

        Raises:
            RunError: `out` is a file, cannot be created, or already holds
                files or a run.
        """
        if out is None:
            path, created = _claim_default(default_folder(name or experiment, now))
        else:
            path, created = _claim_explicit(Path(out))
        try:
            fd = _create_lock(path)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        run = cls(path, fd, {}, created=created)
        try:
            if not created:
                others = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
                if others:
                    raise RunError(
                        f"output folder {path} already holds files ({others[0]}, "
                        "...); choose another --out (runs are never overwritten)"
                    )
            run.state = {
                "experiment": experiment,
                "state": RUNNING,
                "stage": "starting",
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": [sys.executable, *sys.argv],
                "started": _now(),
                "sessions": 1,
            }
            run._write_state()
        except BaseException:
            run._release_claim()
            raise
        return run

    @classmethod
    def reopen(cls, path, experiment):
        """Takes over an interrupted, failed or killed run of `experiment`.

        Raises:
            RunError: `path` is not a run folder, is complete, belongs to
                another experiment or is still running.
        """
        path = Path(path)
        if not (path / STATE_FILE).is_file() or not (path / LOCK_FILE).is_file():
            raise RunError(
                f"cannot resume {path}: not a run folder (no {STATE_FILE} and "
                f"{LOCK_FILE}); give the folder an interrupted run wrote"
            )
        try:
            fd = os.open(path / LOCK_FILE, os.O_RDWR)
        except OSError as err:
            raise RunError(os_error_message(f"cannot resume {path}", err)) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(
                f"cannot resume {path}: it holds {describe(path)}; wait for it or "
                "stop it first"
            ) from None
        try:
            try:
                state = read_json(path / STATE_FILE)
            except (OSError, ValueError) as err:
                raise RunError(
                    f"cannot resume {path}: {path / STATE_FILE} is unreadable ({err})"
                ) from err
            if state.get("experiment") != experiment:
                raise RunError(
                    f"cannot resume {path}: it holds a {state.get('experiment')} "
                    f"run, not {experiment}"
                )
            if state.get("state") == COMPLETE:
                raise RunError(f"cannot resume {path}: the run is already complete")
        except BaseException:
            os.close(fd)
            raise
        previous = dict(state)
        for key in ("signal", "error", "ended"):
            state.pop(key, None)
        state.update(
            state=RUNNING,
            stage="resuming",
            pid=os.getpid(),
            host=socket.gethostname(),
            command=[sys.executable, *sys.argv],
            resumed=_now(),
            sessions=state.get("sessions", 1) + 1,
        )
        run = cls(path, fd, state, created=False, previous=previous)
        run._write_state()
        return run

    @property
    def resumed(self):
        return self._previous is not None

    def file(self, name):
        return self.path / name

    def write_json(self, name, value):
        write_json(self.file(name), value)

    def write_text(self, name, text):
        write_text(self.file(name), text)

    def write_outputs(self, metrics, plot, summary, progress):
        """Writes `metrics.json`, then the figures `plot(path, out_dir)` draws
        from it, then `summary.md`; prints the summary if `progress`.

        `metrics` gains `environment`, the software and machine of the run.
        """
        from experiments.common.metrics import METRICS_FILE, SUMMARY_FILE, environment

        self.stage("writing outputs")
        metrics["environment"] = environment()
        self.write_json(METRICS_FILE, metrics)
        self.checkpoint("metrics written")
        plot(self.file(METRICS_FILE), self.path)
        self.checkpoint("figures written")
        self.write_text(SUMMARY_FILE, summary)
        self.checkpoint("summary written")
        if progress:
            print(summary)
            print(f"Outputs in {self.path}")

    def atomic(self, name):
        """`atomic_path` for a file of this folder, for writers that take a path."""
        return atomic_path(self.file(name))

    def checkpoint(self, point):
        """The test hook: sends the signal named for `point`, if any."""
        wanted = os.environ.get(TEST_SIGNAL_VAR)
        if not wanted:
            return
        name, _, signame = wanted.rpartition(":")
        if name == point:
            os.kill(os.getpid(), signal.Signals[signame])

    def stage(self, stage, **fields):
        """Records that the run reached `stage` (with `step`, `cell`, ... fields)."""
        if stage != "training":
            self.state.pop("step", None)
            self.state.pop("steps", None)
        self.state.update(stage=stage, **fields)
        self._write_state()

    def progress(self, step, steps):
        """Training reached `step` of `steps`; written to run.json now and then."""
        self.state.update(stage="training", step=int(step), steps=int(steps))
        now = time.monotonic()
        if now - self._last_progress_write >= PROGRESS_EVERY_SECONDS:
            self._write_state()
        self.checkpoint(f"step {step}")

    def finished_cells(self):
        """`{key: result}` of the cells already written to `cells/`."""
        folder = self.file(CELLS_DIR)
        if not folder.is_dir():
            return {}
        cells = {}
        for path in sorted(folder.glob("*.json")):
            if path.name.startswith("."):
                continue  # a temporary file a killed run left behind
            try:
                cells[path.stem] = read_json(path)
            except (OSError, ValueError) as err:
                raise RunError(
                    f"cannot resume {self.path}: {path} is unreadable ({err}); "
                    "delete it to compute that cell again"
                ) from err
        return cells

    def write_cell(self, key, result, *, done, total):
        """Writes one finished cell, at once, and records the count done."""
        folder = self.file(CELLS_DIR)
        try:
            folder.mkdir(exist_ok=True)
        except OSError as err:
            raise RunError(os_error_message(f"cannot create {folder}", err)) from err
        write_json(folder / f"{key}.json", result)
        self.state.update(cells_done=done, cells=total)
        # The finished cell's training step is no longer where the run is.
        for field in ("cell", "step", "steps"):
            self.state.pop(field, None)
        self._write_state()
        self.checkpoint(f"cell {key}")

    def complete(self, **fields):
        """Marks the run complete: call after every other file is written."""
        self.checkpoint("completing")
        self.state.pop("step", None)
        self.state.pop("steps", None)
        self.state.update(state=COMPLETE, stage="done", ended=_now(), **fields)
        self._write_state()
        self.close()

    def interrupted(self, signum):
        """Marks the run interrupted by `signum`; returns whether that was recorded."""
        name = signal.Signals(signum).name
        return self._end(INTERRUPTED, signal=name)

    def failed(self, message):
        """Marks the run failed with `message`; returns whether that was recorded."""
        return self._end(FAILED, error=message)

    def abandon(self):
        """Gives the folder back after a user error, before any result.

        A new claim is removed (with the folder, if this run created it); a
        resumed run gets its previous state back.
        """
        if self._previous is not None:
            with contextlib.suppress(OSError, RunError):
                write_json(self.file(STATE_FILE), self._previous)
            self.close()
        else:
            self._release_claim()

    def close(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def where(self):
        return where(self.state)

    def _end(self, state, **fields):
        self.state.update(state=state, ended=_now(), **fields)
        try:
            self._write_state()
        except (OSError, RunError):
            return False
        finally:
            self.close()
        return True

    def _write_state(self):
        self.state["updated"] = _now()
        write_json(self.file(STATE_FILE), self.state)
        self._last_progress_write = time.monotonic()

    def _release_claim(self):
        for name in (STATE_FILE, LOCK_FILE):
            with contextlib.suppress(OSError):
                self.file(name).unlink()
        self.close()
        if self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()


def _make_parents(path):
    for ancestor in reversed(path.parents):
        if ancestor.exists() and not ancestor.is_dir():
            raise RunError(
                f"cannot create output folder {path}: {ancestor} is a file, not a "
                "folder; choose another --out"
            )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(
            os_error_message(f"cannot create output folder {path}", err)
        ) from err


def _claim_default(path, attempts=1000):
    _make_parents(path)
    for attempt in range(attempts):
        candidate = path if attempt == 0 else path.with_name(f"{path.name}-{attempt}")
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        except OSError as err:
            raise RunError(
                os_error_message(f"cannot create output folder {candidate}", err)
            ) from err
        return candidate, True
    raise RunError(f"{attempts} runs already named {path}*; choose --out")


def _claim_explicit(path):
    if path.exists() and not path.is_dir():
        raise RunError(f"output folder {path} is a file; choose another --out")
    _make_parents(path)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not path.is_dir():
            raise RunError(
                f"output folder {path} is a file; choose another --out"
            ) from None
        return path, False
    except OSError as err:
        raise RunError(
            os_error_message(f"cannot create output folder {path}", err)
        ) from err
    return path, True


def _create_lock(path):
    try:
        fd = os.open(path / LOCK_FILE, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
        raise RunError(
            f"output folder {path} already holds {describe(path)}; choose another "
            "--out (runs are never overwritten)"
        ) from None
    except OSError as err:
        raise RunError(
            os_error_message(f"cannot write to output folder {path}", err)
        ) from err
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd
