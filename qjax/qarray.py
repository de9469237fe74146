"""QArray: a quantized tensor as a pytree (integer values, scale, zero point; spec static).

Invariants, checked by `validate` whenever a QArray is built by hand or by `quantize_array`
(not when JAX rebuilds one from leaves inside a transformation):

  1. `qvalue` is an integer array of dtype `spec.storage_dtype`.
  2. `scale` is float32 and `zero_point` int32, both of shape () for a per-tensor spec and
     (qvalue.shape[spec.axis],) for a per-channel one; `spec.axis` is within qvalue's rank.
  3. When concrete: scale is finite and > 0; zero_point and every qvalue lie in
     [spec.qmin, spec.qmax]; a symmetric spec has zero_point == spec.symmetric_zero_point.

The represented real array is `scale * (qvalue - zero_point)` (see `dequantize`).

Storage: in memory a QArray holds one integer of its storage dtype per value. In files
(`qjax.io`) and in `qjax.report.model_size(..., packed=True)` a QArray of at most 4 bits takes
`packed_bits` bits per value (one rule, see `packed_form`): spec.bits, or spec.bits - 1 when
every value is odd (binary +-1, DoReFa's odd weight levels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, NamedTuple

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


# ------------------------------------------------------------------------------------------
# Packed storage: how many bits a QArray's values take in a file (`qjax.io`) and in
# `qjax.report.model_size(..., packed=True)`. One rule, here.

PACKED_MAX_BITS = 4
"""QArrays whose `spec.bits` is at most this are stored bit-packed; wider ones keep their
storage dtype (one byte per value up to 8 bits, two up to 16)."""


class PackedForm(NamedTuple):
  """How a low-bit QArray's values are stored: q = low + step * v, v in [0, 2^bits - 1],
  with step = 2 when `odd`, else 1."""

  bits: int
  odd: bool
  low: int

  @property
  def step(self) -> int:
    """The spacing of the stored grid: 2 for an odd grid, 1 otherwise."""
    return 2 if self.odd else 1


def packed_form_for(spec: QuantSpec, odd: bool) -> PackedForm | None:
  """The packed form of values on `spec`'s grid (all odd values when `odd`); None when
  spec.bits > PACKED_MAX_BITS (those values are stored in their dtype).

  Even grid: bits = spec.bits, low = spec.qmin. Odd grid: the odd levels of [qmin, qmax],
  low = the smallest odd integer >= qmin, bits = spec.bits - 1 (a b-bit grid has at most
  2^(b-1) odd levels).

  Args:
    spec: the QuantSpec of the values.
    odd: whether every value is odd.

  Returns:
    The PackedForm, or None.

  Raises:
    TypeError: `spec` is not a QuantSpec or `odd` not a bool.

  Example:
    >>> packed_form_for(QuantSpec(bits=2, symmetric=True, narrow_range=True), odd=True)
    PackedForm(bits=1, odd=True, low=-1)
    >>> packed_form_for(QuantSpec(bits=4, signed=False), odd=False)
    PackedForm(bits=4, odd=False, low=0)
    >>> packed_form_for(QuantSpec(bits=8), odd=False) is None
    True
  """
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"packed_form_for: spec must be a qjax.QuantSpec; got "
                    f"{type(spec).__name__}.")
  if not isinstance(odd, (bool, np.bool_)):
    raise TypeError(f"packed_form_for: odd must be True or False; got {odd!r}.")
  if spec.bits > PACKED_MAX_BITS:
    return None
  if odd:
    return PackedForm(spec.bits - 1, True, spec.qmin + (1 - spec.qmin % 2))
  return PackedForm(spec.bits, False, spec.qmin)


def _concrete_values(qa: QArray) -> np.ndarray | None:
  value: Any = qa.qvalue  # annotated jax.Array; may be a shape-only stand-in
  if not isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return None  # jax.ShapeDtypeStruct and the like
  return _checks.concrete(value)


def packed_form(qa: QArray) -> PackedForm | None:
  """The packed form in which `qjax.io` stores `qa`'s values; None for more than
  PACKED_MAX_BITS bits (stored in their dtype, one byte per value up to 8 bits).

  The rule: a QArray with spec.bits = k <= 4 is stored with k bits per value, as
  v = q - qmin, except when its values are all odd (a non-empty qvalue; a mid-rise grid, such as
  binary weights +-1 on a 2-bit spec, or DoReFa's k-bit weights stored as the odd integers
  2m - (2^k - 1) on a (k+1)-bit spec): then they take k - 1 bits, as v = (q - low) / 2 with
  low the smallest odd level of the grid. Values that are not concrete (under jit, or a
  `jax.ShapeDtypeStruct`) count as an even grid: k bits, an upper bound.

  Args:
    qa: the QArray.

  Returns:
    PackedForm(bits, odd, low), or None.

  Raises:
    TypeError: `qa` is not a QArray.

  Example:
    >>> binary = QArray(jnp.array([1, -1, -1], jnp.int8), jnp.float32(0.5), jnp.int32(0),
    ...                 QuantSpec(bits=2, symmetric=True, narrow_range=True))
    >>> packed_form(binary)
    PackedForm(bits=1, odd=True, low=-1)
  """
  if not isinstance(qa, QArray):
    raise TypeError(f"packed_form: qa must be a qjax.QArray; got {type(qa).__name__}.")
  if qa.spec.bits > PACKED_MAX_BITS:
    return None
  values = _concrete_values(qa)
  odd = values is not None and values.size > 0 and bool(np.all(values & 1))
  return packed_form_for(qa.spec, odd)


def packed_bits(qa: QArray) -> int:
  """Bits per value that `qa`'s values take in a `qjax.io` file (`packed_form`'s rule).

  spec.bits - 1 for an odd grid and spec.bits otherwise when spec.bits <= 4; else the
  storage dtype's width (8 or 16). The values of a QArray of n elements take
  ceil(n * packed_bits(qa) / 8) bytes.

  Args:
    qa: the QArray.

  Returns:
    1..4, 8 or 16.

  Raises:
    TypeError: `qa` is not a QArray.

  Example:
    >>> spec = QuantSpec(bits=2, symmetric=True, narrow_range=True)
    >>> def of(values):
    ...   return QArray(jnp.array(values, jnp.int8), jnp.float32(1.0), jnp.int32(0), spec)
    >>> packed_bits(of([1, -1, 1])), packed_bits(of([1, 0, -1])), packed_bits(of([]))
    (1, 2, 2)
    >>> packed_bits(quantize_array(jnp.ones(3), QuantSpec(bits=8)))
    8
  """
  form = packed_form(qa)
  if form is not None:
    return form.bits
  return int(jnp.dtype(qa.spec.storage_dtype).itemsize * 8)
