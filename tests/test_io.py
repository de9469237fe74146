"""qjax.io: bit-exact save / load of variables pytrees with QArrays and structs, the errors for
bad files and mismatched targets, model_size, and the per-layer report with SQNR against float
weights."""

import dataclasses
import errno
import math
import os
import stat
import struct
import threading
import tracemalloc
import zlib
from typing import Any, NamedTuple

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from flax import serialization
from support.cases import qarray_of

from qjax import QArray, QuantSpec, io, qarray, report
from qjax import _struct
from qjax._struct import is_struct, static
from qjax.integer import requant as rq
from qjax.integer.forms.boundary import DequantizeOp, QuantizeOp
from qjax.integer.forms.linear import Int8Conv, Int8Dense

RNG = np.random.default_rng(11)
SETTINGS = hypothesis.settings(deadline=None, max_examples=60, print_blob=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])

SPECS = (
    QuantSpec(bits=8),
    QuantSpec(bits=8, symmetric=True, axis=0),
    QuantSpec(bits=8, symmetric=True, narrow_range=True, axis=-1),
    QuantSpec(bits=8, signed=False),
    QuantSpec(bits=8, signed=False, reduce_range=True),
    QuantSpec(bits=8, signed=False, symmetric=True, axis=1),
    QuantSpec(bits=4, symmetric=True, axis=0),
    QuantSpec(bits=16),
    QuantSpec(bits=16, signed=False, axis=0),
    QuantSpec(bits=2, signed=False),
)
# Every storable dtype that jax arrays hold without x64, with their raw bits drawn at random
# (NaN payloads, -0.0 and subnormals included) so that the round trip must be bit-exact.
JAX_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "float16",
              "bfloat16", "float32", "int4", "uint4", "float8_e4m3fn", "float8_e5m2")
UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _random_array(dtype_name, shape, rng=RNG):
  dtype = jnp.dtype(dtype_name)
  if dtype == np.bool_:
    return rng.integers(0, 2, shape).astype(bool)
  if dtype.name in ("int4", "uint4"):
    info = jnp.iinfo(dtype)
    return rng.integers(int(info.min), int(info.max) + 1, shape).astype(dtype)
  raw = rng.integers(0, 2**(8 * dtype.itemsize), shape, dtype=np.uint64)
  return raw.astype(UINT_OF_SIZE[dtype.itemsize]).view(dtype)


def _random_qarray(spec, shape, rng=RNG):
  return qarray_of(rng.integers(spec.qmin, spec.qmax + 1, shape), spec, rng, scale_low=1e-4)


def _bits(x):
  """Bytes, dtype and shape of an array leaf: equal only for bit-identical arrays."""
  arr = np.asarray(x)
  return arr.dtype, arr.shape, arr.tobytes()


def assert_bit_equal(expected, restored, leaf_type=jax.Array):
  """Same tree structure (struct types and static fields included) and bit-identical leaves of
  the same dtype, each a `leaf_type`."""
  e_leaves, e_def = jax.tree_util.tree_flatten(expected, is_leaf=qarray.is_qarray)
  r_leaves, r_def = jax.tree_util.tree_flatten(restored, is_leaf=qarray.is_qarray)
  assert r_def == e_def
  for e, r in zip(e_leaves, r_leaves, strict=True):
    if isinstance(e, QArray):
      assert isinstance(r, QArray) and r.spec == e.spec
      for name in ("qvalue", "scale", "zero_point"):
        assert _bits(getattr(r, name)) == _bits(getattr(e, name))
    else:
      assert isinstance(r, leaf_type)
      assert _bits(r) == _bits(e)


def _tree():
  """A nested tree with every kind of node and leaf the format promises to keep."""
  qarrays = {f"q{i}": _random_qarray(spec, (3, 4, 2)) for i, spec in enumerate(SPECS)}
  arrays = {name: jnp.asarray(_random_array(name, (2, 3))) for name in JAX_DTYPES}
  return {
      "int8": {"fc1": {"kernel": qarrays.pop("q1"), "bias": arrays["int32"],
                       "requant": {"multiplier": arrays["float32"]}},
               "Quantize_0": {"scale": jnp.float32(0.02), "zero_point": jnp.int32(-3)}},
      "qarrays": qarrays,
      "arrays": arrays,
      "layers": [jnp.zeros((0, 5), jnp.float32), (jnp.int8(-7), None), []],
      "by_index": {7: {"empty": {}, "scalar": jnp.asarray(np.float16(-0.0))}, -1: None},
  }


def _rewrap(payload, version=io.FORMAT_VERSION, length=None):
  """A file around `payload` bytes with a correct checksum (of the header fields and payload)."""
  head = struct.pack("<4sIQ", io.MAGIC, version, len(payload) if length is None else length)
  return head + struct.pack("<I", zlib.crc32(head + payload)) + payload


def _rewrap_v1(payload):
  """A version-1 file: its CRC-32 covers the payload only."""
  return struct.pack("<4sIQI", io.MAGIC, 1, len(payload), zlib.crc32(payload)) + payload


def _payload(data):
  return serialization.msgpack_restore(data[20:])


# ------------------------------------------------------------------------------------------
# Round trips.


def test_save_load_roundtrip_is_bit_exact(tmp_path):
  tree = _tree()
  path = tmp_path / "model.qjax"
  io.save(path, tree)
  assert os.listdir(tmp_path) == ["model.qjax"]  # the temporary file was renamed away
  restored = io.load(path)
  assert_bit_equal(tree, restored)
  assert isinstance(restored["layers"][1], tuple) and restored["layers"][1][1] is None
  assert isinstance(restored["layers"][2], list)
  assert list(restored) == list(tree)  # insertion order kept
  assert list(restored["by_index"]) == [7, -1]  # int keys stay ints
  assert_bit_equal(tree, io.load(str(path), target=tree))


def test_bytes_roundtrip_and_determinism():
  tree = _tree()
  data = io.to_bytes(tree)
  assert data[:4] == b"QJAX"
  assert io.to_bytes(io.from_bytes(data)) == data
  assert_bit_equal(tree, io.from_bytes(bytearray(data)))


def test_large_arrays_are_split_in_chunks(monkeypatch):
  # msgpack caps one object at 2^32 - 1 bytes; shrink the chunk to exercise the split.
  monkeypatch.setattr(io, "_CHUNK_BYTES", 7)
  tree = {"w": jnp.asarray(_random_array("float32", (5, 3))),
          "q": _random_qarray(QuantSpec(bits=16, axis=0), (4, 5))}
  data = io.to_bytes(tree)
  assert len(dict(_payload(data)["tree"]["dict"])["w"]["array"]["data"]) == 9  # ceil(60 / 7)
  assert_bit_equal(tree, io.from_bytes(data))


def test_loaded_qarrays_are_validated_and_usable():
  qa = _random_qarray(QuantSpec(bits=8, symmetric=True, axis=0), (4, 6))
  restored = io.from_bytes(io.to_bytes({"k": qa}))["k"]
  np.testing.assert_array_equal(restored.dequantize(), qa.dequantize())
  assert restored.nbytes == qa.nbytes


def test_numpy_and_64_bit_leaves():
  tree = {"f64": np.array([1.0 + 2.0**-40, np.pi]), "i64": np.array([2**40], np.int64),
          "np_scalar": np.float32(1.5)}
  data = io.to_bytes(tree)
  with pytest.raises(ValueError, match=r"f64 is float64.*jax_enable_x64 is off.*as_numpy=True"):
    io.from_bytes(data)
  restored = io.from_bytes(data, as_numpy=True)
  for key in tree:
    assert isinstance(restored[key], np.ndarray) and restored[key].flags.writeable
    assert _bits(restored[key]) == _bits(tree[key])


