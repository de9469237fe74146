"""Observers: pure (init, update, qparams) over NamedTuple states; invariants, NaN policy,
empty-state errors, jit / no-jit agreement, cross-replica reduction."""

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax import QuantSpec, numerics
from qjax import observers as obs

U8 = QuantSpec(bits=8, signed=False)
I8_SYM_PC = QuantSpec(bits=8, signed=True, symmetric=True, axis=-1)

OBSERVERS = {
    "minmax": obs.MinMaxObserver(spec=U8),
    "minmax_per_channel": obs.MinMaxObserver(spec=I8_SYM_PC),
    "moving_average": obs.MovingAverageMinMaxObserver(spec=U8),
    "moving_average_per_channel": obs.MovingAverageMinMaxObserver(spec=I8_SYM_PC,
                                                                  averaging_constant=0.3),
    "histogram": obs.HistogramObserver(spec=U8, bins=64),
    "percentile": obs.PercentileObserver(spec=U8, bins=64, percentile=99.0),
}
RNG = np.random.default_rng(7)
BATCHES = [jnp.asarray((RNG.standard_normal((16, 5)) * s + m).astype(np.float32))
           for s, m in ((1.0, 0.0), (2.0, 0.5), (0.5, -1.0))]


def _run(observer, batches, update=None):
  update = update or observer.update
  state = observer.init(batches[0].shape)
  for b in batches:
    state = update(state, b)
  return state


@functools.cache
def _jitted_update(observer):
  """One jitted update per observer, shared by the tests that run it under jit: one
  compilation per batch shape instead of one per test."""
  return jax.jit(observer.update)


