"""Tests of `qjax.observers.histogram`: PyTorch 2.13 `HistogramObserver` parity, jit, properties.

Parity with torch (skipped without it) is exact everywhere: histograms, min_val / max_val and
the searched range are compared bitwise, scales bitwise and zero points exactly. Sequences of
float32 batches (normal, uniform, ReLU-like, heavy-tailed, constant and all-zero batches,
ranges that grow, shrink or shift) go through `torch.ao.quantization.HistogramObserver` and
`histogram_update`; after every batch `l2_search_range` is compared with torch's
`_non_linear_param_search` and `qparams_from_minmax` with `calculate_qparams` (quint8 affine,
with and without reduce_range, and qint8 symmetric). The private helpers that reproduce
torch's kernels (histc, linspace, sum, cumsum, the L2 error) are also checked directly, so
that a change in torch's arithmetic points at the helper that no longer matches.
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import _float32
from qjax.observers import histogram as hg
from qjax.numerics import QuantSpec, qparams_from_minmax

# torch warns that reduce_range will be deprecated; it still works.

BATCH = 512   # one batch shape throughout, so each bin count compiles once


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def _empty(bins: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  return (jnp.zeros((bins,), jnp.float32), jnp.float32(jnp.inf), jnp.float32(-jnp.inf))


def _batches(kind: str, seed: int, count: int = 6) -> list[np.ndarray]:
  """`count` float32 batches of BATCH values with the named distribution."""
  rng = np.random.default_rng(seed)

  def normal(scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    return rng.standard_normal(BATCH) * scale + shift

  def full(c: float) -> np.ndarray:
    return np.full(BATCH, c)

  makers = {
      "normal": lambda k: normal(2.0, 0.3),
      "uniform": lambda k: rng.uniform(-1.0, 3.0, BATCH),
      "relu": lambda k: np.maximum(normal(), 0.0),
      "heavy_tailed": lambda k: rng.standard_t(1.5, BATCH),
      "growing": lambda k: normal(1.7**k),
      "shrinking": lambda k: normal(0.5**k),
      "shifting": lambda k: normal(1.0, 1.5 * k),
      # one-point ranges: same constant (plain addition), a second constant (the one-point
      # branch), then data (re-binning), then a constant outside the range.
      "constant": lambda k: [full(1.25), full(1.25), full(0.0), normal(), normal(3.0),
                             full(-7.0)][k],
      "zeros_first": lambda k: [full(0.0), full(0.0), np.maximum(normal(), 0.0), normal(),
                                full(0.0), normal(5.0)][k],
  }
  return [makers[kind](k).astype(np.float32) for k in range(count)]


def _torch_observer(torch, bins: int, symmetric: bool, reduce_range: bool):
  if symmetric:
    return torch.ao.quantization.HistogramObserver(
        bins=bins, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
        reduce_range=reduce_range)
  return torch.ao.quantization.HistogramObserver(bins=bins, dtype=torch.quint8,
                                                 reduce_range=reduce_range)


PARITY_CASES = [
    # kind, bins, seed, symmetric, reduce_range
    ("normal", 64, 0, False, False),
    ("uniform", 256, 1, False, True),
    ("relu", 64, 2, False, False),
    ("heavy_tailed", 256, 3, False, True),
    ("constant", 64, 4, False, False),
    ("zeros_first", 256, 5, False, True),
    ("growing", 256, 6, False, False),
    ("shrinking", 64, 7, False, True),
    ("shifting", 64, 8, False, False),
    ("normal", 2048, 9, False, False),      # torch's default bin count
    ("growing", 2048, 10, False, True),
    ("heavy_tailed", 64, 11, True, False),  # qint8, per_tensor_symmetric
    ("relu", 256, 12, True, True),
    ("growing", 2048, 13, True, False),
]


@pytest.mark.parametrize("kind,bins,seed,symmetric,reduce_range", PARITY_CASES)
def test_matches_torch_histogram_observer(torch, kind, bins, seed, symmetric, reduce_range):
  obs = _torch_observer(torch, bins, symmetric, reduce_range)
  spec = QuantSpec(bits=8, signed=symmetric, symmetric=symmetric, reduce_range=reduce_range)
  hist, lo, hi = _empty(bins)
  for k, x in enumerate(_batches(kind, seed)):
    obs(torch.from_numpy(x))
    hist, lo, hi = hg.histogram_update(hist, lo, hi, x, initialized=k > 0)
    np.testing.assert_array_equal(np.asarray(hist), obs.histogram.numpy(), err_msg=f"batch {k}")
    assert (float(lo), float(hi)) == (obs.min_val.item(), obs.max_val.item()), f"batch {k}"

    want_min, want_max = obs._non_linear_param_search()
    new_min, new_max = hg.l2_search_range(hist, lo, hi, dst_nbins=obs.dst_nbins)
    assert (float(new_min), float(new_max)) == (want_min.item(), want_max.item()), f"batch {k}"

    scale, zero_point = qparams_from_minmax(new_min, new_max, spec)
    want_scale, want_zero_point = obs.calculate_qparams()
    assert float(scale) == want_scale.item(), f"batch {k}"
    assert int(zero_point) == want_zero_point.item(), f"batch {k}"


@pytest.mark.parametrize("dtype_name,kwargs", [
    ("quint8", {}), ("quint8", {"reduce_range": True}), ("qint8", {"reduce_range": True}),
    ("quint8", {"quant_min": 0, "quant_max": 15}), ("qint8", {"quant_min": -8, "quant_max": 7}),
])
def test_torch_dst_nbins_is_two_to_the_dtype_bits(torch, dtype_name, kwargs):
  # What l2_search_range's docstring states: torch measures the L2 error on 2^8 levels for
  # 8-bit dtypes, whatever the reduced or customised range of the observer.
  obs = torch.ao.quantization.HistogramObserver(dtype=getattr(torch, dtype_name), **kwargs)
  assert obs.dst_nbins == 256


# ------------------------------------------------------------------------------------------
# The helpers that reproduce torch's kernels.


def test_histc_matches_torch(torch):
  rng = np.random.default_rng(20)
  histc = jax.jit(hg._histc, static_argnums=3)
  for bins in (7, 100):   # (64, 256 and 2048 run through the observer tests above)
    x = (rng.standard_normal(BATCH) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    for lo, hi in ((x.min(), x.max()), (x.min() - abs(x.min()), x.max())):
      want = torch.histc(torch.from_numpy(x), bins, min=float(lo), max=float(hi)).numpy()
      np.testing.assert_array_equal(np.asarray(histc(x, jnp.float32(lo), jnp.float32(hi), bins)),
                                    want)
  for c in (0.0, -3.5, 2.0**24 + 2):   # one-point ranges, widened by 1 each side
    x = np.full(BATCH, c, np.float32)
    want = torch.histc(torch.from_numpy(x), 64, min=c, max=c).numpy()
    np.testing.assert_array_equal(np.asarray(histc(x, jnp.float32(c), jnp.float32(c), 64)),
                                  want)


def test_linspace_matches_torch_jitted_and_op_by_op(torch):
  rng = np.random.default_rng(21)
  linspace = jax.jit(hg._linspace, static_argnums=2)
  for steps in (65, 32769):   # bins + 1 and 16 bins + 1 for bins = 64, 2048
    lo, hi = np.sort(rng.standard_normal(2) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    want = torch.linspace(torch.tensor(lo), torch.tensor(hi), steps).numpy()
    args = (jnp.float32(lo), jnp.float32(hi), steps)
    np.testing.assert_array_equal(np.asarray(linspace(*args)), want)
    # Op by op, XLA cannot fuse anything: the FMA must come from _fma, not from contraction.
    np.testing.assert_array_equal(np.asarray(hg._linspace(*args)), want)


def test_sum_and_cumsum_match_torch(torch):
  rng = np.random.default_rng(22)
  torch_sum, cumsum = jax.jit(hg._torch_sum), jax.jit(hg._cumsum_f64)
  for n in (15, 100, 2049):   # scalar path; vectors + tail scalars; cascade levels
    # Magnitudes spread over 2^40 make any change of summation order visible.
    v = (rng.standard_normal(n) * np.exp(rng.uniform(-14, 14, n))).astype(np.float32)
    assert float(torch_sum(v)) == torch.sum(torch.from_numpy(v)).item(), n
    counts = (rng.integers(0, 4000, n) / 16.0 ** rng.integers(0, 5, n)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(cumsum(counts)),
                                  torch.cumsum(torch.from_numpy(counts), 0).numpy())


@pytest.mark.parametrize("bins", [64, 100])
def test_quantization_error_matches_torch(torch, bins):
  rng = np.random.default_rng(23 + bins)
  obs = torch.ao.quantization.HistogramObserver(bins=bins)
  for k in range(3):
    obs(torch.from_numpy((rng.standard_normal(BATCH) * (k + 1) * 7.3).astype(np.float32)))
  hist = jnp.asarray(obs.histogram.numpy())
  lo, hi = jnp.float32(obs.min_val.item()), jnp.float32(obs.max_val.item())
  width = _float32.dd_div(*_float32.two_sum(hi, -lo), float(bins))
  error = jax.jit(hg._quantization_error, static_argnums=5)
  for _ in range(25):
    start = int(rng.integers(0, bins))
    end = int(rng.integers(start, bins))
    got = error(hist, *width, jnp.int32(start), jnp.int32(end), 256)
    assert float(got) == obs._compute_quantization_error(start, end), (start, end)


# ------------------------------------------------------------------------------------------
# jit, eager and op-by-op agree.


def _run(batches: list[np.ndarray], bins: int, wrap=lambda f: f) -> list:
  update = wrap(hg.histogram_update)
  search = wrap(functools.partial(hg.l2_search_range, dst_nbins=256))
  percentile = wrap(functools.partial(hg.percentile_range, percentile=99.0))
  state = _empty(bins)
  out = []
  for k, x in enumerate(batches):
    state = update(*state, x, initialized=jnp.bool_(k > 0))
    out.append((state, search(*state), percentile(*state)))
  return out


def _assert_same(a, b) -> None:
  for i, (u, v) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=f"leaf {i}")


def test_jit_and_eager_agree():
  batches = _batches("constant", 30) + _batches("growing", 31, count=3)
  _assert_same(_run(batches, 64), _run(batches, 64, jax.jit))


def test_op_by_op_agrees():
  # Under jax.disable_jit nothing is fused, so no product may rely on XLA's fusions. Checked
  # here: the arithmetic with products (linspace's is checked op by op above).
  x = _batches("heavy_tailed", 32, count=1)[0]
  hist, lo, hi = hg.histogram_update(*_empty(64), x, initialized=False)
  alpha_hi, alpha_lo = (jnp.asarray(t) for t in hg._quantile_tables()[:2])

  def pieces(hist, lo, hi, alpha_hi, alpha_lo):
    width = _float32.dd_div(*_float32.two_sum(hi, -lo), 64.0)
    return (width, hg._scaled_thresholds(alpha_hi, alpha_lo, hg._torch_sum(hist)),
            hg._quantization_error(hist, *width, jnp.int32(3), jnp.int32(40), 256),
            hg._percentile(hist, lo, hi, jnp.float32(0.01), jnp.float32(0.99)))

  args = (hist, lo, hi, alpha_hi, alpha_lo)
  want = jax.jit(pieces)(*args)
  with jax.disable_jit():
    _assert_same(want, pieces(*args))


# ------------------------------------------------------------------------------------------
# Properties.

SETTINGS = hypothesis.settings(deadline=None, max_examples=30, print_blob=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])
PROPERTY_BINS = 64
PROPERTY_BATCH = 32   # drawn values, tiled to BATCH so that no new shape is compiled


@st.composite
def batch_sequences(draw):
  """1-4 batches of PROPERTY_BATCH finite float32 values, sometimes constant.

  |x| <= 1e30 keeps the range's width finite (torch's own arithmetic needs that too).
  """
  scale = float(np.float32(draw(st.sampled_from([1e-3, 1.0, 1e3, 1e30]))))
  elements = st.floats(-scale, scale, width=32, allow_subnormal=False)
  batches = []
  for _ in range(draw(st.integers(1, 4))):
    if draw(st.booleans()):
      batch = draw(hnp.arrays(np.float32, PROPERTY_BATCH, elements=elements))
    else:
      batch = np.full(PROPERTY_BATCH, draw(elements), np.float32)
    batches.append(np.resize(batch, BATCH))
  return batches


def _observe(batches: list[np.ndarray]) -> tuple[jax.Array, jax.Array, jax.Array]:
  state = _empty(PROPERTY_BINS)
  for k, x in enumerate(batches):
    state = hg.histogram_update(*state, x, initialized=k > 0)
  return state


@SETTINGS
@hypothesis.given(batch_sequences())
def test_histogram_keeps_count_and_range(batches):
  hist, lo, hi = _observe(batches)
  data = np.concatenate(batches)
  # Re-binned masses are multiples of 16^-k of small counts: their float32 sums are exact.
  assert float(jnp.sum(hist)) == data.size
  assert bool(jnp.all(hist >= 0))
  assert (float(lo), float(hi)) == (data.min(), data.max())
  assert float(lo) <= float(hi)


@SETTINGS
@hypothesis.given(batch_sequences())
def test_l2_range_lies_within_the_histogram(batches):
  hist, lo, hi = _observe(batches)
  new_min, new_max = (float(v) for v in hg.l2_search_range(hist, lo, hi, dst_nbins=256))
  lo, hi = float(lo), float(hi)
  assert lo <= new_min <= new_max
  # new_max = min + w * (e + 1) with w = fl((max - min) / bins): it may pass max_val by the
  # rounding of w and of the two operations (as torch's does), never by more.
  eps = float(np.finfo(np.float32).eps)
  assert new_max <= hi + 4 * eps * (hi - lo) + float(np.spacing(np.float32(abs(hi))))


@SETTINGS
@hypothesis.given(batch_sequences(), st.floats(50, 100), st.floats(50, 100))
def test_percentile_range_bounds_and_monotonicity(batches, p, q):
  hist, lo, hi = _observe(batches)
  full = hg.percentile_range(hist, lo, hi, percentile=100)
  assert (float(full[0]), float(full[1])) == (float(lo), float(hi))
  p, q = min(p, q), max(p, q)
  narrow = [float(v) for v in hg.percentile_range(hist, lo, hi, percentile=p)]
  wide = [float(v) for v in hg.percentile_range(hist, lo, hi, percentile=q)]
  assert float(lo) <= wide[0] <= narrow[0] <= narrow[1] <= wide[1] <= float(hi)


def test_percentile_interpolates_within_a_bin():
  # 4 bins over [0, 4], masses 1, 2, 3, 4 (total 10): in bin 2, F(2 + f) = (3 + 3 f) / 10,
  # so F = 0.45 at f = 1/2 and F = 0.55 at f = 5/6.
  hist = jnp.array([1.0, 2.0, 3.0, 4.0], jnp.float32)
  low, high = hg.percentile_range(hist, 0.0, 4.0, percentile=55.0)
  np.testing.assert_allclose([float(low), float(high)], [2.5, 2.0 + 5.0 / 6.0], rtol=1e-6)
  # Empty outer bins are clipped away below p = 100, kept at p = 100.
  hist = jnp.array([0.0, 5.0, 5.0, 0.0], jnp.float32)
  assert [float(v) for v in hg.percentile_range(hist, 0.0, 4.0, percentile=99.999)] == \
      pytest.approx([1.0, 3.0], abs=1e-3)
  assert [float(v) for v in hg.percentile_range(hist, 0.0, 4.0, percentile=100)] == [0.0, 4.0]


# ------------------------------------------------------------------------------------------
# Errors.


def test_bad_arguments_raise():
  hist, lo, hi = _empty(8)
  x = jnp.ones((4,), jnp.float32)
  with pytest.raises(TypeError, match="histogram"):
    hg.histogram_update(jnp.zeros((8,), jnp.int32), lo, hi, x, initialized=False)
  with pytest.raises(ValueError, match="expected histogram of shape"):
    hg.l2_search_range(jnp.zeros((2, 4), jnp.float32), lo, hi, dst_nbins=256)
  with pytest.raises(ValueError, match="expected min_val of shape"):
    hg.percentile_range(hist, jnp.zeros((2,), jnp.float32), hi, percentile=99.0)
  with pytest.raises(ValueError, match="expected non-empty x"):
    hg.histogram_update(hist, lo, hi, jnp.zeros((0,), jnp.float32), initialized=False)
  with pytest.raises(TypeError, match="expected initialized as a bool scalar"):
    hg.histogram_update(hist, lo, hi, x, initialized=jnp.int32(1))
  with pytest.raises(TypeError, match="x must be a floating-point array"):
    hg.histogram_update(hist, lo, hi, jnp.ones((4,), jnp.int32), initialized=False)
  with pytest.raises(ValueError, match="expected dst_nbins as a positive int"):
    hg.l2_search_range(hist, lo, hi, dst_nbins=0)
  with pytest.raises(ValueError, match=r"expected percentile in \[50, 100\]"):
    hg.percentile_range(hist, lo, hi, percentile=49.0)
