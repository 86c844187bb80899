"""Times `load_mnist`, with and without MD5 verification.

Run from the repository root: `python -m benchmarks.bench_data`.
"""

import argparse
import statistics
import time

from experiments.common.data import SOURCES, load_mnist


def _median_seconds(repeats, **kwargs):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_mnist(**kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="vendored",
        help="where to load MNIST from (default: the vendored copy)",
    )
    parser.add_argument(
        "--data-dir", help="folder of IDX files for --source dir, or the TFDS data_dir"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs per setting (default: 5)"
    )
    args = parser.parse_args(argv)
    print(f"load_mnist(source={args.source!r}), {args.repeats} runs each")
    for verify in (True, False):
        median, low, high = _median_seconds(
            args.repeats, source=args.source, data_dir=args.data_dir, verify=verify
        )
        print(
            f"  verify={verify!s:5}  median {median:.3f} s"
            f"  (min {low:.3f} s, max {high:.3f} s)"
        )


if __name__ == "__main__":
    main()
