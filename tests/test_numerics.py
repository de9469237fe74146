"""Core tests of `qjax.numerics`: properties, the documented rounding, jit/eager agreement with
a NumPy reference (`tests/support/reference.py`), the error policy, and PyTorch-compatible constants.

No PyTorch here; `tests/test_numerics_torch.py` holds the parity tests against torch.
"""

from __future__ import annotations

import re
from fractions import Fraction

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from support import cases
import qjax
from support import reference as ref
from qjax import QParams
from qjax import QuantSpec

F32 = np.float32
EPS32 = float(np.finfo(np.float32).eps)        # 2^-23: one float32 ulp at 1.0

# Round trip |dequantize(quantize(x)) - x| <= S/2 + ROUND_TRIP_SLACK_EPS * EPS32 * M.
# Exactly, the error is at most S/2. In float32, fl(1/S), fl(x * (1/S)), the add of Z (two-step
# form) and fl(S * (q - Z)) each round once, by at most 2^-24 relative to a quantity bounded by
# M = max(|x|, S|Z|, S|q - Z|): together <= 2.5 * EPS32 * M inside the grid. Values clamped at
# the grid's ends (x within half a step beyond it) also carry the rounding of the qparams,
# fl(hi - lo), fl(. / (qmax - qmin)) and fl(lo / S), bounded by 3 * EPS32 * max(|lo|, |hi|); for
# those M also includes |lo| and |hi|. 4 leaves a margin over both.
ROUND_TRIP_SLACK_EPS = 4.0

# qparams_from_minmax puts the grid's ends within half a step of the range's ends, up to the
# same float32 rounding of the qparams (see above), relative to max(|lo|, |hi|).
QPARAMS_SLACK_EPS = 4.0

SHAPE_1D = (37,)
SHAPE_2D = (6, 11)
GRID_SIZE = 2**16            # every level of every grid fits in 65536 entries
NEAR_TIE_N = 120_000         # elements in the rounding-form guards
NEAR_TIE_REL = 3e-7          # relative perturbation of the half-integers (a few float32 ulps)

# Each new spec costs its compilations, so the properties sample specs, while the spec space is
# covered exhaustively elsewhere: every spec's qparams and grid attributes here
# (test_spec_properties_match_reference_for_every_spec) and against torch, and quantize /
# dequantize / quantize_dequantize bit for bit against torch for every combination of the flags
# they see (signed, narrow_range, reduce_range) at 2, 4, 8, 9 and 16 bits in every layout
# (tests/test_numerics_torch.py). By default a few examples per property (with the explicit
# ones, every flag value and layout among them); 50 (the "ci" profile's count) with -m slow.
_HEALTH = dict(deadline=None, print_blob=True,
               suppress_health_check=[hypothesis.HealthCheck.too_slow])
SETTINGS = hypothesis.settings(max_examples=50, **_HEALTH)
QUICK_QUANTIZE = hypothesis.settings(max_examples=7, **_HEALTH)
QUICK_QPARAMS = hypothesis.settings(max_examples=16, **_HEALTH)




def grid_of(spec):
  return ref.spec_grid(spec)


def qparams_np(qp: QParams) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(qp.scale), np.asarray(qp.zero_point)




def assert_bitwise_equal(actual, expected, err_msg=""):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype, err_msg)
  assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
  if actual.dtype.kind == "f" or actual.dtype.name == "bfloat16":
    diff = cases.bits_of(actual) != cases.bits_of(expected)
  else:
    diff = actual != expected
  if np.any(diff):
    idx = np.argwhere(diff)[:5]
    raise AssertionError(f"{int(diff.sum())} of {diff.size} elements differ {err_msg}; first at "
                         f"{idx.tolist()}: got {actual[diff][:5]!r}, "
                         f"expected {expected[diff][:5]!r}")


def broadcast_np(v, spec, ndim):
  return ref.broadcast(np.asarray(v), spec.axis, ndim)


# ------------------------------------------------------------------------------------------
# Hypothesis strategies: fixed shapes, so that compilations are one per spec and shape.


@st.composite
def specs(draw, axes=(None, 0, -1)):
  bits = draw(st.integers(2, 16))
  reduce_range = draw(st.booleans()) if bits > 2 else False   # QuantSpec rejects bits=2
  return QuantSpec(bits=bits, signed=draw(st.booleans()), symmetric=draw(st.booleans()),
                   narrow_range=draw(st.booleans()), reduce_range=reduce_range,
                   axis=draw(st.sampled_from(axes)))


@st.composite
def spec_and_data(draw):
  """A spec and float32 data: (6, 11) when per-channel, (37,) or (6, 11) per-tensor."""
  spec = draw(specs())
  shape = SHAPE_2D if spec.per_channel else draw(st.sampled_from([SHAPE_1D, SHAPE_2D]))
  base = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
  exponent = draw(st.integers(-20, 20))
  return spec, (base * F32(2.0**exponent)).astype(np.float32)   # exact power-of-two scaling


@st.composite
def spec_and_range(draw):
  """A spec and min_val <= max_val: shape () per-tensor, (3,) per-channel."""
  spec = draw(specs())
  n = 3 if spec.per_channel else 1
  values = st.floats(-1e6, 1e6, width=32)
  a = np.array(draw(st.lists(values, min_size=n, max_size=n)), np.float32)
  b = np.array(draw(st.lists(values, min_size=n, max_size=n)), np.float32)
  lo, hi = np.minimum(a, b), np.maximum(a, b)
  if not spec.per_channel:
    lo, hi = lo.reshape(()), hi.reshape(())
  return spec, lo, hi


# ------------------------------------------------------------------------------------------
# 1. Properties.


