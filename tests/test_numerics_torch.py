"""Parity of `qjax.numerics` with PyTorch 2.13's eager-mode quantization (CPU kernels).

What is compared, and how strictly:

  * qparams: `minmax` + `qparams_from_minmax` against `torch.ao.quantization.MinMaxObserver`
    and `PerChannelMinMaxObserver` fed the same data, for every spec QuantSpec accepts
    (bits 2..16 x signed x symmetric x narrow_range x reduce_range) per-tensor, and for
    samples of them per-channel (axis 0, axis 1) and under jax.jit; also with a large eps.
    Ranges, scales (bitwise) and zero points must be identical. The default run takes a
    sample of widths (every flag combination of each); the full grid runs with -m slow.
  * integers (grids of every flag combination at 2, 4, 8, 9 and 16 bits; per-channel on a
    rotation over them by default, on all of them with -m slow): `quantize` against
    `torch.quantize_per_tensor` / `torch.quantize_per_channel` `.int_repr()`: exactly equal,
    exact float ties and near ties included. Torch clamps to its dtype's full range ((q)int8 /
    quint8 up to 8 bits, qint32 above), so its integers are clipped to [qmin, qmax] first
    (exact: the zero point lies inside both ranges).
  * `dequantize` against torch's `.dequantize()` of the same integers: bitwise equal.
  * `quantize_dequantize` against `torch.fake_quantize_per_tensor_affine` /
    `torch.fake_quantize_per_channel_affine`: bitwise equal.

No float tolerance is used anywhere in this file: every comparison is exact.

How a QuantSpec maps to a torch observer (`torch_observer` below): torch's default ranges
exist for 8 and 16 bits without narrow_range (qint8 / quint8 / int16 / uint16), and its
`reduce_range` flag halves them the way qjax does for 8 bits (torch ignores it for int16 /
uint16, and refuses it for symmetric quint8). Everything else is passed as a customised
range, quant_min=spec.qmin, quant_max=spec.qmax, with dtype qint32 (signed) or quint8
(unsigned); the dtype then only chooses the symmetric zero point. Torch insists that a
customised range contains 0, which an unsigned narrow grid [1, 2^b - 1] does not: for those
the observer is built with quant_min=0 and its `quant_min` attribute set to 1 afterwards, so
torch's own `_calculate_qparams` runs on qjax's grid.

Data: normal data, data with values far outside the range (up to 1e3 x the range), exact
float ties (power-of-two scales, x = (k + 0.5) * S, with odd and even zero points, which is
where "round then add Z" and "add Z then round" differ), and adversarial near ties
(x = (k + 0.5) * S * (1 +- 3e-7) with a non-power-of-two S, where fused and unfused
multiply-adds round differently), half of them on the clamping boundaries.
Inf and NaN are left out: torch's behaviour on them is undefined (float -> int64 casts);
tests/test_numerics.py documents qjax's.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from support import cases  # noqa: E402
import qjax  # noqa: E402
from support import reference as ref  # noqa: E402
from qjax import QParams, QuantSpec  # noqa: E402

from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver  # noqa: E402

# Torch 2.13 announces the deprecation of its quantized dtypes on first use; they still work.
pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.quantize_per_tensor, torch.quantize_per_channel:UserWarning")

# ------------------------------------------------------------------------------------------
# Specs, layouts, call modes.






def _grid_specs():
  """Specs whose grids differ in every way quantize can see (symmetric does not matter there):
  all flag combinations at torch's native 8 and 16 bits, and a spread of other widths."""
  specs = []
  for bits, signed, narrow, reduce in itertools.product(
      (2, 4, 8, 9, 16), (True, False), (False, True), (False, True)):
    if reduce and bits not in (4, 8, 16):
      continue
    specs.append(QuantSpec(bits=bits, signed=signed, narrow_range=narrow, reduce_range=reduce))
  return specs


ALL_SPECS = cases.all_specs()
GRID_SPECS = _grid_specs()

# layout name -> (axis, data shape). Odd sizes exercise the vector kernels' scalar tails;
# every case has >= 10k elements.
LAYOUTS = {
    "per_tensor": (None, (101, 103)),
    "axis0": (0, (12, 37, 29)),
    "axis1": (1, (31, 12, 29)),
}

