"""The MNIST MLP (784-100-100-10) and LeNet-5, in PyTorch and in qjax.nn, for parity tests.

Each architecture is built twice with the same layer names: in torch for eager-mode
quantization (QuantStub, Linear/Conv + ReLU pairs listed in `FUSE`, DeQuantStub), and in Flax
(Quantize, QuantDense / QuantConv with fused ReLU, Dequantize). Weights are given once, as
{layer: (weight, bias)} in torch's layouts (`TORCH_SHAPES`); `torch_model` loads them into the
torch model and `flax_params` converts them for the qjax one. `prepare` fuses and prepares the
torch model (PTQ or QAT), `run_qjax` threads the qjax model's quant_stats through batches,
and `activation_points`, `observer` and `observes_twice` pair torch's observers with qjax's
quantization points.

Needs torch: only the torch parity tests import it, after their own
`pytest.importorskip("torch")`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

# The test modules that import this one skip without torch first; this skips the module's own
# collection (pytest's --doctest-modules imports it) when torch is not installed.
torch = pytest.importorskip("torch")

import qjax.nn as qnn  # noqa: E402

from torch.ao import quantization as tq  # noqa: E402

# ------------------------------------------------------------------------------------------
# Models.


class TorchMLP(torch.nn.Module):
  """The MNIST MLP for eager-mode quantization: QuantStub, (Linear, ReLU) x 2, Linear."""

  FUSE = [["fc1", "relu1"], ["fc2", "relu2"]]

  def __init__(self):
    super().__init__()
    self.quant = tq.QuantStub()
    self.fc1, self.relu1 = torch.nn.Linear(784, 100), torch.nn.ReLU()
    self.fc2, self.relu2 = torch.nn.Linear(100, 100), torch.nn.ReLU()
    self.fc3 = torch.nn.Linear(100, 10)
    self.dequant = tq.DeQuantStub()

  def forward(self, x):
    x = self.quant(x)
    x = self.relu2(self.fc2(self.relu1(self.fc1(x))))
    return self.dequant(self.fc3(x))


class TorchLeNet(torch.nn.Module):
  """LeNet-5, NCHW: conv 6@5x5 pad 2, ReLU, pool; conv 16@5x5, ReLU, pool; fc 120, 84, 10."""

  FUSE = [["conv1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"], ["fc2", "relu4"]]

  def __init__(self):
    super().__init__()
    self.quant = tq.QuantStub()
    self.conv1, self.relu1 = torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU()
    self.pool1 = torch.nn.MaxPool2d(2)
    self.conv2, self.relu2 = torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU()
    self.pool2 = torch.nn.MaxPool2d(2)
    self.flatten = torch.nn.Flatten()
    self.fc1, self.relu3 = torch.nn.Linear(400, 120), torch.nn.ReLU()
    self.fc2, self.relu4 = torch.nn.Linear(120, 84), torch.nn.ReLU()
    self.fc3 = torch.nn.Linear(84, 10)
    self.dequant = tq.DeQuantStub()

  def forward(self, x):
    x = self.quant(x)
    x = self.pool1(self.relu1(self.conv1(x)))
    x = self.flatten(self.pool2(self.relu2(self.conv2(x))))
    x = self.relu4(self.fc2(self.relu3(self.fc1(x))))
    return self.dequant(self.fc3(x))


class QMLP(nn.Module):
  """The MNIST MLP in qjax.nn: Quantize, QuantDense with fused ReLU x 2, QuantDense,
  Dequantize."""

  qconfig: qnn.QConfig

  @nn.compact
  def __call__(self, x, *, mode):
    q = self.qconfig
    x = qnn.Quantize(q)(x, mode=mode)
    x = qnn.QuantDense(100, qconfig=q, activation=nn.relu, name="fc1")(x, mode=mode)
    x = qnn.QuantDense(100, qconfig=q, activation=nn.relu, name="fc2")(x, mode=mode)
    x = qnn.QuantDense(10, qconfig=q, name="fc3")(x, mode=mode)
    return qnn.Dequantize()(x, mode=mode)


class QLeNet(nn.Module):
  """LeNet-5 in qjax.nn, NHWC. Each QuantConv fuses its ReLU and observes its output before
  the max pool, where torch's fused ConvReLU2d does."""

  qconfig: qnn.QConfig

  @nn.compact
  def __call__(self, x, *, mode):
    q = self.qconfig

    def conv_block(x, features, padding, name):
      x = qnn.QuantConv(features, (5, 5), padding=padding, qconfig=q, activation=nn.relu,
                        name=name)(x, mode=mode)
      return nn.max_pool(x, (2, 2), strides=(2, 2))

    x = qnn.Quantize(q)(x, mode=mode)
    x = conv_block(x, 6, ((2, 2), (2, 2)), "conv1")
    x = conv_block(x, 16, "VALID", "conv2")
    x = x.reshape((x.shape[0], -1))
    x = qnn.QuantDense(120, qconfig=q, activation=nn.relu, name="fc1")(x, mode=mode)
    x = qnn.QuantDense(84, qconfig=q, activation=nn.relu, name="fc2")(x, mode=mode)
    x = qnn.QuantDense(10, qconfig=q, name="fc3")(x, mode=mode)
    return qnn.Dequantize()(x, mode=mode)


