"""QConfig: which observers (and so which grids) a layer's weight and activations use.

Presets mirror PyTorch's eager-mode qconfigs for the x86 (fbgemm) backend, translated to Flax
layouts: Flax kernels keep the output channel last ((in, out) for Dense, HWIO for Conv), so
per-channel weight specs use axis=-1 where PyTorch uses ch_axis=0 of (out, in, ...).

  default_qconfig                 MinMax activations in [0, 127] (uint8, reduce_range),
                                  per-tensor symmetric int8 weights, MinMax.
  get_default_qconfig("x86")      Histogram activations (uint8, reduce_range), per-channel
                                  symmetric int8 weights, MinMax.
  get_default_qat_qconfig("x86")  Moving-average activations (uint8, reduce_range, c = 0.01),
                                  per-channel symmetric int8 weights, moving average.

`QConfigMap` chooses a QConfig per layer from the module path, `None` meaning "not quantized".
"""

from __future__ import annotations

import dataclasses
import re
from typing import Union

from qjax import observers as obs
from qjax.numerics import QuantSpec

_OBSERVER_TYPES = (obs.MinMaxObserver, obs.HistogramObserver)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QConfig:
  """Observers for a layer's weight and its input activations. Frozen and hashable.

  Attributes:
    weight: observer of the kernel (per output channel: spec.axis=-1), or None to leave the
      weight in float.
    activation: observer of the activations (per tensor), or None to leave them in float.
    learnable: learn every point's scale and zero point (LSQ, `qjax.nn.LearnableFakeQuant`:
      in "params", initialised from the observers) instead of taking them from the observers.
  """

  weight: obs.Observer | None
  activation: obs.Observer | None
  learnable: bool = False

  def __post_init__(self):
    for role in ("weight", "activation"):
      value = getattr(self, role)
      if value is not None and not isinstance(value, _OBSERVER_TYPES):
        raise TypeError(f"QConfig.{role} must be a qjax.observers observer (MinMaxObserver, "
                        f"MovingAverageMinMaxObserver, HistogramObserver, PercentileObserver) "
                        f"or None; got {type(value).__name__}.")
    if not isinstance(self.learnable, bool):
      raise TypeError(f"QConfig.learnable must be True or False; got {self.learnable!r}.")
    if self.activation is not None and self.activation.spec.per_channel:
      raise ValueError(f"QConfig.activation must be per-tensor (spec.axis=None): the integer path "
                       f"requantizes a whole activation tensor with one scale; got "
                       f"spec.axis={self.activation.spec.axis}.")
    if self.weight is not None and self.weight.spec.per_channel and self.weight.spec.axis != -1:
      raise ValueError(f"QConfig.weight: per-channel weights are quantized along the output "
                       f"channel, which Flax keeps last (axis=-1); got "
                       f"spec.axis={self.weight.spec.axis}.")


_ACT_U7 = QuantSpec(bits=8, signed=False, reduce_range=True)
_W_TENSOR = QuantSpec(bits=8, signed=True, symmetric=True)
_W_CHANNEL = QuantSpec(bits=8, signed=True, symmetric=True, axis=-1)

default_qconfig = QConfig(activation=obs.MinMaxObserver(spec=_ACT_U7),
                          weight=obs.MinMaxObserver(spec=_W_TENSOR))
"""PyTorch's `torch.ao.quantization.default_qconfig`."""

_BACKENDS = ("x86", "fbgemm", "qnnpack")


def _check_backend(backend: str) -> str:
  if backend not in _BACKENDS:
    raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}.")
  return backend


def get_default_qconfig(backend: str = "x86") -> QConfig:
  """PyTorch's `get_default_qconfig(backend)` for post-training static quantization.

  x86 / fbgemm: Histogram activations with reduce_range, per-channel int8 weights;
  qnnpack: Histogram activations without reduce_range, per-tensor int8 weights.
  """
  if _check_backend(backend) == "qnnpack":
    return QConfig(activation=obs.HistogramObserver(spec=QuantSpec(bits=8, signed=False)),
                   weight=obs.MinMaxObserver(spec=_W_TENSOR))
  return QConfig(activation=obs.HistogramObserver(spec=_ACT_U7),
                 weight=obs.MinMaxObserver(spec=_W_CHANNEL))


