"""Fixtures both suites use: Keras state isolated per test, a seeded generator.

The layer's suite (`tests/bn_keras/`, every backend) has its own fixtures in
its `conftest.py`; the experiments' suite (`tests/experiments/`) in its own.
"""

import keras
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _isolate_keras_state():
    """Seeds Keras before each test and restores the global dtype policy after."""
    policy = keras.config.dtype_policy()
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy(policy)


@pytest.fixture
def rng():
    """A NumPy generator, seeded alike in every test."""
    return np.random.default_rng(20150211)
