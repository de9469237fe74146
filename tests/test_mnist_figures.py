"""experiments/mnist_figures.py: each figure on small synthetic data, and its refusals."""

import numpy as np
import pytest
from matplotlib import image as mpimg

from support.experiments import load_experiment, user_promotion_rules  # noqa: F401  pylint: disable=unused-import

mnist_figures = load_experiment("mnist_figures")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path, expected):
  assert path == expected and path.is_file()
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  pixels = mpimg.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
  assert float(np.var(pixels)) > 0  # not blank
  # Atomic write: no temporary file left next to it.
  assert [p.name for p in path.parent.iterdir()] == [path.name]


def _results():
  def rows(base):
    return [{"variant": "float32", "accuracy": base, "bytes": 360_000},
            {"variant": "float16", "accuracy": base - 0.0001, "bytes": 180_000},
            {"variant": "dynamic int8", "accuracy": base - 0.002, "bytes": 92_000},
            {"variant": "static fake-quant", "accuracy": base - 0.003, "bytes": None},
            {"variant": "QAT int8", "accuracy": base + 0.001, "bytes": 92_500}]
  return {"models": {"mlp": {"rows": rows(0.97)}, "lenet5": {"rows": rows(0.988)}},
          "data": {"train": 1000}}


def _kernel(shape=(32, 8), axis=1, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32) * 0.1
  if axis is None:
    scale = np.float32(np.abs(w).max() / 127)
  else:
    other = tuple(d for d in range(w.ndim) if d != axis)
    scale = (np.abs(w).max(axis=other) / 127).astype(np.float32)
  shaped = scale if axis is None else scale.reshape([-1 if d == axis else 1 for d in range(w.ndim)])
  q = np.clip(np.round(w / shaped), -128, 127).astype(np.int8)
  return w, q, scale


def test_accuracy_and_size_writes_png(tmp_path):
  out = tmp_path / "new" / "dir" / "accuracy.png"
  _check_png(mnist_figures.accuracy_and_size(_results(), out), out)


def test_accuracy_and_size_overwrites_and_accepts_str(tmp_path):
  out = tmp_path / "accuracy.png"
  out.write_bytes(b"old")
  _check_png(mnist_figures.accuracy_and_size(_results(), str(out)), out)


def test_accuracy_and_size_without_any_size(tmp_path):
  results = {"models": {"mlp": {"rows": [{"variant": "fake", "accuracy": 1.0, "bytes": None}]}}}
  out = tmp_path / "accuracy.png"
  _check_png(mnist_figures.accuracy_and_size(results, out), out)


@pytest.mark.parametrize("results, match", [
    ({}, "results"),
    ({"models": {}}, "results: 'models' is empty"),
    ({"models": {"mlp": {"rows": []}}}, "model 'mlp' has no rows"),
    ({"models": {"mlp": {"rows": [{"variant": "f", "accuracy": 1.5, "bytes": 1}]}}}, "accuracy"),
    ({"models": {"mlp": {"rows": [{"variant": "f", "accuracy": float("nan"), "bytes": 1}]}}},
     "accuracy"),
    ({"models": {"mlp": {"rows": [{"variant": "f", "accuracy": 0.5, "bytes": -1}]}}}, "bytes"),
    ({"models": {"mlp": {"rows": [{"variant": "f", "accuracy": 0.5, "bytes": 1.5}]}}}, "bytes"),
    ({"models": {"mlp": {"rows": [{"accuracy": 0.5, "bytes": 1}]}}}, "variant"),
    ({"models": {"mlp": {"rows": [{"variant": "f", "accuracy": 0.5, "bytes": 1}] * 2}}},
     "duplicate variant"),
])
def test_accuracy_and_size_rejects(tmp_path, results, match):
  with pytest.raises(ValueError, match=match):
    mnist_figures.accuracy_and_size(results, tmp_path / "x.png")
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("shape, axis", [((32, 8), 1), ((3, 3, 2, 4), -1), ((16, 4), None)])
def test_weight_histograms_writes_png(tmp_path, shape, axis):
  w, q, scale = _kernel(shape, None if axis is None else axis % len(shape))
  out = tmp_path / "w.png"
  _check_png(mnist_figures.weight_histograms(w, q, scale, axis, out, layer="fc1"), out)