_JIT = {
    "quantize": jax.jit(qjax.quantize, static_argnums=1),
    "dequantize": jax.jit(qjax.dequantize, static_argnums=1),
    "quantize_dequantize": jax.jit(qjax.quantize_dequantize, static_argnums=1),
}


def _fn(name, mode):
  """qjax.<name> called eagerly, or wrapped in jax.jit with the spec static."""
  return getattr(qjax, name) if mode == "eager" else _JIT[name]


@functools.partial(jax.jit, static_argnums=1, static_argnames="eps")
def _jit_minmax_qparams(x, spec, **kwargs):
  """minmax and qparams_from_minmax in one jitted program, as an observer runs them: one
  compilation per spec and shape instead of two, both wrappers traced under the outer jit."""
  lo, hi = qjax.minmax(x, spec)
  return lo, hi, qjax.qparams_from_minmax(lo, hi, spec, **kwargs)


MODES = ("eager", "jit")




# ------------------------------------------------------------------------------------------
# Torch side.


def torch_observer(spec, *, eps=None):
  """The torch observer whose grid and zero-point rule are those of `spec` (module docstring)."""
  kwargs = {} if eps is None else {"eps": eps}
  if spec.per_channel:
    cls = PerChannelMinMaxObserver
    kwargs["ch_axis"] = spec.axis
    qscheme = torch.per_channel_symmetric if spec.symmetric else torch.per_channel_affine
  else:
    cls = MinMaxObserver
    qscheme = torch.per_tensor_symmetric if spec.symmetric else torch.per_tensor_affine
  # Torch refuses symmetric quint8 with reduce_range on its default range.
  default_range = not spec.narrow_range and (
      (spec.bits == 8 and not (spec.symmetric and not spec.signed and spec.reduce_range))
      or (spec.bits == 16 and not spec.reduce_range))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # reduce_range's deprecation notice
    if default_range:
      dtype = {(8, True): torch.qint8, (8, False): torch.quint8,
               (16, True): torch.int16, (16, False): torch.uint16}[spec.bits, spec.signed]
      obs = cls(dtype=dtype, qscheme=qscheme, reduce_range=spec.reduce_range, **kwargs)
    else:
      dtype = torch.qint32 if spec.signed else torch.quint8
      obs = cls(dtype=dtype, qscheme=qscheme, quant_min=min(spec.qmin, 0),
                quant_max=spec.qmax, reduce_range=False, **kwargs)
      obs.quant_min = spec.qmin  # unsigned narrow grids start at 1; see the module docstring
  assert (obs.quant_min, obs.quant_max) == (spec.qmin, spec.qmax), (spec, obs)
  return obs


def torch_qparams(x, spec, *, eps=None):
  obs = torch_observer(spec, eps=eps)
  obs(torch.from_numpy(x))
  scale, zero_point = obs.calculate_qparams()
  return (obs.min_val.numpy(), obs.max_val.numpy(), scale.numpy().astype(np.float32),
          zero_point.numpy().astype(np.int64))


def torch_quantize(x, spec, scale, zero_point):
  """torch.quantize_per_tensor / _per_channel, as (int64 integers, the quantized tensor).

  Torch clamps to its dtype's full range, so the integers are clipped to [qmin, qmax] for
  the narrower qjax grids (the zero point lies inside both, so this is exact)."""
  xt = torch.from_numpy(x)
  dtype = (torch.qint8 if spec.signed else torch.quint8) if spec.bits <= 8 else torch.qint32
  if spec.per_channel:
    qt = torch.quantize_per_channel(xt, torch.from_numpy(scale.astype(np.float64)),
                                    torch.from_numpy(zero_point.astype(np.int64)),
                                    spec.axis % x.ndim, dtype)
  else:
    qt = torch.quantize_per_tensor(xt, float(scale), int(zero_point), dtype)
  ints = qt.int_repr().numpy().astype(np.int64)
  return np.clip(ints, spec.qmin, spec.qmax), qt


def torch_from_ints(q, spec, scale, zero_point, axis):
  """A torch quantized tensor holding exactly the integers `q`."""
  if spec.bits <= 8:
    ints = torch.from_numpy(q.astype(np.int8 if spec.signed else np.uint8))
  else:
    ints = torch.from_numpy(q.astype(np.int32))
  if spec.per_channel:
    return torch._make_per_channel_quantized_tensor(
        ints, torch.from_numpy(scale.astype(np.float64)),
        torch.from_numpy(zero_point.astype(np.int64)), axis)
  return torch._make_per_tensor_quantized_tensor(ints, float(scale), int(zero_point))


