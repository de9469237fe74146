"""qjax.nn's joins and pooling (QuantAdd, QuantConcat, AvgPool) in every mode, convert's
refusals around them, and properties of their typed ops (Int8Add, IntegerAdd, Int8Concat,
Int8AvgPool) on unsigned 8-bit, signed 8-bit and unsigned 4-bit grids, built through their
forms' `lower`."""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

import qjax
import qjax.nn as qnn
from qjax.integer import arith, forms

from support import reference as ref

QCONFIG = qnn.default_qconfig  # activations on [0, 127] (uint8, reduce_range), MinMax
U8 = qjax.QuantSpec(bits=8, signed=False)
S8 = qjax.QuantSpec(bits=8, signed=True)
U4 = qjax.QuantSpec(bits=4, signed=False)
SPECS = (U8, S8, U4)


# ------------------------------------------------------------------------------------------
# Helpers.


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal float32 values, drawn in NumPy and put on the device (jax.random.normal
  compiles its threefry program anew for every shape)."""
  return jax.device_put(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _stats(variables) -> dict:
  return dict(variables.get(qnn.STATS, {}))


def _calibrated(module, *args):
  """The module's variables after one calibration batch, and that step's output."""
  variables = module.init(jax.random.key(0), *args, mode="float")
  y, updates = module.apply(variables, *args, mode="calibrate", mutable=[qnn.STATS])
  return {**variables, **updates}, y


def _assert_on_grid(y, qparams, spec):
  """Every value is S (k - Z) for an integer k in [qmin, qmax]."""
  scale = float(qparams["scale"])
  zero = int(qparams["zero_point"])
  k = np.asarray(y, np.float64) / scale + zero
  np.testing.assert_allclose(k, np.rint(k), atol=1e-3)
  assert spec.qmin <= np.rint(k).min() and np.rint(k).max() <= spec.qmax


def _output_qparams(module, variables, *args):
  return qnn.collect_qparams(module, variables, *args, mode="qat")["output"]


# ------------------------------------------------------------------------------------------
# The modules in each mode.


class ModesTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(False, True)
  def test_add_float_is_the_plain_sum(self, relu):
    a = _normal(1, (3, 5))
    b = _normal(2, (3, 5))
    add = qnn.QuantAdd(qconfig=QCONFIG, relu=relu)
    variables = add.init(jax.random.key(0), a, b, mode="float")
    got = self.variant(lambda v, a, b: add.apply(v, a, b, mode="float"))(variables, a, b)
    want = np.asarray(a) + np.asarray(b)
    np.testing.assert_array_equal(got, np.maximum(want, 0) if relu else want)
    # the float forward reads params alone: it needs no statistics
    np.testing.assert_array_equal(add.apply({}, a, b, mode="float"), got)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 1, -1)
  def test_concat_float_is_the_plain_concatenation(self, axis):
    xs = [_normal(i, (2, 3, 4)) for i in range(3)]
    cat = qnn.QuantConcat(qconfig=QCONFIG, axis=axis)
    variables = cat.init(jax.random.key(0), xs, mode="float")
    got = self.variant(lambda v, xs: cat.apply(v, xs, mode="float"))(variables, xs)
    np.testing.assert_array_equal(got, np.concatenate([np.asarray(x) for x in xs], axis=axis))
    # a tuple works as well as a list
    np.testing.assert_array_equal(cat.apply(variables, tuple(xs), mode="float"), got)

  def test_add_calibrate_observes_the_output(self):
    a = jnp.array([[1.0, -2.0, 0.25]])
    b = jnp.array([[0.5, 0.5, -1.0]])
    add = qnn.QuantAdd(qconfig=QCONFIG, relu=True)
    variables = add.init(jax.random.key(0), a, b, mode="float")
    assert int(variables[qnn.STATS]["output"]["count"]) == 0  # init observes nothing
    for step in (1, 2):
      y, updates = add.apply(variables, a, b, mode="calibrate", mutable=[qnn.STATS])
      variables = {**variables, **updates}
      np.testing.assert_array_equal(y, [[1.5, 0.0, 0.0]])  # values pass through
      stats = variables[qnn.STATS]["output"]
      assert int(stats["count"]) == step
      assert float(stats["min_val"]) == 0.0 and float(stats["max_val"]) == 1.5  # after ReLU
    with pytest.raises(ValueError, match=r"mutable=\['quant_stats'\]"):
      add.apply(variables, a, b, mode="calibrate")

  def test_concat_calibrate_observes_the_joined_output(self):
    xs = [jnp.array([[-3.0, 1.0]]), jnp.array([[2.0]])]
    cat = qnn.QuantConcat(qconfig=QCONFIG)
    variables, y = _calibrated(cat, xs)
    np.testing.assert_array_equal(y, [[-3.0, 1.0, 2.0]])
    stats = variables[qnn.STATS]["output"]
    assert int(stats["count"]) == 1
    assert float(stats["min_val"]) == -3.0 and float(stats["max_val"]) == 2.0
    with pytest.raises(ValueError, match="immutable"):
      cat.apply(variables, xs, mode="calibrate")

  @parameterized.parameters(False, True)
  def test_add_qat_lies_on_the_grid_with_straight_through_gradients(self, relu):
    a = _normal(5, (4, 6))
    b = _normal(6, (4, 6))
    add = qnn.QuantAdd(qconfig=QCONFIG, relu=relu)
    variables, _ = _calibrated(add, a, b)
    # one element far outside the calibrated range: clamped, so no gradient there
    a = a.at[0, 0].set(50.0)
    y = add.apply(variables, a, b, mode="qat")  # statistics frozen: not mutable
    qparams = _output_qparams(add, variables, a, b)
    _assert_on_grid(y, qparams, QCONFIG.activation.spec)
    error = np.abs(np.asarray(y) - np.asarray(nn.relu(a + b) if relu else a + b))
    error[0, 0] = 0.0
    assert error.max() <= 0.5001 * float(qparams["scale"])  # rounded, not clamped

    def loss(a, b):
      return jnp.sum(add.apply(variables, a, b, mode="qat"))

    grad_a, grad_b = jax.grad(loss, argnums=(0, 1))(a, b)
    total = np.asarray(a + b)
    want = (total > 0).astype(np.float32) if relu else np.ones_like(total)
    want[0, 0] = 0.0  # clamped at the top of the grid
    for grad in (grad_a, grad_b):
      assert np.isfinite(np.asarray(grad)).all()
      np.testing.assert_array_equal(grad, want)

  def test_concat_qat_lies_on_the_grid_with_straight_through_gradients(self):
    xs = [_normal(7, (3, 2)), _normal(8, (3, 4))]
    cat = qnn.QuantConcat(qconfig=QCONFIG, axis=1)
    variables, _ = _calibrated(cat, xs)
    y = cat.apply(variables, xs, mode="qat")
    assert y.shape == (3, 6)
    _assert_on_grid(y, _output_qparams(cat, variables, xs), QCONFIG.activation.spec)
    grads = jax.grad(lambda xs: jnp.sum(cat.apply(variables, xs, mode="qat")))(xs)
    for grad, x in zip(grads, xs, strict=True):  # calibrated on these very values: nothing clamped
      assert np.isfinite(np.asarray(grad)).all()
      np.testing.assert_array_equal(grad, np.ones(x.shape, np.float32))

  def test_qconfig_none_is_a_float_join_with_no_statistics(self):
    a = _normal(9, (2, 3))
    b = _normal(10, (2, 3))
    add = qnn.QuantAdd(qconfig=None, relu=True)
    cat = qnn.QuantConcat(qconfig=None, axis=0)
    assert add.init(jax.random.key(0), a, b, mode="calibrate") == {}
    assert cat.init(jax.random.key(0), [a, b], mode="calibrate") == {}
    for mode in ("float", "calibrate", "qat"):
      y, updates = add.apply({}, a, b, mode=mode, mutable=[qnn.STATS])
      np.testing.assert_array_equal(y, nn.relu(a + b))
      assert not _stats(updates)
      y, updates = cat.apply({}, [a, b], mode=mode, mutable=[qnn.STATS])
      np.testing.assert_array_equal(y, jnp.concatenate([a, b], axis=0))
      assert not _stats(updates)

  def test_qconfig_map_turns_one_named_join_off(self):
    qmap = qnn.QConfigMap(default=QCONFIG, overrides=(("^add2$", None), ("^cat_off$", None)))

    class Joins(nn.Module):
      @nn.compact
      def __call__(self, a, b, mode="float"):
        s = qnn.QuantAdd(qconfig=qmap, name="add1")(a, b, mode=mode)
        t = qnn.QuantAdd(qconfig=qmap, name="add2")(a, b, mode=mode)
        u = qnn.QuantConcat(qconfig=qmap, name="cat_on")([s, t], mode=mode)
        w = qnn.QuantConcat(qconfig=qmap, name="cat_off")([s, t], mode=mode)
        return s, t, u, w

    a = _normal(11, (2, 3))
    b = _normal(12, (2, 3))
    model = Joins()
    qnn.check_qconfig_map(model, None, a, b, mode="float")  # both patterns decide a join
    variables, _ = _calibrated(model, a, b)
    assert set(variables[qnn.STATS]) == {"add1", "cat_on"}
    s, t, u, w = model.apply(variables, a, b, mode="qat")
    np.testing.assert_array_equal(t, a + b)  # add2 in float: exact
    assert not np.array_equal(s, a + b)  # add1 fake-quantized
    np.testing.assert_array_equal(w, jnp.concatenate([s, t], axis=-1))  # cat_off: a plain copy
    assert not np.array_equal(u, w)

  def test_concat_refuses_a_single_array_naming_the_module(self):
    x = jnp.ones((2, 3))

    class Bad(nn.Module):
      @nn.compact
      def __call__(self, x, mode="float"):
        return qnn.QuantConcat(qconfig=QCONFIG, name="join")(x, mode=mode)

    for bad in (x, np.ones((2, 3), np.float32), []):
      with pytest.raises(TypeError, match="join: QuantConcat takes a non-empty sequence"):
        Bad().init(jax.random.key(0), bad)

  def test_add_of_shapes_that_do_not_broadcast_names_the_module(self):
    class Bad(nn.Module):
      @nn.compact
      def __call__(self, a, b, mode="float"):
        return qnn.QuantAdd(qconfig=QCONFIG, name="join")(a, b, mode=mode)

    with pytest.raises(ValueError, match=r"join: a \(2, 3\) and b \(2, 4\) do not broadcast"):
      Bad().init(jax.random.key(0), jnp.ones((2, 3)), jnp.ones((2, 4)))

  def test_avg_pool_refuses_a_bad_padding_string_naming_the_module(self):
    class Bad(nn.Module):
      @nn.compact
      def __call__(self, x, mode="float"):
        return qnn.AvgPool(window_shape=(2, 2), padding="FULL", name="pool")(x, mode=mode)

    with pytest.raises(ValueError, match="pool: padding must be 'SAME', 'VALID'"):
      Bad().init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))

  def test_int8_mode_before_convert_says_to_convert_first(self):
    a = jnp.ones((2, 3), jnp.float32)
    q8 = jnp.zeros((1, 4, 4, 2), jnp.int8)
    add = qnn.QuantAdd(qconfig=QCONFIG)
    cat = qnn.QuantConcat(qconfig=QCONFIG)
    calls = [
        lambda: add.apply(add.init(jax.random.key(0), a, a, mode="float"), a, a, mode="int8"),
        lambda: cat.apply(cat.init(jax.random.key(0), [a, a], mode="float"), [a, a],
                          mode="int8"),
        lambda: qnn.AvgPool(window_shape=(2, 2)).apply({}, q8, mode="int8"),
        lambda: qnn.AvgPool().apply({}, q8, mode="int8"),
    ]
    for call in calls:
      with pytest.raises(ValueError, match=r"Convert the calibrated model first"):
        call()


def _check_avg_pool_is_flax_avg_pool(variant, window, strides, padding, include):
  x = _normal(3, (2, 7, 6, 3))
  pool = qnn.AvgPool(window_shape=window, strides=strides, padding=padding,
                     count_include_pad=include)
  pads = padding.upper() if isinstance(padding, str) else padding
  with jax.numpy_dtype_promotion("standard"):  # flax divides by an int32 window size
    want = nn.avg_pool(x, window, strides or window, pads, count_include_pad=include)
  assert pool.init(jax.random.key(0), x, mode="calibrate") == {}  # keeps its input's grid
  for mode in ("float", "calibrate", "qat"):
    got, updates = variant(lambda x, mode=mode: pool.apply({}, x, mode=mode,
                                                           mutable=[qnn.STATS]))(x)
    np.testing.assert_array_equal(got, want)
    assert not _stats(updates)


def _split(cases, default):
  """pytest params of `cases`: those in `default` run by default, the rest of the full grid
  with -m slow."""
  return [case if case in default else pytest.param(*case, marks=pytest.mark.slow)
          for case in cases]


AVG_POOLS = [((3, 3), (2, 2), "same"), ((2, 3), (1, 2), ((1, 0), (0, 2))),
             ((2, 2), None, "VALID")]


# Default run: every case op by op, all but the last jitted too (the full grid with -m slow).
@pytest.mark.parametrize("window, strides, padding, jit", _split(
    [(*case, jit) for case in AVG_POOLS for jit in (False, True)],
    [(*case, False) for case in AVG_POOLS] + [(*case, True) for case in AVG_POOLS[:2]]))
def test_avg_pool_float_is_flax_avg_pool(window, strides, padding, jit):
  _check_avg_pool_is_flax_avg_pool(jax.jit if jit else (lambda f: f), window, strides,
                                   padding, include=False)


GLOBAL_POOL_SHAPES = [(2, 4, 4, 3), (1, 5, 2), (3, 2, 3, 4, 2)]


# Default run: every shape op by op, all but the last jitted too (the full grid with -m slow).
@pytest.mark.parametrize("shape, jit", _split(
    [(shape, jit) for shape in GLOBAL_POOL_SHAPES for jit in (False, True)],
    [(shape, False) for shape in GLOBAL_POOL_SHAPES]
    + [(shape, True) for shape in GLOBAL_POOL_SHAPES[:2]]))
def test_global_avg_pool_is_the_spatial_mean(shape, jit):
  x = _normal(4, shape)
  got = (jax.jit if jit else (lambda f: f))(lambda x: qnn.AvgPool().apply({}, x, mode="float"))(x)
  np.testing.assert_array_equal(got, jnp.mean(x, axis=tuple(range(1, len(shape) - 1))))
  assert got.shape == (shape[0], shape[-1])


@pytest.mark.parametrize("window, strides, padding", [
    ((2, 2), None, "VALID"),
    ((3, 3), (2, 2), "SAME"),
])
@pytest.mark.parametrize("jit", [False, True])
def test_avg_pool_counting_padding_is_flax_avg_pool(window, strides, padding, jit):
  _check_avg_pool_is_flax_avg_pool(jax.jit if jit else (lambda f: f), window, strides,
                                   padding, include=True)


# ------------------------------------------------------------------------------------------
# convert's refusals, each naming the module.


class _FloatOperand(nn.Module):
  @nn.compact
  def __call__(self, x, mode="float"):
    a = qnn.Quantize(QCONFIG, name="quant")(x, mode=mode)
    y = qnn.QuantAdd(qconfig=QCONFIG, name="skip_add")(a, x, mode=mode)
    return qnn.Dequantize()(y, mode=mode)


class _FloatAddOfInt8(nn.Module):
  @nn.compact
  def __call__(self, x, mode="float"):
    a = qnn.Quantize(QCONFIG, name="quant")(x, mode=mode)
    b = qnn.QuantDense(3, qconfig=QCONFIG, name="fc")(a, mode=mode)
    y = qnn.QuantAdd(qconfig=None, name="float_add")(a, b, mode=mode)
    return qnn.Dequantize()(y, mode=mode)


class _SharedAdd(nn.Module):
  @nn.compact
  def __call__(self, x, mode="float"):
    a = qnn.Quantize(QCONFIG, name="quant")(x, mode=mode)
    b = qnn.QuantDense(3, qconfig=QCONFIG, name="fc1")(a, mode=mode)
    c = qnn.QuantDense(3, qconfig=QCONFIG, name="fc2")(a, mode=mode)
    add = qnn.QuantAdd(qconfig=QCONFIG, name="shared_add")
    return (qnn.Dequantize()(add(a, b, mode=mode), mode=mode),
            qnn.Dequantize()(add(b, c, mode=mode), mode=mode))


class _SharedConcat(nn.Module):
  @nn.compact
  def __call__(self, x, mode="float"):
    a = qnn.Quantize(QCONFIG, name="quant")(x, mode=mode)
    b = qnn.QuantDense(3, qconfig=QCONFIG, name="fc")(a, mode=mode)
    cat = qnn.QuantConcat(qconfig=QCONFIG, name="shared_cat")
    return (qnn.Dequantize()(cat([a, b], mode=mode), mode=mode),
            qnn.Dequantize()(cat([b, a], mode=mode), mode=mode))


@functools.cache
def _calibrated_join(model_class):
  """(model, x, calibrated variables), once per model."""
  x = _normal(0, (4, 3))
  m = model_class()
  # one program for the initialisers, on XLA's own random bits (threefry compiles slowly)
  variables = jax.jit(m.init)(jax.random.key(1, impl="unsafe_rbg"), x)
  return m, x, qnn.calibrate(m, variables, [x])


@pytest.mark.parametrize("model, message", [
    (_FloatOperand, r"operand 1 of skip_add is not produced by a quantization point"),
    (_FloatAddOfInt8, r"float_add is left in float but takes the int8 output of quant"),
    (_FloatAddOfInt8, r"float_add is left in float but takes the int8 output of fc;"),
    (_SharedAdd, r"shared_add is called on the outputs of quant and of fc1, two different "
                 r"input grids"),
    (_SharedAdd, r"shared_add is called on the outputs of fc1 and of fc2"),
    (_SharedConcat, r"shared_cat is called on the outputs of quant and of fc, two different "
                    r"input grids"),
], ids=["float-operand", "float-add-int8-a", "float-add-int8-b", "shared-add-0",
        "shared-add-1", "shared-concat"])
def test_convert_refuses_joins_it_cannot_run(model, message):
  m, x, variables = _calibrated_join(model)
  with pytest.raises(ValueError, match="convert: the model cannot run in mode 'int8'") as err:
    qjax.convert(m, variables, x)
  assert re.search(message, str(err.value)), str(err.value)  # one error lists every problem


# ------------------------------------------------------------------------------------------
# Properties of the typed ops against the references, on three kinds of grid.
#
# Values on a grid's own range ("own": quint8 [0, 255], qint8 [-128, 127], 4-bit [0, 15])
# are carried as int8 moved down by arith.int8_shift(spec) (128 for quint8, else 0). The
# torch references return uint8 values: `_quantize_reference` says how signed grids use them.


@st.composite
def grids(draw):
  """A forms.Grid: spec from SPECS, scale 1e-3..10 (log-uniform), zero point in range."""
  spec = draw(st.sampled_from(SPECS))
  scale = np.float32(10.0 ** draw(st.floats(-3.0, 1.0)))
  zero_own = draw(st.integers(spec.qmin, spec.qmax))
  return forms.Grid(spec, scale, np.int32(zero_own - arith.int8_shift(spec)))


# a few small shapes: each new shape costs the eager ops a compilation
shapes = st.sampled_from([(1,), (7,), (2, 3), (2, 1, 4)])
seeds = st.integers(0, 2**32 - 1)


def _own_zero(grid) -> int:
  return int(grid.zero_point) + grid.shift


def _values(rng, grid, shape) -> np.ndarray:
  """int8 carrier values anywhere on the grid (its clamp range)."""
  lo, hi = grid.bounds
  return rng.integers(lo, hi + 1, shape).astype(np.int8)


def _lowered(form, inputs, output, requant):
  return form.lower(forms.Lowering(path="op", inputs=tuple(inputs), output=output,
                                   requant=qjax.integer.Requant(requant), variables={}))


@jax.jit
def _jitted(op, *xs):
  """op(*xs) in one program: op's arrays are arguments, so one compilation serves every
  grid of a kind (its static fields and the shapes)."""
  return op(*xs)


# The properties run each op jitted by default (one compilation per kind of grid and shape)
# and op by op with -m slow (one compilation per primitive and shape).
JIT = pytest.mark.parametrize("jit", [True, pytest.param(False, marks=pytest.mark.slow)])


def _run(op, *xs, jit=True) -> np.ndarray:
  # device_put, not jnp.asarray (which compiles a copy program for every shape and dtype)
  out = (_jitted if jit else (lambda op, *xs: op(*xs)))(op, *(jax.device_put(x) for x in xs))
  assert out.dtype == jnp.int8
  return np.asarray(out, np.int64)


def _quantize_reference(x, gy, form) -> np.ndarray:
  """ref.torch_quantize of float32 x onto gy ("round_add" or "fused"), as carrier values. A
  signed grid is lifted by 128 into torch's [0, 255] for "round_add" (rne(x inv) + Z: Z and
  the bounds move together, the rounding does not); "fused" rounds x inv + Z once, so a
  signed grid takes the same fma (`ref.fma_f32`) on its own zero point."""
  lo, hi = gy.bounds
  zero, inv = _own_zero(gy), gy.reciprocal()
  if not gy.spec.signed:
    q = ref.torch_quantize(x, inv, zero, form, lo + gy.shift, hi + gy.shift)
    return q.astype(np.int64) - gy.shift
  if form == "round_add":
    q = ref.torch_quantize(x, inv, zero + 128, form, lo + 128, hi + 128)
    return q.astype(np.int64) - 128
  return np.clip(np.rint(ref.fma_f32(x, inv, np.float32(zero))), lo, hi).astype(np.int64)


def _dequantize_reference(q8, grid, form) -> np.ndarray:
  """ref.torch_dequantize of carrier values q8 on their grid's own range."""
  return ref.torch_dequantize(np.asarray(q8, np.int64) + grid.shift, grid.scale,
                              _own_zero(grid), form)


