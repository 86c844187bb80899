"""The experiments' resource limits: mini-batches drawn as they are trained,
and configs refused, before anything starts, where they cannot fit in memory."""

import re

import numpy as np
import pytest

from experiments.common.config import (
    MEMORY_ENV_VAR,
    ConfigError,
    available_memory,
    load_config,
    shipped_configs,
)
from experiments.common.mlp.train import BatchIndices, Trainer, batch_indices
from experiments.mnist_mlp.stacked import StackedIndices
from tests.experiments.helpers import schema, smoke_config

MLP_EXPERIMENTS = ("mnist_mlp", "lr_sweep", "population_study")
EXPERIMENTS = (*MLP_EXPERIMENTS, "sequential_mnist", "lenet_bn")


def _all_at_once(num_examples, batch_size, steps, seed):
    """The mini-batches as they were drawn before: every epoch up front."""
    rng = np.random.default_rng([seed, 1])
    needed = steps * batch_size
    epochs = -(-needed // num_examples)
    order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
    return order[:needed].reshape(steps, batch_size).astype("int32")


@pytest.mark.parametrize("num_examples, batch_size", [(120, 30), (103, 7), (50, 50)])
def test_batch_indices_drawn_in_chunks_are_the_whole_draw(num_examples, batch_size):
    # The same numbers for the same seed as the up-front array: a run's
    # mini-batches (and so its metrics) do not change.
    steps = 40
    expected = _all_at_once(num_examples, batch_size, steps, seed=7)
    indices = BatchIndices(num_examples, batch_size, steps, seed=7)
    chunks = [indices[start : start + 3] for start in range(0, steps, 3)]
    np.testing.assert_array_equal(np.concatenate(chunks), expected)
    assert chunks[0].dtype == np.int32 and indices.shape == (steps, batch_size)
    # Read again, backwards, by step or with a stride: drawn again from the seed.
    np.testing.assert_array_equal(indices[5:9], expected[5:9])
    np.testing.assert_array_equal(indices[-1], expected[-1])
    np.testing.assert_array_equal(indices[1:30:4], expected[1:30:4])
    np.testing.assert_array_equal(indices[:, 2], expected[:, 2])
    np.testing.assert_array_equal(np.asarray(indices), expected)
    np.testing.assert_array_equal(
        batch_indices(num_examples, batch_size, steps, 7), expected
    )


def test_batch_indices_of_a_huge_run_hold_only_what_is_read():
    # Before: an array of (steps, batch_size) built up front, which grew
    # until the OOM killer ended the run.
    steps = 10**18
    indices = BatchIndices(60000, 60, steps, seed=0)
    np.testing.assert_array_equal(indices[0:2], _all_at_once(60000, 60, 2, seed=0))
    stacked = StackedIndices([BatchIndices(1000, 10, steps, seed) for seed in (0, 3)])
    assert stacked.shape == (steps, 10, 2)
    chunk = stacked[0:5]
    assert chunk.shape == (5, 10, 2)
    np.testing.assert_array_equal(chunk[:, :, 1], _all_at_once(1000, 10, 5, seed=3))
    np.testing.assert_array_equal(stacked[0:5, :, 0], _all_at_once(1000, 10, 5, 0))


def test_trainer_reads_the_steps_it_trains():
    from experiments.common.data import load_for_config
    from experiments.common.mlp.models import build_networks

    config = smoke_config("mnist_mlp")
    data = load_for_config(config)
    indices = BatchIndices(len(data.x_train), 60, 10**15, seed=0)
    networks = build_networks(config)
    trainer = Trainer(networks, data.x_train, data.y_train, indices, 0.01, "fast")
    assert np.all(np.isfinite(trainer.train(0, 3)))


@pytest.mark.parametrize("name", MLP_EXPERIMENTS)
def test_network_larger_than_memory_is_refused(name):
    with pytest.raises(ConfigError, match=r"this config needs about .* GiB of memory"):
        load_config(schema(name), overrides=["hidden_units=[100000000]"])


@pytest.mark.parametrize(
    "name, override, part",
    [
        ("mnist_mlp", "steps=1000000000000000000", "metrics (steps / eval_every)"),
        (
            "sequential_mnist",
            "steps=1000000000000000000",
            "metrics (steps / eval_every)",
        ),
        ("sequential_mnist", "hidden_units=[1000000]", "weights (hidden_units)"),
        ("lenet_bn", "epochs=100000000000000", "metrics (epochs)"),
    ],
)
def test_runs_whose_records_or_networks_exceed_memory_are_refused(name, override, part):
    with pytest.raises(ConfigError, match=re.escape(f"of memory ({part} ")):
        load_config(schema(name), overrides=[override])


@pytest.mark.parametrize(
    "name, overrides, key",
    [
        ("mnist_mlp", ["steps=4294967296", "eval_every=4294967296"], "eval_every"),
        ("mnist_mlp", ["hidden_units=[4294967296]"], "hidden_units"),
        ("lr_sweep", ["steps=4294967296"], "steps"),
        ("sequential_mnist", ["hidden_units=[4294967296]"], "hidden_units"),
    ],
)
def test_values_beyond_int32_are_refused(name, overrides, key, monkeypatch):
    # Refused whatever the memory: TensorFlow counts them in int32.
    monkeypatch.setenv(MEMORY_ENV_VAR, "none")
    with pytest.raises(ConfigError, match=f"'{key}' must be at most 2147483647"):
        load_config(schema(name), overrides=overrides)


def test_memory_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv(MEMORY_ENV_VAR, "1M")
    assert available_memory() == (2**20, f"${MEMORY_ENV_VAR}")
    with pytest.raises(ConfigError, match=r"available \(\$BN_KERAS_MEMORY_LIMIT\)"):
        smoke_config("mnist_mlp")
    monkeypatch.setenv(MEMORY_ENV_VAR, "2g")
    assert available_memory()[0] == 2 * 2**30
    smoke_config("mnist_mlp")
    monkeypatch.setenv(MEMORY_ENV_VAR, "none")
    load_config(schema("mnist_mlp"), overrides=["hidden_units=[100000000]"])
    for bad in ("lots", "-3G", "0"):
        monkeypatch.setenv(MEMORY_ENV_VAR, bad)
        with pytest.raises(
            ConfigError, match=f"BN_KERAS_MEMORY_LIMIT must be .*{bad!r}"
        ):
            smoke_config("mnist_mlp")


def test_available_memory_without_the_variable(monkeypatch):
    monkeypatch.delenv(MEMORY_ENV_VAR, raising=False)
    available, where = available_memory()
    assert available is None or available > 0
    assert where in ("MemAvailable in /proc/meminfo", "the physical memory", "unknown")


@pytest.mark.parametrize(
    "name, config",
    [
        (name, config)
        for name in EXPERIMENTS
        for config in [None, *shipped_configs(schema(name).configs_dir)]
    ],
)
def test_defaults_and_shipped_configs_fit_in_a_few_gigabytes(name, config, monkeypatch):
    monkeypatch.setenv(MEMORY_ENV_VAR, "4G")
    load_config(schema(name), config)