def _check_quantize_properties(case):
  """Range and dtype, exact zero, saturation, grid round trip, error bound, qdq idempotence."""
  spec, x = case
  qmin, qmax = grid_of(spec)
  mn, mx = qjax.minmax(x, spec)
  qp = qjax.qparams_from_minmax(mn, mx, spec)
  scale, zp = qparams_np(qp)
  nd = x.ndim
  s_b = broadcast_np(scale, spec, nd).astype(np.float64)
  z_b = broadcast_np(zp, spec, nd).astype(np.int64)

  # Values in [qmin, qmax], dtype spec.storage_dtype.
  q = qjax.quantize(x, spec, qp)
  assert q.dtype == ref.spec_storage_dtype(spec) == spec.storage_dtype
  assert q.shape == x.shape
  qn = np.asarray(q).astype(np.int64)
  assert qn.min() >= qmin and qn.max() <= qmax, (qn.min(), qn.max(), qmin, qmax)

  # Far beyond the range: exactly qmin / qmax.
  far = F32(4.0 * float(np.max(np.abs(x))) + 1.0)
  sign = np.where(np.arange(x.size).reshape(x.shape) % 2 == 0, F32(1), F32(-1))
  q_far = np.asarray(qjax.quantize((sign * far).astype(np.float32), spec, qp))
  np.testing.assert_array_equal(q_far, np.where(sign > 0, qmax, qmin).astype(q_far.dtype))

  # 0.0 (and -0.0) is exact: quantizes to the zero point, which dequantizes to +0.0.
  z_full = np.broadcast_to(z_b, x.shape)
  for zero in (np.zeros(x.shape, np.float32), -np.zeros(x.shape, np.float32)):
    np.testing.assert_array_equal(np.asarray(qjax.quantize(zero, spec, qp)), z_full)
  back = np.asarray(qjax.dequantize(z_full.astype(spec.storage_dtype), spec, qp))
  assert_bitwise_equal(back, np.zeros(x.shape, np.float32), "dequantize(zero_point)")

  # In-range round trip: |dequantize(quantize(x)) - x| <= S/2 + slack (see the constant).
  x_hat = np.asarray(qjax.dequantize(q, spec, qp)).astype(np.float64)
  x64 = x.astype(np.float64)
  lo = broadcast_np(np.minimum(np.asarray(mn), 0), spec, nd).astype(np.float64)
  hi = broadcast_np(np.maximum(np.asarray(mx), 0), spec, nd).astype(np.float64)
  mag = np.maximum(np.maximum(np.abs(x64), s_b * np.abs(qn - z_b)), s_b * np.abs(z_b))
  saturated = (qn == qmin) | (qn == qmax)
  mag = np.where(saturated, np.maximum(mag, np.maximum(np.abs(lo), np.abs(hi))), mag)
  bound = s_b / 2 + ROUND_TRIP_SLACK_EPS * EPS32 * mag
  err = np.abs(x_hat - x64)
  assert np.all(err <= bound), (
      f"round trip error {err[err > bound][:5]} > bound {bound[err > bound][:5]} at "
      f"x={x[err > bound][:5]}, q={qn[err > bound][:5]}, scale={scale}, zero_point={zp}")

  # Every level of the grid survives quantize(dequantize(q)).
  levels = np.clip(np.arange(GRID_SIZE) + qmin, qmin, qmax).astype(spec.storage_dtype)
  if spec.axis is None:
    grid = levels
  elif spec.axis % nd == 0:
    grid = np.broadcast_to(levels, (x.shape[0], GRID_SIZE))
  else:
    grid = np.broadcast_to(levels[:, None], (GRID_SIZE, x.shape[-1]))
  grid = np.ascontiguousarray(grid)
  again = np.asarray(qjax.quantize(qjax.dequantize(grid, spec, qp), spec, qp))
  assert_bitwise_equal(again, grid, "quantize(dequantize(grid))")

  # The fake-quant forward is idempotent, bit for bit.
  once = np.asarray(qjax.quantize_dequantize(x, spec, qp))
  twice = np.asarray(qjax.quantize_dequantize(once, spec, qp))
  assert_bitwise_equal(twice, once, "quantize_dequantize twice")


# Symmetric specs (unsigned and signed, per-tensor and per-channel) and 16 bits, which the
# default draws miss.
_SYMMETRIC_EXAMPLES = (
    (QuantSpec(bits=16, signed=False, symmetric=True),
     (np.linspace(-1, 1, 66, dtype=np.float32) ** 3 * F32(2.0**12)).reshape(SHAPE_2D)),
    (QuantSpec(bits=8, symmetric=True, narrow_range=True, axis=0),
     (np.cos(np.arange(66, dtype=np.float32)) * F32(2.0**-9)).reshape(SHAPE_2D)),
)


@QUICK_QUANTIZE
@hypothesis.example(_SYMMETRIC_EXAMPLES[0])
@hypothesis.example(_SYMMETRIC_EXAMPLES[1])
@hypothesis.given(spec_and_data())
def test_quantize_properties(case):
  _check_quantize_properties(case)


@pytest.mark.slow
@SETTINGS
@hypothesis.given(spec_and_data())
def test_quantize_properties_more_examples(case):
  _check_quantize_properties(case)


def _check_qparams_from_minmax_properties(case):
  """scale >= eps; zero point in range; symmetric => fixed zero point; affine => tight ends."""
  spec, mn, mx = case
  qmin, qmax = grid_of(spec)
  qp = qjax.qparams_from_minmax(mn, mx, spec)
  scale, zp = qparams_np(qp)
  assert scale.dtype == np.float32 and zp.dtype == np.int32
  assert scale.shape == zp.shape == mn.shape
  assert np.all(np.isfinite(scale)) and np.all(scale >= F32(qjax.FLOAT32_EPS)), scale
  assert np.all((zp >= qmin) & (zp <= qmax)), (zp, qmin, qmax)

  # Bit for bit the reference formula.
  ref_scale, ref_zp = ref.qparams_from_minmax(mn, mx, spec)
  assert_bitwise_equal(scale, ref_scale, "scale")
  np.testing.assert_array_equal(zp, ref_zp)

  s = scale.astype(np.float64)
  lo = np.minimum(mn, 0).astype(np.float64)
  hi = np.maximum(mx, 0).astype(np.float64)
  grid_lo = s * (qmin - zp.astype(np.float64))       # exact: 24-bit by 17-bit product
  grid_hi = s * (qmax - zp.astype(np.float64))
  slack = QPARAMS_SLACK_EPS * EPS32 * np.maximum(np.abs(lo), np.abs(hi))
  # The grid covers the (0-widened) range to within half a step.
  assert np.all(grid_lo <= lo + s / 2 + slack), (grid_lo, lo, s)
  assert np.all(grid_hi >= hi - s / 2 - slack), (grid_hi, hi, s)
  if spec.symmetric:
    np.testing.assert_array_equal(zp, spec.symmetric_zero_point)
    assert spec.symmetric_zero_point == ref.spec_symmetric_zero_point(spec)
  else:
    # Affine, scale not floored at eps: both ends of the range within half a step of the grid's.
    floored = scale == F32(qjax.FLOAT32_EPS)
    tight = (np.abs(grid_lo - lo) <= s / 2 + slack) & (np.abs(grid_hi - hi) <= s / 2 + slack)
    assert np.all(tight | floored), (grid_lo, lo, grid_hi, hi, s)


@QUICK_QPARAMS
@hypothesis.given(spec_and_range())
def test_qparams_from_minmax_properties(case):
  _check_qparams_from_minmax_properties(case)


@pytest.mark.slow
@SETTINGS
@hypothesis.given(spec_and_range())
def test_qparams_from_minmax_properties_more_examples(case):
  _check_qparams_from_minmax_properties(case)


def test_spec_properties_match_reference_for_every_spec():
  """qmin, qmax, storage dtype and symmetric zero point over the whole spec space."""
  count = 0
  for spec in cases.all_specs():
    assert (spec.qmin, spec.qmax) == ref.spec_grid(spec), spec
    assert spec.storage_dtype == ref.spec_storage_dtype(spec), spec
    assert spec.symmetric_zero_point == ref.spec_symmetric_zero_point(spec), spec
    assert spec.effective_bits == spec.bits - int(spec.reduce_range)
    assert spec.qmin <= spec.symmetric_zero_point <= spec.qmax, spec
    assert not spec.per_channel
    info = np.iinfo(spec.storage_dtype)
    assert info.min <= spec.qmin and spec.qmax <= info.max, spec
    count += 1
  assert count == 15 * 16 - 8


# ------------------------------------------------------------------------------------------
# 2. The rounding forms, bit for bit, on adversarial near-ties.


def _round_to_f32_exact(r: Fraction) -> np.float32:
  """The float32 nearest to the rational r, ties to even (normal range)."""
  if r == 0:
    return F32(0.0)
  mag = abs(r)
  e = mag.numerator.bit_length() - mag.denominator.bit_length()
  if Fraction(2) ** e > mag:
    e -= 1
  ulp = Fraction(2) ** (e - 23)
  n = round(mag / ulp)                     # Fraction.__round__: half to even
  value = float(n * ulp)                   # n <= 2^24: exact in float64 and float32
  return F32(value if r > 0 else -value)


