"""The integer LIF neuron (`qjax.integer.forms.lif.IntegerLIF`) against an int64 NumPy
transcription of its documented equations, bit for bit over long runs (saturating inputs
included); its integer constants; how closely it tracks the float neuron; and `qnn.LIF` end
to end: calibrate, convert, int8 against the QAT forward, io round trips, QAT gradients and the
errors of each stage."""

import functools
import math
from fractions import Fraction
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

import qjax
import qjax.nn as qnn
from qjax import io as qio
from qjax import observers as obs
from qjax import snn, ste
from qjax.integer import forms
from qjax.integer.forms.lif import IntegerLIF, state_spec
from qjax.numerics import QParams, QuantSpec

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
STEPS = 300

# ------------------------------------------------------------------------------------------
# The int64 NumPy reference, from the equations of `qjax.integer.forms.lif`'s docstring.


def _r(y: np.ndarray, m0: int, shift: int) -> np.ndarray:
  """R(y, M) = floor((y M0 + 2^(r-1)) / 2^r), saturated to int32 (|y M0| < 2^62: int64)."""
  y = np.asarray(y, np.int64)
  return np.clip((y * np.int64(m0) + (np.int64(1) << np.int64(shift - 1))) >> np.int64(shift),
                 INT32_MIN, INT32_MAX)


def _round_shift(y: np.ndarray, bits: int) -> np.ndarray:
  """rne(y / 2^L), ties to even (y for L = 0)."""
  if bits == 0:
    return y
  y = np.asarray(y, np.int64)
  q, r = np.divmod(y, np.int64(1) << np.int64(bits))
  half = np.int64(1) << np.int64(bits - 1)
  return q + ((r > half) | ((r == half) & (q % 2 == 1)))


def _reference_step(op: IntegerLIF, x: np.ndarray, v: np.ndarray, i: np.ndarray
                    ) -> tuple[np.ndarray, ...]:
  """One step in int64: (q_i', q_v', q_i_next, z, q_v_next)."""
  m0 = [int(m) for m in np.asarray(op.m0)]
  shift = [int(r) for r in np.asarray(op.shift)]
  zx, lv, rv, th = (int(np.asarray(c)) for c in (op.x_zero, op.v_leak, op.v_reset,
                                                  op.threshold))
  up = np.int64(2**op.frac)
  fx = min(op.frac, 22)
  jump = np.clip(_r((np.asarray(x, np.int64) - zx) * 2**fx, m0[0], shift[0]), -(2**30), 2**30)
  i1 = np.clip(_round_shift(i * 2**fx + jump, fx), *op.i_bounds)
  d = _r((lv - v) * up, m0[1], shift[1]) + _r(i1 * up, m0[2], shift[2])
  v1 = np.clip(_round_shift(v * up + d, op.frac), *op.v_bounds)
  i_next = np.clip(_round_shift(_r(i1 * up, m0[3], shift[3]), op.frac), *op.i_bounds)
  z = v1 > th
  return i1, v1, i_next, z, np.where(z, rv, v1)


def _reference_trace(op: IntegerLIF, xs: np.ndarray, state=None
                     ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], np.ndarray]:
  """(spikes, final (q_v, q_i), q_v after every step) of the integer LIF in int64 NumPy."""
  if state is None:
    v = np.full(xs.shape[1:], int(np.asarray(op.v_leak)), np.int64)
    i = np.zeros(xs.shape[1:], np.int64)
  else:
    v, i = (np.asarray(s, np.int64) for s in state)
  spikes, trace = [], []
  for x in xs:
    _, _, i, z, v = _reference_step(op, x, v, i)
    spikes.append(z)
    trace.append(v)
  return np.array(spikes, np.int8), (v, i), np.array(trace, np.int64)


def _assert_trace_equal(got, want, what: str) -> None:
  (z, (v, i), vt), (rz, (rv, ri), rvt) = got, want
  assert z.dtype == jnp.int8 and vt.dtype == v.dtype == i.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(z), rz, err_msg=f"spikes, {what}")
  np.testing.assert_array_equal(np.asarray(vt), rvt, err_msg=f"v trace, {what}")
  np.testing.assert_array_equal(np.asarray(v), rv, err_msg=f"final v, {what}")
  np.testing.assert_array_equal(np.asarray(i), ri, err_msg=f"final i, {what}")


# ------------------------------------------------------------------------------------------
# Random neurons and input streams.

# Per state width, the level c = ceil(log2(max(1, a, a S_i / S_v))) of the neurons drawn, so
# that they share the membrane update's fractional bits L = 28 - bits - c (a static field: one
# compilation per width); 12 bits at c = 16 runs L = 0 (no fractional bits at all).
LEVELS = {2: 0, 4: 2, 8: 0, 12: 16, 16: 5}
RATIOS = (0.02, 0.3, 1.0, 4.0, 0.1, 2.0)


