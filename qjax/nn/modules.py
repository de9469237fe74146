"""Flax linen modules for calibration and quantization-aware training.

The modules own no math: they keep observer states in the "quant_stats" collection (the way
BatchNorm keeps "batch_stats") and call `qjax.observers` and `qjax.ste`.

Where the quantization points sit. Two placements, each complete on its own:

* PyTorch's eager-mode placement, for models written with qjax layers: `Quantize` (QuantStub)
  observes the model input; `QuantDense` / `QuantConv` quantize their weight (per output
  channel by default) and observe their *output*, after an optional fused activation
  (`activation=nn.relu`: PyTorch's LinearReLU / ConvReLU2d); `Dequantize` (DeQuantStub)
  marks the way out. Every activation is quantized once, where it is produced, with the same
  observers PyTorch's `prepare` inserts, so calibration and QAT match it observer for
  observer; and each layer knows its input and output qparams, which is what the integer
  path needs.
* AQT / Qwix's placement, for stock Flax layers: `QuantDotGeneral` / `QuantConvGeneral`
  plug into `nn.Dense(dot_general_cls=...)` / `nn.Conv(conv_general_dilated_cls=...)` and
  quantize both operands of the contraction: the input activation (per tensor) and the
  weight, where they are consumed.

Do not chain the two on one tensor: a `QuantDense` output feeding a stock layer with a
`QuantDotGeneral` would be quantized twice.

Modes, chosen per call like BatchNorm's `use_running_average`:
  "float"      no observation, no fake quantization.
  "calibrate"  observers update (quant_stats must be mutable), values pass through unchanged.
  "qat"        observers update when quant_stats is mutable (frozen otherwise, e.g. for
               evaluation), then values are fake-quantized with the observers' qparams and a
               straight-through gradient.
  "int8"       the converted model (`qjax.convert`): each module runs its typed op from the
               "converted" collection; `Quantize` turns the float input into int8, each
               `QuantDense` / `QuantConv` runs int8 x int8 -> int32 and requantizes to int8,
               `QuantAdd` / `QuantConcat` / `AvgPool` join and pool int8 tensors,
               `Dequantize` returns float. Only those modules (and grid-preserving ops such
               as reshape or max pooling between them) may touch the int8 tensors.
Observers never update while the model is being initialised.

Sharded batches. Under `jax.jit` with `NamedSharding` inputs (GSPMD) nothing is needed: the
program is the one-device program and XLA partitions it, observer reductions included. Under
`jax.shard_map` (or `pmap`, `vmap`) each device sees its shard of the batch; give the modules
`axis_name` (as for Flax's `nn.BatchNorm`: a mapped axis name or a tuple of them) and their
activation points reduce their batch statistics over it (`observer.update(...,
axis_name=...)`), so every shard holds the statistics of the whole batch, exactly as one
device would compute them. Weight points never reduce: a replicated kernel is whole on every
shard, and per-channel statistics of a kernel split over output channels are per shard.

When the "quant_params" collection is mutable, every point also writes its current
(scale, zero_point) there: `collect_qparams` uses that to read a calibrated model's qparams,
and raises, naming the module path, for a point that has never seen data.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax import _checks
from qjax import observers as obs
from qjax import numerics
from qjax import ste
from qjax.integer import arith
from qjax.numerics import QParams
from qjax.observers.minmax import AxisName
from qjax.integer.forms import base as forms
from qjax.integer.forms.boundary import DequantizeForm, QuantizeForm
from qjax.integer.forms.dot import DotForm, QuantizedConv, QuantizedDot
from qjax.nn import _integer
from qjax.nn.qconfig import QConfig, QConfigLike, resolve
from qjax.quantizers import points as quantizer_points

STATS = "quant_stats"
QPARAMS = "quant_params"
CONVERTED = _integer.COLLECTION


class Mode(enum.Enum):
  """What a quantization point does on this call."""

  FLOAT = "float"
  CALIBRATE = "calibrate"
  QAT = "qat"
  INT8 = "int8"


def as_mode(value: Mode | str | None, where: str = "mode") -> Mode:
  """`value` as a Mode; a ValueError listing the accepted values otherwise."""
  if isinstance(value, Mode):
    return value
  accepted = [m.value for m in Mode]
  if isinstance(value, str) and value.lower() in accepted:
    return Mode(value.lower())
  if not isinstance(value, (str, type(None))):
    raise TypeError(f"{where}: mode must be one of {accepted} (or a qjax.nn.Mode); got a "
                    f"{type(value).__name__}. Modules take their qconfig by keyword "
                    f"(QuantDense(..., qconfig=q)); Dequantize takes none.")
  if value is None:
    raise ValueError(f"{where}: mode is required (one of {accepted}); pass it as the module's "
                     f"`mode` attribute or as `mode=` in the call.")
  raise ValueError(f"{where}: mode must be one of {accepted} (or a qjax.nn.Mode); got {value!r}.")


def module_path(module: nn.Module) -> str:
  """The module's Flax path joined with "/" ("" for the top-level module)."""
  return "/".join(str(p) for p in module.path)


def _where(module: nn.Module) -> str:
  """The module's path for error messages (at the top level: its layer's or its class name)."""
  if module_path(module):
    return module_path(module)
  if isinstance(module.parent, nn.Module):
    return _where(module.parent)
  return type(module).__name__


