"""Calibration and QAT of qjax.nn models on a 4 (data) x 2 (model) mesh, against one device.

Two ways to run a model over the mesh:

* GSPMD: `jax.jit` of the one-device program with `NamedSharding` inputs (the batch over
  "data", kernels and their per-channel vectors over "model": `qjax.sharding`). No
  `axis_name`: XLA partitions the program, observer reductions included.
* `jax.shard_map`, data-parallel: every device runs the model on its shard of the batch with
  the params replicated; the modules' `axis_name="data"` reduces the activation observers
  and the gradients are `lax.pmean`-ed (the classic data-parallel step, with shard_map's
  replication checks off so that the gradients stay per shard until the pmean).

Observer statistics come out exactly equal to one device's (min / max / histogram counts do
not round). Params after an optimizer step agree to float32 rounding only: the gradient's
sum over the batch is added in another order when the batch is split.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import qjax.nn as qnn
from qjax import sharding

STATS = qnn.STATS
# Params after one step: the batch-gradient sums are reordered by the split (float32 rounding
# of sums of 32 terms, then scaled by the learning rate).
PARAM_TOL = {"rtol": 1e-5, "atol": 1e-6}


class MLP(nn.Module):
  """Quantize -> Dense 16 (ReLU) -> Dense 8 -> Dequantize."""

  qconfig: qnn.QConfig
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(self.qconfig, axis_name=self.axis_name, name="quant")(x, mode=mode)
    x = qnn.QuantDense(16, qconfig=self.qconfig, activation=nn.relu, axis_name=self.axis_name,
                       name="fc1")(x, mode=mode)
    x = qnn.QuantDense(8, qconfig=self.qconfig, axis_name=self.axis_name, name="fc2")(
        x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


class ConvNet(nn.Module):
  """Quantize -> Conv 3x3x4 (ReLU) -> flatten -> Dense 4 -> Dequantize."""

  qconfig: qnn.QConfig
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(self.qconfig, axis_name=self.axis_name, name="quant")(x, mode=mode)
    x = qnn.QuantConv(4, (3, 3), qconfig=self.qconfig, activation=nn.relu,
                      axis_name=self.axis_name, name="conv")(x, mode=mode)
    x = x.reshape((x.shape[0], -1))
    x = qnn.QuantDense(4, qconfig=self.qconfig, axis_name=self.axis_name, name="fc")(
        x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


MODELS = {"mlp": (MLP, (12,)), "conv": (ConvNet, (6, 6, 2))}
CALIBRATION_QCONFIGS = {   # PyTorch's recipes with 256-bin histograms (quicker to compile)
    "x86": dataclasses.replace(  # histogram activations, per-channel weights
        qnn.get_default_qconfig("x86"),
        activation=dataclasses.replace(qnn.get_default_qconfig("x86").activation, bins=256)),
    "qnnpack": dataclasses.replace(  # per-tensor weights
        qnn.get_default_qconfig("qnnpack"),
        activation=dataclasses.replace(qnn.get_default_qconfig("qnnpack").activation,
                                       bins=256)),
}


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


def _batches(shape, n, seed=0, size=32):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(size, *shape)) * (1 + k)).astype(np.float32) for k in range(n)]


def _one_device(tree):
  return jax.device_put(tree, jax.devices()[0])


def _assert_trees_equal(got, want):
  flat_want = jax.tree_util.tree_leaves_with_path(want)
  flat_got = jax.tree_util.tree_leaves(got)
  assert len(flat_got) == len(flat_want)
  for (path, w), g in zip(flat_want, flat_got, strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), strict=True,
                                  err_msg=jax.tree_util.keystr(path))


def _assert_trees_close(got, want, **tol):
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree_util.tree_leaves(got), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), **tol,
                               err_msg=jax.tree_util.keystr(path))


def _calibrate_fn(model):
  def calibrate(variables, x):
    _, updates = model.apply(variables, x, mode="calibrate", mutable=[STATS])
    return updates[STATS]
  return calibrate


def _calibrated(model, variables, batches):
  calibrate = jax.jit(_calibrate_fn(model))
  for x in batches:
    variables = {**variables, STATS: calibrate(variables, x)}
  return variables


def _init(model_name, qconfig, mode, seed=0):
  cls, shape = MODELS[model_name]
  model = cls(qconfig=qconfig)
  variables = jax.jit(functools.partial(model.init, mode=mode))(jax.random.key(seed),
                                                                jnp.zeros((2, *shape)))
  return model, variables, shape


@functools.cache
def _calibration_case(model_name, qconfig):
  """(model, initial variables, batches, the statistics one device calibrates from them):
  the reference of the GSPMD and the shard_map tests."""
  model, variables, shape = _init(model_name, CALIBRATION_QCONFIGS[qconfig], "calibrate")
  batches = _batches(shape, 2)
  want = _calibrated(model, _one_device(variables), [_one_device(x) for x in batches])
  return model, variables, batches, want[STATS]


@pytest.mark.parametrize("model_name,qconfig", [
    ("mlp", "x86"), pytest.param("conv", "qnnpack", marks=pytest.mark.slow)])
def test_calibration_under_gspmd_equals_one_device(mesh, model_name, qconfig):
  model, variables, batches, want = _calibration_case(model_name, qconfig)
  on_mesh = jax.device_put(variables, sharding.variable_shardings(variables, mesh))
  data = sharding.batch_sharding(mesh, batches[0].ndim)
  got = _calibrated(model, on_mesh, [jax.device_put(x, data) for x in batches])
  _assert_trees_equal(got[STATS], want)
  assert int(want["quant"]["count"]) == 2


@pytest.mark.parametrize("model_name", ["mlp"])
def test_calibration_under_shard_map_equals_one_device(mesh, model_name):
  _, variables, batches, want = _calibration_case(model_name, "x86")
  parallel = MODELS[model_name][0](qconfig=CALIBRATION_QCONFIGS["x86"], axis_name="data")
  calibrate = jax.jit(jax.shard_map(_calibrate_fn(parallel), mesh=mesh,
                                    in_specs=(P(), P("data")), out_specs=P()))
  got = variables
  for x in batches:
    got = {**got, STATS: calibrate(got, x)}
  _assert_trees_equal(got[STATS], want)


def _loss_and_stats(model, params, stats, x, y):
  logits, updates = model.apply({"params": params, STATS: stats}, x, mode="qat",
                                mutable=[STATS])
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates[STATS]


def _train_step(model, optimizer, axis_name=None):
  def step(params, stats, opt_state, x, y):
    (loss, stats), grads = jax.value_and_grad(
        lambda p: _loss_and_stats(model, p, stats, x, y), has_aux=True)(params)
    if axis_name is not None:
      grads, loss = lax.pmean((grads, loss), axis_name)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss
  return step


@functools.cache
def _qat_start(model_name):
  """A QAT model, its params and statistics calibrated on one device, and a labelled batch."""
  model, variables, shape = _init(model_name, qnn.get_default_qat_qconfig("x86"), "qat")
  variables = _calibrated(model, variables, _batches(shape, 2, seed=2))
  x = _batches(shape, 1, seed=3)[0]
  y = np.random.default_rng(4).integers(0, 4, size=len(x)).astype(np.int32)
  return model, variables["params"], variables[STATS], x, y


OPTIMIZERS = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(1e-2)}


@pytest.fixture(autouse=True)
def _standard_promotion():
  with jax.numpy_dtype_promotion("standard"):   # optax's Adam mixes its int32 count in
    yield


@pytest.mark.parametrize("model_name,opt", [
    ("mlp", "sgd"), pytest.param("conv", "adam", marks=pytest.mark.slow)])
def test_qat_steps_under_gspmd_equal_one_device(mesh, model_name, opt):
  model, params, stats, x, y = _qat_start(model_name)
  optimizer = OPTIMIZERS[opt]()
  step = _train_step(model, optimizer)
  want = jax.jit(step)(*_one_device((params, stats, optimizer.init(params), x, y)))

  shardings = sharding.variable_shardings({"params": params, STATS: stats}, mesh)
  params_s, stats_s = shardings["params"], shardings[STATS]
  p = jax.device_put(params, params_s)
  replicated = jax.sharding.NamedSharding(mesh, P())
  opt_state = jax.device_put(optimizer.init(params), replicated)   # small: kept whole
  sharded_step = jax.jit(step, out_shardings=(params_s, stats_s, replicated, replicated))
  data = sharding.batch_sharding(mesh, x.ndim)
  got = sharded_step(p, jax.device_put(stats, stats_s), opt_state, jax.device_put(x, data),
                     jax.device_put(y, sharding.batch_sharding(mesh, 1)))

  _assert_trees_equal(got[1], want[1])                    # quant_stats: exact
  _assert_trees_close(got[0], want[0], **PARAM_TOL)        # params: float32 rounding
  np.testing.assert_allclose(float(got[3]), float(want[3]), rtol=1e-6)
  layer = "fc1" if model_name == "mlp" else "conv"
  kernel = got[0][layer]["kernel"]
  assert kernel.sharding.spec == P(*([None] * (kernel.ndim - 1)), "model")
  assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 2
  weight_min = got[1][layer]["weight"]["min_val"]
  assert weight_min.sharding.spec == P("model")
  assert weight_min.addressable_shards[0].data.shape == (kernel.shape[-1] // 2,)
  assert got[1][layer]["output"]["min_val"].sharding.spec == P()
  # The check can fail: the step did change the params and the statistics.
  assert not np.array_equal(np.asarray(got[0][layer]["kernel"]),
                            np.asarray(params[layer]["kernel"]))
  assert int(got[1]["quant"]["count"]) == int(stats["quant"]["count"]) + 1


def test_qat_step_under_shard_map_data_parallel_equals_one_device(mesh):
  """Data-parallel QAT under shard_map: params replicated, the batch over "data", the
  activation observers reduced over "data" (axis_name) and the gradients pmean-ed."""
  model, params, stats, x, y = _qat_start("mlp")
  optimizer = optax.adam(1e-2)
  want = jax.jit(_train_step(model, optimizer))(
      *_one_device((params, stats, optimizer.init(params), x, y)))
  parallel = MLP(qconfig=qnn.get_default_qat_qconfig("x86"), axis_name="data")
  step = jax.shard_map(_train_step(parallel, optimizer, axis_name="data"), mesh=mesh,
                       in_specs=(P(), P(), P(), P("data"), P("data")),
                       out_specs=(P(), P(), P(), P()), check_vma=False)
  got = jax.jit(step)(params, stats, optimizer.init(params), x, y)
  _assert_trees_equal(got[1], want[1])
  _assert_trees_close(got[0], want[0], **PARAM_TOL)
  np.testing.assert_allclose(float(got[3]), float(want[3]), rtol=1e-6)


def test_shardings_follow_output_channels_only():
  """A (C,) statistic is split only under its layer's weight point, not by its size."""
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  qconfig = qnn.QConfig(activation=qnn.get_default_qconfig("x86").activation,
                        weight=qnn.get_default_qat_qconfig("x86").weight)

  def shapes(layer, mode):   # the shardings read the variables' shapes only
    return jax.eval_shape(functools.partial(layer.init, mode=mode), jax.random.key(0),
                          jnp.ones((2, 8)))

  # 8 inputs and 8 outputs, and a histogram of 2048 bins: only the channel vectors split.
  variables = shapes(qnn.QuantDense(8, qconfig=qconfig), "calibrate")
  specs = jax.tree_util.tree_map(lambda s: s.spec,
                                 sharding.variable_shardings(variables, mesh))
  assert specs["params"] == {"kernel": P(None, "model"), "bias": P("model")}
  assert specs[STATS]["weight"]["min_val"] == P("model")
  assert specs[STATS]["weight"]["count"] == P()
  assert all(s == P() for s in jax.tree_util.tree_leaves(specs[STATS]["output"]))
  learned = shapes(qnn.QuantDense(8, qconfig=dataclasses.replace(
      qnn.get_default_qat_qconfig("x86"), learnable=True)), "qat")
  specs = jax.tree_util.tree_map(lambda s: s.spec,
                                 sharding.variable_shardings(learned, mesh))
  assert specs["params"]["weight"] == {"scale": P("model")}   # symmetric: no zero point
  assert specs["params"]["output"] == {"scale": P(), "zero_point": P()}
  odd = shapes(qnn.QuantDense(5, qconfig=qconfig), "calibrate")
  assert all(s.spec == P() for s in jax.tree_util.tree_leaves(
      sharding.variable_shardings(odd, mesh)))   # 5 channels do not split over 2 devices
  with pytest.raises(ValueError, match=r"model_axis must be one of the mesh's axis names"):
    sharding.variable_shardings(variables, mesh, model_axis="tensor")
  with pytest.raises(ValueError, match="data_axis must be one of"):
    sharding.batch_sharding(mesh, 2, data_axis="batch")


