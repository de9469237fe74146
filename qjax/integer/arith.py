"""The integer inference path: int8 x int8 contractions with int32 accumulation, requantization.

Pure functions over integer arrays; the integer forms (`qjax.integer.forms`) call them with
the arguments `qjax.convert` lowered. The math of one quantized layer with input grid
(S_x, Z_x), weight grid (S_w, Z_w = 0, symmetric) and output grid (S_y, Z_y):

  acc   = sum_k q_x[k] q_w[k, n]                       int8 x int8 -> int32 (`matmul` / `conv`)
  acc'  = acc + offset + bias                           offset = -Z_x sum_k q_w[k, n]  (int32)
                                                        bias   = rne(b / (S_x S_w))   (int32)
  q_y   = clamp(Z_y + requant(acc'), lo, hi)            lo = Z_y with a fused ReLU

so that acc + offset = sum_k (q_x - Z_x)(q_w - Z_w), the textbook formula. Three requantizers
(`qjax.integer.Requant`), each reproducible by NumPy integer code:

  "fbgemm"   q = Z_y + rne((f32(acc + offset) + f32(b / A)) * M)   (float bias b)
  "float"    q = Z_y + rne(f32(acc') * M)                           (int32 bias)
             with A = f32(f32(S_x) * S_w) and M = f32(A / S_y), float32 arithmetic: "fbgemm"
             is what fbgemm's requantization of PyTorch's x86 quantized Linear computes
             (PyTorch routes x86 convolutions on AVX512-VNNI CPUs to oneDNN, whose float order
             differs in about one output in 10^6).
  "integer"  q = Z_y + floor((acc' * M0 + 2^(r-1)) / 2^r),  M ~= M0 / 2^r with
             M0 in [2^30, 2^31): fixed point, no float anywhere (gemmlowp / TFLite style;
             rounds ties up). The 62-bit product is formed exactly from 32-bit pieces.

Activations travel as int8 even when their grid is unsigned: an unsigned 8-bit grid is
carried shifted by -128 (`int8_shift`), which changes no value of q - Z. XLA's CPU kernels
are fast only for int8 x int8 (uint8 x int8 falls to a loop ~7x slower), and the lowering of
each contraction is chosen for speed among exact ones (see `matmul` and `conv`); every one
keeps int8 operands and an int32 result in the jaxpr (XLA:CPU widens a direct convolution
with few channels to int32 when it compiles it; see `conv`).

Clamping. 8-bit grids clamp to the whole 8-bit storage range, as PyTorch's quantized kernels
do: `reduce_range` and `narrow_range` only shape the qparams (an x86 activation observed on
[0, 127] may reach 255 after conversion, where the fake-quant forward clamps at 127).
Narrower grids (4-bit, ...) clamp to their own [qmin, qmax], so they stay narrow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax import _checks
from qjax import _float32
from qjax import numerics
from qjax.numerics import QuantSpec

INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------------------
# Grids inside the integer path.


def check_int8_spec(spec: QuantSpec, *, name: str) -> None:
  """ValueError naming `name` unless `spec`'s grid fits int8 after `int8_shift`."""
  if spec.bits > 8:
    raise ValueError(f"{name}: the integer path runs int8 x int8 contractions and needs grids of "
                     f"at most 8 bits; got a {spec.bits}-bit {spec}. Use bits <= 8 for the "
                     f"layers you convert (16-bit grids are simulated by fake quantization only).")


def int8_shift(spec: QuantSpec) -> int:
  """What is subtracted from `spec`'s integers to carry them as int8: 128 for an unsigned
  8-bit grid (stored as uint8 [0, 255]), else 0 (signed grids; unsigned grids of <= 7 bits)."""
  return 128 if (not spec.signed and spec.bits == 8) else 0


def int8_bounds(spec: QuantSpec) -> tuple[int, int]:
  """The clamp range of `spec`'s values in the int8 domain (after `int8_shift`): all of
  [-128, 127] for an 8-bit grid (its storage range, see the module docstring), [qmin, qmax]
  for a narrower one."""
  check_int8_spec(spec, name="int8_bounds")
  if spec.bits == 8:
    return -128, 127
  return spec.qmin, spec.qmax