def _random_neuron(rng: np.random.Generator, bits: int, ratio: float, level: int
                   ) -> IntegerLIF:
  """An op with random time constants, threshold, leak and reset (nonzero) and input zero
  point. The current's grid spans `ratio` times one input's range (below 1: i saturates), the
  membrane's grid 0.3 to 3 times the threshold (below 1: v saturates and never spikes); a S_i /
  S_v lies in (2^(level-1), 2^level) (below 1 for level 0, with a < 1)."""
  qmax = 2 ** (bits - 1) - 1
  dt = float(rng.choice([1e-3, 5e-4, 2e-3]))
  a = float(rng.uniform(0.02, 0.95))
  b = float(rng.uniform(0.02, 0.95))
  # level 0: S_v on either side of S_i (a S_i / S_v above a: the current drives v past its
  # bounds)
  m_b = float(rng.uniform(0.2 * a, min(0.99, 4 * a)) if level == 0 else
              2 ** (level - rng.uniform(0.01, 0.99)))
  x_scale = float(10 ** rng.uniform(-2.5, 0.0))
  i_scale = ratio * 255 * x_scale / qmax
  v_scale = a * i_scale / m_b
  v_th = qmax * v_scale / float(10 ** rng.uniform(-0.5, 0.5))
  op = IntegerLIF.build(
      x_scale=x_scale, x_zero=int(rng.integers(-128, 128)), v_scale=v_scale, i_scale=i_scale,
      bits=bits, tau_syn_inv=b / dt, tau_mem_inv=a / dt,
      v_leak=float(rng.uniform(-0.4, 0.4)) * v_th, v_th=v_th,
      v_reset=float(rng.uniform(-0.5, 0.4)) * v_th, dt=dt)
  assert op.frac == 28 - bits - level
  return op


def _currents(rng: np.random.Generator, steps: int = STEPS) -> np.ndarray:
  """int8 currents (steps, 3, 8). Row 0: uniform noise; row 1: blocks of 60 steps all -128,
  all 127, noise, ...; row 2: half the neurons at 127 and half at -128 for the first half,
  then noise biased upwards (saturating i and v at both ends, then leaving saturation)."""
  xs = rng.integers(-128, 128, (steps, 3, 8))
  blocks = np.resize([-128, 127, 0], -(-steps // 60))
  block = np.repeat(blocks, 60)[:steps]
  xs[:, 1] = np.where((block == 0)[:, None], xs[:, 1], block[:, None])
  xs[:, 2, :4] = 127
  xs[:, 2, 4:] = -128
  xs[steps // 2:, 2] = rng.integers(-20, 128, (steps - steps // 2, 8))
  return xs.astype(np.int8)


def _stack(trees: list[Any]) -> Any:
  """The trees' leaves stacked in NumPy (eager jnp.stack compiles a program per shape)."""
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(leaf) for leaf in leaves]), *trees)


def _row(tree: Any, k: int) -> Any:
  return jax.tree.map(lambda leaf: np.asarray(leaf)[k], tree)


def _i_trace(op: IntegerLIF, xs: np.ndarray, i: np.ndarray) -> np.ndarray:
  """q_i' (after the input jumps in) of every step, by the reference's recursion."""
  m0, shift = np.asarray(op.m0), np.asarray(op.shift)
  out = []
  for x in np.asarray(xs, np.int64):
    i1 = np.clip(i + _r(x - int(op.x_zero), int(m0[0]), int(shift[0])), *op.i_bounds)
    out.append(i1)
    i = np.clip(_r(i1, int(m0[3]), int(shift[3])), *op.i_bounds)
  return np.array(out)


def _split(cases, default):
  """pytest params of `cases`: those in `default` run by default, the rest of the full grid
  with -m slow."""
  return [case if case in default else pytest.param(*case, marks=pytest.mark.slow)
          for case in cases]


# Default run: every width jitted, 12 bits (no fractional bits in the membrane update) op by
# op too; the other eager cases (the scan compiles its body either way) with -m slow.
@pytest.mark.parametrize("bits, variant", _split(
    [(bits, variant) for bits in LEVELS for variant in ("jit", "eager")],
    [(bits, "jit") for bits in LEVELS] + [(12, "eager")]))
def test_trace_equals_the_int64_reference(bits, variant):
  """Six neurons per width (one vmapped call, so one compilation), from rest and from random
  states, 300 steps of random and saturating currents."""
  rng = np.random.default_rng(bits)
  ops = [_random_neuron(rng, bits, ratio, LEVELS[bits]) for ratio in RATIOS]
  xs = np.stack([_currents(rng) for _ in ops])
  lo, hi = ops[0].v_bounds
  states = [op.initial_state(xs.shape[2:]) if k % 2 == 0 else
            (rng.integers(lo, hi + 1, xs.shape[2:]).astype(np.int32),
             rng.integers(lo, hi + 1, xs.shape[2:]).astype(np.int32))
            for k, op in enumerate(ops)]
  run = jax.vmap(lambda o, x, s: o.trace(x, s))
  run = jax.jit(run) if variant == "jit" else run
  got = run(_stack(ops), jax.device_put(xs), _stack(states))
  hits = dict.fromkeys(("i at qmin", "i at qmax", "v at qmin", "v at qmax", "spikes"), 0)
  for k, op in enumerate(ops):
    want = _reference_trace(op, xs[k], states[k])
    _assert_trace_equal(_row(got, k), want, f"{bits} bits, neuron {k}")
    i_trace = _i_trace(op, xs[k], np.asarray(states[k][1], np.int64))
    hits["i at qmin"] += int(np.sum(i_trace == lo))
    hits["i at qmax"] += int(np.sum(i_trace == hi))
    hits["v at qmin"] += int(np.sum(want[2] == lo))
    hits["v at qmax"] += int(np.sum(want[2] == hi))
    hits["spikes"] += int(want[0].sum())
  assert all(hits.values()), hits  # the runs did saturate both ends, and spike


class ReferenceTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_call_is_the_trace_without_the_membrane(self):
    rng = np.random.default_rng(20)
    op = _random_neuron(rng, 8, 0.5, 0)
    xs = _currents(rng, 20)
    z, (v, i), _ = _reference_trace(op, xs)
    got_z, (got_v, got_i) = self.variant(lambda o, x: o(x))(op, jax.device_put(xs))
    assert got_z.dtype == jnp.int8
    np.testing.assert_array_equal(got_z, z)
    np.testing.assert_array_equal(got_v, v)
    np.testing.assert_array_equal(got_i, i)


def test_step_by_step_equals_the_reference():
  rng = np.random.default_rng(21)
  op = _random_neuron(rng, 6, 0.2, 0)
  xs = _currents(rng, 20)
  z, (_, i), vt = _reference_trace(op, xs)
  step = jax.jit(lambda o, x, s: o.step(x, s))
  state = op.initial_state(xs.shape[1:])
  for t in range(xs.shape[0]):
    zt, state = step(op, jax.device_put(xs[t]), state)
    assert zt.dtype == jnp.int8 and state[0].dtype == state[1].dtype == jnp.int32
    np.testing.assert_array_equal(zt, z[t], err_msg=f"step {t}")
    np.testing.assert_array_equal(state[0], vt[t], err_msg=f"step {t}")
  np.testing.assert_array_equal(state[1], i)


def test_a_saturated_input_term_does_not_wrap_the_current():
  op = IntegerLIF.build(x_scale=1.0, x_zero=127, v_scale=0.01, i_scale=1e-7, bits=16)
  xs = np.full((3, 2), -128, np.int8)  # q_x - Z_x = -255: R saturates at -2^31
  state = (np.zeros(2, np.int32), np.full(2, -5, np.int32))
  rz, (rv, ri), rvt = _reference_trace(op, xs, state)
  assert np.all(ri < 0)  # the current stays at the bottom of its grid, decayed once
  _assert_trace_equal(op.trace(jax.device_put(xs), state), (rz, (rv, ri), rvt), "trace")


# ------------------------------------------------------------------------------------------
# The integer constants.


def _f32(value: float) -> Fraction:
  return Fraction(float(np.float32(value)))


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 16), x_scale=st.floats(1e-3, 10.0), ratio=st.floats(1e-3, 1e3),
       v_scale=st.floats(1e-5, 1.0), v_th=st.floats(-3.0, 3.0),
       v_leak=st.floats(-3.0, 3.0), v_reset=st.floats(-3.0, 3.0),
       tau_mem_inv=st.floats(1.0, 1000.0), tau_syn_inv=st.floats(1.0, 999.0),
       x_zero=st.integers(-128, 127))
def test_constants_approximate_the_real_multipliers(bits, x_scale, ratio, v_scale, v_th, v_leak,
                                                    v_reset, tau_mem_inv, tau_syn_inv, x_zero):
  i_scale = x_scale / ratio
  s_x, s_i, s_v = _f32(x_scale), _f32(i_scale), _f32(v_scale)
  dt = 1e-3
  a, b = Fraction(dt * tau_mem_inv), Fraction(dt * tau_syn_inv)
  real = [s_x / s_i, a, a * s_i / s_v, 1 - b]
  level = math.ceil(math.log2(max(1.0, *(float(m) for m in real[1:3]))))
  kwargs = {"x_scale": x_scale, "x_zero": x_zero, "v_scale": v_scale, "i_scale": i_scale,
            "bits": bits, "tau_syn_inv": tau_syn_inv, "tau_mem_inv": tau_mem_inv,
            "v_leak": v_leak, "v_th": v_th, "v_reset": v_reset, "dt": dt}
  if 28 - bits - level < 0:  # a S_i / S_v too large for the membrane update in int32
    with pytest.raises(ValueError, match="too large"):
      IntegerLIF.build(**kwargs)
    return
  op = IntegerLIF.build(**kwargs)
  for k, (m0, shift) in enumerate(zip(np.asarray(op.m0), np.asarray(op.shift), strict=True)):
    assert 2**30 <= int(m0) < 2**31
    approx = Fraction(int(m0), 2 ** int(shift))
    assert abs(approx / real[k] - 1) <= Fraction(1, 2**30), (k, float(approx), float(real[k]))
  assert op.frac == 28 - bits - level
  spec = state_spec(bits)
  assert op.v_bounds == op.i_bounds == (spec.qmin, spec.qmax) == (-(2 ** (bits - 1)),
                                                                    2 ** (bits - 1) - 1)
  threshold = math.floor(Fraction(v_th) / s_v)
  assert int(op.threshold) == min(max(threshold, spec.qmin - 1), spec.qmax)
  # q > T is exactly S_v q > v_th on the whole grid (the threshold clipped or not)
  for q in {spec.qmin, spec.qmax, *range(max(spec.qmin, threshold - 1),
                                         min(spec.qmax, threshold + 1) + 1)}:
    assert (q > int(op.threshold)) == (s_v * q > Fraction(v_th)), q
  for got, value in ((op.v_leak, v_leak), (op.v_reset, v_reset)):
    assert int(got) == int(np.clip(np.rint(value / float(s_v)), spec.qmin, spec.qmax))
  assert int(op.x_zero) == x_zero
  assert op.v_scale.dtype == op.i_scale.dtype == jnp.float32
  assert op.m0.dtype == op.shift.dtype == op.threshold.dtype == jnp.int32


