"""Integer forms of the boundaries: Quantize (float -> int8) and Dequantize (int8 -> float).

    Quantize    q8 = clamp(rne(x / S) + Z, lo, hi) - shift   (`arith.quantize_input`)
    Dequantize  y  = S * (q8 - Z8)                           float32

A Quantize may sit anywhere: on a float tensor (the model input, after a Dequantize and float
ops) it starts an integer region with its own observed grid, as PyTorch's QuantStub does; on
an int8 tensor it moves the values to its grid, as a one-input concatenation does
(`qjax.integer.forms.concat`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from qjax import _device
from qjax._struct import static, struct
from qjax.integer import arith
from qjax.integer import kernels
from qjax.integer.forms.base import (ActivationGrid, Form, Lowering, int8_input,
                                     with_nan_samples)
from qjax.numerics import QuantSpec


@struct
class QuantizeOp:
  """Float -> int8 on a calibrated grid (`scale`, `zero_point` on the carrier grid).

  Example:
    >>> op = QuantizeOp(scale=jnp.float32(0.5), zero_point=jnp.int32(-128),
    ...                 spec=QuantSpec(bits=8, signed=False))
    >>> op(jnp.array([0.0, 1.0, 200.0]))
    Array([-128, -126,  127], dtype=int8)
  """

  scale: jax.Array
  zero_point: jax.Array
  spec: QuantSpec = static()

  def __call__(self, x: jax.Array) -> jax.Array:
    zero_point = self.zero_point + jnp.int32(arith.int8_shift(self.spec))  # the spec's grid
    # XLA, or the rounding and narrowing on the native kernel: the same integers.
    return kernels.quantize_input(x, self.spec, self.scale, zero_point)

  def with_nonfinite_samples(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(self(x with its NaN / +-inf read as 0), the mask of x's non-finite samples), in one
    pass over x on a native path (`kernels.quantize_samples`)."""
    zero_point = self.zero_point + jnp.int32(arith.int8_shift(self.spec))
    return kernels.quantize_samples(x, self.spec, self.scale, zero_point)


@struct
class MultiplyQuantizeOp:
  """Float -> int8 on a research quantizer's grid (DoReFa, WRPN, PACT), rounded as those
  quantizers round: q8 = clamp(rne(x * inverse), lo, hi) + Z - shift, with `inverse` the
  float32 n / alpha they multiply by (n = 2^k - 1; alpha = 1 for DoReFa and WRPN). Dividing
  by the scale alpha / n instead would round differently where x n / alpha is a tie (pixels
  of 0.5 at n = 15, say).

  Example:
    >>> op = MultiplyQuantizeOp(inverse=jnp.float32(15.0), zero_point=jnp.int32(0),
    ...                         spec=QuantSpec(bits=4, signed=False))
    >>> op(jnp.array([-1.0, 0.5, 0.7, 3.0]))
    Array([ 0,  8, 10, 15], dtype=int8)
  """

  inverse: jax.Array
  zero_point: jax.Array
  spec: QuantSpec = static()

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _device.put(x)
    lo, hi = arith.int8_bounds(self.spec)
    shift = arith.int8_shift(self.spec)
    zero = self.zero_point + jnp.int32(shift)  # on the spec's own grid
    top = jnp.float32(hi + shift) - zero.astype(jnp.float32)
    bottom = jnp.float32(lo + shift) - zero.astype(jnp.float32)
    scaled = jnp.nan_to_num(x.astype(jnp.float32) * self.inverse, nan=0.0)
    q = jnp.round(jnp.clip(scaled, bottom, top)).astype(jnp.int32) + zero
    return (q - jnp.int32(shift)).astype(jnp.int8)


def quantize_op(grid: Any) -> QuantizeOp | MultiplyQuantizeOp:
  """The op that quantizes a float tensor onto `grid` (a `forms.base.Grid`): by the research
  quantizer's multiplication where the grid has an `inverse`, else as `qjax.quantize`."""
  if grid.inverse is not None:
    return MultiplyQuantizeOp(inverse=_device.put(grid.inverse, jnp.float32),
                              zero_point=_device.put(grid.zero_point), spec=grid.spec)
  return QuantizeOp(scale=_device.put(grid.scale), zero_point=_device.put(grid.zero_point),
                    spec=grid.spec)


@struct
class DequantizeOp:
  """int8 -> float32 with the producer's grid: y = scale * (q8 - zero_point).

  Example:
    >>> DequantizeOp(scale=jnp.float32(0.5), zero_point=jnp.int32(2))(jnp.array([4], jnp.int8))
    Array([1.], dtype=float32)
  """

  scale: jax.Array
  zero_point: jax.Array

  def __call__(self, x: jax.Array, bad: jax.Array | None = None) -> jax.Array:
    """y, with NaN in the samples `bad` marks (a `nonfinite_samples` mask: () or one flag a
    sample); on a native path one kernel call (`kernels.dequantize_rows`)."""
    x = int8_input(x, "a Dequantize")
    if jnp.size(self.scale) == 1 and jnp.size(self.zero_point) == 1:
      if bad is not None and not (bad.ndim == 0 or (x.ndim >= 2 and bad.shape == x.shape[:1])):
        bad = jnp.any(bad)  # samples along another axis: any marked one marks all of y
      return kernels.dequantize_rows(x, self.scale, self.zero_point, bad)
    y = arith.dequantize_output(x, self.scale, self.zero_point)
    return y if bad is None else with_nan_samples(bad, y)


@dataclasses.dataclass(frozen=True)
class QuantizeForm(Form):
  """The integer form of `qjax.nn.Quantize`: a float input is quantized (`QuantizeOp`), an
  int8 one requantized to the point's grid (`Int8Concat` / `IntegerConcat` of one input)."""

  float_input = True

  def lower(self, lowering: Lowering) -> Any:
    if lowering.inputs:
      from qjax.integer.forms.concat import ConcatForm  # the requantization of one input
      return ConcatForm(axis=-1).lower(lowering)
    grid = lowering.output
    assert grid is not None  # a Quantize marks its output
    arith.check_int8_spec(grid.spec, name=f"convert: {lowering.path}")
    return quantize_op(grid)


@dataclasses.dataclass(frozen=True)
class DequantizeForm(Form):
  """The integer form of `qjax.nn.Dequantize`: the producer's grid."""

  def lower(self, lowering: Lowering) -> DequantizeOp:
    grid: ActivationGrid = lowering.inputs[0].lowered()
    return DequantizeOp(scale=grid.scale, zero_point=grid.zero_point)
