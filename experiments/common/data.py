"""MNIST as NumPy arrays, from the vendored copy, a folder of IDX files, or TFDS.

The default source, `"auto"`, reads the folder named by `$BN_KERAS_MNIST_DIR`
when that is set (reporting its problems, never passing over it) and the
vendored copy otherwise. TFDS is only read, never downloaded: offline, a
download would retry for minutes before failing.

Every source yields the same `Mnist` tuple: images as float32 in `[0, 1]`
flattened to 784 values, labels as int32. The IDX reader checks each file's
header, size and (by default) the MD5 of its decompressed bytes, and reports any
problem as a one-line `DataError` naming the file and what to do about it.

Reference:
    Y. LeCun, C. Cortes, C. J. C. Burges, "The MNIST database of handwritten
    digits", http://yann.lecun.com/exdb/mnist/
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import math
import os
import pathlib
import typing
import zlib

import numpy as np

SOURCES = ("auto", "vendored", "dir", "tfds")
# Datasets in MNIST's format. Only MNIST is vendored and has published sums of
# its decompressed files; Fashion-MNIST (same counts, sizes and IDX headers)
# comes from a user's folder or TFDS, checked by header, size and count.
DATASETS = ("mnist", "fashion_mnist")
DEFAULT_DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "data" / "mnist"
ENV_VAR = "BN_KERAS_MNIST_DIR"

_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
# MNIST: 28 x 28 images of 10 classes.
IMAGE_SIZE = 28
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE
NUM_CLASSES = 10
_GZIP_MAGIC = b"\x1f\x8b"
_FIX = "re-download it or pass --data-dir to a good copy"

# Published sizes and MD5 sums of the decompressed files; tests swap in a table
# for small files.
_EXPECTED = {
    "train-images-idx3-ubyte": (60_000, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (60_000, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (10_000, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (10_000, "27ae3e4e09519cfbb04c329615203637"),
}
_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(Exception):
    """The MNIST data cannot be loaded; the message is one line for the user."""


class Mnist(typing.NamedTuple):
    """MNIST as arrays: images flattened to 784 floats in `[0, 1]`, int32 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def resolve_source(
    source: str = "auto", data_dir: str | os.PathLike | None = None
) -> tuple[str, str | None]:
    """The source and folder `load_mnist(source, data_dir)` reads.

    `"auto"` becomes `"dir"` with `$BN_KERAS_MNIST_DIR` when that is set
    (non-empty), else `"vendored"`; `"dir"` without `data_dir` takes the
    variable. Folders are made absolute, so that a run's recorded config
    names the data wherever it is read from.
    """
    from_env = os.environ.get(ENV_VAR) or None
    if source == "auto":
        if data_dir is not None:
            source = "dir"
        else:
            source, data_dir = ("dir", from_env) if from_env else ("vendored", None)
    elif source == "dir" and data_dir is None:
        data_dir = from_env
    if data_dir is not None and source in ("dir", "tfds"):
        data_dir = os.fspath(pathlib.Path(data_dir).expanduser().absolute())
    return source, data_dir


def environment_note(source: str) -> str | None:
    """A line saying that `$BN_KERAS_MNIST_DIR` is set but `source` ignores it."""
    value = os.environ.get(ENV_VAR)
    if value and source in ("vendored", "tfds"):
        return (
            f"{ENV_VAR}={value} is set, but data_source={source!r} was chosen, "
            f"so it is not read (use data_source='auto' or 'dir' to read it)"
        )
    return None


