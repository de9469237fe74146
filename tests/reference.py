"""A plain-NumPy reference of qjax's quantization arithmetic (`qjax/numerics.py`).

Written from the formulas in the numerics module docstring, not from qjax's code, so that
tests can compare bit for bit: every function takes and returns NumPy arrays and rounds
exactly where the documented float32 computation rounds.

Rounding of x / S (S the float32 scale, Z the integer zero point, inv = fl(1 / S)):

  * `quantize_fused`     q = rne(fma(x, inv, Z))            per-tensor, <= 8 bits
  * `quantize_two_step`  q = rne(fl(fl(x * inv) + Z))       per-channel, or > 8 bits
  * `quantize_qdq_int`   q = rne(fl(x * inv)) + Z           the fake-quant forward

each followed by a clamp to [qmin, qmax]. `quantize` picks the form that qjax.quantize uses
for a spec.

The FMA is evaluated exactly on every platform, without relying on an 80-bit long double:
x * inv of two float32 values is exact in float64 (48 significant bits <= 53); the sum with Z
is taken in float64, rounded to odd with the exact error from TwoSum, and then cast once to
float32. Rounding to odd with at least two spare bits (53 >= 24 + 2) makes the final
rounding correct (Boldo & Melquiond, "When double rounding is odd", 2005), so the result is
fl32(x * inv + Z) with a single rounding. `tests/test_numerics.py` checks this against exact
rational arithmetic.

Conventions: per-tensor qparams are 0-d, per-channel ones are 1-d along `axis` (negative
counts from the end). Integer outputs use the spec's storage dtype.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
FLOAT32_EPS = float(np.finfo(np.float32).eps)


# ------------------------------------------------------------------------------------------
# The grid.


def grid(bits: int, signed: bool, narrow_range: bool = False,
         reduce_range: bool = False) -> tuple[int, int]:
  """(qmin, qmax): reduce_range drops one bit first, narrow_range then drops the lowest level."""
  b = bits - 1 if reduce_range else bits
  if signed:
    qmin, qmax = -(2 ** (b - 1)), 2 ** (b - 1) - 1
  else:
    qmin, qmax = 0, 2**b - 1
  return qmin + (1 if narrow_range else 0), qmax


def storage_dtype(bits: int, signed: bool) -> np.dtype:
  """(u)int8 up to 8 bits, (u)int16 above."""
  if bits <= 8:
    return np.dtype(np.int8 if signed else np.uint8)
  return np.dtype(np.int16 if signed else np.uint16)


def symmetric_zero_point(bits: int, signed: bool, narrow_range: bool = False,
                         reduce_range: bool = False) -> int:
  """0 signed; 2^(b-1) for the full unsigned 8/16-bit grids (PyTorch's); else the floor midpoint."""
  if signed:
    return 0
  if bits in (8, 16) and not narrow_range and not reduce_range:
    return 2 ** (bits - 1)
  qmin, qmax = grid(bits, signed, narrow_range, reduce_range)
  return (qmin + qmax) // 2


def spec_grid(spec) -> tuple[int, int]:
  """`grid` for a qjax.QuantSpec-like object (reads only its fields, not its properties)."""
  return grid(spec.bits, spec.signed, spec.narrow_range, spec.reduce_range)


def spec_symmetric_zero_point(spec) -> int:
  return symmetric_zero_point(spec.bits, spec.signed, spec.narrow_range, spec.reduce_range)


def spec_storage_dtype(spec) -> np.dtype:
  return storage_dtype(spec.bits, spec.signed)


# ------------------------------------------------------------------------------------------
# Helpers.


def broadcast(v: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
  """A 0-d or (C,) qparam shaped to broadcast against data of rank `ndim`."""
  v = np.asarray(v)
  if axis is None or ndim == 0:
    return v.reshape(())
  axis = axis % ndim
  return v.reshape((1,) * axis + (-1,) + (1,) * (ndim - axis - 1))


def fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  """fl32(a * b + c) with one rounding (an FMA) for float32 a, b and integer-valued float32 c.

  The product is exact in float64. The float64 sum is rounded to odd: when TwoSum reports an
  inexact sum whose last mantissa bit is even, step one ulp towards the exact value (adjacent
  doubles have consecutive bit patterns, so that neighbour is odd). Casting the round-to-odd
  float64 to float32 is then correctly rounded.
  """
  a, b, c = (np.asarray(v, dtype=np.float32).astype(np.float64) for v in (a, b, c))
  a, b, c = np.broadcast_arrays(a, b, c)
  p = a * b                                  # exact: 24 + 24 bits <= 53
  with np.errstate(invalid="ignore", over="ignore"):
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)          # TwoSum: s + err == p + c exactly
  inexact = np.isfinite(s) & np.isfinite(err) & (err != 0)
  even = (s.view(np.int64) & 1) == 0
  bump = inexact & even
  s = np.where(bump, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
  return s.astype(np.float32)


def _inv(scale: np.ndarray) -> np.ndarray:
  scale = np.asarray(scale, dtype=np.float32)
  with np.errstate(divide="ignore"):
    return F32(1.0) / scale


def _finish(rounded: np.ndarray, zp: np.ndarray, qmin: int, qmax: int,
            dtype: np.dtype) -> np.ndarray:
  """NaN -> zero point (qjax's jit behaviour), clamp, cast to the storage dtype."""
  rounded = np.where(np.isnan(rounded), zp, rounded)
  return np.clip(rounded, F32(qmin), F32(qmax)).astype(dtype)


# ------------------------------------------------------------------------------------------
# The three rounding forms. x: float array (computed in float32); scale, zero_point: 0-d or
# (C,) along `axis`.


def quantize_fused(x, scale, zero_point, qmin, qmax, dtype, axis=None) -> np.ndarray:
  """clamp(rne(fma(x, 1/S, Z))): qjax.quantize per-tensor with <= 8 bits (fbgemm's form)."""
  x = np.asarray(x).astype(np.float32)
  inv = broadcast(_inv(scale), axis, x.ndim)
  zp = broadcast(np.asarray(zero_point).astype(np.float32), axis, x.ndim)
  return _finish(np.rint(fma_f32(x, inv, zp)), zp, qmin, qmax, dtype)


def quantize_two_step(x, scale, zero_point, qmin, qmax, dtype, axis=None) -> np.ndarray:
  """clamp(rne(fl(fl(x * (1/S)) + Z))): qjax.quantize per-channel or > 8 bits (ATen's form)."""
  x = np.asarray(x).astype(np.float32)
  inv = broadcast(_inv(scale), axis, x.ndim)
  zp = broadcast(np.asarray(zero_point).astype(np.float32), axis, x.ndim)
  with np.errstate(invalid="ignore", over="ignore"):
    return _finish(np.rint((x * inv) + zp), zp, qmin, qmax, dtype)


def quantize_qdq_int(x, scale, zero_point, qmin, qmax, dtype=np.int32,
                     axis=None) -> np.ndarray:
  """clamp(rne(fl(x * (1/S))) + Z): the integer inside the fake-quant forward."""
  x = np.asarray(x).astype(np.float32)
  inv = broadcast(_inv(scale), axis, x.ndim)
  zp = broadcast(np.asarray(zero_point).astype(np.float32), axis, x.ndim)
  with np.errstate(invalid="ignore", over="ignore"):
    shifted = np.rint(x * inv) + zp
  # NaN stays NaN in the fake-quant forward; callers that want integers pass finite x.
  clamped = np.minimum(np.maximum(shifted, F32(qmin)), F32(qmax))
  return clamped if dtype is None else np.where(np.isnan(clamped), zp, clamped).astype(dtype)


# ------------------------------------------------------------------------------------------
# The public functions, for a qjax.QuantSpec-like `spec` (fields only).


def quantize(x, spec, scale, zero_point) -> np.ndarray:
  """qjax.quantize: the fused form per-tensor up to 8 bits, the two-step form otherwise."""
  qmin, qmax = spec_grid(spec)
  dtype = spec_storage_dtype(spec)
  if spec.axis is None and spec.bits <= 8:
    return quantize_fused(x, scale, zero_point, qmin, qmax, dtype)
  return quantize_two_step(x, scale, zero_point, qmin, qmax, dtype, axis=spec.axis)


def dequantize(q, spec, scale, zero_point, dtype=np.float32) -> np.ndarray:
  """S * (q - Z): the difference is exact in int32 and in float32; one float32 rounding."""
  q = np.asarray(q)
  zp = broadcast(np.asarray(zero_point, dtype=np.int32), spec.axis, q.ndim)
  s = broadcast(np.asarray(scale, dtype=np.float32), spec.axis, q.ndim)
  centred = (q.astype(np.int32) - zp).astype(np.float32)
  return (centred * s).astype(dtype)


def quantize_dequantize(x, spec, scale, zero_point) -> np.ndarray:
  """S * (clamp(rne(fl(x * (1/S))) + Z, qmin, qmax) - Z) in float32, cast back to x's dtype."""
  x = np.asarray(x)
  qmin, qmax = spec_grid(spec)
  clamped = quantize_qdq_int(x, scale, zero_point, qmin, qmax, dtype=None, axis=spec.axis)
  zp = broadcast(np.asarray(zero_point).astype(np.float32), spec.axis, x.ndim)
  s = broadcast(np.asarray(scale, dtype=np.float32), spec.axis, x.ndim)
  return ((clamped - zp) * s).astype(x.dtype)


def minmax(x, spec) -> tuple[np.ndarray, np.ndarray]:
  """Per-tensor scalars, or per-channel vectors along spec.axis; NaN propagates."""
  x = np.asarray(x).astype(np.float32)
  if spec.axis is None:
    others = None
  else:
    axis = spec.axis % x.ndim
    others = tuple(a for a in range(x.ndim) if a != axis)
  return np.min(x, axis=others), np.max(x, axis=others)


def qparams_from_minmax(min_val, max_val, spec,
                        eps: float = FLOAT32_EPS) -> tuple[np.ndarray, np.ndarray]:
  """PyTorch's observer formula in float32; a NaN scale for non-finite or inverted ranges.

    lo = min(min_val, 0), hi = max(max_val, 0)
    symmetric: S = max(-lo, hi) / ((qmax - qmin) / 2),  Z = symmetric zero point
    affine:    S = (hi - lo) / (qmax - qmin),           Z = clamp(qmin - rne(lo / S), qmin, qmax)
    S = max(S, eps)
  """
  qmin, qmax = spec_grid(spec)
  mn = np.asarray(min_val, dtype=np.float32)
  mx = np.asarray(max_val, dtype=np.float32)
  if spec.axis is None:
    mn, mx = mn.reshape(()), mx.reshape(())
  with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
    lo = np.minimum(mn, F32(0))
    hi = np.maximum(mx, F32(0))
    if spec.symmetric:
      scale = np.maximum(-lo, hi) / F32((qmax - qmin) / 2)    # (qmax - qmin) / 2 is exact
      scale = np.maximum(scale, F32(eps))
      zp = np.full(scale.shape, spec_symmetric_zero_point(spec), np.int32)
    else:
      scale = (hi - lo) / F32(qmax - qmin)
      scale = np.maximum(scale, F32(eps))
      ratio = np.rint(lo / scale)
      ratio = np.where(np.isfinite(ratio), ratio, 0)        # only where the scale is poisoned
      zp = np.clip(qmin - ratio.astype(np.int64), qmin, qmax).astype(np.int32)
    valid = np.isfinite(mn) & np.isfinite(mx) & (mn <= mx)
    scale = np.where(valid, scale, F32(np.nan)).astype(np.float32)
  return scale, zp


# ------------------------------------------------------------------------------------------
# Test data.


def near_ties(rng: np.random.Generator, scale, k_low: int, k_high: int, shape,
              axis: int | None = None, rel: float = 3e-7) -> np.ndarray:
  """float32 x with x / S within a few float32 ulps of a half-integer k + 1/2, k in [k_low, k_high).

  x = fl32((k + 0.5) * S * (1 + u)), u ~ uniform(-rel, rel), computed in float64. These are
  the inputs on which the three rounding forms disagree.
  """
  shape = tuple(shape)
  k = rng.integers(k_low, k_high, size=shape).astype(np.float64)
  s = broadcast(np.asarray(scale, dtype=np.float32), axis, len(shape)).astype(np.float64)
  u = rng.uniform(-rel, rel, size=shape)
  return ((k + 0.5) * s * (1.0 + u)).astype(np.float32)
