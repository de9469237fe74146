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
A pattern that decides no layer (a typo, or one shadowed by an earlier pattern) would leave
its layers with another QConfig without a word: `check_qconfig_map(model, variables, x,
mode=...)` traces the model once (nothing computed) and raises, naming such patterns and the
layer paths that exist. `checked_lookups()` runs the same check around any trace of a model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax

from qjax import observers as obs
from qjax.numerics import QuantSpec
from qjax.quantizers import points

_OBSERVER_TYPES = (obs.MinMaxObserver, obs.HistogramObserver)
_QUANTIZER_TYPES = {"weight": points.WeightQuantizer, "activation": points.ActivationQuantizer}


@dataclasses.dataclass(frozen=True, kw_only=True)
class QConfig:
  """Observers (or research quantizers) for a layer's weight and its activations. Frozen and
  hashable.

  Attributes:
    weight: observer of the kernel (per output channel: spec.axis=-1), a research weight
      quantizer (`qjax.quantizers.DoReFaWeight`, `WRPNWeight`, `BinaryWeight`,
      `TernaryWeight`), or None to leave the weight in float.
    activation: observer of the activations (per tensor), a research activation quantizer
      (`qjax.quantizers.DoReFaActivation`, `WRPNActivation`, `PACT`), or None to leave them
      in float.
    learnable: learn every observer point's scale and zero point (LSQ,
      `qjax.nn.LearnableFakeQuant`: in "params", initialised from the observers) instead of
      taking them from the observers. Research quantizers define their own parameters.

  Example:
    >>> from qjax import quantizers
    >>> q = QConfig(weight=quantizers.DoReFaWeight(bits=4),
    ...             activation=quantizers.PACT(bits=4, alpha=6.0))
    >>> q.activation.spec.bits
    4
  """

  weight: obs.Observer | points.WeightQuantizer | None
  activation: obs.Observer | points.ActivationQuantizer | None
  learnable: bool = False

  def __post_init__(self):
    for role in ("weight", "activation"):
      value = getattr(self, role)
      if value is not None and not isinstance(value, (*_OBSERVER_TYPES,
                                                      _QUANTIZER_TYPES[role])):
        kinds = ("DoReFaWeight, WRPNWeight, BinaryWeight, TernaryWeight" if role == "weight"
                 else "DoReFaActivation, WRPNActivation, PACT")
        raise TypeError(f"QConfig.{role} must be a qjax.observers observer (MinMaxObserver, "
                        f"MovingAverageMinMaxObserver, HistogramObserver, PercentileObserver, "
                        f"...), a qjax.quantizers {role} quantizer ({kinds}) or None; got "
                        f"{type(value).__name__}.")
    if not isinstance(self.learnable, bool):
      raise TypeError(f"QConfig.learnable must be True or False; got {self.learnable!r}.")
    if (self.activation is not None and self.activation.spec.per_channel
        and not isinstance(self.activation, points.PACT)):
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

  The path is the layer's Flax module path joined with "/" (e.g. "block/Dense_2"; a
  `QuantDotGeneral` / `QuantConvGeneral` looks up the path of the stock layer that owns it).
  The first pattern that `re.search`es the path wins; otherwise `default` applies. A `None`
  QConfig leaves the layer in float.

  Every pattern should decide at least one layer: `check_used(paths)` (or
  `check_qconfig_map` on a model) raises for those that decide none.

  Example:
    >>> qmap = QConfigMap(default=default_qconfig, overrides=(("^Dense_2$", None),))
    >>> qmap.lookup("Dense_2") is None
    True
    >>> qmap.unused_patterns(["Dense_0", "Dense_1"])
    ('^Dense_2$',)
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

  def _deciding_override(self, path: str) -> int | None:
    """Index of the first override whose pattern matches `path`, or None (the default)."""
    for index, (pattern, _) in enumerate(self.overrides):
      if re.search(pattern, path):
        return index
    return None

  def lookup(self, path: str) -> QConfig | None:
    """The QConfig of the module at `path`."""
    for seen in _RECORDERS.get():
      seen.setdefault(self, set()).add(path)
    index = self._deciding_override(path)
    return self.default if index is None else self.overrides[index][1]

  def unused_patterns(self, paths: Iterable[str]) -> tuple[str, ...]:
    """The override patterns that decide none of `paths`, in the order of `overrides`.

    A pattern decides a path when it is the first one that matches it; one that matches no
    path, or only paths an earlier pattern already takes, has no effect on these layers.

    Args:
      paths: the layer paths the map is looked up with (e.g. from `checked_lookups`).
    """
    paths = _checked_paths(paths, "QConfigMap.unused_patterns")
    used = {self._deciding_override(p) for p in paths}
    return tuple(pattern for index, (pattern, _) in enumerate(self.overrides)
                 if index not in used)

  def check_used(self, paths: Iterable[str]) -> None:
    """Raise unless every override pattern decides at least one of the layer `paths`.

    Raises:
      ValueError: naming each unused pattern (and whether it matches no path or only paths
        an earlier pattern takes), and listing `paths`.
    """
    paths = sorted(set(_checked_paths(paths, "QConfigMap.check_used")))
    unused = self.unused_patterns(paths)
    if not unused:
      return
    reasons = []
    for pattern in unused:
      matched = [p for p in paths if re.search(pattern, p)]
      if not matched:
        reasons.append(f"{pattern!r} matches no layer path")
        continue
      # Never None: a path `pattern` matches is decided by it or by an earlier pattern.
      earlier = sorted({self.overrides[self._deciding_override(p)][0]  # type: ignore[index]
                        for p in matched})
      reasons.append(f"{pattern!r} matches only {', '.join(map(repr, matched))}, which the "
                     f"earlier pattern(s) {', '.join(map(repr, earlier))} already take")
    listed = ", ".join(repr(p) + (" (the top-level module)" if not p else "") for p in paths)
    raise ValueError(
        f"QConfigMap: {len(unused)} override pattern(s) decide no layer: "
        f"{'; '.join(reasons)}. The layers they were meant for get the default QConfig (or an "
        f"earlier pattern's) instead: fix the pattern(s) (re.search on the layer path, module "
        f"names joined with '/') or remove them. The layer paths looked up: "
        f"{listed or '(none)'}.")


