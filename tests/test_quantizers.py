"""qjax.quantizers half-precision casts: bit-exact against NumPy / ml_dtypes rounding, integer
and QArray leaves untouched, overflow refused with the path, and a Flax MLP run in float16 and
bfloat16 whose outputs stay within the format's precision of float32."""

import chex
import flax.linen as nn
import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
import qjax.nn as qnn
from qjax import QuantSpec, integer, qarray, report
from qjax import quantizers as qz

RNG = np.random.default_rng(5)
SETTINGS = hypothesis.settings(deadline=None, max_examples=60, print_blob=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])
HALF_DTYPES = (jnp.float16, jnp.bfloat16)


def _bits(x):
  arr = np.asarray(x)
  return arr.dtype, arr.shape, arr.tobytes()


def _wide_floats(n):
  """float32 values over the whole finite range of float16, subnormals and exact ties included."""
  magnitudes = np.exp2(RNG.uniform(-27.0, 15.9, n)).astype(np.float32)
  values = magnitudes * RNG.choice(np.float32([-1, 1]), n)
  # Halfway between neighbours in float16 (1 + k * 2^-11, k odd) and in bfloat16 (k * 2^-8).
  ties = np.float32(1.0) + np.arange(1, 16, 2, dtype=np.float32) * np.float32(2.0**-11)
  bf_ties = np.float32(1.0) + np.arange(1, 16, 2, dtype=np.float32) * np.float32(2.0**-8)
  special = np.float32([0.0, -0.0, np.nan, np.inf, -np.inf, 65504.0, 65519.0, 2.0**-24, 2.0**-25,
                        2.0**-26, 1e-45])
  return np.concatenate([values, ties, -ties, bf_ties, special])


class CastExactnessTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_astype_bit_for_bit(self):
    x = _wide_floats(4000)
    for dtype in HALF_DTYPES:
      cast = self.variant(lambda v, d=dtype: qz.cast_floats(v, d))
      out = cast({"params": {"w": jnp.asarray(x)}})["params"]["w"]
      self.assertIsInstance(out, jax.Array)
      self.assertEqual(_bits(out), _bits(x.astype(dtype)))

  def test_round_to_nearest_even_on_ties(self):
    one = np.float32(1.0)
    ulp = np.float32(2.0**-10)  # float16's spacing in [1, 2)
    ties = jnp.asarray(one + ulp * np.float32([0.5, 1.5, 2.5, 3.5]))
    out = np.asarray(qz.half({"t": ties})["t"]).astype(np.float32)
    # Each tie goes to the neighbour with an even last mantissa bit.
    np.testing.assert_array_equal(out, one + ulp * np.float32([0, 2, 2, 4]))

  def test_widening_back_to_float32_is_exact(self):
    x = _wide_floats(500)
    for dtype in HALF_DTYPES:
      narrow = qz.cast_floats({"w": jnp.asarray(x)}, dtype)
      back = qz.cast_floats(narrow, "float32")["w"]
      self.assertEqual(_bits(back), _bits(x.astype(dtype).astype(np.float32)))

  def test_numpy_float64_leaves_are_rounded_once(self):
    # 1 + 2^-11 + 2^-40 lies just above a float16 tie; rounding it to float32 first would land
    # exactly on the tie and then round down to 1.
    x = np.array([1.0 + 2.0**-11 + 2.0**-40])
    out = qz.half({"w": x})["w"]
    self.assertIsInstance(out, np.ndarray)
    self.assertEqual(float(out[0]), 1.0 + 2.0**-10)
    self.assertEqual(_bits(out), _bits(x.astype(np.float16)))

  def test_integer_bool_and_qarray_leaves_are_untouched(self):
    qa = qarray.quantize_array(jnp.asarray(RNG.standard_normal((4, 3)).astype(np.float32)),
                               QuantSpec(bits=8, symmetric=True, axis=0))
    requant = integer.FloatRequant(multiplier=jnp.full(4, 0.3, jnp.float32),
                                   zero_point=jnp.int32(0), lo=-128, hi=127, relu=False)
    op = integer.forms.Int8Dense(kernel=qa.qvalue, offset=jnp.arange(4, dtype=jnp.int32),
                                 requant=requant,
                                 report={"weight_scale": jnp.full(4, 0.1, jnp.float32)})
    tree = {integer.COLLECTION: {"fc": {"op": op}}, "kernel": qa,
            "bias": jnp.arange(4, dtype=jnp.int32), "mask": jnp.array([True, False]),
            "steps": [np.int64(3)], "elsewhere": {"op": op}}
    out = qz.cast_floats(tree, jnp.bfloat16)
    self.assertIs(out["kernel"], qa)
    self.assertIs(out["bias"], tree["bias"])
    self.assertIs(out["mask"], tree["mask"])
    self.assertIs(out["steps"][0], tree["steps"][0])
    # A typed integer op is kept whole, its float32 multiplier (part of the converted
    # arithmetic) and report scales included, wherever it sits in the tree.
    for kept in (out[integer.COLLECTION]["fc"]["op"], out["elsewhere"]["op"]):
      self.assertIs(kept, op)
      self.assertIs(kept.requant.multiplier, requant.multiplier)
      self.assertEqual(kept.report["weight_scale"].dtype, jnp.float32)

  def test_model_size_halves(self):
    variables = jax.jit(MLP().init)(jax.random.key(1), jnp.ones((1, 8), jnp.float32))
    self.assertEqual(report.model_size(qz.half(variables)) * 2, report.model_size(variables))
    self.assertEqual(report.model_size(qz.cast_floats(variables, "bfloat16")) * 2,
                     report.model_size(variables))