def _add_reference(qa, ga, qb, gb, gy, relu) -> np.ndarray:
  """PyTorch's vector-kernel add on any grids, as carrier values: fma dequantization of each
  input on its own range, a float32 sum, "round_add" quantization to the output grid."""
  total = _dequantize_reference(qa, ga, "fma") + _dequantize_reference(qb, gb, "fma")
  if relu:
    total = np.maximum(total, np.float32(0))
  return _quantize_reference(total, gy, "round_add")


def _concat_reference(parts, inputs, gy, channels_last, requant) -> np.ndarray:
  """Each part moved to gy as the module docstring of forms.concat says (copied when on
  gy): PyTorch's NHWC kernel (fma, "round_add") or dequantize-cat-quantize ("product",
  "fused"), or the fixed-point rescale of requant "integer"."""
  moved = []
  for p, g in zip(parts, inputs, strict=True):
    if requant == "integer":
      if g.same_as(gy):
        moved.append(p.astype(np.int64))
        continue
      m0, shift = ref.fixed_point_multiplier(np.float64(g.scale) / np.float64(gy.scale))
      r = ref.mul_shift_round(p.astype(np.int64) - int(g.zero_point), m0, shift)
      moved.append(ref.clamp_output(r, int(gy.zero_point), *gy.bounds, False).astype(np.int64))
    elif channels_last:
      moved.append(p.astype(np.int64) if g.same_as(gy) else _quantize_reference(
          _dequantize_reference(p, g, "fma"), gy, "round_add"))
    else:
      moved.append(_quantize_reference(_dequantize_reference(p, g, "product"), gy, "fused"))
  return np.concatenate(moved, axis=-1)


