"""Test-case builders shared by the numerics and parity tests: specs, ids, bit views, data."""

from __future__ import annotations

import itertools

import numpy as np

from qjax import QuantSpec


def all_specs(axes=(None,)) -> list[QuantSpec]:
  """Every QuantSpec for bits 2..16, each flag, each axis (reduce_range needs bits >= 3)."""
  return [QuantSpec(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow,
                    reduce_range=reduce, axis=axis)
          for bits, signed, symmetric, narrow, reduce, axis in itertools.product(
              range(2, 17), (True, False), (False, True), (False, True), (False, True), axes)
          if not (reduce and bits == 2)]


def spec_id(spec: QuantSpec) -> str:
  """A short test id: s8-aff-narrow, u4-sym-reduce, ..."""
  flags = ["sym" if spec.symmetric else "aff"]
  flags += [name for name, on in (("narrow", spec.narrow_range), ("reduce", spec.reduce_range))
            if on]
  return f"{'s' if spec.signed else 'u'}{spec.bits}-" + "-".join(flags)


def bits_of(a) -> np.ndarray:
  """Bit patterns, for bitwise comparisons (NaN == NaN, -0.0 != 0.0)."""
  a = np.asarray(a)
  return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def zero_points(rng: np.random.Generator, spec: QuantSpec, n: int | None,
                parity: int | None) -> np.ndarray:
  """n int32 zero points in [qmin, qmax] (a scalar if n is None), of the given parity where
  the grid has one."""
  z = rng.integers(spec.qmin, spec.qmax + 1, size=1 if n is None else n)
  if parity is not None:
    z = z - (z % 2 != parity)  # step down to the wanted parity ...
    z = np.where(z < spec.qmin, z + 2, z)  # ... or up when that leaves the grid
    z = np.where(z > spec.qmax, z - 1, z)  # a 2-level grid may have no such zero point
  z = z.astype(np.int32)
  return z[0] if n is None else z


def half_points(rng: np.random.Generator, spec: QuantSpec, shape, zero_point,
                boundary_fraction: float) -> np.ndarray:
  """Integers k such that k + 0.5 sweeps the grid around the (broadcast) zero point: uniform
  over [qmin - Z - 3, qmax - Z + 2], with `boundary_fraction` of them on the clamping
  boundaries (k + 0.5 = qmin - Z - 0.5 and qmax - Z + 0.5) or one level beyond them."""
  lo = spec.qmin - np.asarray(zero_point).astype(np.int64) - 3
  hi = spec.qmax - np.asarray(zero_point).astype(np.int64) + 2
  k = np.floor(lo + rng.random(shape) * (hi - lo + 1)).astype(np.int64)
  step = rng.integers(0, 2, size=shape)  # on the boundary, or one level beyond
  pick = rng.random(shape)
  k = np.where(pick < boundary_fraction / 2, lo + 2 - step, k)
  return np.where((pick >= boundary_fraction / 2) & (pick < boundary_fraction), hi - 2 + step, k)


class CompileCounter:
  """Counts XLA backend compilations while active (a context manager)."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0

  def _listener(self, event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == self.EVENT:
      self.count += 1

  def __enter__(self):
    import jax  # pylint: disable=import-outside-toplevel
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    import jax  # pylint: disable=import-outside-toplevel
    jax.monitoring.unregister_event_duration_listener(self._listener)


def int8_layer_runs(model, int_vars, x, feeds, layers):
  """mode "int8" of `model` on x twice, each as (model output, {layer name: its int8
  output}) for the modules of the `layers` types: first with every layer named in `feeds`
  taking that int8 array as its input instead of its producer's output, then as the model
  chains them."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  def substitute(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, layers)
        and module.name in feeds):
      args = (feeds[module.name],) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  def run():
    y, state = model.apply(
        int_vars, x, mode="int8", mutable=["intermediates"],
        capture_intermediates=lambda m, method: isinstance(m, layers) and method == "__call__")
    return y, {name: v["__call__"][0] for name, v in state["intermediates"].items()}

  with nn.intercept_methods(substitute):
    fed = run()
  return fed, run()
