"""The integer forms' ops against NumPy integer code, with and without jit; their lowering
from a calibrated model; and the typed pytrees they are (serving trees, io round trips)."""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qjax
import qjax.nn as qnn
from qjax import io as qio
from qjax.integer import arith, forms, kernels
from qjax.integer.forms.pool import divide_round_half_even

from support import cases
from support import reference as ref

QCONFIG = qnn.get_default_qconfig("x86")
# x86's grids (per-channel weights, reduce_range quint8 activations) from min/max activation
# observers: the residual model's tests are about its lowering, not about how the histogram
# observer picks a range (seconds to compile in calibrate).
RESIDUAL_QCONFIG = dataclasses.replace(QCONFIG, activation=qnn.default_qconfig.activation)


def _int_add_reference(qa, qb, op) -> np.ndarray:
  """The fixed-point add in int64 NumPy."""
  total = np.zeros(np.shape(qa), np.int64)
  for i, q in enumerate((qa, qb)):
    centred = (np.asarray(q, np.int64) - int(op.zero_in[i])) * 2**20
    total += ref.mul_shift_round(centred, int(op.m0[i]), int(op.shift[i]))
  r = ref.mul_shift_round(total, int(op.out_m0), int(op.out_shift))
  return ref.clamp_output(r, int(op.zero_point), op.lo, op.hi, op.relu)


def _pool_integer_reference(q, window, strides, pads, z, count_include_pad) -> np.ndarray:
  """Z + rne(acc / D), ties to even, in int64 NumPy on (B, H, W, C): acc = sum of the real
  positions - Z n; padding counts as real zero."""
  q = np.asarray(q, np.int64) - z
  padded = np.pad(q, [(0, 0), *pads, (0, 0)])
  real = np.pad(np.ones(q.shape[1:3], np.int64), pads)
  out_h = (padded.shape[1] - window[0]) // strides[0] + 1
  out_w = (padded.shape[2] - window[1]) // strides[1] + 1
  out = np.zeros((q.shape[0], out_h, out_w, q.shape[3]), np.int64)
  for i in range(out_h):
    for j in range(out_w):
      rows = slice(i * strides[0], i * strides[0] + window[0])
      cols = slice(j * strides[1], j * strides[1] + window[1])
      acc = padded[:, rows, cols].sum(axis=(1, 2))
      divisor = window[0] * window[1] if count_include_pad else int(real[rows, cols].sum())
      quotient, rest = np.divmod(acc, divisor)
      out[:, i, j] = quotient + ((2 * rest > divisor) | ((2 * rest == divisor)
                                                         & (quotient % 2 == 1))) + z
  return out


def _grid(scale, zero_point, signed=False) -> forms.Grid:
  """A per-tensor 8-bit grid; `zero_point` on the grid's own range (quint8: 0..255)."""
  spec = qjax.QuantSpec(bits=8, signed=signed)
  return forms.Grid(spec, np.float32(scale),
                    np.int32(zero_point - arith.int8_shift(spec)))


def _lowered(form, inputs, output, requant="fbgemm"):
  lowering = forms.Lowering(path="op", inputs=tuple(inputs), output=output,
                            requant=qjax.integer.Requant(requant), variables={})
  return form.lower(lowering)


def _random_grid(rng) -> tuple[float, int]:
  return float(np.float32(10.0 ** rng.uniform(-3, 1))), int(rng.integers(0, 256))


def _int8(q: np.ndarray) -> jax.Array:
  """uint8 values on the int8 carrier (q - 128), converted in NumPy and put on the device
  (jnp.asarray compiles a program per shape and dtype)."""
  return jax.device_put((q.astype(np.int16) - 128).astype(np.int8))


def _variant(variant: str):
  """`jax.jit` for "jit", the function itself (op by op) for "eager"."""
  return jax.jit if variant == "jit" else (lambda f: f)


def _split(cases, default):
  """pytest params of `cases`: those in `default` run by default, the rest of the full grid
  with -m slow."""
  return [case if case in default else pytest.param(*case, marks=pytest.mark.slow)
          for case in cases]


VARIANTS = ("jit", "eager")


