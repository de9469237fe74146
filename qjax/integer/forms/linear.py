"""Integer form of the contractions: Dense and Conv (with or without a folded BatchNorm).

    acc  = sum_k q_x[k] q_w[k, n]              int8 x int8 -> int32 (`arith.matmul` / `conv`)
    acc' = acc + offset                         offset = -Z_x sum_k q_w[k, n] (+ int32 bias)
    q_y  = requant(acc')                        `qjax.integer.requant`: its type is the formula

Weights are symmetric int8 (per output channel or per tensor), held as a `QArray`, the int8
weight type the dynamic path uses too: a Dense kernel (N, K), output channel first (the
fastest int8 GEMM layout of XLA:CPU, see `arith.matmul`; per-channel axis 0), a Conv kernel
HW..IO as in Flax (axis -1). The lowered ops, `Int8Dense` and `Int8Conv`, hold what runs;
their `report` field holds the activation grids and the int32 bias that only reports read
(`qjax.integer.for_serving` drops it).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax import _device
from qjax._struct import static, struct
from qjax.integer import arith
from qjax.integer import kernels
from qjax.integer import requant as rq
from qjax.integer.forms.base import Form, Lowering, WeightRequest, int8_input
from qjax.numerics import QuantSpec
from qjax.qarray import QArray
from qjax.quantizers import points

_PADDINGS = ("SAME", "VALID")


def int8_matrix(kernel: QArray | kernels.PackedWeights) -> kernels.Weights:
  """A Dense-like form's int8 (N, K) weights as `qjax.integer.kernels` takes them."""
  return kernel if isinstance(kernel, kernels.PackedWeights) else kernel.qvalue


@struct
class Int8Dense:
  """A converted Dense: y = requant(x @ kernel^T + offset) on int8 x (..., K).

  Leaves: `kernel` a QArray of int8 (N, K) with its scales (in a serving tree, possibly the
  int8 values alone, pre-packed for the native kernel: `qjax.for_serving`); `offset` int32 (N,) =
  -Z_x sum_k q_w (+ the int32 bias of "float" / "integer"); `requant` the requantizer;
  `report` None or {"input_scale", "input_zero_point", "output_scale", "output_zero_point",
  "bias"} (for reports and `qjax.interop`; zero points on the int8 carrier grid; "bias" is
  the int32 bias of "float" / "integer", already in `offset`).

  Example:
    >>> from qjax.qarray import QArray
    >>> from qjax.numerics import QuantSpec
    >>> w = QArray(jnp.array([[1, 2]], jnp.int8), jnp.float32(0.1), jnp.int32(0),
    ...            QuantSpec(bits=8, signed=True, symmetric=True))
    >>> op = Int8Dense(kernel=w, offset=jnp.zeros(1, jnp.int32),
    ...                requant=rq.FloatRequant(multiplier=jnp.float32(1.0),
    ...                                        zero_point=jnp.int32(0), lo=-128, hi=127,
    ...                                        relu=False))
    >>> op(jnp.array([[3, 4]], jnp.int8))
    Array([[11]], dtype=int8)
  """

  kernel: QArray | kernels.PackedWeights
  offset: jax.Array
  requant: rq.Requantizer
  report: dict | None = None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = int8_input(x, "a converted Dense")
    if x.ndim < 1 or x.shape[-1] != self.kernel.shape[1]:
      raise ValueError(f"the input has shape {x.shape}, but this converted layer takes "
                       f"(..., {self.kernel.shape[1]}) (its int8 kernel is "
                       f"{self.kernel.shape}, (out, in)). Apply the model to inputs of the "
                       f"shape it was converted with.")
    # XLA's dot_general, or the native CPU kernel with the offset and requantization fused
    # (`qjax.integer.kernels.resolve`): the same integers either way.
    return kernels.dense(x, int8_matrix(self.kernel), self.offset, self.requant)