# Each layer's weight shape in torch's layout, (out, in) or (out, in, kh, kw), in model order.
TORCH_SHAPES = {
    "mlp": {"fc1": (100, 784), "fc2": (100, 100), "fc3": (10, 100)},
    "lenet": {"conv1": (6, 1, 5, 5), "conv2": (16, 6, 5, 5), "fc1": (120, 400),
              "fc2": (84, 120), "fc3": (10, 84)},
}


def activation_points(arch):
  """torch observer owner -> the qjax point that observes the same tensor, one for one, as
  both place the points where a tensor is produced: QuantStub -> Quantize_0, each fused
  layer's output observer -> <layer>/output (after the fused ReLU; for LeNet's convs before
  the max pool), the last layer's too (DeQuantStub and Dequantize observe nothing)."""
  return {"quant": "Quantize_0", **{name: f"{name}/output" for name in TORCH_SHAPES[arch]}}


# ------------------------------------------------------------------------------------------
# Weights and layouts.


def flax_params(arch, weights):
  """The same weights in Flax's layouts: Dense (in, out), Conv HWIO; LeNet's fc1 rows
  permuted from NCHW's (c, h, w) flatten order to NHWC's (h, w, c)."""
  params = {}
  for name, (w, b) in weights.items():
    if w.ndim == 4:
      kernel = w.transpose(2, 3, 1, 0)
    elif arch == "lenet" and name == "fc1":
      kernel = w.reshape(120, 16, 5, 5).transpose(2, 3, 1, 0).reshape(400, 120)
    else:
      kernel = w.T
    params[name] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(b)}
  return params


def to_torch(arch, x):
  """A NumPy batch as a torch tensor: LeNet's NHWC images transposed to NCHW."""
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if arch == "lenet"
                          else x)


# ------------------------------------------------------------------------------------------
# Running both sides.


def torch_model(arch, weights):
  """A float TorchMLP / TorchLeNet holding `weights` ({layer: (weight, bias)})."""
  model = TorchMLP() if arch == "mlp" else TorchLeNet()
  with torch.no_grad():
    for name, (w, b) in weights.items():
      getattr(model, name).weight.copy_(torch.from_numpy(w))
      getattr(model, name).bias.copy_(torch.from_numpy(b))
  return model


def prepare(model, torch_qconfig, qat):
  """Fuse and prepare (eval) or prepare_qat (train), in place."""
  if qat:
    model.train()
    tq.fuse_modules_qat(model, model.FUSE, inplace=True)
    model.qconfig = torch_qconfig
    tq.prepare_qat(model, inplace=True)
  else:
    model.eval()
    tq.fuse_modules(model, model.FUSE, inplace=True)
    model.qconfig = torch_qconfig
    tq.prepare(model, inplace=True)
  return model