def test_flax_variables_roundtrip():
  import flax.linen as nn
  model = nn.Sequential([nn.Dense(5), nn.relu, nn.Dense(2)])
  variables = model.init(jax.random.key(0), jnp.ones((1, 3), jnp.float32))
  restored = io.from_bytes(io.to_bytes(variables), target=variables)
  assert_bit_equal(variables, restored)
  x = jnp.asarray(RNG.standard_normal((4, 3)).astype(np.float32))
  np.testing.assert_array_equal(model.apply(restored, x), model.apply(variables, x))


# ------------------------------------------------------------------------------------------
# Structs: the integer path's typed ops, stored by their registered name.


def _requantizer(kind, channels, relu=False, lo=-128, hi=127):
  """A requantizer of each type, with random leaves."""
  zero = jnp.int32(RNG.integers(-128, 128))
  if kind == "fbgemm":
    return rq.FbgemmRequant(bias=jnp.asarray(_random_array("float32", (channels,))),
                            multiplier=jnp.asarray(RNG.uniform(0, 1, channels), jnp.float32),
                            zero_point=zero, lo=lo, hi=hi, relu=relu)
  if kind == "float":
    return rq.FloatRequant(multiplier=jnp.float32(RNG.uniform(0, 1)), zero_point=zero, lo=lo,
                           hi=hi, relu=relu)
  return rq.IntegerRequant(m0=jnp.asarray(RNG.integers(2**30, 2**31 - 1, channels), jnp.int32),
                           shift=jnp.asarray(RNG.integers(31, 40, channels), jnp.int32),
                           zero_point=zero, lo=lo, hi=hi, relu=relu)


def _dense(kind, report="dict"):
  if report == "dict":
    report = {"input_scale": jnp.float32(0.02), "weight_scale": jnp.full(3, 0.1, jnp.float32),
              "nested": {"bias": jnp.asarray(_random_array("float32", (3,))), "none": None,
                         "pair": (jnp.int8(-1), [jnp.asarray(_random_array("bfloat16", (2,)))])}}
  return Int8Dense(kernel=_random_qarray(QuantSpec(bits=8, symmetric=True, axis=0), (3, 4)),
                   offset=jnp.asarray(RNG.integers(-1000, 1000, 3), jnp.int32),
                   requant=_requantizer(kind, 3, relu=True), report=report)


def _conv(kind, padding):
  return Int8Conv(kernel=_random_qarray(QuantSpec(bits=8, symmetric=True, axis=-1),
                                        (3, 3, 2, 4)),
                  offset=jnp.zeros(4, jnp.int32), pad_value=jnp.int32(-5),
                  requant=_requantizer(kind, 4, lo=-64, hi=63), report=None, strides=(2, 1),
                  padding=padding, dilation=(1, 2), groups=1)


def _converted(kind):
  """Variables shaped like a converted model's: typed ops under "converted", float params."""
  return {
      "converted": {
          "Quantize_0": {"op": QuantizeOp(scale=jnp.float32(0.05), zero_point=jnp.int32(-128),
                                          spec=QuantSpec(bits=8, signed=False))},
          "Conv_0": {"op": _conv(kind, "SAME")},
          "Conv_1": {"op": _conv(kind, ((0, 0), (1, 2)))},
          "Dense_0": {"op": _dense(kind)},
          "Dense_1": {"op": _dense(kind, report=None)},
          "Dequantize_0": {"op": DequantizeOp(scale=jnp.float32(0.1), zero_point=jnp.int32(3))},
      },
      "params": {"Dense_0": {"kernel": jnp.ones((4, 3), jnp.float32)}},
  }


def _ops(tree):
  return {name: layer["op"] for name, layer in tree["converted"].items()}


def _assert_same_statics(expected, restored):
  """The same struct types with the same static fields, by type as well as value (a tuple
  stays a tuple, nested)."""
  structs = [jax.tree_util.tree_leaves(t, is_leaf=is_struct) for t in (expected, restored)]
  for e, r in zip(*structs, strict=True):
    if is_struct(e):
      assert type(r) is type(e)
      _, e_statics = _struct.split_fields(e)
      _, r_statics = _struct.split_fields(r)
      assert repr(r_statics) == repr(e_statics)
      assert [type(v) for v in r_statics.values()] == [type(v) for v in e_statics.values()]


@jax.jit
def _run_op(op, x):
  return op(x)


@pytest.mark.parametrize("kind", ["fbgemm", "float", "integer"])
def test_structs_roundtrip_bit_exact(tmp_path, kind):
  tree = _converted(kind)
  path = tmp_path / "int8.qjax"
  io.save(path, tree)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  for target in (None, tree, abstract, jax.eval_shape(lambda t: t, tree)):
    restored = io.load(path, target=target)
    assert_bit_equal(tree, restored)
    _assert_same_statics(tree, restored)
  as_numpy = io.load(path, target=tree, as_numpy=True)
  assert_bit_equal(tree, as_numpy, leaf_type=np.ndarray)
  _assert_same_statics(tree, as_numpy)
  assert io.to_bytes(restored) == path.read_bytes()  # the same bytes again
  ops, got = _ops(tree), _ops(restored)
  assert got["Conv_1"].padding == ((0, 0), (1, 2)) and got["Conv_0"].padding == "SAME"
  assert got["Quantize_0"].spec == QuantSpec(bits=8, signed=False)
  assert got["Dense_1"].report is None and got["Dense_0"].report["nested"]["none"] is None
  assert isinstance(got["Dense_0"].report["nested"]["pair"], tuple)
  # The rebuilt ops run, with the same integers (the op an argument of one jitted call: the
  # rebuilt op and the original compile once, as the same program).
  x = jnp.asarray(RNG.integers(-128, 128, (2, 5, 5, 2)), jnp.int8)
  for name in ("Conv_0", "Conv_1"):
    assert _bits(_run_op(got[name], x)) == _bits(_run_op(ops[name], x))
  v = jnp.asarray(RNG.integers(-128, 128, (2, 4)), jnp.int8)
  assert _bits(_run_op(got["Dense_0"], v)) == _bits(_run_op(ops["Dense_0"], v))
  assert _bits(_run_op(got["Quantize_0"], jnp.ones(3))) == _bits(
      _run_op(ops["Quantize_0"], jnp.ones(3)))


def test_a_struct_at_the_root_and_inside_lists_roundtrips():
  tree = [_requantizer("float", 1), (_requantizer("integer", 2), {"r": _requantizer("fbgemm", 2)})]
  assert_bit_equal(tree, io.from_bytes(io.to_bytes(tree), target=tree))
  op = _dense("fbgemm")
  assert_bit_equal(op, io.from_bytes(io.to_bytes(op), target=op))


@_struct.struct
class IoStatics:
  """A test struct with every kind of static value the format stores."""

  value: Any
  none: Any = static(default=None)
  flag: Any = static(default=True)
  count: Any = static(default=-(2**63))
  big: Any = static(default=2**64 - 1)
  ratio: Any = static(default=-0.0)
  name: Any = static(default="héllo")
  spec: Any = static(default=QuantSpec(bits=4, symmetric=True, axis=-1))
  nested: Any = static(default=((1, [2.5, "x"]), [None, (False,)], (), []))


@_struct.struct
class IoChecked:
  """A test struct whose constructor validates its static field."""

  value: Any
  bits: int = static(default=8)

  def __post_init__(self):
    if not 2 <= self.bits <= 16:
      raise ValueError(f"IoChecked.bits must be in [2, 16]; got {self.bits}.")


