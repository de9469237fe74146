"""Contract suite of the research quantizers (DoReFa, PACT, WRPN, binary, ternary).

Every quantizer in CASES is checked for: jitted == eager, output dtype == input dtype, values
on the paper's exact grid, one trace for new values, and gradients equal to a reference built
from `stop_gradient` (the straight-through estimator written out by hand).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import strategies as st

from qjax import quantizers as qz

SHAPE = (8, 3)  # channels last
sg = jax.lax.stop_gradient


def _ste(x, value):
  """value forward, identity to x backward."""
  return x + sg(value - x)


def _f32(*arrays):
  return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


# ------------------------------------------------------------------------------------------
# stop_gradient references (float32), one per quantizer.


def _ref_unit(bits, x):  # quantize_k
  n = float(2**bits - 1)
  return _ste(x, jnp.round(x * n) / n)


def _ref_clipped_unit(bits, x):  # dorefa_activation, wrpn_activation
  return _ref_unit(bits, jnp.clip(x, 0.0, 1.0))


def _ref_wrpn_weight(bits, x):
  m = float(2**(bits - 1) - 1)
  c = jnp.clip(x, -1.0, 1.0)
  return _ste(c, jnp.round(c * m) / m)


def _ref_dorefa_weight(bits, x):
  if bits == 1:
    e = sg(jnp.mean(jnp.abs(x)))
    return _ste(x, jnp.where(x >= 0, e, -e))
  t = jnp.tanh(x)
  u = t / (2 * jnp.max(jnp.abs(t))) + 0.5
  return 2 * _ref_unit(bits, u) - 1


def _ref_pact(bits, x, alpha):
  n = float(2**bits - 1)
  a = alpha.reshape((1,) * (x.ndim - alpha.ndim) + alpha.shape)
  c = jnp.clip(x, 0.0, a)  # d/dx: 1 on (0, a); d/da: 1 where x > a
  return _ste(c, jnp.round(c * (n / a)) * (a / n))


def _channel_mean(v, per_channel):
  return jnp.mean(v, axis=0 if per_channel else None, keepdims=True)


def _ref_binary(per_channel, scale, x):
  a = _channel_mean(jnp.abs(x), per_channel) if scale else jnp.ones((1, 1), jnp.float32)
  inside = jnp.where(jnp.abs(x) <= 1, x, sg(x))
  return _ste(inside, jnp.where(x >= 0, a, -a))


def _ref_ternary(per_channel, x):
  mag = jnp.abs(x)
  delta = 0.7 * _channel_mean(mag, per_channel)
  kept = mag > delta
  axis = 0 if per_channel else None
  a = jnp.sum(jnp.where(kept, mag, 0.0), axis=axis, keepdims=True) / jnp.maximum(
      jnp.sum(kept, axis=axis, keepdims=True, dtype=jnp.float32), 1.0)
  return _ste(x, jnp.where(x > delta, a, jnp.where(x < -delta, -a, 0.0)))


# ------------------------------------------------------------------------------------------
# Grid checks on the output (float32 view of the result, input, extras), exact in the dtype.


def _assert_levels(out, level, dtype):
  """out is the exact rational `level` (float64) rounded to float32 (XLA's division may be
  one float32 ulp off the nearest), then to `dtype`; 0 stays exactly 0."""
  rtol = 2.0**-23 if dtype == jnp.float32 else 2.0**-8
  np.testing.assert_allclose(out, level, rtol=rtol, atol=0)


def _grid_unit(bits, out, x, dtype):
  n = 2**bits - 1
  m = np.round(out.astype(np.float64) * n)
  assert (m >= 0).all() and (m <= n).all()
  _assert_levels(out, m / n, dtype)
  np.testing.assert_array_equal(out[m == n], 1.0)


def _grid_wrpn_weight(bits, out, x, dtype):
  n = 2**(bits - 1) - 1
  m = np.round(out.astype(np.float64) * n)
  assert (np.abs(m) <= n).all()
  _assert_levels(out, m / n, dtype)
  np.testing.assert_array_equal(np.abs(out[np.abs(m) == n]), 1.0)


def _grid_dorefa_weight(bits, out, x, dtype):
  if bits == 1:
    _grid_signs(out, x, per_channel=False)
    return
  n = 2**bits - 1
  m = np.round((out.astype(np.float64) + 1) / 2 * n)
  assert (m >= 0).all() and (m <= n).all()
  _assert_levels(out, (2 * m - n) / n, dtype)
  np.testing.assert_array_equal(np.abs(out[(m == 0) | (m == n)]), 1.0)


def _grid_pact(bits, out, x, dtype, alpha):
  n = 2**bits - 1
  step = np.float64(np.float32(alpha)) / n
  m = np.round(out.astype(np.float64) / step)
  assert (m >= 0).all() and (m <= n).all()
  _assert_levels(out, m * step, dtype)


def _grid_signs(out, x, per_channel, unit=False):
  """Two values +-s per channel (per tensor), s > 0, the sign of x (0 -> +)."""
  mag = np.abs(out)
  s = mag[:1] if per_channel else mag.flat[0]
  np.testing.assert_array_equal(mag, np.broadcast_to(s, mag.shape))
  assert (s > 0).all() and (not unit or (s == 1).all())
  np.testing.assert_array_equal(np.sign(out), np.where(x >= 0, 1.0, -1.0))


def _grid_ternary(out, x, per_channel):
  columns = out.T if per_channel else out.reshape(1, -1)
  for col in columns:
    nonzero = np.abs(col[col != 0])
    assert len(np.unique(col)) <= 3 and len(np.unique(nonzero)) <= 1
  np.testing.assert_array_equal(np.sign(out)[out != 0], np.sign(x)[out != 0])


# ------------------------------------------------------------------------------------------
# The cases.


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  fn: Callable[..., jax.Array]      # (x, *extras) -> y
  ref: Callable[..., jax.Array]     # float32 stop_gradient reference
  grid: Callable[..., None]         # (out, x, dtype, *extras)
  low: float = -1.5
  high: float = 1.5
  extras: tuple[np.ndarray, ...] = ()

  def __str__(self) -> str:
    return self.name


P = functools.partial
ALPHA_TENSOR = (np.float32(1.0),)
ALPHA_CHANNEL = (np.array([0.6, 1.0, 1.4], np.float32),)

CASES = [
    *(Case(f"quantize_k_{k}", P(qz.quantize_k, bits=k), P(_ref_unit, k), P(_grid_unit, k),
           low=0.0, high=1.0) for k in (2, 4)),
    *(Case(f"dorefa_activation_{k}", P(qz.dorefa_activation, bits=k), P(_ref_clipped_unit, k),
           P(_grid_unit, k)) for k in (1, 4)),
    *(Case(f"dorefa_weight_{k}", P(qz.dorefa_weight, bits=k), P(_ref_dorefa_weight, k),
           P(_grid_dorefa_weight, k)) for k in (1, 2, 8)),
    Case("pact_2", P(qz.pact, bits=2), P(_ref_pact, 2), P(_grid_pact, 2), -0.5, 2.0,
         ALPHA_TENSOR),
    Case("pact_4_per_channel", P(qz.pact, bits=4), P(_ref_pact, 4), P(_grid_pact, 4), -0.5,
         2.0, ALPHA_CHANNEL),
    *(Case(f"wrpn_weight_{k}", P(qz.wrpn_weight, bits=k), P(_ref_wrpn_weight, k),
           P(_grid_wrpn_weight, k)) for k in (2, 4)),
    *(Case(f"wrpn_activation_{k}", P(qz.wrpn_activation, bits=k), P(_ref_clipped_unit, k),
           P(_grid_unit, k)) for k in (1, 4)),
    Case("binary", qz.binary_weight, P(_ref_binary, False, True),
         lambda out, x, dtype: _grid_signs(out, x, per_channel=False)),
    Case("binary_per_channel", P(qz.binary_weight, per_channel=True), P(_ref_binary, True, True),
         lambda out, x, dtype: _grid_signs(out, x, per_channel=True)),
    Case("binary_unscaled", P(qz.binary_weight, scale=False), P(_ref_binary, False, False),
         lambda out, x, dtype: _grid_signs(out, x, per_channel=False, unit=True)),
    Case("ternary", P(qz.ternary_weight, per_channel=False), P(_ref_ternary, False),
         lambda out, x, dtype: _grid_ternary(out, x, per_channel=False)),
    Case("ternary_per_channel", qz.ternary_weight, P(_ref_ternary, True),
         lambda out, x, dtype: _grid_ternary(out, x, per_channel=True)),
]


def _inputs(case: Case, seed: int, dtype) -> jax.Array:
  x = np.random.default_rng(seed).uniform(case.low, case.high, SHAPE).astype(np.float32)
  return jnp.asarray(x, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_contract(case, dtype):
  """jitted == eager, dtype kept, on the grid, equal to the reference, one trace."""
  chex.clear_trace_counter()
  jitted = jax.jit(chex.assert_max_traces(lambda *args: case.fn(*args), n=1))
  for seed in (0, 1):  # the second call reuses the first trace
    x = _inputs(case, seed, dtype)
    got = jitted(x, *case.extras)
    eager = case.fn(x, *case.extras)
    assert got.dtype == eager.dtype == dtype and got.shape == x.shape
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(eager, np.float32))
    out = np.asarray(got, np.float32)
    case.grid(out, np.asarray(x, np.float32), dtype, *case.extras)
    want = case.ref(*_f32(x, *case.extras)).astype(dtype)
    np.testing.assert_allclose(out, np.asarray(want, np.float32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradient_equals_stop_gradient_reference(case):
  x = _inputs(case, 2, jnp.float32)
  extras = _f32(*case.extras)
  cot = jnp.asarray(np.random.default_rng(3).normal(size=SHAPE).astype(np.float32))
  argnums = tuple(range(1 + len(extras)))
  got = jax.grad(lambda *a: jnp.sum(case.fn(*a) * cot), argnums)(x, *extras)
  want = jax.grad(lambda *a: jnp.sum(case.ref(*a) * cot), argnums)(x, *extras)
  for g, w in zip(got, want, strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("pact_2", "binary")], ids=str)
def test_bfloat16_gradient_keeps_dtype(case):
  x = _inputs(case, 4, jnp.bfloat16)
  extras = tuple(jnp.asarray(e, jnp.bfloat16) for e in case.extras)
  grads = jax.grad(lambda *a: jnp.sum(case.fn(*a).astype(jnp.float32)),
                   tuple(range(1 + len(extras))))(x, *extras)
  assert all(g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()
             for g in grads)


def test_dorefa_weight_gradient_matches_finite_differences_of_its_smooth_part():
  """Only quantize_k is straight-through: d w_q / dw = d(tanh(w) / max|tanh(w)|) / dw."""
  w = np.random.default_rng(5).normal(size=SHAPE)
  cot = np.random.default_rng(6).normal(size=SHAPE)

  def smooth(v):
    t = np.tanh(v)
    return np.sum(cot * t / np.max(np.abs(t)))

  eps = 1e-6
  fd = np.zeros(SHAPE)
  for idx in np.ndindex(*SHAPE):
    step = np.zeros(SHAPE)
    step[idx] = eps
    fd[idx] = (smooth(w + step) - smooth(w - step)) / (2 * eps)
  got = jax.grad(lambda v: jnp.sum(qz.dorefa_weight(v, 4) * jnp.asarray(cot, jnp.float32)))(
      jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(got, fd, rtol=1e-4, atol=1e-4)


def test_gradient_masks_at_the_clip_edges():
  """Straight-through inside the closed clip interval; PACT's x = alpha goes to alpha."""
  x = jnp.array([-1.0, 0.0, 0.5, 1.0, 1.5], jnp.float32)
  inside = np.array([0, 1, 1, 1, 0], np.float32)
  for fn in (P(qz.dorefa_activation, bits=2), P(qz.wrpn_activation, bits=2)):
    np.testing.assert_array_equal(jax.grad(lambda v, f=fn: f(v).sum())(x), inside)
  np.testing.assert_array_equal(
      jax.grad(lambda v: qz.wrpn_weight(v, 3).sum())(x), np.array([1, 1, 1, 1, 0], np.float32))
  dx, da = jax.grad(lambda v, a: qz.pact(v, a, 2).sum(), (0, 1))(x, jnp.float32(1.0))
  np.testing.assert_array_equal(dx, np.array([0, 1, 1, 0, 0], np.float32))
  assert float(da) == 2.0


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(st.lists(st.floats(-4, 4, width=32), min_size=1, max_size=6),
                  st.sampled_from([c for c in CASES if not c.extras]))
