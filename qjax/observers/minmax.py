"""The min/max observers, the observer state types and the parts every observer shares.

`MinMaxObserver` and `MovingAverageMinMaxObserver` with their `MinMaxState`, `merge`, the
`HistogramState` of `qjax.observers.histogram`, and the base class `_RangeObserver` (spec,
eps, range -> qparams) with the batch checks that all observers apply. The package docstring
(`qjax.observers`) states the conventions: non-finite batches, ranges too wide for float32,
subnormals, sharding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax import _checks
from qjax import _float32
from qjax import numerics
from qjax.numerics import FLOAT32_EPS, QParams, QuantSpec

_INT32_MAX = np.iinfo(np.int32).max


class MinMaxState(NamedTuple):
  """Running range of a min/max observer.

  Attributes:
    min_val: float32, shape () per-tensor or (C,) per-channel; +inf before any data.
    max_val: float32, same shape; -inf before any data.
    count: int32, batches folded in (saturates at 2^31 - 1).
    skipped: int32, batches dropped because they held NaN or +-inf (only under jit).
  """

  min_val: jax.Array
  max_val: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count: the state's public name
  skipped: jax.Array


class HistogramState(NamedTuple):
  """Histogram of everything seen, over [min_val, max_val].

  Attributes:
    histogram: float32 (bins,) counts.
    min_val, max_val: float32 scalars, the histogram's range (+inf / -inf before any data).
    count, skipped: as in `MinMaxState`.
  """

  histogram: jax.Array
  min_val: jax.Array
  max_val: jax.Array
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count: the state's public name
  skipped: jax.Array


ObserverState = MinMaxState | HistogramState

AxisName = str | tuple[str, ...] | None
"""A mapped axis name (`jax.shard_map`, `jax.vmap`, `jax.pmap`), a tuple of them, or None."""
_State = TypeVar("_State", bound=ObserverState)  # the state type an observer takes


def _shape_of(shape_or_array: Any) -> tuple[int, ...]:
  if hasattr(shape_or_array, "shape"):
    return tuple(shape_or_array.shape)
  try:
    return tuple(int(d) for d in shape_or_array)
  except TypeError as err:
    raise TypeError(f"init expects the observed tensor's shape (a tuple of ints) or an array; "
                    f"got {shape_or_array!r}.") from err


def checked_axis_name(axis_name: Any, where: str) -> AxisName:
  """`axis_name` as None, a str or a tuple of str; a TypeError naming `where` otherwise."""
  if axis_name is None or isinstance(axis_name, str):
    return axis_name
  if isinstance(axis_name, (tuple, list)) and axis_name and all(
      isinstance(a, str) for a in axis_name):
    return tuple(axis_name)
  raise TypeError(f"{where}: axis_name must be None, a mapped axis name (str) or a non-empty "
                  f"tuple of names, e.g. 'data' or ('data', 'model'); got {axis_name!r}.")


def _saturating_increment(count: jax.Array, where: jax.Array) -> jax.Array:
  """count + 1 where `where`, without wrapping past int32's maximum."""
  step = (where & (count < _INT32_MAX)).astype(jnp.int32)
  return count + step


def _batch_data(x: Any, name: str) -> jax.Array:
  """The batch as a float32 array; errors for integer, empty or (concretely) non-finite data."""
  x = _checks.as_float_array("x", x, hint=f" ({name} observes real-valued tensors).")
  if x.size == 0:
    raise ValueError(f"{name}.update: x is empty (shape {x.shape}); an observer needs at least "
                     f"one value per batch (an empty calibration set gives no range).")
  finite = _checks.concrete_bool(jnp.all(jnp.isfinite(x)))
  if finite is False:
    n_nan = int(jnp.sum(jnp.isnan(x)))
    n_inf = int(jnp.sum(jnp.isinf(x)))
    raise ValueError(f"{name}.update: x holds {n_nan} NaN and {n_inf} +-inf value(s) (shape "
                     f"{x.shape}); they have no place in a quantization range. Clean the batch, "
                     f"or run under jax.jit, where such a batch is skipped and counted in "
                     f"state.skipped.")
  return x.astype(jnp.float32)


