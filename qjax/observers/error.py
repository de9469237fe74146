"""`MSEObserver` and `EntropyObserver`: histogram observers that choose the clip range by the
error it causes, not by the range of the data.

Both keep `HistogramObserver`'s state (a `bins`-bin histogram over the running [min, max],
PyTorch's update rule) and override only `range(state)`:

  MSEObserver      the candidate clip range whose grid (the qparams `qparams_from_minmax`
                   gives for it) has the least expected squared error on the histogram,
                   computed exactly for a piecewise-uniform density.
  EntropyObserver  the threshold t that minimises KL(P || Q) between the |x| histogram P
                   (mass beyond t folded into its last bin) and its quantized version Q
                   (TensorRT's entropy calibration; Migacz, "8-bit Inference with TensorRT",
                   GTC 2017; MXNet / TVM `_get_optimal_threshold`).

Coordinates. Everything is computed in bin units: with w = (max - min) / bins, a value x sits
at u = (x - min) / w, bin k is [k, k + 1] and holds mass H_k spread uniformly over it. The
searches are vectorised over candidates with static shapes, so `range` runs eagerly and under
`jax.jit` with the same arithmetic (float32).

Compiled with XLA's default optimisation level: at `xla_backend_optimization_level=0`, XLA:CPU
was seen to compute a different (worse) affine MSE range for one 8-bin histogram than the
same code compiled normally, so the searches do not take the faster-compiling level 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax import _checks
from qjax import numerics
from qjax._float32 import exact_div, rounded
from qjax.numerics import QuantSpec
from qjax.observers.histogram import HistogramObserver, _checked_state
from qjax.observers.minmax import HistogramState, _checked_range

_MAP_BATCH = 32   # candidates (or scales) evaluated together inside lax.map: bounds memory


# ------------------------------------------------------------------------------------------
# Shared pieces.


def _edges(min_val: jax.Array, max_val: jax.Array, bins: int) -> tuple[jax.Array, jax.Array]:
  """(w, e): the bin width and the bins + 1 edges min + w k in float32, e[bins] = max."""
  w = exact_div(max_val - min_val, jnp.float32(bins))
  k = jnp.arange(bins + 1, dtype=jnp.int32).astype(jnp.float32)
  e = min_val + rounded(w * k)
  return w, e.at[bins].set(max_val)


def _cube_diff(p: jax.Array, q: jax.Array, d: jax.Array) -> jax.Array:
  """p^3 - q^3 = d (p^2 + p q + q^2), with d = p - q passed in (no cancellation)."""
  return d * (p * p + p * q + q * q)


def _batched_map(fn: Callable[[Any], Any], xs: Any, length: int) -> Any:
  """`fn` (of one candidate) over the leading axis of the pytree `xs`, in chunks of
  `_MAP_BATCH` (vmap inside, a sequential loop across): one compiled body and O(chunk) memory.
  Small inputs are one vmap. The input is padded with copies of its last candidate."""
  if length <= 2 * _MAP_BATCH:
    return jax.vmap(fn)(xs)
  chunks = -(-length // _MAP_BATCH)
  pad = chunks * _MAP_BATCH - length

  def padded(x):
    x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
    return x.reshape(chunks, _MAP_BATCH, *x.shape[1:])

  out = lax.map(jax.vmap(fn), jax.tree_util.tree_map(padded, xs))
  return jax.tree_util.tree_map(lambda y: y.reshape(-1, *y.shape[2:])[:length], out)


# ------------------------------------------------------------------------------------------
# Exact expected squared error of a grid on a histogram.


def _rounding_integral(y0: jax.Array, y1: jax.Array, dy: jax.Array) -> jax.Array:
  """Integral of (y - round(y))^2 over [y0, y1] (unbounded lattice, unit step), dy = y1 - y0.

  With k = floor(y + 1/2) and r = y - k in [-1/2, 1/2), an antiderivative is
  G(y) = k / 12 + (r^3 + 1/8) / 3, so the integral is (k1 - k0) / 12 + (r1^3 - r0^3) / 3:
  whole steps contribute 1/12 each, the partial ones their cubic.
  """
  k0, k1 = jnp.floor(y0 + 0.5), jnp.floor(y1 + 0.5)
  r0, r1 = y0 - k0, y1 - k1
  dk = k1 - k0
  return dk / 12 + _cube_diff(r1, r0, dy - dk) / 3


def _moments(hist: jax.Array) -> jax.Array:
  """Table (bins, 7) of each bin k: H_k and the tail moments about its edges, p = 0, 1, 2,

    M_p[k] = sum_{b < k} H_b int_b^{b+1} (t - k)^p dt,
    N_p[k + 1] = sum_{b > k} H_b int_b^{b+1} (t - k - 1)^p dt,

  by recurrences (one scan, both directions) whose terms all share one sign: no cancellation.
  """

  def step(carry, h):
    (m0, m1, m2), (n0, n1, n2) = carry
    h_low, h_high = h[0], h[1]
    below = (m0 + h_low, m1 - m0 - h_low / 2, m2 - 2 * m1 + m0 + h_low / 3)
    above = (n0 + h_high, n1 + n0 + h_high / 2, n2 + 2 * n1 + n0 + h_high / 3)
    return (below, above), (jnp.stack(carry[0]), jnp.stack(carry[1]))

  zero = jnp.zeros((), jnp.float32)
  _, (ms, ns) = lax.scan(step, ((zero,) * 3, (zero,) * 3), jnp.stack([hist, hist[::-1]], 1))
  # ms[k]: moments of bins < k about edge k; ns[r]: of the r last bins about edge bins - r.
  return jnp.concatenate([hist[:, None], ms, ns[::-1]], axis=1)


def _window_errors(table: jax.Array, origin: jax.Array, step: jax.Array, low: jax.Array,
                   high: jax.Array) -> jax.Array:
  """sum_k H_k int_k^{k+1} (u - Q(u))^2 du for grids on one lattice (bin units).

  The lattice has its level 0 at u = `origin` and spacing `step`; each grid is the window of
  levels between u = low[c] and u = high[c] (both lattice points, low <= high), and Q rounds
  to the nearest level of the window (saturating beyond it). Three exact parts: mass below
  `low` costs int (t - low)^2 (tail moments of `_moments` shifted to `low`), mass above
  `high` likewise, and mass between them the lattice's rounding error (prefix sums over bins
  of `_rounding_integral`, plus the partial bins at both ends).
  """
  bins = table.shape[0]
  hist = table[:, 0]
  top = jnp.float32(bins)
  edges = jnp.arange(bins, dtype=jnp.int32).astype(jnp.float32)
  y = (edges - origin) / step
  cube = step * step * step
  inv = 1 / step
  per_bin = hist * cube * _rounding_integral(y, y + inv, jnp.broadcast_to(inv, (bins,)))
  cum = jnp.cumsum(per_bin) - per_bin   # exclusive: the mass of bins < k
  lattice = jnp.stack([cum, y], axis=1)

  def at(u):   # the bin holding u in [0, bins] (the last for u = bins): its row of both tables
    k = jnp.clip(jnp.floor(u), 0, bins - 1).astype(jnp.int32)
    row, lat = table[k], lattice[k]
    return k.astype(jnp.float32), row, lat[..., 0], lat[..., 1]

  def rounding_below(u, k, row, cum_k, y_k):   # the lattice error of the mass in [0, u]
    part = _rounding_integral(y_k, (u - origin) / step, (u - k) / step)
    return cum_k + row[..., 0] * cube * part

  lo_in, hi_in = jnp.clip(low, 0, top), jnp.clip(high, 0, top)
  k, row, cum_k, y_k = at(lo_in)
  d = low - k
  lower = (row[..., 3] - 2 * d * row[..., 2] + d * d * row[..., 1]
           + row[..., 0] * _cube_diff(lo_in - low, k - low, lo_in - k) / 3)
  inner = -rounding_below(lo_in, k, row, cum_k, y_k)

  k, row, cum_k, y_k = at(hi_in)
  inner = inner + rounding_below(hi_in, k, row, cum_k, y_k)
  k1 = k + 1
  d = k1 - high
  upper = (row[..., 6] + 2 * d * row[..., 5] + d * d * row[..., 4]
           + row[..., 0] * _cube_diff(k1 - high, hi_in - high, k1 - hi_in) / 3)
  return lower + inner + upper


def _direct_error(hist: jax.Array, origin: jax.Array, step: jax.Array, low: jax.Array,
                  high: jax.Array) -> jax.Array:
  """What `_window_errors` computes, for one grid, bin by bin: O(bins), no prefix sums.

  Bin [b, b + 1] is cut at `low` and `high`: int (t - low)^2 over its part below `low`,
  int (t - high)^2 over its part above `high`, the lattice's rounding error in between.
  """
  bins = hist.shape[0]
  b = jnp.arange(bins, dtype=jnp.int32).astype(jnp.float32)
  b1 = b + 1
  v0, v1 = jnp.clip(low, b, b1), jnp.clip(high, b, b1)
  below = _cube_diff(v0 - low, b - low, v0 - b) / 3
  above = _cube_diff(b1 - high, v1 - high, b1 - v1) / 3
  inner = step * step * step * _rounding_integral((v0 - origin) / step, (v1 - origin) / step,
                                                  (v1 - v0) / step)
  return jnp.sum(hist * (below + inner + above))


def _grid(lo: jax.Array, hi: jax.Array, spec: QuantSpec, eps: float, w: jax.Array
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The grids `qparams_from_minmax(lo, hi, spec)` gives, elementwise over candidate ranges:
  (step in bin units, lowest and highest level as multiples of the step from 0)."""
  scale, zero_point = jax.vmap(
      lambda a, b: numerics.qparams_from_minmax(a, b, spec, eps=eps))(lo, hi)
  return (scale / w, (spec.qmin - zero_point).astype(jnp.float32),
          (spec.qmax - zero_point).astype(jnp.float32))


