"""What every integer form shares: the collection, activation grids, marks and the protocol.

An integer form is one operation kind's path from a float model to integers, in one class:

  mark    while `qjax.convert` traces the float forward, the Flax module passes each input
          through `mark_input(..., form=<its form>)` and its output through `mark_output`;
          the form instance carries what lowering needs to know about the module (its
          observers, fused ReLU, geometry).
  lower   `form.lower(lowering)` turns the calibrated float state into a typed pytree (a
          `qjax._struct.struct`): integers, the requantizer, the grids. Convert writes it to
          converted/<module path>/op.
  run     in mode "int8" the module calls that object: `op(*int8_inputs)`. Its type selects
          the arithmetic; there is no dispatch on strings or dict keys.

A new operation kind is a new form and struct in one file, plus the Flax module that marks
and runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from qjax import _device
from qjax._struct import struct
from qjax.integer import _trace
from qjax.integer import arith
from qjax.integer.requant import Requant
from qjax.numerics import QParams, QuantSpec
from qjax.quantizers import points

COLLECTION = "converted"
"""Name of the variables collection that holds a converted model's integer operations."""

OP = "op"
"""Name of the variable that holds a module's lowered operation in COLLECTION."""


@dataclasses.dataclass(frozen=True)
class Grid:
  """A quantized activation's grid during lowering (host side): its spec, float32 scale
  (a scalar: activations are per tensor) and zero point on the int8 carrier grid."""

  spec: QuantSpec
  scale: np.ndarray
  zero_point: np.ndarray
  inverse: np.ndarray | None = None
  """A research quantizer's float32 multiplier n / alpha, by which float inputs are quantized
  onto this grid (None: divided by the scale, as `qjax.quantize` does)."""

  @classmethod
  def of(cls, spec: QuantSpec, qparams: QParams, inverse: Any = None) -> Grid:
    scale = np.asarray(jax.device_get(qparams.scale), np.float32)
    zero = np.asarray(jax.device_get(qparams.zero_point), np.int64) - arith.int8_shift(spec)
    if inverse is not None:
      inverse = np.asarray(jax.device_get(inverse), np.float32)
    return cls(spec, scale, zero.astype(np.int32), inverse)

  @property
  def shift(self) -> int:
    """What was subtracted from the spec's integers to carry them as int8 (128 or 0)."""
    return arith.int8_shift(self.spec)

  @property
  def bounds(self) -> tuple[int, int]:
    """The grid's clamp range on the carrier (`arith.int8_bounds`)."""
    return arith.int8_bounds(self.spec)

  def same_as(self, other: Grid) -> bool:
    """Whether both grids give every int8 value the same real value and range."""
    return (self.shift == other.shift and self.bounds == other.bounds
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point))

  def premul(self) -> np.ndarray:
    """f32(-Z S) with Z on the grid's own range (not the carrier): the addend of PyTorch's
    vectorized dequantization fma(q, S, -Z S)."""
    own_zero = np.float32(int(self.zero_point) + self.shift)
    return np.float32(-own_zero * self.scale)

  def reciprocal(self) -> np.ndarray:
    """f32(1 / S), a float32 division: the inverse scale of PyTorch's quantized add, cat and
    quantizers."""
    return np.float32(1) / np.float32(self.scale)

  def lowered(self) -> ActivationGrid:
    return ActivationGrid(scale=_device.put(self.scale), zero_point=_device.put(self.zero_point))


@struct
class ActivationGrid:
  """An activation's (scale f32, zero point int32 on the int8 carrier grid) in a lowered op.

  Example:
    >>> g = ActivationGrid(scale=jnp.float32(0.5), zero_point=jnp.int32(-3))
    >>> g.dequantize(jnp.array([-3, 1], jnp.int8))
    Array([0., 2.], dtype=float32)
  """

  scale: jax.Array
  zero_point: jax.Array

  def dequantize(self, q8: jax.Array) -> jax.Array:
    """S * (q8 - Z) in float32."""
    return arith.dequantize_output(q8, self.scale, self.zero_point)


@dataclasses.dataclass(frozen=True)
class Lowering:
  """What convert hands a form's `lower` (host side).

  path: the module's path; inputs: the grid of each operand, in operand order; output: the
  module's own output grid (None for a Dequantize); requant: the chosen requantizer;
  variables: the model's float variables; weight: the (qparams, quantized kernel) of the
  layer's weight, when its form asked for one (`weight_request`).
  """

  path: str
  inputs: tuple[Grid, ...]
  output: Grid | None
  requant: Requant
  variables: Any
  weight: Any = None
  weights: str = "observe"

  def subtree(self, collection: str) -> Any:
    """variables[collection] at this module's path; a ValueError naming what is missing."""
    node = self.variables.get(collection, {})
    for key in [k for k in self.path.split("/") if k]:
      if not hasattr(node, "keys") or key not in node:
        raise ValueError(f"convert: missing {collection}/{self.path} in the variables "
                         f"(expected the calibrated model's '{collection}' collection to "
                         f"hold it).")
      node = node[key]
    return node