QConfigLike = QConfig | QConfigMap | None

_RECORDERS: contextvars.ContextVar[tuple[dict, ...]] = contextvars.ContextVar(
    "qjax_qconfig_map_recorders", default=())


def _checked_paths(paths: Iterable[str], where: str) -> list[str]:
  if isinstance(paths, str):
    raise TypeError(f"{where}: paths must be an iterable of layer paths (e.g. ['Dense_0', "
                    f"'block/conv']); got the single string {paths!r}. Wrap it in a list.")
  paths = list(paths)
  bad = [p for p in paths if not isinstance(p, str)]
  if bad:
    raise TypeError(f"{where}: paths must be strings (layer paths joined with '/'); got "
                    f"{bad[:3]!r}.")
  return paths


@contextlib.contextmanager
def checked_lookups() -> Iterator[dict[QConfigMap, set[str]]]:
  """Record every `QConfigMap.lookup` made inside the block; on leaving it, check each map.

  Wrap any trace of a model (`model.init`, `model.apply`, `jax.make_jaxpr`, `jax.eval_shape`)
  so that a pattern that decides none of the layers the model looked up raises. The yielded
  dict maps each QConfigMap to the layer paths it was looked up with (filled in as the model
  runs). The check is skipped when the block raises.

  Caveat: lookups happen while Python traces the model; a jitted function whose trace is
  cached (called again with the same shapes) looks nothing up.

  Raises:
    ValueError: as `QConfigMap.check_used`, for the first map with unused patterns.

  Example:
    >>> qmap = QConfigMap(default=None, overrides=(("^fc$", default_qconfig),))
    >>> with checked_lookups() as seen:
    ...   _ = qmap.lookup("fc")
    >>> sorted(seen[qmap])
    ['fc']
  """
  seen: dict[QConfigMap, set[str]] = {}
  token = _RECORDERS.set(_RECORDERS.get() + (seen,))
  try:
    yield seen
  finally:
    _RECORDERS.reset(token)
  for qmap, paths in seen.items():
    qmap.check_used(paths)


def check_qconfig_map(model: Any, variables: Any, *args: Any, **kwargs: Any) -> None:
  """Raise when a QConfigMap of `model` has a pattern that decides none of its layers.

  Traces `model.apply(variables, *args, **kwargs)` once under `jax.eval_shape` (shapes only,
  nothing computed; every collection mutable), recording the layer paths each QConfigMap is
  looked up with, then checks each map (`QConfigMap.check_used`). With `variables=None` it
  traces `model.init(jax.random.key(0), *args, **kwargs)` instead, so it can run before
  the model has variables. Call it once after building the model, e.g. next to `init`.

  Args:
    model: a Flax module whose layers take a QConfigMap (or anything else: maps that are
      never looked up are not checked).
    variables: the model's variables, or None.
    *args: a sample input (only shapes and dtypes matter).
    **kwargs: the model's call arguments, e.g. mode="float".

  Raises:
    ValueError: naming each unused pattern and listing the layer paths looked up.

  Example:
    >>> import flax.linen as nn
    >>> from qjax import nn as qnn
    >>> qmap = QConfigMap(default=default_qconfig, overrides=(("^QuantDense_7$", None),))
    >>> check_qconfig_map(qnn.QuantDense(4, qconfig=qmap), None, jax.numpy.ones((1, 3)),
    ...                   mode="float")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: QConfigMap: 1 override pattern(s) decide no layer: '^QuantDense_7$' matches ...
  """
  trace: Callable[..., Any]
  if variables is None:
    def trace(*a):
      return model.init(jax.random.key(0), *a, **kwargs)
    operands = args
  else:
    def trace(v, *a):
      return model.apply(v, *a, mutable=True, **kwargs)
    operands = (variables, *args)
  with checked_lookups():
    jax.eval_shape(trace, *operands)


def resolve(qconfig: QConfigLike, path: str) -> QConfig | None:
  """The QConfig for the module at `path` from a QConfig, a QConfigMap or None."""
  if isinstance(qconfig, QConfigMap):
    return qconfig.lookup(path)
  if qconfig is None or isinstance(qconfig, QConfig):
    return qconfig
  raise TypeError(f"{path or 'module'}: qconfig must be a QConfig, a QConfigMap or None; "
                  f"got {type(qconfig).__name__}.")
