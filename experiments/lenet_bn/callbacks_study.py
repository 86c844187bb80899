"""LeNet-BN: diagnosing the stale epochs, and steering the statistics with callbacks.

Three parts of one run, on the `bn_keras` network, its data, seed, initial
weights and mini-batches (`train.fit_epochs`):

- Diagnosis: `Study.observe`, called by `train.train_versions` at the end of
  each epoch of the `bn_keras` network, runs `bn_keras.inspect_statistics` on
  the first `diagnosis_batches` batches of the study's training sample; the
  summary prints the full report of the epoch with the lowest test accuracy.
- Callbacks: `Study.run` trains the network again from the same weights with
  `bn_keras.callbacks.PreciseBN` (on the whole sample, every epoch), with
  `bn_keras.callbacks.FreezeStatistics(last_epochs=freeze_last_epochs)`, and
  with both at a decayed learning rate for those last epochs (with PreciseBN
  and the decay alone to compare), and tests it at the end of each epoch
  with the population statistics it then has, as `model.evaluate` would.
- use_ema: it trains it with `SGD(use_ema=True)`, without and with
  `PreciseBN`. Keras swaps the averaged weights in at the end of `fit()`,
  after the moving averages of the statistics were last updated (for the
  weights of the last step, not the averaged ones).

A callback that does not touch training leaves the weights as they are: the
`PreciseBN` and `use_ema` runs train exactly the weights of the run without
callback (their checksums are recorded per epoch), the others the same until
they freeze or decay.
"""

from __future__ import annotations

import time

import keras
import numpy as np
from tqdm.auto import tqdm

import bn_keras
from experiments.common.metrics import finite_or_none
from experiments.common.quiet import expected_retracing
from experiments.lenet_bn import models as lm
from experiments.lenet_bn import train as lt

# The runs of the callbacks comparison, as the metrics file names them: the
# bn_keras network of the main run (no callback), each callback at the
# training's learning rate, and Wu & Johnson's FrozenBN recipe: the last
# epochs at a decayed learning rate (`decay_learning_rate`), the statistics
# recomputed by PreciseBN at the end of the last epoch before the freeze
# (PreciseBN then skips the frozen layers), against the same decay without
# the freeze.
NO_CALLBACK = "none"
PRECISE_BN = "precise_bn"
FREEZE = "freeze_statistics"
PRECISE_DECAY = "precise_bn_decay"
PRECISE_FREEZE_DECAY = "precise_bn_freeze_statistics_decay"
CALLBACK_RUNS = (NO_CALLBACK, PRECISE_BN, FREEZE, PRECISE_DECAY, PRECISE_FREEZE_DECAY)
# The runs whose last `freeze_last_epochs` epochs train at the decayed rate,
# and those whose statistics are frozen then.
DECAYED_RUNS = (PRECISE_DECAY, PRECISE_FREEZE_DECAY)
FROZEN_RUNS = (FREEZE, PRECISE_FREEZE_DECAY)

# The two use_ema runs: the statistics fit() leaves, and PreciseBN's.
EMA_STALE = "stale"
EMA_PRECISE = "precise_bn"
EMA_RUNS = (EMA_STALE, EMA_PRECISE)

# What each run records per epoch: the training loss (averaged over the
# epoch), the test accuracy with the population statistics the network then
# has, and checksums (float64 sums) of its trainable weights and of its
# moving means and variances. PreciseBN's runs also record the seconds it
# took (its logs' entry).
TRAIN_LOSS = "train_loss"
TEST_ACCURACY = "test_accuracy"
WEIGHTS_CHECKSUM = "weights_checksum"
STATISTICS_CHECKSUM = "statistics_checksum"
PRECISE_BN_SECONDS = "precise_bn_seconds"
# The seconds of a study run's fit(), its evaluations included.
RUN_SECONDS = "run_seconds"
# After fit(): the use_ema runs' test accuracy and weights (the averages).
FINAL_TEST_ACCURACY = "final_test_accuracy"
FINAL_WEIGHTS_CHECKSUM = "final_weights_checksum"

# One diagnosis in numbers (from a `StatisticsReport`), as the metrics file
# and the summary name them.
DIAGNOSIS_FIELDS = {
    "stale_layers": "stale BN layers",
    "mean_shift_max": "worst mean shift",
    "variance_ratio_min": "lowest variance ratio",
    "variance_ratio_max": "highest variance ratio",
    "variance_factor_max": "worst variance factor",
    "output_gap": "output gap",
    "accuracy_gap": "accuracy gap (sample)",
}


def run_label(run: str, config: dict) -> str:
    """How the summary and the figure name one of `CALLBACK_RUNS`."""
    last = config["freeze_last_epochs"]
    freeze = f"FreezeStatistics(last_epochs={last})"
    decay = f"last {last} epochs at learning rate {config['decay_learning_rate']}"
    return {
        NO_CALLBACK: "no callback (moving averages)",
        PRECISE_BN: "PreciseBN, every epoch",
        FREEZE: freeze,
        PRECISE_DECAY: f"PreciseBN, {decay}",
        PRECISE_FREEZE_DECAY: f"PreciseBN + {freeze}, {decay}",
    }[run]


