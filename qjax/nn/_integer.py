"""Mode "int8" of qjax's modules: run a converted layer from the "int8" collection.

The variables are what `qjax.convert` writes (see its docstring); zero points there are on
the int8 carrier grid (`qjax.int8.int8_shift`). Each function takes the calling module, reads
its variables and calls the pure math of `qjax.int8`; none creates variables.

Non-finite inputs. An int8 tensor has no NaN, so `Quantize` records which samples (entries
along the leading axis) of the float input hold a NaN or +-inf, and every `Dequantize` of the
same `apply` returns NaN for those samples: the float, dynamic and int8 paths agree on a
non-finite sample (NaN out, eager or jitted) and leave the other samples alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax import int8
from qjax.nn import _trace
from qjax.numerics import QuantSpec

INT8 = int8.COLLECTION


def _vars(module: nn.Module, where: str) -> Mapping[str, Any]:
  tree = module.variables.get(INT8)
  if not tree:
    raise ValueError(f"{where}: mode='int8' needs this module's integer variables, but the "
                     f"'{INT8}' collection has none at this path. Convert the calibrated model "
                     f"first: int_vars = qjax.convert.convert(model, variables, x), then "
                     f"model.apply(int_vars, x, mode='int8').")
  return tree


def _int8_input(x: Any, where: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype != jnp.int8:
    raise TypeError(f"{where}: in mode 'int8' a quantized layer takes the int8 output of a "
                    f"Quantize or of another quantized layer; got {x.dtype}. Put a "
                    f"qjax.nn.Quantize before the first quantized layer.")
  return x


# Per `apply` (its root scope, alive for that call only): the non-finite-sample masks of the
# Quantize boundaries run so far.
_NONFINITE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _nonfinite_samples(x: jax.Array) -> jax.Array:
  """(N,) bool, True where sample i of x (leading axis) holds a NaN or +-inf; () for x of
  rank <= 1 (one sample)."""
  bad = ~jnp.isfinite(x)
  return jnp.any(bad, axis=tuple(range(1, x.ndim))) if x.ndim >= 2 else jnp.any(bad)


def _with_nonfinite_samples(module: nn.Module, y: jax.Array) -> jax.Array:
  """y with NaN for the samples whose model input was not finite."""
  root = module.scope.root  # type: ignore[union-attr]  # bound in apply: its scope is set
  for mask in _NONFINITE.get(root, ()):
    if mask.ndim == 1 and y.ndim >= 1 and y.shape[0] == mask.shape[0]:
      mask = mask.reshape(mask.shape + (1,) * (y.ndim - 1))
    else:  # the batch axis is not recognisable: any non-finite input spoils everything
      mask = jnp.any(mask)
    y = jnp.where(mask, jnp.asarray(jnp.nan, y.dtype), y)
  return y


def quantize(module: nn.Module, spec: QuantSpec, x: jax.Array, where: str) -> jax.Array:
  """The model's input boundary: float x -> int8 on the calibrated input grid."""
  v = _vars(module, where)
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    root = module.scope.root  # type: ignore[union-attr]  # bound in apply: its scope is set
    _NONFINITE.setdefault(root, []).append(_nonfinite_samples(x))
    x = jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))  # masked at Dequantize
  zero_point = v["zero_point"] + jnp.int32(int8.int8_shift(spec))  # back on spec's own grid
  return int8.quantize_input(x, spec, v["scale"], zero_point)


def dequantize(module: nn.Module, x: jax.Array, where: str) -> jax.Array:
  """The output boundary: int8 -> float32 with the producer's grid (NaN for the samples
  whose input was not finite)."""
  v = _vars(module, where)
  y = int8.dequantize_output(_int8_input(x, where), v["scale"], v["zero_point"])
  return _with_nonfinite_samples(module, y)


def is_relu(activation: Callable | None) -> bool:
  return activation is nn.relu or activation is jax.nn.relu