def _merged_mode(module: nn.Module, call_mode: Mode | str | None) -> Mode:
  where = _where(module)
  attr = getattr(module, "mode", None)
  if attr is not None and not isinstance(attr, (Mode, str)):
    as_mode(attr, where)  # a TypeError that explains the misplaced argument
  if attr is not None and call_mode is not None:
    raise ValueError(f"{where}: mode was given both as an attribute ({attr!r}) and in the call "
                     f"({call_mode!r}); give it once.")
  return as_mode(call_mode if call_mode is not None else attr, where)


def _reraise_with_path(module: nn.Module, fn: Callable[[], Any]) -> Any:
  """Run `fn`; prefix the module path to its ValueError / TypeError messages."""
  try:
    return fn()
  except (ValueError, TypeError) as err:
    path = _where(module)
    if str(err).startswith(path + ":"):
      raise
    raise type(err)(f"{path}: {err}") from err


def _no_int8(module: nn.Module, mode: Mode) -> None:
  if mode is Mode.INT8:
    raise ValueError(f"{_where(module)}: {type(module).__name__} has no integer form; mode "
                     f"'int8' runs the modules `qjax.convert` converts (Quantize, QuantDense, "
                     f"QuantConv, QuantAdd, QuantConcat, AvgPool, Dequantize, and stock layers "
                     f"whose QuantDotGeneral / QuantConvGeneral observes both operands).")


def _observer_state(module: nn.Module, observer: obs.Observer, x: jax.Array, mode: Mode
                    ) -> tuple[obs.ObserverState, dict[str, Any]] | None:
  """The point's observer state in "quant_stats" (created at init) and its variables, or None
  for a float forward of params alone, which needs no statistics."""
  _reraise_with_path(module, lambda: _checks.as_float_array(
      "x", x, hint=" (a quantization point observes real-valued activations or weights)."))
  fresh = _reraise_with_path(module, lambda: observer.init(jnp.shape(x)))
  if not module.is_initializing() and not module.has_variable(STATS, "count"):
    if mode is Mode.FLOAT and not module.is_mutable_collection(QPARAMS):
      return None
    raise ValueError(f"{_where(module)}: no '{STATS}' for this quantization point. Pass the "
                     f"whole variables dict from init (params and {STATS}) to apply, e.g. "
                     f"model.apply({{'params': p, '{STATS}': s}}, ...).")
  variables = {name: module.variable(STATS, name, lambda v=value: v)
               for name, value in fresh._asdict().items()}
  return type(fresh)(**{name: var.value for name, var in variables.items()}), variables


def _observe(module: nn.Module, observer: obs.Observer, state: obs.ObserverState,
             variables: dict, x: jax.Array, *, mode: Mode, updates: bool,
             axis_name: AxisName = None) -> Any:
  """Fold x into the observer when `updates` and "quant_stats" is mutable (never at init),
  reduced over the mapped axes `axis_name`; "calibrate" with immutable statistics is an
  error. Returns the (new) state."""
  if module.is_initializing():
    return state
  mutable = module.is_mutable_collection(STATS)
  if mode is Mode.CALIBRATE and not mutable:
    raise ValueError(f"{_where(module)}: mode='calibrate' updates observer statistics, but "
                     f"the '{STATS}' collection is immutable; call "
                     f"apply(..., mutable=['{STATS}']).")
  if updates and mutable:
    # The state is from this observer's own init; mypy cannot pair the union's members.
    state = _reraise_with_path(
        module, lambda: observer.update(state, lax.stop_gradient(x),  # type: ignore[arg-type]
                                        axis_name=axis_name))
    for name, var in variables.items():
      var.value = getattr(state, name)
  return state


def _write_qparams(module: nn.Module, scale: jax.Array, zero_point: jax.Array) -> None:
  """Record the point's qparams in "quant_params" (for `collect_qparams`)."""
  module.put_variable(QPARAMS, "scale", scale)
  module.put_variable(QPARAMS, "zero_point", zero_point)


