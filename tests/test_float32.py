"""qjax._float32: the error-free transformations are exact, and each rounding helper rounds
as IEEE float32 does, checked against exact rational arithmetic (fractions.Fraction).

Inputs stay where the helpers promise exactness: XLA:CPU flushes subnormals to zero, so the
magnitudes are bounded away from float32's extremes. Each example is a batch of values, so
that every helper compiles once.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import _float32

F32 = np.float32
BATCH = 16
SETTINGS = hypothesis.settings(max_examples=40, deadline=None)


def _floats(limit: float, tiny: float, positive: bool = False) -> st.SearchStrategy:
  """BATCH float32 values in [-limit, limit] (or (0, limit]); magnitudes below `tiny` become 0
  (or `tiny`, when positive)."""
  lo = tiny if positive else -limit
  elements = st.floats(lo, limit, width=32, allow_subnormal=False)

  def clean(x: np.ndarray) -> np.ndarray:
    small = np.abs(x) < tiny
    return np.where(small, F32(tiny) if positive else F32(0), x).astype(F32)

  return hnp.arrays(F32, BATCH, elements=elements, fill=st.nothing()).map(clean)


def _exact(v) -> Fraction:
  return Fraction(float(v))


def _to_f32(r: Fraction) -> F32:
  """r rounded to the nearest float32, ties to even, without double rounding."""
  guess = F32(float(r))   # float64 then float32: at most one ulp off
  candidates = [np.nextafter(guess, F32(-np.inf)), guess, np.nextafter(guess, F32(np.inf))]
  return min(candidates, key=lambda c: (abs(_exact(c) - r), int(np.array(c).view(np.int32)) & 1))


@functools.cache
def _jit(name: str, **static):
  fn = getattr(_float32, name)
  return jax.jit(functools.partial(fn, **static) if static else fn)


# ------------------------------------------------------------------------------------------
# Error-free transformations.


@SETTINGS
@hypothesis.given(_floats(2.0**100, 2.0**-100), _floats(2.0**100, 2.0**-100))
def test_two_sum_is_error_free(a, b):
  s, e = map(np.asarray, _jit("two_sum")(a, b))
  np.testing.assert_array_equal(s, a + b)                  # s is the rounded sum
  for i in range(BATCH):
    assert _exact(s[i]) + _exact(e[i]) == _exact(a[i]) + _exact(b[i])


@SETTINGS
@hypothesis.given(_floats(2.0**127, 2.0**-100), _floats(2.0**40, 2.0**-40))
def test_split_halves_are_short_and_multiply_back_exactly(v, w):
  v_hi, v_lo = map(np.asarray, _jit("split")(v))     # any finite v: a bit mask cannot overflow
  w_hi, w_lo = map(np.asarray, _jit("split")(w))
  for i in range(BATCH):
    assert _exact(v_hi[i]) + _exact(v_lo[i]) == _exact(v[i])
    for half in (v_hi[i], v_lo[i]):           # at most 12 significant bits
      mantissa, _ = np.frexp(np.float64(half))
      assert (mantissa * 2**12) == np.round(mantissa * 2**12)
    if not 2.0**-80 <= abs(float(v[i]) * float(w[i])) <= 2.0**120:
      continue
    # Every product of two halves is a float32: the float32 product is exact.
    terms = [(x, y) for x in (v_hi[i], v_lo[i]) for y in (w_hi[i], w_lo[i])]
    for x, y in terms:
      assert _exact(F32(x * y)) == _exact(x) * _exact(y)
    assert sum(_exact(F32(x * y)) for x, y in terms) == _exact(v[i]) * _exact(w[i])


@SETTINGS
@hypothesis.given(_floats(2.0**39, 2.0**-39), _floats(2.0**39, 2.0**-39))
def test_two_prod_is_exact_against_float64(a, b):
  p, e = map(np.asarray, _jit("two_prod")(a, b))
  np.testing.assert_array_equal(p, a * b)                  # p is the rounded product
  exact = a.astype(np.float64) * b.astype(np.float64)      # 24 + 24 bits: exact in float64
  np.testing.assert_array_equal(p.astype(np.float64) + e.astype(np.float64), exact)
  np.testing.assert_array_equal(e.astype(np.float64), exact - p.astype(np.float64))


@st.composite
def _near_ties(draw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(a, b, c) with a * b just off a power of two and c + fl(a * b) on or next to a rounding
  tie of float32: where adding the two error terms in plain float32 rounds twice."""
  rows = []
  for _ in range(BATCH):
    a = F32(draw(st.integers(1, 2**12 - 1)) * 2.0 ** draw(st.integers(-20, 20)))
    nudge = draw(st.floats(-2.0**-22, 2.0**-22))
    b = F32(2.0 ** draw(st.integers(-5, 5)) / float(a) * (1 + nudge))
    p = F32(float(a) * float(b))
    c = F32(float(p) * (2**24 + 2 * draw(st.integers(0, 7)) + draw(st.sampled_from([0, 1]))))
    rows.append((a, b, c))
  a, b, c = (np.array(col, F32) for col in zip(*rows, strict=True))
  return a, b, c


