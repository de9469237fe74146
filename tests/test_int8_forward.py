"""QAT with the forward contraction in integers (`qjax.ste.int8_forward_dot`,
`QuantDotGeneral(int8_forward=True)`): exact against a NumPy int64 reference on every int8
kernel path, the float dot's gradients, NaN rows, errors, and the QAT step of a model."""

import dataclasses
import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from support import cases
import qjax.nn
from qjax import QParams, QuantSpec, numerics, ste
from qjax.integer import kernels

KERNELS = ("xla", *kernels.native_paths())
X_SPECS = {"uint8_reduce_range": QuantSpec(bits=8, signed=False, reduce_range=True),
           "int8_affine": QuantSpec(bits=8)}
W_SPECS = {"per_tensor": QuantSpec(bits=8, symmetric=True),
           "per_channel": QuantSpec(bits=8, symmetric=True, axis=-1)}


def _operands(x_spec, w_spec, m=13, k=70, n=9, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(0.3, 1.0, (m, k)).astype(np.float32))
  w = jnp.asarray(rng.normal(0.0, 0.2, (k, n)).astype(np.float32))
  xq = numerics.qparams_from_minmax(jnp.min(x) * 0.8, jnp.max(x) * 0.8, x_spec)
  lo, hi = numerics.minmax(w, w_spec)
  wq = numerics.qparams_from_minmax(lo, hi, w_spec)
  return ste.fake_quant(x, x_spec, xq), ste.fake_quant(w, w_spec, wq), xq, wq


def _reference(x_fq, w_fq, xq, wq):
  """f32(sum_k (qx - Zx) qw) * (Sx * Sw) with the sum in int64."""
  sx = np.float32(xq.scale)
  sw = np.broadcast_to(np.asarray(wq.scale, np.float32), (w_fq.shape[1],))
  qx = np.rint(np.asarray(x_fq) / sx).astype(np.int64)  # qx - Zx
  qw = np.rint(np.asarray(w_fq) / sw).astype(np.int64)
  acc = qx @ qw
  assert np.abs(acc).max() < 2**31
  return acc.astype(np.float32) * (sx * sw).astype(np.float32)