@pytest.mark.parametrize("dt, tau_mem_inv, tau_syn_inv", [
    (0.0, 100.0, 200.0), (-1e-3, 100.0, 200.0), (1e-3, 0.0, 200.0), (1e-3, -5.0, 200.0),
    (1e-3, 100.0, 0.0), (1e-3, 100.0, 1000.0), (1e-3, 100.0, 2000.0), (math.nan, 100.0, 200.0),
    (1e-3, math.nan, 200.0), (1e-3, 100.0, math.nan)])
def test_build_refuses_a_growing_or_frozen_neuron(dt, tau_mem_inv, tau_syn_inv):
  with pytest.raises(ValueError, match=r"dt \* tau_mem_inv.*dt \* tau_syn_inv"):
    IntegerLIF.build(x_scale=0.1, x_zero=0, v_scale=0.01, i_scale=0.1, bits=8, dt=dt,
                     tau_mem_inv=tau_mem_inv, tau_syn_inv=tau_syn_inv)


@pytest.mark.parametrize("bits", [1, 17, 0, 32, True, 8.0, "8"])
def test_build_refuses_a_state_width_outside_2_to_16(bits):
  with pytest.raises(ValueError, match=r"2\.\.16 bits"):
    IntegerLIF.build(x_scale=0.1, x_zero=0, v_scale=0.01, i_scale=0.1, bits=bits)
  with pytest.raises(ValueError, match=r"2\.\.16 bits"):
    state_spec(bits)


# ------------------------------------------------------------------------------------------
# The integer neuron against the float one.


@functools.cache
def _float_run(params: snn.LIFParameters, dt: float):
  """The float neuron (`snn.lif_step`) under jit: x (T, ...) -> spikes, v and i' per step."""

  def body(state, x):
    i1 = state.i + x
    z, state = snn.lif_step(x, state, params, dt)
    return state, (z, state.v, i1)

  return jax.jit(lambda xs: jax.lax.scan(body, snn.initial_state(xs.shape[1:], params),
                                         xs)[1])


def test_sixteen_bit_state_tracks_the_float_neuron():
  rng = np.random.default_rng(7)
  params, dt = snn.LIFParameters(v_leak=-0.1, v_reset=-0.2), 1e-3
  x_scale, x_zero = 0.013, -37
  # per neuron a different mean drive: from silent to spiking every few steps
  mean = np.linspace(-120, 120, 16)
  q = np.clip(np.rint(rng.normal(mean, 50.0, (STEPS, 4, 16))), -128, 127).astype(np.int8)
  x = (q.astype(np.int32) - x_zero).astype(np.float32) * np.float32(x_scale)
  z_f, v_f, i_f = (np.asarray(a) for a in _float_run(params, dt)(jax.device_put(x)))
  qmax = 2**15 - 1
  v_scale = 2 * max(np.abs(v_f).max(), params.v_th) / qmax
  i_scale = 1.01 * np.abs(i_f).max() / qmax
  op = IntegerLIF.build(x_scale=x_scale, x_zero=x_zero, v_scale=float(v_scale),
                        i_scale=float(i_scale), bits=16, tau_syn_inv=params.tau_syn_inv,
                        tau_mem_inv=params.tau_mem_inv, v_leak=params.v_leak,
                        v_th=params.v_th, v_reset=params.v_reset, dt=dt)
  z, _, v = op.trace(jax.device_put(q))
  z, v = np.asarray(z), np.asarray(v, np.float64) * float(op.v_scale)
  agree = np.mean(z == z_f)
  assert agree >= 0.99, agree
  assert 0.05 < z_f.mean() < 0.5  # both silent and busy neurons
  # the membranes agree to a few grid steps until the first differing spike of a neuron
  differs = np.cumsum(z != z_f, axis=0) > 0
  gap = np.abs(v - v_f)[~differs] / float(op.v_scale)
  assert gap.max() <= 4, gap.max()


# ------------------------------------------------------------------------------------------
# One step of the integer neuron against one step of mode "qat" from the same grid state.


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _qat_step_on_grid(params: snn.LIFParameters, dt: float, spec: QuantSpec, x_scale, x_zero,
                      v_scale, i_scale, q_x, q_v, q_i):
  """`_qat_step` under jit (one compilation per spec; the grids are arguments), in grid units
  before the final rounding."""
  x_scale, v_scale, i_scale = (jnp.float32(s) for s in (x_scale, v_scale, i_scale))
  on_v = QParams(v_scale, jnp.int32(0))
  on_i = QParams(i_scale, jnp.int32(0))
  a, b = dt * params.tau_mem_inv, dt * params.tau_syn_inv
  x = (jnp.asarray(q_x, jnp.int32) - x_zero).astype(jnp.float32) * x_scale
  v = jnp.asarray(q_v, jnp.float32) * v_scale
  i1_raw = jnp.asarray(q_i, jnp.float32) * i_scale + x
  i1 = ste.fake_quant(i1_raw, spec, on_i)
  leak = ste.fake_quant(jnp.float32(params.v_leak), spec, on_v)
  v1_raw = v + a * ((leak - v) + i1)
  v1 = ste.fake_quant(v1_raw, spec, on_v)
  i_next = ste.fake_quant(i1 - b * i1, spec, on_i)
  z = v1 - params.v_th > 0
  return i1_raw / i_scale, v1_raw / v_scale, i1 / i_scale, v1 / v_scale, i_next / i_scale, z