class ObserverContractTest(chex.TestCase):
  """One suite over every observer (STYLE habit 5)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*OBSERVERS.items())
  def test_jit_and_eager_agree_and_qparams_are_valid(self, observer):
    state = _run(observer, BATCHES, self.variant(observer.update))
    eager = _run(observer, BATCHES)
    chex.assert_trees_all_equal(state, eager)
    assert int(state.count) == len(BATCHES) and int(state.skipped) == 0
    scale, zp = observer.qparams(state)
    assert scale.dtype == jnp.float32 and zp.dtype == jnp.int32
    assert np.all(np.asarray(scale) > 0)
    assert np.all((np.asarray(zp) >= observer.spec.qmin) & (np.asarray(zp) <= observer.spec.qmax))

  @parameterized.named_parameters(*OBSERVERS.items())
  def test_state_is_float32_stats_and_int32_counters(self, observer):
    state = observer.init((16, 5))
    for name, value in state._asdict().items():
      expected = jnp.int32 if name in ("count", "skipped") else jnp.float32
      assert value.dtype == expected, name
    assert int(state.count) == 0

  @parameterized.named_parameters(*OBSERVERS.items())
  def test_no_data_raises(self, observer):
    with pytest.raises(ValueError, match="has seen no data"):
      observer.qparams(observer.init((16, 5)))

  @parameterized.named_parameters(*OBSERVERS.items())
  def test_no_data_under_jit_gives_nan_scale(self, observer):
    scale, _ = jax.jit(observer.qparams)(observer.init((16, 5)))
    assert np.all(np.isnan(np.asarray(scale)))

  @parameterized.named_parameters(*OBSERVERS.items())
  def test_nonfinite_batch_raises_eagerly(self, observer):
    state = observer.init((16, 5))
    bad = BATCHES[0].at[3, 1].set(jnp.nan).at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"1 NaN and 1 \+-inf"):
      observer.update(state, bad)

  @parameterized.named_parameters(*OBSERVERS.items())
  def test_nonfinite_batch_is_skipped_and_counted_under_jit(self, observer):
    update = _jitted_update(observer)
    state = update(observer.init((16, 5)), BATCHES[0])
    for bad_value in (jnp.nan, jnp.inf, -jnp.inf):
      after = update(state, BATCHES[1].at[2, 2].set(bad_value))
      chex.assert_trees_all_equal(after._replace(skipped=state.skipped), state)
      assert int(after.skipped) == int(state.skipped) + 1
    # A skipped first batch leaves the observer empty: still an error, and it says why.
    empty = update(observer.init((16, 5)), BATCHES[0].at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"1 batch\(es\) were skipped"):
      observer.qparams(empty)

  @parameterized.named_parameters(*OBSERVERS.items())
  def test_a_nan_in_a_large_batch_is_skipped_under_jit(self, observer):
    # XLA:CPU runs large min / max reductions in kernels that drop NaN; the range must not.
    update = _jitted_update(observer)
    state = update(observer.init((4096, 5)), jnp.tile(BATCHES[0], (256, 1)))
    for where in ((4095, 4), (0, 0), (2000, 2)):
      after = update(state, jnp.tile(BATCHES[1], (256, 1)).at[where].set(jnp.nan))
      chex.assert_trees_all_equal(after._replace(skipped=state.skipped), state)
      assert int(after.skipped) == int(state.skipped) + 1

  @parameterized.named_parameters(*OBSERVERS.items())
  def test_range_too_wide_for_float32_raises_eagerly(self, observer):
    # Finite data whose max - min overflows float32: one batch, or two batches together.
    state = observer.init((16, 5))
    with pytest.raises(ValueError, match=r"update: the range .* is too wide for float32"):
      observer.update(state, BATCHES[0].at[0].set(-3e38).at[1].set(3e38))
    state = observer.update(state, jnp.full((16, 5), 3e38, jnp.float32))
    with pytest.raises(ValueError, match=r"too wide for float32.*Clip the data.*skipped and "
                       r"counted in state\.skipped"):
      observer.update(state, jnp.full((16, 5), -3e38, jnp.float32))

  @parameterized.named_parameters(*OBSERVERS.items())
  def test_range_too_wide_for_float32_is_skipped_and_counted_under_jit(self, observer):
    update = _jitted_update(observer)
    state = update(observer.init((16, 5)), jnp.full((16, 5), 3e38, jnp.float32))
    after = update(state, jnp.full((16, 5), -3e38, jnp.float32))
    chex.assert_trees_all_equal(after._replace(skipped=state.skipped), state)
    assert int(after.skipped) == int(state.skipped) + 1
    for value in jax.tree_util.tree_leaves(after):
      assert np.all(np.isfinite(np.asarray(value))), after
    scale, _ = observer.qparams(after)
    assert np.all(np.isfinite(np.asarray(scale)))
    # One batch spanning too much, first or later, is skipped as well.
    empty = update(observer.init((16, 5)), BATCHES[0].at[0].set(-3e38).at[1].set(3e38))
    assert (int(empty.count), int(empty.skipped)) == (0, 1)
    later = update(state, BATCHES[0].at[0].set(-3e38))
    chex.assert_trees_all_equal(later._replace(skipped=state.skipped), state)

  @parameterized.named_parameters(*OBSERVERS.items())
  def test_widest_float32_range_is_accepted(self, observer):
    edge = np.float32(np.finfo(np.float32).max / 2)  # max - min == float32 max exactly
    state = observer.update(observer.init((16, 5)), BATCHES[0].at[0].set(-edge).at[1].set(edge))
    assert int(state.count) == 1
    scale, _ = observer.qparams(state)
    assert np.all(np.isfinite(np.asarray(scale)) & (np.asarray(scale) > 0))

  @parameterized.named_parameters(*OBSERVERS.items())
  def test_bad_batches_raise(self, observer):
    state = observer.init((16, 5))
    with pytest.raises(ValueError, match="empty"):
      observer.update(state, jnp.zeros((0, 5), jnp.float32))
    with pytest.raises(TypeError, match="floating-point"):
      observer.update(state, jnp.ones((16, 5), jnp.int32))

  @parameterized.named_parameters(*OBSERVERS.items())
  def test_hashable_and_equal_by_value(self, observer):
    import dataclasses
    assert hash(observer) == hash(dataclasses.replace(observer))
    assert observer == dataclasses.replace(observer)

  @parameterized.named_parameters(*OBSERVERS.items())
  def test_does_not_recompile(self, observer):
    traces = []

    def update(state, x):
      traces.append(None)
      return observer.update(state, x)

    _run(observer, BATCHES, jax.jit(update))
    assert len(traces) == 1


class MinMaxTest(parameterized.TestCase):

  def test_running_min_max_and_qparams(self):
    observer = obs.MinMaxObserver(spec=U8)
    state = _run(observer, BATCHES)
    everything = jnp.concatenate(BATCHES)
    assert float(state.min_val) == float(everything.min())
    assert float(state.max_val) == float(everything.max())
    chex.assert_trees_all_equal(
        observer.qparams(state),
        numerics.qparams_from_minmax(everything.min(), everything.max(), U8))

  def test_per_channel_along_axis(self):
    observer = obs.MinMaxObserver(spec=QuantSpec(bits=8, symmetric=True, axis=0))
    state = _run(observer, BATCHES)
    everything = jnp.concatenate(BATCHES, axis=1)
    np.testing.assert_array_equal(state.min_val, everything.min(axis=1))
    np.testing.assert_array_equal(state.max_val, everything.max(axis=1))

  def test_state_for_another_channel_count_raises(self):
    observer = obs.MinMaxObserver(spec=I8_SYM_PC)
    with pytest.raises(ValueError, match=r"statistics of shape \(4,\) but this batch needs \(5,\)"):
      observer.update(observer.init((3, 4)), BATCHES[0])

  def test_counter_saturates(self):
    observer = obs.MinMaxObserver(spec=U8)
    state = observer.init(())._replace(count=jnp.int32(np.iinfo(np.int32).max))
    assert int(observer.update(state, BATCHES[0]).count) == np.iinfo(np.int32).max

  def test_merge_is_union(self):
    observer = obs.MinMaxObserver(spec=U8)
    a, b = _run(observer, BATCHES[:1]), _run(observer, BATCHES[1:])
    chex.assert_trees_all_equal(obs.merge(a, b), _run(observer, BATCHES))

  def test_axis_name_reduces_across_replicas(self):
    observer = obs.MinMaxObserver(spec=I8_SYM_PC)
    shards = jnp.stack(BATCHES)
    state = observer.init(BATCHES[0].shape)
    per_replica = jax.vmap(lambda b: observer.update(state, b, axis_name="d"),
                           axis_name="d")(shards)
    whole = observer.update(state, jnp.concatenate(BATCHES))
    for i in range(len(BATCHES)):  # every replica holds the global range
      chex.assert_trees_all_equal(jax.tree_util.tree_map(lambda v, i=i: v[i], per_replica), whole)

  def test_axis_name_skips_everywhere_when_one_replica_is_bad(self):
    observer = obs.MinMaxObserver(spec=U8)
    shards = jnp.stack([BATCHES[0], BATCHES[1].at[0, 0].set(jnp.nan)])
    state = observer.init(())
    out = jax.vmap(lambda b: observer.update(state, b, axis_name="d"), axis_name="d")(shards)
    np.testing.assert_array_equal(out.count, [0, 0])
    np.testing.assert_array_equal(out.skipped, [1, 1])


class MovingAverageTest(parameterized.TestCase):

  def test_first_batch_sets_range_then_ema(self):
    c = 0.25
    observer = obs.MovingAverageMinMaxObserver(spec=U8, averaging_constant=c)
    state = _run(observer, BATCHES)
    lo = np.float32(BATCHES[0].min())
    for b in BATCHES[1:]:  # float32 ops one at a time, as PyTorch evaluates them
      lo = np.float32(lo + np.float32(np.float32(c) * np.float32(np.float32(b.min()) - lo)))
    assert np.asarray(state.min_val) == lo

  @parameterized.parameters(0.0, 1.5, -0.1, True)
  def test_averaging_constant_validated(self, c):
    with pytest.raises(ValueError, match=r"averaging_constant must be in \(0, 1\]"):
      obs.MovingAverageMinMaxObserver(spec=U8, averaging_constant=c)


class ConfigErrorsTest(parameterized.TestCase):

  def test_spec_type(self):
    with pytest.raises(TypeError, match="must be a qjax.QuantSpec"):
      obs.MinMaxObserver(spec="uint8")

  def test_histogram_is_per_tensor(self):
    with pytest.raises(ValueError, match="per-tensor only"):
      obs.HistogramObserver(spec=I8_SYM_PC)

  @parameterized.parameters(0, -3, 2.5)
  def test_bins(self, bins):
    with pytest.raises(ValueError, match="bins must be a positive int"):
      obs.HistogramObserver(spec=U8, bins=bins)

  @parameterized.parameters(50, 101, 0.0)
  def test_percentile(self, p):
    with pytest.raises(ValueError, match=r"percentile must be in \(50, 100\]"):
      obs.PercentileObserver(spec=U8, percentile=p)

  def test_eps(self):
    with pytest.raises(ValueError, match="eps must be a positive finite float"):
      obs.MinMaxObserver(spec=U8, eps=0.0)

  @parameterized.parameters(1e-45, 1e-39, 1e-46, 1e39)
  def test_eps_must_be_a_normal_float32(self, eps):
    # 1e-45 / 1e-39 are subnormal in float32, 1e-46 is 0 and 1e39 is inf: none floors a scale.
    for cls in (obs.MinMaxObserver, obs.MovingAverageMinMaxObserver, obs.HistogramObserver,
                obs.PercentileObserver):
      with pytest.raises(ValueError, match=rf"{cls.__name__}\.eps must be a normal float32 "
                         rf"number, in \[np\.finfo\(np\.float32\)\.tiny"):
        cls(spec=U8, eps=eps)

  def test_smallest_normal_eps_floors_the_scale(self):
    tiny = float(np.finfo(np.float32).tiny)
    observer = obs.MinMaxObserver(spec=U8, eps=tiny)
    state = observer.update(observer.init(()), jnp.zeros((3,), jnp.float32))
    assert float(observer.qparams(state).scale) == tiny

  def test_wrong_state_type(self):
    with pytest.raises(TypeError, match="expected a HistogramState"):
      obs.HistogramObserver(spec=U8).update(obs.MinMaxObserver(spec=U8).init(()), BATCHES[0])


finite_batches = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
    # XLA:CPU flushes subnormals to zero (see qjax.observers); they never change qparams.
    elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False))
FIXED_BATCH = 6 * 6 * 6  # the largest batch finite_batches draws


def _fixed_shape(batch: np.ndarray) -> jax.Array:
  """The batch's values repeated to FIXED_BATCH entries: the same values (so the same min and
  max) in one shape, which the observer's update compiles once for."""
  return jnp.asarray(np.resize(batch.ravel(), FIXED_BATCH))


