"""Stock Flax layers with a quantized contraction (AQT / Qwix placement) on the integer path:
an `nn.Dense` with a `QuantDotGeneral` and an `nn.Conv` with a `QuantConvGeneral` convert to
`QuantizedDot` / `QuantizedConv` (the input quantized on the layer's own input grid, int8 x int8
-> int32, scaled back to float32; the stock layer adds its float bias). Mode "int8" equals a
NumPy reference of the op's fields, eager and jitted, and the QAT forward to float rounding."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
import qjax.nn as qnn
from qjax import io as qio
from qjax.integer import forms
from qjax.integer import kernels
from qjax.integer.forms.dot import QuantizedConv, QuantizedDot

from support import cases
from support import reference as ref

X86 = qnn.get_default_qconfig("x86")
QCONFIGS = {"x86": X86, "default": qnn.default_qconfig}


class StockDense(nn.Module):
  """One stock nn.Dense whose contraction quantizes both operands."""

  qconfig: Any = X86
  features: int = 4

  @nn.compact
  def __call__(self, x, mode="float"):
    dot = functools.partial(qnn.QuantDotGeneral, qconfig=self.qconfig, mode=mode)
    return nn.Dense(self.features, dot_general_cls=dot, name="dense")(x)


class StockConv(nn.Module):
  """One stock nn.Conv whose contraction quantizes both operands."""

  qconfig: Any = X86
  features: int = 6
  kernel_size: tuple[int, ...] = (3, 3)
  strides: tuple[int, ...] = (1, 1)
  padding: Any = "SAME"
  kernel_dilation: tuple[int, ...] = (1, 1)
  groups: int = 1

  @nn.compact
  def __call__(self, x, mode="float"):
    conv = functools.partial(qnn.QuantConvGeneral, qconfig=self.qconfig, mode=mode)
    return nn.Conv(self.features, self.kernel_size, strides=self.strides,
                   padding=self.padding, kernel_dilation=self.kernel_dilation,
                   feature_group_count=self.groups, conv_general_dilated_cls=conv,
                   name="conv")(x)


class Mixed(nn.Module):
  """Both placements in one model: a stock Dense with a QuantDotGeneral (float out), a ReLU,
  then a Quantize point, a QuantDense and a Dequantize."""

  @nn.compact
  def __call__(self, x, mode="float"):
    dot = functools.partial(qnn.QuantDotGeneral, qconfig=X86, mode=mode)
    h = nn.relu(nn.Dense(6, dot_general_cls=dot, name="stock")(x))
    q = qnn.Quantize(qconfig=X86, name="quant")(h, mode=mode)
    y = qnn.QuantDense(3, qconfig=X86, name="dense")(q, mode=mode)
    return qnn.Dequantize(name="dequant")(y, mode=mode)


DENSE_SHAPE = (7, 10)
CONV_SHAPE = (3, 9, 8, 4)

CONVS = {
    "same": StockConv(),
    "valid_strided": StockConv(padding="VALID", strides=(2, 1)),
    "explicit_dilated": StockConv(padding=((2, 0), (1, 3)), kernel_dilation=(2, 1),
                                  kernel_size=(3, 2)),
    "same_strided_dilated_grouped": StockConv(padding="SAME", strides=(2, 3),
                                              kernel_dilation=(1, 2), groups=2),
}


def _data(shape, seed) -> np.ndarray:
  """Normal data off centre (a zero point away from the grid's end)."""
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) + 0.4).astype(np.float32)


@functools.cache
def _converted(model: nn.Module, shape: tuple[int, ...], requant: str = "fbgemm"):
  """(calibrated variables, converted variables) of `model` on data of `shape`."""
  x = jax.device_put(_data(shape, 0))
  # jitted, with XLA's own random bits: threefry's initialisers take XLA:CPU several times
  # longer to compile (and op by op, every eager op compiles)
  variables = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), x)
  variables = qnn.calibrate(model, variables, [x, 1.25 * x])
  return variables, qjax.convert(model, variables, x, requant=requant)


def _op(int_vars, path: str):
  return int_vars[forms.COLLECTION][path][forms.OP]