@SETTINGS
@hypothesis.given(hnp.arrays(np.uint32, hnp.array_shapes(max_dims=2, max_side=8)),
                  hypothesis.strategies.sampled_from(HALF_DTYPES))
def test_any_float32_bits_cast_exactly_or_raise(raw, dtype):
  x = raw.view(np.float32)
  with np.errstate(over="ignore"):
    expected = x.astype(dtype)
  overflows = np.isfinite(x) & ~np.isfinite(expected)
  if overflows.any():
    with pytest.raises(ValueError, match="would become inf"):
      qz.cast_floats({"w": jnp.asarray(x)}, dtype)
  else:
    assert _bits(qz.cast_floats({"w": jnp.asarray(x)}, dtype)["w"]) == _bits(expected)


@pytest.mark.parametrize("tree,dtype,error,match", [
    ({"w": jnp.ones(2)}, "int8", ValueError,
     r"dtype must be one of float16, bfloat16, float32; got int8\. Integer formats"),
    ({"w": jnp.ones(2)}, "float64", ValueError, "one of float16, bfloat16, float32; got float64"),
    ({"w": jnp.ones(2)}, "half-ish", TypeError,
     "one of float16, bfloat16, float32; got 'half-ish'"),
    ({"params": {"fc": {"kernel": jnp.float32([1.0, 65520.0, -7e4, np.inf])}}}, jnp.float16,
     ValueError, r"2 finite value\(s\) of the leaf at params/fc/kernel \(float32, shape \(4,\)\) "
                 r"would become inf in float16 \(largest \|x\| = 70000; the largest finite "
                 r"float16 is 65504\)"),
    ({"w": [jnp.float32([3.4e38])]}, jnp.bfloat16, ValueError, r"leaf at w/0 .* in bfloat16"),
    ({"w": np.array([1e39])}, jnp.float32, ValueError, "leaf at w .* in float32"),
    ({"fc": {"lr": 0.1}}, jnp.float16, TypeError, r"leaf at fc/lr is a float\. Wrap"),
])
def test_errors(tree, dtype, error, match):
  with pytest.raises(error, match=match):
    qz.cast_floats(tree, dtype)


def test_largest_finite_and_below_midpoint_do_not_raise():
  out = qz.half({"w": jnp.float32([65504.0, 65519.99, -65519.0])})["w"]
  np.testing.assert_array_equal(np.asarray(out, np.float32), [65504.0, 65504.0, -65504.0])


def test_under_jit_overflow_becomes_inf():
  # Values are unknown while tracing, so the check cannot run (see the docstring).
  out = jax.jit(qz.half)({"w": jnp.float32([7e4])})["w"]
  assert np.isposinf(np.asarray(out, np.float32)).all()


# ------------------------------------------------------------------------------------------
# Converted integer variables.


class _IntNet(nn.Module):
  """Quantize -> QuantDense(relu) -> QuantDense -> Dequantize, then a float head: after
  `convert`, "converted" holds the integer layers and "params" the float head."""

  @nn.compact
  def __call__(self, x, *, mode):
    qconfig = qnn.get_default_qconfig("x86")
    x = qnn.Quantize(qconfig)(x, mode=mode)
    x = qnn.QuantDense(16, qconfig=qconfig, activation=nn.relu, name="fc1")(x, mode=mode)
    x = qnn.QuantDense(8, qconfig=qconfig, name="fc2")(x, mode=mode)
    x = qnn.Dequantize()(x, mode=mode)
    return nn.Dense(4, name="head")(x)