def test_weight_histograms_with_clipped_weights_and_linear_counts(tmp_path):
  w, _, _ = _kernel((64, 4), None)
  scale = np.float32(np.abs(w).max() / 127 / 4)  # most weights saturate
  q = np.clip(np.round(w / scale), -128, 127).astype(np.int8)
  out = tmp_path / "w.png"
  _check_png(mnist_figures.weight_histograms(w, q, scale, None, out, layer="conv1", log=False),
             out)


@pytest.mark.parametrize("change, match", [
    (lambda w, q, s, a: (w[:-1], q, s, a), "int8_values: shape"),
    (lambda w, q, s, a: (w, q.astype(np.float32), s, a), "int8_values: expected an integer"),
    (lambda w, q, s, a: (w, q.astype(np.int32) * 300, s, a), r"\[-128, 127\]"),
    (lambda w, q, s, a: (w[:0], q[:0], s, a), "float_kernel: empty"),
    (lambda w, q, s, a: (np.where(w > 0, np.inf, w), q, s, a), "float_kernel: holds non-finite"),
    (lambda w, q, s, a: (w, q, s[:-1], a), "scale: per-channel scales along axis 1"),
    (lambda w, q, s, a: (w, q, -s, a), "scale: every scale must be finite and positive"),
    (lambda w, q, s, a: (w, q, s, None), "scale: a per-tensor scale"),
    (lambda w, q, s, a: (w, q, s, 2), "axis: 2 is out of range"),
    (lambda w, q, s, a: (w, q, s, 1.0), "axis: expected an int"),
])
def test_weight_histograms_rejects(tmp_path, change, match):
  w, q, scale = _kernel((32, 8), 1)
  with pytest.raises(ValueError, match=match):
    mnist_figures.weight_histograms(*change(w, q, scale, 1), tmp_path / "w.png", layer="fc1")
  with pytest.raises(ValueError, match="layer"):
    mnist_figures.weight_histograms(w, q, scale, 1, tmp_path / "w.png", layer="")
  assert not list(tmp_path.iterdir())


def test_layer_sqnr_writes_png(tmp_path):
  rows = [{"model": "mlp", "layer": f"fc{i}", "sqnr_db": 40.0 + i} for i in (1, 2, 3)]
  rows += [{"model": "lenet5", "layer": name, "sqnr_db": 38.5}
           for name in ("conv1", "conv2", "fc1")]
  rows.append({"model": "tiny", "layer": "fc1", "sqnr_db": -3.0})
  out = tmp_path / "sub" / "sqnr.png"
  _check_png(mnist_figures.layer_sqnr(rows, out), out)


@pytest.mark.parametrize("rows, match", [
    ([], "rows: expected a non-empty list"),
    ("fc1", "rows: expected a non-empty list"),
    ([{"model": "mlp", "layer": "fc1"}], r"rows\[0\] \(mlp/fc1\): 'sqnr_db'"),
    ([{"model": "mlp", "layer": "fc1", "sqnr_db": float("inf")}], "'sqnr_db'"),
    ([{"model": "", "layer": "fc1", "sqnr_db": 1.0}], r"rows\[0\]: 'model'"),
    ([{"model": "mlp", "layer": 3, "sqnr_db": 1.0}], r"rows\[0\]: 'layer'"),
    ([{"model": "mlp", "layer": "fc1", "sqnr_db": 1.0}] * 2, r"rows\[1\]: duplicate layer"),
    ([None], r"rows\[0\]: expected a mapping"),
])
def test_layer_sqnr_rejects(tmp_path, rows, match):
  with pytest.raises(ValueError, match=match):
    mnist_figures.layer_sqnr(rows, tmp_path / "s.png")
  assert not list(tmp_path.iterdir())
