"""MSEObserver and EntropyObserver: their searches against independent NumPy references (an
exact piecewise integral of the squared error over every candidate range; TensorRT's KL
threshold search written out with loops), empirical error on sampled data, jit == eager, bad
inputs, and a QuantDense calibrate -> convert -> int8 round trip.

Few bin counts and specs, so that each search compiles once or twice for the whole file."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax
import qjax.nn as qnn
from qjax import QuantSpec, integer, numerics
from qjax import observers as obs
from qjax.observers.error import entropy_threshold, mse_search_range

BINS = 16                    # MSE searches
KL_BINS = 32                 # entropy searches
SYM4 = QuantSpec(bits=4, signed=True, symmetric=True)     # 8 levels over [0, t]
AFF3 = QuantSpec(bits=3, signed=False)
EPS = float(np.finfo(np.float32).eps)
N = 4000                     # samples per calibration set (one compiled update)


# ------------------------------------------------------------------------------------------
# Independent references (float64).


@functools.partial(jax.jit, static_argnums=2)
def _grids(lo, hi, spec):
  return jax.vmap(lambda a, b: numerics.qparams_from_minmax(a, b, spec, eps=EPS))(lo, hi)


def grids_of(ranges: list, spec: QuantSpec) -> list[tuple[float, int]]:
  """The grids (scale, zero point) the observer's qparams give for each range [lo, hi]
  (in one call, padded to one length: one compilation)."""
  padded = ranges + [ranges[0]] * (2 + (BINS + 1) ** 2 - len(ranges))
  lo, hi = np.asarray(padded, np.float32).T
  scale, zero_point = _grids(lo, hi, spec)
  scale, zero_point = np.asarray(scale, np.float64), np.asarray(zero_point)
  return [(float(scale[i]), int(zero_point[i])) for i in range(len(ranges))]


def histogram_mse(hist, min_val, max_val, scale, zero_point, spec) -> float:
  """Expected (x - Q(x))^2 for mass uniform within each bin: each bin is cut at the decision
  boundaries of the grid (mid-points between levels) and (x - level)^2 integrated piecewise."""
  hist = np.asarray(hist, np.float64)
  bins = len(hist)
  w = (float(max_val) - float(min_val)) / bins
  a = float(min_val) + w * np.arange(bins)
  b = a + w
  levels = (np.arange(spec.qmin, spec.qmax + 1) - zero_point) * scale
  mids = (levels[:-1] + levels[1:]) / 2
  cell_lo = np.concatenate([[-np.inf], mids])
  cell_hi = np.concatenate([mids, [np.inf]])
  lo = np.maximum(a[:, None], cell_lo[None])
  hi = np.minimum(b[:, None], cell_hi[None])
  piece = np.where(hi > lo, ((hi - levels) ** 3 - (lo - levels) ** 3) / 3, 0.0)
  return float(np.sum(hist / w * piece.sum(axis=1)) / hist.sum())


def candidate_ranges(min_val: float, max_val: float, bins: int, spec: QuantSpec) -> list:
  """Every range the search is documented to consider (bin edges)."""
  edges = min_val + (max_val - min_val) / bins * np.arange(bins + 1)
  edges[-1] = max_val
  if spec.symmetric:
    return [(max(min_val, -t), min(max_val, t)) for t in np.abs(edges) if t > 0]
  if min_val >= 0:
    return [(min_val, e) for e in edges[1:]]
  if max_val <= 0:
    return [(e, max_val) for e in edges[:-1]]
  return [(lo, hi) for lo in edges if lo <= 0 for hi in edges if hi >= 0]


def tensorrt_divergences(hist, levels: int) -> dict:
  """KL(P || Q) of each threshold bin i (TensorRT / MXNet's construction, loops)."""
  hist = np.asarray(hist, np.float64)
  out = {}
  for i in range(levels, len(hist) + 1):
    p = hist[:i].copy()
    p[i - 1] += hist[i:].sum()
    q = np.zeros(i)
    merged = i // levels
    for j in range(levels):
      start = j * merged
      stop = i if j == levels - 1 else start + merged
      nonzero = p[start:stop] != 0
      if nonzero.any():
        q[start:stop] = np.where(nonzero, hist[start:stop].sum() / nonzero.sum(), 0.0)
    if np.any((p > 0) & (q == 0)) or q.sum() == 0:
      out[i] = np.inf
      continue
    p, q = p / p.sum(), q / q.sum()
    keep = p > 0
    out[i] = float(np.sum(p[keep] * np.log(p[keep] / q[keep])))
  return out


def fake_quant(x: np.ndarray, scale: float, zero_point: int, spec: QuantSpec) -> np.ndarray:
  q = np.clip(np.round(x.astype(np.float64) / scale) + zero_point, spec.qmin, spec.qmax)
  return (q - zero_point) * scale


# ------------------------------------------------------------------------------------------
# MSE: the argmin over every candidate.


histograms = st.lists(st.integers(0, 40), min_size=BINS, max_size=BINS).map(
    lambda c: np.asarray(c, np.float32))
ranges = st.tuples(st.floats(-6, 6, width=32), st.floats(0.0625, 8, width=32),
                   st.sampled_from(["free", "zero_min", "zero_max"]))


@settings(max_examples=20, deadline=None)
@given(hist=histograms, where=ranges, spec=st.sampled_from([SYM4, AFF3]), extra=st.integers(0, 15))
def test_mse_range_is_the_least_error_candidate(hist, where, spec, extra):
  """The chosen range's exact histogram MSE (brute force, float64) is the least over all
  candidates (float32 rounding aside), never above the min/max range's, and is the error the
  search reports."""
  hist = hist.copy()
  hist[extra] += 1   # at least one count
  start, width, kind = where
  lo = {"free": start, "zero_min": 0.0, "zero_max": -width}[kind]
  lo, hi = float(np.float32(lo)), float(np.float32(lo + width))
  got_lo, got_hi, got_mse = mse_search_range(jnp.asarray(hist), lo, hi, spec=spec)
  got_lo, got_hi = float(got_lo), float(got_hi)
  assert lo <= got_lo <= got_hi <= hi
  ranges = [(got_lo, got_hi), (lo, hi), *candidate_ranges(lo, hi, BINS, spec)]
  chosen, minmax, *errors = [histogram_mse(hist, lo, hi, scale, zp, spec)
                             for scale, zp in grids_of(ranges, spec)]
  assert chosen <= min(errors) * (1 + 1e-5) + 1e-12
  assert chosen <= minmax * (1 + 1e-5) + 1e-12
  np.testing.assert_allclose(float(got_mse), chosen, rtol=1e-4, atol=1e-9)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), spec=st.sampled_from([SYM4, AFF3]))