def test_reference_fma_is_exact():
  """reference.fma_f32 is fl32(a * b + c) with one rounding, checked with exact rationals."""
  rng = np.random.default_rng(7)
  scale = F32(0.0123457)
  inv = F32(1) / scale
  for z, (k_lo, k_hi) in ((0, (-128, 127)), (128, (-128, 127)), (30000, (-30000, 35535))):
    x = ref.near_ties(rng, scale, k_lo, k_hi, (1500,), rel=NEAR_TIE_REL)
    # Also products far below Z's ulp (the sum needs > 53 bits), and exact ties.
    x[:300] = (rng.uniform(-1, 1, 300) * 2.0 ** rng.integers(-60, 0, 300)).astype(np.float32)
    got = ref.fma_f32(x, inv, F32(z))
    expected = np.array([_round_to_f32_exact(Fraction(float(v)) * Fraction(float(inv)) + z)
                         for v in x], np.float32)
    assert_bitwise_equal(got, expected, f"fma_f32 with Z={z}")


_NT_SCALES = np.array([0.0123457, 0.3, 1.7e-3, 2.9, 0.0700013, 4.4e-5], np.float32)


def near_tie_case(spec: QuantSpec, zero_point, seed: int = 0):
  """(x, scale, zero_point) with x / S near k + 1/2 for k that keeps q inside the grid."""
  rng = np.random.default_rng(seed)
  qmin, qmax = grid_of(spec)
  if spec.axis is None:
    scale, zp, shape, axis = _NT_SCALES[0], np.int32(zero_point), (NEAR_TIE_N,), None
  else:
    c = len(_NT_SCALES)
    shape = (c, NEAR_TIE_N // c) if spec.axis == 0 else (NEAR_TIE_N // c, c)
    scale, axis = _NT_SCALES, spec.axis
    zp = np.clip(np.asarray(zero_point, np.int32) + np.arange(c, dtype=np.int32) * 7 - 17,
                 qmin, qmax).astype(np.int32)
  # k in [qmin - Z, qmax - Z - 1]: k + 1/2 + Z stays inside the grid (per channel, the
  # narrowest channel's window).
  zmax, zmin = int(np.max(zp)), int(np.min(zp))
  x = ref.near_ties(rng, scale, qmin - zmin, qmax - zmax, shape, axis=axis, rel=NEAR_TIE_REL)
  return x, np.asarray(scale, np.float32), zp


def forms(x, scale, zp, spec):
  qmin, qmax = grid_of(spec)
  dt = ref.spec_storage_dtype(spec)
  return {
      "fused": ref.quantize_fused(x, scale, zp, qmin, qmax, dt, axis=spec.axis),
      "two_step": ref.quantize_two_step(x, scale, zp, qmin, qmax, dt, axis=spec.axis),
      "qdq": ref.quantize_qdq_int(x, scale, zp, qmin, qmax, dt, axis=spec.axis),
  }


ROUNDING_CASES = {
    # name: (spec, zero point, documented form)
    "per_tensor_int8": (QuantSpec(bits=8), -3, "fused"),
    "per_tensor_uint8": (QuantSpec(bits=8, signed=False), 128, "fused"),
    "per_tensor_uint4": (QuantSpec(bits=4, signed=False), 5, "fused"),
    "per_tensor_int16": (QuantSpec(bits=16), 1234, "two_step"),
    "per_tensor_uint12": (QuantSpec(bits=12, signed=False), 2047, "two_step"),
    "per_channel_int8_axis0": (QuantSpec(bits=8, axis=0), 3, "two_step"),
    "per_channel_uint8_axis-1": (QuantSpec(bits=8, signed=False, axis=-1), 128, "two_step"),
}


@pytest.mark.parametrize("name", sorted(ROUNDING_CASES))
def test_rounding_forms_differ_on_near_ties(name):
  """The guard has teeth: on its data the three forms disagree with one another."""
  spec, z, _ = ROUNDING_CASES[name]
  x, scale, zp = near_tie_case(spec, z)
  f = forms(x, scale, zp, spec)
  assert x.size >= 100_000
  for a, b in (("fused", "two_step"), ("fused", "qdq"), ("two_step", "qdq")):
    differ = int(np.sum(f[a] != f[b]))
    assert differ >= 100, f"{a} and {b} differ on only {differ} of {x.size} elements"
  # ... and each differs from the others by at most one level.
  for a, b in (("fused", "two_step"), ("fused", "qdq")):
    assert np.max(np.abs(f[a].astype(np.int64) - f[b].astype(np.int64))) == 1


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(ROUNDING_CASES))
def test_quantize_rounds_as_documented(name, jit):
  """quantize: fma form per-tensor <= 8 bits, product-then-add form per-channel or > 8 bits."""
  spec, z, form = ROUNDING_CASES[name]
  x, scale, zp = near_tie_case(spec, z)
  fn = jax.jit(qjax.quantize, static_argnames="spec") if jit else qjax.quantize
  got = np.asarray(fn(x, spec, QParams(jnp.asarray(scale), jnp.asarray(zp))))
  f = forms(x, scale, zp, spec)
  matches = {k: int(np.sum(got == v)) for k, v in f.items()}
  assert_bitwise_equal(got, f[form], f"(documented form {form!r}; elements equal to each "
                       f"form: {matches} of {x.size})")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(ROUNDING_CASES))
def test_quantize_dequantize_rounds_as_documented(name, jit):
  """quantize_dequantize: S * (clamp(rne(fl(x * (1/S))) + Z) - Z), no FMA anywhere."""
  spec, z, _ = ROUNDING_CASES[name]
  x, scale, zp = near_tie_case(spec, z)
  fn = jax.jit(qjax.quantize_dequantize, static_argnames="spec") if jit else (
      qjax.quantize_dequantize)
  got = np.asarray(fn(x, spec, QParams(jnp.asarray(scale), jnp.asarray(zp))))
  assert_bitwise_equal(got, ref.quantize_dequantize(x, spec, scale, zp))


# ------------------------------------------------------------------------------------------
# 3. chex variants: jit and eager agree with the reference, bit for bit.

VARIANT_SPECS = {
    "int8": QuantSpec(bits=8),
    "uint8_symmetric": QuantSpec(bits=8, signed=False, symmetric=True),
    "int4_narrow_symmetric_axis0": QuantSpec(bits=4, symmetric=True, narrow_range=True, axis=0),
    "uint7_reduce_axis-1": QuantSpec(bits=7, signed=False, reduce_range=True, axis=-1),
    "int16_axis-1": QuantSpec(bits=16, axis=-1),
    "uint12_symmetric_narrow": QuantSpec(bits=12, signed=False, symmetric=True,
                                         narrow_range=True),
}
_VARIANT_PARAMS = [(name, spec) for name, spec in VARIANT_SPECS.items()]
# Half-precision inputs: by default each dtype with one spec (every spec once); every pair with
# -m slow (NumericsDtypePairsTest).
_DTYPE_SPECS = ("int8", "int4_narrow_symmetric_axis0", "int16_axis-1")
_DTYPE_PAIRS = [(f"{d}_{n}", d, n)
                for d in ("float16", "bfloat16", "float32") for n in _DTYPE_SPECS]
_DTYPE_DEFAULT = [p for i, p in enumerate(_DTYPE_PAIRS) if i % 4 == 0]
_DTYPE_REST = [p for i, p in enumerate(_DTYPE_PAIRS) if i % 4 != 0]


def variant_data(spec, seed=0):
  """Random data (no engineered ties) and reference qparams for it."""
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=SHAPE_2D) * 3 + 0.5).astype(np.float32)
  mn, mx = ref.minmax(x, spec)
  scale, zp = ref.qparams_from_minmax(mn, mx, spec)
  return x, mn, mx, scale, zp


def _spec_props(x, spec):
  """Uses QuantSpec's properties inside a traced computation."""
  q = jnp.clip(jnp.round(x * 40.0), spec.qmin, spec.qmax).astype(spec.storage_dtype)
  return (q, jnp.full((), spec.symmetric_zero_point, jnp.int32),
          jnp.asarray([spec.qmin, spec.qmax, spec.effective_bits], jnp.int32))


class NumericsVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_VARIANT_PARAMS)
  def test_spec_properties(self, spec):
    x, *_ = variant_data(spec)
    q, sym_zp, grid = self.variant(_spec_props, static_argnames=("spec",))(x, spec=spec)
    qmin, qmax = grid_of(spec)
    expected_q = np.clip(np.rint(x * F32(40.0)), qmin, qmax).astype(ref.spec_storage_dtype(spec))
    assert_bitwise_equal(q, expected_q)
    self.assertEqual(int(sym_zp), ref.spec_symmetric_zero_point(spec))
    np.testing.assert_array_equal(grid, [qmin, qmax, spec.bits - int(spec.reduce_range)])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_VARIANT_PARAMS)
  def test_minmax(self, spec):
    x, mn, mx, *_ = variant_data(spec)
    got_mn, got_mx = self.variant(qjax.minmax, static_argnames=("spec",))(x, spec=spec)
    assert_bitwise_equal(got_mn, mn)
    assert_bitwise_equal(got_mx, mx)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_VARIANT_PARAMS)
  def test_qparams_from_minmax(self, spec):
    _, mn, mx, scale, zp = variant_data(spec)
    qp = self.variant(qjax.qparams_from_minmax, static_argnames=("spec",))(mn, mx, spec=spec)
    self.assertIsInstance(qp, QParams)
    assert_bitwise_equal(qp.scale, scale)
    assert_bitwise_equal(qp.zero_point, zp)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_VARIANT_PARAMS)
  def test_quantize(self, spec):
    x, _, _, scale, zp = variant_data(spec)
    q = self.variant(qjax.quantize, static_argnames=("spec",))(x, spec=spec,
                                                               qparams=QParams(scale, zp))
    assert_bitwise_equal(q, ref.quantize(x, spec, scale, zp))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_VARIANT_PARAMS)
  def test_dequantize(self, spec):
    x, _, _, scale, zp = variant_data(spec)
    q = ref.quantize(x, spec, scale, zp)
    fn = self.variant(qjax.dequantize, static_argnames=("spec", "dtype"))
    assert_bitwise_equal(fn(q, spec=spec, qparams=QParams(scale, zp)),
                         ref.dequantize(q, spec, scale, zp))
    assert_bitwise_equal(fn(q, spec=spec, qparams=QParams(scale, zp), dtype=jnp.bfloat16),
                         ref.dequantize(q, spec, scale, zp, dtype=jnp.bfloat16))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_VARIANT_PARAMS)
  def test_quantize_dequantize(self, spec):
    x, _, _, scale, zp = variant_data(spec)
    out = self.variant(qjax.quantize_dequantize, static_argnames=("spec",))(
        x, spec=spec, qparams=QParams(scale, zp))
    assert_bitwise_equal(out, ref.quantize_dequantize(x, spec, scale, zp))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_DTYPE_DEFAULT)
  def test_quantize_dequantize_preserves_dtype(self, dtype, spec_name):
    _check_preserves_dtype(self, dtype, spec_name)


def _check_preserves_dtype(test, dtype, spec_name):
  spec = VARIANT_SPECS[spec_name]
  dtype = jnp.dtype(dtype)
  x32, _, _, scale, zp = variant_data(spec, seed=1)
  x = x32.astype(dtype)
  out = test.variant(qjax.quantize_dequantize, static_argnames=("spec",))(
      x, spec=spec, qparams=QParams(scale, zp))
  test.assertEqual(out.dtype, dtype)
  assert_bitwise_equal(out, ref.quantize_dequantize(x, spec, scale, zp))
  # quantize accepts the same inputs (computed in float32).
  q = test.variant(qjax.quantize, static_argnames=("spec",))(x, spec=spec,
                                                             qparams=QParams(scale, zp))
  assert_bitwise_equal(q, ref.quantize(x.astype(np.float32), spec, scale, zp))