def _affine_search(hist: jax.Array, min_val: jax.Array, max_val: jax.Array, e: jax.Array,
                   w: jax.Array, origin: jax.Array, *, spec: QuantSpec, eps: float
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The least-error affine range: rows r = 0..bins of candidates on one lattice each.

  Data on both sides of 0: row r holds the pairs (e_i, e_{i + r}) with e_i <= 0 <= e_{i+r},
  which share the scale r w / (qmax - qmin). Data on one side: row r holds the one range
  (min_val, e_r) (or (e_{bins - r}, max_val)), in its first column. Rows go from narrow to
  wide.
  """
  bins = hist.shape[0]
  n = jnp.float32(spec.qmax - spec.qmin)
  index = jnp.arange(bins + 1, dtype=jnp.int32)
  two_sided = (min_val < 0) & (max_val > 0)
  positive = min_val >= 0
  table = _moments(hist)
  floor = exact_div(jnp.float32(eps), w)

  def per_row(r):
    j = index + r
    pair_hi = e[jnp.minimum(j, bins)]
    pair_ok = (r > 0) & (j <= bins) & (e <= 0) & (pair_hi >= 0)
    side_ok = (index == 0) & (r > 0)
    ok = jnp.where(two_sided, pair_ok, side_ok)
    lo_c = jnp.where(two_sided, jnp.where(pair_ok, e, min_val),
                     jnp.where(positive, min_val, e[bins - r]))
    hi_c = jnp.where(two_sided, jnp.where(pair_ok, pair_hi, max_val),
                     jnp.where(positive, e[r], max_val))
    step, kmin, kmax = _grid(lo_c, hi_c, spec, eps, w)
    step = jnp.where(two_sided, jnp.maximum(r.astype(jnp.float32) / n, floor), step[0])
    error = _window_errors(table, origin, step, origin + kmin * step, origin + kmax * step)
    return jnp.where(ok, error, jnp.inf), lo_c, hi_c

  error, lo_c, hi_c = _batched_map(per_row, index, bins + 1)
  error, lo_c, hi_c = error.reshape(-1), lo_c.reshape(-1), hi_c.reshape(-1)
  best = jnp.argmin(error)   # rows by width: the first of exact ties is the narrower
  return lo_c[best], hi_c[best], error[best]


def _mse_search(hist: jax.Array, min_val: jax.Array, max_val: jax.Array, *, spec: QuantSpec,
                eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  bins = hist.shape[0]
  one_point = min_val == max_val
  safe_max = jnp.where(one_point, min_val + 1, max_val)   # any finite width; result replaced
  w, e = _edges(min_val, safe_max, bins)
  origin = exact_div(-min_val, w)   # where 0 lies, in bin units

  def search_1d(lo_c, hi_c, valid):
    step, kmin, kmax = _grid(lo_c, hi_c, spec, eps, w)
    error = _batched_map(
        lambda g: _direct_error(hist, origin, g[0], origin + g[1] * g[0], origin + g[2] * g[0]),
        (step, kmin, kmax), bins + 1)
    error = jnp.where(valid, error, jnp.inf)
    best = jnp.argmin(error)   # one reduction: the first of exact ties
    return lo_c[best], hi_c[best], error[best]

  if spec.symmetric:
    t = jnp.sort(jnp.abs(e))   # ascending: exact ties go to the narrower range
    lo, hi, err = search_1d(jnp.maximum(min_val, -t), jnp.minimum(safe_max, t), t > 0)
  else:
    lo, hi, err = _affine_search(hist, min_val, safe_max, e, w, origin, spec=spec, eps=eps)
  mse = err * w * w / jnp.sum(hist)
  return (jnp.where(one_point, min_val, lo), jnp.where(one_point, max_val, hi),
          jnp.where(one_point, jnp.float32(0), mse))


_mse_search_jit = jax.jit(_mse_search, static_argnames=("spec", "eps"))


def mse_search_range(histogram: jax.typing.ArrayLike, min_val: jax.typing.ArrayLike,
                     max_val: jax.typing.ArrayLike, *, spec: QuantSpec,
                     eps: float = numerics.FLOAT32_EPS
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The clip range among the histogram's bin edges with the least expected squared error.

  The histogram's mass H_k is spread uniformly over bin k of [min_val, max_val] (width w).
  A candidate range [lo, hi] is quantized as the observer will quantize it: its grid is
  (S, Z) = `qparams_from_minmax(lo, hi, spec)` (widened to include 0, scale floored at
  `eps`), Q(x) = S (clamp(round(x / S) + Z, qmin, qmax) - Z), and its error is

    MSE(lo, hi) = (1 / sum H) sum_k (H_k / w) int_{bin k} (x - Q(x))^2 dx,

  integrated exactly: rounding error step by step (S^2 / 12 per whole step, the cubic of the
  partial steps at a bin's ends), and clipping error (x - Q(x))^2 for the mass beyond the
  grid's end levels. "Exact" means no approximation of the integral; the arithmetic is
  float32 (relative rounding ~1e-6 at 8 bits; above ~12 bits, where a bin holds thousands
  of steps, within-step positions round to ~2^-24 of the lattice index).

  Candidates (bin edges e_k = min_val + k w, k = 0..bins, e_bins = max_val):
    symmetric specs: the scale depends only on t = max(-lo, hi), so t = |e_k| > 0 and the
      range (max(min_val, -t), min(max_val, t)); bins + 1 candidates, each error summed bin
      by bin in O(bins).
    affine, data on one side of 0 (min_val >= 0 or max_val <= 0): the range is widened to
      0, so only the far end matters: (min_val, e_k) or (e_k, max_val); bins candidates.
    affine, min_val < 0 < max_val: every pair (e_i, e_j) with e_i <= 0 <= e_j. All pairs of
      one width d = j - i share a scale (S = d w / (qmax - qmin)) and so one lattice
      through 0; they differ only in which window of it the zero point selects. Per width
      the lattice's rounding error is prefix-summed once (O(bins)), and each window's error
      is then O(1) (those prefix sums, and tail moments about each edge for the clipped
      mass): O(bins^2) in all, as a loop over chunks of 32 widths (memory O(32 bins)).
      The one-sided case runs through the same code, one range per lattice.
  The min/max range (e_0, e_bins) is always a candidate, so the result never has more error
  than it. The result is one argmin over the candidates ordered from narrow to wide, so exact
  ties go to the narrower range. At 2048 bins a search takes ~0.1-0.4 s on a CPU core.

  Args:
    histogram: float32 (bins,) counts over [min_val, max_val].
    min_val: float32 scalar.
    max_val: float32 scalar.
    spec: the target grid (per-tensor).
    eps: the scale floor, as given to `qparams_from_minmax`.

  Returns:
    (lo, hi, mse): float32 scalars, min_val <= lo <= hi <= max_val, and the expected squared
    error of that range. A one-point range gives (min_val, max_val, 0).

  Raises:
    TypeError / ValueError: bad dtypes or shapes, a per-channel spec.

  Example:
    >>> hist = jnp.array([30.0, 60.0, 100.0, 60.0, 30.0, 0.0, 0.0, 1.0])   # over [-4, 4]
    >>> lo, hi, mse = mse_search_range(hist, -4.0, 4.0,
    ...                                spec=QuantSpec(bits=2, signed=True, symmetric=True))
    >>> float(lo), float(hi), round(float(mse), 4)
    (-2.0, 2.0, 0.2226)
    >>> lo, hi, mse = mse_search_range(hist, -4.0, 4.0, spec=QuantSpec(bits=2, signed=True))
    >>> float(lo), float(hi), round(float(mse), 4)   # affine: levels -3, -2, -1, 0
    (-3.0, 0.0, 0.1803)
  """
  histogram, min_val, max_val = _checked_state(histogram, min_val, max_val, "mse_search_range")
  if not isinstance(spec, QuantSpec) or spec.per_channel:
    raise ValueError(f"mse_search_range: spec must be a per-tensor qjax.QuantSpec (axis=None); "
                     f"got {spec!r}.")
  eps = numerics.checked_eps(eps, name="mse_search_range: eps")
  return _mse_search_jit(histogram, min_val, max_val, spec=spec, eps=float(eps))


# ------------------------------------------------------------------------------------------
# Entropy calibration.


def _abs_histogram(hist: jax.Array, min_val: jax.Array, max_val: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """The histogram of |x| over [0, amax], amax = max(-min_val, max_val), same bin count.

  Mass moves by the piecewise-linear CDF F of the uniform-in-bin density: target bin k
  (|x| in [k v, (k + 1) v], v = amax / bins) gets F((k+1) v) - F(k v) + F(-k v) - F(-(k+1) v).
  For min_val = 0 it is the histogram itself.
  """
  bins = hist.shape[0]
  span = max_val - min_val
  amax = jnp.maximum(-min_val, max_val)
  w = exact_div(span, jnp.float32(bins))
  origin = exact_div(-min_val, w)
  ratio = exact_div(amax, span)
  cum = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(hist)])

  def cdf(u):
    u = jnp.clip(u, 0, jnp.float32(bins))
    k = jnp.clip(jnp.floor(u), 0, bins - 1).astype(jnp.int32)
    return cum[k] + (u - k.astype(jnp.float32)) * hist[k]

  k = jnp.arange(bins + 1, dtype=jnp.int32).astype(jnp.float32)
  up = cdf(origin + rounded(k * ratio))
  down = cdf(origin - rounded(k * ratio))
  return (up[1:] - up[:-1]) + (down[:-1] - down[1:]), amax


