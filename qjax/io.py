"""Save and load variables pytrees without pickle (sizes and the per-layer report: qjax.report).

Works on any pytree of nested dicts (str or int keys), lists, tuples, None and structs (the
typed pytrees of `qjax._struct`, such as the integer path's `Int8Dense` or `FbgemmRequant`)
whose leaves are arrays (jax or NumPy, any numeric dtype including bfloat16, float8 and int4)
and `QArray`s: float Flax variables, the integer variables of `qjax.convert`,
dynamic-quantization trees. A struct's static fields may be None, bools, ints (64-bit), floats,
strings, `QuantSpec`s and tuples or lists of those. Dicts, lists, tuples and structs nest at
most `MAX_DEPTH` levels deep.

File format, version 2 (integers little-endian):

  offset  size  field
  0       4     magic b"QJAX"
  4       4     format version (uint32)
  8       8     payload length in bytes (uint64)
  16      4     CRC-32 (zlib) of bytes 0-15 followed by the payload (uint32)
  20      n     payload: msgpack of {"tree": node}

where a node is a one-key map:

  {"dict": [[key, node], ...]}    insertion order kept
  {"list": [node, ...]}, {"tuple": [node, ...]}, {"none": None}
  {"array": {"dtype": name, "shape": [...], "data": [bytes, ...]}}
      C order, little-endian, in chunks of at most 1 GiB (msgpack's per-object limit)
  {"qarray": {"spec": {every QuantSpec field}, "qvalue": array or packed, "scale": array,
              "zero_point": array}}
  {"packed": {"bits": b, "odd": bool, "low": int, "shape": [...], "data": [bytes, ...]}}
      a QArray's qvalue when spec.bits <= 4 (`qjax.qarray.packed_form`), and only there: the
      n = prod(shape) values q = low + step * v (step 2 when odd, else 1; C order) as a dense
      little-endian bit stream of the v in [0, 2^b - 1] (bit j of v_i is bit (i * b + j) % 8
      of byte (i * b + j) // 8), ceil(n * b / 8) bytes with zero padding bits, in chunks of
      at most 1 GiB. b = spec.bits and low = qmin, or, when every value is odd, b =
      spec.bits - 1 and low = the smallest odd level of [qmin, qmax]; loading rebuilds the
      ordinary qvalue array (dtype spec.storage_dtype)
  {"struct": {"type": registered name, "static": {field: static, ...},
              "children": {field: node, ...}}}
      every field of the class, in its declaration order; a static value is nil, a bool, an
      int, a float or a str as itself, or a one-key map {"tuple": [static, ...]},
      {"list": [static, ...]} or {"quantspec": {every QuantSpec field}}

Struct and packed nodes were added within version 2 (files without them are unchanged): a
qjax that predates them reports an unknown node type "struct", or expects an array node where
a packed one is. QArrays of more than 4 bits are stored as before (an array node); files
written before packed nodes, with every qvalue as an array node, still load.

The checksum covers the header fields as well as the payload, so a damaged version or length
field reads as corruption. Later format versions keep these 20 header bytes and this checksum:
a higher version with an intact checksum is a file from a newer qjax, one with a wrong checksum
is a damaged header. Version 1 files (the same layout, with a CRC-32 of the payload alone) are
still read.

Loading runs no code from the file: it reads only plain msgpack data (no extension types),
resolves dtype names through an allowlist, rebuilds each QArray through its validator and
each struct through the constructor of the class registered under its name (importing
`qjax.integer` first, so that its types are registered), with exactly the class's fields.
Every malformed file gives a ValueError naming the file and the problem; the length and
checksum tell a truncated file from a corrupted one. Loading takes time and memory linear in
the file size: error messages describe the offending node by its type and size, never by
formatting its contents.

`save` writes a temporary file in the target's directory (unique per process and thread),
fsyncs it, renames it over the target and fsyncs the directory: a crash leaves either the old
file or the new one, and a failed save removes its temporary file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import secrets
import struct
import sys
import threading
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import msgpack
import numpy as np

from qjax import _struct
from qjax import qarray
from qjax.numerics import QuantSpec
from qjax.qarray import QArray

MAGIC = b"QJAX"
FORMAT_VERSION = 2
MAX_DEPTH = 256
"""Most levels of nested dicts, lists, tuples and structs a stored tree may have (a struct's
static tuples and lists count too). (msgpack itself nests at most 1024 of its containers,
three per dict or struct level: about 340 levels.)"""

_HEADER = struct.Struct("<4sIQI")
_CRC_OFFSET = 16  # the checksum covers header bytes [0, 16) and the payload
_CHUNK_BYTES = 2**30
_MAX_NDIM = 64  # NumPy's limit
_MAX_LISTED = 10  # keys listed in an error message
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec))
_STATIC_KINDS = "None, bool, int, float, str, QuantSpec, or tuples or lists of those"
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


class _Malformed(Exception):  # noqa: N818 (private; surfaces as a ValueError)
  """A payload that decodes but does not describe a variables tree (path, message)."""

  def __init__(self, path: tuple[Any, ...], message: str):
    super().__init__(message)
    self.path, self.message = path, message


# ------------------------------------------------------------------------------------------
# Bounded descriptions for error messages: their cost never depends on the size of the data.


def _clip(text: str, limit: int = 40) -> str:
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _short_repr(value: Any) -> str:
  """repr() of a key or scalar, clipped; a description for anything else."""
  if isinstance(value, str):
    return repr(value) if len(value) <= 40 else repr(value[:37]) + "..."
  if value is None or isinstance(value, (bool, int, float)):
    return _clip(repr(value))
  if isinstance(value, (dict, list, bytes, bytearray)):
    return _preview(value)
  return _clip(repr(value), 60)


def _list_str(items: Any) -> str:
  """Like str(list(items)) for at most _MAX_LISTED items: "['a', 'b', ... (3 more)]"."""
  items = list(items)
  shown = ", ".join(_short_repr(item) for item in items[:_MAX_LISTED])
  more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
  return f"[{shown}{more}]"


def _path_str(path: tuple[Any, ...]) -> str:
  """The pytree path as "fc/kernel"; a long one keeps its first 8 and last 3 keys."""
  if not path:
    return "<root>"
  parts = [_clip(str(k)) for k in (path if len(path) <= 12 else path[:8] + path[-3:])]
  if len(path) > 12:
    parts.insert(8, f"...({len(path) - 11} more)...")
  return "/".join(parts)


def _preview(value: Any) -> str:
  """A short description of a decoded msgpack value: "a map with keys ['array']"."""
  if isinstance(value, dict):
    return f"a map with keys {_list_str(value)}"
  if isinstance(value, list):
    return f"a list of length {len(value)}"
  if isinstance(value, (bytes, bytearray)):
    return f"{len(value)} bytes"
  if isinstance(value, str) or value is None or isinstance(value, (bool, int, float)):
    return _short_repr(value)
  return f"a {type(value).__name__}"


def _static_str(value: Any, depth: int = 0) -> str:
  """A static field's value for error messages: repr-like, bounded in length and depth."""
  if isinstance(value, (list, tuple)):
    if depth >= 3:
      return "(...)" if isinstance(value, tuple) else "[...]"
    items = [_static_str(v, depth + 1) for v in value[:_MAX_LISTED]]
    if len(value) > _MAX_LISTED:
      items.append(f"... ({len(value) - _MAX_LISTED} more)")
    if isinstance(value, tuple):
      return f"({', '.join(items)}{',' if len(value) == 1 else ''})"
    return f"[{', '.join(items)}]"
  if isinstance(value, QuantSpec):
    return _clip(repr(value), 120)
  return _short_repr(value)


