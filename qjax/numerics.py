"""Pure quantization arithmetic: specs, qparams from ranges, quantize and dequantize.

No Flax and no custom gradients live here; `qjax.ste` adds the straight-through rules.

Conventions (PyTorch's eager-mode quantization, extended to 2..16 bits):

  q     = clamp(round_half_to_even(x / S) + Z, qmin, qmax)
  x_hat = S * (q - Z)

Per-tensor qparams are scalars (shape ()); per-channel qparams are vectors of shape (C,)
along `QuantSpec.axis`. Scales are float32, zero points int32.

Rounding, bit for bit. `x / S` is evaluated the way PyTorch's x86 kernels evaluate it, so
that integers match theirs exactly, near float ties included:

  * `quantize`, per-tensor, <= 8 bits (fbgemm's vectorised quantizer):
      q = rne(fma(x, 1/S, Z))                      one rounding of x * (1/S) + Z
  * `quantize`, per-channel or > 8 bits (ATen's scalar quantize_val):
      q = rne(fl(fl(x * (1/S)) + Z))               the product is rounded first
  * `quantize_dequantize` (the fake-quant forward, torch.fake_quantize_*):
      q = rne(fl(x * (1/S))) + Z

The three differ only when x / S lies within a float32 ulp of a half-integer. The fused form
relies on XLA contracting the multiply-add into an FMA (XLA:CPU and XLA:GPU do); the
functions are compiled as one unit even when called eagerly so that this holds everywhere,
and tests/test_numerics.py checks it against an exact reference.

Bad input raises at trace time: `TypeError` for wrong dtypes, `ValueError` for wrong shapes,
axes or bit widths. Value checks (NaN/Inf ranges, min > max, non-positive scales, zero points
out of range, NaN data) run when the values are concrete (eager calls); under `jax.jit` they
cannot raise, and each function says what it returns instead: a NaN scale from
`qparams_from_minmax`, NaN from the float-valued functions. Integers cannot carry NaN:
under jit `quantize` maps NaN data, or any value under a NaN scale, to the zero point.
Invalid qparams under jit (a scale that is not finite and > 0, or a zero point outside
[qmin, qmax]) are read as a NaN scale for their channel (`checked_qparams`), so they give
exactly what a NaN scale gives, never integers computed from a flipped sign or a shifted
grid.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax import _checks
from qjax import _float32

FLOAT32_EPS: float = float(np.finfo(np.float32).eps)
"""PyTorch observers' default floor on the scale, `torch.finfo(torch.float32).eps`."""

FLOAT32_TINY: float = float(np.finfo(np.float32).tiny)
"""The smallest normal float32, 2^-126: the smallest accepted scale floor `eps`."""

FLOAT32_MAX: float = float(np.finfo(np.float32).max)

