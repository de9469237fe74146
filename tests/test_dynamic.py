"""qjax.dynamic: fbgemm's activation qparams, the int8 Dense against a NumPy integer reference,
the Flax interceptor (MLP, Conv, nn.RNN(nn.LSTMCell)), int8-only jaxprs, and misuse errors."""

from __future__ import annotations

import fractions
import functools

import chex
import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qjax import QuantSpec, _float32, dynamic
from qjax.qarray import QArray

from support import cases
from support import reference

F32 = np.float32

# ------------------------------------------------------------------------------------------
# The NumPy reference: fbgemm's arithmetic written from its description, float64 where fbgemm
# uses doubles, int64 for the integer part.


def ref_choose_qparams(min_val, max_val, reduce_range: bool) -> tuple[F32, int]:
  """ChooseQuantizationParams(min, max, 0, 255, reduce_range) with its float64 intermediates."""
  qmin, qmax = (0, 127) if reduce_range else (0, 255)
  lo, hi = min(F32(min_val), F32(0)), max(F32(max_val), F32(0))
  scale = (float(hi) - float(lo)) / (qmax - qmin)
  # fbgemm falls back when fl32(S) == 0 or 1/fl32(S) overflows; XLA:CPU flushes subnormal
  # scales to 0, so qjax (and this reference) fall back below float32's smallest normal.
  # tests/test_dynamic_torch.py pins the difference.
  if F32(scale) < np.finfo(F32).tiny:
    scale = 0.1
  if scale < float(reference.FBGEMM_SMALL_SCALE):
    amplifier = F32(reference.FBGEMM_SMALL_SCALE / F32(scale))
    scale = float(reference.FBGEMM_SMALL_SCALE)
    if lo == 0:
      hi = F32(reference.FBGEMM_SMALL_SCALE * F32(qmax - qmin))
    elif hi == 0:
      lo = F32(-reference.FBGEMM_SMALL_SCALE * F32(qmax - qmin))
    else:
      lo, hi = F32(lo * amplifier), F32(hi * amplifier)
  from_min, from_max = qmin - float(lo) / scale, qmax - float(hi) / scale
  use_min = abs(qmin) - abs(float(lo) / scale) < abs(qmax) - abs(float(hi) / scale)
  initial = from_min if use_min else from_max
  zero_point = qmin if initial < qmin else qmax if initial > qmax else int(np.rint(initial))
  return F32(scale), zero_point


def ref_quantize_activation(x, reduce_range: bool):
  """uint8 q = clamp(rne(fma(x, 1/S, Z)), 0, 255) with the reference qparams."""
  x = np.asarray(x, F32)
  lo, hi = (x.min(), x.max()) if x.size else (F32(0), F32(0))
  scale, zero_point = ref_choose_qparams(lo, hi, reduce_range)
  q = reference.quantize_fused(x, scale, np.int32(zero_point), 0, 255, np.uint8)
  return q, scale, zero_point


def ref_weight(kernel, spec: QuantSpec, per_channel: bool):
  """(q (N, K) int8, scale, zero point) of a (K, N) kernel, PyTorch's weight observer."""
  spec = QuantSpec(**{**spec.__dict__, "axis": 0 if per_channel else None})
  w = np.asarray(kernel, F32).T
  scale, zero_point = reference.qparams_from_minmax(*reference.minmax(w, spec), spec)
  return reference.quantize(w, spec, scale, zero_point), scale, zero_point


