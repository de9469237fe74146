"""Quantized joins, pooling and ReLU: PyTorch's FloatFunctional (add, add_relu, cat), average
pooling and an unfused ReLU, as Flax modules with an integer form each.

    y = FQ_out(a + b)            QuantAdd (relu=True: FQ_out(relu(a + b)), add_relu)
    y = FQ_out(concat(xs))       QuantConcat
    y = avg_pool(x)              AvgPool / AvgPool(window=None): global average pooling
    y = relu(x)                  QuantReLU (on the input's grid: max(q, Z) in mode "int8")
    y = max_pool(x)              max_pool: nn.max_pool, int8 input pooled on the native kernel

The joins observe their output (quant_stats/<module>/output), as FloatFunctional's
activation_post_process does, so that the integer form requantizes to that grid; the inputs
keep the grids of the modules that produced them. Average pooling keeps its input's grid (no
observer), as PyTorch's quantized pooling does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.integer.forms import base as forms
from qjax.integer.forms.add import AddForm, Int8Add, IntegerAdd
from qjax.integer.forms.concat import ConcatForm, Int8Concat, IntegerConcat
from qjax.integer.forms.pool import Int8AvgPool, PoolForm, pool_pads
from qjax.integer.forms.relu import Int8ReLU, ReLUForm
from qjax.nn import _integer
from qjax.nn.modules import Mode, _merged_mode, _point, _where, module_path
from qjax.nn.qconfig import QConfig, QConfigLike, resolve
from qjax.observers.minmax import AxisName


def _observed(qconfig: QConfig | None) -> bool:
  return qconfig is not None and qconfig.activation is not None


def _output(module: nn.Module, qconfig: QConfig | None, y: jax.Array, mode: Mode) -> jax.Array:
  """y through the module's output point, marked for convert when it is quantized."""
  y = _point(qconfig, "activation", name="output", parent=module,
             axis_name=module.axis_name)(y, mode=mode)
  if not _observed(qconfig):
    return y
  assert qconfig is not None and qconfig.activation is not None
  return forms.mark_output(module, y, observer=qconfig.activation,
                           learnable=qconfig.learnable, point="output")


class QuantAdd(nn.Module):
  """a + b (ReLU'd when `relu`), observed at its output: PyTorch's `FloatFunctional.add` /
  `add_relu`. In mode "int8" it adds two int8 tensors on their own grids and requantizes to
  the observed output grid (`qjax.integer.forms.add`: PyTorch's arithmetic by default).

  Attributes:
    qconfig: its `activation` observer is the output grid (None: a float add).
    relu: fuse a ReLU (add_relu).
    mode: default mode, overridable per call.
    axis_name: mapped axes (`jax.shard_map`) the batch is split over; the output observer
      reduces over them (`qjax.nn.QuantDense`). None under GSPMD or on one device.

  Example:
    >>> import qjax.nn as qnn
    >>> add = qnn.QuantAdd(qconfig=qnn.default_qconfig, relu=True)
    >>> a, b = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
    >>> v = add.init(jax.random.key(0), a, b, mode="float")
    >>> add.apply(v, a, b, mode="float")
    Array([1.5, 0. ], dtype=float32)
  """

  qconfig: QConfigLike = None
  relu: bool = False
  mode: Mode | str | None = None
  axis_name: AxisName = None

  @nn.compact
  def __call__(self, a: jax.Array, b: jax.Array, *,
               mode: Mode | str | None = None) -> jax.Array:
    mode = _merged_mode(self, mode)
    qconfig = resolve(self.qconfig, module_path(self))
    where = _where(self)
    if mode is Mode.INT8 and _observed(qconfig):
      return _integer.run(self, where, (Int8Add, IntegerAdd), a, b)
    form = AddForm(relu=bool(self.relu)) if _observed(qconfig) else None
    try:
      jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
    except ValueError:
      raise ValueError(f"{where}: a {jnp.shape(a)} and b {jnp.shape(b)} do not broadcast to one "
                       f"shape.") from None
    a = forms.mark_input(self, a, form, operand=0)
    b = forms.mark_input(self, b, form, operand=1)
    y = a + b
    if self.relu:
      y = nn.relu(y)
    return _output(self, qconfig, y, mode)