def _assert_within(q, grid, relu=False):
  lo, hi = grid.bounds
  low = max(lo, int(grid.zero_point)) if relu else lo
  assert low <= q.min() and q.max() <= hi, (q.min(), q.max(), low, hi)


@JIT
@settings(max_examples=40, deadline=None)
@given(ga=grids(), gb=grids(), gy=grids(), relu=st.booleans(), shape=shapes, seed=seeds)
def test_int8_add_is_torchs_vector_kernel_on_every_grid(jit, ga, gb, gy, relu, shape, seed):
  rng = np.random.default_rng(seed)
  qa, qb = _values(rng, ga, shape), _values(rng, gb, shape)
  op = _lowered(forms.AddForm(relu=relu), (ga, gb), gy, "fbgemm")
  assert isinstance(op, forms.Int8Add)
  got = _run(op, qa, qb, jit=jit)
  np.testing.assert_array_equal(got, _add_reference(qa, ga, qb, gb, gy, relu))
  _assert_within(got, gy, relu)
  if all(g.spec == U8 for g in (ga, gb, gy)):  # torch's own quint8 add, values as uint8
    want = ref.quantized_add(qa.astype(np.int64) + 128, ga.scale, _own_zero(ga),
                             qb.astype(np.int64) + 128, gb.scale, _own_zero(gb), gy.scale,
                             _own_zero(gy), relu=relu)
    np.testing.assert_array_equal(got + 128, want)
  elif gy.spec == U4:  # a narrower output: torch's formula clamped to [0, 15]
    want = ref.quantized_add(qa.astype(np.int64) + ga.shift, ga.scale, _own_zero(ga),
                             qb.astype(np.int64) + gb.shift, gb.scale, _own_zero(gb),
                             gy.scale, _own_zero(gy), relu=relu, qmin=0, qmax=15)
    np.testing.assert_array_equal(got, want)