def _describe_struct(node: Any) -> str:
  """ "Int8Conv(strides=(1, 1), padding='SAME', ...)": the type and its static fields."""
  _, statics = _struct.split_fields(node)
  shown = [f"{k}={_static_str(v)}" for k, v in list(statics.items())[:_MAX_LISTED]]
  if len(statics) > _MAX_LISTED:
    shown.append(f"... ({len(statics) - _MAX_LISTED} more)")
  return f"{type(node).__name__}({', '.join(shown)})"


def _describe(node: Any) -> str:
  """A short description of a node or leaf for error messages: "int8[100, 784]"."""
  if qarray.is_qarray(node):
    return f"QArray({_describe(node.qvalue)}, {node.spec})"
  if _struct.is_struct(node):
    return f"a struct {_describe_struct(node)}"
  if isinstance(node, Mapping):
    return f"a dict with keys {_list_str(node)}"
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
  # A byte view of the C-ordered data: msgpack copies it into the payload once.
  # (numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only.)
  data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
  chunks: list[memoryview | bytes] = [data[i:i + _CHUNK_BYTES]
                                      for i in range(0, len(data), _CHUNK_BYTES)] or [b""]
  return {"array": {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": chunks}}


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
  """The little-endian bit stream of `values` (uint8, each < 2^bits, bits in 1..4):
  ceil(n * bits / 8) uint8, zero padding bits. Groups of 8 values make `bits` bytes."""
  n = values.size
  groups = -(-n // 8)
  flat = np.zeros(groups * 8, np.uint8)
  flat[:n] = values.reshape(-1)
  padded = flat.reshape(groups, 8)
  words = np.zeros(groups, np.uint32)  # 8 values of at most 4 bits: 32 bits
  for j in range(8):
    words |= padded[:, j].astype(np.uint32) << np.uint32(bits * j)
  out = np.empty((groups, bits), np.uint8)
  for k in range(bits):
    out[:, k] = (words >> np.uint32(8 * k)).astype(np.uint8)
  return out.reshape(-1)[:-(-n * bits // 8)]


def _unpack(data: np.ndarray, bits: int, n: int) -> tuple[np.ndarray, bool]:
  """The n values (uint8) of a bit stream written by `_pack`, and whether its padding bits
  are all zero. `data` holds ceil(n * bits / 8) bytes."""
  groups = -(-n // 8)
  flat = np.zeros(groups * bits, np.uint8)
  flat[:data.size] = data
  padded = flat.reshape(groups, bits)
  words = np.zeros(groups, np.uint32)
  for k in range(bits):
    words |= padded[:, k].astype(np.uint32) << np.uint32(8 * k)
  out = np.empty((groups, 8), np.uint8)
  mask = np.uint32(2**bits - 1)
  for j in range(8):
    out[:, j] = ((words >> np.uint32(bits * j)) & mask).astype(np.uint8)
  values = out.reshape(-1)
  return values[:n], not np.any(values[n:])


def _encode_packed(values: np.ndarray, form: qarray.PackedForm) -> dict:
  flat = values.reshape(-1)
  # q - low lies in [0, 15]: no overflow in the (u)int8 storage dtype
  offsets = np.subtract(flat, flat.dtype.type(form.low), dtype=flat.dtype)
  if form.odd:
    offsets >>= 1
  stream = _pack(offsets.view(np.uint8), form.bits)
  data = memoryview(stream)  # type: ignore[arg-type]
  chunks: list[memoryview | bytes] = [data[i:i + _CHUNK_BYTES]
                                      for i in range(0, len(data), _CHUNK_BYTES)] or [b""]
  return {"packed": {"bits": form.bits, "odd": form.odd, "low": form.low,
                     "shape": list(values.shape), "data": chunks}}


def _encode_qarray(node: QArray, path: tuple[Any, ...]) -> dict:
  body: dict[str, Any] = {"spec": {name: getattr(node.spec, name) for name in _SPEC_FIELDS}}
  form = qarray.packed_form(node)
  if form is None:
    body["qvalue"] = _encode_array(node.qvalue, path + ("qvalue",))
  else:
    body["qvalue"] = _encode_packed(np.asarray(node.qvalue), form)
  for name in ("scale", "zero_point"):
    body[name] = _encode_array(getattr(node, name), path + (name,))
  return {"qarray": body}


def _too_deep(node: Any, path: tuple[Any, ...]) -> ValueError:
  return ValueError(f"qjax.io: the tree nests dicts, lists, tuples and structs more than "
                    f"MAX_DEPTH = {MAX_DEPTH} levels deep: the {type(node).__name__} at "
                    f"{_path_str(path)} is at level {len(path) + 1} (a container that holds "
                    f"itself nests without end).")


def _encode_static(value: Any, path: tuple[Any, ...], owner: str) -> Any:
  """A struct's static field value as plain msgpack data (see the module docstring)."""
  if value is None or type(value) in (bool, float, str):
    return value
  if type(value) is int:
    if not -2**63 <= value < 2**64:
      raise TypeError(f"qjax.io: the static value at {_path_str(path)} (of the struct "
                      f"{owner}) is the int {_short_repr(value)}, which does not fit 64 bits.")
    return value
  if type(value) is QuantSpec:
    return {"quantspec": {name: getattr(value, name) for name in _SPEC_FIELDS}}
  if type(value) in (list, tuple):
    if len(path) >= MAX_DEPTH:
      raise _too_deep(value, path)
    items = []
    for i, item in enumerate(value):
      items.append(_encode_static(item, path + (i,), owner))
    return {type(value).__name__: items}
  raise TypeError(f"qjax.io: the static value at {_path_str(path)} (of the struct {owner}) "
                  f"is a {type(value).__name__} ({_clip(repr(value), 60)}); a stored struct's "
                  f"static fields may hold {_STATIC_KINDS}.")


def _encode_struct(node: Any, path: tuple[Any, ...]) -> dict:
  owner = type(node).__name__
  children, statics = _struct.split_fields(node)
  static_body = {}
  for name, value in statics.items():
    static_body[name] = _encode_static(value, path + (name,), owner)
  child_body = {}
  for name, value in children.items():
    child_body[name] = _encode(value, path + (name,))
  return {"struct": {"type": owner, "static": static_body, "children": child_body}}


def _encode(node: Any, path: tuple[Any, ...]) -> dict:
  # Plain loops, not comprehensions: one Python frame per level of the tree.
  if qarray.is_qarray(node):
    return _encode_qarray(node, path)
  is_struct = _struct.is_struct(node)
  if (is_struct or isinstance(node, (Mapping, list, tuple))) and len(path) >= MAX_DEPTH:
    raise _too_deep(node, path)
  if is_struct:
    return _encode_struct(node, path)
  if isinstance(node, Mapping):
    pairs = []
    for key, value in node.items():
      if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"qjax.io: dict keys must be str or int; the dict at {_path_str(path)} "
                        f"has the key {_short_repr(key)} of type {type(key).__name__}.")
      pairs.append([key, _encode(value, path + (key,))])
    return {"dict": pairs}
  if node is None:
    return {"none": None}
  if isinstance(node, tuple) and hasattr(node, "_fields"):
    raise TypeError(f"qjax.io: the {type(node).__name__} at {_path_str(path)} is a NamedTuple, "
                    f"which would come back as a plain tuple; store node._asdict() instead.")
  if isinstance(node, (list, tuple)):
    items = []
    for i, value in enumerate(node):
      items.append(_encode(value, path + (i,)))
    return {type(node).__name__: items}
  if isinstance(node, (jax.Array, np.ndarray, np.generic)):
    return _encode_array(node, path)
  if type(node).__name__ == "PackedVariables":
    raise TypeError(f"qjax.io: the leaf at {_path_str(path)} is a qjax.nn.PackedVariables, "
                    f"whose buffers mean nothing without their layout; store its tree, "
                    f"packed.unpack(), instead.")
  raise TypeError(f"qjax.io: the leaf at {_path_str(path)} is a {type(node).__name__}; a "
                  f"variables tree holds dicts, lists, tuples, None and structs (registered "
                  f"with qjax._struct.struct) with array or QArray leaves. Wrap Python numbers "
                  f"with np.asarray(value, dtype=...).")


def _encode_file(variables: Any) -> tuple[bytes, bytes]:
  """The header and the payload of the file for `variables`."""
  payload = msgpack.packb({"tree": _encode(variables, ())}, strict_types=True)
  head = struct.pack("<4sIQ", MAGIC, FORMAT_VERSION, len(payload))
  return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))), payload


def to_bytes(variables: Any) -> bytes:
  """Serialize a variables pytree to bytes (header + msgpack payload; see the module docstring).

  Every value is stored bit for bit with its dtype and shape; QArrays keep every QuantSpec field,
  structs their type name and every field. The values of a QArray of at most 4 bits are
  bit-packed, `qjax.qarray.packed_bits` bits each (spec.bits, or spec.bits - 1 when all are
  odd), and come back as the same (u)int8 array.

  Raises:
    TypeError: a leaf that is not an array or QArray, a dtype outside STORABLE_DTYPES, a
      NamedTuple node, a dict key that is not str / int, or a struct's static value that is not
      None, a bool, an int, a float, a str, a QuantSpec or a tuple / list of those, naming its
      pytree path.
    ValueError: dicts, lists, tuples and structs nested more than MAX_DEPTH levels deep (or a
      container that holds itself), naming the path.

  Example:
    >>> tree = {"fc": {"kernel": jnp.ones((2, 3), jnp.bfloat16), "steps": jnp.int32(7)}}
    >>> restored = from_bytes(to_bytes(tree))
    >>> restored["fc"]["kernel"].dtype, int(restored["fc"]["steps"])
    (dtype(bfloat16), 7)
    >>> from qjax.integer import FloatRequant
    >>> op = FloatRequant(multiplier=jnp.float32(0.25), zero_point=jnp.int32(0), lo=-128,
    ...                   hi=127, relu=True)
    >>> restored = from_bytes(to_bytes({"requant": op}))["requant"]
    >>> type(restored).__name__, restored.relu, restored.multiplier.dtype
    ('FloatRequant', True, dtype('float32'))
    >>> from qjax.qarray import QArray
    >>> binary = QArray(jnp.array([1, -1] * 500, jnp.int8), jnp.float32(0.5), jnp.int32(0),
    ...                 QuantSpec(bits=2, symmetric=True, narrow_range=True))
    >>> data = to_bytes({"w": binary})  # the 1000 values in 125 bytes
    >>> len(data), bool((from_bytes(data)["w"].qvalue == binary.qvalue).all())
    (382, True)
  """
  header, payload = _encode_file(variables)
  return header + payload


def _open_temp(path: str) -> tuple[int, str]:
  """Create and open a new temporary file next to `path`; unique per process and thread."""
  directory, base = os.path.split(path)
  flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
           | getattr(os, "O_CLOEXEC", 0))
  for _ in range(100):
    tmp = os.path.join(directory, f".{base[:100]}.{os.getpid()}-{threading.get_ident()}-"
                                  f"{secrets.token_hex(6)}.tmp")
    try:
      return os.open(tmp, flags, 0o666), tmp  # 0o666 & ~umask, like open(path, "wb")
    except FileExistsError:
      continue
  raise FileExistsError(f"no unused temporary file name in {directory or os.curdir}")


def _fsync_directory(directory: str) -> None:
  """Make a rename in `directory` durable where the platform allows fsync on directories."""
  try:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def save(path: str | os.PathLike, variables: Any) -> None:
  """Write `to_bytes(variables)` to `path`, atomically (a temporary file, then a rename).

  The temporary file lives in the same directory and is fsynced before the rename, the
  directory after it: a crash leaves the old file, if any, or the new one, never a truncated
  one. A failed save removes its temporary file and leaves `path` as it was.

  Raises:
    TypeError, ValueError: as `to_bytes`, before anything is written.
    OSError: the file could not be written, naming `path` (never the temporary file).

  Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   path = os.path.join(directory, "model.qjax")
    ...   save(path, {"fc": {"bias": jnp.arange(3, dtype=jnp.int32)}})
    ...   print(load(path)["fc"]["bias"].tolist(), os.listdir(directory))
    [0, 1, 2] ['model.qjax']
  """
  header, payload = _encode_file(variables)
  path = os.fsdecode(path)
  tmp, step = None, "create a temporary file in the directory of"
  try:
    fd, tmp = _open_temp(path)
    step = "write"
    with os.fdopen(fd, "wb") as f:
      f.write(header)
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    step = "rename the written temporary file onto"
    os.replace(tmp, path)
    tmp = None
  except BaseException as err:
    if tmp is not None:
      with contextlib.suppress(OSError):
        os.remove(tmp)
    if not isinstance(err, OSError):
      raise
    detail = err.strerror or str(err)
    if tmp is not None:
      detail = detail.replace(tmp, path)
    message = f"qjax.io.save could not {step} {path}: {detail}; {path} is left as it was."
    raise (OSError(message) if err.errno is None else OSError(err.errno, message)) from None
  _fsync_directory(os.path.dirname(path) or os.curdir)


# ------------------------------------------------------------------------------------------
# Decoding.


def _decode_array(node: Any, path: tuple[Any, ...], as_numpy: bool) -> Any:
  if not (isinstance(node, dict) and len(node) == 1 and "array" in node):
    raise _Malformed(path, f"expected an array node, found {_preview(node)}")
  body = node["array"]
  if not (isinstance(body, dict) and len(body) == 3
          and all(k in body for k in ("dtype", "shape", "data"))):
    raise _Malformed(path, "an array node needs exactly the fields dtype, shape and data")
  name, shape, chunks = body["dtype"], body["shape"], body["data"]
  if not (isinstance(name, str) and name in STORABLE_DTYPES):
    raise _Malformed(path, f"unknown dtype {_short_repr(name)}")
  if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM
          and all(type(d) is int and d >= 0 for d in shape)):
    shown = _list_str(shape) if isinstance(shape, list) else _preview(shape)
    raise _Malformed(path, f"bad shape {shown}")
  if not (isinstance(chunks, list) and all(isinstance(c, bytes) for c in chunks)):
    raise _Malformed(path, "array data must be a list of bytes")
  dtype = jnp.dtype(name)
  data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
  expected = math.prod(shape) * dtype.itemsize
  if len(data) != expected:
    raise _Malformed(path, f"{name}{shape} needs {expected} bytes, found {len(data)}")
  try:
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
  except ValueError as err:  # an empty array with dimensions NumPy cannot index
    raise _Malformed(path, f"bad shape {shape}: {err}") from err
  if sys.byteorder == "big":
    arr = arr.byteswap()
  if as_numpy:
    return arr.copy()
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:
    raise ValueError(f"the array at {_path_str(path)} is {name}, which JAX turns into "
                     f"{jax.dtypes.canonicalize_dtype(dtype)} while jax_enable_x64 is off; "
                     f"enable it, or load with as_numpy=True to keep the exact values.")
  return jax.device_put(arr)  # as jnp.asarray, without its extra pass over the data