@pytest.mark.slow
class NumericsDtypePairsTest(chex.TestCase):
  """The pairs of dtype and spec that NumericsVariantsTest leaves out."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_DTYPE_REST)
  def test_quantize_dequantize_preserves_dtype(self, dtype, spec_name):
    _check_preserves_dtype(self, dtype, spec_name)


# No recompilation on the second call.

_PUBLIC_CALLS = {
    "minmax": lambda spec, x, s, z: qjax.minmax(x, spec),
    "qparams_from_minmax": lambda spec, x, s, z: qjax.qparams_from_minmax(
        jnp.min(x, axis=1) if spec.per_channel else jnp.min(x),
        jnp.max(x, axis=1) if spec.per_channel else jnp.max(x), spec),
    "quantize": lambda spec, x, s, z: qjax.quantize(x, spec, QParams(s, z)),
    "dequantize": lambda spec, x, s, z: qjax.dequantize(
        qjax.quantize(x, spec, QParams(s, z)), spec, QParams(s, z)),
    "quantize_dequantize": lambda spec, x, s, z: qjax.quantize_dequantize(x, spec, QParams(s, z)),
}


def _call_args(spec, seed, shape=SHAPE_2D):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  n = shape[0] if spec.per_channel else None
  qshape = () if n is None else (n,)
  s = rng.uniform(0.01, 0.1, size=qshape).astype(np.float32)
  z = rng.integers(-5, 5, size=qshape).astype(np.int32)
  return x, s, z


@pytest.mark.parametrize("spec", [QuantSpec(bits=8), QuantSpec(bits=12, axis=0)],
                         ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("name", sorted(_PUBLIC_CALLS))
def test_jit_traces_once(name, spec):
  chex.clear_trace_counter()
  call = _PUBLIC_CALLS[name]
  fn = jax.jit(chex.assert_max_traces(lambda x, s, z: call(spec, x, s, z), n=1))
  for seed in (0, 1, 2):
    jax.block_until_ready(fn(*_call_args(spec, seed)))


# A shape no other test uses, so that the first calls compile. (Clearing jax's caches instead
# would make every later test in the process compile its programs again.)
_FRESH_SHAPE = (5, 13)


@pytest.mark.parametrize("spec", [QuantSpec(bits=6, signed=False), QuantSpec(bits=10, axis=0)],
                         ids=["per_tensor", "per_channel"])
def test_eager_second_call_compiles_nothing(spec):
  """Eager calls compile once per spec and shape; new values reuse the executables."""
  with cases.CompileCounter() as first:
    for call in _PUBLIC_CALLS.values():
      jax.block_until_ready(call(spec, *_call_args(spec, 0, _FRESH_SHAPE)))
  assert first.count > 0          # the counter sees compilations (a fresh spec compiles)
  with cases.CompileCounter() as second:
    for call in _PUBLIC_CALLS.values():
      jax.block_until_ready(call(spec, *_call_args(spec, 1, _FRESH_SHAPE)))
  assert second.count == 0


# ------------------------------------------------------------------------------------------
# 4. Bad input: errors name the argument, what was given and what is accepted.


@pytest.mark.parametrize("bits", [1, 17, 0, -3])
def test_spec_bits_out_of_range(bits):
  with pytest.raises(ValueError, match=rf"QuantSpec\.bits must be in \[2, 16\]; got {bits}\."):
    QuantSpec(bits=bits)


@pytest.mark.parametrize("bits, type_name", [(8.0, "float"), (True, "bool"), ("8", "str")])
def test_spec_bits_not_int(bits, type_name):
  with pytest.raises(TypeError, match=rf"QuantSpec\.bits must be an int in \[2, 16\]; got "
                     rf"{re.escape(repr(bits))} of type {type_name}\."):
    QuantSpec(bits=bits)


@pytest.mark.parametrize("flag", ["signed", "symmetric", "narrow_range", "reduce_range"])
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_spec_flags_not_bool(flag, value):
  with pytest.raises(TypeError, match=rf"QuantSpec\.{flag} must be True or False; got "
                     rf"{re.escape(repr(value))}\."):
    QuantSpec(**{flag: value})


def test_spec_accepts_numpy_scalars():
  spec = QuantSpec(bits=np.int64(4), signed=np.bool_(False), axis=np.int32(-1))
  assert spec == QuantSpec(bits=4, signed=False, axis=-1)
  assert type(spec.bits) is int and type(spec.signed) is bool and type(spec.axis) is int
  assert hash(spec) == hash(QuantSpec(bits=4, signed=False, axis=-1))


@pytest.mark.parametrize("axis", [1.0, True, "0", (0,)])
def test_spec_axis_not_int(axis):
  with pytest.raises(TypeError, match=r"QuantSpec\.axis must be None \(per-tensor\) or an int "
                     rf"\(per-channel\); got {re.escape(repr(axis))}\."):
    QuantSpec(axis=axis)


def test_spec_reduce_range_needs_three_bits():
  with pytest.raises(ValueError, match=r"QuantSpec\.reduce_range drops one bit and needs "
                     r"bits >= 3; got bits=2\."):
    QuantSpec(bits=2, reduce_range=True)
  assert QuantSpec(bits=3, reduce_range=True).qmax == 1


_SPEC = QuantSpec(bits=8)
_QP = QParams(jnp.float32(0.1), jnp.int32(0))
_FLOAT_MSG = r"x must be a floating-point array \(float16, bfloat16, float32, float64\); got "


@pytest.mark.parametrize("dtype", ["int8", "int32", "uint8", "bool"])
@pytest.mark.parametrize("fn", ["quantize", "quantize_dequantize", "minmax"])
def test_integer_input_names_x(fn, dtype):
  x = np.zeros(SHAPE_1D, dtype)
  args = (x, _SPEC) if fn == "minmax" else (x, _SPEC, _QP)
  with pytest.raises(TypeError, match=_FLOAT_MSG + rf"dtype {dtype}\."):
    getattr(qjax, fn)(*args)


def test_integer_input_hint_points_to_dequantize():
  with pytest.raises(TypeError, match=r"integer arrays are already quantized: dequantize them"):
    qjax.quantize(np.zeros(3, np.int8), _SPEC, _QP)
  with pytest.raises(TypeError, match=_FLOAT_MSG + r"bool\."):
    qjax.quantize(True, _SPEC, _QP)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_float_input_to_dequantize_names_q(dtype):
  with pytest.raises(TypeError, match=r"q must be an integer array \(int8, uint8, int16, uint16, "
                     rf"int32\); got dtype {dtype}\. \(dequantize maps integers"):
    qjax.dequantize(jnp.zeros(SHAPE_1D, dtype), _SPEC, _QP)


def test_dequantize_dtype_must_be_floating():
  with pytest.raises(TypeError, match=r"dequantize: dtype must be a floating dtype; got int32\."):
    qjax.dequantize(jnp.zeros(3, jnp.int8), _SPEC, _QP, dtype=jnp.int32)


def test_min_greater_than_max():
  with pytest.raises(ValueError, match=r"qparams_from_minmax: min_val must be <= max_val; got "
                     r"min_val=array\(2\.\d*, dtype=float32\), max_val=array\(1\.\d*"):
    qjax.qparams_from_minmax(2.0, 1.0, _SPEC)
  with pytest.raises(ValueError, match=r"min_val must be <= max_val at channel\(s\) \[1, 2\]"):
    qjax.qparams_from_minmax(np.array([0, 3, 5], np.float32), np.array([1, 2, 4], np.float32),
                             QuantSpec(axis=0))


@pytest.mark.parametrize("mn, mx", [(np.nan, 1.0), (-1.0, np.nan), (-np.inf, 1.0),
                                    (-1.0, np.inf), (np.nan, np.nan)])
def test_non_finite_range(mn, mx):
  with pytest.raises(ValueError, match=r"qparams_from_minmax: min_val and max_val must be "
                     r"finite; got min_val=array\(.*\), max_val=array\(.*\)\.$") as info:
    qjax.qparams_from_minmax(np.float32(mn), np.float32(mx), _SPEC)
  assert "has seen no data" not in str(info.value)


def test_empty_observer_range_hint():
  with pytest.raises(ValueError, match=r"must be finite; got min_val=array\(inf.*max_val="
                     r"array\(-inf.*\(inf, -inf\) is the state of an observer that has seen no "
                     r"data\."):
    qjax.qparams_from_minmax(np.float32(np.inf), np.float32(-np.inf), _SPEC)
  with pytest.raises(ValueError, match=r"has seen no data"):
    qjax.qparams_from_minmax(np.array([0, np.inf], np.float32),
                             np.array([1, -np.inf], np.float32), QuantSpec(axis=0))


def test_mismatched_min_max_shapes():
  with pytest.raises(ValueError, match=r"qparams_from_minmax: min_val has shape \(3,\) but "
                     r"max_val has shape \(4,\); they must match\."):
    qjax.qparams_from_minmax(np.zeros(3, np.float32), np.ones(4, np.float32), QuantSpec(axis=0))


def test_per_tensor_spec_with_vector_range():
  with pytest.raises(ValueError, match=r"a per-tensor spec needs scalar min_val / max_val "
                     r"\(shape \(\) or \(1,\)\); got shape \(3,\)\. For per-channel ranges set "
                     r"QuantSpec\(axis=\.\.\.\)\."):
    qjax.qparams_from_minmax(np.zeros(3, np.float32), np.ones(3, np.float32), _SPEC)
  qp = qjax.qparams_from_minmax(np.zeros(1, np.float32), np.ones(1, np.float32), _SPEC)
  assert qp.scale.shape == ()


def test_per_channel_spec_with_scalar_range():
  with pytest.raises(ValueError, match=r"a per-channel spec \(axis=0\) needs 1-D min_val / "
                     r"max_val with one entry per channel; got shape \(\)\."):
    qjax.qparams_from_minmax(0.0, 1.0, QuantSpec(axis=0))


def test_range_must_be_float():
  with pytest.raises(TypeError, match=r"min_val must be a floating-point array .*got dtype "
                     r"int32"):
    qjax.qparams_from_minmax(np.zeros(3, np.int32), np.ones(3, np.float32), QuantSpec(axis=0))
  qp = qjax.qparams_from_minmax(-1, 3, QuantSpec(bits=8, signed=False))   # Python ints are fine
  assert (float(qp.scale), int(qp.zero_point)) == (0.01568627543747425, 64)


@pytest.mark.parametrize("axis", [2, -3])
@pytest.mark.parametrize("fn", ["minmax", "quantize", "dequantize", "quantize_dequantize"])
def test_axis_out_of_range(fn, axis):
  spec = QuantSpec(axis=axis)
  qp = QParams(jnp.full((6,), 0.1, jnp.float32), jnp.zeros((6,), jnp.int32))
  x = np.zeros(SHAPE_2D, np.int8 if fn == "dequantize" else np.float32)
  args = (x, spec) if fn == "minmax" else (x, spec, qp)
  with pytest.raises(ValueError, match=rf"spec\.axis={axis} is out of range for an array of "
                     r"rank 2 \(shape \(6, 11\)\); accepted values are -2\.\.1\."):
    getattr(qjax, fn)(*args)


def test_per_channel_spec_on_a_scalar_says_to_use_per_tensor():
  with pytest.raises(ValueError, match=r"spec\.axis=-1 needs an array with at least one axis; "
                                       r"got a scalar .* per-tensor spec \(axis=None\)"):
    qjax.minmax(np.float32(1.0), QuantSpec(axis=-1))


@pytest.mark.parametrize("fn", ["quantize", "dequantize", "quantize_dequantize"])
@pytest.mark.parametrize("field", ["scale", "zero_point"])
def test_per_channel_qparams_length_mismatch(fn, field):
  spec = QuantSpec(axis=0)
  qp = {"scale": jnp.full((6,), 0.1, jnp.float32), "zero_point": jnp.zeros((6,), jnp.int32)}
  qp[field] = qp[field][:5]
  x = np.zeros(SHAPE_2D, np.int8 if fn == "dequantize" else np.float32)
  with pytest.raises(ValueError, match=rf"{fn}: qparams\.{field} has shape \(5,\), but the spec "
                     r"is per-channel along axis 0 and the data has shape \(6, 11\), so it must "
                     r"have shape \(6,\)\."):
    getattr(qjax, fn)(x, spec, QParams(**qp))


def test_per_tensor_spec_with_vector_qparams():
  qp = QParams(jnp.full((6,), 0.1, jnp.float32), jnp.zeros((6,), jnp.int32))
  with pytest.raises(ValueError, match=r"quantize: qparams\.scale has shape \(6,\), but the spec "
                     r"is per-tensor .* must have shape \(\) \(or \(1,\)\)\."):
    qjax.quantize(np.zeros(SHAPE_2D, np.float32), _SPEC, qp)


@pytest.mark.parametrize("zero_point", [np.int64(2**40), 2**40, np.uint32(2**31)], ids=str)
def test_zero_point_wider_than_int32_is_refused_not_wrapped(zero_point):
  """2^40 would wrap to 0 in JAX's int32 (x64 off) and pass the grid check."""
  with pytest.raises(ValueError, match=r"qparams\.zero_point must fit int32; got values in \["):
    qjax.quantize(np.zeros(SHAPE_1D, np.float32), _SPEC, QParams(jnp.float32(0.1), zero_point))


