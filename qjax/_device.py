"""Host values onto the device without compiling.

`jnp.asarray` of a NumPy array compiles a small XLA program for each new shape and dtype
(~10-40 ms each on a CPU), and converting a model builds dozens of small host arrays of new
shapes. `put` casts host values in NumPy and transfers them with `jax.device_put`, which
compiles nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def put(value: Any, dtype: Any = None) -> jax.Array:
  """`jnp.asarray(value, dtype)`: the same array, dtype and (for host values) no compilation.

  NumPy arrays and scalars are cast in NumPy (to `dtype`, else to their canonical dtype:
  float64 -> float32, int64 -> int32 without x64) and transferred; jax arrays, tracers and
  Python scalars (weakly typed in jax) go through `jnp.asarray`.

  Example:
    >>> put(np.arange(3), jnp.int32)
    Array([0, 1, 2], dtype=int32)
  """
  if not isinstance(value, (np.ndarray, np.generic)):
    return jnp.asarray(value, dtype)
  target = jax.dtypes.canonicalize_dtype(value.dtype if dtype is None else np.dtype(dtype))
  return jax.device_put(np.asarray(value, target))
