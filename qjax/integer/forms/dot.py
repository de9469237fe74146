"""Integer form of the AQT / Qwix placement: a stock `nn.Dense` / `nn.Conv` whose contraction is
a `QuantDotGeneral` / `QuantConvGeneral` (both operands quantized where they are consumed).

    q_x = quantize(x)                        the contraction's own input grid (S_x, Z_x)
    acc = sum_k q_x q_w + offset             int8 x int8 -> int32, offset = -Z_x sum_k q_w
    y   = f32(acc) * f32(S_x S_w)            float32 out; the stock layer adds its bias

The output is float, as in the fake-quant forward (no output grid: the next layer quantizes its
own input), so these layers chain with float ops freely. The stock layer still creates its
float kernel parameter (Flax checks that it exists and has its shape); the op holds the int8
copy it runs, and does not read the float one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax import _device
from qjax._struct import static, struct
from qjax.integer import arith
from qjax.integer import kernels
from qjax.integer.forms.base import (Form, Lowering, WeightRequest, nonfinite_samples,
                                     with_nan_samples)
from qjax.integer.forms.boundary import MultiplyQuantizeOp, QuantizeOp, quantize_op
from qjax.integer.forms.linear import (check_weight_grid, int8_matrix, int8_weights,
                                       weight_source)
from qjax.qarray import QArray


@struct
class QuantizedDot:
  """x (..., K) float -> quantized on `input`'s grid -> int8 x `kernel` (N, K) -> float32
  f32(acc + offset) * scale, with scale = f32(S_x S_w) per output channel (N,) or ().

  Example:
    >>> from qjax.numerics import QuantSpec
    >>> from qjax.qarray import QArray
    >>> w = QArray(jnp.array([[2, -1]], jnp.int8), jnp.float32(0.5), jnp.int32(0),
    ...            QuantSpec(bits=8, signed=True, symmetric=True))
    >>> op = QuantizedDot(input=QuantizeOp(scale=jnp.float32(0.5), zero_point=jnp.int32(0),
    ...                                    spec=QuantSpec(bits=8, signed=True)),
    ...                   kernel=w,
    ...                   offset=jnp.zeros(1, jnp.int32), scale=jnp.float32(0.25))
    >>> op(jnp.array([[1.0, 2.0]]))   # q_x = (2, 4); 2 * 2 - 4 = 0
    Array([[0.]], dtype=float32)
  """

  input: QuantizeOp | MultiplyQuantizeOp
  kernel: QArray | kernels.PackedWeights  # packed in a serving tree (`qjax.for_serving`)
  offset: jax.Array
  scale: jax.Array

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _device.put(x)
    if x.ndim < 1 or x.shape[-1] != self.kernel.shape[1]:
      raise ValueError(f"the input has shape {x.shape}, but this converted contraction takes "
                       f"(..., {self.kernel.shape[1]}) (its int8 kernel is "
                       f"{self.kernel.shape}, (out, in)).")
    q = self.input(jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype)))
    # XLA's dot_general or the native CPU kernel with the offset fused (`kernels.resolve`).
    acc = kernels.matmul(q, int8_matrix(self.kernel), self.offset)
    scale = self.scale.reshape((1,) * (acc.ndim - 1) + self.scale.shape) if self.scale.ndim else (
        self.scale)
    return with_nan_samples(nonfinite_samples(x), acc.astype(jnp.float32) * scale)


@struct
class QuantizedConv:
  """The convolution counterpart of `QuantizedDot`: x (B, *spatial, C) float -> int8 on
  `input`'s grid, padded with its zero point, int8 correlation with `kernel` (HW..IO) ->
  float32 f32(acc + offset) * scale. Static geometry as `Int8Conv`'s."""

  input: QuantizeOp | MultiplyQuantizeOp
  kernel: QArray
  offset: jax.Array
  scale: jax.Array
  strides: tuple[int, ...] = static()
  padding: str | tuple[tuple[int, int], ...] = static()
  dilation: tuple[int, ...] = static()
  groups: int = static()

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _device.put(x)
    if x.ndim != self.kernel.ndim or x.shape[-1] != self.kernel.shape[-2] * self.groups:
      raise ValueError(f"the input has shape {x.shape}, but this converted convolution takes "
                       f"(batch, *spatial, {self.kernel.shape[-2] * self.groups}) (its int8 "
                       f"kernel is {self.kernel.shape}, HWIO).")
    q = self.input(jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype)))
    pads = arith.conv_pads(self.padding, x.shape[1:-1], self.kernel.shape[:-2], self.strides,
                           self.dilation)
    acc = arith.conv(q, self.kernel.qvalue, strides=self.strides, padding=pads,
                     dilation=self.dilation, feature_group_count=self.groups,
                     pad_value=self.input.zero_point)
    shape = (1,) * (acc.ndim - 1) + (-1,)
    y = (acc + self.offset.reshape(shape)).astype(jnp.float32) * (
        self.scale.reshape(shape) if self.scale.ndim else self.scale)
    return with_nan_samples(nonfinite_samples(x), y)