def load_mnist(
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    dataset: str = "mnist",
) -> Mnist:
    """Loads MNIST (or Fashion-MNIST, `dataset`) from one of `SOURCES`.

    Args:
        source: `"auto"` reads `$BN_KERAS_MNIST_DIR` if set, else the vendored
            copy; `"vendored"` reads the copy shipped in `DEFAULT_DATA_DIR`;
            `"dir"` reads the four standard IDX files (gzipped or not) from
            `data_dir`, or else from `$BN_KERAS_MNIST_DIR`; `"tfds"` reads
            TFDS' prepared `mnist` from `data_dir` (or TFDS' default folder)
            without downloading.
        data_dir: The folder for `"dir"` and `"tfds"`; must be None for
            `"vendored"`.
        verify: Whether to check the MD5 of each decompressed IDX file against
            the published sums. Header, size and count checks always run.
        dataset: One of `DATASETS`. `"fashion_mnist"` reads IDX files from
            a folder (no sums are known, so `verify` does not apply) or TFDS'
            `fashion_mnist`; the vendored copy is MNIST only.

    Returns:
        An `Mnist` tuple: `x_train` (60000, 784) and `x_test` (10000, 784)
        float32 in `[0, 1]`, `y_train` (60000,) and `y_test` (10000,) int32.

    Raises:
        DataError: The source is unknown, or a file is missing, truncated,
            malformed or fails its checksum, or TFDS' copy is not prepared.
    """
    if source not in SOURCES:
        raise DataError(
            f"unknown MNIST source {source!r}; choose one of {', '.join(SOURCES)}"
        )
    if dataset not in DATASETS:
        raise DataError(
            f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}"
        )
    verify = verify and dataset == "mnist"
    if source == "vendored":
        if data_dir is not None:
            raise DataError(
                f"source 'vendored' always reads {DEFAULT_DATA_DIR}, "
                f"but data_dir={str(data_dir)!r} was given; use source 'dir' "
                "to read another folder"
            )
        if dataset != "mnist":
            raise DataError(
                f"dataset {dataset!r} is not vendored (only MNIST is); pass "
                "--data-dir to a folder of its four IDX files"
            )
        return _load_idx_dir(DEFAULT_DATA_DIR, verify=verify)
    from_env = data_dir is None and source in ("auto", "dir")
    source, data_dir = resolve_source(source, data_dir)
    if dataset != "mnist" and source == "vendored":
        raise DataError(
            f"dataset {dataset!r} is not vendored (only MNIST is); pass --data-dir "
            "to a folder of its four IDX files, or use --data-source tfds"
        )
    if source == "vendored":
        return _load_idx_dir(DEFAULT_DATA_DIR, verify=verify)
    if source == "tfds":
        return _load_tfds(data_dir, dataset)
    if data_dir is None:
        raise DataError(
            f"source 'dir' needs a folder of MNIST IDX files; pass "
            f"--data-dir DIR or set {ENV_VAR}"
        )
    try:
        return _load_idx_dir(pathlib.Path(data_dir), verify=verify)
    except DataError as err:
        if from_env:
            raise DataError(
                f"{ENV_VAR}={os.environ[ENV_VAR]} (set in the environment): {err}; "
                f"or unset {ENV_VAR} to use the vendored copy"
            ) from None
        raise


def load_for_config(config: dict, check=None) -> Mnist:
    """The data an experiment's config names, checked, then sliced.

    Args:
        config: A validated config: `data_source`, `data_dir`, `data_verify`,
            `train_examples`, `test_examples` and, where it has one, `dataset`.
        check: Optional `check(num_train, num_test)`, called with the sizes of
            the whole data before the slice is taken (raising for a config
            the data cannot serve).

    Returns:
        The first `train_examples` / `test_examples` examples (0: all).
    """
    data = load_mnist(
        config["data_source"],
        config["data_dir"] or None,
        verify=config["data_verify"],
        dataset=config.get("dataset", "mnist"),
    )
    if check is not None:
        check(len(data.x_train), len(data.x_test))
    return select(data, config["train_examples"], config["test_examples"])


