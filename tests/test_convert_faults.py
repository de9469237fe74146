"""`qjax.convert` against what users do to a model between calibration and conversion (weights
changed, paddings the integer path cannot run, inputs of the wrong shape), and the cost of a
repeated calibrate -> convert pipeline."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from support import cases
import qjax
import qjax.nn as qnn
from qjax import integer


class Net(nn.Module):
  """Quantize -> conv (ReLU) -> flatten -> dense -> Dequantize."""

  qconfig: qnn.QConfig = qnn.get_default_qconfig("x86")
  padding: str = "SAME"

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(self.qconfig, name="quant")(x, mode=mode)
    x = qnn.QuantConv(4, (3, 3), padding=self.padding, qconfig=self.qconfig,
                      activation=nn.relu, name="conv")(x, mode=mode)
    x = x.reshape((x.shape[0], -1))
    x = qnn.QuantDense(5, qconfig=self.qconfig, name="fc")(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


X = np.random.default_rng(0).normal(size=(16, 6, 6, 2)).astype(np.float32)
BATCHES = [X[:8], X[8:]]


@functools.cache
def _initial(model):
  """The model's float-initialised variables, once per model."""
  return jax.jit(lambda x: model.init(jax.random.key(0, impl="unsafe_rbg"), x,
                                      mode="float"))(X[:2])


@functools.cache
def _calibrated(model):
  """The model's variables calibrated on BATCHES, once per model (the tests change copies)."""
  return qnn.calibrate(model, _initial(model), BATCHES)


def _scaled(variables, layer, factor):
  params = {**variables["params"], layer: {**variables["params"][layer],
                                           "kernel": variables["params"][layer]["kernel"]
                                           * factor}}
  return {**variables, "params": params}


def test_weights_changed_after_calibration_are_observed():
  """A kernel scaled up after calibration (a loaded checkpoint) converts on a grid that holds
  it: the min/max weight observer sees the final kernel, as PyTorch's convert does, so every
  weight is within half a step of its float value; the stale statistics alone are refused."""
  model = Net()
  variables = _scaled(_calibrated(model), "fc", 3.0)
  int_vars = qjax.convert(model, variables, X[:2])
  fc = int_vars[integer.COLLECTION]["fc"]["op"]  # kernel (out, in), per-channel scales
  scale = np.asarray(fc.kernel.scale)[:, None]
  error = np.abs(np.asarray(fc.kernel.qvalue, np.float32) * scale
                 - np.asarray(variables["params"]["fc"]["kernel"]).T)
  assert np.all(error <= scale * 0.501)  # 127.5 steps: 127
  with pytest.raises(ValueError, match=r"convert: fc: \d+ of 720 weights lie outside their "
                     r"grid.*weights='fresh'"):
    qjax.convert(model, variables, X[:2], weights="stats")


def test_unchanged_weights_convert_as_calibrated():
  """With the calibrated weights, observing them again changes nothing (min/max observers)."""
  model = Net()
  variables = _calibrated(model)
  observed = qjax.convert(model, variables, X[:2])
  stats = qjax.convert(model, variables, X[:2], weights="stats")
  for layer in ("conv", "fc"):
    op = observed[integer.COLLECTION][layer]["op"]
    op_stats = stats[integer.COLLECTION][layer]["op"]
    np.testing.assert_array_equal(op.kernel.qvalue, op_stats.kernel.qvalue)
    np.testing.assert_array_equal(op.kernel.scale, op_stats.kernel.scale)


def test_moving_average_that_lags_is_refused_and_fresh_observes_anew():
  """A QAT recipe's moving-average weight observer moves 1 % toward a kernel changed after
  training, which its grid would still clamp: refused, naming the layer; weights='fresh'
  observes the final kernel anew (PyTorch's post-training convert)."""
  model = Net(qconfig=qnn.get_default_qat_qconfig("x86"))
  variables = _scaled(_calibrated(model), "conv", 4.0)
  with pytest.raises(ValueError, match=r"convert: conv: \d+ of 72 weights lie outside"):
    qjax.convert(model, variables, X[:2])
  int_vars = qjax.convert(model, variables, X[:2], weights="fresh")
  kernel = np.asarray(int_vars[integer.COLLECTION]["conv"]["op"].kernel.qvalue).astype(np.int32)
  assert np.all(np.abs(kernel).max(axis=(0, 1, 2)) >= 127)  # each channel spans its grid


