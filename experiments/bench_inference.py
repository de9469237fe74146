"""Inference time of qjax's integer path against float32 and PyTorch's x86 int8 models.

For each (model, batch): the MNIST MLP (784-100-100-10) and LeNet-5 (32x32 inputs) at batch 1,
64, 256 and 1024 and a 4096-4096-4096 MLP (two 4096 x 4096 layers) at batch 256, all of
them experiments.models' QuantMLP / QuantLeNet5 with fused ReLUs, and `GroupedBlock` (a
MobileNet / ResNeXt block: depthwise, pointwise, grouped and strided depthwise 3 x 3
convolutions on 28 x 28 x 16 inputs) at batch 1, 16 and 64, this times one call of:

  * float32: the jitted float apply of the qjax.nn model (mode="float", params only);
  * int8 (fbgemm, xla): the jitted int8 apply (mode="int8") of the variables `qjax.convert`
    makes with requant "fbgemm", in the lean form of `qjax.for_serving` (a jitted call pays
    for every array it is passed), traced with QJAX_INT8_KERNEL=xla: every contraction an
    XLA int8 dot_general / convolution;
  * int8 (fbgemm, native) / (float, native) / (integer, native): the same with that requant,
    traced with QJAX_INT8_KERNEL=native: Dense layers on qjax's C++ int8 kernel (weights
    pre-packed by `for_serving`; each requantizer runs inside the kernel), and
    convolutions of several input channels too (the kernel gathers their patches), and
    LeNet-5's single-channel first one (the kernel's direct convolution, where the CPU has
    AVX-512 VBMI), and the block's depthwise and grouped ones (the kernel's depthwise /
    grouped convolution). Skipped where the kernel does not run (not built, not a CPU
    backend);
  * torch x86 int8: PyTorch's eager-mode converted model (fused Linear/Conv + ReLU,
    get_default_qconfig("x86"), engine "x86", torch.set_num_threads(all cores)), on the same
    weights and calibration batches.

All models are calibrated with PyTorch's x86 default qconfig (histogram activations, per-
channel weights) on the same random pixel-like batches. Compile time is the jitted apply's
lowering plus XLA compilation, measured ahead of time; the calls are timed on the compiled
executable, each to completion (block_until_ready), and the variants are interleaved over
several rounds in a rotated order so that machine drift hits all of them alike. The reported
time is the median over all rounds and calls; ratios are taken between medians of this run.

JAX dispatches CPU calls asynchronously by default (jax_cpu_enable_async_dispatch): the call
returns at once and another thread runs it. Every call here is waited for, as in a serving
loop that answers one request at a time, where that hand-off only adds latency;
--sync-dispatch turns it off for the JAX variants (PyTorch's eager calls are synchronous).
The header says which was measured.

The table also shows where the int8 arithmetic really runs: of the dot / convolution ops of
the optimised XLA program, how many take int8 operands (XLA may rewrite an int8 contraction
into an int32 one, which is far slower), and the relative L2 error of the logits against
the float32 apply.

Usage:
  python -m experiments.bench_inference               # a few minutes on 2 CPU cores
  python -m experiments.bench_inference --quick       # seconds; smoke run
  python -m experiments.bench_inference --json results/bench_inference.json
  python -m experiments.bench_inference --sync-dispatch    # JAX calls run on the caller
  python -m experiments.bench_inference --models block     # one kind of model only
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import re
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qjax.nn as qnn
from qjax import convert, for_serving
from qjax.integer import kernels

from experiments import models

SEED = 0
KINDS = ("mlp", "lenet5", "block")
CALIB_BATCHES, CALIB_ROWS = 4, 32
REQUANTS = ("fbgemm", "float", "integer")
# (requant, kernel) of the int8 variants; QJAX_INT8_KERNEL while each one is traced.
INT8_VARIANTS = (("fbgemm", "xla"), ("fbgemm", "native"), ("float", "native"),
                 ("integer", "native"))
VARIANTS = ("float32", *(f"int8 ({r}, {k})" for r, k in INT8_VARIANTS), "torch x86 int8")
VARIANT_WIDTH = max(map(len, VARIANTS))
# qconfig name -> (qjax's, the name of torch's twin in torch.ao.quantization). "x86" is
# PyTorch's default for the backend (histogram activations); "default" (min/max activations)
# converts in a fraction of the time and serves the smoke run.
QCONFIGS = {"x86": (qnn.get_default_qconfig("x86"), "x86"),
            "default": (qnn.default_qconfig, "default")}


class Skip(Exception):  # noqa: N818 (a skipped row, not an error)
  """A variant that cannot run here (torch missing)."""


# ------------------------------------------------------------------------------------------
# Models: experiments.models' QuantMLP / QuantLeNet5 (qjax.nn layers in PyTorch's eager
# placement), and their torch twins.


BLOCK_INPUT = (28, 28, 16)


class GroupedBlock(nn.Module):
  """A MobileNet / ResNeXt block in PyTorch's eager placement, ReLUs fused: depthwise 3 x 3
  (dw1), pointwise to 64 channels (pw1), 3 x 3 in 16 groups of 4 channels (gc), depthwise
  3 x 3 at stride 2 (dw2), then a Dense layer to 10 logits (fc) on the flattened 14 x 14 x 64
  map."""

  qconfig: qnn.QConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: str) -> jax.Array:
    q, pad = self.qconfig, ((1, 1), (1, 1))
    x = qnn.Quantize(q, name="quant")(x, mode=mode)
    x = qnn.QuantConv(16, (3, 3), padding=pad, feature_group_count=16, qconfig=q,
                      activation=nn.relu, name="dw1")(x, mode=mode)
    x = qnn.QuantConv(64, (1, 1), qconfig=q, activation=nn.relu, name="pw1")(x, mode=mode)
    x = qnn.QuantConv(64, (3, 3), padding=pad, feature_group_count=16, qconfig=q,
                      activation=nn.relu, name="gc")(x, mode=mode)
    x = qnn.QuantConv(64, (3, 3), strides=(2, 2), padding=pad, feature_group_count=64,
                      qconfig=q, activation=nn.relu, name="dw2")(x, mode=mode)
    x = qnn.QuantDense(10, qconfig=q, name="fc")(x.reshape((x.shape[0], -1)), mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


def quant_model(case: Case, qconfig: qnn.QConfig) -> nn.Module:
  """The qjax.nn model of `case`, ReLUs fused: models.QuantLeNet5, `GroupedBlock`, or
  models.QuantMLP with layers fc1, fc2, ... of widths case.dims[1:] (ReLU after all but the
  last)."""
  if case.kind == "lenet5":
    return models.QuantLeNet5(qconfig)
  if case.kind == "block":
    return GroupedBlock(qconfig)
  return models.QuantMLP(qconfig, hidden=tuple(case.dims[1:-1]), num_classes=case.dims[-1])


def _torch_model(kind: str, dims: tuple[int, ...], params: dict) -> tuple[Any, list]:
  """The float torch twin of a qjax model (QuantStub, layers, DeQuantStub in one
  Sequential) with its parameters, and the (layer, ReLU) pairs to fuse."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch.ao import quantization as tq  # pylint: disable=import-outside-toplevel

  layers: dict[str, Any] = {"quant": tq.QuantStub()}
  fuse = []
  if kind == "mlp":
    for i, width in enumerate(dims[1:]):
      layers[f"fc{i + 1}"] = torch.nn.Linear(dims[i], width)
      if i < len(dims) - 2:
        layers[f"relu{i + 1}"] = torch.nn.ReLU()
        fuse.append([f"fc{i + 1}", f"relu{i + 1}"])
  elif kind == "block":
    layers.update(dw1=torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), relu1=torch.nn.ReLU(),
                  pw1=torch.nn.Conv2d(16, 64, 1), relu2=torch.nn.ReLU(),
                  gc=torch.nn.Conv2d(64, 64, 3, padding=1, groups=16), relu3=torch.nn.ReLU(),
                  dw2=torch.nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=64),
                  relu4=torch.nn.ReLU(), flatten=torch.nn.Flatten(),
                  fc=torch.nn.Linear(14 * 14 * 64, 10))
    fuse = [["dw1", "relu1"], ["pw1", "relu2"], ["gc", "relu3"], ["dw2", "relu4"]]
  else:
    layers.update(conv1=torch.nn.Conv2d(1, 6, 5), relu1=torch.nn.ReLU(),
                  pool1=torch.nn.MaxPool2d(2), conv2=torch.nn.Conv2d(6, 16, 5),
                  relu2=torch.nn.ReLU(), pool2=torch.nn.MaxPool2d(2),
                  flatten=torch.nn.Flatten(), fc1=torch.nn.Linear(400, 120),
                  relu3=torch.nn.ReLU(), fc2=torch.nn.Linear(120, 84), relu4=torch.nn.ReLU(),
                  fc3=torch.nn.Linear(84, 10))
    fuse = [["conv1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"], ["fc2", "relu4"]]
  layers["dequant"] = tq.DeQuantStub()
  model = torch.nn.Sequential(collections.OrderedDict(layers))
  with torch.no_grad():
    for name, p in params.items():
      kernel, bias = np.array(p["kernel"]), np.array(p["bias"])  # writable copies
      if kernel.ndim == 4:  # HWIO -> OIHW
        weight = kernel.transpose(3, 2, 0, 1)
      elif kind == "lenet5" and name == "fc1":  # NHWC flatten rows (h, w, c) -> NCHW (c, h, w)
        weight = kernel.reshape(5, 5, 16, 120).transpose(3, 2, 0, 1).reshape(120, 400)
      elif kind == "block" and name == "fc":
        weight = kernel.reshape(14, 14, 64, 10).transpose(3, 2, 0, 1).reshape(10, -1)
      else:
        weight = kernel.T
      getattr(model, name).weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
      getattr(model, name).bias.copy_(torch.from_numpy(bias))
  return model.eval(), fuse