def checksum(variables) -> float:
    """The float64 sum of `variables`' values: equal for equal values."""
    return float(
        sum(keras.ops.convert_to_numpy(v).astype(np.float64).sum() for v in variables)
    )


def statistics_checksum(model) -> float:
    """`checksum` of every BN layer's moving mean and moving variance."""
    return checksum(
        v
        for layer in bn_keras.batch_norm_layers(model)
        for v in (layer.moving_mean, layer.moving_variance)
    )


def diagnosis_record(report) -> dict:
    """`DIAGNOSIS_FIELDS` of a `StatisticsReport`, worst over its layers."""

    def extreme(field, pick):
        values = [getattr(layer, field) for layer in report.layers]
        values = [v for v in values if v is not None]
        return finite_or_none(pick(values)) if values else None

    gap = report.accuracy_gap
    record = {
        "stale_layers": len(report.stale_layers),
        "mean_shift_max": extreme("mean_shift_max", max),
        "variance_ratio_min": extreme("variance_ratio_min", min),
        "variance_ratio_max": extreme("variance_ratio_max", max),
        "variance_factor_max": extreme("variance_factor_max", max),
        "output_gap": finite_or_none(report.output_gap),
        "accuracy_gap": None if gap is None else finite_or_none(gap),
    }
    return {field: record[field] for field in DIAGNOSIS_FIELDS}


def full_diagnosis(report) -> dict:
    """A report as the metrics file keeps it: its numbers, its data, its table."""
    return {
        **diagnosis_record(report),
        "report": report.to_dict(),
        "table": str(report),
    }


class _EpochRecorder(keras.callbacks.Callback):
    """Records a study run's epochs; listed after the callbacks it measures."""

    def __init__(self, x_test, y_test, bar, on_epoch):
        super().__init__()
        self.x_test, self.y_test = x_test, y_test
        self.bar, self.on_epoch = bar, on_epoch
        self.records = {
            key: []
            for key in (
                TRAIN_LOSS,
                TEST_ACCURACY,
                WEIGHTS_CHECKSUM,
                STATISTICS_CHECKSUM,
            )
        }

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(1)

    def on_epoch_end(self, epoch, logs=None):
        self.records[TRAIN_LOSS].append(finite_or_none(logs["loss"]))
        self.records[TEST_ACCURACY].append(
            lt.accuracy(self.model, self.x_test, self.y_test)
        )
        self.records[WEIGHTS_CHECKSUM].append(checksum(self.model.trainable_weights))
        self.records[STATISTICS_CHECKSUM].append(statistics_checksum(self.model))
        if logs is not None and PRECISE_BN_SECONDS in logs:
            self.records.setdefault(PRECISE_BN_SECONDS, []).append(
                float(logs[PRECISE_BN_SECONDS])
            )
        self.on_epoch()