@pytest.mark.parametrize("fn", ["quantize", "dequantize", "quantize_dequantize"])
def test_float_zero_point(fn):
  x = np.zeros(SHAPE_1D, np.int8 if fn == "dequantize" else np.float32)
  with pytest.raises(TypeError, match=r"qparams\.zero_point must be an integer array .*got "
                     r"dtype float32\. Learnable \(float\) zero points go through "
                     r"qjax\.ste\.fake_quant_learnable\."):
    getattr(qjax, fn)(x, _SPEC, QParams(jnp.float32(0.1), jnp.float32(3.0)))


def test_integer_scale():
  with pytest.raises(TypeError, match=r"qparams\.scale must be a floating-point array .*got "
                     r"dtype int32"):
    qjax.quantize(np.zeros(3, np.float32), _SPEC, QParams(jnp.int32(1), jnp.int32(0)))


@pytest.mark.parametrize("scale", [0.0, -0.5, np.nan, np.inf, -0.0])
@pytest.mark.parametrize("fn", ["quantize", "dequantize", "quantize_dequantize"])
def test_bad_scale(fn, scale):
  x = np.zeros(SHAPE_1D, np.int8 if fn == "dequantize" else np.float32)
  with pytest.raises(ValueError, match=rf"{fn}: qparams\.scale must be finite and > 0; got "):
    getattr(qjax, fn)(x, _SPEC, QParams(jnp.float32(scale), jnp.int32(0)))


def test_bad_per_channel_scale_names_the_bad_values():
  scale = jnp.asarray([0.1, 0.0, 0.2, -1.0, 0.1, 0.1], jnp.float32)
  with pytest.raises(ValueError, match=r"must be finite and > 0; got array\(\[ ?0\.,\s+-1\.\]"):
    qjax.quantize(np.zeros(SHAPE_2D, np.float32), QuantSpec(axis=0),
                  QParams(scale, jnp.zeros(6, jnp.int32)))


@pytest.mark.parametrize("spec, zero_point", [
    (QuantSpec(bits=8), 128), (QuantSpec(bits=8), -129),
    (QuantSpec(bits=8, signed=False), -1), (QuantSpec(bits=8, signed=False), 256),
    (QuantSpec(bits=8, narrow_range=True), -128), (QuantSpec(bits=4, signed=False), 16),
])
@pytest.mark.parametrize("fn", ["quantize", "dequantize", "quantize_dequantize"])
def test_zero_point_out_of_range(fn, spec, zero_point):
  x = np.zeros(SHAPE_1D, np.int8 if fn == "dequantize" else np.float32)
  if fn == "dequantize":
    x = x.astype(spec.storage_dtype) + np.asarray(spec.qmin, spec.storage_dtype)
  with pytest.raises(ValueError, match=rf"{fn}: qparams\.zero_point must lie in \[qmin, qmax\] "
                     rf"= \[{spec.qmin}, {spec.qmax}\] for QuantSpec\(.*\); got "
                     rf"{re.escape(repr(np.asarray(zero_point, np.int32)))}"):
    getattr(qjax, fn)(x, spec, QParams(jnp.float32(0.1), jnp.int32(zero_point)))


def test_nan_in_x_eager_quantize():
  x = np.array([0.0, np.nan, 1.0, np.nan], np.float32)
  with pytest.raises(ValueError, match=r"quantize: x contains 2 NaN value\(s\) \(shape \(4,\)\); "
                     r"NaN has no integer representation\. Under jax\.jit NaN maps to the zero "
                     r"point\."):
    qjax.quantize(x, _SPEC, _QP)


@pytest.mark.parametrize("spec, bad", [(QuantSpec(bits=8), 200), (QuantSpec(bits=4), -9),
                                       (QuantSpec(bits=8, narrow_range=True), -128),
                                       (QuantSpec(bits=8, signed=False, reduce_range=True), 128)])
def test_dequantize_outside_grid(spec, bad):
  q = np.array([0, bad, 1], np.int32)
  lo, hi = min(0, bad), max(1, bad)
  with pytest.raises(ValueError, match=rf"dequantize: q holds values in \[{lo}, {hi}\], outside "
                     rf"the grid \[qmin, qmax\] = \[{spec.qmin}, {spec.qmax}\] of QuantSpec\("):
    qjax.dequantize(q, spec, QParams(jnp.float32(0.1), jnp.int32(max(spec.qmin, 0))))


def test_minmax_empty():
  with pytest.raises(ValueError, match=r"minmax: x is empty \(shape \(0, 3\)\); a range needs at "
                     r"least one value\."):
    qjax.minmax(np.zeros((0, 3), np.float32), _SPEC)


def test_spec_must_be_quantspec():
  with pytest.raises(TypeError, match=r"qparams_from_minmax: spec must be a qjax\.QuantSpec; got "
                     r"dict\."):
    qjax.qparams_from_minmax(0.0, 1.0, {"bits": 8})
  with pytest.raises(TypeError, match=r"quantize: spec must be a qjax\.QuantSpec; got dict\."):
    qjax.quantize(np.zeros(3, np.float32), {"bits": 8}, _QP)
  with pytest.raises(TypeError, match=r"quantize: qparams must be a QParams\(scale, zero_point\) "
                     r"pair; got float\."):
    qjax.quantize(np.zeros(3, np.float32), _SPEC, 0.1)