def _to_torch(x: np.ndarray) -> Any:
  import torch  # pylint: disable=import-outside-toplevel
  # A writable copy: arrays from jax are read-only, which torch.from_numpy warns about.
  return torch.from_numpy(np.array(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x))


def torch_int8_model(kind: str, dims: tuple[int, ...], params: dict,
                     calibration: Sequence[np.ndarray], qconfig: str = "x86") -> Any:
  """PyTorch's x86 post-training static quantization of the same model: fuse, prepare with
  get_default_qconfig("x86") (or default_qconfig), run the calibration batches, convert."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from torch.ao import quantization as tq  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise Skip(f"torch not importable ({e})") from e
  torch.backends.quantized.engine = "x86"
  model, fuse = _torch_model(kind, dims, params)
  with warnings.catch_warnings():
    # torch 2.13 announces the deprecation of eager-mode quantization; it still works.
    warnings.filterwarnings("ignore", message=".*deprecated", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(deprecated|quant_min and quant_max)",
                            category=UserWarning)
    tq.fuse_modules(model, fuse, inplace=True)
    model.qconfig = tq.get_default_qconfig("x86") if qconfig == "x86" else tq.default_qconfig
    tq.prepare(model, inplace=True)
    with torch.inference_mode():
      for x in calibration:
        model(_to_torch(x))
    return tq.convert(model, inplace=True)


# ------------------------------------------------------------------------------------------
# Cases.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
  """One row group of the table: a model at a batch size.

  Attributes:
    kind: "mlp", "lenet5" or "block" (`GroupedBlock`).
    dims: mlp only: the input width, then each layer's width.
    batch: rows per call.
  """

  kind: str
  dims: tuple[int, ...] = ()
  batch: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Case.kind must be one of {list(KINDS)}; got {self.kind!r}.")
    if self.kind == "mlp" and (len(self.dims) < 2 or min(self.dims) < 1):
      raise ValueError(f"Case.dims of an mlp must be the input width and at least one layer "
                       f"width, all positive; got {self.dims}.")
    if self.batch < 1:
      raise ValueError(f"Case.batch must be positive; got {self.batch}.")

  @property
  def model_name(self) -> str:
    return self.kind if self.kind != "mlp" else "mlp " + "-".join(map(str, self.dims))

  @property
  def input_shape(self) -> tuple[int, ...]:
    if self.kind == "block":
      return BLOCK_INPUT
    return models.INPUT_SHAPES["lenet5"] if self.kind == "lenet5" else (self.dims[0],)


MNIST_MLP = (784, 100, 100, 10)
CASES = (*(Case(kind="mlp", dims=MNIST_MLP, batch=b) for b in (1, 64, 256, 1024)),
         *(Case(kind="lenet5", batch=b) for b in (1, 64, 256, 1024)),
         Case(kind="mlp", dims=(4096, 4096, 4096), batch=256),
         *(Case(kind="block", batch=b) for b in (1, 16, 64)))
QUICK_CASES = (*(Case(kind="mlp", dims=MNIST_MLP, batch=b) for b in (1, 8, 16)),
               Case(kind="lenet5", batch=4), Case(kind="mlp", dims=(64, 64, 64), batch=4),
               Case(kind="block", batch=2))


def pixels(shape: tuple[int, ...], seed: int) -> np.ndarray:
  """Pixel-like inputs in [0, 1); timing does not depend on the values."""
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


@dataclasses.dataclass
class Built:
  """A model, calibrated on both sides: qjax variables, int8 variables per requant mode,
  the torch model (or why it is missing)."""

  model: nn.Module
  variables: dict
  int_vars: dict[tuple[str, str], dict]
  torch_model: Any = None
  torch_skip: str | None = None


def build(case: Case, qconfig_name: str = "x86") -> Built:
  """Initialise, calibrate on CALIB_BATCHES random batches, convert; the torch twin too."""
  qconfig, torch_qconfig = QCONFIGS[qconfig_name]
  model = quant_model(case, qconfig)
  calibration = [pixels((CALIB_ROWS,) + case.input_shape, SEED + 1 + i)
                 for i in range(CALIB_BATCHES)]
  variables = jax.jit(lambda x: model.init(jax.random.key(SEED), x, mode="float"))(
      jnp.asarray(calibration[0]))
  calibrate = jax.jit(lambda v, x: model.apply(v, x, mode="calibrate",
                                               mutable=["quant_stats"])[1])
  for x in calibration:
    variables = {**variables, **calibrate(variables, jnp.asarray(x))}
  sample = jnp.asarray(calibration[0][:2])
  # Timed on the serving form of the integer variables (only what mode "int8" reads).
  converted = {r: convert(model, variables, sample, requant=r) for r in REQUANTS}
  int_vars = {(r, k): for_serving(converted[r], pack=k == "native") for r, k in INT8_VARIANTS}
  built = Built(model, variables, int_vars)
  try:
    built.torch_model = torch_int8_model(case.kind, case.dims, variables["params"],
                                         calibration, torch_qconfig)
  except Skip as e:
    built.torch_skip = str(e)
  return built


# ------------------------------------------------------------------------------------------
# Timing.


_HLO_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z]\w*)\[")
_HLO_CONTRACTION = re.compile(r"\b(dot|convolution|custom-call)\(([^)]*)\)")
_NATIVE_TARGETS = ('custom_call_target="qjax_int8_gemm',
                   'custom_call_target="qjax_int8_conv',
                   'custom_call_target="qjax_int8_depthwise')


def hlo_int8_contractions(hlo_text: str) -> tuple[int, int]:
  """(dot / convolution ops with int8 operands, all of them) in an optimised HLO module;
  calls of qjax's native int8 GEMM and convolution count as contractions, int8 when both
  their first two operands (activations, weights) are."""
  dtypes = {}
  for line in hlo_text.splitlines():
    match = _HLO_DEF.match(line)
    if match:
      dtypes[match.group(1)] = match.group(2)
  int8_ops = total = 0
  for line in hlo_text.splitlines():
    match = _HLO_CONTRACTION.search(line)
    if not match or not _HLO_DEF.match(line):
      continue
    operands = [o.split()[-1].lstrip("%") for o in match.group(2).split(",") if o.strip()]
    if match.group(1) == "custom-call":
      if not any(target in line for target in _NATIVE_TARGETS):
        continue
      operands = operands[:2]
    total += 1
    int8_ops += all(dtypes.get(o) == "s8" for o in operands)
  return int8_ops, total


class Runner:
  """One (case, variant): a call that runs to completion, its timings and facts."""

  def __init__(self, case: Case, variant: str, call: Callable[[], Any], **facts: Any):
    self.case, self.variant, self.call, self.facts = case, variant, call, facts
    self.times: list[list[float]] = []
    self.reps = 1

  def run(self, steps: int) -> list[float]:
    durations = []
    for _ in range(steps):
      start = time.perf_counter()
      self.call()
      durations.append(time.perf_counter() - start)
    return durations


def _jax_runner(case: Case, variant: str, fn: Callable, variables: Any, x: jax.Array,
                reference: np.ndarray | None, kernel: str | None = None
                ) -> tuple[Runner, np.ndarray]:
  """A jitted apply, compiled ahead of time (lowering and compilation timed), traced with
  QJAX_INT8_KERNEL=kernel."""
  start = time.perf_counter()
  with kernels.use(kernel) if kernel else contextlib.nullcontext():
    lowered = jax.jit(fn).lower(variables, x)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  out = np.asarray(compiled(variables, x))
  int8_ops, total = hlo_int8_contractions(compiled.as_text())
  call = lambda: jax.block_until_ready(compiled(variables, x))  # noqa: E731
  return Runner(case, variant, call, compile_s=compile_s, hlo_int8_contractions=int8_ops,
                hlo_contractions=total,
                rel_err=_rel_err(out, reference)), out


def _rel_err(out: np.ndarray, reference: np.ndarray | None) -> float | None:
  if reference is None:
    return None
  return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


def runners_for(case: Case, built: Built) -> tuple[list[Runner], list[dict]]:
  """The four variants of a case, compiled (float32 first: the others' error reference);
  the skipped ones with the reason."""
  model = built.model
  x = jnp.asarray(pixels((case.batch,) + case.input_shape, SEED + 100))
  float_apply = lambda p, x: model.apply({"params": p}, x, mode="float")  # noqa: E731
  int8_apply = lambda v, x: model.apply(v, x, mode="int8")  # noqa: E731
  runner, reference = _jax_runner(case, "float32", float_apply, built.variables["params"], x,
                                  None)
  runner.facts["rel_err"] = 0.0
  runners = [runner]
  skipped = []
  native = kernels.resolve("auto") != "xla"
  for requant, kernel in INT8_VARIANTS:
    variant = f"int8 ({requant}, {kernel})"
    if kernel == "native" and not native:
      skipped.append({"model": case.model_name, "batch": case.batch, "variant": variant,
                      "reason": "the native int8 kernel does not run here (not built, not "
                                "the CPU backend, or several devices)"})
      continue
    runners.append(_jax_runner(case, variant, int8_apply, built.int_vars[(requant, kernel)],
                               x, reference, kernel)[0])
  if built.torch_model is None:
    skipped.append({"model": case.model_name, "batch": case.batch,
                    "variant": "torch x86 int8", "reason": built.torch_skip})
  else:
    import torch  # pylint: disable=import-outside-toplevel
    x_t = _to_torch(np.asarray(x))
    with torch.inference_mode():
      out = built.torch_model(x_t).numpy()
    runners.append(Runner(case, "torch x86 int8", lambda: built.torch_model(x_t),
                          compile_s=None, hlo_int8_contractions=None, hlo_contractions=None,
                          rel_err=_rel_err(out, reference)))
  return runners, skipped


def _summary(runner: Runner) -> dict[str, Any]:
  samples = [t for round_times in runner.times for t in round_times]
  q1, median, q3 = (statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3)
  return {"ms": 1e3 * median, "min_ms": 1e3 * min(samples), "iqr_ms": 1e3 * (q3 - q1),
          "calls": len(samples)}


def _torch_context():
  """torch.inference_mode() when torch is importable (the torch calls run under it)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    import contextlib  # pylint: disable=import-outside-toplevel
    return contextlib.nullcontext()
  return torch.inference_mode()


def run(cases: Sequence[Case], *, rounds: int, reps: int, min_round_seconds: float,
        qconfig: str = "x86", async_dispatch: bool | None = None) -> dict[str, Any]:
  """Builds every case, times all variants interleaved; returns the results
  (`async_dispatch`: what `set_async_dispatch` returned, for the record)."""
  threads = _set_torch_threads()
  built: dict[tuple, Built] = {}
  runners: list[Runner] = []
  skipped: list[dict] = []
  with _torch_context():
    for case in cases:
      key = (case.kind, case.dims)
      if key not in built:  # one calibration per model, shared by its batch sizes
        built[key] = build(case, qconfig)
      case_runners, case_skipped = runners_for(case, built[key])
      for runner in case_runners:
        warm = runner.run(2)
        # Sub-millisecond calls need many repetitions before their median settles.
        runner.reps = max(reps, math.ceil(min_round_seconds / max(warm[-1], 1e-6)))
      runners += case_runners
      skipped += case_skipped
    for r in range(rounds):
      shift = r % max(len(runners), 1)
      for runner in runners[shift:] + runners[:shift]:
        runner.times.append(runner.run(runner.reps))

  rows = [{"model": r.case.model_name, "batch": r.case.batch, "variant": r.variant,
           **_summary(r), **r.facts} for r in runners]
  by_case = {}
  for row in rows:
    by_case.setdefault((row["model"], row["batch"]), {})[row["variant"]] = row["ms"]
  for row in rows:
    times = by_case[(row["model"], row["batch"])]
    row["x_float32"] = row["ms"] / times["float32"]
    torch_ms = times.get("torch x86 int8")
    row["x_torch"] = None if torch_ms is None else row["ms"] / torch_ms
  return {
      "versions": _versions(), "device": _device(), "threads": threads,
      "load_average": [round(v, 2) for v in os.getloadavg()],
      "cases": [dataclasses.asdict(c) | {"model": c.model_name} for c in cases],
      "qconfig": qconfig, "rounds": rounds, "reps": reps,
      "jax_cpu_async_dispatch": async_dispatch,
      "min_round_seconds": min_round_seconds,
      "rows": rows, "skipped": skipped,
  }


def set_async_dispatch(on: bool) -> bool | None:
  """Sets JAX's asynchronous CPU dispatch, which JAX reads once, when it creates its CPU
  client: the setting in effect, or None where the client existed already (its own setting
  stays; a test that runs main in a busy process)."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    return None
  jax.config.update("jax_cpu_enable_async_dispatch", on)
  return on


def _set_torch_threads() -> dict[str, int | None]:
  cores = os.cpu_count() or 1
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {"cpu_cores": cores, "torch": None}
  torch.set_num_threads(cores)
  return {"cpu_cores": cores, "torch": torch.get_num_threads()}


def _versions() -> dict[str, str | None]:
  versions = {"jax": jax.__version__, "flax": flax.__version__}
  for dist in ("torch",):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  return versions


def _device() -> str:
  device = jax.devices()[0]
  cpu = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f
                  if line.startswith("model name")), "")
  except OSError:
    pass
  return f"{device.platform} x{jax.device_count()}, {os.cpu_count()} CPU cores" + (
      f" ({cpu})" if cpu else "")


_DISPATCH_WORDS = {True: "on", False: "off", None: "as JAX was already set up"}


def _fmt(value: float | None, spec: str, width: int) -> str:
  return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


_ALLOCATOR = {True: "freed memory retained", False: "glibc defaults"}


def format_table(results: dict[str, Any]) -> str:
  """The timing table, one row per (model, batch, variant), skipped rows in place."""
  v = results["versions"]
  threads = results["threads"]
  lines = [f"jax {v['jax']}, flax {v['flax']}, torch {v['torch'] or 'absent'} (engine x86, "
           f"{threads['torch']} threads); qconfig {results['qconfig']!r} on both sides",
           f"device: {results['device']}; load average at the end: "
           f"{' '.join(map(str, results['load_average']))}; JAX async dispatch "
           f"{_DISPATCH_WORDS[results.get('jax_cpu_async_dispatch')]}; allocator: "
           f"{_ALLOCATOR[bool(results.get('freed_memory_retained'))]}",
           f"{results['rounds']} interleaved rounds x (>= {results['reps']} calls and >= "
           f"{results['min_round_seconds']} s): median ms per call; x f32 / x torch: ratio of "
           f"medians in this run; compile: lowering + XLA compilation of the jitted apply", ""]
  header = (f"{'model':<19} {'batch':>5}  {'variant':<{VARIANT_WIDTH}} {'ms/call':>9} "
            f"{'min':>9} {'iqr':>8} {'x f32':>6} {'x torch':>7} {'compile s':>9} {'s8 dots':>7} "
            f"{'err':>7}")
  lines += [header, "-" * len(header)]
  entries = results["rows"] + results["skipped"]
  case_order = {(c["model"], c["batch"]): i for i, c in enumerate(results["cases"])}
  entries.sort(key=lambda e: (case_order[(e["model"], e["batch"])],
                              VARIANTS.index(e["variant"])))
  for e in entries:
    prefix = f"{e['model']:<19} {e['batch']:>5}  {e['variant']:<{VARIANT_WIDTH}}"
    if "reason" in e:
      lines.append(f"{prefix} skipped: {e['reason']}")
      continue
    dots = ("-" if e["hlo_contractions"] is None
            else f"{e['hlo_int8_contractions']}/{e['hlo_contractions']}")
    lines.append(f"{prefix} {e['ms']:>9.4f} {e['min_ms']:>9.4f} {e['iqr_ms']:>8.4f} "
                 f"{_fmt(e['x_float32'], '.2f', 6)} {_fmt(e['x_torch'], '.2f', 7)} "
                 f"{_fmt(e['compile_s'], '.2f', 9)} {dots:>7} {_fmt(e['rel_err'], '.1e', 7)}")
  lines += ["",
            "s8 dots: dot / convolution ops and native int8 GEMM calls of the optimised XLA "
            "program with int8 operands / all of them",
            "err: |logits - float32 logits| / |float32 logits|, same parameters and batch"]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Parses `argv`, runs the benchmark, prints the table; returns the results (as --json)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over variants")
  parser.add_argument("--reps", type=int, default=10, help="calls per variant per round")
  parser.add_argument("--min-round-seconds", type=float, default=0.3,
                      help="each variant runs at least this long per round (0: exactly --reps)")
  parser.add_argument("--qconfig", choices=sorted(QCONFIGS), default="x86",
                      help="calibration qconfig on both sides (default: PyTorch's x86)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny models and batches, min/max calibration, one short round: "
                           "a smoke run")
  parser.add_argument("--json", type=pathlib.Path, default=None, help="write results here")
  parser.add_argument("--sync-dispatch", action="store_true",
                      help="turn JAX's asynchronous CPU dispatch off: each call runs on the "
                           "calling thread (every call is waited for anyway)")
  parser.add_argument("--models", default=",".join(KINDS),
                      help=f"comma-separated kinds of model to run, of {','.join(KINDS)}")
  parser.add_argument("--retain-freed-memory", action="store_true",
                      help="keep freed buffers in the heap for every variant alike "
                           "(qjax.integer.kernels.retain_freed_memory): no page faults from "
                           "glibc handing XLA's and torch's buffers back between calls")
  args = parser.parse_args(argv)
  retained = kernels.retain_freed_memory() if args.retain_freed_memory else False
  if args.rounds < 1 or args.reps < 1 or args.min_round_seconds < 0:
    parser.error("--rounds and --reps must be positive, --min-round-seconds >= 0")
  kinds = [k.strip() for k in args.models.split(",") if k.strip()]
  if not kinds or any(k not in KINDS for k in kinds):
    parser.error(f"--models takes kinds of {list(KINDS)}; got {args.models!r}")
  if args.quick:
    cases, rounds, reps, min_seconds, qconfig = QUICK_CASES, 1, 2, 0.0, "default"
  else:
    cases, rounds, reps, min_seconds, qconfig = (CASES, args.rounds, args.reps,
                                                 args.min_round_seconds, args.qconfig)
  cases = tuple(c for c in cases if c.kind in kinds)
  dispatch = set_async_dispatch(not args.sync_dispatch)
  results = run(cases, rounds=rounds, reps=reps, min_round_seconds=min_seconds,
                qconfig=qconfig, async_dispatch=dispatch)
  results["freed_memory_retained"] = retained
  print(format_table(results))
  if args.json is not None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
  return results


if __name__ == "__main__":
  main()
