"""A plain-NumPy reference of qjax's quantization arithmetic (`qjax/numerics.py`,
`qjax/integer/arith.py`).

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

The integer path of one layer (`qjax/integer/arith.py`: `int8_shift` to `fbgemm_params`) is
written the same way, from the formulas in the qjax.integer.arith module docstring, not from
its code: int64 sums of int8 products, explicit zero-point padding, requantization in Python /
NumPy integer or float32 arithmetic, one IEEE operation at a time. Accumulators and
`quantize_input` are int64, requantized outputs int8.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
FLOAT32_EPS = float(np.finfo(np.float32).eps)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# fbgemm's smallest activation scale: ChooseQuantizationParams stretches a range whose scale
# would be smaller to this one (qjax.integer.dynamic; its reference is in tests/test_dynamic.py).
FBGEMM_SMALL_SCALE = F32(6.1e-5)


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
# The integer path of one layer (`qjax/integer/arith.py`; see the module docstring). `spec`: a
# qjax.QuantSpec-like object of at most 8 bits (fields only).


def int8_shift(spec) -> int:
  """128 for an unsigned 8-bit grid (stored as uint8 [0, 255], carried as int8 moved down by
  128), whatever its reduce_range / narrow_range; 0 otherwise."""
  return 128 if (not spec.signed and spec.bits == 8) else 0


def storage_grid(spec) -> tuple[int, int]:
  """What values of `spec`'s grid are clamped to, before the shift: the 8-bit storage range
  for an 8-bit grid ([0, 255] uint8, [-128, 127] int8), the grid itself when narrower."""
  if spec.bits == 8:
    return (-128, 127) if spec.signed else (0, 255)
  return spec_grid(spec)


def int8_bounds(spec) -> tuple[int, int]:
  """The clamp range on the int8 carrier: the storage range moved by the shift."""
  lo, hi = storage_grid(spec)
  return lo - int8_shift(spec), hi - int8_shift(spec)


def quantize_input(x, spec, scale, zero_point) -> np.ndarray:
  """clamp(rne(x / S) + Z) on the storage range (qjax.quantize's rounding, `quantize_fused`),
  minus the shift, as int64. `zero_point` on spec's own grid."""
  lo, hi = storage_grid(spec)
  q = quantize_fused(np.asarray(x, np.float32), scale, zero_point, lo, hi, np.int64)
  return q.astype(np.int64) - int8_shift(spec)


def matmul(x: np.ndarray, kernel_t: np.ndarray) -> np.ndarray:
  """acc[..., n] = sum_k x[..., k] kernel_t[n, k] in int64."""
  return np.asarray(x, np.int64) @ np.asarray(kernel_t, np.int64).T


def same_pads(in_spatial, window, strides, dilation) -> list[tuple[int, int]]:
  """"SAME" padding: out = ceil(in / stride), the missing rows split low = total // 2."""
  pads = []
  for size, w, s, d in zip(in_spatial, window, strides, dilation):
    out = -(-size // s)
    total = max((out - 1) * s + (w - 1) * d + 1 - size, 0)
    pads.append((total // 2, total - total // 2))
  return pads


def conv(x: np.ndarray, kernel: np.ndarray, *, strides, padding, dilation, groups: int,
         pad_value: int) -> np.ndarray:
  """int64 cross-correlation of (B, *spatial, C) with a (*window, C / groups, O) kernel after
  padding with `pad_value`:
  acc[b, p, o] = sum_{w, c} x_pad[b, p s + w d, g(o) C_g + c] k[w, c, o], g(o) = o // O_g."""
  x = np.asarray(x, np.int64)
  kernel = np.asarray(kernel, np.int64)
  nsp = kernel.ndim - 2
  window = kernel.shape[:nsp]
  x = np.pad(x, [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)], constant_values=pad_value)
  out_sp = [(n - ((w - 1) * d + 1)) // s + 1
            for n, w, d, s in zip(x.shape[1:-1], window, dilation, strides)]
  c_g, o_g = x.shape[-1] // groups, kernel.shape[-1] // groups
  acc = np.zeros((x.shape[0], *out_sp, kernel.shape[-1]), np.int64)
  for offset in np.ndindex(*window):
    index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                  for o, d, n, s in zip(offset, dilation, out_sp, strides))
    patch = x[(slice(None),) + index + (slice(None),)]
    for g in range(groups):
      acc[..., g * o_g:(g + 1) * o_g] += (patch[..., g * c_g:(g + 1) * c_g]
                                           @ kernel[offset][:, g * o_g:(g + 1) * o_g])
  return acc


def clamp_output(r: np.ndarray, zero_point, lo: int, hi: int, relu: bool) -> np.ndarray:
  """clamp(Z + r, lo, hi) as int8, lo raised to Z for a fused ReLU (exact: int64 / float64)."""
  z = np.asarray(zero_point, np.int64)
  low = np.maximum(lo, z) if relu else lo
  return np.clip(np.asarray(r, np.float64) + z, low, hi).astype(np.int8)


def requantize_float(acc, multiplier, zero_point, lo, hi, relu=False) -> np.ndarray:
  """clamp(Z + rne(f32(acc) * M)): one float32 conversion, one float32 product."""
  y = np.asarray(acc, np.int64).astype(np.float32) * np.asarray(multiplier, np.float32)
  return clamp_output(np.rint(y), zero_point, lo, hi, relu)


def mul_shift_round(acc, m0, shift) -> np.ndarray:
  """floor((acc m0 + 2^(shift-1)) / 2^shift), saturated to int32 (|acc m0| < 2^62: int64)."""
  acc, m0, shift = np.broadcast_arrays(np.asarray(acc, np.int64), np.asarray(m0, np.int64),
                                       np.asarray(shift, np.int64))
  y = (acc * m0 + np.left_shift(np.int64(1), shift - 1)) >> shift
  return np.clip(y, INT32_MIN, INT32_MAX)


def requantize_integer(acc, m0, shift, zero_point, lo, hi, relu=False) -> np.ndarray:
  """clamp(Z + floor((acc M0 + 2^(r-1)) / 2^r)): the fixed-point multiplier M0 / 2^r."""
  return clamp_output(mul_shift_round(acc, m0, shift), zero_point, lo, hi, relu)


def requantize_fbgemm(acc, bias, multiplier, zero_point, lo, hi, relu=False) -> np.ndarray:
  """clamp(Z + rne((f32(acc) + b') * M)): a float32 conversion, sum and product, each rounded
  on its own (b' = f32(b / A) and M are given)."""
  y = np.asarray(acc, np.int64).astype(np.float32) + np.asarray(bias, np.float32)
  with np.errstate(over="ignore"):  # huge accumulators times M > 1: inf, saturated below
    y = y * np.asarray(multiplier, np.float32)
  return clamp_output(np.rint(y), zero_point, lo, hi, relu)


def fbgemm_params(x_scale, w_scale, y_scale, bias) -> tuple[np.ndarray, np.ndarray]:
  """(b' = f32(b / A), M = f32(A / S_y)) with A = f32(f32(S_x) S_w). Each float32 operation
  is the float64 one rounded to float32 (exact: a float64 product of two float32 values is
  exact, and a float64 quotient rounded to float32 is the correctly rounded float32 one)."""
  a = (np.float64(np.float32(x_scale)) * np.asarray(w_scale, np.float32).astype(np.float64)
       ).astype(np.float32)
  b = (np.asarray(bias, np.float32).astype(np.float64) / a.astype(np.float64)).astype(
      np.float32)
  m = (a.astype(np.float64) / np.float64(np.float32(y_scale))).astype(np.float32)
  return b, m


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
