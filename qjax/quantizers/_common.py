"""What the research quantizers share: argument checks and the clipped rounding to a uniform
grid with its straight-through gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qjax import _checks


def check_bits(where: str, bits: object, lo: int, hi: int) -> int:
  """`bits` as a Python int in [lo, hi]; TypeError / ValueError naming `where` otherwise.

  bits must be static (a Python int): it fixes the grid, so a traced value cannot be used.
  """
  if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
    raise TypeError(f"{where}: bits must be a Python int in {lo}..{hi}; got "
                    f"{type(bits).__name__} {bits!r}. Under jax.jit pass bits as a static "
                    f"argument (static_argnames or functools.partial).")
  if not lo <= int(bits) <= hi:
    raise ValueError(f"{where}: bits must be in {lo}..{hi}; got {int(bits)}.")
  return int(bits)


def float_input(where: str, x: jax.typing.ArrayLike, name: str = "x") -> jax.Array:
  """`x` as a floating jax array; a TypeError naming `name` and `where` for other input."""
  return _checks.as_float_array(
      name, x, hint=f" ({where} quantizes real numbers; cast with {name}.astype(jnp.float32)).")



@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def clip_round(lo: float, levels: float, x: jax.Array) -> jax.Array:
  """rne(clip(x, lo, 1) levels) / levels in float32, returned in x's dtype; the gradient is 1
  where lo <= x <= 1 and 0 outside (straight-through inside the clip)."""
  xf = jnp.clip(x.astype(jnp.float32), lo, 1.0)
  return (jnp.round(xf * levels) / levels).astype(x.dtype)


def _clip_round_fwd(lo, levels, x):
  return clip_round(lo, levels, x), (x >= lo) & (x <= 1)


def _clip_round_bwd(lo, levels, inside, g):
  del lo, levels
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


clip_round.defvjp(_clip_round_fwd, _clip_round_bwd)