MIN_BITS, MAX_BITS = 2, 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """How real numbers map to a grid of integers. Frozen and hashable: static under `jax.jit`.

  Attributes:
    bits: width of the integer grid, 2..16.
    signed: grid centred on 0 (`[-2^(b-1), 2^(b-1) - 1]`) or starting at 0 (`[0, 2^b - 1]`).
    symmetric: zero point fixed (0 when signed, the grid's midpoint when unsigned) and the
      scale set by max(|min|, |max|); otherwise affine (scale and zero point from the range).
    narrow_range: drop the lowest level (int8 in [-127, 127], uint8 in [1, 255]), so that a
      signed symmetric grid is symmetric.
    reduce_range: use one bit less (int8 in [-64, 63], uint8 in [0, 127]), as PyTorch's x86
      activation observers do to keep `vpmaddubsw` from saturating. Applied before
      `narrow_range`.
    axis: None for per-tensor qparams, else the per-channel axis (negative counts from the end).

  Example:
    >>> QuantSpec(bits=8, signed=False).qmin, QuantSpec(bits=8, signed=False).qmax
    (0, 255)
    >>> QuantSpec(bits=8, narrow_range=True, symmetric=True, axis=0).qmin
    -127
  """

  bits: int = 8
  signed: bool = True
  symmetric: bool = False
  narrow_range: bool = False
  reduce_range: bool = False
  axis: int | None = None

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
      raise TypeError(f"QuantSpec.bits must be an int in [{MIN_BITS}, {MAX_BITS}]; "
                      f"got {self.bits!r} of type {type(self.bits).__name__}.")
    if not MIN_BITS <= self.bits <= MAX_BITS:
      raise ValueError(f"QuantSpec.bits must be in [{MIN_BITS}, {MAX_BITS}]; got {self.bits}.")
    object.__setattr__(self, "bits", int(self.bits))
    for name in ("signed", "symmetric", "narrow_range", "reduce_range"):
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"QuantSpec.{name} must be True or False; got {value!r}.")
      object.__setattr__(self, name, bool(value))
    if self.axis is not None and (isinstance(self.axis, bool)
                                  or not isinstance(self.axis, (int, np.integer))):
      raise TypeError(f"QuantSpec.axis must be None (per-tensor) or an int (per-channel); "
                      f"got {self.axis!r}.")
    if self.axis is not None:
      object.__setattr__(self, "axis", int(self.axis))
    if self.reduce_range and self.bits - 1 < MIN_BITS:
      raise ValueError(f"QuantSpec.reduce_range drops one bit and needs bits >= {MIN_BITS + 1}; "
                       f"got bits={self.bits}.")

  @property
  def effective_bits(self) -> int:
    """Bits of the grid actually used: `bits - 1` with reduce_range."""
    return self.bits - int(self.reduce_range)

  @property
  def qmin(self) -> int:
    """Smallest integer of the grid."""
    b = self.effective_bits
    low = -(2 ** (b - 1)) if self.signed else 0
    return low + int(self.narrow_range)

  @property
  def qmax(self) -> int:
    """Largest integer of the grid."""
    b = self.effective_bits
    return 2 ** (b - 1) - 1 if self.signed else 2**b - 1

  @property
  def per_channel(self) -> bool:
    return self.axis is not None

  @property
  def storage_dtype(self) -> jnp.dtype:
    """The smallest integer dtype that holds [qmin, qmax]: (u)int8 up to 8 bits, else (u)int16."""
    if self.signed:
      return jnp.dtype(jnp.int8 if self.bits <= 8 else jnp.int16)
    return jnp.dtype(jnp.uint8 if self.bits <= 8 else jnp.uint16)

  @property
  def symmetric_zero_point(self) -> int:
    """The fixed zero point of a symmetric grid.

    0 when signed. When unsigned, PyTorch's choice: 2^(b-1) for its default full 8- and
    16-bit ranges (128, 32768), and the midpoint rounded down, (qmin + qmax) // 2, for every
    other range (what PyTorch's observers do when given quant_min / quant_max).
    """
    if self.signed:
      return 0
    if self.bits in (8, 16) and not (self.narrow_range or self.reduce_range):
      return 2 ** (self.bits - 1)
    return (self.qmin + self.qmax) // 2


class QParams(NamedTuple):
  """Quantization parameters: float32 `scale` and int32 `zero_point`, shape () or (C,)."""

  scale: jax.Array
  zero_point: jax.Array


# ------------------------------------------------------------------------------------------
# Validation of the arguments shared by the functions below.


def _channel_count(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, int]:
  """(normalised axis, number of channels) of a per-channel spec for an array of `shape`."""
  assert spec.axis is not None, "callers check spec.per_channel"
  axis = _checks.normalize_axis(spec.axis, len(shape), shape=shape)
  return axis, shape[axis]


