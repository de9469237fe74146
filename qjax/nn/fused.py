"""Quantization-aware training with a folded BatchNorm (Jacob et al. 2018, section 3.2).

`QuantConvBN` / `QuantDenseBN` are a convolution (dense layer) followed by a BatchNorm and an
optional fused activation, trained the way the folded layer will run after conversion: the
weight is scaled by the BatchNorm's running statistics before it is fake-quantized, so the
grid that QAT learns is the grid of the integer kernel. They are PyTorch's
`torch.ao.nn.intrinsic.qat.ConvBn2d` / `ConvBnReLU2d` / `LinearBn1d` (their
`_forward_approximate`):

  s      = gamma / sqrt(running_var + eps)                        per output channel
  y      = conv(x, FQ_w(W * s)) / s  (+ b)
  z      = gamma * (y - mu) / sqrt(sigma^2 + eps) + beta          BatchNorm of y
  output = FQ_out(act(z))

with (mu, sigma^2) the batch's mean and biased variance when `train=True` (the running
averages then take one step: mu, and the unbiased variance, as PyTorch's BatchNorm does) and
the running averages when `train=False`. In eval the layer is, up to float rounding,
conv(x, FQ_w(W * s)) + (b - mean) * s + beta: the folded layer whose kernel and bias
`qjax.fuse.folded_kernel_and_bias` gives the converter.

PyTorch mapping:
  torch                                          qjax
  fuse_modules_qat(m, [["conv", "bn", "relu"]])  QuantConvBN(..., activation=nn.relu)
  + prepare_qat                                  (the output point is the module's own)
  model.train()                                  train=True
  freeze_bn_stats (BatchNorm frozen, still QAT)  train=False, quant_stats still mutable
  model.eval() + disable_observer                train=False, quant_stats immutable
  momentum=0.1                                   momentum=0.9 (Flax's convention: the weight
                                                 of the old running average)

Deliberate differences. From PyTorch: the BatchNorm scale starts at 1 (as in Flax; PyTorch
draws it from U(0, 1)), and `use_bias` defaults to False for both layers (PyTorch's LinearBn1d
keeps a bias, which the BatchNorm's mean cancels anyway). From Flax's `nn.BatchNorm`: the
running variance moves with the unbiased batch variance (PyTorch's rule; Flax uses the biased
one), and the batch variance is the two-pass mean((y - mu)^2). Like PyTorch's approximate
forward, a channel whose gamma is 0 divides by 0 (PyTorch's slower `_forward_slow`, which
avoids that with a second convolution, has no counterpart here).

Variables of a layer <layer> (convert relies on these names):
  params/<layer>/{kernel, bias (with use_bias), bn_scale, bn_bias}
  batch_stats/<layer>/{mean, var}
  quant_stats/<layer>/{weight, output}   (the weight point observes W * s)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax._float32 import rounded
from qjax.nn import _integer
from qjax.nn.modules import (Mode, _merged_mode, _point, _stock_fields, _where, module_path)
from qjax.nn.qconfig import QConfig, QConfigLike, resolve
from qjax.observers.minmax import AxisName

BATCH_STATS = "batch_stats"
_MODES = (Mode.FLOAT, Mode.CALIBRATE, Mode.QAT, Mode.INT8)


def _bn_scale_factor(gamma: jax.Array, running_var: jax.Array, epsilon: float) -> jax.Array:
  """s = gamma / sqrt(running_var + eps) in float32, PyTorch's `scale_factor` of the QAT
  forward (the per-channel factor that scales the weight before fake quantization)."""
  running_std = rounded(jnp.sqrt(running_var.astype(jnp.float32) + jnp.float32(epsilon)))
  return rounded(gamma.astype(jnp.float32) / running_std)


def _channel_shape(ndim: int) -> tuple[int, ...]:
  return (1,) * (ndim - 1) + (-1,)


def _batch_moments(y: jax.Array, axis_name: AxisName = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mean, biased variance, unbiased variance) per channel (the last axis) in float32,
  over all other axes, with the two-pass variance sum((y - mean)^2) / n (resp. n - 1).

  With `axis_name`, y is one shard of the batch: both sums (and n) are `lax.psum`-ed over
  the mapped axes, so the moments are the whole batch's up to float summation order."""
  axes = tuple(range(y.ndim - 1))
  n = int(np.prod([y.shape[a] for a in axes]))
  y = y.astype(jnp.float32)
  if axis_name is None:
    mean = jnp.mean(y, axis=axes)
  else:
    n = n * int(lax.psum(1, axis_name))   # static: the mapped axes have known sizes
    mean = lax.psum(jnp.sum(y, axis=axes), axis_name) / jnp.float32(n)
  squares = jnp.sum(jnp.square(y - mean.reshape(_channel_shape(y.ndim))), axis=axes)
  if axis_name is not None:
    squares = lax.psum(squares, axis_name)
  return mean, squares / jnp.float32(n), squares / jnp.float32(n - 1)


