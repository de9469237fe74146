"""The verification the classic PyTorch quantization notebook does by hand, done for real, for a
converted MNIST model.

Two checks of `qjax.convert`'s output, in PyTorch's conventions (activation zero points on the
quint8 domain 0..255, i.e. the int8 carrier's value + `qjax.integer.arith.int8_shift(spec)`):

  * `layer_grids`: per converted layer (Int8Dense / Int8Conv, in model order) its weight scale
    (min..max over channels) and zero point, its input and output grids, and the grids of the
    Quantize / Dequantize boundaries; `format_layer_grids` prints them as a table.
  * `explicit_first_layer`: the first converted layer's integer output recomputed in plain
    NumPy from its captured int8 input with the textbook formula

        q_Y = clamp(Z_Y + rne(M * (sum_k (q_X - Z_X)(q_W - Z_W) + q_b)))
        q_b = rne(b / (S_X S_W))   (int32 bias),   M = S_X S_W / S_Y   (float64)

    (rne: round half to even, np.rint; clamp to the output grid, and from Z_Y up with a fused
    ReLU), compared with the integers qjax's mode "int8" produced. qjax's requantizers round
    in float32 ("fbgemm", "float") or fixed point ("integer", ties up), and "fbgemm" adds the
    float bias b / A instead of q_b, so an output may differ by one step where the value lies
    at a rounding tie; the result counts them.

The MNIST study (`python -m experiments.mnist`) prints both for each of its models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from qjax.integer import arith
from qjax.integer.forms import COLLECTION, OP, DequantizeOp, Int8Conv, Int8Dense, QuantizeOp
from qjax.interop import TORCH_QUINT8
from qjax.numerics import QuantSpec


REQUANT = ("fbgemm", "float", "integer")
LAYERS = (Int8Dense, Int8Conv)


# ------------------------------------------------------------------------------------------
# The converted ops, in model order.


def converted_ops(int_vars: Mapping[str, Any]) -> list[tuple[str, Any]]:
  """(path, op) of every op of `qjax.convert`'s variables, in model order ("/"-joined Flax
  module paths; convert records the ops in the order the model runs them)."""
  if not isinstance(int_vars, Mapping) or COLLECTION not in int_vars:
    raise ValueError(f"expected the variables qjax.convert returns ({{'{COLLECTION}': ...}}).")
  found: list[tuple[str, Any]] = []

  def walk(node: Any, path: str) -> None:
    if not isinstance(node, Mapping):
      return
    if OP in node:
      found.append((path, node[OP]))
    for key, child in node.items():
      if key != OP:
        walk(child, f"{path}/{key}" if path else str(key))

  walk(int_vars[COLLECTION], "")
  return found


def activation_spec_of(int_vars: Mapping[str, Any]) -> QuantSpec:
  """The activation grid's spec: that of the model's first Quantize, else torch's quint8."""
  for _, op in converted_ops(int_vars):
    if isinstance(op, QuantizeOp):
      return op.spec
  return TORCH_QUINT8


# ------------------------------------------------------------------------------------------
# Per-layer grids.


def _scalar(value: Any) -> float:
  return float(np.asarray(value, np.float32))


def _zero(value: Any, shift: int) -> int:
  return int(np.asarray(value)) + shift


def _weight_zero(kernel: Any) -> int | tuple[int, int]:
  zeros = np.unique(np.asarray(kernel.zero_point, np.int64))
  return int(zeros[0]) if zeros.size == 1 else (int(zeros.min()), int(zeros.max()))