def _check_fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
  got = np.asarray(_jit("fma")(a, b, c))
  want = [_to_f32(_exact(a[i]) * _exact(b[i]) + _exact(c[i])) for i in range(a.size)]
  np.testing.assert_array_equal(got, np.array(want, F32))


@SETTINGS
@hypothesis.given(_floats(2.0**39, 2.0**-39), _floats(2.0**39, 2.0**-39),
                  _floats(2.0**78, 2.0**-60))
def test_fma_rounds_once(a, b, c):
  _check_fma(a, b, c)


@SETTINGS
@hypothesis.given(_near_ties())
def test_fma_rounds_once_next_to_ties(abc):
  _check_fma(*abc)


def test_fma_where_summing_the_errors_in_float32_rounds_twice():
  # a b = 1 - 2^-40: p = 1, e = -2^-40; c + p = 2^24 + 3, a tie that rounds to 2^24 + 4.
  # The exact sum lies just below the tie: 2^24 + 2. fl(t + e) = fl(-1 - 2^-40) = -1 would
  # bring the tie back and round it up.
  a, b, c = (np.array([v], F32) for v in (1 + 2**-20, 1 - 2**-20, 2**24 + 2))
  np.testing.assert_array_equal(np.asarray(_jit("fma")(a, b, c)), np.array([2**24 + 2], F32))


# ------------------------------------------------------------------------------------------
# Division.


@functools.cache
def _div_by_constant(scalar: float):
  """x / scalar with the divisor a compile-time constant, compiled once per scalar."""
  return jax.jit(lambda x: _float32.exact_div(x, scalar))


@SETTINGS
@hypothesis.given(_floats(2.0**60, 2.0**-60), _floats(2.0**60, 2.0**-60, positive=True),
                  st.sampled_from([3.0, 7.0, 10.0, 255.0, 0.1]))
def test_exact_div_is_float64_division_rounded_to_float32(num, den, scalar):
  # 53 >= 2 * 24 + 2: float64's quotient rounded to float32 is the correctly rounded one.
  want = (num.astype(np.float64) / den.astype(np.float64)).astype(F32)
  np.testing.assert_array_equal(np.asarray(_jit("exact_div")(num, den)), want)
  # A scalar divisor: the case XLA would otherwise turn into a multiplication.
  by_scalar = _div_by_constant(scalar)(num)
  want = (num.astype(np.float64) / np.float64(F32(scalar))).astype(F32)
  np.testing.assert_array_equal(np.asarray(by_scalar), want)


@SETTINGS
@hypothesis.given(_floats(2.0**45, 2.0**-45, positive=True),
                  _floats(2.0**45, 2.0**-45, positive=True))
def test_fusible_div_equals_division(num, den):
  np.testing.assert_array_equal(np.asarray(_jit("fusible_div")(num, den)), num / den)


@SETTINGS
@hypothesis.given(_floats(2.0**60, 2.0**-60, positive=True),
                  _floats(2.0**60, 2.0**-60, positive=True), st.sampled_from([3, 127, 255, 4095]))
def test_dd_div_rounded_is_correctly_rounded(x, y, q):
  hi, lo = map(np.asarray, _jit("two_sum")(x, y))
  got = np.asarray(_jit("dd_div_rounded", q=q)(hi, lo))
  want = [_to_f32((_exact(hi[i]) + _exact(lo[i])) / q) for i in range(BATCH)]
  np.testing.assert_array_equal(got, np.array(want, F32))


# ------------------------------------------------------------------------------------------
# Double-float pairs and exact signs.


@SETTINGS
@hypothesis.given(_floats(2.0**60, 2.0**-60), _floats(2.0**60, 2.0**-60),
                  st.integers(1, 4096))
def test_double_float_pairs_carry_float64_precision(x, y, k):
  hi, lo = _jit("two_sum")(x, -y)                       # x - y exactly, as a pair
  exact = [_exact(x[i]) - _exact(y[i]) for i in range(BATCH)]
  for name, arg, want in [("dd_div", float(k), [v / k for v in exact]),
                          ("dd_mul", jnp.full((BATCH,), k, jnp.float32), [v * k for v in exact])]:
    fn = getattr(_float32, name)
    p_hi, p_lo = map(np.asarray, jax.jit(fn, static_argnums=(2,) if name == "dd_div" else ())(
        hi, lo, arg))
    f32 = np.asarray(_jit("f64_to_f32")(p_hi, p_lo))
    for i in range(BATCH):
      got = _exact(p_hi[i]) + _exact(p_lo[i])
      assert abs(got - want[i]) <= abs(want[i]) * Fraction(1, 2**46), name
      assert f32[i] == F32(p_hi[i] + p_lo[i])             # one rounding of the pair's sum


