"""qjax.io's packed QArray values: QArrays of at most 4 bits stored at `qarray.packed_bits`
bits per value (spec.bits, or spec.bits - 1 on an odd grid), bit-exact round trips, the byte
layout, exact sizes against report.model_size(packed=True), bad packed nodes, files with
unpacked qvalues, and a converted 4-bit model that applies identically after a round trip."""

from __future__ import annotations

import math
import os
import re
import struct
import zlib
from typing import Any

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest

import qjax
import qjax.nn as qnn
from qjax import QArray, QuantSpec, io, qarray, report
from qjax import observers as obs
from support.cases import qarray_of

SETTINGS = hypothesis.settings(deadline=None, max_examples=50, print_blob=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])
BINARY = QuantSpec(bits=2, symmetric=True, narrow_range=True)


def _qarray(values: Any, spec: QuantSpec, *, rng: Any = None) -> QArray:
  """A QArray of the integer `values` with random positive scales (and, when affine, zero
  points) of `spec`'s shape."""
  return qarray_of(values, spec, rng if rng is not None else np.random.default_rng(0))


def _expected_bits(spec: QuantSpec, values: np.ndarray) -> int:
  """The documented rule, written out independently of qjax."""
  if spec.bits > 4:
    return 8 * np.dtype(spec.storage_dtype).itemsize
  all_odd = values.size > 0 and bool(np.all(values.astype(np.int64) % 2 == 1))
  return spec.bits - 1 if all_odd else spec.bits


def _payload(data: bytes) -> Any:
  return msgpack.unpackb(data[20:], raw=False, strict_map_key=False)


def _file(tree_node: Any) -> bytes:
  """A version-2 file around the msgpack node `tree_node` (header and checksum as documented)."""
  payload = msgpack.packb({"tree": tree_node}, strict_types=True)
  head = struct.pack("<4sIQ", b"QJAX", 2, len(payload))
  return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def _prefix(n: int) -> int:
  """Bytes of msgpack's length prefix of an n-byte bin object."""
  return 2 if n < 256 else 3 if n < 65536 else 5


def _assert_same(a: QArray, b: QArray) -> None:
  assert b.spec == a.spec
  for name in ("qvalue", "scale", "zero_point"):
    x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
    assert x.dtype == y.dtype and x.shape == y.shape, name
    assert x.tobytes() == y.tobytes(), name


# ------------------------------------------------------------------------------------------
# Round trips.


@st.composite
def low_bit_qarrays(draw) -> QArray:
  """A QArray of 2..4 bits: any flags, per-tensor or per-channel, any shape (empty, scalar,
  odd sizes); values anywhere on the grid, only odd levels, binary +-1 or DoReFa's
  2m - (2^k - 1) on a (k + 1)-bit grid."""
  kind = draw(st.sampled_from(["grid", "odd", "binary", "dorefa"]))
  shape = tuple(draw(st.lists(st.integers(0, 7) if draw(st.booleans()) else st.integers(1, 23),
                              max_size=3)))
  per_channel = bool(shape) and draw(st.booleans())
  axis = draw(st.integers(-len(shape), len(shape) - 1)) if per_channel else None
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  if kind == "binary":
    spec = QuantSpec(bits=2, symmetric=True, narrow_range=True, axis=axis)
    values = rng.choice([-1, 1], shape)
  elif kind == "dorefa":
    k = draw(st.integers(1, 3))
    spec = QuantSpec(bits=k + 1, symmetric=True, narrow_range=draw(st.booleans()), axis=axis)
    values = 2 * rng.integers(0, 2**k, shape) - (2**k - 1)
  else:
    bits = draw(st.integers(2, 4))
    spec = QuantSpec(bits=bits, signed=draw(st.booleans()), symmetric=draw(st.booleans()),
                     narrow_range=draw(st.booleans()),
                     reduce_range=bits > 2 and draw(st.booleans()), axis=axis)
    levels = np.arange(spec.qmin, spec.qmax + 1)
    if kind == "odd":
      levels = levels[levels % 2 == 1]
    values = rng.choice(levels, shape)
  return _qarray(values, spec, rng=rng)