def _grid_of(values, eager):
  """Every value jitted, and the values in `eager` op by op too (the others op by op with
  -m slow): each eager case compiles its ops anew, the jitted ones once per program."""
  return _split([(*v, variant) for v in values for variant in VARIANTS],
                [(*v, "jit") for v in values] + [(*v, "eager") for v in eager])


@pytest.mark.parametrize("relu, variant", _grid_of([(False,), (True,)], [(False,)]))
def test_integer_add_equals_int64_reference(relu, variant):
  rng = np.random.default_rng(0)
  run = _variant(variant)(lambda o, a, b: o(a, b))  # one function: under jit, one compilation
  for trial in range(20):
    sa, sb, sy = rng.uniform(1e-3, 1.0, 3).astype(np.float32)
    za, zb, zy = (int(v) for v in rng.integers(-128, 128, 3))
    twice_max = 2.0 * max(float(sa), float(sb))
    m0, shift = arith.quantize_multiplier(np.array([sa / twice_max, sb / twice_max]))
    out_m0, out_shift = arith.quantize_multiplier(np.float64(twice_max) / (2.0**20 * sy))
    op = forms.IntegerAdd(zero_in=np.array([za, zb], np.int32), m0=m0, shift=shift,
                          out_m0=out_m0, out_shift=out_shift, zero_point=np.int32(zy),
                          lo=-128, hi=127, relu=relu)
    op = jax.device_put(op)
    qa = rng.integers(-128, 128, (4, 33)).astype(np.int8)
    qb = rng.integers(-128, 128, (4, 33)).astype(np.int8)
    got = run(op, jax.device_put(qa), jax.device_put(qb))
    np.testing.assert_array_equal(got, _int_add_reference(qa, qb, op), err_msg=f"{trial}")
    # and it is the real sum to within one output step (plus the multipliers' 2^-31)
    real = sa * (qa.astype(np.float64) - za) + sb * (qb.astype(np.float64) - zb)
    if relu:
      real = np.maximum(real, 0)
    ideal = np.clip(np.rint(real / sy) + zy, zy if relu else -128, 127)
    assert np.abs(np.asarray(got, np.int64) - ideal).max() <= 1


# Default run: jitted (the rescale op by op is IntegerAdd's, checked eagerly above); op by op,
# where every operation compiles for each part's shape, with -m slow.
@pytest.mark.parametrize("variant", ["jit", pytest.param("eager", marks=pytest.mark.slow)])
def test_integer_concat_copies_its_grid_and_rescales_the_others(variant):
  rng = np.random.default_rng(1)
  ratios = np.array([1.0, 0.37, 2.5])
  m0, shift = arith.quantize_multiplier(ratios)
  zeros = np.array([5, -20, 100], np.int32)
  op = jax.device_put(forms.IntegerConcat(zero_in=zeros, m0=m0, shift=shift,
                                          zero_point=np.int32(5), copied=(True, False, False),
                                          axis=1, lo=-128, hi=127))
  parts = [rng.integers(-128, 128, (3, n)).astype(np.int8) for n in (2, 5, 4)]
  got = np.asarray(_variant(variant)(lambda o, *p: o(*p))(op, *map(jax.device_put, parts)))
  want = [parts[0].astype(np.int64)]
  for i in (1, 2):
    r = ref.mul_shift_round(parts[i].astype(np.int64) - zeros[i], int(m0[i]), int(shift[i]))
    want.append(ref.clamp_output(r, 5, -128, 127, False).astype(np.int64))
  np.testing.assert_array_equal(got, np.concatenate(want, axis=1))


@pytest.mark.parametrize("relu, variant", _grid_of([(False,), (True,)], [(True,)]))
def test_add_equals_torchs_vector_kernel(relu, variant):
  rng = np.random.default_rng(3)
  run = _variant(variant)(lambda o, a, b: o(a, b))
  for trial in range(30):
    (sa, za), (sb, zb), (sy, zy) = (_random_grid(rng) for _ in range(3))
    op = _lowered(forms.AddForm(relu=relu), [_grid(sa, za), _grid(sb, zb)], _grid(sy, zy))
    qa = rng.integers(0, 256, (3, 37), dtype=np.uint8)
    qb = rng.integers(0, 256, (3, 37), dtype=np.uint8)
    got = run(op, _int8(qa), _int8(qb))
    want = ref.quantized_add(qa, sa, za, qb, sb, zb, sy, zy, relu=relu)
    np.testing.assert_array_equal(np.asarray(got, np.int16) + 128, want, err_msg=f"{trial}")


