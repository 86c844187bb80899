"""One seed of the study: the variants trained and tested, (b) repaired, the diagnosis.

`run_seed` trains every variant of `models.TRAINED` from the seed's draw on
the seed's batches, tests each with population statistics, and repairs the
shared-statistics variant afterwards (`repair`: its trained weights in the
per-domain network, each domain's statistics recomputed with
`bn_keras.recompute_statistics` from that domain's training data). For the
first seed, `diagnose` runs `bn_keras.inspect_statistics` on every variant
against the data its statistics should fit, and `position_between` says
where the shared statistics lie between the two domains'.
"""

from __future__ import annotations

import time

import keras
import numpy as np

import bn_keras
from experiments.common.quiet import expected_retracing
from experiments.perils import data as pdata
from experiments.perils import models as pm
from experiments.perils import train as pt

# What the diagnosis compares each variant's statistics with: each domain's
# training data, or (for the merged variant, which trained on them) merged
# batches of both.
MERGED_DATA = "merged"
DIAGNOSIS_DATA = {
    pm.MERGED: (MERGED_DATA,),
    **{variant: pm.DOMAINS for variant in pm.VARIANTS if variant != pm.MERGED},
}


def repair(shared, config, samples):
    """(d): the per-domain network with the trained weights of `shared` (the
    layers of variant (b)), each domain's statistics recomputed from
    `samples[domain]` through its own tower. Returns its layers."""
    layers = pm.build_layers(config, domains=2)
    model = pm.two_tower_model(layers, name=pm.REPAIRED)
    pm.copy_to_per_domain(shared, layers)
    # Each recomputation compiles its own call, by design.
    with expected_retracing():
        bn_keras.recompute_statistics(
            model,
            [samples[domain][0] for domain in pm.DOMAINS],
            batch_size=config["batch_size"],
            progress=False,
        )
    return layers, model


def run_seed(config, domains, seed, *, report=None, keep=False):
    """Trains, tests and repairs the variants of one seed.

    Args:
        config: The run's config.
        domains: `{domain: Mnist tuple}` from `data.load_domains`.
        seed: The seed of the draw and the batches.
        report: Optional `report(steps_done)` after each compiled chunk,
            the steps counted over this seed's variants.
        keep: Whether to return the trained layers and models too.

    Returns:
        `(result, trained)`: `result` holds per variant the `accuracy`
        (`{domain: ..., "overall": ...}`), the initial weights' SHA-256, the
        mean training loss of the last chunk and the seconds it took; and
        the largest difference between the trained weights of (b) and (c),
        whose training computes the same. `trained` is `{variant: (layers,
        model)}` if `keep`, else None.
    """
    weights = pm.initial_weights(config, seed)
    indices = pdata.all_batch_indices(domains, config, seed)
    steps, chunk = config["steps"], config["chunk_steps"]
    result, trained = {}, {}
    done = 0
    for variant in pm.TRAINED:
        begin = time.perf_counter()
        layers, model = pt.build_variant(variant, config, weights)
        digest = pt.weights_digest(layers)
        trainer = pt.Trainer(variant, model, domains, indices, config)
        for start in range(0, steps, chunk):
            stop = min(start + chunk, steps)
            loss = trainer.train(start, stop)
            done += stop - start
            if report is not None:
                report(done)
        result[variant] = {
            "accuracy": pt.population_accuracy(layers, variant, domains),
            "initial_weights_sha256": digest,
            "train_loss": loss,
            "seconds": time.perf_counter() - begin,
        }
        trained[variant] = (layers, model)
    begin = time.perf_counter()
    samples = pdata.sample(domains, config["statistics_examples"], seed)
    layers, model = repair(trained[pm.SHARED][0], config, samples)
    trained[pm.REPAIRED] = (layers, model)
    result[pm.REPAIRED] = {
        "accuracy": pt.population_accuracy(layers, pm.REPAIRED, domains),
        "initial_weights_sha256": result[pm.SHARED]["initial_weights_sha256"],
        "train_loss": result[pm.SHARED]["train_loss"],
        "seconds": time.perf_counter() - begin,
    }
    towers = {
        variant: pm.trainable_by_name(trained[variant][0])
        for variant in (pm.SHARED, pm.PER_DOMAIN)
    }
    difference = max(
        float(np.max(np.abs(_numpy(v) - _numpy(towers[pm.PER_DOMAIN][name]))))
        for name, v in towers[pm.SHARED].items()
    )
    return {
        "variants": result,
        "towers_weight_difference": difference,
    }, (trained if keep else None)


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable).astype("float64")


