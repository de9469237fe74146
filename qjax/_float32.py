"""Exact float32 arithmetic under XLA: rounding as PyTorch's CPU kernels round.

PyTorch's CPU kernels round every float32 operation on its own, except the multiply-adds
that their C++ spells (or GCC contracts) as an FMA, and they do some arithmetic in float64
(Python floats, `torch.cumsum`'s accumulator, fbgemm's choice of qparams). XLA promises
neither: it contracts a * b + c into a fused multiply-add (one rounding instead of two),
rewrites a / b as a * (1 / b) when b is a constant or a broadcast scalar (off by an ulp for
~70 % of inputs) and a / sqrt(b) as a * rsqrt(b) (for about a third), and JAX runs without
float64 by default. The helpers below make a result independent of what XLA does.

Keeping XLA's rewrites out:

  * `rounded(x)` is the identity as a select XLA cannot see through: a product kept behind
    it is rounded before the add that follows it, and a / rounded(sqrt(b)) stays a division.
  * `uncontractible(product, factor)` keeps a product's rounding the same way with an XOR
    guarded by one of its factors: cheaper where that factor is per-channel, but only sound
    for a factor that XLA cannot prove is not NaN.
  * `exact_div` divides by a full-shaped divisor behind an optimization barrier, which XLA
    cannot turn into a multiplication by a reciprocal.

Error-free transformations (Knuth, Dekker) give the rounding error of an operation
as a float32 number, exactly: `two_sum` (a + b = s + e), `split` (v = hi + lo with halves of
12 significant bits, so that a product of two halves is exact) and `two_prod`
(a * b = p + e, built from split halves, so it needs no FMA). On top of them:

  * `fma` rounds a * b + c once, whether or not XLA contracts anything (round to odd).
  * Double-float pairs hi + lo (`dd_mul`, `dd_div`, `f64_to_f32`) carry ~48 of float64's 53
    bits, for the quantities torch computes in float64.
  * `sign_of_sum`, `dd_div_rounded` and `fusible_div` decide a correctly rounded result by
    exact comparisons with the midpoints next to an estimate (`round_between`).

Bit-level stand-ins for ldexp, frexp and division (`pow2`, `ldexp`, `exponent`,
`reciprocal_estimate`, `fusible_div`) use only multiplies, adds and integer operations:
XLA:CPU fuses those into every consumer, whereas it will not duplicate an "expensive" divide
into several consumers, and each extra fusion costs ~0.7 us a call.

Exactness assumes round-to-nearest-even and no overflow; XLA:CPU flushes subnormals to zero,
so a claim holds where no intermediate is subnormal (each helper states its range). This
module imports nothing from qjax: every other module may build on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_F32 = jnp.float32


# ------------------------------------------------------------------------------------------
# Keeping XLA's rewrites out.


def rounded(x: jax.Array) -> jax.Array:
  """x, rounded to its dtype before the next operation uses it (NaN stays NaN).

  where(isnan(x), NaN, x) is x, but XLA does not simplify the select away, so the operation
  that produced x keeps its own rounding: rounded(a * b) + c is two roundings, not an FMA,
  and a / rounded(sqrt(b)) a true division, not a * rsqrt(b). The guard is computed from x
  itself; one computed from an operand that XLA can prove is not NaN (a constant, an integer
  converted to float) would be dropped. Any NaN comes out as the canonical quiet NaN.
  """
  return jnp.where(jnp.isnan(x), jnp.asarray(np.nan, x.dtype), x)


def uncontractible(product: jax.Array, factor: jax.Array) -> jax.Array:
  """`product`, bit for bit, in a form XLA cannot fuse into a following add.

  The product's bits are XOR-ed with isnan(factor): 0 for any usable factor, and a NaN
  factor makes the product NaN anyway. XLA cannot prove that zero, so the multiply keeps its
  own rounding (an optimization barrier would not do: XLA removes it before code generation).
  With a per-channel factor the guard costs one test per channel instead of one per element,
  which makes this ~10 % faster than `rounded` in a quantize kernel. `factor` must be a
  float that XLA cannot prove is not NaN: with a constant or an integer converted to float
  it drops the guard and contracts; use `rounded` there.
  """
  opaque_zero = jnp.isnan(factor).astype(jnp.int32)
  bits = lax.bitcast_convert_type(product, jnp.int32) ^ opaque_zero
  return lax.bitcast_convert_type(bits, jnp.float32)


def exact_div(numerator: jax.Array, denominator: jax.Array | float) -> jax.Array:
  """numerator / denominator, correctly rounded; `denominator` a scalar (Python or array)
  or an array of numerator's shape.

  XLA rewrites division by a constant or by a broadcast scalar into multiplication by its
  reciprocal, which is off by one ulp for about 70 % of inputs. A full-shaped divisor behind
  an optimization barrier keeps the true division.
  """
  den = lax.optimization_barrier(jnp.full(numerator.shape, denominator, numerator.dtype))
  return numerator / den


def _min_max_pair(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]
                  ) -> tuple[jax.Array, jax.Array]:
  # One module-level reducer: eager calls cache their compiled reduce by this function's
  # identity (a lambda per call would compile a new one on every call).
  return lax.min(a[0], b[0]), lax.max(a[1], b[1])


def min_and_max(x: jax.Array, axes: tuple[int, ...] | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """(min, max) of float x over `axes` (None: all), with NaN propagating, on every backend.

    lo = min_{axes} x,   hi = max_{axes} x;   NaN in a slice makes both of its results NaN

  jnp.min / jnp.max do not promise that on XLA:CPU: it hands large min and max reductions
  (from ~4,096 elements, and per channel) to YNNPACK, whose kernels return the other
  operand on NaN, so a NaN in a big tensor vanishes from its range (jaxlib 0.10.2). One
  variadic reduce, (min, max) at once, stays in XLA's own loop, which propagates NaN; the
  optimization barrier keeps XLA from splitting it into two plain reductions (which it
  does when one result goes unused). Over all axes it is also about a third faster than two
  reductions (256 x 784: ~20 against ~33 us on 2 cores).

  Example:
    >>> x = jnp.arange(8192.0).at[5000].set(jnp.nan).reshape(2, 4096)
    >>> [v.tolist() for v in min_and_max(x, (1,))]
    [[0.0, nan], [4095.0, nan]]
  """
  axes = tuple(range(x.ndim)) if axes is None else tuple(axes)
  init = (np.asarray(np.inf, x.dtype), np.asarray(-np.inf, x.dtype))
  lo, hi = lax.optimization_barrier(lax.reduce((x, x), init, _min_max_pair, axes))
  return lo, hi


# ------------------------------------------------------------------------------------------
# Error-free transformations.


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth; any order of |a|, |b|).

  b' = s - a and a' = s - b' are what s kept of b and a; e = (a - a') + (b - b'). Exact
  barring overflow.

    >>> s, e = two_sum(jnp.float32(1.0), jnp.float32(2.0**-30))
    >>> float(s), float(e) == 2.0**-30
    (1.0, True)
  """
  s = a + b
  b_virtual = s - a
  a_virtual = s - b_virtual
  return s, (a - a_virtual) + (b - b_virtual)


