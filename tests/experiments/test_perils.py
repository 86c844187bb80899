"""The perils experiment (experiments/perils, Irpan 2017): the variants share
their start and their batches, each keeps the statistics it should, the
diagnosis flags the shared ones, and the outputs are whole."""

import keras
import numpy as np
import pytest

import bn_keras
from experiments.common.config import ConfigError
from experiments.common.data import load_mnist, select
from experiments.common.metrics import METRICS_FILE
from experiments.perils import data as pdata
from experiments.perils import main as perils
from experiments.perils import models as pm
from experiments.perils import study
from experiments.perils import train as pt
from experiments.perils.plots import FIGURES, plot_all
from tests.experiments.helpers import (
    assert_outputs_whole,
    one_line,
    requires_tensorflow,
    smoke_config,
    strict_json,
)

pytestmark = requires_tensorflow


@pytest.fixture(scope="module")
def perils_run(smoke_run):
    return smoke_run("perils")


@pytest.fixture(scope="module")
def config():
    return smoke_config("perils")


@pytest.fixture(scope="module")
def domains(config):
    mnist = load_mnist("vendored")
    return pdata.load_domains(
        select(mnist, config["train_examples"], config["test_examples"])
    )


@pytest.fixture(scope="module")
def saved(perils_run):
    """The first seed's trained models, `{variant: keras.Model}`."""
    out, _ = perils_run
    return {
        variant: keras.models.load_model(out / f"{variant}.keras")
        for variant in pm.VARIANTS
    }


def test_end_to_end(perils_run):
    out, metrics = perils_run
    for name in ("config.json", "summary.md", *FIGURES):
        assert (out / name).is_file(), name
    assert strict_json(out / "run.json")["state"] == "complete"
    assert_outputs_whole(out)
    config = metrics["config"]
    seeds = metrics["seeds"]
    # More than one seed: the spread over seeds is measured.
    assert seeds == config["seeds"] and len(seeds) > 1
    assert metrics["data"][pm.DIGITS] == {"train": 1198, "test": 599}
    assert metrics["data"][pm.MNIST] == {
        "train": config["train_examples"],
        "test": config["test_examples"],
    }
    for variant in pm.VARIANTS:
        scores = metrics["accuracy"][variant]
        assert set(scores) == set(pm.SCORES)
        for score in pm.SCORES:
            assert len(scores[score]) == len(seeds)
            assert all(0.0 <= a <= 1.0 for a in scores[score])
        np.testing.assert_allclose(
            scores[pm.OVERALL],
            np.mean([scores[d] for d in pm.DOMAINS], axis=0),
        )
        # Far above chance (10%) after the smoke config's 120 steps.
        assert min(scores[pm.OVERALL]) > 0.5
    summary = (out / "summary.md").read_text()
    for variant in pm.VARIANTS:
        assert f"| {pm.LABELS[variant]} |" in summary
    assert "started from the same weights: yes" in summary
    assert "STALE" in summary


def test_figure_is_drawn_from_the_metrics_file_alone(perils_run, tmp_path):
    out, _ = perils_run
    assert plot_all(out / METRICS_FILE, tmp_path) == [tmp_path / n for n in FIGURES]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FIGURES)
    assert_outputs_whole(tmp_path)


def test_variants_of_a_seed_share_their_initial_weights(perils_run, config):
    _, metrics = perils_run
    digests = metrics["initial_weights_sha256"]
    per_seed = [
        {digests[v][i] for v in pm.VARIANTS} for i in range(len(metrics["seeds"]))
    ]
    assert all(len(d) == 1 for d in per_seed)
    assert len(set.union(*per_seed)) == len(per_seed)  # each seed its own draw
    # Built again: every trained variant holds the draw, by name.
    weights = pm.initial_weights(config, 0)
    for variant in pm.TRAINED:
        layers, _ = pt.build_variant(variant, config, weights)
        for name, variable in pm.trainable_by_name(layers).items():
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(variable), weights[name], err_msg=name
            )