def _fits_float32(name: str, state: ObserverState, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Whether the state's range grown by the batch range [lo, hi] fits float32
  (`numerics.range_fits_float32`, all channels): a bool scalar. Eagerly, a ValueError when not.
  """
  seen = state.count > 0
  grown_lo = jnp.where(seen, jnp.minimum(state.min_val, lo), lo)
  grown_hi = jnp.where(seen, jnp.maximum(state.max_val, hi), hi)
  numerics.check_range_fits_float32(
      grown_lo, grown_hi, where=f"{name}.update",
      hint=" (The range is the state's range grown by this batch's min and max.) Under "
           "jax.jit such a batch is skipped and counted in state.skipped.")
  return jnp.all(numerics.range_fits_float32(grown_lo, grown_hi))


def _reduced_axes(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
  if spec.axis is None:  # per-tensor
    return tuple(range(len(shape)))
  axis = _checks.normalize_axis(spec.axis, len(shape), shape=shape)
  return tuple(a for a in range(len(shape)) if a != axis)


def _check_state_shape(state: Any, expected_type: type[ObserverState], shape: tuple[int, ...],
                       name: str) -> None:
  if not isinstance(state, expected_type):
    raise TypeError(f"{name}: expected a {expected_type.__name__} (from {name}.init); "
                    f"got {type(state).__name__}.")
  if tuple(state.min_val.shape) != shape:
    raise ValueError(f"{name}: the state holds statistics of shape {tuple(state.min_val.shape)} "
                     f"but this batch needs {shape}; was the state initialised for another "
                     f"tensor (per-channel axis length)?")


def _checked_range(state: ObserverState, name: str) -> tuple[jax.Array, jax.Array]:
  """(min_val, max_val) of a state; ValueError when, concretely, it has seen no data."""
  count = _checks.concrete(state.count)
  if count is not None and int(count) == 0:
    skipped = _checks.concrete(state.skipped)
    why = (f" ({int(skipped)} batch(es) were skipped for NaN/inf)"
           if skipped is not None and int(skipped) else "")
    raise ValueError(f"{name}: the observer has seen no data{why}, so it has no range to derive "
                     f"qparams from. Run calibration batches through it first (with the "
                     f"'quant_stats' collection mutable).")
  return state.min_val, state.max_val


def merge(a: MinMaxState, b: MinMaxState) -> MinMaxState:
  """Union of two MinMaxObserver states: min of mins, max of maxes, counts added.

  Exact for `MinMaxObserver`; for moving averages it is the union of the two ranges.
  """
  if not (isinstance(a, MinMaxState) and isinstance(b, MinMaxState)):
    raise TypeError(f"merge expects two MinMaxState; got {type(a).__name__} and "
                    f"{type(b).__name__}.")
  if a.min_val.shape != b.min_val.shape:
    raise ValueError(f"merge: state shapes differ: {a.min_val.shape} vs {b.min_val.shape}.")
  count = jnp.where(a.count > _INT32_MAX - b.count, jnp.int32(_INT32_MAX), a.count + b.count)
  return MinMaxState(jnp.minimum(a.min_val, b.min_val), jnp.maximum(a.max_val, b.max_val),
                     count, a.skipped + b.skipped)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _RangeObserver(Generic[_State]):
  """Shared parts: the target grid and the scale floor."""

  spec: QuantSpec
  eps: float = FLOAT32_EPS  # a normal float32 number (numerics.checked_eps)

  def __post_init__(self):
    if not isinstance(self.spec, QuantSpec):
      raise TypeError(f"{type(self).__name__}.spec must be a qjax.QuantSpec; got "
                      f"{type(self.spec).__name__}.")
    numerics.checked_eps(self.eps, name=f"{type(self).__name__}.eps")

  @property
  def name(self) -> str:
    return type(self).__name__

  def range(self, state: _State) -> tuple[jax.Array, jax.Array]:
    """The (min, max) the qparams are computed from."""
    return _checked_range(state, self.name)

  def qparams(self, state: _State) -> QParams:
    """`qparams_from_minmax(*self.range(state), self.spec)`."""
    lo, hi = self.range(state)
    return numerics.qparams_from_minmax(lo, hi, self.spec, eps=float(self.eps))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMaxObserver(_RangeObserver[MinMaxState]):
  """Running min and max: min_t = min(min_{t-1}, min x_t), max_t = max(max_{t-1}, max x_t).

  PyTorch's `MinMaxObserver` (per-tensor) and `PerChannelMinMaxObserver` (`spec.axis`).

  Example:
    >>> obs = MinMaxObserver(spec=QuantSpec(bits=8, signed=False))
    >>> state = obs.update(obs.init(()), jnp.array([-1.0, 3.0]))
    >>> float(obs.qparams(state).scale), int(obs.qparams(state).zero_point)
    (0.01568627543747425, 64)
  """

  def init(self, shape: Any) -> MinMaxState:
    """Empty state for tensors of `shape` (or an array of that shape)."""
    stat_shape = numerics.expected_qparam_shape(self.spec, _shape_of(shape))
    return MinMaxState(jnp.full(stat_shape, jnp.inf, jnp.float32),
                       jnp.full(stat_shape, -jnp.inf, jnp.float32),
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def _batch_range(self, state: MinMaxState, x: jax.typing.ArrayLike, axis_name: AxisName
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    axis_name = checked_axis_name(axis_name, f"{self.name}.update")
    x = _batch_data(x, self.name)
    _check_state_shape(state, MinMaxState,
                       numerics.expected_qparam_shape(self.spec, x.shape), self.name)
    axes = _reduced_axes(self.spec, x.shape)
    lo, hi = _float32.min_and_max(x, axes)
    # min_and_max propagates NaN and keeps +-inf, so a finite range means a finite batch: no
    # extra pass over x. Replicas agree on skipping (pmin of the flag).
    finite = jnp.all(jnp.isfinite(lo)) & jnp.all(jnp.isfinite(hi))
    if axis_name is not None:
      lo, hi = lax.pmin(lo, axis_name), lax.pmax(hi, axis_name)
    ok = finite & _fits_float32(self.name, state, lo, hi)
    if axis_name is not None:
      ok = lax.pmin(ok.astype(jnp.int32), axis_name).astype(bool)
    return lo, hi, ok

  def update(self, state: MinMaxState, x: jax.typing.ArrayLike, *,
             axis_name: AxisName = None) -> MinMaxState:
    """Fold in the batch `x`; `axis_name` reduces the batch range across a mapped axis.

    With `axis_name` (a name or a tuple of names of axes mapped by `jax.shard_map`, `vmap`
    or `pmap`), each shard's min and max are reduced with `lax.pmin` / `lax.pmax` before
    they are folded in, so every shard holds the state a single device would compute from
    the whole batch, exactly (min and max do not round).

    Args:
      state: the state from `init` or a previous `update`.
      x: the batch (its shard, under a mapped axis).
      axis_name: mapped axes the batch is split over; None: `x` is the whole batch.

    Returns:
      The new state.

    Raises:
      TypeError: an `axis_name` that is not None, a str or a tuple of str.
      ValueError: eagerly, for a batch with NaN / +-inf or one that makes the range too wide
        for float32 (`qjax.observers`); under jit such a batch is skipped and counted.

    Example:
      >>> obs = MinMaxObserver(spec=QuantSpec(bits=8))
      >>> shards = jnp.array([[-1.0, 2.0], [0.5, 3.0]])   # one batch, split over 2 devices
      >>> fold = lambda part: obs.update(obs.init(()), part, axis_name="batch")
      >>> states = jax.vmap(fold, axis_name="batch")(shards)
      >>> states.min_val.tolist(), states.max_val.tolist()
      ([-1.0, -1.0], [3.0, 3.0])
    """
    lo, hi, ok = self._batch_range(state, x, axis_name)
    return MinMaxState(jnp.where(ok, jnp.minimum(state.min_val, lo), state.min_val),
                       jnp.where(ok, jnp.maximum(state.max_val, hi), state.max_val),
                       _saturating_increment(state.count, ok),
                       _saturating_increment(state.skipped, ~ok))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MovingAverageMinMaxObserver(MinMaxObserver):
  """Exponential moving average of each batch's min and max (c = `averaging_constant`):

    min_1 = min x_1,   min_t = min_{t-1} + c * (min x_t - min_{t-1})      (max likewise)

  PyTorch's `MovingAverageMinMaxObserver` / `MovingAveragePerChannelMinMaxObserver`, with the
  same float32 roundings (c is rounded to float32; subtract, multiply and add round separately).
  """

  averaging_constant: float = 0.01

  def __post_init__(self):
    super().__post_init__()
    c = self.averaging_constant
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
      raise ValueError(f"MovingAverageMinMaxObserver.averaging_constant must be in (0, 1]; "
                       f"got {c!r}.")

  def update(self, state: MinMaxState, x: jax.typing.ArrayLike, *,
             axis_name: AxisName = None) -> MinMaxState:
    """Fold in the batch `x` (first batch: its range; later: the moving average); the batch
    range is reduced over `axis_name` first, as in `MinMaxObserver.update`."""
    lo, hi, ok = self._batch_range(state, x, axis_name)
    first = state.count == 0
    c = jnp.float32(self.averaging_constant)

    def ema(old, new):
      # PyTorch runs sub, mul and add as three kernels; keep XLA from fusing mul+add into an FMA.
      step = _float32.uncontractible(c * (new - old), new)
      return jnp.where(first, new, old + step)

    return MinMaxState(jnp.where(ok, ema(state.min_val, lo), state.min_val),
                       jnp.where(ok, ema(state.max_val, hi), state.max_val),
                       _saturating_increment(state.count, ok),
                       _saturating_increment(state.skipped, ~ok))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedQParamsObserver(MinMaxObserver):
  """A grid fixed in advance: qparams are always (`scale`, `zero_point`), whatever was seen.

  PyTorch's `FixedQParamsObserver` (the fixed grids of sigmoid and tanh outputs). The state
  still records the running min / max and the batch count, so a report can show what the
  grid clips. qjax uses it for spikes (0 / 1 on scale 1) and for state grids chosen around a
  neuron's threshold.

  Example:
    >>> obs = FixedQParamsObserver(spec=QuantSpec(bits=8, signed=True, symmetric=True),
    ...                            scale=0.25, zero_point=0)
    >>> qp = obs.qparams(obs.update(obs.init(()), jnp.array([-9.0, 1.0])))
    >>> float(qp.scale), int(qp.zero_point)
    (0.25, 0)
  """

  scale: float
  zero_point: int = 0

  def __post_init__(self):
    super().__post_init__()
    if self.spec.per_channel:
      raise ValueError(f"FixedQParamsObserver takes a per-tensor spec (axis=None); got "
                       f"axis={self.spec.axis}.")
    s = self.scale
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not (
        np.isfinite(s) and s > 0 and np.float32(s) > 0):
      raise ValueError(f"FixedQParamsObserver.scale must be a finite Python number > 0 (and "
                       f"> 0 in float32); got {s!r}.")
    z = self.zero_point
    if isinstance(z, bool) or not isinstance(z, (int, np.integer)) or not (
        self.spec.qmin <= z <= self.spec.qmax):
      raise ValueError(f"FixedQParamsObserver.zero_point must be an int in [{self.spec.qmin}, "
                       f"{self.spec.qmax}] (the spec's range); got {z!r}.")

  def qparams(self, state: MinMaxState) -> QParams:
    """(scale, zero_point) as float32 () and int32 (); `state` is not read."""
    del state
    return QParams(jnp.float32(self.scale), jnp.int32(self.zero_point))
