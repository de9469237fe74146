"""Binary and ternary weights.

* `binary_weight`: sign(w) scaled by mean|w| (XNOR-Net, Rastegari et al. 2016) with
  BinaryConnect's clipped straight-through gradient (Courbariaux et al. 2015).
* `ternary_weight`: ternary weight networks (TWN, Li et al. 2016, arXiv:1605.04711).

Scales are means over the whole tensor, or per output channel (the last axis, Flax's kernel
layout) over all other axes. Values are computed in float32 and returned in the input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.quantizers import _common


def _reduce_axes(where: str, w: jax.Array, per_channel: bool) -> tuple[int, ...]:
  if not isinstance(per_channel, bool):
    raise TypeError(f"{where}: per_channel must be a bool; got {per_channel!r}.")
  if per_channel:
    if w.ndim == 0:
      raise ValueError(f"{where}: per_channel=True needs w with at least one axis (channels "
                       f"along the last); got a scalar. Use per_channel=False.")
    return tuple(range(w.ndim - 1))
  return tuple(range(w.ndim))


def binary_scale(w: jax.Array, axes: tuple[int, ...], scale: bool) -> jax.Array:
  """XNOR-Net's a = mean|w| over `axes` (kept as size-1 axes), or 1 when not `scale`."""
  if scale:
    return jnp.mean(jnp.abs(w.astype(jnp.float32)), axis=axes, keepdims=True)
  return jnp.ones(tuple(1 if i in axes else n for i, n in enumerate(w.shape)), jnp.float32)


def ternary_parts(w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """TWN's (delta, a) over `axes` (kept as size-1 axes): delta = 0.7 mean|w|, a = the mean of
  |w| over {|w| > delta} (0 if that set is empty)."""
  magnitude = jnp.abs(w.astype(jnp.float32))
  delta = 0.7 * jnp.mean(magnitude, axis=axes, keepdims=True)
  kept = magnitude > delta
  count = jnp.sum(kept, axis=axes, keepdims=True, dtype=jnp.float32)
  total = jnp.sum(jnp.where(kept, magnitude, 0.0), axis=axes, keepdims=True)
  return delta, total / jnp.maximum(count, 1.0)


@jax.custom_vjp
def _binary(w: jax.Array, scale: jax.Array) -> jax.Array:
  wf = w.astype(jnp.float32)
  return (jnp.where(wf >= 0, scale, -scale)).astype(w.dtype)


def _binary_fwd(w, scale):
  return _binary(w, scale), (jnp.abs(w) <= 1, scale)


def _binary_bwd(residuals, g):
  inside, scale = residuals
  return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(scale)


_binary.defvjp(_binary_fwd, _binary_bwd)


def binary_weight(w: jax.typing.ArrayLike, *, per_channel: bool = False,
                  scale: bool = True) -> jax.Array:
  """Binary weights: sign(w) times a = mean|w| (XNOR-Net), clipped straight-through gradient.

    w_b     = a sign(w)           sign(0) = +1; a = 1 when scale=False
    dw_b/dw = 1 if |w| <= 1 else 0   (BinaryConnect; a is a constant of the backward pass)

  Args:
    w: floating-point weights; the result keeps their dtype.
    per_channel: one a per output channel (the last axis), else one for the tensor.
    scale: multiply by a = mean|w|; False gives +-1.

  Returns:
    w_b, same shape and dtype: two values +-a per channel (or per tensor).

  Example:
    >>> w = jnp.array([[0.5, -1.0], [-1.5, 0.0]])
    >>> binary_weight(w)
    Array([[ 0.75, -0.75],
           [-0.75,  0.75]], dtype=float32)
    >>> binary_weight(w, per_channel=True)
    Array([[ 1. , -0.5],
           [-1. ,  0.5]], dtype=float32)
    >>> jax.grad(lambda v: binary_weight(v).sum())(w)
    Array([[1., 1.],
           [0., 1.]], dtype=float32)
  """
  w = _common.float_input("binary_weight", w, "w")
  axes = _reduce_axes("binary_weight", w, per_channel)
  if not isinstance(scale, bool):
    raise TypeError(f"binary_weight: scale must be a bool; got {scale!r}.")
  return _binary(w, jax.lax.stop_gradient(binary_scale(w, axes, scale)))


@jax.custom_vjp
def _ternary(w: jax.Array, level: jax.Array, delta: jax.Array) -> jax.Array:
  wf = w.astype(jnp.float32)
  zero = jnp.zeros_like(wf)
  out = jnp.where(wf > delta, level, jnp.where(wf < -delta, -level, zero))
  # A NaN or an infinity in a channel makes its delta so (mean |w|): the channel is NaN, as
  # binary_weight's, instead of zeros that no comparison with delta can keep.
  out = jnp.where(jnp.isfinite(delta), out, jnp.float32(jnp.nan))
  return out.astype(w.dtype)


def _ternary_fwd(w, level, delta):
  return _ternary(w, level, delta), (level, delta)


def _ternary_bwd(residuals, g):
  level, delta = residuals
  return g, jnp.zeros_like(level), jnp.zeros_like(delta)


_ternary.defvjp(_ternary_fwd, _ternary_bwd)


def ternary_weight(w: jax.typing.ArrayLike, *, per_channel: bool = True) -> jax.Array:
  """Ternary weights (TWN) with a straight-through gradient.

    delta   = 0.7 mean|w|
    a       = mean of |w| over {|w| > delta}     (0 if that set is empty)
    w_t     = +a if w > delta, -a if w < -delta, else 0
    dw_t/dw = 1

  Args:
    w: floating-point weights; the result keeps their dtype.
    per_channel: delta and a per output channel (the last axis), else per tensor.

  Returns:
    w_t, same shape and dtype, in {-a, 0, +a} per channel (or per tensor); NaN in a channel
    (tensor) that holds a NaN or an infinity.

  Example:
    >>> w = jnp.array([[1.0, -0.1], [-0.25, 0.25], [0.1, -0.5]])
    >>> ternary_weight(w, per_channel=False)
    Array([[ 0.75,  0.  ],
           [ 0.  ,  0.  ],
           [ 0.  , -0.75]], dtype=float32)
  """
  w = _common.float_input("ternary_weight", w, "w")
  axes = _reduce_axes("ternary_weight", w, per_channel)
  delta, level = ternary_parts(w, axes)
  return _ternary(w, jax.lax.stop_gradient(level), jax.lax.stop_gradient(delta))