def torch_fake_quant(x, spec, scale, zero_point):
  xt = torch.from_numpy(x)
  if spec.per_channel:
    return torch.fake_quantize_per_channel_affine(
        xt, torch.from_numpy(scale), torch.from_numpy(zero_point.astype(np.int32)),
        spec.axis % x.ndim, spec.qmin, spec.qmax).numpy()
  return torch.fake_quantize_per_tensor_affine(xt, float(scale), int(zero_point), spec.qmin,
                                               spec.qmax).numpy()


# ------------------------------------------------------------------------------------------
# Data.

KINDS = ("normal", "outside", "ties_even_zp", "ties_odd_zp", "near_ties")




def _affine_qparams(lo, hi, spec):
  """Plain affine qparams for a range (float64 math): any reasonable qparams will do, both
  sides get the same ones."""
  lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
  scale = np.maximum((hi - lo) / (spec.qmax - spec.qmin), 1e-6).astype(np.float32)
  zero_point = np.clip(spec.qmin - np.rint(lo / scale), spec.qmin, spec.qmax).astype(np.int32)
  return scale, zero_point






def make_case(kind, spec, shape, seed):
  """(x float32, scale float32, zero_point int32); qparams shape () or (C,)."""
  rng = np.random.default_rng(seed)
  ndim = len(shape)
  n = shape[spec.axis % ndim] if spec.per_channel else None
  bc = lambda v: ref.broadcast(np.asarray(v), spec.axis, ndim)  # noqa: E731
  if kind in ("normal", "outside"):
    size = 1 if n is None else n
    mu = rng.normal(size=size) * 2.0
    sigma = np.exp(rng.uniform(-3.0, 3.0, size=size))
    if n is None:
      mu, sigma = mu[0], sigma[0]
    x = (rng.normal(size=shape) * bc(sigma) + bc(mu)).astype(np.float32)
    if spec.per_channel:
      axis = spec.axis % ndim
      others = tuple(a for a in range(ndim) if a != axis)
      lo, hi = x.min(axis=others).astype(np.float64), x.max(axis=others).astype(np.float64)
    else:
      lo, hi = float(x.min()), float(x.max())
    scale, zero_point = _affine_qparams(lo, hi, spec)
    if kind == "outside":
      # A quarter of the entries 1 to 1000 ranges beyond either end of the range.
      width = bc(np.maximum(hi, 0.0) - np.minimum(lo, 0.0))
      far = rng.uniform(1.0, 1e3, size=shape) * width
      sign = rng.random(shape) < 0.5
      outside = np.where(sign, bc(np.maximum(hi, 0.0)) + far, bc(np.minimum(lo, 0.0)) - far)
      x = np.where(rng.random(shape) < 0.25, outside, x).astype(np.float32)
    return x, np.asarray(scale, np.float32), np.asarray(zero_point, np.int32)
  if kind in ("ties_even_zp", "ties_odd_zp"):
    # Power-of-two scales make x = (k + 0.5) * S and x * (1/S) exact: every entry is a tie.
    parity = 0 if kind == "ties_even_zp" else 1
    zero_point = cases.zero_points(rng, spec, n, parity)
    exps = rng.integers(3, 8, size=1 if n is None else n)
    scale = np.ldexp(np.float32(1.0), -exps).astype(np.float32)
    scale = scale[0] if n is None else scale
    k = cases.half_points(rng, spec, shape, bc(zero_point), 0.2)
    x = ((k + 0.5) * bc(scale)).astype(np.float32)
    assert np.array_equal(x.astype(np.float64), (k + 0.5) * bc(scale).astype(np.float64))
    return x, np.asarray(scale, np.float32), np.asarray(zero_point, np.int32)
  if kind == "near_ties":
    # Within a few float32 ulps of a half-integer multiple of a non-power-of-two scale: the
    # rounding of x * (1/S) (+ Z) decides, so each of torch's evaluation orders shows.
    zero_point = cases.zero_points(rng, spec, n, None)
    scale = rng.uniform(0.01, 0.1, size=1 if n is None else n).astype(np.float32)
    scale = scale[0] if n is None else scale
    k = cases.half_points(rng, spec, shape, bc(zero_point), 0.5)
    jitter = 1.0 + rng.uniform(-3e-7, 3e-7, size=shape)
    x = ((k + 0.5) * bc(scale).astype(np.float64) * jitter).astype(np.float32)
    return x, np.asarray(scale, np.float32), np.asarray(zero_point, np.int32)
  raise ValueError(kind)