def _qat_step(params: snn.LIFParameters, dt: float, spec: QuantSpec, x_scale: float,
              x_zero: int, v_scale: float, i_scale: float, q_x, q_v, q_i):
  """The step of `qnn.LIF` in mode "qat" (its module docstring: i', v' and i_next
  fake-quantized, leak and reset on the v grid) in float32 from the grid state (q_v, q_i):
  (i' and v' before rounding, q_i', q_v', q_i_next, z), in grid units."""
  i1_raw, v1_raw, *on_grid, z = _qat_step_on_grid(params, dt, spec, x_scale, x_zero, v_scale,
                                                  i_scale, q_x, q_v, q_i)
  return (np.asarray(i1_raw), np.asarray(v1_raw),
          *(np.rint(np.asarray(t)).astype(np.int64) for t in on_grid), np.asarray(z))


def _tie_distance(y: np.ndarray) -> np.ndarray:
  return np.abs(y - np.floor(y) - 0.5)


# Default run: the grids of threshold_state(4) and (8); the others with -m slow.
@pytest.mark.parametrize("bits, x_scale, x_zero, v_scale, i_scale", [
    (4, 0.0377, -100, 1.2 / 7, 0.3),          # threshold_state(4)'s membrane grid
    pytest.param(4, 0.0061, 13, 0.41, 0.13, marks=pytest.mark.slow),
    (8, 0.0513, -120, 1.2 / 127, 0.0217),     # threshold_state(8)'s
    pytest.param(8, 0.0213, 40, 0.0313, 0.0089, marks=pytest.mark.slow),
])
def test_one_step_differs_from_the_qat_step_only_at_rounding_ties(bits, x_scale, x_zero,
                                                                   v_scale, i_scale):
  """From every grid state (or 2^16 of them), the integer step rounds where the float32 QAT
  step does (both round half to even), except where the QAT step's value lies within float32
  rounding of a tie (x.5 grid units; M0 / 2^r is also off by 2^-31): at most 1 in 10^4."""
  params, dt = snn.LIFParameters(), 1e-3
  spec = state_spec(bits)
  op = IntegerLIF.build(x_scale=x_scale, x_zero=x_zero, v_scale=v_scale, i_scale=i_scale,
                        bits=bits)
  levels = np.arange(spec.qmin, spec.qmax + 1)
  if bits <= 4:
    q_v, q_i, q_x = (g.ravel() for g in np.meshgrid(levels, levels, np.arange(-128, 128)))
  else:
    rng = np.random.default_rng(bits)
    q_v, q_i = rng.choice(levels, (2, 2**16))  # the 4-bit grid's count: one shape
    q_x = rng.integers(-128, 128, 2**16)
  i1, v1, i_next, z, _ = _reference_step(op, q_x, q_v.astype(np.int64), q_i.astype(np.int64))
  i1_raw, v1_raw, f_i1, f_v1, f_i_next, f_z = _qat_step(params, dt, spec, x_scale, x_zero,
                                                        v_scale, i_scale, q_x, q_v, q_i)
  # float32 rounding of a few operations, in grid units
  tie_i, tie_v = ((1 + np.abs(raw)) * 2.0**-20 for raw in (i1_raw, v1_raw))
  assert np.all(_tie_distance(i1_raw[f_i1 != i1]) <= tie_i[f_i1 != i1])
  same = f_i1 == i1
  assert np.all(_tie_distance(v1_raw[same & (f_v1 != v1)]) <= tie_v[same & (f_v1 != v1)])
  decayed = np.asarray(i1, np.float64) * (1 - dt * params.tau_syn_inv)
  assert np.all(_tie_distance(decayed[same & (f_i_next != i_next)]) <= 1e-4)
  np.testing.assert_array_equal(f_z[f_v1 == v1], z[f_v1 == v1])
  for ours, theirs in ((i1, f_i1), (v1, f_v1), (i_next, f_i_next)):
    assert np.mean(ours != theirs) <= 1e-4


# ------------------------------------------------------------------------------------------
# qnn.LIF end to end: Quantize -> QuantDense -> LIF -> QuantDense -> LIF -> Dequantize, one
# branch per state grid after a shared first layer (one init, calibration, conversion and
# compilation for all of them).

QAT_QCONFIG = qnn.get_default_qat_qconfig("x86")
STATE_CONFIGS = {"observed16": qnn.observed_state(16), "observed8": qnn.observed_state(8),
                 "threshold8": qnn.threshold_state(8), "threshold4": qnn.threshold_state(4)}
TIME, BATCH, FEATURES, HIDDEN, OUT = 40, 8, 32, 24, 10
# The int8 spikes equal the QAT forward's (frozen observers) on at least this fraction of
# (step, batch, neuron) entries, in each layer. Both paths round every state quantity half to
# even, so a LIF step agrees exactly but where float32 rounding moves a value across a half
# step; on this data the hidden layers agree on all entries and the output layers on 1.0,
# 0.99875, 1.0 and 1.0 (the output layer also inherits the rare one-step differences of the
# int8 Dense before it: exact int32 sums against the float32 fake-quant forward).
AGREEMENT = {"observed16": 0.999, "observed8": 0.995, "threshold8": 0.995, "threshold4": 0.99}


