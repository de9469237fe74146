"""PyTorch interop: float `state_dict`s into Flax variables, converted models as torch sees them.

PyTorch is never imported: `load_state_dict` takes torch tensors (or NumPy arrays) and only
calls their `.detach().cpu().numpy()`; everything else here is NumPy.

Loading (`load_state_dict`). A torch float model's `state_dict()` fills the `params` and
`batch_stats` of a qjax.nn (or stock Flax linen) model's variables, layer by layer:

  torch                                   Flax
  Linear.weight (out, in), .bias          Dense kernel (in, out) = W^T, bias
  Conv1d/2d/3d.weight (O, I/g, *k)        Conv kernel (*k, I/g, O), bias
  BatchNorm1d/2d weight, bias             BatchNorm params scale, bias
                 running_mean, _var       batch_stats mean, var  (num_batches_tracked: no
                                          Flax counterpart, consumed and dropped)
  LayerNorm / GroupNorm weight, bias      scale, bias
  Embedding.weight (num, dim)             Embed embedding (num, dim)
  LSTM / GRU / RNN (weight_ih_l{k}, ...)  nn.LSTMCell / OptimizedLSTMCell, nn.GRUCell,
                                          nn.SimpleCell params (below)
  a Conv/Linear + its BatchNorm           qjax.nn.QuantConvBN / QuantDenseBN: map the
                                          BatchNorm onto the layer (mapping={"bn1": "conv1"});
                                          its weight, bias go to bn_scale, bn_bias

Names. A torch module name becomes a Flax path by replacing "." with "/"; a numeric component
may also join its parent with "_" (torch's Sequential "features.0" is Flax's list attribute
"features_0"): whichever exists in the target is taken (both existing is an error). `mapping`
renames: {"torch.module.name": "flax/path"}, or None to drop the module's keys on purpose; a
key also applies to every module below it ({"backbone": "encoder"} sends "backbone.fc" to
"encoder/fc"), the longest matching key winning, and "" as a value is the root.

Every key is accounted for. The result is returned only when every torch key was loaded (or
dropped by `mapping`), every params / batch_stats leaf of the target was filled (or named in
`keep`), and every shape matched; otherwise one ValueError lists every problem, with the torch
key, the Flax path and both shapes.

Flattening a conv output (`flatten_from`). A torch model flattens an NCHW tensor in (C, H, W)
order; the same model in Flax flattens NHWC in (H, W, C) order, so the Linear after the flatten
needs its input columns permuted:

  kernel[(h W + w) C + c, n] = weight[n, (c H + h) W + w]

Give the torch (C, H, W) shape before the flatten: flatten_from={"fc1": (16, 5, 5)} ((C, L)
for Conv1d). Loading without it would give a model that runs and is silently wrong, so a
Linear whose nearest weighted predecessor in the state_dict is a conv with C output channels
and whose in_features is a multiple k > 1 of C is refused, naming the shape to pass; when its
input is not such a flatten (global pooling, a concatenation, or a torch model that already
flattens channels-last), say so with flatten_from={"fc1": None}.

Recurrent layers. torch stacks the gates of a layer in rows ((i, f, g, o) for LSTM, (r, z, n)
for GRU); Flax has one Dense per gate and input, with a single bias where the two are summed:

  LSTMCell   i{i,f,g,o}.kernel = W_ih[gate].T      h{i,f,g,o}.kernel = W_hh[gate].T
             h{gate}.bias = b_ih[gate] + b_hh[gate]
  GRUCell    i{r,z,n}.kernel = W_ih[gate].T        h{r,z,n}.kernel = W_hh[gate].T
             i{r,z}.bias = b_ih + b_hh,  in.bias = b_in,  hn.bias = b_hn (inside r * (...))
  SimpleCell i.kernel = W_ih.T, i.bias = b_ih + b_hh,  h.kernel = W_hh.T  (tanh; a torch RNN
             with nonlinearity="relu" needs SimpleCell(activation_fn=nn.relu))

A layer without biases (bias=False) fills the Flax biases with zeros. The summed bias is one
float32 addition where torch adds the two separately: outputs agree to float rounding (~1e-7),
not bit for bit. Layer k of a multi-layer torch module P is the unit "P.k" (default Flax paths
"P/k" or "P_k", e.g. a list attribute of nn.RNN layers), a bidirectional layer's directions
are "<unit>.forward_rnn" / "<unit>.backward_rnn" (nn.Bidirectional's children), and an
nn.RNN wrapper's "cell" is entered by itself. Inside an @nn.compact method Flax binds a cell
passed to nn.RNN to the enclosing module (its params sit at "LSTMCell_0", not below the
RNN): name the cell (nn.RNN(nn.LSTMCell(h, name="lstm"))) or map to it; modules built in
setup() nest as "rnn/cell". Flax's nn.RNN is batch-major by default, like torch's
batch_first=True. Projections (proj_size, weight_hr) have no Flax cell and are refused.

What a state_dict does not hold and the Flax model must be built with: BatchNorm epsilon and
momentum (torch 0.1 is Flax 0.9), convolution padding / stride / groups, activation
functions. ConvTranspose weights are not supported (same rank as a Conv's, different layout:
a shape check catches most, not all). Load before calibrating: quant_stats are passed through
unchanged, and observers that saw other weights describe other tensors.

The torch view (`to_torch_view`). `qjax.convert`'s integer ops hold the numbers
torch's converted model holds, in qjax's layouts. The view gives them in torch's: per layer the
int8 weight (out, in) / (O, I, *k) as `module.weight().int_repr()`, its scales and zero points
as `q_per_channel_scales()` / `q_per_channel_zero_points()` (per tensor: `q_scale()`,
`q_zero_point()`), the output grid as `module.scale`, `module.zero_point`, and the input grid.
qjax carries unsigned 8-bit activations as int8 shifted by -128 (`arith.int8_shift`); the
view adds the 128 back, so zero points are torch's quint8 ones. `activation_to_torch` /
`activation_from_torch` do the same for activations (int8 carrier NHWC <-> torch's quint8
NCHW int_repr).

Example (a NumPy state_dict; a torch one loads the same way):
  >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return nn.Dense(3, name="fc")(x)
  >>> target = Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))
  >>> sd = {"fc.weight": np.arange(6, dtype=np.float32).reshape(3, 2),
  ...       "fc.bias": np.zeros(3, np.float32)}
  >>> variables = load_state_dict(sd, target)
  >>> variables["params"]["fc"]["kernel"].shape          # (in, out) = weight.T
  (2, 3)
  >>> Net().apply(variables, jnp.ones((1, 2)))          # x @ W.T + b, as torch's Linear
  Array([[1., 5., 9.]], dtype=float32)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qjax.integer import arith
from qjax.integer.forms.base import COLLECTION, OP
from qjax.numerics import QuantSpec

TORCH_QUINT8 = QuantSpec(bits=8, signed=False)
"""torch's activation dtype (quint8) as a spec: every default eager-mode qconfig's grid."""

_COLLECTIONS = ("params", "batch_stats")
_RNN_KEY = re.compile(r"^(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?$")
# Flax cell params -> torch gate rows, and which biases go where (see the module docstring).
_CELLS = {
    "LSTMCell": ("ifgo", {"i": (), "h": ("ih", "hh")}),
    "GRUCell": ("rzn", None),  # biases per gate, below
    "SimpleCell": ("", {"i": ("ih", "hh"), "h": ()}),
}
_GRU_BIAS = {("i", "r"): ("ih", "hh"), ("i", "z"): ("ih", "hh"), ("i", "n"): ("ih",),
             ("h", "r"): (), ("h", "z"): (), ("h", "n"): ("hh",)}
_MAX_LISTED = 25


def _fmt(shape: Sequence[int]) -> str:
  return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _join(*parts: str) -> str:
  return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _as_numpy(key: str, value: Any) -> np.ndarray:
  """A state_dict value as NumPy (torch tensors through .detach().cpu().numpy())."""
  if getattr(value, "is_quantized", False):
    raise ValueError(f"load_state_dict: '{key}' is a quantized tensor ({value.dtype}); expected "
                     f"a float state_dict. Load the float model's state_dict (before "
                     f"torch.ao.quantization.prepare / convert) and quantize with qjax.")
  if hasattr(value, "detach"):
    tensor = value.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
      tensor = tensor.float()
    return tensor.numpy()
  return np.asarray(value)


def _default_paths(name: str, base: str = "") -> list[str]:
  """Flax path candidates of torch module name `name` below Flax path `base`: '.' -> '/',
  and numeric components joined to their parent with '_' (Flax's names for list
  attributes: torch's "layers.0" is Flax's "layers_0")."""
  head = [p for p in base.split("/") if p]
  parts = [p for p in name.split(".") if p]
  joined = list(head)
  for part in parts:
    if part.isdigit() and joined:
      joined[-1] = f"{joined[-1]}_{part}"
    else:
      joined.append(part)
  return list(dict.fromkeys(["/".join(head + parts), "/".join(joined)]))


class _Loader:
  """The state of one `load_state_dict` call: target leaves, what was filled, problems."""

  def __init__(self, target: Mapping[str, Any], mapping: Mapping[str, str | None],
               keep: Sequence[str]):
    self.leaves: dict[str, Any] = {}
    for collection in _COLLECTIONS:
      tree = target.get(collection)
      if tree is None:
        continue
      for k, v in traverse_util.flatten_dict(tree, sep="/").items():
        self.leaves[f"{collection}/{k}"] = v
    self.nodes: set[str] = set()  # every module path of params / batch_stats ("" = root)
    self.children: dict[str, set[str]] = {}  # module path -> its child modules' names
    self.direct: dict[str, set[str]] = {}  # "collection/path" -> the leaves right there
    for full in self.leaves:
      collection, *parts, leaf = full.split("/")
      self.direct.setdefault(_join(collection, *parts), set()).add(leaf)
      for i in range(len(parts) + 1):
        self.nodes.add("/".join(parts[:i]))
        if i:
          self.children.setdefault("/".join(parts[:i - 1]), set()).add(parts[i - 1])
    self.mapping = {k.strip("."): (None if v is None else v.strip("/"))
                    for k, v in mapping.items()}
    self.keep = [k.strip("/") for k in keep]
    self.filled: dict[str, np.ndarray] = {}
    self.source: dict[str, str] = {}
    self.used: set[str] = set()
    self.dropped: set[str] = set()
    self.reported: set[str] = set()  # torch keys named in a problem already
    self.excused: set[str] = set()  # Flax paths whose unfilled leaves a problem explains
    self.problems: list[str] = []

  def fail(self, message: str, keys: Sequence[str] = ()) -> None:
    self.problems.append(message)
    self.reported.update(keys)

  # -- names --------------------------------------------------------------------------------

  def resolve(self, name: str, keys: Sequence[str]) -> str | None:
    """The Flax path of torch module `name`; None when `mapping` drops it (its keys are
    marked dropped) or when there is none (a problem is recorded)."""
    shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
    base: str | None
    base, rest = "", name
    if name in self.mapping:
      base, rest = self.mapping[name], ""
    else:
      prefixes = [k for k in self.mapping if k == "" or name.startswith(k + ".")]
      if prefixes:
        key = max(prefixes, key=len)
        base, rest = self.mapping[key], name[len(key) + 1:] if key else name
    if base is None:
      self.dropped.update(keys)
      return None
    candidates = [base] if not rest else _default_paths(rest, base)
    found = [c for c in candidates if c in self.nodes]
    if len(found) == 1:
      return found[0]
    if len(found) > 1:
      self.fail(f"torch module '{name}' ({shown}) matches several Flax modules: "
                f"{', '.join(found)}; name one with mapping={{'{name}': '<flax/path>'}}.", keys)
      return None
    tried = " or ".join(f"'{c}'" for c in candidates)
    self.fail(f"torch keys {shown} (module '{name}') are not loaded: the target has no Flax "
              f"module at {tried} (in params or batch_stats). Rename it with "
              f"mapping={{'{name}': '<flax/path>'}} or drop it on purpose with "
              f"mapping={{'{name}': None}}.", keys)
    return None

  # -- leaves -------------------------------------------------------------------------------

  def child_leaves(self, path: str, collection: str) -> set[str]:
    return self.direct.get(_join(collection, path), set())

  def put(self, torch_keys: Sequence[str], full: str, value: np.ndarray, what: str,
          torch_shapes: str, expected: str = "") -> None:
    """Fill target leaf `full` with `value` (made from torch_keys), checking its shape."""
    label = " + ".join(f"'{k}'" for k in torch_keys)
    self.excused.add(full.split("/", 1)[1])  # a failure below is its only report
    if full not in self.leaves:
      self.fail(f"torch {label} {torch_shapes} has no Flax counterpart: the target has no "
                f"{full} ({what}). Is the Flax layer built with the same options (use_bias, "
                f"use_scale, ...)?", torch_keys)
      return
    leaf = self.leaves[full]
    target_shape = tuple(np.shape(leaf))
    if tuple(value.shape) != target_shape:
      hint = f"; that is a torch shape of {expected}" if expected else ""
      self.fail(f"shape mismatch: torch {label} {torch_shapes} gives {what} of shape "
                f"{_fmt(value.shape)}, but {full} has shape {_fmt(target_shape)}{hint}.",
                torch_keys)
      return
    if full in self.filled:
      self.fail(f"{full} is filled twice: by torch {self.source[full]} and by torch {label}; "
                f"fix the mapping.", torch_keys)
      return
    dtype = np.dtype(getattr(leaf, "dtype", value.dtype))
    if not np.issubdtype(value.dtype, np.floating):
      self.fail(f"torch {label} has dtype {value.dtype}; expected a float tensor for {full} "
                f"(a float model's state_dict).", torch_keys)
      return
    self.filled[full] = value.astype(dtype) if np.issubdtype(dtype, np.floating) else value
    self.source[full] = label
    self.used.update(torch_keys)

  def unfilled(self) -> list[str]:
    """Target leaves neither filled, nor kept, nor explained by a problem already listed."""
    def kept(full: str) -> bool:
      path = full.split("/", 1)[1]
      return (any(path == k or path.startswith(k + "/") or not k for k in self.keep)
              or any(path == k or path.startswith(k + "/") for k in self.excused))
    return [k for k in self.leaves if k not in self.filled and not kept(k)]


def _torch_modules(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, str]]:
  """torch module name -> {parameter name: full key}, in the state_dict's order."""
  modules: dict[str, dict[str, str]] = {}
  for key in arrays:
    module, _, leaf = key.rpartition(".")
    modules.setdefault(module, {})[leaf] = key
  return modules


