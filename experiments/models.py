"""Reference Flax linen models for the experiments: the MNIST MLP and LeNet-5.

Both are built only from stock layers (nn.Dense, nn.Conv, nn.max_pool, nn.relu) so that a
quantization toolkit can be plugged in from the outside, without editing the model:

  * `dot_general_cls` / `conv_general_dilated_cls` are handed unchanged to every nn.Dense /
    nn.Conv. Flax instantiates them inside the layer with no arguments, so a quantized
    contraction is passed as a factory, e.g. `functools.partial(SomeQuantDotGeneral, bits=8)`.

Any mode (float, QAT, calibration) is therefore baked into the factories by the caller; the
models themselves take no quantization arguments and stay plain. (Models written with
qjax.nn's own layers, in PyTorch's placement, live in the experiments that use them.)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


class MLP(nn.Module):
  """The MNIST MLP: 784-100-100-10, ReLU after the two hidden layers.

  Input: (batch, 28, 28[, 1]) or (batch, 784), flattened to (batch, 784). Output: (batch, 10) logits. Layers are named fc1..fc3.

  Attributes:
    hidden: Widths of the hidden layers.
    num_classes: Number of logits.
    dot_general_cls: Factory of the dot_general used by every nn.Dense (None: lax's).
    conv_general_dilated_cls: Unused (no convolutions); kept so that both models accept
      the same fields and a harness can configure them uniformly.
  """

  hidden: tuple[int, ...] = (100, 100)
  num_classes: int = 10
  dot_general_cls: Any = None
  conv_general_dilated_cls: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns the logits for a batch of images or flattened images."""
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, dot_general_cls=self.dot_general_cls, name=f"fc{i + 1}")(x)
      x = nn.relu(x)
    x = nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls,
                 name=f"fc{len(self.hidden) + 1}")(x)
    return x


class LeNet5(nn.Module):
  """Classic LeNet-5 (ReLU, max pooling) for 28x28x1 NHWC input.

  conv1: 6 filters 5x5, padding 2 (SAME)   -> 28x28x6,  ReLU, 2x2 max pool -> 14x14x6
  conv2: 16 filters 5x5, VALID             -> 10x10x16, ReLU, 2x2 max pool -> 5x5x16
  flatten (400) -> fc1 120, ReLU -> fc2 84, ReLU -> fc3 10 logits.

  Input: (batch, 28, 28, 1). Output: (batch, 10) logits.

  Attributes:
    num_classes: Number of logits.
    dot_general_cls: Factory of the dot_general used by every nn.Dense (None: lax's).
    conv_general_dilated_cls: Factory of the conv_general_dilated used by every nn.Conv
      (None: lax's).
  """

  num_classes: int = 10
  dot_general_cls: Any = None
  conv_general_dilated_cls: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns the logits for a batch of NHWC images."""
    # Explicit ((2, 2), (2, 2)) equals SAME for a 5x5 kernel at stride 1 and matches the
    # original paper's (and torch's padding=2) layout exactly.
    x = nn.Conv(6, (5, 5), padding=((2, 2), (2, 2)),
                conv_general_dilated_cls=self.conv_general_dilated_cls, name="conv1")(x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.Conv(16, (5, 5), padding="VALID",
                conv_general_dilated_cls=self.conv_general_dilated_cls, name="conv2")(x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(120, dot_general_cls=self.dot_general_cls, name="fc1")(x))
    x = nn.relu(nn.Dense(84, dot_general_cls=self.dot_general_cls, name="fc2")(x))
    x = nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls, name="fc3")(x)
    return x


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "lenet5": LeNet5}
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"mlp": (784,), "lenet5": (28, 28, 1)}
