"""Converted int8 models on a 4 (data) x 2 (model) mesh: `integer_variable_shardings` splits
kernels and their per-channel arrays over the model axis, and the integer apply under
`jax.jit` (GSPMD) or `jax.shard_map` (each device on its own shard, the native kernel forced)
equals one device's bit for bit, with int8 x int8 -> int32 contractions in the compiled HLO."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
import qjax.nn as qnn
from qjax.integer import dynamic
from qjax.integer import kernels
from qjax.integer import sharding as isharding

# PyTorch's x86 recipe (per-channel weights) with a 256-bin histogram (quicker to compile).
QCONFIG = dataclasses.replace(
    qnn.get_default_qconfig("x86"),
    activation=dataclasses.replace(qnn.get_default_qconfig("x86").activation, bins=256))
BATCH = 16


class MLP(nn.Module):
  """20 -> 32 -> 16 -> 5: the last layer's 5 channels do not split over 2 devices."""

  qconfig: object

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(self.qconfig, name="quant")(x, mode=mode)
    x = qnn.QuantDense(32, qconfig=self.qconfig, name="fc1", activation=nn.relu)(x, mode=mode)
    x = qnn.QuantDense(16, qconfig=self.qconfig, name="fc2", activation=nn.relu)(x, mode=mode)
    x = qnn.QuantDense(5, qconfig=self.qconfig, name="fc3")(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


class ConvNet(nn.Module):
  """conv1 and conv2 run as int8 GEMMs of their patches, conv3 (grouped) as an int8
  convolution, then a Dense."""

  qconfig: object

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(self.qconfig, name="quant")(x, mode=mode)
    x = qnn.QuantConv(8, (3, 3), qconfig=self.qconfig, name="conv1",
                      activation=nn.relu)(x, mode=mode)
    x = qnn.QuantConv(32, (3, 3), strides=(2, 2), qconfig=self.qconfig, name="conv2",
                      activation=nn.relu)(x, mode=mode)
    x = qnn.QuantConv(32, (3, 3), feature_group_count=2, qconfig=self.qconfig,
                      name="conv3")(x, mode=mode)
    x = x.reshape((x.shape[0], -1))
    x = qnn.QuantDense(10, qconfig=self.qconfig, name="fc")(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


class FloatMLP(nn.Module):
  """Stock Dense layers, for dynamic quantization."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="fc1")(x))
    return nn.Dense(5, name="fc2")(x)


MODELS = {"mlp": (MLP(QCONFIG), (20,)), "convnet": (ConvNet(QCONFIG), (8, 8, 3))}


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


def _inputs(shape, n=BATCH, seed=0):
  return np.random.default_rng(seed).normal(size=(n,) + shape).astype(np.float32)


@functools.cache
def converted(name):
  model, shape = MODELS[name]
  x = _inputs(shape, n=32, seed=1)
  init = jax.jit(functools.partial(model.init, mode="calibrate"))
  variables = qnn.calibrate(model, init(jax.random.key(0, impl="unsafe_rbg"), x[:2]), [x])
  return jax.device_get(qjax.convert(model, variables, x[:2]))


@functools.cache
def dynamic_variables():
  params = jax.jit(FloatMLP().init)(jax.random.key(0, impl="unsafe_rbg"), jnp.ones((1, 20)))[
      "params"]
  return jax.device_get({"params": dynamic.quantize_dynamic(params, per_channel=True)})


def _apply_int8(model):
  """model's int8 forward: (dequantized output, {layer: its int8 output})."""
  def apply(int_vars, x):
    y, state = model.apply(int_vars, x, mode="int8", capture_intermediates=True,
                           mutable=["intermediates"])
    inter = state["intermediates"]
    return y, {k: v["__call__"][0] for k, v in inter.items() if k != "__call__"}
  return apply


def _apply_dynamic(variables, x):
  return dynamic.dynamic_apply(FloatMLP(), variables, x)


def _one_device(f, *args):
  device = jax.devices()[0]
  return jax.jit(f)(*jax.device_put(args, device))


def _sharded(f, mesh, variables, x, shardings):
  batch = NamedSharding(mesh, P("data", *([None] * (x.ndim - 1))))
  return jax.jit(f, in_shardings=(shardings, batch))


def _assert_bits_equal(got, want):
  got, want = jax.device_get(got), jax.device_get(want)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(want),
                        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                        strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (path[0], a.dtype, b.dtype)
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8),
                                  err_msg=jax.tree_util.keystr(path[0]))


# ------------------------------------------------------------------------------------------
# Shardings.


def _specs(shardings):
  return isharding.partition_specs(shardings)


def test_mlp_shardings_split_kernels_and_their_channel_arrays(mesh):
  specs = _specs(qjax.integer_variable_shardings(converted("mlp"), mesh))["converted"]
  for layer in ("fc1", "fc2"):
    op = specs[layer]["op"]
    assert op.kernel.qvalue == P("model", None)
    assert op.kernel.scale == op.kernel.zero_point == P("model")
    assert op.offset == op.requant.bias == op.requant.multiplier == P("model")
    assert op.requant.zero_point == P()
    assert set(op.report.values()) == {P()}          # activation grids: scalars
  fc3 = specs["fc3"]["op"]   # 5 channels over 2 devices: the layer stays whole
  assert set(jax.tree_util.tree_leaves(fc3)) == {P()}
  for boundary in ("quant", "dequant"):
    assert set(jax.tree_util.tree_leaves(specs[boundary])) == {P()}


