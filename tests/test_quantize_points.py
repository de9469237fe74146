"""`qjax.nn.Quantize` anywhere in a model: on a float tensor in the middle of a model (after a
Dequantize and float ops) it starts a new integer region on its own grid; on an int8 tensor it
requantizes it to its own grid, as PyTorch's quantized cat of one input does (or a fixed-point
rescale with requant "integer"), the identity when the grids are equal."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
import qjax.nn as qnn
from qjax import observers as obs
from qjax.integer import forms

from support import reference as ref

U8 = qjax.QuantSpec(bits=8, signed=False)
# The grids of PyTorch's x86 and qnnpack qconfigs with min/max observers (the points only need
# grids that differ; histogram observers take seconds to compile and have tests of their own).
X86 = qnn.QConfig(  # uint8 activations, reduce_range: [0, 127]; per-channel weights
    activation=obs.MinMaxObserver(spec=qjax.QuantSpec(bits=8, signed=False, reduce_range=True)),
    weight=obs.MinMaxObserver(spec=qjax.QuantSpec(bits=8, signed=True, symmetric=True,
                                                  axis=-1)))
FULL = qnn.QConfig(  # uint8 activations on [0, 255]: another grid; per-tensor weights
    activation=obs.MinMaxObserver(spec=U8),
    weight=obs.MinMaxObserver(spec=qjax.QuantSpec(bits=8, signed=True, symmetric=True)))
REQUANTS = ("fbgemm", "float", "integer")
MODEL_REQUANTS = ("fbgemm", "integer")  # "float" lowers a Quantize as "fbgemm" does


class TwoRegions(nn.Module):
  """Quantize, QuantDense, Dequantize, float ops, then a second Quantize starting a second
  integer region: QuantDense, Dequantize."""

  @nn.compact
  def __call__(self, x, mode="float"):
    q = qnn.Quantize(qconfig=X86, name="quant_a")(x, mode=mode)
    y = qnn.QuantDense(6, qconfig=X86, name="dense_a")(q, mode=mode)
    h = qnn.Dequantize(name="dequant_a")(y, mode=mode)
    h = jnp.tanh(h) * jnp.float32(3.0)
    q = qnn.Quantize(qconfig=FULL, name="quant_b")(h, mode=mode)
    y = qnn.QuantDense(3, qconfig=X86, name="dense_b")(q, mode=mode)
    return qnn.Dequantize(name="dequant_b")(y, mode=mode)


class Requantized(nn.Module):
  """A Quantize point applied straight to a quantized layer's int8 output."""

  qconfig: Any = FULL
  conv: bool = False

  @nn.compact
  def __call__(self, x, mode="float"):
    q = qnn.Quantize(qconfig=X86, name="quant_in")(x, mode=mode)
    if self.conv:
      y = qnn.QuantConv(20, (3, 3), qconfig=X86, name="layer")(q, mode=mode)
    else:
      y = qnn.QuantDense(16, qconfig=X86, name="layer")(q, mode=mode)
    y = qnn.Quantize(qconfig=self.qconfig, name="requant")(y, mode=mode)
    return qnn.Dequantize(name="dequant")(y, mode=mode)


def _data(shape, seed) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) + 0.3).astype(np.float32)


def _shape(conv: bool) -> tuple[int, ...]:
  return (3, 6, 5, 4) if conv else (16, 9)


@functools.cache
def _calibrated(model: nn.Module, shape: tuple[int, ...]):
  x = _data(shape, 0)  # NumPy: jnp.asarray would compile a copy per shape
  variables = jax.jit(model.init)(jax.random.key(0), x)
  return qnn.calibrate(model, variables, [x, 1.2 * x])


@functools.cache
def _converted(model: nn.Module, shape: tuple[int, ...], requant: str):
  return qjax.convert(model, _calibrated(model, shape), jax.device_put(_data(shape, 0)),
                      requant=requant)


@functools.partial(jax.jit, static_argnames=("model",))
def _collect_qparams(model: nn.Module, variables, x) -> dict:
  return qnn.collect_qparams(model, variables, x, mode="float")


@functools.cache
def _qparams(model: nn.Module, shape: tuple[int, ...]) -> dict:
  """Every point's (scale, zero point on its own grid), from the calibrated model (one
  compiled program: op by op every primitive would compile on its own)."""
  return jax.device_get(_collect_qparams(model, _calibrated(model, shape), _data(shape, 0)))


def _grid(qp: dict) -> tuple[np.float32, int]:
  return np.float32(qp["scale"]), int(qp["zero_point"])


