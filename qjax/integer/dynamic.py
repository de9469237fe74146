"""Dynamic quantization of the Dense layers of any Flax linen model (PyTorch's quantize_dynamic).

Weights become int8 once, ahead of time; each activation's qparams are computed from the
batch itself at run time. The model is not edited: `quantize_dynamic` rewrites the params
tree, and `dynamic_apply` runs `model.apply` with a method interceptor that sends every
`nn.Dense` whose kernel was quantized (those inside `nn.LSTMCell` / `nn.RNN` included) down
the int8 path; every other module runs unchanged.

The math of one layer, y = x W + b, with x of shape (..., K) and W of shape (K, N), is the
one PyTorch's x86 / fbgemm `quantized::linear_dynamic` computes, bit for bit:

  (S_x, Z_x) = choose_qparams(min(x), max(x))            per tensor, quint8 [0, Q],
                                                         Q = 127 with reduce_range, else 255
  q_x        = clamp(rne(fma(x, 1/S_x, Z_x)), 0, 255)    fbgemm clamps to the full uint8 range
  acc[m, n]  = sum_k (q_x[m, k] - Z_x) (q_w[n, k] - Z_w[n])       exact, int32
  y[m, n]    = fma(f32(acc[m, n]), f32(S_x * S_w[n]), b[n])     one rounding, as fbgemm's
                                                                 ReQuantizeForFloat

Weights (`quantize_kernel`): by default PyTorch's `default_dynamic_qconfig` weight observer,
per-tensor symmetric int8 in [-128, 127], S_w = max|W| / 127.5 (`per_channel=True`: one scale
per output column, `per_channel_dynamic_qconfig`), computed with `qjax.qparams_from_minmax`.

Layout and speed. The int8 kernel is stored output-channel first, (N, K) (PyTorch's layout),
with its column sums sum_k q_w[n, k] precomputed, because `qjax.arith.matmul`'s
(N, K) x (M, K)^T form with M padded to 2 is XLA:CPU's fastest exact int8 GEMM. The
activations travel as int8, q_x - 128 (XLA's uint8 x int8 dot is ~7x slower than int8 x
int8); the shift changes no q_x - Z_x. The zero-point terms are applied to the int32
accumulator: acc = dot(q_x - 128, q_w) - (Z_x - 128) colsum(q_w) (- Z_w rowsum for affine
weights). The epilogue's FMA is emulated exactly (`qjax._float32.fma`): XLA contracts
a * b + c for most shapes but not all.

Exactness of the qparams. fbgemm's ChooseQuantizationParams works in float64: the range is
widened to include 0, S = fl32(fl64(max - min) / Q) (below 6.1e-5 it becomes 6.1e-5 and the
range is stretched to match) and Z = nearbyint(fl64(-min / S_64)). JAX has no float64 here,
so `choose_qparams` reaches the same numbers in float32: the sum is kept as an exact pair
(TwoSum), the quotient is rounded once with exact remainder tests, and the zero point is
decided by the exact sign of Q (-min) - (k + 1/2) D. Where that is exactly 0 (min = -max,
for one), fbgemm's float64 rounding decides; it is reproduced from the remainder of D / Q,
which for odd Q is periodic in binary. The results equal torch's on every range tested,
including ~6,000 exact ties, except for max - min in about [3.7e-37, 1.5e-36] (Q = 127;
twice that for 255). There the scale is subnormal: XLA:CPU flushes it to zero and qjax
takes fbgemm's S = 0.1 fallback, while fbgemm stretches it to 6.1e-5.

Recurrent cells. PyTorch's dynamic LSTM projects the inputs of all time steps at once, so
one set of activation qparams covers the whole sequence. A Flax cell under `nn.RNN` sees one
step at a time, so each step's input gets its own. One step agrees with torch to float
rounding; over a sequence the two differ by about as much as either differs from float
(tests/test_dynamic_torch.py measures both).

Errors name the pytree path of the kernel (or the Flax path of the layer). Non-finite
activations: a row (one input vector of the layer) holding a NaN or +-inf gives a NaN output
row, eager or jitted, and is left out of the batch's range, so the other rows come out as if
it were not there; the static int8 path does the same per sample, and a float layer's row is
NaN (or +-inf) as well. `quantize_activation` alone, which returns integers, refuses
non-finite input eagerly (a NaN scale under jit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from qjax import _checks
from qjax import _struct
from qjax.integer._fbgemm_tie import _round_half_even, _zero_point_at_tie
from qjax._float32 import (dd_div_rounded, exact_times, exponent, fma, fusible_div, ldexp,
                           min_and_max, reciprocal_estimate, sign_of_sum, split, two_sum)
from qjax.integer import arith
from qjax.integer import kernels
from qjax.numerics import QParams, QuantSpec
from qjax.qarray import QArray, quantize_array

SMALL_SCALE = np.float32(6.1e-5)
"""fbgemm's floor on an activation scale (fp16's smallest normal)."""

DEFAULT_WEIGHT_SPEC = QuantSpec(bits=8, signed=True, symmetric=True)
"""PyTorch's dynamic weight grid: qint8 [-128, 127], symmetric (S = max|w| / 127.5)."""

