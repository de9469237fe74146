"""Integer form of the concatenation of quantized tensors on any grids.

PyTorch's quantized cat (`FloatFunctional.cat` after convert) gives the output its own observed
grid. Requant "fbgemm" / "float" reproduce its two kernels, with inv = f32(1 / S_y):

    4-D tensors joined along the channels (its NHWC kernel): an input already on the output
    grid is copied, every other one moved to it as
        q = clamp(rne(f32(fma(q_i, S_i, -Z_i S_i) * inv)) + Z_y)
    any other concatenation (dequantize, cat, torch.quantize_per_tensor):
        q = clamp(rne(fma(f32(S_i (q_i - Z_i)), inv, Z_y)))

and requant "integer" a fixed-point rescale, q = clamp(Z_y + mul_shift_round(q_i - Z_i,
S_i / S_y)) (inputs on the output grid copied).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax import _device
from qjax._struct import static, struct
from qjax.integer import arith
from qjax.integer.forms.add import float_rescale, grid_report
from qjax.integer.forms.base import Form, Lowering, int8_input
from qjax.integer.requant import Requant


def _checked(parts: tuple[jax.Array, ...], n: int) -> tuple[jax.Array, ...]:
  if len(parts) != n:
    raise ValueError(f"this converted concatenation takes {n} int8 tensors; got {len(parts)}.")
  return tuple(int8_input(p, "a quantized concatenation") for p in parts)


@struct
class Int8Concat:
  """PyTorch's quantized cat (module docstring). Per input: `scale`, `zero_in` (carrier
  grid) and `premul` = f32(-Z_i S_i) (Z_i on the grid's own range), (n,) each; `inv_scale`,
  `zero_point` of the output; static `copied` (True where an input's grid is the output's),
  the inputs' carrier `shifts`, the output's `out_shift`, `axis`, `lo`, `hi`.

  Example:
    >>> op = Int8Concat(scale=jnp.array([1.0, 0.5], jnp.float32), zero_in=jnp.zeros(2, jnp.int32),
    ...                 premul=jnp.zeros(2, jnp.float32), inv_scale=jnp.float32(1.0),
    ...                 zero_point=jnp.int32(0), copied=(True, False), shifts=(0, 0),
    ...                 out_shift=0, axis=-1, lo=-128, hi=127)
    >>> op(jnp.array([[3]], jnp.int8), jnp.array([[5]], jnp.int8))   # 5 * 0.5 = 2.5 -> 2
    Array([[3, 2]], dtype=int8)
  """

  scale: jax.Array
  zero_in: jax.Array
  premul: jax.Array
  inv_scale: jax.Array
  zero_point: jax.Array
  report: dict | None = None
  copied: tuple[bool, ...] = static()
  shifts: tuple[int, ...] = static()
  out_shift: int = static()
  axis: int = static()
  lo: int = static()
  hi: int = static()

  def __call__(self, *parts: jax.Array) -> jax.Array:
    parts = _checked(parts, len(self.copied))
    channels_last = parts[0].ndim == 4 and self.axis in (3, -1)
    moved = []
    for i, (p, same, shift) in enumerate(zip(parts, self.copied, self.shifts, strict=True)):
      if channels_last and not same:
        p = arith.quantize_reciprocal(
            arith.dequantize_fma(p, shift, self.scale[i], self.premul[i]), self.inv_scale,
            self.zero_point, lo=self.lo, hi=self.hi)
      elif not channels_last:
        p = arith.quantize_fused(
            arith.dequantize_product(p, self.scale[i], self.zero_in[i]), self.inv_scale,
            self.zero_point, self.out_shift, lo=self.lo, hi=self.hi)
      moved.append(p)
    return jnp.concatenate(moved, axis=self.axis)


@struct
class IntegerConcat:
  """The fixed-point concatenation (module docstring): per input `zero_in`, `m0`, `shift`
  int32 (n,) (M_i = S_i / S_y), the output's `zero_point`; static `copied`, `axis`, `lo`,
  `hi`.

  Example:
    >>> op = IntegerConcat(zero_in=jnp.zeros(2, jnp.int32), m0=jnp.full(2, 2**30, jnp.int32),
    ...                    shift=jnp.array([30, 31], jnp.int32), zero_point=jnp.int32(0),
    ...                    copied=(True, False), axis=0, lo=-128, hi=127)
    >>> op(jnp.array([3], jnp.int8), jnp.array([5], jnp.int8))   # 5 / 2 = 2.5 -> 3 (ties up)
    Array([3, 3], dtype=int8)
  """

  zero_in: jax.Array
  m0: jax.Array
  shift: jax.Array
  zero_point: jax.Array
  report: dict | None = None
  copied: tuple[bool, ...] = static()
  axis: int = static()
  lo: int = static()
  hi: int = static()

  def __call__(self, *parts: jax.Array) -> jax.Array:
    parts = _checked(parts, len(self.copied))
    moved = []
    for i, (p, same) in enumerate(zip(parts, self.copied, strict=True)):
      if not same:
        centred = p.astype(jnp.int32) - self.zero_in[i]
        p = arith.clamp_to_int8(arith.mul_shift_round(centred, self.m0[i], self.shift[i]),
                                self.zero_point, self.lo, self.hi, relu=False)
      moved.append(p)
    return jnp.concatenate(moved, axis=self.axis)


@dataclasses.dataclass(frozen=True)
class ConcatForm(Form):
  """The integer form of `qjax.nn.QuantConcat`: any number of int8 operands along `axis`."""

  operands = None
  axis: int = -1

  def lower(self, lowering: Lowering) -> Int8Concat | IntegerConcat:
    inputs, y = lowering.inputs, lowering.output
    assert y is not None  # a concatenation observes its output
    for i, grid in enumerate(inputs):
      arith.check_int8_spec(grid.spec, name=f"convert: {lowering.path} (input {i})")
    arith.check_int8_spec(y.spec, name=f"convert: {lowering.path} (output)")
    copied = tuple(g.same_as(y) for g in inputs)
    lo, hi = y.bounds
    report = grid_report(inputs, y)
    zero = _device.put(y.zero_point)
    if lowering.requant is not Requant.INTEGER:
      return Int8Concat(**float_rescale(inputs),
                        zero_in=_device.put(np.array([g.zero_point for g in inputs], np.int32)),
                        inv_scale=_device.put(y.reciprocal()), zero_point=zero, report=report,
                        copied=copied, shifts=tuple(g.shift for g in inputs),
                        out_shift=y.shift, axis=self.axis, lo=lo, hi=hi)
    ratios = np.array([np.float64(g.scale) / np.float64(y.scale) for g in inputs])
    m0, shift = arith.quantize_multiplier(ratios)
    return IntegerConcat(zero_in=_device.put(np.array([g.zero_point for g in inputs], np.int32)),
                         m0=_device.put(m0), shift=_device.put(shift), zero_point=zero,
                         report=report, copied=copied, axis=self.axis, lo=lo, hi=hi)