def test_mse_clip_beats_minmax_on_laplace_data_with_outliers(seed, spec):
  """On Laplace samples with two far outliers, the MSE observer's grid quantizes the data
  itself with less than half the squared error of the min/max grid (4 and 3 bits; ~0.3x)."""
  rng = np.random.default_rng(seed)
  x = rng.laplace(size=N).astype(np.float32)
  if not spec.symmetric:
    x = np.abs(x)
  x[:2] = np.float32(20.0) * np.where(x[:2] < 0, -1, 1)
  errors = []
  for o in (obs.MSEObserver(spec=spec, bins=BINS), obs.MinMaxObserver(spec=spec)):
    scale, zp = o.qparams(o.update(o.init(x.shape), x))
    errors.append(np.mean((fake_quant(x, float(scale), int(zp), spec) - x) ** 2))
  assert errors[0] < 0.5 * errors[1]


def test_mse_one_point_and_known_ranges():
  hist = jnp.array([30.0, 60.0, 100.0, 60.0, 30.0, 0.0, 0.0, 1.0] * 2)
  lo, hi, mse = mse_search_range(hist, 2.0, 2.0, spec=SYM4)
  assert (float(lo), float(hi), float(mse)) == (2.0, 2.0, 0.0)
  # All mass in the lowest bin of [0, 16]: the tightest candidate, the first edge.
  lo, hi, _ = mse_search_range(jnp.zeros(BINS).at[0].set(5.0), 0.0, 16.0, spec=AFF3)
  assert (float(lo), float(hi)) == (0.0, 1.0)


