"""Half-precision casts of a variables pytree (PyTorch's `model.half()`): `cast_floats` and
`half`.

Integer-path variables are never cast: the typed ops that `qjax.convert` returns (int8
kernels, float32 scales, requantization multipliers and biases, int32 offsets) are the
converted model's arithmetic, fixed bit for bit, and a QArray keeps its float32 scale wherever
it sits. Only the float leaves outside them change.

Casting rounds each value to nearest in the target format, ties to even (IEEE 754's default,
what XLA's convert and NumPy's `astype` do), so `cast_floats(v, d)[p] == v[p].astype(d)` bit
for bit. Values too large for the format would become +-inf (float16: |x| >= 65520, the
midpoint above the largest finite 65504; bfloat16: |x| >= 2^128 * (1 - 2^-9), about 3.40e38)
and that is refused with the leaf's path; values below the smallest subnormal (float16:
|x| < 2^-25) become +-0, as any rounding does. NaN and +-inf stay what they are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax import _checks
from qjax import _struct
from qjax import qarray

CAST_DTYPES = ("float16", "bfloat16", "float32")
"""Target dtypes of `cast_floats`."""


def _path_str(path: tuple[Any, ...]) -> str:
  """A pytree key path as "a/b/0", the form the Flax layers use in errors."""
  return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def _target_dtype(dtype: Any) -> np.dtype:
  try:
    target = jnp.dtype(dtype)
  except TypeError as err:
    raise TypeError(f"cast_floats: dtype must be one of {', '.join(CAST_DTYPES)}; "
                    f"got {dtype!r}.") from err
  if target.name not in CAST_DTYPES:
    raise ValueError(f"cast_floats: dtype must be one of {', '.join(CAST_DTYPES)}; got "
                     f"{target.name}. Integer formats go through qjax.quantize_array.")
  return target


def _cast_leaf(path: tuple[Any, ...], leaf: Any, target: np.dtype) -> Any:
  if qarray.is_qarray(leaf):
    return leaf  # its scale stays float32: that is part of the QArray invariant
  if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
    raise TypeError(f"cast_floats: every leaf must be an array or a QArray; the leaf at "
                    f"{_path_str(path)} is a {type(leaf).__name__}. Wrap Python numbers with "
                    f"jnp.asarray(value, dtype=...).")
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    return leaf
  # NumPy leaves stay NumPy: jnp.asarray would first round float64 to float32 (without x64),
  # and that double rounding can differ from one rounding straight to the target.
  if isinstance(leaf, np.ndarray | np.generic):
    with np.errstate(over="ignore"):  # overflow is reported below, with the path
      out = np.asarray(leaf).astype(target)
  else:
    out = leaf.astype(target)
  before, after = _checks.concrete(leaf), _checks.concrete(out)
  if before is not None and after is not None:
    overflow = np.isfinite(before) & ~np.isfinite(after)
    if np.any(overflow):
      biggest = float(np.max(np.abs(before[overflow].astype(np.float64))))
      raise ValueError(
          f"cast_floats: {int(overflow.sum())} finite value(s) of the leaf at "
          f"{_path_str(path)} ({leaf.dtype}, shape {tuple(leaf.shape)}) would become inf in "
          f"{target.name} (largest |x| = {biggest:.6g}; the largest finite {target.name} is "
          f"{float(jnp.finfo(target).max):.6g}). Keep this leaf in float32 or rescale it.")
  return out


def _kept(node: Any) -> bool:
  """QArrays and typed integer ops are kept whole."""
  return qarray.is_qarray(node) or _struct.is_struct(node)


def cast_floats(variables: Any, dtype: Any) -> Any:
  """Cast every floating-point leaf of a pytree to `dtype`; integers, QArrays and integer ops
  unchanged.

  The typed ops of `qjax.convert` / `for_serving` (their float32 scales and requantization
  multipliers define the integer arithmetic) and QArrays (their scale stays float32) are
  returned as they are, the same objects. The float leaves of other collections (e.g. the
  "params" of layers left in float by `convert`) are cast.

  Each value is rounded to nearest, ties to even, in the target format (see the module
  docstring), exactly `leaf.astype(dtype)`. jax arrays stay jax arrays and NumPy arrays stay
  NumPy arrays. The overflow check reads values, so it runs on concrete leaves (eager calls);
  under `jax.jit` an overflowing value becomes inf.

  To run a Flax model on the cast params, make the computation dtype explicit:
  `nn.Dense(..., dtype=jnp.float16)` (or inputs cast to float16) computes in float16 (XLA:CPU
  accumulates the dot in float32 and rounds the result); `dtype=jnp.float32` computes in
  float32 with the float16-rounded weights (weights-only compression). With the default
  `dtype=None` Flax promotes inputs and params to a common dtype: float32 inputs and bfloat16
  params compute in float32 under standard promotion, and raise a TypePromotionError under
  `jax_numpy_dtype_promotion="strict"`.

  Args:
    variables: any pytree (nested dicts / lists / tuples) of arrays and QArrays, e.g. a Flax
      variables dict or the output of `qjax.convert`.
    dtype: one of "float16", "bfloat16", "float32" (names or dtypes).

  Returns:
    A pytree of the same structure; integer ops and QArrays pass through.

  Raises:
    TypeError: a dtype that is not a dtype, or a leaf that is neither an array nor a QArray.
    ValueError: a dtype outside CAST_DTYPES, or a finite value that would become +-inf,
      naming its pytree path.

  Example:
    >>> cast_floats({"dense": {"kernel": jnp.array([1.0, 0.1])}}, "bfloat16")["dense"]["kernel"]
    Array([1, 0.100098], dtype=bfloat16)
    >>> v = {"dense": {"kernel": jnp.array([1.0, 70000.0]), "count": jnp.int32(3)}}
    >>> cast_floats(v, jnp.float16)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: cast_floats: 1 finite value(s) of the leaf at dense/kernel ... would become inf ...
    >>> from qjax.integer import FloatRequant
    >>> op = FloatRequant(multiplier=jnp.array([0.1]), zero_point=jnp.int32(0), lo=-128,
    ...                   hi=127, relu=False)
    >>> out = cast_floats({"converted": {"fc": {"op": op}},
    ...                    "params": {"head": {"kernel": jnp.array([0.1])}}}, "float16")
    >>> out["converted"]["fc"]["op"].multiplier.dtype, out["params"]["head"]["kernel"].dtype
    (dtype('float32'), dtype('float16'))
  """
  target = _target_dtype(dtype)

  def cast(path, leaf):
    if _struct.is_struct(leaf):
      return leaf
    return _cast_leaf(path, leaf, target)

  return jax.tree_util.tree_map_with_path(cast, variables, is_leaf=_kept)


def half(variables: Any) -> Any:
  """`cast_floats(variables, jnp.float16)`: PyTorch's `model.half()` for a variables pytree.

  Every floating leaf is rounded to nearest-even float16 (11 significant bits, finite range
  +-65504); a value that would overflow raises with its path. Converted integer ops and
  QArrays pass through unchanged, as in `cast_floats`.

  Example:
    >>> half({"params": {"w": jnp.array([0.1, 2.0]), "steps": jnp.int32(4)}})["params"]["w"]
    Array([0.1, 2. ], dtype=float16)
  """
  return cast_floats(variables, jnp.float16)