def test_every_kind_of_static_value_roundtrips():
  tree = {"s": IoStatics(value={"a": jnp.int4(3)}), "nan": IoStatics(value=None, ratio=math.nan)}
  data = io.to_bytes(tree)
  restored = io.from_bytes(data, target=tree)
  got = restored["s"]
  for field in ("none", "flag", "count", "big", "name", "spec"):
    assert getattr(got, field) == getattr(tree["s"], field)
    assert type(getattr(got, field)) is type(getattr(tree["s"], field))
  assert math.copysign(1.0, got.ratio) == -1.0  # -0.0 kept
  assert repr(got.nested) == repr(tree["s"].nested)
  assert type(got.nested[0][1]) is list and type(got.nested[1][1]) is tuple
  assert math.isnan(restored["nan"].ratio)
  assert _bits(got.value["a"]) == _bits(tree["s"].value["a"])
  assert io.to_bytes(restored) == data


@pytest.mark.parametrize("changed,match", [
    (lambda t: {**t, "converted": {**t["converted"], "Conv_0": {"op": _conv("float", "VALID")}}},
     r"at converted/Conv_0/op/padding: expected the Int8Conv static value 'VALID', found 'SAME'"),
    (lambda t: {**t, "converted": {**t["converted"], "Conv_1": {"op": _conv("float", [[0, 0],
                                                                                     [1, 2]])}}},
     r"at converted/Conv_1/op/padding: expected the Int8Conv static value \[\[0, 0\], \[1, 2\]\], "
     r"found \(\(0, 0\), \(1, 2\)\)"),
    (lambda t: {**t, "converted": {**t["converted"], "Dense_0": {"op": _dense("fbgemm")}}},
     r"at converted/Dense_0/op/requant: expected a struct FbgemmRequant\(lo=-128, hi=127, "
     r"relu=True\), found a struct FloatRequant\(lo=-128, hi=127, relu=True\)"),
    (lambda t: {**t, "converted": {**t["converted"], "Dense_1": {"op": _dense("float")}}},
     r"at converted/Dense_1/op/report: expected a dict with keys \['input_scale', "
     r"'weight_scale', 'nested'\], found None"),
    (lambda t: {**t, "converted": {**t["converted"], "Dense_0": {"op": {"kernel": None}}}},
     r"at converted/Dense_0/op: expected a dict with keys \['kernel'\], found a struct "
     r"Int8Dense\(\)"),
    (lambda t: {**t, "converted": {**t["converted"], "Dense_0": {"op": dataclasses.replace(
        t["converted"]["Dense_0"]["op"],
        kernel=_random_qarray(QuantSpec(bits=8, symmetric=True, axis=0), (3, 5)))}}},
     r"at converted/Dense_0/op/kernel/qvalue: expected int8\[3, 5\], found int8\[3, 4\]"),
    (lambda t: {**t, "converted": {**t["converted"], "Dense_0": {"op": dataclasses.replace(
        t["converted"]["Dense_0"]["op"], requant=_requantizer("float", 3, relu=False))}}},
     r"at converted/Dense_0/op/requant/relu: expected the FloatRequant static value False, "
     r"found True"),
    (lambda t: {**t, "converted": {**t["converted"], "Quantize_0": {"op": QuantizeOp(
        scale=jnp.float32(1), zero_point=jnp.int32(0), spec=QuantSpec(bits=8))}}},
     r"at converted/Quantize_0/op/spec: expected the QuantizeOp static value "
     r"QuantSpec\(bits=8, signed=True.*found QuantSpec\(bits=8, signed=False"),
])
def test_struct_target_mismatch_names_the_path(changed, match):
  tree = _converted("float")
  with pytest.raises(ValueError, match=match) as err:
    io.from_bytes(io.to_bytes(tree), target=changed(tree), name="t.qjax")
  assert str(err.value).startswith("t.qjax: does not match the target at ")


def _struct_nodes(tree):
  """The struct node bodies of a decoded payload tree, by pytree path."""
  found, stack = {}, [((), tree)]
  while stack:
    path, node = stack.pop()
    if isinstance(node, dict) and "struct" in node:
      found["/".join(path)] = node["struct"]
      stack.extend((path + (k,), v) for k, v in node["struct"]["children"].items())
    elif isinstance(node, dict) and "dict" in node:
      stack.extend((path + (str(k),), v) for k, v in node["dict"])
  return found


def _edit_struct(where, edit):
  def apply(tree):
    edit(_struct_nodes(tree)[where])
  return apply


def _set_static(field, value):
  return lambda body: body["static"].update({field: value})


_DENSE = "converted/Dense_0/op"


@pytest.mark.parametrize("edit,match", [
    (_edit_struct(_DENSE, lambda b: b.update(type="NoSuchOp")),
     rf"malformed payload at {_DENSE}: unknown struct type 'NoSuchOp' \(no class of that name "
     r"is registered with qjax._struct.struct"),
    (_edit_struct(_DENSE, lambda b: b.update(type=7)),
     rf"at {_DENSE}: a struct's type must be a str, found 7"),
    (_edit_struct(_DENSE, lambda b: b["children"].pop("offset")),
     rf"at {_DENSE}: the struct Int8Dense has the child fields \['kernel', 'offset', "
     r"'requant', 'report'\], found \['kernel', 'requant', 'report'\] \(missing \['offset'\], "
     r"unexpected \[\]\)"),
    (_edit_struct(_DENSE, lambda b: b["children"].update(scale={"none": None})),
     rf"at {_DENSE}: the struct Int8Dense has the child fields .*unexpected \['scale'\]"),
    (_edit_struct(_DENSE, lambda b: b["static"].update(groups=1)),
     rf"at {_DENSE}: the struct Int8Dense has the static fields \[\], found \['groups'\]"),
    (_edit_struct("converted/Conv_0/op", lambda b: b["static"].pop("groups")),
     r"at converted/Conv_0/op: the struct Int8Conv has the static fields .*missing \['groups'\]"),
    (_edit_struct(_DENSE, lambda b: b.pop("static")),
     rf"at {_DENSE}: a struct node needs exactly the fields type, static and children"),
    (_edit_struct(_DENSE, lambda b: b.update(children=[])),
     rf"at {_DENSE}: the child fields of the struct Int8Dense must be a map, found a list"),
    # Another registered type's name: its fields do not match.
    (_edit_struct(f"{_DENSE}/requant", lambda b: b.update(type="FbgemmRequant")),
     rf"at {_DENSE}/requant: the struct FbgemmRequant has the child fields \['zero_point', "
     r"'bias', 'multiplier'\], found \['zero_point', 'multiplier'\] \(missing \['bias'\]"),
    (_edit_struct("converted/Conv_0/op", _set_static("padding", b"SAME")),
     r"at converted/Conv_0/op/padding: a static value must be nil, a bool, an int, a float, a "
     r"str or a one-key map, found 4 bytes"),
    (_edit_struct("converted/Conv_0/op", _set_static("strides", {"set": [1, 1]})),
     r"at converted/Conv_0/op/strides: unknown static value type 'set'"),
    (_edit_struct("converted/Conv_0/op", _set_static("strides", {"tuple": [1, b"\0"]})),
     r"at converted/Conv_0/op/strides/1: a static value must be nil.*found 1 bytes"),
    (_edit_struct("converted/Quantize_0/op",
                  lambda b: b["static"]["spec"]["quantspec"].update(bits=40)),
     r"at converted/Quantize_0/op/spec: the stored QuantSpec is invalid: QuantSpec.bits must "
     r"be in \[2, 16\]; got 40"),
    (_edit_struct("converted/Quantize_0/op",
                  lambda b: b["static"]["spec"]["quantspec"].pop("axis")),
     r"at converted/Quantize_0/op/spec: the QuantSpec must have the fields"),
    (_edit_struct(f"{_DENSE}/requant", lambda b: b["children"].update(lo={"none": None})),
     rf"at {_DENSE}/requant: the struct FloatRequant has the child fields .*unexpected \['lo'\]"),
])
def test_malformed_struct_nodes_name_the_path(edit, match):
  data = io.to_bytes(_converted("float"))
  with pytest.raises(ValueError, match=match) as err:
    io.from_bytes(_edit_payload(data, edit), name="m.qjax")
  assert str(err.value).startswith("m.qjax: malformed payload at ")
  assert len(str(err.value)) < 1000


