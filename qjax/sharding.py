"""Shardings of a qjax model's float / QAT variables and of its batches, on a `jax.sharding.Mesh`.

Nothing here replaces JAX's SPMD machinery: these helpers only say where each variable lives,
as `jax.sharding.NamedSharding`s, for `jax.device_put` and `jax.jit`'s `in_shardings` /
`out_shardings`. Two layouts are covered:

* Batches split over the data axis (`batch_sharding`).
* Kernels split over their output channels on the model axis (`variable_shardings`): a Dense
  kernel (in, out) or a Conv kernel (..., in, out) is sharded along its last axis, and every
  per-output-channel vector of the same layer goes with it, so a device holds whole channels:

    params/<layer>/{bias, bn_scale, bn_bias}         (C,)
    batch_stats/<layer>/{mean, var}                  (C,)   (QuantConvBN / QuantDenseBN)
    quant_stats/<layer>/weight/{min_val, max_val}    (C,)   per-channel weight observers
    quant_params/<layer>/weight/{scale, zero_point}  (C,)   per-channel weight qparams
    params/<layer>/weight/{scale, zero_point}        (C,)   learned (LSQ) weight qparams

  Everything else is replicated: activation statistics, per-tensor weight statistics (shape
  ()), histograms, counts, and any layer whose C does not divide by the model axis' size.

Why a (C,) weight statistic is along the output axis: qjax's layers refuse a per-channel
weight axis that is not an output axis of the kernel (per-channel scales must factor out of
the contraction), and the output axis of a Dense / Conv kernel is its last. So the statistic
is sharded only when it sits under `<layer>/weight` of a layer whose kernel has C output
channels, its name is a per-channel statistic or qparam, and its shape is (C,); sizes alone
decide nothing (a 64-bin histogram of a 64-channel layer stays replicated).

Under `jax.jit` with these shardings (GSPMD) the observers need no `axis_name`: XLA partitions
the one-device program, whose reductions are global, and calibration statistics come out
exactly equal to one device's. Under `jax.shard_map`, pass `axis_name` to the modules
(`qjax.nn`) so that activation observers reduce over the data axis.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_CHANNEL_LEAVES = frozenset({"bias", "bn_scale", "bn_bias", "mean", "var"})
_WEIGHT_POINT_LEAVES = frozenset({"min_val", "max_val", "scale", "zero_point"})


def check_axis(mesh: Mesh, axis: str, argument: str, where: str) -> None:
  """TypeError unless `mesh` is a Mesh, ValueError unless `axis` is one of its axis names
  (the message names `where` and `argument`); shared with `qjax.integer.sharding`."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"{where}: mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
  if axis not in mesh.axis_names:
    raise ValueError(f"{where}: {argument} must be one of the mesh's axis names "
                     f"{tuple(mesh.axis_names)}; got {axis!r}.")


def batch_sharding(mesh: Mesh, ndim: int, *, data_axis: str = "data") -> NamedSharding:
  """The sharding of a batch of rank `ndim` split along its first axis over `data_axis`:

    NamedSharding(mesh, PartitionSpec(data_axis, None, ..., None))

  Replicated over every other mesh axis (e.g. the model axis).

  Args:
    mesh: the device mesh.
    ndim: rank of the batch (>= 1); the leading axis is the batch axis.
    data_axis: the mesh axis the batch is split over.

  Returns:
    The NamedSharding.

  Raises:
    TypeError: `mesh` is not a Mesh.
    ValueError: `data_axis` not among the mesh's axis names, or `ndim` < 1.

  Example:
    >>> import numpy as np
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> batch_sharding(mesh, 2).spec
    P('data', None)
  """
  check_axis(mesh, data_axis, "data_axis", "batch_sharding")
  if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
    raise ValueError(f"batch_sharding: ndim must be an int >= 1 (the batch's rank); got "
                     f"{ndim!r}.")
  return NamedSharding(mesh, PartitionSpec(data_axis, *([None] * (ndim - 1))))


