"""The LeNet-BN experiment (experiments/lenet_bn, d2l 7.5): its BN maths,
folding, the callbacks study, data and command line."""

import gzip

import keras
import numpy as np
import pytest

import bn_keras
from experiments.common import data as data_lib
from experiments.common.metrics import (
    BATCH_STATS,
    DEBIASED_EMA,
    EMA,
    METRICS_FILE,
    PRECISE,
)
from experiments.lenet_bn import callbacks_study as cs
from experiments.lenet_bn import main as lenet_bn
from experiments.lenet_bn import models as lm
from experiments.lenet_bn import train as lt
from experiments.lenet_bn.plots import FIGURES, plot_all
from tests import reference
from tests.experiments.helpers import (
    assert_outputs_whole,
    idx_bytes,
    strict_json,
)


@pytest.fixture(scope="module")
def lenet_run(smoke_run):
    return smoke_run("lenet_bn")


def test_end_to_end(lenet_run):
    out, metrics = lenet_run
    names = ["config.json", "summary.md", *FIGURES]
    names += [f"{v}.keras" for v in lm.VERSIONS]
    names += ["bn_keras_folded.keras", "keras_folded.keras"]
    for name in names:
        assert (out / name).is_file(), name
    assert strict_json(out / "run.json")["state"] == "complete"
    assert metrics["epochs"] == [1, 2]
    for version in lm.VERSIONS:
        curves = metrics["versions"][version]
        assert len(curves["test_accuracy"]) == 2
        assert all(0.0 <= a <= 1.0 for a in curves["train_accuracy"])
        assert all(s > 0 for s in curves["examples_per_second"])
    assert set(metrics["statistics"]) == {EMA, DEBIASED_EMA, PRECISE, BATCH_STATS}
    # The EMA column is the bn_keras network's own test accuracy.
    assert (
        metrics["statistics"][EMA] == metrics["versions"]["bn_keras"]["test_accuracy"]
    )
    assert set(metrics["first_bn"]) == {lm.SCRATCH, lm.BN_KERAS, lm.KERAS}
    for params in metrics["first_bn"].values():
        assert len(params["gamma"]) == len(params["beta"]) == 6
    summary = (out / "summary.md").read_text()
    assert "| bn_keras.BatchNorm | 4 -> 0 |" in summary
    assert "| plain LeNet (no BN) |" in summary


def test_figures_are_drawn_from_the_metrics_file_alone(lenet_run, tmp_path):
    out, _ = lenet_run
    assert plot_all(out / METRICS_FILE, tmp_path) == [tmp_path / n for n in FIGURES]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FIGURES)
    assert_outputs_whole(tmp_path)


def test_versions_train_alike(lenet_run):
    # Same initial weights, same batches, the same maths in three layers.
    _, metrics = lenet_run
    losses = [metrics["versions"][v]["train_loss"] for v in lm.VERSIONS[:3]]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-3)
    np.testing.assert_allclose(losses[1], losses[2], rtol=1e-3)
    gammas = [metrics["first_bn"][v]["gamma"] for v in lm.VERSIONS[:3]]
    np.testing.assert_allclose(gammas[0], gammas[2], atol=1e-4)


def test_folded_equals_unfolded(lenet_run):
    out, metrics = lenet_run
    for version in (lm.BN_KERAS, lm.KERAS):
        fold = metrics["fold"][version]
        assert fold["predictions_identical"], version
        assert fold["test_accuracy"] == fold["folded_test_accuracy"]
        assert fold["bn_layers"] == 4 and fold["bn_layers_after_folding"] == 0
    data = _smoke_data(metrics["config"])
    x = lt.images(data.x_test)
    model = keras.saving.load_model(out / "bn_keras.keras")
    folded = keras.saving.load_model(out / "bn_keras_folded.keras")
    assert not bn_keras.batch_norm_layers(folded)
    np.testing.assert_allclose(
        folded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-4
    )
    accuracy = lt.accuracy(model, x, data.y_test)
    assert accuracy == metrics["versions"]["bn_keras"]["test_accuracy"][-1]


def _smoke_data(config):
    return data_lib.select(
        data_lib.load_mnist(config["data_source"]),
        config["train_examples"],
        config["test_examples"],
    )


