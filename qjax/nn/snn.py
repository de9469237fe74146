"""Spiking layers: a LIF neuron population over time, with quantized weights and state.

`LIF` runs `qjax.snn.lif_step` over the leading (time) axis of its input currents with
`jax.lax.scan`. Its state (v, i) can be quantized like any activation: `state` names an
observer for each, kept in "quant_stats" at <module>/v and <module>/i and updated at every
time step.

    mode "float"      the float neuron
    mode "calibrate"  the float neuron; the observers see i' and v' of every step
    mode "qat"        i', v', i_next and the reset value fake-quantized on their grids at every
                      step (straight-through), spikes with the surrogate gradient
    mode "int8"       the converted neuron (`qjax.integer.forms.lif.IntegerLIF`): int8 input
                      currents from the quantized layer before, int32 state on the grids,
                      fixed-point decay, int8 0/1 spikes for the next layer

The spikes leave on a fixed grid (scale 1, zero point 0: `SPIKE_OBSERVER`), so the next
`QuantDense` contracts them as int8 0 / 1 values. A typical network applies its Dense layers
to all time steps at once (one matmul over (T x batch) rows) and scans only the neurons:

    x (T, B, 784) -> Quantize -> QuantDense -> LIF -> QuantDense -> LIF(record_v=True)

Which state grid the integer path runs: symmetric signed grids (zero point 0) of 2..16 bits,
either observed (`observed_state`: min / max of the calibration data, or their moving average
for QAT) or fixed around the threshold (`threshold_state`, snnTorch's `state_quant` idea:
v on [-(1 + margin) v_th, (1 + margin) v_th]). Both run on the integer path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from qjax import snn, ste
from qjax import observers as obs
from qjax.integer.forms import base as forms
from qjax.integer.forms.lif import IntegerLIF, LIFForm, SPIKE_SCALE, state_spec
from qjax.nn import _integer
from qjax.nn.modules import STATS, FakeQuant, Mode, _merged_mode, _reraise_with_path, _where
from qjax.numerics import QuantSpec
from qjax.observers.minmax import AxisName

SPIKE_OBSERVER = obs.FixedQParamsObserver(spec=QuantSpec(bits=8, signed=True),
                                          scale=SPIKE_SCALE, zero_point=0)
"""The spikes' grid: 0 and 1 exactly, as int8 integers."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LIFStateQConfig:
  """Observers of a LIF neuron's state: `v` (membrane) and `i` (synaptic current), each on a
  symmetric signed per-tensor grid (the integer LIF's, `qjax.integer.forms.lif`)."""

  v: obs.Observer
  i: obs.Observer

  def __post_init__(self):
    for name in ("v", "i"):
      observer = getattr(self, name)
      if not isinstance(observer, obs.MinMaxObserver):
        raise TypeError(f"LIFStateQConfig.{name} must be a min/max-type observer "
                        f"(MinMaxObserver, MovingAverageMinMaxObserver, "
                        f"FixedQParamsObserver); got {type(observer).__name__}.")
      spec = observer.spec
      if not (spec.signed and spec.symmetric and not spec.per_channel):
        raise ValueError(f"LIFStateQConfig.{name}: the state lives on a symmetric signed "
                         f"per-tensor grid; got {spec}.")
    if self.v.spec.bits != self.i.spec.bits:
      raise ValueError(f"LIFStateQConfig: v and i take the same bits; got {self.v.spec.bits} "
                       f"and {self.i.spec.bits}.")


def observed_state(bits: int = 16, *, qat: bool = False) -> LIFStateQConfig:
  """v and i on `bits`-wide grids from their observed ranges (min/max; moving average for
  QAT).

  Example:
    >>> observed_state(8).v.spec.bits
    8
  """
  spec = state_spec(bits)
  kind = obs.MovingAverageMinMaxObserver if qat else obs.MinMaxObserver
  return LIFStateQConfig(v=kind(spec=spec), i=kind(spec=spec))


_DEFAULT_PARAMS = snn.LIFParameters()


def threshold_state(bits: int, params: snn.LIFParameters = _DEFAULT_PARAMS, *,
                    margin: float = 0.2, qat: bool = False) -> LIFStateQConfig:
  """v on a fixed grid around the threshold, [-(1 + margin) v_th, (1 + margin) v_th] in
  2^bits - 1 levels (snnTorch's `state_quant` levels, made symmetric so the integer path runs
  them); i on its observed range.

  Example:
    >>> round(threshold_state(4).v.scale, 4)                # 1.2 / 7
    0.1714
  """
  spec = state_spec(bits)
  if not margin >= 0:
    raise ValueError(f"threshold_state: margin must be >= 0; got {margin!r}.")
  top = (1 + margin) * abs(params.v_th)
  if not top > 0:
    raise ValueError(f"threshold_state: v_th must be nonzero; got {params.v_th}.")
  kind = obs.MovingAverageMinMaxObserver if qat else obs.MinMaxObserver
  return LIFStateQConfig(v=obs.FixedQParamsObserver(spec=spec, scale=top / spec.qmax),
                         i=kind(spec=spec))