def test_quantizing_twice_changes_nothing(values, case):
  """Every output lies on its grid, so a second pass keeps it (binary: unscaled or sign)."""
  x = jnp.asarray(np.array(values, np.float32).reshape(-1, 1))
  if case.name.startswith("quantize_k"):
    x = jnp.clip(x, 0.0, 1.0)
  once = case.fn(x)
  if case.name.startswith(("binary", "ternary", "dorefa_weight")):
    # scales are recomputed from the output: only the levels (signs, zeros) are kept
    np.testing.assert_array_equal(np.sign(case.fn(once)), np.sign(once))
  else:
    np.testing.assert_array_equal(case.fn(once), once)


class PactL2Test(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_and_gradient(self):
    alpha = jnp.array([0.5, 2.0], jnp.float32)
    loss = self.variant(lambda a: qz.pact_l2(a, 0.1))
    np.testing.assert_allclose(loss(alpha), 0.05 * (0.25 + 4.0), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(loss)(alpha), 0.1 * np.asarray(alpha), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Bad input.

BIT_RANGES = [
    (qz.quantize_k, 1, 32), (qz.dorefa_activation, 1, 32), (qz.dorefa_weight, 1, 32),
    (P(qz.pact, alpha=1.0), 2, 16), (qz.wrpn_weight, 2, 16), (qz.wrpn_activation, 1, 16),
]


@pytest.mark.parametrize(("fn", "lo", "hi"), BIT_RANGES)
def test_bits_out_of_range(fn, lo, hi):
  x = jnp.zeros(3, jnp.float32)
  for bits in (lo - 1, hi + 1):
    with pytest.raises(ValueError, match=rf"bits must be in {lo}\.\.{hi}; got {bits}"):
      fn(x, bits=bits)
  for bits in (4.0, True, jnp.int32(4)):
    with pytest.raises(TypeError, match="bits must be a Python int"):
      fn(x, bits=bits)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in (
    "quantize_k_2", "dorefa_weight_2", "pact_2", "wrpn_weight_2", "binary", "ternary")], ids=str)
