"""`synchronized=True`: global batch statistics on each backend's distribution engine.

One training step is run on a batch split over replicas of very different
statistics (replica `i` holds values of mean `5 i` and spread `1 + 2 i`), and
the outputs, the moving statistics and the gradients are compared with the
float64 NumPy reference over the concatenated batch: the single-process
result. Unequal splits (3 and 7 examples, or 3 and 5) tell the global
statistics from a mean of per-replica means. Each test has a control, a
result of per-replica statistics, that must differ from the reference.

The engines need a fresh process (devices are fixed when a framework starts)
or several, so each test runs this file as a script, one process per worker:
`python tests/bn_keras/test_distributed.py ENGINE FOLDER CASES RANK` writes
that worker's results to `FOLDER/results-RANK.npz`. Workers meet in the
test's own temporary folder or on ports the test holds for them (never a port
number that another test running at once could take), under a time limit,
and are killed if still running when a test ends. Each test runs only under
its own `KERAS_BACKEND`.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from bn_keras import BatchNorm
from tests import reference
from tests.bn_keras.helpers import BACKEND, EPSILON, F32

ROOT = Path(__file__).resolve().parents[2]
FEATURES = (3, 2)
TIMEOUT_S = 180


def _only(backend):
    return pytest.mark.skipif(
        BACKEND != backend, reason=f"Runs under KERAS_BACKEND={backend}."
    )


def _global_batch(sizes):
    """The concatenated batch, a Keras-convention mask and the upstream gradient."""
    rng = np.random.default_rng(20150211)
    x = np.concatenate(
        [
            rng.normal(5.0 * i, 1.0 + 2.0 * i, (n, *FEATURES))
            for i, n in enumerate(sizes)
        ]
    ).astype("float32")
    mask = rng.random(x.shape[:-1]) < 0.7
    upstream = rng.normal(size=x.shape).astype("float32")
    return x, mask, upstream


def _bounds(sizes):
    return np.cumsum([0, *sizes]).tolist()


def _parameters(features):
    """gamma and beta, away from their initializers so that gradients show them."""
    gamma = np.linspace(0.5, 1.5, features).astype("float32")
    beta = np.linspace(-1.0, 1.0, features).astype("float32")
    return gamma, beta


def _layer(case):
    layer = BatchNorm(
        synchronized=case["synchronized"], epsilon=EPSILON, **case["kwargs"]
    )
    layer.build((None, *FEATURES))
    gamma, beta = _parameters(layer.gamma.shape[0])
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    return layer


def _case(sizes, synchronized=True, mask=False, **kwargs):
    kwargs.setdefault("momentum", 0.5)
    return {
        "sizes": list(sizes),
        "synchronized": synchronized,
        "mask": mask,
        "kwargs": kwargs,
    }


def _expected(case):
    """The single-process step over the concatenated batch, in float64."""
    kwargs = case["kwargs"]
    axis = kwargs.get("axis", -1)
    x, mask, upstream = _global_batch(case["sizes"])
    mask = mask if case["mask"] else None
    gamma, beta = _parameters(reference.param_shape(x.shape, axis)[0])
    outputs, mean, variance, count = reference.train_transform(
        x, gamma, beta, EPSILON, axis, mask
    )
    if kwargs.get("unbiased_variance"):
        variance = reference.unbiased(variance, count)
    momentum = kwargs["momentum"]
    if momentum is None:
        moving_mean, moving_variance = mean, variance
    else:
        moving_mean = reference.ema(0.0, mean, momentum)
        moving_variance = reference.ema(1.0, variance, momentum)
    expected = {
        "outputs": outputs,
        "moving_mean": moving_mean,
        "moving_variance": moving_variance,
    }
    if mask is None:
        dx, dgamma, dbeta = reference.train_gradients(x, upstream, gamma, EPSILON, axis)
        expected.update(dx=dx, dgamma=dgamma, dbeta=dbeta)
    return expected


def _per_replica_moments(case):
    """Each replica's own mean and variance: what a replica-local layer sees."""
    x, _, _ = _global_batch(case["sizes"])
    bounds = _bounds(case["sizes"])
    axes = reference.reduction_axes(case["kwargs"].get("axis", -1), x.ndim)
    parts = [
        x[start:stop].astype(np.float64)
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return [np.mean(p, axis=axes) for p in parts], [np.var(p, axis=axes) for p in parts]


def _gather(results, index):
    """One case's results over its replicas, as a single process would give them.

    Outputs and input gradients are concatenated in replica order; gamma and
    beta gradients are summed, as data parallelism sums them (the loss of the
    global batch is the sum of the replicas' losses); every replica's copy
    of the moving statistics is kept.
    """
    replicas = sorted(
        {int(key.split("/")[1]) for key in results if key.startswith(f"{index}/")}
    )
    names = {key.split("/")[2] for key in results if key.startswith(f"{index}/")}
    gathered = {}
    for name in names:
        values = [results[f"{index}/{r}/{name}"] for r in replicas]
        if name in ("outputs", "dx"):
            gathered[name] = np.concatenate(values)
        elif name in ("dgamma", "dbeta"):
            gathered[name] = np.sum(values, axis=0)
        else:
            gathered[name] = values
    return gathered


def _check(cases, results):
    """Synchronized cases equal the reference; controls differ from it."""
    for index, case in enumerate(cases):
        expected = _expected(case)
        got = _gather(results, index)
        assert {"moving_mean", "moving_variance"} <= got.keys(), (case, got.keys())
        if not case["synchronized"] and not case.get("global", False):
            assert not np.allclose(got["outputs"], expected["outputs"], atol=1e-2)
            first = got["moving_variance"][0]
            assert not np.allclose(first, expected["moving_variance"], rtol=0.1)
            if BACKEND == "tensorflow":
                _assert_replicas_agree_on_the_mean_update(case, got)
            continue
        for name in sorted(got.keys() & expected.keys()):
            values = got[name] if isinstance(got[name], list) else [got[name]]
            for value in values:
                np.testing.assert_allclose(
                    value, expected[name], err_msg=f"{case} {name}", **F32
                )
        _assert_not_mean_of_replicas(case, expected)


def _assert_replicas_agree_on_the_mean_update(case, got):
    """Unsynchronized on TensorFlow: every replica holds the same statistics,
    the mean of the replicas' own updates (aggregation "mean", as tf-keras),
    not copies drifting with each replica's slice."""
    means, variances = _per_replica_moments(case)
    momentum = case["kwargs"]["momentum"]
    expected = {
        "moving_mean": np.mean([reference.ema(0.0, m, momentum) for m in means], 0),
        "moving_variance": np.mean(
            [reference.ema(1.0, v, momentum) for v in variances], 0
        ),
    }
    for name, value in expected.items():
        for copy in got[name]:
            np.testing.assert_allclose(copy, value, err_msg=name, **F32)


def _assert_not_mean_of_replicas(case, expected):
    """The data tell global statistics from averages of per-replica ones.

    The mean of the replicas' variances misses the spread between replicas;
    with unequal sizes, the mean of their means also weighs the examples
    unequally.
    """
    if case["mask"] or case["kwargs"].get("unbiased_variance"):
        return
    means, variances = _per_replica_moments(case)
    averages = {"moving_variance": np.mean(variances, axis=0)}
    if len(set(case["sizes"])) > 1:
        averages["moving_mean"] = np.mean(means, axis=0)
    momentum = case["kwargs"]["momentum"]
    for name, average in averages.items():
        if momentum is not None:
            initial = 0.0 if name == "moving_mean" else 1.0
            average = reference.ema(initial, average, momentum)
        assert not np.allclose(average, expected[name], rtol=0.1), name


@contextlib.contextmanager
def _reserved_ports(count):
    """Distinct free TCP ports, held by this process until the block ends.

    Each port is chosen by the OS (bind to port 0) and stays bound by a socket
    of ours with `SO_REUSEPORT` that never listens: while it is held, neither
    another process's bind to port 0 nor an outgoing connection gets that
    port, so there is no window between choosing it and a worker using it. A
    worker's server that sets `SO_REUSEPORT` too (TensorFlow's gRPC server,
    with `TF_GRPC_REUSE_PORT=1`) binds it alongside, and receives every
    connection: only listening sockets do.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        yield ports


def _run_workers(engine, cases, folder, environments):
    """Runs one worker per environment at once; returns their merged results.

    Fails if any worker exits non-zero or the workers are not all done within
    `TIMEOUT_S`; every worker still running then is killed.
    """
    base = {
        **os.environ,
        "KERAS_BACKEND": BACKEND,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    processes, logs = [], []
    try:
        for rank, environment in enumerate(environments):
            log = open(folder / f"log-{rank}.txt", "w")
            logs.append(log)
            command = [
                sys.executable,
                __file__,
                engine,
                str(folder),
                json.dumps(cases),
                str(rank),
            ]
            processes.append(
                subprocess.Popen(
                    command,
                    env={**base, **environment},
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            codes = [p.poll() for p in processes]
            if None not in codes or any(code not in (None, 0) for code in codes):
                break
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in processes]
    if any(code != 0 for code in codes):
        tails = "\n".join(
            f"--- worker {rank} (exit {code}):\n"
            + (folder / f"log-{rank}.txt").read_text()[-3000:]
            for rank, code in enumerate(codes)
        )
        pytest.fail(
            f"{engine} workers failed or timed out after {TIMEOUT_S} s\n{tails}"
        )
    results = {}
    for rank in range(len(environments)):
        with np.load(folder / f"results-{rank}.npz") as saved:
            results.update({key: saved[key] for key in saved.files})
    return results


def _tf_worker(cases, rank):
    import tensorflow as tf

    if "TF_CONFIG" in os.environ:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                timeout_seconds=60
            )
        )
        first_replica = strategy.cluster_resolver.task_id
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        first_replica = 0
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync

    results = {}
    for index, case in enumerate(cases):
        x, mask, upstream = _global_batch(case["sizes"])
        bounds = _bounds(case["sizes"])

        def split(value, bounds=bounds):
            def slice_of(context):
                replica = context.replica_id_in_sync_group
                return value[bounds[replica] : bounds[replica + 1]]

            return strategy.experimental_distribute_values_from_function(slice_of)

        with strategy.scope():
            layer = _layer(case)

        @tf.function
        def step(x, mask, upstream, layer=layer):
            def replica_step(x, mask, upstream):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = layer(x, training=True, mask=mask)
                    loss = tf.reduce_sum(y * upstream)
                dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
                return {"outputs": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}

            return strategy.run(replica_step, args=(x, mask, upstream))

        got = step(split(x), split(mask) if case["mask"] else None, split(upstream))
        got["moving_mean"] = layer.moving_mean.value
        got["moving_variance"] = layer.moving_variance.value
        for name, value in got.items():
            for offset, local in enumerate(strategy.experimental_local_results(value)):
                results[f"{index}/{first_replica + offset}/{name}"] = local.numpy()
    return results


def _jax_worker(cases, rank):
    import jax
    import jax.numpy as jnp
    from keras import distribution

    devices = jax.devices()
    assert len(devices) == 4, devices
    distribution.set_distribution(distribution.DataParallel(devices=devices))

    def shard(value):
        layout = distribution.distribution().get_data_layout(value.shape)
        return distribution.distribute_tensor(jnp.asarray(value), layout)

    results = {}
    for index, case in enumerate(cases):
        x, mask, upstream = _global_batch(case["sizes"])
        if case.get("fit"):
            layer = _layer(case)
            model = keras.Sequential(
                [
                    keras.Input(FEATURES),
                    layer,
                    keras.layers.Flatten(),
                    keras.layers.Dense(1),
                ]
            )
            model.compile(optimizer="sgd", loss="mse")
            model.fit(
                x, upstream[:, 0, :1], batch_size=len(x), shuffle=False, verbose=0
            )
            results[f"{index}/0/moving_mean"] = np.asarray(layer.moving_mean.value)
            results[f"{index}/0/moving_variance"] = np.asarray(
                layer.moving_variance.value
            )
            continue
        if case.get("per_shard"):
            # The control: each shard normalized with its own statistics, as a
            # replica-local layer would.
            bounds = _bounds(case["sizes"])
            for replica in range(len(case["sizes"])):
                rows = slice(bounds[replica], bounds[replica + 1])
                layer = _layer(case)
                y = layer(
                    x[rows], training=True, mask=mask[rows] if case["mask"] else None
                )
                results[f"{index}/{replica}/outputs"] = np.asarray(y)
                results[f"{index}/{replica}/moving_mean"] = np.asarray(
                    layer.moving_mean.value
                )
                results[f"{index}/{replica}/moving_variance"] = np.asarray(
                    layer.moving_variance.value
                )
            continue

        layer = _layer(case)
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(
            x, trainable, mask, upstream, layer=layer, non_trainable=non_trainable
        ):
            y, state = layer.stateless_call(
                trainable, non_trainable, x, training=True, mask=mask
            )
            return jnp.sum(y * upstream), (y, state)

        gradient = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (_, (y, state)), (dx, (dgamma, dbeta)) = gradient(
            shard(x), trainable, shard(mask) if case["mask"] else None, shard(upstream)
        )
        # The step ran sharded: the batch, not a copy of it, on each device.
        assert len(y.sharding.device_set) == 4, y.sharding
        assert not y.sharding.is_fully_replicated, y.sharding
        names = [v.name for v in layer.non_trainable_variables]
        got = {"outputs": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}
        got.update(zip(names, state, strict=True))
        for name, value in got.items():
            results[f"{index}/0/{name}"] = np.asarray(value)
    return results


def _torch_worker(cases, rank):
    import datetime

    import torch
    import torch.distributed as dist

    from bn_keras import distributed

    # The rendezvous is a file in the test's folder: no port to reserve.
    dist.init_process_group(
        "gloo",
        init_method=Path(os.environ["RENDEZVOUS_FILE"]).as_uri(),
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {}
        for index, case in enumerate(cases):
            x, mask, upstream = _global_batch(case["sizes"])
            bounds = _bounds(case["sizes"])
            rows = slice(bounds[rank], bounds[rank + 1])
            layer = _layer(case)
            inputs = torch.tensor(x[rows], requires_grad=True)
            local_mask = torch.tensor(mask[rows]) if case["mask"] else None
            differentiable = distributed._functional_all_reduce_is_differentiable
            if case.get("legacy_all_reduce"):
                # The path taken on a torch whose functional all-reduce has
                # no gradient.
                distributed._functional_all_reduce_is_differentiable = lambda: False
            try:
                y = layer(inputs, training=True, mask=local_mask)
            finally:
                distributed._functional_all_reduce_is_differentiable = differentiable
            torch.sum(y * torch.tensor(upstream[rows])).backward()
            got = {
                "outputs": y,
                "dx": inputs.grad,
                "dgamma": layer.gamma.value.grad,
                "dbeta": layer.beta.value.grad,
                "moving_mean": layer.moving_mean.value,
                "moving_variance": layer.moving_variance.value,
            }
            for name, value in got.items():
                results[f"{index}/{rank}/{name}"] = value.detach().numpy()
        return results
    finally:
        dist.destroy_process_group()


WORKERS = {"tensorflow": _tf_worker, "jax": _jax_worker, "torch": _torch_worker}


@_only("tensorflow")
def test_mirrored_strategy_statistics_are_global(tmp_path):
    cases = [
        _case((4, 4)),
        _case((3, 7)),
        _case((3, 7), unbiased_variance=True),
        _case((3, 7), momentum=None),
        _case((3, 7), mask=True, axis=1),
        _case((3, 7), mask=True),
        _case((3, 7), synchronized=False),
    ]
    results = _run_workers("tensorflow", cases, tmp_path, [{}])
    _check(cases, results)


@_only("tensorflow")
def test_multi_worker_mirrored_strategy_statistics_are_global(tmp_path):
    cases = [
        _case((3, 7)),
        _case((3, 7), unbiased_variance=True),
        _case((3, 7), mask=True, axis=1),
        _case((3, 7), synchronized=False),
    ]
    with _reserved_ports(2) as ports:
        workers = [f"127.0.0.1:{port}" for port in ports]
        environments = [
            {
                "TF_CONFIG": json.dumps(
                    {
                        "cluster": {"worker": workers},
                        "task": {"type": "worker", "index": rank},
                    }
                ),
                # Lets each worker's gRPC server bind the port held for it.
                "TF_GRPC_REUSE_PORT": "1",
            }
            for rank in range(2)
        ]
        results = _run_workers("tensorflow", cases, tmp_path, environments)
    _check(cases, results)


@_only("jax")
def test_data_parallel_statistics_are_global(tmp_path):
    # Sharding splits the batch into equal shards: unequal per-replica sizes
    # cannot occur under DataParallel, so every case has four shards of two.
    shards = (2, 2, 2, 2)
    cases = [
        _case(shards),
        _case(shards, unbiased_variance=True),
        _case(shards, mask=True, axis=1),
        # On JAX the statistics are global with or without `synchronized`.
        {**_case(shards, synchronized=False), "global": True},
        {**_case(shards), "fit": True},
        {**_case(shards, synchronized=False), "per_shard": True},
    ]
    environment = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    results = _run_workers("jax", cases, tmp_path, [environment])
    _check(cases, results)


@_only("torch")
def test_torch_distributed_statistics_are_global(tmp_path):
    cases = [
        _case((3, 5)),
        _case((3, 5), unbiased_variance=True),
        _case((3, 5), momentum=None),
        _case((3, 5), mask=True, axis=1),
        {**_case((3, 5)), "legacy_all_reduce": True},
        _case((3, 5), synchronized=False),
    ]
    environment = {"RENDEZVOUS_FILE": str(tmp_path / "rendezvous")}
    results = _run_workers("torch", cases, tmp_path, [environment] * 2)
    _check(cases, results)


if __name__ == "__main__":
    engine, folder, cases, rank = sys.argv[1:]
    results = WORKERS[engine](json.loads(cases), int(rank))
    np.savez(Path(folder) / f"results-{rank}.npz", **results)
