"""qjax.snn: the float LIF step against an independent NumPy float64 step and against closed forms
derived by hand; the surrogate gradients against their formulas and a stop_gradient reference
built from their antiderivatives; jit, dtypes and tracing; refused input.

The step, with a = dt tau_mem_inv and b = dt tau_syn_inv:

    i'_t = i_{t-1} + x_t
    v'_t = v_{t-1} + a ((v_leak - v_{t-1}) + i'_t)
    i_t = (1 - b) i'_t
    z_t = H(v'_t - v_th),  H(0) = 0
    v_t = v_reset if z_t else v'_t

Closed forms used below (constant x, i_0 = 0, v_0 = v_leak, no spike), with c = 1 - b, r = 1 - a:

    i'_t = x sum_{k=1..t} c^(k-1) = (x / b) (1 - c^t),      i_t = c i'_t
    u_t = v_t - v_leak = r u_{t-1} + a i'_t = sum_{s=1..t} r^(t-s) a i'_s
        = (x / b) (1 - r^t - a c (r^t - c^t) / (r - c))       (r != c)

and the fixed point of the step: i'* = i* + x and i* = c i'* give i'* = x / b, i* = c x / b;
v* = v* + a ((v_leak - v*) + i'*) gives v* = v_leak + x / b.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qjax import snn
from qjax.snn import LIFParameters, LIFState, Surrogate

F32_EPS = float(np.finfo(np.float32).eps)
RNG = np.random.default_rng(20240611)

# (params, dt): the defaults; a nonzero leak with a negative reset; a fast neuron on a small time
# step; a slow synapse, a positive reset and a large time step.
PARAM_SETS = {
    "default": (LIFParameters(), 1e-3),
    "leak_negative_reset": (LIFParameters(tau_syn_inv=150.0, tau_mem_inv=80.0, v_leak=0.3,
                                          v_th=0.9, v_reset=-0.4, surrogate="triangle",
                                          alpha=20.0), 1e-3),
    "fast_small_dt": (LIFParameters(tau_syn_inv=500.0, tau_mem_inv=250.0, v_leak=-0.2, v_th=0.5,
                                    v_reset=-1.0), 5e-4),
    "slow_synapse_positive_reset": (LIFParameters(tau_syn_inv=100, tau_mem_inv=300, v_leak=0.1,
                                                  v_th=1.5, v_reset=0.25), 2e-3),
}
STEPS, NEURONS = 200, 64


# ------------------------------------------------------------------------------------------
# References.


def _np_step(x, v, i, p: LIFParameters, dt: float):
  """One step in NumPy float64 from the equations: (z, v', v_next, i_next)."""
  x, v, i = (np.asarray(t, np.float64) for t in (x, v, i))
  a, b = dt * p.tau_mem_inv, dt * p.tau_syn_inv
  i_in = i + x
  v_pre = v + a * (p.v_leak - v + i_in)
  fired = v_pre > p.v_th
  return (fired.astype(np.float64), v_pre, np.where(fired, p.v_reset, v_pre),
          (1.0 - b) * i_in)


def _np_run(xs, v, i, p: LIFParameters, dt: float):
  """The float64 trajectory from (v, i) under currents xs[t]: z, v', v, i, each (T, ...)."""
  out = []
  for x in xs:
    z, v_pre, v, i = _np_step(x, v, i, p, dt)
    out.append((z, v_pre, v, i))
  return tuple(np.stack(column) for column in zip(*out, strict=True))


@functools.cache
def _scan(params: LIFParameters, dt: float):
  """Jitted trajectory of qjax's step: (z, v, i) after each step, each (T, ...)."""

  def run(xs, state):
    def body(s, x):
      z, s = snn.lif_step(x, s, params, dt)
      return s, (z, s.v, s.i)
    return jax.lax.scan(body, state, xs)[1]

  return jax.jit(run)


def _currents_and_state(params: LIFParameters, dt: float, seed: int):
  """Float32 currents (STEPS, NEURONS) and a random initial state.

  Each neuron gets a mean drive between far below and several times above the current that
  makes it fire at all, x > b (v_th - v_leak), plus noise (negative currents included).
  """
  rng = np.random.default_rng(seed)
  rheobase = dt * params.tau_syn_inv * abs(params.v_th - params.v_leak)
  drive = rng.uniform(-1.0, 6.0, NEURONS) + rng.normal(0.0, 2.0, (STEPS, NEURONS))
  xs = (rheobase * drive).astype(np.float32)
  v0 = rng.uniform(min(params.v_reset, params.v_leak) - 0.5, params.v_th, NEURONS)
  i0 = rng.normal(0.0, 3.0 * rheobase / (dt * params.tau_syn_inv), NEURONS)
  return xs, v0.astype(np.float32), i0.astype(np.float32)


# ------------------------------------------------------------------------------------------
# 1. The float step against NumPy float64.


class NumpyReferenceTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(name, *ps) for name, ps in PARAM_SETS.items()])
  def test_each_step_matches_float64_from_the_same_state(self, params, dt):
    """Every one of STEPS steps, recomputed in float64 from qjax's own state before it."""
    xs, v0, i0 = _currents_and_state(params, dt, seed=1)
    z, v, i = (np.asarray(t) for t in _scan(params, dt)(xs, LIFState(jnp.asarray(v0),
                                                                       jnp.asarray(i0))))
    v_prev = np.concatenate([v0[None], v[:-1]]).astype(np.float64)
    i_prev = np.concatenate([i0[None], i[:-1]]).astype(np.float64)
    z_ref, v_pre, v_ref, i_ref = _np_step(xs, v_prev, i_prev, params, dt)
    # float32 rounds each of the step's few operations by eps / 2 of its operands' size.
    scale = np.abs(v_prev) + np.abs(i_prev) + np.abs(xs) + abs(params.v_leak) + 1.0
    tie = np.abs(v_pre - params.v_th) <= 2 * F32_EPS * scale
    self.assertLessEqual(int(tie.sum()), 2)   # near-ties are rare: at most 2 in 12,800
    np.testing.assert_array_equal(z[~tie], z_ref[~tie])
    self.assertGreater(z.sum(), 500)          # the step fires often and stays silent often
    self.assertGreater((z == 0).sum(), 2000)
    np.testing.assert_array_less(np.abs(i - i_ref), 2 * F32_EPS * scale)
    np.testing.assert_array_less(np.abs(v - v_ref)[~tie], 2 * F32_EPS * scale[~tie])
    np.testing.assert_array_equal(v[z == 1], np.float32(params.v_reset))   # reset exactly
    self.assertEqual(z.dtype, np.float32)
    self.assertTrue(set(np.unique(z)) <= {0.0, 1.0})

  @parameterized.named_parameters(*[(name, *ps) for name, ps in PARAM_SETS.items()])
  def test_free_running_trajectory_matches_float64(self, params, dt):
    """Both run STEPS steps on their own; they agree until a neuron's v' nears v_th."""
    xs, v0, i0 = _currents_and_state(params, dt, seed=2)
    z, v, i = (np.asarray(t) for t in _scan(params, dt)(xs, LIFState(jnp.asarray(v0),
                                                                       jnp.asarray(i0))))
    z_ref, v_pre, v_ref, i_ref = _np_run(xs, v0, i0, params, dt)
    # The float32 error stays bounded (leak and decay contract it): below 1e-6 here, so a spike
    # can only differ where the float64 v' lies within 1e-5 of v_th.
    near = np.abs(v_pre - params.v_th) <= 1e-5
    first_near = np.where(near.any(0), near.argmax(0), STEPS)
    self.assertLessEqual(int((first_near < STEPS).sum()), 2)   # at most 2 of 64 neurons
    before = np.arange(STEPS)[:, None] < first_near[None, :]
    np.testing.assert_array_equal(z[before], z_ref[before])
    np.testing.assert_allclose(v[before], v_ref[before], rtol=1e-6, atol=5e-6)
    np.testing.assert_allclose(i, i_ref, rtol=1e-6, atol=5e-6)   # i never sees a spike
    self.assertGreater(z_ref.sum(), 500)