def _quantized_input(x: np.ndarray, quantize: forms.QuantizeOp) -> np.ndarray:
  """The int8 carrier of x on a QuantizeOp's grid, as int64 (zero point moved back from the
  carrier grid to the spec's own)."""
  spec = quantize.spec
  return ref.quantize_input(x, spec, np.float32(quantize.scale),
                            int(quantize.zero_point) + ref.int8_shift(spec))


def _scaled(acc: np.ndarray, op) -> np.ndarray:
  """f32(acc + offset) * scale, per output channel (the last axis)."""
  acc = acc + np.asarray(op.offset, np.int64)
  return acc.astype(np.float32) * np.asarray(op.scale, np.float32)


def _dot_reference(x: np.ndarray, op: QuantizedDot, bias) -> np.ndarray:
  acc = ref.matmul(_quantized_input(x, op.input), np.asarray(op.kernel.qvalue))
  return _scaled(acc, op) + np.asarray(bias, np.float32)


def _conv_reference(x: np.ndarray, op: QuantizedConv, bias) -> np.ndarray:
  q = _quantized_input(x, op.input)
  kernel = np.asarray(op.kernel.qvalue)
  window = kernel.shape[:-2]
  if op.padding == "SAME":
    pads = ref.same_pads(x.shape[1:-1], window, op.strides, op.dilation)
  elif op.padding == "VALID":
    pads = [(0, 0)] * len(window)
  else:
    pads = op.padding
  acc = ref.conv(q, kernel, strides=op.strides, padding=pads, dilation=op.dilation,
                 groups=op.groups, pad_value=int(op.input.zero_point))
  return _scaled(acc, op) + np.asarray(bias, np.float32)


def _int8_dense_reference(q: np.ndarray, op) -> np.ndarray:
  """A converted QuantDense (fbgemm requantizer) in NumPy integers."""
  acc = ref.matmul(q, np.asarray(op.kernel.qvalue)) + np.asarray(op.offset, np.int64)
  r = op.requant
  return ref.requantize_fbgemm(acc, np.asarray(r.bias), np.asarray(r.multiplier),
                               np.asarray(r.zero_point), r.lo, r.hi, r.relu)


def _mixed_reference(x: np.ndarray, int_vars) -> np.ndarray:
  params = int_vars["params"]["stock"]
  h = np.maximum(_dot_reference(x, _op(int_vars, "stock"), params["bias"]), np.float32(0))
  q = _quantized_input(h, _op(int_vars, "quant"))
  y = _int8_dense_reference(q, _op(int_vars, "dense"))
  out = _op(int_vars, "dequant")
  centred = y.astype(np.int64) - np.asarray(out.zero_point, np.int64)
  return centred.astype(np.float32) * np.asarray(out.scale, np.float32)


def _apply_int8(model, int_vars, x):
  return model.apply(int_vars, x, mode="int8")


@functools.partial(jax.jit, static_argnames=("model", "mode"))
def _apply(model: nn.Module, variables, x, mode: str):
  """The jitted forward (one compilation per model, mode and variables' structure)."""
  return model.apply(variables, x, mode=mode)


def _qparams(model, variables, x) -> dict:
  return jax.device_get(qnn.collect_qparams(model, variables, x, mode="float"))


# ------------------------------------------------------------------------------------------
# What convert produces.


def _split(cases, default):
  """pytest params of `cases`: those in `default` run by default, the rest of the full grid
  with -m slow."""
  return [case if case in default else pytest.param(*case, marks=pytest.mark.slow)
          for case in cases]


# Default run: both kinds with x86, the dense layer with the default qconfig too (one
# conversion each); the full grid with -m slow.
@pytest.mark.parametrize("kind, qname", _split(
    [(kind, qname) for kind in ("dense", "conv") for qname in QCONFIGS],
    [("dense", "x86"), ("dense", "default"), ("conv", "x86")]))