@settings(max_examples=25, deadline=None)
@given(st.lists(finite_batches, min_size=1, max_size=4))
def test_minmax_properties(batches):
  """The range covers every value seen and is attained; qparams represent 0 exactly."""
  observer = obs.MinMaxObserver(spec=U8)
  state = observer.init(())
  for b in batches:
    state = observer.update(state, _fixed_shape(b))
  values = np.concatenate([b.ravel() for b in batches])
  assert float(state.min_val) == values.min() and float(state.max_val) == values.max()
  qp = observer.qparams(state)
  zero = numerics.quantize_dequantize(jnp.zeros((1,), jnp.float32), U8, qp)
  assert float(zero[0]) == 0.0


@settings(max_examples=25, deadline=None)
@given(st.lists(finite_batches, min_size=1, max_size=4),
       st.floats(0.01, 1.0))
def test_moving_average_stays_within_seen_range(batches, c):
  """Each EMA step is a convex combination: the range stays inside [min seen, max seen], up to
  the float32 rounding of old + c * (new - old) (a few ulps of the largest value: with c = 1,
  5121 + (1024.4749 - 5121) is 1024.4746)."""
  observer = obs.MovingAverageMinMaxObserver(spec=U8, averaging_constant=c)
  state = observer.init(())
  for b in batches:
    state = observer.update(state, _fixed_shape(b))
  values = np.concatenate([b.ravel() for b in batches]).astype(np.float64)
  slack = 4 * np.finfo(np.float32).eps * np.abs(values).max() * len(batches)
  lo, hi = float(state.min_val), float(state.max_val)
  assert values.min() - slack <= lo <= hi <= values.max() + slack


def test_subnormal_extremes_do_not_change_qparams():
  """XLA:CPU flushes subnormals: the state may read 0, the qparams equal the exact range's."""
  observer = obs.MinMaxObserver(spec=U8)
  tiny = np.float32(1e-45)
  state = observer.update(observer.init(()), jnp.asarray([tiny], jnp.float32))
  assert float(state.max_val) in (0.0, float(tiny))
  chex.assert_trees_all_equal(observer.qparams(state),
                              numerics.qparams_from_minmax(jnp.float32(0), jnp.float32(0), U8))
