"""Calibrated float variables -> integer variables for mode "int8" (PyTorch's `convert`).

    int_vars = qjax.convert.convert(model, variables, x_sample)   # requant="fbgemm"
    y = jax.jit(lambda v, x: model.apply(v, x, mode="int8"))(int_vars, x)

`model` is built from qjax.nn's boundary modules and layers (`Quantize`, `QuantDense`,
`QuantConv`, `QuantConvBN`, `QuantDenseBN`, `Dequantize`) and takes `mode=` in its call (and
`train=False` for the BatchNorm-folded layers, passed through **kwargs), like BatchNorm's
`use_running_average`; `variables` hold its float `params` and calibrated (or QAT-trained)
`quant_stats`. Convert traces the model once on the sample (`jax.make_jaxpr`, nothing
computed) to learn which quantized tensor feeds which layer, through grid-preserving ops only
(reshape, max pooling, slicing, ...), and which observer each point has; the qparams then come
straight from the observers' states (weights: observed once more on the kernel being
converted, see `convert`), each computation compiled once per observer and shape.

The result is a plain pytree {"int8": {...}, plus the float collections of any layer left in
float}. Per converted layer at path P, int8/P holds:

  kernel   QArray of int8 weights: Dense (N, K) output channel first (per-channel axis 0),
           Conv HW..IO as in Flax (axis -1). Symmetric: zero point 0.
  input    {"scale", "zero_point"} of the producer's grid (the input)
  output   {"scale", "zero_point"} of the layer's output grid
  offset   int32 (N,): -Z_x * sum_k q_w[k, n], so that acc + offset = sum (q_x - Z_x) q_w
  bias     int32 (N,): rne(b / (S_x S_w)), zero point 0   ("float" and "integer")
  requant  "fbgemm":  {"bias": f32 b / A, "multiplier": f32 M}
           "float":   {"multiplier": f32 M}
           "integer": {"m0": int32, "shift": int32}, M ~= m0 / 2^shift
           with A = f32(f32(S_x) * S_w), M = f32(A / S_y) (float32 arithmetic, as fbgemm)

and the boundaries int8/<Quantize path> and int8/<Dequantize path> hold {"scale", "zero_point"}.
Zero points are stored on the int8 carrier grid (`qjax.int8.int8_shift`: an unsigned 8-bit grid
is moved down by 128), the values the integer path uses.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.extend import core as jex_core

from qjax import int8
from qjax import numerics
from qjax.numerics import QParams, QuantSpec
from qjax.qarray import QArray
from qjax.nn import _trace
from qjax.nn import modules as qnn_modules
from qjax.nn import qconfig as qnn_qconfig

# Ops between quantized layers that commute with quantization (the int8 values they return are
# the quantized values of what they return in float). Operand 0 is the data for the indexing
# ops; every other listed op needs all its array operands on the same grid.
_PRESERVING = frozenset({
    "reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim", "slice", "rev",
    "copy", "copy_p", "reduce_window_max", "reduce_window_min", "reduce_max", "reduce_min",
    "concatenate", "max", "min",
})
_INDEXING = frozenset({"dynamic_slice", "gather"})


@dataclasses.dataclass(frozen=True)
class Consumer:
  """A module that takes a marked tensor: its path, role ("in" / "float_in"), the marking
  info (kind, specs, relu) and the path of the producing point (None: not quantized)."""

  path: str
  role: str
  info: dict
  source: str | None


@dataclasses.dataclass(frozen=True)
class Dataflow:
  """Producers (path -> activation spec), their marking info (observer, learnable, the
  point's sub-path) and the consumers of a traced model."""

  producers: dict[str, QuantSpec]
  consumers: list[Consumer]
  points: dict[str, dict] = dataclasses.field(default_factory=dict)


def _sub_jaxpr(eqn: Any) -> Any:
  """The callee of a call-like equation (jit, custom_jvp/vjp, remat), if its signature is
  the equation's; None otherwise."""
  for value in eqn.params.values():
    inner = value.jaxpr if isinstance(value, jex_core.ClosedJaxpr) else value
    if (isinstance(inner, jex_core.Jaxpr) and len(inner.invars) == len(eqn.invars)
        and len(inner.outvars) == len(eqn.outvars)):
      return inner
  return None


def _walk(jaxpr: Any, env: dict, flow: Dataflow, problems: list[str]) -> None:
  def source(v):
    return None if isinstance(v, jex_core.Literal) else env.get(v)

  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if eqn.primitive is _trace.mark_p:
      p = eqn.params
      if p["role"] == "out":
        env[eqn.outvars[0]] = p["path"]
        flow.producers[p["path"]] = dict(p["info"])["spec"]
        flow.points[p["path"]] = dict(p["info"])
      else:
        flow.consumers.append(Consumer(p["path"], p["role"], dict(p["info"]),
                                       source(eqn.invars[0])))
      continue
    sources = [source(v) for v in eqn.invars]
    if not any(sources):
      continue
    inner = _sub_jaxpr(eqn)
    if inner is not None:
      sub_env = {iv: s for iv, s in zip(inner.invars, sources, strict=True) if s}
      _walk(inner, sub_env, flow, problems)
      for outer, iv in zip(eqn.outvars, inner.outvars, strict=True):
        if not isinstance(iv, jex_core.Literal) and sub_env.get(iv):
          env[outer] = sub_env[iv]
      continue
    indexing = name in _INDEXING
    data, extra = (sources[:1], sources[1:]) if indexing else (sources, [])
    same_dtype = name != "convert_element_type" or (
        eqn.params.get("new_dtype") == eqn.invars[0].aval.dtype)
    preserving = name in _PRESERVING or indexing or (
        name == "convert_element_type" and same_dtype)
    if preserving and all(data) and len(set(data)) == 1 and not any(extra):
      for out in eqn.outvars:
        env[out] = data[0]
      continue
    producers = sorted({s for s in sources if s})
    if preserving and len({s for s in data if s}) > 1:
      why = f"combines tensors on different grids ({', '.join(producers)})"
    elif preserving:
      why = "mixes them with an unquantized operand"
    else:
      why = "is not a grid-preserving op"
    problems.append(
        f"the int8 output of {', '.join(producers)} reaches `{name}`, which {why}; in mode "
        f"'int8' it would compute on integers. Between quantized layers only reshapes, "
        f"slices, transposes, concatenation and max/min pooling may run; fuse a ReLU into the "
        f"layer (activation=nn.relu) and put a qjax.nn.Dequantize before float ops.")


def _refuse(problems: list[str]) -> None:
  """One ValueError listing every problem found (each once), if any."""
  if problems:
    raise ValueError("convert: the model cannot run in mode 'int8':\n  - "
                     + "\n  - ".join(dict.fromkeys(problems)))


def trace_dataflow(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> Dataflow:
  """Which quantization point produces the input of every converted layer (see module doc).

  Raises:
    ValueError: listing each int8 tensor that would reach an op the integer path cannot run,
      and each model output that is still int8 (no Dequantize).
  """
  def forward(v, *a):
    return model.apply(v, *a, mode="float", **kwargs)

  with _trace.tracing(), qnn_qconfig.checked_lookups():  # and refuse unused QConfigMap patterns
    closed = jax.make_jaxpr(forward)(variables, *args)
  flow = Dataflow(producers={}, consumers=[])
  env: dict = {}
  problems: list[str] = []
  _walk(closed.jaxpr, env, flow, problems)
  leaked = sorted({env[v] for v in closed.jaxpr.outvars
                   if not isinstance(v, jex_core.Literal) and env.get(v)})
  if leaked:
    problems.append(f"the model returns the int8 output of {', '.join(leaked)}; put a "
                    f"qjax.nn.Dequantize before returning it.")
  _refuse(problems)
  return flow


def _at(tree: Any, path: str, *keys: str, collection: str) -> Any:
  node = tree
  for key in [k for k in path.split("/") if k] + list(keys):
    if not hasattr(node, "keys") or key not in node:
      full = "/".join([collection] + [k for k in path.split("/") if k] + list(keys))
      raise ValueError(f"convert: missing {full} in the variables (expected the calibrated "
                       f"model's '{collection}' collection to hold it).")
    node = node[key]
  return node


def _grid(qp: QParams, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
  """(scale float32, zero point on the int8 carrier grid, int32) as NumPy."""
  scale = np.asarray(jax.device_get(qp.scale), np.float32)
  zero = np.asarray(jax.device_get(qp.zero_point), np.int64) - int8.int8_shift(spec)
  return scale, zero.astype(np.int32)


def _kernel_and_bias(params: Any, batch_stats: Any, consumer: Consumer) -> tuple[Any, Any]:
  path = consumer.path
  if consumer.info["kind"] in ("conv_bn", "dense_bn"):
    from qjax import fuse  # the folded form of QAT Conv+BN layers
    layer_params = _at(params, path, collection="params")
    stats = _at(batch_stats, path, collection="batch_stats")
    return fuse.folded_kernel_and_bias(layer_params, stats, epsilon=consumer.info["epsilon"])
  layer = _at(params, path, collection="params")
  return layer["kernel"], layer.get("bias")


def _convert_layer(consumer: Consumer, kernel: Any, bias: Any, w_qp: QParams, q_w: jax.Array,
                   out_qp: QParams, in_spec: QuantSpec, in_qp: QParams, requant: int8.Requant,
                   weights: str) -> dict:
  path, info = consumer.path, consumer.info
  w_spec, out_spec = info["weight_observer"].spec, info["out_observer"].spec
  for role, spec in (("input", in_spec), ("weight", w_spec), ("output", out_spec)):
    int8.check_int8_spec(spec, name=f"convert: {path} ({role})")
  kernel = jnp.asarray(kernel, jnp.float32)
  n_out = kernel.shape[-1]
  w_scale = np.asarray(jax.device_get(w_qp.scale), np.float32)
  w_zero_grid = np.asarray(jax.device_get(w_qp.zero_point), np.int64)
  _check_weight_grid(path, np.asarray(jax.device_get(kernel)), w_spec, w_scale, w_zero_grid,
                     weights)
  shift = int8.int8_shift(w_spec)
  w_zero = w_zero_grid - shift
  if np.any(w_zero != 0):
    raise ValueError(f"convert: {path}: the integer path needs symmetric weights (zero point "
                     f"0 on the int8 grid); the weight spec {w_spec} gives zero points "
                     f"{np.unique(w_zero)[:4]}. Use QuantSpec(signed=True, symmetric=True).")
  q_w8 = np.asarray(jax.device_get(q_w), np.int64) - shift
  stored_spec = w_spec
  if shift:
    stored_spec = QuantSpec(bits=w_spec.bits, signed=True, symmetric=True,
                            narrow_range=w_spec.narrow_range, axis=w_spec.axis)
  reduce_axes = tuple(range(q_w8.ndim - 1))
  x_scale, x_zero = _grid(in_qp, in_spec)
  y_scale, y_zero = _grid(out_qp, out_spec)

  colsum = q_w8.sum(axis=reduce_axes)
  offset = -int(x_zero) * colsum
  b = np.zeros(n_out, np.float32) if bias is None else np.asarray(jax.device_get(bias),
                                                                  np.float32)
  acc_scale64 = np.float64(x_scale) * w_scale.astype(np.float64)
  bias_q = np.rint(b.astype(np.float64) / acc_scale64)
  worst = (int8.accumulator_bound(q_w8, reduce_axes=reduce_axes, input_spec=in_spec)
           + np.abs(offset) + (np.abs(bias_q) if requant is not int8.Requant.FBGEMM else 0))
  if np.any(worst > int8.INT32_MAX):
    k = int(np.prod(q_w8.shape[:-1]))
    channel = int(np.argmax(worst))
    raise ValueError(
        f"convert: {path}: the int32 accumulator can overflow: with K = {k} products per "
        f"output, output channel {channel} can reach |acc| = {int(worst[channel])} > 2^31 - 1 "
        f"for some int8 input (max|q_x| * sum_k |q_w| + |zero-point offset| + |bias|). Split "
        f"the layer, use fewer weight bits, or keep it in float (qconfig None).")

  if q_w8.ndim == 2:  # Dense: output channel first for the int8 GEMM
    q_store = q_w8.T
    if stored_spec.per_channel:
      stored_spec = dataclasses.replace(stored_spec, axis=0)
  else:
    q_store = q_w8
  entry = {
      "kernel": QArray(jnp.asarray(q_store, jnp.int8), jnp.asarray(w_scale),
                       jnp.zeros(w_scale.shape, jnp.int32), stored_spec),
      "input": {"scale": jnp.asarray(x_scale), "zero_point": jnp.asarray(x_zero)},
      "output": {"scale": jnp.asarray(y_scale), "zero_point": jnp.asarray(y_zero)},
      "offset": jnp.asarray(offset, jnp.int32),
  }
  acc_scale = (np.float32(x_scale) * w_scale).astype(np.float32)  # as fbgemm forms them
  multiplier32 = (acc_scale / np.float32(y_scale)).astype(np.float32)
  if requant is int8.Requant.FBGEMM:
    entry["requant"] = {"bias": jnp.asarray((b / acc_scale).astype(np.float32)),
                        "multiplier": jnp.asarray(multiplier32)}
    return entry
  if np.any(np.abs(bias_q) > int8.INT32_MAX):
    raise ValueError(f"convert: {path}: the bias does not fit int32 at scale S_x * S_w "
                     f"(max |b / (S_x S_w)| = {np.abs(bias_q).max():.3g}); use "
                     f"requant='fbgemm' (float bias) or recalibrate.")
  entry["bias"] = jnp.asarray(bias_q.astype(np.int64), jnp.int32)
  if requant is int8.Requant.FLOAT:
    entry["requant"] = {"multiplier": jnp.asarray(multiplier32)}
  else:
    m0, r = int8.quantize_multiplier(acc_scale64 / np.float64(y_scale))
    entry["requant"] = {"m0": jnp.asarray(m0), "shift": jnp.asarray(r)}
  return entry


# ------------------------------------------------------------------------------------------
# qparams straight from the observers' states (compiled once per observer and shape, reused
# by every later convert in the process).


# These run once per point on small arrays: XLA's backend optimisations would cost more time
# than they save (the histogram's L2 search compiles in ~1 s instead of ~3 s). They do not
# change float results: XLA:CPU never contracts or reassociates float operations.
_ONCE = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnums=0, compiler_options=_ONCE)
def _qparams_of(observer: Any, state: Any) -> QParams:
  return observer.qparams(state)


def _weight_grid(observer: Any, state: Any, kernel: jax.Array, source: str
                 ) -> tuple[QParams, jax.Array]:
  """(qparams, quantized kernel) with the weight observer's state updated by the kernel
  ("observe"), a fresh state that saw only the kernel ("fresh", `state` unused) or the state
  as it is ("stats")."""
  if source == "fresh":
    state = observer.init(kernel.shape)
  if source != "stats":
    state = observer.update(state, kernel)
  qparams = observer.qparams(state)
  return qparams, numerics.quantize(kernel, observer.spec, qparams)


@functools.partial(jax.jit, static_argnums=(0, 3), compiler_options=_ONCE)
def _weight_grids(observers: tuple, states: tuple, kernels: tuple, source: str) -> tuple:
  """`_weight_grid` of every layer in one executable (one compilation for the model)."""
  return tuple(_weight_grid(o, s, k, source)
               for o, s, k in zip(observers, states, kernels, strict=True))


@functools.partial(jax.jit, static_argnums=0, compiler_options=_ONCE)
def _quantized(spec: QuantSpec, kernel: jax.Array, qparams: QParams) -> jax.Array:
  return numerics.quantize(kernel, spec, qparams)


def _state(observer: Any, node: Any, shape: tuple[int, ...], where: str) -> Any:
  """The observer state stored at quant_stats/<where> as the observer's state type."""
  fresh = jax.eval_shape(lambda: observer.init(shape))  # shapes and dtypes, nothing compiled
  if not hasattr(node, "keys"):
    raise ValueError(f"convert: missing quant_stats/{where} in the variables (expected the "
                     f"calibrated model's 'quant_stats' collection to hold it).")
  missing = [f for f in fresh._fields if f not in node]
  if missing:
    raise ValueError(f"convert: quant_stats/{where} has no {missing} (it holds {sorted(node)}); "
                     f"expected the state of {type(observer).__name__}.")
  return type(fresh)(**{f: jnp.asarray(node[f], getattr(fresh, f).dtype) for f in fresh._fields})


def _learned_qparams(observer: Any, node: Any, where: str) -> QParams:
  """A LearnableFakeQuant point's qparams, as its forward uses them."""
  if not hasattr(node, "keys") or "scale" not in node:
    raise ValueError(f"convert: missing params/{where}/scale (a learnable quantization point "
                     f"keeps its scale in 'params').")
  zero_point = None if observer.spec.symmetric else jnp.asarray(node["zero_point"], jnp.float32)
  return qnn_modules.learned_qparams(observer, jnp.asarray(node["scale"], jnp.float32),
                                     zero_point)


def _subtree(tree: Any, path: str) -> Any:
  node = tree
  for key in [k for k in path.split("/") if k]:
    if not hasattr(node, "keys") or key not in node:
      return None
    node = node[key]
  return node


def _activation_qparams(variables: Any, path: str, point: dict) -> QParams:
  """The qparams of the activation point `path` (a Quantize, or a layer's output point)."""
  where = "/".join(k for k in (path, point.get("point", "")) if k)
  observer = point["observer"]
  if point.get("learnable"):
    return _learned_qparams(observer, _subtree(variables.get("params", {}), where), where)
  state = _state(observer, _subtree(variables["quant_stats"], where), (), where)
  return _qparams_of(observer, state)


WEIGHT_SOURCES = ("observe", "fresh", "stats")


def _check_read_stats_calibrated(quant_stats: Any, flow: Dataflow, weights: str) -> None:
  """`check_calibrated` on the observer states convert reads: not those of LSQ points (their
  scales are learned params), nor the weights' with weights="fresh"."""
  read = ["/".join(k for k in (path, point.get("point", "")) if k)
          for path, point in flow.points.items() if not point.get("learnable")]
  if weights != "fresh":
    read += [f"{c.path}/weight" for c in flow.consumers
             if c.role == "in" and "weight_observer" in c.info and not c.info.get("learnable")]
  if not read:
    return
  flat = traverse_util.flatten_dict(quant_stats, sep="/")
  qnn_modules.check_calibrated(traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if any(k.startswith(p + "/") for p in read)}, sep="/"))