def ref_dense(x, kernel, bias, *, spec=dynamic.DEFAULT_WEIGHT_SPEC, per_channel=False,
              reduce_range=True):
  """y = fma(f32(sum_k (q_x - Z_x)(q_w - Z_w)), f32(S_x S_w), b): integers in int64."""
  x = np.asarray(x, F32)
  rows = x.reshape(-1, x.shape[-1])
  q_x, s_x, z_x = ref_quantize_activation(rows, reduce_range)
  q_w, s_w, z_w = ref_weight(kernel, spec, per_channel)
  acc = (q_x.astype(np.int64) - z_x) @ (q_w.astype(np.int64) - np.reshape(z_w, (-1, 1))).T
  assert np.abs(acc).max(initial=0) < 2**31
  multiplier = np.broadcast_to(F32(s_x) * np.asarray(s_w, F32), acc.shape)
  a = acc.astype(np.int32).astype(F32)
  if bias is None:
    y = a * multiplier
  else:
    y = reference.fma_f32(a, multiplier, np.broadcast_to(np.asarray(bias, F32), acc.shape))
  return y.reshape(x.shape[:-1] + (acc.shape[-1],))


# ------------------------------------------------------------------------------------------
# choose_qparams, on ranges that exercise every branch of fbgemm's qparams.

_RANGES = cases.fbgemm_qparams_ranges(0, 1800)


class ChooseQParamsTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_matches_float64_reference(self, reduce_range):
    scale, zero_point = cases.batched_choose_qparams(reduce_range)(_RANGES[:, 0], _RANGES[:, 1])
    expected = [ref_choose_qparams(lo, hi, reduce_range) for lo, hi in _RANGES]
    np.testing.assert_array_equal(np.asarray(scale), np.array([e[0] for e in expected]))
    np.testing.assert_array_equal(np.asarray(zero_point), np.array([e[1] for e in expected]))

  def test_exact_ties_follow_fbgemm_not_half_even(self):
    # On an exact tie Q(-min)/D = k + 1/2, fbgemm's float64 rounding, not round-half-even,
    # picks the zero point; check that such ties are present and reproduced.
    lo, hi = _RANGES[2::9, 0], _RANGES[2::9, 1]
    zero_point = np.asarray(cases.batched_choose_qparams(True)(lo, hi)[1])
    half_even = [int(np.rint(-127 * float(a) / (float(b) - float(a)))) for a, b in zip(lo, hi)]
    fbgemm = [ref_choose_qparams(a, b, True)[1] for a, b in zip(lo, hi)]
    self.assertGreater(sum(h != f for h, f in zip(half_even, fbgemm)), 0)
    np.testing.assert_array_equal(zero_point, fbgemm)

  @hypothesis.settings(max_examples=80, deadline=None)
  @hypothesis.given(*[st.floats(-2.0**100, 2.0**100, width=32, allow_subnormal=False)] * 2,
                    st.booleans())
  def test_property_against_reference(self, a, b, reduce_range):
    lo, hi = min(a, b), max(a, b)
    scale, zero_point = dynamic.choose_qparams(F32(lo), F32(hi), reduce_range=reduce_range)
    expected = ref_choose_qparams(lo, hi, reduce_range)
    self.assertEqual((F32(scale), int(zero_point)), expected)
    q = 127 if reduce_range else 255
    self.assertTrue(0 <= int(zero_point) <= q and float(scale) > 0)

  def test_zero_range_and_subnormal_scales(self):
    # max - min == 0: fbgemm's fallback S = 0.1, Z = 0. Below ~1.5e-36 the scale would be
    # subnormal, which XLA:CPU flushes to zero: qjax takes the same fallback (documented).
    for lo, hi in ((0.0, 0.0), (-1e-37, 1e-37)):
      scale, zero_point = dynamic.choose_qparams(lo, hi)
      self.assertEqual((float(scale), int(zero_point)), (float(F32(0.1)), 0))

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "finite"):
      dynamic.choose_qparams(np.nan, 1.0)
    with self.assertRaisesRegex(ValueError, "min_val must be <= max_val"):
      dynamic.choose_qparams(2.0, 1.0)
    with self.assertRaisesRegex(ValueError, "scalars"):
      dynamic.choose_qparams(jnp.zeros(3), jnp.ones(3))
    with self.assertRaisesRegex(TypeError, "reduce_range"):
      dynamic.choose_qparams(0.0, 1.0, reduce_range=1)
    scale, _ = jax.jit(dynamic.choose_qparams)(jnp.float32(np.nan), jnp.float32(1.0))
    self.assertTrue(np.isnan(scale))


