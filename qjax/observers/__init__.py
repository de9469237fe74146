"""Observers: running statistics of a tensor, and the qparams they imply. No module state.

Every observer is a frozen, hashable dataclass (static under `jax.jit`, usable as a Flax module
attribute) with three pure methods over a small NamedTuple state of float32 statistics and
int32 counters:

  state  = observer.init(shape)          # nothing seen yet: count == 0
  state  = observer.update(state, x)     # fold in one batch
  qparams = observer.qparams(state)      # QParams(scale, zero_point) for observer.spec

The flax layer (`qjax.nn`) keeps these states in the "quant_stats" collection, exactly as
BatchNorm keeps its running averages in "batch_stats".

Observers and their PyTorch counterparts (`torch.ao.quantization`):

  MinMaxObserver                (MinMaxObserver / PerChannelMinMaxObserver)
      min_t = min(min_{t-1}, min(x_t)),  max_t = max(max_{t-1}, max(x_t))
  MovingAverageMinMaxObserver   (MovingAverage[PerChannel]MinMaxObserver)
      first batch: min_1 = min(x_1); then min_t = min_{t-1} + c * (min(x_t) - min_{t-1})
  HistogramObserver             (HistogramObserver): a histogram over [min, max], and the
      clip range that minimises the L2 quantization error of the histogram.
  PercentileObserver            the same histogram, clipped at the (100-p)-th and p-th
      percentiles.
  MSEObserver                   the same histogram; the clip range among its bin edges whose
      grid has the least expected squared error, integrated exactly over the histogram.
  EntropyObserver               the same histogram; TensorRT's entropy calibration: the |x|
      threshold with the least KL(P || Q) between the histogram and its quantized version.
  FixedQParamsObserver          (FixedQParamsObserver) a grid fixed in advance.

Per-channel statistics follow `spec.axis` (min/max observers only). The arithmetic matches
PyTorch's float32 operations one by one, so states and qparams agree with it bit for bit.

Non-finite data. A batch that holds NaN or +-inf is never folded into the state. Called on
concrete arrays (eagerly), `update` raises a ValueError. Under `jax.jit` it cannot raise: the
batch is skipped whole and `state.skipped` counts it, so the event stays visible (PyTorch
would propagate the NaN into min/max; its HistogramObserver drops the inf elements and keeps
the rest of the batch).

Ranges too wide for float32. Finite data can still span more than float32 holds: with the
state's range grown by the batch's min and max to [lo, hi] (and widened to include 0, as
the qparams are), hi - lo must not overflow (`numerics.range_fits_float32`; e.g. values
near -3e38 and 3e38 fail). Otherwise the histogram's bin width, the moving average's step
and the affine scale would all be inf or NaN. Such a batch is treated like a non-finite
one: eagerly `update` raises a ValueError ("too wide for float32"); under `jax.jit` the
batch is skipped and counted in `state.skipped`, so the state never holds inf or NaN.

Subnormal floats: XLA:CPU flushes them to zero, so a batch whose extreme is subnormal records
0 where PyTorch records the subnormal. The qparams are the same either way (the range always
includes 0 and the scale floor `eps` is far above any subnormal).

Asking for qparams before any batch was seen raises a ValueError eagerly; under jit the scale
is NaN (`qparams_from_minmax`'s convention for an invalid range).

Sharding. Under `jax.jit` with sharded inputs (GSPMD) nothing is needed: XLA partitions
the one-device program, whose reductions are global. Under `jax.shard_map` (or `vmap`,
`pmap`), every observer's `update(state, x, axis_name=...)` takes the mapped axes the batch
is split over (a name or a tuple of names) and reduces over them exactly: min and max with
`lax.pmin` / `lax.pmax` (and the skip decision with `lax.pmin`, so every shard skips or
none does); a histogram observer bins each shard's slice onto the edges of that global range
and adds the shards' int32 counts with `lax.psum`. Every shard then holds, bit for bit, the
state one device computes from the whole batch. Per-channel statistics of a kernel split
over its output channels need no axis (each shard owns its channels); a per-tensor
statistic of such a kernel reduces over the model axis. `merge` combines two min/max states
(e.g. from separate runs).

Modules: `qjax.observers.minmax` (the min/max and moving-average observers, the state types
and the parts all observers share), `qjax.observers.histogram` (the histogram and
percentile observers, and the PyTorch histogram math they run on) and
`qjax.observers.error` (the MSE and entropy observers, and their searches).
"""

from qjax.observers.error import EntropyObserver
from qjax.observers.error import MSEObserver
from qjax.observers.histogram import HistogramObserver
from qjax.observers.histogram import PercentileObserver
from qjax.observers.minmax import FixedQParamsObserver
from qjax.observers.minmax import HistogramState
from qjax.observers.minmax import MinMaxObserver
from qjax.observers.minmax import MinMaxState
from qjax.observers.minmax import MovingAverageMinMaxObserver
from qjax.observers.minmax import ObserverState
from qjax.observers.minmax import merge

Observer = (MinMaxObserver | MovingAverageMinMaxObserver | HistogramObserver
            | PercentileObserver | MSEObserver | EntropyObserver | FixedQParamsObserver)

__all__ = (
    "EntropyObserver",
    "FixedQParamsObserver",
    "HistogramObserver",
    "HistogramState",
    "MSEObserver",
    "MinMaxObserver",
    "MinMaxState",
    "MovingAverageMinMaxObserver",
    "Observer",
    "ObserverState",
    "PercentileObserver",
    "merge",
)