@struct
class Int8Conv:
  """A converted Conv: the input padded with its zero point `pad_value`, int8 correlation
  with `kernel` (HW..IO) -> int32, + offset, requantized. Geometry fields are static;
  `padding` is "SAME", "VALID" or explicit (low, high) pairs. In a serving tree the kernel of
  a 2-D convolution the native kernel runs may be its int8 values alone, pre-packed
  (`qjax.for_serving`).

  Example:
    >>> from qjax.qarray import QArray
    >>> from qjax.numerics import QuantSpec
    >>> w = QArray(jnp.ones((1, 1, 2, 1), jnp.int8), jnp.float32(0.1), jnp.int32(0),
    ...            QuantSpec(bits=8, signed=True, symmetric=True))
    >>> op = Int8Conv(kernel=w, offset=jnp.zeros(1, jnp.int32),
    ...               pad_value=jnp.int32(0),
    ...               requant=rq.FloatRequant(multiplier=jnp.float32(1.0),
    ...                                       zero_point=jnp.int32(0), lo=-128, hi=127,
    ...                                       relu=False),
    ...               strides=(1, 1), padding="VALID", dilation=(1, 1), groups=1)
    >>> op(jnp.full((1, 2, 2, 2), 3, jnp.int8))[0, :, :, 0]
    Array([[6, 6],
           [6, 6]], dtype=int8)
  """

  kernel: QArray | kernels.PackedConvWeights  # packed in a serving tree (`for_serving`)
  offset: jax.Array
  pad_value: jax.Array
  requant: rq.Requantizer
  report: dict | None = None
  strides: tuple[int, ...] = static()
  padding: str | tuple[tuple[int, int], ...] = static()
  dilation: tuple[int, ...] = static()
  groups: int = static()

  def __call__(self, x: jax.Array) -> jax.Array:
    x = int8_input(x, "a converted Conv")
    kernel = (self.kernel if isinstance(self.kernel, kernels.PackedConvWeights)
              else self.kernel.qvalue)
    channels_in = kernel.shape[-2] * self.groups
    if x.ndim not in (kernel.ndim - 1, kernel.ndim) or x.shape[-1] != channels_in:
      raise ValueError(f"the input has shape {x.shape}, but this converted layer takes "
                       f"(batch, {', '.join(['spatial'] * (kernel.ndim - 2))}, "
                       f"{channels_in}) (its int8 kernel is {kernel.shape}, HWIO). Apply the "
                       f"model to inputs of the shape it was converted with.")
    unbatched = x.ndim == kernel.ndim - 1
    if unbatched:
      x = x[None]
    pads = arith.conv_pads(self.padding, x.shape[1:-1], kernel.shape[:-2], self.strides,
                           self.dilation)
    # XLA's convolution, or the native kernel on the patches (`qjax.integer.kernels.conv`):
    # the same integers either way.
    y = kernels.conv(x, kernel, self.offset, self.requant, strides=self.strides, padding=pads,
                     dilation=self.dilation, groups=self.groups, pad_value=self.pad_value)
    return y[0] if unbatched else y


def _tuple(value: Any, n: int, default: int = 1) -> tuple[int, ...]:
  if value is None:
    return (default,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(int(v) for v in value)


def conv_geometry(module: Any) -> dict[str, Any]:
  """The static geometry of an nn.Conv-like module, as `Int8Conv` takes it.

  Raises:
    ValueError: a padding that pads with data ("CIRCULAR", "REFLECT", "CAUSAL": the integer
      path pads with the input's zero point, i.e. with zeros) or an input dilation.
  """
  padding = module.padding
  n = len(module.kernel_size)
  if isinstance(padding, str) and padding.upper() not in _PADDINGS:
    raise ValueError(f"the integer path supports padding 'SAME', 'VALID', an int or "
                     f"(low, high) pairs (zero padding, done with the input's zero point); got "
                     f"padding={padding!r}. Keep this layer in float (qconfig None) or pad "
                     f"with zeros.")
  if any(d != 1 for d in _tuple(module.input_dilation, n)):
    raise ValueError(f"input_dilation is not supported by the integer path; got "
                     f"{module.input_dilation}.")
  if isinstance(padding, str):
    pads: str | tuple[tuple[int, int], ...] = padding.upper()
  elif isinstance(padding, int):
    pads = ((padding, padding),) * n
  else:
    pads = tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)
  return {"strides": _tuple(module.strides, n), "padding": pads,
          "dilation": _tuple(module.kernel_dilation, n),
          "groups": int(module.feature_group_count)}


