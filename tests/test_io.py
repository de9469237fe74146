"""qjax.io: bit-exact save / load of variables pytrees with QArrays, the errors for bad files
and mismatched targets, model_size, and the per-layer report with SQNR against float weights."""

import math
import os
import struct
import zlib
from typing import NamedTuple

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from qjax import QArray, QuantSpec, io, qarray, report

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
  channels = shape[spec.axis] if spec.per_channel else None
  qshape = () if channels is None else (channels,)
  qvalue = rng.integers(spec.qmin, spec.qmax + 1, shape).astype(spec.storage_dtype)
  scale = rng.uniform(1e-4, 2.0, qshape).astype(np.float32)
  if spec.symmetric:
    zero_point = np.full(qshape, spec.symmetric_zero_point, np.int32)
  else:
    zero_point = rng.integers(spec.qmin, spec.qmax + 1, qshape).astype(np.int32)
  return QArray(jnp.asarray(qvalue), jnp.asarray(scale), jnp.asarray(zero_point), spec)


def _bits(x):
  """Bytes, dtype and shape of an array leaf: equal only for bit-identical arrays."""
  arr = np.asarray(x)
  return arr.dtype, arr.shape, arr.tobytes()


def assert_bit_equal(expected, restored):
  e_leaves, e_def = jax.tree_util.tree_flatten(expected, is_leaf=qarray.is_qarray)
  r_leaves, r_def = jax.tree_util.tree_flatten(restored, is_leaf=qarray.is_qarray)
  assert r_def == e_def
  for e, r in zip(e_leaves, r_leaves):
    if isinstance(e, QArray):
      assert isinstance(r, QArray) and r.spec == e.spec
      for name in ("qvalue", "scale", "zero_point"):
        assert _bits(getattr(r, name)) == _bits(getattr(e, name))
    else:
      assert isinstance(r, jax.Array)
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


def _rewrap(payload, version=io.FORMAT_VERSION):
  """A file around `payload` bytes with a correct length and checksum."""
  return struct.pack("<4sIQI", io.MAGIC, version, len(payload), zlib.crc32(payload)) + payload


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
    (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], r"corrupt: the payload's CRC-32 is "
                                                      r"0x[0-9a-f]{8}, the header expects"),
    (lambda d: d[:4] + struct.pack("<I", 2) + d[8:], r"unsupported format version 2: this qjax "
                                                     r"reads version 1 \(written by a newer"),
    (lambda d: d[:4] + struct.pack("<I", 0) + d[8:], r"unsupported format version 0.*corrupt"),
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
  # Packed: 4-bit values take ceil(10 * 4 / 8) = 5 bytes, 12-bit ceil(9 * 12 / 8) = 14, int4 2.
  assert report.model_size(tree, packed=True) == (48) + (5 + 8 + 10 + 8) + (14 + 24 + 2)
  assert report.model_size(jax.eval_shape(lambda t: t, tree)) == report.model_size(tree)
  assert report.model_size({}) == 0
  overhead = len(io.to_bytes(tree)) - report.model_size(tree)
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
# Property: any tree of arrays and QArrays comes back bit for bit.


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


TREES = st.recursive(
    array_leaves() | qarray_leaves() | st.none(),
    lambda children: (st.lists(children, max_size=3)
                      | st.lists(children, max_size=3).map(tuple)
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
