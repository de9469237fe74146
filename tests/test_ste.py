"""Straight-through rules: stop_gradient oracles, the contract suite, LSQ gradients, errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qjax import QParams, QuantSpec
from qjax import numerics, ste

RNG = np.random.default_rng(1234)
X = jnp.asarray((RNG.standard_normal((8, 6)) * 2.0).astype(np.float32))

SPECS = {
    "int8_affine": QuantSpec(bits=8),
    "uint8_affine": QuantSpec(bits=8, signed=False),
    "int4_symmetric": QuantSpec(bits=4, symmetric=True),
    "int8_per_channel": QuantSpec(bits=8, symmetric=True, narrow_range=True, axis=1),
    "uint3_per_channel_rows": QuantSpec(bits=3, signed=False, axis=0),
    "int16": QuantSpec(bits=16),
}


def _qparams(spec, x=X, shrink=0.5):
  """Qparams covering only part of x's range, so that some entries clamp."""
  lo, hi = numerics.minmax(x, spec)
  return numerics.qparams_from_minmax(lo * shrink, hi * shrink, spec)


def _stop_gradient_reference(x, spec, qparams):
  """Clipped STE written with stop_gradient: forward fq(x), gradient 1 in range else 0."""
  fq = numerics.quantize_dequantize(x, spec, qparams)
  scale = numerics.broadcast_qparam(qparams.scale, spec, x.ndim)
  zp = numerics.broadcast_qparam(qparams.zero_point, spec, x.ndim).astype(jnp.float32)
  shifted = jnp.round(x * (1.0 / scale)) + zp
  in_range = (shifted >= spec.qmin) & (shifted <= spec.qmax)
  passthrough = x + jax.lax.stop_gradient(fq - x)
  return jnp.where(in_range, passthrough, jax.lax.stop_gradient(fq))


class FakeQuantOracleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(name, spec) for name, spec in SPECS.items()])
  def test_matches_stop_gradient_reference(self, spec):
    qp = _qparams(spec)
    upstream = jnp.asarray(RNG.standard_normal(X.shape).astype(np.float32))
    loss = lambda f: (lambda x: jnp.sum(f(x, spec, qp) * upstream))
    fq = self.variant(ste.fake_quant, static_argnums=1)
    ref = _stop_gradient_reference
    np.testing.assert_array_equal(fq(X, spec, qp), ref(X, spec, qp))
    grad = self.variant(jax.grad(loss(ste.fake_quant)))
    np.testing.assert_array_equal(grad(X), jax.grad(loss(ref))(X))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(name, spec) for name, spec in SPECS.items()])
  def test_gradient_is_exactly_zero_where_clamped(self, spec):
    qp = _qparams(spec, shrink=0.3)
    grad = self.variant(jax.grad(lambda x: jnp.sum(ste.fake_quant(x, spec, qp))))(X)
    scale = numerics.broadcast_qparam(qp.scale, spec, X.ndim)
    zp = numerics.broadcast_qparam(qp.zero_point, spec, X.ndim).astype(jnp.float32)
    shifted = np.asarray(jnp.round(X * (1.0 / scale)) + zp)
    clamped = (shifted < spec.qmin) | (shifted > spec.qmax)
    self.assertTrue(clamped.any() and (~clamped).any())
    np.testing.assert_array_equal(np.asarray(grad)[clamped], 0.0)
    np.testing.assert_array_equal(np.asarray(grad)[~clamped], 1.0)

  def test_scale_and_zero_point_get_zero_gradient(self):
    spec = SPECS["int8_affine"]
    qp = _qparams(spec)
    dscale = jax.grad(lambda s: jnp.sum(ste.fake_quant(X, spec, QParams(s, qp.zero_point))))(
        qp.scale)
    self.assertEqual(float(dscale), 0.0)

  def test_nan_propagates_with_zero_gradient_and_inf_saturates(self):
    spec = QuantSpec(bits=8)
    qp = QParams(jnp.float32(0.1), jnp.int32(3))
    x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.2], jnp.float32)
    y = ste.fake_quant(x, spec, qp)
    self.assertTrue(bool(jnp.isnan(y[0])))
    np.testing.assert_allclose(y[1:], [0.1 * (127 - 3), 0.1 * (-128 - 3), 0.2], rtol=1e-6)
    g = jax.grad(lambda v: jnp.sum(ste.fake_quant(v, spec, qp)))(x)
    np.testing.assert_array_equal(g, [0.0, 0.0, 0.0, 1.0])


# ------------------------------------------------------------------------------------------
# The contract suite: every quantizer, the same checks.


def _learnable(x, spec):
  qp = _qparams(spec, x)
  return ste.fake_quant_learnable(x, spec, qp.scale, qp.zero_point.astype(jnp.float32),
                                  grad_factor=ste.lsq_grad_factor(spec, x.size))


