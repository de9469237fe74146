"""Many small arrays carried as one flat buffer per dtype through a jitted training step.

Every array a jitted call takes or returns costs a few microseconds of dispatch on the host,
whatever its size. A QAT model's `quant_stats` collection holds four small arrays per
quantizer point (minimum, maximum, count, skipped): 24 for a three-layer MLP, as many
arguments and results of the training step as all its parameters and optimizer moments
together. `PackedVariables` holds such a tree as one 1-D buffer per dtype, so that the step
takes and returns two arrays instead of 24; inside the step, `unpack` gives the tree back
(static slices, which XLA fuses into their consumers) and `repack` packs the updated tree.
Packing is exact: no value changes dtype, so float32 statistics and int32 counts come back
bit for bit.

    packed = PackedVariables.pack(variables["quant_stats"])

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, packed, opt_state, x, y):
      def loss_fn(params):
        logits, updates = model.apply({"params": params, "quant_stats": packed.unpack()}, x,
                                      mutable=["quant_stats"])
        return loss(logits, y), updates["quant_stats"]
      (l, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), packed.repack(stats), opt_state, l

The buffers concatenate every leaf, so a packed tree is for small, replicated state (observer
statistics, batch statistics); parameters sharded over a device mesh stay a tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where each leaf lives: the tree's structure, the dtypes in buffer order, and per leaf
  (path, dtype index, offset, shape). Static (hashable), so jit keys its cache on it."""

  treedef: Any
  dtypes: tuple[np.dtype, ...]
  leaves: tuple[tuple[str, int, int, tuple[int, ...]], ...]


def _leaf_dtype_shape(path: str, leaf: Any) -> tuple[np.dtype, tuple[int, ...]]:
  if not (hasattr(leaf, "dtype") and hasattr(leaf, "shape")):
    raise TypeError(f"PackedVariables: every leaf must be an array (with a dtype and a shape); "
                    f"the leaf at {path} is {type(leaf).__name__}.")
  return np.dtype(leaf.dtype), tuple(int(d) for d in leaf.shape)


def _layout(tree: Any) -> _Layout:
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  dtypes: list[np.dtype] = []
  sizes: list[int] = []
  leaves = []
  for key_path, leaf in flat:
    path = jax.tree_util.keystr(key_path)
    dtype, shape = _leaf_dtype_shape(path, leaf)
    if dtype not in dtypes:
      dtypes.append(dtype)
      sizes.append(0)
    which = dtypes.index(dtype)
    leaves.append((path, which, sizes[which], shape))
    sizes[which] += int(np.prod(shape, dtype=np.int64))
  return _Layout(treedef, tuple(dtypes), tuple(leaves))


@jax.tree_util.register_pytree_node_class
class PackedVariables:
  """A pytree of arrays held as one flat buffer per dtype (its only leaves).

  `pack(tree)` concatenates the raveled leaves of each dtype, in the tree's leaf order, into
  one 1-D buffer; `unpack()` slices them back out and restores the shapes and the structure;
  `repack(tree)` packs a tree of the same structure, shapes and dtypes into the same layout.
  Round trips are exact: `unpack(pack(t))` equals `t` leaf for leaf, dtype for dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> stats = {"min_val": jnp.zeros((3,)), "max_val": jnp.ones((3,)),
    ...          "count": jnp.int32(7)}
    >>> packed = PackedVariables.pack(stats)
    >>> [(b.dtype.name, b.shape) for b in packed.buffers]
    [('int32', (1,)), ('float32', (6,))]
    >>> packed.unpack()["max_val"].tolist(), int(packed.unpack()["count"])
    ([1.0, 1.0, 1.0], 7)
  """

  __slots__ = ("_layout", "buffers")

  def __init__(self, buffers: tuple[jax.Array, ...], layout: _Layout):
    self.buffers = tuple(buffers)
    self._layout = layout

  @classmethod
  def pack(cls, tree: Any) -> PackedVariables:
    """Packs `tree` (a pytree of arrays; traced ones too) into one buffer per dtype."""
    layout = _layout(tree)
    return cls(_concatenate(tree, layout), layout)

  def repack(self, tree: Any) -> PackedVariables:
    """Packs `tree`, which must have this packing's structure, shapes and dtypes (the updated
    state of a training step), into this packing's layout."""
    layout = self._layout
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if treedef != layout.treedef:
      raise ValueError(f"PackedVariables.repack: expected a tree of structure "
                       f"{layout.treedef}, got {treedef}.")
    for (key_path, leaf), (path, which, _, shape) in zip(flat, layout.leaves, strict=True):
      dtype, got_shape = _leaf_dtype_shape(jax.tree_util.keystr(key_path), leaf)
      if (dtype, got_shape) != (layout.dtypes[which], shape):
        raise ValueError(f"PackedVariables.repack: the leaf at {path} must be "
                         f"{layout.dtypes[which].name}{list(shape)}, as when packed; got "
                         f"{dtype.name}{list(got_shape)}.")
    return PackedVariables(_concatenate(tree, layout), layout)

  def unpack(self) -> Any:
    """The packed tree: each leaf a slice of its dtype's buffer, reshaped."""
    layout = self._layout
    leaves = [self.buffers[which][offset:offset + int(np.prod(shape, dtype=np.int64))]
              .reshape(shape) for _, which, offset, shape in layout.leaves]
    return jax.tree_util.tree_unflatten(layout.treedef, leaves)

  @property
  def num_leaves(self) -> int:
    """How many arrays the packed tree has."""
    return len(self._layout.leaves)

  def tree_flatten(self) -> tuple[tuple[jax.Array, ...], _Layout]:
    return self.buffers, self._layout

  @classmethod
  def tree_unflatten(cls, layout: _Layout, buffers: Any) -> PackedVariables:
    obj = object.__new__(cls)
    obj.buffers = tuple(buffers)
    obj._layout = layout
    return obj

  def __repr__(self) -> str:
    sizes = ", ".join(f"{d.name}[{b.shape[0]}]" if hasattr(b, "shape") else d.name
                      for d, b in zip(self._layout.dtypes, self.buffers, strict=True))
    return f"PackedVariables({self.num_leaves} leaves in {sizes})"


def _concatenate(tree: Any, layout: _Layout) -> tuple[jax.Array, ...]:
  parts: list[list[jax.Array]] = [[] for _ in layout.dtypes]
  for leaf, (_, which, _, _) in zip(jax.tree_util.tree_leaves(tree), layout.leaves,
                                    strict=True):
    parts[which].append(jnp.ravel(leaf))
  return tuple(jnp.concatenate(p) for p in parts)