def _weight_grids_of(variables: Any, layers: list[tuple[Consumer, jax.Array]],
                     weights: str) -> list[tuple[QParams, jax.Array]]:
  """The weight qparams and quantized kernel of each converted layer, from its weight
  observer and the kernel being converted (see `convert`'s `weights`)."""
  results: dict[int, tuple[QParams, jax.Array]] = {}
  observed: list[tuple[int, Any, Any, jax.Array]] = []
  for i, (consumer, kernel) in enumerate(layers):
    observer = consumer.info["weight_observer"]
    where = f"{consumer.path}/weight"
    if consumer.info.get("learnable"):
      qparams = _learned_qparams(observer, _subtree(variables.get("params", {}), where), where)
      results[i] = qparams, _quantized(observer.spec, kernel, qparams)
      continue
    state = None
    if weights != "fresh":
      state = _state(observer, _subtree(variables["quant_stats"], where), kernel.shape, where)
    observed.append((i, observer, state, kernel))
  if observed:
    index, observers, states, kernels = zip(*observed, strict=True)
    for i, grid in zip(index, _weight_grids(observers, states, kernels, weights), strict=True):
      results[i] = grid
  return [results[i] for i in range(len(layers))]


def _check_weight_grid(path: str, kernel: np.ndarray, spec: QuantSpec, scale: np.ndarray,
                       zero: np.ndarray, weights: str) -> None:
  """Warn about a kernel that its grid clamps by more than one step somewhere; refuse one it
  clamps by more than a quarter of the grid's width (weights changed after calibration: a
  loaded checkpoint, fine-tuning, a fold); refuse NaN / inf weights."""
  if not np.all(np.isfinite(kernel)):
    raise ValueError(f"convert: {path}: the kernel holds {int(np.sum(~np.isfinite(kernel)))} "
                     f"NaN or +-inf value(s); an integer kernel needs finite weights.")
  axis_shape = [1] * kernel.ndim
  if spec.per_channel:
    axis_shape[-1] = -1
  with np.errstate(divide="ignore", invalid="ignore"):
    steps = np.rint(kernel.astype(np.float64) / scale.astype(np.float64).reshape(axis_shape)
                    ) + zero.astype(np.float64).reshape(axis_shape)
  beyond = np.maximum(steps - spec.qmax, spec.qmin - steps)
  far = beyond > 1
  if not np.any(far):
    return
  # A QAT-trained kernel may pass its moving-average grid by some steps (a BatchNorm fold with
  # the final running variance; its fake-quant forward clamps those weights too, and PyTorch's
  # convert clamps them the same way): a warning. A kernel beyond its grid by more than half
  # the grid's half-range is not the kernel the statistics saw: an error.
  tolerated = max(1.0, 0.5 * (spec.qmax - spec.qmin) / 2)
  what = (f"{path}: {int(far.sum())} of {kernel.size} weights lie outside their grid by "
          f"more than one step (up to {float(beyond.max()):.0f} steps)")
  if float(beyond.max()) <= tolerated:
    warnings.warn(f"convert: {what} and are clamped, as the fake-quant forward clamps them.",
                  stacklevel=3)
    return
  raise ValueError(
      f"convert: {what} and would be clamped; the weight statistics "
      f"({'learned scale' if weights == 'learned' else weights!r}) do not describe the kernel "
      f"being converted (changed after calibration: a loaded checkpoint, fine-tuning, a "
      f"BatchNorm fold). Recalibrate on the final weights, or pass weights='fresh' to observe "
      f"them anew as PyTorch's PTQ convert does.")


