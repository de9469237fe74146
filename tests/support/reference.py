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


# ------------------------------------------------------------------------------------------
# PyTorch's quantized CPU operators on quint8 (PyTorch 2.13, fbgemm and x86 engines): the add
# and concatenation of torch.ao.nn.quantized.QFunctional and the average poolings of a
# quantized tensor. Written from ATen's sources (aten/src/ATen/native/quantized/cpu/:
# BinaryOps.cpp, TensorShape.cpp, AdaptiveAveragePooling.cpp, AveragePool2d.cpp,
# kernels/QuantizedOpKernels.cpp; aten/src/ATen/cpu/vec/vec256/vec256_qint.h) and pinned
# bit for bit against torch 2.13 by tests/test_reference_ops_torch.py.
#
# Integers are torch's quint8 values q in [0, 255] with zero points Z in [0, 255]. qjax
# carries them on int8 moved down by 128 (q8 = q - 128, Z8 = Z - 128): the formulas use
# q - Z and Z + integer, so they hold on the carrier with Z8, except that the fma form
# dequantizes q = q8 + 128 itself (float(q) and f32(-Z S) are the uint8-domain values).
#
# Torch's kernels mix four float32 forms (inv = f32(1 / S), S a float32 scale):
#
#   dequantize "fma"        x = fma(q, S, f32(-Z S))          Vectorized<quint8>::dequantize
#   dequantize "product"    x = f32(S (q - Z))                at::native::dequantize_val,
#                                                              fbgemm::Dequantize
#   quantize "round_add"    q = rne(f32(x inv)) + Z           Vectorized<quint8>::quantize
#                                                              (ATen's QuantizeAvx2 / 512)
#   quantize "add_round"    q = rne(f32(f32(x inv) + Z))      at::native::quantize_val
#   quantize "fused"        q = rne(fma(x, inv, Z))           fbgemm::Quantize on arrays
#                                                              (quantize_vec,
#                                                              torch.quantize_per_tensor)
#
# each quantization clamped to [0, 255]. "round_add" breaks a tie x inv = k + 1/2 towards an
# even k, the other two towards an even k + Z; "fused" rounds x inv + Z once, "add_round"
# twice; the fma dequantization keeps the rounding error of f32(-Z S) (up to half an ulp of
# Z S, large against S (q - Z) when q is near Z). The sources read pass LEGACY = false to
# fbgemm::Quantize in quantize_val and quantize_vec, which reads as "round_add"; torch 2.13's
# binaries add Z first, as above, and the tests pin what the binaries do.
#
# Which form runs depends on the kernel build (`cpu_capability`, torch.backends.cpu.
# get_cpu_capability() in lower case) and on where an element falls: the vectorized body
# handles whole vectors, a scalar loop the rest. "avx2" and "avx512" run the AVX2 builds of
# the add, the concatenation and the adaptive pooling (they are registered with
# REGISTER_DISPATCH, which leaves AVX512 CPUs on AVX2) and the AVX512 build of avg_pool2d
# (ALSO_REGISTER_AVX512_DISPATCH). "default" is the build without vector intrinsics, whose
# fallback Vectorized<quint8> dequantizes with "product" and quantizes with "fused".
# The quantized engine does not enter these kernels: fbgemm and x86 give the same results
# (qnnpack runs kernels of its own, not modelled here).
# cpu_capability=None puts every element on the vectorized body of the AVX2 / AVX512 builds,
# the single rule a port to other hardware reproduces; torch then agrees except on the scalar
# tails, where the two forms disagree only on rare near ties.

TORCH_CPU_CAPABILITIES = ("avx512", "avx2", "default")
# Elements per vectorized iteration of cpu_kernel_vec in qadd_kernel: 2 x
# Vectorized<quint8>::size() = 2 x 32, in the AVX2 build and in the default one.
TORCH_ADD_BLOCK = 64
# Channels per float vector (Vectorized<float>::size()) in the NHWC avg_pool2d kernel, which
# runs its AVX512 build on AVX512 CPUs; the NHWC cat and adaptive pooling run the AVX2 build
# there, 8 channels per vector.
_TORCH_LANES = {"avx512": 16, "avx2": 8}


def _check_capability(cpu_capability: str | None) -> None:
  if cpu_capability is not None and cpu_capability not in TORCH_CPU_CAPABILITIES:
    raise ValueError(f"cpu_capability must be None or one of {TORCH_CPU_CAPABILITIES}; got "
                     f"{cpu_capability!r}.")


