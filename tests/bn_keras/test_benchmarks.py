"""The benchmarks run on every backend: one tiny round each, no timing asserted.

A benchmark that no test runs breaks silently when the layer changes (a
subclass hook's new argument broke `bench_layer` once); these runs keep the
scripts working. What they measure is quoted in docs/speed.md, never
asserted here.
"""

import re

from benchmarks import bench_layer, bench_recurrent
from tests.bn_keras.helpers import BACKEND


def test_bench_layer_prints_every_variant_and_target(capsys):
    bench_layer.main(["--repeats", "1", "--calls", "1", "--shapes", bench_layer.DENSE])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("dense (60, 100)")]
    assert len(rows) == 2  # a training step and an inference
    for row in rows:
        # Keras' time, then a time and a ratio per variant of ours.
        assert (
            len(re.findall(r"\d+\.\d+ ms +\d+\.\d+x", row))
            == len(bench_layer.VARIANTS) - 1
        )
    targets = bench_layer.TARGETS[BACKEND]
    expected = sum(
        (bench_layer.DENSE, step) in targets for step in ("training step", "inference")
    )
    assert len(re.findall(r"target <= [\d.]+: (met|MISSED)", out)) == expected
    assert re.search(rf"targets met: \d+ of {expected}$", out.strip())


def test_bench_recurrent_prints_the_ratio(capsys):
    bench_recurrent.main(
        ["--units", "4", "--batch-size", "3", "--steps", "2", "--features", "3"]
        + ["--repeats", "1", "--calls", "1"]
    )
    out = capsys.readouterr().out
    assert re.search(r"BN-LSTM +\d+\.\d+ ms +\d+\.\d+x", out)
