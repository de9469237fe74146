"""DoReFa-Net quantizers (Zhou et al. 2016, arXiv:1606.06160).

* `quantize_k`: k-bit uniform rounding of [0, 1], identity (straight-through) gradient.
* `dorefa_activation`: `quantize_k` of x clipped to [0, 1].
* `dorefa_weight`: the tanh-normalised k-bit weights (k > 1), or sign(w) * mean|w| (k = 1).

Values are computed in float32 and returned in the input's dtype. A level m / n is XLA's
float32 division, which may lie one ulp from the nearest float32 (XLA:CPU divides by a constant
through its reciprocal); 0 and 1 are exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qjax import ste
from qjax.quantizers import _common

_MAX_BITS = 32


def _levels(bits: int) -> float:
  return float(2**bits - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _round_levels(levels: float, x: jax.Array) -> jax.Array:
  return jnp.round(x * levels) / levels


def _round_levels_fwd(levels, x):
  return _round_levels(levels, x), None


def _round_levels_bwd(levels, residuals, g):
  del levels, residuals
  return (g,)


_round_levels.defvjp(_round_levels_fwd, _round_levels_bwd)


def quantize_k(x: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """DoReFa's k-bit quantizer of [0, 1] with a straight-through gradient.

    y     = rne((2^k - 1) x) / (2^k - 1)
    dy/dx = 1

  x is expected in [0, 1] (no clipping here; see `dorefa_activation`).

  Args:
    x: floating-point array; the result keeps its dtype.
    bits: k, a Python int in 1..32.

  Returns:
    x on the grid {0, 1/(2^k - 1), ..., 1}, same shape and dtype.

  Example:
    >>> quantize_k(jnp.array([0.1, 0.4, 0.9]), 2)
    Array([0.        , 0.33333334, 1.        ], dtype=float32)
    >>> jax.grad(lambda v: quantize_k(v, 2).sum())(jnp.array([0.1, 0.4]))
    Array([1., 1.], dtype=float32)
  """
  bits = _common.check_bits("quantize_k", bits, 1, _MAX_BITS)
  x = _common.float_input("quantize_k", x)
  return _round_levels(_levels(bits), x.astype(jnp.float32)).astype(x.dtype)


def dorefa_activation(x: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """DoReFa's activation quantizer: `quantize_k` of x clipped to [0, 1].

    y     = rne((2^k - 1) clip(x, 0, 1)) / (2^k - 1)
    dy/dx = 1 if 0 <= x <= 1 else 0

  Args:
    x: floating-point array; the result keeps its dtype.
    bits: k, a Python int in 1..32.

  Returns:
    The quantized activation, same shape and dtype.

  Example:
    >>> dorefa_activation(jnp.array([-0.5, 0.4, 1.7]), 2)
    Array([0.        , 0.33333334, 1.        ], dtype=float32)
    >>> jax.grad(lambda v: dorefa_activation(v, 2).sum())(jnp.array([-0.5, 0.4, 1.7]))
    Array([0., 1., 0.], dtype=float32)
  """
  bits = _common.check_bits("dorefa_activation", bits, 1, _MAX_BITS)
  x = _common.float_input("dorefa_activation", x)
  return _common.clip_round(0.0, _levels(bits), x)


@jax.custom_vjp
def _sign_times(x: jax.Array, scale: jax.Array) -> jax.Array:
  return jnp.where(x >= 0, scale, -scale)


def _sign_times_fwd(x, scale):
  return _sign_times(x, scale), scale


def _sign_times_bwd(scale, g):
  # d sign(x / E) / dx * E with the straight-through d sign(u) / du = 1, E a constant
  return g, jnp.zeros_like(scale)


_sign_times.defvjp(_sign_times_fwd, _sign_times_bwd)


def _max_abs(t: jax.Array) -> jax.Array:
  """max |t|, 1 where every t is 0, NaN where any t is NaN: jnp.max drops a NaN on XLA:CPU for
  large arrays (its reduction kernels return the other operand), which would quantize the
  finite weights of a tensor holding NaN on a scale from the rest."""
  biggest = jnp.max(jnp.abs(t))
  biggest = jnp.where(biggest > 0, biggest, jnp.ones_like(biggest))
  return jnp.where(jnp.any(jnp.isnan(t)), jnp.full_like(biggest, jnp.nan), biggest)


def dorefa_weight(w: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """DoReFa's weight quantizer.

  k > 1, with t = tanh(w):

    w_q = 2 quantize_k(t / (2 max|t|) + 1/2) - 1

  The gradient flows through tanh and the normalisation (the max is differentiated as JAX
  does, which splits it among ties); only `quantize_k` is straight-through. If every weight
  is 0, max|t| is taken as 1 (the paper divides by zero); a NaN weight makes every result
  NaN. k = 32 applies the same formula (tanh(w) / max|tanh(w)| up to float32 rounding); the
  paper's code skips the transform.

  k = 1, with E = mean|w| treated as a constant in the backward pass:

    w_q   = sign(w) E          (sign(0) = +1, so that there are two values)
    dw_q/dw = 1                (straight-through sign: d sign(w / E) / dw * E)

  Args:
    w: floating-point weights; the result keeps their dtype.
    bits: k, a Python int in 1..32.

  Returns:
    The quantized weights, same shape and dtype: k > 1 on the grid
    {(2m - n) / n : m = 0..n} = {-1, -1 + 2/n, ..., 1} with n = 2^k - 1; k = 1 in {-E, E}.

  Example:
    >>> dorefa_weight(jnp.array([-2.0, 0.1, 1.0]), 2)
    Array([-1.        ,  0.33333334,  1.        ], dtype=float32)
    >>> dorefa_weight(jnp.array([-2.0, 0.0, 1.0]), 1)
    Array([-1.,  1.,  1.], dtype=float32)
  """
  bits = _common.check_bits("dorefa_weight", bits, 1, _MAX_BITS)
  w = _common.float_input("dorefa_weight", w, "w")
  wf = w.astype(jnp.float32)
  if bits == 1:
    scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(wf)))
    return _sign_times(wf, scale).astype(w.dtype)
  t = jnp.tanh(wf)
  biggest = _max_abs(t)
  unit = t / (2.0 * biggest) + 0.5
  # 2 quantize_k(unit) - 1 = (2 rne(n unit) - n) / n: one rounding per level, so the value
  # does not depend on how XLA fuses the two steps (jit and eager agree bit for bit).
  n = _levels(bits)
  return ((2.0 * ste.round_ste(unit * n) - n) / n).astype(w.dtype)