@SETTINGS
@hypothesis.given(low_bit_qarrays())
def test_round_trip_is_bit_exact_and_sized_by_the_rule(qa):
  tree = {"layer": {"kernel": qa, "bias": jnp.zeros(3, jnp.int32)}}
  data = io.to_bytes(tree)
  restored = io.from_bytes(data, target=tree)
  _assert_same(qa, restored["layer"]["kernel"])
  _assert_same(qa, io.from_bytes(data, as_numpy=True)["layer"]["kernel"])
  values = np.asarray(qa.qvalue)
  bits = _expected_bits(qa.spec, values)
  assert qarray.packed_bits(qa) == bits
  node = dict(_payload(data)["tree"]["dict"])["layer"]["dict"][0][1]["qarray"]["qvalue"]
  packed = node["packed"]
  assert packed["bits"] == bits and packed["odd"] == (bits < qa.spec.bits)
  assert packed["shape"] == list(qa.shape)
  assert len(b"".join(packed["data"])) == math.ceil(values.size * bits / 8)
  # File size = model_size(packed=True) + framing; against the file with an unpacked qvalue
  # (an array node), the framing grows by 6 bytes (5 for uint8) less the shorter prefix.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(qarray, "packed_form", lambda qa: None)
    unpacked = io.to_bytes(tree)
  assert set(dict(_payload(unpacked)["tree"]["dict"])["layer"]["dict"][0][1]["qarray"]["qvalue"]
             ) == {"array"}
  _assert_same(qa, io.from_bytes(unpacked)["layer"]["kernel"])
  growth = ((6 if qa.spec.signed else 5) - _prefix(values.size)
            + _prefix(math.ceil(values.size * bits / 8)))
  assert (len(data) - report.model_size(tree, packed=True)
          == len(unpacked) - report.model_size(tree) + growth)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (7,), (9,), (3, 5), (2, 3, 11)])
