"""Shardings of integer variables (`qjax.convert`'s, `for_serving`'s, `quantize_dynamic`'s).

The integer counterpart of `qjax.sharding`: it says where each leaf of a converted model lives
on a `jax.sharding.Mesh`, as `NamedSharding`s for `jax.device_put` and `jax.jit`. A layer's
int8 kernel is split over its output channels on the model axis, and every per-output-channel
array of the same layer goes with it, so a device holds whole channels:

  Int8Dense       kernel (N, K) along axis 0; its per-channel scales / zero points (N,);
                  offset (N,) (-Z_x sum_k q_w + the int32 bias); report["bias"] (N,)
  Int8Conv        kernel (*window, C_in / groups, N) along its last axis; the same vectors
  QuantizedDot    kernel (N, K) along axis 0; offset (N,); scale (N,) (when per channel)
  QuantizedConv   kernel (..., N) along its last axis; offset (N,); scale (N,)
  requantizers    FbgemmRequant's bias (N,) and multiplier, FloatRequant's multiplier,
                  IntegerRequant's m0 and shift, when they are (N,) vectors
  DynamicKernel   qweight (N, K) along axis 0, its per-channel scales / zero points (N,),
                  col_sums (N,), and the layer's float bias params/<layer>/bias (N,)
  float kernels   a layer left in float (or a stock layer's unused float kernel) along its
                  last axis, with its bias (N,)

Everything else is replicated: per-tensor scalars (activation grids, zero points, per-tensor
multipliers), adds, concatenations, pools, LIF neurons, quantize / dequantize boundaries.
Which axis holds the output channels is read from each op's type (its documented layout), never
guessed from sizes. A layer whose N does not divide by the model axis' size is replicated
whole, as are weights packed for the native kernel (`qjax.integer.kernels.PackedWeights`:
their static (n, k) describe the whole matrix; `for_serving` does not pack them when several
devices are visible).

Under `jax.jit` with these shardings and a batch split over the data axis, XLA's SPMD
partitioner runs the same integer program on each device's slice: int8 x int8 -> int32 dots
and convolutions, elementwise requantization, the activations gathered over the model axis
where a layer needs all channels. The outputs equal one device's bit for bit (nothing in the
integer path reduces over the batch except a dynamic layer's min / max, which is exact).

Other op types get their shardings from `op_shardings`, a `functools.singledispatch` function:
register a rule for a new typed op with `op_shardings.register`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qjax import _struct
from qjax import sharding as float_sharding
from qjax.integer import requant as rq
from qjax.integer.dynamic import DynamicKernel
from qjax.integer.forms.dot import QuantizedConv, QuantizedDot
from qjax.integer.forms.linear import Int8Conv, Int8Dense
from qjax.qarray import QArray


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where one layer's arrays go: the mesh, the model axis and whether the layer is split.

  `split` is True when the layer's output channel count divides by the model axis' size.
  `channels(leaf, axis)` is the sharding of an array split along `axis` (its output channels)
  when the layer is split, replicated otherwise; `whole(tree)` replicates every leaf.
  """

  mesh: Mesh
  model_axis: str
  split: bool = False

  def for_layer(self, channels: int) -> Placement:
    """This placement for a layer of `channels` output channels."""
    size = int(self.mesh.shape[self.model_axis])
    return dataclasses.replace(self, split=channels % size == 0)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def channels(self, leaf: Any, axis: int) -> NamedSharding:
    if not self.split:
      return self.replicated()
    ndim = len(np.shape(leaf))
    spec: list[str | None] = [None] * ndim
    spec[axis % ndim] = self.model_axis
    return NamedSharding(self.mesh, PartitionSpec(*spec))

  def vector(self, leaf: Any) -> NamedSharding:
    """A leaf that is either a per-channel (N,) vector (split) or a scalar (replicated)."""
    return self.channels(leaf, 0) if len(np.shape(leaf)) == 1 else self.replicated()

  def whole(self, tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda _: self.replicated(), tree)