class FakeQuant(nn.Module):
  """One quantization point: an observer whose state lives in "quant_stats".

  Use it directly to quantize a tensor that no qjax layer produces (e.g. the output of an
  add or a concatenation).

  Attributes:
    observer: the observer (None: the point does nothing and keeps no state).
    mode: default mode, overridable per call.
    axis_name: mapped axes (`jax.shard_map`) the observed tensor is split over: the
      observer reduces its batch statistics over them. None under GSPMD or on one device.
  """

  observer: obs.Observer | None
  mode: Mode | str | None = None
  axis_name: AxisName = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: Mode | str | None = None,
               return_qparams: bool = False, int8_operand: str | None = None) -> Any:
    """x unchanged (float, calibrate) or fake-quantized with the observed qparams (qat);
    with `return_qparams`, (that, the qparams it was fake-quantized with or None).

    `int8_operand` ("x" or "w", with `return_qparams`): also return, third, the grid
    integers of the result for `qjax.ste.int8_forward_dot` where the point runs natively
    (`qjax.ste.observed_fake_quant_int8`), else None."""
    y, qparams, int8 = self._quantize(x, mode, int8_operand)
    if int8_operand is not None:
      return y, qparams, int8
    return (y, qparams) if return_qparams else y

  def _quantize(self, x: jax.Array, mode: Mode | str | None,
                int8_operand: str | None = None) -> tuple[jax.Array, Any, Any]:
    mode = _merged_mode(self, mode)
    observer = self.observer
    if observer is None:
      return x, None, None
    _no_int8(self, mode)
    found = _observer_state(self, observer, x, mode)
    if found is None:
      return x, None, None
    record = self.is_mutable_collection(QPARAMS) and not self.is_initializing()
    state, variables = found
    path = self._fused_path(observer, x, state, mode)
    if path is not None:  # observe, qparams and fake quant in one native call
      averaging = getattr(observer, "averaging_constant", None)
      int8 = None
      if int8_operand is not None:
        y, fields, qparams, int8 = ste.observed_fake_quant_int8(
            x, *state, spec=observer.spec, averaging=averaging, eps=float(observer.eps),
            path=path, operand=int8_operand)
      else:
        y, fields, qparams = ste.observed_fake_quant(
            x, *state, spec=observer.spec, averaging=averaging, eps=float(observer.eps),
            path=path)
      for var, value in zip(variables.values(), fields, strict=True):
        var.value = value
      if record:
        _write_qparams(self, *qparams)
      return y, qparams, int8
    state = _observe(self, observer, *found, x, mode=mode, updates=mode is not Mode.FLOAT,
                     axis_name=self.axis_name)
    if not record and (mode is not Mode.QAT or self.is_initializing()):
      return x, None, None
    qparams = _reraise_with_path(self, lambda: observer.qparams(state))
    if record:
      _write_qparams(self, *qparams)
    if mode is not Mode.QAT or self.is_initializing():
      return x, None, None
    qparams = jax.tree_util.tree_map(lax.stop_gradient, qparams)
    y = _reraise_with_path(self, lambda: ste.fake_quant(x, observer.spec, qparams))
    return y, qparams, None

  def _fused_path(self, observer: obs.Observer, x: jax.Array, state: Any,
                  mode: Mode) -> str | None:
    """The native path of a fused QAT point (`ste.observed_fake_quant`), or None where the
    point runs as XLA ops: QAT under a trace, statistics mutable, a (moving-average) min /
    max observer, float32 data, no mapped axes, the native kernel on this backend. Eager
    calls keep the XLA form, whose observer raises on NaN / inf batches."""
    traced = any(isinstance(v, jax.core.Tracer) for v in (x, *state))
    if (mode is not Mode.QAT or self.is_initializing() or self.axis_name is not None
        or not self.is_mutable_collection(STATS) or not traced
        or type(observer) not in (obs.MinMaxObserver, obs.MovingAverageMinMaxObserver)
        or getattr(x, "dtype", None) != jnp.float32 or jnp.size(x) == 0):
      return None
    from qjax.integer import kernels  # pylint: disable=import-outside-toplevel
    path = kernels.resolve(macs=int(jnp.size(x)))
    return None if path == "xla" else path


class LearnableFakeQuant(nn.Module):
  """A quantization point whose scale and zero point are learned (LSQ; PyTorch's
  `_LearnableFakeQuantize`): they live in "params" and get the LSQ gradients of
  `qjax.ste.fake_quant_learnable`; the observer only initialises them. A symmetric spec fixes
  the zero point, so only the scale is a parameter then.

    y = S * (clamp(rne(x / S) + rne(Z), qmin, qmax) - rne(Z)),   S = max(scale, eps)

  * init: scale / zero_point from the observer's qparams on the init batch (data-dependent
    initialisation), the observer's state empty in "quant_stats".
  * "calibrate": the observer updates; with "params" mutable as well, the observed qparams
    are copied into scale / zero_point (PyTorch's `enable_static_estimate`).
  * "qat": fake quantization with the learned scale and zero point; gradients flow to x
    (clipped straight-through) and to both parameters, scaled by 1 / sqrt(N * qmax) when
    `grad_scaling` (N = x.size, the LSQ paper's and PyTorch's choice).

  Attributes:
    observer: initialises the parameters (its spec is the grid).
    grad_scaling: LSQ's gradient scale on the scale and zero-point gradients.
    mode: default mode, overridable per call.
    axis_name: mapped axes the observer reduces over (as in `FakeQuant`).
  """

  observer: obs.Observer
  grad_scaling: bool = True
  mode: Mode | str | None = None
  axis_name: AxisName = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: Mode | str | None = None) -> jax.Array:
    """x unchanged (float, calibrate) or fake-quantized with the learned qparams (qat)."""
    mode = _merged_mode(self, mode)
    _no_int8(self, mode)
    observer = self.observer
    if not isinstance(observer, (obs.MinMaxObserver, obs.HistogramObserver)):
      raise TypeError(f"{_where(self)}: observer must be a qjax.observers observer; got "
                      f"{type(observer).__name__}.")
    found = _observer_state(self, observer, x, mode)
    if found is None:
      return x

    def observed_qparams(data):
      # Each observer takes its own init's state; mypy cannot pair the union's members.
      first = observer.update(observer.init(jnp.shape(data)),  # type: ignore[arg-type]
                              lax.stop_gradient(data), axis_name=self.axis_name)
      return observer.qparams(first)  # type: ignore[arg-type]

    # Flax also calls a param's initialiser abstractly after init, to check shapes: outside
    # init it must only produce the right shape.
    shape = numerics.expected_qparam_shape(observer.spec, jnp.shape(x))
    init_qparams = QParams(jnp.ones(shape, jnp.float32), jnp.zeros(shape, jnp.int32))
    if self.is_initializing():
      init_qparams = _reraise_with_path(self, lambda: observed_qparams(x))
    scale = self.param("scale", lambda _: init_qparams.scale)
    if observer.spec.symmetric:  # the grid fixes the zero point: nothing to learn
      zero_point = jnp.full(shape, observer.spec.symmetric_zero_point, jnp.float32)
    else:
      zero_point = self.param("zero_point",
                              lambda _: init_qparams.zero_point.astype(jnp.float32))
    if self.is_initializing() or mode is Mode.FLOAT:
      return x
    if mode is Mode.CALIBRATE:
      state = _observe(self, observer, *found, x, mode=mode, updates=True,
                       axis_name=self.axis_name)
      if self.is_mutable_collection("params"):
        qparams = _reraise_with_path(self, lambda: observer.qparams(state))
        self.put_variable("params", "scale", qparams.scale)
        if not observer.spec.symmetric:
          self.put_variable("params", "zero_point", qparams.zero_point.astype(jnp.float32))
      return x
    size = int(np.prod(jnp.shape(x)))
    factor = ste.lsq_grad_factor(observer.spec, size) if self.grad_scaling else 1.0
    qparams = learned_qparams(observer, scale, zero_point)
    if self.is_mutable_collection(QPARAMS):
      _write_qparams(self, *qparams)
    return _reraise_with_path(self, lambda: ste.fake_quant_learnable(
        x, observer.spec, qparams.scale, zero_point, grad_factor=factor))