def test_struct_constructors_validate_loaded_values():
  data = io.to_bytes({"c": IoChecked(value=jnp.zeros(2))})
  edited = _edit_payload(data, _edit_struct("c", _set_static("bits", 99)))
  with pytest.raises(ValueError, match=r"malformed payload at c: the stored IoChecked is invalid: "
                                       r"IoChecked.bits must be in \[2, 16\]; got 99"):
    io.from_bytes(edited)


@_struct.struct
class IoOdd:
  """A test struct whose static field can hold anything."""

  value: Any
  odd: Any = static(default=None)


@pytest.mark.parametrize("odd,where,match", [
    (rq.Requant.FBGEMM, "", r"is a Requant \(<Requant.FBGEMM: 'fbgemm'>\)"),
    (np.int64(3), "", r"is a int64"),
    (np.float32(0.5), "", r"is a float32"),
    ({"a": 1}, "", r"is a dict"),
    (frozenset({1}), "", r"is a frozenset"),
    ((1, (2, jnp.zeros(1))), "/1/1", r"is a ArrayImpl"),
    ([1, QArray.__name__, rq.Requant.FLOAT], "/2", r"is a Requant"),
    (2**64, "", r"is the int 18446744073709551616, which does not fit 64 bits"),
    (-(2**63) - 1, "", r"is the int -9223372036854775809, which does not fit 64 bits"),
])
def test_unsupported_static_values_raise_type_error(tmp_path, odd, where, match):
  with pytest.raises(TypeError, match=rf"static value at layers/0/op/odd{where} \(of the struct "
                                      rf"IoOdd\) {match}") as err:
    io.save(tmp_path / "odd.qjax", {"layers": [{"op": IoOdd(value=jnp.zeros(1), odd=odd)}]})
  if "64 bits" not in match:
    assert "may hold None, bool, int, float, str, QuantSpec, or tuples or lists" in str(err.value)
  assert not os.listdir(tmp_path)


def test_unsupported_struct_children_raise_type_error():
  with pytest.raises(TypeError, match=r"the leaf at op/value is a float; a variables tree holds "
                                      r"dicts, lists, tuples, None and structs"):
    io.to_bytes({"op": IoOdd(value=0.5)})


def test_struct_nesting_counts_toward_max_depth():
  leaf = jnp.arange(3, dtype=jnp.int16)
  tree = leaf
  for _ in range(io.MAX_DEPTH):
    tree = IoOdd(value=tree, odd="x")
  restored = io.from_bytes(io.to_bytes(tree), target=tree)
  assert_bit_equal(tree, restored)
  with pytest.raises(ValueError, match=rf"more than MAX_DEPTH = {io.MAX_DEPTH} levels deep: the "
                                       rf"IoOdd at value/value/.*is at level {io.MAX_DEPTH + 1}"):
    io.to_bytes(IoOdd(value=tree))
  deep_static: Any = ()
  for _ in range(io.MAX_DEPTH + 1):
    deep_static = (deep_static,)
  with pytest.raises(ValueError, match=r"more than MAX_DEPTH .* the tuple at odd/0/0/0/0"):
    io.to_bytes(IoOdd(value=None, odd=deep_static))


def _nested_struct_payload(depth):
  """A msgpack payload nesting `depth` IoOdd struct nodes (3 msgpack levels each)."""
  pack = msgpack.packb
  prefix = (b"\x81" + pack("struct") + b"\x83" + pack("type") + pack("IoOdd") + pack("static")
            + b"\x81" + pack("odd") + b"\xc0" + pack("children") + b"\x81" + pack("value"))
  return b"\x81" + pack("tree") + prefix * depth + b"\x81" + pack("none") + b"\xc0"


def test_deeply_nested_struct_files_raise_value_error():
  restored = io.from_bytes(_rewrap(_nested_struct_payload(3)))
  assert restored == IoOdd(value=IoOdd(value=IoOdd(value=None)))
  with pytest.raises(ValueError, match=rf"at value/value/.*: dicts, lists, tuples and structs "
                                       rf"nest more than MAX_DEPTH = {io.MAX_DEPTH} levels"):
    io.from_bytes(_rewrap(_nested_struct_payload(io.MAX_DEPTH + 1)))


def test_struct_files_decode_only_plain_data():
  # The payload names the type; nothing else about the class comes from the file.
  data = io.to_bytes({"op": IoOdd(value=jnp.zeros(1), odd="x")})
  assert b"IoOdd" in data and b"test_io" not in data and b"__" not in data


# ------------------------------------------------------------------------------------------
# Bad files.


@pytest.fixture(name="good")
def _good():
  tree = {"fc": {"kernel": _random_qarray(QuantSpec(bits=8, axis=0), (3, 4)),
                 "bias": jnp.arange(3, dtype=jnp.int32)}}
  return tree, io.to_bytes(tree)


def _load_bytes(tmp_path, data, **kwargs):
  path = tmp_path / "bad.qjax"
  path.write_bytes(data)
  return io.load(path, **kwargs)


