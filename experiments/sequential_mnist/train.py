"""Training the LSTM and the BN-LSTM on the same mini-batches, with evaluations."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from experiments.sequential_mnist.evaluate import accuracy
from experiments.sequential_mnist.metrics import TEST, VALIDATION
from experiments.sequential_mnist.models import Sequences


def train_and_evaluate(models, data: Sequences, config, progress=True, report=None):
    """Trains the networks on the same mini-batches, evaluating every
    `eval_every` steps (and at step 0) on the validation and test sets.

    Returns one record per evaluation: `step`, `accuracy[network][split]`
    and `train_loss[network]` (the mean since the last evaluation; None at
    step 0).
    """
    rng = np.random.default_rng([config["seed"], 1])
    batch_size, steps, every = (
        config["batch_size"],
        config["steps"],
        config["eval_every"],
    )
    per_epoch = len(data.x_train) // batch_size

    def batches():
        while True:
            order = rng.permutation(len(data.x_train))
            for i in range(per_epoch):
                yield order[i * batch_size : (i + 1) * batch_size]

    def evaluate(step, losses):
        return {
            "step": step,
            "accuracy": {
                name: {
                    VALIDATION: accuracy(model, data.x_validation, data.y_validation),
                    TEST: accuracy(model, data.x_test, data.y_test),
                }
                for name, model in models.items()
            },
            "train_loss": {
                name: (float(np.mean(losses[name])) if losses[name] else None)
                for name in models
            },
        }

    records = [evaluate(0, {name: [] for name in models})]
    if report is not None:
        report(0, steps)
    stream = batches()
    bar = tqdm(total=steps, unit="step", disable=not progress, desc="LSTM, BN-LSTM")
    with bar:
        for start in range(0, steps, every):
            losses = {name: [] for name in models}
            for _ in range(every):
                index = next(stream)
                x, y = data.x_train[index], data.y_train[index]
                for name, model in models.items():
                    losses[name].append(float(model.train_on_batch(x, y)))
                bar.update(1)
            records.append(evaluate(start + every, losses))
            bar.set_postfix(
                {
                    f"{name} {TEST}": f"{records[-1]['accuracy'][name][TEST]:.4f}"
                    for name in models
                },
                refresh=False,
            )
            if report is not None:
                report(start + every, steps)
    return records
