"""qjax.integer.arith, the integer math of one layer, against an independent NumPy int64
reference.

The reference is tests/support/reference.py's integer path (`ref.int8_shift` to
`ref.fbgemm_params`), written from the formulas in the qjax.integer.arith module docstring
(not from its code): int64 sums of int8 products, explicit zero-point padding, requantization in
Python / NumPy integer or float32 arithmetic, one IEEE operation at a time. Every test
compares bit for bit, eagerly and under jit (`chex.variants`). tests/test_convert.py uses the
same reference for whole converted models.

  acc  = sum_k q_x[k] q_w[k, n]                         (`matmul`, `conv`)
  q_y  = clamp(Z_y + requant(acc'), lo, hi),  lo = max(lo, Z_y) with a fused ReLU
  fbgemm   requant(a) = rne((f32(a) + b') * M),  b' = f32(b / A)   (float bias)
  float    requant(a) = rne(f32(a) * M)                             (int32 bias inside a)
           A = f32(f32(S_x) S_w), M = f32(A / S_y): float32 operations, each rounded
  integer  requant(a) = floor((a * M0 + 2^(r-1)) / 2^r)

Grids: an unsigned 8-bit grid is carried as int8 moved down by 128 (reduce_range and
narrow_range included); every 8-bit grid clamps to its whole 8-bit storage range ([0, 255]
for uint8, [-128, 127] for int8), as PyTorch's quantized kernels do; narrower grids clamp to
their own [qmin, qmax].
"""

from __future__ import annotations

import functools
from fractions import Fraction

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from support import cases
from support import reference as ref
import qjax
from qjax import QuantSpec
from qjax.integer import arith

F32 = np.float32
SETTINGS = hypothesis.settings(deadline=None, max_examples=20, print_blob=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])

# (lo, hi) clamp ranges of the integer path: every 8-bit grid (int8_bounds), and the narrower
# grids int4, uint4, int4 narrow, uint7, uint6 narrow; plus a range inside the carrier
# that no spec produces, to cover any (lo, hi) the requantizers are given.
BOUNDS = ((-128, 127), (-8, 7), (0, 15), (-7, 7), (0, 127), (1, 63), (-100, 90))


# ------------------------------------------------------------------------------------------
# Grids: int8_shift, int8_bounds, the 8-bit limit.

_SPECS_8 = [s for s in cases.all_specs() if s.bits <= 8]
_SPECS_WIDE = [s for s in cases.all_specs() if s.bits > 8]


@pytest.mark.parametrize("spec", _SPECS_8, ids=cases.spec_id)
def test_int8_shift_and_bounds(spec):
  assert arith.int8_shift(spec) == ref.int8_shift(spec)
  lo, hi = arith.int8_bounds(spec)
  assert (lo, hi) == ref.int8_bounds(spec)
  assert -128 <= lo <= hi <= 127  # every grid of <= 8 bits fits the int8 carrier
  qmin, qmax = ref.spec_grid(spec)
  shift = ref.int8_shift(spec)
  assert lo <= qmin - shift and qmax - shift <= hi  # the spec's own grid lies inside


def test_int8_shift_examples():
  """Every 8-bit grid clamps to its storage range (PyTorch's quantized kernels); only the
  narrower ones keep their own."""
  for flags in ({}, {"reduce_range": True}, {"narrow_range": True},
                {"reduce_range": True, "narrow_range": True}, {"symmetric": True}):
    unsigned = QuantSpec(bits=8, signed=False, **flags)
    assert arith.int8_shift(unsigned) == 128, flags  # x86's [0, 127] activations too
    assert arith.int8_bounds(unsigned) == (-128, 127), flags
    signed = QuantSpec(bits=8, signed=True, **flags)
    assert arith.int8_shift(signed) == 0, flags
    assert arith.int8_bounds(signed) == (-128, 127), flags
  assert arith.int8_shift(QuantSpec(bits=7, signed=False)) == 0
  assert arith.int8_bounds(QuantSpec(bits=7, signed=False)) == (0, 127)
  assert arith.int8_bounds(QuantSpec(bits=4, signed=False)) == (0, 15)
  assert arith.int8_bounds(QuantSpec(bits=4, signed=False, reduce_range=True)) == (0, 7)
  assert arith.int8_bounds(QuantSpec(bits=4, symmetric=True)) == (-8, 7)
  assert arith.int8_bounds(QuantSpec(bits=4, symmetric=True, narrow_range=True)) == (-7, 7)


@pytest.mark.parametrize("spec", _SPECS_WIDE[::7], ids=cases.spec_id)
def test_wider_than_8_bits_is_refused(spec):
  with pytest.raises(ValueError, match=rf"int8_bounds: .*at most 8 bits; got a {spec.bits}-bit"):
    arith.int8_bounds(spec)
  with pytest.raises(ValueError, match=r"convert: fc1 \(input\): .*at most 8 bits"):
    arith.check_int8_spec(spec, name="convert: fc1 (input)")
  with pytest.raises(ValueError, match="at most 8 bits"):
    arith.quantize_input(jnp.zeros((3,), jnp.float32), spec, jnp.float32(1.0), jnp.int32(0))