def _vector_forms(cpu_capability: str | None) -> tuple[str, str]:
  """(dequantize form, quantize form) of the vectorized bodies of add and NHWC cat."""
  return ("product", "fused") if cpu_capability == "default" else ("fma", "round_add")


def torch_dequantize(q, scale, zero_point, form: str) -> np.ndarray:
  """float32 x from quint8 q: "fma" fma(q, S, f32(-Z S)) or "product" f32(S (q - Z))."""
  s = np.float32(scale)
  if form == "fma":
    return fma_f32(np.asarray(q).astype(np.float32), s, np.float32(-int(zero_point)) * s)
  if form == "product":
    return (np.asarray(q).astype(np.int64) - int(zero_point)).astype(np.float32) * s
  raise ValueError(f"unknown dequantize form {form!r}")


def torch_quantize(x, inv_scale, zero_point, form: str, qmin: int = 0,
                   qmax: int = 255) -> np.ndarray:
  """quint8 q from float32 x and inv = `inv_scale` (float32; most callers pass f32(1 / S)):

    "round_add"  clamp(rne(f32(x inv)) + Z)
    "add_round"  clamp(rne(f32(f32(x inv) + Z)))
    "fused"      clamp(rne(fma(x, inv, Z)))

  clamped to [qmin, qmax] (a sub-range of [0, 255]; torch clamps to [0, 255]), as uint8.
  """
  x = np.asarray(x, np.float32)
  inv = np.float32(inv_scale)
  z = np.float32(int(zero_point))
  with np.errstate(over="ignore", invalid="ignore"):
    if form == "round_add":
      r = np.rint(x * inv) + z
    elif form == "add_round":
      r = np.rint((x * inv) + z)
    elif form == "fused":
      r = np.rint(fma_f32(x, inv, z))
    else:
      raise ValueError(f"unknown quantize form {form!r}")
  return np.clip(r, qmin, qmax).astype(np.uint8)


def _inv_f32(scale) -> np.float32:
  return np.float32(1) / np.float32(scale)


def quantized_add(qa, sa, za, qb, sb, zb, s_out, z_out, relu: bool = False, qmin: int = 0,
                  qmax: int = 255, *, cpu_capability: str | None = None) -> np.ndarray:
  """torch.ops.quantized.add / add_relu on quint8 (QFunctional.add / add_relu after convert).

  qa and qb have the same shape and are given in torch's memory order (for channels_last
  tensors, NHWC arrays): the elements are numbered by the flattened C order of the arrays,
  n of them. With inv = f32(1 / S_out):

    vector body, elements [0, 64 floor(n / 64)) (all of them for cpu_capability=None):
      a = fma(q_a, S_a, f32(-Z_a S_a)), b likewise
      c = f32(a + b);  c = max(c, 0) for add_relu
      q = clamp(rne(f32(c inv)) + Z_out, qmin, qmax)
    scalar tail, the other n mod 64 elements:
      a = f32(S_a (q_a - Z_a)), b likewise
      c = f32(a + b);  c = max(c, 0) for add_relu
      q = clamp(rne(f32(f32(c inv) + Z_out)), qmin, qmax)

  "default" builds use a = f32(S_a (q_a - Z_a)) and q = clamp(rne(fma(c, inv, Z_out))) in
  the vector body. Torch clamps to [0, 255]; qmin / qmax narrow that (a sub-range of it).
  Tensors of more than 32768 elements (at::internal::GRAIN_SIZE) are split among threads,
  each piece with its own 64-element blocks and tail; this models one piece. Inputs of
  different memory formats take the scalar loop everywhere (not modelled).

  Returns:
    uint8 quint8 values, shaped as qa.
  """
  _check_capability(cpu_capability)
  qa, qb = np.asarray(qa), np.asarray(qb)
  if qa.shape != qb.shape:
    raise ValueError(f"quantized_add: shapes differ, {qa.shape} and {qb.shape}")
  n = qa.size
  head = n if cpu_capability is None else n // TORCH_ADD_BLOCK * TORCH_ADD_BLOCK
  deq_form, q_form = _vector_forms(cpu_capability)
  inv = _inv_f32(s_out)

  def run(fa, fb, dq, qf):
    c = torch_dequantize(fa, sa, za, dq) + torch_dequantize(fb, sb, zb, dq)
    if relu:
      c = np.maximum(c, np.float32(0))
    return torch_quantize(c, inv, z_out, qf, qmin, qmax)

  fa, fb = qa.reshape(-1), qb.reshape(-1)
  out = np.concatenate([run(fa[:head], fb[:head], deq_form, q_form),
                        run(fa[head:], fb[head:], "product", "add_round")])
  return out.reshape(qa.shape)