def _layer_kind(loader: _Loader, path: str) -> str:
  params = loader.child_leaves(path, "params")
  if "kernel" in params:
    return "dense" if np.ndim(loader.leaves[_params_key(path, "kernel")]) == 2 else "conv"
  if "embedding" in params:
    return "embed"
  return "norm"


def _params_key(path: str, leaf: str, collection: str = "params") -> str:
  return _join(collection, path, leaf)


def _load_weight_and_bias(loader: _Loader, name: str, keys: dict[str, str],
                          arrays: Mapping[str, np.ndarray], path: str,
                          flatten: tuple[int, ...] | None) -> None:
  """Linear / Conv / Embedding / LayerNorm-like modules (the target node decides which)."""
  kind = _layer_kind(loader, path)
  fused = "bn_scale" in loader.child_leaves(path, "params")
  for leaf, key in keys.items():
    if leaf not in ("weight", "bias"):
      loader.fail(f"torch '{key}': no rule for a parameter named '{leaf}' on a module loaded "
                  f"into {_join('params', path)} ({kind}); supported: weight, bias (and "
                  f"running_mean, running_var, num_batches_tracked for BatchNorm, "
                  f"weight_ih_l0, ... for LSTM / GRU / RNN). Drop it with "
                  f"mapping={{'{name}': None}} if it has no Flax counterpart.", [key])
  weight = keys.get("weight")
  if weight is not None:
    w = arrays[weight]
    shapes = _fmt(w.shape)
    kernel_key = _params_key(path, "kernel")
    target = tuple(np.shape(loader.leaves.get(kernel_key, ())))
    if kind in ("dense", "conv") and w.ndim != len(target):
      form = ("a Linear weight (out, in)" if kind == "dense" else
              f"a torch Conv{len(target) - 2}d weight (O, I, *k)")
      loader.fail(f"torch '{weight}' has shape {shapes} (rank {w.ndim}), but {kernel_key} is a "
                  f"rank-{len(target)} kernel of shape {_fmt(target)}: expected {form}.",
                  [weight])
    elif kind == "dense":
      k = w if flatten is None else _unflatten_columns(loader, weight, w, flatten)
      if k is not None:
        loader.put([weight], kernel_key, np.ascontiguousarray(k.T),
                   "a Dense kernel (in, out) = weight.T", shapes, _fmt(target[::-1]))
    elif kind == "conv":
      n = w.ndim - 2
      k = np.transpose(w, tuple(range(2, n + 2)) + (1, 0))
      expected = (target[-1], target[-2], *target[:n])
      loader.put([weight], kernel_key, np.ascontiguousarray(k), "a Conv kernel (*k, I, O)",
                 shapes, _fmt(expected))
    elif kind == "embed":
      loader.put([weight], _params_key(path, "embedding"), w, "an Embed table (num, dim)",
                 shapes)
    else:
      leaf = "bn_scale" if fused else "scale"
      loader.put([weight], _params_key(path, leaf), w, f"a normalization {leaf}", shapes)
  bias = keys.get("bias")
  if bias is not None:
    leaf = "bn_bias" if kind == "norm" and fused else "bias"
    loader.put([bias], _params_key(path, leaf), arrays[bias], f"a {leaf}",
               _fmt(arrays[bias].shape))


