"""Quantized joins and pooling: PyTorch's FloatFunctional (add, add_relu, cat) and average
pooling, as Flax modules with an integer form each.

    y = FQ_out(a + b)            QuantAdd (relu=True: FQ_out(relu(a + b)), add_relu)
    y = FQ_out(concat(xs))       QuantConcat
    y = avg_pool(x)              AvgPool / AvgPool(window=None): global average pooling

The joins observe their output (quant_stats/<module>/output), as FloatFunctional's
activation_post_process does, so that the integer form requantizes to that grid; the inputs
keep the grids of the modules that produced them. Average pooling keeps its input's grid (no
observer), as PyTorch's quantized pooling does.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.integer.forms import base as forms
from qjax.integer.forms.add import AddForm, Int8Add, IntegerAdd
from qjax.integer.forms.concat import ConcatForm, Int8Concat, IntegerConcat
from qjax.nn import _integer
from qjax.nn.modules import Mode, _merged_mode, _point, _where, module_path
from qjax.nn.qconfig import QConfig, QConfigLike, resolve


def _observed(qconfig: QConfig | None) -> bool:
  return qconfig is not None and qconfig.activation is not None


def _output(module: nn.Module, qconfig: QConfig | None, y: jax.Array, mode: Mode) -> jax.Array:
  """y through the module's output point, marked for convert when it is quantized."""
  y = _point(qconfig, "activation", name="output", parent=module)(y, mode=mode)
  if not _observed(qconfig):
    return y
  assert qconfig is not None and qconfig.activation is not None
  return forms.mark_output(module, y, observer=qconfig.activation,
                           learnable=qconfig.learnable, point="output")


class QuantAdd(nn.Module):
  """a + b (ReLU'd when `relu`), observed at its output: PyTorch's `FloatFunctional.add` /
  `add_relu`. In mode "int8" it adds two int8 tensors on their own grids and requantizes to
  the observed output grid (`qjax.integer.forms.add`: PyTorch's arithmetic by default).

  Attributes:
    qconfig: its `activation` observer is the output grid (None: a float add).
    relu: fuse a ReLU (add_relu).
    mode: default mode, overridable per call.

  Example:
    >>> import qjax.nn as qnn
    >>> add = qnn.QuantAdd(qconfig=qnn.default_qconfig, relu=True)
    >>> a, b = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
    >>> v = add.init(jax.random.key(0), a, b, mode="float")
    >>> add.apply(v, a, b, mode="float")
    Array([1.5, 0. ], dtype=float32)
  """

  qconfig: QConfigLike = None
  relu: bool = False
  mode: Mode | str | None = None

  @nn.compact
  def __call__(self, a: jax.Array, b: jax.Array, *,
               mode: Mode | str | None = None) -> jax.Array:
    mode = _merged_mode(self, mode)
    qconfig = resolve(self.qconfig, module_path(self))
    where = _where(self)
    if mode is Mode.INT8 and _observed(qconfig):
      return _integer.run(self, where, (Int8Add, IntegerAdd), a, b)
    form = AddForm(relu=bool(self.relu)) if _observed(qconfig) else None
    a = forms.mark_input(self, a, form, operand=0)
    b = forms.mark_input(self, b, form, operand=1)
    y = a + b
    if self.relu:
      y = nn.relu(y)
    return _output(self, qconfig, y, mode)


class QuantConcat(nn.Module):
  """concatenate(xs, axis), observed at its output: PyTorch's `FloatFunctional.cat`. In mode
  "int8" inputs already on the output grid are copied and the others requantized to it.

  Attributes:
    qconfig: its `activation` observer is the output grid (None: a float concatenation).
    axis: the axis to join along.
    mode: default mode, overridable per call.

  Example:
    >>> import qjax.nn as qnn
    >>> cat = qnn.QuantConcat(qconfig=qnn.default_qconfig)
    >>> xs = [jnp.ones((2, 1)), jnp.zeros((2, 2))]
    >>> v = cat.init(jax.random.key(0), xs, mode="float")
    >>> cat.apply(v, xs, mode="float").shape
    (2, 3)
  """

  qconfig: QConfigLike = None
  axis: int = -1
  mode: Mode | str | None = None

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], *,
               mode: Mode | str | None = None) -> jax.Array:
    mode = _merged_mode(self, mode)
    qconfig = resolve(self.qconfig, module_path(self))
    where = _where(self)
    if isinstance(xs, jax.Array) or not isinstance(xs, Sequence) or not xs:
      raise TypeError(f"{where}: QuantConcat takes a non-empty sequence of arrays (a list or "
                      f"tuple); got {type(xs).__name__}.")
    if mode is Mode.INT8 and _observed(qconfig):
      return _integer.run(self, where, (Int8Concat, IntegerConcat), *xs)
    form = ConcatForm(axis=int(self.axis)) if _observed(qconfig) else None
    parts = [forms.mark_input(self, x, form, operand=i) for i, x in enumerate(xs)]
    return _output(self, qconfig, jnp.concatenate(parts, axis=self.axis), mode)