def test_non_float_input(case):
  with pytest.raises(TypeError, match="must be a floating-point array"):
    case.fn(jnp.ones(SHAPE, jnp.int32), *case.extras)


def test_pact_alpha_checks():
  x = jnp.ones(SHAPE, jnp.float32)
  with pytest.raises(ValueError, match="alpha must be > 0"):
    qz.pact(x, jnp.float32(-1.0), 4)
  with pytest.raises(ValueError, match="alpha must be > 0"):
    qz.pact(x, jnp.array([1.0, 0.0, 1.0], jnp.float32), 4)
  with pytest.raises(ValueError, match=r"alpha must have shape \(\) or \(x.shape\[-1\],\)"):
    qz.pact(x, jnp.ones(8, jnp.float32), 4)
  with pytest.raises(TypeError, match="alpha must be a floating-point array"):
    qz.pact(x, jnp.int32(1), 4)
  with pytest.raises(ValueError, match="weight_decay must be >= 0"):
    qz.pact_l2(jnp.float32(1.0), -0.1)
  with pytest.raises(TypeError, match="weight_decay must be a Python float"):
    qz.pact_l2(jnp.float32(1.0), "0.1")


@pytest.mark.parametrize("shape", [(3, 4), (300, 100)])
def test_dorefa_weights_holding_nan_are_nan(shape):
  # Small or large (where XLA:CPU's max reduction would drop the NaN), the same answer: no
  # scale, so no finite weight is quantized on a range taken from the others.
  w = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
  w = w.at[-1, -1].set(jnp.nan)
  assert np.isnan(np.asarray(jax.jit(qz.dorefa_weight, static_argnums=1)(w, 4))).all()
  assert np.isnan(np.asarray(qz.dorefa_weight(w, 4))).all()


def test_ternary_channels_with_nan_or_inf_are_nan():
  """As binary_weight's: a channel holding a NaN or an infinity has no delta (mean |w| is not
  finite), so the whole channel is NaN, never silently zeros; the other channels are kept."""
  w = jnp.array([[1.0, jnp.nan, 0.5], [-0.5, 0.3, jnp.inf], [0.2, 0.1, -0.4]])
  got = np.asarray(qz.ternary_weight(w, per_channel=True))
  assert np.isnan(got[:, 1:]).all()
  np.testing.assert_array_equal(got[:, 0], np.asarray(qz.ternary_weight(w[:, :1]))[:, 0])
  assert np.isnan(np.asarray(qz.ternary_weight(w, per_channel=False))).all()


def test_per_channel_and_flags_checks():
  with pytest.raises(ValueError, match="per_channel=True needs w with at least one axis"):
    qz.ternary_weight(jnp.float32(1.0))
  with pytest.raises(TypeError, match="per_channel must be a bool"):
    qz.binary_weight(jnp.ones(3, jnp.float32), per_channel=1)
  with pytest.raises(TypeError, match="scale must be a bool"):
    qz.binary_weight(jnp.ones(3, jnp.float32), scale="yes")
