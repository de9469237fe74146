"""qjax.convert beyond the core tests: for_serving (packed or not), layers left in float, two
input grids."""

import dataclasses
import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
import qjax.nn as qnn
from qjax import integer
from qjax import io as qio
from qjax.integer import kernels
from qjax.qarray import QArray


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, *, mode):
    q = qnn.get_default_qconfig("x86")
    x = qnn.Quantize(q)(x, mode=mode)
    x = qnn.QuantConv(4, (3, 3), padding="SAME", qconfig=q, activation=nn.relu, name="conv")(
        x, mode=mode)
    x = nn.max_pool(x, (2, 2), strides=(2, 2)).reshape((x.shape[0], -1))
    x = qnn.QuantDense(16, qconfig=q, activation=nn.relu, name="fc1")(x, mode=mode)
    x = qnn.QuantDense(5, qconfig=q, name="fc2")(x, mode=mode)
    return qnn.Dequantize()(x, mode=mode)


def _init(model, x):
  """The model's variables, initialized under jit (op by op, every eager op compiles) with
  XLA's own random bits (threefry's initialisers take XLA:CPU several times longer to
  compile)."""
  return jax.jit(lambda x: model.init(jax.random.key(1, impl="unsafe_rbg"), x, mode="float"))(
      x)


def _apply(model, variables, x, mode, **kwargs):
  """The model's forward in `mode`, jitted."""
  return jax.jit(model.apply, static_argnames=("mode", "mutable"))(variables, x, mode=mode,
                                                                    **kwargs)


def _forwards(model, x, *runs):
  """The model's forward on x for each (variables, mode) of `runs`, in one jitted program (one
  compilation instead of one per forward)."""
  modes = tuple(mode for _, mode in runs)
  return jax.jit(lambda x, trees: tuple(model.apply(v, x, mode=mode)
                                        for v, mode in zip(trees, modes)))(
                                            x, tuple(v for v, _ in runs))