@pytest.mark.parametrize("mangle,match", [
    (lambda d: b"", r"truncated: 0 byte\(s\), less than the 20-byte"),
    (lambda d: d[:2], r"truncated: 2 byte\(s\)"),
    (lambda d: d[:13], r"truncated: 13 bytes, less than the 20-byte qjax header"),
    (lambda d: d[:-7], r"truncated: the header announces \d+ payload bytes, found \d+"),
    (lambda d: d + b"\0\0", r"corrupt: 2 unexpected bytes after"),
    (lambda d: b"PK\x03\x04" + d[4:], r"not a qjax variables file: it starts with b'PK.*"
                                      r"expected the magic b'QJAX'"),
    (lambda d: RNG.integers(0, 81, 64, dtype=np.uint8).tobytes(), "not a qjax variables file"),
    (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], r"corrupt: the CRC-32 of the header and "
                                                      r"payload is 0x[0-9a-f]{8}, the header "
                                                      r"expects 0x[0-9a-f]{8}\.$"),
    (lambda d: _rewrap(d[20:], version=3), r"unsupported format version 3: this qjax reads "
                                           r"versions 1 to 2 \(written by a newer qjax"),
    (lambda d: _rewrap(d[20:], version=0), r"unsupported format version 0: no qjax writes"),
    (lambda d: _rewrap(d[20:], length=len(d) - 19), r"corrupt: the header announces \d+ payload "
                                                    r"bytes, the file holds \d+"),
    # A damaged header field is corruption, not a file from a newer qjax.
    (lambda d: d[:4] + struct.pack("<I", 3) + d[8:], r"corrupt header: it reads format version 3"),
    (lambda d: d[:4] + struct.pack("<I", 0) + d[8:], r"corrupt header: it reads format version 0"),
    (lambda d: d[:8] + struct.pack("<Q", len(d)) + d[16:], r"corrupt header: the length field "
                                                          r"reads \d+, but the \d+ payload bytes"),
    (lambda d: _rewrap(b"\xc1garbage"), "corrupt: the payload is not valid msgpack"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, good, mangle, match):
  _, data = good
  with pytest.raises(ValueError, match=match) as err:
    _load_bytes(tmp_path, mangle(data))
  assert str(err.value).startswith(str(tmp_path / "bad.qjax") + ": ")


def _edit_payload(data, edit):
  payload = _payload(data)
  edit(payload["tree"])
  return _rewrap(serialization.msgpack_serialize(payload, in_place=True))


def _fc(tree):
  return dict(tree["dict"])["fc"]


def _set_kernel_field(field, value):
  def edit(tree):
    kernel = dict(_fc(tree)["dict"])["kernel"]["qarray"]
    if field == "spec_extra":
      kernel["spec"]["rounding"] = "up"
    elif field == "qvalue_dtype":
      kernel["qvalue"]["array"]["dtype"] = value
    else:
      kernel[field]["array"]["data"] = [value]
  return edit


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.update({"dict": [["fc", {"set": []}]]}),
     r"malformed payload at fc: unknown node type 'set'"),
    (_set_kernel_field("spec_extra", None),
     r"malformed payload at fc/kernel: the QuantSpec must have the fields"),
    (_set_kernel_field("qvalue_dtype", "object"), r"at fc/kernel/qvalue: unknown dtype 'object'"),
    (_set_kernel_field("qvalue_dtype", "int16"),
     r"at fc/kernel/qvalue: int16\[3, 4\] needs 24 bytes, found 12"),
    (_set_kernel_field("scale", np.float32([1, -1, 1]).tobytes()),
     r"at fc/kernel: the stored QArray is invalid: QArray.scale must be finite and > 0"),
    (_set_kernel_field("zero_point", np.int32([0, 0, 300]).tobytes()),
     r"the stored QArray is invalid: QArray.zero_point must lie in \[qmin, qmax\]"),
])
def test_malformed_payloads_with_valid_checksum(good, edit, match):
  _, data = good
  with pytest.raises(ValueError, match=match) as err:
    io.from_bytes(_edit_payload(data, edit), name="m.qjax")
  assert str(err.value).startswith("m.qjax: ")


def test_version_1_files_still_load(tmp_path, good):
  tree, data = good
  v1 = _rewrap_v1(data[20:])
  assert struct.unpack_from("<I", v1, 4) == (1,)
  assert_bit_equal(tree, _load_bytes(tmp_path, v1, target=tree))
  with pytest.raises(ValueError, match=r"corrupt: the payload's CRC-32 is 0x[0-9a-f]{8}"):
    io.from_bytes(v1[:40] + bytes([v1[40] ^ 4]) + v1[41:])
  with pytest.raises(ValueError, match=r"truncated: the header announces"):
    io.from_bytes(v1[:-1])
  with pytest.raises(ValueError, match=r"corrupt: 1 unexpected bytes after"):
    io.from_bytes(v1 + b"\0")


def test_the_checksum_covers_every_header_field(good):
  _, data = good
  assert struct.unpack_from("<I", data, 16) == (zlib.crc32(data[:16] + data[20:]),)
  for offset in range(4, 20):  # version, length and checksum fields
    for bit in range(8):
      damaged = data[:offset] + bytes([data[offset] ^ (1 << bit)]) + data[offset + 1:]
      with pytest.raises(ValueError, match="corrupt") as err:
        io.from_bytes(damaged, name="h.qjax")
      assert "unsupported" not in str(err.value) and "upgrade" not in str(err.value)


# ------------------------------------------------------------------------------------------
# Nesting depth.


def _nested(depth, leaf, kind="list"):
  """`leaf` inside `depth` nested lists or dicts, built without recursion."""
  for _ in range(depth):
    leaf = [leaf] if kind == "list" else {"k": leaf}
  return leaf


def test_trees_up_to_max_depth_roundtrip():
  leaf = _random_qarray(QuantSpec(bits=4, axis=0), (2, 3))  # the deepest msgpack node kind
  for kind in ("list", "dict"):
    tree = _nested(io.MAX_DEPTH, leaf, kind)
    restored = io.from_bytes(io.to_bytes(tree), target=tree)
    for _ in range(io.MAX_DEPTH):
      restored = restored[0] if kind == "list" else restored["k"]
    assert_bit_equal(leaf, restored)


@pytest.mark.parametrize("depth", [io.MAX_DEPTH + 1, 100_000])
def test_save_refuses_trees_deeper_than_max_depth(tmp_path, depth):
  with pytest.raises(ValueError, match=rf"more than MAX_DEPTH = {io.MAX_DEPTH} levels deep: the "
                                       rf"list at 0/0/0/0/0/0/0/0/\.\.\.\(\d+ more\)\.\.\./0/0/0 "
                                       rf"is at level {io.MAX_DEPTH + 1}"):
    io.save(tmp_path / "deep.qjax", _nested(depth, jnp.zeros(2)))
  assert not os.listdir(tmp_path)


def test_save_refuses_trees_that_contain_themselves():
  loop = [jnp.zeros(1)]
  loop.append({"again": loop})
  with pytest.raises(ValueError, match=r"MAX_DEPTH.*a container that holds itself"):
    io.to_bytes(loop)


def _nested_payload(depth, kind):
  """A msgpack payload nesting `depth` list (2 msgpack levels each) or dict (3) nodes."""
  node = b"\x81\xa4none\xc0"
  prefix = b"\x81\xa4list\x91" if kind == "list" else b"\x81\xa4dict\x91\x92\xa1k"
  return b"\x81\xa4tree" + prefix * depth + node


@pytest.mark.parametrize("depth,kind,match", [
    (io.MAX_DEPTH + 1, "list", rf"at 0/0/0/0/0/0/0/0/\.\.\.\(\d+ more\)\.\.\./0/0/0: dicts, lists, "
                               rf"tuples and structs nest more than MAX_DEPTH = {io.MAX_DEPTH} "
                               rf"levels"),
    (330, "dict", r"at k/k/k/k/k/k/k/k/.*more than MAX_DEPTH"),
    (500, "list", "more than MAX_DEPTH"),  # within msgpack's limit, past Python's recursion
    (100_000, "list", "corrupt: the payload is not valid msgpack"),
    (100_000, "dict", "corrupt: the payload is not valid msgpack"),
])
def test_deeply_nested_files_raise_value_error(depth, kind, match):
  with pytest.raises(ValueError, match=match):
    io.from_bytes(_rewrap(_nested_payload(depth, kind)))
  assert io.from_bytes(_rewrap(_nested_payload(3, kind))) in ([[[None]]], {"k": {"k": {"k": None}}})


# ------------------------------------------------------------------------------------------
# Any damaged file gives a ValueError.


_FUZZ_TREE = {"fc": {"kernel": _random_qarray(QuantSpec(bits=8, axis=0), (3, 4)),
                     "bias": jnp.arange(3, dtype=jnp.int32)},
              "layers": [None, (jnp.zeros((0, 2), jnp.bfloat16),)], 7: {},
              "op": Int8Conv(kernel=jnp.ones((1, 1, 1, 2), jnp.int8),
                             offset=jnp.zeros(2, jnp.int32), pad_value=jnp.int32(0),
                             requant=rq.FloatRequant(multiplier=jnp.float32(0.5),
                                                     zero_point=jnp.int32(0), lo=-128, hi=127,
                                                     relu=True),
                             strides=(1, 1), padding=((0, 0), (1, 1)), dilation=(1, 1), groups=1),
              "quantize": QuantizeOp(scale=jnp.float32(1), zero_point=jnp.int32(0),
                                     spec=QuantSpec(bits=8, signed=False))}