def expected_qparam_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the qparams `spec` needs for data of `shape`: () per-tensor, (C,) per-channel."""
  if not spec.per_channel:
    return ()
  return (_channel_count(spec, shape)[1],)


def checked_qparams(spec: QuantSpec, qparams: QParams, shape: tuple[int, ...], *,
                     where: str) -> tuple[jax.Array, jax.Array]:
  """Scale (float32) and zero point (int32) checked against `spec` and the data's `shape`.

  A building block for the layers above; `where` names the calling function in errors.
  Concrete values are checked (scale finite and > 0, zero point in [qmin, qmax]; ValueError
  otherwise). Traced values cannot be: the returned scale is NaN in every channel whose
  qparams are invalid, so that every function fed by it gives its NaN-scale result.
  """
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"{where}: spec must be a qjax.QuantSpec; got {type(spec).__name__}.")
  try:
    scale, zero_point = qparams
  except (TypeError, ValueError) as err:
    raise TypeError(f"{where}: qparams must be a QParams(scale, zero_point) pair; "
                    f"got {type(qparams).__name__}.") from err
  scale = _checks.as_float_array("qparams.scale", scale).astype(jnp.float32)
  zero_point = _checks.as_int_array(
      "qparams.zero_point", zero_point,
      hint=" Learnable (float) zero points go through qjax.ste.fake_quant_learnable.")
  zero_point = zero_point.astype(jnp.int32)
  expected = expected_qparam_shape(spec, shape)
  check_qparam_shape(scale, spec, shape, name=f"{where}: qparams.scale")
  check_qparam_shape(zero_point, spec, shape, name=f"{where}: qparams.zero_point")
  scale, zero_point = scale.reshape(expected), zero_point.reshape(expected)
  check_scale_values(scale, name=f"{where}: qparams.scale")
  check_zero_point_values(zero_point, spec, name=f"{where}: qparams.zero_point")
  if isinstance(scale, jax.core.Tracer) or isinstance(zero_point, jax.core.Tracer):
    # The checks above could not read the values: make invalid qparams a NaN scale.
    scale = _nan_scale_where_invalid(scale, zero_point, spec)
  return scale, zero_point


def _nan_scale_where_invalid(scale: jax.Array, zero_point: jax.Array,
                             spec: QuantSpec) -> jax.Array:
  """`scale`, NaN in every channel whose scale is not finite and > 0 or whose zero point lies
  outside [qmin, qmax] (the traced counterpart of the value checks)."""
  valid = (jnp.isfinite(scale) & (scale > 0)
           & (zero_point >= spec.qmin) & (zero_point <= spec.qmax))
  return jnp.where(valid, scale, jnp.float32(jnp.nan))


def check_qparam_shape(value: jax.Array, spec: QuantSpec, data_shape: tuple[int, ...], *,
                       name: str, data_name: str = "the data",
                       allow_size_one: bool = True) -> None:
  """ValueError unless `value` has the qparam shape `spec` needs for data of `data_shape`.

  Per-tensor qparams have shape () (or, with `allow_size_one`, PyTorch's (1,)); per-channel
  ones (C,). `name` and `data_name` name the two arrays in the message.
  """
  expected = expected_qparam_shape(spec, tuple(data_shape))
  size_one_ok = allow_size_one and not spec.per_channel
  if tuple(value.shape) == expected or (size_one_ok and tuple(value.shape) == (1,)):
    return
  kind = f"per-channel along axis {spec.axis}" if spec.per_channel else "per-tensor"
  raise ValueError(f"{name} has shape {tuple(value.shape)}, but the spec is {kind} and "
                   f"{data_name} has shape {tuple(data_shape)}, so it must have shape {expected}"
                   + (" (or (1,))" if size_one_ok else "") + ".")


def check_scale_values(scale: jax.Array, *, name: str) -> None:
  """ValueError naming `name` unless a concrete scale is finite and > 0 (traced: no check)."""
  s = _checks.concrete(scale)
  if s is not None and not np.all(np.isfinite(s) & (s > 0)):
    bad = s[~(np.isfinite(s) & (s > 0))] if s.ndim else s
    raise ValueError(f"{name} must be finite and > 0; got {bad!r}.")


def check_zero_point_values(zero_point: jax.Array, spec: QuantSpec, *, name: str) -> None:
  """ValueError naming `name` unless a concrete zero point lies in [qmin, qmax]."""
  z = _checks.concrete(zero_point)
  if z is not None and not np.all((z >= spec.qmin) & (z <= spec.qmax)):
    bad = z[(z < spec.qmin) | (z > spec.qmax)] if z.ndim else z
    raise ValueError(f"{name} must lie in [qmin, qmax] = [{spec.qmin}, {spec.qmax}] for {spec}; "
                     f"got {bad!r}.")


def check_grid_values(q: jax.Array, spec: QuantSpec, *, name: str) -> None:
  """ValueError naming `name` unless every concrete integer of `q` lies in [qmin, qmax]."""
  if not q.size:
    return
  values = _checks.concrete(q)  # on the host: an eager check compiles nothing per shape
  if values is None:
    return
  q_min, q_max = values.min(), values.max()
  if q_min < spec.qmin or q_max > spec.qmax:
    raise ValueError(f"{name} holds values in [{int(q_min)}, {int(q_max)}], outside the grid "
                     f"[qmin, qmax] = [{spec.qmin}, {spec.qmax}] of {spec}.")


def checked_eps(eps: object, *, name: str) -> float:
  """`eps`, the floor on the scale, as a float; ValueError naming `name` unless it is a normal
  float32 number: a Python float (or int) in [2^-126, float32 max].

  A smaller eps is 0 or subnormal in float32 (XLA:CPU flushes subnormals to zero), so the
  floored scale of a one-point range could be 0; a larger one is inf in float32.
  """
  if isinstance(eps, bool) or not isinstance(eps, (float, int)) or not 0 < eps < np.inf:
    raise ValueError(f"{name} must be a positive finite float; got {eps!r}. PyTorch's default "
                     f"is float32 eps, {FLOAT32_EPS!r}.")
  if not FLOAT32_TINY <= eps <= FLOAT32_MAX:
    if eps > FLOAT32_MAX:
      why = "inf in float32"
    else:
      why = (f"{'0' if np.float32(eps) == 0 else 'subnormal'} in float32 (XLA flushes "
             f"subnormals to 0), so a one-point range would get scale 0")
    raise ValueError(f"{name} must be a normal float32 number, in [np.finfo(np.float32).tiny, "
                     f"np.finfo(np.float32).max] = [{np.float32(FLOAT32_TINY)!s}, "
                     f"{np.float32(FLOAT32_MAX)!s}]; got {eps!r}, which is {why}. PyTorch's "
                     f"default is float32 eps, {FLOAT32_EPS!r}.")
  return float(eps)


def range_fits_float32(min_val: jax.Array, max_val: jax.Array) -> jax.Array:
  """Elementwise: the range widened to include 0, [min(min_val, 0), max(max_val, 0)], has
  finite ends and a finite float32 width, max(max_val, 0) - min(min_val, 0) <= float32 max.

  A finite range wider than that (e.g. [-3e38, 3e38]) has no finite affine scale. Traceable.
  """
  lo = jnp.minimum(min_val, jnp.float32(0))
  hi = jnp.maximum(max_val, jnp.float32(0))
  return jnp.isfinite(lo) & jnp.isfinite(hi) & jnp.isfinite(hi - lo)


def check_range_fits_float32(min_val: jax.Array | np.ndarray, max_val: jax.Array | np.ndarray, *,
                             where: str, hint: str = "") -> None:
  """ValueError naming `where` when a concrete range has finite ends but fails
  `range_fits_float32` (its width overflows). Traced values, and NaN or infinite ends, are
  left to the caller's own checks. `hint` is appended to the message."""
  lo, hi = _checks.concrete(min_val), _checks.concrete(max_val)
  if lo is None or hi is None:
    return
  lo, hi = lo.astype(np.float32), hi.astype(np.float32)
  with np.errstate(over="ignore", invalid="ignore"):  # NumPy's float32 ops round as XLA's
    width = np.maximum(hi, np.float32(0)) - np.minimum(lo, np.float32(0))
    fits = ~(np.isfinite(lo) & np.isfinite(hi)) | np.isfinite(width)
  if np.all(fits):
    return
  at = "" if np.ndim(fits) == 0 else f" at channel(s) {np.flatnonzero(~fits).tolist()}"
  raise ValueError(f"{where}: the range [{lo!r}, {hi!r}] is too wide for float32{at}: "
                   f"max - min (with the range widened to include 0) overflows float32's "
                   f"largest value, {FLOAT32_MAX:.7g}, so no finite scale spans it. Clip the "
                   f"data or use a narrower range.{hint}")


def broadcast_qparam(v: jax.Array, spec: QuantSpec, ndim: int) -> jax.Array:
  """A () or (C,) qparam reshaped to broadcast against data of rank `ndim`."""
  if spec.axis is None or ndim == 0:  # per-tensor, or scalar data
    return v
  axis = spec.axis % ndim
  return v.reshape((1,) * axis + (-1,) + (1,) * (ndim - axis - 1))


# ------------------------------------------------------------------------------------------
# Ranges and qparams.


def minmax(x: jax.typing.ArrayLike, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """Range of `x`: per-tensor scalars, or per-channel vectors along `spec.axis`.

  min = min_i x_i over every axis but the channel axis; likewise max. NaN in `x` makes the
  range NaN, which `qparams_from_minmax` refuses.

  Returns:
    (min_val, max_val) as float32 arrays of shape () or (C,).
  """
  x = _checks.as_float_array("x", x)
  if x.size == 0:
    raise ValueError(f"minmax: x is empty (shape {x.shape}); a range needs at least one value.")
  if spec.per_channel:
    axis, _ = _channel_count(spec, x.shape)
    others = tuple(a for a in range(x.ndim) if a != axis)
  else:
    others = None
  return _float32.min_and_max(x.astype(jnp.float32), others)


def qparams_from_minmax(min_val: jax.typing.ArrayLike, max_val: jax.typing.ArrayLike,
                        spec: QuantSpec, *, eps: float = FLOAT32_EPS) -> QParams:
  """Scale and zero point for the range [min_val, max_val], as PyTorch's observers compute them.

  The range is first widened to include 0 (so that 0.0 is exactly representable):
  lo = min(min_val, 0), hi = max(max_val, 0). Then, in float32,

    symmetric: S = max(-lo, hi) / ((qmax - qmin) / 2),  Z = spec.symmetric_zero_point
    affine:    S = (hi - lo) / (qmax - qmin),           Z = clamp(qmin - round(lo / S), qmin, qmax)

  with S floored at `eps` in both cases (`torch.ao.quantization` `_calculate_qparams`).

  Args:
    min_val: range minimum, shape () (or (1,)) per-tensor, (C,) per-channel.
    max_val: range maximum, same shape.
    spec: the target grid.
    eps: floor on the scale (PyTorch's default, float32 eps); a normal float32 number, at
      least np.finfo(np.float32).tiny (a smaller one could floor the scale at 0).

  Returns:
    QParams(scale float32, zero_point int32), shape () or (C,).

  Raises:
    ValueError: mismatched shapes, an eps that is not a normal float32 number; and, for
      concrete inputs, NaN/Inf, min_val > max_val or (affine specs) a range too wide for
      float32 (`range_fits_float32`). Under jit such ranges yield a NaN scale instead.

  Example:
    >>> qp = qparams_from_minmax(-1.0, 3.0, QuantSpec(bits=8, signed=False))
    >>> float(qp.scale), int(qp.zero_point)
    (0.01568627543747425, 64)
  """
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"qparams_from_minmax: spec must be a qjax.QuantSpec; got "
                    f"{type(spec).__name__}.")
  min_val = _checks.as_float_array("min_val", min_val, python_int_ok=True).astype(jnp.float32)
  max_val = _checks.as_float_array("max_val", max_val, python_int_ok=True).astype(jnp.float32)
  if min_val.shape != max_val.shape:
    raise ValueError(f"qparams_from_minmax: min_val has shape {min_val.shape} but max_val has "
                     f"shape {max_val.shape}; they must match.")
  if spec.per_channel:
    if min_val.ndim != 1 or min_val.shape[0] == 0:
      raise ValueError(f"qparams_from_minmax: a per-channel spec (axis={spec.axis}) needs 1-D "
                       f"min_val / max_val with one entry per channel; got shape {min_val.shape}.")
  elif min_val.shape not in ((), (1,)):
    raise ValueError(f"qparams_from_minmax: a per-tensor spec needs scalar min_val / max_val "
                     f"(shape () or (1,)); got shape {min_val.shape}. For per-channel ranges set "
                     f"QuantSpec(axis=...).")
  else:
    min_val, max_val = min_val.reshape(()), max_val.reshape(())
  eps = checked_eps(eps, name="qparams_from_minmax: eps")
  lo, hi = _checks.concrete(min_val), _checks.concrete(max_val)
  if lo is not None and hi is not None:
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
      hint = (" (inf, -inf) is the state of an observer that has seen no data."
              if np.any(np.isposinf(lo)) and np.any(np.isneginf(hi)) else "")
      raise ValueError(f"qparams_from_minmax: min_val and max_val must be finite; got "
                       f"min_val={lo!r}, max_val={hi!r}.{hint}")
    if np.any(lo > hi):
      where = "" if lo.ndim == 0 else f" at channel(s) {np.flatnonzero(lo > hi).tolist()}"
      raise ValueError(f"qparams_from_minmax: min_val must be <= max_val{where}; got "
                       f"min_val={lo!r}, max_val={hi!r}.")
    if not spec.symmetric:  # a symmetric scale, max(-lo, hi) / ..., cannot overflow
      check_range_fits_float32(lo, hi, where="qparams_from_minmax")
  return _qparams_core(min_val, max_val, spec=spec, eps=eps)


@functools.partial(jax.jit, static_argnames=("spec", "eps"))
def _qparams_core(min_val: jax.Array, max_val: jax.Array, *, spec: QuantSpec,
                  eps: float) -> QParams:
  lo = jnp.minimum(min_val, 0.0)
  hi = jnp.maximum(max_val, 0.0)
  if spec.symmetric:
    scale = _float32.exact_div(jnp.maximum(-lo, hi), (spec.qmax - spec.qmin) / 2)
    scale = jnp.maximum(scale, jnp.float32(eps))
    zero_point = jnp.full(scale.shape, spec.symmetric_zero_point, jnp.int32)
  else:
    scale = _float32.exact_div(hi - lo, float(spec.qmax - spec.qmin))
    scale = jnp.maximum(scale, jnp.float32(eps))
    zero_point = spec.qmin - jnp.round(lo / scale).astype(jnp.int32)
    zero_point = jnp.clip(zero_point, spec.qmin, spec.qmax)
  # Under jit a bad range cannot raise: poison the scale so that it is never mistaken for one.
  # A finite range can still be too wide for float32 (hi - lo overflows to inf).
  valid = (jnp.isfinite(min_val) & jnp.isfinite(max_val) & (min_val <= max_val)
           & jnp.isfinite(scale))
  scale = jnp.where(valid, scale, jnp.float32(jnp.nan))
  return QParams(scale, zero_point)


# ------------------------------------------------------------------------------------------
# Quantize / dequantize.


def float_data(x: jax.typing.ArrayLike, where: str) -> jax.Array:
  """`x` as a floating array; a TypeError that names `x` and `where` for integer input."""
  return _checks.as_float_array(
      "x", x, hint=f" ({where} maps real numbers to integers; integer arrays are already "
      "quantized: dequantize them, or cast with x.astype(jnp.float32)).")


def _check_no_nan(x: jax.Array, where: str) -> None:
  has_nan = _checks.concrete_bool(jnp.any(jnp.isnan(x)))
  if has_nan:
    count = int(jnp.sum(jnp.isnan(x)))
    raise ValueError(f"{where}: x contains {count} NaN value(s) (shape {x.shape}); NaN has no "
                     f"integer representation. Under jax.jit NaN maps to the zero point.")


def quantize(x: jax.typing.ArrayLike, spec: QuantSpec, qparams: QParams) -> jax.Array:
  """Real values to integers: q = clamp(round_half_to_even(x / S) + Z, qmin, qmax).

  `x / S` is rounded exactly as `torch.quantize_per_tensor` / `torch.quantize_per_channel`
  round it (see the module docstring). Values beyond the range saturate (+-inf included).

  Args:
    x: floating-point array (computed in float32).
    spec: the grid; per-channel qparams lie along `spec.axis`.
    qparams: QParams(scale, zero_point) of shape () or (C,).

  Returns:
    Integers of dtype `spec.storage_dtype` ((u)int8 up to 8 bits, else (u)int16), x's shape.

  Raises:
    TypeError: x is not floating point, or the qparams have the wrong dtypes.
    ValueError: qparams' shape does not match the spec and x; and, for concrete inputs,
      NaN in x, a scale that is not finite and > 0, or a zero point outside [qmin, qmax].
      Under jit these cannot raise. NaN in x maps to the zero point (integers cannot carry
      NaN), and invalid qparams are read as a NaN scale: every element of the channel
      becomes its zero point clamped into [qmin, qmax], as with a NaN scale. E.g. uint8,
      S = 0 or -0.5 and Z = 2 give all 2; S = 0.5 and Z = 300 give all 255.

  Example:
    >>> spec = QuantSpec(bits=8, signed=False)
    >>> quantize(jnp.array([-1.0, 0.0, 0.5, 9.0]), spec, QParams(jnp.float32(0.5), jnp.int32(2)))
    Array([ 0,  2,  3, 20], dtype=uint8)
  """
  x = float_data(x, "quantize")
  scale, zero_point = checked_qparams(spec, qparams, x.shape, where="quantize")
  _check_no_nan(x, "quantize")
  return _quantize_core(x, scale, zero_point, spec=spec)


def _scaled_core(x: jax.Array, scale: jax.Array, zero_point: jax.Array,
                 spec: QuantSpec) -> jax.Array:
  xf = x.astype(jnp.float32)
  inv_scale = broadcast_qparam(1.0 / scale, spec, x.ndim)
  zp = broadcast_qparam(zero_point.astype(jnp.float32), spec, x.ndim)
  if not spec.per_channel and spec.bits <= 8:
    # One rounding of x * (1/S) + Z: XLA contracts this into an FMA, as fbgemm's AVX2 does.
    return xf * inv_scale + zp
  # Round the product before adding Z, as ATen's scalar kernel does.
  return _float32.uncontractible(xf * inv_scale, inv_scale) + zp


@functools.partial(jax.jit, static_argnames=("spec",))
def _quantize_core(x: jax.Array, scale: jax.Array, zero_point: jax.Array, *,
                   spec: QuantSpec) -> jax.Array:
  zp = broadcast_qparam(zero_point.astype(jnp.float32), spec, x.ndim)
  rounded = jnp.round(_scaled_core(x, scale, zero_point, spec))
  rounded = jnp.where(jnp.isnan(rounded), zp, rounded)
  return jnp.clip(rounded, spec.qmin, spec.qmax).astype(spec.storage_dtype)


def scaled_terms(x: jax.typing.ArrayLike, spec: QuantSpec,
                 qparams: QParams) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`scaled`'s operands for a per-tensor grid of at most 8 bits: (x as float32, 1/S,
  float32(Z)), checked as `quantize` checks them, for a kernel that forms
  `fma(x, 1/S, Z)` itself (one rounding: `scaled(x) == x * (1/S) + Z` exactly so).

  Example:
    >>> spec = QuantSpec(bits=8, signed=False)
    >>> _, inv, zp = scaled_terms(jnp.ones(2), spec, QParams(jnp.float32(0.5), jnp.int32(2)))
    >>> float(inv), float(zp)
    (2.0, 2.0)
  """
  if spec.per_channel or spec.bits > 8:
    raise ValueError(f"scaled_terms: spec must be per tensor with at most 8 bits (x * (1/S) + "
                     f"Z is one FMA only there); got {spec}.")
  x = float_data(x, "quantize").astype(jnp.float32)
  scale, zero_point = checked_qparams(spec, qparams, x.shape, where="quantize")
  _check_no_nan(x, "quantize")
  return x, jnp.float32(1.0) / scale, zero_point.astype(jnp.float32)


def scaled(x: jax.typing.ArrayLike, spec: QuantSpec, qparams: QParams) -> jax.Array:
  """x / S + Z in float32, before the rounding: `quantize(x) = clamp(rne(scaled(x)), qmin,
  qmax)` (NaN -> Z), for code that rounds and narrows on its own (a native kernel). Formed as
  `quantize` forms it: x * (1/S) + Z with one rounding (an FMA) for per-tensor grids of at
  most 8 bits, the product rounded before adding Z otherwise.

  Example:
    >>> spec = QuantSpec(bits=8, signed=False)
    >>> scaled(jnp.array([-1.0, 0.5]), spec, QParams(jnp.float32(0.5), jnp.int32(2)))
    Array([0., 3.], dtype=float32)
  """
  x = float_data(x, "quantize")
  scale, zero_point = checked_qparams(spec, qparams, x.shape, where="quantize")
  _check_no_nan(x, "quantize")
  return _scaled_jit(x, scale, zero_point, spec=spec)


_scaled_jit = jax.jit(_scaled_core, static_argnames=("spec",))


def dequantize(q: jax.typing.ArrayLike, spec: QuantSpec, qparams: QParams, *,
               dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Integers back to real values: x_hat = S * (q - Z), one float32 rounding.

  Args:
    q: integer array (any integer dtype; values are expected in [qmin, qmax]).
    spec: the grid `q` lives on.
    qparams: QParams(scale, zero_point) of shape () or (C,).
    dtype: floating dtype of the result.

  Returns:
    Array of `dtype`, q's shape.

  Raises:
    TypeError: q is not an integer array, or dtype is not floating.
    ValueError: qparams do not match; for concrete inputs, values of q outside [qmin, qmax],
      a scale that is not finite and > 0, or a zero point outside [qmin, qmax]. Under jit
      invalid qparams are read as a NaN scale: their channel dequantizes to NaN.
  """
  q = _checks.as_int_array("q", q, hint=" (dequantize maps integers to real numbers; "
                           "quantize float arrays first).")
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise TypeError(f"dequantize: dtype must be a floating dtype; got {jnp.dtype(dtype)}.")
  scale, zero_point = checked_qparams(spec, qparams, q.shape, where="dequantize")
  check_grid_values(q, spec, name="dequantize: q")
  return _dequantize_core(q, scale, zero_point, spec=spec).astype(dtype)


