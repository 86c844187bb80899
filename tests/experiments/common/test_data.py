"""Tests for experiments/common/data.py: IDX parsing, checks, sources, errors."""

import gzip
import hashlib

import numpy as np
import pytest

from experiments.common import data
from tests.experiments.helpers import idx_bytes

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
COUNTS = {TRAIN_IMAGES: 5, TRAIN_LABELS: 5, TEST_IMAGES: 3, TEST_LABELS: 3}


def _idx(array, magic=None):
    """The IDX encoding of an images or labels array; `magic` overrides its own."""
    if magic is None:
        magic = data._IMAGES_MAGIC if array.ndim == 3 else data._LABELS_MAGIC
    return idx_bytes(array, magic)


def _arrays():
    rng = np.random.default_rng(0)
    return {
        name: (
            rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
            if "images" in name
            else rng.integers(0, 10, count, dtype=np.uint8)
        )
        for name, count in COUNTS.items()
    }


def _write(folder, name, raw, gz=True):
    path = folder / (f"{name}.gz" if gz else name)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _expect(monkeypatch, name, raw, count):
    monkeypatch.setitem(data._EXPECTED, name, (count, hashlib.md5(raw).hexdigest()))


def _make_folder(folder, monkeypatch, gz=True):
    """Writes the four small IDX files and makes them the expected ones."""
    arrays = _arrays()
    for name, array in arrays.items():
        raw = _idx(array)
        _write(folder, name, raw, gz)
        _expect(monkeypatch, name, raw, len(array))
    return arrays


@pytest.fixture
def folder(tmp_path, monkeypatch):
    _make_folder(tmp_path, monkeypatch)
    return tmp_path