def _unflatten_columns(loader: _Loader, key: str, w: np.ndarray,
                       shape: tuple[int, ...]) -> np.ndarray | None:
  """weight[:, (c, *spatial)] columns reordered to (*spatial, c) (NCHW -> NHWC flatten)."""
  if math.prod(shape) != w.shape[1]:
    loader.fail(f"flatten_from gives '{key.rpartition('.')[0]}' the torch shape {_fmt(shape)} "
                f"({math.prod(shape)} values) before the flatten, but '{key}' has shape "
                f"{_fmt(w.shape)}: {w.shape[1]} input features. Give torch's (C, H, W) (or "
                f"(C, L)) shape of the tensor the Linear flattens.", [key])
    return None
  cols = w.reshape((w.shape[0],) + tuple(shape))
  return np.moveaxis(cols, 1, -1).reshape(w.shape[0], -1)


def _load_norm(loader: _Loader, name: str, keys: dict[str, str],
               arrays: Mapping[str, np.ndarray], path: str) -> None:
  """BatchNorm: weight, bias -> scale, bias (bn_scale, bn_bias in a QuantConvBN /
  QuantDenseBN); running statistics -> batch_stats; num_batches_tracked dropped."""
  fused = "bn_scale" in loader.child_leaves(path, "params")
  names = {"weight": ("params", "bn_scale" if fused else "scale"),
           "bias": ("params", "bn_bias" if fused else "bias"),
           "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
  for leaf, key in keys.items():
    if leaf == "num_batches_tracked":
      loader.used.add(key)  # no Flax counterpart (momentum is a module attribute there)
      continue
    if leaf not in names:
      loader.fail(f"torch '{key}': no rule for a BatchNorm parameter named '{leaf}'; drop it "
                  f"with mapping={{'{name}': None}}.", [key])
      continue
    collection, flax_leaf = names[leaf]
    loader.put([key], _params_key(path, flax_leaf, collection), arrays[key],
               f"the BatchNorm's {flax_leaf}", _fmt(arrays[key].shape))


def _cell_kind(loader: _Loader, path: str) -> str | None:
  """"LSTMCell" (also OptimizedLSTMCell's layout), "GRUCell", "SimpleCell" or None."""
  children = loader.children.get(path, set())
  for cell, names in (("LSTMCell", {"ii", "if", "ig", "io", "hi", "hf", "hg", "ho"}),
                      ("GRUCell", {"ir", "iz", "in", "hr", "hz", "hn"}),
                      ("SimpleCell", {"i", "h"})):
    if names <= children:
      return cell
  return None


def _load_rnn(loader: _Loader, name: str, keys: dict[str, str],
              arrays: Mapping[str, np.ndarray]) -> None:
  """torch LSTM / GRU / RNN parameters into Flax cells (module docstring)."""
  units: dict[tuple[int, bool], dict[str, str]] = {}
  for leaf, key in keys.items():
    match = _RNN_KEY.match(leaf)
    if match is None:
      loader.fail(f"torch '{key}': no rule for '{leaf}' on the recurrent module '{name}'; "
                  f"drop it with mapping={{'{name}': None}}.", [key])
      continue
    kind, which, layer, reverse = match.groups()
    if which == "hr":
      loader.fail(f"torch '{key}': LSTM projections (proj_size > 0) have no Flax cell; they "
                  f"are not supported.", [key])
      continue
    units.setdefault((int(layer), bool(reverse)), {})[f"{kind}_{which}"] = key
  layers = {k for k, _ in units}
  bidirectional = any(r for _, r in units)
  for (layer, reverse), unit_keys in sorted(units.items()):
    unit = name if len(layers) == 1 else f"{name}.{layer}"
    if bidirectional:
      unit = f"{unit}.{'backward_rnn' if reverse else 'forward_rnn'}"
    path = loader.resolve(unit, list(unit_keys.values()))
    if path is not None:
      _load_cell(loader, unit, unit_keys, arrays, path)


def _load_cell(loader: _Loader, unit: str, keys: dict[str, str],
               arrays: Mapping[str, np.ndarray], path: str) -> None:
  cell = _cell_kind(loader, path)
  if cell is None and _cell_kind(loader, _join(path, "cell")) is not None:
    path = _join(path, "cell")  # an nn.RNN (or a module) holding the cell
    cell = _cell_kind(loader, path)
  listed = list(keys.values())
  shown = ", ".join(listed)
  if cell is None:
    loader.fail(f"torch {shown} (recurrent unit '{unit}') go to {_join('params', path)}, which "
                f"is not a Flax LSTMCell / OptimizedLSTMCell / GRUCell / SimpleCell (nor an "
                f"nn.RNN holding one); map '{unit}' to the cell with mapping.", listed)
    return
  missing = [k for k in ("weight_ih", "weight_hh") if k not in keys]
  if missing:
    loader.fail(f"recurrent unit '{unit}' has no {missing} in the state_dict (it holds "
                f"{shown}).", listed)
    return
  gates, biases = _CELLS[cell]
  w = {src: arrays[keys[f"weight_{src}"]] for src in ("ih", "hh")}
  n_gates = max(len(gates), 1)
  rows = w["ih"].shape[0]
  hidden = rows // n_gates
  if w["ih"].ndim != 2 or rows % n_gates or w["hh"].shape != (rows, hidden):
    torch_kind = {4: "LSTM", 3: "GRU", 1: "RNN"}[n_gates]
    loader.fail(f"torch '{keys['weight_ih']}' {_fmt(w['ih'].shape)} and '{keys['weight_hh']}' "
                f"{_fmt(w['hh'].shape)} are not the stack of {n_gates} gate(s) that the Flax "
                f"{cell} at {_join('params', path)} needs (weight_ih ({n_gates} * hidden, in), "
                f"weight_hh ({n_gates} * hidden, hidden)): is the torch module a {torch_kind}?",
                listed)
    return
  b = {src: (np.zeros(rows, np.float32) if f"bias_{src}" not in keys
             else arrays[keys[f"bias_{src}"]]) for src in ("ih", "hh")}
  for side, src in (("i", "ih"), ("h", "hh")):
    for g, gate in enumerate(gates or [""]):
      rows_g = slice(g * hidden, (g + 1) * hidden)
      node = _join(path, side + gate)
      loader.put([keys[f"weight_{src}"]], _params_key(node, "kernel"),
                 np.ascontiguousarray(w[src][rows_g].T),
                 f"the kernel (in, hidden) of gate '{side + gate}' = weight_{src}[rows].T",
                 _fmt(w[src].shape))
      parts = _GRU_BIAS[side, gate] if biases is None else biases[side]  # None: GRUCell
      if not parts:
        continue
      bias = b[parts[0]][rows_g]
      for extra in parts[1:]:
        bias = bias + b[extra][rows_g]  # one float rounding; torch adds them in its forward
      sources = [keys[f"bias_{p}"] for p in parts if f"bias_{p}" in keys]
      loader.put(sources or [keys[f"weight_{src}"]], _params_key(node, "bias"), bias,
                 f"the bias of gate '{side + gate}' ({' + '.join('b_' + p for p in parts)})",
                 "(zeros: no torch bias)" if not sources else _fmt(b[parts[0]].shape))


def _flatten_problem(name: str, weight_key: str, in_features: int, conv: str,
                     channels: int) -> str:
  hw = in_features // channels
  side = math.isqrt(hw)
  shape = f"({channels}, {side}, {side})" if side * side == hw else f"({channels}, H, W)"
  return (f"torch Linear '{name}' takes {in_features} input features = {channels} channels of "
          f"the conv '{conv}' before it x {hw}: if the torch model flattens an NCHW tensor "
          f"(C, H, W) into it, the Flax model (NHWC, flattened as (H, W, C)) needs its weight "
          f"columns permuted, or it loads into a model that runs and is wrong. Pass "
          f"flatten_from={{'{name}': {shape}}} (torch's shape before the flatten; (C, L) "
          f"after a Conv1d), or flatten_from={{'{name}': None}} if '{weight_key}' does not "
          f"take such a flatten (e.g. after global pooling, or already channels-last).")


def load_state_dict(state_dict: Mapping[str, Any], target_variables: Mapping[str, Any], *,
                    mapping: Mapping[str, str | None] | None = None,
                    flatten_from: Mapping[str, Sequence[int] | None] | None = None,
                    keep: Sequence[str] = ()) -> dict:
  """A torch float `state_dict` loaded into a Flax model's variables (module docstring).

    Linear:    kernel = W^T                      (in, out) from (out, in)
    Conv:      kernel = W.transpose(2.., 1, 0)   (*k, I, O) from (O, I, *k)
    BatchNorm: scale, bias = weight, bias;  mean, var = running_mean, running_var
    flatten_from={"fc": (C, H, W)}:  kernel[(h W + w) C + c] = W[:, (c H + h) W + w]^T

  Args:
    state_dict: torch module `state_dict()` (tensors) or any {key: array} with the same
      names; float values (num_batches_tracked aside).
    target_variables: the Flax model's variables from `model.init` (or `jax.eval_shape` of
      it): they give every leaf's path, shape and dtype. Only "params" and "batch_stats" are
      filled; other collections (quant_stats, ...) pass through unchanged.
    mapping: torch module name (or name prefix) -> Flax path joined with "/" ("" is the
      root), or None to drop that module's keys on purpose.
    flatten_from: torch Linear module name -> torch's (C, H, W) (or (C, L)) shape of the
      tensor it takes flattened, to permute its columns to Flax's channels-last flatten; None
      loads it as it is (module docstring: a Linear after a conv must be named here).
    keep: Flax paths (module or leaf, "/"-joined, without the collection) whose target values
      are kept instead of being loaded, e.g. learned quantizer scales
      ("fc1/output") that torch's float model does not have.

  Returns:
    A new variables dict (plain dicts): params and batch_stats as jax arrays in the target
    leaves' dtypes (leaves named in `keep` as they were), other collections as they were.

  Raises:
    ValueError: one error listing every problem: torch keys left unused (with the Flax paths
      tried), target leaves left unfilled, shape mismatches (the torch key, the Flax path,
      both shapes), a Linear after a conv without flatten_from, quantized tensors.
    TypeError: for arguments of the wrong kind.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):              # x: NHWC
    ...     x = nn.Conv(2, (3, 3), padding=1, name="conv")(x)
    ...     return nn.Dense(1, name="fc")(x.reshape((x.shape[0], -1)))
    >>> target = Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)))
    >>> sd = {"conv.weight": np.ones((2, 1, 3, 3), np.float32), "conv.bias": np.zeros(2),
    ...       "fc.weight": np.ones((1, 8), np.float32), "fc.bias": np.zeros(1)}
    >>> load_state_dict(sd, target)
    Traceback (most recent call last):
    ...
    ValueError: load_state_dict: 1 problem:
      - torch Linear 'fc' takes 8 input features = 2 channels of the conv 'conv' before it x 4: ...
    >>> v = load_state_dict(sd, target, flatten_from={"fc": (2, 2, 2)})
    >>> v["params"]["conv"]["kernel"].shape                   # (kh, kw, I, O)
    (3, 3, 1, 2)
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(f"load_state_dict: state_dict must be a mapping of names to tensors "
                    f"(torch's module.state_dict()); got {type(state_dict).__name__}.")
  if not isinstance(target_variables, Mapping) or "params" not in target_variables:
    got = (sorted(target_variables) if isinstance(target_variables, Mapping)
           else type(target_variables).__name__)
    raise TypeError(f"load_state_dict: target_variables must be a Flax variables dict with a "
                    f"'params' collection (model.init(...)); got {got}.")
  mapping = dict(mapping or {})
  flatten_from = dict(flatten_from or {})
  for key, value in mapping.items():
    if not isinstance(key, str) or not (value is None or isinstance(value, str)):
      raise TypeError(f"load_state_dict: mapping must map torch module names to Flax paths "
                      f"('a/b') or None; got {key!r}: {value!r}.")
  for key, shape in flatten_from.items():
    if shape is not None and (isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence)
                              or not all(isinstance(s, (int, np.integer)) and s > 0
                                         for s in shape) or len(shape) < 2):
      raise TypeError(f"load_state_dict: flatten_from['{key}'] must be torch's (C, H, W) (or "
                      f"(C, L)) shape of positive ints, or None; got {shape!r}.")
  if isinstance(keep, str):
    keep = (keep,)

  arrays = {key: _as_numpy(key, value) for key, value in state_dict.items()}
  loader = _Loader(target_variables, mapping, keep)
  modules = _torch_modules(arrays)
  loaded_linear: set[str] = set()
  previous: tuple[str, str, int] | None = None  # (module, kind, out channels) of the last layer
  for name, keys in modules.items():
    if any(_RNN_KEY.match(leaf) for leaf in keys):
      _load_rnn(loader, name, keys, arrays)
      previous = None
      continue
    path = loader.resolve(name, list(keys.values()))
    if path is None:
      continue
    if any(leaf in keys for leaf in ("running_mean", "running_var", "num_batches_tracked")):
      _load_norm(loader, name, keys, arrays, path)
      continue
    flatten = None
    weight = arrays.get(keys.get("weight", ""))
    kind = _layer_kind(loader, path)
    if kind == "dense" and weight is not None and weight.ndim == 2:
      loaded_linear.add(name)
      if name in flatten_from:
        shape = flatten_from[name]
        flatten = None if shape is None else tuple(int(s) for s in shape)
      elif previous is not None and previous[1] == "conv":
        channels, in_features = previous[2], weight.shape[1]
        if in_features % channels == 0 and in_features > channels:
          loader.fail(_flatten_problem(name, keys["weight"], in_features, previous[0],
                                       channels), list(keys.values()))
          loader.excused.add(path)  # its leaves are unfilled for this one reason
          previous = (name, kind, weight.shape[0])
          continue
    _load_weight_and_bias(loader, name, keys, arrays, path, flatten)
    if weight is not None and kind in ("dense", "conv"):
      previous = (name, kind, weight.shape[0])

  for name in flatten_from:
    if name not in loaded_linear:
      loader.fail(f"flatten_from names '{name}', which is not a torch Linear loaded into a "
                  f"Flax Dense here (Linear modules: {sorted(loaded_linear) or 'none'}).")
  unused = [k for k in arrays
            if k not in loader.used and k not in loader.dropped and k not in loader.reported]
  if unused:
    loader.fail(f"{len(unused)} torch key(s) not loaded: {', '.join(unused[:_MAX_LISTED])}"
                f"{', ...' if len(unused) > _MAX_LISTED else ''}.")
  observers = [k for k in arrays if k not in loader.used and k not in loader.dropped
               and ("activation_post_process" in k or "fake_quant" in k)]
  if observers:
    loader.fail(f"{observers[0]} (and {len(observers) - 1} more) are observer / fake-quantize "
                f"buffers of a prepared model (torch.ao.quantization.prepare / prepare_qat): "
                f"pass the float model's state_dict, or the float weights of a QAT-trained one: "
                f"{{k: v for k, v in sd.items() if 'activation_post_process' not in k and "
                f"'fake_quant' not in k}} (its fused modules' names may need a mapping).")
  unfilled = loader.unfilled()
  if unfilled:
    loader.problems.append(
        f"{len(unfilled)} target leaf(s) not filled by the state_dict: "
        f"{', '.join(unfilled[:_MAX_LISTED])}{', ...' if len(unfilled) > _MAX_LISTED else ''}"
        f". Map the torch module that holds them (mapping={{'torch.name': 'flax/path'}}), build "
        f"the Flax layer like the torch one (use_bias=False for a torch layer without bias), or "
        f"keep their target values with keep=['<flax/path>'].")
  if loader.problems:
    problems = list(dict.fromkeys(loader.problems))
    raise ValueError(f"load_state_dict: {len(problems)} problem{'s' if len(problems) > 1 else ''}"
                     f":\n  - " + "\n  - ".join(problems))

  result: dict[str, Any] = {}
  for collection, tree in target_variables.items():
    if collection not in _COLLECTIONS:
      result[collection] = tree
      continue
    flat = traverse_util.flatten_dict(tree, sep="/")
    result[collection] = traverse_util.unflatten_dict(
        {tuple(k.split("/")): (jnp.asarray(loader.filled[f"{collection}/{k}"])
                               if f"{collection}/{k}" in loader.filled else v)
         for k, v in flat.items()})
  return result


# ------------------------------------------------------------------------------------------
# The torch view of converted variables.


def _activation_shift(spec: QuantSpec, where: str) -> int:
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"{where}: spec must be a qjax.QuantSpec (torch's quint8 is "
                    f"qjax.interop.TORCH_QUINT8); got {type(spec).__name__}.")
  if spec.bits != 8:
    raise ValueError(f"{where}: torch's quantized activations are 8-bit (quint8 / qint8); got "
                     f"a {spec.bits}-bit spec {spec}.")
  return arith.int8_shift(spec)


def _channel_axes(ndim: int, channels_last: bool | None, where: str) -> bool:
  if channels_last is None:
    if ndim == 3:
      raise ValueError(f"{where}: a rank-3 activation is either a Conv1d's (N, L, C), torch "
                       f"(N, C, L), or a sequence for a Linear, same layout in both; say which "
                       f"with channels_last=True or False.")
    return ndim >= 4
  return bool(channels_last)


def activation_to_torch(q8: Any, *, spec: QuantSpec = TORCH_QUINT8,
                        channels_last: bool | None = None,
                        flatten_from: Sequence[int] | None = None) -> np.ndarray:
  """An int8-path activation (qjax's int8 carrier) as torch's `int_repr()` of it.

    torch value = q8 + int8_shift(spec)   (128 for quint8: uint8 [0, 255]; 0 for qint8)

  and the layout moved to torch's: (N, *spatial, C) -> (N, C, *spatial) for conv activations,
  and a flattened (N, H*W*C) activation's columns to torch's (C, H, W) order.

  Args:
    q8: int8 array from mode "int8" (e.g. a layer's captured output).
    spec: the activation grid (torch's quint8 by default; any 8-bit QuantSpec, e.g. a
      qconfig's `activation.spec`).
    channels_last: whether q8 is a conv activation (N, *spatial, C). Default: yes for rank
      >= 4, no for rank <= 2, and rank 3 must say.
    flatten_from: for a rank-2 activation that is a flattened conv output: torch's (C, H, W)
      (or (C, L)) shape before the flatten.

  Returns:
    NumPy uint8 (quint8) or int8 (qint8) in torch's layout.

  Example:
    >>> activation_to_torch(np.array([[-128, 0, 127]], np.int8))
    array([[  0, 128, 255]], dtype=uint8)
  """
  where = "activation_to_torch"
  shift = _activation_shift(spec, where)
  q = np.asarray(q8)
  if q.dtype != np.int8:
    raise TypeError(f"{where}: expected the int8 carrier of mode 'int8'; got dtype {q.dtype}.")
  out = (q.astype(np.int16) + shift).astype(np.uint8 if shift else np.int8)
  if flatten_from is not None:
    shape = tuple(int(s) for s in flatten_from)
    if q.ndim != 2 or math.prod(shape) != q.shape[1]:
      raise ValueError(f"{where}: flatten_from {_fmt(shape)} needs a (N, {math.prod(shape)}) "
                       f"activation; got shape {_fmt(q.shape)}.")
    spatial_last = out.reshape((q.shape[0],) + shape[1:] + shape[:1])
    return np.ascontiguousarray(np.moveaxis(spatial_last, -1, 1)).reshape(q.shape)
  if _channel_axes(q.ndim, channels_last, where):
    out = np.ascontiguousarray(np.moveaxis(out, -1, 1))
  return out


def activation_from_torch(values: Any, *, spec: QuantSpec = TORCH_QUINT8,
                          channels_last: bool | None = None,
                          flatten_from: Sequence[int] | None = None) -> jnp.ndarray:
  """torch's quantized activation (a quantized tensor or its `int_repr()`) as the int8
  carrier qjax's mode "int8" takes: the inverse of `activation_to_torch`.

    q8 = value - int8_shift(spec),   (N, C, *spatial) -> (N, *spatial, C)

  Args:
    values: a torch quantized tensor, its int_repr(), or a NumPy array of its integers.
    spec, channels_last, flatten_from: as in `activation_to_torch` (channels_last refers to
      the returned array; flatten_from reorders a flattened (C, H, W) row to (H, W, C)).

  Returns:
    A jax int8 array in qjax's layout.

  Example:
    >>> activation_from_torch(np.array([[0, 128, 255]], np.uint8))
    Array([[-128,    0,  127]], dtype=int8)
  """
  where = "activation_from_torch"
  shift = _activation_shift(spec, where)
  if getattr(values, "is_quantized", False):
    values = values.int_repr()
  q = _as_numpy("values", values) if hasattr(values, "detach") else np.asarray(values)
  if not np.issubdtype(q.dtype, np.integer):
    raise TypeError(f"{where}: expected integers (a quantized tensor's int_repr()); got dtype "
                    f"{q.dtype}.")
  carrier = q.astype(np.int16) - shift
  if carrier.min(initial=0) < -128 or carrier.max(initial=0) > 127:
    raise ValueError(f"{where}: values outside the {'quint8 [0, 255]' if shift else 'qint8'} "
                     f"range of spec {spec}; is spec the activation's grid?")
  carrier = carrier.astype(np.int8)
  if flatten_from is not None:
    shape = tuple(int(s) for s in flatten_from)
    if q.ndim != 2 or math.prod(shape) != q.shape[1]:
      raise ValueError(f"{where}: flatten_from {_fmt(shape)} needs a (N, {math.prod(shape)}) "
                       f"activation; got shape {_fmt(q.shape)}.")
    nchw = carrier.reshape((q.shape[0],) + shape)
    carrier = np.ascontiguousarray(np.moveaxis(nchw, 1, -1)).reshape(q.shape)
  elif _channel_axes(q.ndim, channels_last, where):
    carrier = np.ascontiguousarray(np.moveaxis(carrier, 1, -1))
  return jnp.asarray(carrier)


def _grid_view(scale: Any, zero_point: Any, shift: int, where: str) -> tuple[np.float32, int]:
  zero = int(np.asarray(zero_point)) + shift
  lo, hi = (0, 255) if shift else (-128, 127)
  if not lo <= zero <= hi:
    raise ValueError(f"to_torch_view: {where}: zero point {zero} is outside "
                     f"[{lo}, {hi}] after the shift by {shift}; the activation grid is not the "
                     f"activation_spec given. Pass the grid the model was calibrated with "
                     f"(e.g. its qconfig's activation.spec).")
  return np.float32(np.asarray(scale)), zero


def _layer_view(path: str, op: Any, shift: int, flatten: Sequence[int] | None) -> dict:
  report = op.report
  if report is None:
    raise ValueError(f"to_torch_view: {path} has no report (its scales): this is a "
                     f"qjax.for_serving tree. Pass convert's output.")
  q = np.asarray(op.kernel.qvalue)
  if q.ndim == 2:  # Dense: stored (out, in), torch's layout already
    weight = q
    if flatten is not None:
      if math.prod(flatten) != q.shape[1]:
        raise ValueError(f"to_torch_view: flatten_from['{path}'] {_fmt(flatten)} does not "
                         f"hold the layer's {q.shape[1]} input features (weight "
                         f"{_fmt(q.shape)}).")
      cols = q.reshape((q.shape[0],) + tuple(flatten[1:]) + tuple(flatten[:1]))
      weight = np.moveaxis(cols, -1, 1).reshape(q.shape)
  else:  # Conv (*k, I, O) -> (O, I, *k)
    n = q.ndim - 2
    if flatten is not None:
      raise ValueError(f"to_torch_view: flatten_from names '{path}', a convolution; it "
                       f"applies to the Dense layer that takes a flattened conv output.")
    weight = np.transpose(q, (n + 1, n) + tuple(range(n)))
  scale = np.asarray(op.kernel.scale, np.float32)
  out_scale, out_zero = _grid_view(report["output_scale"], report["output_zero_point"], shift,
                                   f"{path}/output")
  in_scale, in_zero = _grid_view(report["input_scale"], report["input_zero_point"], shift,
                                 f"{path}/input")
  return {
      "weight": np.ascontiguousarray(weight).astype(np.int8),
      "weight_scale": scale,
      "weight_zero_point": np.zeros(scale.shape, np.int64),
      "weight_axis": 0 if scale.ndim == 1 else None,
      "scale": out_scale,
      "zero_point": out_zero,
      "input_scale": in_scale,
      "input_zero_point": in_zero,
  }


def to_torch_view(int_vars: Mapping[str, Any], *, activation_spec: QuantSpec = TORCH_QUINT8,
                  flatten_from: Mapping[str, Sequence[int]] | None = None) -> dict[str, dict]:
  """The integers and qparams of `qjax.convert`'s variables, as torch shows them.

  Per converted layer (Flax path P, "/"-joined), what torch's converted module gives:

    weight             int8, (out, in) or (O, I, *k)   module.weight().int_repr()
    weight_scale       float32 (out,) or ()            q_per_channel_scales() / q_scale()
    weight_zero_point  int64 (out,) or ()              q_per_channel_zero_points() /
                                                       q_zero_point()
    weight_axis        0 (per channel) or None         q_per_channel_axis()
    scale, zero_point  the output grid                 module.scale, module.zero_point
    input_scale, input_zero_point   the grid of the layer's input (its producer's output)

  and per boundary (Quantize / Dequantize) {"scale", "zero_point"} of its grid (a converted
  QuantStub's scale and zero_point; a Dequantize's is that of the tensor it dequantizes).
  Activation zero points are unshifted: Z_torch = Z_int8_path + int8_shift(activation_spec)
  (128 for quint8). torch keeps per-channel scales as float64 holding these float32 values;
  convert keeps no float bias ("fbgemm" stores b / (S_x S_w)), so the view has none.

  Args:
    int_vars: `qjax.convert`'s output (not `for_serving`'s, which drops the scales).
    activation_spec: the models' activation grid (8-bit; torch's quint8 by default, also
      right for a qconfig's reduce_range spec, which is stored as quint8).
    flatten_from: Flax path of a Dense that takes a flattened conv output -> torch's (C, H, W)
      shape before the flatten, to show its weight columns in torch's (c, h, w) order.

  Returns:
    {path: entry} as above, NumPy values.

  Raises:
    ValueError: for a for_serving tree, a tree without "converted", or zero points that do
      not fit the activation spec (a different grid).

  Example:
    >>> from qjax.integer import FloatRequant
    >>> from qjax.integer.forms import Int8Dense
    >>> from qjax.qarray import quantize_array
    >>> w = quantize_array(jnp.array([[0.5, -1.0], [2.0, 0.25]]),
    ...                    QuantSpec(bits=8, signed=True, symmetric=True, axis=0))
    >>> op = Int8Dense(
    ...     kernel=w, offset=jnp.zeros(2, jnp.int32),
    ...     requant=FloatRequant(multiplier=jnp.float32(0.1), zero_point=jnp.int32(-128),
    ...                          lo=-128, hi=127, relu=False),
    ...     report={"input_scale": jnp.float32(0.1), "input_zero_point": jnp.int32(-128),
    ...             "output_scale": jnp.float32(0.1), "output_zero_point": jnp.int32(-128)})
    >>> view = to_torch_view({"converted": {"fc": {"op": op}}})
    >>> view["fc"]["weight"], view["fc"]["zero_point"]
    (array([[  64, -127],
           [ 127,   16]], dtype=int8), 0)
  """
  if not isinstance(int_vars, Mapping) or COLLECTION not in int_vars:
    raise ValueError(f"to_torch_view: expected the variables qjax.convert returns "
                     f"({{'{COLLECTION}': ..., ...}}).")
  shift = _activation_shift(activation_spec, "to_torch_view")
  flatten_from = {k.strip("/"): tuple(int(s) for s in v) for k, v in (flatten_from or {}).items()}
  view: dict[str, dict] = {}

  def walk(node: Any, path: str) -> None:
    if not isinstance(node, Mapping):
      return
    op = node.get(OP)
    if op is not None and hasattr(op, "kernel"):
      view[path] = _layer_view(path, op, shift, flatten_from.get(path))
    elif op is not None and hasattr(op, "scale") and hasattr(op, "zero_point"):
      scale, zero = _grid_view(op.scale, op.zero_point, shift, path)
      view[path] = {"scale": scale, "zero_point": zero}
    elif op is not None and isinstance(getattr(op, "report", None), Mapping):
      scale, zero = _grid_view(op.report["output_scale"], op.report["output_zero_point"], shift,
                               path)
      view[path] = {"scale": scale, "zero_point": zero}
    for key, child in node.items():
      if key != OP:
        walk(child, _join(path, str(key)))

  walk(int_vars[COLLECTION], "")
  unknown = sorted(set(flatten_from) - set(view))
  if unknown:
    raise ValueError(f"to_torch_view: flatten_from names {unknown}, which are not converted "
                     f"layers (converted: {sorted(view)}).")
  return view
