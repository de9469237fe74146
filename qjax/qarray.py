"""QArray: a quantized tensor as a pytree (integer values, scale, zero point; spec static).

Invariants, checked by `validate` whenever a QArray is built by hand or by `quantize_array`
(not when JAX rebuilds one from leaves inside a transformation):

  1. `qvalue` is an integer array of dtype `spec.storage_dtype`.
  2. `scale` is float32 and `zero_point` int32, both of shape () for a per-tensor spec and
     (qvalue.shape[spec.axis],) for a per-channel one; `spec.axis` is within qvalue's rank.
  3. When concrete: scale is finite and > 0; zero_point and every qvalue lie in
     [spec.qmin, spec.qmax]; a symmetric spec has zero_point == spec.symmetric_zero_point.

The represented real array is `scale * (qvalue - zero_point)` (see `dequantize`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax import _checks
from qjax import numerics
from qjax.numerics import QParams, QuantSpec


@dataclasses.dataclass(frozen=True, eq=False)
class QArray:
  """A quantized array. Leaves: `qvalue`, `scale`, `zero_point`; static: `spec`.

  Example:
    >>> qa = quantize_array(jnp.array([[-1.0, 0.5], [2.0, 3.0]]), QuantSpec(bits=8, signed=False))
    >>> qa.qvalue.dtype, qa.shape
    (dtype('uint8'), (2, 2))
    >>> qa.dequantize().round(2)
    Array([[-1.  ,  0.5 ],
           [ 2.01,  3.  ]], dtype=float32)
  """

  qvalue: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  spec: QuantSpec

  def __post_init__(self):
    validate(self)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.qvalue.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def dtype(self) -> jnp.dtype:
    """The integer storage dtype."""
    return self.qvalue.dtype

  @property
  def qparams(self) -> QParams:
    return QParams(self.scale, self.zero_point)

  def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The real values scale * (qvalue - zero_point) as `dtype`."""
    return numerics.dequantize(self.qvalue, self.spec, self.qparams, dtype=dtype)

  @property
  def nbytes(self) -> int:
    """Bytes of the integer values plus the qparams."""
    return int(self.qvalue.size * self.qvalue.dtype.itemsize + self.scale.size * 4
               + self.zero_point.size * 4)


def _flatten_with_keys(qa: QArray) -> tuple[tuple[tuple[Any, jax.Array], ...], QuantSpec]:
  keys = (jax.tree_util.GetAttrKey("qvalue"), jax.tree_util.GetAttrKey("scale"),
          jax.tree_util.GetAttrKey("zero_point"))
  return tuple(zip(keys, (qa.qvalue, qa.scale, qa.zero_point), strict=True)), qa.spec


def _flatten(qa: QArray) -> tuple[tuple[jax.Array, jax.Array, jax.Array], QuantSpec]:
  return (qa.qvalue, qa.scale, qa.zero_point), qa.spec


def _unflatten(spec: QuantSpec, leaves: Iterable[Any]) -> QArray:
  # Transformations rebuild QArrays from tracers, batch dims or placeholders: no validation.
  qa = object.__new__(QArray)
  for name, leaf in zip(("qvalue", "scale", "zero_point"), leaves, strict=True):
    object.__setattr__(qa, name, leaf)
  object.__setattr__(qa, "spec", spec)
  return qa


jax.tree_util.register_pytree_with_keys(QArray, _flatten_with_keys, _unflatten, _flatten)


def validate(qa: QArray) -> None:
  """Check the invariants in the module docstring; TypeError / ValueError quoting the shapes."""
  if not isinstance(qa.spec, QuantSpec):
    raise TypeError(f"QArray.spec must be a qjax.QuantSpec; got {type(qa.spec).__name__}.")
  spec = qa.spec
  for name in ("qvalue", "scale", "zero_point"):
    if not hasattr(getattr(qa, name), "dtype"):
      raise TypeError(f"QArray.{name} must be an array; got {type(getattr(qa, name)).__name__}.")
  qvalue, scale, zero_point = qa.qvalue, qa.scale, qa.zero_point
  if qvalue.dtype != spec.storage_dtype:
    raise TypeError(f"QArray.qvalue must have dtype {spec.storage_dtype} for {spec}; "
                    f"got {qvalue.dtype}.")
  if scale.dtype != jnp.float32:
    raise TypeError(f"QArray.scale must be float32; got {scale.dtype}.")
  if zero_point.dtype != jnp.int32:
    raise TypeError(f"QArray.zero_point must be int32; got {zero_point.dtype}.")
  if spec.axis is not None:  # per-channel
    _checks.normalize_axis(spec.axis, qvalue.ndim, name="QArray.spec.axis", shape=qvalue.shape)
  for name, value in (("scale", scale), ("zero_point", zero_point)):
    numerics.check_qparam_shape(value, spec, qvalue.shape, name=f"QArray.{name}",
                                data_name="qvalue", allow_size_one=False)
  numerics.check_scale_values(scale, name="QArray.scale")
  numerics.check_zero_point_values(zero_point, spec, name="QArray.zero_point")
  z = _checks.concrete(zero_point)
  if z is not None and spec.symmetric and not np.all(z == spec.symmetric_zero_point):
    raise ValueError(f"QArray.zero_point must be {spec.symmetric_zero_point} for the symmetric "
                     f"{spec}; got {z!r}.")
  numerics.check_grid_values(qvalue, spec, name="QArray.qvalue")


def quantize_array(x: jax.typing.ArrayLike, spec: QuantSpec, *,
                   qparams: QParams | None = None) -> QArray:
  """Quantize `x` into a QArray: q = clamp(rne(x / S) + Z, qmin, qmax).

  Args:
    x: floating-point array.
    spec: the grid.
    qparams: scale and zero point; by default computed from x's own range
      (`qparams_from_minmax(*minmax(x, spec), spec)`, i.e. dynamic quantization).

  Returns:
    A validated QArray.
  """
  x = numerics.float_data(x, "quantize_array")
  if qparams is None:
    qparams = numerics.qparams_from_minmax(*numerics.minmax(x, spec), spec)
  scale, zero_point = numerics.checked_qparams(spec, qparams, x.shape, where="quantize_array")
  return QArray(numerics.quantize(x, spec, QParams(scale, zero_point)), scale, zero_point, spec)


def is_qarray(value: Any) -> bool:
  """True for QArray instances (handy as `is_leaf` in tree maps)."""
  return isinstance(value, QArray)
