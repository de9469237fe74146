"""Straight-through gradient rules (`jax.custom_vjp`) around the numerics core.

* `fake_quant`: forward S * (clamp(rne(x/S) + Z) - Z); backward passes the gradient where the
  rounded value lies in [qmin, qmax] and zeroes it where it was clamped (PyTorch FakeQuantize).
* `fake_quant_learnable`: the same forward with a float scale and zero point that receive
  the gradients of PyTorch's `_fake_quantize_learnable_per_{tensor,channel}_affine` (LSQ,
  Esser et al. 2019), bit for bit where the math allows it.
* `round_ste`: round half to even forward, identity backward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from qjax import _checks
from qjax import numerics
from qjax.numerics import QParams, QuantSpec


def _zero_cotangent(value: jax.Array) -> jax.Array | np.ndarray:
  """Zero cotangent of a primal: float0 for integer and bool primals, zeros otherwise."""
  if not jnp.issubdtype(value.dtype, jnp.inexact):
    return np.zeros(value.shape, dtype=jax.dtypes.float0)
  return jnp.zeros_like(value)


# ------------------------------------------------------------------------------------------
# fake_quant: clipped straight-through estimator.


def fake_quant(x: jax.typing.ArrayLike, spec: QuantSpec, qparams: QParams) -> jax.Array:
  """Fake quantization with a clipped straight-through gradient.

    y      = S * (clamp(rne(x * (1/S)) + Z, qmin, qmax) - Z)
    dy/dx  = 1 if qmin <= rne(x * (1/S)) + Z <= qmax else 0

  The forward equals `torch.fake_quantize_per_tensor_affine` / `_per_channel_affine` bit for
  bit and so does the mask of the backward. The scale and zero point are constants of this
  function (zero gradient); learn them with `fake_quant_learnable`. NaN stays NaN with zero
  gradient; +-inf saturate.

  Args:
    x: floating-point array; the result keeps its dtype.
    spec: the grid (`spec.axis` for per-channel qparams).
    qparams: QParams(scale, zero_point), shape () or (C,).

  Returns:
    Fake-quantized x, same shape and dtype.

  Example:
    >>> spec = QuantSpec(bits=4, signed=True, symmetric=True)
    >>> qp = QParams(jnp.float32(0.25), jnp.int32(0))
    >>> jax.grad(lambda v: fake_quant(v, spec, qp).sum())(jnp.array([0.3, 5.0]))
    Array([1., 0.], dtype=float32)
  """
  x = numerics.float_data(x, "fake_quant")
  scale, zero_point = numerics.checked_qparams(spec, qparams, x.shape, where="fake_quant")
  return _fake_quant(spec, x, scale, zero_point)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fake_quant(spec, x, scale, zero_point):
  out, _ = numerics.fake_quant_with_mask(x, scale, zero_point, spec=spec)
  return out


def _fake_quant_fwd(spec, x, scale, zero_point):
  out, in_range = numerics.fake_quant_with_mask(x, scale, zero_point, spec=spec)
  return out, (in_range, scale, zero_point)


def _fake_quant_bwd(spec, residuals, g):
  del spec
  in_range, scale, zero_point = residuals
  dx = jnp.where(in_range, g, jnp.zeros_like(g))
  return dx, _zero_cotangent(scale), _zero_cotangent(zero_point)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def observed_fake_quant(x: jax.Array, min_val: jax.Array, max_val: jax.Array,
                        count: jax.Array, skipped: jax.Array, *, spec: QuantSpec,
                        averaging: float | None, eps: float, path: str
                        ) -> tuple[jax.Array, tuple[jax.Array, ...], QParams]:
  """A QAT point in one native call: the observer's update with x, then `fake_quant` of x
  with the qparams of the new state (`qjax.integer.kernels.fake_quant_observe`: the same
  floats and integers as `MinMaxObserver` / `MovingAverageMinMaxObserver.update`,
  `qparams_from_minmax` and `fake_quant` under jit).

    y = fake_quant(x, spec, qparams(update(state, x))),   dy/dx = 1 inside the grid, else 0

  The state and the qparams get no gradient (as the observer sees `stop_gradient(x)`).

  Args:
    x: float32, non-empty.
    min_val, max_val, count, skipped: the observer's `MinMaxState` fields.
    spec: the grid.
    averaging: the moving average's constant; None for the running min / max.
    eps: the scale's floor.
    path: a native path of the kernel library.

  Returns:
    (y, the new state's fields, QParams(scale, zero_point)).

  Example:
    >>> from qjax.integer import kernels
    >>> if kernels.native_paths():
    ...   y, state, qp = observed_fake_quant(
    ...       jnp.array([-1.0, 0.3, 3.0]), jnp.float32(jnp.inf), jnp.float32(-jnp.inf),
    ...       jnp.int32(0), jnp.int32(0), spec=QuantSpec(bits=8, signed=False),
    ...       averaging=None, eps=float(np.finfo(np.float32).eps),
    ...       path=kernels.native_paths()[0])
    ...   print(state[0], state[1], int(qp.zero_point))
    -1.0 3.0 64
  """
  y, new_state, scale, zero_point = _observed_fake_quant(
      (spec, averaging, eps, path, None), x, min_val, max_val, count, skipped)
  return y, new_state, QParams(scale, zero_point)


def observed_fake_quant_int8(x: jax.Array, min_val: jax.Array, max_val: jax.Array,
                             count: jax.Array, skipped: jax.Array, *, spec: QuantSpec,
                             averaging: float | None, eps: float, path: str, operand: str
                             ) -> tuple[jax.Array, tuple[jax.Array, ...], QParams, tuple]:
  """`observed_fake_quant` that also returns y's grid integers for `int8_forward_dot`, from
  the same native pass (`qjax.integer.kernels.fake_quant_observe_int8`): for `operand` "x"
  (an activation, per tensor) y's int8 codes, for "w" (a (K, N) weight, symmetric) its
  packed integers, each with a flag: y holds a NaN. The integers get no gradient.

  Returns:
    (y, the new state's fields, QParams(scale, zero_point), (codes, nan)).

  Example:
    >>> from qjax.integer import kernels
    >>> if kernels.native_paths():
    ...   y, state, qp, (q, nan) = observed_fake_quant_int8(
    ...       jnp.array([[-1.0, 0.5, 3.0]]), jnp.float32(jnp.inf), jnp.float32(-jnp.inf),
    ...       jnp.int32(0), jnp.int32(0), spec=QuantSpec(bits=8, signed=False),
    ...       averaging=None, eps=float(np.finfo(np.float32).eps),
    ...       path=kernels.native_paths()[0], operand="x")
    ...   print(q.tolist(), bool(nan))
    [[-128, -32, 127]] False
  """
  y, new_state, scale, zero_point, int8 = _observed_fake_quant(
      (spec, averaging, eps, path, operand), x, min_val, max_val, count, skipped)
  return y, new_state, QParams(scale, zero_point), int8


# config: (spec, averaging, eps, path, operand); operand None: y, the state and the qparams,
# else also the integers (kernels.fake_quant_observe_int8).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _observed_fake_quant(config, x, min_val, max_val, count, skipped):
  return _observed_fake_quant_call(config, x, min_val, max_val, count, skipped, False)[0]


def _observed_fake_quant_call(config, x, min_val, max_val, count, skipped, with_mask):
  from qjax.integer import kernels  # pylint: disable=import-outside-toplevel
  spec, averaging, eps, path, operand = config
  if operand is None:
    y, mask, state, scale, zero_point = kernels.fake_quant_observe(
        x, min_val, max_val, count, skipped, spec=spec, averaging=averaging, eps=eps,
        path=path, mask=with_mask)
    out: tuple = (y, state, scale, zero_point)
  else:
    y, mask, state, scale, zero_point, codes, nan = kernels.fake_quant_observe_int8(
        x, min_val, max_val, count, skipped, spec=spec, averaging=averaging, eps=eps,
        path=path, operand=operand, mask=with_mask)
    out = (y, state, scale, zero_point, (codes, nan))
  return out, (mask if with_mask else None)


# The rules see which inputs carry a tangent (symbolic zeros): a point whose x needs no
# gradient (a model's input batch) writes no mask.
def _observed_fake_quant_fwd(config, x, min_val, max_val, count, skipped):
  return _observed_fake_quant_call(config, x.value, min_val.value, max_val.value, count.value,
                                   skipped.value, x.perturbed)


def _observed_fake_quant_bwd(config, mask, g):
  del config
  g_y = g[0]
  if mask is None or isinstance(g_y, SymbolicZero):
    return (None,) * 5
  return (jnp.where(mask, g_y, jnp.zeros_like(g_y)), None, None, None, None)


_observed_fake_quant.defvjp(_observed_fake_quant_fwd, _observed_fake_quant_bwd,
                            symbolic_zeros=True)


# ------------------------------------------------------------------------------------------
# fake_quant_learnable: LSQ gradients for scale and zero point.


def lsq_grad_factor(spec: QuantSpec, num_elements: int) -> float:
  """LSQ's gradient scale g = 1 / sqrt(N * qmax) (Esser et al. 2019; PyTorch's
  `_LearnableFakeQuantize(use_grad_scaling=True)` uses N = x.size)."""
  if isinstance(num_elements, bool) or not isinstance(num_elements, (int, np.integer)) \
      or num_elements <= 0:
    raise ValueError(f"lsq_grad_factor: num_elements must be a positive int; got {num_elements!r}.")
  if spec.qmax <= 0:
    raise ValueError(f"lsq_grad_factor: needs qmax > 0; {spec} has qmax={spec.qmax}.")
  return 1.0 / math.sqrt(num_elements * spec.qmax)


def fake_quant_learnable(x: jax.typing.ArrayLike, spec: QuantSpec, scale: jax.typing.ArrayLike,
                         zero_point: jax.typing.ArrayLike, *,
                         grad_factor: float = 1.0) -> jax.Array:
  """Fake quantization with a learnable scale S and float zero point Z (LSQ, as PyTorch).

  Forward: Z_r = clamp(rne(Z), qmin, qmax); y = S * (clamp(rne(x/S) + Z_r) - Z_r).
  Backward, with q = rne(x/S + Z_b) and g the gradient scale `grad_factor`:

    dy/dx = 1                 if qmin <= q <= qmax, else 0
    dy/dS = (y - x) / S       if qmin <= q <= qmax
            (qmin - Z_b)      if q < qmin
            (qmax - Z_b)      if q > qmax          (times g)
    dy/dZ = 0                 if qmin <= q <= qmax, else -S   (times g)

  summed over all entries (per-tensor) or over all but the channel axis (per-channel).
  As in PyTorch, Z_b = clamp(rne(Z)) per-channel, and Z_b = trunc(clamp(Z + 0.5)) per-tensor
  (PyTorch rounds half up there, unlike the forward).

  Args:
    x: floating-point array.
    spec: the grid; `spec.axis` for per-channel scale / zero point.
    scale: float scale, shape () or (C,); must stay > 0.
    zero_point: float zero point, same shape as scale.
    grad_factor: multiplies the scale and zero-point gradients; see `lsq_grad_factor`.

  Returns:
    Fake-quantized x, same shape and dtype.
  """
  x = numerics.float_data(x, "fake_quant_learnable")
  scale = _checks.as_float_array("scale", scale).astype(jnp.float32)
  zero_point = _checks.as_float_array(
      "zero_point", zero_point, python_int_ok=True,
      hint=" A learnable zero point is a float parameter.").astype(jnp.float32)
  expected = numerics.expected_qparam_shape(spec, x.shape)
  for name, value in (("scale", scale), ("zero_point", zero_point)):
    numerics.check_qparam_shape(value, spec, x.shape, name=f"fake_quant_learnable: {name}",
                                data_name="x")
  numerics.check_scale_values(scale, name="fake_quant_learnable: scale")
  if not isinstance(grad_factor, (int, float)) or isinstance(grad_factor, bool):
    raise TypeError(f"fake_quant_learnable: grad_factor must be a Python float; got "
                    f"{grad_factor!r}.")
  return _fake_quant_learnable(spec, float(grad_factor), x, scale.reshape(expected),
                               zero_point.reshape(expected))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fake_quant_learnable(spec, grad_factor, x, scale, zero_point):
  del grad_factor
  zp = jnp.clip(jnp.round(zero_point), spec.qmin, spec.qmax)
  out, _ = numerics.fake_quant_with_mask(x, scale, zp, spec=spec)
  return out


def _fake_quant_learnable_fwd(spec, grad_factor, x, scale, zero_point):
  out = _fake_quant_learnable(spec, grad_factor, x, scale, zero_point)
  return out, (x, scale, zero_point)


def _fake_quant_learnable_bwd(spec, grad_factor, residuals, g):
  x, scale, zero_point = residuals
  dx, dscale, dzero = _learnable_grads(x, scale, zero_point, g, spec=spec, grad_factor=grad_factor)
  return dx.astype(x.dtype), dscale, dzero


_fake_quant_learnable.defvjp(_fake_quant_learnable_fwd, _fake_quant_learnable_bwd)


@functools.partial(jax.jit, static_argnames=("spec", "grad_factor"))
def _learnable_grads(x: jax.Array, scale: jax.Array, zero_point: jax.Array, g: jax.Array, *,
                     spec: QuantSpec, grad_factor: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PyTorch's `_fake_quantize_grad_learnable_{tensor,channel}_kernel`, vectorised.

  Compiled as a unit so that `x * (1/S) + Z_b` contracts into an FMA as in PyTorch's kernel.
  """
  qmin, qmax = float(spec.qmin), float(spec.qmax)
  if spec.per_channel:
    zb = jnp.clip(jnp.round(zero_point), qmin, qmax)
  else:
    zb = jnp.trunc(jnp.clip(zero_point + 0.5, qmin, qmax))
  bcast = functools.partial(numerics.broadcast_qparam, spec=spec, ndim=x.ndim)
  s, inv_s, z = bcast(scale), bcast(1.0 / scale), bcast(zb)
  xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
  factor = jnp.float32(grad_factor)
  xq = jnp.round(xf * inv_s + z)
  below, above = xq < qmin, xq > qmax
  in_range = ~(below | above)
  x_fq = (jnp.clip(xq, qmin, qmax) - z) * s
  dx = jnp.where(in_range, gf, 0.0)
  dscale_clamped = jnp.where(below, gf * (qmin - z), gf * (qmax - z)) * factor
  dscale = jnp.where(in_range, gf * (x_fq - xf) * inv_s * factor, dscale_clamped)
  dzero = jnp.where(in_range, 0.0, gf * -1.0 * s * factor)
  if spec.axis is not None:  # per-channel
    axis = spec.axis % x.ndim
    others = tuple(a for a in range(x.ndim) if a != axis)
    return dx, jnp.sum(dscale, axis=others), jnp.sum(dzero, axis=others)
  return dx, jnp.sum(dscale).reshape(scale.shape), jnp.sum(dzero).reshape(zero_point.shape)


# ------------------------------------------------------------------------------------------
# round_ste.


def round_ste(x: jax.typing.ArrayLike) -> jax.Array:
  """Round half to even with an identity gradient: y = rne(x), dy/dx = 1.

  Example:
    >>> jax.grad(lambda v: round_ste(v * 3.0))(0.4)
    Array(3., dtype=float32, weak_type=True)
  """
  return _round_ste(_checks.as_float_array("x", x, hint=" round_ste rounds real numbers."))


@jax.custom_vjp
def _round_ste(x: jax.Array) -> jax.Array:
  return jnp.round(x)


def _round_ste_fwd(x):
  return jnp.round(x), None


def _round_ste_bwd(_, g):
  return (g,)


_round_ste.defvjp(_round_ste_fwd, _round_ste_bwd)


# ------------------------------------------------------------------------------------------
# int8_forward_dot: the forward of a fake-quantized contraction in int8, the backward float.


def int8_forward_dot(x_fq: jax.Array, w_fq: jax.Array, x_spec: QuantSpec, x_qparams: QParams,
                     w_spec: QuantSpec, w_qparams: QParams, *,
                     kernel: str | None = None, x_int8: tuple | None = None,
                     w_int8: tuple | None = None) -> jax.Array:
  """x_fq @ w_fq with the forward in integers (AQT's QAT): the fake-quantized operands are
  their grids' integers times the scales, so

    y[..., n] = f32(sum_k (qx[..., k] - Zx) qw[k, n]) * (Sx * Sw[n])

  with qx = rne(x_fq / Sx) + Zx and qw = rne(w_fq / Sw) recovered exactly (one native pass
  each where the kernel runs: `qjax.integer.kernels.quantize_samples` for x with its
  non-finite rows, `kernels.pack_grid` for w, packed with its column sums), the int32 sum on
  `qjax.integer.kernels.matmul` (the native int8 kernel where it runs, XLA's int8 dot
  elsewhere), one float rounding at the end where a float32 dot rounds at every step. Where
  a row of x_fq or a column of w_fq holds a NaN or +-inf, the outputs are the float dot's
  (NaN or +-inf, computed only then). The backward is the float dot's, dx = g w_fq^T,
  dw = x_fq^T g: the straight-through rule of the `fake_quant` that made x_fq and w_fq then
  masks them.

  Args:
    x_fq: float32 (..., K), fake-quantized with `x_qparams` on the 8-bit grid `x_spec`
      (per tensor).
    w_fq: float32 (K, N), fake-quantized with `w_qparams` on the 8-bit symmetric grid
      `w_spec` (per tensor or per output channel, axis -1).
    x_spec, x_qparams, w_spec, w_qparams: the grids and qparams of the two operands.
    kernel: the int8 kernel (`qjax.integer.kernels.resolve`).
    x_int8, w_int8: the operands' integers where the QAT points already computed them
      (`observed_fake_quant_int8`: (codes, nan) for x, (PackedWeights, nan) for w); the
      passes that recover them are then skipped. Both or neither.

  Returns:
    float32 (..., N).

  Raises:
    ValueError: grids other than those above, shapes that do not contract (..., K) with
      (K, N), K > INT8_FORWARD_MAX_TERMS (65,793: the int32 sums could overflow), qparams of
      the wrong shape or (concrete) value, or a concrete operand off its grid's 8-bit
      integers (x_fq / Sx + Zx, w_fq / Sw beyond what int8 holds: it would saturate).

  Example:
    >>> xs, ws = QuantSpec(bits=8, signed=False), QuantSpec(bits=8, symmetric=True)
    >>> xq, wq = QParams(jnp.float32(0.5), jnp.int32(10)), QParams(jnp.float32(0.25), jnp.int32(0))
    >>> x = fake_quant(jnp.array([[1.0, -2.0]]), xs, xq)
    >>> w = fake_quant(jnp.array([[1.0], [0.25]]), ws, wq)
    >>> int8_forward_dot(x, w, xs, xq, ws, wq, kernel="xla")   # 1 * 1 + (-2) * 0.25
    Array([[0.5]], dtype=float32)
  """
  if x_spec.bits != 8 or x_spec.axis is not None:
    raise ValueError(f"int8_forward_dot: x_spec must be an 8-bit per-tensor grid; got {x_spec}.")
  if w_spec.bits != 8 or not w_spec.symmetric or w_spec.axis not in (None, -1, 1):
    raise ValueError(f"int8_forward_dot: w_spec must be an 8-bit symmetric grid, per tensor or "
                     f"per output channel (axis -1); got {w_spec}.")
  _check_float32_operands(x_fq, w_fq, "int8_forward_dot")
  if jnp.ndim(w_fq) != 2 or jnp.ndim(x_fq) < 1 or jnp.shape(x_fq)[-1] != jnp.shape(w_fq)[0]:
    raise ValueError(f"int8_forward_dot: x_fq (..., K) and w_fq (K, N) must share K; got "
                     f"shapes {jnp.shape(x_fq)} and {jnp.shape(w_fq)}.")
  _check_terms(jnp.shape(w_fq)[0], "int8_forward_dot")
  _check_operand_grids(x_fq, w_fq, x_spec, x_qparams, w_spec, w_qparams, "int8_forward_dot")
  if (x_int8 is None) != (w_int8 is None):
    raise ValueError("int8_forward_dot: give both x_int8 and w_int8 or neither.")
  if x_int8 is not None:
    assert w_int8 is not None
    from qjax.integer import kernels  # pylint: disable=import-outside-toplevel
    if (jnp.shape(x_int8[0]) != jnp.shape(x_fq) or jnp.result_type(x_int8[0]) != jnp.int8
        or not isinstance(w_int8[0], kernels.PackedWeights)
        or (w_int8[0].k, w_int8[0].n) != jnp.shape(w_fq)):
      raise ValueError(f"int8_forward_dot: x_int8 must hold int8 codes of x_fq's shape "
                       f"{jnp.shape(x_fq)} and w_int8 PackedWeights of w_fq's shape "
                       f"{jnp.shape(w_fq)}, as observed_fake_quant_int8 returns them.")
  return _int8_forward_dot(x_spec, w_spec, kernel, x_fq, w_fq, x_qparams.scale,
                           x_qparams.zero_point, w_qparams.scale, x_int8, w_int8)


# The int32 sums are exact for up to this many terms: |qx - Zx| <= 255 on an 8-bit grid and
# |qw| <= 128, so |sum| <= 32640 K < 2^31.
INT8_FORWARD_MAX_TERMS = (2**31 - 1) // (255 * 128)


def _check_terms(terms: int, name: str) -> None:
  """ValueError when an int32 sum of `terms` products of 8-bit integers could overflow."""
  if terms > INT8_FORWARD_MAX_TERMS:
    raise ValueError(f"{name}: each output sums {terms} products (|(qx - Zx) qw| <= 32640), "
                     f"more than an int32 holds for every input; int8_forward takes up to "
                     f"{INT8_FORWARD_MAX_TERMS} terms. Leave int8_forward off for this layer.")


def _check_operand_grids(x_fq: jax.Array, w_fq: jax.Array, x_spec: QuantSpec,
                         x_qparams: QParams, w_spec: QuantSpec, w_qparams: QParams,
                         name: str) -> None:
  """ValueError naming the argument unless the qparams fit the grids and the operands (shapes:
  x's per tensor, w's per tensor or one per output channel; concrete values: scales finite
  and > 0, x's zero point on its grid), and unless each concrete operand lies within what its
  grid's 8-bit integers hold (x_fq / Sx + Zx within x's storage range, w_fq / Sw within
  [-128, 127]): a value beyond would saturate. Traced values are not read (under jit the
  contract is the docstring's: the operands are `fake_quant`'s output with these qparams)."""
  for arg, value in (("x_qparams.scale", x_qparams.scale),
                     ("x_qparams.zero_point", x_qparams.zero_point)):
    numerics.check_qparam_shape(jnp.asarray(value), x_spec, jnp.shape(x_fq),
                                name=f"{name}: {arg}", data_name="x_fq")
  numerics.check_qparam_shape(jnp.asarray(w_qparams.scale), w_spec, jnp.shape(w_fq),
                              name=f"{name}: w_qparams.scale", data_name="w_fq")
  numerics.check_scale_values(jnp.asarray(x_qparams.scale), name=f"{name}: x_qparams.scale")
  numerics.check_scale_values(jnp.asarray(w_qparams.scale), name=f"{name}: w_qparams.scale")
  numerics.check_zero_point_values(jnp.asarray(x_qparams.zero_point), x_spec,
                                   name=f"{name}: x_qparams.zero_point")
  from qjax.integer import arith  # pylint: disable=import-outside-toplevel
  shift = arith.int8_shift(x_spec)
  for arg, operands, low, high in (
      ("x_fq", (x_fq, x_qparams.scale, x_qparams.zero_point), shift - 128, shift + 127),
      ("w_fq", (w_fq, w_qparams.scale, 0), -128, 127)):
    v, scale, zero_point = (_checks.concrete(a) for a in operands)
    if v is None or scale is None or zero_point is None or v.size == 0:
      continue
    with np.errstate(invalid="ignore", over="ignore"):
      q = v.astype(np.float64) / np.asarray(scale, np.float64) + np.asarray(zero_point)
    q = q[np.isfinite(v)]
    if q.size and (q.min() < low - 0.5 or q.max() >= high + 0.5):
      integers = f"{arg} / scale" + (" + zero_point" if arg == "x_fq" else "")
      raise ValueError(f"{name}: {arg} holds values beyond its grid's 8-bit integers "
                       f"({integers} must lie in [{low}, {high}]; got {q.min():.6g} .. "
                       f"{q.max():.6g}): were they fake-quantized with these qparams? The int8 "
                       f"forward would saturate them.")


def _check_float32_operands(x_fq: jax.Array, w_fq: jax.Array, name: str) -> None:
  """ValueError unless both are float32: a narrower float's S * k is rounded off the grid (a
  bfloat16 by up to 2^-8 of it), so rne(x / S) can miss k by one for |k| > 128."""
  dtypes = (jnp.result_type(x_fq), jnp.result_type(w_fq))
  if any(d != jnp.float32 for d in dtypes):
    raise ValueError(f"{name}: x_fq and w_fq must be float32 (a 16-bit float's fake-quantized "
                     f"values are not exactly on the grid); got {dtypes[0]} and {dtypes[1]}. "
                     f"Train this layer in float32 or leave int8_forward off.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _int8_forward_dot(x_spec, w_spec, kernel, x_fq, w_fq, sx, zx, sw, x_int8, w_int8):
  from qjax.integer import arith, kernels  # pylint: disable=import-outside-toplevel
  k, n = w_fq.shape
  sw_n = jnp.broadcast_to(jnp.asarray(sw, jnp.float32), (n,))
  rows = x_fq.reshape((math.prod(x_fq.shape[:-1]), k))  # explicit: k or the batch may be 0
  if x_int8 is not None:  # the points' own integers (a NaN in x_fq or w_fq flagged)
    (qx, x_nan), (packed, w_nan) = x_int8, w_int8
    qx = qx.reshape(rows.shape)
    nonfinite = x_nan | w_nan
  else:
    # x's grid integers as int8 (qx - 128 on an unsigned grid, `int8_shift`) and its rows
    # with NaN or +-inf, in one pass (native where it runs): rne(x_fq / Sx) is exact,
    # |q - Z| <= 255 being far from a rounding boundary.
    qx, bad_rows = kernels.quantize_samples(rows, x_spec, sx, zx, kernel=kernel)
    # w's integers packed for the kernel (one native pass), with the columns holding NaN /
    # inf.
    packed, bad_cols = kernels.pack_grid(w_fq, sw_n, kernel_path=kernel)
    nonfinite = jnp.any(bad_rows) | jnp.any(bad_cols)
  # The difference of qx - shift to qx - Zx, times sum_k qw[k, n], goes into the offset.
  shift = arith.int8_shift(x_spec)
  zx = jnp.asarray(zx, jnp.int32)
  acc = kernels.matmul(qx, packed, (shift - zx) * packed.column_sums, kernel=kernel)
  y = acc.astype(jnp.float32) * (jnp.asarray(sx, jnp.float32) * sw_n)[None, :]
  y = _float_nonfinite(y, nonfinite, lambda: jnp.matmul(rows, w_fq))
  return y.reshape(x_fq.shape[:-1] + (n,))


def _float_nonfinite(y: jax.Array, any_nonfinite: jax.Array,
                     float_contraction: Callable[[], jax.Array]) -> jax.Array:
  """y, with the float contraction's NaN / +-inf where it has them.

  An output whose operands are all finite is exact in y (its grid integers were recovered
  exactly); one that meets a NaN or an infinity (a row or window of x_fq, a column or
  channel of w_fq; their integers were taken as 0) is not finite in the float contraction
  either, and takes its value from it. The float contraction runs only when an operand holds a
  non-finite value (`lax.cond`; under `vmap` both branches run).
  """
  def patch():
    exact = float_contraction()
    return jnp.where(jnp.isfinite(exact), y, exact)
  return jax.lax.cond(any_nonfinite, patch, lambda: y)


def _int8_forward_dot_fwd(x_spec, w_spec, kernel, x_fq, w_fq, sx, zx, sw, x_int8, w_int8):
  y = _int8_forward_dot(x_spec, w_spec, kernel, x_fq, w_fq, sx, zx, sw, x_int8, w_int8)
  return y, (x_fq, w_fq, sx, zx, sw, x_int8, w_int8)


def _int8_forward_dot_bwd(x_spec, w_spec, kernel, residuals, g):
  del x_spec, w_spec, kernel
  x_fq, w_fq, sx, zx, sw, x_int8, w_int8 = residuals
  dx = jnp.matmul(g, w_fq.T)
  rows = x_fq.reshape((math.prod(x_fq.shape[:-1]), x_fq.shape[-1]))
  dw = jnp.matmul(rows.T, g.reshape((rows.shape[0], g.shape[-1])))
  integers = jax.tree_util.tree_map(_zero_cotangent, (x_int8, w_int8))
  return (dx, dw, _zero_cotangent(sx), _zero_cotangent(jnp.asarray(zx)), _zero_cotangent(sw),
          *integers)


_int8_forward_dot.defvjp(_int8_forward_dot_fwd, _int8_forward_dot_bwd)


def int8_forward_conv(x_fq: jax.Array, w_fq: jax.Array, x_spec: QuantSpec,
                      x_qparams: QParams, w_spec: QuantSpec, w_qparams: QParams, *,
                      strides: Sequence[int], padding: str | Sequence[tuple[int, int]],
                      dilation: Sequence[int] | None = None, groups: int = 1,
                      kernel: str | None = None) -> jax.Array:
  """nn.Conv's convolution of x_fq with w_fq (channels last) with the forward in integers, as
  `int8_forward_dot` does for nn.Dense:

    y[b, p, o] = f32(sum_{w, c} (qx_pad[b, p s + w d, g(o) C/G + c] - Zx) qw[w, c, o])
                 * (Sx * Sw[o])

  (g(o) = o // (O / G): the group of output channel o; G = 1, no groups, sums all C).

  with the grids' integers recovered exactly (x's in one native pass,
  `qjax.integer.kernels.quantize_samples`), padded positions at real zero (qx = Zx), the int32
  sums on `qjax.integer.kernels.conv_int32` (patches on the native int8 kernel, or XLA's int32
  convolution for one input channel and for groups) and one float rounding at the end.
  Outputs whose window of x_fq or channel of w_fq holds a NaN or +-inf are the float
  convolution's (NaN or +-inf, computed only then; the others stay exact). The backward is
  the float convolution's, dx and dw by transposing it at w_fq and x_fq: the straight-through
  rule of the `fake_quant` that made them then masks them.

  Args:
    x_fq: float32 (B, *spatial, C), fake-quantized with `x_qparams` on the 8-bit grid
      `x_spec` (per tensor).
    w_fq: float32 (*window, C / G, O), fake-quantized with `w_qparams` on the 8-bit
      symmetric grid `w_spec` (per tensor or per output channel, axis -1).
    x_spec, x_qparams, w_spec, w_qparams: the grids and qparams of the two operands.
    strides, padding, dilation: as `lax.conv_general_dilated`'s window_strides, padding
      ("SAME", "VALID" or (low, high) pairs) and rhs_dilation (default 1).
    groups: G, its feature_group_count (C = G for a depthwise convolution); G divides C and O.
    kernel: the int8 kernel (`qjax.integer.kernels.resolve`).

  Returns:
    float32 (B, *out_spatial, O).

  Raises:
    ValueError: grids other than those above, operands that do not convolve, a window of
      more than INT8_FORWARD_MAX_TERMS (65,793) terms (window size x C: the int32 sums could
      overflow), or qparams and concrete operands off their grids (as `int8_forward_dot`).

  Example:
    >>> xs, ws = QuantSpec(bits=8, signed=False), QuantSpec(bits=8, symmetric=True)
    >>> xq, wq = QParams(jnp.float32(0.5), jnp.int32(10)), QParams(jnp.float32(0.25), jnp.int32(0))
    >>> x = fake_quant(jnp.array([[[1.0], [-2.0], [0.5]]]), xs, xq)   # (1, 3, 1)
    >>> w = fake_quant(jnp.array([[[1.0]], [[0.25]]]), ws, wq)         # (2, 1, 1)
    >>> int8_forward_conv(x, w, xs, xq, ws, wq, strides=(1,), padding="VALID",
    ...                   kernel="xla")[0, :, 0]   # 1 - 2 * 0.25, -2 + 0.5 * 0.25
    Array([ 0.5  , -1.875], dtype=float32)
  """
  if x_spec.bits != 8 or x_spec.axis is not None:
    raise ValueError(f"int8_forward_conv: x_spec must be an 8-bit per-tensor grid; got "
                     f"{x_spec}.")
  nsp = jnp.ndim(w_fq) - 2
  if w_spec.bits != 8 or not w_spec.symmetric or w_spec.axis not in (None, -1, nsp + 1):
    raise ValueError(f"int8_forward_conv: w_spec must be an 8-bit symmetric grid, per tensor "
                     f"or per output channel (axis -1); got {w_spec}.")
  _check_float32_operands(x_fq, w_fq, "int8_forward_conv")
  if not isinstance(groups, int) or groups < 1:
    raise ValueError(f"int8_forward_conv: groups must be a positive int; got {groups!r}.")
  if (nsp < 1 or jnp.ndim(x_fq) != nsp + 2
      or jnp.shape(x_fq)[-1] != jnp.shape(w_fq)[-2] * groups
      or jnp.shape(w_fq)[-1] % groups):
    raise ValueError(f"int8_forward_conv: x_fq (B, *spatial, C) and w_fq (*window, C / G, O) "
                     f"must share the number of spatial dims, with C = {groups} (groups) x "
                     f"w_fq's input channels and O a multiple of {groups}; got shapes "
                     f"{jnp.shape(x_fq)} and {jnp.shape(w_fq)}.")
  _check_terms(math.prod(jnp.shape(w_fq)[:-1]), "int8_forward_conv")
  _check_operand_grids(x_fq, w_fq, x_spec, x_qparams, w_spec, w_qparams, "int8_forward_conv")
  from qjax.integer import arith  # pylint: disable=import-outside-toplevel
  window = tuple(jnp.shape(w_fq)[:nsp])
  # "SAME" / "VALID" become explicit pads once strides and dilation are checked.
  pairs = ((0, 0),) * nsp if isinstance(padding, str) else padding
  strides, pads, dilation, _ = arith.checked_conv_geometry(
      nsp, strides, pairs, (1,) * nsp if dilation is None else dilation, 0, "int8_forward_conv")
  if isinstance(padding, str):
    pads = arith.conv_pads(padding, jnp.shape(x_fq)[1:-1], window, strides, dilation)
  return _int8_forward_conv(x_spec, w_spec, kernel, (strides, pads, dilation, groups), x_fq,
                            w_fq, x_qparams.scale, x_qparams.zero_point, w_qparams.scale)


def _float_conv(x, w, geometry):
  from qjax.integer import arith  # pylint: disable=import-outside-toplevel
  strides, pads, dilation, groups = geometry
  return jax.lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation,
                                      dimension_numbers=arith.channels_last_dn(x.shape, w.shape),
                                      feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _int8_forward_conv(x_spec, w_spec, kernel, geometry, x_fq, w_fq, sx, zx, sw):
  from qjax.integer import arith, kernels  # pylint: disable=import-outside-toplevel
  strides, pads, dilation, groups = geometry
  o = w_fq.shape[-1]
  sw_o = jnp.broadcast_to(jnp.asarray(sw, jnp.float32), (o,))
  qx, bad_samples = kernels.quantize_samples(x_fq, x_spec, sx, zx, kernel=kernel)
  qw, bad_channels = kernels.grid_integers(w_fq.reshape((math.prod(w_fq.shape[:-1]), o)), sw_o)
  qw = qw.reshape(w_fq.shape)
  # Real zero is qx = Zx, i.e. Zx - shift on the int8 grid: the padding's value; the
  # difference of qx - shift to qx - Zx, times the window's sum of qw, is the offset.
  shift = arith.int8_shift(x_spec)
  zx = jnp.asarray(zx, jnp.int32)
  colsum = jnp.sum(qw, axis=tuple(range(qw.ndim - 1)), dtype=jnp.int32)
  acc = kernels.conv_int32(qx, qw, (shift - zx) * colsum, strides=strides, padding=pads,
                           dilation=dilation, groups=groups, pad_value=zx - shift,
                           kernel=kernel)
  out_lanes = (1,) * (acc.ndim - 1) + (o,)
  y = acc.astype(jnp.float32) * (jnp.asarray(sx, jnp.float32) * sw_o).reshape(out_lanes)
  return _float_nonfinite(y, jnp.any(bad_samples) | jnp.any(bad_channels),
                          lambda: _float_conv(x_fq, w_fq, geometry))


def _int8_forward_conv_fwd(x_spec, w_spec, kernel, geometry, x_fq, w_fq, sx, zx, sw):
  y = _int8_forward_conv(x_spec, w_spec, kernel, geometry, x_fq, w_fq, sx, zx, sw)
  return y, (x_fq, w_fq, sx, zx, sw)


def _int8_forward_conv_bwd(x_spec, w_spec, kernel, geometry, residuals, g):
  del x_spec, w_spec, kernel
  x_fq, w_fq, sx, zx, sw = residuals
  (dx,) = jax.linear_transpose(lambda a: _float_conv(a, w_fq, geometry), x_fq)(g)
  (dw,) = jax.linear_transpose(lambda b: _float_conv(x_fq, b, geometry), w_fq)(g)
  return dx, dw, _zero_cotangent(sx), _zero_cotangent(jnp.asarray(zx)), _zero_cotangent(sw)


_int8_forward_conv.defvjp(_int8_forward_conv_fwd, _int8_forward_conv_bwd)