class _Stats(nn.Module):
  """An observer's state in "quant_stats" under this module's name, as variables."""

  observer: obs.Observer

  @nn.compact
  def __call__(self) -> tuple[Any, dict]:
    fresh = self.observer.init(())
    variables = {name: self.variable(STATS, name, lambda v=value: v)
                 for name, value in fresh._asdict().items()}
    return type(fresh)(**{n: v.value for n, v in variables.items()}), variables


def _fake_quant(x: jax.Array, observer: obs.Observer, state: Any, *,
                fresh_ok: bool = False) -> jax.Array:
  """x fake-quantized on the observer's grid. With `fresh_ok` (statistics that update in
  this call) an observer that has seen nothing yet leaves x as it is, instead of giving a
  NaN scale: the first step's constants come before its first update."""
  qparams = jax.tree_util.tree_map(lax.stop_gradient, observer.qparams(state))
  y = ste.fake_quant(x, observer.spec, qparams)
  return jnp.where(state.count > 0, y, x) if fresh_ok else y


class LIF(nn.Module):
  """A population of LIF neurons over time (module docstring): input currents (T, ..., N)
  -> spikes (T, ..., N), from the resting state.

  Attributes:
    params: the neurons' parameters (`qjax.snn.LIFParameters`).
    dt: the time step in seconds.
    state: observers of v and i (`observed_state`, `threshold_state`), or None for a float
      neuron (which must then get a float input in mode "int8").
    record_v: also return the membrane potential after every step (T, ..., N), float (in
      mode "int8": the integer state times its scale).
    mode: default mode, overridable per call.
    axis_name: mapped axes (`jax.shard_map`) the batch is split over: the state and spike
      observers reduce over them (as `qjax.nn.QuantDense`'s output observer). None under
      GSPMD or on one device.

  Example:
    >>> lif = LIF(record_v=True)
    >>> z, v = lif.apply({}, jnp.full((3, 1), 4.0), mode="float")
    >>> z[:, 0], v[:, 0]
    (Array([0., 1., 0.], dtype=float32), Array([0.4  , 0.   , 0.976], dtype=float32))
  """

  params: snn.LIFParameters = _DEFAULT_PARAMS
  dt: float = 1e-3
  state: LIFStateQConfig | None = None
  record_v: bool = False
  mode: Mode | str | None = None
  axis_name: AxisName = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: Mode | str | None = None) -> Any:
    mode = _merged_mode(self, mode)
    where = _where(self)
    if jnp.ndim(x) < 2:
      raise ValueError(f"{where}: LIF takes input currents of shape (time, ..., neurons); got "
                       f"{jnp.shape(x)}.")
    if not isinstance(self.params, snn.LIFParameters):
      raise TypeError(f"{where}: params must be qjax.snn.LIFParameters; got "
                      f"{type(self.params).__name__}.")
    config = self.state
    quantized = config is not None
    if mode is Mode.INT8 and quantized:
      op = _integer.lowered_op(self, where, IntegerLIF)
      z, _, v = _reraise_with_path(self, lambda: op.trace(x))
      return (z, v.astype(jnp.float32) * op.v_scale) if self.record_v else z
    form = (LIFForm(params=self.params, dt=float(self.dt), v_observer=config.v,
                    i_observer=config.i) if config is not None else None)
    x = forms.mark_input(self, x, form)
    if quantized and (self.is_initializing() or mode in (Mode.CALIBRATE, Mode.QAT)):
      z, v_trace = self._quantized(x, mode)
    else:
      z, v_trace = _float_loop(x, self.params, float(self.dt))
    if quantized:
      z = FakeQuant(SPIKE_OBSERVER, name="spikes", axis_name=self.axis_name)(
          z, mode=Mode.CALIBRATE
                                                   if mode is Mode.CALIBRATE else Mode.FLOAT)
      z = forms.mark_output(self, z, observer=SPIKE_OBSERVER, learnable=False, point="spikes")
    return (z, v_trace) if self.record_v else z

  def _quantized(self, x: jax.Array, mode: Mode) -> tuple[jax.Array, jax.Array]:
    """The time loop with the state observers: updated (calibrate; qat with mutable
    statistics) and, in qat, fake-quantizing the state."""
    assert self.state is not None
    observers = (self.state.v, self.state.i)
    (v_state, v_vars), (i_state, i_vars) = (
        _Stats(observer, name=name)() for observer, name in zip(observers, ("v", "i"),
                                                                  strict=True))
    if self.is_initializing():
      return _float_loop(x, self.params, float(self.dt))
    updates = mode in (Mode.CALIBRATE, Mode.QAT) and self.is_mutable_collection(STATS)
    if mode is Mode.CALIBRATE and not updates:
      raise ValueError(f"{_where(self)}: mode='calibrate' updates observer statistics, but "
                       f"the '{STATS}' collection is immutable; call "
                       f"apply(..., mutable=['{STATS}']).")
    fake = mode is Mode.QAT
    p, dt = self.params, float(self.dt)
    a, b = dt * p.tau_mem_inv, dt * p.tau_syn_inv
    v_obs, i_obs = observers

    def body(carry, x_t):
      (v, i), (sv, si) = carry
      i1 = i + x_t
      if updates:
        si = i_obs.update(si, lax.stop_gradient(i1), axis_name=self.axis_name)
      if fake:
        i1 = _fake_quant(i1, i_obs, si)
      v1 = v + a * ((_on(p.v_leak, v_obs, sv, fake, v, updates) - v) + i1)
      if updates:
        sv = v_obs.update(sv, lax.stop_gradient(v1), axis_name=self.axis_name)
      if fake:
        v1 = _fake_quant(v1, v_obs, sv)
      i_next = i1 - b * i1
      if fake:
        i_next = _fake_quant(i_next, i_obs, si)
      z = snn.spike(v1 - p.v_th, p.surrogate, p.alpha)
      v_next = (1 - z) * v1 + z * _on(p.v_reset, v_obs, sv, fake, v1, updates)
      return ((v_next, i_next), (sv, si)), (z, v_next)

    start = _resting_state(x, p)
    if fake:
      start = snn.LIFState(v=_fake_quant(start.v, v_obs, v_state, fresh_ok=updates), i=start.i)
    ((_, _), (v_state, i_state)), (z, v_trace) = lax.scan(
        body, ((start.v, start.i), (v_state, i_state)), x)
    if updates:
      for variables, state in ((v_vars, v_state), (i_vars, i_state)):
        for name, var in variables.items():
          var.value = getattr(state, name)
    return z, v_trace