class SpikingNet(nn.Module):
  """x (T, B, F) 0/1 -> per state config: (hidden spikes, output spikes, output membrane)."""

  @nn.compact
  def __call__(self, x, *, mode):
    q = qnn.Quantize(QAT_QCONFIG, name="quant")(x, mode=mode)
    h = qnn.QuantDense(HIDDEN, qconfig=QAT_QCONFIG, name="fc1")(q, mode=mode)
    outs = {}
    for name, state in STATE_CONFIGS.items():
      z1 = qnn.LIF(state=state, name=f"{name}_lif1")(h, mode=mode)
      y = qnn.QuantDense(OUT, qconfig=QAT_QCONFIG, name=f"{name}_fc2")(z1, mode=mode)
      z2, v = qnn.LIF(state=state, record_v=True, name=f"{name}_lif2")(y, mode=mode)
      outs[name] = (qnn.Dequantize(name=f"{name}_out1")(z1, mode=mode),
                    qnn.Dequantize(name=f"{name}_out2")(z2, mode=mode), v)
    return outs


def _spike_input(seed: int) -> jax.Array:
  """Bernoulli(0.3) 0 / 1 spikes (T, B, F)."""
  rng = np.random.default_rng(seed)
  return jax.device_put((rng.random((TIME, BATCH, FEATURES)) < 0.3).astype(np.float32))


@functools.partial(jax.jit, static_argnums=0)
def _init(model: nn.Module, x: jax.Array) -> Any:
  """Init variables, kernels scaled x4 so that neurons spike: one compilation (op by op, init
  compiles a program per primitive and shape)."""
  # XLA's own random bits: threefry's initialisers take XLA:CPU several times longer to compile
  variables = model.init(jax.random.key(0, impl="unsafe_rbg"), x, mode="float")
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: 4.0 * p if path[-1].key == "kernel" else p, variables["params"])
  return {"params": params, "quant_stats": variables["quant_stats"]}


@functools.cache
def _network() -> tuple[SpikingNet, jax.Array, Any, Any, Any]:
  """(model, x, init variables with kernels scaled x4 so that neurons spike, calibrated on two
  batches, converted)."""
  model, x = SpikingNet(), _spike_input(1)
  variables = _init(model, x)
  calibrated = qnn.calibrate(model, variables, [x, _spike_input(2)])
  return model, x, variables, calibrated, qjax.convert(model, calibrated, x)


def _is_lif(module: nn.Module, _: str) -> bool:
  return isinstance(module, qnn.LIF)


@functools.cache
def _int8_apply():
  """The jitted int8 forward, returning the LIF modules' own outputs too."""
  model = _network()[0]
  return jax.jit(lambda v, x: model.apply(v, x, mode="int8", capture_intermediates=_is_lif,
                                          mutable=["intermediates"]))


@functools.cache
def _forwards() -> tuple[Any, Any, Any]:
  """(int8 outputs, the LIFs' int8 outputs, QAT outputs with frozen observers) as NumPy."""
  model, x, _, calibrated, int_vars = _network()
  out8, inter = _int8_apply()(int_vars, x)
  qat = jax.jit(lambda v, x: model.apply(v, x, mode="qat"))(calibrated, x)
  to_np = functools.partial(jax.tree.map, np.asarray)
  return to_np(out8), to_np(inter["intermediates"]), to_np(qat)


def test_init_creates_the_state_statistics():
  stats = _network()[2]["quant_stats"]
  for name in STATE_CONFIGS:
    for layer in ("lif1", "lif2"):
      lif = stats[f"{name}_{layer}"]
      assert set(lif) == {"v", "i", "spikes"}, lif.keys()
      assert all(int(lif[k]["count"]) == 0 for k in lif)


def test_calibration_updates_each_state_observer_once_per_step():
  _, x, variables, calibrated, _ = _network()
  stats = calibrated["quant_stats"]
  for name in STATE_CONFIGS:
    for layer in ("lif1", "lif2"):
      lif = stats[f"{name}_{layer}"]
      assert int(lif["v"]["count"]) == int(lif["i"]["count"]) == 2 * TIME
      assert int(lif["spikes"]["count"]) == 2  # the spikes' grid: once per call
      # v' (before the reset) passed the threshold; the currents were both signs
      assert float(lif["v"]["max_val"]) > 1.0 and float(lif["i"]["min_val"]) < 0
  # one call of mode "calibrate" (qnn.calibrate reuses its compiled step): count += T
  once = qnn.calibrate(_network()[0], variables, [x])["quant_stats"]["observed8_lif1"]
  assert int(once["v"]["count"]) == int(once["i"]["count"]) == TIME


def test_convert_lowers_each_lif_to_an_integer_lif():
  _, _, _, _, int_vars = _network()
  ops = int_vars[forms.COLLECTION]
  for name, config in STATE_CONFIGS.items():
    for layer in ("lif1", "lif2"):
      op = ops[f"{name}_{layer}"][forms.OP]
      assert isinstance(op, IntegerLIF), type(op)
      spec = config.v.spec
      assert op.v_bounds == op.i_bounds == (spec.qmin, spec.qmax)
      assert int(op.x_zero) != 0  # the Dense output's zero point, on the int8 carrier
      if name.startswith("threshold"):
        assert float(op.v_scale) == np.float32(1.2 / spec.qmax)