_FUZZ_FILE = io.to_bytes(_FUZZ_TREE)

_EDITS = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "delete", "insert"]), st.integers(0, 2**16),
              st.integers(0, 255)), min_size=1, max_size=4)


def _apply(data, edits):
  data = bytearray(data)
  for op, position, value in edits:
    i = position % len(data) if data else 0
    if op == "flip":
      data[i:i + 1] = bytes([data[i] ^ (1 << value % 8)]) if data else b""
    elif op == "set":
      data[i:i + 1] = bytes([value])
    elif op == "delete":
      del data[i:i + 1 + value % 3]
    else:
      data[i:i] = bytes([value]) * (1 + value % 3)
  return bytes(data)


@SETTINGS
@hypothesis.given(_EDITS, st.integers(0, len(_FUZZ_FILE)))
def test_damaged_files_raise_value_error(edits, keep):
  for damaged in (_apply(_FUZZ_FILE, edits), _FUZZ_FILE[:keep] if keep < len(_FUZZ_FILE) else b""):
    if damaged == _FUZZ_FILE:  # the edits cancelled out
      continue
    with pytest.raises(ValueError) as err:
      io.from_bytes(damaged, name="f.qjax")
    assert str(err.value).startswith("f.qjax: ") and len(str(err.value)) < 1000


@SETTINGS
@hypothesis.given(_EDITS, st.booleans())
def test_damaged_payloads_with_valid_checksum_raise_value_error(edits, as_numpy):
  # A payload edited by a buggy writer (its checksum recomputed) either still describes a tree
  # or fails with a ValueError: never another exception type, never a huge message.
  try:
    io.from_bytes(_rewrap(_apply(_FUZZ_FILE[20:], edits)), as_numpy=as_numpy, name="f.qjax")
  except ValueError as err:
    assert str(err).startswith("f.qjax: ") and len(str(err)) < 1000


def test_malformed_node_messages_stay_short():
  huge = {"array": {"dtype": "float32", "shape": [2**20], "data": [b"\xff" * 2**22],
                    "extra": "x" * 2**20}}
  payload = serialization.msgpack_serialize({"tree": {"dict": [["w" * 10_000, huge]]}},
                                            in_place=True)
  with pytest.raises(ValueError, match=r"malformed payload at w{37}\.\.\.: an array node needs "
                                       r"exactly the fields dtype, shape and data") as err:
    io.from_bytes(_rewrap(payload))
  assert len(str(err.value)) < 200


# ------------------------------------------------------------------------------------------
# Loading takes time and memory linear in the file size.


def test_successful_loads_build_no_descriptions(monkeypatch, good):
  tree, data = good
  big = {"w": jnp.zeros((256, 1024), jnp.float32), "q": tree, "int8": _converted("integer")}
  big_data = io.to_bytes(big)
  for helper in ("_describe", "_preview", "_list_str", "_short_repr", "_path_str"):
    monkeypatch.setattr(io, helper, lambda *a, name=helper: pytest.fail(f"{name} called"))
  assert_bit_equal(big, io.from_bytes(big_data, target=big))
  assert_bit_equal(tree, io.from_bytes(_rewrap_v1(data[20:]), target=tree))


def test_load_memory_is_linear_in_the_array_size():
  # Each level used to format its whole subtree (array bytes included) into a message string.
  array = RNG.integers(0, 256, 8 * 2**20, dtype=np.uint8)
  data = io.to_bytes({"a": {"b": [{"c": array}]}})
  tracemalloc.start()
  try:
    restored = io.from_bytes(data, as_numpy=True)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert _bits(restored["a"]["b"][0]["c"]) == _bits(array)
  assert peak < 2.5 * array.nbytes  # msgpack's copy of the bytes and the writable array


# ------------------------------------------------------------------------------------------
# Atomic saves.


def test_failed_save_removes_its_temporary_file_and_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "model.qjax"
  io.save(path, {"v": jnp.int32(1)})
  before = path.read_bytes()

  def failing_fsync(fd):
    raise OSError(errno.EIO, "Input/output error")

  monkeypatch.setattr(os, "fsync", failing_fsync)
  with pytest.raises(OSError, match=r"could not write .*model\.qjax: Input/output error; "
                                    r".*model\.qjax is left as it was\.$") as err:
    io.save(path, {"v": jnp.int32(2)})
  assert err.value.errno == errno.EIO and ".tmp" not in str(err.value)
  assert os.listdir(tmp_path) == ["model.qjax"] and path.read_bytes() == before

  def interrupted_fsync(fd):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "fsync", interrupted_fsync)
  with pytest.raises(KeyboardInterrupt):
    io.save(path, {"v": jnp.int32(3)})
  assert os.listdir(tmp_path) == ["model.qjax"] and path.read_bytes() == before


def test_save_errors_name_the_path_not_the_temporary_file(tmp_path):
  missing = tmp_path / "missing" / "model.qjax"
  with pytest.raises(FileNotFoundError, match=r"could not create a temporary file in the "
                                              r"directory of .*missing/model\.qjax") as err:
    io.save(missing, {"v": jnp.zeros(1)})
  assert ".tmp" not in str(err.value)
  (tmp_path / "dir.qjax").mkdir()
  with pytest.raises(OSError, match=r"could not rename the written temporary file onto "
                                    r".*dir\.qjax: ") as err:
    io.save(tmp_path / "dir.qjax", {"v": jnp.zeros(1)})
  assert ".tmp" not in str(err.value)
  assert os.listdir(tmp_path) == ["dir.qjax"] and not os.listdir(tmp_path / "dir.qjax")


def test_temporary_names_are_unique_per_thread(tmp_path, monkeypatch):
  renamed, real_replace = [], os.replace

  def recording_replace(src, dst):
    renamed.append(os.path.basename(src))
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", recording_replace)
  both_alive = threading.Barrier(2)  # so that the two threads have different idents

  def save_when_both_alive():
    both_alive.wait()
    io.save(tmp_path / "m.qjax", {"v": jnp.zeros(1)})

  workers = [threading.Thread(target=save_when_both_alive) for _ in range(2)]
  for worker in workers:
    worker.start()
  for worker in workers:
    worker.join()
  io.save(tmp_path / "m.qjax", {"v": jnp.zeros(1)})
  assert len(set(renamed)) == 3 and all(n.startswith(".m.qjax.") for n in renamed)
  assert len({n.split(".")[-2].rsplit("-", 1)[0] for n in renamed}) == 3  # pid-thread differ


def test_concurrent_saves_leave_one_complete_file(tmp_path):
  path = tmp_path / "m.qjax"
  trees = [{"v": jnp.full((64,), i, jnp.int32)} for i in range(6)]
  errors = []

  def save_repeatedly(tree):
    try:
      for _ in range(4):
        io.save(path, tree)
    except Exception as err:  # pylint: disable=broad-except
      errors.append(err)

  workers = [threading.Thread(target=save_repeatedly, args=(t,)) for t in trees]
  for worker in workers:
    worker.start()
  for worker in workers:
    worker.join()
  assert not errors and os.listdir(tmp_path) == ["m.qjax"]
  assert int(io.load(path)["v"][0]) in range(6)


