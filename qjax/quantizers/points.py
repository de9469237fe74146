"""The research quantizers as quantization points of `qjax.nn`'s layers.

A `qjax.nn.QConfig` takes one of these in place of an observer, so one model mixes methods
and bit widths per layer (`QConfigMap`):

    QConfig(weight=DoReFaWeight(bits=4), activation=PACT(bits=4))
    QConfig(weight=TernaryWeight(), activation=MinMaxObserver(spec=...))

Each is a frozen, hashable dataclass (static under `jax.jit`) with

  quantizer(x, params)       the forward of its pure function (`qjax.quantizers`), with the
                             paper's gradient; `params` holds its learned parameters (PACT's
                             clipping level), {} for the others
  quantizer.init_params(x)   those parameters' initial values for the batch x
  quantizer.spec             the integer grid its values lie on (`QuantSpec`)

and, for the integer path (`qjax.convert`), a weight quantizer's `integer_weights(kernel)`
(the integers q and scales S with S q = the forward's values) or an activation quantizer's
`qparams(params)` (the grid's scale and zero point). The grids:

  method               values                                  integers q         spec
  DoReFaWeight(k > 1)  (2m - n) / n, n = 2^k - 1               2m - n (odd)       k + 1 bits
  DoReFaWeight(1)      E sign(w), E = mean|w|                  +-1                2 bits
  WRPNWeight(k)        m / n, n = 2^(k-1) - 1, |m| <= n        m                  k bits
  BinaryWeight         a sign(w), a = mean|w| (per channel)    +-1                2 bits
  TernaryWeight        a {-1, 0, 1} (TWN, per channel)         -1, 0, 1           2 bits
  DoReFaActivation(k)  m / (2^k - 1), m = 0..2^k - 1           m                  k bits, unsigned
  WRPNActivation(k)    the same grid                           m                  k bits, unsigned
  PACT(k)              m alpha / (2^k - 1)                     m                  k bits, unsigned

(signed weight grids are symmetric with narrow_range: [-(2^(b-1) - 1), 2^(b-1) - 1]; DoReFa's
k-bit weights use only the odd integers of a (k + 1)-bit grid, which `qjax.io` stores in k
bits.) The integer path computes S_x S_w sum q_x q_w where the forward computes in float, so
outputs agree up to float rounding at rounding ties.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics import QParams, QuantSpec
from qjax.quantizers import _common
from qjax.quantizers.binary import (_reduce_axes, binary_scale, binary_weight, ternary_parts,
                                    ternary_weight)
from qjax.quantizers.dorefa import _max_abs, dorefa_activation, dorefa_weight
from qjax.quantizers.pact import pact, pact_l2
from qjax.quantizers.wrpn import wrpn_activation, wrpn_weight

PACT_ALPHA = "pact_alpha"
"""Name of PACT's learned clipping level in a point's "params"."""


def _narrow(bits: int, per_channel: bool = False) -> QuantSpec:
  return QuantSpec(bits=bits, signed=True, symmetric=True, narrow_range=True,
                   axis=-1 if per_channel else None)


def _check_flag(where: str, name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise TypeError(f"{where}: {name} must be True or False; got {value!r}.")


class Quantizer:
  """Base of the research quantization points (module docstring)."""

  role: ClassVar[str] = ""

  @property
  def spec(self) -> QuantSpec:
    """The integer grid of the quantized values."""
    raise NotImplementedError

  def init_params(self, x: jax.Array) -> dict[str, jax.Array]:
    """Initial values of the learned parameters for the batch `x` ({}: none)."""
    del x
    return {}

  def __call__(self, x: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    raise NotImplementedError


class WeightQuantizer(Quantizer):
  """A research quantizer of a layer's kernel (output channels last, as Flax keeps them)."""

  role = "weight"

  def integer_weights(self, kernel: jax.Array) -> tuple[QParams, jax.Array]:
    """(QParams(S, 0), q): int32 integers on `spec` and float32 scales (per output channel
    (C,) or ()) with S q equal to the forward's values, up to float32 rounding."""
    raise NotImplementedError


class ActivationQuantizer(Quantizer):
  """A research quantizer of activations (per tensor on the integer path)."""

  role = "activation"

  def qparams(self, params: dict[str, jax.Array]) -> QParams:
    """The grid's (scale, zero point) for the learned `params`."""
    raise NotImplementedError

  def inverse_scale(self, params: dict[str, jax.Array]) -> jax.Array:
    """The float32 factor n / alpha the forward multiplies x by before rounding (the integer
    path quantizes float inputs with it, so that ties round as in the forward)."""
    raise NotImplementedError