def learned_qparams(observer: obs.Observer, scale: jax.Array,
                    zero_point: jax.Array | None) -> QParams:
  """The qparams a `LearnableFakeQuant` point quantizes with, from its learned parameters:

    S = max(scale, eps),   Z = clamp(rne(zero_point), qmin, qmax)

  (a symmetric spec has no learned zero point: `zero_point` None gives its fixed one).
  """
  spec = observer.spec
  positive = jnp.maximum(scale, jnp.float32(observer.eps))
  if zero_point is None:
    return QParams(positive, jnp.full(positive.shape, spec.symmetric_zero_point, jnp.int32))
  zp = jnp.clip(jnp.round(zero_point), spec.qmin, spec.qmax).astype(jnp.int32)
  return QParams(positive, zp)


class QuantizerPoint(nn.Module):
  """A quantization point run by a research quantizer (`qjax.quantizers.DoReFaWeight`,
  `PACT`, ...; see `qjax.quantizers.points`) instead of an observer.

  * init: the quantizer's learned parameters (PACT's "pact_alpha") from `init_params` on the
    init batch, in "params" (one per point: params/<layer>/output/pact_alpha).
  * "float", "calibrate": x unchanged (research quantizers keep no statistics).
  * "qat": the quantizer's forward, with the paper's gradient to x and to its parameters.
  With "quant_params" mutable, an activation point records its grid's (scale, zero_point).

  Attributes:
    quantizer: the research quantizer.
    mode: default mode, overridable per call.

  Example:
    >>> from qjax import quantizers
    >>> point = QuantizerPoint(quantizer=quantizers.PACT(bits=2, alpha=1.0))
    >>> x = jnp.array([-1.0, 0.3, 0.5, 2.0])
    >>> v = point.init(jax.random.key(0), x, mode="qat")
    >>> point.apply(v, x, mode="qat")
    Array([0.        , 0.33333334, 0.6666667 , 1.        ], dtype=float32)
  """

  quantizer: Any
  mode: Mode | str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: Mode | str | None = None) -> jax.Array:
    """x unchanged (float, calibrate) or quantized by the research quantizer (qat)."""
    mode = _merged_mode(self, mode)
    _no_int8(self, mode)
    quantizer = self.quantizer
    if not isinstance(quantizer, quantizer_points.Quantizer):
      raise TypeError(f"{_where(self)}: quantizer must be a qjax.quantizers research quantizer "
                      f"(DoReFaWeight, PACT, ...); got {type(quantizer).__name__}.")
    _reraise_with_path(self, lambda: _checks.as_float_array(
        "x", x, hint=" (a quantization point quantizes real-valued activations or weights)."))
    # Flax also calls a param's initialiser abstractly after init, to check shapes: the
    # data-dependent values are computed at init only.
    shapes = jax.eval_shape(quantizer.init_params, jax.ShapeDtypeStruct(jnp.shape(x), x.dtype))
    initial = (_reraise_with_path(self, lambda: quantizer.init_params(x))
               if self.is_initializing() else None)
    params = {name: self.param(
        name, lambda _, n=name, s=shape: initial[n] if initial is not None else jnp.zeros(
            s.shape, s.dtype)) for name, shape in shapes.items()}
    if (isinstance(quantizer, quantizer_points.ActivationQuantizer)
        and self.is_mutable_collection(QPARAMS) and not self.is_initializing()):
      _write_qparams(self, *quantizer.qparams(params))
    if mode is not Mode.QAT or self.is_initializing():
      return x
    return _reraise_with_path(self, lambda: quantizer(x, params))


def is_research(point: Any) -> bool:
  """Whether a QConfig entry is a research quantizer (not an observer)."""
  return isinstance(point, quantizer_points.Quantizer)