def test_the_towers_train_alike(perils_run):
    """(b) and (c) normalize each tower with its own batch statistics in
    training: the same computation, so the same trained weights; only the
    population statistics differ."""
    _, metrics = perils_run
    assert max(metrics["towers_weight_difference"]) <= 1e-6
    losses = metrics["train_loss"]
    np.testing.assert_allclose(losses[pm.SHARED], losses[pm.PER_DOMAIN], rtol=1e-6)


def test_batches_are_the_seeds_and_cover_each_domain(domains, config):
    indices = pdata.all_batch_indices(domains, config, 0)
    again = pdata.all_batch_indices(domains, config, 0)
    other = pdata.all_batch_indices(domains, config, 1)
    n = config["batch_size"]
    for domain in pm.DOMAINS:
        assert indices[domain].shape == (config["steps"], n)
        np.testing.assert_array_equal(indices[domain], again[domain])
        assert not np.array_equal(indices[domain], other[domain])
    # Each epoch of a domain visits every training example once.
    digits = indices[pm.DIGITS].ravel()
    size = len(domains[pm.DIGITS].x_train)
    assert sorted(digits[:size]) == list(range(size))


def test_merged_batches_hold_half_of_each_domain():
    samples = {
        pm.MNIST: (np.zeros((10, 3)), np.zeros(10, int)),
        pm.DIGITS: (np.ones((9, 3)), np.ones(9, int)),
    }
    x, y = study.merged_batches(samples, 4)
    assert x.shape == (16, 3)
    np.testing.assert_array_equal(y, [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4)
    np.testing.assert_array_equal(x[:, 0], y)


def _training_means(model, domains):
    """Each domain's mean of the first BN layer's input (`x @ kernel`: its
    Dense layer has no bias), over its training set, in float64."""
    kernel = keras.ops.convert_to_numpy(model.get_layer("dense_1").kernel)
    return {
        d: (domains[d].x_train.astype("float64") @ kernel).mean(axis=0)
        for d in pm.DOMAINS
    }


def test_shared_statistics_lie_between_the_domains(saved, domains):
    model = saved[pm.SHARED]
    means = _training_means(model, domains)
    shared = keras.ops.convert_to_numpy(model.get_layer("bn_1").moving_mean)
    middle = (means[pm.MNIST] + means[pm.DIGITS]) / 2
    to_middle = np.abs(shared - middle).sum()
    for domain in pm.DOMAINS:
        assert to_middle < np.abs(shared - means[domain]).sum(), domain


def test_per_domain_statistics_differ_and_follow_their_domain(saved, domains):
    model = saved[pm.PER_DOMAIN]
    layer = model.get_layer("bn_1")
    assert layer.domains == 2 and tuple(layer.moving_mean.shape) == (2, 16)
    moving = keras.ops.convert_to_numpy(layer.moving_mean)
    means = _training_means(model, domains)
    gap = np.abs(means[pm.MNIST] - means[pm.DIGITS]).sum()
    assert np.abs(moving[0] - moving[1]).sum() > 0.5 * gap
    for index, (own, other) in enumerate((pm.DOMAINS, pm.DOMAINS[::-1])):
        to_own = np.abs(moving[index] - means[own]).sum()
        assert to_own < 0.5 * np.abs(moving[index] - means[other]).sum(), own


def test_repaired_statistics_are_each_domains_exactly(saved, domains, config):
    """(d)'s first-layer statistics are the mean and variance of what each
    domain's sample brings to it, computed here with NumPy."""
    model = saved[pm.REPAIRED]
    layer = model.get_layer("bn_1")
    samples = pdata.sample(domains, config["statistics_examples"], 0)
    kernel = keras.ops.convert_to_numpy(model.get_layer("dense_1").kernel)
    for index, domain in enumerate(pm.DOMAINS):
        inputs = samples[domain][0].astype("float64") @ kernel.astype("float64")
        mean, variance = pm.domain_statistics(layer, index)
        np.testing.assert_allclose(mean, inputs.mean(axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(variance, inputs.var(axis=0), rtol=1e-4, atol=1e-5)
    # The weights are (b)'s.
    shared = saved[pm.SHARED]
    for name in ("dense_1", "dense_2", "logits", "bn_1"):
        for mine, theirs in zip(
            model.get_layer(name).trainable_weights,
            shared.get_layer(name).trainable_weights,
            strict=True,
        ):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(theirs)
            )


def test_the_diagnosis_flags_the_shared_statistics(perils_run):
    _, metrics = perils_run
    diagnosis = metrics["diagnosis"]
    assert diagnosis["seed"] == 0
    reports = diagnosis["reports"]
    assert set(reports) == set(pm.VARIANTS)
    assert set(reports[pm.MERGED]) == {study.MERGED_DATA}
    for domain in pm.DOMAINS:
        assert reports[pm.SHARED][domain]["stale"], domain
        # (d) is recomputed from the very examples it is compared with.
        assert not reports[pm.REPAIRED][domain]["stale"], domain
        assert (
            reports[pm.REPAIRED][domain]["examples"]
            == metrics["config"]["statistics_examples"]
        )
        # A per-domain network is inspected one domain's set at a time.
        for variant in pm.PER_DOMAIN_VARIANTS:
            layers = reports[variant][domain]["layers"]
            assert all(layer["unreached"] == 0 for layer in layers), variant
    assert set(diagnosis["tables"]) == set(pm.DOMAINS)
    assert all("STALE" in table for table in diagnosis["tables"].values())
    position = metrics["statistics_position"]
    assert set(position) == {"bn_1", "bn_2"}
    assert 0.0 < position["bn_1"]["median_position"] < 1.0


def test_copy_to_per_domain_starts_every_domain_from_the_shared_statistics(config):
    shared = pm.build_layers(config)
    pm.single_model(shared)
    per_domain = pm.build_layers(config, domains=2)
    pm.two_tower_model(per_domain)
    shared.batch_norms[0].moving_mean.assign(np.arange(16, dtype="float32"))
    pm.copy_to_per_domain(shared, per_domain)
    for index in range(2):
        mean, variance = pm.domain_statistics(per_domain.batch_norms[0], index)
        np.testing.assert_array_equal(mean, np.arange(16))
        np.testing.assert_array_equal(variance, np.ones(16))


def test_a_per_domain_network_needs_its_domain(config):
    with pytest.raises(ValueError, match="needs the domain"):
        pm.single_model(pm.build_layers(config, domains=2))


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=1200", "1198 training images of the UCI digits"),
        ("statistics_examples=1300", "1198 training images of the UCI digits"),
        ("statistics_examples=30", "at least 2 x 'batch_size' (40)"),
        ("sgd_momentum=1.0", "'sgd_momentum' must be in [0, 1)"),
        ("lr_schedule=linear", "'lr_schedule'"),
    ],
)
def test_bad_configs_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        smoke_config("perils", override)
    assert message in str(err.value)


def test_an_mnist_sample_larger_than_its_data_is_refused(tmp_path, capsys):
    argv = ["--config", "smoke", "--set", "train_examples=100"]
    argv += ["--set", "batch_size=20", "--out", str(tmp_path / "run"), "--quiet"]
    assert perils.main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert "'statistics_examples' (200) is larger than the 100 MNIST" in err
    assert not (tmp_path / "run").exists()


def test_bn_keras_is_what_the_networks_normalize_with(saved):
    for variant, model in saved.items():
        layers = bn_keras.batch_norm_layers(model)
        assert [layer.name for layer in layers] == ["bn_1", "bn_2"], variant
        expected = 2 if variant in pm.PER_DOMAIN_VARIANTS else 1
        assert all(layer.domains == expected for layer in layers), variant