def _decode_packed(body: Any, path: tuple[Any, ...], spec: QuantSpec, as_numpy: bool) -> Any:
  """The qvalue array of a packed node (see the module docstring), checked against `spec`."""
  fields = ("bits", "odd", "low", "shape", "data")
  if not (isinstance(body, dict) and len(body) == len(fields) and all(k in body for k in fields)):
    raise _Malformed(path, f"a packed node needs exactly the fields {', '.join(fields)}, found "
                     f"{_preview(body)}")
  bits, odd, low, shape, chunks = (body[k] for k in fields)
  if type(bits) is not int or not 1 <= bits <= qarray.PACKED_MAX_BITS:
    raise _Malformed(path, f"packed bits must be an int in [1, {qarray.PACKED_MAX_BITS}], found "
                     f"{_short_repr(bits)}")
  if type(odd) is not bool:
    raise _Malformed(path, f"packed odd must be true or false, found {_short_repr(odd)}")
  form = qarray.packed_form_for(spec, odd)
  if form is None:
    raise _Malformed(path, f"packed values need spec.bits <= {qarray.PACKED_MAX_BITS}, the "
                     f"spec has bits={spec.bits}")
  if bits != form.bits or low != form.low or type(low) is not int:
    raise _Malformed(path, f"packed bits={_short_repr(bits)}, low={_short_repr(low)} do not "
                     f"match the {'odd' if odd else 'even'} grid of {spec}: expected "
                     f"bits={form.bits}, low={form.low}")
  if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM
          and all(type(d) is int and d >= 0 for d in shape)):
    shown = _list_str(shape) if isinstance(shape, list) else _preview(shape)
    raise _Malformed(path, f"bad shape {shown}")
  if not (isinstance(chunks, list) and all(isinstance(c, bytes) for c in chunks)):
    raise _Malformed(path, "packed data must be a list of bytes")
  data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
  count = math.prod(shape)
  expected = -(-count * bits // 8)
  if len(data) != expected:
    raise _Malformed(path, f"{count} packed {bits}-bit values need {expected} bytes, found "
                     f"{len(data)}")
  values, clean = _unpack(np.frombuffer(data, np.uint8), bits, count)
  if not clean:
    raise _Malformed(path, "the padding bits after the last packed value are not zero")
  top = (spec.qmax - low) // form.step  # the largest v on the grid
  if count and int(values.max()) > top:
    bad = int(np.argmax(values > top))
    raise _Malformed(path, f"the packed value at flat index {bad} is "
                     f"{low + form.step * int(values[bad])}, outside the grid [qmin, qmax] = "
                     f"[{spec.qmin}, {spec.qmax}] of {spec}")
  arr = values.astype(spec.storage_dtype)  # on the grid: low + step * v fits the dtype
  if form.odd:
    arr <<= 1
  arr += arr.dtype.type(low)
  try:
    arr = arr.reshape(shape)
  except ValueError as err:  # an empty array with dimensions NumPy cannot index
    raise _Malformed(path, f"bad shape {shape}: {err}") from err
  return arr if as_numpy else jax.device_put(arr)


def _decode_qvalue(node: Any, path: tuple[Any, ...], spec: QuantSpec, as_numpy: bool) -> Any:
  if isinstance(node, dict) and len(node) == 1 and "packed" in node:
    return _decode_packed(node["packed"], path, spec, as_numpy)
  return _decode_array(node, path, as_numpy)


def _decode_spec(fields: Any, path: tuple[Any, ...]) -> QuantSpec:
  """The QuantSpec of a stored {field: value} map; its own validator raises TypeError or
  ValueError for bad values."""
  if not (isinstance(fields, dict) and len(fields) == len(_SPEC_FIELDS)
          and all(k in fields for k in _SPEC_FIELDS)):
    raise _Malformed(path, f"the QuantSpec must have the fields {list(_SPEC_FIELDS)}, found "
                     f"{_preview(fields)}")
  return QuantSpec(**fields)


def _decode_static(value: Any, path: tuple[Any, ...]) -> Any:
  if value is None or type(value) in (bool, int, float, str):
    return value
  if not (isinstance(value, dict) and len(value) == 1):
    raise _Malformed(path, f"a static value must be nil, a bool, an int, a float, a str or a "
                     f"one-key map, found {_preview(value)}")
  (tag, body), = value.items()
  if tag == "quantspec":
    try:
      return _decode_spec(body, path)
    except (TypeError, ValueError) as err:
      raise _Malformed(path, f"the stored QuantSpec is invalid: {err}") from err
  if tag in ("tuple", "list"):
    if len(path) >= MAX_DEPTH:
      raise _Malformed(path, f"dicts, lists, tuples and structs nest more than MAX_DEPTH = "
                       f"{MAX_DEPTH} levels deep")
    if not isinstance(body, list):
      raise _Malformed(path, f"a static {tag} must hold a list, found {_preview(body)}")
    items = []
    for i, item in enumerate(body):
      items.append(_decode_static(item, path + (i,)))
    return items if tag == "list" else tuple(items)
  raise _Malformed(path, f"unknown static value type {_short_repr(tag)}")


def _field_names(cls: type) -> tuple[list[str], list[str]]:
  """(child, static) field names of a struct class, in declaration order."""
  children: list[str] = []
  statics: list[str] = []
  for f in dataclasses.fields(cls):
    (statics if f.metadata.get("static") else children).append(f.name)
  return children, statics


def _check_fields(kind: str, expected: list[str], found: Any, name: str,
                  path: tuple[Any, ...]) -> None:
  if not isinstance(found, dict):
    raise _Malformed(path, f"the {kind} fields of the struct {name} must be a map, found "
                     f"{_preview(found)}")
  if len(found) != len(expected) or not all(k in found for k in expected):
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    raise _Malformed(path, f"the struct {name} has the {kind} fields {_list_str(expected)}, "
                     f"found {_list_str(found)} (missing {_list_str(missing)}, unexpected "
                     f"{_list_str(extra)})")


def _decode_struct(body: Any, path: tuple[Any, ...], as_numpy: bool) -> Any:
  if not (isinstance(body, dict) and len(body) == 3
          and all(k in body for k in ("type", "static", "children"))):
    raise _Malformed(path, "a struct node needs exactly the fields type, static and children")
  name = body["type"]
  if not isinstance(name, str):
    raise _Malformed(path, f"a struct's type must be a str, found {_preview(name)}")
  cls = _struct.struct_type(name)
  if cls is None:
    # The integer path's types register when qjax.integer is imported; imported here, not at
    # module level, since qjax.integer may import this module.
    import qjax.integer  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    cls = _struct.struct_type(name)
  if cls is None:
    raise _Malformed(path, f"unknown struct type {_short_repr(name)} (no class of that name is "
                     f"registered with qjax._struct.struct; import the module that defines it "
                     f"before loading)")
  child_names, static_names = _field_names(cls)
  _check_fields("static", static_names, body["static"], name, path)
  _check_fields("child", child_names, body["children"], name, path)
  kwargs = {}
  for field in static_names:
    kwargs[field] = _decode_static(body["static"][field], path + (field,))
  for field in child_names:
    kwargs[field] = _decode(body["children"][field], path + (field,), as_numpy)
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as err:
    raise _Malformed(path, f"the stored {name} is invalid: {_clip(str(err), 300)}") from err


def _decode(node: Any, path: tuple[Any, ...], as_numpy: bool) -> Any:
  # Plain loops, not comprehensions: one Python frame per level, at most MAX_DEPTH levels.
  if not (isinstance(node, dict) and len(node) == 1):
    raise _Malformed(path, f"expected a one-key node map, found {_preview(node)}")
  (tag, body), = node.items()
  if tag == "array":
    return _decode_array(node, path, as_numpy)
  if tag == "none":
    if body is not None:
      raise _Malformed(path, f"a none node must hold nil, found {_preview(body)}")
    return None
  if tag in ("list", "tuple", "dict", "struct") and len(path) >= MAX_DEPTH:
    raise _Malformed(path, f"dicts, lists, tuples and structs nest more than MAX_DEPTH = "
                     f"{MAX_DEPTH} levels deep")
  if tag == "struct":
    return _decode_struct(body, path, as_numpy)
  if tag in ("list", "tuple"):
    if not isinstance(body, list):
      raise _Malformed(path, f"a {tag} node must hold a list, found {_preview(body)}")
    items = []
    for i, value in enumerate(body):
      items.append(_decode(value, path + (i,), as_numpy))
    return items if tag == "list" else tuple(items)
  if tag == "dict":
    if not isinstance(body, list):
      raise _Malformed(path, f"a dict node must hold [key, node] pairs, found {_preview(body)}")
    out = {}
    for pair in body:
      if not (isinstance(pair, list) and len(pair) == 2):
        raise _Malformed(path, f"a dict node must hold [key, node] pairs, found {_preview(pair)}")
      key, value = pair
      if isinstance(key, bool) or not isinstance(key, (str, int)) or key in out:
        raise _Malformed(path, f"bad or repeated key {_short_repr(key)}")
      out[key] = _decode(value, path + (key,), as_numpy)
    return out
  if tag == "qarray":
    if not (isinstance(body, dict) and len(body) == 4
            and all(k in body for k in ("spec", "qvalue", "scale", "zero_point"))):
      raise _Malformed(path, "a qarray node needs exactly spec, qvalue, scale and zero_point")
    try:
      spec = _decode_spec(body["spec"], path)
      leaves = {"qvalue": _decode_qvalue(body["qvalue"], path + ("qvalue",), spec, as_numpy)}
      for n in ("scale", "zero_point"):
        leaves[n] = _decode_array(body[n], path + (n,), as_numpy)
      return QArray(**leaves, spec=spec)
    except (TypeError, ValueError) as err:
      raise _Malformed(path, f"the stored QArray is invalid: {err}") from err
  raise _Malformed(path, f"unknown node type {_short_repr(tag)}")


def _mismatch(target: Any, found: Any, path: tuple[Any, ...]) -> _Malformed:
  return _Malformed(path, f"expected {_describe(target)}, found {_describe(found)}")


def _same_static(a: Any, b: Any) -> bool:
  """Static values equal in type and value (NaN equals NaN; a tuple never equals a list)."""
  if type(a) is not type(b):
    return False
  if isinstance(a, (list, tuple)):
    return len(a) == len(b) and all(_same_static(x, y) for x, y in zip(a, b, strict=True))
  if isinstance(a, float) and math.isnan(a):
    return math.isnan(b)
  return bool(a == b)


def _check_matches(target: Any, found: Any, path: tuple[Any, ...]) -> None:
  """Raise _Malformed at the first place where `found` differs from `target` in structure,
  QuantSpec, struct type or static field, shape or dtype (depth first, in the target's key
  order)."""
  if qarray.is_qarray(target):
    if not qarray.is_qarray(found) or found.spec != target.spec:
      raise _mismatch(target, found, path)
    for name in ("qvalue", "scale", "zero_point"):
      _check_matches(getattr(target, name), getattr(found, name), path + (name,))
  elif _struct.is_struct(target):
    if type(found) is not type(target):
      raise _mismatch(target, found, path)
    target_children, target_statics = _struct.split_fields(target)
    found_children, found_statics = _struct.split_fields(found)
    for name, value in target_statics.items():
      if not _same_static(value, found_statics[name]):
        raise _Malformed(path + (name,), f"expected the {type(target).__name__} static value "
                         f"{_static_str(value)}, found {_static_str(found_statics[name])}")
    for name, value in target_children.items():
      _check_matches(value, found_children[name], path + (name,))
  elif isinstance(target, Mapping):
    if not isinstance(found, Mapping):
      raise _mismatch(target, found, path)
    missing = [k for k in target if k not in found]
    extra = [k for k in found if k not in target]
    if missing or extra:
      raise _Malformed(path, f"expected keys {_list_str(target)}, found {_list_str(found)} "
                       f"(missing {_list_str(missing)}, unexpected {_list_str(extra)})")
    for key in target:
      _check_matches(target[key], found[key], path + (key,))
  elif target is None or isinstance(target, (list, tuple)):
    if type(found) is not type(target) or len(found or ()) != len(target or ()):
      raise _mismatch(target, found, path)
    for i, (t, f) in enumerate(zip(target or (), found or (), strict=True)):
      _check_matches(t, f, path + (i,))
  elif hasattr(target, "shape") and hasattr(target, "dtype"):
    if (qarray.is_qarray(found) or not hasattr(found, "shape")
        or tuple(found.shape) != tuple(target.shape) or found.dtype != target.dtype):
      raise _mismatch(target, found, path)
  else:
    raise TypeError(f"qjax.io: the target's leaf at {_path_str(path)} is a "
                    f"{type(target).__name__}; use arrays, jax.ShapeDtypeStruct, QArrays or "
                    f"structs of those.")


def _byte_view(data: Any, name: str) -> memoryview:
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"{name}: from_bytes expects bytes; got {type(data).__name__}.")
  view = memoryview(data)
  if view.ndim != 1 or view.itemsize != 1 or not view.c_contiguous:
    view = memoryview(view.tobytes())
  return view if view.format == "B" else view.cast("B")