@dataclasses.dataclass(frozen=True)
class DotForm(Form):
  """The integer form of `QuantDotGeneral` / `QuantConvGeneral` in a stock layer whose float
  kernel is params/<layer>/kernel. `conv` holds a convolution's geometry (NHWC / HWIO
  dimension numbers only), None for a Dense's (..., K) x (K, N) contraction."""

  weight_observer: Any
  learnable: bool
  conv: tuple[tuple[str, Any], ...] | None = None

  def weight_request(self, lowering: Lowering) -> WeightRequest:
    params = lowering.subtree("params")
    if "kernel" not in params:
      raise ValueError(f"convert: missing params/{lowering.path}/kernel (a stock layer with a "
                       f"quantized contraction keeps its float kernel there).")
    return WeightRequest(_device.put(params["kernel"], jnp.float32), None,
                         self.weight_observer, self.learnable, keeps_params=True)

  def lower(self, lowering: Lowering) -> QuantizedDot | QuantizedConv:
    path = lowering.path
    (x_grid,) = lowering.inputs
    assert lowering.weight is not None  # convert provides it
    w_spec = self.weight_observer.spec
    for role, spec in (("input", x_grid.spec), ("weight", w_spec)):
      arith.check_int8_spec(spec, name=f"convert: {path} ({role})")
    (w_qp, q_w), request = lowering.weight
    kernel = np.asarray(jax.device_get(request.kernel), np.float32)
    w_scale = np.asarray(jax.device_get(w_qp.scale), np.float32)
    w_zero = np.asarray(jax.device_get(w_qp.zero_point), np.int64) - arith.int8_shift(w_spec)
    check_weight_grid(path, kernel, w_spec, w_scale, w_zero + arith.int8_shift(w_spec),
                      weight_source(self.weight_observer, self.learnable, lowering.weights))
    if np.any(w_zero != 0):
      raise ValueError(f"convert: {path}: the integer path needs symmetric weights (zero "
                       f"point 0 on the int8 grid); got zero points {np.unique(w_zero)[:4]}.")
    q_w8 = np.asarray(jax.device_get(q_w), np.int64) - arith.int8_shift(w_spec)
    reduce_axes = tuple(range(q_w8.ndim - 1))
    offset = -int(x_grid.zero_point) * q_w8.sum(axis=reduce_axes)
    worst = (arith.accumulator_bound(q_w8, reduce_axes=reduce_axes, input_spec=x_grid.spec)
             + np.abs(offset))
    if np.any(worst > arith.INT32_MAX):
      raise ValueError(f"convert: {path}: the int32 accumulator can overflow (|acc| up to "
                       f"{int(worst.max())} > 2^31 - 1); use fewer weight bits or keep the "
                       f"layer in float.")
    scale = (np.float32(x_grid.scale) * w_scale).astype(np.float32)
    quantize = quantize_op(x_grid)
    offset32, scale32 = _device.put(offset, jnp.int32), _device.put(scale)
    if self.conv is None:
      return QuantizedDot(input=quantize, kernel=int8_weights(q_w8.T, w_scale, w_spec, axis=0),
                          offset=offset32, scale=scale32)
    geometry: dict[str, Any] = dict(self.conv)
    return QuantizedConv(input=quantize, kernel=int8_weights(q_w8, w_scale, w_spec, axis=-1),
                         offset=offset32,
                         scale=scale32, **geometry)
