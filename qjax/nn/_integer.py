"""What qjax's Flax modules do with integer forms: mark for `qjax.convert`, run in mode "int8".

A module marks its inputs with its integer form (`qjax.integer.forms`) while convert traces
the float forward; in mode "int8" it reads its lowered op from converted/<path>/op and calls
it. The op's type is the arithmetic; nothing here depends on which op it is.

Non-finite inputs. An int8 tensor has no NaN, so `Quantize` records which samples (entries
along the leading axis) of the float input hold a NaN or +-inf, and every `Dequantize` of the
same `apply` returns NaN for those samples: the float, dynamic and int8 paths agree on a
non-finite sample (NaN out, eager or jitted) and leave the other samples alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.integer.forms import base
from qjax.integer.forms.boundary import DequantizeOp, MultiplyQuantizeOp, QuantizeOp
from qjax.integer.forms.concat import Int8Concat, IntegerConcat
from qjax.integer.forms.linear import Int8Conv, Int8Dense, LinearForm, conv_geometry

COLLECTION = base.COLLECTION


def lowered_op(module: nn.Module, where: str, expected: type | tuple[type, ...]) -> Any:
  """The module's lowered op (converted/<path>/op), checked to be of the `expected` type."""
  tree = module.variables.get(COLLECTION)
  if not tree or base.OP not in tree:
    raise ValueError(f"{where}: mode='int8' needs this module's integer op, but the "
                     f"'{COLLECTION}' collection has none at this path. Convert the calibrated "
                     f"model first: int_vars = qjax.convert(model, variables, x), then "
                     f"model.apply(int_vars, x, mode='int8').")
  op = tree[base.OP]
  if not isinstance(op, expected):
    names = (expected if isinstance(expected, tuple) else (expected,))
    raise TypeError(f"{where}: the '{COLLECTION}' collection holds a {type(op).__name__} at "
                    f"this path; this module runs a {' or '.join(t.__name__ for t in names)}. "
                    f"Were the variables converted from another model?")
  return op


def run(module: nn.Module, where: str, expected: type | tuple[type, ...],
        *inputs: Any) -> jax.Array:
  """Mode "int8": the module's lowered op applied to its int8 inputs (errors name `where`)."""
  op = lowered_op(module, where, expected)
  try:
    return op(*inputs)
  except (ValueError, TypeError) as err:
    if str(err).startswith(where + ":"):
      raise
    raise type(err)(f"{where}: {err}") from err


# Per `apply` (its root scope, alive for that call only): the non-finite-sample masks of the
# Quantize boundaries run so far.
_NONFINITE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _with_nonfinite_samples(module: nn.Module, y: jax.Array) -> jax.Array:
  """y with NaN for the samples whose model input was not finite."""
  root = module.scope.root  # type: ignore[union-attr]  # bound in apply: its scope is set
  for mask in _NONFINITE.get(root, ()):
    y = base.with_nan_samples(mask, y)
  return y


def quantize(module: nn.Module, x: jax.Array, where: str) -> jax.Array:
  """A Quantize point in mode "int8": float x -> int8 on the calibrated grid (an int8 x is
  moved to that grid)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.int8:
    return run(module, where, (Int8Concat, IntegerConcat), x)
  op = lowered_op(module, where, (QuantizeOp, MultiplyQuantizeOp))
  if jnp.issubdtype(x.dtype, jnp.inexact):
    root = module.scope.root  # type: ignore[union-attr]  # bound in apply: its scope is set
    if isinstance(op, QuantizeOp):
      q, bad = op.with_nonfinite_samples(x)
    else:
      bad = base.nonfinite_samples(x)
      q = op(jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype)))
    _NONFINITE.setdefault(root, []).append(bad)  # those samples are NaN at Dequantize
    return q
  return op(x)


def dequantize(module: nn.Module, x: jax.Array, where: str) -> jax.Array:
  """A Dequantize boundary in mode "int8": int8 -> float32 with the producer's grid (NaN for
  the samples whose input was not finite)."""
  root = module.scope.root  # type: ignore[union-attr]  # bound in apply: its scope is set
  masks = _NONFINITE.get(root, ())
  if len(masks) == 1:  # one model input: its mask goes into the dequantization
    return run(module, where, DequantizeOp, x, masks[0])
  return _with_nonfinite_samples(module, run(module, where, DequantizeOp, x))


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


def mark_layer_input(module: nn.Module, qconfig: Any, inputs: jax.Array, *, where: str,
                     bn_epsilon: float | None = None) -> jax.Array:
  """Marks a Dense / Conv layer's input for `qjax.convert` with its `LinearForm` (read as
  float when the layer has no integer form)."""
  if not has_integer_form(qconfig):
    return base.mark_input(module, inputs, None)
  if not base.tracing():  # the form is built only when convert looks
    return inputs
  # convert is tracing: refuse what the integer path cannot run, naming the layer
  relu = check_activation(module.activation, where)
  geometry = None
  if hasattr(module, "kernel_size"):
    try:
      geometry = tuple(sorted(conv_geometry(module).items()))
    except ValueError as err:
      raise ValueError(f"{where}: {err}") from err
  form = LinearForm(weight_observer=qconfig.weight, out_observer=qconfig.activation,
                    learnable=qconfig.learnable, relu=relu, bn_epsilon=bn_epsilon,
                    conv=geometry)
  return base.mark_input(module, inputs, form)


def mark_layer_output(module: nn.Module, qconfig: Any, y: jax.Array) -> jax.Array:
  """Marks a layer's output as a quantized tensor (when the layer has an integer form)."""
  if not has_integer_form(qconfig):
    return y
  return base.mark_output(module, y, observer=qconfig.activation,
                          learnable=qconfig.learnable, point="output")


def run_layer(module: nn.Module, inputs: jax.Array, where: str) -> jax.Array:
  """Mode "int8" of a converted Dense / Conv (its Int8Dense / Int8Conv)."""
  check_activation(module.activation, where)
  return run(module, where, Int8Conv if hasattr(module, "kernel_size") else Int8Dense, inputs)