@pytest.fixture(name="converted", scope="module")
def _converted():
  model = _IntNet()
  x = jnp.asarray(RNG.standard_normal((32, 12)).astype(np.float32))
  variables = jax.jit(lambda x: model.init(jax.random.key(2), x, mode="float"))(x)
  int_vars = qjax.convert(model, qnn.calibrate(model, variables, [x]), x)
  return model, x, int_vars


@pytest.mark.parametrize("cast", [qz.half, lambda v: qz.cast_floats(v, "bfloat16"),
                                  jax.jit(qz.half)], ids=["half", "bfloat16", "jit_half"])
def test_converted_integer_variables_pass_through_bit_identical(converted, cast):
  model, x, int_vars = converted
  assert set(int_vars) == {integer.COLLECTION, "params"}  # the float head stays in "params"
  out = cast(int_vars)
  is_qa = qarray.is_qarray
  # The same typed ops (structure, static fields) with the same leaves, bit for bit.
  assert (jax.tree_util.tree_structure(out[integer.COLLECTION], is_leaf=is_qa)
          == jax.tree_util.tree_structure(int_vars[integer.COLLECTION], is_leaf=is_qa))
  before = jax.tree_util.tree_leaves_with_path(int_vars[integer.COLLECTION], is_leaf=is_qa)
  after = jax.tree_util.tree_leaves_with_path(out[integer.COLLECTION], is_leaf=is_qa)
  assert [p for p, _ in before] == [p for p, _ in after]
  assert any(np.asarray(a).dtype == np.float32 for _, a in before)  # scales, multipliers
  for (path, a), (_, b) in zip(before, after):
    if is_qa(a):
      assert is_qa(b) and a.spec == b.spec, path
      a, b = (a.qvalue, a.scale, a.zero_point), (b.qvalue, b.scale, b.zero_point)
    for u, v in zip(*(([a], [b]) if not isinstance(a, tuple) else (a, b))):
      assert _bits(u) == _bits(v), jax.tree_util.keystr(path)
  # The float layer left outside the integer path is cast.
  assert out["params"]["head"]["kernel"].dtype != jnp.float32
  # The integer layers compute exactly what they computed before the cast.
  apply = jax.jit(lambda v: model.apply(v, x, mode="int8"))
  np.testing.assert_array_equal(
      np.asarray(apply({integer.COLLECTION: out[integer.COLLECTION],
                        "params": int_vars["params"]})),
      np.asarray(apply(int_vars)))


# ------------------------------------------------------------------------------------------
# Running a Flax model in half precision.


class MLP(nn.Module):
  """`dtype` is the computation dtype; None lets Flax promote inputs and params."""
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64, dtype=self.dtype)(x))
    x = nn.relu(nn.Dense(32, dtype=self.dtype)(x))
    return nn.Dense(10, dtype=self.dtype)(x)


@pytest.fixture(name="mlp", scope="module")
def _mlp():
  x = jnp.asarray(RNG.standard_normal((512, 20)).astype(np.float32))
  variables = jax.jit(MLP().init)(jax.random.key(0), x)
  return x, variables, jax.jit(MLP().apply)(variables, x)


def _relative_error(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_mlp_stays_close_to_float32(mlp, dtype):
  x, variables, ref = mlp
  params = qz.cast_floats(variables, dtype)
  eps = float(jnp.finfo(dtype).eps)
  # Computing in the half dtype: inputs and params in it, result in it.
  out = jax.jit(MLP(dtype=dtype).apply)(params, x.astype(dtype))
  assert out.dtype == dtype
  assert _relative_error(out, ref) < eps
  assert np.mean(np.argmax(out, -1) == np.argmax(ref, -1)) >= 0.98
  # Weights-only: float32 computation on the rounded params is at least as close.
  out32 = jax.jit(MLP(dtype=jnp.float32).apply)(params, x)
  assert out32.dtype == jnp.float32
  assert _relative_error(out32, ref) < eps


def test_default_dtype_promotes_and_strict_mode_refuses(mlp):
  x, variables, _ = mlp
  params = qz.cast_floats(variables, jnp.bfloat16)
  # tests/conftest.py turns strict promotion on: float32 inputs with bfloat16 params raise.
  with pytest.raises(jax.dtypes.TypePromotionError, match="no available implicit dtype promotion"):
    MLP().apply(params, x)
  with jax.numpy_dtype_promotion("standard"):
    promoted = MLP().apply(params, x)
  assert promoted.dtype == jnp.float32
  np.testing.assert_array_equal(promoted, MLP(dtype=jnp.float32).apply(params, x))