def test_int8_spikes_equal_the_qat_forward():
  out8, inter, qat = _forwards()
  ops = _network()[4][forms.COLLECTION]
  for name in STATE_CONFIGS:
    # the recorded membrane is the integer state times its scale
    q_v = out8[name][2] / np.float32(ops[f"{name}_lif2"][forms.OP].v_scale)
    np.testing.assert_allclose(q_v, np.rint(q_v), atol=1e-3)
    z1 = inter[f"{name}_lif1"]["__call__"][0]
    z2, _ = inter[f"{name}_lif2"]["__call__"][0]
    for z in (z1, z2):
      assert z.dtype == np.int8 and set(np.unique(z)) <= {0, 1}
    np.testing.assert_array_equal(out8[name][0], z1)  # Dequantize: 0 / 1 as floats
    np.testing.assert_array_equal(out8[name][1], z2)
    for k, what in ((0, "hidden"), (1, "output")):
      assert 0.03 < qat[name][k].mean() < 0.6, (name, what)  # neither silent nor saturated
      agree = np.mean(out8[name][k] == qat[name][k])
      assert agree >= AGREEMENT[name], (name, what, agree)


def test_converted_variables_survive_serialization(tmp_path):
  _, x, _, _, int_vars = _network()
  out8, _, _ = _forwards()
  qio.save(tmp_path / "lif.qjax", int_vars)
  for restored in (qio.from_bytes(qio.to_bytes(int_vars), int_vars),
                   qio.load(tmp_path / "lif.qjax")):
    assert jax.tree.structure(restored) == jax.tree.structure(int_vars)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(int_vars), strict=True):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)
  again, _ = _int8_apply()(restored, x)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again), out8)


# ------------------------------------------------------------------------------------------
# QAT: surrogate gradients through the fake-quantized state.

class QATNet(nn.Module):
  """The network's observed8 branch alone (same names: the calibrated variables fit)."""

  @nn.compact
  def __call__(self, x, *, mode):
    state = STATE_CONFIGS["observed8"]
    q = qnn.Quantize(QAT_QCONFIG, name="quant")(x, mode=mode)
    h = qnn.QuantDense(HIDDEN, qconfig=QAT_QCONFIG, name="fc1")(q, mode=mode)
    z = qnn.LIF(state=state, name="observed8_lif1")(h, mode=mode)
    y = qnn.QuantDense(OUT, qconfig=QAT_QCONFIG, name="observed8_fc2")(z, mode=mode)
    z, _ = qnn.LIF(state=state, record_v=True, name="observed8_lif2")(y, mode=mode)
    return qnn.Dequantize(name="observed8_out2")(z, mode=mode)


def _branch(tree: dict) -> dict:
  return {k: v for k, v in tree.items() if not k.startswith(tuple(STATE_CONFIGS)) or
          k.startswith("observed8_")}


def _rate_loss(params, stats, x, target):
  """Squared error of the output neurons' spike rates; QAT with mutable statistics."""
  rates, updates = QATNet().apply({"params": params, "quant_stats": stats}, x, mode="qat",
                                  mutable=["quant_stats"])
  return jnp.mean((jnp.mean(rates, axis=0) - target) ** 2), updates["quant_stats"]


@functools.cache
def _qat_start() -> tuple[Any, Any, jax.Array, jax.Array, Any]:
  """(the calibrated params and statistics of QATNet, x, target rates, jitted loss and
  gradient)."""
  _, x, _, calibrated, _ = _network()
  target = jax.device_put(np.random.default_rng(5).uniform(0.0, 0.5, (BATCH, OUT)).astype(
      np.float32))
  return (_branch(calibrated["params"]), _branch(calibrated["quant_stats"]), x, target,
          jax.jit(jax.value_and_grad(_rate_loss, has_aux=True)))


def test_qat_gradients_reach_both_dense_kernels():
  params, stats, x, target, loss_and_grad = _qat_start()
  (loss, stats), grads = loss_and_grad(params, stats, x, target)
  assert np.isfinite(loss) and float(loss) > 0
  for layer in ("fc1", "observed8_fc2"):
    g = np.asarray(grads[layer]["kernel"])
    assert np.all(np.isfinite(g)) and np.any(g != 0), layer
  # the statistics moved: each state observer saw every step (calibration, then this call)
  for layer in ("observed8_lif1", "observed8_lif2"):
    assert int(stats[layer]["v"]["count"]) == int(stats[layer]["i"]["count"]) == 3 * TIME


def test_qat_from_fresh_statistics_runs_under_jit():
  lif = qnn.LIF(state=qnn.observed_state(8, qat=True), record_v=True)
  x = jax.device_put(np.full((4, 3), 5.0, np.float32))

  @jax.jit
  def fresh_qat(x):
    variables = lif.init(jax.random.key(0), x, mode="float")
    return lif.apply(variables, x, mode="qat", mutable=["quant_stats"])

  (_, v), updates = fresh_qat(x)
  assert np.all(np.isfinite(v)), v
  assert int(updates["quant_stats"]["v"]["count"]) == 4
  assert int(updates["quant_stats"]["v"]["skipped"]) == 0


def test_adam_steps_reduce_the_loss():
  """Each step starts from the calibrated statistics (the loss is then a function of the
  params alone: carried along, the moving averages would move it as well)."""
  params, stats, x, target, loss_and_grad = _qat_start()
  optimizer = optax.adam(1e-2)
  with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count in
    opt_state = jax.jit(optimizer.init)(params)
  # jitted: one compilation instead of every eager op's, per leaf shape
  update = jax.jit(optimizer.update)
  apply_updates = jax.jit(optax.apply_updates)
  losses = []
  for _ in range(8):
    (loss, _), grads = loss_and_grad(params, stats, x, target)
    losses.append(float(loss))
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = update(grads, opt_state, params)
    params = apply_updates(params, updates)
  losses.append(float(loss_and_grad(params, stats, x, target)[0][0]))
  assert losses[-1] < 0.9 * losses[0], losses


