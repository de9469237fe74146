"""Calibrated float variables -> the integer operations of mode "int8" (PyTorch's `convert`).

    int_vars = qjax.convert(model, variables, x_sample)          # requant="fbgemm"
    y = jax.jit(lambda v, x: model.apply(v, x, mode="int8"))(int_vars, x)

`model` is built from qjax.nn's modules (`Quantize`, `QuantDense`, `QuantConv`, `QuantConvBN`,
`QuantDenseBN`, `QuantAdd`, `QuantConcat`, `AvgPool`, `Dequantize`, stock layers with a
`QuantDotGeneral` / `QuantConvGeneral`) and takes `mode=` in its call (and `train=False` for
the BatchNorm-folded layers, passed through **kwargs); `variables` hold its float `params`
and calibrated (or QAT-trained) `quant_stats`. Convert traces the model once on the sample
(`jax.make_jaxpr`, nothing computed) to learn which quantized tensor feeds which module,
through grid-preserving ops only (reshape, max pooling, slicing, ...), and which observer
each point has; the qparams then come straight from the observers' states (weights:
observed once more on the kernel being converted, see `convert`).

Each module's integer form (`qjax.integer.forms`) lowers it to a typed op, stored at
converted/<module path>/op: `QuantizeOp`, `Int8Dense`, `Int8Conv`, `Int8Add`, ...,
`DequantizeOp`. Zero points there are on the int8 carrier grid (`arith.int8_shift`: an
unsigned 8-bit grid is moved down by 128), the values the integer path uses. Layers left in
float keep their float collections.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.extend import core as jex_core

from qjax import _struct
from qjax import numerics
from qjax.integer import _trace
from qjax.integer.forms.base import (COLLECTION, OP, Form, Grid, Lowering, WeightRequest,
                                     observer_state)
from qjax.integer import kernels
from qjax.integer.forms.dot import QuantizedDot
from qjax.integer.forms.linear import Int8Conv, Int8Dense, LinearForm
from qjax.integer.requant import Requant, as_requant
from qjax.nn import modules
from qjax.nn import qconfig
from qjax.numerics import QParams, QuantSpec
from qjax.qarray import QArray
from qjax.quantizers import points

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
  """A module that reads a marked tensor: its path, role ("in": operand `operand` of its
  integer form `form`; "float_in": read as float) and the path of the quantization point
  that produced the tensor (None: not quantized)."""

  path: str
  role: str
  form: Form | None
  operand: int
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
  for inner in _sub_jaxprs(eqn):
    if len(inner.invars) == len(eqn.invars) and len(inner.outvars) == len(eqn.outvars):
      return inner
  return None


def _sub_jaxprs(eqn: Any) -> list[Any]:
  found = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      inner = item.jaxpr if isinstance(item, jex_core.ClosedJaxpr) else item
      if isinstance(inner, jex_core.Jaxpr):
        found.append(inner)
  return found


def _holds_marks(eqn: Any) -> bool:
  """Whether any jaxpr inside `eqn` (at any depth) holds a mark."""
  return any(e.primitive is _trace.mark_p or _holds_marks(e)
             for inner in _sub_jaxprs(eqn) for e in inner.eqns)


def _check_carry(eqn: Any, inner: Any, sub_env: dict, outs: list, problems: list[str]) -> None:
  """A scan's int8 carry must enter and leave each step on one grid (the producer of the
  initial carry is the producer of every later one)."""
  if eqn.primitive.name != "scan":
    return
  first, count = eqn.params["num_consts"], eqn.params["num_carry"]
  for i in range(count):
    entering, leaving = sub_env.get(inner.invars[first + i]), outs[i]
    if entering != leaving and (entering or leaving):
      problems.append(f"a scan carries an int8 tensor from {entering or 'float'} into each "
                      f"step and returns it from {leaving or 'float'}: one carry has one grid. "
                      f"Carry it in float (Dequantize before returning it, Quantize after "
                      f"reading it) or produce both from one quantization point.")


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
      elif p["role"] == "same":  # on the grid of the module's input (pooling)
        read = [c.source for c in flow.consumers if c.path == p["path"]]
        if read and read[-1]:
          env[eqn.outvars[0]] = read[-1]
      else:
        info = dict(p["info"])
        flow.consumers.append(Consumer(p["path"], p["role"], info["form"], info["operand"],
                                       source(eqn.invars[0])))
      continue
    sources = [source(v) for v in eqn.invars]
    inner = _sub_jaxpr(eqn)
    if inner is not None:  # walked even without quantized inputs: it may hold marks
      sub_env = {iv: s for iv, s in zip(inner.invars, sources, strict=True) if s}
      _walk(inner, sub_env, flow, problems)
      outs = [None if isinstance(iv, jex_core.Literal) else sub_env.get(iv)
              for iv in inner.outvars]
      _check_carry(eqn, inner, sub_env, outs, problems)
      for outer, out_source in zip(eqn.outvars, outs, strict=True):
        if out_source:
          env[outer] = out_source
      continue
    if _holds_marks(eqn):
      problems.append(f"quantized modules run inside `{name}`, whose body convert cannot "
                      f"follow; the integer path supports them inside jit, remat, "
                      f"custom_jvp / custom_vjp and scan (nn.scan, lax.scan).")
      continue
    if not any(sources):
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
        f"'int8' it would compute on integers. Between quantized modules only reshapes, "
        f"slices, transposes, concatenation of one grid and max/min pooling may run; fuse a "
        f"ReLU into the layer (activation=nn.relu), use qjax.nn's QuantAdd, QuantConcat and "
        f"AvgPool for sums, concatenations and averages, and put a qjax.nn.Dequantize before "
        f"float ops.")


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

  with _trace.tracing(), qconfig.checked_lookups():  # and refuse unused QConfigMap patterns
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


def _learned_qparams(observer: Any, node: Any, where: str) -> QParams:
  """A LearnableFakeQuant point's qparams, as its forward uses them (or a research activation
  quantizer's, from its params)."""
  if isinstance(observer, points.ActivationQuantizer):
    try:
      qparams = observer.qparams(_research_params(node))
    except ValueError as err:
      raise ValueError(f"convert: {where}: {err} (expected in params/{where}).") from err
    if jnp.ndim(qparams.scale):
      raise ValueError(f"convert: {where}: the integer path quantizes activations per tensor; "
                       f"{type(observer).__name__} has one clipping level per channel "
                       f"(per_channel=True), shape {jnp.shape(qparams.scale)}. Use "
                       f"per_channel=False for layers you convert.")
    if not bool(jnp.all(qparams.scale > 0)):
      raise ValueError(f"convert: {where}: {type(observer).__name__}'s grid has scale "
                       f"{qparams.scale}; a clipping level must be positive.")
    return qparams
  if not hasattr(node, "keys") or "scale" not in node:
    raise ValueError(f"convert: missing params/{where}/scale (a learnable quantization point "
                     f"keeps its scale in 'params').")
  zero_point = None if observer.spec.symmetric else jnp.asarray(node["zero_point"], jnp.float32)
  return modules.learned_qparams(observer, jnp.asarray(node["scale"], jnp.float32),
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
  state = observer_state(observer, _subtree(variables["quant_stats"], where), (), where)
  return _qparams_of(observer, state)


def _research_params(node: Any) -> dict[str, jax.Array]:
  """A research point's params (PACT's alpha) from its params/<point> node ({} if none)."""
  return {k: jnp.asarray(v) for k, v in node.items()} if hasattr(node, "keys") else {}


def _research_inverse(variables: Any, path: str, point: dict) -> Any:
  """A research activation quantizer's multiplier n / alpha (None for observer points)."""
  observer = point["observer"]
  if not isinstance(observer, points.ActivationQuantizer):
    return None
  where = "/".join(k for k in (path, point.get("point", "")) if k)
  return observer.inverse_scale(_research_params(_subtree(variables.get("params", {}), where)))


WEIGHT_SOURCES = ("observe", "fresh", "stats")


def _check_read_stats_calibrated(quant_stats: Any, flow: Dataflow, weights: str) -> None:
  """`check_calibrated` on the observer states convert reads: not those of LSQ points (their
  scales are learned params), nor the weights' with weights="fresh"."""
  read = ["/".join(k for k in (path, point.get("point", "")) if k)
          for path, point in flow.points.items() if not point.get("learnable")]
  if weights != "fresh":
    read += [f"{c.path}/weight" for c in flow.consumers
             if isinstance(c.form, LinearForm) and not c.form.learnable
             and not isinstance(c.form.weight_observer, points.WeightQuantizer)]
  if not read:
    return
  if quant_stats is None:
    raise ValueError("convert: variables has no 'quant_stats' collection; calibrate the model "
                     "(mode='calibrate', mutable=['quant_stats']) or train it with QAT first.")
  flat = traverse_util.flatten_dict(quant_stats, sep="/")
  modules.check_calibrated(traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if any(k.startswith(p + "/") for p in read)}, sep="/"))