def _kl_divergence(hist: jax.Array, suffix: jax.Array, i: jax.Array, levels: int) -> jax.Array:
  """KL(P || Q) for the threshold at bin i (TensorRT's construction, see `entropy_threshold`)."""
  bins = hist.shape[0]
  b = jnp.arange(bins, dtype=jnp.int32)
  inside = b < i
  raw = jnp.where(inside, hist, 0)
  p = raw + jnp.where(b == i - 1, suffix[i], 0)
  merged = i // levels
  level = jnp.minimum(b // merged, levels - 1)
  nonzero = inside & (p > 0)
  sums = jax.ops.segment_sum(raw, level, num_segments=levels, indices_are_sorted=True)
  counts = jax.ops.segment_sum(nonzero.astype(jnp.float32), level, num_segments=levels,
                                indices_are_sorted=True)
  q = jnp.where(nonzero, sums[level] / jnp.maximum(counts[level], 1), 0)
  p_total, q_total = jnp.sum(p), jnp.sum(q)
  safe_q = jnp.where(q > 0, q, 1)
  safe_p = jnp.where(nonzero, p, 1)
  terms = jnp.where(nonzero, p * (jnp.log(safe_p / p_total) - jnp.log(safe_q / q_total)), 0)
  kl = jnp.sum(terms) / p_total
  impossible = jnp.any(nonzero & (q <= 0)) | ~(q_total > 0)
  return jnp.where(impossible, jnp.inf, kl)


def _entropy_search(hist: jax.Array, min_val: jax.Array, max_val: jax.Array, *,
                    levels: int) -> tuple[jax.Array, jax.Array]:
  bins = hist.shape[0]
  one_point = min_val == max_val
  safe_max = jnp.where(one_point, min_val + 1, max_val)
  folded, amax = _abs_histogram(hist, min_val, safe_max)
  suffix = jnp.concatenate([jnp.cumsum(folded[::-1])[::-1], jnp.zeros((1,), jnp.float32)])
  candidates = jnp.arange(levels, bins + 1, dtype=jnp.int32)
  kl = _batched_map(lambda i: _kl_divergence(folded, suffix, i, levels), candidates,
                    bins + 1 - levels)
  best = candidates[jnp.argmin(kl)]   # exact ties: the smallest threshold
  v = exact_div(amax, jnp.float32(bins))
  t = jnp.where(best == bins, amax, rounded(v * best.astype(jnp.float32)))
  return jnp.where(one_point, jnp.abs(min_val), t), jnp.min(kl)


_entropy_search_jit = jax.jit(_entropy_search, static_argnames=("levels",))


def entropy_threshold(histogram: jax.typing.ArrayLike, min_val: jax.typing.ArrayLike,
                      max_val: jax.typing.ArrayLike, *, levels: int
                      ) -> tuple[jax.Array, jax.Array]:
  """TensorRT's entropy calibration: the |x| threshold with the least KL(P || Q).

  The histogram over [min_val, max_val] is first re-binned into A, a histogram of |x| with
  the same bin count over [0, amax] (mass moved by the piecewise-linear CDF; A is the
  histogram itself when min_val = 0). For each candidate i = levels .. bins (threshold
  t_i = i amax / bins):

    P = A_0 .. A_{i-1}, with the outliers sum_{b >= i} A_b added to P_{i-1};
    merge A_0 .. A_{i-1} into `levels` levels of m = i // levels consecutive bins (the last
      level takes the remainder), and expand each level's sum evenly over its bins with
      P_b > 0 (Q_b = 0 where P_b = 0);
    KL(P || Q) = sum_{P_b > 0} p_b log(p_b / q_b), p and q normalised to sum 1,

  which is infinite when some P_b > 0 has Q_b = 0 (a level whose bins are all empty but for
  the outliers). This is the construction of Migacz's slides and MXNet / TVM's
  `_get_optimal_threshold` (their bin merging), without MXNet's eps-smoothing of zero bins
  (as NVIDIA's pytorch-quantization `_compute_amax_entropy`): so an isolated outlier, far
  beyond the bulk with empty bins between, makes the thresholds below it infinite and is
  kept in range. The threshold is the bin edge t_i of the least divergence (ties: the
  smallest i). Cost: O(bins) per candidate, O(bins^2) in all (~0.1 s at 2048 bins on a CPU).

  Args:
    histogram: float32 (bins,) counts over [min_val, max_val].
    min_val: float32 scalar.
    max_val: float32 scalar.
    levels: quantization levels over [0, t] (static): 128 for int8 symmetric, 256 for
      uint8 on non-negative data; levels <= bins.

  Returns:
    (t, kl): float32 scalars, the threshold (|min_val| for a one-point range) and its
    divergence.

  Raises:
    TypeError / ValueError: bad dtypes or shapes, or levels outside [1, bins].

  Example:
    >>> hist = jnp.array([400.0, 200, 100, 50, 25, 12, 6, 3, 0, 0, 0, 0, 0, 0, 0, 1])
    >>> t, kl = entropy_threshold(hist, 0.0, 16.0, levels=4)   # bins of width 1
    >>> float(t), round(float(kl), 5)
    (5.0, 0.00337)
  """
  histogram, min_val, max_val = _checked_state(histogram, min_val, max_val, "entropy_threshold")
  bins = histogram.shape[0]
  if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) \
      or not 1 <= levels <= bins:
    raise ValueError(f"entropy_threshold: levels must be an int in [1, bins={bins}]; got "
                     f"{levels!r}.")
  return _entropy_search_jit(histogram, min_val, max_val, levels=int(levels))


