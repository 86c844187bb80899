"""Times a training step of bn_keras.BatchNormLSTM against keras.layers.LSTM.

The networks of the sequential-MNIST experiment: a 100-unit LSTM or BN-LSTM
reading a batch of 100 sequences of 28 steps of 28 features, then a dense
softmax layer. One training step is `model.train_on_batch` (forward, backward,
RMSProp update, and for the BN-LSTM the per-timestep statistics), compiled as
Keras compiles for each backend (`tf.function` on TensorFlow, `jax.jit` on
JAX; eager on torch). The two models' steps are interleaved, and the result is
the ratio of the median BN-LSTM step to the median LSTM step (the issue's
target: at most 2x on CPU).

Run from the repository root, once per backend:
`KERAS_BACKEND=jax python -m benchmarks.bench_recurrent`.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bn_keras import BatchNormLSTM  # noqa: E402


def _model(recurrent, steps, features):
    inputs = keras.Input((steps, features))
    outputs = keras.layers.Dense(10, activation="softmax")(recurrent(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.RMSprop(1e-3, clipnorm=1.0),
        loss="sparse_categorical_crossentropy",
    )
    return model


def _time(model, x, y, calls):
    start = time.perf_counter()
    for _ in range(calls):
        model.train_on_batch(x, y)  # returns NumPy: waits for the step
    return (time.perf_counter() - start) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=100, help="state size")
    parser.add_argument("--batch-size", type=int, default=100, help="sequences")
    parser.add_argument("--steps", type=int, default=28, help="timesteps")
    parser.add_argument("--features", type=int, default=28, help="inputs per step")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--calls", type=int, default=5, help="steps per round")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.batch_size, args.steps, args.features))
    x = x.astype("float32")
    y = rng.integers(0, 10, size=args.batch_size)
    models = {
        "LSTM": _model(keras.layers.LSTM(args.units), args.steps, args.features),
        "BN-LSTM": _model(
            BatchNormLSTM(args.units, args.steps), args.steps, args.features
        ),
    }
    for model in models.values():
        _time(model, x, y, 3)  # trace and warm up
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(_time(model, x, y, args.calls))
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(
        f"backend {keras.backend.backend()}: training step, batch {args.batch_size}, "
        f"{args.steps} steps of {args.features}, {args.units} units; median of "
        f"{args.repeats} interleaved rounds of {args.calls} steps"
    )
    print(f"LSTM     {medians['LSTM']:8.1f} ms")
    print(
        f"BN-LSTM  {medians['BN-LSTM']:8.1f} ms  "
        f"{medians['BN-LSTM'] / medians['LSTM']:.2f}x"
    )


if __name__ == "__main__":
    main()