@pytest.mark.parametrize("eps", [0.0, -1e-3, np.inf, True, "1e-7"])
def test_bad_eps(eps):
  with pytest.raises(ValueError, match=rf"eps must be a positive finite float; got "
                     rf"{re.escape(repr(eps))}\."):
    qjax.qparams_from_minmax(0.0, 1.0, _SPEC, eps=eps)


@pytest.mark.parametrize("eps, kind", [(1e-45, "subnormal"), (1e-39, "subnormal"),
                                       (1e-46, "0"), (1e39, "inf")])
def test_eps_must_be_a_normal_float32(eps, kind):
  with pytest.raises(ValueError, match=rf"qparams_from_minmax: eps must be a normal float32 "
                     rf"number, in \[np\.finfo\(np\.float32\)\.tiny, .*got "
                     rf"{re.escape(repr(eps))}, which is {kind} in float32"):
    qjax.qparams_from_minmax(0.0, 0.0, _SPEC, eps=eps)


def test_smallest_normal_eps_is_accepted():
  tiny = float(np.finfo(np.float32).tiny)
  qp = qjax.qparams_from_minmax(0.0, 0.0, QuantSpec(bits=8, signed=False), eps=tiny)
  assert float(qp.scale) == tiny and int(qp.zero_point) == 0


def test_range_too_wide_for_float32():
  edge = np.float32(np.finfo(np.float32).max / 2)
  assert np.asarray(qjax.numerics.range_fits_float32(
      jnp.asarray([-edge, -3e38, 1.0, -np.inf], jnp.float32),
      jnp.asarray([edge, 3e38, 3e38, 0.0], jnp.float32))).tolist() == [True, False, True, False]
  with pytest.raises(ValueError, match=r"qparams_from_minmax: the range \[array\(-3\.e\+38.*is "
                     r"too wide for float32: max - min .* overflows"):
    qjax.qparams_from_minmax(-3e38, 3e38, QuantSpec(bits=8))
  with pytest.raises(ValueError, match=r"too wide for float32 at channel\(s\) \[1\]"):
    qjax.qparams_from_minmax(np.float32([-1, -3e38]), np.float32([1, 3e38]), QuantSpec(axis=0))
  # A symmetric scale, max(-lo, hi) / 127.5, exists for any finite range.
  qp = qjax.qparams_from_minmax(-3e38, 3e38, QuantSpec(bits=8, symmetric=True))
  assert np.isfinite(float(qp.scale))


# What the functions do instead under jax.jit, where value checks cannot raise.


_QDQ_FNS = {"quantize": qjax.quantize, "quantize_dequantize": qjax.quantize_dequantize,
            "dequantize": qjax.dequantize, "fake_quant": qjax.ste.fake_quant}


@pytest.mark.parametrize("fn_name", list(_QDQ_FNS))
@pytest.mark.parametrize("spec", [QuantSpec(bits=8, signed=False), QuantSpec(bits=12),
                                  QuantSpec(bits=4, signed=False, axis=0)], ids=str)
@pytest.mark.parametrize("bad", ["zero_scale", "minus_zero_scale", "negative_scale",
                                 "zero_point_above", "zero_point_below"])
def test_invalid_qparams_under_jit_give_the_nan_scale_result(fn_name, spec, bad):
  """Eagerly invalid qparams raise; under jit they give exactly what a NaN scale gives (the
  zero point, clamped to the grid, from quantize; NaN from the float functions), in the
  channels they affect only."""
  fn = _QDQ_FNS[fn_name]
  n = 3 if spec.per_channel else None
  x = np.linspace(-4, 4, 3 * 9, dtype=np.float32).reshape(3, 9)
  if fn_name == "dequantize":
    x = (np.arange(27).reshape(3, 9) % (spec.qmax - spec.qmin + 1) + spec.qmin).astype(
        spec.storage_dtype)
  good_scale, good_zp = np.float32(0.25), np.int32(spec.qmin + 2)
  scale, zp = np.full(n or (), good_scale), np.full(n or (), good_zp)
  bad_scale, bad_zp = {
      "zero_scale": (0.0, good_zp), "minus_zero_scale": (-0.0, good_zp),
      "negative_scale": (-0.25, good_zp), "zero_point_above": (good_scale, spec.qmax + 1),
      "zero_point_below": (good_scale, spec.qmin - 1)}[bad]
  at = 1 if n else ()
  scale[at], zp[at] = bad_scale, bad_zp
  scale, zp = scale.astype(np.float32), zp.astype(np.int32)
  qparams = QParams(jnp.asarray(scale), jnp.asarray(zp))
  with pytest.raises(ValueError, match=r"qparams\.(scale must be finite and > 0|zero_point "
                     r"must lie in \[qmin, qmax\])"):
    fn(x, spec, qparams)
  jitted = jax.jit(fn, static_argnums=1)
  got = np.asarray(jitted(x, spec, qparams))
  nan_scale = scale.copy()
  nan_scale[at] = np.nan
  expected = np.asarray(jitted(x, spec, QParams(jnp.asarray(nan_scale), jnp.asarray(zp))))
  assert_bitwise_equal(got, expected)
  if fn_name == "quantize":
    assert np.all(got[at] == np.clip(bad_zp, spec.qmin, spec.qmax))
  else:
    assert np.all(np.isnan(got[at]))
  if n:  # the other channels are untouched
    good = np.asarray(jitted(x, spec, QParams(jnp.full(n, good_scale), jnp.full(n, good_zp))))
    assert_bitwise_equal(got[[0, 2]], good[[0, 2]])


@pytest.mark.parametrize("spec", [QuantSpec(bits=8), QuantSpec(bits=8, symmetric=True),
                                  QuantSpec(bits=5, signed=False)], ids=str)
def test_qparams_under_jit_poison_bad_ranges_with_nan(spec):
  fn = jax.jit(qjax.qparams_from_minmax, static_argnames="spec")
  mn = np.array([-1, 2, np.nan, -np.inf, -1, np.inf, 0], np.float32)
  mx = np.array([1, 1, 1, 1, np.inf, -np.inf, np.nan], np.float32)
  per_channel = QuantSpec(bits=spec.bits, signed=spec.signed, symmetric=spec.symmetric, axis=0)
  qp = fn(mn, mx, spec=per_channel)
  scale = np.asarray(qp.scale)
  assert np.isfinite(scale[0]) and scale[0] > 0
  assert np.all(np.isnan(scale[1:])), scale
  for lo, hi in zip(mn[1:], mx[1:]):
    assert np.isnan(float(fn(lo, hi, spec=spec).scale)), (lo, hi)
  # ... and the NaN scale poisons what is computed from it.
  x = np.linspace(-1, 1, 7, dtype=np.float32)
  bad = fn(np.float32(2), np.float32(1), spec=spec)
  assert np.all(np.isnan(jax.jit(qjax.quantize_dequantize, static_argnames="spec")(
      x, spec, bad)))
  assert np.all(np.isnan(jax.jit(qjax.dequantize, static_argnames="spec")(
      np.zeros(7, spec.storage_dtype) + np.asarray(spec.qmax, spec.storage_dtype), spec, bad)))


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, signed=False), QuantSpec(bits=12),
                                  QuantSpec(bits=8, axis=0)], ids=str)
