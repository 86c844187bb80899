"""Tests for experiments/common/quiet.py: which of TensorFlow's start-up lines go,
and the retracing warning hidden where it is expected."""

import logging.handlers

from experiments.common.quiet import expected_retracing, noise_filter

# What `import tensorflow` and its first device query print on a CPU machine
# (TensorFlow 2.21), plus lines that must stay.
CPU_START = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795453943.722599    3023 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1795453979.156944    3195 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
W0000 00:00:1795453950.000000    3023 some_op.cc:12] a C++ warning
E0000 00:00:1795453954.303810    3023 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
E0000 00:00:1795453955.000000    3023 other.cc:9] a real C++ error
/x/module.py:3: UserWarning: a Python warning
  warnings.warn("a Python warning")
"""  # noqa: E501


def test_level_2_keeps_errors_and_python_warnings_only():
    kept = noise_filter(CPU_START, 2)
    assert kept == (
        "E0000 00:00:1795453955.000000    3023 other.cc:9] a real C++ error\n"
        "/x/module.py:3: UserWarning: a Python warning\n"
        '  warnings.warn("a Python warning")\n'
    )


def test_level_1_keeps_cpp_warnings():
    kept = noise_filter(CPU_START, 1)
    assert "a C++ warning" in kept and "a real C++ error" in kept
    assert "cudart_stub" not in kept and "To enable" not in kept


def test_cuinit_error_stays_where_a_driver_was_found():
    """On a GPU machine a failed cuInit is a real error."""
    lines = CPU_START.splitlines(keepends=True)
    gpu_start = "".join(line for line in lines if "Could not find cuda" not in line)
    assert "failed call to cuInit" in noise_filter(gpu_start, 2)


def test_level_0_keeps_everything():
    assert noise_filter(CPU_START, 0).count("\n") == CPU_START.count("\n")


def test_expected_retracing_hides_that_warning_only_while_in_use():
    import tensorflow as tf

    logger = tf.get_logger()
    handler = logging.handlers.BufferingHandler(capacity=100)
    logger.addHandler(handler)
    retracing = (
        "5 out of the last 5 calls to <function f> triggered tf.function "
        "retracing. Tracing is expensive."
    )
    try:
        with expected_retracing():
            logger.warning(retracing)
            logger.warning("a real warning")
        logger.warning(retracing)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in handler.buffer] == ["a real warning", retracing]