def test_lowers_to_the_typed_op_on_the_layers_own_grids(kind, qname):
  q = QCONFIGS[qname]
  model, shape, path, op_type = (
      (StockDense(qconfig=q), DENSE_SHAPE, "dense", QuantizedDot) if kind == "dense"
      else (StockConv(qconfig=q), CONV_SHAPE, "conv", QuantizedConv))
  variables, int_vars = _converted(model, shape)
  assert set(int_vars[forms.COLLECTION]) == {path}
  op = _op(int_vars, path)
  assert type(op) is op_type
  assert type(op.input) is forms.QuantizeOp
  # the stock layer keeps (and still reads) its float kernel and bias
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(int_vars["params"][path][name],
                                  variables["params"][path][name])
  assert "quant_stats" not in int_vars
  # the input grid is the layer's own input observer's (quant_stats/<layer>/input), its zero
  # point on the int8 carrier grid
  qp = _qparams(model, variables, jax.device_put(_data(shape, 0)))[path]
  spec = q.activation.spec
  assert op.input.spec == spec
  np.testing.assert_array_equal(op.input.scale, qp["input"]["scale"])
  assert int(op.input.zero_point) == int(qp["input"]["zero_point"]) - ref.int8_shift(spec)
  # the symmetric int8 weight on the weight observer's grid, scaled per output channel
  w_scale = np.asarray(qp["weight"]["scale"], np.float32)
  np.testing.assert_array_equal(op.kernel.scale, w_scale)
  assert op.kernel.qvalue.dtype == jnp.int8
  kernel = np.asarray(variables["params"][path]["kernel"], np.float32)
  q_w = np.asarray(op.kernel.qvalue, np.int64)
  if kind == "dense":
    q_w = q_w.T  # the op holds (N, K)
  assert q_w.shape == kernel.shape
  # within half a step (the largest |w| sits on 127.5 steps, clamped to 127)
  assert np.all(np.abs(q_w * w_scale - kernel) <= (0.5 + 1e-4) * w_scale)
  np.testing.assert_array_equal(op.scale, (np.float32(op.input.scale) * w_scale)
                                .astype(np.float32))
  reduce = tuple(range(q_w.ndim - 1))
  np.testing.assert_array_equal(op.offset, -int(op.input.zero_point) * q_w.sum(axis=reduce))
  assert op.offset.dtype == jnp.int32


# ------------------------------------------------------------------------------------------
# Mode "int8" against the NumPy reference, eager and jitted.


def _int8_forward(model: nn.Module, variant: str):
  """The int8 forward of `model`, jitted (the shared `_apply`) or op by op ("eager")."""
  if variant == "jit":
    return functools.partial(_apply, model, mode="int8")
  return functools.partial(_apply_int8, model)


@pytest.mark.parametrize("variant", ["jit", "eager"])
@pytest.mark.parametrize("qname", ["x86", "default"])
def test_dense_equals_numpy_reference(qname, variant):
  model = StockDense(qconfig=QCONFIGS[qname])
  _, int_vars = _converted(model, DENSE_SHAPE)
  # beyond the calibrated range too (clamped on the grid), and a leading batch of two axes
  run = _int8_forward(model, variant)
  for x in (_data(DENSE_SHAPE, 1), 3.0 * _data(DENSE_SHAPE, 2),
            _data((2, 3, DENSE_SHAPE[1]), 3)):
    got = run(int_vars, jax.device_put(x))
    want = _dot_reference(x, _op(int_vars, "dense"), int_vars["params"]["dense"]["bias"])
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)


# Default run: jitted; op by op with -m slow (the dense layer's eager run is checked above).
@pytest.mark.parametrize("variant", ["jit", pytest.param("eager", marks=pytest.mark.slow)])
def test_mixed_placements_equal_numpy_reference(variant):
  model = Mixed()
  _, int_vars = _converted(model, DENSE_SHAPE)
  kinds = {path: type(node[forms.OP]) for path, node in int_vars[forms.COLLECTION].items()}
  assert kinds == {"stock": QuantizedDot, "quant": forms.QuantizeOp,
                   "dense": forms.Int8Dense, "dequant": forms.DequantizeOp}
  # the stock layer keeps its float params; the QuantDense's are replaced by its op
  assert set(int_vars["params"]) == {"stock"}
  x = _data(DENSE_SHAPE, 4)
  got = _int8_forward(model, variant)(int_vars, jax.device_put(x))
  np.testing.assert_array_equal(got, _mixed_reference(x, int_vars))