def _with_fields(op: Any, **fields: Any) -> Any:
  """`op` (a frozen dataclass) with `fields` replaced: here, arrays by their shardings."""
  return dataclasses.replace(op, **fields)


def _rebuild(tree: Any, leaves: list[Any]) -> Any:
  """`tree`'s structure with `leaves` (no validation: a QArray of shardings is no QArray)."""
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), leaves)


def _weights(kernel: Any, place: Placement, axis: int) -> Any:
  """An int8 weight's shardings: a QArray's values along `axis` with its per-channel
  scales / zero points; packed weights replicated (module docstring)."""
  if isinstance(kernel, QArray):
    per_channel = kernel.spec.axis is not None
    return _rebuild(kernel, [
        place.channels(kernel.qvalue, axis),
        place.channels(kernel.scale, 0) if per_channel else place.replicated(),
        place.channels(kernel.zero_point, 0) if per_channel else place.replicated()])
  return place.whole(kernel)


def _layer_placement(kernel: Any, place: Placement, channels: int) -> Placement:
  """A layer's placement: split when its kernel is a QArray whose channels divide; a layer
  with packed weights stays whole, vectors included, so a device holds whole channels."""
  if isinstance(kernel, QArray):
    return place.for_layer(channels)
  return dataclasses.replace(place, split=False)


def _report(report: dict | None, place: Placement) -> dict | None:
  """A lowered layer's report: its int32 "bias" is per channel, the grids are scalars."""
  if report is None:
    return None
  return {key: place.channels(value, 0) if key == "bias" else place.replicated()
          for key, value in report.items()}


@functools.singledispatch
def op_shardings(op: Any, place: Placement) -> Any:
  """The NamedShardings of one lowered op: a pytree of `op`'s structure.

  The default replicates every leaf; the contractions' types (module docstring) split their
  output channels. Register a rule for a new op type with `op_shardings.register`; build
  its layer's placement with `place.for_layer(output_channels)`.

  Args:
    op: a typed op of the "converted" collection (or any pytree).
    place: the mesh and model axis (`Placement`).

  Returns:
    A pytree of `op`'s structure with a NamedSharding at every leaf.

  Example:
    >>> import jax.numpy as jnp
    >>> from qjax.integer.forms import DequantizeOp
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> op = DequantizeOp(scale=jnp.float32(0.5), zero_point=jnp.int32(0))
    >>> op_shardings(op, Placement(mesh, "model")).scale.spec
    P()
  """
  return place.whole(op)


@op_shardings.register
def _requantizer(op: rq.FbgemmRequant | rq.FloatRequant | rq.IntegerRequant,
                 place: Placement) -> Any:
  # Each array field of a requantizer is a per-channel (N,) vector or a scalar.
  children, _ = _struct.split_fields(op)
  return _with_fields(op, **{name: place.vector(value)
                                    for name, value in children.items()})


@op_shardings.register
def _int8_dense(op: Int8Dense, place: Placement) -> Any:
  place = _layer_placement(op.kernel, place, op.kernel.shape[0])
  return _with_fields(op, kernel=_weights(op.kernel, place, 0),
                             offset=place.channels(op.offset, 0),
                             requant=op_shardings(op.requant, place),
                             report=_report(op.report, place))


@op_shardings.register
def _int8_conv(op: Int8Conv, place: Placement) -> Any:
  place = _layer_placement(op.kernel, place, op.kernel.shape[-1])
  return _with_fields(op, kernel=_weights(op.kernel, place, -1),
                             offset=place.channels(op.offset, 0),
                             pad_value=place.replicated(),
                             requant=op_shardings(op.requant, place),
                             report=_report(op.report, place))


@op_shardings.register
def _quantized_dot(op: QuantizedDot, place: Placement) -> Any:
  place = _layer_placement(op.kernel, place, op.kernel.shape[0])
  return _with_fields(op, input=place.whole(op.input),
                             kernel=_weights(op.kernel, place, 0),
                             offset=place.channels(op.offset, 0), scale=place.vector(op.scale))


