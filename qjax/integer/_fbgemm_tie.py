"""fbgemm's float64 zero point at an exact tie, reproduced in float32.

fbgemm's ChooseQuantizationParams picks Z = nearbyint(fl64(m / S_64)); where Q m lies
exactly halfway between two multiples of the range D, float64's rounding of S_64 decides
the side. `_zero_point_at_tie` reproduces that decision with integer and exact float32
arithmetic (`qjax._float32`) for the per-batch activation qparams of `qjax.integer.dynamic`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from qjax._float32 import exponent, ldexp, reciprocal_estimate

_F32 = jnp.float32


def _round_half_even(k: jax.Array, sign: jax.Array) -> jax.Array:
  """k + 1 if sign > 0, k if sign < 0, the even one of the two if sign == 0."""
  even = k + (k & 1)
  return jnp.where(sign > 0, k + 1, jnp.where(sign < 0, k, even))


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
  inv_a = reciprocal_estimate(af)
  bits = lax.bitcast_convert_type(m, jnp.int32)
  mu = (bits & 0x7FFFFF) | 0x800000
  exp_m = ((bits >> 23) & 0xFF) - 150
  e0 = exponent(2 * m * inv_a)
  exp_t = jnp.where(2 * m < ldexp(af, e0), e0 - 1,
                    jnp.where(2 * m >= ldexp(af, e0 + 1), e0 + 1, e0))  # floor(log2(2m/a))
  shift = exp_m + 53 - exp_t                       # 28..40: S_64 keeps `shift` bits of 1/a
  power, base = jnp.ones_like(a), _mod(jnp.full_like(a, 2), a, inv_a)
  for bit in range(6):
    power = jnp.where((shift >> bit) & 1 == 1, _mod(power * base, a, inv_a), power)
    base = _mod(base * base, a, inv_a)
  c = _mod(_mod(mu, a, inv_a) * power, a, inv_a)
  j = exponent(af) - 1                                         # floor(log2(a / 2))
  rhs = ldexp(2 * m, j)
  past_up = ldexp((c * a).astype(_F32), exp_t) >= rhs          # S_64 rounded down
  past_down = ldexp(((a - c) * a).astype(_F32), exp_t) > rhs   # S_64 rounded up
  sign = jnp.where(c == 0, 0.0, jnp.where(2 * c > a, jnp.where(past_down, -1.0, 0.0),
                                          jnp.where(past_up, 1.0, 0.0)))
  return _round_half_even(k, sign)