_UINT8 = QuantSpec(bits=8, signed=False)   # fbgemm's clamp for the quantized activation
_F32 = jnp.float32


@functools.partial(jax.jit, static_argnames=("reduce_range",))
def _choose_qparams_core(min_val: jax.Array, max_val: jax.Array, *,
                         reduce_range: bool) -> QParams:
  q = 127 if reduce_range else 255
  lo = jnp.minimum(min_val.astype(_F32), 0.0)
  hi = jnp.maximum(max_val.astype(_F32), 0.0)
  valid = jnp.isfinite(lo) & jnp.isfinite(hi)
  m_raw, x_raw = jnp.where(valid, -lo, 0.0), jnp.where(valid, hi, 0.0)
  # Scale both by 2^-p (exact) so that the larger lies in [0.5, 1): no product overflows.
  p = jnp.clip(exponent(jnp.maximum(m_raw, x_raw)) + 1, -125, 127)
  m, x = ldexp(m_raw, -p), ldexp(x_raw, -p)
  s, e = two_sum(x, m)
  scale_n = dd_div_rounded(s, e, q)
  scale = ldexp(scale_n, p)
  # Z = nearbyint(Q m / D): test the half-integer next to the float estimate exactly.
  k = jnp.floor(q * m * reciprocal_estimate(jnp.maximum(s, 0.5))).astype(jnp.int32)
  a = (2 * k + 1).astype(_F32)
  tie_sign = sign_of_sum(*exact_times(_F32(2 * q), m), *exact_times(-a, s), *exact_times(-a, e))
  zp = jnp.where(tie_sign == 0, _zero_point_at_tie(m, k), _round_half_even(k, tie_sign))
  # fbgemm: a scale below SMALL_SCALE becomes SMALL_SCALE, the range stretched to match.
  sig_hi, sig_lo = split(_F32(SMALL_SCALE))
  small = sign_of_sum(s, e, -ldexp(_F32(q * sig_hi), -p), -ldexp(_F32(q * sig_lo), -p)) < 0
  m_small = m_raw * fusible_div(_F32(SMALL_SCALE), scale)
  k_small = jnp.floor(m_small * _F32(1 / SMALL_SCALE)).astype(jnp.int32)
  a_small = (2 * k_small + 1).astype(_F32)
  zp_small = _round_half_even(k_small, sign_of_sum(2 * m_small, -a_small * _F32(sig_hi),
                                                   -a_small * _F32(sig_lo)))
  zp_small = jnp.where(m_raw == 0, 0, jnp.where(x_raw == 0, q, zp_small))
  # fbgemm falls back to S = 0.1, Z = 0 when fl32(S) is 0 or 1/S overflows; XLA:CPU flushes
  # subnormals, so here that is every scale below float32's smallest normal.
  tiny = ~(scale >= np.finfo(np.float32).tiny)
  scale = jnp.where(tiny, _F32(0.1), jnp.where(small, _F32(SMALL_SCALE), scale))
  zp = jnp.where(tiny, 0, jnp.where(small, zp_small, zp))
  return QParams(jnp.where(valid, scale, _F32(np.nan)), jnp.clip(zp, 0, q).astype(jnp.int32))