def _check_header(view: memoryview, name: str) -> memoryview:
  """Check magic, version, length and checksum; return the payload."""
  if view[:len(MAGIC)] != MAGIC:
    if len(view) < len(MAGIC) and MAGIC.startswith(bytes(view)):
      raise ValueError(f"{name}: truncated: {len(view)} byte(s), less than the "
                       f"{_HEADER.size}-byte qjax header.")
    raise ValueError(f"{name}: not a qjax variables file: it starts with {bytes(view[:8])!r}, "
                     f"expected the magic {MAGIC!r}.")
  if len(view) < _HEADER.size:
    raise ValueError(f"{name}: truncated: {len(view)} bytes, less than the {_HEADER.size}-byte "
                     f"qjax header.")
  _, version, length, crc = _HEADER.unpack_from(view)
  payload = view[_HEADER.size:]
  truncated = (f"{name}: truncated: the header announces {length} payload bytes, found "
               f"{len(payload)} (an interrupted write or copy?).")
  trailing = (f"{name}: corrupt: {len(payload) - length} unexpected bytes after the "
              f"{length}-byte payload.")
  if version == 1:  # the checksum covers the payload only
    if len(payload) < length:
      raise ValueError(truncated)
    if len(payload) > length:
      raise ValueError(trailing)
    if zlib.crc32(payload) != crc:
      raise ValueError(f"{name}: corrupt: the payload's CRC-32 is {zlib.crc32(payload):#010x}, "
                       f"the header expects {crc:#010x}.")
    return payload
  head_crc = zlib.crc32(view[:_CRC_OFFSET])
  actual = zlib.crc32(payload, head_crc)
  if actual == crc:  # an intact file: the version and length fields are as written
    if version > FORMAT_VERSION:
      raise ValueError(f"{name}: unsupported format version {version}: this qjax reads versions "
                       f"1 to {FORMAT_VERSION} (written by a newer qjax; upgrade qjax to read "
                       f"it).")
    if version != FORMAT_VERSION:
      raise ValueError(f"{name}: unsupported format version {version}: no qjax writes this "
                       f"version (a foreign or faulty writer).")
    if length != len(payload):
      raise ValueError(f"{name}: corrupt: the header announces {length} payload bytes, the file "
                       f"holds {len(payload)} (a faulty writer).")
    return payload
  # The checksum fails: name the likeliest cause.
  if len(payload) > length and zlib.crc32(payload[:length], head_crc) == crc:
    raise ValueError(trailing)
  if len(payload) != length:
    head = bytes(view[:8]) + struct.pack("<Q", len(payload))
    if zlib.crc32(payload, zlib.crc32(head)) == crc:
      raise ValueError(f"{name}: corrupt header: the length field reads {length}, but the "
                       f"{len(payload)} payload bytes that follow match the checksum.")
  if len(payload) < length:
    raise ValueError(truncated)
  if version != FORMAT_VERSION:
    raise ValueError(f"{name}: corrupt header: it reads format version {version}, but the CRC-32 "
                     f"of the header and payload is {actual:#010x}, not the recorded "
                     f"{crc:#010x} (a file from a newer qjax keeps a matching checksum).")
  raise ValueError(f"{name}: corrupt: the CRC-32 of the header and payload is {actual:#010x}, "
                   f"the header expects {crc:#010x}.")