@JIT
@settings(max_examples=40, deadline=None)
@given(ga=grids(), gb=grids(), gy=grids(), relu=st.booleans(), shape=shapes, seed=seeds)
def test_integer_add_is_the_fixed_point_reference_within_one_step(jit, ga, gb, gy, relu,
                                                                   shape, seed):
  rng = np.random.default_rng(seed)
  qa, qb = _values(rng, ga, shape), _values(rng, gb, shape)
  op = _lowered(forms.AddForm(relu=relu), (ga, gb), gy, "integer")
  assert isinstance(op, forms.IntegerAdd)
  got = _run(op, qa, qb, jit=jit)
  lo, hi = gy.bounds
  # integer_add works on differences and Z + integer: carrier values in, carrier values out
  want = ref.integer_add(qa, ga.scale, int(ga.zero_point), qb, gb.scale, int(gb.zero_point),
                         gy.scale, int(gy.zero_point), relu=relu, qmin=lo, qmax=hi)
  np.testing.assert_array_equal(got, np.asarray(want, np.int64))
  _assert_within(got, gy, relu)
  real = (np.float64(ga.scale) * (qa.astype(np.float64) - int(ga.zero_point))
          + np.float64(gb.scale) * (qb.astype(np.float64) - int(gb.zero_point)))
  if relu:
    real = np.maximum(real, 0.0)
  ideal = np.clip(np.rint(real / np.float64(gy.scale)) + int(gy.zero_point), lo, hi)
  assert np.abs(got - ideal).max() <= 1