def layer_grids(int_vars: Mapping[str, Any], *,
                activation_spec: QuantSpec | None = None) -> list[dict]:
  """The grids of every converted layer and boundary, in model order, in torch's conventions.

  One row per Quantize, Int8Dense, Int8Conv and Dequantize op (other ops, e.g. adds or
  pools, are left out):

    layer                 "/"-joined module path, e.g. "fc1"
    kind                  "Quantize", "Int8Dense", "Int8Conv" or "Dequantize"
    weight_scale          (min, max) of the kernel's scales over output channels (equal
                          when per tensor), float32 values; None for a boundary
    weight_zero_point     the kernel's zero point (0: symmetric qint8; a (min, max) pair
                          should channels differ); None for a boundary
    input_scale, input_zero_point     the grid of the layer's input (a Dequantize's: the
                          tensor it dequantizes); None for a Quantize (float input)
    output_scale, output_zero_point   the grid of its output; None for a Dequantize

  Activation zero points are unshifted from the int8 carrier to the spec's own integers:
  Z_torch = Z_carrier + int8_shift(activation_spec) (128 for quint8, so 0..255).

  Args:
    int_vars: `qjax.convert`'s output (not `for_serving`'s: its layers have no report).
    activation_spec: the activations' grid; default: the spec of the model's first Quantize
      (torch's quint8 when there is none).

  Returns:
    A list of dicts as above (Python floats and ints).

  Raises:
    ValueError: not convert's variables, or a layer without its report.
  """
  spec = activation_spec_of(int_vars) if activation_spec is None else activation_spec
  shift = arith.int8_shift(spec)
  rows = []
  for path, op in converted_ops(int_vars):
    row: dict[str, Any] = {"layer": path, "kind": type(op).__name__, "weight_scale": None,
                           "weight_zero_point": None, "input_scale": None,
                           "input_zero_point": None, "output_scale": None,
                           "output_zero_point": None}
    if isinstance(op, QuantizeOp):
      row.update(kind="Quantize", output_scale=_scalar(op.scale),
                 output_zero_point=_zero(op.zero_point, shift))
    elif isinstance(op, DequantizeOp):
      row.update(kind="Dequantize", input_scale=_scalar(op.scale),
                 input_zero_point=_zero(op.zero_point, shift))
    elif isinstance(op, LAYERS):
      report = op.report
      if report is None:
        raise ValueError(f"{path} has no report (its activation grids): this is a "
                         f"qjax.for_serving tree. Pass convert's output.")
      scales = np.asarray(op.kernel.scale, np.float32)
      row.update(weight_scale=(float(scales.min()), float(scales.max())),
                 weight_zero_point=_weight_zero(op.kernel),
                 input_scale=_scalar(report["input_scale"]),
                 input_zero_point=_zero(report["input_zero_point"], shift),
                 output_scale=_scalar(report["output_scale"]),
                 output_zero_point=_zero(report["output_zero_point"], shift))
    else:
      continue
    rows.append(row)
  return rows


def _cell(value: Any, width: int, fmt: str) -> str:
  if value is None:
    return f"{'-':>{width}}"
  if isinstance(value, tuple):
    text = (format(value[0], fmt) if value[0] == value[1]
            else f"{format(value[0], fmt)}..{format(value[1], fmt)}")
    return f"{text:>{width}}"
  return f"{format(value, fmt):>{width}}"