class Int8ForwardDotTest(chex.TestCase):

  # Every kernel path in one call (jitted: in one program, one compilation).
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(x_name=tuple(X_SPECS), w_name=tuple(W_SPECS))
  def test_exact_against_int64_reference(self, x_name, w_name):
    x_spec, w_spec = X_SPECS[x_name], W_SPECS[w_name]
    x_fq, w_fq, xq, wq = _operands(x_spec, w_spec)
    fn = self.variant(lambda x, w, xq, wq: [ste.int8_forward_dot(
        x, w, x_spec=x_spec, x_qparams=xq, w_spec=w_spec, w_qparams=wq, kernel=kernel)
                                            for kernel in KERNELS])
    want, float_dot = _reference(x_fq, w_fq, xq, wq), np.asarray(x_fq @ w_fq)
    for kernel, got in zip(KERNELS, fn(x_fq, w_fq, xq, wq), strict=True):
      got = np.asarray(got)
      np.testing.assert_array_equal(got, want, err_msg=kernel)
      # The float dot of the same operands rounds at every step: close, not equal.
      np.testing.assert_allclose(got, float_dot, rtol=1e-4, atol=1e-5, err_msg=kernel)

  @parameterized.parameters(*((k,) for k in KERNELS))
  def test_gradients_are_the_float_dots(self, kernel):
    x_spec, w_spec = X_SPECS["uint8_reduce_range"], W_SPECS["per_channel"]
    x_fq, w_fq, xq, wq = _operands(x_spec, w_spec, m=6, seed=1)
    g = jnp.asarray(np.random.default_rng(2).normal(size=(6, 9)).astype(np.float32))
    int8 = jax.grad(lambda a, b: jnp.sum(ste.int8_forward_dot(
        a, b, x_spec, xq, w_spec, wq, kernel=kernel) * g), argnums=(0, 1))(x_fq, w_fq)
    flt = jax.grad(lambda a, b: jnp.sum((a @ b) * g), argnums=(0, 1))(x_fq, w_fq)
    for got, want in zip(int8, flt, strict=True):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)

  def test_nonfinite_rows_and_columns_are_the_float_dots(self):
    x_spec, w_spec = X_SPECS["int8_affine"], W_SPECS["per_tensor"]
    x_fq, w_fq, xq, wq = _operands(x_spec, w_spec, m=4, n=5)
    x_fq = x_fq.at[1, 3].set(jnp.nan).at[2, 0].set(jnp.inf)
    w_fq = w_fq.at[7, 4].set(-jnp.inf)
    want = _reference(x_fq.at[1, 3].set(0.0).at[2, 0].set(0.0), w_fq.at[7, 4].set(0.0), xq, wq)
    bad = np.zeros((4, 5), bool)
    bad[1:3, :] = True
    bad[:, 4] = True
    float_dot = np.asarray(jnp.matmul(x_fq, w_fq))
    assert np.isposinf(float_dot[2, :4]).any() or np.isneginf(float_dot[2, :4]).any()
    want[bad] = float_dot[bad]  # NaN, +inf or -inf, as the float dot has them
    # Eager, and jitted with every kernel path in one program (one compilation).
    def every_kernel(x, w, xq, wq):
      return [ste.int8_forward_dot(x, w, x_spec, xq, w_spec, wq, kernel=kernel)
              for kernel in KERNELS]
    for fn in (every_kernel, jax.jit(every_kernel)):
      for kernel, got in zip(KERNELS, fn(x_fq, w_fq, xq, wq), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=kernel)

  # Every kernel path in one call (jitted: in one program, one compilation).
  @chex.variants(with_jit=True, without_jit=True)
  def test_leading_dims_and_nonfinite_samples(self):
    x_spec, w_spec = X_SPECS["uint8_reduce_range"], W_SPECS["per_channel"]
    x_fq, w_fq, xq, wq = _operands(x_spec, w_spec, m=12)
    x_fq = x_fq.at[7, 11].set(jnp.nan)
    fn = self.variant(lambda x, w, xq, wq: [ste.int8_forward_dot(
        x, w, x_spec=x_spec, x_qparams=xq, w_spec=w_spec, w_qparams=wq, kernel=kernel)
                                            for kernel in KERNELS])
    want = _reference(x_fq.at[7, 11].set(0.0), w_fq, xq, wq)
    want[7] = np.nan
    for kernel, got in zip(KERNELS, fn(x_fq.reshape(3, 4, 70), w_fq, xq, wq), strict=True):
      got = np.asarray(got)
      assert got.shape == (3, 4, 9), kernel
      np.testing.assert_array_equal(got.reshape(12, 9), want, err_msg=kernel)
    for kernel, got in zip(KERNELS, fn(x_fq[:0], w_fq, xq, wq), strict=True):
      assert got.shape == (0, 9), kernel  # empty batch

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(x_name=tuple(X_SPECS), w_name=tuple(W_SPECS),
                         poison=("none", "x_nan", "w_nan", "x_inf"))
  def test_the_points_integers_give_the_same_dot(self, x_name, w_name, poison):
    """int8_forward_dot on the integers the fused points emit (observed_fake_quant_int8)
    equals int8_forward_dot recovering them itself: outputs (NaN / inf rows and columns
    included) and gradients, bit for bit."""
    if not kernels.native_paths():
      self.skipTest("the native kernel does not run here")
    x_spec, w_spec = X_SPECS[x_name], W_SPECS[w_name]
    rng = np.random.default_rng(3)
    x = rng.normal(0.3, 1.0, (13, 70)).astype(np.float32)
    w = rng.normal(0.0, 0.2, (70, 9)).astype(np.float32)
    if poison == "x_nan":
      x[4, 5] = np.nan
    elif poison == "w_nan":
      w[3, 8] = np.nan
    elif poison == "x_inf":
      x[2, 0] = np.inf
    # States that have seen data: a NaN or inf batch leaves them (the point skips it).
    x_state = (jnp.float32(-1.0), jnp.float32(2.5), jnp.int32(1), jnp.int32(0))
    c = () if w_spec.axis is None else (9,)
    w_state = (jnp.full(c, -0.4, jnp.float32), jnp.full(c, 0.5, jnp.float32), jnp.int32(1),
               jnp.int32(0))
    g = jnp.asarray(rng.normal(size=(13, 9)).astype(np.float32))

    def loss(x, w, kernel, emitted):
      args = dict(averaging=0.01, eps=1e-7, path=kernel)
      x_fq, _, xq, x_int8 = ste.observed_fake_quant_int8(x, *x_state, spec=x_spec,
                                                         operand="x", **args)
      w_fq, _, wq, w_int8 = ste.observed_fake_quant_int8(w, *w_state, spec=w_spec,
                                                         operand="w", **args)
      y = ste.int8_forward_dot(x_fq, w_fq, x_spec, xq, w_spec, wq, kernel=kernel,
                               **(dict(x_int8=x_int8, w_int8=w_int8) if emitted else {}))
      return jnp.sum(jnp.where(jnp.isfinite(y), y, 0.0) * g), y

    fn = self.variant(lambda x, w: {(kernel, emitted): jax.value_and_grad(
        functools.partial(loss, kernel=kernel, emitted=emitted), argnums=(0, 1),
        has_aux=True)(x, w) for kernel in kernels.native_paths() for emitted in (False, True)})
    results = fn(jnp.asarray(x), jnp.asarray(w))
    for kernel in kernels.native_paths():
      want, got = results[(kernel, False)], results[(kernel, True)]
      jax.tree.map(lambda a, b, kernel=kernel: np.testing.assert_array_equal(
          np.asarray(a), np.asarray(b), err_msg=kernel), got, want)
    # A NaN makes its row (x) or column (w) NaN; the x point clamps an inf onto its grid.
    expected = np.zeros((13, 9), bool)
    expected[4, :] = poison == "x_nan"
    expected[:, 8] |= poison == "w_nan"
    for kernel in kernels.native_paths():
      y = np.asarray(results[(kernel, True)][0][1])
      np.testing.assert_array_equal(~np.isfinite(y), expected, err_msg=kernel)

  def test_the_points_integers_come_in_pairs(self):
    x_fq, w_fq, xq, wq = _operands(X_SPECS["int8_affine"], W_SPECS["per_tensor"])
    with pytest.raises(ValueError, match="give both x_int8 and w_int8 or neither"):
      ste.int8_forward_dot(x_fq, w_fq, X_SPECS["int8_affine"], xq, W_SPECS["per_tensor"], wq,
                           x_int8=(jnp.zeros(x_fq.shape, jnp.int8), jnp.bool_(False)))
    with pytest.raises(ValueError, match="x_int8 must hold int8 codes of x_fq's shape"):
      ste.int8_forward_dot(x_fq, w_fq, X_SPECS["int8_affine"], xq, W_SPECS["per_tensor"], wq,
                           x_int8=(jnp.zeros(x_fq.shape, jnp.int32), jnp.bool_(False)),
                           w_int8=(kernels.pack(jnp.zeros(w_fq.shape[::-1], jnp.int8)),
                                   jnp.bool_(False)))

  def test_errors_name_the_argument(self):
    x_fq, w_fq, xq, wq = _operands(X_SPECS["int8_affine"], W_SPECS["per_tensor"])
    with pytest.raises(ValueError, match="x_spec must be an 8-bit per-tensor grid"):
      ste.int8_forward_dot(x_fq, w_fq, QuantSpec(bits=4), xq, W_SPECS["per_tensor"], wq)
    with pytest.raises(ValueError, match="w_spec must be an 8-bit symmetric grid"):
      ste.int8_forward_dot(x_fq, w_fq, X_SPECS["int8_affine"], xq, QuantSpec(bits=8), wq)
    with pytest.raises(ValueError, match="must share K"):
      ste.int8_forward_dot(x_fq, w_fq.T, X_SPECS["int8_affine"], xq, W_SPECS["per_tensor"], wq)
    with pytest.raises(ValueError, match="x_fq and w_fq must be float32"):
      ste.int8_forward_dot(x_fq.astype(jnp.bfloat16), w_fq, X_SPECS["int8_affine"], xq,
                           W_SPECS["per_tensor"], wq)

  def test_qparams_and_operands_off_their_grids_are_refused(self):
    """Qparams that do not fit the grids, and operands whose integers on them would saturate
    in int8 (not fake-quantized with those qparams), are refused by name, never clipped."""
    x_spec, w_spec = X_SPECS["uint8_reduce_range"], W_SPECS["per_channel"]
    x_fq, w_fq, xq, wq = _operands(x_spec, w_spec)
    dot = lambda x=x_fq, w=w_fq, xq=xq, wq=wq, w_spec=w_spec: ste.int8_forward_dot(
        x, w, x_spec, xq, w_spec, wq)
    cases = (
        (dict(xq=QParams(jnp.full((70,), xq.scale), xq.zero_point)),
         r"x_qparams.scale has shape \(70,\), but the spec is per-tensor"),
        (dict(wq=QParams(wq.scale[:4], wq.zero_point)),
         r"w_qparams.scale has shape \(4,\), but the spec is per-channel along axis -1"),
        (dict(wq=QParams(wq.scale, wq.zero_point), w_spec=W_SPECS["per_tensor"]),
         r"w_qparams.scale has shape \(9,\), but the spec is per-tensor"),
        (dict(xq=QParams(jnp.float32(0.0), xq.zero_point)), "x_qparams.scale must be finite"),
        (dict(wq=QParams(wq.scale.at[3].set(jnp.nan), wq.zero_point)),
         "w_qparams.scale must be finite"),
        (dict(xq=QParams(xq.scale, jnp.int32(200))),
         r"x_qparams.zero_point must lie in \[qmin, qmax\] = \[0, 127\]"),
        # Integers beyond [0, 255] (unsigned x) and [-128, 127] (w) would saturate.
        (dict(xq=QParams(xq.scale / 4, xq.zero_point)),
         r"x_fq holds values beyond its grid's 8-bit integers \(x_fq / scale \+ zero_point "
         r"must lie in \[0, 255\]"),
        (dict(wq=QParams(wq.scale / 2, wq.zero_point)),
         r"w_fq holds values beyond .* \(w_fq / scale must lie in \[-128, 127\]"),
    )
    for kwargs, message in cases:
      with pytest.raises(ValueError, match="int8_forward_dot: " + message):
        dot(**kwargs)
    # On the grid, beyond the reduced range of x (its storage range holds 255) and with a
    # NaN (the float dot's): accepted.
    x_top = x_fq.at[0, 0].set((255 - xq.zero_point).astype(jnp.float32) * xq.scale)
    x_top = x_top.at[1, 1].set(jnp.nan)
    got = np.asarray(dot(x=x_top))
    assert np.isnan(got[1]).all() and np.isfinite(np.delete(got, 1, axis=0)).all()
    # Traced qparams cannot be read: the check is skipped, not failed.
    jax.jit(lambda s: dot(xq=QParams(s, xq.zero_point)))(xq.scale).block_until_ready()

  def test_zero_sized_operands_contract_as_the_float_dot(self):
    x_spec, w_spec = X_SPECS["int8_affine"], W_SPECS["per_tensor"]
    _, _, xq, wq = _operands(x_spec, w_spec)
    for x_shape, w_shape in (((4, 0), (0, 3)), ((4, 5), (5, 0)), ((0, 5), (5, 3))):
      x = ste.fake_quant(jnp.ones(x_shape), x_spec, xq)
      w = ste.fake_quant(jnp.full(w_shape, 0.1), w_spec, wq)
      for kernel in KERNELS if x_shape[1] == 0 else (None,):
        got = ste.int8_forward_dot(x, w, x_spec, xq, w_spec, wq, kernel=kernel)
        np.testing.assert_array_equal(np.asarray(got), np.zeros((x_shape[0], w_shape[1])))
      grads = jax.grad(lambda a, b: ste.int8_forward_dot(a, b, x_spec, xq, w_spec, wq).sum(),
                       argnums=(0, 1))(x, w)
      assert (grads[0].shape, grads[1].shape) == (x_shape, w_shape)

  def test_longest_contraction_is_exact_and_a_longer_one_is_refused(self):
    """K = INT8_FORWARD_MAX_TERMS products of the grids' extremes (255 x -128) stay within
    int32; one more term could overflow, and is refused."""
    k = ste.INT8_FORWARD_MAX_TERMS
    x_spec, w_spec = QuantSpec(bits=8, signed=False), W_SPECS["per_tensor"]
    xq = QParams(jnp.float32(0.5), jnp.int32(0))
    wq = QParams(jnp.float32(0.25), jnp.int32(0))
    x_fq = jnp.full((2, k), 127.5, jnp.float32)  # qx = 255
    w_fq = jnp.full((k, 3), -32.0, jnp.float32)  # qw = -128
    want = np.float32(-255 * 128 * k) * np.float32(0.125)
    for kernel in KERNELS:
      got = ste.int8_forward_dot(x_fq, w_fq, x_spec, xq, w_spec, wq, kernel=kernel)
      np.testing.assert_array_equal(np.asarray(got), np.full((2, 3), want), err_msg=kernel)
    with pytest.raises(ValueError, match="more than an int32 holds"):
      ste.int8_forward_dot(jnp.zeros((1, k + 1)), jnp.zeros((k + 1, 1)), x_spec, xq, w_spec, wq)
    with pytest.raises(ValueError, match="int8_forward_conv: each output sums 65800 products"):
      ste.int8_forward_conv(jnp.zeros((1, 5, 5, 13160)), jnp.zeros((5, 1, 13160, 1)), x_spec, xq,
                            w_spec, wq, strides=(1, 1), padding="VALID")


