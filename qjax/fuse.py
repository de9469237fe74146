"""BatchNorm folding on params pytrees: pure functions, no modules.

A BatchNorm that follows a Dense or Conv layer is an affine map per output channel, so it
folds into the layer's kernel and bias (running statistics, inference only):

  s  = gamma / sqrt(var + eps)
  W' = W * s          along the output axis (last in Flax: Dense (in, out), Conv HWIO)
  b' = (b - mean) * s + beta

PyTorch mapping. Fusion has two halves in qjax: folding (here) and activation fusion, which
is structural: `qjax.nn.QuantConv(..., activation=nn.relu)` is PyTorch's ConvReLU2d (the
output point sits after the activation). So

  torch.ao.quantization.fuse_modules(model.eval(), [["conv", "bn", "relu"]])

is `fold_batch_norms(variables, [("conv", "bn")])` loaded into the same model built without
the BatchNorm and with `QuantConv(..., use_bias=True, activation=nn.relu)`. For QAT,
`fuse_modules_qat` + `prepare_qat` (ConvBn2d, ConvBnReLU2d, LinearBn1d) is
`qjax.nn.QuantConvBN` / `QuantDenseBN`, and `folded_kernel_and_bias` gives the float kernel
and bias that its converted integer layer uses (what PyTorch's `convert` computes).

Fold before calibrating: a weight observer that has seen the unfolded kernel describes the
wrong tensor.

Numerics. The arithmetic is float32 in PyTorch's order of operations, so that results equal
`torch.nn.utils.fusion.fuse_conv_bn_weights` (kernels of rank >= 3) and
`fuse_linear_bn_weights` (rank 2) bit for bit, under `jax.jit` as well:

  r  = 1 / sqrt(var + eps)                        (sqrt and the division each rounded)
  Conv:  W' = W * (gamma * r),  b' = ((b - mean) * r) * gamma + beta
  Dense: s = gamma * r,  W' = W * s,  b' = (b - mean) * s + beta
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax import _checks
from qjax._float32 import rounded


def _checked_epsilon(epsilon: Any, where: str) -> float:
  if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
    raise TypeError(f"{where}: epsilon must be a Python float >= 0 (the BatchNorm's epsilon, "
                    f"1e-5 by default in Flax and PyTorch; static under jax.jit: bind it with "
                    f"functools.partial or static_argnames); got {epsilon!r}.")
  if not float(epsilon) >= 0.0:
    raise ValueError(f"{where}: epsilon must be >= 0; got {epsilon!r}.")
  return float(epsilon)


def _channel_vector(name: str, value: Any, channels: int, kernel_shape: tuple[int, ...],
                    where: str) -> jax.Array:
  arr = _checks.as_float_array(f"{where}: {name}", value)
  if tuple(arr.shape) != (channels,):
    raise ValueError(f"{where}: {name} has shape {tuple(arr.shape)}, but the kernel of shape "
                     f"{kernel_shape} has {channels} output channels (its last axis, Flax's "
                     f"layout), so it must have shape ({channels},). Is the BatchNorm the one "
                     f"that normalises this layer's output?")
  return arr.astype(jnp.float32)


def fold_batch_norm(kernel: jax.Array, bias: jax.Array | None, *, scale: jax.Array | None,
                    offset: jax.Array | None, mean: jax.Array, var: jax.Array,
                    epsilon: float = 1e-5) -> tuple[jax.Array, jax.Array]:
  """Fold an inference-mode BatchNorm into the layer before it.

    W' = W * gamma / sqrt(var + eps)     (per output channel: the kernel's last axis)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

  computed in float32 in PyTorch's order (module docstring), so that conv(x, W') + b'
  equals BatchNorm(conv(x, W) + b) with the running statistics.

  Args:
    kernel: Dense (in, out) or Conv (..., in, out) kernel, floating point.
    bias: the layer's bias (out,), or None for a layer without bias (zeros).
    scale: BatchNorm gamma (out,), or None for `use_scale=False` (ones).
    offset: BatchNorm beta (out,), or None for `use_bias=False` (zeros).
    mean, var: the BatchNorm's running mean and variance (out,).
    epsilon: the BatchNorm's epsilon.

  Returns:
    (kernel, bias): the folded kernel in the kernel's dtype and the folded bias in the bias's
    dtype (the kernel's when there was none).

  Raises:
    TypeError: for non-float arrays or a non-numeric epsilon.
    ValueError: for shapes that disagree (quoting them), a negative epsilon, or, on concrete
      values, a negative variance or var + eps == 0.

  Example:
    >>> k, b = fold_batch_norm(jnp.ones((2, 3)), None, scale=jnp.full((3,), 2.0),
    ...                        offset=jnp.ones(3), mean=jnp.full((3,), 0.5),
    ...                        var=jnp.full((3,), 4.0), epsilon=0.0)
    >>> k[0], b
    (Array([1., 1., 1.], dtype=float32), Array([0.5, 0.5, 0.5], dtype=float32))
  """
  where = "fold_batch_norm"
  epsilon = _checked_epsilon(epsilon, where)
  kernel = _checks.as_float_array(f"{where}: kernel", kernel)
  if kernel.ndim < 2:
    raise ValueError(f"{where}: kernel must be a Dense (in, out) or Conv (..., in, out) kernel "
                     f"of rank >= 2; got shape {tuple(kernel.shape)}.")
  shape = tuple(kernel.shape)
  channels = shape[-1]

  def vector(name, value):
    return _channel_vector(name, value, channels, shape, where)

  b = jnp.zeros((channels,), jnp.float32) if bias is None else vector("bias", bias)
  gamma = jnp.ones((channels,), jnp.float32) if scale is None else vector("scale", scale)
  beta = jnp.zeros((channels,), jnp.float32) if offset is None else vector("offset", offset)
  mean, var = vector("mean", mean), vector("var", var)
  concrete = _checks.concrete(var)
  if concrete is not None and not np.all(concrete >= 0):
    raise ValueError(f"{where}: var must be >= 0 (a BatchNorm's running variance); got "
                     f"{concrete[~(concrete >= 0)]!r}.")
  if concrete is not None and not np.all(concrete + np.float32(epsilon) > 0):
    raise ValueError(f"{where}: var + epsilon must be > 0 (got var 0 with epsilon 0); give "
                     f"the BatchNorm's epsilon.")
  inv_std = jnp.float32(1) / rounded(jnp.sqrt(var + jnp.float32(epsilon)))
  factor = gamma * inv_std
  if kernel.ndim == 2:  # fuse_linear_bn_weights
    new_bias = rounded((b - mean) * factor) + beta
  else:  # fuse_conv_bn_weights
    new_bias = rounded(rounded((b - mean) * inv_std) * gamma) + beta
  new_kernel = kernel.astype(jnp.float32) * factor.reshape((1,) * (kernel.ndim - 1) + (-1,))
  bias_dtype = kernel.dtype if bias is None else jnp.asarray(bias).dtype
  return new_kernel.astype(kernel.dtype), new_bias.astype(bias_dtype)


def folded_kernel_and_bias(params: Mapping[str, Any], batch_stats: Mapping[str, Any], *,
                           epsilon: float = 1e-5) -> tuple[jax.Array, jax.Array]:
  """The float kernel and bias of a converted `qjax.nn.QuantConvBN` / `QuantDenseBN`.

    W' = W * gamma / sqrt(running_var + eps),  b' = (b - running_mean) * gamma /
    sqrt(running_var + eps) + beta

  (`fold_batch_norm` of the layer's variables), what PyTorch's `convert` of ConvBn2d /
  LinearBn1d computes before it quantizes the weight.

  Args:
    params: the layer's params: {"kernel", "bias" (optional), "bn_scale", "bn_bias"}.
    batch_stats: the layer's batch_stats: {"mean", "var"}.
    epsilon: the layer's `epsilon` field.

  Returns:
    (kernel, bias), as `fold_batch_norm`.

  Raises:
    ValueError: naming a missing entry, or as `fold_batch_norm`.
  """
  where = "folded_kernel_and_bias"
  for collection, tree, names in (("params", params, ("kernel", "bn_scale", "bn_bias")),
                                  ("batch_stats", batch_stats, ("mean", "var"))):
    if not isinstance(tree, Mapping):
      raise TypeError(f"{where}: {collection} must be the layer's {collection} dict "
                      f"(variables['{collection}'][<layer>]); got {type(tree).__name__}.")
    missing = [n for n in names if n not in tree]
    if missing:
      raise ValueError(f"{where}: the layer's {collection} has no {missing} (it holds "
                       f"{sorted(tree)}); pass variables['{collection}'][<layer>] of a "
                       f"QuantConvBN / QuantDenseBN layer.")
  try:
    return fold_batch_norm(params["kernel"], params.get("bias"), scale=params["bn_scale"],
                           offset=params["bn_bias"], mean=batch_stats["mean"],
                           var=batch_stats["var"], epsilon=epsilon)
  except (TypeError, ValueError) as err:
    raise type(err)(f"{where}: {err}") from err


# ------------------------------------------------------------------------------------------
# Folding over a whole variables dict.


def _as_dict(tree: Any) -> Any:
  """Nested Mappings (FrozenDicts included) as fresh dicts; leaves shared."""
  if isinstance(tree, Mapping):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def _lookup(variables: dict, collection: str, path: str, leaf: str, *,
            required: bool) -> Any:
  node = variables.get(collection, {})
  for part in path.split("/") + [leaf]:
    if not isinstance(node, Mapping) or part not in node:
      if not required:
        return None
      raise ValueError(f"fold_batch_norms: no '{collection}/{path}/{leaf}' in variables. "
                       f"Paths are Flax module names joined with '/' (e.g. 'block/conv'); "
                       f"the variables hold: {_describe(variables, collection)}.")
    node = node[part]
  return node


def _describe(variables: dict, collection: str) -> str:
  if collection not in variables:
    return f"no '{collection}' collection (collections: {sorted(variables)})"
  paths = []

  def walk(node, prefix):
    if isinstance(node, Mapping) and not any(not isinstance(v, Mapping)
                                             for v in node.values()):
      for key, value in node.items():
        walk(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(node, Mapping):
      paths.append(f"{prefix} ({', '.join(sorted(map(str, node)))})")

  walk(variables[collection], "")
  return f"{collection}: " + ("; ".join(paths) if paths else "nothing")


def _remove(variables: dict, collection: str, path: str, leaves: Sequence[str]) -> None:
  """Delete collection/path/{leaves} and the dicts this leaves empty."""
  trail = [variables]
  for part in [collection] + path.split("/"):
    if not isinstance(trail[-1].get(part), dict):
      return
    trail.append(trail[-1][part])
  for leaf in leaves:
    trail[-1].pop(leaf, None)
  keys = [collection] + path.split("/")
  for parent, key, child in reversed(list(zip(trail[:-1], keys, trail[1:], strict=True))):
    if child:
      break
    del parent[key]


_PAIR_FIELDS = ("epsilon", "use_scale", "use_bias")
"""The BatchNorm fields a pair may give (Flax's `nn.BatchNorm` names)."""


def _checked_flag(value: Any, name: str, where: str) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{where}: {name} must be True or False (the BatchNorm's {name} field); "
                    f"got {value!r}.")
  return bool(value)


def _checked_pair(pair: Any, epsilon: float, use_scale: bool,
                  use_bias: bool) -> tuple[str, str, float, bool, bool]:
  """(layer, bn, epsilon, use_scale, use_bias) of one pair, the call's defaults filled in."""
  form = ("(layer_path, bn_path), (layer_path, bn_path, epsilon) or (layer_path, bn_path, "
          "{'epsilon': ..., 'use_scale': ..., 'use_bias': ...}) with '/'-joined module paths, "
          "e.g. ('block/conv', 'block/bn')")
  if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) not in (2, 3):
    raise TypeError(f"fold_batch_norms: each pair must be {form}; got {pair!r}.")
  if not all(isinstance(p, str) and p.strip("/") for p in pair[:2]):
    raise TypeError(f"fold_batch_norms: each pair must be {form}; got {pair!r}.")
  where = f"fold_batch_norms: pair {pair!r}"
  fields = {"epsilon": epsilon, "use_scale": use_scale, "use_bias": use_bias}
  if len(pair) == 3 and isinstance(pair[2], Mapping):
    unknown = sorted(map(str, set(pair[2]) - set(_PAIR_FIELDS)))
    if unknown:
      raise TypeError(f"{where}: unknown BatchNorm field(s) {unknown}; a pair's dict may give "
                      f"{list(_PAIR_FIELDS)}.")
    fields.update(pair[2])
  elif len(pair) == 3:
    fields["epsilon"] = pair[2]
  return (pair[0].strip("/"), pair[1].strip("/"), _checked_epsilon(fields["epsilon"], where),
          _checked_flag(fields["use_scale"], "use_scale", where),
          _checked_flag(fields["use_bias"], "use_bias", where))


def _bn_affine(source: dict, bn: str, leaf: str, field: str, expected: bool) -> Any:
  """params/<bn>/<leaf> (gamma "scale" or beta "bias"): required when the BatchNorm's `field`
  says it has one, refused when it says it has none; None then."""
  value = _lookup(source, "params", bn, leaf, required=False)
  if expected and value is None:
    raise ValueError(
        f"fold_batch_norms: no 'params/{bn}/{leaf}' in variables, but the pair says the "
        f"BatchNorm has one ({field}=True, the default). A Flax BatchNorm built with "
        f"{field}=False has none: say so with {field}=False (for every pair) or the pair "
        f"(layer, '{bn}', {{'{field}': False}}); otherwise check the path. The variables hold: "
        f"{_describe(source, 'params')}.")
  if not expected and value is not None:
    raise ValueError(
        f"fold_batch_norms: 'params/{bn}/{leaf}' is in variables, but the pair says the "
        f"BatchNorm has {field}=False; folding would drop it. Pass {field}=True for this pair "
        f"(or fold it in a separate call).")
  return value


def fold_batch_norms(variables: Mapping[str, Any], pairs: Sequence[Sequence[Any]], *,
                     epsilon: float = 1e-5, use_scale: bool = True,
                     use_bias: bool = True) -> dict:
  """Fold BatchNorm layers into the Dense / Conv layers they follow, on a variables dict.

  For each (layer, bn) pair: params/<layer>/kernel and params/<layer>/bias become
  `fold_batch_norm` of the layer and params/<bn>/{scale, bias}, batch_stats/<bn>/{mean, var}
  (the bias is created when the layer had none); the BatchNorm's entries are removed (and
  the dicts, collections included, that this leaves empty). The result loads into the same
  model built without those BatchNorms and with `use_bias=True` on the folded layers:

    folded = fold_batch_norms(variables, [("conv1", "bn1"), ("block/conv", "block/bn")])
    y = Model(fold_bn=True).apply(folded, x)

  The BatchNorm's gamma (params/<bn>/scale) and beta (params/<bn>/bias) are required unless
  the BatchNorm was built without them: Flax's `nn.BatchNorm(use_scale=False)` has no scale
  (gamma = 1) and `use_bias=False` no bias (beta = 0). A missing gamma or beta is not read as
  1 or 0 silently (a wrong path or a lost entry would fold the wrong affine map): say which
  BatchNorms lack them, with the `use_scale` / `use_bias` keywords (every pair) or per pair,
  as the BatchNorm's own fields:

    fold_batch_norms(variables, [("conv1", "bn1"),
                                 ("block/conv", "block/bn", {"use_scale": False}),
                                 ("fc", "bn_fc", {"use_bias": False, "epsilon": 1e-3})])

  Args:
    variables: {"params": ..., "batch_stats": ..., ...} as from `Model.init` / training;
      other collections pass through unchanged.
    pairs: (layer_path, bn_path), (layer_path, bn_path, epsilon) or (layer_path, bn_path,
      fields) with fields a dict of the BatchNorm's "epsilon", "use_scale" and "use_bias";
      module paths joined with "/".
    epsilon: the BatchNorms' epsilon where a pair gives none (Flax's default 1e-5).
    use_scale: whether the BatchNorms have a scale (gamma) where a pair does not say (Flax's
      default True). With True a missing params/<bn>/scale raises; with False a present one
      raises.
    use_bias: likewise for the BatchNorms' bias (beta), params/<bn>/bias.

  Returns:
    A new variables dict (plain nested dicts; the input is not modified).

  Raises:
    ValueError: naming the missing pytree path (and listing what is there), a scale or bias
      that disagrees with use_scale / use_bias, a layer or a BatchNorm named twice, or
      shapes that disagree.
    TypeError: a malformed pair, or an unknown field in a pair's dict.
  """
  if not isinstance(variables, Mapping):
    raise TypeError(f"fold_batch_norms: variables must be a dict of collections "
                    f"({{'params': ..., 'batch_stats': ...}}); got {type(variables).__name__}.")
  if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
    raise TypeError(f"fold_batch_norms: pairs must be a sequence of (layer_path, bn_path) "
                    f"pairs; got {pairs!r}.")
  epsilon = _checked_epsilon(epsilon, "fold_batch_norms")
  use_scale = _checked_flag(use_scale, "use_scale", "fold_batch_norms")
  use_bias = _checked_flag(use_bias, "use_bias", "fold_batch_norms")
  checked = [_checked_pair(p, epsilon, use_scale, use_bias) for p in pairs]
  names = [name for layer, bn, *_ in checked for name in (layer, bn)]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"fold_batch_norms: {repeated} named more than once in pairs {pairs!r}; "
                     f"each layer folds one BatchNorm and each BatchNorm folds into one layer.")
  source = _as_dict(variables)
  result = _as_dict(variables)
  for layer, bn, eps, has_scale, has_bias in checked:
    kernel = _lookup(source, "params", layer, "kernel", required=True)
    bias = _lookup(source, "params", layer, "bias", required=False)
    mean = _lookup(source, "batch_stats", bn, "mean", required=True)
    var = _lookup(source, "batch_stats", bn, "var", required=True)
    gamma = _bn_affine(source, bn, "scale", "use_scale", has_scale)
    beta = _bn_affine(source, bn, "bias", "use_bias", has_bias)
    channels = np.shape(kernel)[-1] if np.ndim(kernel) else None
    for collection, path, leaf, value in (("params", layer, "bias", bias),
                                          ("params", bn, "scale", gamma),
                                          ("params", bn, "bias", beta),
                                          ("batch_stats", bn, "mean", mean),
                                          ("batch_stats", bn, "var", var)):
      if value is not None and channels is not None and np.shape(value) != (channels,):
        raise ValueError(f"fold_batch_norms: {collection}/{path}/{leaf} has shape "
                         f"{np.shape(value)}, but params/{layer}/kernel has shape "
                         f"{np.shape(kernel)}, {channels} output channels, so it must have "
                         f"shape ({channels},). Is '{bn}' the BatchNorm that follows "
                         f"'{layer}'?")
    try:
      new_kernel, new_bias = fold_batch_norm(kernel, bias, scale=gamma, offset=beta,
                                             mean=mean, var=var, epsilon=eps)
    except (TypeError, ValueError) as err:
      raise type(err)(f"fold_batch_norms: pair ({layer!r}, {bn!r}): {err}") from err
    node = result["params"]
    for part in layer.split("/"):
      node = node[part]
    node["kernel"], node["bias"] = new_kernel, new_bias
    _remove(result, "params", bn, ("scale", "bias"))
    _remove(result, "batch_stats", bn, ("mean", "var"))
  return result