def choose_qparams(min_val: jax.typing.ArrayLike, max_val: jax.typing.ArrayLike, *,
                   reduce_range: bool = True) -> QParams:
  """An activation's dynamic qparams, exactly as fbgemm's ChooseQuantizationParams picks them.

  lo = min(min_val, 0), hi = max(max_val, 0), Q = 127 with reduce_range else 255:
  S = fl32((hi - lo) / Q) and Z = clamp(nearbyint(-lo / S), 0, Q) with fbgemm's float64
  intermediates reproduced (see the module docstring); S < 6.1e-5 becomes 6.1e-5 with the
  range stretched by 6.1e-5 / S; hi == lo == 0 gives S = 0.1, Z = 0.

  Args:
    min_val: float scalar, the batch minimum.
    max_val: float scalar, the batch maximum.
    reduce_range: PyTorch's x86 default (True): a 7-bit grid [0, 127].

  Returns:
    QParams(scale float32 (), zero_point int32 ()). Under jit a non-finite range gives a NaN
    scale.

  Raises:
    ValueError: for concrete inputs, NaN / +-inf or min_val > max_val.
  """
  min_val = _checks.as_float_array("min_val", min_val, python_int_ok=True)
  max_val = _checks.as_float_array("max_val", max_val, python_int_ok=True)
  if min_val.shape != () or max_val.shape != ():
    raise ValueError(f"choose_qparams: min_val and max_val must be scalars (dynamic "
                     f"activation qparams are per tensor); got shapes {min_val.shape} and "
                     f"{max_val.shape}.")
  _check_bool("reduce_range", reduce_range)
  lo, hi = _checks.concrete(min_val), _checks.concrete(max_val)
  if lo is not None and hi is not None:
    if not (np.isfinite(lo) and np.isfinite(hi)):
      raise ValueError(f"choose_qparams: min_val and max_val must be finite; got {lo!r}, "
                       f"{hi!r}.")
    if lo > hi:
      raise ValueError(f"choose_qparams: min_val must be <= max_val; got {lo!r} > {hi!r}.")
  return _choose_qparams_core(min_val, max_val, reduce_range=bool(reduce_range))


