"""Research quantizers as quantization points of qjax.nn's layers: QConfig / QConfigMap mixing
per layer, QAT with learned PACT clipping levels, and `qjax.convert` lowering them to the
integer path, whose int8 apply agrees with the QAT forward."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from support import cases
import qjax
from qjax import nn as qnn
from qjax import observers as obs
from qjax import quantizers as qz
from qjax.numerics import QuantSpec

_A8 = obs.MinMaxObserver(spec=QuantSpec(bits=8, signed=False))
_W8 = obs.MinMaxObserver(spec=QuantSpec(bits=8, signed=True, symmetric=True, axis=-1))

WEIGHTS = {
    "dorefa1": qz.DoReFaWeight(bits=1),
    "dorefa2": qz.DoReFaWeight(bits=2),
    "dorefa4": qz.DoReFaWeight(bits=4),
    "dorefa7": qz.DoReFaWeight(bits=7),
    "wrpn2": qz.WRPNWeight(bits=2),
    "wrpn4": qz.WRPNWeight(bits=4),
    "wrpn8": qz.WRPNWeight(bits=8),
    "binary": qz.BinaryWeight(),
    "binary_tensor": qz.BinaryWeight(per_channel=False),
    "binary_unscaled": qz.BinaryWeight(scale=False),
    "ternary": qz.TernaryWeight(),
    "ternary_tensor": qz.TernaryWeight(per_channel=False),
}


def _integer_weights_and_forward(quantizer, w):
  """(quantizer.integer_weights(w), quantizer(w, {})) in one compiled program per quantizer
  (its eager ops would each compile on their own)."""
  return jax.jit(lambda w: (quantizer.integer_weights(w), quantizer(w, {})))(w)


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_integer_weights_are_the_forward_on_the_spec_grid(name):
  quantizer = WEIGHTS[name]
  w = np.random.default_rng(1).standard_normal((3, 3, 5, 7)).astype(np.float32) * 0.3
  w[0, 0, 0, 0] = 0.0
  w = jnp.asarray(w)
  (qparams, q), forward = _integer_weights_and_forward(quantizer, w)
  q = np.asarray(q)
  spec = quantizer.spec
  assert q.dtype == np.int32 and spec.qmin <= q.min() and q.max() <= spec.qmax
  assert np.all(np.asarray(qparams.zero_point) == 0)
  scale = np.asarray(qparams.scale)
  assert scale.shape == ((7,) if spec.per_channel else ())
  np.testing.assert_allclose(q * scale, np.asarray(forward), rtol=2e-7, atol=0)
  if isinstance(quantizer, (qz.DoReFaWeight, qz.BinaryWeight)):
    assert np.all(q % 2 == 1)  # the odd integers of a mid-rise grid


def test_integer_weights_of_a_zero_channel():
  w = jnp.zeros((4, 2)).at[:, 0].set(jnp.array([0.5, -0.5, 0.1, 0.0]))
  for quantizer in (qz.BinaryWeight(), qz.TernaryWeight()):
    (qparams, q), forward = _integer_weights_and_forward(quantizer, w)
    assert np.all(np.asarray(qparams.scale) > 0)
    np.testing.assert_array_equal(np.asarray(q)[:, 1], 0)
    np.testing.assert_allclose(np.asarray(q) * np.asarray(qparams.scale),
                               np.asarray(forward), rtol=1e-7)


def test_activation_grids():
  x = jnp.linspace(-1.0, 3.0, 101)
  for quantizer, params in ((qz.DoReFaActivation(bits=3), {}), (qz.WRPNActivation(bits=4), {}),
                            (qz.PACT(bits=3, alpha=2.0), {"pact_alpha": jnp.float32(2.0)})):
    scale, zero = quantizer.qparams(params)
    y = np.asarray(quantizer(x, params))
    steps = y / np.float32(scale)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-5)
    assert int(zero) == 0 and steps.min() >= 0
    assert np.round(steps).max() == quantizer.spec.qmax


@pytest.mark.parametrize("bad, error", [
    (lambda: qz.DoReFaWeight(bits=0), ValueError),
    (lambda: qz.DoReFaWeight(bits=16), ValueError),
    (lambda: qz.WRPNWeight(bits=1), ValueError),
    (lambda: qz.PACT(bits=4, alpha=0.0), ValueError),
    (lambda: qz.PACT(bits=4, alpha="six"), TypeError),
    (lambda: qz.BinaryWeight(per_channel=1), TypeError),
    (lambda: qz.DoReFaActivation(bits=2.0), TypeError),
    (lambda: qnn.QConfig(weight=qz.PACT(bits=4), activation=None), TypeError),
    (lambda: qnn.QConfig(weight=None, activation=qz.TernaryWeight()), TypeError),
])
def test_bad_configuration_is_refused(bad, error):
  with pytest.raises(error, match=r"bits|alpha|per_channel|QConfig\.(weight|activation)"):
    bad()


class MixedMLP(nn.Module):
  """784-style MLP on 8x8 digits: each layer's quantization method from the QConfigMap."""

  qconfig: qnn.QConfigMap
  features: tuple[int, ...] = (48, 32, 10)

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(qconfig=self.qconfig)(x.reshape(x.shape[0], -1), mode=mode)
    for i, width in enumerate(self.features):
      last = i == len(self.features) - 1
      x = qnn.QuantDense(width, qconfig=self.qconfig, name=f"fc{i}",
                         activation=None if last else nn.relu)(x, mode=mode)
    return qnn.Dequantize()(x, mode=mode)