@pytest.mark.parametrize("requant", ["fbgemm", "integer"])
def test_add_broadcasts_its_operands(requant):
  """(4, 33) + (33,), + (4, 1) and + () equal the add of the operands broadcast beforehand;
  shapes that do not broadcast are refused."""
  rng = np.random.default_rng(5)
  grids = [_grid(*_random_grid(rng)) for _ in range(3)]
  op = jax.device_put(_lowered(forms.AddForm(relu=False), grids[:2], grids[2], requant))
  a = rng.integers(-128, 128, (4, 33)).astype(np.int8)
  others = [rng.integers(-128, 128, shape).astype(np.int8) for shape in ((33,), (4, 1), ())]
  run = jax.jit(lambda o, a, bs: [(o(a, b), o(b, a), o(a, jnp.broadcast_to(b, a.shape)))
                                  for b in bs])
  for b, (got, flipped, want) in zip(others, run(op, a, others), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(b.shape))
    assert np.asarray(flipped).shape == a.shape
  with pytest.raises(ValueError, match=r"two int8 tensors that broadcast to one shape .* got "
                                       r"\(4, 33\) and \(4, 2\)"):
    op(jnp.asarray(a), jnp.zeros((4, 2), jnp.int8))


@pytest.mark.parametrize("shapes", [((3, 128), (128,)), ((2, 64), (2, 1)), ((2, 3, 64), (3, 1))],
                         ids=str)
