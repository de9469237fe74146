"""Integer form of the LIF neuron (`qjax.snn`): integer state, fixed-point decay, 0/1 spikes.

The float step (`qjax.snn.lif_step`), with a = dt tau_mem_inv and b = dt tau_syn_inv:

    i' = i + x;  v' = v + a ((v_leak - v) + i');  i_next = (1 - b) i';
    z = H(v' - v_th);  v_next = z ? v_reset : v'

runs on integers. The state is held on symmetric grids (zero point 0) of `bits` <= 16 bits:
v = S_v q_v, i = S_i q_i; the input current x = S_x (q_x - Z_x) is the int8 output of the
layer before (its grid). With M_x = S_x / S_i, M_a = a, M_b = a S_i / S_v, M_c = 1 - b, each
a 31-bit fixed-point multiplier M = M0 / 2^r (`arith.quantize_multiplier`),
R(y, M) = floor((y M0 + 2^(r-1)) / 2^r) (`arith.mul_shift_round`) and rne_L(y) = y / 2^L
rounded half to even, every quantity is formed with L fractional bits and rounded once, to
even, as the fake quantization of the QAT forward rounds it:

    q_i'     = clamp_i(rne_F(q_i 2^F + R((q_x - Z_x) 2^F, M_x)))
    q_v'     = clamp_v(rne_L(q_v 2^L + R((L_v - q_v) 2^L, M_a) + R(q_i' 2^L, M_b)))
    q_i_next = clamp_i(rne_L(R(q_i' 2^L, M_c)))
    z        = q_v' > T                                        T = floor(v_th / S_v)
    q_v_next = z ? R_v : q_v'                L_v = rne(v_leak / S_v), R_v = rne(v_reset / S_v)

clamp_v / clamp_i saturate at the state grid's [qmin, qmax]. L = 28 - bits - ceil(log2(max(
M_a, M_b, 1))) >= 0 and F = min(L, 22) keep every int32 sum below 2^31 (the input term
R(., M_x) saturates at +-2^30 first, which changes nothing after the clamp). z > T is
exactly S_v q_v' > v_th. Spikes leave as int8 0 / 1 on the grid (scale 1, zero point 0), so
the next layer's int8 matmul reads them as they are.
All arithmetic is int32; nothing is float between the layer before and the readout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax import _device
from qjax._struct import static, struct
from qjax.integer import arith
from qjax.integer.forms.base import Form, Lowering, int8_input, observer_state
from qjax.numerics import QuantSpec

STATE_BITS = (2, 16)
"""The state grids the integer LIF runs: symmetric, signed, of 2 to 16 bits."""

SPIKE_SCALE = 1.0
"""The spikes' grid: scale 1, zero point 0 (0 / 1 as integers)."""


def round_shift(y: jax.Array, shift: int) -> jax.Array:
  """rne(y / 2^shift) for int32 y and a static shift >= 0 (y itself for 0): round half to
  even, as the fake quantization of the QAT forward rounds (so both agree on exact ties)."""
  if shift == 0:
    return y
  half = jnp.int32(1 << (shift - 1))
  q = jax.lax.shift_right_arithmetic(y + half, jnp.int32(shift))
  tie = (y & jnp.int32((1 << shift) - 1)) == half
  return jnp.where(tie & ((q & 1) == 1), q - 1, q)


INPUT_LIMIT = 1 << 30
"""|R((q_x - Z_x) 2^F, M_x)| is saturated here before q_i 2^F (< 2^28) is added, so the sum
cannot wrap in int32; the clamp to the state grid follows, so the result is unchanged."""

INPUT_FRAC = 22
"""At most this many fractional bits for the input term: (q_x - Z_x) 2^F must fit int32."""


