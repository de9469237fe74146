"""Requantizers: a contraction's int32 accumulator -> its int8 output grid, one type per formula.

`convert(..., requant=...)` picks the formula once; the lowered layer then holds a
`FbgemmRequant`, `FloatRequant` or `IntegerRequant`, and that object's type is what selects
the arithmetic at run time (`qjax.integer.arith` holds the math):

  FbgemmRequant   q = Z_y + rne((f32(acc) + f32(b / A)) * M)   float bias, PyTorch x86
  FloatRequant    q = Z_y + rne(f32(acc + bias) * M)           int32 bias (in the offset)
  IntegerRequant  q = Z_y + floor((acc * M0 + 2^(r-1)) / 2^r)   int32 bias, no float at all

with A = f32(f32(S_x) * S_w) and M = f32(A / S_y). The int32 bias of the last two is added to
the accumulator with the zero-point offset by the layer (it is part of its `offset`).
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp  # noqa: F401 (the examples)
import numpy as np

from qjax import _device
from qjax._struct import static, struct
from qjax.integer import arith


class Requant(enum.Enum):
  """How a layer's int32 accumulator is mapped to its output grid (see the module docstring)."""

  FLOAT = "float"
  INTEGER = "integer"
  FBGEMM = "fbgemm"


def as_requant(value: Requant | str) -> Requant:
  """`value` as a Requant; a ValueError listing the accepted values otherwise."""
  if isinstance(value, Requant):
    return value
  accepted = [r.value for r in Requant]
  if isinstance(value, str) and value.lower() in accepted:
    return Requant(value.lower())
  raise ValueError(f"requant must be one of {accepted} (or a qjax.integer.Requant); got "
                   f"{value!r}.")


def channels(a: jax.Array, ndim: int) -> jax.Array:
  """A per-channel (N,) vector shaped to broadcast along the last axis of a rank-`ndim`
  array (explicitly: rank promotion may be disabled); scalars pass unchanged."""
  return a.reshape((1,) * (ndim - 1) + a.shape) if a.ndim == 1 else a


@dataclasses.dataclass(frozen=True, kw_only=True)
class _OutputGrid:
  """What every requantizer shares: the output's zero point on the carrier grid (a leaf)
  and, static, its int8 bounds and whether a ReLU is fused (clamp at the zero point)."""

  zero_point: jax.Array
  lo: int = static()
  hi: int = static()
  relu: bool = static()

  def __post_init__(self):
    # Only the static fields: the leaves may be tracers or placeholders during jax's own
    # tree operations.
    lo, hi = self.lo, self.hi
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (lo, hi))
    if not ints or not -128 <= lo <= hi <= 127:
      raise ValueError(f"{type(self).__name__}: lo and hi must be ints with -128 <= lo <= hi "
                       f"<= 127 (the output's int8 bounds; beyond them int8 would wrap); got "
                       f"lo={lo!r}, hi={hi!r}.")
    if not isinstance(self.relu, (bool, np.bool_)):
      raise TypeError(f"{type(self).__name__}: relu must be a bool; got {self.relu!r}.")


@struct
class FbgemmRequant(_OutputGrid):
  """q = clamp(Z_y + rne((f32(acc) + bias) * multiplier), lo, hi): fbgemm's float-bias
  requantization (PyTorch's x86 quantized Linear and, with the fbgemm engine, Conv).

  Leaves: `bias` f32 (N,) = b / A, `multiplier` f32 (N,) or () = A / S_y, `zero_point` int32
  () = Z_y on the int8 carrier grid. Static: `lo`, `hi` (the output's int8 bounds), `relu`.

  Example:
    >>> r = FbgemmRequant(bias=jnp.zeros(2, jnp.float32), multiplier=jnp.float32(0.5),
    ...                   zero_point=jnp.int32(0), lo=-128, hi=127, relu=False)
    >>> r(jnp.array([[3, -4]], jnp.int32))
    Array([[ 2, -2]], dtype=int8)
  """

  bias: jax.Array
  multiplier: jax.Array

  def __call__(self, acc: jax.Array) -> jax.Array:
    return arith.requantize_fbgemm(acc, channels(self.bias, acc.ndim),
                                   channels(self.multiplier, acc.ndim), self.zero_point,
                                   lo=self.lo, hi=self.hi, relu=self.relu)