def quantized_cat(inputs, s_out, z_out, axis: int, *, channels_last: bool = False,
                  cpu_capability: str | None = None) -> np.ndarray:
  """torch.ops.quantized.cat (QFunctional.cat after convert) of quint8 tensors.

  `inputs`: a sequence of (q, S, Z), S a float32 value. Torch has two paths:

  channels_last=True: torch's NHWC kernel, which runs when every input is 4-D and
  channels_last-contiguous (Tensor.is_contiguous(memory_format=torch.channels_last), true
  also of NCHW tensors with H = W = 1 or C = 1) and dim = 1. The arrays are then NHWC and `axis` is
  -1 (or 3). An input whose S and Z equal the output's is copied. Any other is requantized
  channel by channel: its first 8 floor(C_i / 8) channels of every pixel with the vector
  forms (cpu_capability None, "avx2", "avx512": a = fma(q, S_i, f32(-Z_i S_i)),
  q = clamp(rne(f32(a inv)) + Z_out); "default": a = f32(S_i (q - Z_i)),
  q = clamp(rne(fma(a, inv, Z_out)))), the remaining C_i mod 8 channels (none for None)
  with a = f32(S_i (q - Z_i)), q = clamp(rne(f32(f32(a inv) + Z_out))).

  channels_last=False: every other call. Torch dequantizes each input (f32(S_i (q - Z_i))),
  concatenates the floats and quantizes them with torch.quantize_per_tensor:
  q = clamp(rne(fma(a, inv, Z_out))), for every input, equal qparams included (for those it
  gives back q). Any layout and axis.

  inv = f32(1 / S_out). Returns the uint8 concatenation along `axis`.
  """
  _check_capability(cpu_capability)
  inv = _inv_f32(s_out)
  parts = []
  for q, s, z in inputs:
    q = np.asarray(q)
    if not channels_last:
      parts.append(torch_quantize(torch_dequantize(q, s, z, "product"), inv, z_out, "fused"))
      continue
    if q.ndim != 4 or axis not in (-1, 3):
      raise ValueError("quantized_cat: the NHWC kernel concatenates 4-D NHWC arrays along "
                       f"axis -1; got shape {q.shape} and axis {axis}")
    if float(s) == float(s_out) and int(z) == int(z_out):
      parts.append(q.astype(np.uint8))
      continue
    c = q.shape[-1]
    head = c if cpu_capability is None else c // 8 * 8
    deq_form, q_form = _vector_forms(cpu_capability)
    parts.append(np.concatenate([
        torch_quantize(torch_dequantize(q[..., :head], s, z, deq_form), inv, z_out, q_form),
        torch_quantize(torch_dequantize(q[..., head:], s, z, "product"), inv, z_out,
                       "add_round")], axis=-1))
  return np.concatenate(parts, axis=axis)


def _pair(v) -> tuple[int, int]:
  return (int(v), int(v)) if np.ndim(v) == 0 else (int(v[0]), int(v[-1]))