# Default run: both kinds jitted, the dense layer op by op too; the conv op by op with -m slow.
@pytest.mark.parametrize("kind, variant", _split(
    [(kind, variant) for kind in ("dense", "conv") for variant in ("jit", "eager")],
    [("dense", "jit"), ("dense", "eager"), ("conv", "jit")]))
def test_nonfinite_sample_gives_nan_row_and_leaves_the_others(kind, variant):
  model, shape = ((StockDense(), DENSE_SHAPE) if kind == "dense"
                  else (CONVS["valid_strided"], CONV_SHAPE))
  _, int_vars = _converted(model, shape)
  run = _int8_forward(model, variant)
  x = _data(shape, 5)
  clean = np.asarray(run(int_vars, jax.device_put(x)))
  dirty = x.copy()
  dirty.reshape(shape[0], -1)[1, 3] = np.nan
  dirty.reshape(shape[0], -1)[2, -1] = -np.inf
  got = np.asarray(run(int_vars, jax.device_put(dirty)))
  bad = np.zeros(shape[0], bool)
  bad[[1, 2]] = True
  assert np.all(np.isnan(got[bad]))
  np.testing.assert_array_equal(got[~bad], clean[~bad])


# Default run: every geometry jitted, the one with the most parts (strides, dilation, groups)
# op by op too; the other eager cases with -m slow.
@pytest.mark.parametrize("name, variant", _split(
    [(name, variant) for name in CONVS for variant in ("jit", "eager")],
    [(name, "jit") for name in CONVS] + [("same_strided_dilated_grouped", "eager")]))
def test_conv_equals_numpy_reference(name, variant):
  model = CONVS[name]
  _, int_vars = _converted(model, CONV_SHAPE)
  op = _op(int_vars, "conv")
  run = _int8_forward(model, variant)
  for x in (_data(CONV_SHAPE, 1), 2.5 * _data(CONV_SHAPE, 2)):
    got = run(int_vars, jax.device_put(x))
    want = _conv_reference(x, op, int_vars["params"]["conv"]["bias"])
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------
# The program: integer contractions only; agreement with the QAT forward.


@pytest.mark.parametrize("kernel", ["xla", "native"])
@pytest.mark.parametrize("name", ["dense", "conv", "mixed"])
def test_every_contraction_is_int8_to_int32(name, kernel, monkeypatch):
  if kernel == "native" and not kernels.available():
    pytest.skip("the native int8 GEMM library is not built")
  monkeypatch.setenv(kernels.ENV_VAR, kernel)
  model, shape = {"dense": (StockDense(), DENSE_SHAPE), "conv": (CONVS["same"], CONV_SHAPE),
                  "mixed": (Mixed(), DENSE_SHAPE)}[name]
  _, int_vars = _converted(model, shape)
  jaxpr = jax.make_jaxpr(functools.partial(_apply_int8, model))(
      int_vars, jax.device_put(_data(shape, 0))).jaxpr
  counts = cases.assert_int8_contractions(jaxpr)
  assert sum(counts.values()) >= (2 if name == "mixed" else 1)
  # Dense layers run on the chosen kernel; convolutions stay XLA's.
  assert ("native" in counts) == (kernel == "native" and name != "conv"), counts


# Default run: the dense layer with both qconfigs and the two conv geometries with the most
# parts (dilation and groups; explicit asymmetric pads), one QAT compilation each; the full
# grid with -m slow.
@pytest.mark.parametrize("name, qname", _split(
    [*((name, "x86") for name in ["dense", *CONVS]),
     ("dense", "default"), ("same_strided_dilated_grouped", "default")],
    [("dense", "x86"), ("explicit_dilated", "x86"), ("same_strided_dilated_grouped", "x86"),
     ("dense", "default")]))
def test_agrees_with_qat_forward_inside_the_calibrated_range(name, qname):
  q = QCONFIGS[qname]
  model, shape = ((StockDense(qconfig=q), DENSE_SHAPE) if name == "dense"
                  else (CONVS[name].clone(qconfig=q), CONV_SHAPE))
  variables, int_vars = _converted(model, shape)
  x = jax.device_put(0.9 * _data(shape, 0))  # inside what calibration saw
  qat = np.asarray(_apply(model, variables, x, "qat"))
  got = np.asarray(_apply(model, int_vars, x, "int8"))
  tolerance = 1e-5 * np.abs(qat).max()
  np.testing.assert_allclose(got, qat, rtol=0, atol=tolerance)