# ------------------------------------------------------------------------------------------
# 2. Closed forms by hand.

# With tau_syn_inv = 2 and tau_mem_inv = 1, a = 1/8 and b = 1/4: every value below is a short
# binary fraction, so float32 computes it exactly.
DYADIC_DT = 0.125


def _closed_form(x, a, b, t, v_leak=0):
  """(v_t, i_t, i'_t) for constant x from rest without a spike (module docstring), exact."""
  x, a, b, v_leak = (Fraction(q) for q in (x, a, b, v_leak))
  c, r = 1 - b, 1 - a
  i_in = x / b * (1 - c**t)
  u = x / b * (1 - r**t - a * c * (r**t - c**t) / (r - c))
  return v_leak + u, c * i_in, i_in


def _constant_run(params, dt, x, steps):
  """qjax's trajectory (z, v, i) from rest under the constant currents x."""
  xs = jnp.broadcast_to(jnp.asarray(x, jnp.float32), (steps, *np.shape(x)))
  state = snn.initial_state(np.shape(x), params)
  return (np.asarray(t) for t in _scan(params, dt)(xs, state))


class ClosedFormTest(parameterized.TestCase):

  def test_closed_form_agrees_with_the_recursion(self):
    """The formula against the recursion it was derived from, in exact arithmetic."""
    x, a, b, v_leak = Fraction(3), Fraction(1, 10), Fraction(1, 5), Fraction(-1, 3)
    v, i = v_leak, Fraction(0)
    for t in range(1, 30):
      i_in = i + x
      v = v + a * ((v_leak - v) + i_in)
      i = (1 - b) * i_in
      self.assertEqual(_closed_form(x, a, b, t, v_leak), (v, i, i_in))
      self.assertEqual(i_in, x * sum((1 - b)**(k - 1) for k in range(1, t + 1)))

  @parameterized.parameters(0.0, -2.0)
  def test_first_three_steps_exactly(self, v_leak):
    params = LIFParameters(tau_syn_inv=2.0, tau_mem_inv=1.0, v_leak=v_leak, v_th=1e30)
    z, v, i = _constant_run(params, DYADIC_DT, np.full(3, 8.0, np.float32), 3)
    # By hand: i' = 8, 14, 18.5; i = 3/4 i' = 6, 10.5, 13.875;
    # u = v - v_leak = 7/8 u + 1/8 i' = 1, 2.625, 4.609375.
    np.testing.assert_array_equal(i[:, 0], [6.0, 10.5, 13.875])
    np.testing.assert_array_equal(v[:, 0], np.array([1.0, 2.625, 4.609375]) + v_leak)
    np.testing.assert_array_equal(z, 0.0)
    for t in (1, 2, 3):
      v_t, i_t, _ = _closed_form(8, Fraction(1, 8), Fraction(1, 4), t, v_leak)
      self.assertEqual((v[t - 1, 0], i[t - 1, 0]), (float(v_t), float(i_t)))

  def test_first_three_steps_with_the_default_time_constants(self):
    params = LIFParameters(v_th=1e30)   # a = 0.1, b = 0.2
    z, v, i = _constant_run(params, 1e-3, np.ones(2, np.float32), 3)
    # By hand: i' = 1, 1.8, 2.44; i = 0.8, 1.44, 1.952; v = 0.1, 0.27, 0.487.
    np.testing.assert_allclose(i[:, 0], [0.8, 1.44, 1.952], rtol=2e-7)
    np.testing.assert_allclose(v[:, 0], [0.1, 0.27, 0.487], rtol=3e-7)
    np.testing.assert_array_equal(z, 0.0)

  @parameterized.parameters(0.0, -2.0)
  def test_fixed_point_is_a_fixed_point_of_the_step(self, v_leak):
    params = LIFParameters(tau_syn_inv=2.0, tau_mem_inv=1.0, v_leak=v_leak, v_th=1e30)
    x = 8.0   # i'* = x / b = 32, i* = 3/4 i'* = 24, v* = v_leak + 32
    state = LIFState(v=jnp.full(2, v_leak + 32.0), i=jnp.full(2, 24.0))
    z, nxt = snn.lif_step(jnp.full(2, x), state, params, DYADIC_DT)
    np.testing.assert_array_equal(nxt.v, state.v)
    np.testing.assert_array_equal(nxt.i, state.i)
    np.testing.assert_array_equal(z, 0.0)

  def test_constant_input_converges_to_the_fixed_point(self):
    params = LIFParameters(v_leak=0.25, v_th=1e30)   # a = 0.1, b = 0.2
    x = np.array([-1.5, 0.3, 2.0], np.float32)
    _, v, i = _constant_run(params, 1e-3, x, 400)   # 0.9^400 ~ 5e-19: converged
    b = 0.2
    np.testing.assert_allclose(v[-1], 0.25 + x.astype(np.float64) / b, rtol=1e-5)
    np.testing.assert_allclose(i[-1], (1 - b) * x.astype(np.float64) / b, rtol=1e-5)

  def test_first_spike_step(self):
    """Defaults, constant x from rest: v_t = x (5 - 9 * 0.9^t + 4 * 0.8^t) until v_t > 1.

    By hand: x = 20 fires at step 1 (v = 2); x = 5 at step 2 (0.5, 1.35); x = 2 at step 4
    (0.974, 1.467); x = 1 at step 6 (0.99631, 1.265607); x = 0.3 at step 16 (0.98632, 1.03346);
    x = 0.19 never (v* = 5x = 0.95 and v_t < v* for all t).
    """
    first = {20.0: 1, 5.0: 2, 2.0: 4, 1.0: 6, 0.3: 16, 0.19: None}
    for x, t_first in first.items():   # the table against the formula
      below = [t for t in range(1, 200) if x * (5 - 9 * 0.9**t + 4 * 0.8**t) > 1]
      self.assertEqual(below[0] if below else None, t_first)
      v_t, _, _ = _closed_form(Fraction(x), Fraction(1, 10), Fraction(1, 5), 3)
      self.assertAlmostEqual(float(v_t), x * 0.487)
    z, _, _ = _constant_run(LIFParameters(), 1e-3, np.array(list(first), np.float32), 60)
    for n, t_first in enumerate(first.values()):
      fired = np.flatnonzero(z[:, n])
      self.assertEqual(fired[0] + 1 if fired.size else None, t_first)

  def test_reset_after_a_spike(self):
    """x = 1 fires at steps 6 and 9 (v_reset = 0: v_7 = 0.3951424, v_8 = 0.77174208,
    v_9 = 1.127459008); the membrane restarts from v_reset, i carries on untouched."""
    z, v, i = _constant_run(LIFParameters(), 1e-3, np.ones(1, np.float32), 10)
    np.testing.assert_array_equal(z[:, 0], [0, 0, 0, 0, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(v[[5, 8], 0], 0.0)
    np.testing.assert_allclose(v[6:8, 0], [0.3951424, 0.77174208], rtol=1e-6)
    np.testing.assert_allclose(i[:, 0], 4 * (1 - 0.8 ** np.arange(1, 11)), rtol=1e-6)

    params = LIFParameters(v_leak=0.0, v_reset=-0.5)   # a negative reset: same first spike
    z, v, i = _constant_run(params, 1e-3, np.ones(1, np.float32), 7)
    self.assertEqual(np.flatnonzero(z[:, 0]).tolist(), [5])
    self.assertEqual(v[5, 0], -0.5)
    # step 7 from v_6 = -0.5: v' = -0.5 + 0.1 ((0 + 0.5) + i'_7), i'_7 = 5 (1 - 0.8^7)
    np.testing.assert_allclose(v[6, 0], -0.5 + 0.1 * (0.5 + 5 * (1 - 0.8**7)), rtol=1e-6)

  def test_heaviside_at_zero_does_not_spike(self):
    """v' lands exactly on v_th = 1 (a = 1/8, x = 8): no spike, no reset; one ulp more fires."""
    params = LIFParameters(tau_syn_inv=2.0, tau_mem_inv=1.0, v_th=1.0)
    x = np.array([8.0, np.nextafter(np.float32(8.0), np.float32(9.0))], np.float32)
    z, nxt = snn.lif_step(jnp.asarray(x), snn.initial_state((2,), params), params, DYADIC_DT)
    np.testing.assert_array_equal(z, [0.0, 1.0])
    np.testing.assert_array_equal(nxt.v, [1.0, 0.0])
    tiny = float(np.finfo(np.float32).tiny)
    np.testing.assert_array_equal(snn.spike(jnp.array([0.0, -0.0, tiny, -tiny, np.nan])),
                                  [0.0, 0.0, 1.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------------
# 3. Surrogate gradients.


def _superspike_primitive(x, alpha):
  """x / (alpha |x| + 1): d/dx = 1 / (alpha |x| + 1)^2 on both sides of 0 (quotient rule with
  |x| = +x or -x)."""
  return x / (alpha * jnp.abs(x) + 1)


def _triangle_primitive(x, alpha):
  """With y = clip(alpha x, -1, 1): y - y |y| / 2. Inside, d/dx = alpha (1 - alpha |x|)
  (d(y |y|) = 2 |y| dy); outside it is the constant +-1/2, the triangle's half areas."""
  y = jnp.clip(alpha * x, -1, 1)
  return y - y * jnp.abs(y) / 2


PRIMITIVES = {Surrogate.SUPERSPIKE: _superspike_primitive,
              Surrogate.TRIANGLE: _triangle_primitive}


def _np_surrogate(x, surrogate, alpha):
  x = np.asarray(x, np.float64)
  if surrogate is Surrogate.SUPERSPIKE:
    return 1 / (alpha * np.abs(x) + 1) ** 2
  return alpha * np.maximum(0, 1 - alpha * np.abs(x))


def _heaviside_reference(surrogate, alpha):
  """H with the surrogate's gradient via stop_gradient: F(x) - stop_gradient(F(x) - H(x)),
  rearranged to H(x) + (F(x) - stop_gradient(F(x))) so that the forward is H bit for bit."""
  primitive = PRIMITIVES[surrogate]

  def h(x):
    f = primitive(x, jnp.asarray(alpha, x.dtype))
    return (x > 0).astype(x.dtype) + (f - jax.lax.stop_gradient(f))

  return h


def _reference_step(x, state, p, dt, heaviside):
  """lif_step written out again with a given Heaviside (the same operations, in order)."""
  i1 = state.i + x
  v1 = state.v + dt * p.tau_mem_inv * ((p.v_leak - state.v) + i1)
  i_next = i1 - dt * p.tau_syn_inv * i1
  z = heaviside(v1 - p.v_th)
  return z, LIFState(v=(1 - z) * v1 + z * p.v_reset, i=i_next)


_XS = hnp.arrays(np.float32, 16, elements=st.floats(-3.0, 3.0, width=32, allow_subnormal=False),
                 fill=st.nothing())
_ALPHAS = st.floats(0.5, 200.0)
_SURROGATES = st.sampled_from(list(Surrogate))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(x=_XS, alpha=_ALPHAS, surrogate=_SURROGATES)
def test_spike_gradient_is_the_surrogate_formula(x, alpha, surrogate):
  # the tent's edges |x| = 1 / alpha, and 0, are always among the points
  x = np.concatenate([x, np.float32([0.0, 1 / alpha, -1 / alpha, 0.5 / alpha])])
  w = np.linspace(-2.0, 2.0, x.size, dtype=np.float32)   # an upstream cotangent
  grad = jax.grad(lambda x: jnp.sum(snn.spike(x, surrogate, alpha) * w))(jnp.asarray(x))
  expected = w * _np_surrogate(x, surrogate, np.float32(alpha))
  # 1 - alpha |x| cancels near the tent's edge: an absolute error of alpha * eps there.
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=4 * alpha * F32_EPS)
  np.testing.assert_array_equal(
      grad, w * snn.surrogate_gradient(jnp.asarray(x), surrogate, alpha))


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(x=_XS, alpha=_ALPHAS, surrogate=_SURROGATES)
def test_spike_forward_is_exactly_heaviside(x, alpha, surrogate):
  x = np.concatenate([x, np.float32([0.0, -0.0])])
  z = snn.spike(jnp.asarray(x), surrogate, alpha)
  assert z.dtype == jnp.float32
  np.testing.assert_array_equal(z, (x > 0).astype(np.float32))


@pytest.mark.parametrize("surrogate", list(Surrogate))
def test_primitives_differentiate_to_the_surrogates(surrogate):
  """The antiderivatives used by the stop_gradient reference are right."""
  alpha = 7.0
  x = jnp.linspace(-0.5, 0.5, 101, dtype=jnp.float32)
  # elementwise, so the gradient of the sum is the derivative at each point
  grad = jax.grad(lambda x: jnp.sum(PRIMITIVES[surrogate](x, jnp.float32(alpha))))(x)
  np.testing.assert_allclose(grad, _np_surrogate(x, surrogate, alpha), rtol=1e-5, atol=1e-5)
  # F(-inf..inf) spans the surrogate's area: 1 for the triangle, 2 / alpha for SuperSpike
  # (whose F tends to +-1 / alpha).
  if surrogate is Surrogate.TRIANGLE:
    np.testing.assert_array_equal(PRIMITIVES[surrogate](jnp.float32([-1, 1]), alpha), [-0.5, 0.5])


CHAIN_STEPS = 20
CHAIN_PARAMS = {
    "superspike_default": LIFParameters(),
    "superspike_soft": LIFParameters(v_leak=0.1, v_reset=-0.3, alpha=5.0),
    "triangle_default": LIFParameters(surrogate="triangle"),
    "triangle_wide": LIFParameters(v_reset=-0.5, surrogate=Surrogate.TRIANGLE, alpha=3.0),
}


def _chain_loss(step):
  def loss(xs, v0, i0, w, u):
    state, total, spikes = LIFState(v0, i0), 0.0, 0.0
    for t in range(CHAIN_STEPS):   # unrolled
      z, state = step(xs[t], state)
      total, spikes = total + jnp.sum(w[t] * z), spikes + jnp.sum(z)
    return total + jnp.sum(u * state.v) + jnp.sum(state.i) / 10, spikes
  return loss


def _value_and_grads(step, *args):
  """Value and gradient of the unrolled chain of `step`, jitted once per step (not per chain)."""
  return jax.value_and_grad(_chain_loss(jax.jit(step)), argnums=(0, 1, 2), has_aux=True)(*args)


@pytest.mark.parametrize("params", CHAIN_PARAMS.values(), ids=CHAIN_PARAMS.keys())
def test_unrolled_chain_gradient_matches_stop_gradient_reference(params):
  dt = 1e-3
  rng = np.random.default_rng(5)
  xs = jnp.asarray(rng.uniform(-0.2, 1.5, (CHAIN_STEPS, 32)).astype(np.float32))
  v0 = jnp.asarray(rng.uniform(-0.5, 1.0, 32).astype(np.float32))
  i0 = jnp.asarray(rng.uniform(0.0, 3.0, 32).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(CHAIN_STEPS, 32)).astype(np.float32))
  u = jnp.asarray(rng.normal(size=32).astype(np.float32))
  h_ref = _heaviside_reference(params.surrogate, params.alpha)
  args = (xs, v0, i0, w, u)

  def h_hard(y):   # the exact step with no gradient at all
    return jax.lax.stop_gradient((y > 0).astype(y.dtype))

  (value, spikes), grads = _value_and_grads(lambda x, s: snn.lif_step(x, s, params, dt), *args)
  (ref_value, _), ref_grads = _value_and_grads(
      lambda x, s: _reference_step(x, s, params, dt, h_ref), *args)
  _, hard_grads = _value_and_grads(lambda x, s: _reference_step(x, s, params, dt, h_hard), *args)
  assert float(value) == float(ref_value)   # the same forward, bit for bit
  assert 0 < int(spikes) < xs.size          # some spikes, some silence
  for g, r in zip(grads, ref_grads, strict=True):
    assert bool(jnp.all(jnp.isfinite(g)))
    assert bool(jnp.allclose(g, r, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(r))))), (
        float(jnp.max(jnp.abs(g - r))))
  # the surrogate path carries gradient: without it the gradients differ
  assert not bool(jnp.allclose(grads[0], hard_grads[0], rtol=1e-3, atol=1e-3))