def _check_bool(name: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be True or False; got {value!r}.")


# ------------------------------------------------------------------------------------------
# Weights.


@dataclasses.dataclass(frozen=True, eq=False)
class DynamicKernel:
  """A Dense kernel prepared for dynamic quantization; takes the Flax kernel's place in params.

  Leaves: `qweight`, a QArray whose int8 values are in PyTorch's (N, K) layout (the Flax
  (K, N) kernel transposed; a per-channel spec has axis 0), and `col_sums`, int32 (N,),
  sum_k qweight[n, k]. Static: `reduce_range`, the activation grid of this layer ([0, 127]
  when True, [0, 255] otherwise).
  """

  qweight: QArray
  col_sums: jax.Array
  reduce_range: bool = _struct.static(default=True)

  def __post_init__(self):
    if not isinstance(self.qweight, QArray):
      raise TypeError(f"DynamicKernel.qweight must be a qjax.QArray; got "
                      f"{type(self.qweight).__name__}.")
    if self.qweight.ndim != 2 or self.qweight.dtype != jnp.int8:
      raise ValueError(f"DynamicKernel.qweight must hold int8 values of shape (N, K); got "
                       f"{self.qweight.dtype} of shape {self.qweight.shape}.")
    if self.qweight.spec.axis is not None and self.qweight.spec.axis % 2 != 0:  # 0 or -2
      raise ValueError(f"DynamicKernel.qweight's per-channel axis must be 0 (output channels "
                       f"of the (N, K) layout); got axis {self.qweight.spec.axis}.")
    if getattr(self.col_sums, "dtype", None) != jnp.int32 or self.col_sums.shape != (
        self.features,):
      raise ValueError(f"DynamicKernel.col_sums must be int32 of shape ({self.features},); got "
                       f"{getattr(self.col_sums, 'dtype', type(self.col_sums).__name__)} of "
                       f"shape {getattr(self.col_sums, 'shape', None)}.")
    _check_bool("DynamicKernel.reduce_range", self.reduce_range)
    sums, values = _checks.concrete(self.col_sums), _checks.concrete(self.qweight.qvalue)
    if sums is not None and values is not None and not np.array_equal(
        sums, values.astype(np.int64).sum(axis=1)):
      raise ValueError("DynamicKernel.col_sums must equal sum_k qweight.qvalue[n, k]; build "
                       "DynamicKernels with quantize_kernel.")

  @property
  def features(self) -> int:
    """N, the number of outputs."""
    return self.qweight.shape[0]

  @property
  def in_features(self) -> int:
    """K, the contracted size."""
    return self.qweight.shape[1]

  def dequantize(self) -> jax.Array:
    """The represented float kernel in Flax's (K, N) layout: S_w (q_w - Z_w), transposed."""
    return self.qweight.dequantize().T


def _flatten_with_keys(dk: DynamicKernel) -> tuple[tuple[tuple[Any, Any], ...], bool]:
  keys = (jax.tree_util.GetAttrKey("qweight"), jax.tree_util.GetAttrKey("col_sums"))
  return tuple(zip(keys, (dk.qweight, dk.col_sums), strict=True)), dk.reduce_range


def _unflatten(reduce_range: bool, leaves: Iterable[Any]) -> DynamicKernel:
  # Transformations rebuild these from tracers or placeholders: no validation.
  dk = object.__new__(DynamicKernel)
  qweight, col_sums = leaves
  object.__setattr__(dk, "qweight", qweight)
  object.__setattr__(dk, "col_sums", col_sums)
  object.__setattr__(dk, "reduce_range", reduce_range)
  return dk


jax.tree_util.register_pytree_with_keys(
    DynamicKernel, _flatten_with_keys, _unflatten,
    lambda dk: ((dk.qweight, dk.col_sums), dk.reduce_range))
_struct.register(DynamicKernel)  # qjax.io stores it


def _weight_spec(weight_spec: QuantSpec, per_channel: bool) -> QuantSpec:
  """`weight_spec` checked for the int8 path, with axis 0 when per_channel."""
  if not isinstance(weight_spec, QuantSpec):
    raise TypeError(f"weight_spec must be a qjax.QuantSpec; got {type(weight_spec).__name__}.")
  _check_bool("per_channel", per_channel)
  if weight_spec.axis is not None:
    raise ValueError(f"weight_spec.axis must be None; choose per-tensor or per-output-channel "
                     f"weights with per_channel=False/True (got {weight_spec}).")
  if not weight_spec.signed or weight_spec.bits > 8:
    raise ValueError(f"weight_spec must be a signed grid of at most 8 bits: the weights travel "
                     f"as int8 (got {weight_spec}). PyTorch's default is "
                     f"QuantSpec(bits=8, signed=True, symmetric=True).")
  return dataclasses.replace(weight_spec, axis=0) if per_channel else weight_spec


def quantize_kernel(kernel: jax.typing.ArrayLike, *, weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
                    per_channel: bool = False, reduce_range: bool = True,
                    qparams: QParams | None = None) -> DynamicKernel:
  """A float Dense kernel (K, N) as a DynamicKernel: q_w = clamp(rne(W^T / S_w) + Z_w).

  S_w, Z_w come from the kernel's own min / max (`qparams_from_minmax`, PyTorch's
  MinMaxObserver / PerChannelMinMaxObserver) unless `qparams` gives them, shape () or (N,).

  Args:
    kernel: float array (K, N), as `nn.Dense` stores it.
    weight_spec: a signed grid of at most 8 bits, axis None.
    per_channel: one (S_w, Z_w) per output column.
    reduce_range: the activation grid the layer will use at run time ([0, 127] if True).
    qparams: optional fixed weight qparams (e.g. one scale shared by several kernels).

  Returns:
    DynamicKernel with int8 values (N, K) and their column sums.

  Raises:
    TypeError / ValueError: non-float or non-2-D kernel, bad spec or qparams, NaN weights,
      or K too large for an exact int32 accumulator.
  """
  spec = _weight_spec(weight_spec, per_channel)
  _check_bool("reduce_range", reduce_range)
  kernel = _checks.as_float_array("kernel", kernel, hint=" (a Dense kernel of real weights)")
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be 2-D (in_features, out_features) as nn.Dense stores it; "
                     f"got shape {kernel.shape}.")
  if _checks.concrete_bool(jnp.any(~jnp.isfinite(kernel))):
    raise ValueError(f"kernel holds {int(jnp.sum(~jnp.isfinite(kernel)))} NaN or +-inf "
                     f"weight(s) (shape {kernel.shape}); they have no int8 representation.")
  k_in = kernel.shape[0]
  span = max(abs(spec.qmin), abs(spec.qmax)) if spec.symmetric else spec.qmax - spec.qmin
  if k_in * 255 * span > arith.INT32_MAX:
    raise ValueError(f"kernel has in_features={k_in}: sum_k (q_x - Z_x)(q_w - Z_w) could reach "
                     f"{k_in * 255 * span}, beyond int32. Split the layer or use a narrower "
                     f"weight grid.")
  qweight = quantize_array(kernel.T.astype(_F32), spec, qparams=qparams)
  col_sums = jnp.sum(qweight.qvalue.astype(jnp.int32), axis=1)
  return DynamicKernel(qweight, col_sums, bool(reduce_range))


