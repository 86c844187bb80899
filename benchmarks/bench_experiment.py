"""Times the MNIST experiment: the straightforward baseline against the fast loop.

Three variants of the same run, which give the same metrics:
- baseline: one compiled training step per network per step, called from
  Python, and one compiled evaluation per network and mode every 50 steps
  (what most users write);
- the same per-step loop with the shared evaluation (one call per
  evaluation, the BN network's two test passes sharing their first layer);
- fast: the shared evaluation and all the steps between two evaluations,
  for both networks, in one XLA-compiled call.

Each run is a fresh `python -m experiments.mnist_mlp` process (start-up,
data, training, evaluation, the single-example check, saving, plots), so the
wall time is what a user waits. The variants alternate; the report gives each
run's wall time and peak memory (maximum resident set size), the medians and
their ratios to the baseline.

Run from the repository root: `python -m benchmarks.bench_experiment`
(about 20 minutes on two CPU cores; `--set steps=4000` for a quick look).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "baseline": ('loop="simple"', 'evaluation="separate"'),
    "per-step, shared eval": ('loop="simple"', 'evaluation="shared"'),
    "fast": ('loop="fast"', 'evaluation="shared"'),
}


def _run(settings, overrides, out_dir):
    command = [sys.executable, "-m", "experiments.mnist_mlp", "--quiet"]
    command += ["--out", out_dir]
    for item in (*settings, *overrides):
        command += ["--set", item]
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stderr=log, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if status != 0:
            log.seek(0)
            sys.exit(f"error: {' '.join(command)} failed:\n{log.read()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024**2  # Linux reports KiB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed to every run, e.g. --set steps=4000",
    )
    args = parser.parse_args(argv)
    results = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for i, (name, settings) in enumerate(VARIANTS.items()):
                out = os.path.join(tmp, f"{i}-{repeat}")
                seconds, memory = _run(settings, args.overrides, out)
                results[name].append((seconds, memory))
                print(
                    f"run {repeat + 1} {name:22} {seconds:7.1f} s  {memory:5.2f} GiB",
                    flush=True,
                )
    medians = {
        name: statistics.median(s for s, _ in runs) for name, runs in results.items()
    }
    baseline = medians["baseline"]
    print()
    print(f"{'variant':22} {'median':>8} {'speed-up':>9} {'peak memory':>12}")
    for name, runs in results.items():
        peak = max(m for _, m in runs)
        print(
            f"{name:22} {medians[name]:7.1f}s {baseline / medians[name]:8.2f}x "
            f"{peak:9.2f} GiB"
        )


if __name__ == "__main__":
    main()