@functools.partial(jax.jit, static_argnames=("model", "mode", "capture"))
def _qjax_step(model, params, stats, x, mode, capture=None):
  """One forward updating the quant_stats; with `capture`, also that layer's output (the
  QuantDense / QuantConv's own, not that of the stock layer sharing its scope)."""
  mutable = ["quant_stats"] + ([] if capture is None else ["intermediates"])
  y, updates = model.apply(
      {"params": params, "quant_stats": stats}, x, mode=mode, mutable=mutable,
      capture_intermediates=lambda mdl, _: (capture is not None and mdl.path == (capture,) and
                                            isinstance(mdl, (qnn.QuantDense, qnn.QuantConv))))
  layer_y = None if capture is None else updates["intermediates"][capture]["__call__"][0]
  return y, updates["quant_stats"], layer_y


@functools.partial(jax.jit, static_argnames="model")
def _qjax_init(model, x):
  return model.init(jax.random.key(0), x, mode="float")["quant_stats"]


def run_qjax(model, params, batches, mode, capture=None):
  """Thread the quant_stats through the batches; (outputs, stats, collect_qparams, outputs
  of the `capture` layer, or [])."""
  stats = _qjax_init(model, jnp.asarray(batches[0]))
  outputs, captured = [], []
  for x in batches:
    y, stats, layer_y = _qjax_step(model, params, stats, jnp.asarray(x), mode, capture)
    outputs.append(np.asarray(y))
    if capture is not None:
      captured.append(np.asarray(layer_y))
  # Eagerly, as a user would: each histogram point's L2 search then reuses one compilation.
  variables = {"params": params, "quant_stats": stats}
  qparams = qnn.collect_qparams(model, variables, jnp.asarray(batches[0]), mode="float")
  return outputs, stats, qparams, captured


# ------------------------------------------------------------------------------------------
# Torch's observers.


def observer(module):
  """The observer inside a torch FakeQuantize / FusedMovingAvgObsFakeQuantize, or itself."""
  return getattr(module, "activation_post_process", module)


def pinned_stats(stats, tmodel, points):
  """qjax's quant_stats with each activation point's state replaced by its torch twin's:
  `points` maps a torch observer owner (a module name of `tmodel`) to the qjax point's path;
  histogram counts are divided by the number of times torch observed each batch."""
  flat = traverse_util.flatten_dict(jax.device_get(stats), sep="/")
  for owner, path in points.items():
    module = getattr(tmodel, owner)
    state = observer(module.activation_post_process)
    times = 2 if observes_twice(module) else 1
    flat[f"{path}/min_val"] = np.float32(state.min_val.item())
    flat[f"{path}/max_val"] = np.float32(state.max_val.item())
    flat[f"{path}/histogram"] = (state.histogram.numpy() / times).astype(np.float32)
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def observes_twice(owner):
  """Whether torch runs `owner`'s output observer twice per forward.

  Eager `prepare` registers the observer as a child module and calls it from a forward hook.
  A fused PTQ module (LinearReLU, ConvReLU2d) is an nn.Sequential, whose forward runs every
  child, the observer included, so each batch is observed once as the Sequential's last layer
  and once more by the hook. Min/max are idempotent; a histogram counts every batch twice
  (a moving average would move twice). QAT modules have their own forward and observe once.
  """
  return type(owner).forward is torch.nn.Sequential.forward and any(
      child is owner.activation_post_process for child in owner.children())


# ------------------------------------------------------------------------------------------
# A residual CNN for whole-model parity of adds, concatenations and average pooling.