def _on(value: float, observer: obs.Observer, state: Any, fake: bool, like: jax.Array,
        fresh_ok: bool) -> jax.Array:
  """A constant (v_leak, v_reset) as the step uses it: on the v grid in qat (the integer
  path rounds it onto that grid)."""
  c = jnp.asarray(value, like.dtype)
  return _fake_quant(c, observer, state, fresh_ok=fresh_ok) if fake else c


def _float_loop(x: jax.Array, params: snn.LIFParameters, dt: float
                ) -> tuple[jax.Array, jax.Array]:
  """(spikes, membrane after each step) of the float neuron over x's leading axis."""

  def body(state, x_t):
    z, state = snn.lif_step(x_t, state, params, dt)
    return state, (z, state.v)

  _, (z, v) = lax.scan(body, _resting_state(x, params), x)
  return z, v


def _resting_state(x: jax.Array, params: snn.LIFParameters) -> snn.LIFState:
  """The resting state for the currents x (time first), tied to x by a select of each value
  with itself (which XLA removes): under `jax.shard_map` the state then varies across shards
  as x does, as the time scan's carry must."""
  start = snn.initial_state(jnp.shape(x)[1:], params, jnp.result_type(x, jnp.float32))
  shard = jnp.zeros(jnp.shape(x)[1:], bool) | jnp.isnan(x[0])   # False, shaped (and split) as x
  return snn.LIFState(*(jnp.where(shard, s, s) for s in start))


class LIFCell(nn.Module):
  """One time step of a float LIF population, in the carry convention of `nn.scan` /
  `qjax.nn.scan`: (state, x_t) -> (state, z_t). For per-step models (layers inside the time
  loop, recurrent weights); `LIF` runs a whole sequence and quantizes its state.

  Attributes:
    params: the neurons' parameters.
    dt: the time step in seconds.

  Example:
    >>> import flax.linen as nn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, xs):                       # (time, batch, features)
    ...     cell = nn.scan(LIFCell, variable_broadcast="params", split_rngs={"params": False})
    ...     state = snn.initial_state(xs.shape[1:])
    ...     return cell(name="lif")(state, xs)[1]
    >>> Net().apply({}, jnp.full((3, 1, 1), 4.0))[:, 0, 0]
    Array([0., 1., 0.], dtype=float32)
  """

  params: snn.LIFParameters = _DEFAULT_PARAMS
  dt: float = 1e-3

  @nn.compact
  def __call__(self, state: snn.LIFState, x: jax.Array) -> tuple[snn.LIFState, jax.Array]:
    z, state = snn.lif_step(x, snn.LIFState(*state), self.params, float(self.dt))
    return state, z