@functools.partial(jax.jit, static_argnames=("spec",))
def _dequantize_core(q: jax.Array, scale: jax.Array, zero_point: jax.Array, *,
                     spec: QuantSpec) -> jax.Array:
  centred = q.astype(jnp.int32) - broadcast_qparam(zero_point, spec, q.ndim)
  return centred.astype(jnp.float32) * broadcast_qparam(scale, spec, q.ndim)


def quantize_dequantize(x: jax.typing.ArrayLike, spec: QuantSpec,
                        qparams: QParams) -> jax.Array:
  """The fake-quant forward, no gradient rule: S * (clamp(rne(x * (1/S)) + Z, qmin, qmax) - Z).

  Bit for bit `torch.fake_quantize_per_tensor_affine` / `_per_channel_affine`. NaN stays NaN;
  +-inf saturate. `qjax.ste.fake_quant` is this function with a straight-through gradient.

  Returns:
    Array of x's dtype and shape (computed in float32).

  Raises:
    ValueError: as `quantize` (NaN in x excepted). Under jit invalid qparams (a scale that
      is not finite and > 0, a zero point outside [qmin, qmax]) are read as a NaN scale:
      their channel comes out NaN.
  """
  x = float_data(x, "quantize_dequantize")
  scale, zero_point = checked_qparams(spec, qparams, x.shape, where="quantize_dequantize")
  out, _ = fake_quant_with_mask(x, scale, zero_point, spec=spec)
  return out


@functools.partial(jax.jit, static_argnames=("spec",))
def fake_quant_with_mask(x: jax.Array, scale: jax.Array, zero_point: jax.Array, *,
                         spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """Fake-quantized x and the mask of entries whose rounded value lies in [qmin, qmax].

  Unchecked building block for `qjax.ste`; use `quantize_dequantize` from user code.
  `zero_point` may be int32 or an integer-valued float32.
  """
  xf = x.astype(jnp.float32)
  inv_scale = broadcast_qparam(1.0 / scale, spec, x.ndim)
  zp = broadcast_qparam(zero_point.astype(jnp.float32), spec, x.ndim)
  shifted = jnp.round(xf * inv_scale) + zp
  in_range = (shifted >= spec.qmin) & (shifted <= spec.qmax)
  clamped = jnp.minimum(jnp.maximum(shifted, jnp.float32(spec.qmin)), jnp.float32(spec.qmax))
  out = (clamped - zp) * broadcast_qparam(scale, spec, x.ndim)
  return out.astype(x.dtype), in_range