@JIT
@settings(max_examples=30, deadline=None)
@given(ga=grids(), gb=grids(), gy=grids(), relu=st.booleans(),
       requant=st.sampled_from(["fbgemm", "integer"]), shape=shapes, seed=seeds)
def test_add_commutes_with_its_grids(jit, ga, gb, gy, relu, requant, shape, seed):
  rng = np.random.default_rng(seed)
  qa, qb = _values(rng, ga, shape), _values(rng, gb, shape)
  form = forms.AddForm(relu=relu)
  ab = _run(_lowered(form, (ga, gb), gy, requant), qa, qb, jit=jit)
  ba = _run(_lowered(form, (gb, ga), gy, requant), qb, qa, jit=jit)
  np.testing.assert_array_equal(ab, ba)


@JIT
@settings(max_examples=30, deadline=None)
@given(gy=grids(), gb=grids(), relu=st.booleans(),
       requant=st.sampled_from(["fbgemm", "integer"]), shape=shapes, seed=seeds)
def test_adding_the_zero_tensor_returns_the_input(jit, gy, gb, relu, requant, shape, seed):
  rng = np.random.default_rng(seed)
  qa = _values(rng, gy, shape)  # on the output's own grid
  zero = np.full(shape, int(gb.zero_point), np.int8)  # real 0 on any grid
  op = _lowered(forms.AddForm(relu=relu), (gy, gb), gy, requant)
  want = np.maximum(qa, int(gy.zero_point)) if relu else qa
  np.testing.assert_array_equal(_run(op, qa, zero, jit=jit), want)
  np.testing.assert_array_equal(_run(_lowered(forms.AddForm(relu=relu), (gb, gy), gy, requant),
                                     zero, qa, jit=jit), want)


