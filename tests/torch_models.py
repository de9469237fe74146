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
