"""Integer form of average pooling (windowed and global) on the int8 grid.

The output keeps the input's grid, and each output is the window's integer mean rounded to
nearest, ties to even, as PyTorch's quantized avg_pool2d / adaptive_avg_pool2d compute it:

    q_y = rne(sum_window q / n)          n = the window size (count_include_pad, padding
                                          positions holding the zero point Z, i.e. real 0),
                                          or the window's count of real positions

On the int8 carrier an unsigned grid is shifted by 128, an even number, so rounding
(sum q8) / n there gives the same integers shifted: the carrier needs no correction.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from qjax._struct import static, struct
from qjax.integer.forms.base import Form, Lowering, int8_input


def divide_round_half_even(total: jax.Array, count: jax.Array) -> jax.Array:
  """rne(total / count) for int32 total and positive int32 count, in integers only.

  Example:
    >>> divide_round_half_even(jnp.array([5, 7, -5, 6], jnp.int32), jnp.int32(2))
    Array([ 2,  4, -2,  3], dtype=int32)
  """
  quotient = jnp.floor_divide(total, count)
  twice_rest = 2 * (total - quotient * count)  # in [0, 2 count)
  up = (twice_rest > count) | ((twice_rest == count) & (quotient % 2 == 1))
  return quotient + up.astype(jnp.int32)


def _pads(padding: str | tuple[tuple[int, int], ...], spatial: Sequence[int],
          window: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    return list(lax.padtype_to_pads(tuple(spatial), tuple(window), tuple(strides), padding))
  return [tuple(p) for p in padding]  # type: ignore[misc]


@struct
class Int8AvgPool:
  """Average pooling of an int8 (batch, *spatial, C) tensor on its own grid (module
  docstring). `pad_value` int32 () is the input's zero point on the carrier grid. Static:
  `window` (None: global pooling over all spatial axes, which are then dropped), `strides`,
  `padding` ("SAME", "VALID" or (low, high) pairs) and `count_include_pad`.

  Example:
    >>> op = Int8AvgPool(pad_value=jnp.int32(0), window=None, strides=(), padding="VALID",
    ...                  count_include_pad=True)
    >>> op(jnp.array([[[[1], [2]], [[3], [4]]]], jnp.int8))   # mean 2.5 -> 2
    Array([[2]], dtype=int8)
  """

  pad_value: jax.Array
  window: tuple[int, ...] | None = static()
  strides: tuple[int, ...] = static()
  padding: str | tuple[tuple[int, int], ...] = static()
  count_include_pad: bool = static()

  def __call__(self, x: jax.Array) -> jax.Array:
    x = int8_input(x, "a converted average pooling")
    wide = x.astype(jnp.int32)
    if self.window is None:
      if x.ndim < 3:
        raise ValueError(f"global average pooling takes (batch, *spatial, features); got an "
                         f"input of shape {x.shape}.")
      axes = tuple(range(1, x.ndim - 1))
      count = jnp.int32(math.prod(x.shape[a] for a in axes))
      return divide_round_half_even(jnp.sum(wide, axis=axes), count).astype(jnp.int8)
    n = len(self.window)
    if x.ndim != n + 2:
      raise ValueError(f"this converted pooling takes (batch, {', '.join(['spatial'] * n)}, "
                       f"features); got an input of shape {x.shape}.")
    pads = [(0, 0)] + _pads(self.padding, x.shape[1:-1], self.window, self.strides) + [(0, 0)]
    dims, steps = (1,) + self.window + (1,), (1,) + self.strides + (1,)
    padded = lax.pad(wide, self.pad_value, [(lo, hi, 0) for lo, hi in pads])
    total = lax.reduce_window(padded, jnp.int32(0), lax.add, dims, steps, "VALID")
    if self.count_include_pad:
      count = jnp.int32(math.prod(self.window))
      return divide_round_half_even(total, count).astype(jnp.int8)
    # the real positions of each window: the padded positions hold the zero point, which
    # adds n_pad * Z to the total; take it back out
    ones = lax.pad(jnp.ones((1,) + x.shape[1:-1] + (1,), jnp.int32), jnp.int32(0),
                   [(lo, hi, 0) for lo, hi in pads])
    count = lax.reduce_window(ones, jnp.int32(0), lax.add, dims, steps, "VALID")
    window_size = math.prod(self.window)
    total = total - (window_size - count) * self.pad_value
    return divide_round_half_even(total, count).astype(jnp.int8)


@dataclasses.dataclass(frozen=True)
class PoolForm(Form):
  """The integer form of `qjax.nn.AvgPool` (fields as `Int8AvgPool`'s static ones); a pool
  on a float tensor stays float."""

  stays_float = True

  window: tuple[int, ...] | None
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  count_include_pad: bool

  def lower(self, lowering: Lowering) -> Int8AvgPool:
    (grid,) = lowering.inputs
    return Int8AvgPool(pad_value=jnp.asarray(grid.zero_point, jnp.int32), window=self.window,
                       strides=self.strides, padding=self.padding,
                       count_include_pad=self.count_include_pad)
