"""Observers updated on a batch split over a 4 (data) x 2 (model) mesh under `jax.shard_map`
with `axis_name` hold exactly the state one device computes from the whole batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from qjax import QuantSpec
from qjax import observers as obs

U8 = QuantSpec(bits=8, signed=False)
S8_CHANNEL = QuantSpec(bits=8, signed=True, symmetric=True, axis=-1)

HISTOGRAM_OBSERVERS = {
    "histogram": obs.HistogramObserver(spec=U8, bins=256),
    "percentile": obs.PercentileObserver(spec=U8, bins=256, percentile=99.0),
    "entropy": obs.EntropyObserver(spec=U8, bins=256),
}
MINMAX_OBSERVERS = {
    "minmax": obs.MinMaxObserver(spec=U8),
    "moving_average": obs.MovingAverageMinMaxObserver(spec=U8, averaging_constant=0.3),
    "fixed": obs.FixedQParamsObserver(spec=U8, scale=0.1, zero_point=3),
    "per_channel": obs.MinMaxObserver(spec=QuantSpec(bits=8, axis=-1)),
    "moving_average_per_channel": obs.MovingAverageMinMaxObserver(
        spec=QuantSpec(bits=8, axis=-1), averaging_constant=0.3),
}
# Where the batch's leading axis is split, and the axis names the observer reduces over.
LAYOUTS = {"data": (P("data"), "data"), "data_and_model": (P(("data", "model")),
                                                           ("data", "model"))}


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


def _growing_batches(seed=0, n=4, shape=(32, 6)):
  """Batches whose range grows (and once stays), so every histogram branch runs."""
  rng = np.random.default_rng(seed)
  out = []
  for scale in (1.0, 3.0, 3.0, 10.0)[:n]:
    x = rng.normal(size=shape).astype(np.float32) * np.float32(scale)
    out.append(x)
  out[2] = np.clip(out[2], out[1].min(), out[1].max())   # the same range: plain addition
  return out


def _sharded_update(observer, mesh, spec, axis_name):
  def update(state, x):
    return observer.update(state, x, axis_name=axis_name)

  return jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(P(), spec), out_specs=P()))


def _assert_states_equal(got, want):
  for name, a, b in zip(want._fields, got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name, strict=True)


# Percentile, MSE and entropy observers run the histogram's update: one case each of those.
@pytest.mark.parametrize("name,layout", [
    pytest.param("histogram", "data", marks=pytest.mark.slow), ("histogram", "data_and_model"),
    ("percentile", "data"), pytest.param("percentile", "data_and_model", marks=pytest.mark.slow),
    pytest.param("entropy", "data", marks=pytest.mark.slow)])
def test_histogram_observers_equal_one_device(mesh, name, layout):
  observer = HISTOGRAM_OBSERVERS[name]
  spec, axis_name = LAYOUTS[layout]
  sharded = _sharded_update(observer, mesh, spec, axis_name)
  single = jax.jit(observer.update)
  state = want = observer.init(())
  for x in _growing_batches():
    state, want = sharded(state, x), single(want, jax.device_put(x, jax.devices()[0]))
    _assert_states_equal(state, want)
  assert int(want.count) == 4 and float(want.histogram.sum()) == 4 * 32 * 6
  if name == "percentile":
    np.testing.assert_array_equal(np.asarray(observer.range(state)),
                                  np.asarray(observer.range(want)), strict=True)


@pytest.mark.parametrize("name", sorted(MINMAX_OBSERVERS))
def test_minmax_observers_equal_one_device(mesh, name):
  observer = MINMAX_OBSERVERS[name]
  spec, axis_name = LAYOUTS["data_and_model"]
  sharded = _sharded_update(observer, mesh, spec, axis_name)
  single = jax.jit(observer.update)
  state = want = observer.init((32, 6))
  for x in _growing_batches(seed=1):
    state, want = sharded(state, x), single(want, x)
    _assert_states_equal(state, want)
  np.testing.assert_array_equal(np.asarray(observer.qparams(state).scale),
                                np.asarray(observer.qparams(want).scale), strict=True)


def test_histogram_without_axis_name_sees_only_its_shard(mesh):
  """The check can fail: without axis_name each shard's histogram holds its slice only."""
  observer = HISTOGRAM_OBSERVERS["histogram"]
  def update(state, x):   # a leading axis on each leaf, to stack the shards' states
    return jax.tree_util.tree_map(lambda v: v[None], observer.update(state, x))

  local = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(P(), P("data")),
                                out_specs=P("data")))
  x = _growing_batches()[0]
  states = local(observer.init(()), x)
  np.testing.assert_array_equal(np.asarray(states.histogram.sum(axis=1)), np.full(4, 8 * 6))
  np.testing.assert_array_equal(np.asarray(states.min_val), x.reshape(4, -1).min(axis=1))
  assert not np.array_equal(np.asarray(states.min_val), np.full(4, x.min()))


def test_a_bad_shard_skips_the_batch_everywhere(mesh):
  observer = HISTOGRAM_OBSERVERS["histogram"]
  sharded = _sharded_update(observer, mesh, P("data"), "data")
  first = _growing_batches()[0]
  state = sharded(observer.init(()), first)
  bad = _growing_batches(seed=5)[3]
  bad[-1, 0] = np.nan   # only the last data shard holds it
  after = sharded(state, bad)
  _assert_states_equal(after._replace(skipped=state.skipped), state)
  assert int(after.skipped) == 1


def test_weight_observers_over_a_kernel_split_over_output_channels(mesh):
  """Per-channel statistics of a channel-sharded kernel need no reduction (each shard holds
  its channels); a per-tensor weight observer reduces over the model axis."""
  kernel = np.random.default_rng(3).normal(size=(12, 8)).astype(np.float32)
  per_channel = obs.MinMaxObserver(spec=S8_CHANNEL)
  per_tensor = obs.MinMaxObserver(spec=QuantSpec(bits=8, signed=True, symmetric=True))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P(None, "model"),
                     out_specs=(P("model"), P()))
  def observe(k):
    channels = per_channel.update(per_channel.init(k.shape), k)
    tensor = per_tensor.update(per_tensor.init(()), k, axis_name="model")
    return channels.min_val, tensor.min_val

  channel_min, tensor_min = jax.jit(observe)(kernel)
  np.testing.assert_array_equal(np.asarray(channel_min), kernel.min(axis=0), strict=True)
  assert float(tensor_min) == float(kernel.min())


def test_axis_name_is_validated():
  observer = HISTOGRAM_OBSERVERS["histogram"]
  with pytest.raises(TypeError, match="axis_name must be None, a mapped axis name"):
    observer.update(observer.init(()), jnp.ones(4), axis_name=3)
  with pytest.raises(TypeError, match="axis_name must be None"):
    MINMAX_OBSERVERS["minmax"].update(MINMAX_OBSERVERS["minmax"].init(()), jnp.ones(4),
                                      axis_name=())