# ------------------------------------------------------------------------------------------
# 4. jit, dtypes, tracing.

X32 = jnp.asarray(RNG.uniform(-5.0, 10.0, 24).astype(np.float32))
STATE32 = LIFState(v=jnp.asarray(RNG.uniform(-0.5, 1.0, 24).astype(np.float32)),
                   i=jnp.asarray(RNG.uniform(-5.0, 5.0, 24).astype(np.float32)))


class JitAndDtypeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(name, *ps) for name, ps in PARAM_SETS.items()])
  def test_jit_and_eager_agree(self, params, dt):
    step = self.variant(snn.lif_step, static_argnames=("params", "dt"))
    z, state = step(X32, STATE32, params=params, dt=dt)
    z_eager, state_eager = snn.lif_step(X32, STATE32, params, dt)
    np.testing.assert_array_equal(z, z_eager)
    np.testing.assert_allclose(state.v, state_eager.v, rtol=2 * F32_EPS, atol=2 * F32_EPS)
    np.testing.assert_allclose(state.i, state_eager.i, rtol=2 * F32_EPS, atol=2 * F32_EPS)
    self.assertTrue(0 < int(z.sum()) < z.size)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(jnp.float32, jnp.bfloat16, jnp.float16)
  def test_dtype_follows_the_input(self, dtype):
    params = PARAM_SETS["leak_negative_reset"][0]
    step = self.variant(snn.lif_step, static_argnames=("params", "dt"))
    x = X32.astype(dtype)
    state = LIFState(STATE32.v.astype(dtype), STATE32.i.astype(dtype))
    z, nxt = step(x, state, params=params)
    for out in (z, nxt.v, nxt.i):
      self.assertEqual(out.dtype, dtype)
    # the values are the exact step's from the same (rounded) inputs, up to the type's rounding
    as64 = functools.partial(np.asarray, dtype=np.float64)
    z_ref, v_pre, v_ref, i_ref = _np_step(as64(x), as64(state.v), as64(state.i), params, 1e-3)
    eps = float(jnp.finfo(dtype).eps)
    scale = 4 * eps * (np.abs(as64(state.v)) + np.abs(as64(state.i)) + np.abs(as64(x)) + 1.0)
    clear = np.abs(v_pre - params.v_th) > scale
    self.assertGreaterEqual(clear.sum(), 12)
    np.testing.assert_array_equal(as64(z)[clear], z_ref[clear])
    np.testing.assert_array_less(np.abs(as64(nxt.v) - v_ref)[clear], scale[clear])
    np.testing.assert_array_less(np.abs(as64(nxt.i) - i_ref), scale)
    self.assertEqual(snn.initial_state((3,), params, dtype).v.dtype, dtype)

  def test_no_retrace_for_new_values_or_equal_params(self):
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(snn.lif_step, n=1), static_argnames=("params", "dt"))
    params = LIFParameters(surrogate="triangle", alpha=20)
    for k in range(3):
      state = LIFState(STATE32.v + k, STATE32.i * k)
      step(X32 + k, state, params=params, dt=1e-3)
    # an equal LIFParameters built anew (enum instead of name, float instead of int) is the
    # same static argument
    step(X32, STATE32, params=LIFParameters(surrogate=Surrogate.TRIANGLE, alpha=20.0), dt=1e-3)
    with pytest.raises(AssertionError):   # new parameters are a new trace
      step(X32, STATE32, params=LIFParameters(alpha=21.0), dt=1e-3)


