"""The network and the variants built from its layers.

One network, the Figure-1 style MLP `784 -> [Dense (no bias) -> BN ->
activation] x len(hidden_units) -> Dense(10)` returning logits, is held as
`Layers`: the layer objects, created once per variant. A variant's models
call those objects, so they share every weight:

- `single_model(layers)`: one input, one output (the merged and alternating
  variants train it; every variant is tested through it);
- `two_tower_model(layers)`: two inputs (MNIST, digits) and two outputs,
  each input through the same layers; with `Layers.domains == 2` tower `d`
  calls every BN layer with `domain=d`, so that each tower normalizes and
  keeps its population statistics apart (`bn_keras.BatchNorm(domains=2)`).

`initial_weights` is one seeded draw that `assign_initial` gives to every
variant of that seed.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

import bn_keras
from experiments.common.data import NUM_CLASSES, NUM_PIXELS

# The two domains, in the order of the towers and of `domain=`.
MNIST = "mnist"
DIGITS = "digits"
DOMAINS = (MNIST, DIGITS)
DOMAIN_LABELS = {MNIST: "MNIST", DIGITS: "UCI digits"}
# The test accuracies of a variant: each domain's, and overall, their mean
# (each domain weighs as in training, not by the size of its test set).
OVERALL = "overall"
SCORES = (*DOMAINS, OVERALL)
SCORE_LABELS = {**DOMAIN_LABELS, OVERALL: "overall (mean of both)"}

# The variants, as the metrics file names them.
MERGED = "merged"
SHARED = "shared"
PER_DOMAIN = "per_domain"
REPAIRED = "repaired"
ALTERNATING = "alternating"
VARIANTS = (MERGED, SHARED, PER_DOMAIN, REPAIRED, ALTERNATING)
# The variants trained from the initial weights; `REPAIRED` is `SHARED`
# trained, its statistics recomputed per domain afterwards.
TRAINED = (MERGED, SHARED, PER_DOMAIN, ALTERNATING)
LABELS = {
    MERGED: "(a) merged batches",
    SHARED: "(b) two towers, shared statistics",
    PER_DOMAIN: "(c) two towers, per-domain statistics",
    REPAIRED: "(d) (b) + per-domain precise BN",
    ALTERNATING: "(e) alternating batches",
}
# The variants whose BN layers keep one set of statistics per domain.
PER_DOMAIN_VARIANTS = (PER_DOMAIN, REPAIRED)


@dataclasses.dataclass
class Layers:
    """The layer objects of one network.

    Attributes:
        dense: The hidden Dense layers (no bias: BN's beta is the bias).
        batch_norms: One `bn_keras.BatchNorm` after each.
        activations: The activation after each BN layer.
        logits: The output Dense layer.
        domains: 1 (shared statistics) or 2 (per-domain statistics).
    """

    dense: list
    batch_norms: list
    activations: list
    logits: keras.layers.Dense
    domains: int = 1

    def apply(self, x, domain=None):
        """The network on `x`; with `domains > 1`, every BN layer uses `domain`."""
        for dense, batch_norm, activation in zip(
            self.dense, self.batch_norms, self.activations, strict=True
        ):
            h = dense(x)
            h = batch_norm(h) if domain is None else batch_norm(h, domain=domain)
            x = activation(h)
        return self.logits(x)


def build_layers(config, domains=1):
    """The network's layers, unbuilt; `domains=2` for per-domain statistics."""
    options = {"momentum": config["bn_momentum"], "epsilon": config["bn_epsilon"]}
    if domains > 1:
        options["domains"] = domains
    count = len(config["hidden_units"])
    activation = config["activation"]
    return Layers(
        dense=[
            keras.layers.Dense(units, use_bias=False, name=f"dense_{i}")
            for i, units in enumerate(config["hidden_units"], start=1)
        ],
        batch_norms=[
            bn_keras.BatchNorm(name=f"bn_{i}", **options) for i in range(1, count + 1)
        ],
        activations=[
            keras.layers.Activation(activation, name=f"{activation}_{i}")
            for i in range(1, count + 1)
        ],
        logits=keras.layers.Dense(NUM_CLASSES, name="logits"),
        domains=domains,
    )


def single_model(layers, domain=None, name="network"):
    """One input, one output; with per-domain layers, the statistics of `domain`."""
    if layers.domains > 1 and domain is None:
        raise ValueError(
            "a network with per-domain statistics needs the domain to test on"
        )
    pixels = keras.Input((NUM_PIXELS,), name="pixels")
    return keras.Model(pixels, layers.apply(pixels, domain), name=name)


def two_tower_model(layers, name="two_towers"):
    """Inputs `[mnist, digits]`, outputs their logits, every weight shared;
    with `layers.domains == 2` tower `d` normalizes with domain `d`'s statistics."""
    inputs = [keras.Input((NUM_PIXELS,), name=domain) for domain in DOMAINS]
    outputs = [
        layers.apply(x, None if layers.domains == 1 else index)
        for index, x in enumerate(inputs)
    ]
    return keras.Model(inputs, outputs, name=name)


def initial_weights(config, seed):
    """One seed's initial draw, `{name: array}`: He-normal Dense kernels
    (`N(0, 2 / fan_in)`), zero logits bias, BN's gamma 1 and beta 0."""
    rng = np.random.default_rng([seed, 0])
    sizes = [NUM_PIXELS, *config["hidden_units"], NUM_CLASSES]
    names = [f"dense_{i}" for i in range(1, len(sizes) - 1)] + ["logits"]
    weights = {}
    for name, fan_in, fan_out in zip(names, sizes[:-1], sizes[1:], strict=True):
        kernel = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        weights[f"{name}/kernel"] = kernel.astype("float32")
    weights["logits/bias"] = np.zeros(NUM_CLASSES, "float32")
    for i, units in enumerate(config["hidden_units"], start=1):
        weights[f"bn_{i}/gamma"] = np.ones(units, "float32")
        weights[f"bn_{i}/beta"] = np.zeros(units, "float32")
    return weights


def trainable_by_name(layers):
    """`{"layer/weight": variable}` of the trainable weights of `layers`."""
    named = {}
    for layer in (*layers.dense, *layers.batch_norms, layers.logits):
        for variable in layer.trainable_weights:
            named[f"{layer.name}/{variable.name}"] = variable
    return named


def assign_initial(layers, weights):
    """Gives the built `layers` the draw `weights` (every trainable weight)."""
    named = trainable_by_name(layers)
    if set(named) != set(weights):
        raise ValueError(
            f"the network's weights {sorted(named)} are not the draw's "
            f"{sorted(weights)}"
        )
    for name, variable in named.items():
        variable.assign(weights[name])


def copy_to_per_domain(source, target):
    """Gives the per-domain `target` the trained weights of the shared
    `source`, each domain's statistics starting from the shared ones."""
    named = trainable_by_name(target)
    for name, variable in trainable_by_name(source).items():
        named[name].assign(variable)
    for shared, per_domain in zip(source.batch_norms, target.batch_norms, strict=True):
        for statistic in ("moving_mean", "moving_variance"):
            value = keras.ops.convert_to_numpy(getattr(shared, statistic))
            stacked = np.broadcast_to(value, (target.domains, *value.shape))
            getattr(per_domain, statistic).assign(stacked)


def domain_statistics(layer, domain=None):
    """A BN layer's `(moving_mean, moving_variance)` as NumPy arrays, those
    of `domain` for a per-domain layer."""
    mean = keras.ops.convert_to_numpy(layer.moving_mean)
    variance = keras.ops.convert_to_numpy(layer.moving_variance)
    if getattr(layer, "domains", 1) > 1:
        return mean[domain], variance[domain]
    return mean, variance