class Study:
    """The diagnosis, callbacks and use_ema study of one LeNet-BN run.

    Args:
        data: The run's `Mnist` tuple (flat images).
        config: The run's config.
    """

    def __init__(self, data, config: dict):
        self.config = config
        self.x_train, self.y_train = lt.images(data.x_train), data.y_train
        self.x_test, self.y_test = lt.images(data.x_test), data.y_test
        self.sample = training_sample(self.x_train, self.y_train, config)
        batches = -(-len(self.sample[0]) // config["batch_size"])
        self.diagnosis_steps = min(config["diagnosis_batches"], batches)
        self._reports = []

    def inspect(self, model):
        """`bn_keras.inspect_statistics` of `model` on the diagnosis batches."""
        return bn_keras.inspect_statistics(
            model,
            *self.sample,
            batch_size=self.config["batch_size"],
            steps=self.diagnosis_steps,
            progress=False,
        )

    def observe(self, model, epoch) -> dict:
        """`train_versions`' `observe` for the `bn_keras` network: the diagnosis
        and the checksums of the end of `epoch`."""
        report = self.inspect(model)
        self._reports.append(report)
        return {
            **diagnosis_record(report),
            WEIGHTS_CHECKSUM: checksum(model.trainable_weights),
            STATISTICS_CHECKSUM: statistics_checksum(model),
        }

    def run(self, initial_weights, records, progress=True, report=None) -> dict:
        """Trains the study's networks; returns its sections of the metrics file.

        Args:
            initial_weights: The `bn_keras` network's weights before training
                (`get_weights()`).
            records: The `bn_keras` network's per-epoch records from
                `train_versions(..., observe=self.observe)`.
            progress: Whether to show a progress bar.
            report: Optional `report(step, steps)` after each epoch.

        Returns:
            `{"diagnosis": ..., "callbacks": ..., "use_ema": ...}`.
        """
        config = self.config
        observed = [r["observed"] for r in records]
        test_accuracy = [r["test_accuracy"] for r in records]
        worst = int(np.argmin(test_accuracy))
        diagnosis = {
            "examples": self._reports[0].examples,
            "batches": self._reports[0].batches,
            "max_shift": self._reports[0].max_shift,
            "max_variance_factor": self._reports[0].max_variance_factor,
            **{field: [o[field] for o in observed] for field in DIAGNOSIS_FIELDS},
            "worst": {
                "epoch": worst + 1,
                TEST_ACCURACY: test_accuracy[worst],
                **full_diagnosis(self._reports[worst]),
            },
        }

        def precise():
            return bn_keras.callbacks.PreciseBN(
                self.sample[0], batch_size=config["batch_size"], verbose=0
            )

        def freeze():
            return bn_keras.callbacks.FreezeStatistics(
                config["freeze_last_epochs"], verbose=0
            )

        def decay():
            first = config["epochs"] - config["freeze_last_epochs"]
            return keras.callbacks.LearningRateScheduler(
                lambda epoch, rate: (
                    config["decay_learning_rate"]
                    if epoch >= first
                    else config["learning_rate"]
                )
            )

        ema = {"use_ema": True, "ema_momentum": config["ema_momentum"]}
        plan = {  # name: (its callbacks, its optimizer's options)
            PRECISE_BN: ([precise()], {}),
            FREEZE: ([freeze()], {}),
            PRECISE_DECAY: ([precise(), decay()], {}),
            PRECISE_FREEZE_DECAY: ([precise(), freeze(), decay()], {}),
            f"ema_{EMA_STALE}": ([], ema),
            f"ema_{EMA_PRECISE}": ([precise()], ema),
        }
        steps_per_epoch = -(-len(self.x_train) // config["batch_size"])
        total = steps_per_epoch * config["epochs"] * len(plan)
        epochs_done = 0

        def on_epoch():
            nonlocal epochs_done
            epochs_done += 1
            if report is not None:
                report(epochs_done * steps_per_epoch, total)

        trained = {}
        with (
            expected_retracing(),
            tqdm(total=total, unit="step", disable=not progress) as bar,
        ):
            for name, (callbacks, options) in plan.items():
                bar.set_description(name)
                model = lm.build_lenet(
                    lm.batch_norm_factory(
                        lm.BN_KERAS, config["bn_momentum"], config["bn_epsilon"]
                    ),
                    name=f"lenet_{name}",
                )
                model.set_weights(initial_weights)
                lt.compile_lenet(model, config, **options)
                recorder = _EpochRecorder(self.x_test, self.y_test, bar, on_epoch)
                start = time.perf_counter()
                lt.fit_epochs(
                    model, self.x_train, self.y_train, config, [*callbacks, recorder]
                )
                recorder.records[RUN_SECONDS] = time.perf_counter() - start
                trained[name] = (model, recorder.records)
        callbacks = {
            NO_CALLBACK: {
                TRAIN_LOSS: [finite_or_none(r["train_loss"]) for r in records],
                TEST_ACCURACY: test_accuracy,
                WEIGHTS_CHECKSUM: [o[WEIGHTS_CHECKSUM] for o in observed],
                STATISTICS_CHECKSUM: [o[STATISTICS_CHECKSUM] for o in observed],
            },
            **{run: trained[run][1] for run in CALLBACK_RUNS[1:]},
        }
        with expected_retracing():  # inspect_statistics compiles at each call
            use_ema = self._use_ema({run: trained[f"ema_{run}"] for run in EMA_RUNS})
        return {"diagnosis": diagnosis, "callbacks": callbacks, "use_ema": use_ema}

    def _use_ema(self, trained) -> dict:
        """The use_ema section: each run's records and its state after fit(),
        the stale run's diagnosis, and its test accuracy once its statistics
        are recomputed from the sample (as PreciseBN's end of training does)."""
        runs = {}
        for run, (model, records) in trained.items():
            runs[run] = {
                **records,
                FINAL_TEST_ACCURACY: lt.accuracy(model, self.x_test, self.y_test),
                FINAL_WEIGHTS_CHECKSUM: checksum(model.trainable_weights),
            }
        stale = trained[EMA_STALE][0]
        diagnosis = full_diagnosis(self.inspect(stale))
        bn_keras.recompute_statistics(
            stale, self.sample[0], batch_size=self.config["batch_size"], progress=False
        )
        return {
            "runs": runs,
            "diagnosis": diagnosis,
            "recomputed_test_accuracy": lt.accuracy(stale, self.x_test, self.y_test),
        }


def training_sample(x_train, y_train, config: dict):
    """`(x, y)`: the study's sample of the training data, drawn once: the
    `precise_bn_batches * batch_size` examples (at most all) that PreciseBN
    recomputes the statistics from; the diagnosis reads its first batches."""
    rng = np.random.default_rng([config["seed"], 3])
    size = min(config["precise_bn_batches"] * config["batch_size"], len(x_train))
    chosen = rng.choice(len(x_train), size=size, replace=False)
    return x_train[chosen], y_train[chosen]
