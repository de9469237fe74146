"""PACT: parameterized clipping activation (Choi et al. 2018, arXiv:1805.06085).

`pact` quantizes clip(x, 0, alpha) on k bits with a learnable clipping level alpha; `pact_l2`
is the L2 penalty on alpha that the paper adds to the loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qjax import _checks
from qjax.quantizers import _common


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pact(levels: float, x: jax.Array, alpha: jax.Array) -> jax.Array:
  xf, af = x.astype(jnp.float32), alpha.astype(jnp.float32)
  clipped = jnp.clip(xf, 0.0, af)
  return (jnp.round(clipped * (levels / af)) * (af / levels)).astype(x.dtype)


def _pact_fwd(levels, x, alpha):
  return _pact(levels, x, alpha), (x, alpha)


def _pact_bwd(levels, residuals, g):
  del levels
  x, alpha = residuals
  xf, af, gf = x.astype(jnp.float32), alpha.astype(jnp.float32), g.astype(jnp.float32)
  dx = jnp.where((xf >= 0) & (xf < af), g, jnp.zeros_like(g))
  above = jnp.where(xf >= af, gf, jnp.zeros_like(gf))
  # alpha is () or broadcast to x's rank with channels last (see `pact`).
  axes = tuple(range(x.ndim - 1)) if alpha.ndim else None
  dalpha = jnp.sum(above, axis=axes, keepdims=alpha.ndim > 0)
  return dx, dalpha.astype(alpha.dtype)


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact(x: jax.typing.ArrayLike, alpha: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """PACT activation: k-bit quantization of clip(x, 0, alpha) on the scale alpha / (2^k - 1).

    y         = rne(clip(x, 0, a) (2^k - 1) / a) a / (2^k - 1)
    dy/dx     = 1 if 0 <= x < a else 0                 (straight-through inside the clip)
    dy/da     = 1 if x >= a else 0                     (summed to a's shape)

  alpha is a scalar or one value per channel along x's last axis. Values must be positive;
  that is checked on concrete alpha (under `jax.jit` a non-positive alpha gives NaN or inf).

  Args:
    x: floating-point activations; the result keeps their dtype.
    alpha: floating-point clipping level, shape () or (x.shape[-1],).
    bits: k, a Python int in 2..16.

  Returns:
    y on the grid {0, a/(2^k - 1), ..., a}, same shape and dtype as x.

  Example:
    >>> x = jnp.array([-1.0, 0.3, 0.5, 2.0])
    >>> pact(x, jnp.float32(1.0), 2)
    Array([0.        , 0.33333334, 0.6666667 , 1.        ], dtype=float32)
    >>> jax.grad(lambda a: pact(x, a, 2).sum())(jnp.float32(1.0))
    Array(1., dtype=float32)
  """
  bits = _common.check_bits("pact", bits, 2, 16)
  x = _common.float_input("pact", x)
  alpha = _common.float_input("pact", alpha, "alpha")
  if alpha.ndim != 0 and (x.ndim == 0 or alpha.shape != (x.shape[-1],)):
    raise ValueError(f"pact: alpha must have shape () or (x.shape[-1],) = "
                     f"{(x.shape[-1],) if x.ndim else '(none: x is a scalar)'}; got alpha shape "
                     f"{alpha.shape} for x shape {x.shape}.")
  concrete = _checks.concrete(alpha)
  if concrete is not None and not bool((concrete > 0).all()):
    raise ValueError(f"pact: alpha must be > 0 (the clipping level); got {concrete}.")
  if alpha.ndim:  # channels last, at x's rank (no implicit rank promotion)
    alpha_b = alpha.reshape((1,) * (x.ndim - 1) + alpha.shape)
    return _pact(float(2**bits - 1), x, alpha_b)
  return _pact(float(2**bits - 1), x, alpha)


def pact_l2(alpha: jax.typing.ArrayLike, weight_decay: float) -> jax.Array:
  """PACT's L2 regulariser on the clipping level: weight_decay / 2 * sum(alpha^2).

  Added to the loss, its gradient weight_decay * alpha is ordinary weight decay on alpha,
  which pulls alpha down (the paper's remedy for a clipping level that only grows).

  Args:
    alpha: floating-point clipping level(s), any shape.
    weight_decay: a non-negative Python float, lambda_alpha in the paper.

  Returns:
    A float32 scalar.

  Example:
    >>> pact_l2(jnp.array([1.0, 2.0]), 0.1)
    Array(0.25, dtype=float32)
  """
  alpha = _common.float_input("pact_l2", alpha, "alpha")
  if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
    raise TypeError(f"pact_l2: weight_decay must be a Python float >= 0; got "
                    f"{type(weight_decay).__name__} {weight_decay!r}.")
  if not weight_decay >= 0:
    raise ValueError(f"pact_l2: weight_decay must be >= 0; got {weight_decay}.")
  af = alpha.astype(jnp.float32)
  return jnp.float32(0.5 * weight_decay) * jnp.sum(af * af)
