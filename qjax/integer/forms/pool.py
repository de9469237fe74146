"""Integer form of average pooling (windowed and global) on the int8 grid.

The output keeps the input's grid. With acc = sum_window q - Z n (the window's n real
positions; padding counts as real zero) and D the divisor (the whole window with
count_include_pad, else n), requant "fbgemm" / "float" reproduce PyTorch's quantized kernels
on channels-last tensors (a converted model's activations):

    windowed (avg_pool2d)              q = clamp(rne(f32(acc * M)) + Z),   M = f32(1 / D)
    global (adaptive_avg_pool2d(1))    q = clamp(rne(fma(acc, M', Z))),    M' = f32(1 / f32(1 / M))

and requant "integer" divides in integers, q = Z + rne(acc / D) (windowed) and
q = rne((acc + Z D) / D) (global), ties to even, which equal PyTorch's results except next to
a tie (D not a power of two). (An unsigned grid's carrier shift, 128, is even: rounding to
even on the carrier is rounding to even on the grid.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from qjax import _device
from qjax import _float32
from qjax._struct import static, struct
from qjax.integer import arith
from qjax.integer.forms.base import Form, Lowering, int8_input
from qjax.integer.requant import Requant


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


def pool_pads(padding: str | tuple[tuple[int, int], ...], spatial: Sequence[int],
              window: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
  """Explicit (low, high) pads per spatial axis of a pooling window ("SAME", "VALID" or
  pairs)."""
  if isinstance(padding, str):
    return list(lax.padtype_to_pads(tuple(spatial), tuple(window), tuple(strides), padding))
  return [tuple(p) for p in padding]  # type: ignore[misc]


@struct
class Int8AvgPool:
  """Average pooling of an int8 (batch, *spatial, C) tensor on its own grid (module
  docstring). `zero_point` int32 () is the grid's zero point on the carrier. Static: `window`
  (None: global pooling over all spatial axes, which are then dropped), `strides`,
  `padding` ("SAME", "VALID" or (low, high) pairs), `count_include_pad`, the grid's carrier
  `shift` and bounds `lo`, `hi`, and `integer` (the integer-only division).

  Example:
    >>> op = Int8AvgPool(zero_point=jnp.int32(0), window=None, strides=(), padding="VALID",
    ...                  count_include_pad=True, shift=0, lo=-128, hi=127, integer=True)
    >>> op(jnp.array([[[[1], [2]], [[3], [4]]]], jnp.int8))   # mean 2.5 -> 2
    Array([[2]], dtype=int8)
  """

  zero_point: jax.Array
  window: tuple[int, ...] | None = static()
  strides: tuple[int, ...] = static()
  padding: str | tuple[tuple[int, int], ...] = static()
  count_include_pad: bool = static()
  shift: int = static()
  lo: int = static()
  hi: int = static()
  integer: bool = static()

  def _finish(self, acc: jax.Array, divisor: jax.Array, global_pool: bool) -> jax.Array:
    """The mean acc / divisor on the grid (acc is centred: the zero point taken out)."""
    if self.integer:  # ties broken as PyTorch's kernel of the same kind breaks them
      if global_pool:
        q = divide_round_half_even(acc + self.zero_point * divisor, divisor)
      else:
        q = divide_round_half_even(acc, divisor) + self.zero_point
      return jnp.clip(q, self.lo, self.hi).astype(jnp.int8)
    acc32 = acc.astype(jnp.float32)
    multiplier = _float32.exact_div(jnp.ones(jnp.shape(divisor), jnp.float32),
                                    divisor.astype(jnp.float32))
    if global_pool:
      inverse = _float32.exact_div(jnp.ones(jnp.shape(divisor), jnp.float32), multiplier)
      inverse = _float32.exact_div(jnp.ones(jnp.shape(divisor), jnp.float32), inverse)
      return arith.quantize_fused(acc32, inverse, self.zero_point, self.shift, lo=self.lo,
                                  hi=self.hi)
    return arith.quantize_reciprocal(acc32, jnp.broadcast_to(multiplier, acc32.shape),
                                     self.zero_point, lo=self.lo, hi=self.hi)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = int8_input(x, "a converted average pooling")
    wide = x.astype(jnp.int32)
    if self.window is None:
      if x.ndim < 3:
        raise ValueError(f"global average pooling takes (batch, *spatial, features); got an "
                         f"input of shape {x.shape}.")
      axes = tuple(range(1, x.ndim - 1))
      count = math.prod(x.shape[a] for a in axes)
      acc = jnp.sum(wide, axis=axes) - self.zero_point * count
      return self._finish(acc, jnp.int32(count), global_pool=True)
    n = len(self.window)
    if x.ndim != n + 2:
      raise ValueError(f"this converted pooling takes (batch, {', '.join(['spatial'] * n)}, "
                       f"features); got an input of shape {x.shape}.")
    pads = [(0, 0)] + pool_pads(self.padding, x.shape[1:-1], self.window, self.strides) + [(0, 0)]
    dims, steps = (1,) + self.window + (1,), (1,) + self.strides + (1,)
    padded = lax.pad(wide, self.zero_point, [(lo, hi, 0) for lo, hi in pads])
    window_size = math.prod(self.window)
    # padded positions hold the zero point: subtracting Z per position centres every one
    acc = lax.reduce_window(padded, jnp.int32(0), lax.add, dims, steps, "VALID") - (
        self.zero_point * window_size)
    if self.count_include_pad:
      return self._finish(acc, jnp.int32(window_size), global_pool=False)
    ones = lax.pad(jnp.ones((1,) + x.shape[1:-1] + (1,), jnp.int32), jnp.int32(0),
                   [(lo, hi, 0) for lo, hi in pads])
    count = lax.reduce_window(ones, jnp.int32(0), lax.add, dims, steps, "VALID")
    return self._finish(acc, jnp.broadcast_to(count, acc.shape), global_pool=False)


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
    lo, hi = grid.bounds
    return Int8AvgPool(zero_point=_device.put(grid.zero_point, jnp.int32), window=self.window,
                       strides=self.strides, padding=self.padding,
                       count_include_pad=self.count_include_pad, shift=grid.shift, lo=lo,
                       hi=hi, integer=lowering.requant is Requant.INTEGER)