@struct
class FloatRequant(_OutputGrid):
  """q = clamp(Z_y + rne(f32(acc) * multiplier), lo, hi) (the int32 bias is in acc).

  Example:
    >>> r = FloatRequant(multiplier=jnp.float32(0.25), zero_point=jnp.int32(1), lo=-128,
    ...                  hi=127, relu=False)
    >>> r(jnp.array([8, -6], jnp.int32))
    Array([ 3, -1], dtype=int8)
  """

  multiplier: jax.Array

  def __call__(self, acc: jax.Array) -> jax.Array:
    return arith.requantize_float(acc, channels(self.multiplier, acc.ndim), self.zero_point,
                                  lo=self.lo, hi=self.hi, relu=self.relu)


@struct
class IntegerRequant(_OutputGrid):
  """q = clamp(Z_y + floor((acc * m0 + 2^(shift-1)) / 2^shift), lo, hi): integers only.

  Example:
    >>> r = IntegerRequant(m0=jnp.int32(2**30), shift=jnp.int32(32), zero_point=jnp.int32(0),
    ...                    lo=-128, hi=127, relu=True)
    >>> r(jnp.array([9, -9], jnp.int32))   # M = 2^30 / 2^32 = 1/4, ties round up
    Array([2, 0], dtype=int8)
  """

  m0: jax.Array
  shift: jax.Array

  def __call__(self, acc: jax.Array) -> jax.Array:
    return arith.requantize_integer(acc, channels(self.m0, acc.ndim),
                                    channels(self.shift, acc.ndim), self.zero_point,
                                    lo=self.lo, hi=self.hi, relu=self.relu)


Requantizer = FbgemmRequant | FloatRequant | IntegerRequant


def lower_requant(requant: Requant, *, x_scale: np.ndarray, w_scale: np.ndarray,
                  y_scale: np.ndarray, y_zero: np.ndarray, bias: np.ndarray, lo: int,
                  hi: int, relu: bool, where: str) -> tuple[Requantizer, np.ndarray | None]:
  """The requantizer of a contraction with input scale S_x, weight scales S_w (per channel
  or ()), output grid (S_y, Z_y on the carrier grid) and float bias b (N,), and the int32
  bias rne(b / (S_x S_w)) that "float" / "integer" add to the accumulator (None for "fbgemm").
  Host side (NumPy): the float32 operations are those fbgemm performs.

  Raises:
    ValueError: naming `where`, when the int32 bias does not fit int32.
  """
  acc_scale = (np.float32(x_scale) * w_scale.astype(np.float32)).astype(np.float32)
  multiplier = (acc_scale / np.float32(y_scale)).astype(np.float32)
  zero = _device.put(np.asarray(y_zero, np.int32))
  if requant is Requant.FBGEMM:
    return FbgemmRequant(bias=_device.put((bias / acc_scale).astype(np.float32)),
                         multiplier=_device.put(multiplier), zero_point=zero, lo=lo, hi=hi,
                         relu=relu), None
  acc_scale64 = np.float64(x_scale) * w_scale.astype(np.float64)
  bias_q = np.rint(bias.astype(np.float64) / acc_scale64)
  if np.any(np.abs(bias_q) > arith.INT32_MAX):
    raise ValueError(f"{where}: the bias does not fit int32 at scale S_x * S_w (max "
                     f"|b / (S_x S_w)| = {np.abs(bias_q).max():.3g}); use requant='fbgemm' "
                     f"(float bias) or recalibrate.")
  if requant is Requant.FLOAT:
    lowered: Requantizer = FloatRequant(multiplier=_device.put(multiplier), zero_point=zero,
                                        lo=lo, hi=hi, relu=relu)
  else:
    m0, r = arith.quantize_multiplier(acc_scale64 / np.float64(y_scale))
    lowered = IntegerRequant(m0=_device.put(m0), shift=_device.put(r), zero_point=zero, lo=lo,
                             hi=hi, relu=relu)
  return lowered, bias_q.astype(np.int64)
