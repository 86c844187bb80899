"""Helpers the layer's tests share; fixtures are in `conftest.py`.

Test modules import these names from here, never from one another.
"""

import keras
import numpy as np
import pytest
from keras import ops

BACKEND = keras.backend.backend()
# Float32 results against the float64 reference.
F32 = {"rtol": 1e-5, "atol": 1e-5}
# The same through per-timestep statistics and the BN-LSTM's recurrence,
# whose float32 rounding adds up over the timesteps.
F32_RECURRENT = {"rtol": 2e-5, "atol": 2e-5}
# The layers' default epsilon, as the references take it.
EPSILON = 1e-3


def tensorflow_only(reason):
    """A mark that skips a test on JAX and torch, saying why."""
    return pytest.mark.skipif(BACKEND != "tensorflow", reason=reason)


def as64(value):
    """A tensor or variable as a float64 NumPy array."""
    return ops.convert_to_numpy(value).astype(np.float64)


def random_inputs(rng, shape, loc=2.0, scale=3.0, dtype="float32"):
    """Normal inputs of mean `loc` and standard deviation `scale`."""
    return rng.normal(loc, scale, shape).astype(dtype)


def assert_statistics(layer, population):
    """The layer's moving statistics equal a `reference.PopulationStatistics`."""
    np.testing.assert_allclose(as64(layer.moving_mean), population.mean, **F32)
    np.testing.assert_allclose(as64(layer.moving_variance), population.variance, **F32)