@pytest.mark.parametrize("spec,levels", [
    (QuantSpec(bits=2, symmetric=True, narrow_range=True), [-1, 1]),          # binary: 1 bit
    (QuantSpec(bits=2, symmetric=True, narrow_range=True, axis=-1), [-1, 0, 1]),  # ternary
    (QuantSpec(bits=3, signed=False, axis=0), [0, 1, 2, 3, 4, 5, 6, 7]),
    (QuantSpec(bits=4, symmetric=True, axis=0), list(range(-8, 8))),
    (QuantSpec(bits=4, symmetric=True, narrow_range=True), [-7, -5, -3, -1, 1, 3, 5, 7]),
])
def test_shapes_and_sizes(shape, spec, levels):
  if spec.per_channel and not shape:
    spec = QuantSpec(bits=spec.bits, signed=spec.signed, symmetric=spec.symmetric,
                     narrow_range=spec.narrow_range)
  qa = _qarray(np.random.default_rng(1).choice(levels, shape), spec)
  data = io.to_bytes({"w": qa})
  _assert_same(qa, io.from_bytes(data)["w"])
  bits = _expected_bits(spec, np.asarray(qa.qvalue))
  assert len(b"".join(_payload(data)["tree"]["dict"][0][1]["qarray"]["qvalue"]["packed"]["data"])
             ) == -(-math.prod(shape) * bits // 8)
  assert report.model_size({"w": qa}, packed=True) == (-(-math.prod(shape) * bits // 8)
                                                       + 8 * qa.scale.size)


def test_byte_layout_is_a_little_endian_bit_stream():
  def stream(values, spec):
    node = _payload(io.to_bytes({"w": _qarray(values, spec)}))["tree"]["dict"][0][1]
    return node["qarray"]["qvalue"]["packed"]
  four = stream([1, 2, 3], QuantSpec(bits=4, signed=False))
  assert (four["bits"], four["odd"], four["low"], b"".join(four["data"])) == (4, False, 0,
                                                                              b"\x21\x03")
  # v = q + 4 = [7, 0, 5]: bits 0-2, 3-5, 6-8.
  three = stream([3, -4, 1], QuantSpec(bits=3))
  assert (three["bits"], three["low"], b"".join(three["data"])) == (3, -4, b"\x47\x01")
  # binary: v = (q + 1) / 2, eight per byte, the first value in the lowest bit
  one = stream([1, -1, -1, 1, 1, 1, 1, 1, -1], BINARY)
  assert (one["bits"], one["odd"], one["low"], b"".join(one["data"])) == (1, True, -1,
                                                                          b"\xf9\x00")
  # DoReFa 3-bit weights 2m - 7 on a 4-bit grid: v = (q + 7) / 2 = m, three bits each
  dorefa = stream([-7, 7, 1], QuantSpec(bits=4, symmetric=True))
  assert (dorefa["bits"], dorefa["odd"], dorefa["low"], b"".join(dorefa["data"])) == (
      3, True, -7, bytes([0 | 7 << 3 | (4 & 3) << 6, 4 >> 2]))


def test_wider_qarrays_keep_their_array_nodes(monkeypatch):
  tree = {"a": _qarray(np.arange(-5, 5), QuantSpec(bits=8)),
          "b": _qarray(np.arange(-5, 5) * 2 + 1, QuantSpec(bits=5)),
          "c": _qarray(np.arange(10), QuantSpec(bits=12, axis=0))}
  nodes = dict(_payload(io.to_bytes(tree))["tree"]["dict"])
  assert all(set(nodes[k]["qarray"]["qvalue"]) == {"array"} for k in tree)
  assert [qarray.packed_bits(tree[k]) for k in "abc"] == [8, 8, 16]
  assert report.model_size(tree, packed=True) == report.model_size(tree)


def test_packed_bits_rule_and_abstract_values():
  assert qarray.packed_bits(_qarray([1, -1], BINARY)) == 1
  assert qarray.packed_bits(_qarray([1, 0], BINARY)) == 2
  assert qarray.packed_bits(_qarray(np.zeros((0, 3)), BINARY)) == 2
  assert qarray.packed_bits(_qarray([3, 1], QuantSpec(bits=3, signed=False))) == 2
  assert qarray.packed_form(_qarray([1, 3], QuantSpec(bits=3, signed=False))) == (2, True, 1)
  abstract = jax.eval_shape(lambda q: q, _qarray([1, -1], BINARY))
  assert qarray.packed_bits(abstract) == 2  # values unknown: spec.bits, an upper bound
  assert report.model_size(abstract, packed=True) == 1 + 8
  assert jax.jit(lambda q: jnp.int32(qarray.packed_bits(q)))(_qarray([1, -1], BINARY)) == 2
  with pytest.raises(TypeError, match=r"qa must be a qjax\.QArray; got ndarray"):
    qarray.packed_bits(np.zeros(3))
  with pytest.raises(TypeError, match="odd must be True or False; got 1"):
    qarray.packed_form_for(BINARY, 1)


def test_large_and_chunked_packing(monkeypatch):
  rng = np.random.default_rng(3)
  big = _qarray(rng.integers(-8, 8, (1001, 999)), QuantSpec(bits=4, symmetric=True, axis=0))
  restored = io.from_bytes(io.to_bytes({"w": big}))["w"]
  _assert_same(big, restored)
  monkeypatch.setattr(io, "_CHUNK_BYTES", 5)
  small = _qarray(rng.choice([-3, -1, 1, 3], 77), QuantSpec(bits=3, symmetric=True))
  data = io.to_bytes({"w": small})
  chunks = _payload(data)["tree"]["dict"][0][1]["qarray"]["qvalue"]["packed"]["data"]
  assert [len(c) for c in chunks] == [5, 5, 5, 5]  # 77 values * 2 bits = 20 bytes
  _assert_same(small, io.from_bytes(data)["w"])


# ------------------------------------------------------------------------------------------
# Files with unpacked qvalues; bad packed nodes.


def test_files_with_unpacked_qvalues_still_load(tmp_path):
  qa = _qarray([[1, -1, 1], [-1, -1, 1]], QuantSpec(bits=2, symmetric=True, narrow_range=True,
                                                      axis=0))
  fields = ("bits", "signed", "symmetric", "narrow_range", "reduce_range", "axis")
  node = {"qarray": {"spec": {f: getattr(qa.spec, f) for f in fields},
                     "qvalue": {"array": {"dtype": "int8", "shape": [2, 3],
                                          "data": [np.asarray(qa.qvalue).tobytes()]}},
                     "scale": {"array": {"dtype": "float32", "shape": [2],
                                         "data": [np.asarray(qa.scale).astype("<f4").tobytes()]}},
                     "zero_point": {"array": {"dtype": "int32", "shape": [2],
                                              "data": [b"\0" * 8]}}}}
  path = tmp_path / "old.qjax"
  path.write_bytes(_file({"dict": [["w", node]]}))
  _assert_same(qa, io.load(path)["w"])
  io.save(path, io.load(path))  # re-saved: packed, one byte for the six values
  assert set(_payload(path.read_bytes())["tree"]["dict"][0][1]["qarray"]["qvalue"]) == {"packed"}
  _assert_same(qa, io.load(path)["w"])


def _packed_node(values, spec, **edits) -> dict:
  node = _payload(io.to_bytes({"w": _qarray(values, spec)}))["tree"]
  body = node["dict"][0][1]["qarray"]["qvalue"]["packed"]
  for key, value in edits.items():
    if value is KeyError:
      del body[key]
    else:
      body[key] = value
  return node


@pytest.mark.parametrize("values,spec,edits,match", [
    ([1, 2, 3], QuantSpec(bits=4), {"data": [b"\x00"]},
     "3 packed 4-bit values need 2 bytes, found 1"),
    ([1, 2, 3], QuantSpec(bits=4), {"data": [b"\x00" * 3]}, "need 2 bytes, found 3"),
    ([1, 2, 3], QuantSpec(bits=4), {"bits": 0}, r"bits must be an int in \[1, 4\], found 0"),
    ([1, 2, 3], QuantSpec(bits=4), {"bits": 5}, r"bits must be an int in \[1, 4\], found 5"),
    ([1, 2, 3], QuantSpec(bits=4), {"bits": "4"}, r"found '4'"),
    ([1, 2, 3], QuantSpec(bits=4), {"bits": 3}, "expected bits=4, low=-8"),
    ([1, 2, 3], QuantSpec(bits=4), {"low": -7}, "do not match the even grid"),
    ([1, 2, 3], QuantSpec(bits=4), {"odd": 1}, "odd must be true or false, found 1"),
    ([1, 2, 3], QuantSpec(bits=4), {"odd": True}, "expected bits=3, low=-7"),
    ([1, 2, 3], QuantSpec(bits=4), {"shape": [2]}, "2 packed 4-bit values need 1 bytes, found 2"),
    ([1, 2, 3], QuantSpec(bits=4), {"shape": [-3]}, r"bad shape \[-3\]"),
    ([1, 2, 3], QuantSpec(bits=4), {"data": b"\x00\x00"}, "data must be a list of bytes"),
    ([1, 2, 3], QuantSpec(bits=4), {"data": KeyError}, "needs exactly the fields bits, odd"),
    ([1, 2, 3], QuantSpec(bits=4), {"data": [b"\x00\x10"]}, "padding bits"),
    # narrow 3-bit grid [-3, 3]: v = 7 is q = 4
    ([1, 2, 3], QuantSpec(bits=3, narrow_range=True, symmetric=True), {"data": [b"\x07\x00"]},
     r"packed value at flat index 0 is 4, outside the grid \[qmin, qmax\] = \[-3, 3\]"),
    # reduce_range 3-bit odd grid [-2, 1]: odd levels -1, 1; v = 3 is q = 5
    ([1, -1, 1], QuantSpec(bits=3, reduce_range=True), {"data": [b"\x30"]},
     "flat index 2 is 5, outside the grid"),
])
def test_bad_packed_nodes_raise(tmp_path, values, spec, edits, match):
  path = tmp_path / "bad.qjax"
  path.write_bytes(_file(_packed_node(values, spec, **edits)))
  with pytest.raises(ValueError, match=f"{re.escape(str(path))}: malformed payload at "
                                       f"w/qvalue: .*{match}"):
    io.load(path)


def test_packed_node_on_a_wide_spec_raises():
  node = _payload(io.to_bytes({"w": _qarray([1, 2, 3], QuantSpec(bits=4))}))["tree"]
  node["dict"][0][1]["qarray"]["spec"]["bits"] = 6
  with pytest.raises(ValueError, match=r"<bytes>: malformed payload at w/qvalue: packed values "
                                       r"need spec.bits <= 4, the spec has bits=6"):
    io.from_bytes(_file(node))


# ------------------------------------------------------------------------------------------
# A converted model.


class _Mlp(nn.Module):
  qconfig: Any

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(self.qconfig, name="quant")(x, mode=mode)
    x = qnn.QuantDense(24, qconfig=self.qconfig, name="fc1", activation=nn.relu)(x, mode=mode)
    x = qnn.QuantDense(10, qconfig=self.qconfig, name="fc2")(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


def test_converted_4bit_model_round_trips_and_applies_identically(tmp_path):
  qconfig = qnn.QConfig(
      activation=obs.MinMaxObserver(spec=QuantSpec(bits=8, signed=False)),
      weight=obs.MinMaxObserver(spec=QuantSpec(bits=4, signed=True, symmetric=True, axis=-1)))
  model = _Mlp(qconfig)
  x = np.random.default_rng(0).normal(size=(32, 37)).astype(np.float32)
  # jitted, with XLA's own random bits: threefry's initialisers compile far more slowly
  init = jax.jit(lambda key, x: model.init(key, x, mode="calibrate"))
  variables = qnn.calibrate(model, init(jax.random.key(0, impl="unsafe_rbg"), x[:2]), [x])
  int_vars = qjax.convert(model, variables, x[:8])
  kernels = [leaf for leaf in jax.tree_util.tree_leaves(int_vars, is_leaf=qarray.is_qarray)
             if qarray.is_qarray(leaf)]
  assert [(k.spec.bits, qarray.packed_bits(k)) for k in kernels] == [(4, 4), (4, 4)]
  path = tmp_path / "mlp.qjax"
  io.save(path, int_vars)
  restored = io.load(path, target=int_vars)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(int_vars)
  for a, b in zip(jax.tree_util.tree_leaves(int_vars), jax.tree_util.tree_leaves(restored),
                  strict=True):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  apply = jax.jit(lambda v, x: model.apply(v, x, mode="int8"))
  np.testing.assert_array_equal(np.asarray(apply(restored, x)), np.asarray(apply(int_vars, x)))
  # The file: model_size(packed=True) plus framing that grew by 6 bytes per packed kernel
  # (888 and 240 values in 444 and 120 bytes: the same length prefixes, 3 and 2 bytes).
  with pytest.MonkeyPatch.context() as patch:  # the same tree with array-node qvalues
    patch.setattr(qarray, "packed_form", lambda qa: None)
    unpacked = len(io.to_bytes(int_vars))
  assert (os.path.getsize(path) - report.model_size(int_vars, packed=True)
          == unpacked - report.model_size(int_vars) + 2 * 6)
  assert report.model_size(int_vars) - report.model_size(int_vars, packed=True) == 444 + 120