class ExactArithmeticTest(parameterized.TestCase):
  """The float32 building blocks that stand in for fbgemm's FMA and float64 operations."""

  def test_fma_is_one_rounding(self):
    rng = np.random.default_rng(5)
    a = rng.integers(-2**24, 2**24, size=20000).astype(F32)       # f32(accumulators)
    b = rng.uniform(1e-6, 1e-2, size=a.shape).astype(F32)
    # c near -a b (cancellation) or comparable to it: where one rounding matters.
    c = (-(a.astype(np.float64) * b) * rng.choice([1, 1 - 2**-20, 0.5, 1e-3], size=a.shape))
    c = c.astype(F32)
    got = jax.jit(_float32.fma)(a, b, c)
    np.testing.assert_array_equal(np.asarray(got), reference.fma_f32(a, b, c))

  def test_divide_is_correctly_rounded(self):
    rng = np.random.default_rng(6)
    num = (rng.uniform(0.5, 2, size=20000) * 2.0 ** rng.integers(-20, 20, size=20000))
    den = (rng.uniform(0.5, 2, size=20000) * 2.0 ** rng.integers(-20, 20, size=20000))
    num, den = num.astype(F32), den.astype(F32)
    num[:100] = den[:100] * F32(3)           # exact quotients
    got = jax.jit(_float32.fusible_div)(num, den)
    np.testing.assert_array_equal(np.asarray(got), num / den)     # IEEE division rounds once

  @hypothesis.settings(max_examples=60, deadline=None)
  @hypothesis.given(st.lists(st.floats(-2.0**60, 2.0**60, width=32, allow_subnormal=False),
                             min_size=1, max_size=6))
  def test_sign_of_sum_is_exact(self, terms):
    exact = sum(fractions.Fraction(float(t)) for t in terms)
    sign = _float32.sign_of_sum(*[jnp.float32(t) for t in terms])
    self.assertEqual(float(sign), float((exact > 0) - (exact < 0)))


# ------------------------------------------------------------------------------------------
# The layer against the reference.

_CASES = [  # (x shape, N, per_channel, reduce_range, weight spec, bias)
    ((1, 37), 5, False, True, dynamic.DEFAULT_WEIGHT_SPEC, True),
    ((7, 64), 100, True, True, dynamic.DEFAULT_WEIGHT_SPEC, True),
    ((3, 5, 19), 3, False, False, dynamic.DEFAULT_WEIGHT_SPEC, True),
    ((19, 131), 7, True, False, dynamic.DEFAULT_WEIGHT_SPEC, False),
    ((33, 8), 16, False, True, QuantSpec(bits=8, signed=True, symmetric=False), True),
    ((2, 50), 9, True, False, QuantSpec(bits=8, signed=True, symmetric=False), True),
    ((4, 30), 11, True, True, QuantSpec(bits=4, signed=True, symmetric=True,
                                        narrow_range=True), True),
]


# By default each case runs in one variant: op by op (every value of every axis: per-tensor
# and per-channel, both reduce_range, each weight grid, with and without bias, a 3-D input),
# or jitted (quantize_kernel and dynamic_dense in one program); each in both with -m slow.
_EAGER_CASES = (2, 3, 5, 6)
_JIT_CASES = (0, 1, 4)


class DynamicDenseTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(without_jit=True)
  @parameterized.parameters(*_EAGER_CASES)
  def test_matches_numpy_reference(self, case):
    self._check_reference(case)

  @chex.variants(with_jit=True)
  @parameterized.parameters(*_JIT_CASES)
  def test_matches_numpy_reference_jitted(self, case):
    self._check_reference(case)

  @chex.variants(without_jit=True)
  @parameterized.parameters(*_JIT_CASES)
  @pytest.mark.slow
  def test_matches_numpy_reference_all(self, case):
    self._check_reference(case)

  @chex.variants(with_jit=True)
  @parameterized.parameters(*_EAGER_CASES)
  @pytest.mark.slow
  def test_matches_numpy_reference_jitted_all(self, case):
    self._check_reference(case)

  def _check_reference(self, case):
    shape, n, per_channel, reduce_range, spec, use_bias = _CASES[case]
    rng = np.random.default_rng(case)
    x = (rng.normal(size=shape) * rng.uniform(0.1, 10) + rng.normal()).astype(F32)
    kernel = rng.normal(size=(shape[-1], n)).astype(F32)
    bias = rng.normal(size=n).astype(F32) if use_bias else None

    def run(x, kernel, bias):
      dk = dynamic.quantize_kernel(kernel, weight_spec=spec, per_channel=per_channel,
                                   reduce_range=reduce_range)
      return dk, dynamic.dynamic_dense(x, dk, bias)

    dk, y = self.variant(run)(x, kernel, bias)
    q_w, s_w, z_w = ref_weight(kernel, spec, per_channel)
    np.testing.assert_array_equal(np.asarray(dk.qweight.qvalue), q_w)
    np.testing.assert_array_equal(np.asarray(dk.qweight.scale), s_w)
    np.testing.assert_array_equal(np.asarray(dk.qweight.zero_point), z_w)
    np.testing.assert_array_equal(np.asarray(dk.col_sums), q_w.astype(np.int64).sum(1))
    expected = ref_dense(x, kernel, bias, spec=spec, per_channel=per_channel,
                         reduce_range=reduce_range)
    self.assertEqual(y.shape, shape[:-1] + (n,))
    np.testing.assert_array_equal(np.asarray(y), expected)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(True, False)
  def test_activation_integers(self, reduce_range):
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(6, 41)) * 3 + 1).astype(F32)
    qa = self.variant(lambda v: dynamic.quantize_activation(v, reduce_range=reduce_range))(x)
    q, scale, zero_point = ref_quantize_activation(x, reduce_range)
    self.assertIsInstance(qa, QArray)
    np.testing.assert_array_equal(np.asarray(qa.qvalue), q)
    self.assertEqual((F32(qa.scale), int(qa.zero_point)), (scale, zero_point))

  def test_reduce_range_can_reach_128(self):
    # A tie whose zero point fbgemm rounds up puts max(x) on 127.5 -> 128: fbgemm clamps to
    # uint8's 255, not to 127, and so does qjax (the int8 shift keeps it exact).
    for v in np.linspace(0.5, 2, 400, dtype=F32):
      x = np.array([-v, v], F32)
      if ref_quantize_activation(x, True)[0].max() == 128:
        break
    else:
      self.fail("no symmetric range reached 128")
    self.assertEqual(int(np.asarray(dynamic.quantize_activation(x).qvalue).max()), 128)
    kernel = np.ones((2, 3), F32)
    np.testing.assert_array_equal(np.asarray(dynamic.dynamic_dense(x, dynamic.quantize_kernel(
        kernel))), ref_dense(x, kernel, None))

  def test_zero_input_gives_bias(self):
    # The shapes of the Flax MLP's first layer (X @ Dense_0): its compilations are shared.
    dk = dynamic.quantize_kernel(np.random.default_rng(0).normal(size=(10, 16)).astype(F32))
    bias = np.arange(16, dtype=F32)
    np.testing.assert_array_equal(np.asarray(dynamic.dynamic_dense(np.zeros((6, 10), F32), dk,
                                                                   bias)), np.tile(bias, (6, 1)))

  def test_empty_batch_and_dtypes(self):
    dk = dynamic.quantize_kernel(np.ones((4, 2), F32))
    self.assertEqual(dynamic.dynamic_dense(np.zeros((0, 4), F32), dk).shape, (0, 2))
    y = dynamic.dynamic_dense(jnp.ones((2, 4), jnp.bfloat16), dk, dtype=jnp.bfloat16)
    self.assertEqual(y.dtype, jnp.bfloat16)
    self.assertEqual(dynamic.dynamic_dense(jnp.ones((2, 4), jnp.bfloat16), dk).dtype,
                     jnp.float32)

  def test_dynamic_kernel_pytree(self):
    dk = dynamic.quantize_kernel(np.random.default_rng(1).normal(size=(6, 5)).astype(F32),
                                 per_channel=True, reduce_range=False)
    leaves, treedef = jax.tree_util.tree_flatten(dk)
    self.assertEqual([leaf.dtype for leaf in leaves], [jnp.int8, jnp.float32, jnp.int32,
                                                       jnp.int32])
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    self.assertEqual((rebuilt.reduce_range, rebuilt.features, rebuilt.in_features),
                     (False, 5, 6))
    self.assertEqual(dk.dequantize().shape, (6, 5))
    np.testing.assert_array_equal(np.asarray(dk.dequantize()),
                                  np.asarray(dk.qweight.dequantize()).T)