def convert(model: nn.Module, variables: Any, *args: Any, requant: int8.Requant | str = "fbgemm",
            weights: str = "observe", **kwargs: Any) -> dict:
  """Integer variables for `model.apply(int_vars, x, mode="int8")` (layout: module doc).

  For each converted layer: q_w = quantize(W) with the calibrated weight qparams,
  bias = rne(b / (S_x S_w)) in int32, offset = -Z_x sum_k q_w, and the requantization
  parameters of `requant`:

    "fbgemm"   (default) float bias, q = Z_y + rne((f32(acc) + f32(b / A)) * M) with
               A = f32(S_x S_w), M = f32(A / S_y): fbgemm's arithmetic in PyTorch's x86
               quantized Linear, and the fake-quant QAT forward's integers (float bias).
    "float"    int32 bias, q = Z_y + rne(f32(acc + bias) * M), M = S_x S_w / S_y: the textbook
               formula (gemmlowp / TFLite's int32 bias with a float multiplier).
    "integer"  int32 bias, M ~= m0 / 2^shift: no float between Quantize and Dequantize.

  The int32 bias moves b by up to S_x S_w / 2, i.e. up to M / 2 output steps: invisible at 8
  bits, but at 4 bits (large M) it changed the argmax of a QAT-trained LeNet-5 on ~7 % of
  MNIST test digits relative to the QAT forward, where "fbgemm" agreed on all of them.

  Weights are observed as PyTorch's `convert` does: the layer's weight observer sees the
  kernel being converted (after a BatchNorm fold, the folded one), so that weights changed
  after calibration are not clamped to a stale range. A kernel that its grid would still clamp
  by more than one step (a moving average that has not quite caught up, as after a BatchNorm
  fold with the final running variance) gives a warning; by more than a quarter of the grid's
  width (64 steps at 8 bits), a ValueError naming the layer. Activation qparams come straight
  from the observers' states (or the learned scales of LSQ points); nothing is recomputed
  from data.

  Args:
    model: a Flax module whose __call__ takes `mode=`.
    variables: {"params", "quant_stats", ...} of the calibrated / QAT-trained model.
    *args: a sample input (only its shapes and dtypes matter: the model is traced, not run).
    requant: "fbgemm" (default), "float" or "integer".
    weights: where the weight qparams come from: "observe" (default) updates each weight
      observer's state once with the kernel being converted (PyTorch's convert of a QAT
      layer; for the min/max observers of post-training recipes it equals a fresh
      observation whenever calibration saw the final weights), "fresh" observes the kernel
      with a new observer (PyTorch's convert of a post-training layer: use it for weights
      loaded or changed after calibration), "stats" uses the stored statistics as they are
      (the fake-quant forward's grids). LSQ points (learnable) always use their learned
      scale.
    **kwargs: further keyword arguments of the model's call.

  Returns:
    {"int8": per-module integer variables, plus "params" (and other collections) of the
    layers left in float}.

  Raises:
    ValueError: naming the path of an uncalibrated point, of missing variables, of an int8
      tensor reaching an op the integer path cannot run, of a layer whose int32 accumulator
      or bias could overflow, or of a grid wider than 8 bits.
  """
  requant = int8.as_requant(requant)
  if weights not in WEIGHT_SOURCES:
    raise ValueError(f"convert: weights must be one of {WEIGHT_SOURCES}; got {weights!r}.")
  if "quant_stats" not in variables:
    raise ValueError("convert: variables has no 'quant_stats' collection; calibrate the model "
                     "(mode='calibrate', mutable=['quant_stats']) or train it with QAT first.")
  flow = trace_dataflow(model, variables, *args, **kwargs)
  _check_read_stats_calibrated(variables["quant_stats"], flow, weights)
  qparams: dict[str, QParams] = {}

  def producer_qparams(source: str) -> QParams:
    if source not in qparams:
      qparams[source] = _activation_qparams(variables, source, flow.points[source])
    return qparams[source]

  params = variables.get("params", {})
  batch_stats = variables.get("batch_stats", {})
  out: dict[str, Any] = {}
  converted: list[str] = []
  problems: list[str] = []
  sources: dict[str, str] = {}
  layers: list[tuple[Consumer, jax.Array, Any, QuantSpec, QParams]] = []
  for consumer in flow.consumers:
    path, kind = consumer.path, consumer.info.get("kind")
    if consumer.role == "float_in":
      if consumer.source:
        problems.append(f"{path} is left in float but takes the int8 output of "
                        f"{consumer.source}; put a qjax.nn.Dequantize before it.")
      continue
    if consumer.source is None:
      problems.append(f"the input of {path} is not produced by a quantization point; put a "
                      f"qjax.nn.Quantize (or a quantized layer) before it.")
      continue
    earlier = sources.setdefault(path, consumer.source)
    if earlier != consumer.source:
      problems.append(f"{path} is called on the outputs of {earlier} and of {consumer.source}, "
                      f"two different input grids; one integer layer has one input grid (use "
                      f"two layers, or one Quantize point feeding both calls).")
      continue
    in_spec = flow.producers[consumer.source]
    in_qp = producer_qparams(consumer.source)
    if kind == "dequantize":
      scale, zero = _grid(in_qp, in_spec)
      out[path] = {"scale": jnp.asarray(scale), "zero_point": jnp.asarray(zero)}
      continue
    if any(layer[0].path == path for layer in layers):  # called again on the same grid
      continue
    kernel, bias = _kernel_and_bias(params, batch_stats, consumer)
    layers.append((consumer, jnp.asarray(kernel, jnp.float32), bias, in_spec, in_qp))
  _refuse(problems)
  grids = _weight_grids_of(variables, [(c, k) for c, k, *_ in layers], weights)
  for (consumer, kernel, bias, in_spec, in_qp), (w_qp, q_w) in zip(layers, grids, strict=True):
    path = consumer.path
    out[path] = _convert_layer(consumer, kernel, bias, w_qp, q_w, producer_qparams(path),
                               in_spec, in_qp, requant,
                               "learned" if consumer.info.get("learnable") else weights)
    converted.append(path)
  for path, spec in flow.producers.items():
    if not flow.points[path].get("point"):  # a Quantize boundary
      scale, zero = _grid(producer_qparams(path), spec)
      out[path] = {"scale": jnp.asarray(scale), "zero_point": jnp.asarray(zero)}
  result: dict[str, Any] = {"int8": traverse_util.unflatten_dict(
      {tuple(p.split("/")): v for p, v in out.items()})}
  for name, collection in variables.items():
    if name in ("quant_stats", "quant_params"):
      continue
    flat = traverse_util.flatten_dict(jax.device_get(collection), sep="/")
    rest = {k: v for k, v in flat.items()
            if not any(k == p or k.startswith(p + "/") for p in converted)}
    if rest:
      result[name] = traverse_util.unflatten_dict({tuple(k.split("/")): v
                                                   for k, v in rest.items()})
  return result