@op_shardings.register
def _quantized_conv(op: QuantizedConv, place: Placement) -> Any:
  place = _layer_placement(op.kernel, place, op.kernel.shape[-1])
  return _with_fields(op, input=place.whole(op.input),
                             kernel=_weights(op.kernel, place, -1),
                             offset=place.channels(op.offset, 0), scale=place.vector(op.scale))


@op_shardings.register
def _dynamic_kernel(op: DynamicKernel, place: Placement) -> Any:
  place = place.for_layer(op.features)
  return _rebuild(op, jax.tree_util.tree_leaves(
      (_weights(op.qweight, place, 0), place.channels(op.col_sums, 0))))


def _layer(node: Mapping, place: Placement) -> dict:
  """A Flax layer's variables {"kernel": ..., "bias": ..., ...}: the kernel by its type, the
  bias (N,) with it."""
  kernel: Any = node["kernel"]
  if isinstance(kernel, DynamicKernel):
    channels, kernel_sharding = kernel.features, op_shardings(kernel, place)
  else:  # a float kernel (..., N): a layer left in float, or a stock layer's unused copy
    channels = int(np.shape(kernel)[-1])
    kernel_sharding = place.for_layer(channels).channels(kernel, -1)
  layer = place.for_layer(channels)
  out = {}
  for key, value in node.items():
    if key == "kernel":
      out[key] = kernel_sharding
    elif key == "bias" and np.shape(value) == (channels,):
      out[key] = layer.channels(value, 0)
    else:
      out[key] = _walk(value, place)
  return out


def _is_layer(node: Mapping) -> bool:
  kernel: Any = node.get("kernel")
  return isinstance(kernel, DynamicKernel) or (
      isinstance(kernel, (jax.Array, np.ndarray)) and kernel.ndim >= 2)


def _walk(node: Any, place: Placement) -> Any:
  if _struct.is_struct(node) or isinstance(node, (QArray, DynamicKernel)):
    return op_shardings(node, place)
  if isinstance(node, Mapping):
    if _is_layer(node):
      built = _layer(node, place)
    else:
      built = {key: _walk(value, place) for key, value in node.items()}
    rebuild: Any = type(node)   # dict or flax's FrozenDict
    return built if rebuild is dict else rebuild(built)
  if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
    return type(node)(_walk(value, place) for value in node)
  return place.whole(node)


def integer_variable_shardings(int_vars: Any, mesh: Mesh, *, model_axis: str = "model") -> Any:
  """NamedShardings of integer variables: int8 kernels split over their output channels on
  `model_axis`, each layer's per-channel arrays with them, the rest replicated.

  With N a layer's output channel count and m the size of `model_axis`, device k along the
  model axis holds channels [k N / m, (k + 1) N / m) of the kernel and of every per-channel
  array of that layer (the table in the module docstring), when m divides N; otherwise the
  layer is replicated. The data axis plays no part: variables are replicated over it.

  Args:
    int_vars: `qjax.convert`'s output (or `qjax.for_serving`'s), or variables whose params
      hold `quantize_dynamic`'s kernels ({"params": quantize_dynamic(params)}).
    mesh: the device mesh.
    model_axis: the mesh axis kernels are split over.

  Returns:
    A pytree of `int_vars`' structure with a NamedSharding at every leaf, for
    `jax.device_put(int_vars, shardings)` or `jax.jit(..., in_shardings=...)`.

  Raises:
    TypeError: `mesh` is not a Mesh.
    ValueError: `model_axis` is not among the mesh's axis names.

  Example:
    >>> import jax.numpy as jnp
    >>> from qjax.numerics import QuantSpec
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> kernel = QArray(jnp.ones((4, 3), jnp.int8), jnp.full(4, 0.1, jnp.float32),
    ...                 jnp.zeros(4, jnp.int32), QuantSpec(bits=8, symmetric=True, axis=0))
    >>> op = Int8Dense(kernel=kernel, offset=jnp.zeros(4, jnp.int32),
    ...                requant=rq.FloatRequant(multiplier=jnp.float32(0.5),
    ...                                        zero_point=jnp.int32(0), lo=-128, hi=127,
    ...                                        relu=False))
    >>> shardings = integer_variable_shardings({"converted": {"fc": {"op": op}}}, mesh)
    >>> s = shardings["converted"]["fc"]["op"]
    >>> s.kernel.qvalue.spec, s.kernel.scale.spec, s.offset.spec, s.requant.multiplier.spec
    (P('model', None), P('model',), P('model',), P())
  """
  float_sharding.check_axis(mesh, model_axis, "model_axis", "integer_variable_shardings")
  return _walk(int_vars, Placement(mesh, model_axis))