def _qp(scale, zero_point):
  return QParams(jnp.asarray(scale, jnp.float32), jnp.asarray(zero_point, jnp.int32))




# ------------------------------------------------------------------------------------------
# qparams.


def _range_data(spec, shape, seed):
  """Data sets whose ranges cover the cases of the qparams formulas: mixed sign, all
  positive, all negative (0 joins the range), very wide, tiny (scale floored at eps),
  constant zero. Per-tensor: one array per case; per-channel: one case per channel."""
  rng = np.random.default_rng(seed)
  makers = [
      lambda s: rng.normal(0.3, 2.0, size=s),
      lambda s: rng.uniform(0.5, 3.0, size=s),
      lambda s: -rng.uniform(0.5, 3.0, size=s),
      lambda s: rng.uniform(-0.1, 50.0, size=s),
      lambda s: rng.normal(size=s) * 1e6,
      lambda s: rng.normal(size=s) * 1e-9,
      lambda s: np.zeros(s),
      lambda s: rng.normal(-7.0, 0.01, size=s),
  ]
  if not spec.per_channel:
    return [f(shape).astype(np.float32) for f in makers]
  axis = spec.axis % len(shape)
  moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
  x = np.stack([makers[c % len(makers)](moved[1:]) for c in range(moved[0])])
  return [np.moveaxis(x, 0, axis).astype(np.float32)]


def _check_qparams_against_torch(x, spec, mode, *, eps=None):
  kwargs = {} if eps is None else {"eps": eps}
  if mode == "eager":
    lo, hi = qjax.minmax(jnp.asarray(x), spec)
    qp = qjax.qparams_from_minmax(lo, hi, spec, **kwargs)
  else:
    lo, hi, qp = _jit_minmax_qparams(jnp.asarray(x), spec, **kwargs)
  t_lo, t_hi, t_scale, t_zp = torch_qparams(x, spec, eps=eps)
  shape = (-1,) if spec.per_channel else ()
  np.testing.assert_array_equal(np.asarray(lo), t_lo.reshape(shape))
  np.testing.assert_array_equal(np.asarray(hi), t_hi.reshape(shape))
  assert qp.scale.dtype == jnp.float32 and qp.zero_point.dtype == jnp.int32
  assert qp.scale.shape == qp.zero_point.shape == t_scale.reshape(shape).shape
  np.testing.assert_array_equal(cases.bits_of(qp.scale), cases.bits_of(t_scale.reshape(shape)),
                                err_msg=f"scales differ for {spec}: {qp.scale} vs {t_scale}")
  np.testing.assert_array_equal(np.asarray(qp.zero_point, np.int64), t_zp.reshape(shape),
                                err_msg=f"zero points differ for {spec}")
  return t_scale


def _qparam_combos():
  """Every spec per-tensor, eagerly; per-channel (axis 0 and axis 1) and jax.jit on samples of
  specs (the per-channel formulas are the per-tensor ones elementwise, and both modes run the
  same compiled core: these check the reductions and the wrappers, e.g. the exact-division
  barrier under an outer jit). Every spec costs a compilation, hence the sampling."""
  combos = [(spec, "per_tensor", "eager") for spec in ALL_SPECS]
  combos += [(spec, "axis0", "eager") for spec in ALL_SPECS if spec.bits in (2, 5, 8, 16)]
  combos += [(spec, "axis1", "eager") for spec in ALL_SPECS if spec.bits in (3, 8, 16)]
  combos += [(spec, layout, "jit") for spec in ALL_SPECS if spec.bits in (8, 16)
             for layout in ("per_tensor", "axis1")]
  return combos