def quantize_dynamic(params: Mapping[str, Any], *,
                     weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC, per_channel: bool = False,
                     reduce_range: bool = True, include: str | None = None,
                     exclude: str | None = None) -> Mapping[str, Any]:
  """Replace the Dense kernels of a params tree by DynamicKernels (`quantize_kernel`).

  A layer is a mapping with a "kernel" entry; its path is the "/"-joined keys leading to it
  (e.g. "Dense_0", "cell/ii"). A layer is quantized when `include` (a regex, `re.search`)
  matches its path, or is None, and `exclude` does not match it. Kernels that are not 2-D
  (convolutions) are left as they are unless `include` names them. Biases stay float.

  Returns:
    A new tree of the same structure; use it in place of params with `dynamic_apply`.

  Raises:
    ValueError / TypeError naming the kernel's path: an included kernel that is not a 2-D
    float array, one already quantized, a bad regex, or no kernel selected at all.

  Example:
    >>> model = nn.Dense(3)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> qparams = quantize_dynamic(params)
    >>> y = dynamic_apply(model, {"params": qparams}, jnp.ones((2, 4)))
  """
  _weight_spec(weight_spec, per_channel)
  _check_bool("reduce_range", reduce_range)
  patterns = {}
  for name, pattern in (("include", include), ("exclude", exclude)):
    if pattern is not None:
      try:
        patterns[name] = re.compile(pattern)
      except (re.error, TypeError) as err:
        raise ValueError(f"quantize_dynamic: {name}={pattern!r} is not a valid regex: "
                         f"{err}.") from err
  if not isinstance(params, Mapping):
    raise TypeError(f"quantize_dynamic: params must be a mapping (a Flax params dict); got "
                    f"{type(params).__name__}.")
  found, done = [], []

  def convert(path: str, kernel: Any) -> Any:
    found.append(path)
    if ("include" in patterns and not patterns["include"].search(path)) or (
        "exclude" in patterns and patterns["exclude"].search(path)):
      return kernel
    where = f"{path}/kernel" if path else "kernel"
    if isinstance(kernel, (DynamicKernel, QArray)):
      raise ValueError(f"quantize_dynamic: {where} is already quantized "
                       f"({type(kernel).__name__}); pass the float params.")
    if getattr(kernel, "ndim", None) != 2:
      if "include" not in patterns:
        return kernel    # a convolution or DenseGeneral: not a Dense layer
      raise ValueError(f"quantize_dynamic: {where} has shape {getattr(kernel, 'shape', None)}; "
                       f"only 2-D Dense kernels (in_features, out_features) can be dynamically "
                       f"quantized. Narrow include=, or add the layer to exclude=.")
    try:
      result = quantize_kernel(kernel, weight_spec=weight_spec, per_channel=per_channel,
                               reduce_range=reduce_range)
    except (TypeError, ValueError) as err:
      raise type(err)(f"quantize_dynamic: {where}: {err}") from err
    done.append(path)
    return result

  out = _map_kernels(params, (), convert)
  if not done:
    raise ValueError(f"quantize_dynamic: no 2-D Dense kernel was selected (include={include!r}, "
                     f"exclude={exclude!r}); kernels found: {found or 'none'}. Pass the "
                     f"'params' collection of a model with nn.Dense layers.")
  return out