@JIT
@settings(max_examples=25, deadline=None)
@given(gy=grids(), others=st.lists(grids(), min_size=1, max_size=2),
       where=st.integers(0, 2), channels_last=st.booleans(),
       requant=st.sampled_from(["fbgemm", "integer"]), seed=seeds)
def test_int8_concat_copies_inputs_on_its_grid_and_moves_the_others(jit, gy, others,
                                                                    where, channels_last,
                                                                    requant, seed):
  rng = np.random.default_rng(seed)
  inputs = list(others)
  where = min(where, len(inputs))
  inputs.insert(where, gy)  # this one is already on the output grid
  lead = (2, 3, 2) if channels_last else (5,)
  widths = np.full(len(inputs), 3)
  parts = [_values(rng, g, lead + (int(w),)) for g, w in zip(inputs, widths, strict=True)]
  op = _lowered(forms.ConcatForm(axis=-1), inputs, gy, requant)
  assert op.copied[where]
  got = _run(op, *parts, jit=jit)
  start = int(widths[:where].sum())
  np.testing.assert_array_equal(got[..., start:start + int(widths[where])], parts[where])
  _assert_within(got, gy)
  np.testing.assert_array_equal(got, _concat_reference(parts, inputs, gy, channels_last,
                                                       requant))


# Pooling windows whose divisor counts real positions only (VALID, or count_include_pad off)
# and whose padding is at most half the window (as PyTorch requires), and global pooling.
POOLS = (
    forms.PoolForm(window=None, strides=(), padding="VALID", count_include_pad=True),
    forms.PoolForm(window=(2, 2), strides=(2, 2), padding="VALID", count_include_pad=True),
    forms.PoolForm(window=(3, 2), strides=(1, 2), padding="VALID", count_include_pad=True),
    forms.PoolForm(window=(3, 3), strides=(2, 2), padding="SAME", count_include_pad=False),
    forms.PoolForm(window=(2, 3), strides=(1, 1), padding=((1, 0), (1, 1)),
                   count_include_pad=False),
)