def check_activation(activation: Callable | None, where: str) -> bool:
  """True for a fused ReLU, False for none; a ValueError for anything the path cannot fuse."""
  if activation is None:
    return False
  if is_relu(activation):
    return True
  name = getattr(activation, "__name__", repr(activation))
  raise ValueError(f"{where}: the integer path fuses only ReLU (activation=nn.relu) or no "
                   f"activation into a layer, as PyTorch's LinearReLU / ConvReLU2d; got "
                   f"activation={name}. Keep this layer in float (qconfig None) or train with "
                   f"ReLU.")


def has_integer_form(qconfig: Any) -> bool:
  """A layer converts to the integer path when both its weight and its output are observed
  (qconfig None, or a None observer, leaves it in float, as in PyTorch)."""
  return not (qconfig is None or qconfig.weight is None or qconfig.activation is None)


def mark_layer_input(module: nn.Module, qconfig: Any, inputs: jax.Array, *, kind: str,
                     where: str, **info: Any) -> jax.Array:
  """Marks a layer's input for `qjax.convert`: read as int8 by a layer with an integer form
  (whose fused activation must then be ReLU or none), as float otherwise."""
  path = "/".join(str(p) for p in module.path)
  if not has_integer_form(qconfig):
    return _trace.mark(inputs, role="float_in", path=path, kind=kind)
  if _trace.active():  # convert: refuse what the integer path cannot run, naming the layer
    check_activation(module.activation, where)
    if hasattr(module, "kernel_size"):
      check_conv_fields(module, where)
  return _trace.mark(inputs, role="in", path=path, kind=kind, relu=is_relu(module.activation),
                     weight_observer=qconfig.weight, out_observer=qconfig.activation,
                     learnable=qconfig.learnable, **info)


def mark_layer_output(module: nn.Module, qconfig: Any, y: jax.Array) -> jax.Array:
  """Marks a layer's output as a quantized tensor (when the layer has an integer form)."""
  if not has_integer_form(qconfig):
    return y
  path = "/".join(str(p) for p in module.path)
  return _trace.mark(y, role="out", path=path, spec=qconfig.activation.spec,
                     observer=qconfig.activation, learnable=qconfig.learnable, point="output")


def run_layer(module: nn.Module, qconfig: Any, inputs: jax.Array, *, is_dense: bool,
              where: str) -> jax.Array:
  """Mode "int8" of a converted Dense (`is_dense`) or Conv layer."""
  run = dense if is_dense else conv
  return run(module, qconfig.activation.spec, inputs, where)


def _requantize(v: Mapping[str, Any], acc: jax.Array, out_spec: QuantSpec, relu: bool) -> jax.Array:
  lo, hi = int8.int8_bounds(out_spec)

  def channels(a: jax.Array) -> jax.Array:  # (N,) broadcast along acc's last axis, explicitly
    return a.reshape((1,) * (acc.ndim - 1) + a.shape) if a.ndim == 1 else a

  zero_point = v["output"]["zero_point"]
  r = {name: channels(value) for name, value in v["requant"].items()}
  acc = acc + channels(v["offset"])
  if "bias" in r:  # "fbgemm": float bias on the accumulator's scale
    return int8.requantize_fbgemm(acc, r["bias"], r["multiplier"], zero_point, lo=lo, hi=hi,
                                  relu=relu)
  if "bias" in v:  # absent in `qjax.convert.for_serving`'s trees: folded into the offset
    acc = acc + channels(v["bias"])
  if "m0" in r:
    return int8.requantize_integer(acc, r["m0"], r["shift"], zero_point, lo=lo, hi=hi,
                                   relu=relu)
  return int8.requantize_float(acc, r["multiplier"], zero_point, lo=lo, hi=hi, relu=relu)


def _kernel(v: Mapping[str, Any]) -> jax.Array:
  """The int8 kernel: a QArray's values, or the bare array of a serving tree."""
  kernel = v["kernel"]
  return getattr(kernel, "qvalue", kernel)


