"""A residual CNN, converted by qjax and by PyTorch 2.13 eager mode, layer by layer.

The model (tests/torch_models.TorchResNetTiny and its qjax twin below): a conv-BN-ReLU stem, a
block joined by FloatFunctional.add_relu, a strided block with a 1x1 projection shortcut
joined by add, two 1x1 branches joined by cat, global average pooling and a Linear. torch
fuses conv-BN(-ReLU) in eval mode, prepares with get_default_qconfig("x86"), calibrates and
converts; qjax takes the fused float weights, calibrates the same batches and converts.

As in test_convert_torch, qjax's activation observers are pinned to torch's final states
(XLA and torch sum float forwards in different orders: a calibrated range may differ in its
last ulp), so that both convert with identical grids. Each qjax module then runs on torch's
own input integers and must give torch's int_repr on every entry, and so must the chained
int8 model.

Which torch kernels run. Convolutions and Linear: fbgemm (the engine is pinned, see
test_convert_torch). Add, cat and the pools run vectorized bodies with a scalar tail whose
float order differs (tests/support/reference.py); the shapes here are multiples of the vector
widths (64 elements for add, 8 channels for cat and the pool) and torch runs on one thread
(more threads split an add into pieces, each with a tail), so every element takes the
vectorized body, which is what qjax computes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")

import qjax  # noqa: E402
import qjax.nn as qnn  # noqa: E402
from support import reference as ref  # noqa: E402
from support import torch_models  # noqa: E402
from qjax.integer import arith, forms  # noqa: E402

WIDTH, BRANCHES, CLASSES, SIZE = 16, (8, 16), 10, 12
BATCH, CALIB_BATCHES = 16, 3
QCONFIG = qnn.get_default_qconfig("x86")
CONVS = {  # name: (features, window, stride, padding, fused ReLU)
    "stem": (WIDTH, 3, 1, 1, True),
    "b1_conv1": (WIDTH, 3, 1, 1, True),
    "b1_conv2": (WIDTH, 3, 1, 1, False),
    "b2_conv1": (2 * WIDTH, 3, 2, 1, True),
    "b2_conv2": (2 * WIDTH, 3, 1, 1, False),
    "b2_proj": (2 * WIDTH, 1, 2, 0, False),
    "br1": (BRANCHES[0], 1, 1, 0, True),
    "br2": (BRANCHES[1], 1, 1, 0, True),
}
MODULES = (*CONVS, "add1", "add2", "cat", "pool", "fc")


class QResNetTiny(nn.Module):
  """TorchResNetTiny in qjax's modules, each named as its torch twin."""

  @nn.compact
  def __call__(self, x, mode="float"):
    def conv(name):
      features, window, stride, pad, relu = CONVS[name]
      return qnn.QuantConv(features, (window, window), strides=stride,
                           padding=((pad, pad), (pad, pad)), qconfig=QCONFIG,
                           activation=nn.relu if relu else None, name=name)

    x = qnn.Quantize(qconfig=QCONFIG, name="quant")(x, mode=mode)
    stem = conv("stem")(x, mode=mode)
    y = conv("b1_conv2")(conv("b1_conv1")(stem, mode=mode), mode=mode)
    y = qnn.QuantAdd(qconfig=QCONFIG, relu=True, name="add1")(y, stem, mode=mode)
    z = conv("b2_conv2")(conv("b2_conv1")(y, mode=mode), mode=mode)
    z = qnn.QuantAdd(qconfig=QCONFIG, name="add2")(z, conv("b2_proj")(y, mode=mode), mode=mode)
    z = qnn.QuantConcat(qconfig=QCONFIG, name="cat")(
        [conv("br1")(z, mode=mode), conv("br2")(z, mode=mode)], mode=mode)
    z = qnn.AvgPool(name="pool")(z, mode=mode)
    y = qnn.QuantDense(CLASSES, qconfig=QCONFIG, name="fc")(z, mode=mode)
    return qnn.Dequantize(name="dequant")(y, mode=mode)


@pytest.fixture(autouse=True, scope="module")
def torch_engine():
  """fbgemm (CPU-independent convolutions) on one thread (no split adds)."""
  previous, threads = torch.backends.quantized.engine, torch.get_num_threads()
  torch.backends.quantized.engine = "fbgemm"
  torch.set_num_threads(1)
  yield
  torch.backends.quantized.engine = previous
  torch.set_num_threads(threads)