def select(data: Mnist, train_examples: int = 0, test_examples: int = 0) -> Mnist:
    """The first `train_examples` / `test_examples` examples (0: all)."""
    train, test = train_examples or None, test_examples or None
    return Mnist(
        data.x_train[:train],
        data.y_train[:train],
        data.x_test[:test],
        data.y_test[:test],
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one MNIST IDX file, gzipped if its name ends in `.gz`.

    Args:
        path: The file to read.

    Returns:
        uint8 array of shape (N, 28, 28) for an images file (magic 2051) or
        (N,) for a labels file (magic 2049).

    Raises:
        DataError: The file is missing, not gzip though named `.gz`, has the
            wrong magic number or image size, or its length disagrees with its
            header.
    """
    path = pathlib.Path(path)
    return _parse_idx(_read_bytes(path), path)


def _read_bytes(path: pathlib.Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; {_FIX}") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror}); {_FIX}") from None
    if path.suffix != ".gz":
        return data
    if not data.startswith(_GZIP_MAGIC):
        raise DataError(
            f"{path}: not a gzip file (named .gz but starts with {data[:4]!r}); {_FIX}"
        )
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt gzip data ({err}); {_FIX}") from err


def _parse_idx(data: bytes, path: pathlib.Path, magic: int | None = None) -> np.ndarray:
    if len(data) < 8:
        raise DataError(
            f"{path}: {len(data)} bytes, too short for an IDX header; {_FIX}"
        )
    found = int.from_bytes(data[:4], "big")
    expected = (magic,) if magic else (_IMAGES_MAGIC, _LABELS_MAGIC)
    if found not in expected:
        hint = (
            " (the data looks gzipped: name it .gz)" if data[:2] == _GZIP_MAGIC else ""
        )
        wanted = " or ".join(str(m) for m in expected)
        raise DataError(
            f"{path}: wrong magic number {found} (0x{found:08x}){hint}, expected "
            f"{wanted}; this is not the MNIST IDX file of that name; {_FIX}"
        )
    count = int.from_bytes(data[4:8], "big")
    if found == _LABELS_MAGIC:
        header, shape = 8, (count,)
    else:
        if len(data) < 16:
            raise DataError(
                f"{path}: {len(data)} bytes, too short for an IDX images header; {_FIX}"
            )
        rows = int.from_bytes(data[8:12], "big")
        cols = int.from_bytes(data[12:16], "big")
        if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(
                f"{path}: images are {rows}x{cols}, expected "
                f"{IMAGE_SIZE}x{IMAGE_SIZE}; {_FIX}"
            )
        header, shape = 16, (count, rows, cols)
    size = header + math.prod(shape)
    if len(data) < size:
        raise DataError(
            f"{path}: truncated: the header declares {count} items "
            f"({size} bytes) but the data holds {len(data)} bytes; {_FIX}"
        )
    if len(data) > size:
        raise DataError(
            f"{path}: {len(data) - size} unexpected bytes after the {count} items "
            f"the header declares; {_FIX}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(directory: pathlib.Path, name: str) -> pathlib.Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    if not directory.is_dir():
        raise DataError(
            f"{directory}: no such folder; pass --data-dir to a folder holding "
            f"the four MNIST IDX files, or set {ENV_VAR}"
        )
    raise DataError(
        f"{directory / name}.gz: file not found (nor uncompressed {name}); put the "
        "four MNIST IDX files there or pass --data-dir to a folder holding them"
    )


def _read_checked(
    directory: pathlib.Path, name: str, magic: int, verify: bool
) -> tuple[pathlib.Path, np.ndarray]:
    count, md5 = _EXPECTED[name]
    path = _find(directory, name)
    data = _read_bytes(path)
    array = _parse_idx(data, path, magic)
    if len(array) != count:
        raise DataError(
            f"{path}: {len(array)} items, expected {count} for the standard "
            f"MNIST {name}; {_FIX}"
        )
    if verify:
        digest = hashlib.md5(data).hexdigest()
        if digest != md5:
            raise DataError(
                f"{path}: MD5 of the decompressed data is {digest}, expected "
                f"{md5}, so the file is modified or corrupt; re-download it, or "
                "accept a modified copy (or another dataset in MNIST's format, "
                "such as Fashion-MNIST) with --set data_verify=false (in Python: "
                "verify=False)"
            )
    return path, array


def _load_split(
    directory: pathlib.Path, split: str, verify: bool
) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = _SPLITS[split]
    images_path, images = _read_checked(directory, images_name, _IMAGES_MAGIC, verify)
    labels_path, labels = _read_checked(directory, labels_name, _LABELS_MAGIC, verify)
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: {len(labels)} labels but {images_path} holds "
            f"{len(images)} images; {_FIX}"
        )
    top = int(labels.max(initial=0))
    if top >= NUM_CLASSES:
        raise DataError(
            f"{labels_path}: label {top} outside 0-{NUM_CLASSES - 1}; {_FIX}"
        )
    return _to_float(images), labels.astype(np.int32)


def _load_idx_dir(directory: pathlib.Path, verify: bool) -> Mnist:
    x_train, y_train = _load_split(directory, "train", verify)
    x_test, y_test = _load_split(directory, "test", verify)
    return Mnist(x_train, y_train, x_test, y_test)


def _to_float(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1).astype(np.float32)
    flat /= 255.0
    return flat


def _load_tfds(data_dir: str | None, dataset: str = "mnist") -> Mnist:
    where = data_dir or "TFDS' default folder ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    prepare = (
        'python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{dataset}'"
        + (f", data_dir='{data_dir}'" if data_dir else "")
        + ').download_and_prepare()"'
    )
    try:
        from experiments.common.quiet import import_tensorflow

        import_tensorflow()
        import tensorflow_datasets as tfds

        # TFDS logs its own warnings about a missing folder before failing;
        # the one line below says it all.
        with _quiet_absl():
            splits = tfds.load(
                dataset,
                split=["train", "test"],
                as_supervised=True,
                data_dir=data_dir,
                download=False,
            )
        # Fixed batches, not batch_size=-1: that sizes one batch from the split
        # metadata, and without it (tfds.testing.mock_data) asks for sys.maxsize
        # and aborts the process.
        arrays = [[(x, y) for x, y in tfds.as_numpy(ds.batch(10_000))] for ds in splits]
    except AssertionError as err:
        if "could not find data" not in str(err):
            raise
        raise DataError(
            f"tfds: {dataset!r} is not prepared in {where}, and the experiments do not "
            f"download it; prepare it once with network access: {prepare}, or use "
            "the vendored copy (the default) or --data-dir"
        ) from None
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        raise DataError(
            f"tfds: cannot load {dataset!r} from {where} ({type(err).__name__}: "
            f"{reason}); prepare it with {prepare}, or use --data-dir or the "
            "vendored copy"
        ) from err
    (x_train, y_train), (x_test, y_test) = (
        (
            np.concatenate([x for x, _ in batches]),
            np.concatenate([y for _, y in batches]),
        )
        for batches in arrays
    )
    return Mnist(
        _to_float(x_train),
        y_train.astype(np.int32),
        _to_float(x_test),
        y_test.astype(np.int32),
    )


@contextlib.contextmanager
def _quiet_absl():
    """Raises the `absl` Python logger to ERROR for the duration."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
