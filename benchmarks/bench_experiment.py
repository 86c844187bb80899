"""Times the MNIST experiment: the per-step baseline loop against the fast loop.

Each run is a fresh `python -m experiments.mnist_mlp` process (the whole
job: start-up, data, training, evaluation every 50 steps, the single-example
check, saving, plots), so the wall time is what a user waits. The loops
alternate, and the report gives each run's wall time and peak memory
(maximum resident set size), the medians and their ratio.

Run from the repository root: `python -m benchmarks.bench_experiment`
(about 15 minutes on two CPU cores with the defaults; `--set steps=4000`
for a quick look).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

LOOPS = {"baseline (loop=simple)": "simple", "fast (loop=fast)": "fast"}


def _run(loop, overrides, out_dir):
    command = [
        sys.executable,
        "-m",
        "experiments.mnist_mlp",
        "--quiet",
        "--out",
        out_dir,
        "--set",
        f'loop="{loop}"',
    ]
    for item in overrides:
        command += ["--set", item]
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read()
    if status != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss / 1024**2  # Linux reports KiB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed to every run, e.g. --set steps=4000",
    )
    args = parser.parse_args(argv)
    results = {name: [] for name in LOOPS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, loop in LOOPS.items():
                out = os.path.join(tmp, f"{loop}-{repeat}")
                seconds, memory = _run(loop, args.overrides, out)
                results[name].append((seconds, memory))
                print(
                    f"run {repeat + 1} {name:24} {seconds:7.1f} s  {memory:5.2f} GiB",
                    flush=True,
                )
    medians = {
        name: statistics.median(s for s, _ in runs) for name, runs in results.items()
    }
    print()
    for name, runs in results.items():
        peak = max(m for _, m in runs)
        print(f"{name:24} median {medians[name]:7.1f} s   peak memory {peak:.2f} GiB")
    baseline, fast = medians.values()
    print(f"speed-up of the fast loop: {baseline / fast:.2f}x")


if __name__ == "__main__":
    main()