def _storage_spec(spec: QuantSpec) -> QuantSpec:
  """The grid values are clamped to in the integer path (see `int8_bounds`)."""
  return QuantSpec(bits=8, signed=spec.signed) if spec.bits == 8 else spec


def quantize_input(x: jax.Array, spec: QuantSpec, scale: jax.Array,
                   zero_point: jax.Array) -> jax.Array:
  """Float activations to int8: clamp(rne(x / S) + Z, lo, hi) - int8_shift(spec), with
  [lo, hi] the storage range of an 8-bit grid ([0, 255] for uint8, like
  torch.quantize_per_tensor) or the grid itself when narrower.

  `zero_point` is given on `spec`'s own grid (not shifted); the rounding is `qjax.quantize`'s
  (bit for bit torch.quantize_per_tensor).
  """
  check_int8_spec(spec, name="quantize_input")
  q = numerics.quantize(x, _storage_spec(spec), numerics.QParams(scale, zero_point))
  shift = int8_shift(spec)
  if shift:
    return (q.astype(jnp.int16) - jnp.int16(shift)).astype(jnp.int8)
  return q.astype(jnp.int8)


def dequantize_output(q8: jax.Array, scale: jax.Array, zero_point8: jax.Array,
                      dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """int8 activations back to real values: S * (q8 - Z8), one float32 rounding."""
  centred = q8.astype(jnp.int32) - zero_point8
  return (centred.astype(jnp.float32) * scale).astype(dtype)


# ------------------------------------------------------------------------------------------
# Contractions: int8 operands, int32 result.


def check_int8(name: str, value: jax.Array) -> None:
  """TypeError naming `name` unless `value` is int8, the integer path's operand type.

  Example:
    >>> check_int8("conv: x", jnp.zeros(2, jnp.float32))
    Traceback (most recent call last):
    ...
    TypeError: conv: x must be int8 (the integer path's operand type); got float32.
  """
  if jnp.dtype(value.dtype) != jnp.int8:
    raise TypeError(f"{name} must be int8 (the integer path's operand type); got "
                    f"{jnp.dtype(value.dtype)}.")


def matmul(x: jax.Array, kernel_t: jax.Array) -> jax.Array:
  """acc[..., n] = sum_k x[..., k] * kernel_t[n, k] in int32, from int8 operands.

  The kernel is stored output-channel first, (N, K) as in PyTorch, because XLA's CPU int8
  GEMM is fastest as (N, K) x (M, K)^T: 0.45-0.9x the float32 time of the same product on
  this machine, where (M, K) x (K, N) ran 0.7-3x. One row (M = 1) takes XLA's int8 GEMV,
  ~3x slower than float, so a single row is padded to two.

  Args:
    x: int8 array (..., K).
    kernel_t: int8 array (N, K).

  Returns:
    int32 array (..., N).
  """
  check_int8("matmul: x", x)
  check_int8("matmul: kernel_t", kernel_t)
  if x.ndim < 1 or kernel_t.ndim != 2 or x.shape[-1] != kernel_t.shape[1]:
    raise ValueError(f"matmul: x (..., K) and kernel_t (N, K) must share K; got shapes "
                     f"{x.shape} and {kernel_t.shape}.")
  lead = x.shape[:-1]
  m = int(np.prod(lead, dtype=np.int64))
  rows = x.reshape((m, x.shape[-1]))  # explicit: -1 is ambiguous when K = 0
  if m == 1:
    rows = jnp.concatenate([rows, rows], axis=0)
  acc_t = lax.dot_general(kernel_t, rows, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.int32)  # (N, M)
  return acc_t[:, :m].T.reshape(lead + (kernel_t.shape[0],))


def channels_last_dn(x_shape: Sequence[int],
                     kernel_shape: Sequence[int]) -> lax.ConvDimensionNumbers:
  """nn.Conv's dimension numbers for these shapes: NHWC input and output, HWIO kernel (any
  number of spatial dims).

  Example:
    >>> channels_last_dn((1, 5, 5, 3), (2, 2, 3, 4)).rhs_spec
    (3, 2, 0, 1)
  """
  spatial = "HWDXYZ"[:len(kernel_shape) - 2]
  return lax.conv_dimension_numbers(tuple(x_shape), tuple(kernel_shape),
                                    (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))


def conv_pads(padding: str | Sequence[tuple[int, int]], in_spatial: Sequence[int],
              window: Sequence[int], strides: Sequence[int],
              dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Explicit (low, high) pads per spatial dim for `padding` ("SAME", "VALID" or pairs)."""
  if isinstance(padding, str):
    dilated = [(w - 1) * d + 1 for w, d in zip(window, dilation, strict=True)]
    return tuple(lax.padtype_to_pads(tuple(in_spatial), tuple(dilated), tuple(strides), padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def im2col(x: jax.Array, window: Sequence[int], strides: Sequence[int],
           dilation: Sequence[int]) -> jax.Array:
  """(B, *spatial, C) -> (B, *out_spatial, prod(window) * C) patches by strided slices (no
  padding: pad first); the feature order is (window position, channel), i.e. an HWIO kernel
  reshaped to (-1, O), so that conv(x, kernel) = im2col(x) @ kernel.reshape(-1, O).

  Example:
    >>> x = jnp.arange(6, dtype=jnp.int8).reshape(1, 3, 2, 1)
    >>> im2col(x, (2, 2), (1, 1), (1, 1))[0, :, 0]
    Array([[0, 1, 2, 3],
           [2, 3, 4, 5]], dtype=int8)
  """
  spatial = x.shape[1:-1]
  out = [(s - ((w - 1) * d + 1)) // st + 1
         for s, w, d, st in zip(spatial, window, dilation, strides, strict=True)]
  cols = []
  for offsets in np.ndindex(*window):
    starts = [0] + [o * d for o, d in zip(offsets, dilation, strict=True)] + [0]
    limits = ([x.shape[0]] + [st0 + (n - 1) * st + 1 for st0, n, st in
                              zip(starts[1:-1], out, strides, strict=True)] + [x.shape[-1]])
    cols.append(lax.slice(x, starts, limits, [1] + list(strides) + [1]))
  return jnp.concatenate(cols, axis=-1)


def checked_conv_geometry(nsp: int, strides: Sequence[int],
                          padding: Sequence[Sequence[int]],
                          dilation: Sequence[int], pad_value: jax.typing.ArrayLike,
                          where: str) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...],
                                               tuple[int, ...], jax.Array]:
  """strides, padding, dilation as tuples of ints and pad_value as an int32 scalar; ValueError
  naming `where` and the argument unless strides and dilation are `nsp` ints >= 1, padding
  `nsp` (low, high) pairs >= 0 and pad_value an integer scalar in [-128, 127] (an int8 value;
  checked where concrete).

  Example:
    >>> checked_conv_geometry(2, [1, 2], [[0, 1], (1, 0)], (1, 1), -128, "conv")[:3]
    ((1, 2), ((0, 1), (1, 0)), (1, 1))
    >>> checked_conv_geometry(1, (0,), ((0, 0),), (1,), 0, "conv")
    Traceback (most recent call last):
    ...
    ValueError: conv: strides must be 1 ints >= 1; got (0,).
  """
  def ints(values, count, low):  # None unless `count` ints >= low
    try:
      out = tuple(int(v) for v in values)
      return out if len(out) == count and all(
          v >= low and v == w for v, w in zip(out, values, strict=True)) else None
    except (TypeError, ValueError):
      return None
  checked: dict[str, tuple[int, ...]] = {}
  for name, values in (("strides", strides), ("dilation", dilation)):
    good = ints(values, nsp, 1)
    if good is None:
      raise ValueError(f"{where}: {name} must be {nsp} ints >= 1; got {values!r}.")
    checked[name] = good
  try:
    pairs = [ints(pair, 2, 0) for pair in padding]
  except TypeError:
    pairs = []
  if len(pairs) != nsp or any(pair is None for pair in pairs):
    raise ValueError(f"{where}: padding must be {nsp} (low, high) pairs of ints >= 0; got "
                     f"{padding!r}.")
  pads: tuple[tuple[int, int], ...] = tuple((p[0], p[1]) for p in pairs if p is not None)
  dtype = _checks.dtype_of(pad_value)
  if np.shape(pad_value) != () or not np.issubdtype(dtype, np.integer):
    raise ValueError(f"{where}: pad_value must be an integer scalar (the input's zero on the "
                     f"int8 grid); got {dtype} of shape {np.shape(pad_value)}.")
  value = _checks.concrete(pad_value)
  if value is not None and not -128 <= int(value) <= 127:
    raise ValueError(f"{where}: pad_value must lie in [-128, 127] (an int8 value); got "
                     f"{int(value)}.")
  return checked["strides"], pads, checked["dilation"], jnp.asarray(pad_value, jnp.int32)


def conv(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int],
         padding: Sequence[tuple[int, int]], dilation: Sequence[int],
         feature_group_count: int, pad_value: jax.Array) -> jax.Array:
  """int32 cross-correlation of int8 NHWC-style `x` with an int8 HW..IO `kernel`.

  Padding is applied first, with `pad_value` (the input's zero point in the int8 domain, so
  that padded positions are real zeros, as in float), then the valid correlation:
  acc[b, p, o] = sum_{window, c} x_pad[b, p * stride + w * dilation, c] kernel[w, c, o].

  Lowering (both exact): patches (strided int8 slices) times the kernel reshaped to
  (window * C, O) as an int8 GEMM when there are 2..15 input channels, or at most 16 in and
  out, without groups; XLA's convolution otherwise. XLA:CPU keeps a direct convolution in
  int8 only with more than 16 input or output channels: below, it converts both operands to
  int32 (exact, and with one input channel still the fastest form: 0.6 ms against 3.4 ms
  for patches and 4.7 ms for float32 on LeNet-5's first layer at batch 256), while 16 -> 12
  channels ran 7x slower than the GEMM form. The GEMM takes the (window * C, O) kernel as it
  is: transposing it first let XLA rewrite the product into an int32 dot, several times
  slower. The jaxpr always holds int8 operands; the compiled program of a direct
  convolution with few channels does not.

  Args:
    x: int8 (B, *spatial, C).
    kernel: int8 (*window, C / G, O).
    strides, padding, dilation: ints >= 1 per spatial dim, (low, high) pairs >= 0.
    feature_group_count: G, dividing C and O.
    pad_value: integer scalar in [-128, 127].

  Returns:
    int32 array (B, *out_spatial, O).

  Raises:
    TypeError: x or kernel not int8. ValueError: ranks, geometry, groups or pad_value out of
      the ranges above (`checked_conv_geometry`).

  Example:
    >>> x, w = jnp.ones((1, 3, 1), jnp.int8), jnp.full((2, 1, 1), 2, jnp.int8)
    >>> conv(x, w, strides=(1,), padding=((1, 0),), dilation=(1,), feature_group_count=1,
    ...      pad_value=-1)[0, :, 0]
    Array([0, 4, 4], dtype=int32)
  """
  check_int8("conv: x", x)
  check_int8("conv: kernel", kernel)
  nsp = kernel.ndim - 2
  if x.ndim != nsp + 2:
    raise ValueError(f"conv: x must have rank {nsp + 2} (batch, {nsp} spatial, features) for a "
                     f"kernel of shape {kernel.shape}; got shape {x.shape}.")
  strides, padding, dilation, pad_value = checked_conv_geometry(nsp, strides, padding, dilation,
                                                                pad_value, "conv")
  if (not isinstance(feature_group_count, int) or feature_group_count < 1
      or kernel.shape[-1] % feature_group_count
      or x.shape[-1] != kernel.shape[-2] * feature_group_count):
    raise ValueError(f"conv: feature_group_count must be a positive int G with x's channels "
                     f"= G x kernel's input channels and G dividing the output channels; got "
                     f"{feature_group_count!r} for x {x.shape} and kernel {kernel.shape}.")
  pads = [(0, 0), *padding, (0, 0)]
  if any(lo or hi for lo, hi in pads):
    x = lax.pad(x, pad_value.astype(jnp.int8), [(lo, hi, 0) for lo, hi in pads])
  cin, cout = x.shape[-1], kernel.shape[-1]
  if feature_group_count == 1 and cin > 1 and (cin < 16 or max(cin, cout) <= 16):
    patches = im2col(x, kernel.shape[:nsp], strides, dilation)
    k2 = kernel.reshape((math.prod(kernel.shape[:-1]), cout))  # (window * C, O); O may be 0
    return lax.dot_general(patches, k2, (((patches.ndim - 1,), (0,)), ((), ())),
                           preferred_element_type=jnp.int32)
  return lax.conv_general_dilated(x, kernel, tuple(strides), [(0, 0)] * nsp,
                                  rhs_dilation=tuple(dilation),
                                  dimension_numbers=channels_last_dn(x.shape, kernel.shape),
                                  feature_group_count=feature_group_count,
                                  preferred_element_type=jnp.int32)


# ------------------------------------------------------------------------------------------
# Requantization.


def clamp_to_int8(q: jax.Array, zero_point: jax.Array, lo: int, hi: int,
                   relu: bool) -> jax.Array:
  """clamp(q + Z, lo, hi) as int8 (lo raised to Z for a fused ReLU: real 0 is Z).

  Clamped before Z is added, so that a saturated q (+-2^31) cannot wrap around.
  """
  low = jnp.maximum(jnp.int32(lo), zero_point) if relu else jnp.int32(lo)
  return (jnp.clip(q, low - zero_point, jnp.int32(hi) - zero_point)
          + zero_point).astype(jnp.int8)


def _round_to_int32(y: jax.Array) -> jax.Array:
  """rne(y) as int32, saturating (a float beyond int32 would otherwise be undefined)."""
  bound = jnp.float32(2.0**31 - 128)  # largest float32 below 2^31
  return jnp.clip(jnp.round(y), -bound, bound).astype(jnp.int32)


def requantize_float(acc: jax.Array, multiplier: jax.Array, zero_point: jax.Array, *,
                     lo: int, hi: int, relu: bool = False) -> jax.Array:
  """q = clamp(Z + rne(f32(acc) * M), lo, hi) as int8 (`acc` already includes the biases)."""
  return clamp_to_int8(_round_to_int32(acc.astype(jnp.float32) * multiplier), zero_point,
                        lo, hi, relu)


def requantize_fbgemm(acc: jax.Array, bias: jax.Array, multiplier: jax.Array,
                      zero_point: jax.Array, *, lo: int, hi: int,
                      relu: bool = False) -> jax.Array:
  """q = clamp(Z + rne((f32(acc) + b') * M), lo, hi) as int8, with the float bias
  b' = f32(b / A) on the accumulator's scale A = S_x S_w: fbgemm's requantization with a
  float bias (PyTorch's x86 quantized Linear). An add then a multiply: nothing to contract
  into an FMA."""
  y = (acc.astype(jnp.float32) + bias) * multiplier
  return clamp_to_int8(_round_to_int32(y), zero_point, lo, hi, relu)


def _split16(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """v = hi * 2^16 + lo with lo in [0, 2^16) (uint32) and hi = v >> 16 (int32)."""
  return lax.shift_right_arithmetic(v, jnp.int32(16)), (v & 0xFFFF).astype(jnp.uint32)


def _add64(a_hi, a_lo, b_hi, b_lo):
  lo = a_lo + b_lo
  carry = (lo < a_lo).astype(jnp.int32)
  return a_hi + b_hi + carry, lo


def _times_2_16(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """v * 2^16 as a (hi int32, lo uint32) pair, for int32 v."""
  hi, lo = _split16(v)
  return hi, lax.shift_left(lo, jnp.uint32(16))


def mul_shift_round(acc: jax.Array, m0: jax.Array, shift: jax.Array) -> jax.Array:
  """floor((acc * m0 + 2^(shift-1)) / 2^shift) in int32 arithmetic only.

  The product of an int32 `acc` and an int32 `m0` in [2^30, 2^31) needs 62 bits; it is formed
  exactly as a (hi int32, lo uint32) pair from 16-bit pieces, rounded by adding 2^(shift-1)
  and shifted right arithmetically. `shift` in [1, 62]; results beyond int32 saturate.
  """
  a_hi, a_lo = _split16(acc)
  m_hi, m_lo = _split16(m0)
  a_lo_i = a_lo.astype(jnp.int32)
  m_lo_i = m_lo.astype(jnp.int32)
  p_hi, p_lo = a_hi * m_hi, jnp.zeros(jnp.broadcast_shapes(acc.shape, m0.shape), jnp.uint32)
  p_hi = jnp.broadcast_to(p_hi, p_lo.shape)
  # |a_hi * m_lo| < 2^31 and a_lo * m_hi < 2^31: each cross term fits int32.
  for cross in (a_hi * m_lo_i, a_lo_i * m_hi):
    p_hi, p_lo = _add64(p_hi, p_lo, *_times_2_16(cross))
  p_hi, p_lo = _add64(p_hi, p_lo, jnp.int32(0), a_lo * m_lo)  # < 2^32 as uint32
  # + 2^(shift - 1): below bit 32 it goes into lo, above into hi.
  shift = jnp.broadcast_to(shift, p_lo.shape).astype(jnp.int32)
  half = shift - 1
  low_half = lax.shift_left(jnp.uint32(1), jnp.clip(half, 0, 31).astype(jnp.uint32))
  high_half = lax.shift_left(jnp.int32(1), jnp.clip(half - 32, 0, 30))
  p_hi, p_lo = _add64(p_hi, p_lo, jnp.where(half >= 32, high_half, 0),
                      jnp.where(half < 32, low_half, jnp.uint32(0)))
  # Shift right by `shift`: >= 32 only hi contributes; below, hi's low bits join lo's high bits.
  big = lax.shift_right_arithmetic(p_hi, jnp.clip(shift - 32, 0, 31))
  s = jnp.clip(shift, 1, 31)
  limit = lax.shift_left(jnp.int32(1), s - 1)  # |hi| must stay below 2^(s-1) to fit int32
  small = (lax.shift_left(p_hi, 32 - s)
           | lax.shift_right_logical(p_lo, s.astype(jnp.uint32)).astype(jnp.int32))
  small = jnp.where(p_hi >= limit, jnp.int32(INT32_MAX),
                    jnp.where(p_hi < -limit, jnp.int32(-INT32_MAX - 1), small))
  return jnp.where(shift >= 32, big, small)


def requantize_integer(acc: jax.Array, m0: jax.Array, shift: jax.Array, zero_point: jax.Array,
                       *, lo: int, hi: int, relu: bool = False) -> jax.Array:
  """q = clamp(Z + floor((acc * M0 + 2^(r-1)) / 2^r), lo, hi) as int8, integers only."""
  return clamp_to_int8(mul_shift_round(acc, m0, shift), zero_point, lo, hi, relu)


def quantize_multiplier(multiplier: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(M0, r) with M ~= M0 / 2^r, M0 in [2^30, 2^31) an int32 and r in [1, 62] (host side).

  M0 = rne(m * 2^31) for M = m * 2^e, m in [0.5, 1) (frexp), r = 31 - e; a mantissa that
  rounds up to 2^31 is halved (and, just below 2^30, where halving would make r = 0, capped
  at 2^31 - 1 instead). The relative error of M0 / 2^r is below 2^-31.

  Raises:
    ValueError: M not finite and > 0, or outside [2^-31, 2^30) (r would leave [1, 62]).
  """
  m = np.asarray(multiplier, np.float64)
  if not np.all(np.isfinite(m) & (m > 0)):
    raise ValueError(f"quantize_multiplier: multipliers must be finite and > 0; got {m!r}.")
  if np.any(m < 2.0**-31) or np.any(m >= 2.0**30):
    raise ValueError(f"quantize_multiplier: multipliers must lie in [2^-31, 2^30) for a 31-bit "
                     f"fixed point with a shift in [1, 62]; got min {m.min():.3g}, max "
                     f"{m.max():.3g}. An output scale that tiny or huge relative to S_x * S_w "
                     f"usually means a layer was calibrated on degenerate data.")
  mant, exp = np.frexp(m)
  m0 = np.round(mant * 2.0**31).astype(np.int64)
  carry = m0 == 2**31
  top = carry & (exp == 30)  # halving would need r = 0: round down to the largest M0
  m0 = np.where(top, 2**31 - 1, np.where(carry, m0 // 2, m0))
  r = 31 - (exp + (carry & ~top).astype(exp.dtype))
  return m0.astype(np.int32), r.astype(np.int32)


def accumulator_bound(kernel_q: np.ndarray, *, reduce_axes: tuple[int, ...],
                      input_spec: QuantSpec) -> np.ndarray:
  """Per output channel, the largest |acc| any int8 input can produce (host side):
  max|q_x| * sum_k |q_w[k, n]|, with q_x in the input's int8 bounds."""
  lo, hi = int8_bounds(input_spec)
  widest = max(abs(lo), abs(hi))
  return widest * np.abs(kernel_q.astype(np.int64)).sum(axis=reduce_axes)


# ------------------------------------------------------------------------------------------
# Moving int8 values between grids (adds, concatenations) as PyTorch does, through float32
# (the integer-only forms use `mul_shift_round`).


def dequantize_fma(q8: jax.Array, shift: int, scale: jax.Array, premul: jax.Array) -> jax.Array:
  """x = fma(q, S, -Z S) in float32, q = q8 + shift the value on the grid's own range and
  premul = f32(-Z * S): how PyTorch's vectorized quantized kernels dequantize (one rounding)."""
  q = (q8.astype(jnp.int32) + jnp.int32(shift)).astype(jnp.float32)
  return _float32.fma(q, jnp.broadcast_to(scale, q.shape), jnp.broadcast_to(premul, q.shape))


def quantize_reciprocal(x: jax.Array, inv_scale: jax.Array, zero_point: jax.Array, *, lo: int,
                        hi: int) -> jax.Array:
  """q8 = clamp(rne(x * inv_scale) + Z8, lo, hi) as int8: PyTorch's vectorized quantizer
  (a multiply by the float32 reciprocal of the scale), with Z8 on the int8 carrier grid."""
  return clamp_to_int8(_round_to_int32(x * inv_scale), zero_point, lo, hi, relu=False)


def dequantize_product(q8: jax.Array, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
  """x = f32(S * (q8 - Z8)): PyTorch's scalar dequantization (the difference is exact)."""
  return (q8.astype(jnp.int32) - zero_point).astype(jnp.float32) * scale


def quantize_fused(x: jax.Array, inv_scale: jax.Array, zero_point: jax.Array, shift: int, *,
                   lo: int, hi: int) -> jax.Array:
  """q8 = clamp(rne(fma(x, inv_scale, Z)) - shift, lo, hi) as int8 with Z = Z8 + shift on the
  grid's own range: fbgemm's array quantizer (torch.quantize_per_tensor), one rounding of
  x / S + Z."""
  own_zero = (zero_point + jnp.int32(shift)).astype(jnp.float32)
  fused = _float32.fma(x, jnp.broadcast_to(inv_scale, x.shape), jnp.broadcast_to(own_zero,
                                                                                 x.shape))
  q = _round_to_int32(fused) - jnp.int32(shift)
  return jnp.clip(q, lo, hi).astype(jnp.int8)

