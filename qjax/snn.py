"""Leaky integrate-and-fire (LIF) neurons with a current-based synapse, as pure functions.

One Euler step of Norse's feed-forward LIF neuron (`norse.torch.functional.lif`, version
1.1.0), input current x, state (v, i), parameters p, time step dt:

    i' = i + x                                            the input current jumps in
    v' = v + dt tau_mem_inv ((v_leak - v) + i')           the membrane integrates
    i_next = i' - dt tau_syn_inv i'                        the synaptic current decays
    z = H(v' - v_th)                                      a spike where v' passes v_th
    v_next = (1 - z) v' + z v_reset                       and the membrane resets

H is the Heaviside step (H(0) = 0). Its derivative is zero almost everywhere, so training
uses a surrogate gradient in the backward pass (a `jax.custom_vjp`): SuperSpike
(Zenke & Ganguli 2018), dH/dx ~ 1 / (alpha |x| + 1)^2, or a triangle,
dH/dx ~ alpha max(0, 1 - alpha |x|). The forward pass is always the exact step.

Example:
  >>> import jax.numpy as jnp
  >>> state = LIFState(v=jnp.zeros(2), i=jnp.zeros(2))
  >>> z, state = lif_step(jnp.array([20.0, 5.0]), state)
  >>> z                                         # v' = 0.1 i' = (2, 0.5): one passes v_th = 1
  Array([1., 0.], dtype=float32)
  >>> state.v                                   # the spiking neuron resets to v_reset = 0
  Array([0. , 0.5], dtype=float32)
  >>> state.i                                   # i' decays by dt tau_syn_inv = 0.2
  Array([16.,  4.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Surrogate(enum.Enum):
  """The backward pass of the spike function H(x)."""

  SUPERSPIKE = "superspike"
  """1 / (alpha |x| + 1)^2 (Zenke & Ganguli 2018; Norse's "super")."""
  TRIANGLE = "triangle"
  """alpha max(0, 1 - alpha |x|): a tent of width 2 / alpha and area 1."""


def as_surrogate(value: Surrogate | str) -> Surrogate:
  """`value` as a Surrogate; a ValueError listing the accepted names otherwise."""
  if isinstance(value, Surrogate):
    return value
  try:
    return Surrogate(value)
  except ValueError:
    raise ValueError(f"surrogate must be one of {[s.value for s in Surrogate]}; got "
                     f"{value!r}.") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LIFParameters:
  """Parameters of a LIF neuron (Norse's defaults). Frozen and hashable: static under jit.

  Attributes:
    tau_syn_inv: inverse synaptic time constant 1 / tau_syn, in 1/s.
    tau_mem_inv: inverse membrane time constant 1 / tau_mem, in 1/s.
    v_leak: leak (resting) potential.
    v_th: threshold potential.
    v_reset: reset potential after a spike.
    surrogate: the spike function's backward pass.
    alpha: sharpness of the surrogate gradient.
  """

  tau_syn_inv: float = 200.0
  tau_mem_inv: float = 100.0
  v_leak: float = 0.0
  v_th: float = 1.0
  v_reset: float = 0.0
  surrogate: Surrogate | str = Surrogate.SUPERSPIKE
  alpha: float = 100.0

  def __post_init__(self):
    object.__setattr__(self, "surrogate", as_surrogate(self.surrogate))
    for name in ("tau_syn_inv", "tau_mem_inv", "v_leak", "v_th", "v_reset", "alpha"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
          value):
        raise TypeError(f"LIFParameters.{name} must be a finite Python number (it is static "
                        f"under jit); got {value!r}.")
      object.__setattr__(self, name, float(value))
    for name in ("tau_syn_inv", "tau_mem_inv", "alpha"):
      if getattr(self, name) <= 0:
        raise ValueError(f"LIFParameters.{name} must be > 0; got {getattr(self, name)}.")


class LIFState(NamedTuple):
  """State of a feed-forward LIF neuron: membrane potential v and synaptic current i."""

  v: jax.Array
  i: jax.Array


def initial_state(shape: tuple[int, ...], params: LIFParameters = LIFParameters(),
                  dtype: Any = jnp.float32) -> LIFState:
  """The resting state: v = v_leak, i = 0 (Norse starts from v_leak too)."""
  return LIFState(v=jnp.full(shape, params.v_leak, dtype), i=jnp.zeros(shape, dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def spike(x: jax.Array, surrogate: Surrogate = Surrogate.SUPERSPIKE,
          alpha: float = 100.0) -> jax.Array:
  """H(x) = 1 where x > 0 else 0, in x's dtype, with a surrogate gradient (module docstring).

  Example:
    >>> spike(jnp.array([-0.5, 0.0, 0.2]))
    Array([0., 0., 1.], dtype=float32)
    >>> jax.grad(lambda x: spike(x).sum())(jnp.array([0.0, 0.01]))   # 1 / (100 |x| + 1)^2
    Array([1.  , 0.25], dtype=float32)
  """
  as_surrogate(surrogate)  # an unknown name fails here, not only in the backward pass
  given: object = alpha  # any object may arrive here; the annotation says what is accepted
  if (isinstance(given, bool) or not isinstance(given, numbers.Real)
      or not (math.isfinite(given) and float(given) > 0)):
    raise ValueError(f"spike: alpha (the surrogate gradient's sharpness) must be a finite "
                     f"Python number > 0; got {alpha!r}.")
  return (x > 0).astype(x.dtype)


def _spike_fwd(x, surrogate, alpha):
  return spike(x, surrogate, alpha), x


def surrogate_gradient(x: jax.Array, surrogate: Surrogate | str, alpha: float) -> jax.Array:
  """The surrogate dH/dx at x (module docstring)."""
  surrogate = as_surrogate(surrogate)
  a = jnp.asarray(alpha, x.dtype)
  if surrogate is Surrogate.SUPERSPIKE:
    return 1 / (a * jnp.abs(x) + 1) ** 2
  if surrogate is Surrogate.TRIANGLE:
    return a * jnp.maximum(0, 1 - a * jnp.abs(x))
  raise ValueError(f"surrogate must be a Surrogate; got {surrogate!r}.")


def _spike_bwd(surrogate, alpha, x, g):
  return (g * surrogate_gradient(x, surrogate, alpha),)


spike.defvjp(_spike_fwd, _spike_bwd)


def _check_dt(dt: float) -> float:
  if isinstance(dt, bool) or not isinstance(dt, (int, float)):
    raise TypeError(f"dt must be a Python number (seconds; it is static under jit); got "
                    f"{dt!r}.")
  if not (math.isfinite(dt) and dt > 0):
    raise ValueError(f"dt must be finite and > 0 (seconds); got {dt!r}.")
  return float(dt)


def lif_step(x: jax.Array, state: LIFState, params: LIFParameters = LIFParameters(),
             dt: float = 1e-3) -> tuple[jax.Array, LIFState]:
  """One Euler step of the LIF neuron (module docstring): (spikes z, next state).

  Args:
    x: input current, any shape (broadcast against the state).
    state: LIFState(v, i).
    params: the neuron's parameters.
    dt: time step in seconds.

  Returns:
    z (0. or 1., in the dtype of state.v + x) and LIFState(v_next, i_next).

  Raises:
    TypeError: x not floating-point, params not LIFParameters. ValueError: x does not
      broadcast to the state's shape, or a bad dt.
  """
  dt = _check_dt(dt)
  if not isinstance(params, LIFParameters):
    raise TypeError(f"params must be LIFParameters; got {type(params).__name__}.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"lif_step: x (the input current) must be a floating-point array; got "
                    f"{x.dtype}.")
  try:
    fits = jnp.broadcast_shapes(x.shape, jnp.shape(state.i)) == jnp.shape(state.i)
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(f"lif_step: x of shape {x.shape} must broadcast to the state's shape "
                     f"{jnp.shape(state.i)}.")
  i1 = state.i + x
  v1 = state.v + dt * params.tau_mem_inv * ((params.v_leak - state.v) + i1)
  i_next = i1 - dt * params.tau_syn_inv * i1
  z = spike(v1 - params.v_th, params.surrogate, params.alpha)
  v_next = (1 - z) * v1 + z * params.v_reset
  return z, LIFState(v=v_next, i=i_next)