@functools.partial(jax.jit, static_argnums=0, compiler_options=_ONCE)
def _research_weights(quantizer: Any, kernel: jax.Array) -> tuple[QParams, jax.Array]:
  return quantizer.integer_weights(kernel)


def _weight_grids_of(variables: Any, requests: list[tuple[str, WeightRequest]], weights: str
                     ) -> list[tuple[QParams, jax.Array]]:
  """The weight qparams and quantized kernel of each request, from the layer's weight
  observer and the kernel being converted (see `convert`'s `weights`)."""
  results: dict[int, tuple[QParams, jax.Array]] = {}
  observed: list[tuple[int, Any, Any, jax.Array]] = []
  for i, (path, request) in enumerate(requests):
    observer, kernel = request.observer, request.kernel
    where = f"{path}/weight"
    if isinstance(observer, points.WeightQuantizer):  # its own integers and scales
      results[i] = _research_weights(observer, kernel)
      continue
    if request.learnable:
      qparams = _learned_qparams(observer, _subtree(variables.get("params", {}), where), where)
      results[i] = qparams, _quantized(observer.spec, kernel, qparams)
      continue
    state = None
    if weights != "fresh":
      state = observer_state(observer, _subtree(variables["quant_stats"], where), kernel.shape,
                             where)
    observed.append((i, observer, state, kernel))
  if observed:
    index, observers, states, kernels = zip(*observed, strict=True)
    for i, grid in zip(index, _weight_grids(observers, states, kernels, weights), strict=True):
      results[i] = grid
  return [results[i] for i in range(len(requests))]