def _point(qconfig: QConfig | None, role: str, *, axis_name: AxisName = None,
           **kwargs: Any) -> nn.Module:
  """The quantization point for `qconfig`'s "activation" or "weight" entry: a research
  quantizer's point (it keeps no statistics, so `axis_name` does not concern it), learned
  qparams (LSQ) when `qconfig.learnable`, observed ones otherwise."""
  observer = None if qconfig is None else getattr(qconfig, role)
  if is_research(observer):
    return QuantizerPoint(quantizer=observer, **kwargs)
  if qconfig is not None and observer is not None and qconfig.learnable:
    return LearnableFakeQuant(observer=observer, axis_name=axis_name, **kwargs)
  return FakeQuant(observer=observer, axis_name=axis_name, **kwargs)


class Quantize(nn.Module):
  """Model input boundary (PyTorch's QuantStub): observes, and in QAT fake-quantizes, x with
  `qconfig.activation`. The integer path quantizes the input here, once.

  Attributes:
    qconfig: its `activation` observer is the input grid (None: the model stays in float).
    mode: default mode, overridable per call.
    axis_name: mapped axes (`jax.shard_map`) the batch is split over: the observer reduces
      over them (module docstring). None under GSPMD or on one device.
  """

  qconfig: QConfigLike
  mode: Mode | str | None = None
  axis_name: AxisName = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: Mode | str | None = None) -> jax.Array:
    mode = _merged_mode(self, mode)
    qconfig = resolve(self.qconfig, module_path(self))
    if qconfig is None or qconfig.activation is None:
      return x  # not quantized: the model stays in float from here
    if mode is Mode.INT8:
      return _integer.quantize(self, x, _where(self))
    x = forms.mark_input(self, x, QuantizeForm())
    point = _point(qconfig, "activation", axis_name=self.axis_name)
    nn.share_scope(self, point)
    y = point(x, mode=mode)
    return forms.mark_output(self, y, observer=qconfig.activation,
                             learnable=qconfig.learnable, point="")


class Dequantize(nn.Module):
  """Model output boundary (PyTorch's DeQuantStub). Like DeQuantStub before `convert`, it
  returns x unchanged in every mode here (the producing layer has already observed and
  fake-quantized it); it marks where the integer path returns to float."""

  mode: Mode | str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: Mode | str | None = None) -> jax.Array:
    mode = _merged_mode(self, mode)
    if mode is Mode.INT8:
      return _integer.dequantize(self, x, _where(self))
    return forms.mark_input(self, x, DequantizeForm())


def _layer_path(module: nn.Module) -> str:
  """Path of the layer that owns a contraction module (its parent), for QConfigMap lookups."""
  return module_path(module.parent) if isinstance(module.parent, nn.Module) else ""


def _check_weight_axis(module: nn.Module, qconfig: QConfig | None, rhs: jax.Array,
                       allowed: tuple[int, ...], what: str) -> None:
  if qconfig is None or qconfig.weight is None or qconfig.weight.spec.axis is None:
    return
  axis = _checks.normalize_axis(qconfig.weight.spec.axis, rhs.ndim, shape=rhs.shape)
  if axis not in allowed:
    raise ValueError(f"{_where(module)}: the weight's per-channel axis {axis} "
                     f"(spec.axis={qconfig.weight.spec.axis}) of a kernel of shape {rhs.shape} "
                     f"is not {what} {allowed}; per-channel scales must lie along an output "
                     f"channel so that they factor out of the contraction.")


def _marked_input(module: nn.Module, qconfig: QConfig | None, lhs: jax.Array,
                  form: Callable[[], Any]) -> jax.Array:
  """lhs marked for convert as the contraction's own quantization point ("input") feeding
  its integer form (a stock layer with both operands quantized), built by `form()`."""
  if not (_integer.has_integer_form(qconfig) and forms.tracing()):
    return lhs
  assert qconfig is not None and qconfig.activation is not None
  path = _layer_path(module)
  try:
    built = form()
  except ValueError as err:
    raise ValueError(f"{path or _where(module)}: {err}") from err
  lhs = forms.mark_output(module, lhs, observer=qconfig.activation,
                          learnable=qconfig.learnable, point="input", path=path)
  return forms.mark_input(module, lhs, built, path=path)