def split(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """v = hi + lo exactly, each with at most 12 significant bits.

  hi is v with the 12 low bits of its 24-bit significand cleared (truncation: lo has v's
  sign), so hi_a * hi_b, hi_a * lo_b and lo_a * lo_b are exact float32 products. Bit
  masking cannot overflow, unlike Veltkamp's (4097 v - ((4097 v) - v)): any finite v splits,
  provided lo = v - hi is not subnormal (XLA:CPU flushes it).
  """
  hi = lax.bitcast_convert_type(lax.bitcast_convert_type(v, jnp.int32) & jnp.int32(~0xFFF), _F32)
  return hi, v - hi


def two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(p, e) with p = fl(a * b) and p + e = a * b exactly (Dekker; no FMA needed).

  With a and b `split`, e = ((a_hi b_hi - p) + a_hi b_lo + a_lo b_hi) + a_lo b_lo: every
  product and every partial sum is exact, so XLA contracting any of them changes nothing;
  p itself is `rounded`, kept out of any later contraction. Exact while no partial product
  overflows or underflows: e.g. |a b| < 2^127, |a|, |b| >= 2^-100 and |a b| >= 2^-78.
  """
  p = rounded(a * b)
  a_hi, a_lo = split(a)
  b_hi, b_lo = split(b)
  return p, (((a_hi * b_hi - p) + a_hi * b_lo) + a_lo * b_hi) + a_lo * b_lo


def fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
  """rne(a * b + c) with one rounding, in float32 arithmetic (Boldo & Melquiond, 2008).

  XLA contracts a * b + c into an FMA for most shapes but not all (a bias broadcast along a
  short minor axis defeats it), so an FMA that torch computes is emulated: a b = p + err
  exactly (`two_prod`), c + p = th + tl exactly (`two_sum`), v = tl + err rounded to odd
  (an inexact sum with an even last bit steps one ulp towards the exact value), then
  rne(th + v). Rounding v to odd keeps the information that a plain tl + err loses next to
  a rounding tie. Exact within `two_prod`'s range, barring overflow.

    >>> a, b, c = jnp.float32(1 + 2.0**-20), jnp.float32(1 - 2.0**-20), jnp.float32(2.0**24 + 2)
    >>> float(fma(a, b, c)) == 2.0**24 + 2     # a b + c = 2^24 + 3 - 2^-40 (p + tl + err)
    True
  """
  p, err = two_prod(a, b)
  th, tl = two_sum(c, p)
  v, v_err = two_sum(tl, err)
  bits = lax.bitcast_convert_type(v, jnp.int32)
  step = jnp.where((v_err > 0) == (v > 0), 1, -1)      # one ulp towards the exact value
  bits = jnp.where((v_err != 0) & ((bits & 1) == 0), bits + step, bits)
  return th + lax.bitcast_convert_type(bits, _F32)


def exact_times(c: Any, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """c * v as two exact terms (c hi, c lo) of `split`(v), for an integer-valued c of at most
  12 bits."""
  hi, lo = split(v)
  return c * hi, c * lo


# ------------------------------------------------------------------------------------------
# Double-float pairs: float64-like values as hi + lo.


def f64_to_f32(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """float32(hi + lo): the pair's exact sum rounded once (IEEE addition rounds once)."""
  return hi + lo


def dd_add(hi: jax.Array, lo: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The float64-like sum (hi + lo) + x for a float32 x, as a renormalised pair.

  hi + x = s + e exactly (`two_sum`); the low parts join e and `two_sum` renormalises: exact
  while the pair's value spans fewer than ~48 bits.

    >>> hi, lo = dd_add(jnp.float32(2.0**24), jnp.float32(0.0), jnp.float32(1.0))
    >>> float(hi) + float(lo) == 2.0**24 + 1
    True
  """
  s, e = two_sum(hi, x)
  return two_sum(s, e + lo)


def dd_mul(hi: jax.Array, lo: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The float64-like product (hi + lo) * k for a float32 integer k, as a pair.

  hi k = p + e exactly (`two_prod`); lo k adds the low part (exact while k and lo's
  significand fit 24 bits together, else one rounding ~2^-48 relative); `two_sum`
  renormalises.
  """
  p, e = two_prod(hi, k)
  return two_sum(p, e + lo * k)


def dd_div(hi: jax.Array, lo: jax.Array, k: float) -> tuple[jax.Array, jax.Array]:
  """The float64-like quotient (hi + lo) / k, as a pair: q + (remainder / k).

  q = fl(hi / k), its exact remainder hi - q k (`two_prod`) plus lo, divided by k.
  """
  q = exact_div(hi, k)
  p, e = two_prod(q, jnp.float32(k))
  remainder = ((hi - p) - e) + lo
  return two_sum(q, exact_div(remainder, k))


def sign_of_sum(*terms: jax.Array) -> jax.Array:
  """The exact sign (-1, 0, 1) of a sum of float32 terms, as float32.

  Shewchuk's grow-expansion keeps the sum as non-overlapping components of increasing
  magnitude (each `two_sum` error is a component); the sign of the sum is the sign of the
  largest non-zero one. Exact barring overflow.
  """
  comps: list[jax.Array] = []
  for t in terms:
    q, grown = t, []
    for c in comps:
      q, h = two_sum(q, c)
      grown.append(h)
    comps = grown + [q]
  sign = jnp.zeros((), _F32)
  for c in comps:
    sign = jnp.where(c != 0, jnp.sign(c), sign)
  return sign


def odd(v: jax.Array) -> jax.Array:
  """Whether the last significand bit of float32 v is 1 (a tie then rounds away from v)."""
  return (lax.bitcast_convert_type(v, jnp.int32) & 1) == 1


def round_between(q1: jax.Array, above_fn: Callable[[jax.Array], jax.Array],
                  below_fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """The correctly rounded quotient, given a positive estimate q1 within one ulp of it.

  above_fn(ulp_up) and below_fn(ulp_down) return values whose signs are those of the exact
  quotient minus the midpoints q1 + ulp_up / 2 and q1 - ulp_down / 2; ties go to even.
  """
  up = jnp.nextafter(q1, _F32(np.inf)) - q1
  down = q1 - jnp.nextafter(q1, _F32(0))
  above, below = above_fn(up), below_fn(down)
  go_up = (above > 0) | ((above == 0) & odd(q1))
  go_down = (below < 0) | ((below == 0) & odd(q1))
  return jnp.where(go_up, q1 + up, jnp.where(go_down, q1 - down, q1))


def dd_div_rounded(hi: jax.Array, lo: jax.Array, q: int) -> jax.Array:
  """fl32((hi + lo) / q), correctly rounded, for a positive exact pair hi + lo (hi =
  fl(hi + lo)) in about [2^-100, 2^100] and an integer 1 <= q < 4096.

  The estimate hi / q takes a Newton step on the exact remainder; the remainder at the
  estimate is exact (q times a `split` half is exact; Sterbenz), so the signs at the two
  neighbouring midpoints are exact: each bracket is exact, then one rounding.
  """
  inv_q, qf = _F32(1.0 / q), _F32(q)
  q1 = hi * inv_q
  p_hi, p_lo = exact_times(qf, q1)
  q1 = q1 + (((hi - p_hi) - p_lo) + lo) * inv_q   # a Newton step on the exact remainder
  p_hi, p_lo = exact_times(qf, q1)
  rem = (hi - p_hi) - p_lo                        # hi - q * q1, exact (Sterbenz)
  return round_between(q1, lambda up: (rem - qf * (up * 0.5)) + lo,
                       lambda down: (rem + qf * (down * 0.5)) + lo)


def fusible_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """fl32(num / den), correctly rounded, for positive normal num and den, without a divide.

  Built from multiplies and adds, which XLA:CPU fuses into every consumer. The estimate
  num * (1/den) is refined with the remainder num - den * q (den and q `split`, so every
  partial product is exact), then rounded by exact tests at the two neighbouring midpoints
  (`sign_of_sum`). Equal to num / den while num, den and the quotient lie within
  [2^-90, 2^90]; further out, partial products of the remainder underflow.
  """
  d_hi, d_lo = split(den)
  r = reciprocal_estimate(den)

  def minus_den_times(qv):
    q_hi, q_lo = split(qv)
    return (-(d_hi * q_hi), -(d_hi * q_lo), -(d_lo * q_hi), -(d_lo * q_lo))

  q0 = num * r
  rem = functools.reduce(lambda acc, t: acc + t, minus_den_times(q0), num)
  q1 = q0 + rem * r
  terms = minus_den_times(q1)
  return round_between(q1, lambda up: sign_of_sum(num, *terms, -(den * (up * 0.5))),
                       lambda down: sign_of_sum(num, *terms, den * (down * 0.5)))


# ------------------------------------------------------------------------------------------
# Bit-level stand-ins for ldexp, frexp and 1 / v.


def pow2(p: jax.Array) -> jax.Array:
  """2^p as float32, p an int32 in [-126, 127] (the exponent field set directly)."""
  return lax.bitcast_convert_type((p + 127) << 23, _F32)


def ldexp(v: jax.Array, p: jax.Array) -> jax.Array:
  """v * 2^p for p in [-252, 254], in two exact steps (each factor a normal power of 2)."""
  half = p >> 1
  return v * pow2(half) * pow2(p - half)


def exponent(v: jax.Array) -> jax.Array:
  """floor(log2(v)) for a positive normal float32 v (-127 for 0): its exponent field."""
  return ((lax.bitcast_convert_type(v, jnp.int32) >> 23) & 0xFF) - 127


def reciprocal_estimate(v: jax.Array) -> jax.Array:
  """~1/v with a relative error below 1.2e-7 (about an ulp; not correctly rounded), for v
  in [2^-126, 2^125).

  A bit-trick first guess (the exponent negated by an integer subtraction), then three
  Newton steps r <- r (2 - v r).
  """
  r = lax.bitcast_convert_type(jnp.int32(0x7EF311C3) - lax.bitcast_convert_type(v, jnp.int32),
                               _F32)
  for _ in range(3):
    r = r * (2.0 - v * r)
  return r
