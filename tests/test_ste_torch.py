"""Parity of `qjax.ste` with PyTorch 2.13's fake quantization and its gradients (CPU kernels).

  * `fake_quant`: values and input gradients against `torch.fake_quantize_per_tensor_affine` /
    `torch.fake_quantize_per_channel_affine` under autograd: bitwise equal.
  * `fake_quant_learnable`: values and all three gradients against
    `torch._fake_quantize_learnable_per_tensor_affine` / `_per_channel_affine` with a random
    upstream gradient. Values and dX bitwise equal; dScale and dZeroPoint are float32 sums
    whose summation order differs between XLA and ATen, so they are compared with
    GRAD_SUM_RTOL (below). Their summands are compared exactly in
    `test_learnable_per_element_gradients_match_torch`.

Data: normal data, values far outside the range (up to 1e3 x the range, so both clamps are
hit), exact ties (power-of-two scale, x = (k + 0.5) * S), and adversarial near ties
(x = (k + 0.5) * S * (1 +- 3e-7), non-power-of-two S), many of them on the clamping
boundaries, where the rounding decides whether the gradient passes. Fractional learnable zero
points (2.5, 3.5, -1.5, -2.7, 7.3) make PyTorch's per-tensor backward zero point,
trunc(clamp(Z + 0.5)), differ from its forward one, clamp(rne(Z)). Inf and NaN are left out:
torch's kernels cast them to int64 (undefined behaviour); tests/test_ste.py documents qjax's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from support import cases  # noqa: E402
import qjax  # noqa: E402
from support import reference as ref  # noqa: E402
from qjax import QParams, QuantSpec  # noqa: E402

# dScale / dZeroPoint: |qjax - torch| <= GRAD_SUM_RTOL * sum_i |term_i| + GRAD_SUM_ATOL, per
# entry. Both sides add up the same float32 summands (compared bitwise, one at a time, in
# test_learnable_per_element_gradients_match_torch) in different orders (XLA:CPU's vectorised
# reduction vs ATen's). Whatever the order, a float32 sum of n terms is off by at most
# (n - 1) * eps32 / 2 * sum_i |term_i|, and in practice by far less (rounding errors of random
# sign cancel, and both sides keep several partial sums). The largest
# |qjax - torch| / sum_i |term_i| seen over every case below was 1.8e-7; 1e-5 leaves a 50x
# margin and still catches one wrong summand among 10k (~1e-4 of the sum each).
GRAD_SUM_RTOL = 1e-5
# For sums whose terms nearly all vanish (a channel with no clamped entries).
GRAD_SUM_ATOL = 1e-6

# layout name -> (axis, data shape); every case has >= 10k elements.
LAYOUTS = {
    "per_tensor": (None, (101, 103)),
    "axis0": (0, (12, 37, 29)),
    "axis1": (1, (31, 12, 29)),
}
MODES = ("eager", "jit")










def _assert_same_bits(got, expected, what, spec, x, *, signed_zeros=True):
  """Bitwise equality; with signed_zeros=False, -0.0 and +0.0 count as equal (input
  gradients: torch multiplies the upstream gradient by a 0/1 mask and so returns -0.0 where
  it is negative and clamped, qjax selects +0.0; the two are the same gradient)."""
  got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
  assert got.shape == expected.shape, (what, got.shape, expected.shape)
  if not signed_zeros:
    got, expected = got + np.float32(0.0), expected + np.float32(0.0)  # -0.0 + 0.0 = +0.0
  bad = np.flatnonzero(cases.bits_of(got) != cases.bits_of(expected))
  assert bad.size == 0, (
      f"{what}: {bad.size} of {got.size} entries differ from torch for {spec}; first at "
      f"x={x.flat[bad[0]]!r}: qjax {got.flat[bad[0]]!r}, torch {expected.flat[bad[0]]!r}")


# ------------------------------------------------------------------------------------------
# Data.

KINDS = ("normal", "outside", "ties_even_zp", "ties_odd_zp", "near_ties")






def make_case(kind, spec, shape, seed, *, zero_point=None):
  """(x float32, scale float32, zero point), qparams of shape () or (C,).

  Without `zero_point`, an integer zero point on the grid is drawn (odd or even for the tie
  kinds). With it (the learnable quantizer's float zero point), the ties are laid out
  around `grid_zero_point(zero_point)`, the integer zero point of torch's backward."""
  rng = np.random.default_rng(seed)
  ndim = len(shape)
  n = shape[spec.axis % ndim] if spec.per_channel else 1
  bc = lambda v: ref.broadcast(v, spec.axis, ndim)  # noqa: E731
  squeeze = (lambda v: v) if spec.per_channel else (lambda v: np.asarray(v).reshape(()))
  if kind in ("normal", "outside"):
    mu = rng.normal(size=n) * 2.0
    sigma = np.exp(rng.uniform(-3.0, 3.0, size=n))
    x = rng.normal(size=shape) * bc(squeeze(sigma)) + bc(squeeze(mu))
    lo = np.minimum(squeeze(mu - 3 * sigma), 0.0)
    hi = np.maximum(squeeze(mu + 3 * sigma), 0.0)
    scale = np.maximum((hi - lo) / (spec.qmax - spec.qmin), 1e-6).astype(np.float32)
    if zero_point is None:
      zero_point = np.clip(spec.qmin - np.rint(lo / scale), spec.qmin, spec.qmax)
    if kind == "outside":
      far = rng.uniform(1.0, 1e3, size=shape) * bc(hi - lo)
      outside = np.where(rng.random(shape) < 0.5, bc(hi) + far, bc(lo) - far)
      x = np.where(rng.random(shape) < 0.25, outside, x)
  elif kind in ("ties_even_zp", "ties_odd_zp", "near_ties"):
    if zero_point is None:
      parity = {"ties_even_zp": 0, "ties_odd_zp": 1, "near_ties": None}[kind]
      zero_point = squeeze(cases.zero_points(rng, spec, n, parity))
    z_grid = grid_zero_point(zero_point, spec)
    if kind == "near_ties":
      scale = squeeze(rng.uniform(0.01, 0.1, size=n).astype(np.float32))
      k = cases.half_points(rng, spec, shape, bc(z_grid), 0.5)
      x = (k + 0.5) * bc(scale).astype(np.float64) * (1.0 + rng.uniform(-3e-7, 3e-7, size=shape))
    else:
      scale = squeeze(np.ldexp(np.float32(1.0), -rng.integers(3, 8, size=n)).astype(np.float32))
      k = cases.half_points(rng, spec, shape, bc(z_grid), 0.2)
      x = (k + 0.5) * bc(scale).astype(np.float64)  # exact in float32
  else:
    raise ValueError(kind)
  x = np.asarray(x, np.float32)
  return x, np.asarray(scale, np.float32), squeeze(np.asarray(zero_point))


def grid_zero_point(zero_point, spec):
  """The integer zero point the data is laid out around: the zero point itself when integer,
  else PyTorch's per-tensor backward one, clamp(trunc(Z + 0.5)) (per-channel: clamp(rne(Z)))."""
  z = np.asarray(zero_point)
  if np.issubdtype(z.dtype, np.integer):
    return z
  if spec.per_channel:
    return np.clip(np.rint(z), spec.qmin, spec.qmax).astype(np.int64)
  return np.trunc(np.clip(z + 0.5, spec.qmin, spec.qmax)).astype(np.int64)


# ------------------------------------------------------------------------------------------
# fake_quant: values and input gradients.

FQ_SPECS = [
    QuantSpec(bits=8, signed=True),
    QuantSpec(bits=8, signed=False),
    QuantSpec(bits=8, signed=True, narrow_range=True),
    QuantSpec(bits=8, signed=False, reduce_range=True),
    QuantSpec(bits=4, signed=True),
    QuantSpec(bits=2, signed=False, narrow_range=True),
    QuantSpec(bits=3, signed=True, narrow_range=True),
    QuantSpec(bits=11, signed=False),
    QuantSpec(bits=16, signed=True),
    QuantSpec(bits=16, signed=False, narrow_range=True, reduce_range=True),
]


def _fake_quant_and_grad(x, g, scale, zero_point, spec):
  y, vjp = jax.vjp(lambda v: qjax.fake_quant(v, spec, QParams(scale, zero_point)), x)
  return y, vjp(g)[0]


_FQ = {"eager": _fake_quant_and_grad,
       "jit": jax.jit(_fake_quant_and_grad, static_argnums=4)}


def torch_fake_quant_and_grad(x, g, scale, zero_point, spec):
  xt = torch.from_numpy(x).requires_grad_(True)
  if spec.per_channel:
    y = torch.fake_quantize_per_channel_affine(
        xt, torch.from_numpy(scale), torch.from_numpy(zero_point.astype(np.int32)),
        spec.axis % x.ndim, spec.qmin, spec.qmax)
  else:
    y = torch.fake_quantize_per_tensor_affine(xt, float(scale), int(zero_point), spec.qmin,
                                              spec.qmax)
  y.backward(torch.from_numpy(g))
  return y.detach().numpy(), xt.grad.numpy()


def _fq_cases():
  """Every FQ_SPECS spec in every layout and mode. The default run takes every spec
  per-tensor eagerly, each spec in one per-channel layout eagerly (alternating between axis 0
  and axis 1) and each spec in one layout under jax.jit (rotating); the rest is marked slow
  (the full grid runs with -m slow)."""
  params = []
  for i, spec in enumerate(FQ_SPECS):
    default = {("per_tensor", "eager"), (("axis0", "axis1")[i % 2], "eager"),
               (list(LAYOUTS)[i % 3], "jit")}
    params += [pytest.param(spec, layout, mode, id=f"{cases.spec_id(spec)}-{layout}-{mode}",
                            marks=() if (layout, mode) in default else pytest.mark.slow)
               for layout in LAYOUTS for mode in MODES]
  return params


@pytest.mark.parametrize("spec, layout, mode", _fq_cases())
def test_fake_quant_values_and_grads_match_torch(spec, layout, mode):
  axis, shape = LAYOUTS[layout]
  spec = dataclasses.replace(spec, axis=axis)
  for i, kind in enumerate(KINDS):
    x, scale, zero_point = make_case(kind, spec, shape, seed=100 * spec.bits + i)
    zero_point = zero_point.astype(np.int32)
    g = np.random.default_rng(i).normal(size=shape).astype(np.float32)
    y, dx = _FQ[mode](jnp.asarray(x), jnp.asarray(g), jnp.asarray(scale),
                      jnp.asarray(zero_point), spec)
    t_y, t_dx = torch_fake_quant_and_grad(x, g, scale, zero_point, spec)
    _assert_same_bits(y, t_y, f"{kind} values", spec, x)
    _assert_same_bits(dx, t_dx, f"{kind} dx", spec, x, signed_zeros=False)
    # The data reaches both sides of the mask.
    assert np.any(t_dx == 0) or kind == "normal"
    assert np.any(t_dx != 0)


# ------------------------------------------------------------------------------------------
# fake_quant_learnable.

LEARNABLE_SPECS = [
    QuantSpec(bits=8, signed=False),
    QuantSpec(bits=8, signed=True),
    QuantSpec(bits=4, signed=True, narrow_range=True),
    QuantSpec(bits=3, signed=False),
    QuantSpec(bits=12, signed=True, reduce_range=True),
]
FRACTIONAL_ZERO_POINTS = (2.5, 3.5, -1.5, -2.7, 7.3)
LEARNABLE_KINDS = ("normal", "outside", "ties", "near_ties")


def _learnable(x, g, scale, zero_point, spec, grad_factor):
  def f(v, s, z):
    return qjax.fake_quant_learnable(v, spec, s, z, grad_factor=grad_factor)

  y, vjp = jax.vjp(f, x, scale, zero_point)
  return (y,) + vjp(g)


_LEARNABLE = {"eager": _learnable, "jit": jax.jit(_learnable, static_argnums=(4, 5))}


def torch_learnable(x, g, scale, zero_point, spec, grad_factor):
  xt = torch.from_numpy(x).requires_grad_(True)
  st = torch.from_numpy(np.atleast_1d(scale).astype(np.float32)).requires_grad_(True)
  zt = torch.from_numpy(np.atleast_1d(zero_point).astype(np.float32)).requires_grad_(True)
  if spec.per_channel:
    y = torch._fake_quantize_learnable_per_channel_affine(
        xt, st, zt, spec.axis % x.ndim, spec.qmin, spec.qmax, grad_factor)
  else:
    y = torch._fake_quantize_learnable_per_tensor_affine(xt, st, zt, spec.qmin, spec.qmax,
                                                          grad_factor)
  y.backward(torch.from_numpy(g))
  return (y.detach().numpy(), xt.grad.numpy(), st.grad.numpy().reshape(np.shape(scale)),
          zt.grad.numpy().reshape(np.shape(zero_point)))


def _term_magnitudes(x, g, scale, zero_point, spec, grad_factor, dx_mask):
  """sum |term_i| of dScale and dZeroPoint, per entry (float64; sizes only, for the
  tolerance). The mask of in-range entries is torch's dX != 0."""
  ndim = x.ndim
  s = ref.broadcast(np.asarray(scale, np.float64), spec.axis, ndim)
  zb = ref.broadcast(grid_zero_point(np.asarray(zero_point, np.float32), spec).astype(np.float64),
                    spec.axis, ndim)
  t = x.astype(np.float64) / s + zb
  in_range = dx_mask
  fq = (np.clip(np.rint(t), spec.qmin, spec.qmax) - zb) * s
  dscale = np.where(in_range, (fq - x) / s, np.where(t < spec.qmin, spec.qmin - zb,
                                                     spec.qmax - zb))
  dzero = np.where(in_range, 0.0, s)
  terms = [np.abs(g * t_) * abs(grad_factor) for t_ in (dscale, dzero)]
  if spec.per_channel:
    axis = spec.axis % ndim
    others = tuple(a for a in range(ndim) if a != axis)
    return [t_.sum(axis=others) for t_ in terms]
  return [np.asarray(t_.sum()) for t_ in terms]


def _assert_sums_close(got, expected, magnitude, what, spec):
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  assert got.shape == expected.shape, (what, got.shape, expected.shape)
  bound = GRAD_SUM_RTOL * magnitude + GRAD_SUM_ATOL
  err = np.abs(got - expected)
  assert np.all(err <= bound), (
      f"{what} differs from torch for {spec} beyond GRAD_SUM_RTOL: qjax {got}, torch "
      f"{expected}, |diff| / sum|terms| = {err / np.maximum(magnitude, 1e-30)}")


def _learnable_zero_points(spec, n, seed):
  """Fractional zero points, per channel cycling FRACTIONAL_ZERO_POINTS (and shifted into the
  grid for unsigned specs now and then, so both clamped and unclamped zero points occur)."""
  rng = np.random.default_rng(seed)
  base = np.resize(np.asarray(FRACTIONAL_ZERO_POINTS), n)
  if not spec.signed:
    base = base + np.where(rng.random(n) < 0.5, 0.0, np.floor(spec.qmax / 2))
  return np.clip(base, spec.qmin - 1.5, spec.qmax + 1.5).astype(np.float32)


def _learnable_grad_factors(spec, shape):
  n = int(np.prod(shape))
  return {"one": 1.0, "lsq": qjax.lsq_grad_factor(spec, n), "other": 0.37}


def _learnable_default(i, layout, mode, factor):
  """The default run's share of the learnable grid, for the i-th LEARNABLE_SPECS spec: every
  grad factor per-tensor eagerly; one per-channel layout (alternating) eagerly, with the
  factors rotating; one layout (rotating) under jax.jit."""
  factors = ("one", "lsq", "other")
  if mode == "jit":
    return layout == list(LAYOUTS)[i % 3]
  return layout == "per_tensor" or (layout == ("axis0", "axis1")[i % 2]
                                    and factor == factors[i % 3])


_LEARNABLE_CASES = [
    pytest.param(spec, layout, mode, factor,
                 id=f"{cases.spec_id(spec)}-{layout}-{mode}-{factor}",
                 marks=() if _learnable_default(i, layout, mode, factor) else pytest.mark.slow)
    for i, spec in enumerate(LEARNABLE_SPECS) for layout in LAYOUTS for mode in MODES
    for factor in ("one", "lsq", "other")
    # grad_factor is static: each value compiles; sample the factors under jit.
    if mode == "eager" or factor == "lsq"
]  # the cases outside `_learnable_default` are marked slow (the full grid runs with -m slow)


@pytest.mark.parametrize("spec, layout, mode, factor", _LEARNABLE_CASES)
def test_learnable_values_and_grads_match_torch(spec, layout, mode, factor):
  axis, shape = LAYOUTS[layout]
  spec = dataclasses.replace(spec, axis=axis)
  grad_factor = _learnable_grad_factors(spec, shape)[factor]
  n = shape[axis] if spec.per_channel else 1
  zero_point_sets = ([_learnable_zero_points(spec, n, seed=3)] if spec.per_channel
                     else [np.float32(z) for z in FRACTIONAL_ZERO_POINTS])
  for j, zp in enumerate(zero_point_sets):
    for i, kind in enumerate(LEARNABLE_KINDS):
      data_kind = {"ties": "ties_even_zp"}.get(kind, kind)
      x, scale, zp_ = make_case(data_kind, spec, shape, seed=1000 * j + 10 * spec.bits + i,
                                zero_point=zp)
      zp_ = zp_.astype(np.float32)
      g = np.random.default_rng(j + i).normal(size=shape).astype(np.float32)
      y, dx, dscale, dzero = _LEARNABLE[mode](jnp.asarray(x), jnp.asarray(g),
                                              jnp.asarray(scale), jnp.asarray(zp_), spec,
                                              grad_factor)
      t_y, t_dx, t_dscale, t_dzero = torch_learnable(x, g, scale, zp_, spec, grad_factor)
      what = f"{kind}, Z={zp_}"
      _assert_same_bits(y, t_y, f"{what}: values", spec, x)
      _assert_same_bits(dx, t_dx, f"{what}: dx", spec, x, signed_zeros=False)
      mag_scale, mag_zero = _term_magnitudes(x, g, scale, zp_, spec, grad_factor, t_dx != 0)
      _assert_sums_close(dscale, t_dscale, mag_scale, f"{what}: dscale", spec)
      _assert_sums_close(dzero, t_dzero, mag_zero, f"{what}: dzero_point", spec)
      assert np.any(t_dx == 0) or kind == "normal"


def test_learnable_per_element_gradients_match_torch():
  """The summands of dScale / dZeroPoint, one element at a time, bitwise up to the sign of
  zero (no summation, so no tolerance). Per-tensor on single elements (vmapped); per-channel
  with one element per channel."""
  spec = QuantSpec(bits=4, signed=True)
  rng = np.random.default_rng(11)
  scale = np.float32(0.0713)
  results = {}
  for zp in FRACTIONAL_ZERO_POINTS:
    zp = np.float32(zp)
    zb = int(grid_zero_point(zp, spec))
    # Half-points (and near ties) on and around both clamping boundaries, and far outside.
    k = np.concatenate([np.arange(spec.qmin - zb - 3, spec.qmax - zb + 3),
                        [spec.qmin - zb - 1, spec.qmax - zb] * 8])
    jitter = 1.0 + rng.uniform(-3e-7, 3e-7, size=k.shape)
    x = np.concatenate([((k + 0.5) * np.float64(scale) * jitter),
                        rng.normal(size=16) * 40 * scale]).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    # Per-tensor: vmap over the elements, each its own single-element tensor.
    per_tensor = jax.vmap(lambda xi, gi, zp=zp: _learnable(xi, gi, jnp.float32(scale),
                                                           jnp.float32(zp), spec, 0.37))
    y, dx, dscale, dzero = per_tensor(jnp.asarray(x), jnp.asarray(g))
    for i in range(x.size):
      t_y, t_dx, t_dscale, t_dzero = torch_learnable(x[i:i + 1], g[i:i + 1], scale, zp, spec,
                                                     0.37)
      results[("per_tensor", float(zp), i)] = (
          (y[i], t_y[0]), (dx[i], t_dx[0]), (dscale[i], t_dscale), (dzero[i], t_dzero))
    # Per-channel: one element per channel (shape (N, 1): torch's backward fails on 1-D
    # input, where it has no axis to reduce).
    pc = QuantSpec(bits=4, signed=True, axis=0)
    scales = np.full(x.shape, scale, np.float32)
    zps = np.full(x.shape, zp, np.float32)
    x2, g2 = x[:, None], g[:, None]
    y, dx, dscale, dzero = _learnable(jnp.asarray(x2), jnp.asarray(g2), jnp.asarray(scales),
                                      jnp.asarray(zps), pc, 0.37)
    t_y, t_dx, t_dscale, t_dzero = torch_learnable(x2, g2, scales, zps, pc, 0.37)
    for i in range(x.size):
      results[("per_channel", float(zp), i)] = (
          (y[i, 0], t_y[i, 0]), (dx[i, 0], t_dx[i, 0]), (dscale[i], t_dscale[i]),
          (dzero[i], t_dzero[i]))
  # Values bitwise; gradients bitwise up to the sign of zero (see _assert_same_bits).
  def same(a, b, is_value):
    a, b = np.float32(a), np.float32(b)
    if is_value:
      return cases.bits_of(a) == cases.bits_of(b)
    return cases.bits_of(a + np.float32(0)) == cases.bits_of(b + np.float32(0))

  bad = [(key, [(float(a), float(b)) for a, b in pairs]) for key, pairs in results.items()
         if not all(same(a, b, i == 0) for i, (a, b) in enumerate(pairs))]
  assert not bad, f"{len(bad)} of {len(results)} elements differ; first: {bad[:3]}"


def test_per_tensor_backward_zero_point_is_half_up_truncation_like_torch():
  """Z = 2.5: the forward uses rne(Z) = 2, torch's per-tensor backward trunc(Z + 0.5) = 3.
  x = -6.75 * S: forward rne(-6.75) + 2 = -5 < qmin = -4, clamped; backward
  rne(-6.75 + 3) = -4, in range, so the gradient passes (in torch and in qjax)."""
  spec = QuantSpec(bits=3, signed=True)  # [-4, 3]
  scale, zp = np.float32(0.25), np.float32(2.5)
  x = np.array([-6.75 * 0.25, -5.5 * 0.25, 1.75 * 0.25, 9.0], np.float32)
  g = np.ones(x.shape, np.float32)
  got = _learnable(jnp.asarray(x), jnp.asarray(g), jnp.float32(scale), jnp.float32(zp), spec, 1.0)
  expected = torch_learnable(x, g, scale, zp, spec, 1.0)
  for a, b in zip(got, expected, strict=True):
    np.testing.assert_array_equal(cases.bits_of(a), cases.bits_of(b))
  assert expected[0][0] == (-4 - 2) * 0.25  # forward clamped with Z = 2
  assert expected[1][0] == 1.0  # ... yet torch passes the gradient
