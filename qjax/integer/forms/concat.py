"""Integer form of the concatenation of quantized tensors on any grids.

PyTorch's quantized cat (`FloatFunctional.cat` after convert) gives the output its own observed
grid; an input already on that grid is copied, every other one is moved to it:

    "fbgemm" / "float"   q = clamp(rne(fma(q_i, S_i, -Z_i S_i) * f32(1 / S_y)) + Z_y)
    "integer"            q = clamp(Z_y + mul_shift_round(q_i - Z_i, S_i / S_y))

(the first is PyTorch's dequantize -> cat -> quantize, the second a fixed-point rescale).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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
  """PyTorch's quantized cat (module docstring). Per input: `scale`, `premul` f32 (n,) as in
  `Int8Add`; `inv_scale`, `zero_point` of the output; static `copied` (True where an input's
  grid is the output's: copied as is), the inputs' carrier `shifts`, `axis`, `lo`, `hi`.

  Example:
    >>> op = Int8Concat(scale=jnp.array([1.0, 0.5], jnp.float32),
    ...                 premul=jnp.zeros(2, jnp.float32), inv_scale=jnp.float32(1.0),
    ...                 zero_point=jnp.int32(0), copied=(True, False), shifts=(0, 0), axis=-1,
    ...                 lo=-128, hi=127)
    >>> op(jnp.array([[3]], jnp.int8), jnp.array([[5]], jnp.int8))   # 5 * 0.5 = 2.5 -> 2
    Array([[3, 2]], dtype=int8)
  """

  scale: jax.Array
  premul: jax.Array
  inv_scale: jax.Array
  zero_point: jax.Array
  report: dict | None = None
  copied: tuple[bool, ...] = static()
  shifts: tuple[int, ...] = static()
  axis: int = static()
  lo: int = static()
  hi: int = static()

  def __call__(self, *parts: jax.Array) -> jax.Array:
    parts = _checked(parts, len(self.copied))
    moved = [p if same else arith.quantize_reciprocal(
        arith.dequantize_fma(p, shift, self.scale[i], self.premul[i]), self.inv_scale,
        self.zero_point, lo=self.lo, hi=self.hi)
             for i, (p, same, shift) in enumerate(zip(parts, self.copied, self.shifts,
                                                      strict=True))]
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
    zero = jnp.asarray(y.zero_point)
    if lowering.requant is not Requant.INTEGER:
      return Int8Concat(**float_rescale(inputs), inv_scale=jnp.asarray(y.reciprocal()),
                        zero_point=zero, report=report, copied=copied,
                        shifts=tuple(g.shift for g in inputs), axis=self.axis, lo=lo, hi=hi)
    ratios = np.array([np.float64(g.scale) / np.float64(y.scale) for g in inputs])
    m0, shift = arith.quantize_multiplier(ratios)
    return IntegerConcat(zero_in=jnp.asarray(np.array([g.zero_point for g in inputs], np.int32)),
                         m0=jnp.asarray(m0), shift=jnp.asarray(shift), zero_point=zero,
                         report=report, copied=copied, axis=self.axis, lo=lo, hi=hi)
