"""Model size in bytes and a per-layer report (dtype, shape, bytes, scale, zero point, SQNR).

Works on the same pytrees as `qjax.io`: float Flax variables, the integer variables of
`qjax.convert`, dynamic-quantization trees (leaves: arrays and `QArray`s).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from qjax import qarray
from qjax.io import _path_str
from qjax.numerics import QuantSpec


def _leaf_nbytes(leaf: Any, path: tuple[Any, ...], packed: bool, where: str) -> int:
  if qarray.is_qarray(leaf):
    count = math.prod(leaf.qvalue.shape)
    values = (-(-count * qarray.packed_bits(leaf) // 8) if packed
              else count * jnp.dtype(leaf.qvalue.dtype).itemsize)
    return values + sum(_leaf_nbytes(getattr(leaf, n), path, False, where)
                        for n in ("scale", "zero_point"))
  if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
    raise TypeError(f"{where}: the leaf at {_path_str(path)} is a {type(leaf).__name__}, "
                    f"not an array or QArray.")
  return math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize


def _keys(key_path: tuple[Any, ...]) -> tuple[Any, ...]:
  """A jax key path as its plain keys: ("int8", "fc1", "kernel")."""
  out = []
  for k in key_path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
    else:
      out.append(str(k))
  return tuple(out)


def model_size(variables: Any, *, packed: bool = False) -> int:
  """Bytes of every array leaf of a variables pytree (arrays or `jax.ShapeDtypeStruct`s).

  In memory (`packed=False`, the default): size = sum over leaves of count * itemsize; a
  QArray counts its qvalue (one byte per value up to 8 bits, so 4-bit weights take a byte
  each) plus its float32 scale and int32 zero point (`QArray.nbytes`).

  In a file (`packed=True`): the same, except that a QArray's values take
  ceil(count * packed_bits / 8) bytes, with `qjax.qarray.packed_bits` the rule `qjax.io`
  stores them with: spec.bits bits per value for spec.bits <= 4, spec.bits - 1 when every
  value is odd (binary +-1: 1 bit), the storage dtype's width above 4 bits. Plain arrays
  count their itemsize either way (sub-byte dtypes such as int4 take a byte per value in
  memory and in files). Shape-only QArrays (`jax.eval_shape`) count spec.bits per value when
  spec.bits <= 4, an upper bound.

  A file written by `qjax.io.save` holds exactly these bytes plus its framing: the 20-byte
  header and the msgpack structure (keys, shapes, specs, dtype names and length prefixes),
  which depends on the tree's structure, not on its values, except that a packed qvalue node
  takes 6 more bytes than an array node would (5 for an unsigned spec, whose array node names
  the dtype "uint8"), less any bytes its shorter length prefix saves (a length prefix is 2, 3
  or 5 bytes for data under 256 bytes, under 64 KiB, or larger).

  Args:
    variables: a pytree of arrays, `jax.ShapeDtypeStruct`s and QArrays.
    packed: count QArray values as stored in files rather than in memory.

  Returns:
    The size in bytes.

  Raises:
    TypeError: a leaf that is not an array or QArray, naming its path.

  Example:
    >>> model_size({"w": jnp.zeros((10, 10), jnp.float16), "b": jnp.zeros(10, jnp.int32)})
    240
    >>> from qjax.qarray import QArray
    >>> w4 = QArray(jnp.zeros((3, 5), jnp.int8), jnp.float32(0.1), jnp.int32(0),
    ...             QuantSpec(bits=4, symmetric=True))
    >>> model_size(w4), model_size(w4, packed=True)  # 15 values + scale + zero point
    (23, 16)
  """
  leaves = jax.tree_util.tree_flatten_with_path(variables, is_leaf=qarray.is_qarray)[0]
  return sum(_leaf_nbytes(leaf, _keys(p), packed, "model_size") for p, leaf in leaves)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerRow:
  """One row of `layer_report`: an array, a QArray, or a {scale, zero_point} pair.

  Attributes:
    path: "/"-joined pytree path, e.g. "int8/fc1/kernel".
    kind: "qarray", "qparams" (a dict of exactly scale and zero_point arrays) or "array".
    dtype: storage dtype ("float32/int32" for a qparams pair).
    shape: the array's (or the scale's) shape.
    nbytes: bytes stored (`model_size` of the node).
    spec: the QArray's QuantSpec, else None.
    scale: (min, max) of the scale (equal when per-tensor), or None.
    zero_point: (min, max) of the zero point, or None.
    sqnr_db: 10 log10(sum w^2 / sum (w - w_hat)^2) in float64 against the float counterpart
      (inf when exact), or None when there is none.
    reference: "/"-joined path of the float counterpart, or None.
    reference_axes: the transpose applied to the float counterpart to align it, or None.
  """

  path: str
  kind: Literal["qarray", "qparams", "array"]
  dtype: str
  shape: tuple[int, ...]
  nbytes: int
  spec: QuantSpec | None = None
  scale: tuple[float, float] | None = None
  zero_point: tuple[int, int] | None = None
  sqnr_db: float | None = None
  reference: str | None = None
  reference_axes: tuple[int, ...] | None = None


def _is_qparams_pair(node: Any) -> bool:
  return (isinstance(node, Mapping) and set(node) == {"scale", "zero_point"}
          and all(hasattr(v, "dtype") and not qarray.is_qarray(v) for v in node.values()))


def _lookup(tree: Any, keys: tuple[Any, ...]) -> Any:
  for key in keys:
    if isinstance(tree, Mapping) and key in tree:
      tree = tree[key]
    elif isinstance(tree, (list, tuple)) and isinstance(key, int) and 0 <= key < len(tree):
      tree = tree[key]
    else:
      return None
  return tree


def _layouts(ndim: int) -> list[tuple[int, ...]]:
  """Axis orders that map a Flax kernel (..., in, out) onto the integer layouts in use."""
  identity = tuple(range(ndim))
  if ndim < 2:
    return [identity]
  candidates = [identity, identity[::-1],
                (ndim - 1, ndim - 2, *range(ndim - 2)),  # (out, in, *spatial): PyTorch's OIHW
                (ndim - 1, *range(ndim - 1))]            # (out, *spatial, in): TFLite's OHWI
  return list(dict.fromkeys(candidates))


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
  """10 log10(sum w^2 / sum (w - w_hat)^2) in float64; inf when exact, -inf for w = 0 != w_hat."""
  w, w_hat = np.asarray(reference, np.float64), np.asarray(approx, np.float64)
  noise = float(np.sum(np.square(w - w_hat)))
  signal = float(np.sum(np.square(w)))
  if noise == 0.0:
    return math.inf
  if signal == 0.0:
    return -math.inf
  return 10.0 * math.log10(signal / noise)


def _represented(leaf: Any) -> np.ndarray:
  """The real values a leaf stands for, in float64: S * (q - Z) for a QArray, exactly."""
  if not qarray.is_qarray(leaf):
    return np.asarray(leaf).astype(np.float64)
  q = np.asarray(leaf.qvalue).astype(np.float64)
  scale = np.asarray(leaf.scale).astype(np.float64)
  zero_point = np.asarray(leaf.zero_point).astype(np.float64)
  if leaf.spec.per_channel and q.ndim:
    axis = leaf.spec.axis % q.ndim
    bshape = [1] * q.ndim
    bshape[axis] = -1
    scale, zero_point = scale.reshape(bshape), zero_point.reshape(bshape)
  return scale * (q - zero_point)


def _best_reference(keys: tuple[Any, ...], leaf: Any, float_variables: Any
                    ) -> tuple[float | None, str | None, tuple[int, ...] | None]:
  """(sqnr_db, path, axes) of the best-aligned float counterpart of `leaf`, or Nones.

  Candidates: float_variables["params"][rest], float_variables[keys] and float_variables[rest],
  where keys = (collection, *rest); each transposed by every `_layouts` order that makes its
  shape equal the leaf's. A square kernel matches both (in, out) and (out, in), so the best
  SQNR over the matches is kept: the wrong orientation scores far lower.
  """
  approx = _represented(leaf)
  best: tuple[float | None, str | None, tuple[int, ...] | None] = (None, None, None)
  rest = keys[1:]
  # a converted op's kernel sits at converted/<layer>/op/kernel; its float one at <layer>/kernel
  layer = tuple(k for k in rest if k != "op")
  for ref_keys in dict.fromkeys((("params", *rest), keys, rest, ("params", *layer))):
    ref = _lookup(float_variables, ref_keys) if ref_keys else None
    if (ref is None or qarray.is_qarray(ref) or not hasattr(ref, "dtype")
        or not jnp.issubdtype(ref.dtype, jnp.floating) or np.ndim(ref) != approx.ndim):
      continue
    ref = np.asarray(ref)
    for axes in _layouts(ref.ndim):
      aligned = np.transpose(ref, axes)
      if aligned.shape == approx.shape:
        value = sqnr_db(aligned, approx)
        if best[0] is None or value > best[0]:
          best = (value, _path_str(ref_keys), axes)
  return best


def layer_report(int_variables: Any, float_variables: Any = None) -> list[LayerRow]:
  """One row per QArray, {scale, zero_point} pair and array of `int_variables`, in pytree order.

  With `float_variables` (Flax variables {"params": ...} or a params dict), each QArray and
  floating leaf at path (collection, *rest) is compared with its float counterpart (looked up
  as float_variables["params"][rest], then at the same path, then at rest): SQNR in dB of the
  represented values w_hat = S * (q - Z) (exact, float64) against w. Integer kernels stored
  output-channel first are matched by transposing the Flax kernel (..., in, out): to (out, in)
  for Dense, (out, in, *spatial) or (out, *spatial, in) for convolutions. Leaves with no
  counterpart of a matching shape get sqnr_db None.

  Example:
    >>> rows = layer_report({"params": {"w": jnp.zeros((2, 3), jnp.float16)}})
    >>> rows[0].path, rows[0].dtype, rows[0].nbytes
    ('params/w', 'float16', 12)
  """
  flat = jax.tree_util.tree_flatten_with_path(
      int_variables, is_leaf=lambda n: qarray.is_qarray(n) or _is_qparams_pair(n))[0]
  rows = []
  for key_path, leaf in flat:
    keys = _keys(key_path)
    parts = leaf.values() if isinstance(leaf, Mapping) else (leaf,)
    nbytes = sum(_leaf_nbytes(v, keys, False, "layer_report") for v in parts)
    common: dict[str, Any] = {"path": _path_str(keys), "nbytes": nbytes}
    if isinstance(leaf, Mapping):
      scale, zero_point = np.asarray(leaf["scale"]), np.asarray(leaf["zero_point"])
      rows.append(LayerRow(kind="qparams", dtype=f"{scale.dtype}/{zero_point.dtype}",
                           shape=scale.shape, scale=(float(scale.min()), float(scale.max())),
                           zero_point=(int(zero_point.min()), int(zero_point.max())), **common))
      continue
    sqnr = ref = axes = None
    if float_variables is not None and (qarray.is_qarray(leaf)
                                        or jnp.issubdtype(leaf.dtype, jnp.floating)):
      sqnr, ref, axes = _best_reference(keys, leaf, float_variables)
    if qarray.is_qarray(leaf):
      scale, zero_point = np.asarray(leaf.scale), np.asarray(leaf.zero_point)
      rows.append(LayerRow(kind="qarray", dtype=jnp.dtype(leaf.dtype).name, shape=leaf.shape,
                           spec=leaf.spec, scale=(float(scale.min()), float(scale.max())),
                           zero_point=(int(zero_point.min()), int(zero_point.max())),
                           sqnr_db=sqnr, reference=ref, reference_axes=axes, **common))
    else:
      rows.append(LayerRow(kind="array", dtype=jnp.dtype(leaf.dtype).name,
                           shape=tuple(leaf.shape), sqnr_db=sqnr, reference=ref,
                           reference_axes=axes, **common))
  return rows


def _spec_text(spec: QuantSpec | None) -> str:
  if spec is None:
    return "-"
  parts = [f"{'int' if spec.signed else 'uint'}{spec.bits}",
           "sym" if spec.symmetric else "affine"]
  parts += [flag for flag in ("narrow_range", "reduce_range") if getattr(spec, flag)]
  parts.append(f"axis={spec.axis}" if spec.per_channel else "per-tensor")
  return " ".join(parts)


def _range_text(bounds: tuple[float, float] | None, fmt: str) -> str:
  if bounds is None:
    return "-"
  low, high = bounds
  return format(low, fmt) if low == high else f"{low:{fmt}}..{high:{fmt}}"


def format_report(rows: list[LayerRow]) -> str:
  """An aligned text table of `layer_report` rows, with a total line.

  Example:
    >>> print(format_report(layer_report({"b": jnp.zeros(4, jnp.int32)})))
    path   dtype  shape  bytes  spec  scale  zero point  SQNR dB
    b      int32  (4,)      16  -     -      -           -
    total                   16
  """
  header = ("path", "dtype", "shape", "bytes", "spec", "scale", "zero point", "SQNR dB")
  table = [header]
  for row in rows:
    sqnr = "-" if row.sqnr_db is None else f"{row.sqnr_db:.2f}"
    table.append((row.path, row.dtype, str(tuple(row.shape)), str(row.nbytes),
                  _spec_text(row.spec), _range_text(row.scale, ".4g"),
                  _range_text(row.zero_point, "d"), sqnr))
  table.append(("total", "", "", str(sum(r.nbytes for r in rows)), "", "", "", ""))
  widths = [max(len(r[i]) for r in table) for i in range(len(header))]
  lines = []
  for r in table:
    cells = [cell.rjust(w) if i == 3 else cell.ljust(w) for i, (cell, w) in
             enumerate(zip(r, widths, strict=True))]
    lines.append("  ".join(cells).rstrip())
  return "\n".join(lines)