class TorchResNetTiny(torch.nn.Module):
  """A small residual CNN for eager-mode quantization, NCHW input (N, in_channels, H, W).

  stem: conv 3x3 (pad 1) + BN + ReLU, `width` channels;
  block 1: conv-BN-ReLU, conv-BN, joined with the stem output by FloatFunctional.add_relu;
  block 2: conv 3x3 stride 2 - BN - ReLU, conv-BN, joined by FloatFunctional.add (no ReLU)
    with a 1x1 stride-2 projection conv-BN of the block's input, 2 x `width` channels;
  head: two 1x1 convs with ReLU (`branch_widths` channels) joined by FloatFunctional.cat
    along channels, AdaptiveAvgPool2d(1), flatten, Linear to `num_classes`.

  The defaults (1 x 12 x 12 input, width 10, branches 6 and 14) give element and channel
  counts that are not multiples of torch's vector widths, so the quantized kernels' scalar
  tails run too. `FUSE` lists the conv-BN(-ReLU) / conv-ReLU groups for fuse_modules.
  """

  FUSE = (("stem", "stem_bn", "stem_relu"),
          ("b1_conv1", "b1_bn1", "b1_relu1"), ("b1_conv2", "b1_bn2"),
          ("b2_conv1", "b2_bn1", "b2_relu1"), ("b2_conv2", "b2_bn2"),
          ("b2_proj", "b2_proj_bn"),
          ("br1", "br1_relu"), ("br2", "br2_relu"))

  def __init__(self, in_channels: int = 1, width: int = 10, branch_widths=(6, 14),
               num_classes: int = 10):
    super().__init__()
    nn_ = torch.nn
    w, w2 = width, 2 * width
    self.quant = tq.QuantStub()
    self.stem, self.stem_bn = nn_.Conv2d(in_channels, w, 3, padding=1, bias=False), \
        nn_.BatchNorm2d(w)
    self.stem_relu = nn_.ReLU()
    self.b1_conv1, self.b1_bn1 = nn_.Conv2d(w, w, 3, padding=1, bias=False), nn_.BatchNorm2d(w)
    self.b1_relu1 = nn_.ReLU()
    self.b1_conv2, self.b1_bn2 = nn_.Conv2d(w, w, 3, padding=1, bias=False), nn_.BatchNorm2d(w)
    self.add1 = nn_.quantized.FloatFunctional()
    self.b2_conv1 = nn_.Conv2d(w, w2, 3, stride=2, padding=1, bias=False)
    self.b2_bn1, self.b2_relu1 = nn_.BatchNorm2d(w2), nn_.ReLU()
    self.b2_conv2, self.b2_bn2 = nn_.Conv2d(w2, w2, 3, padding=1, bias=False), \
        nn_.BatchNorm2d(w2)
    self.b2_proj, self.b2_proj_bn = nn_.Conv2d(w, w2, 1, stride=2, bias=False), \
        nn_.BatchNorm2d(w2)
    self.add2 = nn_.quantized.FloatFunctional()
    self.br1, self.br1_relu = nn_.Conv2d(w2, branch_widths[0], 1), nn_.ReLU()
    self.br2, self.br2_relu = nn_.Conv2d(w2, branch_widths[1], 1), nn_.ReLU()
    self.cat = nn_.quantized.FloatFunctional()
    self.pool = nn_.AdaptiveAvgPool2d(1)
    self.flatten = nn_.Flatten()
    self.fc = nn_.Linear(sum(branch_widths), num_classes)
    self.dequant = tq.DeQuantStub()

  def forward(self, x):
    x = self.quant(x)
    stem = self.stem_relu(self.stem_bn(self.stem(x)))
    y = self.b1_relu1(self.b1_bn1(self.b1_conv1(stem)))
    y = self.add1.add_relu(self.b1_bn2(self.b1_conv2(y)), stem)
    z = self.b2_relu1(self.b2_bn1(self.b2_conv1(y)))
    z = self.add2.add(self.b2_bn2(self.b2_conv2(z)), self.b2_proj_bn(self.b2_proj(y)))
    z = self.cat.cat([self.br1_relu(self.br1(z)), self.br2_relu(self.br2(z))], dim=1)
    return self.dequant(self.fc(self.flatten(self.pool(z))))