def _adaptive_windows(n_in: int, n_out: int) -> list[tuple[int, int]]:
  """[floor(o n_in / n_out), ceil((o + 1) n_in / n_out)) for each output index o."""
  return [((o * n_in) // n_out, -(-((o + 1) * n_in) // n_out)) for o in range(n_out)]


def quantized_adaptive_avg_pool(q, z, output_size, *, channels_last: bool = True,
                                cpu_capability: str | None = None) -> np.ndarray:
  """torch.nn.functional.adaptive_avg_pool2d of a quint8 tensor (nn.AdaptiveAvgPool2d in a
  converted model); output_size 1 is global average pooling.

  `q`: (N, H, W, C) uint8; `z` its zero point; the output keeps the input's scale and zero
  point. Window (i, j): rows [floor(i H / oH), ceil((i + 1) H / oH)), columns likewise, n
  elements (kH x kW).

  channels_last=True (torch's input channels_last-contiguous; a converted model's activations
  are, as fbgemm / x86 convolutions return channels_last): with acc = sum q - Z n (int32,
  exact in float32), M = f32(1 / n) and inv = f32(1 / f32(1 / M)) (= M for every n < 2^20),

    channels [0, 8 floor(C / 8)) (all for None; none for "default"):
      q = clamp(rne(fma(acc, inv, Z)), 0, 255)
    the other channels:
      q = clamp(rne(f32(f32(acc inv) + Z)), 0, 255)

  channels_last=False (contiguous NCHW): q = rne(f32(f32(sum q) r)), r = f32(f32(1 / kH) / kW),
  with no zero point and no clamp (neither is needed to stay in [0, 255]).

  The forms agree on exact ties (each rounds the mean to even) but round differently near
  them: a 2 x 3 window with Z = 100 and sum q = 9 gives acc = -591 and 2 from the contiguous
  kernel (f32(9 f32(1/6)) = 1.5) and from the "add Z then round" channels
  (f32(f32(-591 f32(1/6)) + 100) = 1.5), 1 from the fma channels
  (f32(fma(-591, f32(1/6), 100)) = 1.4999971). The channels_last kernel runs as AVX2 on
  AVX512 CPUs (REGISTER_DISPATCH).

  Returns:
    (N, oH, oW, C) uint8.
  """
  _check_capability(cpu_capability)
  q = np.asarray(q)
  n_b, h, w, c = q.shape
  oh, ow = _pair(output_size)
  head = c if cpu_capability is None else (0 if cpu_capability == "default" else c // 8 * 8)
  out = np.zeros((n_b, oh, ow, c), np.uint8)
  for i, (h0, h1) in enumerate(_adaptive_windows(h, oh)):
    for j, (w0, w1) in enumerate(_adaptive_windows(w, ow)):
      kh, kw = h1 - h0, w1 - w0
      total = q[:, h0:h1, w0:w1, :].astype(np.int64).sum(axis=(1, 2))
      if not channels_last:
        r = (np.float32(1) / np.float32(kh)) / np.float32(kw)
        out[:, i, j, :] = np.rint(total.astype(np.float32) * r).astype(np.uint8)
        continue
      acc = (total - int(z) * kh * kw).astype(np.float32)
      m = np.float32(1) / np.float32(kh * kw)
      inv = np.float32(1) / (np.float32(1) / m)
      out[:, i, j, :head] = torch_quantize(acc[:, :head], inv, z, "fused")
      out[:, i, j, head:] = torch_quantize(acc[:, head:], inv, z, "add_round")
  return out


def pool_output_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
  """torch's pooling_output_shape (dilation 1): floor or ceil of (size + 2 pad - kernel) /
  stride, plus one; in ceil mode, less the last window if it would start past size + pad."""
  out = (size + 2 * pad - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
  if ceil_mode and (out - 1) * stride >= size + pad:
    out -= 1
  return out


def quantized_avg_pool2d(q, z, kernel, stride=None, padding=0, ceil_mode: bool = False,
                         count_include_pad: bool = True, divisor_override: int | None = None,
                         *, channels_last: bool = True,
                         cpu_capability: str | None = None) -> np.ndarray:
  """torch.nn.functional.avg_pool2d of a quint8 tensor (torch.ao.nn.quantized.functional.
  avg_pool2d, nn.AvgPool2d in a converted model); the output keeps the input's scale and
  zero point.

  `q`: (N, H, W, C) uint8; `z` its zero point; kernel / stride (default: kernel) / padding
  an int or (h, w). Window (i, j) covers rows [i s_h - p_h, min(i s_h - p_h + k_h, H + p_h)),
  columns likewise, with P positions; the n of them inside the input are summed:
  acc = sum q - Z n (int32). D = divisor_override, else P with count_include_pad, else n;
  M = f32(1 / D).

  channels_last=True (torch's NHWC kernel): the first L floor(C / L) channels, L = 16 for
  "avx512", 8 for "avx2" (all for None, none for "default"):
      q = clamp(rne(f32(acc M)) + Z, 0, 255)
    the other channels, with inv = f32(1 / f32(1 / M)) (= M for every D < 2^20):
      q = clamp(rne(f32(f32(acc inv) + Z)), 0, 255)
  channels_last=False (contiguous NCHW): q = clamp(rne(f32(f32(acc M) + Z)), 0, 255).

  Returns:
    (N, oH, oW, C) uint8, oH = pool_output_size(H, k_h, s_h, p_h, ceil_mode), oW likewise.
  """
  _check_capability(cpu_capability)
  q = np.asarray(q)
  n_b, h, w, c = q.shape
  (kh, kw), (ph, pw) = _pair(kernel), _pair(padding)
  sh, sw = (kh, kw) if stride is None or np.size(stride) == 0 else _pair(stride)
  oh = pool_output_size(h, kh, sh, ph, ceil_mode)
  ow = pool_output_size(w, kw, sw, pw, ceil_mode)
  if not channels_last or cpu_capability == "default":
    head = 0
  elif cpu_capability is None:
    head = c
  else:
    head = c // _TORCH_LANES[cpu_capability] * _TORCH_LANES[cpu_capability]
  out = np.zeros((n_b, oh, ow, c), np.uint8)
  for i in range(oh):
    for j in range(ow):
      h0, w0 = i * sh - ph, j * sw - pw
      h1, w1 = min(h0 + kh, h + ph), min(w0 + kw, w + pw)
      positions = (h1 - h0) * (w1 - w0)
      h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, h), min(w1, w)
      n = (h1 - h0) * (w1 - w0)
      divisor = divisor_override or (positions if count_include_pad else n)
      acc = (q[:, h0:h1, w0:w1, :].astype(np.int64).sum(axis=(1, 2)) - int(z) * n
             ).astype(np.float32)
      m = np.float32(1) / np.float32(divisor)
      inv = np.float32(1) / (np.float32(1) / m)
      out[:, i, j, :head] = torch_quantize(acc[:, :head], m, z, "round_add")
      out[:, i, j, head:] = torch_quantize(acc[:, head:], inv if channels_last else m, z,
                                           "add_round")
  return out


# ------------------------------------------------------------------------------------------
# An integer-only add (no PyTorch counterpart).


def fixed_point_multiplier(multiplier: float) -> tuple[int, int]:
  """(M0, r) with M ~= M0 / 2^r, M0 in [2^30, 2^31): M = m 2^e with m in [0.5, 1) (frexp),
  M0 = rne(m 2^31), r = 31 - e; a mantissa rounding up to 2^31 is halved (r one less)."""
  m, e = np.frexp(np.float64(multiplier))
  if not (np.isfinite(m) and m > 0):
    raise ValueError(f"fixed_point_multiplier: need a finite M > 0; got {multiplier!r}")
  m0 = int(np.round(m * 2.0**31))
  if m0 == 2**31:
    m0, e = m0 // 2, e + 1
  return m0, 31 - int(e)


def integer_add(qa, sa, za, qb, sb, zb, s_out, z_out, relu: bool = False, qmin: int = 0,
                qmax: int = 255, left_shift: int = 20) -> np.ndarray:
  """TFLite's integer ADD (single-rounding fixed point), in int64 NumPy: no float touches the
  data. Host side, in float64: T = 2 max(S_a, S_b),

    M_a = S_a / T,  M_b = S_b / T  (<= 1/2),  M_out = T / (2^left_shift S_out),

  each as (M0, r) = fixed_point_multiplier(M). Per element, with
  R(v, M0, r) = floor((v M0 + 2^(r-1)) / 2^r) (`mul_shift_round`, round half up):

    a = R((q_a - Z_a) 2^left_shift, M0_a, r_a),  b likewise
    q = clamp(Z_out + R(a + b, M0_out, r_out), qmin, qmax), qmin raised to Z_out for relu.

  left_shift = 20 keeps |q - Z| 2^20 < 2^28 and leaves the rescaled inputs 19 fractional
  bits. TFLite's default build rounds each multiply twice instead (a doubling high multiply,
  then a shift rounding half away from zero), which can differ by one on exact halves.
  """
  sa64, sb64, so64 = (np.float64(np.float32(v)) for v in (sa, sb, s_out))
  twice_max = 2.0 * max(sa64, sb64)
  ma, ra = fixed_point_multiplier(sa64 / twice_max)
  mb, rb = fixed_point_multiplier(sb64 / twice_max)
  mo, ro = fixed_point_multiplier(twice_max / (2.0**left_shift * so64))
  a = mul_shift_round((np.asarray(qa, np.int64) - int(za)) << left_shift, ma, ra)
  b = mul_shift_round((np.asarray(qb, np.int64) - int(zb)) << left_shift, mb, rb)
  r = mul_shift_round(a + b, mo, ro) + int(z_out)
  low = max(qmin, int(z_out)) if relu else qmin
  return np.clip(r, low, qmax).astype(np.uint8 if qmin >= 0 and qmax <= 255 else np.int64)
