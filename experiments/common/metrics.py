"""The names in the experiments' metrics files, defined once.

Every module that writes, plots or summarizes a metrics file imports its keys
from here instead of spelling them out again. JSON has no NaN or Infinity:
a value that is not a finite number is written as `null` (see
`finite_or_none`); docs/experiments/ says what each `null` means.
"""

import math
import platform
import sys

import numpy as np

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"

# A network without batch normalization (every experiment's baseline), and
# Figure 1's network with it.
PLAIN = "plain"
BN = "bn"

# The two ways of running the BN network on test data: population statistics
# (inference) and the batch statistics of the examples given together.
POPULATION = "population"
BATCH_STATS = "batch_stats"

# Figure 1's accuracy curves: the plain network, and the BN network at
# inference (population statistics) and with the test set's batch statistics.
BN_POPULATION = "bn_population"
BN_BATCH_STATS = "bn_batch_stats"
ACCURACY_CURVES = (PLAIN, BN_POPULATION, BN_BATCH_STATS)

# One recorded neuron's sigmoid input over the test set is summarized by these
# statistics, in this order (the last axis of `activations.{plain, bn}`).
PERCENTILES = (15, 50, 85)
STATISTICS = (*(f"p{p}" for p in PERCENTILES), "mean")
P15, P50, P85, MEAN = range(len(STATISTICS))

# Where a BN network's population statistics come from: the exponential
# moving average kept in training (Keras'), the same zero-debiased, the
# cumulative average of all batches, and precise BN (recomputed after training
# with the weights frozen). `BATCH_STATS` above is the reference that needs
# no estimate.
EMA = "ema"
DEBIASED_EMA = "debiased_ema"
CUMULATIVE = "cumulative"
PRECISE = "precise"
ESTIMATORS = (EMA, DEBIASED_EMA, CUMULATIVE, PRECISE)


def finite_or_none(value):
    """A float, or None (JSON null) where `value` is NaN or infinite."""
    value = float(value)
    return value if math.isfinite(value) else None


def finite_lists(array):
    """A NumPy array as nested lists of floats, None where not finite."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 0:
        return finite_or_none(array)
    return [finite_lists(row) for row in array]


def environment():
    """The software and machine a run used, as its metrics file records them."""
    import keras

    recorded = {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    tensorflow = sys.modules.get("tensorflow")
    if tensorflow is not None:
        recorded["tensorflow"] = tensorflow.__version__
    return recorded


def wall_time_note(metrics):
    """The summary line of a resumable run's wall time: 'Wall time 93 s (2
    cells from an earlier session).'"""
    resumed = metrics["cells_from_earlier_sessions"]
    earlier = f" ({resumed} cells from an earlier session)" if resumed else ""
    return f"Wall time {metrics['wall_seconds']:.0f} s{earlier}."