@JIT
@settings(max_examples=25, deadline=None)
@given(grid=grids(), form=st.sampled_from(POOLS), requant=st.sampled_from(["fbgemm", "integer"]),
       shape=st.sampled_from([(2, 5, 4, 3), (1, 3, 6, 1)]), value=st.integers(-128, 127),
       seed=seeds)
def test_int8_avg_pool_of_a_constant_is_that_constant(jit, grid, form, requant, shape,
                                                      value, seed):
  lo, hi = grid.bounds
  value = min(max(value, lo), hi)
  op = _lowered(form, (grid,), None, requant)
  assert isinstance(op, forms.Int8AvgPool)
  got = _run(op, np.full(shape, value, np.int8), jit=jit)
  assert got.size and (got == value).all(), (value, np.unique(got))
  # and any tensor pools into the range of its values (a mean), so into the grid's bounds
  x = _values(np.random.default_rng(seed), grid, shape)
  pooled = _run(op, x, jit=jit)
  _assert_within(pooled, grid)
  assert x.min() <= pooled.min() and pooled.max() <= x.max()


def test_pools_refuse_negative_pads_and_empty_windows():
  x = jnp.ones((1, 4, 4, 1))
  pool = qnn.AvgPool(window_shape=(2, 2), padding=((-1, 0), (0, 0)))
  with pytest.raises(ValueError, match=r"AvgPool: padding must be 2 \(low, high\) pairs of "
                                       r"ints >= 0"):
    pool.init(jax.random.key(0), x, mode="float")
  for window, strides, padding, message in (
      ((0, 2), None, "VALID", r"max_pool: window_shape must be a positive int or 2"),
      ((2, 2), (1, 0), "VALID", r"max_pool: strides must be a positive int or 2"),
      ((2, 2), None, "FULL", r"max_pool: padding must be 'SAME', 'VALID'")):
    for operand in (x, x.astype(jnp.int8)):
      with pytest.raises(ValueError, match=message):
        qnn.max_pool(operand, window, strides, padding)
  assert qnn.max_pool(x, (np.int64(2), 2), strides=(2, 2)).shape == (1, 2, 2, 1)


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_float_max_pool_keeps_nan_as_torch(padding):
  # A LeNet-sized activation: large enough for XLA:CPU to pool in a kernel that drops NaN.
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(16, 24, 24, 6)).astype(np.float32)
  x[3, 5, 7, 2] = np.nan
  x[0, 0, 0, 0] = np.inf
  want = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 2, 2)
  want = want.permute(0, 2, 3, 1).numpy()
  for pool in (jax.jit(lambda x: qnn.max_pool(x, (2, 2), (2, 2), padding)),
               lambda x: qnn.max_pool(x, (2, 2), (2, 2), padding)):
    got = np.asarray(pool(x))
    np.testing.assert_array_equal(got, want)  # 24 is even: SAME adds no padding
    assert np.isnan(got[3, 2, 3, 2]) and np.isnan(got).sum() == 1
  # the gradient still reaches each window's maximum
  g = jax.grad(lambda x: jnp.sum(qnn.max_pool(x, (2, 2), (2, 2))))(jnp.asarray(x[:1, :4, :4]))
  assert float(jnp.sum(g)) == 2 * 2 * 6  # one per window