def _running_average(running: jax.Array, batch: jax.Array, momentum: float) -> jax.Array:
  """momentum * running + (1 - momentum) * batch, in PyTorch's order: with m = fl32(1 -
  momentum) (PyTorch's momentum), m * batch + (1 - m) * running."""
  m = jnp.float32(1.0 - momentum)
  return rounded(m * batch) + rounded((jnp.float32(1) - m) * running)


def _batch_norm(y: jax.Array, mean: jax.Array, var: jax.Array, gamma: jax.Array,
                beta: jax.Array, epsilon: float) -> jax.Array:
  """gamma * (y - mean) / sqrt(var + eps) + beta along the last axis, in float32, returned
  in y's dtype."""
  shape = _channel_shape(y.ndim)
  inv_std = jnp.float32(1) / rounded(jnp.sqrt(var + jnp.float32(epsilon)))
  factor = (gamma.astype(jnp.float32) * inv_std).reshape(shape)
  z = (y.astype(jnp.float32) - mean.reshape(shape)) * factor + beta.astype(
      jnp.float32).reshape(shape)
  return z.astype(y.dtype)


def _folded_weight(module: nn.Module, qconfig: QConfig | None, mode: Mode, rhs: jax.Array,
                   scale: jax.Array | None) -> jax.Array:
  """The weight point applied to W * s (to W itself in float mode, where it is a no-op)."""
  point = _point(qconfig, "weight", name="weight", parent=module)
  if scale is None:
    return point(rhs, mode=mode)
  return point(rhs * scale.astype(rhs.dtype).reshape(_channel_shape(rhs.ndim)), mode=mode)


def _unscaled(y: jax.Array, scale: jax.Array | None) -> jax.Array:
  if scale is None:
    return y
  return y / scale.astype(y.dtype).reshape(_channel_shape(y.ndim))


class _FoldedDotGeneral(nn.Module):
  """dot_general(x, FQ_w(W * s)) / s for `nn.Dense(dot_general_cls=...)`, in the layer's
  scope (the weight point sits at quant_stats/<layer>/weight). `scale` None: plain W."""

  qconfig: QConfig | None
  mode: Mode
  scale: jax.Array | None

  @nn.compact
  def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
               precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    nn.share_scope(self.parent, self)  # type: ignore[arg-type]  # bound: parent is the layer
    rhs = _folded_weight(self, self.qconfig, self.mode, rhs, self.scale)
    y = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                        preferred_element_type=preferred_element_type)
    return _unscaled(y, self.scale)


class _FoldedConvGeneral(nn.Module):
  """conv(x, FQ_w(W * s)) / s for `nn.Conv(conv_general_dilated_cls=...)`; as above."""

  qconfig: QConfig | None
  mode: Mode
  scale: jax.Array | None

  @nn.compact
  def __call__(self, lhs: jax.Array, rhs: jax.Array, window_strides: Any, padding: Any,
               lhs_dilation: Any = None, rhs_dilation: Any = None,
               dimension_numbers: Any = None, feature_group_count: int = 1,
               batch_group_count: int = 1, precision: Any = None,
               preferred_element_type: Any = None) -> jax.Array:
    nn.share_scope(self.parent, self)  # type: ignore[arg-type]  # bound: parent is the layer
    rhs = _folded_weight(self, self.qconfig, self.mode, rhs, self.scale)
    y = lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
    return _unscaled(y, self.scale)