def test_save_fsyncs_the_directory_and_tolerates_platforms_that_cannot(tmp_path, monkeypatch):
  synced, real_fsync = [], os.fsync

  def recording_fsync(fd):
    synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", recording_fsync)
  io.save(tmp_path / "m.qjax", {"v": jnp.zeros(1)})
  assert synced == [False, True]  # the file, then its directory after the rename

  def dir_refusing_fsync(fd):
    if stat.S_ISDIR(os.fstat(fd).st_mode):
      raise OSError(errno.EINVAL, "Invalid argument")
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", dir_refusing_fsync)
  io.save(tmp_path / "m.qjax", {"v": jnp.ones(1)})
  real_open = os.open

  def dir_refusing_open(name, flags, *args):
    if os.path.isdir(name):
      raise PermissionError(errno.EACCES, "Permission denied")
    return real_open(name, flags, *args)

  monkeypatch.setattr(os, "open", dir_refusing_open)
  io.save(tmp_path / "m.qjax", {"v": jnp.full(1, 2.0)})
  assert float(io.load(tmp_path / "m.qjax")["v"][0]) == 2.0
  assert os.listdir(tmp_path) == ["m.qjax"]


def test_saved_files_get_the_usual_permissions(tmp_path):
  old_umask = os.umask(0o027)
  try:
    io.save(tmp_path / "m.qjax", {"v": jnp.zeros(1)})
    (tmp_path / "plain").write_bytes(b"")
  finally:
    os.umask(old_umask)
  assert stat.S_IMODE(os.stat(tmp_path / "m.qjax").st_mode) == (
      stat.S_IMODE(os.stat(tmp_path / "plain").st_mode))


# ------------------------------------------------------------------------------------------
# Targets.


def _with(tree, path, value):
  """A shallow copy of nested dicts `tree` with `value` at `path`."""
  if not path:
    return value
  return {**tree, path[0]: _with(tree.get(path[0]), path[1:], value)}


@pytest.mark.parametrize("path,value,match", [
    (("fc", "bias"), jnp.zeros(4, jnp.int32), r"at fc/bias: expected int32\[4\], found int32\[3\]"),
    (("fc", "bias"), jnp.zeros(3, jnp.float32),
     r"at fc/bias: expected float32\[3\], found int32\[3\]"),
    (("fc", "bias"), jax.ShapeDtypeStruct((3,), jnp.int16), r"expected int16\[3\]"),
    (("fc", "kernel"), jnp.zeros((3, 4), jnp.int8),
     r"at fc/kernel: expected int8\[3, 4\], found QArray\(int8\[3, 4\]"),
    (("fc", "kernel"), _random_qarray(QuantSpec(bits=8, axis=1), (3, 4)),
     r"at fc/kernel: expected QArray\(int8\[3, 4\], QuantSpec\(.*axis=1\)\), found "
     r"QArray\(int8\[3, 4\], QuantSpec\(.*axis=0\)\)"),
    (("fc", "kernel"), _random_qarray(QuantSpec(bits=8, axis=0), (3, 5)),
     r"at fc/kernel/qvalue: expected int8\[3, 5\], found int8\[3, 4\]"),
    (("fc",), {"kernel": None}, r"at fc: expected keys \['kernel'\], found \['kernel', 'bias'\] "
                                r"\(missing \[\], unexpected \['bias'\]\)"),
    (("fc", "extra"), jnp.zeros(()), r"at fc: .*missing \['extra'\]"),
    (("fc", "bias"), [jnp.zeros(3, jnp.int32)], r"at fc/bias: expected a list of length 1"),
    (("fc", "bias"), None, r"at fc/bias: expected None, found int32\[3\]"),
    (("fc",), (jnp.zeros(3, jnp.int32),), r"at fc: expected a tuple of length 1, found a dict"),
])
def test_target_mismatch_names_the_first_path(tmp_path, good, path, value, match):
  tree, data = good
  target = _with(tree, path, value)
  with pytest.raises(ValueError, match=match) as err:
    _load_bytes(tmp_path, data, target=target)
  assert "does not match the target" in str(err.value)
  assert str(tmp_path / "bad.qjax") in str(err.value)


def test_abstract_target_matches():
  tree = _tree()
  abstract = jax.eval_shape(lambda t: t, tree)
  assert_bit_equal(tree, io.from_bytes(io.to_bytes(tree), target=abstract))


# ------------------------------------------------------------------------------------------
# What cannot be saved.


class Pair(NamedTuple):
  a: jax.Array
  b: jax.Array


@pytest.mark.parametrize("tree,match", [
    ({"fc": {"lr": 0.1}}, r"leaf at fc/lr is a float.*np.asarray"),
    ({"p": Pair(jnp.zeros(1), jnp.zeros(1))}, r"Pair at p is a NamedTuple.*_asdict"),
    ({"s": np.array(["a"])}, r"array at s has dtype <U1, which cannot be stored"),
    ({("a", 1): jnp.zeros(1)}, r"dict keys must be str or int.*\('a', 1\)"),
])
def test_unstorable_trees_raise_type_error(tree, match):
  with pytest.raises(TypeError, match=match):
    io.to_bytes(tree)


# ------------------------------------------------------------------------------------------
# Sizes.


def test_model_size_exact_on_hand_built_tree():
  k8 = _random_qarray(QuantSpec(bits=8, symmetric=True, axis=0), (3, 4))
  k4 = _random_qarray(QuantSpec(bits=4), (2, 5))
  k12 = _random_qarray(QuantSpec(bits=12, axis=1), (3, 3))
  tree = {"fc1": {"kernel": k8, "bias": jnp.zeros(3, jnp.int32)},
          "fc2": {"kernel": k4, "half": jnp.zeros(5, jnp.float16),
                  "bf": jnp.zeros((2, 2), jnp.bfloat16)},
          "conv": [k12, jnp.zeros(3, jnp.int4)]}
  # fc1: 12 int8 + 3 scales * 4 + 3 zero points * 4, bias 3 * 4
  # fc2: 10 int8 + 4 + 4, float16 5 * 2, bfloat16 4 * 2
  # conv: 9 int16 * 2 + 3 * 4 + 3 * 4, int4 stored in bytes: 3
  assert report.model_size(tree) == (12 + 12 + 12 + 12) + (10 + 8 + 10 + 8) + (18 + 24 + 3)
  assert report.model_size(k8) == k8.nbytes and report.model_size(k12) == k12.nbytes
  # Packed (as files store them): the 4-bit values take ceil(10 * 4 / 8) = 5 bytes; 12-bit
  # values keep their int16 storage (18), plain int4 arrays a byte per value (3).
  assert report.model_size(tree, packed=True) == (48) + (5 + 8 + 10 + 8) + (18 + 24 + 3)
  assert report.model_size(jax.eval_shape(lambda t: t, tree)) == report.model_size(tree)
  assert report.model_size({}) == 0
  overhead = len(io.to_bytes(tree)) - report.model_size(tree, packed=True)
  assert 0 < overhead < 120 * len(jax.tree_util.tree_leaves(tree))
  with pytest.raises(TypeError, match="leaf at fc/n is a int"):
    report.model_size({"fc": {"n": 3}})


# ------------------------------------------------------------------------------------------
# Layer report.


def _sqnr64(w, w_hat):
  w, w_hat = np.float64(w), np.float64(w_hat)
  err = np.sum((w - w_hat) ** 2)
  return np.inf if err == 0 else 10 * np.log10(np.sum(w**2) / err)


def _dequantize64(qa, axis):
  shape = [1] * qa.ndim
  shape[axis] = -1
  scale = np.float64(qa.scale).reshape(shape)
  zero_point = np.float64(qa.zero_point).reshape(shape)
  return scale * (np.float64(qa.qvalue) - zero_point)