def test_diagnosis_of_each_epoch(lenet_run):
    out, metrics = lenet_run
    diagnosis, epochs = metrics["diagnosis"], len(metrics["epochs"])
    config = metrics["config"]
    assert diagnosis["batches"] == config["diagnosis_batches"]
    assert diagnosis["examples"] == config["diagnosis_batches"] * config["batch_size"]
    for field in cs.DIAGNOSIS_FIELDS:
        assert len(diagnosis[field]) == epochs, field
    assert all(n in range(5) for n in diagnosis["stale_layers"])
    assert all(s >= 0 for s in diagnosis["mean_shift_max"])
    for low, high, factor in zip(
        diagnosis["variance_ratio_min"],
        diagnosis["variance_ratio_max"],
        diagnosis["variance_factor_max"],
        strict=True,
    ):
        assert 0 < low <= high and factor == pytest.approx(max(high, 1 / low))
    # The worst epoch is the lowest moving-average test accuracy, and its
    # report is that epoch's.
    accuracy = metrics["versions"]["bn_keras"]["test_accuracy"]
    worst = diagnosis["worst"]
    assert accuracy[worst["epoch"] - 1] == min(accuracy) == worst["test_accuracy"]
    report = worst["report"]
    assert [layer["name"] for layer in report["layers"]] == [
        f"{name}_bn" for name in lm.NORMALIZED
    ]
    stale = sum(layer["stale"] for layer in report["layers"])
    assert (
        stale == diagnosis["stale_layers"][worst["epoch"] - 1] == worst["stale_layers"]
    )
    assert report["accuracy_gap"] == worst["accuracy_gap"]
    # After two epochs at learning rate 1.0 the moving averages lag.
    assert worst["stale_layers"] > 0 and "STALE" in worst["table"]
    summary = (out / "summary.md").read_text()
    assert worst["table"] in summary
    assert f"The diagnosis of epoch {worst['epoch']}, the lowest" in summary


def test_callbacks_train_the_same_weights(lenet_run):
    # PreciseBN and use_ema change no weight in training: their runs train
    # exactly the network without callback, on the same batches; the runs
    # that freeze or decay the same until they do.
    _, metrics = lenet_run
    runs, ema = metrics["callbacks"], metrics["use_ema"]["runs"]
    free = len(metrics["epochs"]) - metrics["config"]["freeze_last_epochs"]
    plain, precise = runs[cs.NO_CALLBACK], runs[cs.PRECISE_BN]
    assert plain[cs.TEST_ACCURACY] == metrics["versions"]["bn_keras"]["test_accuracy"]
    assert plain[cs.TRAIN_LOSS] == metrics["versions"]["bn_keras"]["train_loss"]
    for run in (precise, *ema.values()):
        assert run[cs.WEIGHTS_CHECKSUM] == plain[cs.WEIGHTS_CHECKSUM]
        assert run[cs.TRAIN_LOSS] == plain[cs.TRAIN_LOSS]
    changed = {}
    for run in (*cs.FROZEN_RUNS, *cs.DECAYED_RUNS):
        weights = runs[run][cs.WEIGHTS_CHECKSUM]
        assert weights[:free] == plain[cs.WEIGHTS_CHECKSUM][:free], run
        changed[run] = weights[free]
    assert plain[cs.WEIGHTS_CHECKSUM][free] not in changed.values()
    assert len(set(changed.values())) == len(changed)  # the freeze, the decay
    # Until then the statistics are those of the run without callback, or
    # PreciseBN's.
    assert ema[cs.EMA_STALE][cs.TEST_ACCURACY] == plain[cs.TEST_ACCURACY]
    assert ema[cs.EMA_STALE][cs.STATISTICS_CHECKSUM] == plain[cs.STATISTICS_CHECKSUM]
    assert runs[cs.FREEZE][cs.TEST_ACCURACY][:free] == plain[cs.TEST_ACCURACY][:free]
    for run in cs.DECAYED_RUNS:
        assert runs[run][cs.TEST_ACCURACY][:free] == precise[cs.TEST_ACCURACY][:free], (
            run
        )
    # The averaged weights, swapped in at the end of fit(), are the same in
    # both use_ema runs and not the last step's.
    final = {run[cs.FINAL_WEIGHTS_CHECKSUM] for run in ema.values()}
    assert len(final) == 1 and final != {plain[cs.WEIGHTS_CHECKSUM][-1]}