def _operands(path: str, calls: list[Consumer], problems: list[str]) -> list[str | None]:
  """The producing point of each operand of the module at `path` (every call must read the
  same grids: one integer op has one grid per operand)."""
  form = calls[0].form
  assert form is not None  # "in" marks carry their form
  sources: dict[int, str | None] = {}
  for call in calls:
    earlier = sources.setdefault(call.operand, call.source)
    if earlier != call.source:
      problems.append(f"{path} is called on the outputs of {earlier} and of {call.source}, "
                      f"two different input grids; one integer op has one grid per operand "
                      f"(use two modules, or one Quantize point feeding both calls).")
  count = max(sources) + 1
  if form.operands is not None and count != form.operands:
    problems.append(f"{path} marks {count} operand(s); its integer form takes "
                    f"{form.operands}.")
  return [sources.get(i) for i in range(count)]


def convert(model: nn.Module, variables: Any, *args: Any, requant: Requant | str = "fbgemm",
            weights: str = "observe", **kwargs: Any) -> dict:
  """The integer operations of `model` for `model.apply(int_vars, x, mode="int8")`.

  Each quantized module becomes a typed op (module doc); a layer, e.g., becomes an
  `Int8Dense`: q_w = quantize(W) with the calibrated weight qparams, offset =
  -Z_x sum_k q_w (+ the int32 bias rne(b / (S_x S_w)) of "float" / "integer") and the
  requantizer of `requant`:

    "fbgemm"   (default) float bias, q = Z_y + rne((f32(acc) + f32(b / A)) * M) with
               A = f32(S_x S_w), M = f32(A / S_y): fbgemm's arithmetic in PyTorch's x86
               quantized Linear, and the fake-quant QAT forward's integers (float bias).
               Adds and concatenations of differing grids follow PyTorch's float formula.
    "float"    int32 bias, q = Z_y + rne(f32(acc + bias) * M), M = S_x S_w / S_y: the textbook
               formula (gemmlowp / TFLite's int32 bias with a float multiplier).
    "integer"  int32 bias, M ~= m0 / 2^shift: no float between Quantize and Dequantize (adds
               and concatenations rescale each input with a fixed-point multiplier too).

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
    requant: "fbgemm" (default), "float" or "integer" (or a `qjax.integer.Requant`).
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
    {"converted": {<module path>: {"op": typed op}}, plus "params" (and other collections)
    of the layers left in float}.

  Raises:
    ValueError: naming the path of an uncalibrated point, of missing variables, of an int8
      tensor reaching an op the integer path cannot run, of a layer whose int32 accumulator
      or bias could overflow, or of a grid wider than 8 bits.

  Example:
    >>> import flax.linen as nn, qjax, qjax.nn as qnn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, mode="float"):
    ...     x = qnn.Quantize(qconfig=qnn.default_qconfig)(x, mode=mode)
    ...     x = qnn.QuantDense(3, qconfig=qnn.default_qconfig)(x, mode=mode)
    ...     return qnn.Dequantize()(x, mode=mode)
    >>> x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    >>> v = Net().init(jax.random.key(0), x, "float")
    >>> v = qnn.calibrate(Net(), v, [x])
    >>> int_vars = qjax.convert(Net(), v, x)
    >>> type(int_vars["converted"]["QuantDense_0"]["op"]).__name__
    'Int8Dense'
  """
  requant = as_requant(requant)
  if weights not in WEIGHT_SOURCES:
    raise ValueError(f"convert: weights must be one of {WEIGHT_SOURCES}; got {weights!r}.")
  flow = trace_dataflow(model, variables, *args, **kwargs)
  _check_read_stats_calibrated(variables.get("quant_stats"), flow, weights)
  grids: dict[str, Grid] = {}

  def grid_of(source: str) -> Grid:
    if source not in grids:
      point = flow.points[source]
      grids[source] = Grid.of(point["spec"], _activation_qparams(variables, source, point),
                              _research_inverse(variables, source, point))
    return grids[source]

  calls: dict[str, list[Consumer]] = {}
  problems: list[str] = []
  for consumer in flow.consumers:
    if consumer.role == "float_in":
      if consumer.source:
        problems.append(f"{consumer.path} is left in float but takes the int8 output of "
                        f"{consumer.source}; put a qjax.nn.Dequantize before it.")
      continue
    calls.setdefault(consumer.path, []).append(consumer)
  pending: list[tuple[Form, Lowering]] = []
  for path, group in calls.items():
    form = group[0].form
    assert form is not None  # "in" marks carry their form
    sources = _operands(path, group, problems)
    if form.stays_float and not any(sources):
      continue
    if form.float_input and not any(sources):
      inputs: tuple[Grid, ...] = ()
    else:
      missing = [i for i, s in enumerate(sources) if s is None]
      if missing:
        what = (f"operand {missing[0]} of {path}" if len(sources) > 1
                else f"the input of {path}")
        problems.append(f"{what} is not produced by a quantization point; put a "
                        f"qjax.nn.Quantize (or a quantized layer) before it.")
        continue
      inputs = tuple(grid_of(s) for s in sources if s)
    output = grid_of(path) if path in flow.points else None
    pending.append((form, Lowering(path=path, inputs=inputs, output=output, requant=requant,
                                   variables=variables, weights=weights)))
  _refuse(problems)
  requests = [(lowering.path, form.weight_request(lowering)) for form, lowering in pending]
  asked = [(p, r) for p, r in requests if r is not None]
  weight_grids = iter(_weight_grids_of(variables, asked, weights))
  out: dict[str, Any] = {}
  for (form, lowering), (_, request) in zip(pending, requests, strict=True):
    if request is not None:
      lowering = dataclasses.replace(lowering, weight=(next(weight_grids), request))
    out[lowering.path] = {OP: form.lower(lowering)}
  result: dict[str, Any] = {COLLECTION: traverse_util.unflatten_dict(
      {tuple(p.split("/")): v for p, v in out.items()})}
  weighted = [p for p, r in requests if r is not None and not r.keeps_params]
  for name, collection in variables.items():
    if name in ("quant_stats", "quant_params"):
      continue
    flat = traverse_util.flatten_dict(jax.device_get(collection), sep="/")
    rest = {k: v for k, v in flat.items()
            if not any(k == p or k.startswith(p + "/") for p in weighted)}
    if rest:
      result[name] = traverse_util.unflatten_dict({tuple(k.split("/")): v
                                                   for k, v in rest.items()})
  return result