def _map_kernels(tree: Mapping[str, Any], path: tuple[str, ...],
                 fn: Callable[[str, Any], Any]) -> Mapping[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out[key] = _map_kernels(value, path + (str(key),), fn)
    elif key == "kernel":
      out[key] = fn("/".join(path), value)
    else:
      out[key] = value
  return FrozenDict(out) if isinstance(tree, FrozenDict) else out


# ------------------------------------------------------------------------------------------
# The layer.


def _quantize_rows(rows: jax.Array, reduce_range: bool) -> tuple[jax.Array, jax.Array,
                                                                  jax.Array]:
  """(q_x - 128 as int8, S_x, Z_x as float32) for float32 rows, fbgemm's way."""
  if rows.size:
    lo, hi = min_and_max(rows)    # one pass
  else:
    lo = hi = jnp.zeros((), _F32)    # fbgemm's FindMinMax of nothing
  scale, zero_point = _choose_qparams_core(lo, hi, reduce_range=reduce_range)
  # XLA fuses the ~1,000 scalar ops of the qparams into every loop that reads them and, at
  # M = 1, recomputed them per element (30x slower; an optimization_barrier is dropped
  # before fusion). A division by an exact 1 is an op XLA does not duplicate into its
  # consumers, so the qparams are computed once.
  one = 1.0 + 0.0 * scale      # exactly 1 (NaN with the scale): XLA keeps 0 * x for floats
  packed = jnp.stack([scale, 1.0 / scale, zero_point.astype(_F32)]) / one
  scale, inv_scale, zero_point_f = packed[0], packed[1], packed[2]
  # rne(fma(x, 1/S, Z)) clamped to uint8's [0, 255] (fbgemm's quantizer), minus 128.
  q = jnp.clip(jnp.round(rows * inv_scale + zero_point_f), 0.0, 255.0) - 128.0
  return q.astype(jnp.int8), scale, zero_point_f


@functools.partial(jax.jit, static_argnames=("reduce_range",))
def _quantize_activation_core(x: jax.Array, *,
                              reduce_range: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  q, scale, zero_point_f = _quantize_rows(x.astype(_F32), reduce_range)
  return ((q.astype(jnp.int16) + 128).astype(jnp.uint8), scale,
          zero_point_f.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("reduce_range", "affine"))
def _dense_core(x: jax.Array, qvalue: jax.Array, w_scale: jax.Array, w_zero_point: jax.Array,
                col_sums: jax.Array, bias: jax.Array | None, *, reduce_range: bool,
                affine: bool) -> jax.Array:
  k_in = x.shape[-1]
  rows = x.reshape((math.prod(x.shape[:-1]), k_in)).astype(_F32)  # k_in may be 0
  # A row holding NaN / +-inf gives a NaN output row; it must not spoil the batch's range.
  # Zeros instead leave the range as it is: fbgemm's range always includes 0.
  bad = ~jnp.all(jnp.isfinite(rows), axis=1, keepdims=True)
  q, scale, zero_point_f = _quantize_rows(jnp.where(bad, _F32(0), rows), reduce_range)
  zero_point8 = zero_point_f.astype(jnp.int32) - 128

  def per_column(v):
    return jnp.reshape(v, (1, -1)) if jnp.ndim(v) else v

  # XLA's dot_general or the native CPU kernel (`qjax.integer.kernels.resolve`).
  acc = kernels.matmul(q, qvalue) - zero_point8 * col_sums[None, :]
  if affine:
    centred_rows = jnp.sum(q.astype(jnp.int32), axis=1, keepdims=True) - k_in * zero_point8
    acc = acc - per_column(w_zero_point) * centred_rows
  y = acc.astype(_F32)
  multiplier = per_column(scale * w_scale)
  if bias is None:
    y = y * multiplier
  else:
    y = fma(y, jnp.broadcast_to(multiplier, y.shape), jnp.broadcast_to(bias.astype(_F32), y.shape))
  y = jnp.where(bad, _F32(np.nan), y)
  return y.reshape(x.shape[:-1] + (qvalue.shape[0],))


def _checked_input(x: Any, where: str, *, finite: bool = True) -> jax.Array:
  """x as a float array; TypeError for integers; with `finite`, ValueError (eager) for NaN /
  +-inf."""
  try:
    x = _checks.as_float_array("x", x)
  except TypeError as err:
    raise TypeError(f"{where}: expected a floating-point input; {err} A dynamically "
                    f"quantized layer quantizes float activations itself, so an integer input "
                    f"is data the float model never took: pass floats (x.astype(jnp.float32)).") \
        from err
  if finite and _checks.concrete_bool(jnp.any(~jnp.isfinite(x))):
    bad = int(jnp.sum(~jnp.isfinite(x)))
    raise ValueError(f"{where}: the input holds {bad} NaN or +-inf value(s) (shape {x.shape}); a "
                     f"dynamic quantization range must be finite. Under jax.jit the result is "
                     f"NaN (a NaN scale) for such a batch.")
  return x


def quantize_activation(x: jax.typing.ArrayLike, *, reduce_range: bool = True) -> QArray:
  """x quantized per tensor from its own range: what a dynamic layer does to its input.

  (S, Z) = choose_qparams(min(x), max(x)); q = clamp(rne(fma(x, 1/S, Z)), 0, 255)
  (fbgemm clamps to the full uint8 range even with reduce_range, whose grid is [0, 127]: a
  value can land on 128 when Z was rounded up). `torch.quantize_per_tensor_dynamic` on x86
  gives the same integers and qparams.

  Returns:
    QArray with uint8 values, spec QuantSpec(bits=8, signed=False), per-tensor qparams.
  """
  _check_bool("reduce_range", reduce_range)
  x = _checked_input(x, "quantize_activation")
  qvalue, scale, zero_point = _quantize_activation_core(x, reduce_range=bool(reduce_range))
  return QArray(qvalue, scale, zero_point, _UINT8)


def dynamic_dense(x: jax.typing.ArrayLike, kernel: DynamicKernel,
                  bias: jax.typing.ArrayLike | None = None, *, dtype: Any = None,
                  where: str = "dynamic_dense") -> jax.Array:
  """y = x W + b with W int8 and x quantized from its own range (the module docstring's math).

  Args:
    x: float array (..., K); quantized per tensor from min(x), max(x).
    kernel: the DynamicKernel of W.
    bias: optional float (N,), added in float32.
    dtype: output dtype (default: float32, or x's dtype when wider).
    where: names the layer in error messages.

  Returns:
    Array (..., N).

  Raises:
    TypeError: integer (already quantized) x, or kernel not a DynamicKernel.
    ValueError: shapes that do not match. (A row of x holding NaN or +-inf is no error: its
      output row is NaN, and the other rows are quantized from their own range.)
  """
  if not isinstance(kernel, DynamicKernel):
    raise TypeError(f"{where}: kernel must be a qjax.dynamic.DynamicKernel (from "
                    f"quantize_dynamic / quantize_kernel); got {type(kernel).__name__}.")
  x = _checked_input(x, where, finite=False)
  if x.ndim < 1 or x.shape[-1] != kernel.in_features:
    raise ValueError(f"{where}: the input has shape {x.shape}, but the kernel expects "
                     f"(..., {kernel.in_features}) (its int8 values are {kernel.qweight.shape}, "
                     f"(N, K)).")
  if bias is not None:
    bias = _checks.as_float_array("bias", bias)
    if bias.shape != (kernel.features,):
      raise ValueError(f"{where}: bias has shape {bias.shape}; expected ({kernel.features},).")
  if dtype is None:
    dtype = x.dtype if jnp.finfo(x.dtype).bits > 32 else _F32
  spec = kernel.qweight.spec
  y = _dense_core(x, kernel.qweight.qvalue, kernel.qweight.scale, kernel.qweight.zero_point,
                  kernel.col_sums, bias, reduce_range=kernel.reduce_range,
                  affine=not spec.symmetric)
  return y.astype(dtype)


# ------------------------------------------------------------------------------------------
# Running a Flax model.


def _module_path(module: nn.Module) -> str:
  path = "/".join(str(p) for p in module.path)
  return path or type(module).__name__


def _dense_interceptor(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name != "__call__" or module.scope is None or not module.has_variable(
      "params", "kernel"):
    return next_fun(*args, **kwargs)
  kernel = module.get_variable("params", "kernel")
  if not isinstance(kernel, DynamicKernel):
    return next_fun(*args, **kwargs)
  where = _module_path(module)
  if not isinstance(module, nn.Dense) or type(module).__call__ is not nn.Dense.__call__:
    raise TypeError(f"{where}: this {type(module).__name__} holds a dynamically quantized "
                    f"kernel, but only nn.Dense layers (not subclasses that change __call__) "
                    f"run the dynamic int8 path. Leave it float with "
                    f"quantize_dynamic(exclude=...).")
  if module.dot_general is not None or module.dot_general_cls is not None:
    raise ValueError(f"{where}: this nn.Dense has a custom dot_general, which dynamic "
                     f"quantization would silently replace. Leave it float with "
                     f"quantize_dynamic(exclude=...).")
  if kernel.features != module.features:
    raise ValueError(f"{where}: the quantized kernel has {kernel.features} outputs but the "
                     f"layer has features={module.features}; the params belong to another "
                     f"model.")
  bias = module.get_variable("params", "bias") if module.use_bias else None
  if module.use_bias and bias is None:
    raise ValueError(f"{where}: the layer has use_bias=True but params hold no bias.")
  inputs = args[0] if args else kwargs.get("inputs")
  return dynamic_dense(inputs, kernel, bias, dtype=module.dtype, where=where)


@contextlib.contextmanager
def intercept_dense() -> Iterator[None]:
  """Within this context, every nn.Dense whose params kernel is a DynamicKernel runs
  `dynamic_dense`; other modules are untouched. `dynamic_apply` uses it."""
  with nn.intercept_methods(_dense_interceptor):
    yield


def dynamic_apply(model: nn.Module, variables: Mapping[str, Any], *args: Any,
                  **kwargs: Any) -> Any:
  """`model.apply(variables, *args, **kwargs)` with the quantized Dense layers running int8.

  `variables["params"]` comes from `quantize_dynamic`. Works under `jax.jit` with the
  variables as arguments (e.g. `jax.jit(lambda v, x: dynamic_apply(model, v, x))`), and for
  Dense layers inside lifted transforms such as `nn.RNN(nn.LSTMCell(...))`.

  Raises:
    ValueError: variables hold no DynamicKernel (quantize_dynamic was not run); and the
      errors of `dynamic_dense`, naming the layer's path.
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"dynamic_apply: model must be a flax.linen Module; got "
                    f"{type(model).__name__}.")
  leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda v: isinstance(v, DynamicKernel))
  if not any(isinstance(v, DynamicKernel) for v in leaves):
    raise ValueError("dynamic_apply: the variables hold no quantized kernel; build them with "
                     "{'params': quantize_dynamic(variables['params']), ...}.")
  with intercept_dense():
    return model.apply(variables, *args, **kwargs)