def test_freeze_statistics_fixes_the_last_epochs(lenet_run):
    _, metrics = lenet_run
    runs = metrics["callbacks"]
    free = len(metrics["epochs"]) - metrics["config"]["freeze_last_epochs"]
    # The statistics of the end of the last free epoch, through the end:
    # the moving averages, or PreciseBN's.
    for run, before in (
        (cs.FREEZE, runs[cs.NO_CALLBACK]),
        (cs.PRECISE_FREEZE_DECAY, runs[cs.PRECISE_BN]),
    ):
        statistics = runs[run][cs.STATISTICS_CHECKSUM]
        assert set(statistics[free - 1 :]) == {
            before[cs.STATISTICS_CHECKSUM][free - 1]
        }, run
    # Elsewhere they move with every epoch.
    for run in (cs.NO_CALLBACK, cs.PRECISE_BN, cs.PRECISE_DECAY):
        statistics = runs[run][cs.STATISTICS_CHECKSUM]
        assert len(set(statistics)) == len(statistics), run


def test_precise_bn_is_recomputing_the_statistics(lenet_run):
    # PreciseBN's last epoch is the trained network with its statistics
    # recomputed from the study's sample, and with use_ema PreciseBN
    # recomputes them for the averaged weights after fit() swapped them in.
    out, metrics = lenet_run
    config, runs = metrics["config"], metrics["callbacks"]
    precise = runs[cs.PRECISE_BN]
    assert len(precise[cs.PRECISE_BN_SECONDS]) == len(metrics["epochs"])
    assert all(s > 0 for s in precise[cs.PRECISE_BN_SECONDS])
    data = _smoke_data(config)
    x_train, y_train = lt.images(data.x_train), data.y_train
    sample, _ = cs.training_sample(x_train, y_train, config)
    assert len(sample) == config["precise_bn_batches"] * config["batch_size"]
    model = keras.saving.load_model(out / "bn_keras.keras")
    assert (
        cs.statistics_checksum(model)
        == runs[cs.NO_CALLBACK][cs.STATISTICS_CHECKSUM][-1]
    )
    bn_keras.recompute_statistics(
        model, sample, batch_size=config["batch_size"], progress=False
    )
    accuracy = lt.accuracy(model, lt.images(data.x_test), data.y_test)
    assert accuracy == precise[cs.TEST_ACCURACY][-1]
    np.testing.assert_allclose(
        cs.statistics_checksum(model), precise[cs.STATISTICS_CHECKSUM][-1], rtol=1e-6
    )
    ema = metrics["use_ema"]
    assert (
        ema["recomputed_test_accuracy"]
        == ema["runs"][cs.EMA_PRECISE][cs.FINAL_TEST_ACCURACY]
    )
    # The per-epoch accuracies are PreciseBN's: the same weights, the
    # statistics recomputed from the same sample.
    assert ema["runs"][cs.EMA_PRECISE][cs.TEST_ACCURACY] == precise[cs.TEST_ACCURACY]


def test_use_ema_diagnosis_and_summary(lenet_run):
    out, metrics = lenet_run
    ema = metrics["use_ema"]
    diagnosis = ema["diagnosis"]
    assert set(cs.DIAGNOSIS_FIELDS) <= set(diagnosis)
    assert diagnosis["stale_layers"] == len(diagnosis["report"]["stale_layers"])
    assert diagnosis["mean_shift_max"] == max(
        layer["mean_shift_max"] for layer in diagnosis["report"]["layers"]
    )
    for run in cs.EMA_RUNS:
        assert 0.0 <= ema["runs"][run][cs.FINAL_TEST_ACCURACY] <= 1.0
    summary = (out / "summary.md").read_text()
    assert diagnosis["table"] in summary
    for run in cs.CALLBACK_RUNS:
        assert f"| {cs.run_label(run, metrics['config'])} |" in summary
    assert "| averaged (use_ema) | moving averages fit() leaves (stale) |" in summary