def _qparam_default(spec, layout, mode):
  """The default run's share of `_qparam_combos`: every flag combination at 2 bits (no
  reduce_range), 3 bits (the smallest reduced grid), 4 bits, torch's native 8 and 16 bits and
  9 bits (a customised qint32 range) per-tensor; per-channel and jax.jit on one width each.
  Every flag, each sign, torch's default and customised ranges, each layout and each mode."""
  if mode == "jit":
    return (spec.bits, layout) in ((8, "per_tensor"), (16, "axis1"))
  if layout == "per_tensor":
    return spec.bits in (2, 3, 4, 8, 9, 16)
  return spec.bits in ((2, 8) if layout == "axis0" else (3, 16))


def _qparam_cases():
  """`_qparam_combos` as params; the combinations outside `_qparam_default` are marked slow
  (the full grid runs with -m slow)."""
  return [pytest.param(*c, id=f"{cases.spec_id(c[0])}-{c[1]}-{c[2]}",
                       marks=() if _qparam_default(*c) else pytest.mark.slow)
          for c in _qparam_combos()]


@pytest.mark.parametrize("spec, layout, mode", _qparam_cases())
def test_qparams_match_torch_observers(spec, layout, mode):
  axis, shape = LAYOUTS[layout]
  spec = dataclasses.replace(spec, axis=axis)
  for x in _range_data(spec, shape, seed=spec.bits):
    _check_qparams_against_torch(x, spec, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ("per_tensor", "axis1"))
@pytest.mark.parametrize("spec", [
    QuantSpec(bits=8, signed=False),
    QuantSpec(bits=8, signed=True, symmetric=True),
    QuantSpec(bits=4, signed=True, narrow_range=True),
    QuantSpec(bits=16, signed=False, symmetric=True),
    QuantSpec(bits=6, signed=False, symmetric=True, narrow_range=True, reduce_range=True),
], ids=cases.spec_id)
def test_qparams_eps_matches_torch(spec, layout, mode):
  """A large eps floors the scale of tiny ranges (and only of those) in both."""
  axis, shape = LAYOUTS[layout]
  spec = dataclasses.replace(spec, axis=axis)
  rng = np.random.default_rng(7)
  eps = 1e-2
  if spec.per_channel:
    # Channel ranges from 1e-6 to 1e4 straddle the floor.
    n = shape[axis]
    widths = ref.broadcast(np.logspace(-6, 4, n), spec.axis, len(shape))
    xs = [(rng.normal(size=shape) * widths + 0.1 * widths).astype(np.float32)]
  else:
    xs = [(rng.normal(size=shape) * w).astype(np.float32) for w in (1e-6, 1e-4, 1e-3, 1.0, 1e3)]
  scales = np.concatenate([_check_qparams_against_torch(x, spec, mode, eps=eps).ravel()
                           for x in xs])
  assert np.any(scales == np.float32(eps)) and np.any(scales > np.float32(eps))


# ------------------------------------------------------------------------------------------
# quantize, dequantize, quantize_dequantize.

def _grid_combos():
  """GRID_SPECS in every layout, eagerly; a sample under jax.jit."""
  jit_specs = [QuantSpec(bits=4, signed=True), QuantSpec(bits=8, signed=False, narrow_range=True,
               reduce_range=True), QuantSpec(bits=9, signed=False),
               QuantSpec(bits=16, signed=True, narrow_range=True)]
  combos = [(spec, layout, "eager") for spec in GRID_SPECS for layout in LAYOUTS]
  combos += [(spec, layout, "jit") for spec in jit_specs for layout in LAYOUTS]
  return combos


def _grid_default(spec, layout, mode):
  """The default run's share of `_grid_combos`: every spec of GRID_SPECS per-tensor; per
  channel, a rotation over each width's flag combinations puts a quarter of them on axis 0
  and another quarter on axis 1 (each layout sees every width, both signs, narrow and
  reduced grids); each jit spec in one layout."""
  if mode == "jit":
    return (spec.bits, layout) in ((4, "per_tensor"), (8, "axis0"), (9, "axis1"),
                                   (16, "per_tensor"))
  if layout == "per_tensor":
    return True
  width = [s for s in GRID_SPECS if s.bits == spec.bits]
  k = width.index(dataclasses.replace(spec, axis=None))
  offset = {2: 0, 4: 0, 8: 1, 9: 3, 16: 2}[spec.bits]
  return (k + offset) % 4 == ("axis0", "axis1").index(layout)