# ------------------------------------------------------------------------------------------
# Entropy: TensorRT's threshold.


@settings(max_examples=20, deadline=None)
@given(counts=st.lists(st.integers(0, 60), min_size=KL_BINS, max_size=KL_BINS),
       sparsity=st.floats(0, 0.6), amax=st.floats(0.125, 10, width=32), seed=st.integers(0, 99))
def test_entropy_threshold_matches_tensorrt_reference(counts, sparsity, amax, seed):
  """On a histogram of |x| over [0, amax] the threshold is the reference's argmin bin edge
  (where the reference's best and second best are closer than float32 can tell, a bin of
  equal divergence)."""
  hist = np.asarray(counts, np.float32)
  hist[np.random.default_rng(seed).random(KL_BINS) < sparsity] = 0
  hist[0] += 1
  levels = SYM4.qmax - SYM4.qmin + 1 >> 1
  t, kl = entropy_threshold(jnp.asarray(hist), 0.0, amax, levels=levels)
  divergences = tensorrt_divergences(hist, levels)
  got = round(float(t) / amax * KL_BINS)
  best = min(divergences, key=lambda i: (divergences[i], i))
  assert float(t) == pytest.approx(amax * got / KL_BINS, rel=1e-6)
  runner_up = min((d for i, d in divergences.items() if i != best), default=np.inf)
  if runner_up - divergences[best] > 1e-5 * max(1.0, divergences[best]):
    assert got == best
  else:
    assert divergences[got] <= divergences[best] + 1e-5 * max(1.0, divergences[best])
  np.testing.assert_allclose(float(kl), divergences[got], rtol=1e-4, atol=1e-6)


def test_entropy_observer_clips_tails_and_folds_signs():
  """Symmetric grids: the threshold is found on |x| (TensorRT's 128 levels for int8 are 8
  here, 4 bits) and clips the Laplace tails; x and -x give mirrored ranges."""
  observer = obs.EntropyObserver(spec=SYM4, bins=KL_BINS)
  assert observer.levels == 8
  x = np.random.default_rng(3).laplace(size=N).astype(np.float32)
  ranges = []
  for data in (x, -x):
    lo, hi = observer.range(observer.update(observer.init(data.shape), data))
    ranges.append((float(lo), float(hi)))
  (lo, hi), (mirror_lo, mirror_hi) = ranges
  assert hi < 0.8 * np.abs(x).max() and lo == -hi
  assert (mirror_lo, mirror_hi) == (-hi, -lo)
  # Data far from 0: the range stays ordered inside the data's (clipped to [-t, t]).
  shifted = np.abs(x) + 10
  lo, hi = observer.range(observer.update(observer.init(x.shape), shifted))
  assert shifted.min() == float(lo) <= float(hi) < shifted.max()


# ------------------------------------------------------------------------------------------
# jit == eager, errors.


def test_jit_and_eager_agree():
  """Range and qparams, eagerly and under jax.jit, bit for bit."""
  x = np.random.default_rng(5).laplace(size=N).astype(np.float32)
  x[0] = 30.0
  for observer in (obs.MSEObserver(spec=AFF3, bins=BINS),
                   obs.EntropyObserver(spec=SYM4, bins=KL_BINS)):
    state = observer.update(observer.init(x.shape), x)
    eager = observer.range(state), observer.qparams(state)
    jitted = jax.jit(lambda s, o=observer: (o.range(s), o.qparams(s)))(state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, eager, jitted)
    if isinstance(observer, obs.MSEObserver):
      assert float(eager[0][1]) < 10   # the outlier at 30 is clipped


