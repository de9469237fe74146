"""Integer form of the residual add (and add + ReLU) of two quantized tensors on any grids.

PyTorch's quantized add (`FloatFunctional.add` / `add_relu` after convert), requant "fbgemm"
and "float":

    x_i = fma(q_i, S_i, -Z_i S_i)                 float32, one rounding (each input)
    c   = x_a + x_b        (c = max(c, 0) with ReLU)
    q   = clamp(rne(c * f32(1 / S_y)) + Z_y)

and, requant "integer", TFLite's fixed-point add (no float anywhere):

    v_i = mul_shift_round((q_i - Z_i) * 2^20, M_i)   M_i = S_i / (2 max(S_a, S_b)) <= 1/2
    q   = clamp(Z_y + mul_shift_round(v_a + v_b, M_y))   M_y = 2 max(S_a, S_b) / (2^20 S_y)

with each M = m0 / 2^shift (`arith.quantize_multiplier`); a ReLU clamps at Z_y.

The operands broadcast as torch's quantized add's do (a (B, C) tensor plus a (C,) or (B, 1)
one), and every element takes the formula above: torch's vector body, which its kernel runs
on all but the last n mod 64 elements of each contiguous run of the output (its scalar tail
rounds S_i (q_i - Z_i) and c / S_y + Z_y separately, so a tie there can differ by one).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax import _device
from qjax._struct import static, struct
from qjax.integer import arith
from qjax.integer.forms.base import Form, Grid, Lowering, int8_input
from qjax.integer.requant import Requant

LEFT_SHIFT = 20
"""Bits the integer-only add moves each centred input up before rescaling (TFLite's)."""


def _check_pair(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  a, b = int8_input(a, "a quantized add"), int8_input(b, "a quantized add")
  try:
    shape = jnp.broadcast_shapes(a.shape, b.shape)
  except ValueError:
    raise ValueError(f"a quantized add takes two int8 tensors that broadcast to one shape (as "
                     f"torch's quantized add does); got {a.shape} and {b.shape}.") from None
  return jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)


@struct
class Int8Add:
  """PyTorch's quantized add of two int8 tensors (module docstring): `scale` f32 (2,) and
  `premul` f32 (2,) = -Z_i S_i of the inputs, `inv_scale` f32 () = 1 / S_y, `zero_point`
  int32 () = Z_y on the carrier grid; static: the inputs' carrier `shifts`, the output's
  bounds `lo`, `hi`, `relu`.

  Example:
    >>> op = Int8Add(scale=jnp.array([0.5, 0.25], jnp.float32),
    ...              premul=jnp.array([0.0, 0.0], jnp.float32), inv_scale=jnp.float32(2.0),
    ...              zero_point=jnp.int32(0), shifts=(0, 0), lo=-128, hi=127, relu=False)
    >>> op(jnp.array([2, -4], jnp.int8), jnp.array([4, 2], jnp.int8))   # 1 + 1, -2 + 0.5
    Array([ 4, -3], dtype=int8)
  """

  scale: jax.Array
  premul: jax.Array
  inv_scale: jax.Array
  zero_point: jax.Array
  report: dict | None = None
  shifts: tuple[int, int] = static()
  lo: int = static()
  hi: int = static()
  relu: bool = static()

  def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = _check_pair(a, b)
    total = (arith.dequantize_fma(a, self.shifts[0], self.scale[0], self.premul[0])
             + arith.dequantize_fma(b, self.shifts[1], self.scale[1], self.premul[1]))
    if self.relu:
      total = jnp.maximum(total, jnp.float32(0))
    return arith.quantize_reciprocal(total, self.inv_scale, self.zero_point, lo=self.lo,
                                     hi=self.hi)


@struct
class IntegerAdd:
  """The fixed-point add of two int8 tensors (module docstring): input zero points `zero_in`
  int32 (2,), multipliers `m0` / `shift` int32 (2,) and the output's `out_m0`, `out_shift`,
  `zero_point` (carrier grid); static `lo`, `hi`, `relu`.

  Example:
    >>> op = IntegerAdd(zero_in=jnp.zeros(2, jnp.int32),
    ...                 m0=jnp.array([2**30, 2**30], jnp.int32), shift=jnp.array([31, 31]),
    ...                 out_m0=jnp.int32(2**30), out_shift=jnp.int32(49),
    ...                 zero_point=jnp.int32(0), lo=-128, hi=127, relu=False)
    >>> op(jnp.array([3, -5], jnp.int8), jnp.array([4, 1], jnp.int8))  # S_a = S_b = S_y
    Array([ 7, -4], dtype=int8)
  """

  zero_in: jax.Array
  m0: jax.Array
  shift: jax.Array
  out_m0: jax.Array
  out_shift: jax.Array
  zero_point: jax.Array
  report: dict | None = None
  lo: int = static()
  hi: int = static()
  relu: bool = static()

  def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = _check_pair(a, b)
    total = jnp.zeros(a.shape, jnp.int32)
    for i, q in enumerate((a, b)):
      centred = (q.astype(jnp.int32) - self.zero_in[i]) * jnp.int32(2**LEFT_SHIFT)
      total = total + arith.mul_shift_round(centred, self.m0[i], self.shift[i])
    q = arith.mul_shift_round(total, self.out_m0, self.out_shift)
    return arith.clamp_to_int8(q, self.zero_point, self.lo, self.hi, self.relu)


def float_rescale(inputs: tuple[Grid, ...]) -> dict[str, jax.Array]:
  """The per-input float32 leaves of PyTorch's rescale through float: scale and premul."""
  return {"scale": _device.put(np.array([g.scale for g in inputs], np.float32)),
          "premul": _device.put(np.array([g.premul() for g in inputs], np.float32))}


def grid_report(inputs: tuple[Grid, ...], output: Grid) -> dict[str, jax.Array]:
  """The float grids of an op's inputs and output, for reports (zero points on the carrier
  grid)."""
  return {"input_scale": _device.put(np.array([g.scale for g in inputs], np.float32)),
          "input_zero_point": _device.put(np.array([g.zero_point for g in inputs], np.int32)),
          "output_scale": _device.put(output.scale),
          "output_zero_point": _device.put(output.zero_point)}


@dataclasses.dataclass(frozen=True)
class AddForm(Form):
  """The integer form of `qjax.nn.QuantAdd`: two int8 operands, a fused ReLU or none."""

  operands = 2
  relu: bool = False

  def lower(self, lowering: Lowering) -> Int8Add | IntegerAdd:
    a, b = lowering.inputs
    y = lowering.output
    assert y is not None  # an add observes its output
    for role, grid in (("input 0", a), ("input 1", b), ("output", y)):
      arith.check_int8_spec(grid.spec, name=f"convert: {lowering.path} ({role})")
    lo, hi = y.bounds
    report = grid_report((a, b), y)
    zero = _device.put(y.zero_point)
    if lowering.requant is not Requant.INTEGER:
      return Int8Add(**float_rescale((a, b)), inv_scale=_device.put(y.reciprocal()),
                     zero_point=zero, report=report, shifts=(a.shift, b.shift), lo=lo, hi=hi,
                     relu=self.relu)
    twice_max = 2.0 * max(float(a.scale), float(b.scale))
    m0, shift = arith.quantize_multiplier(
        np.array([float(a.scale) / twice_max, float(b.scale) / twice_max]))
    out_m0, out_shift = arith.quantize_multiplier(
        np.float64(twice_max) / (2.0**LEFT_SHIFT * np.float64(y.scale)))
    return IntegerAdd(zero_in=_device.put(np.array([a.zero_point, b.zero_point], np.int32)),
                      m0=_device.put(m0), shift=_device.put(shift), out_m0=_device.put(out_m0),
                      out_shift=_device.put(out_shift), zero_point=zero, report=report, lo=lo,
                      hi=hi, relu=self.relu)