def _uniform(seed, shape):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _normal(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def calibrated():
  model = _Net()
  x = _uniform(0, (8, 8, 8, 2))
  return model, qnn.calibrate(model, _init(model, x), [x]), x


@pytest.mark.parametrize("requant", ["fbgemm", "float", "integer"])
def test_same_integers_fewer_leaves(calibrated, requant):
  model, variables, x = calibrated
  full = qjax.convert(model, variables, x, requant=requant)
  lean = qjax.for_serving(full, pack=False)
  y_lean, y_full = _forwards(model, _uniform(2, x.shape) * 1.5, (lean, "int8"), (full, "int8"))
  np.testing.assert_array_equal(np.asarray(y_lean), np.asarray(y_full))
  assert len(jax.tree.leaves(lean)) < len(jax.tree.leaves(full))
  ops, full_ops = lean[integer.COLLECTION], full[integer.COLLECTION]
  assert set(ops) == set(full_ops)
  for path in ops:  # each op as convert lowered it, without what only reports read
    op, full_op = ops[path]["op"], full_ops[path]["op"]
    assert getattr(op, "report", None) is None
    if hasattr(full_op, "report"):
      assert full_op.report is not None
      chex.assert_trees_all_equal(op, dataclasses.replace(full_op, report=None))
    else:
      chex.assert_trees_all_equal(op, full_op)
  fc1, full_fc1 = ops["fc1"]["op"], full_ops["fc1"]["op"]
  assert fc1.kernel.dtype == jnp.int8 and fc1.offset.dtype == jnp.int32
  assert fc1.requant.zero_point.dtype == jnp.int32  # the output zero point
  conv = ops["conv"]["op"]  # keeps its padding value, the input zero point
  np.testing.assert_array_equal(np.asarray(conv.pad_value),
                                np.asarray(full_ops["conv"]["op"].report["input_zero_point"]))
  # The offset is -Z_x sum_k q_w, plus the int32 bias of "float" / "integer" (exactly).
  colsum = np.asarray(fc1.kernel.qvalue, np.int64).sum(axis=1)
  zero_offset = -int(full_fc1.report["input_zero_point"]) * colsum
  if requant != "fbgemm":
    assert full_fc1.report["bias"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(fc1.offset),
                                  zero_offset + np.asarray(full_fc1.report["bias"]))
  else:
    assert "bias" not in full_fc1.report
    np.testing.assert_array_equal(np.asarray(fc1.offset), zero_offset)


# Default run: "fbgemm" on every kernel path, "float" on XLA's; "float" on the native paths
# with -m slow.
@pytest.mark.parametrize("requant, kernel", [
    *(("fbgemm", kernel) for kernel in ["xla", *kernels.native_paths()]),
    ("float", "xla"),
    *(pytest.param("float", kernel, marks=pytest.mark.slow)
      for kernel in kernels.native_paths())])
def test_packed_serving_tree(calibrated, requant, kernel, tmp_path, monkeypatch):
  """Dense and convolution weights pre-packed for the native kernel: same integers on every
  path, stored and loaded by qjax.io."""
  model, variables, x = calibrated
  full = qjax.convert(model, variables, x, requant=requant)
  packed = qjax.for_serving(full, pack=True)
  fc1, full_fc1 = packed[integer.COLLECTION]["fc1"]["op"], full[integer.COLLECTION]["fc1"]["op"]
  assert isinstance(fc1.kernel, kernels.PackedWeights)
  assert fc1.kernel.shape == full_fc1.kernel.shape
  np.testing.assert_array_equal(np.asarray(fc1.kernel.unpack()),
                                np.asarray(full_fc1.kernel.qvalue))
  np.testing.assert_array_equal(np.asarray(fc1.kernel.column_sums),
                                np.asarray(full_fc1.kernel.qvalue, np.int64).sum(axis=1))
  conv, full_conv = (t[integer.COLLECTION]["conv"]["op"] for t in (packed, full))
  assert isinstance(conv.kernel, kernels.PackedConvWeights)  # 2-D, two input channels
  assert conv.kernel.shape == full_conv.kernel.shape
  np.testing.assert_array_equal(np.asarray(conv.kernel.unpack()),
                                np.asarray(full_conv.kernel.qvalue))
  monkeypatch.setenv(kernels.ENV_VAR, kernel)
  qio.save(tmp_path / "packed.qjax", packed)
  loaded = qio.load(tmp_path / "packed.qjax")
  chex.assert_trees_all_equal(loaded, packed)
  # All three traced under this kernel.
  want, y_packed, y_loaded = _forwards(model, _uniform(2, x.shape) * 1.5, (full, "int8"),
                                       (packed, "int8"), (loaded, "int8"))
  np.testing.assert_array_equal(np.asarray(y_packed), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(y_loaded), np.asarray(want))


def test_packs_where_the_native_kernel_runs(calibrated, monkeypatch):
  model, variables, x = calibrated
  full = qjax.convert(model, variables, x)
  monkeypatch.setenv(kernels.ENV_VAR, "xla")
  assert isinstance(qjax.for_serving(full)[integer.COLLECTION]["fc1"]["op"].kernel, QArray)
  monkeypatch.setenv(kernels.ENV_VAR, "auto")
  want = kernels.PackedWeights if kernels.resolve() != "xla" else QArray
  assert isinstance(qjax.for_serving(full)[integer.COLLECTION]["fc1"]["op"].kernel, want)


def test_rejects_other_trees():
  with pytest.raises(ValueError, match="for_serving: expected the variables"):
    qjax.for_serving({"params": {}})
  with pytest.raises(TypeError, match="pack must be True, False or None"):
    qjax.for_serving({integer.COLLECTION: {}}, pack="yes")


class _Shared(nn.Module):
  """One QuantDense applied to two different producers (two input grids)."""

  @nn.compact
  def __call__(self, x, *, mode):
    q = qnn.get_default_qconfig("x86")
    a = qnn.Quantize(q, name="qa")(x, mode=mode)
    b = qnn.Quantize(q, name="qb")(2.0 * x, mode=mode)
    layer = qnn.QuantDense(3, qconfig=q, name="shared")
    return qnn.Dequantize()(layer(a, mode=mode), mode=mode) + qnn.Dequantize()(
        layer(b, mode=mode), mode=mode)


def test_layer_called_on_two_grids_is_refused():
  model = _Shared()
  x = _uniform(0, (4, 5))
  variables = _init(model, x)
  _, stats = _apply(model, variables, x, "calibrate", mutable=("quant_stats",))
  with pytest.raises(ValueError, match=r"shared is called on the outputs of qa and of qb"):
    qjax.convert(model, {**variables, **stats}, x)


class _FloatHead(nn.Module):
  """fc1 quantized, then Dequantize, then fc3 left in float by a QConfigMap override."""

  @nn.compact
  def __call__(self, x, *, mode):
    qmap = qnn.QConfigMap(default=qnn.get_default_qconfig("x86"), overrides=(("^fc3$", None),))
    x = qnn.Quantize(qmap)(x, mode=mode)
    x = qnn.QuantDense(16, qconfig=qmap, activation=nn.relu, name="fc1")(x, mode=mode)
    x = qnn.Dequantize()(x, mode=mode)
    return qnn.QuantDense(4, qconfig=qmap, name="fc3")(x, mode=mode)


def test_layer_left_in_float_keeps_its_params():
  """A layer whose qconfig is None runs in float in mode 'int8', from the float params that
  convert carries over (and only those)."""
  model = _FloatHead()
  x = _normal(0, (8, 5))
  variables = _init(model, x)
  _, stats = _apply(model, variables, x, "calibrate", mutable=("quant_stats",))
  variables = {**variables, **stats}
  int_vars = qjax.convert(model, variables, x)
  assert set(int_vars["params"]) == {"fc3"} and set(int_vars[integer.COLLECTION]) == {
      "Quantize_0", "fc1", "Dequantize_0"}
  np.testing.assert_array_equal(np.asarray(int_vars["params"]["fc3"]["kernel"]),
                                np.asarray(variables["params"]["fc3"]["kernel"]))
  y, y_qat = _forwards(model, x, (int_vars, "int8"), (variables, "qat"))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_qat))