def test_quantize_under_jit_maps_nan_to_zero_point_and_saturates_inf(spec):
  x = np.array([[np.nan, np.inf, -np.inf, 0.25, -np.nan, 1e30, -1e30]] * 2, np.float32)
  n = 2 if spec.per_channel else None
  scale = np.float32(0.1) if n is None else np.array([0.1, 0.2], np.float32)
  z = np.int32(3) if n is None else np.array([3, 4], np.int32)
  z_b = broadcast_np(z, spec, 2)
  q = np.asarray(jax.jit(qjax.quantize, static_argnames="spec")(x, spec, QParams(scale, z)))
  expected = np.broadcast_to(z_b, x.shape).copy()
  expected[:, [1, 5]], expected[:, [2, 6]] = spec.qmax, spec.qmin
  expected[:, 3] = ref.quantize(x[:, 3:4], spec, scale, z)[:, 0]
  np.testing.assert_array_equal(q, expected.astype(spec.storage_dtype))
  # Eagerly, infinities saturate the same way (only NaN raises).
  np.testing.assert_array_equal(qjax.quantize(x[:, 1:4], spec, QParams(scale, z)), q[:, 1:4])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("spec", [QuantSpec(bits=8, signed=False), QuantSpec(bits=12),
                                  QuantSpec(bits=8, axis=0)], ids=str)
def test_quantize_dequantize_keeps_nan_and_saturates_inf(spec, jit):
  x = np.array([[np.nan, np.inf, -np.inf, 0.25]] * 2, np.float32)
  n = 2 if spec.per_channel else None
  scale = np.float32(0.1) if n is None else np.array([0.1, 0.2], np.float32)
  z = np.int32(3) if n is None else np.array([3, 4], np.int32)
  fn = jax.jit(qjax.quantize_dequantize, static_argnames="spec") if jit else (
      qjax.quantize_dequantize)
  out = np.asarray(fn(x, spec, QParams(scale, z)))
  s_b, z_b = broadcast_np(scale, spec, 2), broadcast_np(z, spec, 2).astype(np.float32)
  assert np.all(np.isnan(out[:, 0]))
  np.testing.assert_array_equal(out[:, 1:2], (F32(spec.qmax) - z_b) * s_b)
  np.testing.assert_array_equal(out[:, 2:3], (F32(spec.qmin) - z_b) * s_b)
  assert_bitwise_equal(out, ref.quantize_dequantize(x, spec, scale, z))


# ------------------------------------------------------------------------------------------
# 5. PyTorch-compatible constants (no torch needed).


@pytest.mark.parametrize("kwargs, qmin, qmax, dtype", [
    (dict(bits=8), -128, 127, "int8"),
    (dict(bits=8, signed=False), 0, 255, "uint8"),
    (dict(bits=8, reduce_range=True), -64, 63, "int8"),
    (dict(bits=8, signed=False, reduce_range=True), 0, 127, "uint8"),
    (dict(bits=8, narrow_range=True), -127, 127, "int8"),
    (dict(bits=8, signed=False, narrow_range=True), 1, 255, "uint8"),
    (dict(bits=8, narrow_range=True, reduce_range=True), -63, 63, "int8"),
    (dict(bits=8, signed=False, narrow_range=True, reduce_range=True), 1, 127, "uint8"),
    (dict(bits=16), -32768, 32767, "int16"),
    (dict(bits=16, signed=False), 0, 65535, "uint16"),
    (dict(bits=4), -8, 7, "int8"),
    (dict(bits=4, signed=False), 0, 15, "uint8"),
    (dict(bits=9), -256, 255, "int16"),
    (dict(bits=9, signed=False), 0, 511, "uint16"),
    (dict(bits=2), -2, 1, "int8"),
    (dict(bits=2, signed=False, narrow_range=True), 1, 3, "uint8"),
])
def test_pytorch_grids_and_storage(kwargs, qmin, qmax, dtype):
  spec = QuantSpec(**kwargs)
  assert (spec.qmin, spec.qmax) == (qmin, qmax)
  assert spec.storage_dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("kwargs, zero_point", [
    (dict(bits=8, signed=False), 128),                 # torch's default quint8 symmetric
    (dict(bits=16, signed=False), 32768),
    (dict(bits=8), 0), (dict(bits=16), 0), (dict(bits=4, narrow_range=True), 0),
    (dict(bits=8, signed=False, reduce_range=True), 63),    # (0 + 127) // 2
    (dict(bits=8, signed=False, narrow_range=True), 128),   # (1 + 255) // 2
    (dict(bits=8, signed=False, narrow_range=True, reduce_range=True), 64),   # (1 + 127) // 2
    (dict(bits=16, signed=False, reduce_range=True), 16383),
    (dict(bits=4, signed=False), 7),                   # (0 + 15) // 2
    (dict(bits=12, signed=False), 2047),
    (dict(bits=2, signed=False), 1),
])
def test_pytorch_symmetric_zero_points(kwargs, zero_point):
  spec = QuantSpec(symmetric=True, **kwargs)
  assert spec.symmetric_zero_point == zero_point
  qp = qjax.qparams_from_minmax(-1.0, 2.0, spec)
  assert int(qp.zero_point) == zero_point


def test_float32_eps_is_pytorchs_default():
  assert qjax.FLOAT32_EPS == 2.0**-23  # torch.finfo(torch.float32).eps


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, signed=False),
                                  QuantSpec(bits=8, signed=True, symmetric=True, axis=-1)], ids=str)
def test_minmax_of_a_large_tensor_holding_nan_is_nan(spec):
  # (1100, 70): large enough for XLA:CPU to run jnp.min / jnp.max in kernels that drop NaN.
  x = np.random.default_rng(0).normal(size=(1100, 70)).astype(np.float32)
  x[-1, -1] = np.nan
  axis = None if spec.axis is None else 0
  for fn in (qjax.minmax, jax.jit(qjax.minmax, static_argnums=1)):
    lo, hi = fn(x, spec)
    np.testing.assert_array_equal(np.asarray(lo), np.min(x, axis=axis))
    np.testing.assert_array_equal(np.asarray(hi), np.max(x, axis=axis))


def test_value_checks_never_ask_a_tracer_for_its_value(monkeypatch):
  """Traced qparams, ranges and data pass the value checks unread: asking a tracer raises an
  error whose message scans the trace so far, which made a long traced program (hundreds of
  fake quantizations) quadratic to trace."""
  asked = []
  for error in (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    def init(self, *args, _init=error.__init__, **kwargs):
      asked.append(type(self).__name__)
      _init(self, *args, **kwargs)
    monkeypatch.setattr(error, "__init__", init)
  from qjax import observers  # pylint: disable=import-outside-toplevel
  from qjax.integer import kernels  # pylint: disable=import-outside-toplevel
  spec, per_channel = QuantSpec(bits=8, signed=True), QuantSpec(bits=8, signed=True, axis=1)
  u8 = QuantSpec(bits=8, signed=False)
  observer = observers.MovingAverageMinMaxObserver(spec=per_channel)

  def program(x, s, z, sc, zc, lo, hi):
    q = qjax.quantize(x, spec, QParams(s, z))
    state = observer.update(observer.init(x.shape), x)
    return (qjax.ste.fake_quant(x, spec, QParams(s, z)), qjax.dequantize(q, spec, QParams(s, z)),
            qjax.quantize_dequantize(x, per_channel, QParams(sc, zc)),
            qjax.qparams_from_minmax(lo, hi, spec), qjax.minmax(x, per_channel),
            observer.qparams(state),
            kernels.dequantize_rows(q, s, z, None), kernels.quantize_input(x, u8, s, z))

  args = (jnp.ones((4, 3)), jnp.float32(0.1), jnp.int32(3), jnp.full((3,), 0.1, jnp.float32),
          jnp.zeros((3,), jnp.int32), jnp.float32(-1.0), jnp.float32(1.0))
  jax.jit(program).trace(*args)
  assert asked == []
  with pytest.raises(ValueError, match="scale"):  # concrete values are still checked
    qjax.quantize(jnp.ones(3), spec, QParams(jnp.float32(-1.0), jnp.int32(0)))
