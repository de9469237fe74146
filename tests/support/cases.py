"""Test-case builders and helpers shared by the tests: specs, ids, bit views, data, compile
counts, int8 runs, jaxpr walks."""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from qjax import QuantSpec, dynamic


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


def init_key(seed: int = 0) -> jax.Array:
  """A model-initialisation key on XLA's own random bits ("rbg"): XLA:CPU compiles threefry's
  random bits for a model's kernels in seconds, rbg's in a fraction of one. For tests that need
  one shared starting point, not particular values."""
  return jax.random.key(seed, impl="rbg")


def bits_of(a) -> np.ndarray:
  """Bit patterns, for bitwise comparisons (NaN == NaN, -0.0 != 0.0)."""
  a = np.asarray(a)
  return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def qarray_of(values, spec: QuantSpec, rng: np.random.Generator, scale_low: float = 1e-3):
  """A QArray of the integer `values` with random scales in [scale_low, 2) (and, when affine,
  zero points) of `spec`'s per-tensor or per-channel shape."""
  from qjax.qarray import QArray
  values = np.asarray(values, spec.storage_dtype)
  qshape = (values.shape[spec.axis],) if spec.per_channel else ()
  scale = rng.uniform(scale_low, 2.0, qshape).astype(np.float32)
  if spec.symmetric:
    zero_point = np.full(qshape, spec.symmetric_zero_point, np.int32)
  else:
    zero_point = rng.integers(spec.qmin, spec.qmax + 1, qshape).astype(np.int32)
  return QArray(jnp.asarray(values), jnp.asarray(scale), jnp.asarray(zero_point), spec)


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


def fbgemm_qparams_ranges(seed: int, n: int) -> np.ndarray:
  """(n, 2) float32 (min, max) pairs that exercise every branch of fbgemm's activation
  qparams: random, symmetric, exact and near ties of Q(-min)/D, stretched small scales,
  one-sided, huge and tiny."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    kind = i % 9
    if kind == 0:
      lo, hi = np.sort(rng.normal(size=2) * 10.0 ** rng.uniform(-6, 6))
    elif kind == 1:
      v = rng.uniform(0, 5) * 10.0 ** rng.integers(-4, 5)
      lo, hi = -v, v
    elif kind == 2:     # exact ties: max / -min = (2Q - 1 - 2k) / (2k + 1)
      q = 127 if rng.random() < 0.5 else 255
      k = rng.integers(0, q)
      unit = np.ldexp(rng.integers(2**11, 2**12), int(rng.integers(-40, 20)))
      lo, hi = -(2 * k + 1) * unit, (2 * q - 1 - 2 * k) * unit
    elif kind == 3:     # one ulp away from a tie
      q = 127 if rng.random() < 0.5 else 255
      k = rng.integers(0, q)
      m = np.float32(rng.uniform(0.1, 10))
      x = np.float32(m * q / (k + 0.5) - m)
      lo, hi = -m, np.nextafter(x, np.float32(np.inf) if rng.random() < 0.5 else np.float32(0))
    elif kind == 4:     # scales below 6.1e-5
      lo, hi = -rng.uniform(0, 1e-2), rng.uniform(0, 1e-2)
    elif kind == 5:
      lo, hi = (0.0, rng.uniform(0, 3)) if rng.random() < 0.5 else (-rng.uniform(0, 3), 0.0)
    elif kind == 6:     # far apart: the smaller end below the larger's precision
      v = rng.uniform(0.5, 1)
      lo, hi = -v, v * 2.0 ** rng.integers(-40, 40)
    elif kind == 7:
      lo, hi = np.sort(rng.uniform(-1, 1, size=2) * 10.0 ** rng.integers(-30, 37))
    else:               # both ends positive or both negative: widened to include 0
      lo, hi = np.sort(rng.uniform(1, 2, size=2)) * (1 if rng.random() < 0.5 else -1)
    out.append((np.float32(lo), np.float32(hi)))
  ranges = np.array(out, np.float32)
  ranges[:, 0] = np.minimum(ranges[:, 0], ranges[:, 1])
  return ranges


@functools.cache
def batched_choose_qparams(reduce_range: bool):
  """qjax.dynamic's activation qparams of a batch of (min, max) pairs (jit of vmap), one
  function per `reduce_range`: (lo, hi) -> (scale, zero_point)."""
  return jax.jit(jax.vmap(functools.partial(dynamic._choose_qparams_core,
                                            reduce_range=reduce_range)))


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
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def int8_layer_runs(model, int_vars, x, feeds, layers):
  """mode "int8" of `model` on x twice, each as (model output, {layer name: its int8
  output}) for the modules of the `layers` types: first with every layer named in `feeds`
  taking that int8 array as its input instead of its producer's output, then as the model
  chains them."""
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


# ------------------------------------------------------------------------------------------
# Jaxprs.


def sub_jaxprs(eqn) -> list:
  """The jaxprs nested in an equation's parameters (pjit, custom_jvp, remat, ...)."""
  found = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex_core.ClosedJaxpr):
        found.append(item.jaxpr)
      elif isinstance(item, jex_core.Jaxpr):
        found.append(item)
  return found


def all_eqns(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in it, depth first."""
  for eqn in jaxpr.eqns:
    yield eqn
    for inner in sub_jaxprs(eqn):
      yield from all_eqns(inner)


def contractions(jaxpr) -> list:
  """The dot_general and conv_general_dilated equations of `all_eqns(jaxpr)`, and the calls
  of qjax's native int8 GEMM and convolution (`qjax.integer.kernels`)."""
  return [e for e in all_eqns(jaxpr)
          if e.primitive.name in ("dot_general", "conv_general_dilated") or _is_native(e)]


def _is_native(eqn) -> bool:
  target = str(eqn.params.get("target_name", ""))
  return eqn.primitive.name == "ffi_call" and target.startswith(("qjax_int8_gemm",
                                                                 "qjax_int8_conv"))


def assert_int8_contractions(jaxpr) -> dict[str, int]:
  """Every dot_general / conv_general_dilated takes int8 operands and yields int32, every
  native GEMM call takes int8 operands and yields int32 (or int8 with the requantization
  fused); returns how many of each there are ("native" only when there are some)."""
  counts = {"dot_general": 0, "conv_general_dilated": 0}
  for eqn in contractions(jaxpr):
    in_dtypes = [jnp.dtype(v.aval.dtype) for v in eqn.invars]
    out_dtypes = [jnp.dtype(v.aval.dtype) for v in eqn.outvars]
    name = "native" if _is_native(eqn) else eqn.primitive.name
    assert in_dtypes[:2] == [jnp.dtype(jnp.int8)] * 2, (name, in_dtypes)
    if name == "native":
      assert out_dtypes in ([jnp.dtype(jnp.int32)], [jnp.dtype(jnp.int8)]), (name, out_dtypes)
    else:
      assert len(in_dtypes) == 2 and out_dtypes == [jnp.dtype(jnp.int32)], (name, out_dtypes)
    counts[name] = counts.get(name, 0) + 1
  return counts


def xla_kernel():
  """Traces inside run the integer path's contractions on XLA's dot_general (what the
  jaxpr and HLO censuses inspect), whatever the default kernel. Trace a fresh function inside:
  a jitted function keeps the kernel of its first trace."""
  from qjax.integer import kernels  # pylint: disable=import-outside-toplevel
  return kernels.use("xla")