def _load_error(*args, **kwargs):
    with pytest.raises(data.DataError) as info:
        data.load_mnist(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_dir_loads_and_converts(tmp_path, monkeypatch, gz):
    arrays = _make_folder(tmp_path, monkeypatch, gz)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    mnist = data.load_mnist("dir", tmp_path)
    expected = (
        arrays[TRAIN_IMAGES].reshape(-1, 784) / 255,
        arrays[TRAIN_LABELS],
        arrays[TEST_IMAGES].reshape(-1, 784) / 255,
        arrays[TEST_LABELS],
    )
    for got, want, dtype in zip(
        mnist, expected, [np.float32, np.int32] * 2, strict=True
    ):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_read_idx_returns_uint8(folder):
    images = data.read_idx(folder / f"{TRAIN_IMAGES}.gz")
    labels = data.read_idx(folder / f"{TEST_LABELS}.gz")
    assert images.dtype == labels.dtype == np.uint8
    assert images.shape == (5, 28, 28)
    assert labels.shape == (3,)
    np.testing.assert_array_equal(images, _arrays()[TRAIN_IMAGES])


def test_dir_from_env_var(folder, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(folder))
    assert data.load_mnist("dir").x_train.shape == (5, 784)


def test_auto_reads_the_env_var_folder(folder, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(folder))
    assert data.load_mnist().x_train.shape == (5, 784)
    assert data.resolve_source("auto") == ("dir", str(folder))


def test_auto_reports_a_bad_env_var_folder(tmp_path, monkeypatch):
    """An explicitly set variable is never passed over for the vendored copy."""
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    message = _load_error()
    assert message.startswith(f"{data.ENV_VAR}={tmp_path} (set in the environment): ")
    assert "file not found" in message and f"unset {data.ENV_VAR}" in message


def test_auto_without_env_var_is_the_vendored_copy(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    assert data.resolve_source("auto") == ("vendored", None)
    assert data.environment_note("vendored") is None


def test_an_explicit_source_notes_the_env_var_it_ignores(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    for source in ("vendored", "tfds"):
        note = data.environment_note(source)
        assert f"{data.ENV_VAR}={tmp_path} is set" in note and source in note
    assert data.environment_note("dir") is None


def test_select_takes_the_first_examples():
    mnist = data.Mnist(*(np.arange(n) for n in (10, 10, 4, 4)))
    chosen = data.select(mnist, 3, 0)
    assert [len(a) for a in chosen] == [3, 3, 4, 4]


def test_load_for_config_checks_the_whole_data_then_slices(folder, monkeypatch):
    """The data a config names (here a folder, verified): `check` sees the
    whole data's sizes, the config gets its first examples."""
    config = {
        "data_source": "dir",
        "data_dir": str(folder),
        "data_verify": True,
        "train_examples": 2,
        "test_examples": 0,
    }
    sizes = []
    mnist = data.load_for_config(config, lambda *sizes_: sizes.append(sizes_))
    assert sizes == [(5, 3)]
    whole = data.load_mnist("dir", folder)
    expected = data.select(whole, 2, 0)
    for got, want in zip(mnist, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert [len(a) for a in mnist] == [2, 2, 3, 3]
    with pytest.raises(data.DataError, match="no such folder"):
        data.load_for_config({**config, "data_dir": str(folder / "nowhere")})
    # The data set: "mnist", or the config's `dataset` (lenet_bn's key).
    calls = []
    load = data.load_mnist
    monkeypatch.setattr(
        data, "load_mnist", lambda *a, **k: calls.append((a, k)) or load(*a, **k)
    )
    data.load_for_config(config)
    data.load_for_config({**config, "data_verify": False, "dataset": "fashion_mnist"})
    assert calls == [
        (("dir", str(folder)), {"verify": True, "dataset": "mnist"}),
        (("dir", str(folder)), {"verify": False, "dataset": "fashion_mnist"}),
    ]


def test_data_dir_argument_wins_over_env_var(folder, monkeypatch, tmp_path_factory):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path_factory.mktemp("empty")))
    assert data.load_mnist("dir", str(folder)).x_test.shape == (3, 784)


def test_dir_without_folder(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    message = _load_error("dir")
    assert "--data-dir" in message and data.ENV_VAR in message


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    message = _load_error("dir", missing)
    assert f"{missing}: no such folder" in message


def test_missing_file(folder):
    (folder / f"{TEST_LABELS}.gz").unlink()
    message = _load_error("dir", folder)
    assert f"{folder / TEST_LABELS}.gz: file not found" in message


def test_truncated_file(folder):
    raw = _idx(_arrays()[TRAIN_IMAGES])
    path = _write(folder, TRAIN_IMAGES, raw[:-100])
    assert f"{path}: truncated" in _load_error("dir", folder)


def test_bytes_past_the_header_count(folder):
    raw = _idx(_arrays()[TRAIN_LABELS])
    path = _write(folder, TRAIN_LABELS, raw + b"\x00\x01")
    assert f"{path}: 2 unexpected bytes" in _load_error("dir", folder)


@pytest.mark.parametrize("magic", [data._LABELS_MAGIC, 0x12345678])
def test_wrong_magic_number(folder, magic):
    path = _write(folder, TEST_IMAGES, _idx(_arrays()[TEST_IMAGES], magic=magic))
    message = _load_error("dir", folder)
    assert f"{path}: wrong magic number {magic}" in message
    assert "expected 2051" in message


def test_read_idx_rejects_unknown_magic(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(_idx(np.zeros(3, np.uint8), magic=2050))
    with pytest.raises(data.DataError, match="wrong magic number 2050"):
        data.read_idx(path)


def test_wrong_image_size(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(_idx(np.zeros((2, 27, 28), np.uint8)))
    with pytest.raises(data.DataError, match="images are 27x28, expected 28x28"):
        data.read_idx(path)


def test_mismatched_counts(folder, monkeypatch):
    raw = _idx(_arrays()[TRAIN_LABELS][:4])
    path = _write(folder, TRAIN_LABELS, raw)
    _expect(monkeypatch, TRAIN_LABELS, raw, 4)
    message = _load_error("dir", folder)
    assert f"{path}: 4 labels but {folder / TRAIN_IMAGES}.gz holds 5 images" in message


def test_nonstandard_count(folder, monkeypatch):
    monkeypatch.setitem(
        data._EXPECTED, TEST_LABELS, (7, data._EXPECTED[TEST_LABELS][1])
    )
    message = _load_error("dir", folder)
    assert f"{folder / TEST_LABELS}.gz: 3 items, expected 7" in message


def test_label_out_of_range(folder, monkeypatch):
    labels = _arrays()[TEST_LABELS]
    labels[1] = 10
    raw = _idx(labels)
    path = _write(folder, TEST_LABELS, raw)
    _expect(monkeypatch, TEST_LABELS, raw, 3)
    assert f"{path}: label 10 outside 0-9" in _load_error("dir", folder)


def test_checksum_mismatch_and_verify_off(folder):
    images = _arrays()[TRAIN_IMAGES]
    images[0, 0, 0] ^= 1
    path = _write(folder, TRAIN_IMAGES, _idx(images))
    message = _load_error("dir", folder)
    assert f"{path}: MD5 of the decompressed data is" in message
    assert "verify=False" in message
    loaded = data.load_mnist("dir", folder, verify=False)
    assert loaded.x_train[0, 0] == np.float32(images[0, 0, 0] / 255)


def test_not_gzip_though_named_gz(folder):
    path = folder / f"{TEST_IMAGES}.gz"
    path.write_bytes(_idx(_arrays()[TEST_IMAGES]))
    message = _load_error("dir", folder)
    assert (
        f"{path}: not a gzip file (named .gz but starts with b'\\x00\\x00\\x08\\x03')"
        in message
    )


def test_corrupt_gzip(folder):
    path = folder / f"{TRAIN_IMAGES}.gz"
    path.write_bytes(path.read_bytes()[:-50])
    assert f"{path}: corrupt gzip data" in _load_error("dir", folder)


def test_unknown_source():
    message = _load_error("mnist.npz")
    assert "unknown MNIST source 'mnist.npz'" in message
    assert "auto, vendored, dir, tfds" in message


def test_vendored_rejects_data_dir(tmp_path):
    assert "use source 'dir'" in _load_error("vendored", tmp_path)


def test_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(
        num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        mnist = data.load_mnist("tfds", tmp_path)
    for x, y in [(mnist.x_train, mnist.y_train), (mnist.x_test, mnist.y_test)]:
        assert x.shape == (6, 784) and x.dtype == np.float32
        assert 0 <= x.min() and x.max() <= 1 and x.max() > 0
        assert y.shape == (6,) and y.dtype == np.int32
        assert set(y) <= set(range(10))


def test_tfds_failure_is_one_line(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    calls = []

    def offline_load(name, **kwargs):
        calls.append((name, kwargs["data_dir"], kwargs["download"]))
        raise OSError("no connection\ntraceback details")

    monkeypatch.setattr(tfds, "load", offline_load)
    message = _load_error("tfds", tmp_path)
    # Never a download: offline, TFDS would retry for minutes.
    assert calls == [("mnist", str(tmp_path), False)]
    assert f"from {tmp_path} (OSError: no connection)" in message
    assert "download_and_prepare()" in message


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
    """A real TFDS call on an empty folder: fails at once, without network."""
    pytest.importorskip("tensorflow_datasets")
    message = _load_error("tfds", tmp_path)
    assert message.startswith(f"tfds: 'mnist' is not prepared in {tmp_path}")
    assert (
        "import tensorflow_datasets as tfds; tfds.builder('mnist', "
        f"data_dir='{tmp_path}').download_and_prepare()"
    ) in message


def test_vendored_copy_loads():
    mnist = data.load_mnist()
    assert mnist.x_train.shape == (60_000, 784)
    assert mnist.x_test.shape == (10_000, 784)
    for x in (mnist.x_train, mnist.x_test):
        assert x.dtype == np.float32 and x.min() == 0 and x.max() == 1
    for y in (mnist.y_train, mnist.y_test):
        assert y.dtype == np.int32
    np.testing.assert_array_equal(
        np.bincount(mnist.y_train),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    )
    np.testing.assert_array_equal(
        np.bincount(mnist.y_test),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    )


def test_gzipped_file_without_gz_suffix(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(gzip.compress(_idx(np.zeros(3, np.uint8))))
    with pytest.raises(data.DataError, match="looks gzipped: name it .gz"):
        data.read_idx(path)
