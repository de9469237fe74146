"""Train-step time of int8 QAT: qjax against float32 and the AQT and Qwix peers.

For the MNIST MLP and LeNet-5 (experiments/models.py; LeNet-5 on 32x32 inputs) this times one
jitted training step (forward, softmax cross-entropy, backward, Adam update) on a random batch,
for:

  * float32: the plain models;
  * qjax int8 QAT: `qjax_qat_variant` below (x86 QAT qconfig, observers in "quant_stats");
  * qjax QAT int8 fwd: the same with the forward contractions in integers
    (`QuantDotGeneral` / `QuantConvGeneral(int8_forward=True)`, AQT's way: the native int8
    kernel, XLA's int32 convolution for one input channel), backward float;
  * AQT (aqtp, aqt.jax.v2): W8A8 forward-only quantization, i.e. AQT's QAT setup;
  * Qwix: W8A8 quantized training through QtProvider / QtRule.

Every variant starts from the same initial parameters. Timing excludes compilation and a
few warm-up steps; each timed step ends when its outputs are ready, and the variants are
interleaved over several rounds (in a rotated order) so that machine drift hits all of them
alike. The reported time is the median over all rounds and repetitions.

The script also checks that each peer really quantizes: relative error of its logits against
the float model on the same parameters, the rounding and int8 operations in its forward
jaxpr, and how many parameter gradients are identically zero (a quantizer without a
straight-through gradient stops training silently).

Peers are optional (`pip install -e ".[bench]"`); a missing one skips its rows.

Usage:
  python -m experiments.bench_qat                      # under a minute on 2 CPU cores
  python -m experiments.bench_qat --reps 3 --rounds 1  # seconds; smoke run
  python -m experiments.bench_qat --sync loss          # wait for the loss only
  python -m experiments.bench_qat --carry tree         # carry the observer states as a tree

A timed step ends with `jax.block_until_ready` on everything it returns (`--sync all`, the
default), or on its loss alone (`--sync loss`), as a training loop that reads only its loss
waits: every output of one execution becomes ready with it (one completion event on the
CPU), so the step's own time is the same, less the harness's walk over the returned
parameters, optimizer and observer states (a Python call per array, ~0.3 us each here).

The step carries the model's non-parameter collections (qjax's "quant_stats"; the float
model and the peers have none that hold arrays) as `qjax.nn.PackedVariables`, one buffer per
dtype, by default (`--carry packed`), or as the tree of arrays Flax returns (`--carry tree`).
Every array a jitted call takes or returns costs the host microseconds of dispatch, and the
QAT MLP's observers hold 24 small arrays; packed, they are two.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax.nn
from qjax.integer import kernels

from experiments import models

SEED = 0
LEARNING_RATE = 1e-3
WARMUP_STEPS = 3

# What a variant builder returns: the model, its initialized variables, and the collections
# that the train step must pass as `mutable` and carry from one step to the next.
Built = tuple[nn.Module, dict[str, Any], tuple[str, ...]]


class Skip(Exception):  # noqa: N818 (a skipped row, not an error)
  """A variant that cannot run here (package missing, not implemented yet)."""


def init_variables(model: nn.Module, model_name: str) -> dict[str, Any]:
  """Initializes `model` with the seed and input shape that every variant shares.

  The float, AQT and Qwix models have the same parameter tree (same layer names and
  initializers), so the same key gives them identical starting parameters.
  """
  sample = jnp.zeros((1,) + models.INPUT_SHAPES[model_name], jnp.float32)
  # Jitted: op-by-op initialization costs seconds per model on CPU.
  return dict(jax.jit(model.init)(jax.random.PRNGKey(SEED), sample))


def float_variant(model_name: str) -> Built:
  """The unquantized model."""
  model = models.MODELS[model_name]()
  return model, init_variables(model, model_name), ()


def qjax_qat_variant(model_name: str, *, int8_forward: bool = False) -> Built:
  """qjax int8 QAT of `model_name`: PyTorch's x86 QAT qconfig (moving-average observers in
  "quant_stats", per-tensor uint8 activations, per-channel int8 weights), placed like the
  peers: `QuantDotGeneral` / `QuantConvGeneral` quantize both operands of every contraction.

  Args:
    model_name: A key of models.MODELS ("mlp" or "lenet5").
    int8_forward: the forward contractions in integers (`QuantDotGeneral` and
      `QuantConvGeneral(int8_forward=True)`: on the native int8 kernel where it runs), the
      backward in float.

  Returns:
    (model, variables, ("quant_stats",)): the train step applies the model with
    `mutable=["quant_stats"]` and carries the observer states forward.
  """
  qconfig = qjax.nn.get_default_qat_qconfig("x86")
  model = models.MODELS[model_name](
      dot_general_cls=functools.partial(qjax.nn.QuantDotGeneral, qconfig=qconfig, mode="qat",
                                        int8_forward=int8_forward),
      conv_general_dilated_cls=functools.partial(qjax.nn.QuantConvGeneral, qconfig=qconfig,
                                                 mode="qat", int8_forward=int8_forward))
  variables = init_variables(model, model_name)
  return model, variables, ("quant_stats",)


def aqt_variant(model_name: str, *, quantize_conv: bool = True) -> Built:
  """AQT (aqt.jax.v2) W8A8, forward-only: int8 weights and activations, float backward.

  Forward-only quantization is what AQT's README calls QAT (config_v4 with the gradient
  contractions left in float); config_v4's default would also quantize the backward pass.
  Scales are dynamic absmax, per example for activations and per output channel for weights.
  Dense layers get AqtDotGeneral (int8 x int8 -> int32 dot, custom VJP); convolutions get
  AqtConvGeneralDilated with conv_general_dilated_make(2, 8, 8), as in AQT's own flax example.
  That conv has no custom VJP: its operands reach lax.conv as int8 cast back to float, so no
  gradient flows to the conv kernels or through to earlier layers (aqtp 0.9.0; backprop for
  conv is AQT's open issue #285). The zero-grad check shows it.

  Args:
    model_name: A key of models.MODELS.
    quantize_conv: False leaves the convolutions in float (the part AQT can train).

  Returns:
    (model, variables, mutable_collections), as qjax_qat_variant.
  """
  try:
    from aqt.jax.v2 import config as aqt_config  # pylint: disable=import-outside-toplevel
    from aqt.jax.v2.flax import aqt_flax  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise Skip(f"aqtp not importable ({e}); pip install -e '.[bench]'") from e
  dense_cfg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
  conv_cfg = aqt_config.default_unquantized_config()
  conv_cfg.fwd = aqt_config.conv_general_dilated_make(2, lhs_bits=8, rhs_bits=8)
  # prng_name=None: nothing here rounds stochastically, so no rng stream is needed.
  dot_general_cls = functools.partial(aqt_flax.AqtDotGeneral, dense_cfg, prng_name=None)
  conv_cls = functools.partial(aqt_flax.AqtConvGeneralDilated, conv_cfg, prng_name=None)
  model = models.MODELS[model_name](
      dot_general_cls=dot_general_cls,
      conv_general_dilated_cls=conv_cls if quantize_conv else None)
  variables = init_variables(model, model_name)
  # In QuantMode.TRAIN the freezers store nothing, but keep any collection mutable.
  return model, variables, tuple(c for c in variables if c != "params")


def qwix_variant(model_name: str) -> Built:
  """Qwix W8A8 quantized training: QtRule(weight_qtype=int8, act_qtype=int8) on all layers.

  With no bwd_qtype the backward pass is float (straight-through), i.e. QAT. Scales are
  Qwix's XLA default: dynamic absmax, per example for activations and per output channel for
  weights; dense layers and convolutions both run int8 x int8 contractions under a custom VJP.

  Args:
    model_name: A key of models.MODELS.

  Returns:
    (model, variables, mutable_collections), as qjax_qat_variant.
  """
  try:
    import qwix  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise Skip(f"qwix not importable ({e}); pip install -e '.[bench]'") from e
  rule = qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)
  model = qwix.quantize_model(models.MODELS[model_name](), qwix.QtProvider([rule]))
  variables = init_variables(model, model_name)
  return model, variables, tuple(c for c in variables if c != "params")


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  """A row of the table: how to build it, for which models, and whether it is a peer."""

  name: str
  build: Callable[[str], Built]
  model_names: tuple[str, ...] = tuple(models.MODELS)
  note: str = ""
  # A peer is someone else's package: if it fails to build or compile (say, after an API
  # change), its row is skipped with the error instead of aborting the whole benchmark.
  peer: bool = False


VARIANTS = (
    VariantSpec("float32", float_variant),
    VariantSpec("qjax int8 QAT", qjax_qat_variant),
    VariantSpec("qjax QAT int8 fwd", functools.partial(qjax_qat_variant, int8_forward=True),
                note="forward contractions in int8"),
    VariantSpec("aqt w8a8", aqt_variant, peer=True),
    # AQT's conv has no straight-through gradient (see the zero-grad check), so LeNet-5 also
    # gets a row with float convolutions: the part of the model that AQT can train.
    VariantSpec("aqt w8a8 dense-only", functools.partial(aqt_variant, quantize_conv=False),
                model_names=("lenet5",), note="convs in float", peer=True),
    VariantSpec("qwix w8a8", qwix_variant, peer=True),
)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    mutable: tuple[str, ...], *, packed: bool = False) -> Callable:
  """Jitted (params, state, opt_state, x, y) -> (params, state, opt_state, loss); the first
  three arguments are donated. With `packed`, `state` is the non-parameter collections as a
  `qjax.nn.PackedVariables` (and so is the returned state), otherwise their tree."""

  def loss_fn(params, state, x, y):
    variables = {"params": params, **state}
    if mutable:
      logits, updates = model.apply(variables, x, mutable=list(mutable))
      state = {**state, **updates}
    else:
      logits = model.apply(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

  def step(params, state, opt_state, x, y):
    tree = state.unpack() if packed else state
    (loss, tree), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tree, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    state = state.repack(tree) if packed else tree
    return optax.apply_updates(params, updates), state, opt_state, loss

  # Donate the carried training state, as a real training loop does: its buffers are reused
  # in place instead of being allocated anew every step.
  return jax.jit(step, donate_argnums=(0, 1, 2))


class Runner:
  """One (model, variant): its jitted step and the training state it carries forward."""

  def __init__(self, model_name: str, variant: str, built: Built, x: jax.Array, y: jax.Array,
               carry: str = "packed"):
    self.model_name, self.variant = model_name, variant
    self.model, variables, self.mutable = built
    # Own copies: the step donates them, and the variants start from the same initial values.
    self.params = jax.tree_util.tree_map(jnp.copy, variables["params"])
    state = jax.tree_util.tree_map(
        jnp.copy, {k: v for k, v in variables.items() if k != "params"})
    packed = carry == "packed"
    self.state = qjax.nn.PackedVariables.pack(state) if packed else state
    optimizer = optax.adam(LEARNING_RATE)
    self.opt_state = optimizer.init(self.params)
    self.step = make_train_step(self.model, optimizer, self.mutable, packed=packed)
    self.x, self.y = x, y
    self.times: list[list[float]] = []  # seconds, one list per round

  def run(self, steps: int, sync: str = "all") -> list[float]:
    """Runs `steps` training steps, each timed until its outputs (`sync` "all") or its loss
    ("loss") are ready; returns the durations."""
    durations = []
    for _ in range(steps):
      start = time.perf_counter()
      out = self.step(self.params, self.state, self.opt_state, self.x, self.y)
      if sync == "loss":
        out[3].block_until_ready()
      else:
        jax.block_until_ready(out)
      durations.append(time.perf_counter() - start)
      self.params, self.state, self.opt_state, _ = out
    return durations

  def state_tree(self) -> dict[str, Any]:
    """The non-parameter collections, unpacked if the step carries them packed."""
    if isinstance(self.state, qjax.nn.PackedVariables):
      return self.state.unpack()
    return self.state


def _sub_jaxprs(value: Any):
  """Yields the jaxprs nested in an equation parameter (pjit, custom_vjp, cond branches)."""
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def op_census(jaxpr) -> collections.Counter:
  """Counts rounding ops, int8-valued results and int8 contractions in a jaxpr, recursively.
  A `cond` counts its first branch only (lax.cond's false branch): the int8 forward's float
  contraction runs in the other one, only for operands holding NaN or inf."""
  counts = collections.Counter()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      counts.update(op_census(eqn.params["branches"][0].jaxpr))
      continue
    name = eqn.primitive.name
    target = str(eqn.params.get("target_name", "")) if name == "ffi_call" else ""
    # qjax's fused QAT point (observer, qparams, fake quantization) rounds in native code
    if name in ("round", "floor", "ceil") or target == "qjax_fake_quant_observe":
      counts["round"] += 1
    if any(getattr(v.aval, "dtype", None) == jnp.int8 for v in eqn.outvars):
      counts["int8 values"] += 1
    operands = eqn.invars
    native = target.startswith(("qjax_int8_gemm", "qjax_int8_conv"))
    if native:  # qjax's native int8 GEMM / convolution: activations and weights first
      operands = operands[:2]
    if name in ("dot_general", "conv_general_dilated") or native:
      counts["contractions"] += 1
      if all(getattr(v.aval, "dtype", None) == jnp.int8 for v in operands):
        counts["int8 contractions"] += 1
    for param in eqn.params.values():
      for sub in _sub_jaxprs(param):
        counts.update(op_census(sub))
  return counts


def quantization_evidence(runner: Runner, float_model: nn.Module) -> dict[str, Any]:
  """Whether `runner`'s model really quantizes, measured on its initial parameters.

  Returns the relative L2 error of its logits against the float model with the same
  parameters, the op census of its forward jaxpr, and the number of parameter leaves whose
  gradient is zero everywhere.
  """
  variables = {"params": runner.params, **runner.state_tree()}
  mutable = list(runner.mutable) or False

  def forward(v, x):
    out = runner.model.apply(v, x, mutable=mutable)
    return out[0] if mutable else out

  def loss(params, variables, x, y):
    logits = forward({**variables, "params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  # One compiled function gives both the logits and the gradients (the data and state are
  # arguments: closed over, they are constants XLA spends seconds folding reductions of).
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      runner.params, variables, runner.x, runner.y)
  try:
    reference = jax.jit(float_model.apply)({"params": runner.params}, runner.x)
    rel_err = float(jnp.linalg.norm(logits - reference) / jnp.linalg.norm(reference))
  except Exception:  # pylint: disable=broad-except
    rel_err = None  # a toolkit that adds parameters has no float twin with the same tree
  census = op_census(jax.make_jaxpr(forward)(variables, runner.x).jaxpr)
  grads = jax.tree_util.tree_leaves_with_path(grads)
  zero = [jax.tree_util.keystr(path) for path, g in grads if not np.any(np.asarray(g))]
  return {"rel_err_logits": rel_err, "round_ops": census["round"],
          "int8_values": census["int8 values"], "contractions": census["contractions"],
          "int8_contractions": census["int8 contractions"],
          "zero_grad_leaves": zero, "param_leaves": len(grads)}


def random_batch(model_name: str, batch: int) -> tuple[jax.Array, jax.Array]:
  """Pixel-like inputs in [0, 1) and uniform labels; timing does not depend on the values."""
  kx, ky = jax.random.split(jax.random.PRNGKey(SEED + 1))
  x = jax.random.uniform(kx, (batch,) + models.INPUT_SHAPES[model_name], jnp.float32)
  return x, jax.random.randint(ky, (batch,), 0, 10)


def _summary(runner: Runner) -> dict[str, Any]:
  """Median and spread of a runner's timed steps, in milliseconds."""
  samples = [t for round_times in runner.times for t in round_times]
  q1, median, q3 = (statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3)
  return {"ms_per_step": 1e3 * median, "iqr_ms": 1e3 * (q3 - q1),
          "round_medians_ms": [1e3 * statistics.median(t) for t in runner.times]}


def run(*, model_names: Sequence[str], batch: int, reps: int, rounds: int,
        min_round_seconds: float = 0.0, sync: str = "all", carry: str = "packed"
        ) -> dict[str, Any]:
  """Builds and checks every (model, variant), times the train steps; returns the results.

  Each round runs a variant at least `reps` times and for at least `min_round_seconds`;
  `sync` is what a timed step waits for (`Runner.run`); `carry` how the step takes and returns
  the non-parameter collections: "packed" (`qjax.nn.PackedVariables`) or "tree".
  """
  if sync not in ("all", "loss"):
    raise ValueError(f"run: sync must be 'all' or 'loss'; got {sync!r}.")
  if carry not in ("packed", "tree"):
    raise ValueError(f"run: carry must be 'packed' or 'tree'; got {carry!r}.")
  runners: list[Runner] = []
  skipped: list[dict[str, str]] = []
  evidence: dict[tuple[str, str], dict[str, Any]] = {}
  for model_name in model_names:
    x, y = random_batch(model_name, batch)
    float_model = models.MODELS[model_name]()
    for spec in VARIANTS:
      if model_name not in spec.model_names:
        continue
      try:
        runner = Runner(model_name, spec.name, spec.build(model_name), x, y, carry)
        # The float row runs the same checks as a control: they must find nothing there.
        evidence[(model_name, spec.name)] = quantization_evidence(runner, float_model)
        warm = runner.run(WARMUP_STEPS)  # the first call compiles
        # Sub-millisecond steps need many repetitions before their median settles.
        runner.reps = max(reps, math.ceil(min_round_seconds / max(warm[-1], 1e-6)))
      except (Skip, NotImplementedError) as e:
        skipped.append({"model": model_name, "variant": spec.name, "reason": str(e)})
        continue
      except Exception as e:  # pylint: disable=broad-except
        if not spec.peer:
          raise
        skipped.append({"model": model_name, "variant": spec.name,
                        "reason": f"failed: {type(e).__name__}: {e}".splitlines()[0]})
        continue
      runners.append(runner)

  for r in range(rounds):
    # Rotate the order every round so that no variant always runs first or last.
    shift = r % max(len(runners), 1)
    for runner in runners[shift:] + runners[:shift]:
      runner.times.append(runner.run(runner.reps, sync))

  notes = {spec.name: spec.note for spec in VARIANTS}
  rows = [{"model": r.model_name, "variant": r.variant, **_summary(r),
           "note": notes[r.variant], "evidence": evidence[(r.model_name, r.variant)]}
          for r in runners]
  float_ms = {row["model"]: row["ms_per_step"] for row in rows if row["variant"] == "float32"}
  for row in rows:
    row["ratio_to_float"] = row["ms_per_step"] / float_ms[row["model"]]
  device = jax.devices()[0]
  kind = device.platform if device.device_kind == device.platform else (
      f"{device.platform} ({device.device_kind})")
  return {
      "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
      "peers": peer_versions(),
      "device": f"{kind} x{jax.device_count()}, {os.cpu_count()} CPU cores",
      "models": list(model_names), "batch": batch, "reps": reps, "rounds": rounds,
      "min_round_seconds": min_round_seconds, "sync": sync, "carry": carry,
      "warmup_steps": WARMUP_STEPS, "optimizer": f"adam({LEARNING_RATE})",
      "rows": rows, "skipped": skipped,
  }


def peer_versions() -> dict[str, str | None]:
  """Installed versions of the peer packages (None when absent)."""
  versions = {}
  for dist in ("aqtp", "qwix"):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  return versions


_SYNC = {"all": "all its outputs are", "loss": "its loss is"}
_CARRY = {"packed": "non-parameter state packed (qjax.nn.PackedVariables)",
          "tree": "non-parameter state as a tree"}
_ALLOCATOR = {True: "freed memory retained", False: "glibc defaults"}


def format_table(results: dict[str, Any]) -> str:
  """The timing table with the quantization checks, skipped rows in place, as text."""
  peers = ", ".join(f"{k} {v or 'absent'}" for k, v in results["peers"].items())
  lines = [f"jax {results['jax']}, flax {results['flax']}, optax {results['optax']}; {peers}",
           f"device: {results['device']}; allocator: "
           f"{_ALLOCATOR[bool(results.get('freed_memory_retained'))]}",
           f"batch {results['batch']}, {results['rounds']} rounds x (>= {results['reps']} reps "
           f"and >= {results['min_round_seconds']} s), after {results['warmup_steps']} warm-up "
           f"steps: median ms per jitted train step (state donated), "
           f"{results['optimizer']}; {_CARRY[results.get('carry', 'tree')]}; each step timed "
           f"until {_SYNC[results.get('sync', 'all')]} ready", ""]
  header = (f"{'model':<7} {'variant':<20} {'ms/step':>8} {'iqr':>7} {'x float':>7}  "
            f"{'logit err':>9} {'round':>5} {'int8 contr.':>11} {'zero grads':>10}  note")
  lines += [header, "-" * len(header)]
  model_order = {m: i for i, m in enumerate(results["models"])}
  variant_order = {spec.name: i for i, spec in enumerate(VARIANTS)}
  entries = sorted(results["rows"] + results["skipped"],
                   key=lambda e: (model_order[e["model"]], variant_order[e["variant"]]))
  for entry in entries:
    prefix = f"{entry['model']:<7} {entry['variant']:<20}"
    if "reason" in entry:
      lines.append(f"{prefix} skipped: {entry['reason']}")
      continue
    ev = entry["evidence"]
    err = "n/a" if ev["rel_err_logits"] is None else f"{ev['rel_err_logits']:.1e}"
    note = entry["note"]
    if ev["zero_grad_leaves"]:
      note = "; ".join(filter(None, [note, "zero grad: " + " ".join(ev["zero_grad_leaves"])]))
    lines.append(
        f"{prefix} {entry['ms_per_step']:>8.3f} {entry['iqr_ms']:>7.3f} "
        f"{entry['ratio_to_float']:>7.2f}  {err:>9} {ev['round_ops']:>5} "
        f"{ev['int8_contractions']:>5}/{ev['contractions']:<5} "
        f"{len(ev['zero_grad_leaves']):>4}/{ev['param_leaves']:<5}  {note}")
  lines += ["",
            "logit err: |logits - float logits| / |float logits|, same parameters and batch",
            "round: rounding ops in the forward jaxpr (a fused native QAT point counts as one); "
            "int8 contr.: dot_general/conv (and "
            "calls of qjax's native int8 kernel) with both operands int8 / all",
            "zero grads: parameter leaves whose gradient is identically zero"]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Parses `argv`, runs the benchmark, prints the table; returns the results (as --json)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=20, help="timed steps per variant per round")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over variants")
  parser.add_argument("--min-round-seconds", type=float, default=0.3,
                      help="each variant runs at least this long per round (0: exactly --reps)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--models", default=",".join(models.MODELS),
                      help=f"comma-separated subset of {','.join(models.MODELS)}")
  parser.add_argument("--sync", choices=("all", "loss"), default="all",
                      help="what a timed step waits for: every output it returns, or its "
                           "loss alone (as a training loop that reads only the loss)")
  parser.add_argument("--carry", choices=("packed", "tree"), default="packed",
                      help="how the step takes and returns the observer states: packed into "
                           "one buffer per dtype (qjax.nn.PackedVariables) or as a tree")
  parser.add_argument("--json", type=pathlib.Path, default=None, help="write results here")
  parser.add_argument("--retain-freed-memory", action="store_true",
                      help="keep freed buffers in the heap for every variant alike "
                           "(qjax.integer.kernels.retain_freed_memory): no page faults from "
                           "glibc handing XLA's and torch's buffers back between calls")
  args = parser.parse_args(argv)
  # dict.fromkeys: drop repeats, keep the order given.
  model_names = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
  unknown = sorted(set(model_names) - set(models.MODELS))
  if not model_names or unknown:
    parser.error(f"--models: give some of {sorted(models.MODELS)}; unknown: {unknown}")
  if args.reps < 1 or args.rounds < 1 or args.batch < 1:
    parser.error("--reps, --rounds and --batch must be positive")

  retained = kernels.retain_freed_memory() if args.retain_freed_memory else False
  results = run(model_names=model_names, batch=args.batch, reps=args.reps, rounds=args.rounds,
                min_round_seconds=args.min_round_seconds, sync=args.sync, carry=args.carry)
  results["freed_memory_retained"] = retained
  print(format_table(results))
  if args.json is not None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
  return results


if __name__ == "__main__":
  main()