@dataclasses.dataclass(frozen=True)
class LinearForm(Form):
  """The integer form of QuantDense / QuantConv / QuantDenseBN / QuantConvBN.

  Fields: the layer's weight and output observers, whether its qparams are learned (LSQ),
  a fused ReLU, the BatchNorm epsilon (None: no BatchNorm to fold) and, for a Conv, its
  geometry (`conv_geometry`; None for a Dense).
  """

  weight_observer: Any
  out_observer: Any
  learnable: bool
  relu: bool
  bn_epsilon: float | None = None
  conv: tuple[tuple[str, Any], ...] | None = None

  def weight_request(self, lowering: Lowering) -> WeightRequest:
    params = lowering.subtree("params")
    if self.bn_epsilon is not None:
      from qjax import fuse  # the folded form of QAT Conv+BN layers
      kernel, bias = fuse.folded_kernel_and_bias(params, lowering.subtree("batch_stats"),
                                                 epsilon=self.bn_epsilon)
    else:
      if "kernel" not in params:
        raise ValueError(f"convert: missing params/{lowering.path}/kernel in the variables.")
      kernel, bias = params["kernel"], params.get("bias")
    return WeightRequest(_device.put(kernel, jnp.float32), bias, self.weight_observer,
                         self.learnable)

  def lower(self, lowering: Lowering) -> Int8Dense | Int8Conv:
    path = lowering.path
    (x_grid,), y_grid = lowering.inputs, lowering.output
    assert y_grid is not None and lowering.weight is not None  # convert provides both
    w_spec = self.weight_observer.spec
    for role, spec in (("input", x_grid.spec), ("weight", w_spec), ("output", y_grid.spec)):
      arith.check_int8_spec(spec, name=f"convert: {path} ({role})")
    (w_qp, q_w), request = lowering.weight
    kernel = np.asarray(jax.device_get(request.kernel), np.float32)
    w_scale = np.asarray(jax.device_get(w_qp.scale), np.float32)
    w_zero_grid = np.asarray(jax.device_get(w_qp.zero_point), np.int64)
    check_weight_grid(path, kernel, w_spec, w_scale, w_zero_grid,
                      weight_source(self.weight_observer, self.learnable, lowering.weights))
    shift = arith.int8_shift(w_spec)
    if np.any(w_zero_grid - shift != 0):
      raise ValueError(f"convert: {path}: the integer path needs symmetric weights (zero "
                       f"point 0 on the int8 grid); the weight spec {w_spec} gives zero points "
                       f"{np.unique(w_zero_grid - shift)[:4]}. Use QuantSpec(signed=True, "
                       f"symmetric=True).")
    q_w8 = np.asarray(jax.device_get(q_w), np.int64) - shift
    reduce_axes = tuple(range(q_w8.ndim - 1))
    n_out = kernel.shape[-1]
    bias = (np.zeros(n_out, np.float32) if request.bias is None
            else np.asarray(jax.device_get(request.bias), np.float32))
    offset = -int(x_grid.zero_point) * q_w8.sum(axis=reduce_axes)
    lo, hi = y_grid.bounds
    requant, bias_q = rq.lower_requant(
        lowering.requant, x_scale=x_grid.scale, w_scale=w_scale, y_scale=y_grid.scale,
        y_zero=y_grid.zero_point, bias=bias, lo=lo, hi=hi, relu=self.relu,
        where=f"convert: {path}")
    total = offset if bias_q is None else offset + bias_q
    worst = (arith.accumulator_bound(q_w8, reduce_axes=reduce_axes, input_spec=x_grid.spec)
             + np.abs(offset) + (0 if bias_q is None else np.abs(bias_q)))
    if np.any(worst > arith.INT32_MAX):
      k = int(np.prod(q_w8.shape[:-1]))
      channel = int(np.argmax(worst))
      raise ValueError(
          f"convert: {path}: the int32 accumulator can overflow: with K = {k} products per "
          f"output, output channel {channel} can reach |acc| = {int(worst[channel])} > 2^31 "
          f"- 1 for some int8 input (max|q_x| * sum_k |q_w| + |zero-point offset| + |bias|). "
          f"Split the layer, use fewer weight bits, or keep it in float (qconfig None).")
    report = {"input_scale": _device.put(x_grid.scale),
              "input_zero_point": _device.put(x_grid.zero_point),
              "output_scale": _device.put(y_grid.scale),
              "output_zero_point": _device.put(y_grid.zero_point)}
    if bias_q is not None:
      report["bias"] = _device.put(bias_q, jnp.int32)
    offset32 = _device.put(total, jnp.int32)
    if self.conv is None:  # Dense: output channel first for the int8 GEMM
      return Int8Dense(kernel=int8_weights(q_w8.T, w_scale, w_spec, axis=0), offset=offset32,
                       requant=requant, report=report)
    geometry: dict[str, Any] = dict(self.conv)
    return Int8Conv(kernel=int8_weights(q_w8, w_scale, w_spec, axis=-1), offset=offset32,
                    pad_value=_device.put(x_grid.zero_point, jnp.int32), requant=requant,
                    report=report, **geometry)