MIXED = qnn.QConfigMap(
    default=None,
    overrides=(
        ("^Quantize_0$", qnn.QConfig(weight=None, activation=_A8)),
        ("^fc0$", qnn.QConfig(weight=qz.DoReFaWeight(bits=4), activation=qz.PACT(bits=4,
                                                                                alpha=4.0))),
        ("^fc1$", qnn.QConfig(weight=qz.TernaryWeight(), activation=qz.DoReFaActivation(bits=3))),
        ("^fc2$", qnn.QConfig(weight=qz.BinaryWeight(), activation=_A8)),
    ))


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
  data = load_digits()
  return (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)


def qat_train(model, steps: int = 120, pact_decay: float = 1e-4):
  x, y = digits()
  variables = jax.jit(model.init, static_argnames="mode")(cases.init_key(),
                                                          jnp.asarray(x[:256]), mode="qat")
  opt = optax.adam(3e-3)
  params, stats = variables["params"], variables.get("quant_stats", {})
  state = opt.init(params)

  @jax.jit
  def step(params, stats, state, xb, yb):
    def loss_fn(p):
      logits, updates = model.apply({"params": p, "quant_stats": stats}, xb, mode="qat",
                                    mutable=["quant_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
      return loss + qz.pact_penalty(p, pact_decay), updates.get("quant_stats", {})
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction: float ** int32
      updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), stats, state, loss, grads

  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.choice(len(x), 128, replace=False)
    params, stats, state, _, grads = step(params, stats, state, x[idx], y[idx])
  out = {"params": params}
  if stats:
    out["quant_stats"] = stats
  return out, grads


@pytest.fixture(scope="module")
def trained_mixed():
  model = MixedMLP(MIXED)
  return model, *qat_train(model)


@pytest.fixture(scope="module")
def mixed_apply(trained_mixed):
  """The mixed model's jitted QAT and int8 forwards, shared by the tests that run them on the
  whole digits set (one compilation each)."""
  model = trained_mixed[0]
  return {mode: jax.jit(functools.partial(model.apply, mode=mode)) for mode in ("qat", "int8")}


def test_mixed_model_keeps_one_method_per_layer(trained_mixed, mixed_apply):
  _, variables, grads = trained_mixed
  alpha = variables["params"]["fc0"]["output"]["pact_alpha"]
  assert alpha.shape == () and float(alpha) != 4.0  # learned
  assert float(jnp.abs(grads["fc0"]["output"]["pact_alpha"])) > 0
  assert "pact_alpha" not in variables["params"]["fc1"].get("output", {})
  stats = variables["quant_stats"]
  assert set(stats) == {"Quantize_0", "fc2"}  # only observer points keep statistics
  x, _ = digits()
  qat = mixed_apply["qat"](variables, x)
  # the forward's kernels are the methods' grids
  kernel = variables["params"]["fc1"]["kernel"]
  assert len(np.unique(np.asarray(jax.jit(qz.TernaryWeight())(kernel, {}))[:, 0])) <= 3
  assert np.all(np.isfinite(np.asarray(qat)))


@pytest.fixture(scope="module")
def converted_mixed(trained_mixed):
  model, variables, _ = trained_mixed
  return qjax.convert(model, variables, digits()[0][:8])


def test_mixed_model_converts_and_int8_agrees_with_qat(trained_mixed, converted_mixed,
                                                       mixed_apply):
  _, variables, _ = trained_mixed
  x, y = digits()
  int_vars = converted_mixed
  ops = int_vars["converted"]
  assert ops["fc0"]["op"].kernel.spec.bits == 5  # DoReFa 4-bit: odd integers of 5 bits
  assert set(np.unique(np.asarray(ops["fc1"]["op"].kernel.qvalue))) <= {-1, 0, 1}
  assert set(np.unique(np.asarray(ops["fc2"]["op"].kernel.qvalue))) == {-1, 1}
  qat = np.asarray(mixed_apply["qat"](variables, x))
  int8 = np.asarray(mixed_apply["int8"](int_vars, x))
  agree = np.mean(qat.argmax(-1) == int8.argmax(-1))
  assert agree >= 0.999, agree
  assert np.mean(int8.argmax(-1) == y) > 0.85
  # the hidden activations land on the PACT / DoReFa grids
  alpha = float(variables["params"]["fc0"]["output"]["pact_alpha"])
  np.testing.assert_allclose(float(ops["fc1"]["op"].report["input_scale"]), alpha / 15,
                             rtol=1e-6)
  np.testing.assert_allclose(float(ops["fc2"]["op"].report["input_scale"]), 1 / 7, rtol=1e-6)


def test_research_qparams_are_collected(trained_mixed):
  model, variables, _ = trained_mixed
  x, _ = digits()
  # jitted: one compilation instead of one per op
  qparams = jax.jit(functools.partial(qnn.collect_qparams, model, mode="qat"))(variables, x[:4])
  alpha = variables["params"]["fc0"]["output"]["pact_alpha"]
  np.testing.assert_allclose(qparams["fc0"]["output"]["scale"], alpha / 15, rtol=1e-6)
  assert float(qparams["fc1"]["output"]["scale"]) == pytest.approx(1 / 7)


def test_pact_alpha_from_an_observer_at_init():
  observer = obs.MinMaxObserver(spec=QuantSpec(bits=4, signed=False))
  x = jnp.asarray(np.abs(np.random.default_rng(0).standard_normal((512, 16), np.float32)))
  point = qnn.QuantizerPoint(quantizer=qz.PACT(bits=4, alpha=observer))
  init = jax.jit(point.init, static_argnames="mode")  # one compilation, not one per op
  alpha = float(init(jax.random.key(0), x, mode="qat")["params"]["pact_alpha"])
  assert alpha == pytest.approx(float(x.max()), rel=1e-6)  # the observed range's top
  per_channel = qnn.QuantizerPoint(quantizer=qz.PACT(bits=4, alpha=2.0, per_channel=True))
  v = jax.jit(per_channel.init, static_argnames="mode")(jax.random.key(0), x, mode="qat")
  assert v["params"]["pact_alpha"].shape == (16,)
  g = jax.jit(jax.grad(lambda v: per_channel.apply(v, x * 2, mode="qat").sum()))(v)
  assert np.all(np.asarray(g["params"]["pact_alpha"]) > 0)


def test_pact_penalty_sums_every_alpha():
  params = {"a": {"output": {"pact_alpha": jnp.float32(2.0)}},
            "b": {"output": {"pact_alpha": jnp.array([1.0, 3.0])}, "kernel": jnp.ones(3)}}
  assert float(qz.pact_penalty(params, 0.1)) == pytest.approx(0.05 * (4 + 1 + 9))
  assert float(qz.pact_penalty({"k": jnp.ones(3)}, 0.1)) == 0.0


def test_conversion_refuses_what_the_integer_path_cannot_run():
  x, _ = digits()
  for config, match in (
      (qnn.QConfig(weight=qz.DoReFaWeight(bits=8), activation=_A8), "at most 8 bits"),
      (qnn.QConfig(weight=_W8, activation=qz.PACT(bits=4, per_channel=True)), "per tensor")):
    qmap = qnn.QConfigMap(default=config, overrides=(("^Quantize_0$", qnn.QConfig(
        weight=None, activation=_A8)),))
    model = MixedMLP(qmap, features=(8,))
    v = jax.jit(model.init, static_argnames="mode")(cases.init_key(), x[:32], mode="qat")
    v = qnn.calibrate(model, v, [x[:32]])
    with pytest.raises(ValueError, match=match):
      qjax.convert(model, v, x[:4])


class StockMLP(nn.Module):
  """Stock Flax layers with research quantizers in their contractions (AQT placement)."""

  @nn.compact
  def __call__(self, x, *, mode):
    config = qnn.QConfig(weight=qz.WRPNWeight(bits=4), activation=qz.WRPNActivation(bits=4))
    dot = functools.partial(qnn.QuantDotGeneral, qconfig=config, mode=mode)
    x = nn.relu(nn.Dense(32, dot_general_cls=dot)(x))
    return nn.Dense(10, dot_general_cls=dot)(x)


def test_stock_layers_with_research_contractions_convert():
  model = StockMLP()
  variables, _ = qat_train(model, steps=60)
  x, _ = digits()
  int_vars = qjax.convert(model, variables, x[:8])
  assert type(int_vars["converted"]["Dense_0"]["op"]).__name__ == "QuantizedDot"
  qat = np.asarray(jax.jit(lambda v, x: model.apply(v, x, mode="qat"))(variables, x))
  int8 = np.asarray(jax.jit(lambda v, x: model.apply(v, x, mode="int8"))(int_vars, x))
  assert np.mean(qat.argmax(-1) == int8.argmax(-1)) >= 0.999
  np.testing.assert_allclose(int8, qat, atol=1e-4, rtol=1e-4)


class Boundary(nn.Module):
  quantizer: object

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(qconfig=qnn.QConfig(weight=None, activation=self.quantizer))(x, mode=mode)
    return qnn.Dequantize()(x, mode=mode)


@pytest.mark.parametrize("quantizer", [qz.DoReFaActivation(bits=4), qz.WRPNActivation(bits=8),
                                       qz.PACT(bits=3, alpha=0.7), qz.PACT(bits=8, alpha=3.0)])
def test_boundary_rounds_as_the_research_forward(quantizer):
  # pixels k / 16 put x * 15 on ties (0.5 * 15 = 7.5): the integer path must round them as
  # the forward does, by multiplying with n / alpha
  x = jnp.concatenate([jnp.arange(-4, 21, dtype=jnp.float32) / 16,
                       jnp.array([jnp.nan, jnp.inf, -jnp.inf, 1e30])])[None]
  model = Boundary(quantizer)
  variables = jax.jit(model.init, static_argnames="mode")(jax.random.key(0), x[:, :25],
                                                          mode="qat")
  int_vars = qjax.convert(model, variables, x)
  qat = np.asarray(jax.jit(lambda v, x: model.apply(v, x, mode="qat"))(variables, x[:, :25]))
  int8 = np.asarray(jax.jit(lambda v, x: model.apply(v, x, mode="int8"))(int_vars, x[:, :25]))
  # the same levels (a jitted forward may compute a level's value alpha m / n one ulp away:
  # XLA:CPU divides by a constant through its reciprocal)
  scale = float(int_vars["converted"]["Dequantize_0"]["op"].scale)
  np.testing.assert_array_equal(np.round(int8 / scale), np.round(qat / scale))
  np.testing.assert_allclose(int8, qat, rtol=3e-7, atol=0)
  op = int_vars["converted"]["Quantize_0"]["op"]
  q = np.asarray(op(x)).astype(np.int64) + (128 if quantizer.spec.bits == 8 else 0)
  assert q[0, -4] == 0 and q[0, -3] == q[0, -1] == quantizer.spec.qmax and q[0, -2] == 0


def test_converted_research_model_saves_loads_and_reports(converted_mixed, mixed_apply,
                                                          tmp_path):
  x, _ = digits()
  int_vars = converted_mixed
  path = tmp_path / "mixed.qjax"
  qjax.io.save(path, int_vars)
  loaded = qjax.io.load(path)
  apply = mixed_apply["int8"]
  np.testing.assert_array_equal(np.asarray(apply(loaded, x)), np.asarray(apply(int_vars, x)))
  rows = qjax.report.layer_report(int_vars)
  assert any("fc1" in row.path and row.kind == "qarray" for row in rows)


def test_conversion_refuses_nonfinite_research_weights():
  x, _ = digits()
  qmap = qnn.QConfigMap(default=qnn.QConfig(weight=qz.TernaryWeight(), activation=_A8))
  model = MixedMLP(qmap, features=(8,))
  v = jax.jit(model.init, static_argnames="mode")(cases.init_key(), x[:32], mode="qat")
  v = qnn.calibrate(model, v, [x[:32]])
  kernel = v["params"]["fc0"]["kernel"].at[0, 0].set(jnp.nan)
  v = {**v, "params": {"fc0": {**v["params"]["fc0"], "kernel": kernel}}}
  with pytest.raises(ValueError, match="fc0: the kernel holds 1 NaN"):
    qjax.convert(model, v, x[:4])