@SETTINGS
@hypothesis.given(st.lists(_floats(2.0**60, 2.0**-60), min_size=1, max_size=5))
def test_sign_of_sum_is_exact(terms):
  sign = np.asarray(jax.jit(_float32.sign_of_sum)(*terms))
  for i in range(BATCH):
    total = sum(_exact(t[i]) for t in terms)
    assert sign[i] == (total > 0) - (total < 0)


# ------------------------------------------------------------------------------------------
# Keeping XLA's rewrites out, and the bit-level stand-ins.


@jax.jit
def _rounded_product_plus(a, b, c):
  return _float32.rounded(a * b) + c


@jax.jit
def _uncontractible_product_plus(a, b, c):
  return _float32.uncontractible(a * b, b) + c


@jax.jit
def _over_rounded_sqrt(a, v):
  return a / _float32.rounded(jnp.sqrt(v))


@SETTINGS
@hypothesis.given(_floats(2.0**20, 2.0**-20), _floats(2.0**20, 2.0**-20),
                  _floats(2.0**40, 2.0**-40), _floats(2.0**40, 2.0**-40, positive=True))
def test_guards_keep_each_operation_rounded(a, b, c, v):
  two_roundings = (a * b) + c                              # NumPy rounds each operation
  for guarded in (_rounded_product_plus, _uncontractible_product_plus):
    np.testing.assert_array_equal(np.asarray(guarded(a, b, c)), two_roundings)
  quotient = _over_rounded_sqrt(a, v)
  np.testing.assert_array_equal(np.asarray(quotient), a / np.sqrt(v))


def test_rounded_and_uncontractible_keep_values_and_nan():
  x = np.array([0.0, -0.0, 1.5, -np.inf, np.inf, np.nan, 3.4028235e38], F32)
  for out in (_jit("rounded")(x), _jit("uncontractible")(x, np.ones_like(x))):
    out = np.asarray(out)
    np.testing.assert_array_equal(out.view(np.uint32)[:5], x.view(np.uint32)[:5])
    assert np.isnan(out[5]) and out[6] == x[6]


@pytest.mark.parametrize("lo,hi", [(-126, -1), (0, 124)])
def test_bit_level_stand_ins(lo, hi):
  rng = np.random.default_rng(lo + 200)
  exps = rng.integers(lo, hi + 1, 4096).astype(np.int32)
  v = (rng.uniform(1, 2, exps.size) * 2.0**exps).astype(F32)
  np.testing.assert_array_equal(np.asarray(_jit("exponent")(v)), exps)
  np.testing.assert_array_equal(np.asarray(_jit("pow2")(exps)), np.ldexp(F32(1), exps))
  shifts = rng.integers(-100, 101, exps.size).astype(np.int32)
  scaled = np.ldexp(v.astype(np.float64), shifts)
  normal = (np.abs(scaled) >= 2.0**-126) & (np.abs(scaled) < 2.0**128)
  got = np.asarray(_jit("ldexp")(v, shifts))
  np.testing.assert_array_equal(got[normal], scaled[normal].astype(F32))
  r = np.asarray(_jit("reciprocal_estimate")(v)).astype(np.float64)
  assert np.max(np.abs(r * v - 1)) < 1.2e-7


@pytest.mark.parametrize("shape, axes", [((256, 784), None), ((784, 100), (0,)), ((1100, 70), (0,)),
                                         ((6, 4096), (1,))])
def test_min_and_max_propagate_nan_on_large_tensors(shape, axes):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  x.reshape(-1)[-1] = np.nan
  want_lo = np.min(x, axis=axes)
  want_hi = np.max(x, axis=axes)
  lo, hi = jax.jit(lambda x: _float32.min_and_max(x, axes))(x)
  np.testing.assert_array_equal(np.asarray(lo), want_lo)
  np.testing.assert_array_equal(np.asarray(hi), want_hi)
  # One result alone (XLA would split the reduce and hand the half to a kernel that drops NaN).
  np.testing.assert_array_equal(jax.jit(lambda x: _float32.min_and_max(x, axes)[0])(x), want_lo)
  np.testing.assert_array_equal(jax.jit(lambda x: _float32.min_and_max(x, axes)[1])(x), want_hi)