@functools.partial(jax.jit, static_argnames=("model", "mode"))
def _apply(model: nn.Module, variables, x, mode: str):
  """The jitted forward (one compilation per model, mode and variables' structure)."""
  return model.apply(variables, x, mode=mode)


def _op(int_vars, path: str):
  return int_vars[forms.COLLECTION][path][forms.OP]


def _int8_outputs(model, int_vars, x):
  """(model output, {module: its int8 output}) in mode "int8"."""
  y, state = model.apply(int_vars, x, mode="int8", capture_intermediates=True,
                         mutable=["intermediates"])
  inter = state["intermediates"]
  return y, {name: inter[name]["__call__"][0] for name in inter if name != "__call__"}


def _quantized_input(x: np.ndarray, op: forms.QuantizeOp) -> np.ndarray:
  spec = op.spec
  return ref.quantize_input(x, spec, np.float32(op.scale),
                            int(op.zero_point) + ref.int8_shift(spec))


def _dense_reference(q: np.ndarray, op: forms.Int8Dense) -> np.ndarray:
  """A converted QuantDense with the fbgemm requantizer, in NumPy integers."""
  acc = ref.matmul(q, np.asarray(op.kernel.qvalue)) + np.asarray(op.offset, np.int64)
  r = op.requant
  return ref.requantize_fbgemm(acc, np.asarray(r.bias), np.asarray(r.multiplier),
                               np.asarray(r.zero_point), r.lo, r.hi, r.relu)


def _dequantized(q: np.ndarray, op: forms.DequantizeOp) -> np.ndarray:
  centred = q.astype(np.int64) - np.asarray(op.zero_point, np.int64)
  return centred.astype(np.float32) * np.asarray(op.scale, np.float32)


def _requant_reference(q8: np.ndarray, grid_in, grid_out, requant: str,
                       channels_last: bool) -> np.ndarray:
  """int8 carrier q8 on the uint8 grid `grid_in` (S, Z on [0, 255]) moved to `grid_out`:
  PyTorch's quantized cat of one input (torch's uint8 = carrier + 128), or for "integer" the
  fixed-point rescale clamp(Z_y + mul_shift_round(q - Z_x, M0, r)) with M0 / 2^r ~= S_x / S_y,
  in int64. Returns the int8 carrier as int64."""
  (s_in, z_in), (s_out, z_out) = grid_in, grid_out
  q8 = np.asarray(q8, np.int64)
  if requant != "integer":
    want = ref.quantized_cat([(q8 + 128, s_in, z_in)], s_out, z_out, axis=-1,
                             channels_last=channels_last)
    return want.astype(np.int64) - 128
  m0, shift = ref.fixed_point_multiplier(np.float64(s_in) / np.float64(s_out))
  r = ref.mul_shift_round(q8 - (z_in - 128), m0, shift)
  return ref.clamp_output(r, z_out - 128, -128, 127, False).astype(np.int64)


def _every_int8(conv: bool) -> np.ndarray:
  """All 256 int8 values, 2-D (16, 16) (the dense model's layer output shape: eagerly, its
  requantizer's ops are compiled once for both) or NHWC (2, 2, 4, 16)."""
  values = np.arange(-128, 128, dtype=np.int8)
  return values.reshape((2, 2, 4, 16) if conv else (16, 16))


def _variant(variant: str):
  """`jax.jit` for "jit", the function itself (op by op) for "eager"."""
  return jax.jit if variant == "jit" else (lambda f: f)


def _split(cases, default):
  """pytest params of `cases`: those in `default` run by default, the rest of the full grid
  with -m slow."""
  return [case if case in default else pytest.param(*case, marks=pytest.mark.slow)
          for case in cases]


VARIANTS = ("jit", "eager")
MODEL_GRID = [(r, c, v) for r in MODEL_REQUANTS for c in (False, True) for v in VARIANTS]


# ------------------------------------------------------------------------------------------
# A Quantize after float ops: a second integer region.