@pytest.mark.slow
def test_convnet_shardings_split_the_output_axis_of_hwio_kernels(mesh):
  specs = _specs(qjax.integer_variable_shardings(converted("convnet"), mesh))["converted"]
  for layer in ("conv1", "conv2", "conv3"):
    op = specs[layer]["op"]
    assert op.kernel.qvalue == P(None, None, None, "model")
    assert op.kernel.scale == op.offset == op.requant.multiplier == P("model")
    assert op.pad_value == op.requant.zero_point == P()
  assert specs["fc"]["op"].kernel.qvalue == P("model", None)


@pytest.mark.slow
def test_per_tensor_weights_keep_their_scalars_replicated(mesh):
  model = MLP(qnn.default_qconfig)
  x = _inputs((20,), n=8)
  variables = qnn.calibrate(model, model.init(jax.random.key(0), x, mode="calibrate"), [x])
  int_vars = qjax.convert(model, variables, x, requant="float")
  op = _specs(qjax.integer_variable_shardings(int_vars, mesh))["converted"]["fc1"]["op"]
  assert op.kernel.qvalue == P("model", None)
  assert op.kernel.scale == op.requant.multiplier == P()
  assert op.offset == op.report["bias"] == P("model")    # the int32 bias is per channel


@pytest.mark.slow
def test_dynamic_kernels_split_with_their_column_sums_and_bias(mesh):
  specs = _specs(qjax.integer_variable_shardings(dynamic_variables(), mesh))["params"]
  fc1 = specs["fc1"]
  assert fc1["kernel"].qweight.qvalue == P("model", None)
  assert fc1["kernel"].qweight.scale == fc1["kernel"].col_sums == fc1["bias"] == P("model")
  assert set(jax.tree_util.tree_leaves(specs["fc2"])) == {P()}   # 5 channels


def test_serving_tree_and_placement(mesh):
  serving = qjax.for_serving(converted("mlp"))   # several devices: not packed
  assert isinstance(serving["converted"]["fc1"]["op"].kernel, qjax.QArray)
  placed = isharding.shard_integer_variables(serving, mesh)
  kernel = placed["converted"]["fc1"]["op"].kernel.qvalue
  assert kernel.sharding.spec == P("model", None)
  assert {s.data.shape for s in kernel.addressable_shards} == {(16, 20)}
  packed = qjax.for_serving(converted("mlp"), pack=True)
  op = _specs(qjax.integer_variable_shardings(packed, mesh))["converted"]["fc1"]["op"]
  assert set(jax.tree_util.tree_leaves(op)) == {P()}   # packed weights: the layer stays whole


def test_bad_mesh_arguments_are_named(mesh):
  with pytest.raises(ValueError, match=r"model_axis must be one of .*\('data', 'model'\)"):
    qjax.integer_variable_shardings(converted("mlp"), mesh, model_axis="tensor")
  with pytest.raises(TypeError, match=r"mesh must be a jax\.sharding\.Mesh"):
    qjax.integer_variable_shardings(converted("mlp"), jax.devices())


# ------------------------------------------------------------------------------------------
# The sharded integer apply.


@functools.cache
def sharded_case(name, mesh):
  """(apply, variables, x, the sharded apply compiled): the apply, HLO and dynamic tests run
  one compiled program."""
  if name == "dynamic":
    apply, variables, x = _apply_dynamic, dynamic_variables(), _inputs((20,))
  else:
    model, shape = MODELS[name]
    apply, variables, x = _apply_int8(model), converted(name), _inputs(shape)
  shardings = qjax.integer_variable_shardings(variables, mesh)
  # "auto" (the default) keeps XLA's dot_general when several devices are visible.
  compiled = _sharded(apply, mesh, variables, x, shardings).lower(variables, x).compile()
  return apply, variables, x, compiled


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sharded_apply_equals_one_device(mesh, name):
  apply, int_vars, x, compiled = sharded_case(name, mesh)
  want = _one_device(apply, int_vars, x)
  got = compiled(int_vars, x)
  _assert_bits_equal(got, want)
  y, layers = got
  assert y.dtype == jnp.float32 and layers["dequant"].dtype == jnp.float32
  assert {k: v.dtype for k, v in layers.items() if k != "dequant"} == {
      k: jnp.dtype(jnp.int8) for k in layers if k != "dequant"}