@pytest.fixture(name="models")
def _models():
  """Float variables (Flax layouts) and integer variables with output-channel-first kernels."""
  w_fc = RNG.standard_normal((12, 5)).astype(np.float32)          # Dense (in, out)
  w_sq = RNG.standard_normal((6, 6)).astype(np.float32)           # square Dense
  w_conv = RNG.standard_normal((3, 3, 2, 4)).astype(np.float32)   # Conv HWIO
  float_vars = {"params": {"fc": {"kernel": jnp.asarray(w_fc), "bias": jnp.ones(5)},
                           "sq": {"kernel": jnp.asarray(w_sq)},
                           "conv": {"kernel": jnp.asarray(w_conv)}}}
  per_channel = QuantSpec(bits=8, symmetric=True, axis=0)
  int_vars = {"int8": {
      "Quantize_0": {"scale": jnp.float32(0.05), "zero_point": jnp.int32(-128)},
      "fc": {"kernel": qarray.quantize_array(jnp.asarray(w_fc.T), per_channel),
             "bias": jnp.zeros(5, jnp.int32),
             "output": {"scale": jnp.full(5, 0.1, jnp.float32),
                        "zero_point": jnp.arange(5, dtype=jnp.int32)}},
      "sq": {"kernel": qarray.quantize_array(jnp.asarray(w_sq.T),
                                             QuantSpec(bits=4, symmetric=True, axis=0))},
      "conv": {"kernel": qarray.quantize_array(jnp.asarray(w_conv.transpose(3, 2, 0, 1)),
                                               per_channel)},
      "head": {"kernel": qarray.quantize_array(jnp.ones((2, 2)), QuantSpec(bits=8))},
  }}
  return float_vars, int_vars, {"fc": w_fc.T, "sq": w_sq.T, "conv": w_conv.transpose(3, 2, 0, 1)}


def test_layer_report_rows(models):
  float_vars, int_vars, aligned = models
  rows = {row.path: row for row in report.layer_report(int_vars, float_vars)}
  assert set(rows) == {"int8/Quantize_0", "int8/fc/kernel", "int8/fc/bias", "int8/fc/output",
                       "int8/sq/kernel", "int8/conv/kernel", "int8/head/kernel"}
  for name, w in aligned.items():
    row, qa = rows[f"int8/{name}/kernel"], int_vars["int8"][name]["kernel"]
    assert row.kind == "qarray" and row.spec == qa.spec and row.shape == qa.shape
    assert row.nbytes == qa.qvalue.size * qa.qvalue.dtype.itemsize + 8 * qa.scale.size
    assert row.reference == f"params/{name}/kernel"
    np.testing.assert_allclose(row.sqnr_db, _sqnr64(w, _dequantize64(qa, 0)), rtol=1e-12)
    assert row.scale == (float(np.min(qa.scale)), float(np.max(qa.scale)))
    assert row.zero_point == (0, 0)
  assert rows["int8/fc/kernel"].reference_axes == (1, 0)
  assert rows["int8/sq/kernel"].reference_axes == (1, 0)  # not the same-shape identity
  assert rows["int8/conv/kernel"].reference_axes == (3, 2, 0, 1)
  assert 35 < rows["int8/fc/kernel"].sqnr_db < 60 and 10 < rows["int8/sq/kernel"].sqnr_db < 30
  assert rows["int8/head/kernel"].sqnr_db is None  # no float counterpart
  bias = rows["int8/fc/bias"]
  assert (bias.kind, bias.dtype, bias.shape, bias.nbytes, bias.sqnr_db) == (
      "array", "int32", (5,), 20, None)
  output = rows["int8/fc/output"]
  assert (output.kind, output.dtype, output.nbytes) == ("qparams", "float32/int32", 40)
  assert output.scale == (float(np.float32(0.1)),) * 2 and output.zero_point == (0, 4)
  assert rows["int8/Quantize_0"].zero_point == (-128, -128)
  assert sum(r.nbytes for r in rows.values()) == report.model_size(int_vars)
  assert all(r.sqnr_db is None for r in report.layer_report(int_vars))


def test_layer_report_float_leaves_and_dynamic_trees(models):
  float_vars, _, _ = models
  halved = jax.tree_util.tree_map(lambda x: x.astype(jnp.float16), float_vars)
  dynamic = {"params": {"fc": {"kernel": qarray.quantize_array(float_vars["params"]["fc"]["kernel"],
                                                               QuantSpec(bits=8, axis=1)),
                               "bias": float_vars["params"]["fc"]["bias"]}}}
  rows = {r.path: r for r in report.layer_report(halved, float_vars)}
  w = np.asarray(float_vars["params"]["fc"]["kernel"])
  np.testing.assert_allclose(rows["params/fc/kernel"].sqnr_db,
                             _sqnr64(w, np.float16(w)), rtol=1e-12)
  assert rows["params/fc/bias"].sqnr_db == math.inf  # ones are exact in float16
  rows = {r.path: r for r in report.layer_report(dynamic, float_vars["params"])}
  assert rows["params/fc/kernel"].reference == "fc/kernel"
  assert rows["params/fc/kernel"].reference_axes == (0, 1)
  np.testing.assert_allclose(rows["params/fc/kernel"].sqnr_db,
                             _sqnr64(w, _dequantize64(dynamic["params"]["fc"]["kernel"], 1)),
                             rtol=1e-12)


def test_format_report(models):
  float_vars, int_vars, _ = models
  rows = report.layer_report(int_vars, float_vars)
  text = report.format_report(rows)
  lines = text.splitlines()
  assert lines[0].split()[:4] == ["path", "dtype", "shape", "bytes"]
  for row in rows:
    assert any(line.startswith(row.path + " ") for line in lines)
  assert lines[-1].split() == ["total", str(sum(r.nbytes for r in rows))]
  by_path = {r.path: r for r in rows}
  assert f"{by_path['int8/fc/kernel'].sqnr_db:.2f}" in text
  assert "int4 sym axis=0" in text and "0..4" in text
  bytes_col = lines[0].index("bytes") + len("bytes")
  assert all(line[bytes_col - 1].isdigit() for line in lines[1:])  # bytes right-aligned


# ------------------------------------------------------------------------------------------
# Property: any tree of arrays, QArrays and structs comes back bit for bit.


@st.composite
def array_leaves(draw):
  dtype = draw(st.sampled_from(JAX_DTYPES))
  shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
  seed = draw(st.integers(0, 2**32 - 1))
  return jnp.asarray(_random_array(dtype, shape, np.random.default_rng(seed)))


@st.composite
def qarray_leaves(draw):
  bits = draw(st.integers(2, 16))
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
  spec = QuantSpec(bits=bits, signed=draw(st.booleans()), symmetric=draw(st.booleans()),
                   narrow_range=draw(st.booleans()),
                   reduce_range=draw(st.booleans()) and bits > 2,
                   axis=draw(st.none() | st.integers(-len(shape), len(shape) - 1)))
  return _random_qarray(spec, shape, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))


STATICS = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=5) | st.sampled_from(SPECS),
    lambda items: st.lists(items, max_size=3) | st.lists(items, max_size=3).map(tuple),
    max_leaves=5)

TREES = st.recursive(
    array_leaves() | qarray_leaves() | st.none(),
    lambda children: (st.lists(children, max_size=3)
                      | st.lists(children, max_size=3).map(tuple)
                      | st.builds(lambda value, odd: IoOdd(value=value, odd=odd), children, STATICS)
                      # jax sorts dict keys, so one dict holds str keys or int keys, not both
                      | st.dictionaries(st.text(max_size=5), children, max_size=3)
                      | st.dictionaries(st.integers(-3, 3), children, max_size=3)),
    max_leaves=8)


@SETTINGS
@hypothesis.given(TREES)
def test_roundtrip_property(tree):
  data = io.to_bytes(tree)
  restored = io.from_bytes(data, target=tree)
  assert_bit_equal(tree, restored)
  assert report.model_size(restored) == report.model_size(tree)