def _quantized_operands(module: nn.Module, qconfig: QConfig | None, mode: Mode,
                        lhs: jax.Array, rhs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """lhs through the "input" point (reduced over the module's `axis_name`), rhs through the
  "weight" point (in the layer's scope)."""
  lhs = _point(qconfig, "activation", name="input", parent=module,
               axis_name=module.axis_name)(lhs, mode=mode)
  rhs = _point(qconfig, "weight", name="weight", parent=module)(rhs, mode=mode)
  return lhs, rhs


def _dense_contraction(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
  """Whether `dimension_numbers` are nn.Dense's contraction (..., K) x (K, N)."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  return (jnp.ndim(rhs) == 2 and tuple(rhs_contract) == (0,) and not tuple(lhs_batch)
          and not tuple(rhs_batch) and tuple(lhs_contract) == (jnp.ndim(lhs) - 1,))


def _int8_forward(module: nn.Module, qconfig: QConfig | None, lhs: jax.Array, rhs: jax.Array,
                  dimension_numbers: Any) -> jax.Array:
  """QuantDotGeneral's QAT forward in integers (`qjax.ste.int8_forward_dot`)."""
  if not _dense_contraction(lhs, rhs, dimension_numbers):
    raise ValueError(f"{_where(module)}: int8_forward runs nn.Dense's contraction (..., K) x "
                     f"(K, N); got dimension_numbers={dimension_numbers}.")
  operands, (x_int8, w_int8) = _int8_forward_operands(module, qconfig, lhs, rhs,
                                                      integers=True)
  if x_int8 is None or w_int8 is None:  # a point ran as XLA ops: the dot recovers them
    x_int8 = w_int8 = None
  return _reraise_with_path(module, lambda: ste.int8_forward_dot(
      *operands, x_int8=x_int8, w_int8=w_int8))


def _int8_forward_operands(module: nn.Module, qconfig: QConfig | None, lhs: jax.Array,
                           rhs: jax.Array, *, integers: bool = False) -> Any:
  """The QAT points of an int8-forward contraction: (x_fq, w_fq, x_spec, x_qparams, w_spec,
  w_qparams), as `qjax.ste.int8_forward_dot` / `int8_forward_conv` take them; with
  `integers`, also the points' (x_int8, w_int8) for `int8_forward_dot` (None where a point
  does not emit them: not native, or a grid the dot refuses)."""
  if (qconfig is None or qconfig.learnable or qconfig.activation is None
      or qconfig.weight is None or is_research(qconfig.activation)
      or is_research(qconfig.weight)):
    raise ValueError(f"{_where(module)}: int8_forward needs observed qparams for both operands "
                     f"(a qconfig with activation and weight observers, learnable=False); got "
                     f"{qconfig!r}.")
  from qjax.integer import kernels  # pylint: disable=import-outside-toplevel
  x_spec, w_spec = qconfig.activation.spec, qconfig.weight.spec
  # The points emit the integers only for grids int8_forward_dot takes (it names the others).
  emit = (integers and kernels.int8_operand_grid(x_spec, "x", jnp.ndim(lhs))
          and kernels.int8_operand_grid(w_spec, "w", jnp.ndim(rhs)))
  x_point = _point(qconfig, "activation", name="input", parent=module,
                   axis_name=module.axis_name)
  w_point = _point(qconfig, "weight", name="weight", parent=module)
  if emit:
    x_fq, x_qparams, x_int8 = x_point(lhs, mode=Mode.QAT, return_qparams=True,
                                      int8_operand="x")
    w_fq, w_qparams, w_int8 = w_point(rhs, mode=Mode.QAT, return_qparams=True,
                                      int8_operand="w")
  else:
    (x_fq, x_qparams), (w_fq, w_qparams) = (
        x_point(lhs, mode=Mode.QAT, return_qparams=True),
        w_point(rhs, mode=Mode.QAT, return_qparams=True))
    x_int8 = w_int8 = None
  operands = (x_fq, w_fq, x_spec, x_qparams, w_spec, w_qparams)
  return (operands, (x_int8, w_int8)) if integers else operands


class QuantDotGeneral(nn.Module):
  """A quantized `lax.dot_general` that plugs into stock layers (AQT / Qwix placement):
  `nn.Dense(..., dot_general_cls=functools.partial(QuantDotGeneral, qconfig=q, mode="qat"))`.

    y = dot_general(FQ_act(lhs), FQ_w(rhs))

  with FQ the observe / fake-quantize point of the mode. It shares the layer's scope, so the
  statistics sit at quant_stats/<layer>/input and quant_stats/<layer>/weight, and a
  `QConfigMap` is looked up with the layer's path.

  Mode "int8" (after `qjax.convert`) runs the layer's `QuantizedDot`: the input quantized
  here, int8 x int8 -> int32, scaled back to float32 (the float kernel is not read). Its
  contraction must be nn.Dense's, (..., K) x (K, N).

  `axis_name`: mapped axes (`jax.shard_map`) the input is split over; the input point's
  observer reduces over them (the weight point never does).

  `int8_forward` (mode "qat"): the forward contraction in integers, as AQT trains
  (`qjax.ste.int8_forward_dot`: the fake-quantized operands' grid integers on the int8
  kernel, one float rounding; the backward the float dot's through the same straight-through
  points). Needs observed (not learned) 8-bit grids, the weight's symmetric, per tensor or per
  output channel, and nn.Dense's contraction.
  """

  qconfig: QConfigLike
  mode: Mode | str | None = None
  axis_name: AxisName = None
  int8_forward: bool = False

  @nn.compact
  def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
               precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    if isinstance(self.parent, nn.Module):
      nn.share_scope(self.parent, self)
    mode = _merged_mode(self, None)
    qconfig = resolve(self.qconfig, _layer_path(self))
    if mode is Mode.INT8 and _integer.has_integer_form(qconfig):
      return _integer.run(self, _where(self), QuantizedDot, lhs)
    (_, rhs_contract), (_, rhs_batch) = dimension_numbers
    free = tuple(a for a in range(jnp.ndim(rhs))
                 if a not in tuple(rhs_contract) + tuple(rhs_batch))
    _check_weight_axis(self, qconfig, rhs, free, "one of the kernel's output axes")

    def form() -> DotForm:
      if not _dense_contraction(lhs, rhs, dimension_numbers):
        raise ValueError(f"the integer path runs nn.Dense's contraction (..., K) x (K, N); "
                         f"got dimension_numbers={dimension_numbers} for operands of shapes "
                         f"{jnp.shape(lhs)} and {jnp.shape(rhs)}. Keep this layer in float "
                         f"(qconfig None).")
      assert qconfig is not None
      return DotForm(weight_observer=qconfig.weight, learnable=qconfig.learnable)

    lhs = _marked_input(self, qconfig, lhs, form)
    if self.int8_forward and mode is Mode.QAT and not self.is_initializing():
      return _int8_forward(self, qconfig, lhs, rhs, dimension_numbers)
    lhs, rhs = _quantized_operands(self, qconfig, mode, lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


def _check_nn_conv(who: str, lhs: jax.Array, rhs: jax.Array, dn: Any, lhs_dilation: Any,
                   batch_group_count: int) -> None:
  """ValueError unless the convolution is nn.Conv's (channels last, no input dilation, no
  batch groups): what the integer path and the int8 forward run."""
  if (dn != arith.channels_last_dn(jnp.shape(lhs), jnp.shape(rhs))
      or batch_group_count != 1 or any(d != 1 for d in (lhs_dilation or ()))):
    raise ValueError(f"{who} runs channels-last convolutions (NHWC input, HWIO kernel) without "
                     f"input dilation or batch groups, as nn.Conv does; got {dn}, "
                     f"lhs_dilation={lhs_dilation}, batch_group_count={batch_group_count}.")


def _int8_forward_conv(module: nn.Module, qconfig: QConfig | None, lhs: jax.Array,
                       rhs: jax.Array, window_strides: Any, padding: Any, lhs_dilation: Any,
                       rhs_dilation: Any, dn: Any, feature_group_count: int,
                       batch_group_count: int) -> jax.Array:
  """QuantConvGeneral's QAT forward in integers (`qjax.ste.int8_forward_conv`)."""
  _check_nn_conv(f"{_where(module)}: int8_forward", lhs, rhs, dn, lhs_dilation,
                 batch_group_count)
  operands = _int8_forward_operands(module, qconfig, lhs, rhs)
  pads = padding if isinstance(padding, str) else tuple(
      (int(lo), int(hi)) for lo, hi in padding)
  return _reraise_with_path(module, lambda: ste.int8_forward_conv(
      *operands, strides=tuple(window_strides), padding=pads,
      dilation=None if rhs_dilation is None else tuple(rhs_dilation),
      groups=int(feature_group_count)))


class QuantConvGeneral(nn.Module):
  """A quantized `lax.conv_general_dilated` for `nn.Conv(..., conv_general_dilated_cls=...)`:
  y = conv(FQ_act(lhs), FQ_w(rhs)); scope and statistics as in `QuantDotGeneral`. Mode
  "int8" runs the layer's `QuantizedConv` (NHWC input, HWIO kernel, no input dilation);
  `axis_name` as in `QuantDotGeneral`.

  `int8_forward` (mode "qat"): the forward convolution in integers
  (`qjax.ste.int8_forward_conv`: the fake-quantized operands' grid integers, int32 sums on the
  int8 kernel or XLA's int32 convolution, one float rounding; the backward the float
  convolution's through the same straight-through points). Needs observed 8-bit grids, the
  weight's symmetric, per tensor or per output channel, and a channels-last convolution
  (grouped or not).
  """

  qconfig: QConfigLike
  mode: Mode | str | None = None
  axis_name: AxisName = None
  int8_forward: bool = False

  @nn.compact
  def __call__(self, lhs: jax.Array, rhs: jax.Array, window_strides: Any, padding: Any,
               lhs_dilation: Any = None, rhs_dilation: Any = None,
               dimension_numbers: Any = None, feature_group_count: int = 1,
               batch_group_count: int = 1, precision: Any = None,
               preferred_element_type: Any = None) -> jax.Array:
    if isinstance(self.parent, nn.Module):
      nn.share_scope(self.parent, self)
    mode = _merged_mode(self, None)
    qconfig = resolve(self.qconfig, _layer_path(self))
    if mode is Mode.INT8 and _integer.has_integer_form(qconfig):
      return _integer.run(self, _where(self), QuantizedConv, lhs)
    dn = lax.conv_dimension_numbers(jnp.shape(lhs), jnp.shape(rhs), dimension_numbers)
    _check_weight_axis(self, qconfig, rhs, (dn.rhs_spec[0],), "the kernel's output-feature axis")

    def form() -> DotForm:
      n = jnp.ndim(rhs) - 2
      _check_nn_conv("the integer path", lhs, rhs, dn, lhs_dilation, batch_group_count)
      pads = padding.upper() if isinstance(padding, str) else tuple(
          (int(lo), int(hi)) for lo, hi in padding)
      if isinstance(pads, str) and pads not in ("SAME", "VALID"):
        raise ValueError(f"the integer path pads with zeros ('SAME', 'VALID' or pairs); got "
                         f"padding={padding!r}.")
      geometry = {"strides": tuple(int(s) for s in window_strides), "padding": pads,
                  "dilation": tuple(int(d) for d in (rhs_dilation or (1,) * n)),
                  "groups": int(feature_group_count)}
      assert qconfig is not None
      return DotForm(weight_observer=qconfig.weight, learnable=qconfig.learnable,
                     conv=tuple(sorted(geometry.items())))

    lhs = _marked_input(self, qconfig, lhs, form)
    if self.int8_forward and mode is Mode.QAT and not self.is_initializing():
      return _int8_forward_conv(self, qconfig, lhs, rhs, window_strides, padding, lhs_dilation,
                                rhs_dilation, dn, feature_group_count, batch_group_count)
    lhs, rhs = _quantized_operands(self, qconfig, mode, lhs, rhs)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)


def _stock_fields(module: nn.Module, stock_type: type[nn.Module]) -> dict[str, Any]:
  names = [f for f in stock_type.__dataclass_fields__ if f not in ("parent", "name")]
  return {f: getattr(module, f) for f in names}


def _eager_layer(module: nn.Module, stock_type: type, cls_field: str, contraction: type,
                 inputs: jax.Array, mode: Mode | str | None) -> jax.Array:
  """PyTorch placement: stock layer with a weight-only quantized contraction, the fused
  activation, then the output point."""
  mode = _merged_mode(module, mode)
  qconfig = resolve(module.qconfig, module_path(module))
  if mode is Mode.INT8 and _integer.has_integer_form(qconfig):
    return _integer.run_layer(module, inputs, _where(module))
  inputs = _integer.mark_layer_input(module, qconfig, inputs, where=_where(module))
  weight_only = None if qconfig is None or qconfig.weight is None else QConfig(
      weight=qconfig.weight, activation=None, learnable=qconfig.learnable)
  fields = _stock_fields(module, stock_type)
  fields[cls_field] = functools.partial(contraction, qconfig=weight_only, mode=mode)
  layer = stock_type(**fields)
  nn.share_scope(module, layer)
  y = layer(inputs)
  if module.activation is not None:
    y = module.activation(y)
  y = _point(qconfig, "activation", name="output", parent=module,
             axis_name=module.axis_name)(y, mode=mode)
  return _integer.mark_layer_output(module, qconfig, y)


class QuantDense(nn.Dense):
  """`nn.Dense` in PyTorch's eager placement: y = FQ_out(act(x @ FQ_w(W) + b)).

  Same fields and params (kernel, bias) as `nn.Dense`, so float checkpoints load unchanged,
  plus `qconfig`, an optional fused `activation` (e.g. `nn.relu`: PyTorch's LinearReLU) and a
  per-call `mode`. The input is expected to be quantized by its producer (`Quantize` or the
  previous quantized layer). Statistics: quant_stats/<layer>/weight and .../output.
  `axis_name`: mapped axes (`jax.shard_map`) the batch is split over; the output observer
  reduces over them (module docstring), the weight observer never does.
  """

  qconfig: QConfigLike = None
  activation: Callable[[jax.Array], jax.Array] | None = None
  mode: Mode | str | None = None
  axis_name: AxisName = None

  @nn.compact
  def __call__(self, inputs: jax.Array, *, mode: Mode | str | None = None) -> jax.Array:
    return _eager_layer(self, nn.Dense, "dot_general_cls", QuantDotGeneral, inputs, mode)


class QuantConv(nn.Conv):
  """`nn.Conv` in PyTorch's eager placement: y = FQ_out(act(conv(x, FQ_w(W)) + b)); fields,
  params, statistics and `axis_name` as in `QuantDense` (PyTorch's ConvReLU2d with
  `activation=nn.relu`)."""

  qconfig: QConfigLike = None
  activation: Callable[[jax.Array], jax.Array] | None = None
  mode: Mode | str | None = None
  axis_name: AxisName = None

  @nn.compact
  def __call__(self, inputs: jax.Array, *, mode: Mode | str | None = None) -> jax.Array:
    return _eager_layer(self, nn.Conv, "conv_general_dilated_cls", QuantConvGeneral, inputs,
                        mode)


def collect_qparams(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> dict:
  """The (scale, zero_point) of every quantization point of a calibrated model.

  Runs `model.apply(variables, *args, **kwargs)` once with the "quant_params" collection
  mutable (pass the mode your model expects in kwargs; "float" changes nothing) and returns
  that collection, nested like the model: {layer: {"weight" / "output" / "input":
  {"scale", "zero_point"}}}, or {"Quantize_0": {"scale", "zero_point"}} for a boundary.

  Raises:
    ValueError: naming the module path, for a quantization point that has seen no data.
  """
  _, updates = model.apply(variables, *args, mutable=[QPARAMS], **kwargs)
  return updates.get(QPARAMS, {})


def check_calibrated(quant_stats: Any) -> None:
  """Raise, naming every quantization point that has seen no data, before a jitted forward.

  Under `jax.jit` an uncalibrated point cannot raise: its scale is NaN and so is the output.
  Call this once on the "quant_stats" collection (a host-side check of the `count` leaves)
  before jitted QAT evaluation or conversion.

  Raises:
    ValueError: listing the paths of the points whose `count` is 0 (and any batches they
      skipped for NaN/inf).
  """
  flat = traverse_util.flatten_dict(quant_stats, sep="/")
  empty = []
  for key, count in sorted(flat.items()):
    point, _, leaf = key.rpartition("/")
    if leaf == "count" and int(jax.device_get(count)) == 0:
      lost = int(jax.device_get(flat.get(f"{point}/skipped", 0)))
      empty.append(point + (f" ({lost} batch(es) skipped for NaN/inf)" if lost else ""))
  if not flat:
    raise ValueError("check_calibrated: quant_stats is empty; pass the 'quant_stats' collection "
                     "of a model with quantization points.")
  if empty:
    raise ValueError(f"check_calibrated: {len(empty)} quantization point(s) have seen no data: "
                     f"{', '.join(empty)}. Run calibration batches (mode='calibrate', "
                     f"mutable=['{STATS}']) first.")
