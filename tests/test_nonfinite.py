"""One behaviour for non-finite inputs on every path: a sample holding NaN or +-inf comes out
NaN (float: NaN or +-inf), eager and jitted, and the other samples are what they are without
it."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import numpy as np
from absl.testing import parameterized

import qjax
import qjax.nn as qnn
from qjax import dynamic


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(qnn.default_qconfig, name="quant")(x, mode=mode)
    x = qnn.QuantDense(6, qconfig=qnn.default_qconfig, activation=nn.relu, name="fc1")(
        x, mode=mode)
    x = qnn.QuantDense(3, qconfig=qnn.default_qconfig, name="fc2")(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


class Stock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6, name="fc1")(x))
    return nn.Dense(3, name="fc2")(x)


X = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
BAD_ROWS = (1, 4)


def _spoiled():
  x = X.copy()
  x[1, 3] = np.nan
  x[4, 0] = np.inf
  return x


def _variables():
  model = Net()
  variables = model.init(jax.random.key(0), X, mode="float")
  return model, qnn.calibrate(model, variables, [X])


class NonFiniteTest(parameterized.TestCase):

  def _check(self, run, finite_rows_reference):
    y = np.asarray(run(_spoiled()))
    good = [i for i in range(len(X)) if i not in BAD_ROWS]
    self.assertTrue(np.all(np.isnan(y[list(BAD_ROWS)])), y)
    np.testing.assert_array_equal(y[good], finite_rows_reference)

  @chex.variants(with_jit=True, without_jit=True)
  def test_int8_path(self):
    """Quantize records the non-finite samples, Dequantize returns them as NaN; the others are
    the integers of a run without them (the int8 path is row-independent)."""
    model, variables = _variables()
    int_vars = qjax.convert(model, variables, X[:2])
    run = self.variant(lambda x: model.apply(int_vars, x, mode="int8"))
    good = [i for i in range(len(X)) if i not in BAD_ROWS]
    self._check(run, np.asarray(run(X[good])))

  @chex.variants(with_jit=True, without_jit=True)
  def test_dynamic_path(self):
    """A non-finite row is left out of the batch's range: the other rows equal a run without
    it, bit for bit."""
    _, variables = _variables()
    dyn = {"params": dynamic.quantize_dynamic(variables["params"])}
    run = self.variant(lambda x: dynamic.dynamic_apply(Stock(), dyn, x))
    good = [i for i in range(len(X)) if i not in BAD_ROWS]
    self._check(run, np.asarray(run(X[good])))

  @chex.variants(with_jit=True, without_jit=True)
  def test_float_path(self):
    """The float model: the NaN sample is NaN; the +inf sample is non-finite (IEEE gives NaN
    and +-inf, and ReLU zeros); the others are untouched."""
    model, variables = _variables()
    run = self.variant(lambda x: model.apply(variables, x, mode="float"))
    y = np.asarray(run(_spoiled()))
    self.assertTrue(np.all(np.isnan(y[1])))
    self.assertFalse(np.all(np.isfinite(y[4])))
    good = [i for i in range(len(X)) if i not in BAD_ROWS]
    np.testing.assert_array_equal(y[good], np.asarray(run(X))[good])

  def test_one_sample_without_batch_axis(self):
    """A rank-1 input is one sample: any NaN makes the whole output NaN."""
    model, variables = _variables()
    int_vars = qjax.convert(model, variables, X[:2])
    x = X[0].copy()
    x[2] = np.nan
    self.assertTrue(np.all(np.isnan(np.asarray(model.apply(int_vars, x, mode="int8")))))
    self.assertTrue(np.all(np.isfinite(np.asarray(model.apply(int_vars, X[0], mode="int8")))))