def get_default_qat_qconfig(backend: str = "x86") -> QConfig:
  """PyTorch's `get_default_qat_qconfig(backend)`: its observers (moving-average min/max,
  c = 0.01; x86 / fbgemm reduce the activation range to [0, 127] and quantize weights per
  channel).

  The fake quantization uses the observers' `calculate_qparams`, as PyTorch's version-0
  FakeQuantize and its `convert` do. PyTorch's default version 1 (FusedMovingAvgObsFakeQuantize)
  observes the same ranges but fake-quantizes weights during training with a slightly
  different scale, max(-min/128, max/127) in double precision; tests/test_nn_torch.py pins
  the difference.
  """
  if _check_backend(backend) == "qnnpack":
    return QConfig(
        activation=obs.MovingAverageMinMaxObserver(spec=QuantSpec(bits=8, signed=False)),
        weight=obs.MovingAverageMinMaxObserver(spec=_W_TENSOR))
  return QConfig(activation=obs.MovingAverageMinMaxObserver(spec=_ACT_U7),
                 weight=obs.MovingAverageMinMaxObserver(spec=_W_CHANNEL))


def bits_qconfig(bits: int, *, qat: bool = True, per_channel: bool = True) -> QConfig:
  """A `bits`-wide QConfig: affine unsigned activations, symmetric signed weights.

  With `qat` both observers are moving averages (PyTorch's QAT choice), else min/max.
  """
  act = QuantSpec(bits=bits, signed=False)
  weight = QuantSpec(bits=bits, signed=True, symmetric=True, axis=-1 if per_channel else None)
  kind = obs.MovingAverageMinMaxObserver if qat else obs.MinMaxObserver
  return QConfig(activation=kind(spec=act), weight=kind(spec=weight))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QConfigMap:
  """Per-layer QConfigs chosen by module path (PyTorch's `QConfigMapping.set_module_name`).

  The path is the Flax module path joined with "/" (e.g. "Dense_2/QuantDotGeneral_0"). The
  first pattern that `re.search`es the path wins; otherwise `default` applies. A `None`
  QConfig leaves the layer in float.

  Example:
    >>> qmap = QConfigMap(default=default_qconfig, overrides=(("^Dense_2/", None),))
    >>> qmap.lookup("Dense_2/QuantDotGeneral_0") is None
    True
  """

  default: QConfig | None
  overrides: tuple[tuple[str, QConfig | None], ...] = ()

  def __post_init__(self):
    if self.default is not None and not isinstance(self.default, QConfig):
      raise TypeError(f"QConfigMap.default must be a QConfig or None; got "
                      f"{type(self.default).__name__}.")
    overrides = tuple(tuple(item) for item in self.overrides)
    for item in overrides:
      if len(item) != 2 or not isinstance(item[0], str) or not (
          item[1] is None or isinstance(item[1], QConfig)):
        raise TypeError(f"QConfigMap.overrides must be (regex, QConfig | None) pairs; got "
                        f"{item!r}.")
      try:
        re.compile(item[0])
      except re.error as err:
        raise ValueError(f"QConfigMap.overrides: bad regex {item[0]!r}: {err}.") from err
    object.__setattr__(self, "overrides", overrides)

  def lookup(self, path: str) -> QConfig | None:
    """The QConfig of the module at `path`."""
    for pattern, qconfig in self.overrides:
      if re.search(pattern, path):
        return qconfig
    return self.default


QConfigLike = Union[QConfig, QConfigMap, None]


def resolve(qconfig: QConfigLike, path: str) -> QConfig | None:
  """The QConfig for the module at `path` from a QConfig, a QConfigMap or None."""
  if isinstance(qconfig, QConfigMap):
    return qconfig.lookup(path)
  if qconfig is None or isinstance(qconfig, QConfig):
    return qconfig
  raise TypeError(f"{path or 'module'}: qconfig must be a QConfig, a QConfigMap or None; "
                  f"got {type(qconfig).__name__}.")