# ------------------------------------------------------------------------------------------
# Refusals.


class WideDense(nn.Module):
  """nn.DenseGeneral contracting two axes: not nn.Dense's (..., K) x (K, N)."""

  features: Any = 3
  axis: Any = (-2, -1)
  qconfig: Any = X86

  @nn.compact
  def __call__(self, x, mode="float"):
    dot = functools.partial(qnn.QuantDotGeneral, qconfig=self.qconfig, mode=mode)
    return nn.DenseGeneral(self.features, axis=self.axis, dot_general_cls=dot,
                           name="wide_layer")(x)


class DilatedInputConv(nn.Module):
  """A conv with input dilation (a transposed convolution's)."""

  qconfig: Any = X86

  @nn.compact
  def __call__(self, x, mode="float"):
    conv = functools.partial(qnn.QuantConvGeneral, qconfig=self.qconfig, mode=mode)
    return nn.Conv(3, (2, 2), padding=((1, 1), (1, 1)), input_dilation=(2, 2),
                   conv_general_dilated_cls=conv,
                   name="dilated_layer")(x)


@pytest.mark.parametrize("model, shape, layer, says", [
    (WideDense(), (4, 3, 5), "wide_layer", r"\(\.\.\., K\) x \(K, N\)"),
    (WideDense(features=(2, 3), axis=-1), (4, 5), "wide_layer", r"\(\.\.\., K\) x \(K, N\)"),
    (DilatedInputConv(), (2, 5, 5, 2), "dilated_layer", "input dilation"),
], ids=["two_contracting_axes", "two_output_axes", "input_dilation"])
# Default run: MinMax observers; x86's histogram observers (seconds to compile in calibrate
# and the QAT forward) with -m slow.
@pytest.mark.parametrize("qname", ["default", pytest.param("x86", marks=pytest.mark.slow)])
def test_convert_refuses_contractions_it_cannot_run_naming_the_layer(model, shape, layer,
                                                                     says, qname):
  model = model.clone(qconfig=QCONFIGS[qname])
  x = jax.device_put(_data(shape, 0))
  variables = qnn.calibrate(model, jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), x),
                            [x])
  # the fake-quant forward runs them ...
  assert np.all(np.isfinite(_apply(model, variables, x, "qat")))
  # ... the integer path does not
  with pytest.raises(ValueError, match=says) as info:
    qjax.convert(model, variables, x)
  assert layer in str(info.value)


# ------------------------------------------------------------------------------------------
# Serving tree and file.


# Default run: the loaded tree op by op too for the dense and conv layers; the mixed model's
# eager run (op by op it compiles every operation) with -m slow.
@pytest.mark.parametrize("name, eager", [
    ("dense", True), ("conv", True), ("mixed", False),
    pytest.param("mixed", True, marks=pytest.mark.slow)])
def test_serving_tree_and_file_give_identical_outputs(name, eager, tmp_path):
  model, shape, layer = {
      "dense": (StockDense(), DENSE_SHAPE, "dense"),
      "conv": (CONVS["same_strided_dilated_grouped"], CONV_SHAPE, "conv"),
      "mixed": (Mixed(), DENSE_SHAPE, "stock")}[name]
  _, int_vars = _converted(model, shape)
  x = jax.device_put(_data(shape, 6))
  apply = functools.partial(_apply, model, mode="int8")
  want = np.asarray(apply(int_vars, x))
  serving = qjax.for_serving(int_vars)
  np.testing.assert_array_equal(apply(serving, x), want)
  path = tmp_path / f"{name}.qjax"
  qio.save(path, serving)
  loaded = qio.load(path)
  assert type(_op(loaded, layer)) is type(_op(int_vars, layer))
  np.testing.assert_array_equal(apply(loaded, x), want)
  if eager:
    np.testing.assert_array_equal(_apply_int8(model, loaded, x), want)