def _float32_kernel(kernel: Any) -> jax.Array:
  return _common.float_input("integer_weights", kernel, "kernel").astype(jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoReFaWeight(WeightQuantizer):
  """DoReFa-Net weights on k bits (`qjax.quantizers.dorefa_weight`).

    k > 1:  w_q = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1
    k = 1:  w_q = sign(w) mean|w|

  Attributes:
    bits: k, 1..15 (the integers of k > 1 take a (k + 1)-bit grid; the integer path runs
      k <= 7).

  Example:
    >>> q = DoReFaWeight(bits=2)
    >>> q(jnp.array([-2.0, 0.1, 1.0]), {})
    Array([-1.        ,  0.33333334,  1.        ], dtype=float32)
    >>> qparams, ints = q.integer_weights(jnp.array([-2.0, 0.1, 1.0]))
    >>> ints, qparams.scale
    (Array([-3,  1,  3], dtype=int32), Array(0.33333334, dtype=float32))
  """

  bits: int

  def __post_init__(self):
    _common.check_bits("DoReFaWeight", self.bits, 1, 15)

  @property
  def spec(self) -> QuantSpec:
    return _narrow(2 if self.bits == 1 else self.bits + 1)

  def __call__(self, x: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    del params
    return dorefa_weight(x, self.bits)

  def integer_weights(self, kernel: jax.Array) -> tuple[QParams, jax.Array]:
    w = _float32_kernel(kernel)
    if self.bits == 1:
      mean = jnp.mean(jnp.abs(w))
      q = jnp.where(w >= 0, 1, -1).astype(jnp.int32)
      return _weights(q, mean, ())
    n = float(2**self.bits - 1)
    t = jnp.tanh(w)
    biggest = _max_abs(t)
    m = jnp.round((t / (2.0 * biggest) + 0.5) * n)
    return _weights((2.0 * m - n).astype(jnp.int32), jnp.float32(1.0 / n), ())


def _scale_shape(w: jax.Array, per_channel: bool) -> tuple[int, ...]:
  return (w.shape[-1],) if per_channel else ()


def _weights(q: jax.Array, scale: jax.Array, shape: tuple[int, ...]) -> tuple[QParams, jax.Array]:
  """(QParams(scale, 0), q) with a zero scale (a channel of zero weights, whose q are 0
  then) replaced by 1, so that every requantizer has a positive scale."""
  scale = jnp.asarray(scale, jnp.float32).reshape(shape)
  scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  return QParams(scale, jnp.zeros(shape, jnp.int32)), q


@dataclasses.dataclass(frozen=True, kw_only=True)
class WRPNWeight(WeightQuantizer):
  """WRPN weights: clip(w, -1, 1) with k - 1 bits of magnitude and a sign
  (`qjax.quantizers.wrpn_weight`); the integers are rne(clip(w, -1, 1) (2^(k-1) - 1)).

  Attributes:
    bits: k, 2..16.

  Example:
    >>> WRPNWeight(bits=3).integer_weights(jnp.array([-3.0, -0.4, 0.2, 0.9]))[1]
    Array([-3, -1,  1,  3], dtype=int32)
  """

  bits: int

  def __post_init__(self):
    _common.check_bits("WRPNWeight", self.bits, 2, 16)

  @property
  def spec(self) -> QuantSpec:
    return _narrow(self.bits)

  def __call__(self, x: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    del params
    return wrpn_weight(x, self.bits)

  def integer_weights(self, kernel: jax.Array) -> tuple[QParams, jax.Array]:
    n = float(2**(self.bits - 1) - 1)
    q = jnp.round(jnp.clip(_float32_kernel(kernel), -1.0, 1.0) * n).astype(jnp.int32)
    return _weights(q, jnp.float32(1.0 / n), ())


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinaryWeight(WeightQuantizer):
  """Binary weights a sign(w) (`qjax.quantizers.binary_weight`): XNOR-Net's a = mean|w| per
  output channel (or per tensor), BinaryConnect's gradient clipped at |w| <= 1.

  Attributes:
    per_channel: one scale per output channel (the kernel's last axis), else one.
    scale: multiply by a = mean|w|; False gives +-1 (BinaryConnect).

  Example:
    >>> w = jnp.array([[0.5, -1.0], [-1.5, 0.0]])
    >>> qparams, q = BinaryWeight().integer_weights(w)
    >>> q, qparams.scale
    (Array([[ 1, -1],
           [-1,  1]], dtype=int32), Array([1. , 0.5], dtype=float32))
  """

  per_channel: bool = True
  scale: bool = True

  def __post_init__(self):
    _check_flag("BinaryWeight", "per_channel", self.per_channel)
    _check_flag("BinaryWeight", "scale", self.scale)

  @property
  def spec(self) -> QuantSpec:
    return _narrow(2, self.per_channel)

  def __call__(self, x: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    del params
    return binary_weight(x, per_channel=self.per_channel, scale=self.scale)

  def integer_weights(self, kernel: jax.Array) -> tuple[QParams, jax.Array]:
    w = _float32_kernel(kernel)
    a = binary_scale(w, _reduce_axes("BinaryWeight", w, self.per_channel), self.scale)
    q = jnp.where(a > 0, jnp.where(w >= 0, 1, -1), 0).astype(jnp.int32)
    return _weights(q, a, _scale_shape(w, self.per_channel))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TernaryWeight(WeightQuantizer):
  """Ternary weights a {-1, 0, 1} with TWN's threshold 0.7 mean|w| and scale
  (`qjax.quantizers.ternary_weight`).

  Attributes:
    per_channel: threshold and scale per output channel (the last axis), else per tensor.

  Example:
    >>> w = jnp.array([[1.0, -0.1], [-0.25, 0.25], [0.1, -0.5]])
    >>> TernaryWeight(per_channel=False).integer_weights(w)[1]
    Array([[ 1,  0],
           [ 0,  0],
           [ 0, -1]], dtype=int32)
  """

  per_channel: bool = True

  def __post_init__(self):
    _check_flag("TernaryWeight", "per_channel", self.per_channel)

  @property
  def spec(self) -> QuantSpec:
    return _narrow(2, self.per_channel)

  def __call__(self, x: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    del params
    return ternary_weight(x, per_channel=self.per_channel)

  def integer_weights(self, kernel: jax.Array) -> tuple[QParams, jax.Array]:
    w = _float32_kernel(kernel)
    delta, level = ternary_parts(w, _reduce_axes("TernaryWeight", w, self.per_channel))
    q = jnp.where(w > delta, 1, jnp.where(w < -delta, -1, 0)).astype(jnp.int32)
    return _weights(q, level, _scale_shape(w, self.per_channel))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoReFaActivation(ActivationQuantizer):
  """DoReFa-Net activations: k bits of clip(x, 0, 1) (`qjax.quantizers.dorefa_activation`).

  Attributes:
    bits: k, 2..16.

  Example:
    >>> q = DoReFaActivation(bits=2)
    >>> q(jnp.array([-0.5, 0.4, 1.7]), {})
    Array([0.        , 0.33333334, 1.        ], dtype=float32)
    >>> q.qparams({}).scale
    Array(0.33333334, dtype=float32)
  """

  bits: int

  def __post_init__(self):
    _common.check_bits(type(self).__name__, self.bits, 2, 16)

  @property
  def spec(self) -> QuantSpec:
    return QuantSpec(bits=self.bits, signed=False)

  def __call__(self, x: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    del params
    return dorefa_activation(x, self.bits)

  def qparams(self, params: dict[str, jax.Array]) -> QParams:
    del params
    return QParams(jnp.float32(1.0 / (2**self.bits - 1)), jnp.int32(0))

  def inverse_scale(self, params: dict[str, jax.Array]) -> jax.Array:
    del params
    return jnp.float32(2**self.bits - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WRPNActivation(DoReFaActivation):
  """WRPN activations: k bits of clip(x, 0, 1) (`qjax.quantizers.wrpn_activation`), the grid
  of `DoReFaActivation`.

  Attributes:
    bits: k, 2..16.

  Example:
    >>> WRPNActivation(bits=2)(jnp.array([-1.0, 0.2, 0.5, 4.0]), {})
    Array([0.        , 0.33333334, 0.6666667 , 1.        ], dtype=float32)
  """

  def __call__(self, x: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    del params
    return wrpn_activation(x, self.bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PACT(ActivationQuantizer):
  """PACT activations: k bits of clip(x, 0, alpha) with alpha learned
  (`qjax.quantizers.pact`), kept in the point's params as "pact_alpha".

    y = rne(clip(x, 0, a) (2^k - 1) / a) a / (2^k - 1),   dy/da = 1 where x >= a

  Attributes:
    bits: k, 2..16.
    alpha: the initial clipping level: a positive float, or an observer (any of
      `qjax.observers`, e.g. an MSE or entropy observer on an unsigned spec) whose range
      maximum on the batch the model is initialised with becomes alpha.
    per_channel: one alpha per channel of the last axis (fake quantization only: the
      integer path quantizes activations per tensor).

  Example:
    >>> q = PACT(bits=2, alpha=1.0)
    >>> params = q.init_params(jnp.zeros((4, 3)))
    >>> q(jnp.array([-1.0, 0.3, 0.5, 2.0]), params)
    Array([0.        , 0.33333334, 0.6666667 , 1.        ], dtype=float32)
  """

  bits: int
  alpha: Any = 10.0
  per_channel: bool = False

  def __post_init__(self):
    _common.check_bits("PACT", self.bits, 2, 16)
    _check_flag("PACT", "per_channel", self.per_channel)
    if isinstance(self.alpha, (bool, np.bool_)) or not (
        isinstance(self.alpha, (int, float)) or hasattr(self.alpha, "qparams")):
      raise TypeError(f"PACT: alpha must be a positive float or a qjax.observers observer; got "
                      f"{type(self.alpha).__name__} {self.alpha!r}.")
    if isinstance(self.alpha, (int, float)) and not (
        self.alpha > 0 and np.isfinite(self.alpha)):
      raise ValueError(f"PACT: alpha must be a positive finite float; got {self.alpha!r}.")

  @property
  def spec(self) -> QuantSpec:
    return QuantSpec(bits=self.bits, signed=False, axis=-1 if self.per_channel else None)

  def init_params(self, x: jax.Array) -> dict[str, jax.Array]:
    x = _common.float_input("PACT", x)
    shape = (x.shape[-1],) if self.per_channel else ()
    if isinstance(self.alpha, (int, float)):
      return {PACT_ALPHA: jnp.full(shape, self.alpha, jnp.float32)}
    observer = self.alpha
    state = observer.update(observer.init(jnp.shape(x)), jax.lax.stop_gradient(x))
    scale, zero = observer.qparams(state)
    top = scale * (observer.spec.qmax - zero).astype(jnp.float32)
    top = jnp.max(top) if jnp.ndim(top) else top
    return {PACT_ALPHA: jnp.full(shape, jnp.maximum(top, jnp.float32(1e-3)), jnp.float32)}

  def __call__(self, x: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    return pact(x, _alpha(params), self.bits)

  def qparams(self, params: dict[str, jax.Array]) -> QParams:
    alpha = jnp.asarray(_alpha(params), jnp.float32)
    return QParams(alpha / jnp.float32(2**self.bits - 1), jnp.zeros(alpha.shape, jnp.int32))

  def inverse_scale(self, params: dict[str, jax.Array]) -> jax.Array:
    return jnp.float32(2**self.bits - 1) / jnp.asarray(_alpha(params), jnp.float32)


def _alpha(params: dict[str, jax.Array]) -> jax.Array:
  if not hasattr(params, "keys") or PACT_ALPHA not in params:
    raise ValueError(f"PACT: params must hold its clipping level {PACT_ALPHA!r} (from "
                     f"init_params); got {sorted(params) if hasattr(params, 'keys') else params}.")
  return params[PACT_ALPHA]


def pact_penalty(params: Any, weight_decay: float) -> jax.Array:
  """PACT's L2 regulariser over a model: weight_decay / 2 * sum of every "pact_alpha"^2 in
  the `params` pytree (`qjax.quantizers.pact_l2` of each PACT point), to add to the loss.

  Args:
    params: a params pytree (nested dicts), e.g. variables["params"].
    weight_decay: lambda_alpha >= 0.

  Returns:
    A float32 scalar (0 when the model has no PACT point).

  Example:
    >>> pact_penalty({"Dense_0": {"output": {"pact_alpha": jnp.float32(2.0)}}}, 0.5)
    Array(1., dtype=float32)
  """
  leaves = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if path and getattr(path[-1], "key", None) == PACT_ALPHA]
  if not leaves:
    return pact_l2(jnp.zeros((0,), jnp.float32), weight_decay)
  return sum((pact_l2(leaf, weight_decay) for leaf in leaves), jnp.float32(0.0))