@pytest.mark.parametrize("variant", VARIANTS)
def test_second_quantize_starts_a_region_on_its_own_grid(variant):
  model, shape = TwoRegions(), (12, 5)
  int_vars = _converted(model, shape, "fbgemm")
  kinds = {path: type(node[forms.OP]) for path, node in int_vars[forms.COLLECTION].items()}
  assert kinds == {"quant_a": forms.QuantizeOp, "dense_a": forms.Int8Dense,
                   "dequant_a": forms.DequantizeOp, "quant_b": forms.QuantizeOp,
                   "dense_b": forms.Int8Dense, "dequant_b": forms.DequantizeOp}
  # quant_b quantizes on its own observer's grid, unlike the first region's
  qp = _qparams(model, shape)
  quant_b = _op(int_vars, "quant_b")
  assert quant_b.spec == FULL.activation.spec
  np.testing.assert_array_equal(quant_b.scale, qp["quant_b"]["scale"])
  assert int(quant_b.zero_point) == int(qp["quant_b"]["zero_point"]) - 128
  for other in (qp["quant_a"], qp["dense_a"]["output"]):
    assert float(other["scale"]) != float(qp["quant_b"]["scale"])
  # and the int8 forward is the NumPy reference of the chain, exactly
  run = _variant(variant)(lambda v, x: model.apply(v, x, mode="int8"))
  for seed in (1, 2):
    x = _data(shape, seed) * (1 + seed)  # the second beyond the calibrated range
    got = run(int_vars, jax.device_put(x))
    q = _quantized_input(x, _op(int_vars, "quant_a"))
    h = _dequantized(_dense_reference(q, _op(int_vars, "dense_a")),
                     _op(int_vars, "dequant_a"))
    h = np.asarray(jnp.tanh(jax.device_put(h))) * np.float32(3.0)  # XLA's tanh, as the model's
    q = _quantized_input(h, quant_b)
    want = _dequantized(_dense_reference(q, _op(int_vars, "dense_b")),
                        _op(int_vars, "dequant_b"))
    np.testing.assert_array_equal(got, want, err_msg=f"{seed}")


@pytest.mark.parametrize("requant", MODEL_REQUANTS)
def test_second_region_agrees_with_qat_forward(requant):
  model, shape = TwoRegions(), (12, 5)
  int_vars = _converted(model, shape, requant)
  assert type(_op(int_vars, "quant_b")) is forms.QuantizeOp  # a float input: quantized
  x = jax.device_put(_data(shape, 3))
  y = np.asarray(_apply(model, int_vars, x, "int8"))
  qat = np.asarray(_apply(model, _calibrated(model, shape), x, "qat"))
  step = float(_qparams(model, shape)["dense_b"]["output"]["scale"])
  # a flipped tie in the first region may move the second by a step or two, no more
  assert np.abs(y - qat).max() <= 2 * step * (1 + 1e-5)


# ------------------------------------------------------------------------------------------
# A Quantize on an int8 tensor: requantization to its own grid.


# Default run: both requantizers on the dense model (jitted, and "fbgemm" eagerly; the conv
# layout of the int8 tensor: test_lowered_on_two_grids_equals_the_reference); the full grid,
# the conv model included, runs with -m slow.
@pytest.mark.parametrize("requant, conv, variant", _split(MODEL_GRID, [
    ("fbgemm", False, "jit"), ("fbgemm", False, "eager"), ("integer", False, "jit")]))
def test_requantizes_an_int8_tensor_to_its_own_grid(requant, conv, variant):
  model, shape = Requantized(conv=conv), _shape(conv)
  int_vars = _converted(model, shape, requant)
  op = _op(int_vars, "requant")
  assert type(op) is (forms.IntegerConcat if requant == "integer" else forms.Int8Concat)
  assert op.copied == (False,)
  qp = _qparams(model, shape)
  grid_in, grid_out = _grid(qp["layer"]["output"]), _grid(qp["requant"])
  assert grid_in != grid_out
  if requant == "integer":
    m0, shift = ref.fixed_point_multiplier(np.float64(grid_in[0]) / np.float64(grid_out[0]))
    assert (int(op.m0[0]), int(op.shift[0])) == (m0, shift)
  every = _every_int8(conv)
  (_, outs), on_every = _variant(variant)(
      lambda v, x, o, q: (_int8_outputs(model, v, x), o(q)))(
          int_vars, jax.device_put(2 * _data(shape, 1)), op, jax.device_put(every))
  # in the model, on the layer's int8 output (partly beyond the calibrated range) ...
  q_layer, got = np.asarray(outs["layer"]), np.asarray(outs["requant"])
  assert got.dtype == np.int8
  np.testing.assert_array_equal(
      got, _requant_reference(q_layer, grid_in, grid_out, requant, conv))
  # ... and on every int8 value
  np.testing.assert_array_equal(
      on_every, _requant_reference(every, grid_in, grid_out, requant, conv))


# Default run: the dense model (one QAT compilation) with both requantizers; the conv model
# with -m slow.
@pytest.mark.parametrize("requant, conv", _split(
    [(r, c) for r in MODEL_REQUANTS for c in (False, True)],
    [("fbgemm", False), ("integer", False)]))