class QuantConcat(nn.Module):
  """concatenate(xs, axis), observed at its output: PyTorch's `FloatFunctional.cat`. In mode
  "int8" inputs already on the output grid are copied and the others requantized to it.

  Attributes:
    qconfig: its `activation` observer is the output grid (None: a float concatenation).
    axis: the axis to join along.
    mode: default mode, overridable per call.
    axis_name: mapped axes the output observer reduces over (as in `QuantAdd`).

  Example:
    >>> import qjax.nn as qnn
    >>> cat = qnn.QuantConcat(qconfig=qnn.default_qconfig)
    >>> xs = [jnp.ones((2, 1)), jnp.zeros((2, 2))]
    >>> v = cat.init(jax.random.key(0), xs, mode="float")
    >>> cat.apply(v, xs, mode="float").shape
    (2, 3)
  """

  qconfig: QConfigLike = None
  axis: int = -1
  mode: Mode | str | None = None
  axis_name: AxisName = None

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], *,
               mode: Mode | str | None = None) -> jax.Array:
    mode = _merged_mode(self, mode)
    qconfig = resolve(self.qconfig, module_path(self))
    where = _where(self)
    if isinstance(xs, jax.Array) or not isinstance(xs, Sequence) or not xs:
      raise TypeError(f"{where}: QuantConcat takes a non-empty sequence of arrays (a list or "
                      f"tuple); got {type(xs).__name__}.")
    if mode is Mode.INT8 and _observed(qconfig):
      return _integer.run(self, where, (Int8Concat, IntegerConcat), *xs)
    form = ConcatForm(axis=int(self.axis)) if _observed(qconfig) else None
    parts = [forms.mark_input(self, x, form, operand=i) for i, x in enumerate(xs)]
    return _output(self, qconfig, jnp.concatenate(parts, axis=self.axis), mode)



def _float_avg_pool(x: jax.Array, form: PoolForm) -> jax.Array:
  """The float average pooling `form` describes (window sums over zero padding, divided by
  the window size or by its count of real positions), in x's dtype."""
  assert form.window is not None
  spatial = jnp.shape(x)[1:-1]
  pads = [(0, 0), *pool_pads(form.padding, spatial, form.window, form.strides), (0, 0)]
  dims, steps = (1, *form.window, 1), (1, *form.strides, 1)
  total = lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, dims, steps, pads)
  if form.count_include_pad:
    return total / jnp.asarray(math.prod(form.window), x.dtype)
  ones = jnp.ones((1, *spatial, 1), x.dtype)
  count = lax.reduce_window(ones, jnp.zeros((), x.dtype), lax.add, dims, steps, pads)
  return total / count


def _ints(value: int | Sequence[int], n: int, what: str, where: str) -> tuple[int, ...]:
  items = (value,) * n if isinstance(value, (int, np.integer)) else tuple(value)
  if len(items) != n or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                and v >= 1 for v in items):
    raise ValueError(f"{where}: {what} must be a positive int or {n} positive ints (one per "
                     f"window axis); got {value!r}.")
  return tuple(int(v) for v in items)


class AvgPool(nn.Module):
  """Average pooling that keeps its input's grid: `nn.avg_pool` in float, PyTorch's quantized
  avg_pool2d / adaptive_avg_pool2d in mode "int8" (the window's integer sum divided by its
  size, rounded to nearest even; `qjax.integer.forms.pool`). No observer: the output is on
  the input's grid, as in PyTorch.

  Attributes:
    window_shape: the window (one size per spatial axis); None: global average pooling over
      all spatial axes of (batch, *spatial, features), which are dropped (PyTorch's
      AdaptiveAvgPool2d(1) followed by a flatten).
    strides: the window's step (default: the window, as PyTorch's AvgPool2d).
    padding: "VALID", "SAME" or (low, high) pairs; padded positions count as real zeros.
    count_include_pad: divide by the whole window (True, the default of both Flax and
      PyTorch) or by its count of real positions.
    mode: default mode, overridable per call.

  Example:
    >>> import qjax.nn as qnn
    >>> pool = qnn.AvgPool()
    >>> pool.apply({}, jnp.ones((2, 4, 4, 3)), mode="float").shape
    (2, 3)
  """

  window_shape: Sequence[int] | None = None
  strides: Sequence[int] | int | None = None
  padding: str | Sequence[tuple[int, int]] = "VALID"
  count_include_pad: bool = True
  mode: Mode | str | None = None

  def _form(self, ndim: int, where: str) -> PoolForm:
    if self.window_shape is None:
      return PoolForm(window=None, strides=(), padding="VALID", count_include_pad=True)
    window = _ints(tuple(self.window_shape), len(self.window_shape), "window_shape", where)
    if ndim != len(window) + 2:
      raise ValueError(f"{where}: a {len(window)}-D window pools (batch, "
                       f"{', '.join(['spatial'] * len(window))}, features); got an input of "
                       f"rank {ndim}.")
    strides = window if self.strides is None else _ints(self.strides, len(window), "strides",
                                                        where)
    padding = self.padding
    if isinstance(padding, str):
      if padding.upper() not in ("SAME", "VALID"):
        raise ValueError(f"{where}: padding must be 'SAME', 'VALID' or (low, high) pairs; got "
                         f"{padding!r}.")
      pads: str | tuple[tuple[int, int], ...] = padding.upper()
    else:
      pads = tuple((int(lo), int(hi)) for lo, hi in padding)
      if len(pads) != len(window) or any(lo < 0 or hi < 0 for lo, hi in pads):
        raise ValueError(f"{where}: padding must be {len(window)} (low, high) pairs of ints "
                         f">= 0, one per window axis; got {padding!r}.")
    if not isinstance(pads, str) and any(lo >= w or hi >= w for (lo, hi), w in zip(
        pads, window, strict=True)):
      raise ValueError(f"{where}: padding {pads} gives windows of the {window} window that "
                       f"hold padding only; pad each side by less than the window (PyTorch "
                       f"allows at most half of it).")
    return PoolForm(window=window, strides=strides, padding=pads,
                    count_include_pad=bool(self.count_include_pad))

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: Mode | str | None = None) -> jax.Array:
    mode = _merged_mode(self, mode)
    where = _where(self)
    form = self._form(jnp.ndim(x), where)
    if mode is Mode.INT8 and jnp.asarray(x).dtype == jnp.int8:
      return _integer.run(self, where, Int8AvgPool, x)
    x = forms.mark_input(self, x, form)
    if form.window is None:
      if jnp.ndim(x) < 3:
        raise ValueError(f"{where}: global average pooling takes (batch, *spatial, features); "
                         f"got an input of shape {jnp.shape(x)}.")
      y = jnp.mean(x, axis=tuple(range(1, jnp.ndim(x) - 1)))
    else:
      y = _float_avg_pool(x, form)
    return forms.mark_same_grid(self, y)


