"""Flax linen modules for calibration and quantization-aware training.

The modules own no math: they keep observer states in the "quant_stats" collection (the way
BatchNorm keeps "batch_stats") and call `qjax.observers` and `qjax.ste`.

Where the quantization points sit. Every quantized contraction observes, and in QAT
fake-quantizes, both of its operands: its input activations (per tensor) and its weight (per
output channel by default), as AQT and Qwix do. `Quantize` marks the float -> quantized
boundary at the model input and `Dequantize` the way out (it observes the model output, as
PyTorch's last quantized layer does). With ReLU between two layers, the next layer's input
observer sees the post-ReLU values: PyTorch's fused Linear+ReLU output observer.

Modes, chosen per call like BatchNorm's `use_running_average`:
  "float"      no observation, no fake quantization.
  "calibrate"  observers update (quant_stats must be mutable), values pass through unchanged.
  "qat"        observers update when quant_stats is mutable (frozen otherwise, e.g. for
               evaluation), then values are fake-quantized with the observers' qparams and a
               straight-through gradient.
Observers never update while the model is being initialised.

When the "quant_params" collection is mutable, every observer also writes its current
(scale, zero_point) there: `collect_qparams` uses that to read a calibrated model's qparams,
and raises, naming the module path, for a layer that has never seen data.
"""

from __future__ import annotations

import enum
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from qjax import _checks
from qjax import observers as obs
from qjax import ste
from qjax.nn.qconfig import QConfig, QConfigLike, resolve

STATS = "quant_stats"
QPARAMS = "quant_params"


class Mode(enum.Enum):
  """What a quantization point does on this call."""

  FLOAT = "float"
  CALIBRATE = "calibrate"
  QAT = "qat"


def as_mode(value: Mode | str | None, where: str = "mode") -> Mode:
  """`value` as a Mode; a ValueError listing the accepted values otherwise."""
  if isinstance(value, Mode):
    return value
  accepted = [m.value for m in Mode]
  if isinstance(value, str) and value.lower() in accepted:
    return Mode(value.lower())
  if value is None:
    raise ValueError(f"{where}: mode is required (one of {accepted}); pass it as the module's "
                     f"`mode` attribute or as `mode=` in the call.")
  raise ValueError(f"{where}: mode must be one of {accepted} (or a qjax.nn.Mode); got {value!r}.")


def module_path(module: nn.Module) -> str:
  """The module's Flax path joined with "/" ("" for the top-level module)."""
  return "/".join(str(p) for p in module.path)


def _merged_mode(module: nn.Module, call_mode: Mode | str | None) -> Mode:
  where = module_path(module) or type(module).__name__
  attr = getattr(module, "mode", None)
  if attr is not None and call_mode is not None:
    raise ValueError(f"{where}: mode was given both as an attribute ({attr!r}) and in the call "
                     f"({call_mode!r}); give it once.")
  return as_mode(call_mode if call_mode is not None else attr, where)


def _reraise_with_path(module: nn.Module, fn: Callable[[], Any]) -> Any:
  """Run `fn`; prefix the module path to its ValueError / TypeError messages."""
  try:
    return fn()
  except (ValueError, TypeError) as err:
    path = module_path(module) or type(module).__name__
    if str(err).startswith(path + ":"):
      raise
    raise type(err)(f"{path}: {err}") from err