def test_as_requant():
  as_requant, requant = qjax.integer.as_requant, qjax.integer.Requant
  assert as_requant("FBGEMM") is requant.FBGEMM
  assert as_requant(requant.INTEGER) is requant.INTEGER
  with pytest.raises(ValueError, match=r"\['float', 'integer', 'fbgemm'\].*got 'double'"):
    as_requant("double")


def test_requantizers_refuse_bounds_int8_cannot_hold():
  r = qjax.integer.FloatRequant(multiplier=jnp.float32(1.0), zero_point=jnp.int32(0), lo=-128,
                                hi=127, relu=False)
  for lo, hi in ((-129, 127), (0, 128), (5, 4), (-128.0, 127)):
    with pytest.raises(ValueError, match=r"FloatRequant: lo and hi must be ints with -128 <= "
                                         r"lo <= hi <= 127"):
      qjax.integer.FloatRequant(multiplier=r.multiplier, zero_point=r.zero_point, lo=lo, hi=hi,
                                relu=False)
  with pytest.raises(TypeError, match="IntegerRequant: relu must be a bool; got 1"):
    qjax.integer.IntegerRequant(m0=jnp.int32(1), shift=jnp.int32(1), zero_point=jnp.int32(0),
                                lo=-128, hi=127, relu=1)
  # Tree operations rebuild the struct with other leaves: the static checks still hold.
  assert jax.tree_util.tree_map(lambda v: v * 2, r).multiplier == 2.0


# ------------------------------------------------------------------------------------------
# Boundaries: quantize_input, dequantize_output.

_BOUNDARY_SPECS = (
    QuantSpec(bits=8, signed=False),
    QuantSpec(bits=8, signed=False, reduce_range=True),
    QuantSpec(bits=8, signed=False, narrow_range=True),
    QuantSpec(bits=8),
    QuantSpec(bits=8, reduce_range=True, symmetric=True),
    QuantSpec(bits=4, signed=False),
    QuantSpec(bits=5, symmetric=True, narrow_range=True),
)


class BoundaryTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*_BOUNDARY_SPECS)
  def test_quantize_input(self, spec):
    """clamp(rne(x / S) + Z) on the storage range of an 8-bit grid (spec's own grid when
    narrower), with the documented rounding, minus int8_shift. Calibrated on 80 % of the data's
    range, so that some values land beyond the grid (and, at 8 bits, inside the storage)."""
    rng = np.random.default_rng(spec.bits)
    x = (rng.standard_normal((5, 9)) * 2).astype(np.float32)
    scale, zp = ref.qparams_from_minmax(x.min() * 0.8, x.max() * 0.8, spec)
    x[0, :3] = [0.0, 1e9, -1e9]
    q8 = self.variant(arith.quantize_input, static_argnames=("spec",))(
        x, spec=spec, scale=jnp.asarray(scale), zero_point=jnp.asarray(zp))
    assert q8.dtype == jnp.int8
    expected = ref.quantize_input(x, spec, scale, zp)
    np.testing.assert_array_equal(np.asarray(q8), expected)
    shift = ref.int8_shift(spec)
    lo, hi = ref.storage_grid(spec)
    assert int(q8[0, 0]) == int(zp) - shift  # 0.0 is the zero point
    assert (int(q8[0, 1]), int(q8[0, 2])) == (hi - shift, lo - shift)  # saturated at storage
    qmin, qmax = ref.spec_grid(spec)
    outside = (expected + shift < qmin) | (expected + shift > qmax)
    assert outside.any() == (spec.bits == 8 and (lo, hi) != (qmin, qmax))

  def test_reduced_range_keeps_the_storage_range(self):
    """x86's uint8 [0, 127] activations: a value observed beyond the range quantizes above
    127 (up to 255), as torch.quantize_per_tensor does, and travels as int8 - 128."""
    spec = QuantSpec(bits=8, signed=False, reduce_range=True)
    x = np.array([0.0, 63.5, 64.0, 100.0, 127.4, 127.6, 500.0, -1.0], np.float32)
    q8 = arith.quantize_input(jnp.asarray(x), spec, jnp.float32(0.5), jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(q8).astype(np.int64) + 128,
                                  [0, 127, 128, 200, 255, 255, 255, 0])
    # The fake-quant grid itself still ends at 127.
    q = qjax.quantize(jnp.asarray(x), spec, qjax.QParams(jnp.float32(0.5), jnp.int32(0)))
    np.testing.assert_array_equal(np.asarray(q), [0, 127, 127, 127, 127, 127, 127, 0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_dequantize_output(self):
    rng = np.random.default_rng(1)
    q8 = rng.integers(-128, 128, (4, 7)).astype(np.int8)
    scale, z8 = F32(0.0371), np.int32(-17)
    y = self.variant(arith.dequantize_output)(q8, jnp.asarray(scale), jnp.asarray(z8))
    assert y.dtype == jnp.float32
    expected = (q8.astype(np.int32) - z8).astype(np.float32) * scale
    np.testing.assert_array_equal(np.asarray(y), expected)


# ------------------------------------------------------------------------------------------
# matmul.


@st.composite
def matmul_case(draw):
  lead = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
  k = draw(st.sampled_from([1, 3, 16, 37]))
  n = draw(st.sampled_from([1, 5, 16]))
  x = draw(hnp.arrays(np.int8, lead + (k,)))
  kernel_t = draw(hnp.arrays(np.int8, (n, k)))
  return x, kernel_t


class MatmulTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_int64_reference(self):
    fn = self.variant(arith.matmul)

    @SETTINGS
    @hypothesis.given(matmul_case())
    def check(case):
      x, kernel_t = case
      acc = fn(x, kernel_t)
      assert acc.dtype == jnp.int32
      assert acc.shape == x.shape[:-1] + (kernel_t.shape[0],)
      np.testing.assert_array_equal(np.asarray(acc), ref.matmul(x, kernel_t))

    check()

  @chex.variants(with_jit=True, without_jit=True)
  def test_single_row_and_widest_k(self):
    """M = 1 (padded to two rows inside) and K = 131071 all -128: |acc| up to 2^31 - 16384,
    still exact in the int32 accumulator."""
    k = (2**31 - 1) // (128 * 128)
    x = np.full((1, k), -128, np.int8)
    kernel_t = np.full((3, k), -128, np.int8)
    kernel_t[1, ::2] = 127
    kernel_t[2, :] = np.where(np.arange(k) % 3 == 0, -128, 127).astype(np.int8)
    acc = self.variant(arith.matmul)(x, kernel_t)
    expected = ref.matmul(x, kernel_t)
    assert expected[0, 0] == 128 * 128 * k > 2**31 - 128 * 128 - 1
    np.testing.assert_array_equal(np.asarray(acc), expected)

  def test_jaxpr_is_int8_times_int8_to_int32(self):
    for shape in ((1, 9), (4, 9), (2, 3, 9)):
      jaxpr = jax.make_jaxpr(arith.matmul)(jnp.zeros(shape, jnp.int8),
                                           jnp.zeros((5, 9), jnp.int8)).jaxpr
      assert cases.assert_int8_contractions(jaxpr) == {"dot_general": 1, "conv_general_dilated": 0}

  def test_errors(self):
    ok = jnp.zeros((2, 4), jnp.int8)
    for bad in (jnp.zeros((2, 4), jnp.uint8), jnp.zeros((2, 4), jnp.int32),
                jnp.zeros((2, 4), jnp.float32)):
      with pytest.raises(TypeError, match=rf"matmul: x must be int8.*got {bad.dtype}"):
        arith.matmul(bad, ok)
      with pytest.raises(TypeError, match=rf"matmul: kernel_t must be int8.*got {bad.dtype}"):
        arith.matmul(ok, bad)
    with pytest.raises(ValueError, match=r"share K; got shapes \(2, 4\) and \(3, 5\)"):
      arith.matmul(ok, jnp.zeros((3, 5), jnp.int8))
    with pytest.raises(ValueError, match="share K"):
      arith.matmul(ok, jnp.zeros((3, 2, 4), jnp.int8))


# ------------------------------------------------------------------------------------------
# conv.


def _conv_fn(**geometry):
  return functools.partial(arith.conv, **geometry)


@st.composite
def conv_case(draw):
  """Random geometry (1 or 2 spatial dims, strides, dilation, asymmetric pads, groups) and
  full-range int8 data; Cin spans both lowerings."""
  nsp = draw(st.integers(1, 2))
  groups = draw(st.sampled_from([1, 1, 2, 3]))
  c_g = draw(st.sampled_from([1, 2, 3, 8, 17]))
  o_g = draw(st.integers(1, 2))
  window = tuple(draw(st.integers(1, 3)) for _ in range(nsp))
  strides = tuple(draw(st.integers(1, 2)) for _ in range(nsp))
  dilation = tuple(draw(st.integers(1, 2)) for _ in range(nsp))
  pads = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(nsp))
  spatial = tuple(max(draw(st.integers(1, 6)), (w - 1) * d + 1 - lo - hi)
                  for w, d, (lo, hi) in zip(window, dilation, pads))
  batch = draw(st.integers(1, 2))
  x = draw(hnp.arrays(np.int8, (batch,) + spatial + (groups * c_g,)))
  kernel = draw(hnp.arrays(np.int8, window + (c_g, groups * o_g)))
  pad_value = draw(st.integers(-128, 127))
  geometry = dict(strides=strides, padding=pads, dilation=dilation, feature_group_count=groups)
  return x, kernel, geometry, pad_value


def _conv_jaxpr(x, kernel, geometry):
  return jax.make_jaxpr(lambda a, b: arith.conv(a, b, pad_value=jnp.int32(0), **geometry))(
      x, kernel).jaxpr


def _lowering(x, kernel, geometry) -> dict[str, int]:
  return cases.assert_int8_contractions(_conv_jaxpr(x, kernel, geometry))


# name, x shape, kernel shape, strides, pads, dilation, groups, expected lowering: im2col +
# GEMM (dot_general) for 2..15 input channels, or <= 16 in and out, without groups; XLA's
# convolution otherwise.
_LOWERINGS = (
    ("im2col_2d_cin2", (2, 7, 6, 2), (3, 2, 2, 5), (2, 1), ((1, 0), (2, 1)), (1, 2), 1,
     "dot_general"),
    ("im2col_2d_cin3", (2, 7, 6, 3), (3, 2, 3, 5), (2, 1), ((1, 0), (2, 1)), (1, 2), 1,
     "dot_general"),
    ("im2col_1d_cin15", (3, 9, 15), (3, 15, 4), (2,), ((0, 2),), (2,), 1, "dot_general"),
    ("direct_cin1_2d", (2, 8, 7, 1), (3, 2, 1, 6), (1, 2), ((1, 1), (0, 2)), (2, 1), 1,
     "conv_general_dilated"),
    ("direct_cin1_1d", (3, 9, 1), (4, 1, 3), (2,), ((2, 1),), (1,), 1, "conv_general_dilated"),
    ("im2col_cin16_cout4", (2, 6, 7, 16), (3, 3, 16, 4), (1, 2), ((0, 2), (1, 1)), (2, 1), 1,
     "dot_general"),
    ("direct_cin16_cout17", (2, 6, 7, 16), (3, 3, 16, 17), (1, 2), ((0, 2), (1, 1)), (2, 1), 1,
     "conv_general_dilated"),
    ("direct_cin17", (1, 5, 5, 17), (2, 2, 17, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), 1,
     "conv_general_dilated"),
    ("direct_groups", (2, 5, 5, 6), (2, 3, 2, 6), (1, 1), ((1, 1), (0, 1)), (1, 1), 3,
     "conv_general_dilated"),
    ("direct_depthwise_1d", (1, 8, 4), (3, 1, 8), (1,), ((2, 0),), (3,), 4,
     "conv_general_dilated"),
)


class ConvTest(chex.TestCase):

  @chex.variants(with_jit=True)  # eagerly: test_both_lowerings (random shapes recompile)
  def test_matches_int64_reference(self):
    variant = self.variant

    @SETTINGS
    @hypothesis.given(conv_case())
    def check(case):
      x, kernel, geometry, pad_value = case
      acc = variant(_conv_fn(**geometry))(x, kernel, pad_value=jnp.int32(pad_value))
      expected = ref.conv(x, kernel, groups=geometry["feature_group_count"],
                          pad_value=pad_value, strides=geometry["strides"],
                          padding=geometry["padding"], dilation=geometry["dilation"])
      assert acc.dtype == jnp.int32
      np.testing.assert_array_equal(np.asarray(acc), expected)

    check()

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_LOWERINGS)
  def test_both_lowerings(self, x_shape, k_shape, strides, pads, dilation, groups, lowering):
    """Each lowering is taken where documented (1 < Cin < 16 and no groups: im2col + GEMM;
    Cin 1, Cin >= 16 or groups: XLA's int8 convolution), keeps int8 x int8 -> int32, and is
    exact, extremes included."""
    rng = np.random.default_rng(len(x_shape) + groups)
    x = rng.integers(-128, 128, x_shape).astype(np.int8)
    kernel = rng.integers(-128, 128, k_shape).astype(np.int8)
    x.reshape(-1)[: x.size // 3] = -128  # the extremes, several products of 2^14
    kernel.reshape(-1)[: kernel.size // 3] = -128
    geometry = dict(strides=strides, padding=pads, dilation=dilation,
                    feature_group_count=groups)
    counts = _lowering(x, kernel, geometry)
    assert counts[lowering] == 1 and sum(counts.values()) == 1, counts
    acc = self.variant(_conv_fn(**geometry))(x, kernel, pad_value=jnp.int32(-7))
    np.testing.assert_array_equal(
        np.asarray(acc), ref.conv(x, kernel, strides=strides, padding=pads,
                                  dilation=dilation, groups=groups, pad_value=-7))

  @parameterized.named_parameters(*[case for case in _LOWERINGS if case[-1] == "dot_general"])
  def test_im2col_kernel_is_not_transposed(self, x_shape, k_shape, strides, pads, dilation,
                                           groups, lowering):
    """The GEMM contracts the patches' last dimension with dimension 0 of the kernel reshaped
    to (window * C, O), as stored: no transpose anywhere (a transposed kernel let XLA rewrite
    the product into an int32 dot)."""
    del groups, lowering
    x, kernel = np.zeros(x_shape, np.int8), np.zeros(k_shape, np.int8)
    geometry = dict(strides=strides, padding=pads, dilation=dilation, feature_group_count=1)
    jaxpr = _conv_jaxpr(x, kernel, geometry)
    names = [e.primitive.name for e in cases.all_eqns(jaxpr)]
    assert "transpose" not in names, names
    (dot,) = cases.contractions(jaxpr)
    patches, rhs = (v.aval for v in dot.invars)
    assert rhs.shape == (int(np.prod(k_shape[:-1])), k_shape[-1])
    assert dot.params["dimension_numbers"] == (((patches.ndim - 1,), (0,)), ((), ()))

  def test_padding_uses_the_pad_value(self):
    """A 1x1 kernel of ones over a padded input returns the pad value at the border."""
    x = np.full((1, 2, 2, 1), 5, np.int8)
    acc = arith.conv(x, np.ones((1, 1, 1, 1), np.int8), strides=(1, 1),
                     padding=((1, 0), (0, 1)), dilation=(1, 1), feature_group_count=1,
                     pad_value=jnp.int32(-3))
    np.testing.assert_array_equal(np.asarray(acc)[0, :, :, 0],
                                  [[-3, -3, -3], [5, 5, -3], [5, 5, -3]])

  def test_geometry_errors_name_the_argument(self):
    x, k = np.ones((1, 4, 4, 2), np.int8), np.ones((2, 2, 2, 2), np.int8)
    good = dict(strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
                feature_group_count=1, pad_value=0)
    for change, message in (
        (dict(strides=(1, 0)), r"strides must be 2 ints >= 1"),
        (dict(dilation=(1, 1, 1)), r"dilation must be 2 ints >= 1"),
        (dict(padding=((0, -1), (0, 0))), r"padding must be 2 \(low, high\) pairs"),
        (dict(pad_value=-129), r"pad_value must lie in \[-128, 127\]"),
        (dict(pad_value=np.zeros(2, np.int32)), r"pad_value must be an integer scalar"),
        (dict(feature_group_count=2), r"feature_group_count must be a positive int G")):
      with self.assertRaisesRegex(ValueError, "conv: " + message):
        arith.conv(x, k, **(good | change))

  @parameterized.parameters(
      ((9,), (3,), (2,), (1,)), ((8, 7), (3, 2), (1, 3), (2, 1)), ((5, 5), (4, 4), (2, 2), (1, 1)),
      ((1, 6), (3, 1), (3, 1), (2, 1)))
  def test_conv_pads(self, in_spatial, window, strides, dilation):
    assert list(arith.conv_pads("SAME", in_spatial, window, strides, dilation)) == ref.same_pads(
        in_spatial, window, strides, dilation)
    assert arith.conv_pads("VALID", in_spatial, window, strides, dilation) == (
        ((0, 0),) * len(window))
    assert arith.conv_pads([(1, 2)] * len(window), in_spatial, window, strides, dilation) == (
        ((1, 2),) * len(window))

  def test_errors(self):
    geometry = dict(strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
                    feature_group_count=1, pad_value=jnp.int32(0))
    x, k = jnp.zeros((1, 4, 4, 2), jnp.int8), jnp.zeros((2, 2, 2, 3), jnp.int8)
    with pytest.raises(TypeError, match="conv: x must be int8.*got int32"):
      arith.conv(x.astype(jnp.int32), k, **geometry)
    with pytest.raises(TypeError, match="conv: kernel must be int8.*got uint8"):
      arith.conv(x, k.astype(jnp.uint8), **geometry)
    with pytest.raises(ValueError, match=r"conv: x must have rank 4 .*got shape \(4, 4, 2\)"):
      arith.conv(x[0], k, **geometry)


# ------------------------------------------------------------------------------------------
# Requantization.


@st.composite
def requant_case(draw):
  """(acc, multiplier (1, N) > 0, zero point, lo, hi, relu) with acc * M spread over the grid
  and beyond it, multipliers from 2^-20 to 4 (above 1 some saturate)."""
  n = 8
  lo, hi = draw(st.sampled_from(BOUNDS))
  zero_point = draw(st.integers(lo, hi))
  mult = draw(hnp.arrays(np.float32, (1, n), elements=st.floats(
      2.0**-20, 4.0, width=32)))
  reach = int(min(400 / float(mult.min()), ref.INT32_MAX))
  acc = draw(hnp.arrays(np.int32, (3, n), elements=st.one_of(
      st.integers(-reach, reach), st.integers(ref.INT32_MIN, ref.INT32_MAX))))
  relu = draw(st.booleans())
  return acc, mult, np.int32(zero_point), lo, hi, relu


class RequantizeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_float(self):
    fn = self.variant(arith.requantize_float, static_argnames=("lo", "hi", "relu"))

    @SETTINGS
    @hypothesis.given(requant_case())
    def check(case):
      acc, mult, z, lo, hi, relu = case
      q = fn(acc, jnp.asarray(mult), jnp.asarray(z), lo=lo, hi=hi, relu=relu)
      assert q.dtype == jnp.int8
      np.testing.assert_array_equal(np.asarray(q),
                                    ref.requantize_float(acc, mult, z, lo, hi, relu))

    check()

  @chex.variants(with_jit=True, without_jit=True)
  def test_fbgemm(self):
    fn = self.variant(arith.requantize_fbgemm, static_argnames=("lo", "hi", "relu"))

    @SETTINGS
    @hypothesis.given(requant_case(),
                      st.lists(st.floats(-300, 300, width=32), min_size=8, max_size=8))
    def check(case, bias_steps):
      acc, mult, z, lo, hi, relu = case
      # b' = b / A on the accumulator's scale: up to 300 output steps, i.e. 300 / M units.
      bias = (np.asarray(bias_steps, np.float32) / mult).astype(np.float32).reshape(1, -1)
      q = fn(acc, jnp.asarray(bias), jnp.asarray(mult), jnp.asarray(z), lo=lo, hi=hi,
             relu=relu)
      assert q.dtype == jnp.int8
      np.testing.assert_array_equal(np.asarray(q),
                                    ref.requantize_fbgemm(acc, bias, mult, z, lo, hi, relu))

    check()

  @chex.variants(with_jit=True, without_jit=True)
  def test_fbgemm_rounds_in_float32(self):
    """The accumulator is converted to float32 and the float bias added in float32 before
    the product: with accumulators beyond 2^25 (float32 steps of 4 and 8) and
    b' = k ulp - f32(acc), the float32 sum is exactly k ulp (Sterbenz), where the exact
    acc + b' is off by acc - f32(acc), up to 4, i.e. whole output steps at M = 1; distributing
    the product, f32(acc) M + b' M, rounds differently again."""
    rng = np.random.default_rng(5)
    acc = rng.integers(2**25, 2**27, (1, 64)).astype(np.int32)
    acc[0, ::2] |= 1  # odd: never a float32
    as_f32 = acc.astype(np.float32)
    steps = (rng.integers(-12, 12, (1, 64)) * np.spacing(as_f32)).astype(np.float32)
    bias = (steps.astype(np.float64) - as_f32.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(as_f32 + bias, steps)  # the float32 sum is exact
    mult = rng.uniform(0.5, 1.2, (1, 64)).astype(np.float32)
    mult[0, :32] = 1.0
    q = self.variant(arith.requantize_fbgemm, static_argnames=("lo", "hi", "relu"))(
        acc, jnp.asarray(bias), jnp.asarray(mult), jnp.int32(3), lo=-128, hi=127)
    expected = ref.requantize_fbgemm(acc, bias, mult, 3, -128, 127)
    np.testing.assert_array_equal(np.asarray(q), expected)
    np.testing.assert_array_equal(expected[0, :32], steps[0, :32] + 3)
    exact = (acc.astype(np.float64) + bias.astype(np.float64)) * mult.astype(np.float64)
    assert np.any(np.clip(np.rint(exact) + 3, -128, 127) != expected)
    distributed = as_f32 * mult + bias * mult
    assert np.any(np.clip(np.rint(distributed) + 3, -128, 127) != expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_integer(self):
    """Multipliers below 1 (every converted layer whose S_y >= S_x S_w), any zero point."""
    fn = self.variant(arith.requantize_integer, static_argnames=("lo", "hi", "relu"))

    @SETTINGS
    @hypothesis.given(requant_case())
    def check(case):
      acc, mult, z, lo, hi, relu = case
      m0, shift = arith.quantize_multiplier(np.minimum(mult, F32(0.999)))
      q = fn(acc, jnp.asarray(m0), jnp.asarray(shift), jnp.asarray(z), lo=lo, hi=hi, relu=relu)
      assert q.dtype == jnp.int8
      np.testing.assert_array_equal(np.asarray(q),
                                    ref.requantize_integer(acc, m0, shift, z, lo, hi, relu))

    check()

  # op by op: test_integer_saturates_eager (-m slow); test_integer runs requantize_integer op
  # by op
  @chex.variants(with_jit=True)
  def test_integer_saturates(self):
    _check_integer_saturates(self.variant)

  def test_integer_saturation_with_zero_point(self):
    """A saturated product (M >= 1 or a huge accumulator) stays saturated after + Z."""
    acc = np.array([[ref.INT32_MAX, ref.INT32_MIN]], np.int32)
    m0 = np.full((1, 2), 2**30, np.int32)
    shift = np.ones((1, 2), np.int32)  # M = 2^29
    requantize = jax.jit(arith.requantize_integer, static_argnames=("lo", "hi", "relu"))
    for z in (10, -10):
      q = requantize(acc, jnp.asarray(m0), jnp.asarray(shift), jnp.int32(z), lo=-128, hi=127)
      np.testing.assert_array_equal(np.asarray(q),
                                    ref.requantize_integer(acc, m0, shift, z, -128, 127))

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties(self):
    """Exact half-integers: "float" rounds them to even, "integer" rounds them up."""
    acc = np.array([[2, 6, 10, -2, -6, -10, 1, 3]], np.int32)  # acc / 4 = +-0.5, +-1.5, +-2.5
    relu_off = dict(lo=-128, hi=127)
    q_float = self.variant(arith.requantize_float, static_argnames=("lo", "hi", "relu"))(
        acc, jnp.float32(0.25), jnp.int32(0), **relu_off)
    np.testing.assert_array_equal(np.asarray(q_float), [[0, 2, 2, 0, -2, -2, 0, 1]])
    q_int = self.variant(arith.requantize_integer, static_argnames=("lo", "hi", "relu"))(
        acc, jnp.int32(2**30), jnp.int32(32), jnp.int32(0), **relu_off)
    np.testing.assert_array_equal(np.asarray(q_int), [[1, 2, 3, 0, -1, -2, 0, 1]])

  def test_fused_relu_clamps_at_the_zero_point(self):
    acc = np.arange(-40, 40, 4, dtype=np.int32).reshape(1, -1)
    for z in (-20, 0, 33):
      for fn, args in ((arith.requantize_float, (jnp.float32(0.5),)),
                       (arith.requantize_integer, (jnp.int32(2**30), jnp.int32(31)))):
        fn = jax.jit(fn, static_argnames=("lo", "hi", "relu"))
        q = np.asarray(fn(acc, *args, jnp.int32(z), lo=-128, hi=127, relu=True))
        plain = np.asarray(fn(acc, *args, jnp.int32(z), lo=-128, hi=127, relu=False))
        np.testing.assert_array_equal(q, np.maximum(plain, z))
        assert q.min() == z


# ------------------------------------------------------------------------------------------
# mul_shift_round and quantize_multiplier.

_EXTREME_ACC = np.array([ref.INT32_MIN, ref.INT32_MIN + 1, -(2**30), -65537, -65536, -65535, -1,
                         0, 1, 65535, 65536, 65537, 2**30, ref.INT32_MAX - 1, ref.INT32_MAX],
                        np.int64)
_EXTREME_M0 = np.array([2**30, 2**30 + 1, 3 * 2**29, 2**31 - 2, 2**31 - 1], np.int64)


class MulShiftRoundTest(chex.TestCase):

  # op by op: test_extremes_every_shift_eager (-m slow); test_random runs mul_shift_round op
  # by op
  @chex.variants(with_jit=True)
  def test_extremes_every_shift(self):
    _check_extremes_every_shift(self.variant)

  @chex.variants(with_jit=True, without_jit=True)
  def test_random(self):
    fn = self.variant(arith.mul_shift_round)

    @SETTINGS
    @hypothesis.given(
        hnp.arrays(np.int32, (4, 6), elements=st.integers(ref.INT32_MIN, ref.INT32_MAX)),
        hnp.arrays(np.int32, (1, 6), elements=st.integers(2**30, 2**31 - 1)),
        hnp.arrays(np.int32, (4, 1), elements=st.integers(1, 62)))
    def check(acc, m0, shift):
      np.testing.assert_array_equal(np.asarray(fn(acc, m0, shift)),
                                    ref.mul_shift_round(acc, m0, shift))

    check()


def _check_integer_saturates(variant):
  """M = 2^28: the product leaves int32 and saturates (zero point 0)."""
  acc = np.array([[ref.INT32_MAX, ref.INT32_MIN, 3, -3, 2**20, -(2**20)]], np.int32)
  m0 = np.full((1, 6), 2**30, np.int32)
  shift = np.full((1, 6), 2, np.int32)  # M = 2^28
  q = variant(arith.requantize_integer, static_argnames=("lo", "hi", "relu"))(
      acc, jnp.asarray(m0), jnp.asarray(shift), jnp.int32(0), lo=-128, hi=127)
  np.testing.assert_array_equal(np.asarray(q), [[127, -128, 127, -128, 127, -128]])


def _check_extremes_every_shift(variant):
  """Every shift 1..62 against extreme accumulators and multipliers, by Python integers."""
  acc = _EXTREME_ACC[:, None, None]
  m0 = _EXTREME_M0[None, :, None]
  shift = np.arange(1, 63, dtype=np.int64)[None, None, :]
  shape = np.broadcast_shapes(acc.shape, m0.shape, shift.shape)
  got = variant(arith.mul_shift_round)(
      jnp.asarray(np.broadcast_to(acc, shape), jnp.int32),
      jnp.asarray(np.broadcast_to(m0, shape), jnp.int32),
      jnp.asarray(np.broadcast_to(shift, shape), jnp.int32))
  assert got.dtype == jnp.int32
  expected = np.empty(shape, np.int64)
  for i, j, s in np.ndindex(*shape):
    a, m, r = int(_EXTREME_ACC[i]), int(_EXTREME_M0[j]), s + 1
    expected[i, j, s] = min(max((a * m + 2 ** (r - 1)) >> r, ref.INT32_MIN), ref.INT32_MAX)
  np.testing.assert_array_equal(np.asarray(got), expected)
  # Saturation seen.
  assert (expected == ref.INT32_MAX).any() and (expected == ref.INT32_MIN).any()


def _eagerly(fn, **_):
  """The function itself, op by op (chex's without_jit variant)."""
  return fn


@pytest.mark.slow
def test_integer_saturates_eager():
  _check_integer_saturates(_eagerly)


@pytest.mark.slow
def test_extremes_every_shift_eager():
  _check_extremes_every_shift(_eagerly)


def _relative_error(m0, shift, multiplier) -> float:
  worst = Fraction(0)
  for a, r, m in zip(np.ravel(m0), np.ravel(shift), np.ravel(multiplier)):
    exact = Fraction(float(m))
    worst = max(worst, abs(Fraction(int(a), 2 ** int(r)) - exact) / exact)
  return worst


@SETTINGS
@hypothesis.given(hnp.arrays(np.float64, (6,), elements=st.one_of(
    st.floats(2.0**-31, 2.0**30, exclude_max=True),
    st.floats(2.0**30 - 1.0, 2.0**30, exclude_max=True),  # the capped top
    st.floats(2.0**-31, 2.0**-31 * (1 + 2.0**-20)))))
def test_quantize_multiplier(multiplier):
  """Anywhere in [2^-31, 2^30): M0 in [2^30, 2^31), r in [1, 62], M0 / 2^r within 2^-31 of M
  (relative), exact Fraction arithmetic."""
  m0, shift = arith.quantize_multiplier(multiplier)
  assert m0.dtype == np.int32 and shift.dtype == np.int32 and m0.shape == multiplier.shape
  assert np.all((m0.astype(np.int64) >= 2**30) & (m0.astype(np.int64) < 2**31))
  assert np.all((shift >= 1) & (shift <= 62))
  assert _relative_error(m0, shift, multiplier) < Fraction(1, 2**31)


def test_quantize_multiplier_edges():
  # A mantissa that rounds up to 2^31 is halved; powers of two are exact.
  below_one = np.nextafter(1.0, 0.0)
  m0, shift = arith.quantize_multiplier(np.array([below_one, 1.0, 0.5, 2.0**-31, 3.0]))
  np.testing.assert_array_equal(m0, [2**30, 2**30, 2**30, 2**30, 3 * 2**29])
  np.testing.assert_array_equal(shift, [30, 30, 31, 61, 29])
  assert _relative_error(m0, shift, np.array([below_one])) < Fraction(1, 2**31)
  for bad in (0.0, -0.5, np.nan, np.inf):
    with pytest.raises(ValueError, match="finite and > 0"):
      arith.quantize_multiplier(np.array([0.5, bad]))
  # The range is checked on M itself, before rounding: just below 2^-31 is refused even though
  # its mantissa would round up to 2^-31 exactly (r = 61).
  for bad in (2.0**30, 2.0**40, 2.0**-34, np.nextafter(2.0**-31, 0.0)):
    with pytest.raises(ValueError, match=r"\[2\^-31, 2\^30\)"):
      arith.quantize_multiplier(np.array([0.5, bad]))


def test_quantize_multiplier_just_below_the_upper_bound():
  """Just below 2^30 the mantissa rounds up to 2^31 and halving it would need r = 0: M0 is
  capped at 2^31 - 1 with r = 1 (M0 / 2 = 2^30 - 1/2, within 2^-31 of M), and the fixed
  point multiplies by it exactly."""
  top = np.array([np.nextafter(2.0**30, 0.0), 2.0**30 - 0.25, 2.0**30 - 0.5])
  m0, shift = arith.quantize_multiplier(top)
  np.testing.assert_array_equal(m0, [2**31 - 1, 2**31 - 1, 2**31 - 1])
  np.testing.assert_array_equal(shift, [1, 1, 1])
  assert _relative_error(m0, shift, top) < Fraction(1, 2**31)
  # One unit lower, 2 M is an integer: no rounding, no cap.
  m0_below, shift_below = arith.quantize_multiplier(np.array([2.0**30 - 1.0]))
  assert (int(m0_below[0]), int(shift_below[0])) == (2**31 - 2, 1)
  acc = np.array([[-3, -1, 1, 2, 3, 1000]], np.int32)
  m0, shift = m0[:1].reshape(1, 1), shift[:1].reshape(1, 1)
  q = jax.jit(arith.mul_shift_round)(jnp.asarray(acc), jnp.asarray(m0), jnp.asarray(shift))
  np.testing.assert_array_equal(np.asarray(q), ref.mul_shift_round(acc, m0, shift))


def test_accumulator_bound():
  """max|q_x| sum_k |q_w| per channel, q_x anywhere in the clamp range (the 8-bit storage
  range: 128 for every 8-bit grid): it bounds the largest |acc| any input reaches, and equals
  it for a kernel of one sign."""
  rng = np.random.default_rng(2)
  kernel = rng.integers(-128, 128, (3, 3, 4, 5)).astype(np.int64)
  kernel[..., 0] = np.abs(kernel[..., 0])
  widest = {}
  for spec in (QuantSpec(bits=8), QuantSpec(bits=8, signed=False, reduce_range=True),
               QuantSpec(bits=8, reduce_range=True, symmetric=True),
               QuantSpec(bits=8, signed=False), QuantSpec(bits=4, signed=False)):
    lo, hi = ref.int8_bounds(spec)
    widest[spec.bits] = max(-lo, hi)
    bound = arith.accumulator_bound(kernel, reduce_axes=(0, 1, 2), input_spec=spec)
    np.testing.assert_array_equal(bound, max(-lo, hi) * np.abs(kernel).sum(axis=(0, 1, 2)))
    pos = np.where(kernel > 0, kernel, 0).sum(axis=(0, 1, 2))
    neg = np.where(kernel < 0, kernel, 0).sum(axis=(0, 1, 2))
    # acc is linear in each q_x: its extremes sit at the grid's ends, sign by sign.
    reached = np.maximum(np.abs(pos * hi + neg * lo), np.abs(pos * lo + neg * hi))
    assert np.all(reached <= bound)
    assert reached[0] == bound[0]
  assert widest == {8: 128, 4: 15}
