"""Times bn_keras.BatchNorm against keras.layers.BatchNormalization, on any backend.

For each feature shape, a training step (forward, backward to the input as
inside a network, SGD update of gamma and beta, moving-statistics update) and
an inference call, compiled as
each backend compiles (`tf.function` on TensorFlow, `jax.jit` on JAX; torch
runs eagerly, as Keras' torch backend does by default). The variants' runs are
interleaved and each is reported as the ratio of its median time to Keras'
median in the same run (below 1: faster than Keras). "bn_keras, no guards"
is ours with the plain EMA update of Keras instead of the guarded one (no
finiteness or count checks on the statistics): the difference is what the
guards cost. On TensorFlow, "bn_keras" uses the fused kernel on every shape
here (`fused=None`), and "bn_keras, fused=False" is the unfused path, which
the other backends, masks, renorm, ghost batches and synchronized layers take.

Run from the repository root, once per backend:
`KERAS_BACKEND=jax python -m benchmarks.bench_layer`.
"""

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from bn_keras import BatchNorm  # noqa: E402

# Issue 14's targets for bn_keras / Keras (the first column), for the fused
# kernel: on TensorFlow.
TARGETS = {
    ("dense (60, 100)", "training step"): 1.0,
    ("NHWC (64, 32, 32, 64)", "training step"): 0.7,
    ("NHWC (64, 32, 32, 64)", "inference"): 1.0,
}
SHAPES = {
    "dense (60, 100)": ((60, 100), -1),
    "NHWC (64, 32, 32, 64)": ((64, 32, 32, 64), -1),
    "NCHW (64, 64, 32, 32)": ((64, 64, 32, 32), 1),
}


class UnguardedBatchNorm(BatchNorm):
    """Ours with Keras' unguarded update rule: the baseline for the guards' cost."""

    def _update_statistics(self, batch_moments, ghosts, domain=None):
        mean = ops.reshape(batch_moments.mean + batch_moments.shift, self._param_shape)
        variance = ops.reshape(batch_moments.variance, self._param_shape)
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m + variance * (1.0 - m))


VARIANTS = {
    "keras": keras.layers.BatchNormalization,
    "bn_keras": BatchNorm,
    "bn_keras, no guards": UnguardedBatchNorm,
}
if keras.backend.backend() == "tensorflow":
    VARIANTS["bn_keras, fused=False"] = functools.partial(BatchNorm, fused=False)


def _tensorflow_steps(layer, x):
    import tensorflow as tf

    x = tf.constant(x)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x, training=True)))
        dx, *grads = tape.gradient(loss, [x, *layer.trainable_variables])
        for variable, grad in zip(layer.trainable_variables, grads, strict=True):
            variable.assign_sub(1e-3 * grad)
        return loss + tf.reduce_sum(dx)  # dx is used, as a layer below would

    @tf.function
    def inference():
        return tf.reduce_sum(layer(x, training=False))

    return {"training step": train_step, "inference": inference}


def _jax_steps(layer, x):
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    state = {
        "trainable": [v.value for v in layer.trainable_variables],
        "non_trainable": [v.value for v in layer.non_trainable_variables],
    }

    def loss_fn(x, trainable, non_trainable):
        y, non_trainable = layer.stateless_call(
            trainable, non_trainable, x, training=True
        )
        return jnp.sum(jnp.square(y)), non_trainable

    @jax.jit
    def jitted_train(trainable, non_trainable):
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (loss, non_trainable), (dx, grads) = grad_fn(x, trainable, non_trainable)
        trainable = [v - 1e-3 * g for v, g in zip(trainable, grads, strict=True)]
        return loss + jnp.sum(dx), trainable, non_trainable

    @jax.jit
    def jitted_inference(trainable, non_trainable):
        y, _ = layer.stateless_call(trainable, non_trainable, x, training=False)
        return jnp.sum(y)

    def train_step():
        loss, state["trainable"], state["non_trainable"] = jitted_train(
            state["trainable"], state["non_trainable"]
        )
        return loss

    def inference():
        return jitted_inference(state["trainable"], state["non_trainable"])

    return {"training step": train_step, "inference": inference}


def _torch_steps(layer, x):
    import torch

    x = torch.as_tensor(x).requires_grad_()

    def train_step():
        loss = torch.sum(torch.square(layer(x, training=True)))
        variables = layer.trainable_variables
        dx, *grads = torch.autograd.grad(loss, [x, *(v.value for v in variables)])
        with torch.no_grad():
            for variable, grad in zip(variables, grads, strict=True):
                variable.value.sub_(1e-3 * grad)
            return loss + torch.sum(dx)

    def inference():
        with torch.no_grad():
            return torch.sum(layer(x.detach(), training=False))

    return {"training step": train_step, "inference": inference}


def _steps(layer, x):
    layer.build(x.shape)
    build = {
        "tensorflow": _tensorflow_steps,
        "jax": _jax_steps,
        "torch": _torch_steps,
    }[keras.backend.backend()]
    return build(layer, x)


def _time(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        result = fn()
    ops.convert_to_numpy(result)  # waits for asynchronous backends
    return (time.perf_counter() - start) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds")
    parser.add_argument("--calls", type=int, default=20, help="calls per round")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(
        f"backend {keras.backend.backend()}: median of {args.repeats} "
        f"interleaved rounds of {args.calls} calls; ratio = time / Keras' time"
    )
    print(
        f"{'shape':24} {'':14} {'keras (ms)':>11} "
        + " ".join(f"{name:>20}" for name in list(VARIANTS)[1:])
    )
    for label, (shape, axis) in SHAPES.items():
        x = rng.normal(1.0, 2.0, size=shape).astype("float32")
        steps = {name: _steps(make(axis=axis), x) for name, make in VARIANTS.items()}
        for step in ("training step", "inference"):
            fns = {name: steps[name][step] for name in VARIANTS}
            for fn in fns.values():
                _time(fn, 3)  # trace and warm up
            times = {name: [] for name in VARIANTS}
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    times[name].append(_time(fn, args.calls))
            medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            cells = [
                f"{medians[name]:8.3f} ms {medians[name] / medians['keras']:5.2f}x"
                for name in list(VARIANTS)[1:]
            ]
            target = TARGETS.get((label, step)) if "fused=False" in VARIANTS else None
            if target is not None:
                met = medians["bn_keras"] / medians["keras"] <= target
                cells.append(f"target <= {target}: {'met' if met else 'MISSED'}")
            print(
                f"{label:24} {step:14} {medians['keras']:11.3f} "
                + " ".join(f"{c:>20}" for c in cells)
            )


if __name__ == "__main__":
    main()