# ------------------------------------------------------------------------------------------
# Flax models.


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(12)(x))
    return nn.Dense(5)(x)


class ConvNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


class GeneralNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.DenseGeneral(4)(x)


def _init(model, x):
  return model.init(jax.random.key(0), x)["params"]


@functools.cache
def _params(name: str, per_channel: bool = False, quantized: bool = False):
  """Float (or dynamically quantized) params of the test models, built once per session."""
  model, x = {"mlp": (MLP(), X), "lstm": (LSTM, SEQ), "conv": (ConvNet(), IMAGES)}[name]
  params = _init(model, x)
  return dynamic.quantize_dynamic(params, per_channel=per_channel) if quantized else params


X = np.random.default_rng(11).normal(size=(6, 10)).astype(F32)
SEQ = np.random.default_rng(12).normal(size=(3, 4, 6)).astype(F32)
IMAGES = np.random.default_rng(3).normal(size=(2, 5, 5, 1)).astype(F32)
LSTM = nn.RNN(nn.LSTMCell(5))


@functools.cache
def _lstm_expected():
  """_lstm_reference of the per-channel quantized LSTM on SEQ, op by op: jitted, its four
  unrolled steps of eight dynamic_dense calls took seconds to compile."""
  return np.asarray(_lstm_reference(_params("lstm", per_channel=True, quantized=True), SEQ))


def _lstm_reference(params, xs):
  """The LSTM cell step by step from dynamic_dense calls (flax's gate equations)."""
  cell = params["cell"]
  dense = lambda name, v: dynamic.dynamic_dense(v, cell[name]["kernel"],
                                                cell[name].get("bias"))
  hidden = cell["hi"]["kernel"].features
  c = h = jnp.zeros((xs.shape[0], hidden), jnp.float32)
  outs = []
  for t in range(xs.shape[1]):
    x = xs[:, t]
    i = jax.nn.sigmoid(dense("ii", x) + dense("hi", h))
    f = jax.nn.sigmoid(dense("if", x) + dense("hf", h))
    g = jnp.tanh(dense("ig", x) + dense("hg", h))
    o = jax.nn.sigmoid(dense("io", x) + dense("ho", h))
    c = f * c + i * g
    h = o * jnp.tanh(c)
    outs.append(h)
  return jnp.stack(outs, axis=1)


class FlaxTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_mlp_equals_chained_layers(self):
    qparams = _params("mlp", quantized=True)
    self.assertEqual(sorted(qparams), ["Dense_0", "Dense_1", "Dense_2"])
    y = self.variant(lambda v, x: dynamic.dynamic_apply(MLP(), v, x))({"params": qparams}, X)
    h = X
    for i in range(3):
      layer = qparams[f"Dense_{i}"]
      h = dynamic.dynamic_dense(h, layer["kernel"], layer["bias"])
      h = jax.nn.relu(h) if i < 2 else h
    np.testing.assert_array_equal(np.asarray(y), np.asarray(h))

  def test_jit_takes_variables_as_arguments(self):
    params = _params("mlp")
    traces = []

    @jax.jit
    def run(variables, x):
      traces.append(1)
      return dynamic.dynamic_apply(MLP(), variables, x)

    first = run({"params": dynamic.quantize_dynamic(params)}, X)
    other = jax.tree_util.tree_map(lambda v: v * 1.5, params)
    second = run({"params": dynamic.quantize_dynamic(other)}, X)
    self.assertEqual(len(traces), 1)
    self.assertFalse(np.array_equal(np.asarray(first), np.asarray(second)))

  def test_include_exclude(self):
    params = _params("mlp")
    qparams = dynamic.quantize_dynamic(params, exclude="Dense_2")
    self.assertIsInstance(qparams["Dense_1"]["kernel"], dynamic.DynamicKernel)
    self.assertIs(qparams["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
    only = dynamic.quantize_dynamic(params, include="_1$")
    self.assertEqual([isinstance(only[k]["kernel"], dynamic.DynamicKernel)
                      for k in sorted(only)], [False, True, False])
    y = dynamic.dynamic_apply(MLP(), {"params": qparams}, X)
    h = X
    for i in range(2):
      h = jax.nn.relu(dynamic.dynamic_dense(h, qparams[f"Dense_{i}"]["kernel"],
                                            qparams[f"Dense_{i}"]["bias"]))
    expected = nn.Dense(5).apply({"params": params["Dense_2"]}, h)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))

  def test_conv_stays_float(self):
    x = IMAGES
    params = _params("conv")
    qparams = dynamic.quantize_dynamic(params)
    self.assertIs(qparams["Conv_0"]["kernel"], params["Conv_0"]["kernel"])
    y = dynamic.dynamic_apply(ConvNet(), {"params": qparams}, x)
    h = nn.relu(nn.Conv(4, (3, 3)).apply({"params": params["Conv_0"]}, x)).reshape((2, -1))
    expected = dynamic.dynamic_dense(h, qparams["Dense_0"]["kernel"], qparams["Dense_0"]["bias"])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))

  @chex.variants(with_jit=True, without_jit=True)
  def test_lstm_inside_rnn(self):
    params, qparams = _params("lstm"), _params("lstm", per_channel=True, quantized=True)
    self.assertLen(jax.tree_util.tree_leaves(
        qparams, is_leaf=lambda v: isinstance(v, dynamic.DynamicKernel)), 8 + 4)
    y = self.variant(lambda v, x: dynamic.dynamic_apply(LSTM, v, x))({"params": qparams}, SEQ)
    np.testing.assert_allclose(np.asarray(y), _lstm_expected(), rtol=0, atol=2e-7)
    float_y = LSTM.apply({"params": params}, SEQ)
    self.assertGreater(float(jnp.abs(y - float_y).max()), 0)      # it did quantize
    np.testing.assert_allclose(np.asarray(y), np.asarray(float_y), atol=0.05)

  @parameterized.named_parameters(("mlp", "mlp", MLP(), X), ("lstm", "lstm", LSTM, SEQ))
  def test_jaxpr_is_int8(self, name, model, x):
    variables = {"params": _params(name, quantized=True)}
    jaxpr = jax.make_jaxpr(jax.jit(lambda v, x: dynamic.dynamic_apply(model, v, x)))(
        variables, x)
    # int8 x int8 -> int32 on XLA's dot_general or the native kernel (whichever was traced).
    counts = cases.assert_int8_contractions(jaxpr.jaxpr)
    self.assertEqual(counts["dot_general"] + counts.get("native", 0),
                     3 if isinstance(model, MLP) else 8)


# ------------------------------------------------------------------------------------------
# Errors.