def _nhwc(t: np.ndarray) -> np.ndarray:
  return t.transpose(0, 2, 3, 1) if t.ndim == 4 else t


def _carrier(q: np.ndarray) -> jax.Array:
  """torch's quint8 int_repr (NCHW) as qjax's int8 carrier (NHWC), shifted in NumPy."""
  return jax.device_put(np.ascontiguousarray((_nhwc(q).astype(np.int16) - 128).astype(np.int8)))


def _torch_values(q8) -> np.ndarray:
  """qjax's int8 carrier (NHWC) as torch's int_repr values (NCHW layout)."""
  q = np.asarray(q8).astype(np.int64) + 128
  return q.transpose(0, 3, 1, 2) if q.ndim == 4 else q


def _flax_params(fused) -> dict:
  params = {}
  for name in CONVS:
    module = getattr(fused, name)
    conv = module[0] if isinstance(module, torch.nn.Sequential) else module
    params[name] = {"kernel": conv.weight.detach().numpy().transpose(2, 3, 1, 0).copy(),
                    "bias": conv.bias.detach().numpy().copy()}
  params["fc"] = {"kernel": fused.fc.weight.detach().numpy().T.copy(),
                  "bias": fused.fc.bias.detach().numpy().copy()}
  return params


def _points() -> dict:
  """torch observer owner -> the qjax point that observes the same tensor."""
  return {"quant": "quant", **{name: f"{name}/output" for name in (*CONVS, "fc")},
          "add1": "add1/output", "add2": "add2/output", "cat": "cat/output"}


@functools.lru_cache(maxsize=None)
def _setup() -> "Setup":
  import copy
  from torch.ao import quantization as tq
  generator = torch.Generator().manual_seed(0)
  torch.manual_seed(0)
  model = torch_models.randomize_batch_norms(
      torch_models.TorchResNetTiny(in_channels=1, width=WIDTH, branch_widths=BRANCHES,
                                   num_classes=CLASSES), generator)
  rng = np.random.default_rng(0)
  calib = [rng.normal(size=(BATCH, 1, SIZE, SIZE)).astype(np.float32)
           for _ in range(CALIB_BATCHES)]
  x_eval = rng.normal(size=(BATCH, 1, SIZE, SIZE)).astype(np.float32)

  with torch.no_grad():
    tmodel = torch_models.fuse_resnet_tiny(copy.deepcopy(model))
    params = _flax_params(tmodel)
    tmodel.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(tmodel, inplace=True)
    for x in calib:
      tmodel(torch.from_numpy(x))
  qmodel = QResNetTiny()
  # device_put, not jnp.asarray: the latter compiles a program per shape and dtype.
  batches = [jax.device_put(np.ascontiguousarray(_nhwc(x))) for x in calib]
  # Only the observers' initial states: torch's weights replace init's params, so the
  # params' random initializers and the forward are left out of the compiled init.
  stats = jax.jit(lambda key, x: qmodel.init(key, x)["quant_stats"])(jax.random.key(0),
                                                                     batches[0])
  variables = {"params": jax.device_put(params), "quant_stats": stats}
  variables = qnn.calibrate(qmodel, variables, batches)
  own_stats = variables["quant_stats"]
  variables = {**variables,
               "quant_stats": torch_models.pinned_stats(own_stats, tmodel, _points())}
  prepared = copy.deepcopy(tmodel)
  tq.convert(tmodel, inplace=True)
  _, captures = torch_models.run_quantized(tmodel, torch.from_numpy(x_eval), "fbgemm")
  x = jax.device_put(np.ascontiguousarray(_nhwc(x_eval)))
  return Setup(qmodel, variables, own_stats, x, captures, prepared, x_eval)


class Setup(NamedTuple):
  qmodel: nn.Module
  variables: dict  # fused float params + quant_stats pinned to torch's observers
  own_stats: dict  # qjax's own calibration, before pinning
  x: jax.Array  # the evaluation batch, NHWC
  captures: dict  # torch's converted model (fbgemm) on it: run_quantized's captures
  prepared: object  # torch's calibrated model before convert
  x_eval: np.ndarray  # the evaluation batch, NCHW


@functools.lru_cache(maxsize=None)
def _x86_captures():
  """torch's captures of the same prepared model converted and run on the "x86" engine."""
  import copy
  from torch.ao import quantization as tq
  setup = _setup()
  with torch_models.quantized_engine("x86"), torch.no_grad():
    tmodel = tq.convert(copy.deepcopy(setup.prepared))
  _, captures = torch_models.run_quantized(tmodel, torch.from_numpy(setup.x_eval), "x86")
  return captures


