"""Quantized layers inside `nn.scan`: calibration updates once per step, convert lowers the
layers of the scan body, and mode "int8" equals the NumPy integer reference step by step."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
import qjax.nn as qnn
from qjax.integer import forms

from support import cases
from support import reference as ref

QCONFIG = qnn.get_default_qconfig("x86")
HIDDEN = 5


class Cell(nn.Module):
  """h_t = relu(W [x_t, h_{t-1}] + b), quantized at its input, the carry h in float."""

  mode: str = "float"

  @nn.compact
  def __call__(self, h, x):
    z = qnn.Quantize(qconfig=QCONFIG, mode=self.mode, name="quant_in")(
        jnp.concatenate([x, h], -1))
    y = qnn.QuantDense(HIDDEN, qconfig=QCONFIG, activation=nn.relu, mode=self.mode,
                       name="dense")(z)
    h = qnn.Dequantize(mode=self.mode, name="dequant")(y)
    return h, h


class RNN(nn.Module):
  @nn.compact
  def __call__(self, xs, mode="float"):  # (batch, time, features)
    step = qnn.scan(Cell, self, split_rngs={"params": False}, in_axes=1, out_axes=1)
    h0 = jnp.zeros((xs.shape[0], HIDDEN), jnp.float32)
    return step(mode=mode, name="cell")(h0, xs)[1]


class SequenceCell(nn.Module):
  """y_t = Dense(x_t) on an int8 step of a sequence quantized once, outside the scan; float
  leaky carry h_t = h_{t-1} / 2 + y_t."""

  mode: str = "float"

  @nn.compact
  def __call__(self, h, q_x):
    y = qnn.QuantDense(HIDDEN, qconfig=QCONFIG, mode=self.mode, name="dense")(q_x)
    h = 0.5 * h + qnn.Dequantize(mode=self.mode, name="dequant")(y)
    return h, h


class SequenceNet(nn.Module):
  @nn.compact
  def __call__(self, xs, mode="float"):  # (time, batch, features)
    q = qnn.Quantize(qconfig=QCONFIG, name="quant_in")(xs, mode=mode)
    step = qnn.scan(SequenceCell, self, split_rngs={"params": False})
    h0 = jnp.zeros((xs.shape[1], HIDDEN), jnp.float32)
    return step(mode=mode, name="cell")(h0, q)[1]


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal data from NumPy (no random-bits program to compile)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _calibrated(model: nn.Module, xs: jax.Array) -> Any:
  # XLA's own random bits: threefry's initialisers take XLA:CPU several times longer to compile
  variables = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), xs)
  return qnn.calibrate(model, variables, [xs, 1.5 * xs])


@functools.cache
def _rnn() -> tuple[RNN, jax.Array, Any, Any]:
  """RNN on one (batch 3, time 6, features 2) sequence, calibrated and converted once for the
  tests that share it: (model, xs, calibrated variables, int8 variables)."""
  xs = _normal(3, (3, 6, 2))
  model = RNN()
  variables = _calibrated(model, xs)
  return model, xs, variables, qjax.convert(model, variables, xs)


def _op(int_vars: Any, *path: str) -> Any:
  node = int_vars[forms.COLLECTION]
  for key in path:
    node = node[key]
  return node[forms.OP]


def _dense_step(q: np.ndarray, dense: Any) -> np.ndarray:
  """One converted Dense (fbgemm requantizer), in NumPy integers."""
  acc = ref.matmul(q, np.asarray(dense.kernel.qvalue)) + np.asarray(dense.offset, np.int64)
  r = dense.requant
  return ref.requantize_fbgemm(acc, np.asarray(r.bias), np.asarray(r.multiplier),
                               np.asarray(r.zero_point), r.lo, r.hi, r.relu)


def _dequantize(q: np.ndarray, op: Any) -> np.ndarray:
  centred = q.astype(np.int64) - np.asarray(op.zero_point, np.int64)
  return centred.astype(np.float32) * np.asarray(op.scale, np.float32)


def test_calibration_observes_every_step():
  _, xs, variables, _ = _rnn()
  assert xs.shape[1] == 6
  stats = variables["quant_stats"]["cell"]
  assert int(stats["quant_in"]["count"]) == 2 * 6  # two batches of six steps
  assert int(stats["dense"]["output"]["count"]) == 2 * 6
  assert "kernel" in variables["params"]["cell"]["dense"]  # no time axis on the weights
  assert variables["params"]["cell"]["dense"]["kernel"].shape == (2 + HIDDEN, HIDDEN)


def test_qat_gradients_flow_through_the_scan():
  _, xs, variables, _ = _rnn()

  def loss(params):
    ys = RNN().apply({"params": params, "quant_stats": variables["quant_stats"]}, xs,
                     mode="qat")
    return jnp.mean(ys ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  kernel_grad = grads["cell"]["dense"]["kernel"]
  assert np.all(np.isfinite(kernel_grad)) and np.any(kernel_grad != 0)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_recurrent_cell_matches_the_numpy_reference_step_by_step(jit):
  model, xs, _, int_vars = _rnn()
  quant, dense = _op(int_vars, "cell", "quant_in"), _op(int_vars, "cell", "dense")
  assert isinstance(dense, forms.Int8Dense)
  apply = lambda v, x: model.apply(v, x, mode="int8")  # noqa: E731
  ys = np.asarray((jax.jit(apply) if jit else apply)(int_vars, xs))

  h = np.zeros((3, HIDDEN), np.float32)
  zero = np.asarray(quant.zero_point, np.int64) + ref.int8_shift(quant.spec)
  for t in range(xs.shape[1]):
    z = np.concatenate([np.asarray(xs[:, t]), h], -1)
    q = ref.quantize_input(z, quant.spec, np.asarray(quant.scale), zero)
    h = _dequantize(_dense_step(q, dense), _op(int_vars, "cell", "dequant"))
    np.testing.assert_array_equal(ys[:, t], h, err_msg=f"step {t}")


def test_sequence_quantized_outside_the_scan_feeds_the_scanned_layer():
  xs = _normal(4, (5, 3, 4))  # time-major
  model = SequenceNet()
  int_vars = qjax.convert(model, _calibrated(model, xs), xs)
  quant, dense = _op(int_vars, "quant_in"), _op(int_vars, "cell", "dense")
  ys = np.asarray(jax.jit(lambda v, x: model.apply(v, x, mode="int8"))(int_vars, xs))

  zero = np.asarray(quant.zero_point, np.int64) + ref.int8_shift(quant.spec)
  q_all = ref.quantize_input(np.asarray(xs), quant.spec, np.asarray(quant.scale), zero)
  h = np.zeros((3, HIDDEN), np.float32)
  for t in range(xs.shape[0]):
    y = _dequantize(_dense_step(q_all[t], dense), _op(int_vars, "cell", "dequant"))
    h = np.float32(0.5) * h + y
    np.testing.assert_array_equal(ys[t], h, err_msg=f"step {t}")


def test_int8_scan_stays_integer_in_the_body():
  model, xs, _, int_vars = _rnn()
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, mode="int8"))(int_vars, xs)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1
  counts = cases.assert_int8_contractions(scans[0].params["jaxpr"].jaxpr)
  assert counts["dot_general"] + counts.get("native", 0) > 0, counts


class Int8CarryCell(nn.Module):
  mode: str = "float"

  @nn.compact
  def __call__(self, q_h, _):
    q_h = qnn.QuantDense(3, qconfig=QCONFIG, mode=self.mode, name="dense")(q_h)
    return q_h, None


class Int8CarryNet(nn.Module):
  @nn.compact
  def __call__(self, h0, mode="float"):
    q = qnn.Quantize(qconfig=QCONFIG, name="quant_in")(h0, mode=mode)
    step = qnn.scan(Int8CarryCell, self, split_rngs={"params": False}, length=4)
    q, _ = step(mode=mode, name="cell")(q, None)
    return qnn.Dequantize(name="dequant")(q, mode=mode)


class WhileNet(nn.Module):
  @nn.compact
  def __call__(self, x, mode="float"):
    dense = qnn.QuantDense(2, qconfig=QCONFIG, name="dense")
    q = qnn.Quantize(qconfig=QCONFIG, name="quant_in")
    dequant = qnn.Dequantize(name="dequant")
    if self.is_initializing():
      return dequant(dense(q(x, mode=mode), mode=mode), mode=mode)
    return jax.lax.cond(x.sum() > 0, lambda v: dequant(dense(q(v, mode=mode), mode=mode),
                                                       mode=mode), jnp.zeros_like, x)


def test_an_int8_carry_on_two_grids_is_refused():
  h0 = _normal(6, (2, 3))
  model = Int8CarryNet()
  with pytest.raises(ValueError, match="from quant_in into each step and returns it from "
                                       "cell/dense: one carry has one grid"):
    qjax.convert(model, _calibrated(model, h0), h0)


def test_quantized_modules_inside_an_unfollowable_body_are_refused():
  x = _normal(7, (2, 2))
  model = WhileNet()
  variables = model.init(jax.random.key(0, impl="unsafe_rbg"), x)
  with pytest.raises(ValueError, match="inside `cond`, whose body convert cannot follow"):
    qjax.convert(model, variables, x)