def test_lif_state_observers_under_shard_map_equal_one_device(mesh):
  """LIF's v / i observers (inside its time scan) and its spike point reduce over axis_name;
  the neuron's math is per element, so the statistics are exact."""
  config = qnn.observed_state(bits=8)
  x = np.random.default_rng(6).uniform(0, 8, size=(5, 16, 3)).astype(np.float32)
  single = qnn.LIF(state=config)
  variables = single.init(jax.random.key(0), x[:, :2], mode="calibrate")
  want = jax.jit(lambda v, part: single.apply(v, part, mode="calibrate", mutable=[STATS])[1])(
      variables, x)
  parallel = qnn.LIF(state=config, axis_name="data")

  def calibrate(v, part):   # time leads: the batch is the second axis
    return parallel.apply(v, part, mode="calibrate", mutable=[STATS])[1]

  got = jax.jit(jax.shard_map(calibrate, mesh=mesh, in_specs=(P(), P(None, "data")),
                              out_specs=P()))(variables, x)
  _assert_trees_equal(got, want)
  assert int(want[STATS]["i"]["count"]) == 5


@pytest.mark.slow
def test_folded_batch_norm_under_shard_map_matches_one_device(mesh):
  """QuantDenseBN with axis_name: the batch moments are summed over the shards (equal to one
  device's up to float summation order), and so are the observers' inputs' ranges."""
  qconfig = qnn.get_default_qat_qconfig("x86")
  x = _batches((12,), 1, seed=7)[0]
  single = qnn.QuantDenseBN(8, qconfig=qconfig)
  variables = single.init(jax.random.key(0), x[:2], train=True, mode="calibrate")

  def calibrate(model):
    def run(v, part):
      _, updates = model.apply(v, part, train=True, mode="calibrate",
                               mutable=[STATS, "batch_stats"])
      return updates
    return run

  want = jax.jit(calibrate(single))(variables, x)
  parallel = qnn.QuantDenseBN(8, qconfig=qconfig, axis_name="data")
  got = jax.jit(jax.shard_map(calibrate(parallel), mesh=mesh, in_specs=(P(), P("data")),
                              out_specs=P()))(variables, x)
  _assert_trees_close(got, want, rtol=1e-6, atol=1e-6)
  _assert_trees_equal(got[STATS]["weight"], want[STATS]["weight"])   # the kernel: replicated