def test_agrees_with_qat_forward_to_one_output_step(requant, conv):
  model, shape = Requantized(conv=conv), _shape(conv)
  int_vars = _converted(model, shape, requant)
  x = jax.device_put(0.9 * _data(shape, 0))
  y = np.asarray(_apply(model, int_vars, x, "int8"))
  qat = np.asarray(_apply(model, _calibrated(model, shape), x, "qat"))
  step = float(_qparams(model, shape)["requant"]["scale"])
  assert np.abs(y - qat).max() <= step * (1 + 1e-5)
  assert np.mean(np.abs(y - qat) > 1e-3 * step) < 0.05  # and equal nearly everywhere


# Default run: every requantizer jitted on both layouts, "integer" (the fixed-point rescale)
# eagerly too on the 2-D one (op by op every primitive compiles once per shape; the NHWC
# layout is jitted's); the other eager cases (the ops of the eager "fbgemm" model case above)
# and "integer" eagerly on both layouts with -m slow.
@pytest.mark.parametrize("requant, variant, layouts", [
    *_split([(r, v, (False, True)) for r in REQUANTS for v in VARIANTS],
            [(r, "jit", (False, True)) for r in REQUANTS]),
    ("integer", "eager", (False,))],
    ids=lambda v: {(False, True): "both_layouts", (False,): "2d"}.get(v) if isinstance(
        v, tuple) else None)
def test_lowered_on_two_grids_equals_the_reference(requant, variant, layouts):
  rng = np.random.default_rng(8)
  run = _variant(variant)(lambda o, q: o(q))
  for trial in range(8):
    grids = [(np.float32(10.0 ** rng.uniform(-3, 1)), int(rng.integers(0, 256)))
             for _ in range(2)]
    grid_in, grid_out = (forms.Grid(U8, s, np.int32(z - 128)) for s, z in grids)
    lowering = forms.Lowering(path="point", inputs=(grid_in,), output=grid_out,
                              requant=qjax.integer.Requant(requant), variables={})
    op = forms.QuantizeForm().lower(lowering)
    assert type(op) is (forms.IntegerConcat if requant == "integer" else forms.Int8Concat)
    for conv in layouts:
      every = _every_int8(conv)
      got = run(op, jax.device_put(every))
      np.testing.assert_array_equal(
          got, _requant_reference(every, *grids, requant, conv), err_msg=f"{trial} {grids}")


# ------------------------------------------------------------------------------------------
# Equal grids: the identity.


# Default run: the dense model with both requantizers (one calibration), "fbgemm" eagerly too;
# the conv model and the other eager case with -m slow.
@pytest.mark.parametrize("requant, conv, variant", _split(MODEL_GRID, [
    ("fbgemm", False, "jit"), ("fbgemm", False, "eager"), ("integer", False, "jit")]))
def test_same_qconfig_on_the_same_data_copies(requant, conv, variant):
  model, shape = Requantized(qconfig=X86, conv=conv), _shape(conv)
  qp = _qparams(model, shape)
  assert _grid(qp["layer"]["output"]) == _grid(qp["requant"])
  int_vars = _converted(model, shape, requant)
  op = _op(int_vars, "requant")
  assert op.copied == (True,)
  every = jax.device_put(_every_int8(conv))
  (_, outs), on_every = _variant(variant)(
      lambda v, x, o, q: (_int8_outputs(model, v, x), o(q)))(
          int_vars, jax.device_put(_data(shape, 1)), op, every)
  np.testing.assert_array_equal(outs["requant"], outs["layer"])
  np.testing.assert_array_equal(on_every, every)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("requant", REQUANTS)
def test_lowered_with_equal_grids_is_the_identity(requant, signed, variant):
  rng = np.random.default_rng(7)
  spec = qjax.QuantSpec(bits=8, signed=signed)
  run = _variant(variant)(lambda o, q: o(q))
  for trial in range(8):
    scale = np.float32(10.0 ** rng.uniform(-4, 2))
    zero = np.int32(rng.integers(-128, 128))  # on the int8 carrier grid
    grid = forms.Grid(spec, scale, zero)
    lowering = forms.Lowering(path="point", inputs=(grid,), output=grid,
                              requant=qjax.integer.Requant(requant), variables={})
    op = forms.QuantizeForm().lower(lowering)
    assert op.copied == (True,)
    for conv in (False, True):
      every = jax.device_put(_every_int8(conv))
      np.testing.assert_array_equal(run(op, every), every, err_msg=f"{trial} {scale} {zero}")