class ErrorsTest(parameterized.TestCase):

  def test_quantize_dynamic_errors(self):
    params = _params("mlp")
    with self.assertRaisesRegex(ValueError, "Dense_1/kernel is already quantized"):
      dynamic.quantize_dynamic({**params, "Dense_1": _params("mlp", quantized=True)["Dense_1"]})
    with self.assertRaisesRegex(TypeError, r"Dense_0/kernel: .*floating-point.*int32"):
      dynamic.quantize_dynamic({"Dense_0": {"kernel": jnp.ones((3, 2), jnp.int32)}})
    with self.assertRaisesRegex(ValueError, r"Dense_0/kernel: kernel holds 6 NaN"):
      dynamic.quantize_dynamic({"Dense_0": {"kernel": jnp.full((3, 2), np.nan)}})
    conv = _params("conv")
    with self.assertRaisesRegex(ValueError, r"Conv_0/kernel has shape \(3, 3, 1, 4\); only 2-D"):
      dynamic.quantize_dynamic(conv, include="Conv")
    with self.assertRaisesRegex(ValueError, "no 2-D Dense kernel was selected.*Dense_0"):
      dynamic.quantize_dynamic(params, include="nothing")
    with self.assertRaisesRegex(ValueError, "not a valid regex"):
      dynamic.quantize_dynamic(params, exclude="(")
    with self.assertRaisesRegex(ValueError, "signed grid of at most 8 bits"):
      dynamic.quantize_dynamic(params, weight_spec=QuantSpec(bits=8, signed=False))
    with self.assertRaisesRegex(ValueError, "per_channel=False/True"):
      dynamic.quantize_dynamic(params, weight_spec=QuantSpec(bits=8, symmetric=True, axis=1))
    with self.assertRaisesRegex(TypeError, "mapping"):
      dynamic.quantize_dynamic([params])
    with self.assertRaisesRegex(ValueError, "beyond int32"):
      dynamic.quantize_kernel(jnp.ones((70000, 1)))

  def test_apply_errors_name_the_layer(self):
    variables = {"params": _params("mlp", quantized=True)}
    with self.assertRaisesRegex(TypeError, r"Dense_0: expected a floating-point input; .*int32"):
      dynamic.dynamic_apply(MLP(), variables, jnp.ones((2, 10), jnp.int32))
    with self.assertRaisesRegex(ValueError, r"Dense_0: the input has shape \(2, 7\)"):
      dynamic.dynamic_apply(MLP(), variables, jnp.ones((2, 7)))
    with self.assertRaisesRegex(ValueError, "hold no quantized kernel"):
      dynamic.dynamic_apply(MLP(), {"params": _params("mlp")}, X)

  def test_non_dense_layers_are_refused(self):
    x = np.ones((2, 3), F32)
    variables = {"params": dynamic.quantize_dynamic(_init(GeneralNet(), x), include="Dense")}
    with self.assertRaisesRegex(TypeError, "DenseGeneral_0: this DenseGeneral holds"):
      dynamic.dynamic_apply(GeneralNet(), variables, x)

    class CustomDot(nn.Module):
      @nn.compact
      def __call__(self, x):
        # GeneralNet's kernel shape (3, 4): its initializer and quantization are compiled
        return nn.Dense(4, dot_general=jax.lax.dot_general)(x)

    variables = {"params": dynamic.quantize_dynamic(_init(CustomDot(), x))}
    with self.assertRaisesRegex(ValueError, "Dense_0: this nn.Dense has a custom dot_general"):
      dynamic.dynamic_apply(CustomDot(), variables, x)
    mlp = {"params": _params("mlp", quantized=True)}

    class Wider(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(17)(x)

    with self.assertRaisesRegex(ValueError, "Dense_0: the quantized kernel has 16 outputs"):
      dynamic.dynamic_apply(Wider(), mlp, X)

  def test_dynamic_dense_argument_errors(self):
    dk = dynamic.quantize_kernel(np.ones((4, 2), F32))
    with self.assertRaisesRegex(TypeError, "DynamicKernel"):
      dynamic.dynamic_dense(np.ones((1, 4), F32), np.ones((4, 2), F32))
    with self.assertRaisesRegex(ValueError, r"bias has shape \(3,\); expected \(2,\)"):
      dynamic.dynamic_dense(np.ones((1, 4), F32), dk, np.ones(3, F32))
    with self.assertRaisesRegex(ValueError, "2-D"):
      dynamic.quantize_kernel(np.ones((2, 2, 2), F32))