def test_sharded_dynamic_apply_equals_one_device(mesh):
  apply, variables, x, compiled = sharded_case("dynamic", mesh)
  want = _one_device(apply, variables, x)
  _assert_bits_equal(compiled(variables, x), want)


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\w+)\[")
_CONTRACTION = re.compile(r"=\s*(\w+)\[[^=]*?\s(dot|convolution)\(([^)]*)\)")


def hlo_contractions(hlo: str) -> list[tuple[str, tuple[str, ...], str]]:
  """(op, operand dtypes, result dtype) of every dot / convolution of compiled HLO text."""
  dtypes = {}
  for line in hlo.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      dtypes[match.group(1)] = match.group(2)
  found = []
  for line in hlo.splitlines():
    match = _CONTRACTION.search(line)
    if match:
      operands = tuple(dtypes[o.strip().lstrip("%")] for o in match.group(3).split(","))
      found.append((match.group(2), operands, match.group(1)))
  return found


def test_hlo_census_detects_a_float_dot(mesh):
  """The census can fail: a float dot is seen as one."""
  f = jax.jit(lambda a, b: a @ b)
  hlo = f.lower(jnp.ones((4, 3)), jnp.ones((3, 2))).compile().as_text()
  assert ("dot", ("f32", "f32"), "f32") in hlo_contractions(hlo)


@pytest.mark.parametrize("name", sorted(MODELS) + ["dynamic"])
def test_sharded_hlo_has_int8_contractions_and_no_custom_call(mesh, name):
  hlo = sharded_case(name, mesh)[3].as_text()
  found = hlo_contractions(hlo)
  expected = {"mlp": {"dot": 3}, "convnet": {"dot": 3, "convolution": 1},
              "dynamic": {"dot": 2}}[name]
  assert {op: sum(f[0] == op for f in found) for op in expected} == expected, found
  assert all(operands == ("s8", "s8") and result == "s32"
             for _, operands, result in found), found
  assert "qjax_int8_gemm" not in hlo and "custom-call" not in hlo
  # Partitioned: the first layer's dot sees the local batch of 16 / 4 samples.
  assert re.search(r"s32\[4,(16|32)\]\{[\d,]+\} dot\(", hlo) or name == "convnet", hlo[:2000]


# ------------------------------------------------------------------------------------------
# shard_map with the native kernel.

needs_native = pytest.mark.skipif(not kernels.available(),
                                  reason="the native int8 GEMM library is not built")


@needs_native
@pytest.mark.parametrize("name", sorted(MODELS))
def test_shard_map_with_the_native_kernel_equals_one_device(mesh, name):
  """Each of the 8 devices runs the whole model (weights replicated) on its 2 samples."""
  model, shape = MODELS[name]
  int_vars, x = converted(name), _inputs(shape)
  with kernels.use("xla"):
    want = _one_device(_apply_int8(model), int_vars, x)
  batch = P(("data", "model"))
  with kernels.use("native"):
    f = jax.jit(jax.shard_map(_apply_int8(model), mesh=mesh, in_specs=(P(), batch),
                              out_specs=batch))
    hlo = f.lower(int_vars, x).compile().as_text()
    got = f(int_vars, x)
  assert "qjax_int8_gemm" in hlo     # the native kernel ran
  _assert_bits_equal(got, want)


@needs_native
def test_shard_map_of_a_model_sharded_layer_with_the_native_kernel(mesh):
  """One converted Dense with its kernel, offset and requantizer split over the model axis
  (`partition_specs` of its shardings): each device computes its channels of its samples."""
  op = converted("mlp")["converted"]["fc1"]["op"]
  q = jnp.asarray(np.random.default_rng(2).integers(-128, 128, (BATCH, 20)), jnp.int8)
  with kernels.use("xla"):
    want = _one_device(lambda o, v: o(v), op, q)
  specs = isharding.partition_specs(isharding.op_shardings(op, isharding.Placement(mesh,
                                                                                    "model")))
  with kernels.use("native"):
    f = jax.jit(jax.shard_map(lambda o, v: o(v), mesh=mesh, in_specs=(specs, P("data")),
                              out_specs=P("data", "model")))
    hlo = f.lower(op, q).compile().as_text()
    got = f(op, q)
  assert "qjax_int8_gemm" in hlo
  assert {s.data.shape for s in got.addressable_shards} == {(4, 16)}
  _assert_bits_equal(got, want)


# ------------------------------------------------------------------------------------------
# Batches.


def test_a_ragged_batch_is_refused_with_the_padding_to_use(mesh):
  x = _inputs((20,), n=10)
  with pytest.raises(ValueError, match=r"10 samples .* 4 devices .* Pad it to 12 samples"):
    isharding.shard_batch(x, mesh)
  model = MODELS["mlp"][0]
  int_vars = converted("mlp")
  padded = np.concatenate([x, np.repeat(x[-1:], 2, axis=0)])
  placed = isharding.shard_integer_variables(int_vars, mesh)
  got = jax.jit(_apply_int8(model))(placed, isharding.shard_batch(padded, mesh))
  want = _one_device(_apply_int8(model), int_vars, x)
  _assert_bits_equal(jax.tree_util.tree_map(lambda a: a[:10], got), want)


def test_readme_example_runs_on_the_mesh(capsys):
  readme = pathlib.Path(__file__).resolve().parents[2] / "README.md"
  code = re.search(r"## Multiple devices and hosts\n.*?```python\n(.*?)```", readme.read_text(),
                   re.S).group(1)
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    exec(compile(code, "README-multiple-devices", "exec"), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out.strip() == "(64, 10) True"