def int8_weights(q8: np.ndarray, scale: np.ndarray, spec: QuantSpec, *, axis: int) -> QArray:
  """The int8 weight type of the integer path (static and dynamic): a symmetric QArray of
  `q8` (values already on the int8 carrier) with its per-channel (along `axis`) or per-tensor
  scales; an unsigned spec is stored as its signed counterpart."""
  stored = QuantSpec(bits=spec.bits, signed=True, symmetric=True,
                     narrow_range=spec.narrow_range, axis=axis if spec.per_channel else None)
  scale = np.asarray(scale, np.float32)
  return QArray(_device.put(q8, jnp.int8), _device.put(scale),
                _device.put(np.zeros(scale.shape, np.int32)), stored)


def weight_source(observer: Any, learnable: bool, weights: str) -> str:
  """Where a layer's weight grid comes from, for `check_weight_grid`: "quantizer" (a research
  quantizer's own integers), "learned" (LSQ) or convert's `weights` ("observe", ...)."""
  if isinstance(observer, points.WeightQuantizer):
    return "quantizer"
  return "learned" if learnable else weights


def check_weight_grid(path: str, kernel: np.ndarray, spec: QuantSpec, scale: np.ndarray,
                      zero: np.ndarray, weights: str) -> None:
  """Warn about a kernel that its grid clamps by more than one step somewhere; refuse one it
  clamps by more than a quarter of the grid's width (weights changed after calibration: a
  loaded checkpoint, fine-tuning, a fold); refuse NaN / inf weights. A learned scale
  (`weights="learned"`, LSQ) or a research quantizer's grid (`weights="quantizer"`, which
  clips by its own rule) is the QAT forward's own grid: its clamping is the model's, and
  passes without a word."""
  if not np.all(np.isfinite(kernel)):
    raise ValueError(f"convert: {path}: the kernel holds {int(np.sum(~np.isfinite(kernel)))} "
                     f"NaN or +-inf value(s); an integer kernel needs finite weights.")
  axis_shape = [1] * kernel.ndim
  if spec.per_channel:
    axis_shape[-1] = -1
  with np.errstate(divide="ignore", invalid="ignore"):
    steps = np.rint(kernel.astype(np.float64) / scale.astype(np.float64).reshape(axis_shape)
                    ) + zero.astype(np.float64).reshape(axis_shape)
  beyond = np.maximum(steps - spec.qmax, spec.qmin - steps)
  far = beyond > 1
  if not np.any(far) or weights in ("learned", "quantizer"):
    # A learned (LSQ) scale is the grid the QAT forward clamped these weights on: the int8
    # kernel clamps them the same way, whatever their number.
    return
  # A QAT-trained kernel may pass its moving-average grid by some steps (a BatchNorm fold with
  # the final running variance; its fake-quant forward clamps those weights too, and PyTorch's
  # convert clamps them the same way): a warning. A kernel beyond its grid by more than half
  # the grid's half-range is not the kernel the statistics saw: an error.
  tolerated = max(1.0, 0.5 * (spec.qmax - spec.qmin) / 2)
  what = (f"{path}: {int(far.sum())} of {kernel.size} weights lie outside their grid by "
          f"more than one step (up to {float(beyond.max()):.0f} steps)")
  if float(beyond.max()) <= tolerated:
    warnings.warn(f"convert: {what} and are clamped, as the fake-quant forward clamps them.",
                  stacklevel=4)
    return
  raise ValueError(
      f"convert: {what} and would be clamped; the weight statistics "
      f"({'learned scale' if weights == 'learned' else weights!r}) do not describe the kernel "
      f"being converted (changed after calibration: a loaded checkpoint, fine-tuning, a "
      f"BatchNorm fold). Recalibrate on the final weights, or pass weights='fresh' to observe "
      f"them anew as PyTorch's PTQ convert does.")