def observer_state(observer: Any, node: Any, shape: tuple[int, ...], where: str) -> Any:
  """The observer state stored at quant_stats/<where> (`node`) as the observer's state type,
  for tensors of `shape`; a ValueError naming the path if it is missing or incomplete."""
  fresh = jax.eval_shape(lambda: observer.init(shape))  # shapes and dtypes, nothing compiled
  if not hasattr(node, "keys"):
    raise ValueError(f"convert: missing quant_stats/{where} in the variables (expected the "
                     f"calibrated model's 'quant_stats' collection to hold it).")
  missing = [f for f in fresh._fields if f not in node]
  if missing:
    raise ValueError(f"convert: quant_stats/{where} has no {missing} (it holds {sorted(node)}); "
                     f"expected the state of {type(observer).__name__}.")
  return type(fresh)(**{f: _device.put(node[f], getattr(fresh, f).dtype) for f in fresh._fields})


@dataclasses.dataclass(frozen=True)
class WeightRequest:
  """A form's float kernel (and bias) for convert to quantize with the layer's weight
  observer (all layers' grids are computed in one compiled call). The op replaces the
  layer's float params, unless `keeps_params` (a stock layer still reads its bias and creates
  its kernel)."""

  kernel: jax.Array
  bias: Any
  observer: Any
  learnable: bool
  keeps_params: bool = False


@dataclasses.dataclass(frozen=True)
class Form:
  """Base of the integer forms (module docstring). Subclasses are frozen dataclasses whose
  fields describe the marked module (hashable: they travel in jaxpr parameters)."""

  operands: ClassVar[int | None] = 1
  """How many int8 inputs the op takes (None: any number, e.g. a concatenation)."""
  stays_float: ClassVar[bool] = False
  """Whether the op runs in float on a float input (pooling): convert then lowers nothing."""
  float_input: ClassVar[bool] = False
  """Whether the op may take a float input (a Quantize boundary; it then gets no input
  grids)."""

  def weight_request(self, lowering: Lowering) -> WeightRequest | None:
    """The weight convert should quantize for this op (None: the op has none)."""
    del lowering
    return None

  def lower(self, lowering: Lowering) -> Any:
    """The op's lowered struct, run in mode "int8" by calling it."""
    raise NotImplementedError


def tracing() -> bool:
  """Whether `qjax.convert` is tracing the float forward now (marks are recorded)."""
  return _trace.active()


def module_path(module: Any) -> str:
  return "/".join(str(p) for p in module.path)


def mark_input(module: Any, x: jax.Array, form: Form | None, operand: int = 0, *,
               path: str | None = None) -> jax.Array:
  """x itself; while convert traces, marked as operand `operand` of `module`'s op `form`
  (None: the module reads x as float; convert then checks that x is not an int8 tensor).
  `path` overrides the module's path (a contraction module marks for its layer)."""
  path = module_path(module) if path is None else path
  if form is None:
    return _trace.mark(x, role="float_in", path=path, form=None, operand=operand)
  return _trace.mark(x, role="in", path=path, form=form, operand=operand)


def mark_output(module: Any, y: jax.Array, *, observer: Any, learnable: bool, point: str,
                path: str | None = None) -> jax.Array:
  """y itself; while convert traces, marked as a quantized tensor on `observer`'s grid, whose
  state is at quant_stats/<module>/<point> (or the learned params there when `learnable`, or
  when `observer` is a research quantizer, whose grid its params define)."""
  learnable = learnable or isinstance(observer, points.Quantizer)
  return _trace.mark(y, role="out", path=module_path(module) if path is None else path,
                     spec=observer.spec, observer=observer, learnable=learnable, point=point)


def mark_same_grid(module: Any, y: jax.Array) -> jax.Array:
  """y itself; while convert traces, marked as being on the grid of `module`'s (single)
  input: pooling keeps its input's grid, so its consumers read that grid."""
  return _trace.mark(y, role="same", path=module_path(module))


def nonfinite_samples(x: jax.Array) -> jax.Array:
  """(N,) bool, True where sample i of x (leading axis) holds a NaN or +-inf; () for x of
  rank <= 1 (one sample)."""
  bad = ~jnp.isfinite(x)
  return jnp.any(bad, axis=tuple(range(1, x.ndim))) if x.ndim >= 2 else jnp.any(bad)


def with_nan_samples(mask: jax.Array, y: jax.Array) -> jax.Array:
  """y with NaN in the samples that `mask` (from `nonfinite_samples`) marks; where y's
  leading axis is not the mask's, any marked sample makes all of y NaN."""
  if mask.ndim == 1 and y.ndim >= 1 and y.shape[0] == mask.shape[0]:
    mask = mask.reshape(mask.shape + (1,) * (y.ndim - 1))
  else:
    mask = jnp.any(mask)
  return jnp.where(mask, _device.put(jnp.nan, y.dtype), y)


def int8_input(x: Any, what: str = "a quantized operation") -> jax.Array:
  """x as an int8 array; a TypeError saying where int8 tensors come from otherwise."""
  x = _device.put(x)
  if x.dtype != jnp.int8:
    raise TypeError(f"in mode 'int8' {what} takes the int8 output of a Quantize or of another "
                    f"quantized module; got {x.dtype}. Put a qjax.nn.Quantize before the first "
                    f"quantized layer.")
  return x

