"""Save and load variables pytrees without pickle (sizes and the per-layer report: qjax.report).

Works on any pytree of nested dicts (str or int keys), lists, tuples and None whose leaves are
arrays (jax or NumPy, any numeric dtype including bfloat16, float8 and int4) and `QArray`s:
float Flax variables, the integer variables of `qjax.convert`, dynamic-quantization trees.

File format, version 1 (integers little-endian):

  offset  size  field
  0       4     magic b"QJAX"
  4       4     format version (uint32)
  8       8     payload length in bytes (uint64)
  16      4     CRC-32 (zlib) of the payload (uint32)
  20      n     payload: flax.serialization msgpack of {"tree": node}

where a node is a one-key map:

  {"dict": [[key, node], ...]}    insertion order kept
  {"list": [node, ...]}, {"tuple": [node, ...]}, {"none": None}
  {"array": {"dtype": name, "shape": [...], "data": [bytes, ...]}}
      C order, little-endian, in chunks of at most 1 GiB (msgpack's per-object limit)
  {"qarray": {"spec": {every QuantSpec field}, "qvalue": array, "scale": array,
              "zero_point": array}}

Loading runs no code from the file: it reads only msgpack data, resolves dtype names through
an allowlist, and rebuilds each QArray through its validator. The length and checksum in the
header tell a truncated file from a corrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import sys
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from qjax import qarray
from qjax.numerics import QuantSpec
from qjax.qarray import QArray

MAGIC = b"QJAX"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sIQI")
_CHUNK_BYTES = 2**30
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec))
_DTYPE_NAMES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "bfloat16", "int4", "uint4",
    "int2", "uint2", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "float8_e4m3b11fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float4_e2m1fn")


def _resolvable(name: str) -> bool:
  try:
    return jnp.dtype(name).name == name
  except TypeError:
    return False


STORABLE_DTYPES: frozenset[str] = frozenset(n for n in _DTYPE_NAMES if _resolvable(n))
"""Names of the dtypes an array leaf may have (those this JAX / ml_dtypes knows)."""


class _Malformed(Exception):
  """A payload that decodes but does not describe a variables tree (path, message)."""

  def __init__(self, path: tuple[Any, ...], message: str):
    super().__init__(message)
    self.path, self.message = path, message


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(k) for k in path) or "<root>"


def _describe(node: Any) -> str:
  """A short description of a node or leaf for error messages: "int8[100, 784]"."""
  if qarray.is_qarray(node):
    return f"QArray({_describe(node.qvalue)}, {node.spec})"
  if isinstance(node, Mapping):
    return f"a dict with keys {list(node)}"
  if isinstance(node, (list, tuple)):
    return f"a {type(node).__name__} of length {len(node)}"
  if node is None:
    return "None"
  if hasattr(node, "shape") and hasattr(node, "dtype"):
    return f"{jnp.dtype(node.dtype).name}{list(node.shape)}"
  return type(node).__name__


# ------------------------------------------------------------------------------------------
# Encoding.


def _encode_array(x: Any, path: tuple[Any, ...]) -> dict:
  arr = np.asarray(x)
  if arr.dtype.name not in STORABLE_DTYPES:
    raise TypeError(f"qjax.io: the array at {_path_str(path)} has dtype {arr.dtype}, which "
                    f"cannot be stored; accepted dtypes: {', '.join(sorted(STORABLE_DTYPES))}.")
  if not arr.dtype.isnative:
    arr = arr.astype(arr.dtype.newbyteorder("="))
  if sys.byteorder == "big":
    arr = arr.byteswap()
  data = np.ascontiguousarray(arr).tobytes()
  chunks = [data[i:i + _CHUNK_BYTES] for i in range(0, len(data), _CHUNK_BYTES)] or [b""]
  return {"array": {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": chunks}}


def _encode(node: Any, path: tuple[Any, ...]) -> dict:
  if qarray.is_qarray(node):
    return {"qarray": {
        "spec": {name: getattr(node.spec, name) for name in _SPEC_FIELDS},
        **{name: _encode_array(getattr(node, name), path + (name,))
           for name in ("qvalue", "scale", "zero_point")}}}
  if isinstance(node, Mapping):
    for key in node:
      if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"qjax.io: dict keys must be str or int; the dict at {_path_str(path)} "
                        f"has the key {key!r} of type {type(key).__name__}.")
    return {"dict": [[key, _encode(value, path + (key,))] for key, value in node.items()]}
  if node is None:
    return {"none": None}
  if isinstance(node, tuple) and hasattr(node, "_fields"):
    raise TypeError(f"qjax.io: the {type(node).__name__} at {_path_str(path)} is a NamedTuple, "
                    f"which would come back as a plain tuple; store node._asdict() instead.")
  if isinstance(node, (list, tuple)):
    return {type(node).__name__: [_encode(v, path + (i,)) for i, v in enumerate(node)]}
  if isinstance(node, (jax.Array, np.ndarray, np.generic)):
    return _encode_array(node, path)
  raise TypeError(f"qjax.io: the leaf at {_path_str(path)} is a {type(node).__name__}; a "
                  f"variables tree holds dicts, lists, tuples and None with array or QArray "
                  f"leaves. Wrap Python numbers with np.asarray(value, dtype=...).")


def to_bytes(variables: Any) -> bytes:
  """Serialize a variables pytree to bytes (header + msgpack payload; see the module docstring).

  Every value is stored bit for bit with its dtype and shape; QArrays keep every QuantSpec field.

  Raises:
    TypeError: a leaf that is not an array or QArray, a dtype outside STORABLE_DTYPES, a
      NamedTuple node or a dict key that is not str / int, naming its pytree path.

  Example:
    >>> tree = {"fc": {"kernel": jnp.ones((2, 3), jnp.bfloat16), "steps": jnp.int32(7)}}
    >>> restored = from_bytes(to_bytes(tree))
    >>> restored["fc"]["kernel"].dtype, int(restored["fc"]["steps"])
    (dtype(bfloat16), 7)
  """
  payload = serialization.msgpack_serialize({"tree": _encode(variables, ())}, in_place=True)
  header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload))
  return header + payload


def save(path: str | os.PathLike, variables: Any) -> None:
  """Write `to_bytes(variables)` to `path`, atomically (a temporary file, then a rename).

  A crash while writing leaves the old file, if any, in place instead of a truncated one.
  """
  data = to_bytes(variables)
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ------------------------------------------------------------------------------------------
# Decoding.


def _expect(condition: bool, path: tuple[Any, ...], message: str) -> None:
  if not condition:
    raise _Malformed(path, message)


def _decode_array(node: Any, path: tuple[Any, ...], as_numpy: bool) -> Any:
  _expect(isinstance(node, dict) and set(node) == {"array"}, path,
          f"expected an array node, found {str(node)[:80]}")
  body = node["array"]
  _expect(isinstance(body, dict) and set(body) == {"dtype", "shape", "data"}, path,
          "an array node needs exactly the fields dtype, shape and data")
  name, shape, chunks = body["dtype"], body["shape"], body["data"]
  _expect(name in STORABLE_DTYPES, path, f"unknown dtype {name!r}")
  _expect(isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape), path,
          f"bad shape {shape!r}")
  _expect(isinstance(chunks, list) and all(isinstance(c, bytes) for c in chunks), path,
          "array data must be a list of bytes")
  dtype = jnp.dtype(name)
  data = b"".join(chunks)
  expected = math.prod(shape) * dtype.itemsize
  _expect(len(data) == expected, path, f"{name}{shape} needs {expected} bytes, found {len(data)}")
  arr = np.frombuffer(data, dtype=dtype).reshape(shape)
  if sys.byteorder == "big":
    arr = arr.byteswap()
  if as_numpy:
    return arr.copy()
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:
    raise ValueError(f"the array at {_path_str(path)} is {name}, which JAX turns into "
                     f"{jax.dtypes.canonicalize_dtype(dtype)} while jax_enable_x64 is off; "
                     f"enable it, or load with as_numpy=True to keep the exact values.")
  return jnp.asarray(arr)


def _decode(node: Any, path: tuple[Any, ...], as_numpy: bool) -> Any:
  _expect(isinstance(node, dict) and len(node) == 1, path,
          f"expected a one-key node map, found {str(node)[:80]}")
  (tag, body), = node.items()
  if tag == "array":
    return _decode_array(node, path, as_numpy)
  if tag == "none":
    return None
  if tag in ("list", "tuple"):
    _expect(isinstance(body, list), path, f"a {tag} node must hold a list")
    items = [_decode(v, path + (i,), as_numpy) for i, v in enumerate(body)]
    return items if tag == "list" else tuple(items)
  if tag == "dict":
    _expect(isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body),
            path, "a dict node must hold [key, node] pairs")
    out = {}
    for key, value in body:
      _expect(isinstance(key, (str, int)) and key not in out, path, f"bad or repeated key {key!r}")
      out[key] = _decode(value, path + (key,), as_numpy)
    return out
  if tag == "qarray":
    _expect(isinstance(body, dict) and set(body) == {"spec", "qvalue", "scale", "zero_point"},
            path, "a qarray node needs exactly spec, qvalue, scale and zero_point")
    fields = body["spec"]
    _expect(isinstance(fields, dict) and set(fields) == set(_SPEC_FIELDS), path,
            f"the QuantSpec must have the fields {list(_SPEC_FIELDS)}, found {fields!r}")
    try:
      spec = QuantSpec(**fields)
      leaves = {n: _decode_array(body[n], path + (n,), as_numpy)
                for n in ("qvalue", "scale", "zero_point")}
      return QArray(**leaves, spec=spec)
    except (TypeError, ValueError) as err:
      raise _Malformed(path, f"the stored QArray is invalid: {err}") from err
  raise _Malformed(path, f"unknown node type {tag!r}")


def _check_matches(target: Any, found: Any, path: tuple[Any, ...]) -> None:
  """Raise _Malformed at the first place where `found` differs from `target` in structure,
  QuantSpec, shape or dtype (depth first, in the target's key order)."""
  mismatch = _Malformed(path, f"expected {_describe(target)}, found {_describe(found)}")
  if qarray.is_qarray(target):
    if not qarray.is_qarray(found) or found.spec != target.spec:
      raise mismatch
    for name in ("qvalue", "scale", "zero_point"):
      _check_matches(getattr(target, name), getattr(found, name), path + (name,))
  elif isinstance(target, Mapping):
    if not isinstance(found, Mapping):
      raise mismatch
    missing = [k for k in target if k not in found]
    extra = [k for k in found if k not in target]
    if missing or extra:
      raise _Malformed(path, f"expected keys {list(target)}, found {list(found)} (missing "
                       f"{missing}, unexpected {extra})")
    for key in target:
      _check_matches(target[key], found[key], path + (key,))
  elif target is None or isinstance(target, (list, tuple)):
    if type(found) is not type(target) or (target is not None and len(found) != len(target)):
      raise mismatch
    for i, (t, f) in enumerate(zip(target or (), found or ())):
      _check_matches(t, f, path + (i,))
  elif hasattr(target, "shape") and hasattr(target, "dtype"):
    if (qarray.is_qarray(found) or not hasattr(found, "shape")
        or tuple(found.shape) != tuple(target.shape) or found.dtype != target.dtype):
      raise mismatch
  else:
    raise TypeError(f"qjax.io: the target's leaf at {_path_str(path)} is a "
                    f"{type(target).__name__}; use arrays, jax.ShapeDtypeStruct or QArrays.")


def from_bytes(data: bytes, target: Any = None, *, as_numpy: bool = False,
               name: str = "<bytes>") -> Any:
  """Rebuild the variables pytree serialized by `to_bytes`.

  Args:
    data: the bytes.
    target: optional pytree of the expected structure (arrays, `jax.ShapeDtypeStruct`s or
      QArrays); the result must match it in structure, QuantSpecs, shapes and dtypes.
    as_numpy: return NumPy leaves (writable copies) instead of jax arrays; needed for 64-bit
      leaves while jax_enable_x64 is off.
    name: what to call the data in error messages (`load` passes the file name).

  Returns:
    The pytree with plain dicts, lists and tuples, QArrays rebuilt with their validator.

  Raises:
    ValueError: naming `name`, for bad magic, a truncated or over-long file, a format version
      other than FORMAT_VERSION, a checksum mismatch, a malformed payload, or a mismatch with
      `target` (naming the first differing pytree path, expected vs found).
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"{name}: from_bytes expects bytes; got {type(data).__name__}.")
  data = bytes(data)
  if data[:len(MAGIC)] != MAGIC:
    if MAGIC.startswith(data):
      raise ValueError(f"{name}: truncated: {len(data)} byte(s), less than the "
                       f"{_HEADER.size}-byte qjax header.")
    raise ValueError(f"{name}: not a qjax variables file: it starts with {data[:8]!r}, "
                     f"expected the magic {MAGIC!r}.")
  if len(data) < _HEADER.size:
    raise ValueError(f"{name}: truncated: {len(data)} bytes, less than the {_HEADER.size}-byte "
                     f"qjax header.")
  _, version, length, crc = _HEADER.unpack_from(data)
  if version != FORMAT_VERSION:
    hint = ("written by a newer qjax; upgrade qjax to read it" if version > FORMAT_VERSION
            else "no qjax writes this version; the file is corrupt")
    raise ValueError(f"{name}: unsupported format version {version}: this qjax reads version "
                     f"{FORMAT_VERSION} ({hint}).")
  payload = data[_HEADER.size:]
  if len(payload) < length:
    raise ValueError(f"{name}: truncated: the header announces {length} payload bytes, found "
                     f"{len(payload)} (an interrupted write or copy?).")
  if len(payload) > length:
    raise ValueError(f"{name}: corrupt: {len(payload) - length} unexpected bytes after the "
                     f"{length}-byte payload.")
  if zlib.crc32(payload) != crc:
    raise ValueError(f"{name}: corrupt: the payload's CRC-32 is {zlib.crc32(payload):#010x}, "
                     f"the header expects {crc:#010x}.")
  try:
    # The checksum passed, so this fails only for files written by a buggy or foreign writer;
    # msgpack signals bad input with several exception types.
    decoded = serialization.msgpack_restore(payload)
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(f"{name}: corrupt: the payload is not valid msgpack ({err}).") from err
  try:
    _expect(isinstance(decoded, dict) and set(decoded) == {"tree"}, (),
            "the payload must be a map with the single key 'tree'")
    tree = _decode(decoded["tree"], (), as_numpy)
  except _Malformed as err:
    raise ValueError(f"{name}: malformed payload at {_path_str(err.path)}: {err.message}.") from err
  except ValueError as err:
    raise ValueError(f"{name}: {err}") from err
  if target is not None:
    try:
      _check_matches(target, tree, ())
    except _Malformed as err:
      raise ValueError(f"{name}: does not match the target at {_path_str(err.path)}: "
                       f"{err.message}.") from err
  return tree


def load(path: str | os.PathLike, target: Any = None, *, as_numpy: bool = False) -> Any:
  """Read a file written by `save`; `from_bytes` with the file name in every error."""
  with open(path, "rb") as f:
    data = f.read()
  return from_bytes(data, target, as_numpy=as_numpy, name=os.fspath(path))