class _MLP(nn.Module):
  dot: functools.partial

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, dot_general_cls=self.dot, name="fc1")(x))
    return nn.Dense(4, dot_general_cls=self.dot, name="fc2")(x)


def _qat_step(model, variables, x):
  """(output, updated quant_stats, gradients) of a jitted QAT step with loss sum(y^2)."""
  def loss(params):
    y, updates = model.apply({**variables, "params": params}, x, mutable=["quant_stats"])
    return jnp.sum(y ** 2), (y, updates)
  (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return y, stats, grads


def _steps_agree(models, x):
  """One QAT step of models[False] (float forward) and models[True] (int8 forward) from the
  same initialisation: nearly the same outputs and gradients (the float forward rounds at
  every step). Returns the variables and the two updated quant_stats (float, int8)."""
  variables = models[False].init(cases.init_key(), x)
  (y0, stats0, g0), (y1, stats1, g1) = (_qat_step(models[flag], variables, x)
                                        for flag in (False, True))
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(g1, g0, rtol=1e-4, atol=1e-5)
  jaxprs = {flag: str(jax.make_jaxpr(lambda v, m=m: m.apply(v, x, mutable=["quant_stats"]))(
      variables)) for flag, m in models.items()}
  # The int8 forward ran, not a float fallback (the float forward has no int8 values at all;
  # its fused points' empty integer outputs are no values).
  int8_values = re.compile(r":i8\[[1-9]")
  assert int8_values.search(jaxprs[True]) and not int8_values.search(jaxprs[False])
  return variables, stats0, stats1


def test_quant_dot_general_int8_forward_trains_like_the_float_forward():
  """A QAT step with int8_forward: the same observer updates and nearly the same logits and
  gradients as the fake-quantized float forward (which rounds its dot at every step)."""
  qconfig = qjax.nn.get_default_qat_qconfig("x86")
  x = jnp.asarray(np.random.default_rng(3).random((8, 30)).astype(np.float32))
  dots = {flag: functools.partial(qjax.nn.QuantDotGeneral, qconfig=qconfig, mode="qat",
                                  int8_forward=flag) for flag in (False, True)}
  _, stats0, stats1 = _steps_agree({flag: _MLP(dot) for flag, dot in dots.items()}, x)
  # fc1's observers see the same input and weights; fc2's input differs in the last bits.
  chex.assert_trees_all_equal(stats1["quant_stats"]["fc1"], stats0["quant_stats"]["fc1"])


def test_int8_forward_needs_observed_qparams():
  qconfig = dataclasses.replace(qjax.nn.get_default_qat_qconfig("x86"), learnable=True)
  dot = functools.partial(qjax.nn.QuantDotGeneral, qconfig=qconfig, mode="qat",
                          int8_forward=True)
  x = jnp.ones((2, 30), jnp.float32)
  variables = _MLP(dot).init(cases.init_key(), x)
  with pytest.raises(ValueError, match="int8_forward needs observed qparams"):
    _MLP(dot).apply(variables, x, mutable=["quant_stats"])


def _conv_operands(x_spec, w_spec, shape=(3, 9, 8, 3), window=(3, 2), cout=5, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(0.3, 1.0, shape).astype(np.float32))
  w = jnp.asarray(rng.normal(0.0, 0.2, (*window, shape[-1], cout)).astype(np.float32))
  xq = numerics.qparams_from_minmax(jnp.min(x) * 0.8, jnp.max(x) * 0.8, x_spec)
  lo, hi = numerics.minmax(w, w_spec)
  wq = numerics.qparams_from_minmax(lo, hi, w_spec)
  return ste.fake_quant(x, x_spec, xq), ste.fake_quant(w, w_spec, wq), xq, wq


def _conv_reference(x_fq, w_fq, xq, wq, strides, pads, dilation):
  """f32(sum (qx - Zx) qw over the window, padding at qx - Zx = 0, in int64) * (Sx * Sw)."""
  sx = np.float32(xq.scale)
  sw = np.broadcast_to(np.asarray(wq.scale, np.float32), (w_fq.shape[-1],))
  qx = np.rint(np.asarray(x_fq) / sx).astype(np.int64)  # qx - Zx
  qw = np.rint(np.asarray(w_fq) / sw).astype(np.int64)
  qx = np.pad(qx, [(0, 0), *pads, (0, 0)])
  (kh, kw), (sh, sv), (dh, dv) = w_fq.shape[:2], strides, dilation
  oh = (qx.shape[1] - (kh - 1) * dh - 1) // sh + 1
  ow = (qx.shape[2] - (kw - 1) * dv - 1) // sv + 1
  acc = np.zeros((qx.shape[0], oh, ow, w_fq.shape[-1]), np.int64)
  for i in range(kh):
    for j in range(kw):
      patch = qx[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dv:j * dv + (ow - 1) * sv + 1:sv]
      acc += np.einsum("bhwc,co->bhwo", patch, qw[i, j])
  return acc.astype(np.float32) * (sx * sw).astype(np.float32)


CONV_GEOMETRIES = {"valid": ((1, 1), "VALID", (1, 1)),
                   "same_strided": ((2, 1), "SAME", (1, 1)),
                   "pairs_dilated": ((1, 2), ((1, 2), (0, 1)), (2, 1))}


class Int8ForwardConvTest(chex.TestCase):

  # Jitted, every kernel path in one program (one compilation; the eager form runs in the
  # non-finite test below).
  @parameterized.product(geometry_and_w=(("valid", "per_tensor"), ("same_strided", "per_channel"),
                                         ("pairs_dilated", "per_channel")),
                         cin=(1, 3))
  def test_exact_against_int64_reference(self, geometry_and_w, cin):
    geometry, w_name = geometry_and_w
    x_spec, w_spec = X_SPECS["uint8_reduce_range"], W_SPECS[w_name]
    x_fq, w_fq, xq, wq = _conv_operands(x_spec, w_spec, shape=(3, 9, 8, cin))
    strides, padding, dilation = CONV_GEOMETRIES[geometry]
    fn = jax.jit(lambda x, w, xq, wq: [ste.int8_forward_conv(
        x, w, x_spec=x_spec, x_qparams=xq, w_spec=w_spec, w_qparams=wq, strides=strides,
        padding=padding, dilation=dilation, kernel=kernel) for kernel in KERNELS])
    pads = jax.lax.padtype_to_pads((9, 8), ((3 - 1) * dilation[0] + 1, (2 - 1) * dilation[1] + 1),
                                   strides, padding) if isinstance(padding, str) else padding
    want = _conv_reference(x_fq, w_fq, xq, wq, strides, pads, dilation)
    float_conv = np.asarray(jax.lax.conv_general_dilated(
        x_fq, w_fq, strides, padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC")))
    for kernel, got in zip(KERNELS, fn(x_fq, w_fq, xq, wq), strict=True):
      got = np.asarray(got)
      np.testing.assert_array_equal(got, want, err_msg=kernel)
      np.testing.assert_allclose(got, float_conv, rtol=1e-4, atol=1e-5, err_msg=kernel)

  @parameterized.parameters(*((k,) for k in KERNELS))
  def test_gradients_are_the_float_convolutions(self, kernel):
    x_spec, w_spec = X_SPECS["int8_affine"], W_SPECS["per_channel"]
    x_fq, w_fq, xq, wq = _conv_operands(x_spec, w_spec, seed=1)
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(2, 1),
                             padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    g = jnp.asarray(np.random.default_rng(2).normal(
        size=conv(x_fq, w_fq).shape).astype(np.float32))
    int8 = jax.grad(lambda a, b: jnp.sum(ste.int8_forward_conv(
        a, b, x_spec, xq, w_spec, wq, strides=(2, 1), padding="SAME", kernel=kernel) * g),
                    argnums=(0, 1))(x_fq, w_fq)
    flt = jax.grad(lambda a, b: jnp.sum(conv(a, b) * g), argnums=(0, 1))(x_fq, w_fq)
    for got, want in zip(int8, flt, strict=True):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)

  # Two groups of 3 input channels (runs of groups); three of 2 (the grouped kernel where it
  # runs); depthwise (C = G).
  @parameterized.parameters((2, 4), (3, 6), (6, 6))
  def test_grouped_and_depthwise_are_exact_with_the_float_gradients(self, groups, cout):
    x_spec, w_spec = X_SPECS["int8_affine"], W_SPECS["per_channel"]
    x_fq, w_fq, xq, wq = _conv_operands(x_spec, w_spec, shape=(2, 7, 6, 6), cout=cout)
    w_fq = w_fq[..., :6 // groups, :]  # (3, 2, C / G, O), still on each channel's grid
    pads = ((1, 1), (0, 1))
    cg, og = 6 // groups, cout // groups
    want = np.concatenate([_conv_reference(
        x_fq[..., g * cg:(g + 1) * cg], w_fq[..., g * og:(g + 1) * og], xq,
        QParams(wq.scale[g * og:(g + 1) * og], wq.zero_point), (2, 1), pads, (1, 1))
                           for g in range(groups)], axis=-1)
    int8 = functools.partial(ste.int8_forward_conv, x_spec=x_spec, x_qparams=xq, w_spec=w_spec,
                             w_qparams=wq, strides=(2, 1), padding=pads, groups=groups)
    np.testing.assert_array_equal(np.asarray(int8(x_fq, w_fq)), want)
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(2, 1), padding=pads,
                             feature_group_count=groups,
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    g = jnp.asarray(np.random.default_rng(2).normal(size=want.shape).astype(np.float32))
    got = jax.jit(jax.grad(lambda a, b: jnp.sum(int8(a, b) * g), argnums=(0, 1)))(x_fq, w_fq)
    flt = jax.grad(lambda a, b: jnp.sum(conv(a, b) * g), argnums=(0, 1))(x_fq, w_fq)
    for mine, theirs in zip(got, flt, strict=True):
      np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-6, atol=1e-6)

  def test_nonfinite_windows_and_channels_are_the_float_convolutions(self):
    x_spec, w_spec = X_SPECS["int8_affine"], W_SPECS["per_channel"]
    x_fq, w_fq, xq, wq = _conv_operands(x_spec, w_spec)
    x_fq = x_fq.at[1, 4, 4, 0].set(jnp.nan).at[0, 0, 1, 1].set(-jnp.inf)
    w_fq = w_fq.at[0, 1, 2, 3].set(jnp.inf)
    pads = ((1, 1), (0, 1))  # "SAME" for the (3, 2) window
    float_conv = np.asarray(jax.lax.conv_general_dilated(
        x_fq, w_fq, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")))
    bad = ~np.isfinite(float_conv)
    assert bad[..., 3].all() and bad[1, 3:6, 3:5].all() and not bad[1, :2, :, :3].any()
    assert np.isinf(float_conv[0, :2, :2]).any()
    clean = _conv_reference(x_fq.at[1, 4, 4, 0].set(0.0).at[0, 0, 1, 1].set(0.0),
                            w_fq.at[0, 1, 2, 3].set(0.0), xq, wq, (1, 1), pads, (1, 1))
    want = np.where(bad, float_conv, clean)
    for kernel in KERNELS:
      got = np.asarray(ste.int8_forward_conv(x_fq, w_fq, x_spec, xq, w_spec, wq, strides=(1, 1),
                                             padding="SAME", kernel=kernel))
      np.testing.assert_array_equal(got, want, err_msg=kernel)
    jitted = jax.jit(lambda a, b: ste.int8_forward_conv(a, b, x_spec, xq, w_spec, wq,
                                                        strides=(1, 1), padding="SAME"))
    np.testing.assert_array_equal(np.asarray(jitted(x_fq, w_fq)), want)

  def test_zero_output_channels(self):
    x_spec, w_spec = X_SPECS["int8_affine"], W_SPECS["per_tensor"]
    x_fq, _, xq, wq = _conv_operands(x_spec, w_spec)
    for kernel in KERNELS:
      got = ste.int8_forward_conv(x_fq, jnp.ones((3, 2, 3, 0)), x_spec, xq, w_spec, wq,
                                  strides=(1, 1), padding="SAME", kernel=kernel)
      assert got.shape == (*x_fq.shape[:-1], 0), kernel

  def test_errors_name_the_argument(self):
    x_spec, w_spec = X_SPECS["int8_affine"], W_SPECS["per_channel"]
    x_fq, w_fq, xq, wq = _conv_operands(x_spec, w_spec)
    geometry = {"strides": (1, 1), "padding": "VALID"}
    with pytest.raises(ValueError, match="x_spec must be an 8-bit per-tensor grid"):
      ste.int8_forward_conv(x_fq, w_fq, QuantSpec(bits=4), xq, w_spec, wq, **geometry)
    with pytest.raises(ValueError, match="w_spec must be an 8-bit symmetric grid"):
      ste.int8_forward_conv(x_fq, w_fq, x_spec, xq, QuantSpec(bits=8), wq, **geometry)
    with pytest.raises(ValueError, match="must share the number of spatial dims, with C = 1"):
      ste.int8_forward_conv(x_fq[..., :2], w_fq, x_spec, xq, w_spec, wq, **geometry)
    with pytest.raises(ValueError, match="O a multiple of 3"):  # 5 output channels
      ste.int8_forward_conv(x_fq, w_fq[..., :1, :], x_spec, xq, w_spec, wq, groups=3,
                            **geometry)
    with pytest.raises(ValueError, match="groups must be a positive int; got 0"):
      ste.int8_forward_conv(x_fq, w_fq, x_spec, xq, w_spec, wq, groups=0, **geometry)
    with pytest.raises(ValueError, match="x_fq and w_fq must be float32"):
      ste.int8_forward_conv(x_fq, w_fq.astype(jnp.float16), x_spec, xq, w_spec, wq, **geometry)
    for bad, message in (
        (dict(strides=(1,), padding="VALID"), r"strides must be 2 ints >= 1; got \(1,\)"),
        (dict(strides=(0, 1), padding="SAME"), r"strides must be 2 ints >= 1; got \(0, 1\)"),
        (dict(strides=(1, 1), padding="VALID", dilation=(1, 0)), r"dilation must be 2 ints"),
        (dict(strides=(1, 1), padding=((-1, 0), (0, 0))), r"padding must be 2 \(low, high\)")):
      with pytest.raises(ValueError, match="int8_forward_conv: " + message):
        ste.int8_forward_conv(x_fq, w_fq, x_spec, xq, w_spec, wq, **bad)
    with pytest.raises(ValueError, match=r"int8_forward_conv: w_qparams.scale has shape \(2,\)"):
      ste.int8_forward_conv(x_fq, w_fq, x_spec, xq, w_spec, QParams(wq.scale[:2], wq.zero_point),
                            **geometry)
    with pytest.raises(ValueError, match="int8_forward_conv: x_fq holds values beyond"):
      ste.int8_forward_conv(x_fq, w_fq, x_spec, QParams(xq.scale / 8, xq.zero_point), w_spec, wq,
                            **geometry)


class _ConvNet(nn.Module):
  conv: functools.partial

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", conv_general_dilated_cls=self.conv,
                        name="conv1")(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="VALID",
                        conv_general_dilated_cls=self.conv, name="conv2")(x))
    return jnp.mean(x, axis=(1, 2))


def test_quant_conv_general_int8_forward_trains_like_the_float_forward():
  """A QAT step of a conv net (one and four input channels, SAME and strided VALID) with
  int8_forward: the same first observers and nearly the same outputs and gradients as the
  fake-quantized float forward."""
  qconfig = qjax.nn.get_default_qat_qconfig("x86")
  x = jnp.asarray(np.random.default_rng(4).random((4, 9, 9, 1)).astype(np.float32))
  convs = {flag: functools.partial(qjax.nn.QuantConvGeneral, qconfig=qconfig, mode="qat",
                                   int8_forward=flag) for flag in (False, True)}
  _, stats0, stats1 = _steps_agree({flag: _ConvNet(conv) for flag, conv in convs.items()}, x)
  chex.assert_trees_all_equal(stats1["quant_stats"]["conv1"], stats0["quant_stats"]["conv1"])
  # Grouped: the same step as the float forward's.
  x4 = jnp.asarray(np.random.default_rng(5).random((2, 5, 5, 4)).astype(np.float32))
  _steps_agree({flag: nn.Conv(4, (3, 3), feature_group_count=2, conv_general_dilated_cls=conv)
                for flag, conv in convs.items()}, x4)
  dilated = nn.Conv(4, (3, 3), input_dilation=2, padding=((1, 1), (1, 1)),
                    conv_general_dilated_cls=convs[True])
  with pytest.raises(ValueError, match="int8_forward runs channels-last convolutions"):
    dilated.apply(dilated.init(cases.init_key(), x4), x4, mutable=["quant_stats"])


class _DigitsNet(nn.Module):
  conv: functools.partial
  dot: functools.partial

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), conv_general_dilated_cls=self.conv, name="conv1")(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2, conv_general_dilated_cls=self.conv,
                        name="conv2")(x))
    return nn.Dense(10, dot_general_cls=self.dot, name="fc")(x.reshape((x.shape[0], -1)))