class FakeQuant(nn.Module):
  """One quantization point: an observer whose state lives in "quant_stats".

  Attributes:
    observer: the observer (None: the point does nothing).
    mode: default mode, overridable per call.
  """

  observer: obs.Observer | None
  mode: Mode | str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: Mode | str | None = None) -> jax.Array:
    """x unchanged (float, calibrate) or fake-quantized with the observed qparams (qat)."""
    mode = _merged_mode(self, mode)
    if self.observer is None:
      return x
    _reraise_with_path(self, lambda: _checks.as_float_array(
        "x", x, hint=" (a quantization point observes real-valued activations or weights)."))
    observer = self.observer
    fresh = _reraise_with_path(self, lambda: observer.init(jnp.shape(x)))
    variables = {name: self.variable(STATS, name, lambda v=value: v)
                 for name, value in fresh._asdict().items()}
    state = type(fresh)(**{name: var.value for name, var in variables.items()})
    initializing = self.is_initializing()
    can_update = self.is_mutable_collection(STATS) and not initializing

    if mode is Mode.FLOAT:
      self._write_qparams(state)
      return x
    if mode is Mode.CALIBRATE and not can_update and not initializing:
      raise ValueError(f"{module_path(self)}: mode='calibrate' updates observer statistics, but "
                       f"the '{STATS}' collection is immutable; call "
                       f"apply(..., mutable=['{STATS}']).")
    if can_update:
      state = _reraise_with_path(self, lambda: observer.update(state, lax.stop_gradient(x)))
      for name, var in variables.items():
        var.value = getattr(state, name)
    self._write_qparams(state)
    if mode is Mode.CALIBRATE or initializing:
      return x
    qparams = _reraise_with_path(self, lambda: observer.qparams(state))
    qparams = jax.tree_util.tree_map(lax.stop_gradient, qparams)
    return _reraise_with_path(self, lambda: ste.fake_quant(x, observer.spec, qparams))

  def _write_qparams(self, state: obs.ObserverState) -> None:
    if self.is_mutable_collection(QPARAMS) and not self.is_initializing():
      scale, zero_point = _reraise_with_path(self, lambda: self.observer.qparams(state))
      self.put_variable(QPARAMS, "scale", scale)
      self.put_variable(QPARAMS, "zero_point", zero_point)


class _Boundary(nn.Module):
  """Shared body of Quantize and Dequantize: one activation quantization point."""

  qconfig: QConfigLike
  mode: Mode | str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: Mode | str | None = None) -> jax.Array:
    mode = _merged_mode(self, mode)
    qconfig = resolve(self.qconfig, module_path(self))
    point = FakeQuant(observer=None if qconfig is None else qconfig.activation)
    nn.share_scope(self, point)
    return point(x, mode=mode)


class Quantize(_Boundary):
  """Model input boundary (PyTorch's QuantStub): observes, and in QAT fake-quantizes, x with
  `qconfig.activation`. The integer path quantizes the input here, once."""


class Dequantize(_Boundary):
  """Model output boundary (PyTorch's DeQuantStub together with the observer PyTorch puts on
  the last quantized layer's output): observes, and in QAT fake-quantizes, the output."""


def _operand_points(module: nn.Module, qconfig: QConfig | None):
  act = weight = None
  if qconfig is not None:
    act, weight = qconfig.activation, qconfig.weight
  return FakeQuant(observer=act, name="input"), FakeQuant(observer=weight, name="weight")


def _check_weight_axis(module: nn.Module, qconfig: QConfig | None, rhs: jax.Array,
                       allowed: tuple[int, ...], what: str) -> None:
  if qconfig is None or qconfig.weight is None or not qconfig.weight.spec.per_channel:
    return
  axis = _checks.normalize_axis(qconfig.weight.spec.axis, rhs.ndim, shape=rhs.shape)
  if axis not in allowed:
    raise ValueError(f"{module_path(module)}: the weight's per-channel axis {axis} "
                     f"(spec.axis={qconfig.weight.spec.axis}) of a kernel of shape {rhs.shape} "
                     f"is not {what} {allowed}; per-channel scales must lie along an output "
                     f"channel so that they factor out of the contraction.")