# ------------------------------------------------------------------------------------------
# 5. Refused input.

STATE2 = snn.initial_state((2,))
X2 = jnp.ones(2)


@pytest.mark.parametrize("dt", [0, 0.0, -1e-3, math.nan, -math.inf, math.inf])
def test_nonpositive_or_infinite_dt_is_refused(dt):
  with pytest.raises(ValueError, match=r"dt must be finite and > 0"):
    snn.lif_step(X2, STATE2, LIFParameters(), dt)


def test_input_current_must_be_float_and_fit_the_state():
  with pytest.raises(TypeError, match="lif_step: x .* must be a floating-point array; got int32"):
    snn.lif_step(jnp.ones(2, jnp.int32), STATE2)
  with pytest.raises(ValueError, match=r"x of shape \(3,\) must broadcast to the state's shape "
                                       r"\(2,\)"):
    snn.lif_step(jnp.ones(3), STATE2)
  z, _ = snn.lif_step(jnp.float32(2.0), STATE2)  # a scalar current drives every neuron
  assert z.shape == (2,)


@pytest.mark.parametrize("dt", ["0.001", None, True, jnp.float32(1e-3), np.float32(1e-3), [1e-3]],
                         ids=["str", "None", "bool", "jax_array", "np_float32", "list"])
def test_non_number_dt_is_refused(dt):
  with pytest.raises(TypeError, match=r"dt must be a Python number"):
    snn.lif_step(X2, STATE2, LIFParameters(), dt)