def for_serving(int_vars: dict) -> dict:
  """`convert`'s variables reduced to what mode "int8" reads, for the lowest per-call cost.

  A jitted apply pays for every leaf it is passed (~0.15 us each on this CPU, plus the
  flattening of each QArray): at batch 1 the MNIST MLP's 34 leaves cost more than its
  matmuls. This keeps, per layer, the int8 kernel as a bare array, the offset with the int32
  bias added in ("float" / "integer"; exact in int32, convert checked the sum's range), the
  requantization parameters and the output zero point (and a conv's input zero point, its
  padding value); the boundaries keep their scale and zero point. The scales of weights and
  activations, which only reports need, are dropped.

  The same model applies either tree: model.apply(for_serving(int_vars), x, mode="int8")
  gives the same integers as model.apply(int_vars, x, mode="int8").
  """
  def lean(entry: Any) -> Any:
    if not isinstance(entry, dict):
      return entry
    if "kernel" not in entry:
      return {k: lean(v) for k, v in entry.items()}
    kernel = entry["kernel"]
    out = {"kernel": getattr(kernel, "qvalue", kernel),
           "offset": entry["offset"] + entry.get("bias", jnp.int32(0)),
           "requant": entry["requant"],
           "output": {"zero_point": entry["output"]["zero_point"]}}
    if kernel.ndim > 2:
      out["input"] = {"zero_point": entry["input"]["zero_point"]}
    return out

  if not isinstance(int_vars, dict) or "int8" not in int_vars:
    raise ValueError("for_serving: expected the variables qjax.convert.convert returns "
                     "({'int8': ..., ...}).")
  return {**int_vars, "int8": lean(int_vars["int8"])}