def _check_fields(module: nn.Module, train: Any) -> None:
  where = _where(module)
  if not isinstance(train, (bool, np.bool_)):
    raise TypeError(f"{where}: train must be True (batch statistics, running averages "
                    f"updated) or False (running averages); got {train!r}.")
  if not 0.0 <= module.momentum <= 1.0:
    raise ValueError(f"{where}: momentum must lie in [0, 1] (Flax's convention: the weight "
                     f"of the old running average, 0.9 for PyTorch's momentum=0.1); got "
                     f"{module.momentum!r}.")
  if not module.epsilon >= 0.0:
    raise ValueError(f"{where}: epsilon must be >= 0; got {module.epsilon!r}.")


def _folded_bn_layer(module: nn.Module, stock_type: type, cls_field: str, contraction: type,
                     inputs: jax.Array, train: bool, mode: Mode | str | None) -> jax.Array:
  """The stock layer with the folded contraction, the BatchNorm, the activation and the
  output point (module docstring)."""
  mode = _merged_mode(module, mode)
  where = _where(module)
  if mode not in _MODES:
    raise ValueError(f"{where}: mode must be one of {[m.value for m in _MODES]} for a layer "
                     f"with a folded BatchNorm; got {mode.value!r}.")
  _check_fields(module, train)
  qconfig = resolve(module.qconfig, module_path(module))
  if mode is Mode.INT8 and _integer.has_integer_form(qconfig):
    # The converted layer is a plain quantized Dense / Conv with the folded kernel and bias.
    return _integer.run_layer(module, inputs, where)
  inputs = _integer.mark_layer_input(module, qconfig, inputs, where=where,
                                     bn_epsilon=module.epsilon)
  features = module.features
  gamma = module.param("bn_scale", module.bn_scale_init, (features,), module.param_dtype)
  beta = module.param("bn_bias", module.bn_bias_init, (features,), module.param_dtype)
  ra_mean = module.variable(BATCH_STATS, "mean", lambda: jnp.zeros((features,), jnp.float32))
  ra_var = module.variable(BATCH_STATS, "var", lambda: jnp.ones((features,), jnp.float32))
  # The weight is scaled with the running variance as it was before this batch (PyTorch's
  # order); a float forward is the plain layer.
  scale = (None if mode is Mode.FLOAT
           else _bn_scale_factor(gamma, ra_var.value, module.epsilon))
  fields = _stock_fields(module, stock_type)
  fields[cls_field] = functools.partial(contraction, qconfig=qconfig, mode=mode, scale=scale)
  layer = stock_type(**fields)
  nn.share_scope(module, layer)
  y = layer(inputs)
  if train:
    count = int(np.prod(y.shape[:-1]))
    if count < 2 and module.axis_name is None:
      raise ValueError(f"{where}: train=True needs more than one value per channel for the "
                       f"batch variance; got an output of shape {y.shape}.")
    mean, var, unbiased = _batch_moments(y, module.axis_name)
    if not module.is_initializing():
      if not module.is_mutable_collection(BATCH_STATS):
        raise ValueError(f"{where}: train=True updates the running averages in "
                         f"'{BATCH_STATS}', which is immutable; call apply(..., mutable="
                         f"['{BATCH_STATS}', ...]), or pass train=False to use them as they "
                         f"are.")
      # PyTorch moves the running variance with the unbiased batch variance (Flax's
      # BatchNorm uses the biased one).
      momentum = module.momentum
      ra_mean.value = lax.stop_gradient(_running_average(ra_mean.value, mean, momentum))
      ra_var.value = lax.stop_gradient(_running_average(ra_var.value, unbiased, momentum))
  else:
    mean, var = ra_mean.value, ra_var.value
  z = _batch_norm(y, mean, var, gamma, beta, module.epsilon)
  if module.activation is not None:
    z = module.activation(z)
  z = _point(qconfig, "activation", name="output", parent=module,
             axis_name=module.axis_name)(z, mode=mode)
  return _integer.mark_layer_output(module, qconfig, z)


