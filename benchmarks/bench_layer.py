"""Times bn_keras.BatchNorm against keras.layers.BatchNormalization.

For each feature shape, a training step (forward, backward, SGD update of
gamma and beta, moving-statistics update) and an inference call, each
compiled with `tf.function`; the two layers' runs are interleaved and the
ratio of medians is reported (below 1: ours is faster).

Run from the repository root: `python -m benchmarks.bench_layer`.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bn_keras import BatchNorm  # noqa: E402

SHAPES = {"dense (60, 100)": (60, 100), "NHWC (64, 32, 32, 64)": (64, 32, 32, 64)}


def _compiled(layer, x):
    layer.build(x.shape)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(x, training=True)))
        grads = tape.gradient(loss, layer.trainable_variables)
        for variable, grad in zip(layer.trainable_variables, grads, strict=True):
            variable.assign_sub(1e-3 * grad)
        return loss

    @tf.function
    def inference():
        return tf.reduce_sum(layer(x, training=False))

    return {"training step": train_step, "inference": inference}


def _time(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        result = fn()
    result.numpy()
    return (time.perf_counter() - start) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds")
    parser.add_argument("--calls", type=int, default=20, help="calls per round")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"median of {args.repeats} interleaved rounds of {args.calls} calls")
    print(f"{'shape':24} {'':14} {'keras (ms)':>11} {'bn_keras (ms)':>14} {'ratio':>6}")
    for label, shape in SHAPES.items():
        x = tf.constant(rng.normal(1.0, 2.0, size=shape).astype("float32"))
        ours = _compiled(BatchNorm(), x)
        theirs = _compiled(keras.layers.BatchNormalization(), x)
        for name in ours:
            for fn in (ours[name], theirs[name]):
                _time(fn, 3)  # trace and warm up
            times = {"ours": [], "keras": []}
            for _ in range(args.repeats):
                times["keras"].append(_time(theirs[name], args.calls))
                times["ours"].append(_time(ours[name], args.calls))
            keras_ms = statistics.median(times["keras"]) * 1e3
            ours_ms = statistics.median(times["ours"]) * 1e3
            print(
                f"{label:24} {name:14} {keras_ms:11.3f} {ours_ms:14.3f} "
                f"{ours_ms / keras_ms:6.2f}"
            )


if __name__ == "__main__":
    main()