def test_epoch_batches_depend_on_the_step_alone():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10)
    batches = lt.EpochBatches(x, y, batch_size=4, seed=3)
    assert batches.steps_per_epoch == 3 and batches.num_batches is None
    orders = lt.epoch_orders(10, seed=3)
    expected = [next(orders) for _ in range(2)]
    # Keras reads the first batches for their shapes, then from the start.
    first = batches[0]
    read = [batches[i] for i in range(6)]
    np.testing.assert_array_equal(first[0], read[0][0])
    for epoch in range(2):
        got = np.concatenate([read[3 * epoch + s][1] for s in range(3)])
        np.testing.assert_array_equal(got, expected[epoch])
    assert len(read[2][1]) == 2  # the last batch of an epoch is smaller
    with pytest.raises(IndexError, match="already past"):
        batches[0]


def _reference(x, gamma, beta, mean, var, eps, momentum, training):
    """d2l's batch_norm from the paper's formulas (tests.reference), with
    d2l's momentum: the weight of the new batch's moments."""
    if training:
        y, batch_mean, batch_var, _ = reference.train_transform(
            x, gamma, beta, eps, axis=-1
        )
        mean = reference.ema(mean, batch_mean, 1 - momentum)
        var = reference.ema(var, batch_var, 1 - momentum)
        return y, mean, var
    return reference.normalize(x, mean, var, gamma, beta, eps, axis=-1), mean, var


@pytest.mark.parametrize("shape", [(16, 5), (8, 6, 6, 3)], ids=["dense", "conv"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_scratch_batch_norm_matches_numpy(rng, shape, training):
    channels = shape[-1]
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, channels), rng.normal(0, 1, channels)
    mean, var = rng.normal(0, 1, channels), rng.uniform(0.5, 2, channels)
    params = [p.astype(np.float32) for p in (gamma, beta, mean, var)]
    outputs = lm.batch_norm(x, *params, 1e-5, 0.1, training)
    expected = _reference(x, gamma, beta, mean, var, 1e-5, 0.1, training)
    for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got), want, atol=1e-4)

    layer = lm.ScratchBatchNorm(momentum=0.1, epsilon=1e-5)
    layer.build(shape)
    for variable, value in zip(
        (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance),
        params,
        strict=True,
    ):
        variable.assign(value)
    y = keras.ops.convert_to_numpy(layer(x, training=training))
    np.testing.assert_allclose(y, expected[0], atol=1e-4)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.moving_mean), expected[1], atol=1e-5
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.moving_variance), expected[2], atol=1e-5
    )


def test_scratch_layer_is_keras_momentum_point_nine(rng):
    # d2l's momentum 0.1 is Keras' 0.9: same outputs and statistics.
    x = rng.normal(1.0, 2.0, (32, 4, 4, 3)).astype(np.float32)
    scratch = lm.batch_norm_factory(lm.SCRATCH, 0.9, 1e-5)("bn")
    reference = lm.batch_norm_factory(lm.KERAS, 0.9, 1e-5)("bn")
    for layer in (scratch, reference):
        for _ in range(3):
            layer(x, training=True)
    for training in (True, False):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(scratch(x, training=training)),
            keras.ops.convert_to_numpy(reference(x, training=training)),
            atol=1e-4,
        )
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(getattr(scratch, name)),
            keras.ops.convert_to_numpy(getattr(reference, name)),
            atol=1e-5,
        )
    restored = lm.ScratchBatchNorm.from_config(scratch.get_config())
    assert restored.momentum == pytest.approx(0.1) and restored.epsilon == 1e-5


@pytest.mark.parametrize(
    "kwargs", [{"momentum": 1.5}, {"epsilon": 0.0}], ids=["momentum", "epsilon"]
)
def test_scratch_layer_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received"):
        lm.ScratchBatchNorm(**kwargs)


