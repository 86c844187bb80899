"""Starting TensorFlow without its C++ start-up log lines, keeping real ones.

`TF_CPP_MIN_LOG_LEVEL` (set to 2 by `experiments/__init__.py` unless the user
set it) hides TensorFlow's C++ info and warning lines, but not those logged
before absl's logging starts ("All log messages before absl::InitializeLog()
is called are written to STDERR", "Could not find cuda drivers on your
machine"), and on a machine without a GPU driver the CUDA platform logs an
error ("failed call to cuInit: ... UNKNOWN ERROR (303)") that only says there
is no GPU. `import_tensorflow` captures the process' stderr while TensorFlow
loads and finds its devices, then writes back every line except those.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile

# absl's C++ log format: severity letter, date, time, thread, file:line].
_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_PRE_INIT = "WARNING: All log messages before absl::InitializeLog() is called"
_NO_DRIVER = "Could not find cuda drivers on your machine"
_NO_DRIVER_CUINIT = "failed call to cuInit"
# The continuation line of cpu_feature_guard's info message.
_CONTINUATION = "To enable the following instructions:"


def noise_filter(text, min_level):
    """The lines of `text` that `TF_CPP_MIN_LOG_LEVEL=min_level` should have hidden
    are dropped; returns the rest."""
    lines = text.splitlines(keepends=True)
    no_gpu = any(_NO_DRIVER in line for line in lines)
    kept = []
    dropped_previous = False
    for line in lines:
        match = _LOG_LINE.match(line)
        drop = False
        if line.startswith(_PRE_INIT):
            drop = min_level >= 1
        elif match:
            level = _SEVERITY[match.group(1)]
            # On a machine without a GPU driver, the cuInit error says no more
            # than the info line before it.
            drop = level < min_level or (
                min_level >= 1 and no_gpu and _NO_DRIVER_CUINIT in line
            )
        elif dropped_previous and line.startswith(_CONTINUATION):
            drop = True
        dropped_previous = drop
        if not drop:
            kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def _filtered_stderr(min_level):
    """Captures file descriptor 2 (C++ and Python alike) and writes back the
    lines `noise_filter` keeps when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            kept = noise_filter(text, min_level)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def _min_level():
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def import_tensorflow():
    """Imports TensorFlow and initializes its devices; returns the module.

    Does nothing special if TensorFlow is already loaded, or if the user
    asked for its log lines (`TF_CPP_MIN_LOG_LEVEL=0`).
    """
    if "tensorflow" in sys.modules or _min_level() < 1:
        import tensorflow as tf

        return tf
    with _filtered_stderr(_min_level()):
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf


class _RetracingFilter(logging.Filter):
    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def expected_retracing():
    """Hides TensorFlow's "triggered tf.function retracing" warning while in use.

    Each trainer compiles its own step for its own models, by design; TF
    counts those compilations together and warns after five (a study or sweep
    trains a new network per cell). Other warnings stay.
    """
    import tensorflow as tf

    logger = tf.get_logger()
    retracing = _RetracingFilter()
    logger.addFilter(retracing)
    try:
        yield
    finally:
        logger.removeFilter(retracing)