def from_bytes(data: bytes, target: Any = None, *, as_numpy: bool = False,
               name: str = "<bytes>") -> Any:
  """Rebuild the variables pytree serialized by `to_bytes` (format version 1 or 2).

  Args:
    data: the bytes (or a bytearray / memoryview; not copied).
    target: optional pytree of the expected structure (arrays, `jax.ShapeDtypeStruct`s,
      QArrays, structs of those); the result must match it in structure, QuantSpecs, struct
      types and static fields, shapes and dtypes.
    as_numpy: return NumPy leaves (writable copies) instead of jax arrays; needed for 64-bit
      leaves while jax_enable_x64 is off.
    name: what to call the data in error messages (`load` passes the file name).

  Returns:
    The pytree with plain dicts, lists and tuples, QArrays rebuilt with their validator (packed
    values unpacked once, to their (u)int8 array) and structs through their class's
    constructor.

  Raises:
    ValueError: naming `name`, for any malformed data: bad magic, a truncated or over-long
      file, a damaged header, a format version this qjax does not read, a checksum mismatch, a
      malformed payload (naming the pytree path; for a packed qvalue: a field missing or of
      the wrong type, bits outside [1, 4] or not those of the spec's grid, data of the wrong
      length, nonzero padding bits, values outside [qmin, qmax]), nesting deeper than
      MAX_DEPTH, or a mismatch with `target` (naming the first differing pytree path,
      expected vs found).

  Example:
    >>> data = to_bytes({"w": jnp.zeros((2, 2), jnp.int8)})
    >>> from_bytes(data, as_numpy=True)["w"].shape
    (2, 2)
    >>> from_bytes(data[:10])
    Traceback (most recent call last):
    ...
    ValueError: <bytes>: truncated: 10 bytes, less than the 20-byte qjax header.
  """
  payload = _check_header(_byte_view(data, name), name)
  try:
    # Only for files written by a buggy or foreign writer, since the checksum passed; msgpack
    # signals bad input with several exception types. No ext_hook: extension types stay
    # inert msgpack.ExtType values, which _decode refuses.
    decoded = msgpack.unpackb(payload, raw=False, strict_map_key=False)
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(f"{name}: corrupt: the payload is not valid msgpack "
                     f"({_clip(str(err), 200)}).") from err
  try:
    if not (isinstance(decoded, dict) and len(decoded) == 1 and "tree" in decoded):
      raise _Malformed((), "the payload must be a map with the single key 'tree'")
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
  """Read a file written by `save`; `from_bytes` with the file name in every error.

  Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   path = os.path.join(directory, "model.qjax")
    ...   save(path, {"scale": jnp.float32(0.5)})
    ...   print(load(path, target={"scale": jax.ShapeDtypeStruct((), jnp.float32)})["scale"])
    0.5
  """
  with open(path, "rb") as f:
    data = f.read()
  return from_bytes(data, target, as_numpy=as_numpy, name=os.fsdecode(path))
