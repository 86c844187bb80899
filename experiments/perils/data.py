"""The two domains and the mini-batches every variant of a seed trains on.

Domain A is MNIST (`experiments.common.data`, sliced by the config's
`train_examples` / `test_examples`), domain B the UCI digits in MNIST's frame
(`experiments.common.digits`, all of its fixed split). Each training step
consumes one batch of `batch_size` examples of each: `batch_indices` draws
them, each domain in reshuffled epochs of its own, from the seed alone, so
that every variant of a seed sees the same batches in the same order.
"""

from __future__ import annotations

import numpy as np

from experiments.common.digits import load_digits
from experiments.perils.models import DIGITS, DOMAINS, MNIST


def load_domains(mnist):
    """`{domain: Mnist tuple}`: the MNIST the run loaded, and the digits."""
    return {MNIST: mnist, DIGITS: load_digits()}


def batch_indices(num_examples, batch_size, steps, seed, domain_index):
    """`(steps, batch_size)` int32 indices into one domain's training set:
    reshuffled epochs back to back, the order drawn from `(seed, domain)`."""
    rng = np.random.default_rng([seed, 1, domain_index])
    needed = steps * batch_size
    epochs = -(-needed // num_examples)
    order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
    return order[:needed].astype("int32").reshape(steps, batch_size)


def all_batch_indices(domains, config, seed):
    """`{domain: batch_indices(...)}` of one seed's run."""
    return {
        domain: batch_indices(
            len(domains[domain].x_train),
            config["batch_size"],
            config["steps"],
            seed,
            index,
        )
        for index, domain in enumerate(DOMAINS)
    }


def sample(domains, size, seed):
    """`{domain: (x, y)}`: `size` training examples of each domain, drawn
    without replacement from the seed, in their order in the training set
    (all of a domain of `size` examples)."""
    chosen = {}
    for index, domain in enumerate(DOMAINS):
        data = domains[domain]
        rng = np.random.default_rng([seed, 2, index])
        rows = np.sort(rng.choice(len(data.x_train), size=size, replace=False))
        chosen[domain] = (data.x_train[rows], data.y_train[rows])
    return chosen