@pytest.mark.parametrize("params", [None, {"v_th": 1.0}, (200.0, 100.0), snn.Surrogate.TRIANGLE],
                         ids=["None", "dict", "tuple", "enum"])
def test_params_must_be_lif_parameters(params):
  with pytest.raises(TypeError, match=r"params must be LIFParameters"):
    snn.lif_step(X2, STATE2, params)


@pytest.mark.parametrize("name", ["tau_syn_inv", "tau_mem_inv", "alpha"])
@pytest.mark.parametrize("value", [0, 0.0, -1.0, -1e-9])
def test_nonpositive_rate_or_alpha_is_refused(name, value):
  with pytest.raises(ValueError, match=rf"LIFParameters\.{name} must be > 0"):
    LIFParameters(**{name: value})


@pytest.mark.parametrize("name", ["tau_syn_inv", "tau_mem_inv", "v_leak", "v_th", "v_reset",
                                  "alpha"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, False, "1.0", None,
                                   jnp.float32(1.0), jnp.array([1.0]), np.float32(1.0)],
                         ids=["nan", "inf", "-inf", "True", "False", "str", "None", "jax_scalar",
                              "jax_array", "np_float32"])
def test_bad_field_is_refused(name, value):
  with pytest.raises(TypeError, match=rf"LIFParameters\.{name} must be a finite Python number"):
    LIFParameters(**{name: value})