class _Learned(nn.Module):
  """Quantize -> QuantDense(ReLU) -> QuantDense -> Dequantize, every point LSQ-learnable on
  full-range grids (affine uint8 activations, per-channel symmetric int8 weights)."""

  @nn.compact
  def __call__(self, x, *, mode):
    q = qnn.QConfig(weight=qnn.bits_qconfig(8, qat=False).weight,
                    activation=qnn.bits_qconfig(8, qat=False).activation, learnable=True)
    x = qnn.Quantize(q)(x, mode=mode)
    x = qnn.QuantDense(6, qconfig=q, activation=nn.relu, name="fc1")(x, mode=mode)
    x = qnn.QuantDense(3, qconfig=q, name="fc2")(x, mode=mode)
    return qnn.Dequantize()(x, mode=mode)


@functools.cache
def _learned() -> tuple[_Learned, jax.Array, dict]:
  """(model, x, initial variables) of _Learned, initialized once."""
  model = _Learned()
  x = _normal(0, (16, 8))
  return model, x, _init(model, x)


def test_learned_scales_are_the_converted_grids():
  """LSQ points: convert takes each point's learned scale and zero point (not the observer's),
  as the point's forward uses them, and the int8 path then computes the fake-quant forward's
  integers."""
  model, x, variables = _learned()
  # Move every learned parameter away from its observed initial value, as training would.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: np.asarray(p) * 1.3 if path[-1].key == "scale" else
      (np.asarray(p) + 3.0 if path[-1].key == "zero_point" else p), variables["params"])
  variables = {**variables, "params": params}
  int_vars = qjax.convert(model, variables, x)
  layers = {path: entry["op"] for path, entry in int_vars[integer.COLLECTION].items()}
  fc1 = layers["fc1"].report
  np.testing.assert_array_equal(layers["fc1"].kernel.scale, params["fc1"]["weight"]["scale"])
  np.testing.assert_array_equal(fc1["output_scale"], params["fc1"]["output"]["scale"])
  z_out = np.round(params["fc1"]["output"]["zero_point"]).astype(np.int32) - 128
  # rne(Z) on the uint8 grid, carried shifted by -128
  np.testing.assert_array_equal(fc1["output_zero_point"], z_out)
  np.testing.assert_array_equal(layers["fc1"].requant.zero_point, z_out)
  np.testing.assert_array_equal(layers["Quantize_0"].scale, params["Quantize_0"]["scale"])
  y_int, y_fq = map(np.asarray, _forwards(model, x, (int_vars, "int8"), (variables, "qat")))
  steps = np.abs(y_int - y_fq) / float(layers["Dequantize_0"].scale)
  assert np.max(steps) <= 1.0 + 1e-3 and np.mean(steps < 1e-3) >= 0.9


def test_learned_weight_scales_clamp_as_the_forward_does():
  """A learned weight scale far below the kernel's range is the QAT forward's own grid (it
  clamps those weights): convert clamps them the same way, without a warning or an error."""
  model, x, variables = _learned()
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: np.asarray(p) * 0.1 if path[-1].key == "scale" and "weight" in str(path)
      else p,
      variables["params"])
  variables = {**variables, "params": params}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    int_vars = qjax.convert(model, variables, x)
  kernel = np.asarray(int_vars[integer.COLLECTION]["fc1"]["op"].kernel.qvalue)
  assert np.mean(np.abs(kernel) == 127) > 0.2  # most weights clamped, as in the forward
  y_int, y_fq = map(np.asarray, _forwards(model, x, (int_vars, "int8"), (variables, "qat")))
  steps = np.abs(y_int - y_fq) / float(int_vars[integer.COLLECTION]["Dequantize_0"]["op"].scale)
  assert np.max(steps) <= 1.0 + 1e-3