# ------------------------------------------------------------------------------------------
# Errors.


class _Neurons(nn.Module):
  @nn.compact
  def __call__(self, x, *, mode):
    return qnn.LIF(state=qnn.observed_state(8), name="neurons")(x, mode=mode)


def test_calibrate_with_immutable_statistics_names_the_module():
  model, x = _Neurons(), jax.ShapeDtypeStruct((3, 2, 4), jnp.float32)
  # traced only: the error is raised before anything would run
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, mode="float"), x)
  with pytest.raises(ValueError, match=r"neurons.*calibrate.*immutable"):
    jax.eval_shape(lambda v, x: model.apply(v, x, mode="calibrate"), variables, x)


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=8, signed=True, symmetric=False),
    QuantSpec(bits=8, signed=False, symmetric=True),
    QuantSpec(bits=8, signed=False, symmetric=False),
    QuantSpec(bits=8, signed=True, symmetric=True, axis=0),
    QuantSpec(bits=8, signed=True, symmetric=True, axis=-1),
], ids=["asymmetric", "unsigned", "unsigned affine", "per-channel", "per-channel last"])
@pytest.mark.parametrize("which", ["v", "i"])
def test_state_qconfig_refuses_grids_the_integer_lif_cannot_run(spec, which):
  good = obs.MinMaxObserver(spec=state_spec(8))
  fields = {"v": good, "i": good, which: obs.MinMaxObserver(spec=spec)}
  with pytest.raises(ValueError, match=f"LIFStateQConfig.{which}.*symmetric signed per-tensor"):
    qnn.LIFStateQConfig(**fields)


def test_state_qconfig_refuses_mismatched_bits_and_other_observers():
  with pytest.raises(ValueError, match="same bits; got 8 and 16"):
    qnn.LIFStateQConfig(v=obs.MinMaxObserver(spec=state_spec(8)),
                        i=obs.MinMaxObserver(spec=state_spec(16)))
  with pytest.raises(TypeError, match=r"LIFStateQConfig\.i must be a min/max-type observer"):
    qnn.LIFStateQConfig(v=obs.MinMaxObserver(spec=state_spec(8)),
                        i=obs.HistogramObserver(spec=state_spec(8)))


class _FloatLIFAfterInt8(nn.Module):
  """The network's first layer (its calibrated variables fit), then a float LIF."""

  @nn.compact
  def __call__(self, x, *, mode):
    q = qnn.Quantize(QAT_QCONFIG, name="quant")(x, mode=mode)
    h = qnn.QuantDense(HIDDEN, qconfig=QAT_QCONFIG, name="fc1")(q, mode=mode)
    return qnn.LIF(name="neurons")(h, mode=mode)


def test_convert_refuses_a_float_lif_fed_by_int8():
  _, x, _, calibrated, _ = _network()
  variables = {c: {k: calibrated[c][k] for k in ("quant", "fc1") if k in calibrated[c]}
               for c in ("params", "quant_stats")}
  with pytest.raises(ValueError, match=r"neurons is left in float but takes the int8 output "
                     r"of fc1"):
    qjax.convert(_FloatLIFAfterInt8(), variables, x)


@pytest.mark.parametrize("scale", [0, 0.0, -0.5, math.nan, math.inf, -math.inf, True, "1.0",
                                   None, 1e-50])
def test_fixed_qparams_observer_refuses_bad_scales(scale):
  with pytest.raises(ValueError, match=r"FixedQParamsObserver\.scale"):
    obs.FixedQParamsObserver(spec=QuantSpec(bits=8, signed=True), scale=scale)


@pytest.mark.parametrize("spec, zero_point", [
    (QuantSpec(bits=8, signed=True), 128), (QuantSpec(bits=8, signed=True), -129),
    (QuantSpec(bits=8, signed=False), -1), (QuantSpec(bits=8, signed=False), 256),
    (QuantSpec(bits=4, signed=True), 8), (QuantSpec(bits=8), True), (QuantSpec(bits=8), 1.0),
    (QuantSpec(bits=8), None)])
def test_fixed_qparams_observer_refuses_zero_points_outside_the_spec(spec, zero_point):
  with pytest.raises(ValueError, match=r"FixedQParamsObserver\.zero_point"):
    obs.FixedQParamsObserver(spec=spec, scale=0.5, zero_point=zero_point)


def test_fixed_qparams_observer_refuses_per_channel_and_keeps_its_grid():
  with pytest.raises(ValueError, match="per-tensor"):
    obs.FixedQParamsObserver(spec=QuantSpec(bits=8, symmetric=True, axis=0), scale=0.5)
  observer = obs.FixedQParamsObserver(spec=QuantSpec(bits=8, signed=False), scale=0.25,
                                      zero_point=255)
  state = jax.jit(lambda x: observer.update(observer.init(()), x))(
      np.array([-100.0, 3.0], np.float32))
  qparams = observer.qparams(state)
  assert float(qparams.scale) == 0.25 and int(qparams.zero_point) == 255
  assert float(state.min_val) == -100.0 and int(state.count) == 1
  spike = qnn.SPIKE_OBSERVER.qparams(state)
  assert (float(spike.scale), int(spike.zero_point)) == (1.0, 0)