def _run(qmodel, int_vars, x, feeds):
  """mode "int8" with the modules named in `feeds` taking those int8 inputs (a tuple of
  positional arguments) instead of their producers' outputs; {module name: its output}."""
  def substitute(next_fun, args, kwargs, context):
    name = context.module.name
    if context.method_name == "__call__" and name in feeds:
      args = feeds[name]
    return next_fun(*args, **kwargs)

  def capture(module, method):
    return method == "__call__" and module.name in (*MODULES, "quant")

  with nn.intercept_methods(substitute):
    y, state = qmodel.apply(int_vars, x, mode="int8", mutable=["intermediates"],
                            capture_intermediates=capture)
  return y, {name: v["__call__"][0] for name, v in state["intermediates"].items()}


@functools.lru_cache(maxsize=None)
def _int_vars(requant):
  qmodel, variables, _, x, *_ = _setup()
  return qjax.convert(qmodel, variables, x[:2], requant=requant)


@functools.lru_cache(maxsize=None)
def _outputs() -> dict:
  """Every int8 run the tests compare, computed by one jitted program (one compile, not one
  per run): {"fbgemm", "integer"}: each requant's module outputs on torch's fbgemm inputs,
  "x86": fbgemm's on the x86 engine's inputs, "chained": (y, module outputs) of the fbgemm
  model run on its own."""
  setup = _setup()
  run = functools.partial(_run, setup.qmodel)

  def runs(fbgemm, integer, x, torch_feeds, x86_feeds):
    return {"fbgemm": run(fbgemm, x, torch_feeds)[1], "integer": run(integer, x, torch_feeds)[1],
            "x86": run(fbgemm, x, x86_feeds)[1], "chained": run(fbgemm, x, {})}

  return jax.device_get(jax.jit(runs)(_int_vars("fbgemm"), _int_vars("integer"), setup.x,
                                      _torch_feeds(setup.captures),
                                      _torch_feeds(_x86_captures())))


def _torch_feeds(captures) -> dict:
  feeds = {}
  for name in MODULES:
    inputs = [_carrier(c.int_repr) for c in captures[name]["inputs"]]
    feeds[name] = (inputs,) if name == "cat" else tuple(inputs)
  return feeds


def test_calibration_agrees_with_torch_up_to_float_order():
  """Before pinning: each activation range within a few float32 ulps of torch's."""
  _, variables, own, *_ = _setup()
  pinned = traverse_util.flatten_dict(jax.device_get(variables["quant_stats"]), sep="/")
  mine = traverse_util.flatten_dict(jax.device_get(own), sep="/")
  for key in (k for k in pinned if k.endswith(("min_val", "max_val"))):
    np.testing.assert_allclose(mine[key], pinned[key], rtol=2e-6, atol=1e-7, err_msg=key)


def test_every_module_lowers_to_its_op():
  kinds = {name: type(node[forms.OP]).__name__
           for name, node in _int_vars("fbgemm")[forms.COLLECTION].items()}
  assert kinds == {"quant": "QuantizeOp", **{n: "Int8Conv" for n in CONVS},
                   "add1": "Int8Add", "add2": "Int8Add", "cat": "Int8Concat",
                   "pool": "Int8AvgPool", "fc": "Int8Dense", "dequant": "DequantizeOp"}


def test_each_module_matches_torch_on_torchs_inputs():
  captures, outs = _setup().captures, _outputs()["fbgemm"]
  for name in MODULES:
    theirs = captures[name]["output"].int_repr.astype(np.int64)
    ours = _torch_values(outs[name])
    if name == "pool":  # torch keeps (N, C, 1, 1) until its Flatten
      theirs = theirs.reshape(theirs.shape[:2])
    np.testing.assert_array_equal(ours, theirs, err_msg=name)


def test_chained_int8_model_matches_torch():
  captures, (y, outs) = _setup().captures, _outputs()["chained"]
  quant = captures["quant"]["output"].int_repr.astype(np.int64)
  np.testing.assert_array_equal(_torch_values(outs["quant"]), quant)
  for name in MODULES:
    theirs = captures[name]["output"].int_repr.astype(np.int64)
    if name == "pool":
      theirs = theirs.reshape(theirs.shape[:2])
    np.testing.assert_array_equal(_torch_values(outs[name]), theirs, err_msg=name)
  fc = captures["fc"]["output"]
  torch_logits = (fc.int_repr.astype(np.int64) - fc.zero_point).astype(np.float32) * np.float32(
      fc.scale)
  np.testing.assert_array_equal(np.asarray(y), torch_logits)


