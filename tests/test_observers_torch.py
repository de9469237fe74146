"""Observer parity with PyTorch 2.13: the same batches through torch.ao.quantization's observers
and through qjax's give the same min/max (bit for bit) and the same scale and zero point."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QuantSpec
from qjax import observers as obs

torch = pytest.importorskip("torch")
tq = torch.ao.quantization

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


def _batches(seed, n=6, shape=(32, 12)):
  """Batches with drifting location and scale, so that ranges grow and shrink."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    scale = float(rng.uniform(0.2, 4.0))
    shift = float(rng.uniform(-2.0, 2.0))
    kind = i % 3
    if kind == 0:
      b = rng.standard_normal(shape) * scale + shift
    elif kind == 1:
      b = np.maximum(rng.standard_normal(shape) * scale, 0.0)  # post-ReLU
    else:
      b = rng.standard_t(2.0, shape) * scale  # heavy tails
    out.append(b.astype(np.float32))
  return out


def _torch_dtype(spec):
  return torch.qint8 if spec.signed else torch.quint8


def _torch_qscheme(spec):
  if spec.per_channel:
    return torch.per_channel_symmetric if spec.symmetric else torch.per_channel_affine
  return torch.per_tensor_symmetric if spec.symmetric else torch.per_tensor_affine


def _torch_observer(kind, spec, **kwargs):
  args = dict(dtype=_torch_dtype(spec), qscheme=_torch_qscheme(spec),
              quant_min=spec.qmin, quant_max=spec.qmax, **kwargs)
  if spec.per_channel:
    args["ch_axis"] = spec.axis
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return kind(**args)


def _compare(qjax_observer, torch_observer, batches):
  state = qjax_observer.init(batches[0].shape)
  for b in batches:
    torch_observer(torch.from_numpy(b))
    state = qjax_observer.update(state, jnp.asarray(b))
  np.testing.assert_array_equal(np.asarray(state.min_val), torch_observer.min_val.numpy())
  np.testing.assert_array_equal(np.asarray(state.max_val), torch_observer.max_val.numpy())
  t_scale, t_zp = torch_observer.calculate_qparams()
  scale, zp = qjax_observer.qparams(state)
  np.testing.assert_array_equal(np.asarray(scale), t_scale.numpy().astype(np.float32))
  np.testing.assert_array_equal(np.asarray(zp), t_zp.numpy())


PER_TENSOR_SPECS = [
    QuantSpec(bits=8, signed=False),
    QuantSpec(bits=8, signed=False, reduce_range=True),
    QuantSpec(bits=8, signed=True, symmetric=True),
    QuantSpec(bits=8, signed=True),
    QuantSpec(bits=4, signed=False),
]
PER_CHANNEL_SPECS = [
    QuantSpec(bits=8, signed=True, symmetric=True, axis=0),
    QuantSpec(bits=8, signed=True, symmetric=True, axis=1),
    QuantSpec(bits=8, signed=False, axis=1),
    QuantSpec(bits=6, signed=True, axis=0),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec", PER_TENSOR_SPECS, ids=str)
def test_minmax(spec, seed):
  _compare(obs.MinMaxObserver(spec=spec), _torch_observer(tq.MinMaxObserver, spec),
           _batches(seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("c", [0.01, 0.3])
@pytest.mark.parametrize("spec", PER_TENSOR_SPECS, ids=str)
def test_moving_average(spec, c, seed):
  _compare(obs.MovingAverageMinMaxObserver(spec=spec, averaging_constant=c),
           _torch_observer(tq.MovingAverageMinMaxObserver, spec, averaging_constant=c),
           _batches(seed, n=12))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("spec", PER_CHANNEL_SPECS, ids=str)
def test_per_channel_minmax(spec, seed):
  _compare(obs.MinMaxObserver(spec=spec), _torch_observer(tq.PerChannelMinMaxObserver, spec),
           _batches(seed))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("spec", PER_CHANNEL_SPECS, ids=str)
def test_per_channel_moving_average(spec, seed):
  _compare(obs.MovingAverageMinMaxObserver(spec=spec),
           _torch_observer(tq.MovingAveragePerChannelMinMaxObserver, spec), _batches(seed, n=12))


def test_jitted_moving_average_matches_torch():
  """Under jit XLA would fuse the EMA's multiply-add into an FMA; the state must not change."""
  import jax
  spec = QuantSpec(bits=8, signed=False, reduce_range=True)
  observer = obs.MovingAverageMinMaxObserver(spec=spec, averaging_constant=0.01)
  torch_observer = _torch_observer(tq.MovingAverageMinMaxObserver, spec, averaging_constant=0.01)
  batches = _batches(5, n=40)
  state = observer.init(())
  update = jax.jit(observer.update)
  for b in batches:
    torch_observer(torch.from_numpy(b))
    state = update(state, jnp.asarray(b))
  assert np.asarray(state.min_val) == torch_observer.min_val.numpy()
  assert np.asarray(state.max_val) == torch_observer.max_val.numpy()


@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_histogram_observer(reduce_range, seed):
  """Histogram, range and L2-searched qparams through the public observer class."""
  spec = QuantSpec(bits=8, signed=False, reduce_range=reduce_range)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch_observer = tq.HistogramObserver(bins=256, dtype=torch.quint8, reduce_range=reduce_range)
  observer = obs.HistogramObserver(spec=spec, bins=256)
  state = observer.init(())
  for b in _batches(seed):
    torch_observer(torch.from_numpy(b))
    state = observer.update(state, jnp.asarray(b))
  np.testing.assert_array_equal(np.asarray(state.min_val), torch_observer.min_val.numpy())
  np.testing.assert_array_equal(np.asarray(state.max_val), torch_observer.max_val.numpy())
  np.testing.assert_array_equal(np.asarray(state.histogram), torch_observer.histogram.numpy())
  t_scale, t_zp = torch_observer.calculate_qparams()
  scale, zp = observer.qparams(state)
  np.testing.assert_array_equal(np.asarray(scale).reshape(-1), t_scale.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(zp).reshape(-1), t_zp.numpy().reshape(-1))
