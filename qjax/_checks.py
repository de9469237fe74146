"""Input validation shared by qjax's layers.

Errors are raised at trace time and say what was expected, what came, and the usual cause.
Checks on *values* (NaN, ranges, signs) can only run on concrete arrays; under `jax.jit`
they are skipped and each function documents what happens to bad values instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def as_float_array(name: str, value: Any, *, python_int_ok: bool = False,
                   hint: str = "") -> jax.Array:
  """`value` as a floating jax array; TypeError naming `name` for ints, bools and others.

  Python floats (and, with `python_int_ok`, Python ints) become float32 arrays.
  """
  accepted = ", ".join(FLOAT_DTYPES)
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a floating-point array ({accepted}); got bool.{hint}")
  if isinstance(value, float) or (python_int_ok and isinstance(value, int)):
    return jnp.asarray(value, dtype=jnp.float32)
  try:
    arr = jnp.asarray(value)
  except TypeError as err:
    raise TypeError(f"{name} must be a floating-point array ({accepted}); "
                    f"got {type(value).__name__}.{hint}") from err
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array ({accepted}); "
                    f"got dtype {arr.dtype}.{hint}")
  return arr


def as_int_array(name: str, value: Any, *, hint: str = "") -> jax.Array:
  """`value` as an integer jax array; TypeError naming `name` otherwise, ValueError for
  concrete values int32 cannot hold (JAX would wrap an int64's, as x64 is off)."""
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be an integer array; got bool.{hint}")
  wide = hasattr(value, "dtype") and not np.can_cast(np.dtype(value.dtype), np.int32)
  if wide or isinstance(value, int):
    known = concrete(value)
    if (known is not None and known.size and np.issubdtype(known.dtype, np.integer)
        and not (int(known.min()) >= -2**31 and int(known.max()) < 2**31)):
      raise ValueError(f"{name} must fit int32; got values in [{known.min()}, {known.max()}].")
  try:
    arr = jnp.asarray(value)
  except (TypeError, OverflowError) as err:
    raise TypeError(f"{name} must be an integer array; got {type(value).__name__}.{hint}") from err
  if arr.dtype == jnp.bool_ or not jnp.issubdtype(arr.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array (int8, uint8, int16, uint16, int32); "
                    f"got dtype {arr.dtype}.{hint}")
  return arr


def dtype_of(value: Any) -> np.dtype:
  """The dtype of an array, tracer or Python / NumPy scalar, without reading its value."""
  return np.dtype(value.dtype) if hasattr(value, "dtype") else np.result_type(value)


def concrete(value: Any) -> np.ndarray | None:
  """The value as a NumPy array when it is known at trace time, else None (under jit/vmap).

  A tracer is never converted (np.asarray of one always raises, and the error's message
  describes where the value came from by scanning the trace so far: asked at every check of
  a traced model, that grew quadratically with its length).
  """
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(value)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def concrete_bool(value: Any) -> bool | None:
  """bool(value) when concrete, None when traced.

  A tracer without a concrete value (under jit) is answered without asking bool(), whose error
  message scans the trace (see `concrete`); a JVP tracer of a concrete value (eager grad)
  answers bool().
  """
  known = getattr(value, "to_concrete_value", None)
  if isinstance(value, jax.core.Tracer) and known is not None and known() is None:
    return None
  try:
    return bool(value)
  except jax.errors.ConcretizationTypeError:
    return None


def normalize_axis(axis: int, ndim: int, *, name: str = "spec.axis", shape: tuple = ()) -> int:
  """Map a possibly negative axis into [0, ndim); ValueError naming `name` when out of range."""
  if ndim == 0:
    raise ValueError(f"{name}={axis} needs an array with at least one axis; got a scalar "
                     f"(shape {tuple(shape)}). Use a per-tensor spec (axis=None) for it.")
  if not -ndim <= axis < ndim:
    raise ValueError(f"{name}={axis} is out of range for an array of rank {ndim} "
                     f"(shape {tuple(shape)}); accepted values are {-ndim}..{ndim - 1}.")
  return axis % ndim
