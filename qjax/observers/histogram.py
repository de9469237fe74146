"""`HistogramObserver` and `PercentileObserver`, and the array math of PyTorch's
`HistogramObserver` (torch.ao.quantization, 2.13) they run on, jit-able.

State: a float32 histogram of `bins` equal-width bins over [min_val, max_val]. Every shape is
static, so the functions run under `jax.jit` and `jax.vmap`. `histogram_update`,
`l2_search_range` and `percentile_range` expect finite, non-empty data and a range whose width
max - min is finite in float32 (otherwise bin widths are inf and the histogram NaN); the
observers at the end of this module apply the NaN / Inf and range policy (`qjax.observers`).

Reproduced bit for bit, against PyTorch 2.13 on x86 CPUs (tests/test_histogram.py):

  * `torch.histc`: bin = trunc(((x - lo) * bins) / (hi - lo)) in float32, the top edge folded
    into the last bin, and a one-point range widened to [lo - 1, hi + 1].
  * `forward`: reset on the first batch; plain addition while the range stays; when it grows,
    the old histogram re-binned as `_upscale_histogram` does (each bin split into 16 equal
    parts whose mid-points, from `torch.linspace`'s fma(step, i, start), are bucketed into the
    new bins and summed in order, as `torch.bincount` does) or, for a one-point old range,
    its whole mass moved to that point's new bin.
  * `_non_linear_param_search` (`l2_search_range`), including the float64 arithmetic torch
    does in Python and in `torch.cumsum` (emulated with float32 pairs, `qjax._float32`) and
    the float32 summation order of `torch.sum`'s vectorised CPU kernel.

Nothing relies on XLA contracting, or not contracting, a multiply-add: products that torch
rounds are kept apart (`qjax._float32.rounded`) and torch's one fused multiply-add is
emulated (`qjax._float32.fma`), so eager, `jax.jit` and `jax.disable_jit` agree bit for bit.

Where bit-exactness rests on an assumption (each documented at the helper): float32 pairs
carry ~48 of float64's 53 bits, so a float64 value within ~2^-48 (relative) of a float32
rounding tie can round the other way; `torch.sum` is emulated with 8 float32 lanes
(`_TORCH_SUM_LANES`; what torch 2.13 uses under ATEN_CPU_CAPABILITY default, avx2 and avx512
alike) and a single thread (bins < 32768).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax import _checks
from qjax._float32 import (dd_add, dd_div, dd_mul, exact_div, f64_to_f32, fma, min_and_max,
                           rounded, two_sum)
from qjax.observers.minmax import (AxisName, HistogramState, _batch_data, _checked_range,
                                   _fits_float32, _RangeObserver,
                                   _saturating_increment, checked_axis_name)

UPSAMPLE_RATE: int = 16
"""Sub-bins per old bin when a histogram is re-binned onto a wider range (torch's value)."""

_TORCH_SUM_LANES = 8      # float32 lanes of torch.sum's CPU kernel, on every x86 capability.
_QUANTILE_STEP = 1e-5     # torch's `stepsize` of the quantile search.
_TABLE_SIZE = 100_010     # > 1 / _QUANTILE_STEP + 2: every alpha / beta the search can reach.


# ------------------------------------------------------------------------------------------
# torch's float64 running sum and float32 summation order (the exact float32 arithmetic
# they build on lives in qjax._float32).


def _cumsum_f64(v: jax.Array) -> jax.Array:
  """float32(float64 running sum): `torch.cumsum` on CPU accumulates float32 in double.

  The running sums are carried exactly as float32 pairs (exact while the histogram's values
  span fewer than ~48 bits), then each is rounded once. Exact sums do not depend on the order,
  so a sequential scan serves: it compiles ~3x faster than a parallel prefix scan, and 2048
  steps take ~50 us.
  """
  def step(carry, x):
    running = dd_add(carry[0], carry[1], x)
    return running, running

  _, (hi, lo) = lax.scan(step, (jnp.zeros((), v.dtype), jnp.zeros((), v.dtype)), v)
  return f64_to_f32(hi, lo)


def _ceil_log2(n: int) -> int:
  return 1 if n <= 2 else (n - 1).bit_length()


def _cascade_row_sum(rows: jax.Array) -> jax.Array:
  """ATen's `row_sum`: `rows` (m, L) summed to (L,) in its order.

  Rows are dealt to 4 interleaved accumulators (4 | m prefix), summed in blocks of 16 rows
  that cascade into up to 4 levels, then the accumulators are added in order.
  """
  m, lanes = rows.shape
  size = m // 4
  grid = rows[:4 * size].reshape(size, 4, lanes)
  power = max(4, _ceil_log2(size) // 4)
  step, mask = 1 << power, (1 << power) - 1
  blocks = size // step
  levels: list[jax.Array | None] = [None] * 4   # None stands for an accumulator at 0.0

  def add(acc, v):
    return v if acc is None else acc + v

  if blocks:
    chunk = grid[:blocks * step].reshape(blocks, step, 4, lanes)
    block_sums = chunk[:, 0]
    for j in range(1, step):   # sequential within a block, all blocks at once
      block_sums = block_sums + chunk[:, j]
    for b in range(blocks):
      levels[0] = block_sums[b]
      done = (b + 1) * step
      for j in range(1, 4):
        levels[j], levels[j - 1] = add(levels[j], levels[j - 1]), None
        if done & (mask << (j * power)):
          break
  for i in range(blocks * step, size):
    levels[0] = add(levels[0], grid[i])
  acc = levels[0]
  for j in range(1, 4):
    if levels[j] is not None:
      acc = add(acc, levels[j])
  acc = jnp.zeros((4, lanes), rows.dtype) if acc is None else acc
  partial = acc[0]
  for i in range(4 * size, m):
    partial = partial + rows[i]
  for k in range(1, 4):
    partial = partial + acc[k]
  return partial


def _torch_sum(v: jax.Array) -> jax.Array:
  """`torch.sum(v)` of a 1-D float32 tensor, bit for bit (ATen's cascade_sum, one thread).

  Whole vectors of `_TORCH_SUM_LANES` go through `_cascade_row_sum`; the leftover scalars
  are added to 0 first, then the lanes in order. Shorter inputs take the scalar path.
  """
  n = v.shape[0]
  lanes = _TORCH_SUM_LANES
  if n < lanes:
    return _cascade_row_sum(v.reshape(n, 1))[0]
  whole = n // lanes
  vec = _cascade_row_sum(v[:whole * lanes].reshape(whole, lanes))
  total = jnp.zeros((), v.dtype)
  for k in range(whole * lanes, n):
    total = total + v[k]
  for k in range(lanes):
    total = total + vec[k]
  return total


# ------------------------------------------------------------------------------------------
# torch.histc, torch.linspace and the histogram update.


def _histc(x: jax.Array, lo: jax.Array, hi: jax.Array, bins: int) -> jax.Array:
  """`torch.histc(x, bins, lo, hi)` for x inside [lo, hi]: float32 counts.

  Counted in int32 (torch adds 1.0 in float32; the same below 2^24 per bin).
  """
  return _histc_counts(x, lo, hi, bins).astype(jnp.float32)


def _histc_counts(x: jax.Array, lo: jax.Array, hi: jax.Array, bins: int) -> jax.Array:
  """The int32 counts of `_histc`; integers, so shards' counts add up exactly."""
  one_point = lo == hi
  # Float32 lo -/+ 1 equals torch's double-then-float: double rounding is innocuous here.
  lo = jnp.where(one_point, lo - 1, lo)
  hi = jnp.where(one_point, hi + 1, hi)
  pos = exact_div((x - lo) * jnp.float32(bins), hi - lo)
  # For |c| >= 2^25, c -/+ 1 rounds back to c: torch then divides 0 by 0 (undefined
  # behaviour); the middle bin is where every smaller constant lands.
  pos = jnp.where(hi > lo, pos, jnp.float32(bins // 2))
  index = jnp.clip(pos, 0, bins - 1).astype(jnp.int32)   # trunc, top edge -> last bin
  return jnp.zeros((bins,), jnp.int32).at[index.reshape(-1)].add(1)


def _linspace(start: jax.Array, end: jax.Array, steps: int) -> jax.Array:
  """`torch.linspace(start, end, steps)` in float32, bit for bit (steps >= 2).

  ATen computes the first half up from `start` and the second half down from `end`, each
  element as one fused multiply-add (GCC contracts its `start + step * i`).
  """
  step = exact_div(end - start, jnp.float32(steps - 1))
  i = jnp.arange(steps, dtype=jnp.int32)
  up = fma(step, i.astype(jnp.float32), start)
  down = fma(-step, (steps - 1 - i).astype(jnp.float32), end)
  return jnp.where(i < steps // 2, up, down)


def _upscale(hist: jax.Array, old_min: jax.Array, old_max: jax.Array, new_min: jax.Array,
             new_max: jax.Array) -> jax.Array:
  """torch's `_upscale_histogram`: `hist` over [old_min, old_max] re-binned onto the new range.

  Each bin's count is split evenly over UPSAMPLE_RATE sub-bins; each sub-bin's mass goes to
  the new bin holding its mid-point.
  """
  bins = hist.shape[0]
  fine = bins * UPSAMPLE_RATE
  mass = jnp.repeat(hist, UPSAMPLE_RATE) / jnp.float32(UPSAMPLE_RATE)   # exact: power of 2
  half = jnp.float32(0.5) * exact_div(old_max - old_min, jnp.float32(fine))
  mids = _linspace(old_min, old_max, fine + 1)[:-1] + half
  edges = _linspace(new_min, new_max, bins + 1)
  index = jnp.clip(jnp.searchsorted(edges, mids, side="right") - 1, 0, bins - 1)
  # A scatter-add applies its updates in order, which is torch.bincount's float32 order.
  return jnp.zeros((bins,), jnp.float32).at[index].add(mass)


def _tied(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """x, made to depend on the new range (a select of x with itself, which XLA removes).

  Under `jax.shard_map` without `axis_name` each shard's range varies across shards while a
  replicated histogram does not, and the branches of a `lax.switch` must agree on that.
  """
  return jnp.where(lo <= hi, x, x)


@functools.partial(jax.jit, static_argnames=("axis_name",))
def _update(hist: jax.Array, min_val: jax.Array, max_val: jax.Array, x: jax.Array,
            x_min: jax.Array, x_max: jax.Array, initialized: jax.Array, *,
            axis_name: AxisName) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The update with the batch's range [x_min, x_max] given (already reduced over
  `axis_name`): every shard re-bins the same old histogram onto the same edges, and only the
  new counts of each shard's slice of the batch are summed across shards (in int32)."""
  bins = hist.shape[0]
  lo = jnp.where(initialized, jnp.minimum(min_val, x_min), x_min)
  hi = jnp.where(initialized, jnp.maximum(max_val, x_max), x_max)
  same_range = (lo == min_val) & (hi == max_val)
  branch = jnp.select([~initialized, same_range, min_val == max_val], [0, 1, 2], 3)
  old = lax.switch(branch, [
      lambda: _tied(jnp.zeros_like(hist), lo, hi),                       # reset_histogram
      lambda: _tied(hist, lo, hi),                                       # same range
      lambda: _histc(min_val[None], lo, hi, bins) * _torch_sum(hist),    # one-point old range
      lambda: _upscale(hist, min_val, max_val, lo, hi),                  # wider range
  ])
  counts = _histc_counts(x, lo, hi, bins)
  if axis_name is not None:
    counts = lax.psum(counts, axis_name)
  return old + counts.astype(jnp.float32), lo, hi


def _checked_state(histogram: jax.typing.ArrayLike, min_val: jax.typing.ArrayLike,
                   max_val: jax.typing.ArrayLike, where: str
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Histogram (bins,) and scalar range as float32; TypeError / ValueError naming `where`."""
  histogram = _checks.as_float_array("histogram", histogram)
  if histogram.ndim != 1 or histogram.shape[0] < 1:
    raise ValueError(f"{where}: expected histogram of shape (bins,) with bins >= 1, got shape "
                     f"{histogram.shape}.")
  out = [histogram.astype(jnp.float32)]
  for name, value in (("min_val", min_val), ("max_val", max_val)):
    value = _checks.as_float_array(name, value, python_int_ok=True)
    if value.shape not in ((), (1,)):
      raise ValueError(f"{where}: expected {name} of shape () or (1,), got shape {value.shape}.")
    out.append(value.reshape(()).astype(jnp.float32))
  return out[0], out[1], out[2]


def histogram_update(histogram: jax.Array, min_val: jax.Array, max_val: jax.Array,
                     x: jax.Array, *, initialized: jax.Array, axis_name: AxisName = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One `HistogramObserver.forward` step: fold the batch `x` into the histogram.

  With lo = min(min_val, min x), hi = max(max_val, max x) and h(x; lo, hi) the
  `torch.histc` counts of x in `bins` equal bins over [lo, hi]:

    not initialized:           H' = h(x; min x, max x)                (reset_histogram)
    [lo, hi] == old range:     H' = H + h(x; lo, hi)
    old range one point m:     H' = h([m]; lo, hi) * sum(H) + h(x; lo, hi)
    otherwise (range grew):    H' = upscale(H; [min_val, max_val] -> [lo, hi]) + h(x; lo, hi)

  A one-point range [c, c] is binned as [c - 1, c + 1] (torch.histc), so an all-zero or
  constant batch puts its mass in bin bins // 2 while min_val == max_val == c.

  With `axis_name`, x is one shard of the batch: min x and max x are reduced over the
  mapped axes (`lax.pmin` / `lax.pmax`), so every shard bins onto the same edges, and
  h(x; lo, hi) is the `lax.psum` of the shards' int32 counts. The result is the
  single-device one of the whole batch, bit for bit, on every shard (the state must be
  the same on every shard, as it is when it only ever comes from this function).

  Args:
    histogram: float32 (bins,) counts over [min_val, max_val].
    min_val: float32 scalar, the histogram's range (ignored when not initialized).
    max_val: float32 scalar.
    x: finite, non-empty floating data of any shape (read as float32); with the running
      range, max - min must be finite in float32 (`qjax.numerics.range_fits_float32`).
    initialized: bool scalar; False resets the histogram from `x`, as torch's first batch.
    axis_name: mapped axes (a name or a tuple of names) the batch is split over; None: `x`
      is the whole batch.

  Returns:
    (histogram, min_val, max_val) after the batch; bit for bit torch's buffers.

  Raises:
    TypeError: non-floating histogram, range or data, a non-boolean `initialized`, or an
      `axis_name` that is not None, a str or a tuple of str.
    ValueError: wrong shapes, or empty `x`.

  Example:
    >>> hist, lo, hi = histogram_update(jnp.zeros(4), jnp.inf, -jnp.inf,
    ...                                 jnp.array([0.0, 1.0, 3.0, 4.0]), initialized=False)
    >>> hist.tolist(), float(lo), float(hi)
    ([1.0, 1.0, 0.0, 2.0], 0.0, 4.0)
  """
  axis_name = checked_axis_name(axis_name, "histogram_update")
  histogram, min_val, max_val = _checked_state(histogram, min_val, max_val, "histogram_update")
  x = _checks.as_float_array("x", x)
  if x.size == 0:
    raise ValueError(f"histogram_update: expected non-empty x, got shape {x.shape}.")
  initialized = jnp.asarray(initialized)
  if initialized.dtype != jnp.bool_ or initialized.shape != ():
    raise TypeError(f"histogram_update: expected initialized as a bool scalar, got "
                    f"{initialized.dtype} of shape {initialized.shape}.")
  x = x.reshape(-1).astype(jnp.float32)
  x_min, x_max = min_and_max(x)
  if axis_name is not None:
    x_min, x_max = lax.pmin(x_min, axis_name), lax.pmax(x_max, axis_name)
  return _update(histogram, min_val, max_val, x, x_min, x_max, initialized,
                 axis_name=axis_name)


# ------------------------------------------------------------------------------------------
# The L2 range search.


@functools.cache
def _quantile_tables() -> tuple[np.ndarray, ...]:
  """Every alpha and beta torch's search can reach, as float32 pairs, and where they cross.

  torch steps alpha = 0 up and beta = 1 down by 1e-5 in float64 (alpha_k = fl(alpha_{k-1} +
  1e-5)), one of them per iteration, while alpha < beta. `limit[ka]` is the first kb with
  beta_kb <= alpha_ka.
  """
  steps = np.full(_TABLE_SIZE - 1, _QUANTILE_STEP)
  alpha = np.concatenate([[0.0], np.cumsum(steps)])   # sequential float64 sums
  beta = np.subtract.accumulate(np.concatenate([[1.0], steps]))

  def pair(v):
    hi = v.astype(np.float32)
    return hi, (v - hi.astype(np.float64)).astype(np.float32)

  limit = np.searchsorted(-beta, -alpha, side="left").astype(np.int32)
  return (*pair(alpha), *pair(beta), limit)


def _scaled_thresholds(hi: jax.Array, lo: jax.Array, total: jax.Array) -> jax.Array:
  """float32(float64(q) * total) for each table value q = hi + lo.

  torch tests `cSum[l] < next_alpha * total`: the Python float product is cast to float32,
  the tensor's dtype, before the comparison.
  """
  return f64_to_f32(*dd_mul(hi, lo, total))


def _div_floor(a: jax.Array, b: jax.Array) -> jax.Array:
  """`torch.div(a, b, rounding_mode="floor")` for b > 0 (c10's div_floor_floating)."""
  mod = jnp.fmod(a, b)
  div = exact_div(a - mod, b)
  div = jnp.where(mod < 0, div - 1, div)
  floor = jnp.floor(div)
  floor = jnp.where(div - floor > 0.5, floor + 1, floor)
  return jnp.where(div == 0, jnp.zeros_like(div), floor)


def _cube_difference_third(end: jax.Array, begin: jax.Array, density: jax.Array) -> jax.Array:
  """torch's `_get_norm`: density * (end^3 - begin^3) / 3, each product rounded as torch does."""
  def cube(t):
    return rounded(t * t * t)

  third = exact_div(cube(end) - cube(begin), 3.0)
  return rounded(density * third)


def _quantization_error(hist: jax.Array, width_hi: jax.Array, width_lo: jax.Array,
                        start: jax.Array, end: jax.Array, dst_nbins: int) -> jax.Array:
  """torch's `_compute_quantization_error(start, end)`: the L2 error, summed as torch.sum does.

  With the source bins of width w and [start, end + 1) mapped onto dst_nbins bins of width
  d = w (end - start + 1) / dst_nbins, each source bin's uniform density is integrated over
  its pieces in the destination bins: sum density * ((b - c)^3 - (a - c)^3) / 3 around each
  destination centre c. w and d are float64 in torch (Python floats), then cast to float32.
  """
  bins = hist.shape[0]
  count = (end - start + 1).astype(jnp.float32)
  d_hi, d_lo = dd_mul(width_hi, width_lo, count)
  d_hi, d_lo = dd_div(d_hi, d_lo, float(dst_nbins))
  src_w = f64_to_f32(width_hi, width_lo)
  dst_w = f64_to_f32(d_hi, d_lo)
  half = dst_w * jnp.float32(0.5)
  offset = (jnp.arange(bins, dtype=jnp.int32) - start).astype(jnp.float32)
  begin = rounded(offset * src_w)
  stop = begin + src_w
  top = jnp.float32(dst_nbins - 1)
  dst_begin = jnp.clip(_div_floor(begin, dst_w), 0, top)
  dst_end = jnp.clip(_div_floor(stop, dst_w), 0, top)
  density = exact_div(hist, src_w)
  begin_centre = rounded((dst_begin + 0.5) * dst_w)
  norm = _cube_difference_third(jnp.broadcast_to(half, (bins,)), begin - begin_centre, density)
  full = _cube_difference_third(half, -half, density)
  norm = norm + rounded((dst_end - dst_begin - 1) * full)
  end_centre = rounded(dst_end * dst_w) + half
  norm = norm + _cube_difference_third(stop - end_centre, -half, density)
  # torch returns 0.0 for a zero-width range before computing anything.
  return jnp.where(width_hi == 0, jnp.float32(0), _torch_sum(norm))


@functools.partial(jax.jit, static_argnames=("dst_nbins",))
def _l2_search(hist: jax.Array, min_val: jax.Array, max_val: jax.Array,
               tables: tuple[jax.Array, ...], *, dst_nbins: int
               ) -> tuple[jax.Array, jax.Array]:
  bins = hist.shape[0]
  alpha_hi, alpha_lo, beta_hi, beta_lo, limit = tables
  total = _torch_sum(hist)
  csum = _cumsum_f64(hist)
  alpha_t = _scaled_thresholds(alpha_hi, alpha_lo, total)
  beta_t = _scaled_thresholds(beta_hi, beta_lo, total)
  # torch's bin width in Python: float64((max - min) / bins), carried as a float32 pair.
  span_hi, span_lo = two_sum(max_val, -min_val)
  width_hi, width_lo = dd_div(span_hi, span_lo, float(bins))
  never = jnp.int32(_TABLE_SIZE)

  def body(state):
    ka, kb, start, end, norm_min, _ = state
    # l: first bin from `start` whose cumulative sum reaches next_alpha * total (cSum rises).
    # (l and r are torch's names in _non_linear_param_search.)
    l = jnp.clip(jnp.sum(csum < alpha_t[ka + 1], dtype=jnp.int32), start, end)  # noqa: E741
    # While l == start, torch's iterations only step beta until r < end: jump there.
    crossing = jnp.searchsorted(-beta_t, -csum[end], side="right").astype(jnp.int32) - 1
    skipped = jnp.where(end > start, jnp.maximum(crossing, kb), never)
    kb = jnp.where(l == start, skipped, kb)
    running = kb < limit[ka]                 # alpha < beta
    below = jnp.sum(csum <= beta_t[jnp.minimum(kb + 1, _TABLE_SIZE - 1)], dtype=jnp.int32)
    r = jnp.clip(below - 1, start, end)
    move_start = (l - start) > (end - r)
    next_start = jnp.where(move_start, l, start)
    next_end = jnp.where(move_start, end, r)
    norm = _quantization_error(hist, width_hi, width_lo, next_start, next_end, dst_nbins)
    accept = running & ~(norm > norm_min)
    return (ka + move_start.astype(jnp.int32), kb + (~move_start).astype(jnp.int32),
            jnp.where(accept, next_start, start), jnp.where(accept, next_end, end),
            jnp.where(accept, norm, norm_min), ~accept)

  init = (jnp.int32(0), jnp.int32(0), jnp.int32(0), jnp.int32(bins - 1),
          jnp.float32(jnp.inf), jnp.bool_(False))
  _, _, start, end, _, _ = lax.while_loop(lambda s: ~s[-1], body, init)
  width = exact_div(max_val - min_val, jnp.float32(bins))
  new_min = min_val + rounded(width * start.astype(jnp.float32))
  new_max = min_val + rounded(width * (end + 1).astype(jnp.float32))
  return new_min, new_max


def l2_search_range(histogram: jax.Array, min_val: jax.Array, max_val: jax.Array, *,
                    dst_nbins: int) -> tuple[jax.Array, jax.Array]:
  """torch's `_non_linear_param_search`: the sub-range of the histogram with least L2 error.

  A greedy search over bin ranges [s, e] (start [0, bins - 1]): quantile bounds alpha, beta
  move inwards by 1e-5 of the total mass; each step moves whichever end has more bins to
  drop, and the search stops at the first move that raises the L2 error of quantizing the
  histogram onto `dst_nbins` levels over [s, e + 1) (see `_quantization_error`), or when
  alpha >= beta. Then, with w = (max_val - min_val) / bins in float32,

    new_min = min_val + w * s,    new_max = min_val + w * (e + 1).

  Runs as a while loop of at most bins + 1 steps of O(bins) each (torch's no-op steps of
  beta are skipped in one jump); it usually stops within a few dozen.

  PyTorch 2.13 sets dst_nbins = 2 ** torch.iinfo(dtype).bits: 256 for quint8 and qint8,
  whatever reduce_range, quant_min and quant_max say (a reduced range still searches with
  256 levels). The result is not widened to include 0; qparams_from_minmax does that.

  Args:
    histogram: float32 (bins,) counts over [min_val, max_val], bins < 32768 (torch sums
      longer vectors on several threads, in an order not reproduced here).
    min_val: float32 scalar.
    max_val: float32 scalar.
    dst_nbins: number of quantization levels the error is measured for (static).

  Returns:
    (new_min, new_max), float32 scalars, bit for bit torch's: min_val <= new_min <= new_max,
    and new_max <= max_val up to the float32 rounding of w (torch's can pass max_val by as
    much). NaN for a histogram that has seen no data (min_val = +inf).

  Raises:
    TypeError / ValueError: bad dtypes, shapes or dst_nbins.
  """
  histogram, min_val, max_val = _checked_state(histogram, min_val, max_val, "l2_search_range")
  if isinstance(dst_nbins, bool) or not isinstance(dst_nbins, (int, np.integer)) \
      or dst_nbins < 1:
    raise ValueError(f"l2_search_range: expected dst_nbins as a positive int, got "
                     f"{dst_nbins!r}.")
  tables = tuple(jnp.asarray(t) for t in _quantile_tables())
  return _l2_search(histogram, min_val, max_val, tables, dst_nbins=int(dst_nbins))


# ------------------------------------------------------------------------------------------
# Percentiles.


@jax.jit
def _percentile(hist: jax.Array, min_val: jax.Array, max_val: jax.Array, q_low: jax.Array,
                q_high: jax.Array) -> tuple[jax.Array, jax.Array]:
  bins = hist.shape[0]
  csum = jnp.cumsum(hist)
  total = csum[-1]   # the cumulative sum's own end, so that q_high = 1 reaches it exactly
  before = jnp.concatenate([jnp.zeros((1,), jnp.float32), csum[:-1]])
  width = exact_div(max_val - min_val, jnp.float32(bins))
  # Products kept apart from the adds that follow, so that every mode rounds alike.
  t_low, t_high = rounded(q_low * total), rounded(q_high * total)

  def position(k, t):
    """min + w (k + f), f the fraction of bin k's mass below t (bin k straddles t)."""
    k = jnp.minimum(k, bins - 1)
    mass = hist[k]
    frac = jnp.where(mass > 0, exact_div(t - before[k], jnp.where(mass > 0, mass, 1)), 0)
    return min_val + rounded(width * (k.astype(jnp.float32) + jnp.clip(frac, 0, 1)))

  # Lower: the first bin whose cumulative sum reaches t_low holds inf{x : F(x) >= t_low}.
  low = position(jnp.sum(csum < t_low, dtype=jnp.int32), t_low)
  # Upper: bins whose cumulative sum stays <= t_high lie wholly below sup{x : F(x) <= t_high}.
  whole = jnp.sum(csum <= t_high, dtype=jnp.int32)
  high = jnp.where(whole >= bins, max_val, position(whole, t_high))
  return jnp.clip(low, min_val, max_val), jnp.clip(high, min_val, max_val)


def percentile_range(histogram: jax.Array, min_val: jax.Array, max_val: jax.Array, *,
                     percentile: float) -> tuple[jax.Array, jax.Array]:
  """The clip range between the (100 - p)-th and p-th percentiles of the histogram.

  The histogram is read as a distribution with uniform density inside each bin, so its
  CDF F on [min_val, max_val] is continuous and piecewise linear: with w = (max - min) /
  bins, H_k the counts and C_k = H_0 + ... + H_k,

    F(min + w (k + f)) = (C_{k-1} + f H_k) / C_{bins-1},   0 <= f <= 1.

  With q = p / 100 in [0.5, 1]:

    low  = min{x in [min_val, max_val] : F(x) >= 1 - q}
    high = max{x in [min_val, max_val] : F(x) <= q}

  so p = 100 gives exactly (min_val, max_val), low <= high, low never rises and high never
  falls as p grows, and empty bins at either end are clipped away for p < 100. Computed in
  float32. The range is not widened to include 0 (qparams_from_minmax does that, as torch's
  `_calculate_qparams` does). A one-point range gives (min_val, min_val); a histogram that
  has seen no data, NaN.

  Args:
    histogram: float32 (bins,) counts over [min_val, max_val].
    min_val: float32 scalar.
    max_val: float32 scalar.
    percentile: p in [50, 100] (a Python number; not traced).

  Returns:
    (low, high), float32 scalars with min_val <= low <= high <= max_val.

  Raises:
    TypeError / ValueError: bad dtypes, shapes, or p outside [50, 100].
  """
  histogram, min_val, max_val = _checked_state(histogram, min_val, max_val, "percentile_range")
  if isinstance(percentile, bool) or not isinstance(percentile, (int, float, np.floating)) \
      or not 50 <= percentile <= 100:
    raise ValueError(f"percentile_range: expected percentile in [50, 100], got {percentile!r}.")
  q = float(percentile) / 100
  return _percentile(histogram, min_val, max_val, jnp.float32(1 - q), jnp.float32(q))


# ------------------------------------------------------------------------------------------
# The observers.


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistogramObserver(_RangeObserver[HistogramState]):
  """PyTorch's `HistogramObserver`: a `bins`-bin histogram over the running [min, max]
  (re-binned when the range grows), and qparams from the sub-range [a, b] of the histogram
  that minimises the L2 error of quantizing it onto 2^bits levels:

    [a, b] = argmin  sum_bins  E[(x - Q_{a,b}(x))^2]      (greedy search, as PyTorch does)

  Per-tensor only. Good for activations with long tails (PyTorch's x86 default).
  """

  bins: int = 2048

  def __post_init__(self):
    super().__post_init__()
    if self.spec.per_channel:
      raise ValueError(f"{self.name} is per-tensor only; got spec.axis={self.spec.axis}. Use "
                       f"MinMaxObserver or MovingAverageMinMaxObserver for per-channel ranges.")
    if isinstance(self.bins, bool) or not isinstance(self.bins, (int, np.integer)) \
        or self.bins < 1:
      raise ValueError(f"{self.name}.bins must be a positive int; got {self.bins!r}.")

  def init(self, shape: Any) -> HistogramState:
    """Empty state (the histogram does not depend on the tensor's shape)."""
    del shape
    return HistogramState(jnp.zeros((self.bins,), jnp.float32),
                          jnp.full((), jnp.inf, jnp.float32), jnp.full((), -jnp.inf, jnp.float32),
                          jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def update(self, state: HistogramState, x: jax.typing.ArrayLike, *,
             axis_name: AxisName = None) -> HistogramState:
    """Fold in the batch `x` (PyTorch's `HistogramObserver.forward`).

    With `axis_name` (mapped axes the batch is split over, as in `MinMaxObserver.update`)
    the batch's min and max are reduced across shards first, so every shard bins onto the
    same edges, then the shards' counts are summed (`histogram_update`): every shard holds
    the single-device state of the whole batch, bit for bit.

    Args:
      state: the state from `init` or a previous `update` (the same on every shard).
      x: the batch (its shard, under a mapped axis).
      axis_name: a name or a tuple of names; None: `x` is the whole batch.

    Returns:
      The new state.

    Raises:
      TypeError: a state from another observer, or a bad `axis_name`.
      ValueError: eagerly, for a batch with NaN / +-inf or one that makes the range too wide
        for float32 (`qjax.observers`); under jit such a batch is skipped and counted.

    Example:
      >>> from qjax import QuantSpec
      >>> obs = HistogramObserver(spec=QuantSpec(bits=8), bins=4)
      >>> shards = jnp.array([[0.0, 4.0], [1.0, 3.0]])   # one batch, split over 2 devices
      >>> fold = lambda part: obs.update(obs.init(()), part, axis_name="batch")
      >>> jax.vmap(fold, axis_name="batch")(shards).histogram[0].tolist()
      [1.0, 1.0, 0.0, 2.0]
    """
    axis_name = checked_axis_name(axis_name, f"{self.name}.update")
    x = _batch_data(x, self.name)
    if not isinstance(state, HistogramState) or state.histogram.shape != (self.bins,):
      raise TypeError(f"{self.name}.update: expected a HistogramState with {self.bins} bins "
                      f"(from {self.name}.init); got {type(state).__name__}"
                      + (f" with {state.histogram.shape[0]} bins"
                         if isinstance(state, HistogramState) else "") + ".")
    lo, hi = min_and_max(x)
    finite = jnp.isfinite(lo) & jnp.isfinite(hi)
    if axis_name is not None:
      lo, hi = lax.pmin(lo, axis_name), lax.pmax(hi, axis_name)
    ok = finite & _fits_float32(self.name, state, lo, hi)
    if axis_name is not None:   # every shard skips, or none does
      ok = lax.pmin(ok.astype(jnp.int32), axis_name).astype(bool)
    # A skipped batch is replaced by a harmless finite one; its result is discarded below.
    zero = jnp.zeros((), jnp.float32)
    safe_x = jnp.where(ok, x, zero).reshape(-1)
    hist, lo, hi = _update(state.histogram, state.min_val, state.max_val, safe_x,
                           jnp.where(ok, lo, zero), jnp.where(ok, hi, zero), state.count > 0,
                           axis_name=axis_name)

    def keep(new, old):
      return jnp.where(ok, new, old)

    return HistogramState(keep(hist, state.histogram), keep(lo, state.min_val),
                          keep(hi, state.max_val), _saturating_increment(state.count, ok),
                          _saturating_increment(state.skipped, ~ok))

  def range(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
    """The L2-optimal clip range (PyTorch's `_non_linear_param_search`)."""
    lo, hi = _checked_range(state, self.name)
    return l2_search_range(state.histogram, lo, hi, dst_nbins=2**self.spec.bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PercentileObserver(HistogramObserver):
  """Histogram observer whose range is clipped at percentiles of everything seen:

    [a, b] = [P_{100-p}(x), P_p(x)]    (linear interpolation inside a histogram bin)

  `percentile=100` gives the plain min/max. Clipping a few outliers usually buys resolution
  for the bulk of an activation distribution.
  """

  percentile: float = 99.99

  def __post_init__(self):
    super().__post_init__()
    p = self.percentile
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50 < p <= 100:
      raise ValueError(f"PercentileObserver.percentile must be in (50, 100]; got {p!r}.")

  def range(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
    """The percentile clip range."""
    lo, hi = _checked_range(state, self.name)
    return percentile_range(state.histogram, lo, hi, percentile=float(self.percentile))