def test_avg_pool_refuses_padding_only_windows():
  pool = qnn.AvgPool(window_shape=(2, 2), padding=((2, 0), (0, 1)), count_include_pad=False)
  with pytest.raises(ValueError, match=r"windows of the \(2, 2\) window that hold padding only"):
    pool.init(jax.random.key(0), jnp.ones((1, 4, 4, 1)), mode="float")


class _BroadcastAdd(nn.Module):
  """A per-sample gate added to every feature: (B, 8) + (B, 1), as a squeeze-excite block."""

  @nn.compact
  def __call__(self, x, mode="float"):
    x = qnn.Quantize(qconfig=QCONFIG)(x, mode=mode)
    h = qnn.QuantDense(8, qconfig=QCONFIG, name="features")(x, mode=mode)
    g = qnn.QuantDense(1, qconfig=QCONFIG, name="gate")(x, mode=mode)
    return qnn.Dequantize()(qnn.QuantAdd(qconfig=QCONFIG, name="add")(h, g, mode=mode),
                            mode=mode)


def test_a_broadcast_add_converts_and_runs_in_int8():
  model = _BroadcastAdd()
  x = np.random.default_rng(8).normal(size=(16, 5)).astype(np.float32)
  # XLA's own random bits: threefry's initialisers take XLA:CPU longer to compile
  variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="unsafe_rbg"), x,
                                           mode="calibrate"))(x)
  _, stats = jax.jit(lambda v, x: model.apply(v, x, mode="calibrate",
                                               mutable=["quant_stats"]))(variables, x)
  int_vars = qjax.convert(model, {**variables, **stats}, x)
  op = int_vars[forms.COLLECTION]["add"]["op"]
  assert isinstance(op, forms.Int8Add)
  y8, y_qat = jax.jit(lambda iv, v, x: (model.apply(iv, x, mode="int8"),
                                        model.apply(v, x, mode="qat", mutable=True)[0]))(
                                            int_vars, {**variables, **stats}, x)
  assert y8.shape == (16, 8)
  step = float(op.inv_scale) ** -1
  # The add's inputs may already differ by a step of their grids (the Dense layers'
  # requantization against the fake-quant forward), the add's own rounding by one more.
  assert float(jnp.abs(y8 - y_qat).max()) <= 2 * step