class QuantReLU(nn.Module):
  """relu(x) that keeps its input's grid, for models whose ReLU is not fused into the layer
  before it (PyTorch's unfused nn.ReLU after convert): max(q, Z) in mode "int8"
  (`qjax.integer.forms.relu`). No observer; a ReLU on a float tensor stays float.

  Example:
    >>> import qjax.nn as qnn
    >>> qnn.QuantReLU().apply({}, jnp.array([-1.0, 2.0]), mode="float")
    Array([0., 2.], dtype=float32)
  """

  mode: Mode | str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: Mode | str | None = None) -> jax.Array:
    mode = _merged_mode(self, mode)
    if mode is Mode.INT8 and jnp.asarray(x).dtype == jnp.int8:
      return _integer.run(self, _where(self), Int8ReLU, x)
    return forms.mark_same_grid(self, nn.relu(forms.mark_input(self, x, ReLUForm())))


def max_pool(x: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = "VALID") -> jax.Array:
  """`flax.linen.max_pool`, with an int8 input (mode "int8") pooled by the native int8 kernel.

    y[b, i, j, c] = max over the window of x[b, i s0 + di, j s1 + dj, c]

  Max pooling keeps its input's grid (it commutes with the monotone quantization), so a model
  calls it in every mode on whatever it gets: float activations go to `nn.max_pool`, int8
  NHWC ones with 2-D VALID windows to `qjax.integer.kernels.max_pool` (the same integers as
  `nn.max_pool` on int8; one native call instead of XLA's reduce_window). A window holding
  NaN gives NaN, as PyTorch's max_pool2d: XLA:CPU's max pooling alone returns the window's
  largest other value (its kernels drop NaN), so float inputs pay a second pooling of isnan(x).

  Example:
    >>> x = jnp.arange(16, dtype=jnp.int8).reshape(1, 4, 4, 1)
    >>> max_pool(x, (2, 2), strides=(2, 2))[0, :, :, 0].tolist()
    [[5, 7], [13, 15]]
  """
  window = _ints(tuple(window_shape), len(tuple(window_shape)), "window_shape", "max_pool")
  if strides is not None:
    strides = _ints(tuple(strides), len(window), "strides", "max_pool")
  if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
    raise ValueError(f"max_pool: padding must be 'SAME', 'VALID' or (low, high) pairs; got "
                     f"{padding!r}.")
  if (getattr(x, "dtype", None) == jnp.int8 and jnp.ndim(x) == 4 and len(window) == 2
      and isinstance(padding, str) and padding == "VALID"
      and (strides is None or len(tuple(strides)) == 2)):
    from qjax.integer import kernels  # pylint: disable=import-outside-toplevel
    return kernels.max_pool(x, window, (1, 1) if strides is None else strides)  # flax's default
  y = nn.max_pool(x, window, strides=strides, padding=padding)
  # (Not while convert traces the float forward for its dataflow: there pooling must read as
  # the grid-preserving op it is on int8.)
  if jnp.issubdtype(jnp.result_type(x), jnp.floating) and not forms.tracing():
    nan = nn.max_pool(jnp.isnan(x).astype(y.dtype), window, strides=strides, padding=padding)
    y = jnp.where(nan > 0, jnp.asarray(jnp.nan, y.dtype), y)
  return y