def test_weights_argument_is_checked():
  model = Net()
  with pytest.raises(ValueError, match=r"weights must be one of \('observe', 'fresh', "
                     r"'stats'\); got 'new'"):
    qjax.convert(model, _calibrated(model), X[:2], weights="new")


# Default run: one two-dimensional padding the integer path cannot run (the same refusal for
# both) and CAUSAL; CIRCULAR with -m slow.
@pytest.mark.parametrize("padding", [pytest.param("CIRCULAR", marks=pytest.mark.slow), "REFLECT",
                                     "CAUSAL"])
def test_padding_the_integer_path_cannot_run_is_refused_at_convert(padding):
  if padding == "CAUSAL":  # Flax's CAUSAL padding is one-dimensional
    model = Net(padding=padding)
    with pytest.raises(ValueError):
      _calibrated(model)
    return
  model = Net(padding=padding)
  variables = _calibrated(model)
  with pytest.raises(ValueError, match=rf"conv: the integer path supports padding 'SAME', "
                     rf"'VALID'.*got padding='{padding}'"):
    qjax.convert(model, variables, X[:2])


def test_wrong_input_shape_names_the_layer():
  """The converted layers check their input's shape when traced (jitted here: the refusal
  comes before any program is compiled)."""
  model = Net()
  int_vars = qjax.convert(model, _calibrated(model), X[:2])

  class Wider(Net):
    @nn.compact
    def __call__(self, x, *, mode):
      x = qnn.Quantize(self.qconfig, name="quant")(x, mode=mode)
      x = qnn.QuantDense(5, qconfig=self.qconfig, name="fc")(x, mode=mode)
      return qnn.Dequantize(name="dequant")(x, mode=mode)

  with pytest.raises(ValueError, match=r"fc: the input has shape \(16, 7\), but this converted "
                     r"layer takes \(\.\.\., 144\)"):
    jax.jit(functools.partial(Wider().apply, mode="int8"))(int_vars,
                                                           np.ones((16, 7), np.float32))
  with pytest.raises(ValueError, match=r"conv: the input has shape \(16, 6, 6, 3\), but this "
                     r"converted layer takes \(batch, spatial, spatial, 2\)"):
    jax.jit(functools.partial(model.apply, mode="int8"))(int_vars,
                                                         np.ones((16, 6, 6, 3), np.float32))


def test_repeated_pipeline_compiles_nothing():
  """A second calibrate -> convert of the same model (new params, new data) reuses every
  executable of the first."""
  model = Net()
  variables = _calibrated(model)
  qjax.convert(model, variables, X[:2])
  other = _scaled(variables, "fc", 0.5)
  with cases.CompileCounter() as counter:
    again = qnn.calibrate(model, other, [b + 1.0 for b in BATCHES])
    qjax.convert(model, again, X[:2])
  assert counter.count == 0
  with cases.CompileCounter() as counter:  # the counter sees compilations
    qnn.calibrate(model, other, [X[:3]])
  assert counter.count > 0


def test_unused_qconfig_map_pattern_is_refused_by_calibrate_and_convert():
  """A QConfigMap override whose pattern matches no layer (a typo) would leave the layer it
  meant quantized: calibrate and convert refuse it, naming the pattern."""
  typo = qnn.QConfigMap(default=qnn.get_default_qconfig("x86"), overrides=(("^fc2$", None),))
  model = Net(qconfig=typo)
  with pytest.raises(ValueError, match=r"\^fc2\$"):
    qnn.calibrate(model, _initial(Net()), BATCHES)  # the override changes no variable
  fine = _calibrated(Net())
  with pytest.raises(ValueError, match=r"\^fc2\$"):
    qjax.convert(model, fine, X[:2])