def shard_integer_variables(int_vars: Any, mesh: Mesh, *, model_axis: str = "model") -> Any:
  """`int_vars` placed on `mesh`: jax.device_put(int_vars, integer_variable_shardings(...)).

  Args:
    int_vars: as for `integer_variable_shardings`.
    mesh: the device mesh.
    model_axis: the mesh axis kernels are split over.

  Returns:
    The same pytree of committed, sharded arrays.

  Example:
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> from qjax.integer.forms import DequantizeOp
    >>> placed = shard_integer_variables(
    ...     {"converted": {"out": {"op": DequantizeOp(scale=np.float32(1.0),
    ...                                               zero_point=np.int32(0))}}}, mesh)
    >>> placed["converted"]["out"]["op"].scale.sharding.spec
    P()
  """
  return jax.device_put(int_vars, integer_variable_shardings(int_vars, mesh,
                                                             model_axis=model_axis))


def shard_batch(x: Any, mesh: Mesh, *, data_axis: str = "data") -> jax.Array:
  """`x` split along its leading (batch) axis over `data_axis`, replicated over the others.

  The batch size must divide by the size of `data_axis`. To run a ragged batch, pad it to
  the next multiple with copies of a real sample and drop the extra outputs: the static
  integer path treats each sample on its own, and repeating a sample changes no dynamic
  layer's min / max either.

  Args:
    x: an array (or array-like) of rank >= 1.
    mesh: the device mesh.
    data_axis: the mesh axis the batch is split over.

  Returns:
    A jax.Array with NamedSharding(mesh, PartitionSpec(data_axis, None, ...)).

  Raises:
    TypeError: `mesh` is not a Mesh.
    ValueError: `data_axis` not among the mesh's axis names, a scalar `x`, or a batch size
      that does not divide by the data axis' size.

  Example:
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> shard_batch(np.zeros((4, 3), np.float32), mesh).sharding.spec
    P('data', None)
  """
  float_sharding.check_axis(mesh, data_axis, "data_axis", "shard_batch")
  shape = np.shape(x)
  if len(shape) < 1:
    raise ValueError("shard_batch: x must have a leading batch axis; got a scalar.")
  size = int(mesh.shape[data_axis])
  if shape[0] % size:
    padded = -(-shape[0] // size) * size
    raise ValueError(f"shard_batch: the batch has {shape[0]} samples (shape {shape}), which "
                     f"does not split over the {size} devices of data_axis {data_axis!r}. Pad "
                     f"it to {padded} samples (e.g. with copies of the last one: "
                     f"np.concatenate([x, np.repeat(x[-1:], {padded - shape[0]}, axis=0)])) "
                     f"and drop the extra outputs.")
  return jax.device_put(x, float_sharding.batch_sharding(mesh, len(shape), data_axis=data_axis))


def partition_specs(shardings: Any) -> Any:
  """The PartitionSpecs of a pytree of NamedShardings (for `jax.shard_map`'s in_specs).

  Example:
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> partition_specs({"a": NamedSharding(mesh, PartitionSpec("model"))})
    {'a': P('model',)}
  """
  return jax.tree_util.tree_map(lambda s: s.spec, shardings,
                                is_leaf=lambda s: isinstance(s, NamedSharding))


__all__ = (
    "Placement",
    "integer_variable_shardings",
    "op_shardings",
    "partition_specs",
    "shard_batch",
    "shard_integer_variables",
)