def test_bad_fields_and_inputs():
  assert hash(obs.MSEObserver(spec=SYM4)) == hash(obs.MSEObserver(spec=SYM4))
  assert obs.EntropyObserver(spec=SYM4).bins == 2048
  with pytest.raises(ValueError, match=r"MSEObserver is per-tensor only.*axis=0"):
    obs.MSEObserver(spec=QuantSpec(bits=8, axis=0))
  with pytest.raises(ValueError, match=r"MSEObserver.bins must be a positive int; got 0"):
    obs.MSEObserver(spec=SYM4, bins=0)
  with pytest.raises(TypeError, match=r"EntropyObserver.spec must be a qjax.QuantSpec"):
    obs.EntropyObserver(spec=8)
  with pytest.raises(ValueError, match=r"EntropyObserver.bins must be >= .* 128 .*got bins=64"):
    obs.EntropyObserver(spec=QuantSpec(bits=8, symmetric=True), bins=64)
  with pytest.raises(ValueError, match=r"levels must be an int in \[1, bins=4\]; got 5"):
    entropy_threshold(jnp.ones(4), 0.0, 1.0, levels=5)
  with pytest.raises(ValueError, match=r"spec must be a per-tensor qjax.QuantSpec"):
    mse_search_range(jnp.ones(4), 0.0, 1.0, spec=QuantSpec(axis=1))
  observer = obs.MSEObserver(spec=SYM4, bins=BINS)
  with pytest.raises(ValueError, match=r"MSEObserver: the observer has seen no data"):
    observer.qparams(observer.init(()))
  # Affine entropy calibration (all 16 levels on [0, t]) needs non-negative data.
  unsigned = obs.EntropyObserver(spec=QuantSpec(bits=4, signed=False), bins=KL_BINS)
  assert unsigned.levels == 16
  x = np.linspace(-1.0, 2.0, N, dtype=np.float32)
  state = unsigned.update(unsigned.init(x.shape), x)
  with pytest.raises(ValueError, match=r"affine spec \(symmetric=False\) needs non-negative "
                     r"data.*-1.0.*symmetric=True"):
    unsigned.range(state)


# ------------------------------------------------------------------------------------------
# In a model.


class Net(nn.Module):
  qconfig: qnn.QConfig

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(self.qconfig, name="quant")(x, mode=mode)
    x = qnn.QuantDense(4, qconfig=self.qconfig, name="fc")(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


def test_quant_dense_calibrates_converts_and_runs_int8():
  """QConfig takes the MSE observer for activations; calibrate -> convert -> "int8" runs
  within a few output steps of the float layer."""
  activation = obs.MSEObserver(spec=QuantSpec(bits=8, signed=False), bins=BINS)
  config = qnn.QConfig(activation=activation, weight=obs.MinMaxObserver(
      spec=QuantSpec(bits=8, signed=True, symmetric=True, axis=-1)))
  model = Net(config)
  x = np.random.default_rng(0).laplace(size=(64, 6)).astype(np.float32)
  x[0, 0] = 40.0   # an outlier (at 8 bits the least-MSE grid still spans it)
  variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="unsafe_rbg"), x,
                                           mode="calibrate"))(x[:2])
  variables = qnn.calibrate(model, variables, [x[:32], x[32:]])
  assert variables["quant_stats"]["quant"]["histogram"].shape == (BINS,)
  int_vars = qjax.convert(model, variables, x[:2])
  y_int = np.asarray(jax.jit(lambda v, x: model.apply(v, x, mode="int8"))(int_vars, x))
  y_float = np.asarray(jax.jit(lambda v, x: model.apply(v, x, mode="float"))(variables, x))
  out_scale = float(int_vars[integer.COLLECTION]["fc"]["op"].report["output_scale"])
  assert np.all(np.isfinite(y_int)) and np.abs(y_int).max() > 10 * out_scale
  # 8-bit grids: a few output steps from the float layer.
  np.testing.assert_allclose(y_int, y_float, rtol=0, atol=3 * out_scale)