class QuantDotGeneral(nn.Module):
  """A quantized `lax.dot_general` that plugs into stock layers:
  `nn.Dense(..., dot_general_cls=functools.partial(QuantDotGeneral, qconfig=q, mode="qat"))`.

    y = dot_general(FQ_act(lhs), FQ_w(rhs))

  with FQ the observe / fake-quantize point of the mode. Statistics: quant_stats/.../input and
  quant_stats/.../weight.
  """

  qconfig: QConfigLike
  mode: Mode | str | None = None

  @nn.compact
  def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
               precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    mode = _merged_mode(self, None)
    qconfig = resolve(self.qconfig, module_path(self))
    (_, rhs_contract), (_, rhs_batch) = dimension_numbers
    free = tuple(a for a in range(jnp.ndim(rhs))
                 if a not in tuple(rhs_contract) + tuple(rhs_batch))
    _check_weight_axis(self, qconfig, rhs, free, "one of the kernel's output axes")
    act_point, weight_point = _operand_points(self, qconfig)
    lhs = act_point(lhs, mode=mode)
    rhs = weight_point(rhs, mode=mode)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


class QuantConvGeneral(nn.Module):
  """A quantized `lax.conv_general_dilated` for `nn.Conv(..., conv_general_dilated_cls=...)`:
  y = conv(FQ_act(lhs), FQ_w(rhs)), statistics as in `QuantDotGeneral`."""

  qconfig: QConfigLike
  mode: Mode | str | None = None

  @nn.compact
  def __call__(self, lhs: jax.Array, rhs: jax.Array, window_strides: Any, padding: Any,
               lhs_dilation: Any = None, rhs_dilation: Any = None,
               dimension_numbers: Any = None, feature_group_count: int = 1,
               batch_group_count: int = 1, precision: Any = None,
               preferred_element_type: Any = None) -> jax.Array:
    mode = _merged_mode(self, None)
    qconfig = resolve(self.qconfig, module_path(self))
    dn = lax.conv_dimension_numbers(jnp.shape(lhs), jnp.shape(rhs), dimension_numbers)
    _check_weight_axis(self, qconfig, rhs, (dn.rhs_spec[0],), "the kernel's output-feature axis")
    act_point, weight_point = _operand_points(self, qconfig)
    lhs = act_point(lhs, mode=mode)
    rhs = weight_point(rhs, mode=mode)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)


def _stock_fields(module: nn.Module, stock_type: type) -> dict[str, Any]:
  names = [f for f in stock_type.__dataclass_fields__ if f not in ("parent", "name")]
  return {f: getattr(module, f) for f in names}


class QuantDense(nn.Dense):
  """`nn.Dense` with a `QuantDotGeneral`: same fields, same params (kernel, bias), plus
  `qconfig` and a per-call `mode`. Float params of an `nn.Dense` load unchanged."""

  qconfig: QConfigLike = None
  mode: Mode | str | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array, *, mode: Mode | str | None = None) -> jax.Array:
    mode = _merged_mode(self, mode)
    fields = _stock_fields(self, nn.Dense)
    fields["dot_general_cls"] = functools.partial(QuantDotGeneral, qconfig=self.qconfig, mode=mode)
    dense = nn.Dense(**fields)
    nn.share_scope(self, dense)
    return dense(inputs)


class QuantConv(nn.Conv):
  """`nn.Conv` with a `QuantConvGeneral`: same fields and params, plus `qconfig` and a per-call
  `mode`."""

  qconfig: QConfigLike = None
  mode: Mode | str | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array, *, mode: Mode | str | None = None) -> jax.Array:
    mode = _merged_mode(self, mode)
    fields = _stock_fields(self, nn.Conv)
    fields["conv_general_dilated_cls"] = functools.partial(QuantConvGeneral, qconfig=self.qconfig,
                                                           mode=mode)
    conv = nn.Conv(**fields)
    nn.share_scope(self, conv)
    return conv(inputs)


def collect_qparams(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> dict:
  """The (scale, zero_point) of every quantization point of a calibrated model.

  Runs `model.apply(variables, *args, **kwargs)` once with the "quant_params" collection
  mutable (pass the mode your model expects in kwargs; "float" does not change anything) and
  returns that collection: {module path...: {"scale", "zero_point"}}.

  Raises:
    ValueError: naming the module path, for a quantization point that has seen no data.
  """
  _, updates = model.apply(variables, *args, mutable=[QPARAMS], **kwargs)
  return updates.get(QPARAMS, {})