def randomize_batch_norms(model, generator):
  """Non-trivial BN statistics and affine parameters (fresh BNs fold to the identity)."""
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=generator))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))
        m.weight.copy_(0.5 + torch.rand(m.num_features, generator=generator))
        m.bias.copy_(0.2 * torch.randn(m.num_features, generator=generator))
  return model


class quantized_engine:  # noqa: N801  (a context manager used like a function)
  """`with quantized_engine("x86"):` sets torch.backends.quantized.engine, restores it after."""

  def __init__(self, engine: str):
    self.engine, self.saved = engine, None

  def __enter__(self):
    self.saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = self.engine
    return self

  def __exit__(self, *exc):
    torch.backends.quantized.engine = self.saved
    return False


def fuse_resnet_tiny(model):
  """Eval mode, then fuse conv-BN-ReLU / conv-BN / conv-ReLU (`TorchResNetTiny.FUSE`) in place."""
  model.eval()
  tq.fuse_modules(model, [list(group) for group in model.FUSE], inplace=True)
  return model


def quantize_resnet_tiny(model, calib_batches, engine: str = "fbgemm"):
  """A converted (quantized) copy of a float TorchResNetTiny: fuse, prepare with
  get_default_qconfig(engine), calibrate on `calib_batches` (NCHW float tensors), convert,
  all under `engine`. The model must run under the same engine (`run_quantized`)."""
  import copy
  with quantized_engine(engine), torch.no_grad():
    qmodel = fuse_resnet_tiny(copy.deepcopy(model))
    qmodel.qconfig = tq.get_default_qconfig(engine)
    tq.prepare(qmodel, inplace=True)
    for x in calib_batches:
      qmodel(x)
    tq.convert(qmodel, inplace=True)
  return qmodel


class QCapture:
  """A quantized tensor as captured: `int_repr` (torch's logical layout, a uint8 ndarray), its
  float `scale` and int `zero_point`, and whether it was channels_last-contiguous."""

  def __init__(self, t):
    self.int_repr = t.int_repr().numpy().copy()
    self.scale, self.zero_point = float(t.q_scale()), int(t.q_zero_point())
    self.channels_last = bool(t.dim() == 4 and
                              t.is_contiguous(memory_format=torch.channels_last))

  def __repr__(self):
    return (f"QCapture(shape={self.int_repr.shape}, scale={self.scale}, "
            f"zero_point={self.zero_point}, channels_last={self.channels_last})")


def run_quantized(qmodel, x, engine: str = "fbgemm"):
  """Run a converted model on `x` under `engine`; (output, captures).

  captures: {module name: {"inputs": [QCapture, ...], "output": QCapture}} for every module
  whose forward output is a quantized tensor (forward hooks), and for each QFunctional (whose
  add / add_relu / cat are methods, not forward) the inputs and output of its call.
  """
  captures, handles, patched = {}, [], []

  def hook(name):
    def fn(module, inputs, output):
      if isinstance(output, torch.Tensor) and output.is_quantized:
        captures[name] = {"inputs": [QCapture(t) for t in inputs
                                     if isinstance(t, torch.Tensor) and t.is_quantized],
                          "output": QCapture(output)}
    return fn

  def wrap(name, module, method):
    original = getattr(module, method)

    def fn(*args, **kwargs):
      out = original(*args, **kwargs)
      tensors = args[0] if method == "cat" else args
      captures[name] = {"op": method, "inputs": [QCapture(t) for t in tensors],
                        "output": QCapture(out), **kwargs}
      return out
    setattr(module, method, fn)
    patched.append((module, method))

  for name, module in qmodel.named_modules():
    if not name:
      continue
    if isinstance(module, torch.ao.nn.quantized.QFunctional):
      for method in ("add", "add_relu", "cat"):
        wrap(name, module, method)
    else:
      handles.append(module.register_forward_hook(hook(name)))
  try:
    with quantized_engine(engine), torch.no_grad():
      y = qmodel(x)
  finally:
    for h in handles:
      h.remove()
    for module, method in patched:
      delattr(module, method)
  return y, captures