# ------------------------------------------------------------------------------------------
# The observers.


@dataclasses.dataclass(frozen=True, kw_only=True)
class MSEObserver(HistogramObserver):
  """Histogram observer whose clip range minimises the expected squared quantization error:

    [lo, hi] = argmin_{candidates}  (1 / N) sum_k (H_k / w) int_{bin k} (x - Q_{lo,hi}(x))^2 dx

  with Q_{lo,hi} the fake quantizer of `qparams_from_minmax(lo, hi, spec)` (so `bits`,
  signed / unsigned, symmetric / affine, narrow and reduce_range all count), the density
  uniform inside each bin, and the integral exact (rounding and clipping error). The
  candidates are the histogram's bin edges: symmetric specs search t = |e_k| (range +-t),
  affine specs every pair of edges around 0 (`mse_search_range` documents the search, its
  cost and the tie rule: the narrower range). Unlike `HistogramObserver`'s greedy search,
  the result is the argmin over all candidates, and never worse than the min/max range.

  Attributes:
    spec: the target grid (per-tensor).
    eps: scale floor.
    bins: histogram bins (default 2048); the affine search costs O(bins^2).

  Example:
    >>> obs = MSEObserver(spec=QuantSpec(bits=4, signed=True, symmetric=True), bins=64)
    >>> x = jnp.concatenate([jnp.linspace(-1.0, 1.0, 999), jnp.array([4.0])])
    >>> state = obs.update(obs.init(x.shape), x)
    >>> [float(v) for v in obs.range(state)]   # min/max would be [-1.0, 4.0]
    [-1.0, 1.734375]
    >>> float(obs.qparams(state).scale)         # 1.734375 / 7.5
    0.23125000298023224
  """

  def range(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
    """The least-MSE clip range (`mse_search_range`)."""
    lo, hi = _checked_range(state, self.name)
    new_lo, new_hi, _ = mse_search_range(state.histogram, lo, hi, spec=self.spec,
                                         eps=float(self.eps))
    return new_lo, new_hi


@dataclasses.dataclass(frozen=True, kw_only=True)
class EntropyObserver(HistogramObserver):
  """Histogram observer with TensorRT's entropy (KL divergence) calibration:

    t = argmin_{t_i} KL(P_i || Q_i)      (`entropy_threshold`)

  over the histogram of |x| (`bins` bins, default 2048 as in TensorRT), thresholds t_i from
  `levels` bins up to all of them. Levels over [0, t]:

    symmetric specs (signed or not): (qmax - qmin + 1) // 2, the grid's half above 0
      (128 for int8, TensorRT's choice).
    affine specs: qmax - qmin + 1 (the whole grid lies on [0, t] once widened to 0); this
      needs non-negative data (ReLU outputs). With negative data the algorithm does not
      apply (the grid would have to cover both signs): eagerly `range` raises a
      ValueError; under jit it returns NaN, so the qparams' scale is NaN. Use a symmetric
      spec for signed data.

  The range is the data's [min, max] clipped to [-t, t]; `qparams_from_minmax` widens it
  to include 0, so the grid reaches t.

  Attributes:
    spec: the target grid (per-tensor).
    eps: scale floor.
    bins: histogram bins (default 2048); at least the level count.

  Example:
    >>> obs = EntropyObserver(spec=QuantSpec(bits=4, signed=True, symmetric=True), bins=64)
    >>> obs.levels
    8
    >>> x = jnp.concatenate([jnp.linspace(-1.0, 1.0, 999), jnp.array([4.0])])
    >>> state = obs.update(obs.init(x.shape), x)
    >>> [float(v) for v in obs.range(state)]   # min/max would be [-1.0, 4.0]
    [-1.0, 1.0]
  """

  def __post_init__(self):
    super().__post_init__()
    if self.bins < self.levels:
      raise ValueError(f"{self.name}.bins must be >= the spec's level count over [0, t], "
                       f"{self.levels} (spec={self.spec}); got bins={self.bins}.")

  @property
  def levels(self) -> int:
    """Quantization levels over [0, t]: half the grid for symmetric specs, else all of it."""
    count = self.spec.qmax - self.spec.qmin + 1
    return count // 2 if self.spec.symmetric else count

  def range(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
    """The clip range of the least-divergence threshold."""
    lo, hi = _checked_range(state, self.name)
    if not self.spec.symmetric:
      negative = _checks.concrete_bool(jnp.asarray(lo) < 0)
      if negative:
        raise ValueError(f"{self.name}: an affine spec (symmetric=False) needs non-negative "
                         f"data, but the observed minimum is {float(lo)!r}; use "
                         f"QuantSpec(symmetric=True, ...) for signed data.")
    t, _ = entropy_threshold(state.histogram, lo, hi, levels=self.levels)
    # The data range clipped to [-t, t] (a range above t becomes the point t).
    new_lo, new_hi = jnp.clip(lo, -t, t), jnp.clip(hi, -t, t)
    if self.spec.symmetric:
      return new_lo, new_hi
    nan = jnp.float32(jnp.nan)
    ok = lo >= 0
    return jnp.where(ok, new_lo, nan), jnp.where(ok, new_hi, nan)