def test_debias_is_what_batch_norm_debias_holds(rng):
    # The debiased statistics the run evaluates are those of the same
    # network trained with bn_keras.BatchNorm(debias=True).
    x = rng.uniform(0, 1, (64, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    models = []
    for options in ({}, {"debias": True}):
        factory = lm.batch_norm_factory(lm.BN_KERAS, 0.9, 1e-5, **options)
        model = lm.build_lenet(factory)
        if models:
            lm.copy_initial_weights(models[0], model)
        models.append(model)
    for model in models:
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    plain, debiased = models
    lt.debias(plain, updates=4, momentum=0.9)
    for ours, theirs in zip(
        bn_keras.batch_norm_layers(plain),
        bn_keras.batch_norm_layers(debiased),
        strict=True,
    ):
        for name in ("moving_mean", "moving_variance"):
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(getattr(ours, name)),
                keras.ops.convert_to_numpy(getattr(theirs, name)),
                rtol=1e-4,
                atol=1e-5,
            )


@pytest.fixture
def fashion_folder(tmp_path, monkeypatch):
    """Small Fashion-MNIST-like IDX files (gzipped), counts patched in."""
    rng = np.random.default_rng(1)
    counts = {"train": 96, "t10k": 40}
    folder = tmp_path / "fashion"
    folder.mkdir()
    for split, count in counts.items():
        images = rng.integers(0, 256, (count, 28, 28))
        labels = rng.integers(0, 10, count)
        for kind, array, magic in (
            ("images-idx3", images, 2051),
            ("labels-idx1", labels, 2049),
        ):
            name = f"{split}-{kind}-ubyte"
            (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array, magic)))
            # Counts as a full copy would hold; no MNIST checksum can match.
            monkeypatch.setitem(data_lib._EXPECTED, name, (count, "0" * 32))
    return folder


# One epoch of the four versions on the 96 images, without the callbacks
# study: the study's code is the same on any data, and the smoke run above
# tests it. Without it, freeze_last_epochs (3) need not be below epochs.
TINY = [
    "--set", "epochs=1", "--set", "batch_size=32", "--set", "train_examples=0",
    "--set", "precise_bn_batches=1", "--set", "speed_rounds=1",
    "--set", "callbacks_study=false", "--quiet",
]  # fmt: skip


def test_fashion_mnist_idx_folder(fashion_folder, tmp_path):
    out = tmp_path / "run"
    argv = ["--data-dir", str(fashion_folder), "--set", "dataset=fashion_mnist"]
    assert lenet_bn.main([*argv, *TINY, "--out", str(out)]) == 0
    config = strict_json(out / "config.json")
    assert config["dataset"] == "fashion_mnist"
    assert config["data_source"] == "dir"
    metrics = strict_json(out / "metrics.json")
    assert metrics["fold"]["bn_keras"]["predictions_identical"]
    loaded = data_lib.load_mnist("dir", fashion_folder, dataset="fashion_mnist")
    assert loaded.x_train.shape == (96, 784) and loaded.y_test.shape == (40,)
    # Without the study: neither its records, nor its figure, nor its part
    # of the summary; the rest of the run is whole.
    assert not {"diagnosis", "callbacks", "use_ema"} & set(metrics)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(FIGURES[:-1])
    assert "Diagnosis" not in (out / "summary.md").read_text()
    assert strict_json(out / "run.json")["state"] == "complete"
    assert_outputs_whole(out)


def test_fashion_mnist_folder_still_checks_headers(fashion_folder):
    path = fashion_folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(40), 2051)[:8] + bytes(40)))
    with pytest.raises(data_lib.DataError, match="wrong magic number 2051"):
        data_lib.load_mnist("dir", fashion_folder, dataset="fashion_mnist")


def _error(capsys, argv):
    assert lenet_bn.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_mnist_checksum_names_the_way_out(fashion_folder, tmp_path, capsys):
    err = _error(
        capsys, ["--data-dir", str(fashion_folder), "--out", str(tmp_path / "r")]
    )
    assert "MD5" in err and "Fashion-MNIST" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs=0", "'epochs' must be positive"),
        ("bn_momentum=1.0", "momentum < 1"),
        ("dataset=cifar", "must be one of ('mnist', 'fashion_mnist')"),
        ("hidden_units=[10]", "unknown config key 'hidden_units'"),
        ("learning_rate=fast", "must be of type float"),
        ("dataset=fashion_mnist", "is not vendored"),
        ("freeze_last_epochs=10", "must be less than 'epochs' (10)"),
        ("ema_momentum=1.0", "'ema_momentum' must be in [0, 1)"),
        ("diagnosis_batches=0", "'diagnosis_batches' must be positive"),
    ],
)
def test_cli_errors(capsys, tmp_path, monkeypatch, override, message):
    monkeypatch.delenv(data_lib.ENV_VAR, raising=False)
    out = tmp_path / "run"
    err = _error(capsys, ["--set", override, "--out", str(out), "--quiet"])
    assert message in err
    assert not out.exists()
