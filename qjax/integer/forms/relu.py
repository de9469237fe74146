"""Integer form of a standalone ReLU on a quantized tensor: it keeps the input's grid.

    q_y = max(q_x, Z)                    real 0 is the zero point Z

PyTorch's quantized relu (an unfused nn.ReLU after a converted layer) computes the same: the
output keeps the input's scale and zero point. A ReLU fused into a layer
(`activation=nn.relu`) is cheaper and more precise (its output grid starts at 0); this form
is for models that keep them apart.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax import _device
from qjax._struct import struct
from qjax.integer.forms.base import Form, Lowering, int8_input


@struct
class Int8ReLU:
  """max(q, zero_point) on an int8 tensor (`zero_point` int32 () on the carrier grid).

  Example:
    >>> Int8ReLU(zero_point=jnp.int32(-3))(jnp.array([-5, -3, 4], jnp.int8))
    Array([-3, -3,  4], dtype=int8)
  """

  zero_point: jax.Array

  def __call__(self, x: jax.Array) -> jax.Array:
    x = int8_input(x, "a converted ReLU")
    return jnp.maximum(x, self.zero_point.astype(jnp.int8))


@dataclasses.dataclass(frozen=True)
class ReLUForm(Form):
  """The integer form of `qjax.nn.QuantReLU`; a ReLU on a float tensor stays float."""

  stays_float = True

  def lower(self, lowering: Lowering) -> Int8ReLU:
    (grid,) = lowering.inputs
    return Int8ReLU(zero_point=_device.put(grid.zero_point, jnp.int32))