def test_int8_forward_qat_trains_the_8x8_digits_as_the_float_forward_does():
  """150 Adam steps of QAT on scikit-learn's 8x8 digits from one initialisation, with the
  forward contractions in float and in int8: both learn the digits, to within 2 points."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  data = load_digits()
  x = jnp.asarray((data.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1))
  y = jnp.asarray(data.target.astype(np.int32))
  qconfig = qjax.nn.get_default_qat_qconfig("x86")
  models = {flag: _DigitsNet(
      conv=functools.partial(qjax.nn.QuantConvGeneral, qconfig=qconfig, mode="qat",
                             int8_forward=flag),
      dot=functools.partial(qjax.nn.QuantDotGeneral, qconfig=qconfig, mode="qat",
                            int8_forward=flag)) for flag in (False, True)}
  variables = jax.jit(models[False].init)(cases.init_key(), x[:64])  # one compilation
  opt = optax.adam(3e-3)
  accuracy = {}
  for flag, model in models.items():
    @jax.jit
    def step(params, stats, opt_state, xb, yb, model=model):
      def loss(p):
        logits, updates = model.apply({"params": p, "quant_stats": stats}, xb,
                                      mutable=["quant_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), updates
      (_, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
      with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count in
        changes, opt_state = opt.update(grads, opt_state)
      return optax.apply_updates(params, changes), updates["quant_stats"], opt_state

    params, stats = variables["params"], variables["quant_stats"]
    opt_state = opt.init(params)
    for i in range(150):
      batch = slice((i * 128) % 1664, (i * 128) % 1664 + 128)
      params, stats, opt_state = step(params, stats, opt_state, x[batch], y[batch])
    logits = jax.jit(model.apply)({"params": params, "quant_stats": stats}, x)
    accuracy[flag] = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == np.asarray(y)))
  assert min(accuracy.values()) > 0.9, accuracy
  assert abs(accuracy[True] - accuracy[False]) <= 0.02, accuracy
