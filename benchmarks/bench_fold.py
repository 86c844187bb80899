"""Times inference of BN-folded models against the unfolded originals, on any backend.

Two models, each with its BN statistics set by a few SGD steps on random data
before `bn_keras.fold_batch_norms` folds them:

- LeNet-BN of Dive into Deep Learning, section 7.5 (sigmoid LeNet on 28 x 28
  inputs, a BN layer after each convolution and dense layer but the last), with
  `bn_keras.BatchNorm` (or Keras' layer, `--lenet-bn keras`): 4 BN layers;
- `keras.applications.ResNet50(weights=None)` on 64 x 64 inputs, 10 classes
  (no download): 53 `BatchNormalization` layers, each after a `Conv2D`.

Two measures, each compiled as Keras compiles `predict` on the backend:
`predict` over a set of examples (throughput, with Keras' batching loop;
10,000 in batches of 256 for LeNet, 128 in batches of 32 for ResNet50), and
`predict_on_batch` on one batch (the compiled inference call; 10 calls per
round for LeNet). The folded and unfolded models run in interleaved rounds, in
alternating order; the ratio is the folded model's median time over the
unfolded one's (below 1: faster). On a machine shared with other work, many
short rounds sample its load alike for both models.

Run from the repository root, once per backend:
`KERAS_BACKEND=jax python -m benchmarks.bench_fold`.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bn_keras import BatchNorm, batch_norm_layers, fold_batch_norms  # noqa: E402
from experiments.lenet_bn.models import build_lenet  # noqa: E402

MODELS = ("lenet", "resnet50")


def resnet50():
    return keras.applications.ResNet50(
        weights=None, input_shape=(64, 64, 3), classes=10
    )


def _set_statistics(model, rng, batch_size, steps, learning_rate, from_logits):
    """A few SGD steps on random data: BN statistics and weights off their init."""
    shape = (batch_size * steps, *model.input_shape[1:])
    x = rng.uniform(0.0, 1.0, shape).astype("float32")
    y = rng.integers(0, 10, len(x))
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
    )
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)


def _timed(fn, model):
    start = time.perf_counter()
    fn(model)
    return time.perf_counter() - start


def _compare(name, model, x, batch_size, rounds, calls):
    """Prints the median times of `model` and its folded copy, and their ratio."""
    folded = fold_batch_norms(model)
    variants = {"unfolded": model, "folded": folded}
    batch = x[:batch_size]
    measures = {
        f"predict, {len(x)} examples": lambda m: m.predict(
            x, batch_size=batch_size, verbose=0
        ),
        f"predict_on_batch, {batch_size}": lambda m: [
            keras.ops.convert_to_numpy(m.predict_on_batch(batch)) for _ in range(calls)
        ],
    }
    outputs = {
        key: m.predict(x, batch_size=batch_size, verbose=0)
        for key, m in variants.items()
    }
    difference = np.max(np.abs(outputs["folded"] - outputs["unfolded"]))
    layers = {key: len(batch_norm_layers(m)) for key, m in variants.items()}
    print(
        f"{name}: {layers['unfolded']} BN layers -> {layers['folded']}; "
        f"max |folded - unfolded| = {difference:.2e} "
        f"(outputs up to {np.max(np.abs(outputs['unfolded'])):.2f})"
    )
    for measure, infer in measures.items():
        for m in variants.values():
            infer(m)  # compile and warm up
        times = {key: [] for key in variants}
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for key in order:
                times[key].append(_timed(infer, variants[key]) / calls)
        medians = {key: statistics.median(t) for key, t in times.items()}
        ratio = medians["folded"] / medians["unfolded"]
        # On a busy machine other processes only add time: the minimums'
        # ratio tells whether the medians' is noise.
        low = min(times["folded"]) / min(times["unfolded"])
        print(
            f"  {measure:26} unfolded {medians['unfolded'] * 1e3:8.1f} ms  "
            f"folded {medians['folded'] * 1e3:8.1f} ms  ratio {ratio:.2f} "
            f"({1 / ratio:.2f}x the throughput; minimums' ratio {low:.2f})"
        )


def run(models, rounds, lenet_bn_impl, seed):
    """Sets up and times each of `models`."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    print(
        f"backend {keras.backend.backend()}, {os.cpu_count()} CPUs: medians of "
        f"{rounds} interleaved rounds; ratio = folded time / unfolded time"
    )
    if "lenet" in models:
        impl = {"bn_keras": BatchNorm, "keras": keras.layers.BatchNormalization}
        layer = impl[lenet_bn_impl]
        model = build_lenet(lambda name: layer(name=name), name="lenet_bn")
        # d2l's settings: batch 256, learning rate 1.0.
        _set_statistics(model, rng, 256, steps=3, learning_rate=1.0, from_logits=True)
        x = rng.uniform(0.0, 1.0, (10_000, 28, 28, 1)).astype("float32")
        _compare("LeNet-BN", model, x, 256, rounds, calls=10)
    if "resnet50" in models:
        model = resnet50()
        _set_statistics(model, rng, 8, steps=3, learning_rate=0.01, from_logits=False)
        x = rng.uniform(0.0, 1.0, (128, 64, 64, 3)).astype("float32")
        _compare("ResNet50 64x64", model, x, 32, rounds, calls=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=list(MODELS),
        help="the models to time (default: both)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=15,
        help="interleaved timed rounds of each measure (default: 15)",
    )
    parser.add_argument(
        "--lenet-bn",
        choices=("bn_keras", "keras"),
        default="bn_keras",
        help="LeNet's BN layer: bn_keras.BatchNorm or keras.layers."
        "BatchNormalization (default: bn_keras)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    run(args.models, args.rounds, args.lenet_bn, args.seed)


if __name__ == "__main__":
    main()