@pytest.mark.parametrize("surrogate", ["sigmoid", "SUPERSPIKE", "", None, 1])
def test_unknown_surrogate_lists_the_accepted_names(surrogate):
  expected = r"surrogate must be one of \['superspike', 'triangle'\]"
  with pytest.raises(ValueError, match=expected):
    LIFParameters(surrogate=surrogate)
  with pytest.raises(ValueError, match=expected):
    snn.as_surrogate(surrogate)
  with pytest.raises(ValueError, match=expected):   # spike resolves names in its backward pass
    jax.grad(lambda x: snn.spike(x, surrogate, 1.0).sum())(X2)


@pytest.mark.parametrize("alpha", [-1.0, 0, float("nan"), float("inf"), True, "100"])
def test_spike_refuses_a_bad_alpha(alpha):
  with pytest.raises(ValueError, match="spike: alpha .* must be a finite Python number > 0"):
    snn.spike(X2, "superspike", alpha)
  with pytest.raises(ValueError, match="spike: alpha"):  # also when only differentiated
    jax.grad(lambda x: snn.spike(x, "superspike", alpha).sum())(X2)


def test_accepted_values_are_normalized():
  p = LIFParameters(tau_syn_inv=200, surrogate="triangle", alpha=np.float64(3))
  assert p.surrogate is Surrogate.TRIANGLE
  assert type(p.tau_syn_inv) is float and type(p.alpha) is float
  assert p == LIFParameters(surrogate=Surrogate.TRIANGLE, alpha=3.0)
  assert hash(p) == hash(LIFParameters(surrogate=Surrogate.TRIANGLE, alpha=3.0))
  with pytest.raises(AttributeError):   # frozen: static under jit
    p.v_th = 2.0  # type: ignore[misc]