def _grid_cases():
  """`_grid_combos` as params; the combinations outside `_grid_default` are marked slow (the
  full grid runs with -m slow)."""
  return [pytest.param(*c, id=f"{cases.spec_id(c[0])}-{c[1]}-{c[2]}",
                       marks=() if _grid_default(*c) else pytest.mark.slow)
          for c in _grid_combos()]


_GRID_CASES = _grid_cases()


def _cases(spec, layout):
  axis, shape = LAYOUTS[layout]
  spec = dataclasses.replace(spec, axis=axis)
  for i, kind in enumerate(KINDS):
    x, scale, zero_point = make_case(kind, spec, shape, seed=1000 * spec.bits + i)
    yield kind, spec, x, scale, zero_point


@pytest.mark.parametrize("spec, layout, mode", _GRID_CASES)
def test_quantize_matches_torch_int_repr(spec, layout, mode):
  for kind, spec_, x, scale, zero_point in _cases(spec, layout):
    q = _fn("quantize", mode)(jnp.asarray(x), spec_, _qp(scale, zero_point))
    assert q.dtype == spec_.storage_dtype and q.shape == x.shape
    expected, _ = torch_quantize(x, spec_, scale, zero_point)
    got = np.asarray(q).astype(np.int64)
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, (
        f"{kind}: {bad.size} of {got.size} integers differ from torch for {spec_}; first at "
        f"x={x.flat[bad[0]]!r}: qjax {got.flat[bad[0]]}, torch {expected.flat[bad[0]]}")
    assert got.min() >= spec_.qmin and got.max() <= spec_.qmax


@pytest.mark.parametrize("spec, layout, mode", _GRID_CASES)
def test_dequantize_matches_torch(spec, layout, mode):
  for kind, spec_, x, scale, zero_point in _cases(spec, layout):
    q, _ = torch_quantize(x, spec_, scale, zero_point)  # both ends of the grid included
    q = q.astype(np.dtype(spec_.storage_dtype))
    got = _fn("dequantize", mode)(jnp.asarray(q), spec_, _qp(scale, zero_point))
    assert got.dtype == jnp.float32
    expected = torch_from_ints(q, spec_, scale, zero_point,
                               spec_.axis % x.ndim if spec_.per_channel else None).dequantize()
    np.testing.assert_array_equal(cases.bits_of(got), cases.bits_of(expected.numpy()), err_msg=kind)


@pytest.mark.parametrize("spec, layout, mode", _GRID_CASES)
def test_quantize_dequantize_matches_torch_fake_quantize(spec, layout, mode):
  for kind, spec_, x, scale, zero_point in _cases(spec, layout):
    got = np.asarray(_fn("quantize_dequantize", mode)(jnp.asarray(x), spec_,
                                                        _qp(scale, zero_point)))
    expected = torch_fake_quant(x, spec_, scale, zero_point)
    bad = np.flatnonzero(cases.bits_of(got) != cases.bits_of(expected))
    assert bad.size == 0, (
        f"{kind}: {bad.size} of {got.size} values differ from torch for {spec_}; first at "
        f"x={x.flat[bad[0]]!r}: qjax {got.flat[bad[0]]!r}, torch {expected.flat[bad[0]]!r}")


def test_data_generators_hit_what_they_claim():
  """The tie and outside kinds really contain ties / clamped values (guards the generators)."""
  spec = QuantSpec(bits=8, signed=True)
  x, scale, zp = make_case("ties_odd_zp", spec, (101, 103), seed=0)
  assert zp % 2 == 1
  frac = x.astype(np.float64) / np.float64(scale) - np.floor(x.astype(np.float64) / scale)
  assert np.all(frac == 0.5)
  x, scale, zp = make_case("outside", spec, (101, 103), seed=0)
  t = x.astype(np.float64) / scale + zp
  assert np.mean(t > spec.qmax + 100) > 0.05 and np.mean(t < spec.qmin - 100) > 0.05
  x, scale, zp = make_case("near_ties", spec, (101, 103), seed=0)
  t = x.astype(np.float64) / scale
  assert np.all(np.abs(t - np.floor(t) - 0.5) < 1e-4) and np.any(t != np.floor(t) + 0.5)