def _key(entry: Any) -> str:
  """A pytree path entry as a name (dict keys, attribute names, sequence indices)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _output_channels(variables: Any) -> dict[tuple[str, ...], int]:
  """{layer path (without the collection): C} of every kernel of rank >= 2 in "params"."""
  channels = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    names = tuple(_key(p) for p in path)
    if len(names) >= 2 and names[0] == "params" and names[-1] == "kernel" \
        and len(getattr(leaf, "shape", ())) >= 2:
      channels[names[1:-1]] = int(leaf.shape[-1])
  return channels


def _spec(names: tuple[str, ...], shape: tuple[int, ...], channels: dict[tuple[str, ...], int],
          model_axis: str, model_size: int) -> PartitionSpec:
  """The PartitionSpec of one variable (module docstring)."""
  leaf, layer = names[-1], names[1:-1]
  c = channels.get(layer)
  if names[0] == "params" and leaf == "kernel" and c is not None and len(shape) >= 2:
    return (PartitionSpec(*([None] * (len(shape) - 1)), model_axis) if c % model_size == 0
            else PartitionSpec())
  if leaf in _CHANNEL_LEAVES and c is not None:
    along = shape == (c,)
  elif leaf in _WEIGHT_POINT_LEAVES and len(names) >= 3 and names[-2] == "weight":
    c = channels.get(names[1:-2])
    along = c is not None and shape == (c,)
  else:
    along = False
  return (PartitionSpec(model_axis) if along and c is not None and c % model_size == 0
          else PartitionSpec())


def variable_shardings(variables: Any, mesh: Mesh, *, model_axis: str = "model") -> Any:
  """NamedShardings of a qjax model's float / QAT variables: kernels split over their output
  channels on `model_axis`, their layer's per-channel vectors with them, the rest replicated.

  With C the kernel's last axis (its output channels) and m the size of `model_axis`, a
  layer is split when m divides C: device k along the model axis holds channels
  [k C / m, (k + 1) C / m) of the kernel and of every per-output-channel vector of that
  layer (the table in the module docstring). Activation statistics, per-tensor statistics,
  histograms and counts are replicated, as is everything outside those paths.

  Args:
    variables: the variables dict of `model.init` / `apply` (collections at the top:
      "params", "quant_stats", optionally "batch_stats", "quant_params"), or any subset.
    mesh: the device mesh.
    model_axis: the mesh axis kernels are split over.

  Returns:
    A pytree of the same structure as `variables` with a NamedSharding at every leaf, for
    `jax.device_put(variables, shardings)` or `jax.jit(..., in_shardings=...)`.

  Raises:
    TypeError: `mesh` is not a Mesh.
    ValueError: `model_axis` not among the mesh's axis names.

  Example:
    >>> import numpy as np
    >>> import qjax.nn as qnn
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> layer = qnn.QuantDense(4, qconfig=qnn.get_default_qat_qconfig("x86"))
    >>> variables = layer.init(jax.random.key(0), jax.numpy.ones((2, 3)), mode="qat")
    >>> shardings = variable_shardings(variables, mesh)
    >>> shardings["params"]["kernel"].spec, shardings["params"]["bias"].spec
    (P(None, 'model'), P('model',))
    >>> shardings["quant_stats"]["weight"]["min_val"].spec
    P('model',)
    >>> shardings["quant_stats"]["output"]["min_val"].spec
    P()
  """
  check_axis(mesh, model_axis, "model_axis", "variable_shardings")
  model_size = int(mesh.shape[model_axis])
  channels = _output_channels(variables)

  def sharding(path: Any, leaf: Any) -> NamedSharding:
    names = tuple(_key(p) for p in path)
    shape = tuple(getattr(leaf, "shape", ()))
    return NamedSharding(mesh, _spec(names, shape, channels, model_axis, model_size))

  return jax.tree_util.tree_map_with_path(sharding, variables)
