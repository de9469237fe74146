"""The fused QAT point (`qjax.ste.observed_fake_quant`, one native call for the observer's
update, the qparams and the fake quantization) against its XLA form, bit for bit: the
new observer state, the qparams, the fake-quantized values, the mask of the backward and
the gradient, for running and moving-average min / max observers, per-tensor and
per-channel grids (first, middle and last axis), symmetric and affine, 4 to 16 bits and
reduce_range; fresh states, states that have seen data, and batches the observer skips
(NaN, +-inf, a range too wide for float32). A QAT train step through `qjax.nn` gives the
same parameters and statistics with the fused points and without them.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax.nn as qnn
from qjax import numerics, observers as obs, ste
from qjax.integer import kernels
from qjax.numerics import QuantSpec

# The fused point has two implementations: AVX-512 (the vnni, amx and amx_emulated paths run
# the same code) and plain C++ (avx2, portable).
PATHS = tuple(p for p in ("vnni", "portable") if p in kernels.native_paths())
pytestmark = pytest.mark.skipif(not PATHS, reason="the native kernel does not run here")

SPECS = [QuantSpec(bits=8, signed=False), QuantSpec(bits=8, signed=False, reduce_range=True),
         QuantSpec(bits=8, signed=True, symmetric=True, axis=-1),
         QuantSpec(bits=8, signed=False, symmetric=True), QuantSpec(bits=4, signed=True, axis=0),
         QuantSpec(bits=16, signed=True, symmetric=True, axis=1),
         QuantSpec(bits=8, signed=True, narrow_range=True, symmetric=True, axis=-1)]
# The moving average with PyTorch's constant, and with 1 (the batch's range) on the 4-bit grid.
OBSERVERS = [lambda spec: obs.MinMaxObserver(spec=spec),
             lambda spec: obs.MovingAverageMinMaxObserver(
                 spec=spec, averaging_constant=1.0 if spec.bits == 4 else 0.01)]


def _batches(rng: np.random.Generator, shape: tuple[int, ...]) -> list[np.ndarray]:
  """A first batch, a wider one, rounding ties, NaN, +inf, a too-wide range, a constant."""
  x = rng.normal(0.3, 2.0, shape).astype(np.float32)
  ties = ((rng.integers(-300, 300, shape) + 0.5) * np.float32(0.02)).astype(np.float32)
  nan, inf = x.copy(), x.copy()
  nan.reshape(-1)[-1], inf.reshape(-1)[0] = np.nan, np.inf
  wide = np.where(x > 0.3, np.float32(3e38), np.float32(-3e38))  # 6e38 wide where signs mix
  return [x, 3 * x, ties, nan, inf, wide, np.full(shape, 0.25, np.float32)]


def _xla_point(observer, state, x):
  new = observer.update(state, x)
  qparams = observer.qparams(new)
  y = ste.fake_quant(x, observer.spec, qparams)
  mask = numerics.fake_quant_with_mask(x, qparams.scale, qparams.zero_point,
                                       spec=observer.spec)[1]
  return y, mask, tuple(new), qparams


def _fused_point(observer, path, state, x):
  averaging = getattr(observer, "averaging_constant", None)
  args = dict(spec=observer.spec, averaging=averaging, eps=float(observer.eps), path=path)
  y, fields, qparams = ste.observed_fake_quant(x, *state, **args)
  _, mask, *_ = kernels.fake_quant_observe(x, *state, **args)
  return y, mask, fields, qparams


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_fused_point_matches_xla(spec):
  # (256, 784): the MNIST input; (3, 77): a tail after whole 64-element steps.
  shapes = [(33, 70), (5, 3, 17), (2, 40, 1)] if spec.per_channel else [(256, 784), (7,), (3, 77)]
  _check_against_xla(spec, shapes, OBSERVERS)


def test_a_large_per_channel_point_matches_xla():
  # 1,100 rows, folded four at a time; 70 channels, not a multiple of 16; NaN in the last
  # row and inf in the first. XLA runs a per-channel min / max this large in kernels that drop
  # NaN, which the XLA form must not do either.
  _check_against_xla(QuantSpec(bits=8, signed=True, symmetric=True, axis=-1), [(1100, 70)],
                     OBSERVERS[1:])


def test_a_large_odd_sized_point_matches_xla():
  # 79,163 floats (past the size from which both passes split over the cores), not a
  # multiple of 16: the last chunk ends in a partial vector; NaN and inf land in the first
  # and last chunks.
  _check_against_xla(QuantSpec(bits=8, signed=False), [(301, 263)], OBSERVERS)


def _check_against_xla(spec, shapes, makers):
  rng = np.random.default_rng(7)
  observers = [make(spec) for make in makers]

  @jax.jit
  def points(states, xs):  # XLA's form and every native path, every observer and shape: one program
    return [[{p: (_xla_point(observer, state, x) if p == "xla"
                  else _fused_point(observer, p, state, x)) for p, state in by_path.items()}
             for by_path, x in zip(by_shape, xs_by_shape, strict=True)]
            for observer, by_shape, xs_by_shape in zip(observers, states, xs, strict=True)]

  states = [[{p: observer.init(shape) for p in ("xla",) + PATHS} for shape in shapes]
            for observer in observers]
  # Each observer sees its own draw of the batches, as when the observers ran one after another.
  batches = [[_batches(rng, shape) for shape in shapes] for _ in observers]
  for step in range(len(batches[0][0])):
    results = points(states, [[b[step] for b in by_shape] for by_shape in batches])
    for observer, by_shape in zip(observers, results, strict=True):
      for shape, by_path in zip(shapes, by_shape, strict=True):
        want = by_path["xla"]
        for p in PATHS:
          got = by_path[p]
          where = f"{type(observer).__name__} {spec} {shape} batch {step} on {p}"
          for name, a, b in (("y", got[0], want[0]), ("mask", got[1], want[1]),
                             ("scale", got[3].scale, want[3].scale),
                             ("zero_point", got[3].zero_point, want[3].zero_point)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{name} {where}")
          for name, a, b in zip(("min_val", "max_val", "count", "skipped"), got[2], want[2],
                                strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{name} {where}")
    states = [[{p: type(by_path[p])(*r[p][2]) for p in by_path}
               for by_path, r in zip(by_shape, res, strict=True)]
              for by_shape, res in zip(states, results, strict=True)]
  for observer, by_shape in zip(observers, states, strict=True):
    for shape, by_path in zip(shapes, by_shape, strict=True):
      # NaN, inf and the too-wide range
      assert int(by_path["xla"].skipped) == 3, (type(observer).__name__, shape)


def test_fused_point_gradient_is_the_clipped_straight_through_one():
  spec = QuantSpec(bits=4, signed=True, symmetric=True)
  observer = obs.MovingAverageMinMaxObserver(spec=spec)
  state = observer.update(observer.init(()), jnp.array([-1.0, 1.0]))
  x = jnp.linspace(-3.0, 3.0, 101)
  g = jnp.cos(x)

  def fused(x):
    y, *_ = ste.observed_fake_quant(x, *state, spec=spec, averaging=0.01,
                                    eps=float(observer.eps), path=PATHS[0])
    return jnp.sum(y * g)

  def xla(x):
    return jnp.sum(_xla_point(observer, state, x)[0] * g)

  got, want = jax.jit(jax.grad(fused))(x), jax.jit(jax.grad(xla))(x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert 0 < int(jnp.sum(got == 0)) < x.size  # the grid clips the ends


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    qconfig = qnn.get_default_qat_qconfig("x86")
    dot = functools.partial(qnn.QuantDotGeneral, qconfig=qconfig, mode="qat")
    x = nn.relu(nn.Dense(32, dot_general_cls=dot, name="fc1")(x))
    return nn.Dense(10, dot_general_cls=dot, name="fc2")(x)


def test_qat_steps_with_fused_points_equal_the_xla_form():
  """Three jitted QAT steps (SGD with momentum) of an MLP: parameters, statistics and losses are the same
  bits with the fused native points and with XLA's; the fused program has one native call a
  point and no XLA reduction of the observed tensors."""
  model = _Mlp()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((64, 50), np.float32))
  y = jnp.asarray(rng.integers(0, 10, 64))
  variables = jax.jit(model.init)(jax.random.key(1), x)  # one compilation, not one an op
  optimizer = optax.sgd(0.05, momentum=0.9)

  def step(params, stats, opt_state):
    def loss_fn(params):
      logits, new = model.apply({"params": params, "quant_stats": stats}, x,
                                mutable=["quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), new["quant_stats"], opt_state, loss

  results = {}
  for kernel in ("xla", PATHS[0]):
    with kernels.use(kernel):
      jitted = jax.jit(lambda *args: step(*args))  # traced afresh under this kernel
      hlo = jitted.lower(variables["params"], variables["quant_stats"],
                         optimizer.init(variables["params"])).as_text()
      calls = [line for line in hlo.splitlines() if "qjax_fake_quant_observe" in line]
      assert len(calls) == (0 if kernel == "xla" else 4), calls  # 2 layers x (input, weight)
      # The mask of the backward is written where x takes a gradient: not for the input batch.
      masks = [re.findall(r"tensor<([0-9x]*)xi1>", line)[0] for line in calls]
      assert masks == ([] if kernel == "xla" else ["0", "50x32", "64x32", "32x10"]), masks
      state = (variables["params"], variables["quant_stats"],
               optimizer.init(variables["params"]))
      losses = []
      for _ in range(3):
        *state, loss = jitted(*state)
        losses.append(float(loss))
      results[kernel] = (state[:2], losses)
  want, got = results["xla"], results[PATHS[0]]
  assert got[1] == want[1]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               got[0], want[0])


def test_fused_point_counts_saturate():
  """count and skipped stop at int32's maximum, as the XLA observer's do."""
  spec = QuantSpec(bits=8, signed=False)
  observer = obs.MovingAverageMinMaxObserver(spec=spec)
  top = np.int32(np.iinfo(np.int32).max)
  state = obs.MinMaxState(jnp.float32(-1.0), jnp.float32(2.0), jnp.int32(top), jnp.int32(top))
  for x in (np.array([0.5, 3.0], np.float32), np.array([np.nan, 1.0], np.float32)):
    want = jax.jit(functools.partial(_xla_point, observer))(state, x)
    got = jax.jit(functools.partial(_fused_point, observer, PATHS[0]))(state, x)
    for a, b in zip(got[2], want[2], strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert int(got[2][2]) == top and int(got[2][3]) == top


# Grids whose integers the int8 forward takes: activations per tensor, weights symmetric.
X_GRIDS = [QuantSpec(bits=8, signed=False), QuantSpec(bits=8, signed=False, reduce_range=True),
           QuantSpec(bits=8, signed=True, symmetric=True)]
W_GRIDS = [QuantSpec(bits=8, signed=True, symmetric=True, axis=-1),
           QuantSpec(bits=8, signed=True, symmetric=True),
           QuantSpec(bits=8, signed=True, narrow_range=True, symmetric=True, axis=1)]


def _second_pass(operand, spec, y, scale, zero_point):
  """The integers the int8 forward recovers from y in a pass of its own (XLA's form), NaN
  entries read as 0: int8 codes for "x", PackedWeights for "w"."""
  clean = jnp.where(jnp.isnan(y), 0.0, y)
  if operand == "x":
    codes, _ = kernels.quantize_samples(clean, spec, scale, zero_point, kernel="xla")
    return jnp.where(jnp.isnan(y), jnp.int8(0), codes)
  packed, _ = kernels.pack_grid(clean, jnp.broadcast_to(scale, y.shape[1:]), kernel_path="xla")
  return packed


@pytest.mark.parametrize("operand,spec", [("x", s) for s in X_GRIDS] + [("w", s) for s in W_GRIDS],
                         ids=str)
def test_emitted_integers_are_those_of_a_second_pass(operand, spec):
  """`fake_quant_observe_int8` returns what `fake_quant_observe` returns and, from the same
  pass, the integers the int8 forward would recover from y: codes (x) or packed panels with
  column sums (w), on every batch of `_batches` (NaN, +-inf, a range the observer skips) and
  on odd sizes; the flag says whether y holds a NaN."""
  # (256, 784): two threads; (1, 1) and (1,): one value; 17 x 33: K % 4 and N % 16 tails.
  shapes = ([(256, 784), (1,), (3, 77), (2, 3, 5)] if operand == "x"
            else [(784, 100), (1, 1), (17, 33), (5, 16)])
  observer = obs.MovingAverageMinMaxObserver(spec=spec)
  rng = np.random.default_rng(11)

  @jax.jit
  def run(state, x):
    out = {}
    for path in PATHS:
      args = dict(spec=spec, averaging=0.01, eps=float(observer.eps), path=path)
      *got, codes, nan = kernels.fake_quant_observe_int8(x, *state, operand=operand, **args)
      out[path] = (got, kernels.fake_quant_observe(x, *state, **args), codes, nan)
    return out

  for shape in shapes:
    state = observer.init(shape)
    for step, x in enumerate(_batches(rng, shape)):
      for path, (got, want, codes, nan) in run(state, x).items():
        where = f"{operand} {spec} {shape} batch {step} on {path}"
        jax.tree.map(lambda a, b, where=where: np.testing.assert_array_equal(
            np.asarray(a), np.asarray(b), err_msg=where), got, list(want))
        y, _, new_state, scale, zero_point = want
        assert bool(nan) == bool(jnp.isnan(y).any()), where
        jax.tree.map(lambda a, b, where=where: np.testing.assert_array_equal(
            np.asarray(a), np.asarray(b), err_msg=where),
            codes, _second_pass(operand, spec, y, scale, zero_point))
      state = type(state)(*new_state)


def test_emitted_integers_refuse_grids_the_int8_forward_does_not_take():
  state = (jnp.float32(0.0), jnp.float32(1.0), jnp.int32(1), jnp.int32(0))
  args = dict(averaging=None, eps=1e-7, path=PATHS[0])
  with pytest.raises(ValueError, match="operand must be 'x' or 'w'; got 'y'"):
    kernels.fake_quant_observe_int8(jnp.ones((2, 3)), *state, spec=X_GRIDS[0], operand="y",
                                    **args)
  with pytest.raises(ValueError, match="operand 'x' needs an 8-bit per-tensor grid"):
    kernels.fake_quant_observe_int8(jnp.ones((2, 3)), *state,
                                    spec=QuantSpec(bits=4, signed=False), operand="x", **args)
  with pytest.raises(ValueError, match="operand 'w' needs a \\(K, N\\) weight"):
    kernels.fake_quant_observe_int8(jnp.ones((2, 3, 4)), *state, spec=W_GRIDS[1], operand="w",
                                    **args)
  with pytest.raises(ValueError, match="operand 'w' needs a \\(K, N\\) weight"):
    kernels.fake_quant_observe_int8(jnp.ones((2, 3)), *state, spec=X_GRIDS[0], operand="w",
                                    **args)


def test_int8_operand_grid_names_the_grids_the_points_emit():
  # The test grids are the ones the points emit for; the refused ones above are not.
  for spec in X_GRIDS:
    assert kernels.int8_operand_grid(spec, "x", 2), spec
  for spec in W_GRIDS:
    assert kernels.int8_operand_grid(spec, "w", 2), spec
  assert not kernels.int8_operand_grid(QuantSpec(bits=4, signed=False), "x", 2)
  assert not kernels.int8_operand_grid(W_GRIDS[1], "w", 3)
  assert not kernels.int8_operand_grid(X_GRIDS[0], "w", 2)
  per_row = QuantSpec(bits=8, signed=True, symmetric=True, axis=0)
  assert not kernels.int8_operand_grid(per_row, "w", 2)
  with pytest.raises(ValueError, match="operand must be 'x' or 'w'; got 'y'"):
    kernels.int8_operand_grid(X_GRIDS[0], "y", 2)
