"""The MNIST models of every experiment: the MLP (784-100-100-10) and LeNet-5, in two forms.

* `MLP`, `LeNet5`: stock Flax layers (nn.Dense, nn.Conv, nn.max_pool, nn.relu) and nothing
  else, so a toolkit can be plugged in from the outside: `dot_general_cls` /
  `conv_general_dilated_cls` are handed unchanged to every nn.Dense / nn.Conv (AQT, Qwix,
  `qjax.nn.QuantDotGeneral`, or qjax's dynamic quantization, which swaps the Dense kernels).
* `QuantMLP`, `QuantLeNet5`: the same networks written with qjax.nn in PyTorch's eager
  placement (Quantize, QuantDense / QuantConv, Dequantize), run in mode "float" |
  "calibrate" | "qat" | "int8". `fuse_relu=False` keeps each ReLU a module of its own
  (`qnn.QuantReLU`, as torch before `fuse_modules`), so the layer's output observer sees the
  pre-ReLU range.

The params of the two forms have the same names and shapes (fc1..fc3, conv1, conv2), whatever
the qconfig or fusion, so weights trained in one run in the other.

LeNet-5 takes 32x32 NHWC digits (MNIST's 28x28 zero-padded by 2 on each side, as in the paper
and PyTorch's tutorial; `lenet_images` makes them), any number of channels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

import qjax.nn as qnn

MLP_HIDDEN = (100, 100)
LENET_WIDTHS = (6, 16, 120, 84)  # LeNet-5's conv1, conv2 channels and fc1, fc2 widths
LENET_SIZE = 32  # input height and width of LeNet-5


def lenet_images(x: np.ndarray, channels: int = 1) -> np.ndarray:
  """MNIST digits (N, 784) or (N, 28, 28) as LeNet-5's input: (N, 32, 32, channels) float32,
  zero-padded by 2 pixels on each side, the gray channel repeated `channels` times.

  Example:
    >>> lenet_images(np.ones((2, 784), np.float32), channels=3).shape
    (2, 32, 32, 3)
  """
  if channels < 1:
    raise ValueError(f"lenet_images: channels must be >= 1; got {channels}.")
  x = np.asarray(x, np.float32).reshape((-1, 28, 28, 1))
  pad = (LENET_SIZE - 28) // 2
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return np.repeat(x, channels, axis=-1) if channels > 1 else x


class MLP(nn.Module):
  """The MNIST MLP: 784-100-100-10, ReLU after the hidden layers; layers fc1..fc3.

  Input (batch, 28, 28[, 1]) or (batch, 784); output (batch, 10) logits.

  Attributes:
    hidden: widths of the hidden layers.
    num_classes: number of logits.
    dot_general_cls: factory of the dot_general of every nn.Dense (None: lax's).
    conv_general_dilated_cls: unused (no convolutions); both models take the same fields so a
      harness configures them alike.
  """

  hidden: tuple[int, ...] = MLP_HIDDEN
  num_classes: int = 10
  dot_general_cls: Any = None
  conv_general_dilated_cls: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, dot_general_cls=self.dot_general_cls, name=f"fc{i + 1}")(x))
    return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls,
                    name=f"fc{len(self.hidden) + 1}")(x)


class LeNet5(nn.Module):
  """LeNet-5 (ReLU, max pooling) on 32x32 NHWC digits:

  conv1 6@5x5 VALID -> 28x28x6, ReLU, 2x2 max pool -> 14x14x6;
  conv2 16@5x5 VALID -> 10x10x16, ReLU, 2x2 max pool -> 5x5x16;
  flatten (400) -> fc1 120, ReLU -> fc2 84, ReLU -> fc3 10 logits.

  Attributes:
    num_classes: number of logits.
    dot_general_cls: factory of the dot_general of every nn.Dense (None: lax's).
    conv_general_dilated_cls: factory of the conv_general_dilated of every nn.Conv.
    widths: channels of conv1, conv2 and widths of fc1, fc2 (the paper's 6, 16, 120, 84;
      wider for WRPN).
  """

  num_classes: int = 10
  dot_general_cls: Any = None
  conv_general_dilated_cls: Any = None
  widths: tuple[int, int, int, int] = LENET_WIDTHS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c1, c2, f1, f2 = self.widths
    for features, name in ((c1, "conv1"), (c2, "conv2")):
      x = nn.Conv(features, (5, 5), padding="VALID",
                  conv_general_dilated_cls=self.conv_general_dilated_cls, name=name)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(f1, dot_general_cls=self.dot_general_cls, name="fc1")(x))
    x = nn.relu(nn.Dense(f2, dot_general_cls=self.dot_general_cls, name="fc2")(x))
    return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls, name="fc3")(x)


def _relu(module: nn.Module, x: jax.Array, index: int, mode: str) -> jax.Array:
  """The unfused ReLU after a layer (a no-op when the layer fused it)."""
  if module.fuse_relu:
    return x
  return qnn.QuantReLU(name=f"relu{index}")(x, mode=mode)


class QuantMLP(nn.Module):
  """The MNIST MLP with qjax.nn quantization points; qconfig=None is the plain float MLP.

  quant -> fc1 (+ReLU) -> fc2 (+ReLU) -> fc3 -> dequant; with `fuse_relu=False` the ReLUs are
  `relu1`, `relu2` (qnn.QuantReLU) after unfused layers.

  Attributes:
    qconfig: QConfig or QConfigMap of every layer and boundary; None for no quantization.
    fuse_relu: fuse each ReLU into the layer before it (torch's Linear+ReLU fusion).
    hidden: widths of the hidden layers.
    num_classes: number of logits.
  """

  qconfig: qnn.QConfig | qnn.QConfigMap | None = None
  fuse_relu: bool = True
  hidden: tuple[int, ...] = MLP_HIDDEN
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: str) -> jax.Array:
    x = qnn.Quantize(self.qconfig, name="quant")(x.reshape((x.shape[0], -1)), mode=mode)
    for i, width in enumerate(self.hidden, 1):
      x = qnn.QuantDense(width, qconfig=self.qconfig,
                         activation=nn.relu if self.fuse_relu else None,
                         name=f"fc{i}")(x, mode=mode)
      x = _relu(self, x, i, mode)
    x = qnn.QuantDense(self.num_classes, qconfig=self.qconfig,
                       name=f"fc{len(self.hidden) + 1}")(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


class QuantLeNet5(nn.Module):
  """LeNet-5 of `LeNet5` with qjax.nn quantization points (max pooling runs on the int8 values:
  it commutes with a monotone grid). Unfused, the ReLUs are relu1..relu4.

  Attributes:
    qconfig: QConfig or QConfigMap; None for no quantization.
    fuse_relu: fuse each ReLU into the conv / dense layer before it.
    num_classes: number of logits.
    widths: channels of conv1, conv2 and widths of fc1, fc2 (as `LeNet5.widths`).
  """

  qconfig: qnn.QConfig | qnn.QConfigMap | None = None
  fuse_relu: bool = True
  num_classes: int = 10
  widths: tuple[int, int, int, int] = LENET_WIDTHS

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: str) -> jax.Array:
    relu = nn.relu if self.fuse_relu else None
    c1, c2, f1, f2 = self.widths
    x = qnn.Quantize(self.qconfig, name="quant")(x, mode=mode)
    for i, (features, name) in enumerate(((c1, "conv1"), (c2, "conv2")), 1):
      x = qnn.QuantConv(features, (5, 5), padding="VALID", qconfig=self.qconfig,
                        activation=relu, name=name)(x, mode=mode)
      x = qnn.max_pool(_relu(self, x, i, mode), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for i, (width, name) in enumerate(((f1, "fc1"), (f2, "fc2")), 3):
      x = qnn.QuantDense(width, qconfig=self.qconfig, activation=relu, name=name)(x, mode=mode)
      x = _relu(self, x, i, mode)
    x = qnn.QuantDense(self.num_classes, qconfig=self.qconfig, name="fc3")(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "lenet5": LeNet5}
QUANT_MODELS: dict[str, type[nn.Module]] = {"mlp": QuantMLP, "lenet5": QuantLeNet5}
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"mlp": (784,),
                                            "lenet5": (LENET_SIZE, LENET_SIZE, 1)}


def model_inputs(name: str, x: np.ndarray, channels: int = 1) -> np.ndarray:
  """Flat MNIST digits (N, 784) in the input layout of model `name` ("mlp" | "lenet5")."""
  if name not in MODELS:
    raise ValueError(f"model_inputs: name must be one of {sorted(MODELS)}; got {name!r}.")
  if name == "lenet5":
    return lenet_images(x, channels)
  return np.asarray(x, np.float32).reshape((len(x), -1))
