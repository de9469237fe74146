"""Exact float32 arithmetic: what fbgemm computes in float64, reproduced without float64.

JAX runs without float64 by default; `qjax.dynamic` needs fbgemm's float64 choice of
activation qparams bit for bit. These helpers (Dekker splits, two-sums, the exact sign of a
sum, a correctly rounded division and an exactly emulated FMA) give those results in float32.
Every product below has at most 24 significant bits, so XLA contracting one into an FMA
changes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax import numerics

_F32 = jnp.float32


def _split(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """v = hi + lo exactly, each with at most 12 significant bits."""
  hi = lax.bitcast_convert_type(lax.bitcast_convert_type(v, jnp.int32) & jnp.int32(~0xFFF), _F32)
  return hi, v - hi


def _split_const(v: float) -> tuple[float, float]:
  hi = (np.array(v, np.float32).view(np.int32) & np.int32(~0xFFF)).view(np.float32)
  return float(hi), float(np.float32(v) - hi)


def _times(c: Any, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """c * v as two exact terms, for an integer-valued c of at most 12 bits."""
  hi, lo = _split(v)
  return c * hi, c * lo


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(s, err) with s = fl(a + b) and s + err = a + b exactly (Knuth)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _sign_of_sum(*terms: jax.Array) -> jax.Array:
  """The exact sign (-1, 0, 1) of a sum of float32 terms.

  Shewchuk's grow-expansion keeps the sum as non-overlapping components of increasing
  magnitude; the sign of the sum is the sign of the largest non-zero one.
  """
  comps: list[jax.Array] = []
  for t in terms:
    q, grown = t, []
    for c in comps:
      q, h = _two_sum(q, c)
      grown.append(h)
    comps = grown + [q]
  sign = jnp.zeros((), _F32)
  for c in comps:
    sign = jnp.where(c != 0, jnp.sign(c), sign)
  return sign


def _odd(v: jax.Array) -> jax.Array:
  return (lax.bitcast_convert_type(v, jnp.int32) & 1) == 1


def _quotient(s: jax.Array, e: jax.Array, q: int) -> jax.Array:
  """fl32((s + e) / q) correctly rounded, for an exact pair s + e and an integer q < 4096."""
  inv_q, qf = _F32(1.0 / q), _F32(q)
  q1 = s * inv_q
  hi, lo = _times(qf, q1)
  q1 = q1 + (((s - hi) - lo) + e) * inv_q   # a Newton step on the exact remainder
  hi, lo = _times(qf, q1)
  rem = (s - hi) - lo                        # s - q * q1, exact (Sterbenz)
  # Signs of (s + e) - q (q1 +- ulp / 2), exactly: each bracket is exact, then one rounding.
  return _round_between(q1, lambda up: (rem - qf * (up * 0.5)) + e,
                        lambda down: (rem + qf * (down * 0.5)) + e)


def _round_between(q1: jax.Array, above_fn: Callable[[jax.Array], jax.Array],
                   below_fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """The correctly rounded quotient, given an estimate q1 within one ulp of it.

  above_fn(ulp_up) and below_fn(ulp_down) return values whose signs are those of the exact
  quotient minus the midpoints q1 + ulp_up / 2 and q1 - ulp_down / 2; ties go to even.
  """
  up = jnp.nextafter(q1, _F32(np.inf)) - q1
  down = q1 - jnp.nextafter(q1, _F32(0))
  above, below = above_fn(up), below_fn(down)
  go_up = (above > 0) | ((above == 0) & _odd(q1))
  go_down = (below < 0) | ((below == 0) & _odd(q1))
  return jnp.where(go_up, q1 + up, jnp.where(go_down, q1 - down, q1))


def _divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """fl32(num / den), correctly rounded, for positive normal num and den, without a divide.

  The estimate num * (1/den) is refined with the remainder num - den * q (den and q split
  into 12-bit halves, so every partial product is exact), then rounded by exact tests at the
  two neighbouring midpoints.
  """
  d_hi, d_lo = _split(den)
  r = _reciprocal(den)

  def minus_den_times(qv):
    q_hi, q_lo = _split(qv)
    return (-(d_hi * q_hi), -(d_hi * q_lo), -(d_lo * q_hi), -(d_lo * q_lo))

  q0 = num * r
  rem = functools.reduce(lambda acc, t: acc + t, minus_den_times(q0), num)
  q1 = q0 + rem * r
  terms = minus_den_times(q1)
  return _round_between(q1, lambda up: _sign_of_sum(num, *terms, -(den * (up * 0.5))),
                        lambda down: _sign_of_sum(num, *terms, den * (down * 0.5)))


def _fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
  """rne(a * b + c) with one rounding, in float32 arithmetic (Boldo & Melquiond, 2008).

  XLA contracts a * b + c into an FMA for most shapes but not all (measured: a bias
  broadcast along a short minor axis defeats it), so fbgemm's fused epilogue is emulated:
  a b = p + err exactly (Dekker), c + p = th + tl exactly (TwoSum), v = tl + err rounded to
  odd, result rne(th + v). The product is shielded from contraction into the sum.
  """
  p = numerics._uncontractible(a * b, b)
  a_hi, a_lo = _split(a)
  b_hi, b_lo = _split(b)
  err = (((a_hi * b_hi - p) + a_hi * b_lo) + a_lo * b_hi) + a_lo * b_lo
  th, tl = _two_sum(c, p)
  v, v_err = _two_sum(tl, err)
  bits = lax.bitcast_convert_type(v, jnp.int32)
  step = jnp.where((v_err > 0) == (v > 0), 1, -1)      # one ulp towards the exact value
  bits = jnp.where((v_err != 0) & ((bits & 1) == 0), bits + step, bits)
  return th + lax.bitcast_convert_type(bits, _F32)


def _round_half_even(k: jax.Array, sign: jax.Array) -> jax.Array:
  """k + 1 if sign > 0, k if sign < 0, the even one of the two if sign == 0."""
  even = k + (k & 1)
  return jnp.where(sign > 0, k + 1, jnp.where(sign < 0, k, even))


# Cheap stand-ins for ldexp, frexp, division and integer remainder: XLA:CPU will not fuse
# those "expensive" ops into several consumers, and each extra fusion costs ~0.7 us a call,
# as much as a small layer's whole matmul.


def _pow2(p: jax.Array) -> jax.Array:
  """2^p as float32, p an int32 in [-126, 127]."""
  return lax.bitcast_convert_type((p + 127) << 23, _F32)


def _ldexp(v: jax.Array, p: jax.Array) -> jax.Array:
  """v * 2^p for p in [-252, 254], in two exact steps."""
  half = p >> 1
  return v * _pow2(half) * _pow2(p - half)


def _exponent(v: jax.Array) -> jax.Array:
  """floor(log2(v)) for a positive normal float32 v (-127 for 0)."""
  return ((lax.bitcast_convert_type(v, jnp.int32) >> 23) & 0xFF) - 127


def _reciprocal(v: jax.Array) -> jax.Array:
  """~1/v (relative error < 1e-7) for a positive normal v: a bit-trick guess, 3 Newton steps."""
  r = lax.bitcast_convert_type(jnp.int32(0x7EF311C3) - lax.bitcast_convert_type(v, jnp.int32),
                               _F32)
  for _ in range(3):
    r = r * (2.0 - v * r)
  return r


def _mod(x: jax.Array, a: jax.Array, inv_a: jax.Array) -> jax.Array:
  """x mod a for int32 0 <= x < 2^24 and 0 < a < 2^12, given inv_a ~ 1/a."""
  r = x - a * jnp.floor(x.astype(_F32) * inv_a).astype(jnp.int32)
  r = jnp.where(r < 0, r + a, r)
  return jnp.where(r >= a, r - a, r)


def _zero_point_at_tie(m: jax.Array, k: jax.Array) -> jax.Array:
  """nearbyint(fl64(m / S_64)) where Q m = (k + 1/2) D exactly, so S_64 = fl64(2 m / a).

  With a = 2k + 1 odd, 2m / a in units of its float64 ulp is an integer plus c / a, where
  c = (mu 2^L) mod a (mu: m's 24-bit mantissa): that fixes the direction and size of
  S_64's rounding, and whether m / S_64 rounds to the half-integer k + 1/2 or past it.
  """
  a = 2 * k + 1
  af = a.astype(_F32)
  inv_a = _reciprocal(af)
  bits = lax.bitcast_convert_type(m, jnp.int32)
  mu = (bits & 0x7FFFFF) | 0x800000
  exp_m = ((bits >> 23) & 0xFF) - 150
  e0 = _exponent(2 * m * inv_a)
  exp_t = jnp.where(2 * m < _ldexp(af, e0), e0 - 1,
                    jnp.where(2 * m >= _ldexp(af, e0 + 1), e0 + 1, e0))  # floor(log2(2m/a))
  shift = exp_m + 53 - exp_t                       # 28..40: S_64 keeps `shift` bits of 1/a
  power, base = jnp.ones_like(a), _mod(jnp.full_like(a, 2), a, inv_a)
  for bit in range(6):
    power = jnp.where((shift >> bit) & 1 == 1, _mod(power * base, a, inv_a), power)
    base = _mod(base * base, a, inv_a)
  c = _mod(_mod(mu, a, inv_a) * power, a, inv_a)
  j = _exponent(af) - 1                                         # floor(log2(a / 2))
  rhs = _ldexp(2 * m, j)
  past_up = _ldexp((c * a).astype(_F32), exp_t) >= rhs          # S_64 rounded down
  past_down = _ldexp(((a - c) * a).astype(_F32), exp_t) > rhs   # S_64 rounded up
  sign = jnp.where(c == 0, 0.0, jnp.where(2 * c > a, jnp.where(past_down, -1.0, 0.0),
                                          jnp.where(past_up, 1.0, 0.0)))
  return _round_half_even(k, sign)