@struct
class IntegerLIF:
  """The converted LIF neuron (module docstring): a time loop over int8 input currents.

  Leaves: the input's zero point `x_zero`; the multipliers (`m0`, `shift`) int32 (4,) in the
  order M_x, M_a, M_b, M_c; `v_leak`, `v_reset`, `threshold` int32 () on the v grid;
  `v_scale`, `i_scale` float32 () (to read the state in real units); static: the state bounds
  `v_bounds`, `i_bounds` and the membrane update's fractional bits `frac`.

  Example:
    >>> op = IntegerLIF.build(x_scale=0.5, x_zero=0, v_scale=0.01, i_scale=0.05, bits=16)
    >>> z, (v, i) = op(jnp.full((3, 1), 8, jnp.int8))    # x = 4 in each step
    >>> z[:, 0]                               # v' = 0.4, 1.08 (spike, reset), 0.976
    Array([0, 1, 0], dtype=int8)
    >>> v[0], i[0]                            # 0.98 on the 0.01 grid; 7.8 on the 0.05 grid
    (Array(98, dtype=int32), Array(156, dtype=int32))
  """

  x_zero: jax.Array
  m0: jax.Array
  shift: jax.Array
  v_leak: jax.Array
  v_reset: jax.Array
  threshold: jax.Array
  v_scale: jax.Array
  i_scale: jax.Array
  report: dict | None = None
  v_bounds: tuple[int, int] = static()
  i_bounds: tuple[int, int] = static()
  frac: int = static()

  @staticmethod
  def build(*, x_scale: float, x_zero: int, v_scale: float, i_scale: float, bits: int,
            tau_syn_inv: float = 200.0, tau_mem_inv: float = 100.0, v_leak: float = 0.0,
            v_th: float = 1.0, v_reset: float = 0.0, dt: float = 1e-3,
            report: dict | None = None) -> IntegerLIF:
    """The op of a neuron with these parameters and grids (host side)."""
    spec = state_spec(bits)
    a, b = dt * tau_mem_inv, dt * tau_syn_inv
    if not (a > 0 and 0 < b < 1):
      raise ValueError(f"IntegerLIF: dt * tau_mem_inv must be > 0 and dt * tau_syn_inv in "
                       f"(0, 1) for a decaying synapse; got {a} and {b}.")
    s_v, s_i = np.float64(np.float32(v_scale)), np.float64(np.float32(i_scale))
    multipliers = np.array([np.float64(np.float32(x_scale)) / s_i, a, a * s_i / s_v, 1 - b])
    m0, shift = arith.quantize_multiplier(multipliers)
    biggest = max(1.0, float(multipliers[1]), float(multipliers[2]))
    frac = 28 - bits - math.ceil(math.log2(biggest))
    if frac < 0:
      raise ValueError(f"IntegerLIF: a S_i / S_v = {multipliers[2]:.3g} is too large for a "
                       f"{bits}-bit state in int32 (the current's grid is far coarser than the "
                       f"membrane's); calibrate both on the same data or use fewer bits.")

    def on_v(value: float) -> int:
      return int(np.clip(np.rint(value / s_v), spec.qmin, spec.qmax))

    threshold = math.floor(v_th / s_v)
    return IntegerLIF(
        x_zero=jnp.int32(x_zero), m0=_device.put(m0, jnp.int32),
        shift=_device.put(shift, jnp.int32), v_leak=jnp.int32(on_v(v_leak)),
        v_reset=jnp.int32(on_v(v_reset)),
        threshold=jnp.int32(np.clip(threshold, spec.qmin - 1, spec.qmax)),
        v_scale=jnp.float32(v_scale), i_scale=jnp.float32(i_scale), report=report,
        v_bounds=(spec.qmin, spec.qmax), i_bounds=(spec.qmin, spec.qmax), frac=frac)

  def initial_state(self, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The resting state (q_v = L_v, q_i = 0) as int32 arrays of `shape`."""
    return (jnp.full(shape, self.v_leak, jnp.int32), jnp.zeros(shape, jnp.int32))

  def step(self, x: jax.Array, state: tuple[jax.Array, jax.Array]
           ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One time step: int8 currents (..., N) -> (int8 spikes, (q_v, q_i) int32)."""
    v, i = state
    m0, shift = self.m0, self.shift

    def clamp_v(y):
      return jnp.clip(y, *self.v_bounds)

    def clamp_i(y):
      return jnp.clip(y, *self.i_bounds)

    fx = min(self.frac, INPUT_FRAC)
    xc = (x.astype(jnp.int32) - self.x_zero) * jnp.int32(1 << fx)
    jump = jnp.clip(arith.mul_shift_round(xc, m0[0], shift[0]), -INPUT_LIMIT, INPUT_LIMIT)
    i1 = clamp_i(round_shift(i * jnp.int32(1 << fx) + jump, fx))
    up = jnp.int32(1 << self.frac)
    d = (arith.mul_shift_round((self.v_leak - v) * up, m0[1], shift[1])
         + arith.mul_shift_round(i1 * up, m0[2], shift[2]))
    v1 = clamp_v(round_shift(v * up + d, self.frac))
    i_next = clamp_i(round_shift(arith.mul_shift_round(i1 * up, m0[3], shift[3]), self.frac))
    z = v1 > self.threshold
    return z.astype(jnp.int8), (jnp.where(z, self.v_reset, v1), i_next)

  def __call__(self, x: jax.Array, state: tuple[jax.Array, jax.Array] | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The time loop over int8 currents x (T, ..., N) from `state` (default: the resting
    state): (int8 spikes (T, ..., N), the final (q_v, q_i))."""
    z, final, _ = self.trace(x, state)
    return z, final

  def trace(self, x: jax.Array, state: tuple[jax.Array, jax.Array] | None = None
            ) -> tuple[jax.Array, tuple[jax.Array, jax.Array], jax.Array]:
    """As `__call__`, plus the membrane q_v after every step (int32 (T, ..., N))."""
    x = int8_input(x, "a converted LIF neuron")
    if x.ndim < 2:
      raise ValueError(f"a converted LIF neuron takes currents of shape (time, ..., neurons); "
                       f"got {x.shape}.")
    if state is None:
      state = self.initial_state(x.shape[1:])

    def body(carry, x_t):
      z, new = self.step(x_t, carry)
      return new, (z, new[0])

    init = (_device.put(state[0], jnp.int32), _device.put(state[1], jnp.int32))
    final, (z, v) = jax.lax.scan(body, init, x)
    return z, (final[0], final[1]), v


def state_spec(bits: int) -> QuantSpec:
  """The symmetric signed grid of a `bits`-wide state (`STATE_BITS`)."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not (
      STATE_BITS[0] <= bits <= STATE_BITS[1]):
    raise ValueError(f"the LIF state takes {STATE_BITS[0]}..{STATE_BITS[1]} bits; got {bits!r}.")
  return QuantSpec(bits=bits, signed=True, symmetric=True)


@dataclasses.dataclass(frozen=True)
class LIFForm(Form):
  """The integer form of `qjax.nn.LIF`: one int8 operand (the input currents), the state
  observers at quant_stats/<module>/v and /i, the spikes' fixed grid as the output."""

  params: Any = None  # qjax.snn.LIFParameters (kept untyped: no import cycle)
  dt: float = 1e-3
  v_observer: Any = None
  i_observer: Any = None

  def lower(self, lowering: Lowering) -> IntegerLIF:
    (x,) = lowering.inputs
    arith.check_int8_spec(x.spec, name=f"convert: {lowering.path} (input current)")
    y = lowering.output
    if y is None or float(y.scale) != SPIKE_SCALE or int(y.zero_point) != 0:
      raise ValueError(f"convert: {lowering.path}: the spikes' grid must be scale 1, zero "
                       f"point 0; got {None if y is None else (float(y.scale), y.zero_point)}.")
    stats = lowering.subtree("quant_stats")
    grids = {}
    for name, observer in (("v", self.v_observer), ("i", self.i_observer)):
      spec = observer.spec
      if not (spec.signed and spec.symmetric and not spec.per_channel):
        raise ValueError(f"convert: {lowering.path}: the integer LIF holds its state on "
                         f"symmetric signed per-tensor grids; the {name} observer has {spec}.")
      state = observer_state(observer, stats.get(name), (), f"{lowering.path}/{name}")
      qparams = observer.qparams(state)
      scale = float(np.asarray(qparams.scale, np.float32))
      if int(np.asarray(qparams.zero_point)) != 0 or not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"convert: {lowering.path}/{name}: expected a calibrated grid with "
                         f"zero point 0; got scale {scale}, zero point "
                         f"{int(np.asarray(qparams.zero_point))}.")
      grids[name] = (scale, spec.bits)
    if grids["v"][1] != grids["i"][1]:
      raise ValueError(f"convert: {lowering.path}: v and i must have the same bits; got "
                       f"{grids['v'][1]} and {grids['i'][1]}.")
    p = self.params
    report = {"input_scale": _device.put(x.scale), "input_zero_point": _device.put(x.zero_point),
              "v_scale": jnp.float32(grids["v"][0]), "i_scale": jnp.float32(grids["i"][0])}
    return IntegerLIF.build(
        x_scale=float(x.scale), x_zero=int(x.zero_point), v_scale=grids["v"][0],
        i_scale=grids["i"][0], bits=grids["v"][1], tau_syn_inv=p.tau_syn_inv,
        tau_mem_inv=p.tau_mem_inv, v_leak=p.v_leak, v_th=p.v_th, v_reset=p.v_reset,
        dt=self.dt, report=report)
