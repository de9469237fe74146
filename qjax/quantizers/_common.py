"""Argument checks shared by the research quantizers."""

from __future__ import annotations

import jax
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