def test_broadcast_add_is_torchs(shapes):
  """torch.ops.quantized.add broadcasts too; on outputs whose contiguous runs are whole
  64-element blocks (no scalar tail) the two give the same integers."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(6)
  shape_a, shape_b = shapes
  for trial in range(20):
    (sa, za), (sb, zb), (sy, zy) = (_random_grid(rng) for _ in range(3))
    if trial % 2:  # halves of the output's step: ties for the rounding
      sa = sb = float(np.float32(sy / 2))
    op = _lowered(forms.AddForm(relu=False), [_grid(sa, za), _grid(sb, zb)], _grid(sy, zy))
    qa = rng.integers(0, 256, shape_a, dtype=np.uint8)
    qb = rng.integers(0, 256, shape_b, dtype=np.uint8)
    ta = torch._make_per_tensor_quantized_tensor(torch.from_numpy(qa), sa, za)
    tb = torch._make_per_tensor_quantized_tensor(torch.from_numpy(qb), sb, zb)
    want = torch.ops.quantized.add(ta, tb, sy, zy).int_repr().numpy()
    got = np.asarray(op(_int8(qa), _int8(qb)), np.int16) + 128
    np.testing.assert_array_equal(got, want, err_msg=f"{trial}")


@pytest.mark.parametrize("channels_last, variant", _grid_of([(True,), (False,)], [(True,)]))
def test_concat_equals_torchs_kernels(channels_last, variant):
  rng = np.random.default_rng(4)
  run = _variant(variant)(lambda o, *p: o(*p))
  for trial in range(20):
    grids = [_random_grid(rng) for _ in range(3)]
    grids[1] = grids[2]  # the output's grid: copied
    op = _lowered(forms.ConcatForm(axis=-1), [_grid(*g) for g in grids[:2]],
                  _grid(*grids[2]))
    shape = (2, 3, 4) if channels_last else (5,)
    parts = [rng.integers(0, 256, shape + (c,), dtype=np.uint8) for c in (6, 5)]
    if not channels_last:
      parts = [p.reshape(-1, p.shape[-1]) for p in parts]
    got = run(op, *map(_int8, parts))
    want = ref.quantized_cat([(p, s, z) for p, (s, z) in zip(parts, grids[:2], strict=True)],
                             *grids[2], axis=-1, channels_last=channels_last)
    np.testing.assert_array_equal(np.asarray(got, np.int16) + 128, want, err_msg=f"{trial}")


AVG_POOLS = [
    ((2, 2), None, 0, True),
    ((3, 3), (2, 2), 1, True),
    ((3, 3), (2, 2), 1, False),
    ((2, 3), (1, 2), (1, 0), False),
    ((2, 2), (1, 1), 1, True),
]


@pytest.mark.parametrize("window, strides, padding, include, variant",
                         _grid_of(AVG_POOLS, [AVG_POOLS[3]]))
def test_avg_pool_equals_torchs_kernel(window, strides, padding, include, variant):
  rng = np.random.default_rng(5)
  pads = tuple((p, p) for p in ((padding,) * 2 if isinstance(padding, int) else padding))
  run = _variant(variant)(lambda o, x: o(x))
  for trial in range(10):
    _, z = _random_grid(rng)
    q = rng.integers(0, 256, (2, 7, 6, 16), dtype=np.uint8)
    op = _lowered(forms.PoolForm(window=window, strides=strides or window, padding=pads,
                                 count_include_pad=include), [_grid(1.0, z)], None)
    got = run(op, _int8(q))
    want = ref.quantized_avg_pool2d(q, z, window, strides, padding,
                                    count_include_pad=include)
    np.testing.assert_array_equal(np.asarray(got, np.int16) + 128, want, err_msg=f"{trial}")


# "eager": op by op, where each shape compiles anew, two of the sizes; every size with -m slow
@pytest.mark.parametrize("variant", [*VARIANTS, pytest.param("eager_all", marks=pytest.mark.slow)])
def test_global_avg_pool_equals_torchs_kernel(variant):
  rng = np.random.default_rng(6)
  run = _variant(variant)(lambda o, x: o(x))
  sizes = [(2, 3), (4, 4), (7, 7), (1, 5), (6, 6)] * 4 if variant != "eager" else [(2, 3), (7, 7)]
  for trial, (h, w) in enumerate(sizes):
    _, z = _random_grid(rng)
    q = rng.integers(0, 256, (3, h, w, 8), dtype=np.uint8)
    op = _lowered(forms.PoolForm(window=None, strides=(), padding="VALID",
                                 count_include_pad=True), [_grid(1.0, z)], None)
    got = run(op, _int8(q))
    want = ref.quantized_adaptive_avg_pool(q, z, 1)[:, 0, 0]
    np.testing.assert_array_equal(np.asarray(got, np.int16) + 128, want, err_msg=f"{trial}")


INTEGER_AVG_POOLS = [
    ((2, 2), (2, 2), "VALID", True),
    ((3, 3), (2, 2), "SAME", True),
    ((3, 3), (2, 2), "SAME", False),
    ((2, 3), (1, 2), ((1, 0), (0, 2)), False),
    ((4, 4), (1, 1), ((1, 1), (1, 1)), True),
]


@pytest.mark.parametrize("window, strides, padding, include, variant",
                         _grid_of(INTEGER_AVG_POOLS, [INTEGER_AVG_POOLS[3]]))
def test_integer_avg_pool_equals_int64_reference(window, strides, padding, include, variant):
  rng = np.random.default_rng(2)
  q = rng.integers(-128, 128, (2, 7, 6, 3)).astype(np.int8)
  z = -17
  op = forms.Int8AvgPool(zero_point=jax.device_put(np.int32(z)), window=window, strides=strides,
                         padding=padding, count_include_pad=include, shift=0, lo=-128,
                         hi=127, integer=True)
  got = _variant(variant)(lambda o, x: o(x))(op, jax.device_put(q))
  pads = (ref.same_pads(q.shape[1:3], window, strides, (1, 1)) if padding == "SAME"
          else [(0, 0), (0, 0)] if padding == "VALID" else padding)
  np.testing.assert_array_equal(
      got, _pool_integer_reference(q, window, strides, pads, z, include))


_divide_round_half_even = jax.jit(divide_round_half_even)  # one compilation for all examples


@settings(max_examples=200, deadline=None)
@given(total=st.integers(-2**24, 2**24), count=st.integers(1, 4096))
def test_divide_round_half_even_is_exact(total, count):
  got = int(_divide_round_half_even(np.int32(total), np.int32(count)))
  quotient, rest = divmod(total, count)
  want = quotient + (2 * rest > count or (2 * rest == count and quotient % 2 == 1))
  assert got == want


class Residual(nn.Module):
  """Quantize, conv-relu, a block joined by add-relu, a concat of two branches, a global
  average pool, a Dense: every new integer op in one small model."""

  @nn.compact
  def __call__(self, x, mode="float"):
    x = qnn.Quantize(qconfig=RESIDUAL_QCONFIG)(x, mode=mode)
    a = qnn.QuantConv(4, (3, 3), qconfig=RESIDUAL_QCONFIG, activation=nn.relu)(x, mode=mode)
    b = qnn.QuantConv(4, (3, 3), qconfig=RESIDUAL_QCONFIG)(a, mode=mode)
    s = qnn.QuantAdd(qconfig=RESIDUAL_QCONFIG, relu=True)(a, b, mode=mode)
    c = qnn.QuantConv(3, (1, 1), qconfig=RESIDUAL_QCONFIG, activation=nn.relu)(s, mode=mode)
    s = qnn.QuantConcat(qconfig=RESIDUAL_QCONFIG)([s, c], mode=mode)
    s = qnn.AvgPool()(s, mode=mode)
    y = qnn.QuantDense(3, qconfig=RESIDUAL_QCONFIG)(s, mode=mode)
    return qnn.Dequantize()(y, mode=mode)


@functools.lru_cache(maxsize=None)
def _calibrated_residual():
  x = jax.device_put(np.random.default_rng(1).standard_normal((4, 8, 8, 2), np.float32))
  model = Residual()
  # XLA's own random bits: threefry's initialisers take XLA:CPU several times longer to compile
  variables = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), x)
  return model, x, qnn.calibrate(model, variables, [x])


@functools.lru_cache(maxsize=None)
def _residual(requant: str):
  model, x, variables = _calibrated_residual()
  return model, x, qjax.convert(model, variables, x, requant=requant)


@pytest.mark.parametrize("requant", ["fbgemm", "float", "integer"])
def test_residual_model_lowers_every_module_to_its_typed_op(requant):
  _, _, int_vars = _residual(requant)
  kinds = {path: type(node[forms.OP]).__name__
           for path, node in int_vars[forms.COLLECTION].items()}
  integer = requant == "integer"
  assert kinds == {
      "Quantize_0": "QuantizeOp", "QuantConv_0": "Int8Conv", "QuantConv_1": "Int8Conv",
      "QuantAdd_0": "IntegerAdd" if integer else "Int8Add", "QuantConv_2": "Int8Conv",
      "QuantConcat_0": "IntegerConcat" if integer else "Int8Concat",
      "AvgPool_0": "Int8AvgPool", "QuantDense_0": "Int8Dense", "Dequantize_0": "DequantizeOp"}
  assert set(int_vars) == {forms.COLLECTION}  # every layer converted: no float params left


@pytest.mark.parametrize("requant", ["fbgemm", "integer"])
def test_serving_tree_and_file_give_the_same_integers(requant, tmp_path):
  model, x, int_vars = _residual(requant)
  apply = jax.jit(lambda v, x: model.apply(v, x, mode="int8"))
  want = apply(int_vars, x)
  serving = qjax.for_serving(int_vars)
  assert len(jax.tree_util.tree_leaves(serving)) < len(jax.tree_util.tree_leaves(int_vars))
  np.testing.assert_array_equal(apply(serving, x), want)
  path = tmp_path / "residual.qjax"
  qio.save(path, serving)
  np.testing.assert_array_equal(apply(qio.load(path), x), want)


def _int_to_float_conversions(requant: str) -> list:
  model, x, int_vars = _residual(requant)
  with kernels.use("xla"):  # every conversion in XLA's view (a native call hides its own)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, mode="int8"))(int_vars, x).jaxpr
  # integer data (not a scalar qparam, as the Quantize boundary's zero point) turned float
  return [e for e in cases.all_eqns(jaxpr) if e.primitive.name == "convert_element_type"
          and jnp.issubdtype(e.invars[0].aval.dtype, jnp.integer)
          and jnp.issubdtype(e.outvars[0].aval.dtype, jnp.floating) and e.outvars[0].aval.ndim]


def test_integer_requant_keeps_the_residual_model_integer():
  # the detector sees the float requantizers of the default mode ...
  assert len(_int_to_float_conversions("fbgemm")) > 1
  # ... and with requant="integer" only the Dequantize turns integers into floats
  assert len(_int_to_float_conversions("integer")) == 1


def test_layer_report_compares_converted_kernels_with_their_float_weights():
  from qjax import report
  _, _, int_vars = _residual("fbgemm")
  _, _, variables = _calibrated_residual()
  rows = {row.path: row for row in report.layer_report(int_vars, variables)}
  for conv in ("QuantConv_0", "QuantConv_1", "QuantConv_2"):
    row = rows[f"converted/{conv}/op/kernel"]
    assert row.kind == "qarray" and row.reference == f"params/{conv}/kernel"
    assert row.sqnr_db is not None and row.sqnr_db > 30, (conv, row.sqnr_db)
  assert rows["converted/QuantDense_0/op/kernel"].reference_axes == (1, 0)  # (N, K) stored


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_int8_relu_clamps_at_the_zero_point(jit):
  q = np.arange(-128, 128, dtype=np.int8)

  def apply(o, x):
    return o(x)

  run = jax.jit(apply) if jit else apply  # one compilation for every zero point
  for zero in (-128, -20, 0, 57, 127):
    op = forms.Int8ReLU(zero_point=jax.device_put(np.int32(zero)))
    got = np.asarray(run(op, jax.device_put(q)))
    np.testing.assert_array_equal(got, np.maximum(q, zero))


class Unfused(nn.Module):
  """A layer, then its ReLU as a module of its own (the layer's grid holds negatives)."""

  qconfig: Any = QCONFIG

  @nn.compact
  def __call__(self, x, mode="float"):
    x = qnn.Quantize(qconfig=self.qconfig)(x, mode=mode)
    x = qnn.QuantDense(8, qconfig=self.qconfig)(x, mode=mode)
    x = qnn.QuantReLU()(x, mode=mode)
    x = qnn.QuantDense(3, qconfig=self.qconfig)(x, mode=mode)
    return qnn.Dequantize()(x, mode=mode)


# Default run: MinMax observers (per-tensor); x86's histogram observers (seconds to compile in
# calibrate, convert and the QAT forward) with -m slow.
@pytest.mark.parametrize("qname", ["default", pytest.param("x86", marks=pytest.mark.slow)])
def test_unfused_relu_keeps_the_layers_grid_and_matches_the_fake_quant_forward(qname):
  x = jax.device_put(np.random.default_rng(2).standard_normal((16, 6), np.float32))
  model = Unfused(qconfig={"default": qnn.default_qconfig, "x86": QCONFIG}[qname])
  # XLA's own random bits: threefry's initialisers take XLA:CPU longer to compile
  variables = qnn.calibrate(model, jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), x),
                            [x])
  int_vars = qjax.convert(model, variables, x)
  ops = int_vars[forms.COLLECTION]
  assert isinstance(ops["QuantReLU_0"][forms.OP], forms.Int8ReLU)
  np.testing.assert_array_equal(ops["QuantReLU_0"][forms.OP].zero_point,
                                ops["QuantDense_0"][forms.OP].requant.zero_point)
  # the second layer reads the first layer's grid through the ReLU
  np.testing.assert_array_equal(ops["QuantDense_1"][forms.OP].report["input_scale"],
                                ops["QuantDense_0"][forms.OP].report["output_scale"])
  apply = jax.jit(model.apply, static_argnames="mode")
  y = np.asarray(apply(int_vars, x, mode="int8"))
  y_qat = np.asarray(apply(variables, x, mode="qat"))
  step = ops["Dequantize_0"][forms.OP].scale
  assert float(np.max(np.abs(y - y_qat))) <= 1.001 * float(step)
