"""Training both networks with plain SGD on the same sequence of mini-batches.

Two loops give the same numbers:
- `"simple"`: what most users write, one compiled call per network per step;
- `"fast"`: all the steps between two evaluations, for both networks, in one
  XLA-compiled call with the training set already on the device, so the
  Python interpreter is visited once per evaluation instead of per step.
"""

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from experiments.common.quiet import expected_retracing


class BatchIndices:
    """The `(steps, batch_size)` int32 mini-batch indices of a run, drawn as read.

    Reshuffled epochs back to back: the training examples in the order of
    `rng.permutation` for each epoch in turn, `batch_size` at a time. Only
    the epochs a slice reaches are drawn (one held at a time), so the memory
    is that of the slice, not of the run: `indices[start:stop]` is the
    `(stop - start, batch_size)` array of those steps. Reading in order (as
    the training loops do) draws each epoch once; reading backwards draws
    again from the seed, with the same numbers.
    """

    def __init__(self, num_examples, batch_size, steps, seed):
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size)
        self.steps = int(steps)
        self.seed = seed
        self.shape = (self.steps, self.batch_size)
        self.dtype = np.dtype("int32")
        self._restart()

    def _restart(self):
        self._rng = np.random.default_rng([self.seed, 1])
        self._epoch = -1
        self._order = None

    def _epoch_order(self, epoch):
        if epoch < self._epoch:
            self._restart()
        while self._epoch < epoch:
            self._order = self._rng.permutation(self.num_examples)
            self._epoch += 1
        return self._order

    def rows(self, start, stop):
        """Steps `start` to `stop - 1`, as a `(stop - start, batch_size)` array."""
        begin, end = start * self.batch_size, max(stop, start) * self.batch_size
        parts = [np.empty(0, "int64")]
        position = begin
        while position < end:
            epoch, offset = divmod(position, self.num_examples)
            take = min(self.num_examples - offset, end - position)
            parts.append(self._epoch_order(epoch)[offset : offset + take])
            position += take
        rows = np.concatenate(parts).astype("int32")
        return rows.reshape(-1, self.batch_size)

    def __len__(self):
        return self.steps

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self[key[0]][(slice(None),) + key[1:]]
        if isinstance(key, slice):
            steps = range(*key.indices(self.steps))
            if not steps:
                return np.empty((0, self.batch_size), "int32")
            low, high = min(steps), max(steps) + 1
            rows = self.rows(low, high)
            return rows if steps.step == 1 else rows[np.asarray(steps) - low]
        step = range(self.steps)[key]
        return self.rows(step, step + 1)[0]

    def __array__(self, dtype=None, copy=None):
        rows = self.rows(0, self.steps)
        return rows if dtype is None else rows.astype(dtype)


def batch_indices(num_examples, batch_size, steps, seed):
    """`(steps, batch_size)` int32 indices: reshuffled epochs, back to back.

    The whole array at once: for tests and short runs. The training loops
    read a `BatchIndices`, which draws only the steps they train next.
    """
    return BatchIndices(num_examples, batch_size, steps, seed)[:]


def summed_cross_entropy(logits, labels):
    return tf.reduce_sum(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )


def _sgd_step(models, learning_rate, x, y):
    """One SGD step on each model (they share nothing); returns their losses."""
    variables = [v for model in models for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        losses = [summed_cross_entropy(model(x, training=True), y) for model in models]
        total = tf.add_n(losses)
    gradients = tape.gradient(total, variables)
    for variable, gradient in zip(variables, gradients, strict=True):
        variable.assign(variable - learning_rate * gradient)
    return tf.stack(losses)


class Trainer:
    """Runs SGD on `models` over the mini-batches `indices` of the train set.

    `indices` is a `BatchIndices` (or an array of its shape): each call
    reads only the steps it trains.

    `train(start, stop)` performs steps `start` to `stop - 1` and returns the
    mean training loss of each model over them.
    """

    def __init__(self, models, x_train, y_train, indices, learning_rate, loop):
        self.models = tuple(models)
        self.indices = indices
        self.learning_rate = float(learning_rate)
        self.loop = loop
        if loop == "fast":
            self.x = tf.constant(x_train)
            self.y = tf.constant(y_train)
            self._chunk = tf.function(self._chunk_graph, jit_compile=True)
        elif loop == "simple":
            self.x, self.y = x_train, y_train
            self._steps = [
                tf.function(
                    lambda x, y, m=model: _sgd_step((m,), self.learning_rate, x, y)
                )
                for model in self.models
            ]
        else:
            raise ValueError(f"loop must be 'fast' or 'simple'. Received: {loop!r}")

    def _chunk_graph(self, indices):
        total = tf.zeros(len(self.models))
        for i in tf.range(tf.shape(indices)[0]):
            batch = indices[i]
            total += _sgd_step(
                self.models,
                self.learning_rate,
                tf.gather(self.x, batch),
                tf.gather(self.y, batch),
            )
        return total / tf.cast(tf.shape(indices)[0], total.dtype)

    def train(self, start, stop):
        if self.loop == "fast":
            with expected_retracing():
                return self._chunk(tf.constant(self.indices[start:stop])).numpy()
        total = np.zeros(len(self.models))
        for batch in self.indices[start:stop]:
            x, y = self.x[batch], self.y[batch]
            total += [float(step(x, y)[0]) for step in self._steps]
        return total / (stop - start)


def train_and_evaluate(
    networks, data, config, evaluate, progress=True, report=None, desc=None
):
    """Trains the networks, evaluating every `eval_every` steps and at step 0.

    Args:
        networks: The models to train, on the same mini-batches.
        data: An `Mnist` tuple.
        config: The run's config (`batch_size`, `steps`, `eval_every`,
            `seed`, `learning_rate`, `loop`).
        evaluate: Called at each evaluation; returns a dict of values, among
            them `"accuracy": {curve: float}`, shown on the progress bar.
        progress: Whether to show a progress bar.
        report: Optional `report(step, steps)`, called after each evaluation.
        desc: The progress bar's label (default: "training N networks").

    Returns:
        The evaluation records, one dict per evaluation with `step`, the
        evaluator's values and `train_loss`, the mean training loss of each
        network since the last evaluation (NaN at step 0).
    """
    indices = BatchIndices(
        len(data.x_train), config["batch_size"], config["steps"], config["seed"]
    )
    trainer = Trainer(
        networks,
        data.x_train,
        data.y_train,
        indices,
        config["learning_rate"],
        config["loop"],
    )
    return run_schedule(
        trainer,
        config,
        evaluate,
        [float("nan")] * len(networks),
        progress=progress,
        report=report,
        desc=desc or f"training {len(networks)} networks",
    )


def run_schedule(
    trainer, config, evaluate, no_loss, progress, report, desc, start=None
):
    """`trainer.train` in chunks of `eval_every` steps, `evaluate()` after
    each and at step 0; returns the records (see `train_and_evaluate`), with
    `no_loss` as step 0's `train_loss`. The progress bar shows each curve's
    accuracy (its mean where the evaluator gives one value per seed).

    With `start` (a function that snapshots the weights and returns a future
    of `evaluate()`'s values, as `StackedEvaluator.start`), each evaluation
    runs while the next chunk trains; the numbers are the same.
    """
    steps, every = config["steps"], config["eval_every"]
    records = []

    def record(step, values, loss):
        records.append({"step": step, **values, "train_loss": loss})
        bar.update(step - bar.n)
        bar.set_postfix(
            {k: f"{np.mean(v):.4f}" for k, v in values.get("accuracy", {}).items()},
            refresh=False,
        )
        if report is not None:
            report(step, steps)

    with tqdm(total=steps, unit="step", disable=not progress, desc=desc) as bar:
        if start is None:
            record(0, evaluate(), no_loss)
            for begin in range(0, steps, every):
                loss = trainer.train(begin, begin + every)
                record(begin + every, evaluate(), loss.tolist())
            return records
        pending = (0, start(), no_loss)
        for begin in range(0, steps, every):
            loss = trainer.train(begin, begin + every)
            step, future, previous_loss = pending
            record(step, future.result(), previous_loss)
            pending = (begin + every, start(), loss.tolist())
        step, future, previous_loss = pending
        record(step, future.result(), previous_loss)
    return records