def _for_serving(op: Any, pack: bool) -> Any:
  if not _struct.is_struct(op):
    return op
  if getattr(op, "report", None) is not None:
    op = dataclasses.replace(op, report=None)
  if pack and isinstance(op, (Int8Dense, QuantizedDot)) and not isinstance(
      op.kernel, kernels.PackedWeights):
    op = dataclasses.replace(op, kernel=kernels.pack(op.kernel.qvalue))
  if (pack and isinstance(op, Int8Conv) and isinstance(op.kernel, QArray)
      and kernels.gathers_patches(op.kernel.qvalue.shape, op.groups)):
    op = dataclasses.replace(op, kernel=kernels.pack_conv(op.kernel.qvalue))
  return op


def for_serving(int_vars: dict, *, pack: bool | None = None) -> dict:
  """`convert`'s variables for inference only: without what only reports read (each op's
  `report`: the float scales of inputs, weights and outputs, the int32 bias already folded
  into the offset), and with the int8 Dense weights (and those of the 2-D convolutions with
  several input channels and no groups) pre-packed for the native CPU kernel.

  A jitted apply pays for every leaf it is passed: at batch 1 the MNIST MLP's leaves cost
  more than its matmuls. Packing (`qjax.integer.kernels.pack`: 16-channel panels of 4-byte
  groups, zero padded, with the int32 column sums) is what the kernel otherwise does to the
  weights on each call with more than 16 rows; the weight scales (only reports and
  `qjax.interop` read them) are dropped with it. The same model applies either tree with the
  same integers, on every kernel path ("xla" unpacks packed weights):
  model.apply(for_serving(int_vars), x, mode="int8") == model.apply(int_vars, x, mode="int8").

  Args:
    int_vars: `qjax.convert`'s output.
    pack: pack the Dense weights (converted `Int8Dense` and `QuantizedDot` layers) and those
      of the 2-D `Int8Conv`s the native kernel runs (`kernels.pack_conv`); None
      packs them where the native kernel runs by default (`qjax.integer.kernels.resolve()`
      is not "xla": one CPU device, the library built, QJAX_INT8_KERNEL not "xla").

  Returns:
    The serving variables (a new tree; `int_vars` is not changed).

  Raises:
    ValueError: `int_vars` is not `convert`'s output. TypeError: `pack` not a bool or None.

  Example:
    >>> from qjax.integer.forms.boundary import DequantizeOp
    >>> tree = {"converted": {"out": {"op": DequantizeOp(scale=jnp.float32(1.0),
    ...                                                  zero_point=jnp.int32(0))}}}
    >>> for_serving(tree)["converted"]["out"]["op"].scale
    Array(1., dtype=float32)
  """
  if not isinstance(int_vars, dict) or COLLECTION not in int_vars:
    raise ValueError(f"for_serving: expected the variables qjax.convert returns "
                     f"({{'{COLLECTION}': ..., ...}}).")
  if pack is not None and not isinstance(pack, bool):
    raise TypeError(f"for_serving: pack must be True, False or None; got {pack!r}.")
  if pack is None:
    pack = kernels.resolve() != "xla"
  lean = jax.tree_util.tree_map(lambda op: _for_serving(op, pack), int_vars[COLLECTION],
                                is_leaf=_struct.is_struct)
  return {**int_vars, COLLECTION: lean}