def dense(module: nn.Module, out_spec: QuantSpec, x: jax.Array, where: str) -> jax.Array:
  """A converted Dense: int8 x int8 -> int32, + offset + bias, requantized to int8."""
  v = _vars(module, where)
  relu = check_activation(module.activation, where)
  x = _int8_input(x, where)
  kernel = _kernel(v)
  if x.ndim < 1 or x.shape[-1] != kernel.shape[1]:
    raise ValueError(f"{where}: the input has shape {x.shape}, but this converted layer takes "
                     f"(..., {kernel.shape[1]}) (its int8 kernel is {kernel.shape}, (out, in)). "
                     f"Apply the model to inputs of the shape it was converted with.")
  acc = int8.matmul(x, kernel)
  return _requantize(v, acc, out_spec, relu)


def _tuple(value: Any, n: int, default: int = 1) -> tuple[int, ...]:
  if value is None:
    return (default,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(int(v) for v in value)


_PADDINGS = ("SAME", "VALID")


def check_conv_fields(module: nn.Module, where: str) -> None:
  """Refuse a convolution the integer path cannot run: it pads with the input's zero point,
  which is zero padding ("SAME", "VALID", an int or (low, high) pairs; "CIRCULAR", "REFLECT"
  and "CAUSAL" pad with data), and it has no input dilation."""
  padding = module.padding
  if isinstance(padding, str) and padding.upper() not in _PADDINGS:
    raise ValueError(f"{where}: the integer path supports padding 'SAME', 'VALID', an int or "
                     f"(low, high) pairs (zero padding, done with the input's zero point); got "
                     f"padding={padding!r}. Keep this layer in float (qconfig None) or pad "
                     f"with zeros.")
  if any(d != 1 for d in _tuple(module.input_dilation, len(module.kernel_size))):
    raise ValueError(f"{where}: input_dilation is not supported by the integer path; got "
                     f"{module.input_dilation}.")


def conv_geometry(module: nn.Module, in_spatial: tuple[int, ...], where: str) -> dict:
  """strides, explicit pads, dilation and groups of an nn.Conv-like module."""
  check_conv_fields(module, where)
  window = tuple(module.kernel_size)
  n = len(window)
  strides = _tuple(module.strides, n)
  dilation = _tuple(module.kernel_dilation, n)
  padding = module.padding
  if isinstance(padding, str):
    pads = int8.conv_pads(padding.upper(), in_spatial, window, strides, dilation)
  elif isinstance(padding, int):
    pads = ((padding, padding),) * n
  else:
    pads = tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)
  return {"strides": strides, "padding": pads, "dilation": dilation,
          "feature_group_count": int(module.feature_group_count)}


def conv(module: nn.Module, out_spec: QuantSpec, x: jax.Array, where: str) -> jax.Array:
  """A converted Conv: padding with the input's zero point, int8 correlation -> int32,
  + offset + bias, requantized to int8."""
  v = _vars(module, where)
  relu = check_activation(module.activation, where)
  x = _int8_input(x, where)
  kernel = _kernel(v)
  unbatched = x.ndim == kernel.ndim - 1
  if x.ndim not in (kernel.ndim - 1, kernel.ndim) or x.shape[-1] != kernel.shape[-2] * int(
      module.feature_group_count):
    raise ValueError(f"{where}: the input has shape {x.shape}, but this converted layer takes "
                     f"(batch, {', '.join(['spatial'] * (kernel.ndim - 2))}, "
                     f"{kernel.shape[-2] * int(module.feature_group_count)}) (its int8 kernel "
                     f"is {kernel.shape}, HWIO). Apply the model to inputs of the shape it was "
                     f"converted with.")
  if unbatched:
    x = x[None]
  geometry = conv_geometry(module, x.shape[1:-1], where)
  acc = int8.conv(x, kernel, pad_value=v["input"]["zero_point"], **geometry)
  y = _requantize(v, acc, out_spec, relu)
  return y[0] if unbatched else y