def merged_batches(samples, batch_size):
    """`(x, y)` of both domains' samples interleaved in blocks of
    `batch_size`, so that each batch of `2 * batch_size` is a merged batch."""
    (xa, ya), (xb, yb) = (samples[domain] for domain in pm.DOMAINS)
    count = min(len(xa), len(xb)) // batch_size * batch_size
    blocks = count // batch_size

    def interleave(a, b):
        a = a[:count].reshape(blocks, batch_size, *a.shape[1:])
        b = b[:count].reshape(blocks, batch_size, *b.shape[1:])
        return np.concatenate([a, b], axis=1).reshape(2 * count, *a.shape[2:])

    return interleave(xa, xb), interleave(ya, yb)


def diagnose(trained, config, domains, seed):
    """`bn_keras.inspect_statistics` of every variant against the data its
    population statistics should fit (`DIAGNOSIS_DATA`); a per-domain
    network's set of each domain (`domain=`) against that domain's data.

    Returns:
        `{variant: {data: report}}` of `StatisticsReport`s.
    """
    samples = pdata.sample(domains, config["statistics_examples"], seed)
    batch_size = config["batch_size"]
    reports = {}
    for variant in pm.VARIANTS:
        layers = trained[variant][0]
        models = pt.inference_models(layers, variant)
        reports[variant] = {}
        for data in DIAGNOSIS_DATA[variant]:
            options = {}
            if data == MERGED_DATA:
                model, (x, y) = models[pm.MNIST], merged_batches(samples, batch_size)
                size = 2 * batch_size
            else:
                model, (x, y) = models[data], samples[data]
                size = batch_size
                if layers.domains > 1:
                    options["domain"] = pm.DOMAINS.index(data)
            with expected_retracing():
                reports[variant][data] = bn_keras.inspect_statistics(
                    model, x, y, batch_size=size, progress=False, **options
                )
    return reports


def position_between(shared, per_domain):
    """Where each BN layer's shared moving mean lies between the two domains'.

    `per_domain` holds each domain's exact statistics for the same weights
    (the repaired network's). For each feature, `t = (shared - mnist) /
    (digits - mnist)`: 0 at MNIST's mean, 1 at the digits', 0.5 halfway.

    Returns:
        `{layer: {"between": fraction of features with 0 <= t <= 1,
        "median_position": median t, "domain_gap": median |digits - mnist|
        in units of the features' pooled standard deviation}}`.
    """
    result = {}
    for shared_layer, domain_layer in zip(
        shared.batch_norms, per_domain.batch_norms, strict=True
    ):
        mean, _ = pm.domain_statistics(shared_layer)
        (mean_a, var_a), (mean_b, var_b) = (
            pm.domain_statistics(domain_layer, index)
            for index in range(len(pm.DOMAINS))
        )
        gap = mean_b - mean_a
        usable = np.abs(gap) > 1e-6
        t = (mean - mean_a)[usable] / gap[usable]
        spread = np.sqrt((var_a + var_b) / 2 + shared_layer.epsilon)
        result[shared_layer.name] = {
            "between": float(np.mean((t >= 0) & (t <= 1))),
            "median_position": float(np.median(t)),
            "domain_gap": float(np.median(np.abs(gap) / spread)),
        }
    return result