def test_integer_mode_stays_within_one_step_of_torch():
  """requant="integer": the fixed-point requantizers, adds and concatenation round within
  one step of torch's float ones, module by module on torch's inputs."""
  captures, outs = _setup().captures, _outputs()["integer"]
  for name in MODULES:
    theirs = captures[name]["output"].int_repr.astype(np.int64)
    if name == "pool":
      theirs = theirs.reshape(theirs.shape[:2])
    diff = np.abs(_torch_values(outs[name]) - theirs)
    assert diff.max() <= 1, (name, diff.max())
    assert np.mean(diff == 0) >= 0.99, (name, np.mean(diff == 0))


def _conv_real_values(op, q_in) -> tuple[np.ndarray, np.ndarray]:
  """(v, size) of a converted conv on int8 input q_in (NHWC): v = (acc' + b') M in float64,
  the value fbgemm's requantization rounds, and the magnitude its float32 error scales with."""
  kernel = np.asarray(op.kernel.qvalue)
  pads = arith.conv_pads(op.padding, q_in.shape[1:-1], kernel.shape[:-2], op.strides,
                         op.dilation)
  acc = ref.conv(np.asarray(q_in), kernel, strides=op.strides, padding=pads,
                 dilation=op.dilation, groups=op.groups, pad_value=int(op.pad_value))
  acc = acc + np.asarray(op.offset, np.int64)
  bias = np.asarray(op.requant.bias, np.float64)
  multiplier = np.asarray(op.requant.multiplier, np.float64)
  return (acc + bias) * multiplier, (np.abs(acc) + np.abs(bias)) * multiplier


def test_x86_engine_differs_only_at_rounding_ties(record_property):
  """PyTorch's default "x86" engine runs convolutions with oneDNN on AVX512-VNNI CPUs, whose
  float order differs from fbgemm's: there qjax's fbgemm requantization is within one step of
  every conv output, and each differing output sits on a rounding tie of the value both
  round (within float32 error, 2^-17 relative, of a half-integer). The other modules (add,
  cat, pooling, Linear: the same kernels on both engines) match exactly. How often convs
  differ depends on the CPU, so it is reported, not pinned."""
  captures, outs = _x86_captures(), _outputs()["x86"]
  int_vars = _int_vars("fbgemm")
  feeds = _torch_feeds(captures)
  differing = 0
  for name in MODULES:
    theirs = captures[name]["output"].int_repr.astype(np.int64)
    if name == "pool":
      theirs = theirs.reshape(theirs.shape[:2])
    ours = _torch_values(outs[name])
    if name not in CONVS:
      np.testing.assert_array_equal(ours, theirs, err_msg=name)
      continue
    mismatch = ours != theirs
    differing += int(mismatch.sum())
    np.testing.assert_array_less(np.abs(ours - theirs), 2, err_msg=name)
    if mismatch.any():
      op = int_vars[forms.COLLECTION][name][forms.OP]
      value, size = _conv_real_values(op, feeds[name][0])
      value, size = value.transpose(0, 3, 1, 2), size.transpose(0, 3, 1, 2)
      tie = np.abs(np.abs(value - np.floor(value)) - 0.5)
      assert np.all(tie[mismatch] <= size[mismatch] * 2.0**-17), (name, tie[mismatch])
  record_property("x86_engine_conv_outputs_differing", differing)


def test_unfused_relu_is_torchs_quantized_relu():
  """An unfused nn.ReLU on a converted model's quint8 tensor keeps its grid and clamps at the
  zero point: qjax's Int8ReLU on the carrier."""
  rng = np.random.default_rng(7)
  for zero in (0, 1, 77, 128, 255):
    q = rng.integers(0, 256, (3, 5, 4, 4), dtype=np.uint8)
    t = torch._make_per_tensor_quantized_tensor(torch.from_numpy(q), 0.05, zero)
    y = torch.nn.ReLU()(t)
    assert (y.q_scale(), y.q_zero_point()) == (0.05, zero)
    ours = forms.Int8ReLU(zero_point=np.int32(zero - 128))(_carrier(q))
    np.testing.assert_array_equal(_torch_values(ours), y.int_repr().numpy())
