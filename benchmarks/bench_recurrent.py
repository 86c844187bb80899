"""Times a training step of bn_keras.BatchNormLSTM against keras.layers.LSTM.

The networks of the sequential-MNIST experiment: a 100-unit LSTM or BN-LSTM
reading a batch of 100 sequences of 28 steps of 28 features, then a dense
softmax layer. One training step is `model.train_on_batch` (forward, backward,
RMSProp update, and for the BN-LSTM the per-timestep statistics), compiled as
Keras compiles for each backend (`tf.function` on TensorFlow, `jax.jit` on
JAX; eager on torch). The two models' steps are interleaved, and the result is
the ratio of the median BN-LSTM step to the median LSTM step, against the
target of at most 1.5x on every backend.

Without a mask the BN-LSTM trains through `_unmasked_train_recurrence` (see
`bn_keras/lstm.py`); what it answers, measured on 2 CPU cores:

- the three normalizations in the step: on TensorFlow and JAX the input one
  moved into the step, as Keras' LSTM computes `x_t W_x` there (passing the
  hoisted `(time, batch, 400)` pre-activations and their gradient through
  the loop cost more than normalizing them per step: 1.2x the LSTM's time
  alone on TensorFlow, and on XLA a gradient slower than the whole LSTM);
- the moments as `(1, batch) @ (batch, features)` matmuls (TensorFlow's
  CPU sum over the batch axis of a `(100, 400)` tensor takes about 13
  microseconds, the matmul 4 with oneDNN: the layer's forward and backward
  in 22 ms instead of 28) and the normalizations' gradient written out
  (`keras.ops.custom_gradient`: 76 ops in the gradient of TensorFlow's
  loop body instead of 119, fewer tensors saved per step on both);
- on TensorFlow a `tf.while_loop` that carries the state alone (Keras'
  `scan` reads and writes its carry through TensorArrays every step);
- on torch `native_batch_norm` (one kernel and one backward op per
  normalization) in a loop of direct torch calls, and the input
  pre-activations split by `unbind` (Keras' LSTM indexes them, and each
  index's gradient is a zero-filled tensor of the whole sequence, which
  makes Keras' LSTM the slower of the two on torch).

Not kept: TensorFlow's `FusedBatchNormV3` in the step (a `(100, 400)`
normalization forward and backward in 265 microseconds, written-out ops in
94, with oneDNN), and on JAX `unroll=2` (no gain; Keras' LSTM runs
`lax.scan` with `unroll=1`, as this one does).

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

# The most a BN-LSTM training step may take, in LSTM training steps.
TARGET = 1.5


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
    ratio = medians["BN-LSTM"] / medians["LSTM"]
    print(
        f"backend {keras.backend.backend()}: training step, batch {args.batch_size}, "
        f"{args.steps} steps of {args.features}, {args.units} units; median of "
        f"{args.repeats} interleaved rounds of {args.calls} steps"
    )
    print(f"LSTM     {medians['LSTM']:8.1f} ms")
    print(f"BN-LSTM  {medians['BN-LSTM']:8.1f} ms  {ratio:.2f}x")
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"target <= {TARGET}x: {verdict} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