class QuantConvBN(nn.Conv):
  """Conv + BatchNorm (+ activation) with the BatchNorm folded for QAT: PyTorch's
  `ConvBn2d` (`ConvBnReLU2d` with `activation=nn.relu`); see the module docstring.

  Same fields as `nn.Conv` (kernel and bias initialised alike; `use_bias` defaults to False,
  as in PyTorch's ConvBn2d: the BatchNorm's mean cancels a bias), plus:

  Attributes:
    qconfig: observers of the weight (per output channel: spec.axis=-1) and the output.
    activation: fused activation applied after the BatchNorm, before the output point.
    momentum: the running averages' decay (Flax's convention; PyTorch's 0.1 is 0.9 here).
    epsilon: added to the variance (Flax's and PyTorch's default 1e-5).
    bn_scale_init, bn_bias_init: initialisers of gamma (ones) and beta (zeros).
    mode: default mode ("float", "calibrate", "qat"), overridable per call.
    axis_name: mapped axes (`jax.shard_map`) the batch is split over, as in Flax's
      `nn.BatchNorm`: the batch moments (`train=True`) are summed over them and the output
      observer reduces over them. None under GSPMD or on one device.

  Example:
    >>> import qjax.nn as qnn
    >>> layer = QuantConvBN(4, (3, 3), qconfig=qnn.get_default_qat_qconfig("x86"),
    ...                     activation=nn.relu)
    >>> x = jnp.ones((2, 8, 8, 3))
    >>> variables = layer.init(jax.random.key(0), x, train=False, mode="qat")
    >>> sorted(variables)
    ['batch_stats', 'params', 'quant_stats']
    >>> y, updates = layer.apply(variables, x, train=True, mode="qat",
    ...                          mutable=["batch_stats", "quant_stats"])
  """

  use_bias: bool = False
  qconfig: QConfigLike = None
  activation: Callable[[jax.Array], jax.Array] | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  bn_scale_init: Callable[..., jax.Array] = nn.initializers.ones
  bn_bias_init: Callable[..., jax.Array] = nn.initializers.zeros
  mode: Mode | str | None = None
  axis_name: AxisName = None

  # Takes `train` on top of the stock layer's `inputs` (for the BatchNorm): not a substitute
  # for the stock layer's __call__, hence the ignore.
  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool,  # type: ignore[override]
               mode: Mode | str | None = None) -> jax.Array:
    """The folded layer's output (module docstring); `train` chooses the batch's statistics
    (and updates the running averages) or the running averages."""
    return _folded_bn_layer(self, nn.Conv, "conv_general_dilated_cls", _FoldedConvGeneral,
                            inputs, train, mode)


class QuantDenseBN(nn.Dense):
  """Dense + BatchNorm (+ activation) with the BatchNorm folded for QAT: PyTorch's
  `LinearBn1d`. Fields, variables and modes as in `QuantConvBN`; the BatchNorm normalises
  the last axis over all the others."""

  use_bias: bool = False
  qconfig: QConfigLike = None
  activation: Callable[[jax.Array], jax.Array] | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  bn_scale_init: Callable[..., jax.Array] = nn.initializers.ones
  bn_bias_init: Callable[..., jax.Array] = nn.initializers.zeros
  mode: Mode | str | None = None
  axis_name: AxisName = None

  # Takes `train` on top of the stock layer's `inputs` (for the BatchNorm): not a substitute
  # for the stock layer's __call__, hence the ignore.
  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool,  # type: ignore[override]
               mode: Mode | str | None = None) -> jax.Array:
    """As `QuantConvBN.__call__`."""
    return _folded_bn_layer(self, nn.Dense, "dot_general_cls", _FoldedDotGeneral, inputs,
                            train, mode)