def format_layer_grids(rows: Sequence[dict]) -> str:
  """`layer_grids`'s rows as a fixed-width table, one line per op after a header line;
  "-" where a field does not apply (a boundary's weights, a Quantize's float input)."""
  name_width = max([5] + [len(row["layer"]) for row in rows])
  lines = [f"{'layer':<{name_width}} {'kind':<10} {'weight scale':>21} {'Z_W':>4} "
           f"{'input scale':>11} {'Z_X':>4} {'output scale':>12} {'Z_Y':>4}"]
  for row in rows:
    lines.append(f"{row['layer']:<{name_width}} {row['kind']:<10} "
                 f"{_cell(row['weight_scale'], 21, '.4e')} "
                 f"{_cell(row['weight_zero_point'], 4, 'd')} "
                 f"{_cell(row['input_scale'], 11, '.5g')} "
                 f"{_cell(row['input_zero_point'], 4, 'd')} "
                 f"{_cell(row['output_scale'], 12, '.5g')} "
                 f"{_cell(row['output_zero_point'], 4, 'd')}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# The first layer, recomputed by hand.


def capture_layer(model: nn.Module, int_vars: Any, x: Any, path: str, *,
                  mode: str = "int8", **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
  """(input, output) of the module at `path` ("/"-joined) in `model.apply(int_vars, x,
  mode=mode)`: the int8 arrays the layer took and gave (its first call)."""
  seen: dict[str, Any] = {}

  def record(next_fun, args, call_kwargs, context):
    out = next_fun(*args, **call_kwargs)
    module = context.module
    if (context.method_name == "__call__" and "/".join(module.path) == path
        and "input" not in seen):
      seen["input"], seen["output"] = args[0], out
    return out

  def run(variables, x):  # traced once: the intercepted values come out of the jitted call
    seen.clear()
    with nn.intercept_methods(record):
      model.apply(variables, x, mode=mode, **kwargs)
    if "input" not in seen:
      raise ValueError(f"the model never called a module at {path!r} in mode {mode!r}.")
    return seen["input"], seen["output"]

  x_in, x_out = jax.jit(run)(int_vars, x)
  return np.asarray(x_in), np.asarray(x_out)


def _same_pads(size: int, window: int, stride: int, dilation: int) -> tuple[int, int]:
  """XLA's "SAME": out = ceil(size / stride), the total padding split low-first."""
  out = -(-size // stride)
  total = max((out - 1) * stride + (window - 1) * dilation + 1 - size, 0)
  return total // 2, total - total // 2


def im2col(x: np.ndarray, window: Sequence[int], *, strides: Sequence[int],
           padding: Any, dilation: Sequence[int], pad_value: int) -> np.ndarray:
  """(N, *spatial, C) -> (N, *out_spatial, prod(window) * C): the input patch of every output
  position, padded with `pad_value` (the input's zero point: zero padding in real terms);
  features ordered (window position, channel), i.e. an HW..IO kernel reshaped to (-1, O)."""
  spatial = x.shape[1:-1]
  if isinstance(padding, str):
    if padding == "VALID":
      pads = [(0, 0)] * len(spatial)
    else:
      pads = [_same_pads(s, w, st, d)
              for s, w, st, d in zip(spatial, window, strides, dilation, strict=True)]
  else:
    pads = [(int(lo), int(hi)) for lo, hi in padding]
  x = np.pad(x, [(0, 0), *pads, (0, 0)], constant_values=pad_value)
  out = [(s - ((w - 1) * d + 1)) // st + 1
         for s, w, d, st in zip(x.shape[1:-1], window, dilation, strides, strict=True)]
  cols = []
  for offsets in np.ndindex(*window):
    index = tuple(slice(o * d, o * d + (n - 1) * st + 1, st)
                  for o, d, n, st in zip(offsets, dilation, out, strides, strict=True))
    cols.append(x[(slice(None), *index, slice(None))])
  return np.concatenate(cols, axis=-1)


def _bias_int32(path: str, op: Any, x_scale: np.float64, w_scale: np.ndarray,
                variables: Any) -> tuple[np.ndarray, str]:
  """q_b = rne(b / (S_X S_W)) and where b came from."""
  n_out = op.kernel.qvalue.shape[0 if isinstance(op, Int8Dense) else -1]
  if variables is not None:
    node = variables.get("params", variables)
    for key in path.split("/"):
      node = node[key]
    if "bias" not in node:
      return np.zeros(n_out, np.int64), "none"
    b = np.asarray(node["bias"], np.float64)
    return np.rint(b / (x_scale * w_scale)).astype(np.int64), "params"
  if op.report is not None and "bias" in op.report:  # "float" / "integer": rne(b / (S_X S_W))
    return np.asarray(op.report["bias"], np.int64), "report"
  bias = getattr(op.requant, "bias", None)  # "fbgemm": f32(b / f32(S_X S_W))
  if bias is None:
    return np.zeros(n_out, np.int64), "none"
  return np.rint(np.asarray(bias, np.float64)).astype(np.int64), "fbgemm b/A"


def explicit_first_layer(model: nn.Module, int_vars: Any, x: Any, *, variables: Any = None,
                         activation_spec: QuantSpec | None = None) -> dict:
  """The model's first converted layer recomputed in plain NumPy, against qjax's integers.

  The layer's int8 input is captured from `model.apply(int_vars, x, mode="int8")` (for the
  MNIST models, the Quantize output) together with its output. Then, with every quantity in
  torch's conventions (activations as quint8 values 0..255; weights qint8) and int64 / float64
  arithmetic:

    acc[n]  = sum_k (q_X[k] - Z_X) (q_W[n, k] - Z_W[n])      (a Conv: over its im2col patch,
                                                               padded with Z_X)
    q_b[n]  = rne(b[n] / (S_X S_W[n]))
    M[n]    = S_X S_W[n] / S_Y
    q_Y[n]  = clamp(Z_Y + rne(M[n] (acc[n] + q_b[n])), lo, hi),   lo = Z_Y with a fused ReLU

  where lo..hi is the layer's clamp range (the whole 8-bit range, as torch's kernels clamp)
  and rne rounds half to even (np.rint). Nothing of the op's precomputed `offset` or
  requantizer constants is used, only its integers and scales: q_W, S_W, Z_W from the
  kernel, (S_X, Z_X), (S_Y, Z_Y) from its report, the ReLU and clamp range from its
  requantizer.

  The float bias b comes from `variables` ({"params": ...}, the calibrated float variables)
  when given. Without them, q_b is the op's report["bias"] ("float" / "integer": exactly
  rne(b / (S_X S_W)) in float64) or, for "fbgemm", rne of its float32 bias b / f32(S_X S_W),
  equal to q_b except where b / (S_X S_W) lies within float32 rounding of a half step.

  Dense and Conv layers are supported (a Conv with feature_group_count 1, through an explicit
  im2col); a grouped Conv raises NotImplementedError.

  Args:
    model: the Flax model `int_vars` was converted from.
    int_vars: `qjax.convert`'s output (with its reports).
    x: a float input batch for the model.
    variables: optional calibrated float variables, for the float bias.
    activation_spec: the activations' grid; default: the spec of the model's first Quantize.

  Returns:
    {"layer": its path, "equal": outputs where both agree, "total": outputs compared,
     "max_diff": the largest |difference| in steps, "ours": qjax's output, "explicit": the
     NumPy one (both int64 in torch's domain, the layer's output shape), "bias_source":
     "params", "report", "fbgemm b/A" or "none"}.

  Raises:
    ValueError: no converted Dense / Conv layer, or one without its report.
    NotImplementedError: a grouped convolution.
  """
  layers = [(p, op) for p, op in converted_ops(int_vars) if isinstance(op, LAYERS)]
  if not layers:
    raise ValueError("the variables hold no converted Dense or Conv layer.")
  path, op = layers[0]
  if op.report is None:
    raise ValueError(f"{path} has no report (its activation grids): this is a "
                     f"qjax.for_serving tree. Pass convert's output.")
  if isinstance(op, Int8Conv) and op.groups != 1:
    raise NotImplementedError(f"{path}: a grouped convolution (feature_group_count "
                              f"{op.groups}); the explicit im2col handles groups = 1.")
  spec = activation_spec_of(int_vars) if activation_spec is None else activation_spec
  shift = arith.int8_shift(spec)
  q8_in, q8_out = capture_layer(model, int_vars, x, path)

  # The integers and scales, in torch's conventions.
  report = op.report
  q_x = q8_in.astype(np.int64) + shift
  z_x = int(np.asarray(report["input_zero_point"])) + shift
  s_x = np.float64(np.asarray(report["input_scale"], np.float32))
  q_w = np.asarray(op.kernel.qvalue, np.int64)          # Dense (N, K); Conv HW..IO
  s_w = np.asarray(op.kernel.scale, np.float32).astype(np.float64)
  z_w = np.asarray(op.kernel.zero_point, np.int64)
  s_y = np.float64(np.asarray(report["output_scale"], np.float32))
  z_y = int(np.asarray(report["output_zero_point"])) + shift
  lo, hi = op.requant.lo + shift, op.requant.hi + shift
  if op.requant.relu:
    lo = max(lo, z_y)

  if isinstance(op, Int8Dense):
    w_nk = q_w                                          # (N, K): torch's (out, in)
    x_k = q_x.reshape(-1, q_x.shape[-1])                # (rows, K)
    out_shape = q_x.shape[:-1] + (w_nk.shape[0],)
  else:
    window = q_w.shape[:-2]
    x4 = q_x if q_x.ndim == q_w.ndim else q_x[None]
    patches = im2col(x4, window, strides=op.strides, padding=op.padding,
                     dilation=op.dilation, pad_value=z_x)
    w_nk = q_w.reshape(-1, q_w.shape[-1]).T              # (O, prod(window) * I)
    x_k = patches.reshape(-1, patches.shape[-1])
    out_shape = (patches.shape[:-1] if q_x.ndim == q_w.ndim else patches.shape[1:-1]) + (
        w_nk.shape[0],)
  z_w_n = np.broadcast_to(z_w, (w_nk.shape[0],))
  s_w_n = np.broadcast_to(s_w, (w_nk.shape[0],))

  q_b, bias_source = _bias_int32(path, op, s_x, s_w_n, variables)
  acc = (x_k - z_x) @ (w_nk - z_w_n[:, None]).T         # sum_k (q_X - Z_X)(q_W - Z_W), int64
  m = s_x * s_w_n / s_y                                 # float64
  q_y = np.clip(z_y + np.rint(m * (acc + q_b)), lo, hi).astype(np.int64)

  explicit = q_y.reshape(out_shape)
  ours = q8_out.astype(np.int64) + shift
  diff = np.abs(ours - explicit)
  return {"layer": path, "equal": int(np.sum(diff == 0)), "total": int(diff.size),
          "max_diff": int(diff.max(initial=0)), "ours": ours, "explicit": explicit,
          "bias_source": bias_source}


def format_explicit(result: Mapping[str, Any], rows: int = 3, cols: int = 8) -> str:
  """A few outputs of `explicit_first_layer` side by side, then "equal: N of M".

  Shows `rows` output rows (flattened to (positions, channels)): those where qjax and NumPy
  differ first, then the first ones that are not constant (a conv's border rows are often all
  Z_Y), each as a "qjax" and a "numpy" line of `cols` channels (from the first difference's
  neighbourhood in a differing row, else from channel 0); a "^" marks a differing column.
  """
  ours = np.asarray(result["ours"]).reshape(-1, np.shape(result["ours"])[-1])
  explicit = np.asarray(result["explicit"]).reshape(ours.shape)
  differs = np.any(ours != explicit, axis=1)
  varied = np.ptp(ours, axis=1) > 0
  order = np.concatenate([np.flatnonzero(differs), np.flatnonzero(~differs & varied),
                          np.flatnonzero(~differs & ~varied)])[:rows]
  lines = [f"{result['layer']}: qjax's int8 output vs the explicit NumPy formula "
           f"(quint8 values)"]
  for r in order:
    start = 0
    if differs[r]:
      first = int(np.flatnonzero(ours[r] != explicit[r])[0])
      start = max(0, min(first - cols // 2, ours.shape[1] - cols))
    a, b = ours[r, start:start + cols], explicit[r, start:start + cols]
    label = f"row {r} [{start}:{start + len(a)}]"
    lines.append(f"  {label} qjax  " + " ".join(f"{v:4d}" for v in a))
    lines.append(f"  {'':{len(label)}} numpy " + " ".join(f"{v:4d}" for v in b))
    if np.any(a != b):
      marks = " ".join(f"{'^' if u != v else '':>4}" for u, v in zip(a, b, strict=True))
      lines.append(f"  {'':{len(label)}}       {marks}".rstrip())
  percent = 100.0 * result["equal"] / max(result["total"], 1)
  lines.append(f"equal: {result['equal']} of {result['total']} ({percent:.3f} %), "
               f"max |difference| {result['max_diff']} step(s)")
  return "\n".join(lines)