QUANTIZERS = [
    ("fake_quant_per_tensor", lambda x: ste.fake_quant(x, SPECS["int8_affine"],
                                                       _qparams(SPECS["int8_affine"], x))),
    ("fake_quant_per_channel", lambda x: ste.fake_quant(x, SPECS["int8_per_channel"],
                                                        _qparams(SPECS["int8_per_channel"], x))),
    ("fake_quant_4bit", lambda x: ste.fake_quant(x, SPECS["int4_symmetric"],
                                                 _qparams(SPECS["int4_symmetric"], x))),
    ("fake_quant_learnable_per_tensor", lambda x: _learnable(x, SPECS["uint8_affine"])),
    ("fake_quant_learnable_per_channel", lambda x: _learnable(x, SPECS["uint3_per_channel_rows"])),
    ("quantize_dequantize", lambda x: numerics.quantize_dequantize(
        x, SPECS["int16"], _qparams(SPECS["int16"], x))),
    ("round_ste", lambda x: ste.round_ste(x * 4.0)),
]


@pytest.mark.parametrize("name,quantizer", QUANTIZERS, ids=[n for n, _ in QUANTIZERS])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_contract(name, quantizer, dtype):
  x = X.astype(dtype)
  traces = []

  @jax.jit
  def run(v):
    traces.append(1)
    return quantizer(v)

  y = run(x)
  assert y.dtype == x.dtype and y.shape == x.shape, name
  assert bool(jnp.all(jnp.isfinite(y)))
  y_again = run(x + jnp.asarray(0.25, dtype))
  assert len(traces) == 1, f"{name} retraced on a second call with the same shapes"
  assert y_again.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(quantizer(x), np.float32), np.asarray(y, np.float32))
  grad = jax.jit(jax.grad(lambda v: jnp.sum(quantizer(v).astype(jnp.float32))))(x)
  assert grad.dtype == x.dtype and bool(jnp.all(jnp.isfinite(grad)))


def test_contract_under_vmap():
  spec = SPECS["int8_affine"]
  qp = _qparams(spec)
  batched = jax.vmap(lambda row: ste.fake_quant(row, spec, qp))(X)
  np.testing.assert_array_equal(batched, ste.fake_quant(X, spec, qp))


# ------------------------------------------------------------------------------------------
# fake_quant_learnable: LSQ gradients against the formula.


def _lsq_reference(x, scale, zero_point, g, spec, grad_factor):
  """The LSQ gradients of the ste docstring in float64 NumPy, per-tensor.

  The backward's zero point is PyTorch's Z_b = trunc(clamp(Z + 0.5)), which for negative Z
  is one above the forward's rne(Z).
  """
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  s = float(scale)
  z = float(np.trunc(np.clip(float(zero_point) + 0.5, spec.qmin, spec.qmax)))
  q = np.round(x * np.float64(np.float32(1.0) / np.float32(s)) + z)
  below, above = q < spec.qmin, q > spec.qmax
  inside = ~(below | above)
  fq = (np.clip(q, spec.qmin, spec.qmax) - z) * s
  dx = np.where(inside, g, 0.0)
  dscale = np.where(inside, g * (fq - x) / s,
                    np.where(below, g * (spec.qmin - z), g * (spec.qmax - z))) * grad_factor
  dzero = np.where(inside, 0.0, -g * s) * grad_factor
  return dx, dscale.sum(), dzero.sum()


class FakeQuantLearnableTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((QuantSpec(bits=8, signed=False), 0.3), (QuantSpec(bits=4), 1.0),
                            (QuantSpec(bits=12), 0.01))
  def test_gradients_follow_lsq_formula(self, spec, grad_factor):
    scale, zero_point = jnp.float32(0.05), jnp.float32(spec.qmin + 3)
    g = jnp.asarray(RNG.standard_normal(X.shape).astype(np.float32))
    fn = lambda x, s, z: jnp.sum(
        ste.fake_quant_learnable(x, spec, s, z, grad_factor=grad_factor) * g)
    dx, ds, dz = self.variant(jax.grad(fn, argnums=(0, 1, 2)))(X, scale, zero_point)
    ref_dx, ref_ds, ref_dz = _lsq_reference(X, scale, zero_point, g, spec, grad_factor)
    np.testing.assert_array_equal(dx, ref_dx.astype(np.float32))
    # float32 sums of 48 terms vs a float64 reference: 1e-5 of the absolute sum.
    terms = np.abs(np.asarray(X)).sum() * 20 + 1.0
    np.testing.assert_allclose(ds, ref_ds, atol=1e-5 * terms * grad_factor)
    np.testing.assert_allclose(dz, ref_dz, atol=1e-5 * terms * grad_factor)

  def test_per_tensor_backward_zero_point_is_pytorchs_half_up_truncation(self):
    # Z = -5: forward uses rne(Z) = -5, PyTorch's per-tensor backward trunc(-4.5) = -4, so an
    # entry clamped at qmin gets dS = qmin - (-4) = -4, not -3.
    spec = QuantSpec(bits=4)
    x = jnp.array([-10.0], jnp.float32)
    ds = jax.grad(lambda s: jnp.sum(ste.fake_quant_learnable(x, spec, s, jnp.float32(-5.0))),
                  )(jnp.float32(0.5))
    self.assertEqual(float(ds), -4.0)
    per_channel = QuantSpec(bits=4, axis=0)
    ds_c = jax.grad(lambda s: jnp.sum(ste.fake_quant_learnable(
        x, per_channel, s, jnp.full((1,), -5.0))))(jnp.full((1,), 0.5))
    self.assertEqual(float(ds_c[0]), -3.0)

  def test_forward_equals_fake_quant_with_rounded_zero_point(self):
    spec = QuantSpec(bits=8, signed=False)
    y = ste.fake_quant_learnable(X, spec, jnp.float32(0.02), jnp.float32(99.6))
    np.testing.assert_array_equal(y, ste.fake_quant(X, spec, QParams(jnp.float32(0.02),
                                                                     jnp.int32(100))))

  def test_grad_factor_scales_only_qparam_gradients(self):
    spec = QuantSpec(bits=8)
    grads = [jax.grad(lambda x, s, z: jnp.sum(ste.fake_quant_learnable(
        x, spec, s, z, grad_factor=f)), argnums=(0, 1, 2))(X, jnp.float32(0.01), jnp.float32(2.0))
             for f in (1.0, 0.25)]
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    np.testing.assert_allclose(grads[1][1], 0.25 * grads[0][1], rtol=1e-6)
    np.testing.assert_allclose(grads[1][2], 0.25 * grads[0][2], rtol=1e-6)

  def test_per_channel_reduces_over_other_axes(self):
    spec = QuantSpec(bits=5, axis=1)
    scale = jnp.full((X.shape[1],), 0.07, jnp.float32)
    zp = jnp.arange(X.shape[1], dtype=jnp.float32) + 1.0
    ds = jax.grad(lambda s: jnp.sum(ste.fake_quant_learnable(X, spec, s, zp)))(scale)
    assert ds.shape == (X.shape[1],)
    for c in range(X.shape[1]):
      col_spec = QuantSpec(bits=5)
      ds_c = jax.grad(lambda s: jnp.sum(ste.fake_quant_learnable(X[:, c], col_spec, s, zp[c])))(
          scale[c])
      np.testing.assert_allclose(ds[c], ds_c, rtol=1e-6)

  def test_lsq_grad_factor(self):
    spec = QuantSpec(bits=8, signed=False)
    self.assertAlmostEqual(ste.lsq_grad_factor(spec, 100), 1.0 / np.sqrt(100 * 255))
    with pytest.raises(ValueError, match="num_elements"):
      ste.lsq_grad_factor(spec, 0)


# ------------------------------------------------------------------------------------------
# round_ste and bad input.


class RoundSteTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_rounds_half_to_even_with_identity_gradient(self):
    x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, 0.49], jnp.float32)
    fn = self.variant(ste.round_ste)
    np.testing.assert_array_equal(fn(x), [0.0, 2.0, 2.0, -0.0, -2.0, 0.0])
    grad = self.variant(jax.grad(lambda v: jnp.sum(ste.round_ste(v) * jnp.arange(6.0))))
    np.testing.assert_array_equal(grad(x), np.arange(6.0))

  def test_integer_input_is_rejected(self):
    with pytest.raises(TypeError, match="x must be a floating-point array"):
      ste.round_ste(jnp.arange(3))


@pytest.mark.parametrize("call,error,match", [
    (lambda: ste.fake_quant(jnp.arange(4, dtype=jnp.int8), QuantSpec(),
                            QParams(jnp.float32(1.0), jnp.int32(0))), TypeError, "x must be"),
    (lambda: ste.fake_quant(X, QuantSpec(), QParams(jnp.float32(1.0), jnp.float32(0.0))),
     TypeError, "qparams.zero_point"),
    (lambda: ste.fake_quant(X, QuantSpec(axis=1), QParams(jnp.ones(5), jnp.zeros(5, jnp.int32))),
     ValueError, r"must have shape \(6,\)"),
    (lambda: ste.fake_quant(X, QuantSpec(), QParams(jnp.float32(-1.0), jnp.int32(0))),
     ValueError, "scale must be finite and > 0"),
    (lambda: ste.fake_quant_learnable(X, QuantSpec(), jnp.float32(0.0), jnp.float32(0.0)),
     ValueError, "scale must be finite and > 0"),
    (lambda: ste.fake_quant_learnable(X, QuantSpec(axis=0), jnp.ones(6), jnp.zeros(6)),
     ValueError, r"scale has shape \(6,\).*must have shape \(8,\)"),
    (lambda: ste.fake_quant_learnable(X, QuantSpec(), jnp.float32(1.0), jnp.float32(0.0),
                                      grad_factor="1"), TypeError, "grad_factor"),
    (lambda: ste.fake_quant_learnable(X, QuantSpec(), jnp.int32(1), jnp.float32(0.0)),
     TypeError, "scale must be a floating-point array"),
])
def test_bad_input(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_jitted_fake_quant_checks_shapes_at_trace_time():
  fn = jax.jit(functools.partial(ste.fake_quant, spec=QuantSpec(axis=0)))
  with pytest.raises(ValueError, match=r"must have shape \(8,\)"):
    fn(X, qparams=QParams(jnp.ones(6), jnp.zeros(6, jnp.int32)))
