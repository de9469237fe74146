"""The native int8 GEMM (`qjax.integer.kernels`) against XLA and NumPy: the same integers.

Every native path the CPU runs is forced in turn ("amx", "vnni", "avx2", "portable" and
"amx_emulated", the tile kernel with its tiles computed in C++; a path the CPU lacks is
skipped), all paths of a test in one jitted program, on random and adversarial
operands: all -128 / 127, one row, K not a
multiple of 4 or 64, odd N, an empty batch, shapes on both sides of the row count where the
kernel switches from streaming the weights to packing them, and sizes that use threads. The
int32 result is checked against `qjax.integer.arith.matmul` and a NumPy int64 reference
(modulo 2^32), the fused requantization against `FbgemmRequant` on XLA and a NumPy float32
reference; the XLA fallback and the selection rules without the library are checked too, and
a CPU without AMX is emulated with experiments.no_amx's seccomp filter.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import cases
from qjax.integer import arith
from qjax.integer import kernels
from qjax.integer import requant as rq
from qjax.integer.forms import base
from qjax.integer.forms.linear import Int8Dense
from qjax.numerics import QuantSpec
from qjax.qarray import QArray

AVAILABLE = kernels.native_paths()
PATHS = [pytest.param(p, marks=pytest.mark.skipif(p not in AVAILABLE,
                                                  reason=f"this CPU (or build) lacks {p}"))
         for p in kernels.NATIVE_PATHS]

# (M, N, K): one row; K not a multiple of 4 / 64; odd N; empty batches, no channels, K = 0
# (the result is the offset); up to 16 rows stream the weights, more pack them (the tile
# kernel: 17, 31, 33 rows around its 16- and 32-row blocks, an odd number of panels, K below
# one 64-byte chunk); the last four are large enough for the kernel's worker threads: the
# first splits its rows over them (every thread all panels: weights within L2), the second
# too, in several passes over its rows (700 KB of weights, more than a quarter of an L2 of
# 2 MB or less), the third has too few rows for that (the panels split), the last more than
# 1 MB of weights (the tile kernel's split of the panels over threads).
SHAPES = [(1, 1, 1), (1, 5, 3), (1, 64, 64), (1, 33, 130), (2, 7, 65), (3, 17, 63),
          (4, 16, 4), (5, 1, 1), (7, 33, 67), (16, 9, 70), (17, 9, 70), (31, 19, 257),
          (33, 17, 5), (40, 48, 128), (13, 100, 784), (0, 5, 7), (5, 0, 7), (3, 4, 0),
          (40, 5, 0), (64, 300, 450), (29, 700, 1001), (16, 700, 800), (40, 1030, 1090)]


def reference(x: np.ndarray, w: np.ndarray, offset: np.ndarray) -> np.ndarray:
  """sum_k x w + offset in int64, wrapped to int32 as XLA's int32 arithmetic wraps."""
  rows = x.reshape(int(np.prod(x.shape[:-1])), x.shape[-1])
  acc = rows.astype(np.int64) @ w.astype(np.int64).T + offset
  wrapped = (acc + 2**31) % 2**32 - 2**31
  return wrapped.astype(np.int32).reshape(x.shape[:-1] + (w.shape[0],))


def requant_reference(acc: np.ndarray, bias: np.ndarray, mult: np.ndarray, zero: int, lo: int,
                      hi: int, relu: bool) -> np.ndarray:
  """clamp(Z + rne((f32(acc) + b) * M), low, hi) in NumPy float32 (one rounding per op)."""
  y = (acc.astype(np.float32) + bias.astype(np.float32)) * mult.astype(np.float32)
  low = max(lo, zero) if relu else lo
  q = np.clip(np.rint(y), low - zero, hi - zero).astype(np.int64) + zero
  return q.astype(np.int8)


def operands(rng: np.random.Generator, m: int, n: int, k: int, kind: str = "random",
             offsets: int = 2**20):
  if kind == "random":
    x = rng.integers(-128, 128, (m, k), dtype=np.int8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
  else:
    xv, wv = {"min": (-128, -128), "max": (127, 127), "mixed": (-128, 127)}[kind]
    x, w = np.full((m, k), xv, np.int8), np.full((n, k), wv, np.int8)
  offset = rng.integers(-offsets, offsets + 1, n).astype(np.int32)
  return x, w, offset


def nonempty(x, w) -> bool:
  """arith.matmul (the XLA reference) takes non-empty operands only."""
  return bool(x.shape[0] and w.shape[0] and x.shape[-1])


# Each test below compiles one program for all its cases and paths: every distinct program
# costs an XLA compilation, and op-by-op dispatch would compile every operation on its own
# (jnp.asarray of a NumPy array too; jax.device_put does not compile).


@jax.jit
def matmul_on_every_path(cases):
  """kernels.matmul of every (x, w, offset) case on every native path."""
  return [[kernels.matmul(x, w, o, kernel=p) for p in AVAILABLE] for x, w, o in cases]


@jax.jit
def requant_on_every_path(cases):
  """(requant(acc) on XLA, [kernels.matmul_requant on every native path]) per case."""
  return [(r(acc), [kernels.matmul_requant(x, w, o, r, kernel=p) for p in AVAILABLE])
          for x, w, o, r, acc in cases]


def fbgemm(rng: np.random.Generator, n: int, k: int, *, per_channel: bool, zero: int,
           relu: bool, lo: int = -128, hi: int = 127) -> rq.FbgemmRequant:
  """Grids sized to the accumulators (std ~ 5500 sqrt(K) for uniform int8 operands), so that
  outputs spread over the grid and some clamp."""
  spread = 5500.0 * np.sqrt(max(k, 1))
  bias = rng.normal(0, spread, n).astype(np.float32)
  shape = (n,) if per_channel else ()
  mult = (rng.uniform(0.5, 2.0, shape) * 60 / spread).astype(np.float32)
  return rq.FbgemmRequant(bias=jax.device_put(bias), multiplier=jax.device_put(mult),
                          zero_point=np.int32(zero), lo=lo, hi=hi, relu=relu)


# ------------------------------------------------------------------------------------------
# int32 results.


@pytest.mark.parametrize("path", PATHS)
def test_path_is_available_and_resolves_to_itself(path):
  assert kernels.resolve(path) == path and path in kernels.native_paths()


def test_int32_matches_xla_and_numpy():
  rng = np.random.default_rng(0)
  cases = [operands(rng, m, n, k) for m, n, k in SHAPES]
  gots, xlas = jax.jit(lambda cases: (matmul_on_every_path(cases), [
      arith.matmul(x, w) if nonempty(x, w) else None for x, w, _ in cases]))(cases)
  for (x, w, offset), got_paths, xla in zip(cases, gots, xlas, strict=True):
    expected = reference(x, w, offset)
    for path, got in zip(AVAILABLE, got_paths, strict=True):
      got = np.asarray(got)
      np.testing.assert_array_equal(got, expected, err_msg=f"{path} {x.shape} x {w.shape}")
      if xla is not None:
        np.testing.assert_array_equal(got, np.asarray(xla) + offset,
                                      err_msg=f"{path} {x.shape} x {w.shape} vs XLA")
    if xla is not None:
      np.testing.assert_array_equal(np.asarray(xla) + offset, expected)


def test_int32_extreme_operands():
  """All -128 (the largest products, where uint8 x int8 or 16-bit sums would break), all 127,
  and -128 x 127, at row counts of both kernels and K with tails."""
  rng = np.random.default_rng(1)
  cases = [operands(rng, m, n, k, kind) for kind in ("min", "max", "mixed")
           for m, n, k in [(1, 3, 1001), (3, 17, 130), (37, 33, 515), (6, 16, 64)]]
  for (x, w, offset), gots in zip(cases, matmul_on_every_path(cases), strict=True):
    for path, got in zip(AVAILABLE, gots, strict=True):
      np.testing.assert_array_equal(np.asarray(got), reference(x, w, offset),
                                    err_msg=f"{path} {x[0, 0]} x {w[0, 0]} {x.shape} x {w.shape}")


def test_int32_wraps_like_xla():
  """K = 140000 products of -128 x -128 pass 2^31: the sum wraps modulo 2^32 on every path
  (the vnni path's +128 carry and -128 sum_k w correction included), as XLA's does."""
  k = 140_000
  x, w = np.full((2, k), -128, np.int8), np.full((3, k), -128, np.int8)
  w[1] = 127
  offset = np.array([0, 5, -7], np.int32)
  xla, gots = jax.jit(lambda x, w, o: (arith.matmul(x, w) + o[None], [
      kernels.matmul(x, w, o, kernel=p) for p in AVAILABLE]))(x, w, offset)
  np.testing.assert_array_equal(np.asarray(xla), reference(x, w, offset))
  for path, got in zip(AVAILABLE, gots, strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(xla), err_msg=path)


def test_leading_dims_and_no_offset():
  rng = np.random.default_rng(2)
  x = rng.integers(-128, 128, (2, 3, 45), dtype=np.int8)
  w = rng.integers(-128, 128, (9, 45), dtype=np.int8)
  gots, empties = jax.jit(lambda a, e, b: (
      [kernels.matmul(a, b, kernel=p) for p in AVAILABLE],
      [kernels.matmul(e, b, kernel=p) for p in AVAILABLE]))(x, np.zeros((0, 3, 45), np.int8), w)
  for path, got, empty in zip(AVAILABLE, gots, empties, strict=True):
    assert got.shape == (2, 3, 9) and got.dtype == jnp.int32, path
    np.testing.assert_array_equal(np.asarray(got), reference(x, w, np.zeros(9, np.int64)),
                                  err_msg=path)
    assert empty.shape == (0, 3, 9), path


# ------------------------------------------------------------------------------------------
# The fused requantization.


def test_requant_matches_fbgemm_requant():
  """Per-channel and per-tensor multipliers, with and without ReLU, in turn over SHAPES."""
  rng = np.random.default_rng(3)
  cases = []
  for i, (m, n, k) in enumerate(SHAPES):
    per_channel, relu = i % 2 == 0, i % 4 < 2
    zero = int(rng.integers(-20, 20))
    r = fbgemm(rng, n, k, per_channel=per_channel, zero=zero, relu=relu)
    x, w, offset = operands(rng, m, n, k, offsets=int(2000 * np.sqrt(k)))
    cases.append((x, w, offset, r, reference(x, w, offset)))
  for (x, w, _, r, acc), (want, gots) in zip(cases, requant_on_every_path(cases), strict=True):
    n, zero = w.shape[0], int(r.zero_point)
    want = np.asarray(want)
    mult = np.broadcast_to(np.asarray(r.multiplier), (n,))
    np.testing.assert_array_equal(
        want, requant_reference(acc, np.asarray(r.bias), mult, zero, -128, 127, r.relu),
        err_msg=f"XLA {x.shape} x {w.shape} vs NumPy")
    if want.size >= 1000:  # not saturated: the outputs spread over the grid
      assert len(np.unique(want)) > 30, (x.shape, w.shape)
    for path, got in zip(AVAILABLE, gots, strict=True):
      assert got.dtype == np.int8
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{path} {x.shape} x {w.shape}")


def test_requant_ties_narrow_grids_and_extremes():
  """Exact .5 ties (rne), a 4-bit output grid, a ReLU whose zero point lies above lo, and
  accumulators at the int32 extremes (the float32 product saturates before the clamp)."""
  rng = np.random.default_rng(4)
  n, k = 19, 66
  x, w, offset = operands(rng, 9, n, k)
  cases = [
      rq.FbgemmRequant(bias=np.full((n,), 0.5, np.float32), multiplier=np.float32(0.5),
                       zero_point=np.int32(0), lo=-128, hi=127, relu=False),
      rq.FbgemmRequant(bias=np.zeros((n,), np.float32), multiplier=np.float32(1e-3),
                       zero_point=np.int32(-2), lo=-8, hi=7, relu=False),
      rq.FbgemmRequant(bias=np.zeros((n,), np.float32), multiplier=np.float32(1e-3),
                       zero_point=np.int32(3), lo=-8, hi=7, relu=True),
      rq.FbgemmRequant(bias=np.zeros((n,), np.float32), multiplier=np.float32(7.0),
                       zero_point=np.int32(127), lo=-128, hi=127, relu=True),
  ]
  runs = [(x, w, off, r, reference(x, w, off)) for r in cases
          for off in (offset, np.full(n, 2**31 - 1, np.int32), np.full(n, -(2**31), np.int32))]
  # A non-finite bias (NaN, +-inf) requantizes as XLA converts it: NaN -> 0, then clamped.
  weird = np.array([np.nan, np.inf, -np.inf] * 7, np.float32)[:n]
  for zero, relu in ((0, False), (9, True), (-4, False)):
    r = rq.FbgemmRequant(bias=weird, multiplier=np.float32(1e-3),
                         zero_point=np.int32(zero), lo=-128, hi=127, relu=relu)
    runs.append((x, w, offset, r, reference(x, w, offset)))
  small = np.array([[1, 1]], np.int8), np.array([[1, 0], [1, 2], [3, 2], [2, 3]], np.int8)
  tie = rq.FbgemmRequant(bias=np.zeros((4,), np.float32), multiplier=np.float32(0.5),
                         zero_point=np.int32(0), lo=-128, hi=127, relu=False)
  results, tied = jax.jit(lambda runs, small, tie: (requant_on_every_path(runs), [
      kernels.matmul_requant(*small, None, tie, kernel=p) for p in AVAILABLE]))(
          runs, small, tie)
  for (_, _, off, r, _), (want, gots) in zip(runs, results, strict=True):
    for path, got in zip(AVAILABLE, gots, strict=True):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                    err_msg=f"{path} {r} offset {off[:2]}")
  for path, got in zip(AVAILABLE, tied, strict=True):  # 0.5, 1.5, 2.5, 2.5 -> even
    np.testing.assert_array_equal(np.asarray(got), [[0, 2, 2, 2]], err_msg=path)


def test_integer_requant_fused_matches_xla():
  """IntegerRequant fused into the kernel's epilogue (64-bit products, floor after adding
  2^(shift-1)) equals its XLA form on every path: shifts from 1 to 62 (below and above 32, the
  result saturating before the clamp), m0 across [2^30, 2^31), per tensor and per channel, a
  fused ReLU, accumulators at the int32 extremes, 1 / 9 / 40 rows (streamed weights, packed
  panels, the tile kernel)."""
  rng = np.random.default_rng(8)
  n, k = 21, 70
  runs = []
  for m, shifts, per_channel, zero, relu in [
      (9, np.arange(1, 63, 3)[:n], True, 0, False),
      (40, rng.integers(39, 44, n), True, -5, True),
      (1, rng.integers(20, 42, n), True, 7, False),
      (9, np.int32(41), False, 2, True),
      (40, np.int32(2), False, 0, False)]:
    x, w, offset = operands(rng, m, n, k, offsets=2**14)
    m0 = rng.integers(2**30, 2**31, n if per_channel else (), dtype=np.int64).astype(np.int32)
    r = rq.IntegerRequant(m0=jax.device_put(m0), shift=jax.device_put(np.int32(shifts)),
                          zero_point=np.int32(zero), lo=-128, hi=127, relu=relu)
    for off in (offset, np.full(n, 2**31 - 1, np.int32), np.full(n, -(2**31), np.int32)):
      runs.append((x, w, off, r, reference(x, w, off)))
  results = requant_on_every_path(runs)
  spread = 0
  for (x, _, off, r, _), (want, gots) in zip(runs, results, strict=True):
    spread = max(spread, len(np.unique(np.asarray(want))))
    for path, got in zip(AVAILABLE, gots, strict=True):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                    err_msg=f"{path} {x.shape} shift {r.shift} offset {off[:2]}")
  assert spread > 50  # outputs spread over the grid, not all clamped
  if AVAILABLE:
    bad = rq.IntegerRequant(m0=np.int32(2**30), shift=np.int32(63), zero_point=np.int32(0),
                            lo=-128, hi=127, relu=False)
    x, w, offset = operands(rng, 3, 4, 8)
    with pytest.raises(Exception, match=r"shift must lie in \[1, 62\]"):
      jax.block_until_ready(kernels.matmul_requant(x, w, offset, bad, kernel=AVAILABLE[0]))


# ------------------------------------------------------------------------------------------
# The integer Dense on every path, and the selection.


def _dense(requant: rq.Requantizer, w: np.ndarray, offset: np.ndarray) -> Int8Dense:
  qw = QArray(jax.device_put(w), jax.device_put(np.full((w.shape[0],), 0.01, np.float32)),
              jax.device_put(np.zeros((w.shape[0],), np.int32)),
              QuantSpec(bits=8, signed=True, symmetric=True, axis=0))
  return Int8Dense(kernel=qw, offset=jax.device_put(offset), requant=requant)


def test_int8_dense_is_bit_identical():
  rng = np.random.default_rng(5)
  n, k = 37, 150
  x, w, offset = operands(rng, 11, n, k)
  m0, shift = arith.quantize_multiplier(np.full(n, 2e-4))
  requants = [
      fbgemm(rng, n, k, per_channel=True, zero=4, relu=True),
      rq.FloatRequant(multiplier=np.float32(3e-4), zero_point=np.int32(-5), lo=-128,
                      hi=127, relu=False),
      rq.IntegerRequant(m0=jax.device_put(m0), shift=jax.device_put(shift), zero_point=np.int32(1),
                        lo=-128, hi=127, relu=True),
  ]
  ops = [_dense(r, w, offset) for r in requants]

  def forward(a):  # each op traced under QJAX_INT8_KERNEL = "xla" and every native path
    out = []
    for op in ops:
      runs = []
      for path in ("xla", *AVAILABLE):
        with kernels.use(path):
          runs.append(op(a))
      out.append(runs)
    return out

  for r, (expected, *gots) in zip(requants, jax.jit(forward)(x.reshape(1, 11, k)),
                                  strict=True):
    for path, got in zip(AVAILABLE, gots, strict=True):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(expected),
                                    err_msg=f"{path} {type(r).__name__}")


@pytest.mark.parametrize("amx_granted", [False, True])
def test_selection_rules(monkeypatch, amx_granted):
  """The choice of "auto", "xla", "native" and named paths, on a CPU that grants AMX-INT8 and
  on one that does not (simulated: "auto" gives XLA what it was measured faster on where AMX
  is granted, so the rules must not depend on the CPU that runs them)."""
  monkeypatch.delenv(kernels.ENV_VAR, raising=False)
  monkeypatch.setattr(kernels, "amx_int8", lambda: amx_granted)
  assert kernels.resolve() == kernels.DEFAULT_KERNEL.replace("auto", kernels.resolve("auto"))
  assert kernels.resolve("xla") == "xla"
  best = AVAILABLE[0] if AVAILABLE else "xla"
  assert kernels.resolve("AUTO") == best
  assert kernels.resolve("AUTO", macs=1000) == best
  assert kernels.resolve("AUTO", xla_amx=True) == ("xla" if amx_granted else best)
  monkeypatch.setenv(kernels.ENV_VAR, "xla")
  assert kernels.resolve() == "xla"
  if AVAILABLE:
    assert kernels.resolve("native") == AVAILABLE[0]
    assert kernels.resolve("native", xla_amx=True) == AVAILABLE[0]
    monkeypatch.setenv(kernels.ENV_VAR, "native")
    assert kernels.resolve() == AVAILABLE[0]
    assert kernels.resolve("xla") == "xla"  # the argument wins over the environment
  monkeypatch.setenv(kernels.ENV_VAR, "fast")
  with pytest.raises(ValueError, match=r"QJAX_INT8_KERNEL must be one of .*'vnni'"):
    kernels.resolve()
  with pytest.raises(ValueError, match=r"kernel must be one of .*'portable'"):
    kernels.resolve("amx512")
  for missing in set(kernels.NATIVE_PATHS) - set(AVAILABLE):
    with pytest.raises(ValueError, match="runs the native paths"):
      kernels.resolve(missing)


def test_thread_count_variable_must_be_a_positive_integer(monkeypatch):
  """QJAX_INT8_THREADS is read once, when the library loads (the check runs then)."""
  for good in ("1", "2", "64"):
    monkeypatch.setenv(kernels.THREADS_ENV_VAR, good)
    kernels._check_threads_env()  # pylint: disable=protected-access
  for bad in ("0", "-2", "two", "1.5", ""):
    monkeypatch.setenv(kernels.THREADS_ENV_VAR, bad)
    with pytest.raises(ValueError, match=f"QJAX_INT8_THREADS must be a positive integer .* got "
                                         f"'{bad}'"):
      kernels._check_threads_env()  # pylint: disable=protected-access


def test_auto_leaves_to_xla_what_it_runs_faster_on_amx(monkeypatch):
  """With AMX-INT8 granted (simulated: no CPU here need have it), "auto" gives XLA the
  products of large weights not packed at 17 to 511 rows (`xla_on_amx`) and keeps the rest
  (packed weights, small weights, up to 16 rows, 512 rows and more, elementwise operations)
  on the native kernel; a named path is kept whatever the product."""
  lo, hi = kernels.AUTO_AMX_XLA_ROWS
  big = kernels.AUTO_AMX_XLA_WEIGHTS
  assert kernels.xla_on_amx(lo, big, 1, packed=False)
  assert kernels.xla_on_amx(hi - 1, 1, big, packed=False)
  for rows, n, k, packed in [(lo - 1, big, 1, False), (hi, big, 1, False),
                             (64, big - 1, 1, False), (64, 1024, 1024, True)]:
    assert not kernels.xla_on_amx(rows, n, k, packed=packed), (rows, n, k, packed)
  if not AVAILABLE:
    pytest.skip("the native library is not built")
  monkeypatch.delenv(kernels.ENV_VAR, raising=False)
  w = jax.ShapeDtypeStruct((1024, 1024), jnp.int8)
  packed = jax.eval_shape(kernels.pack, w)

  def lowered(rows, weights, kernel="auto"):
    x = jax.ShapeDtypeStruct((rows, weights.shape[1]), jnp.int8)
    return jax.jit(lambda x, w: kernels.matmul(x, w, kernel=kernel)).lower(
        x, weights).as_text()

  monkeypatch.setattr(kernels, "amx_int8", lambda: True)
  assert "qjax_int8" not in lowered(64, w)
  assert "qjax_int8" in lowered(64, w, kernel="native")
  assert "qjax_int8" in lowered(64, packed)
  assert "qjax_int8" in lowered(16, w)
  assert "qjax_int8" in lowered(512, w)
  assert "qjax_int8" in lowered(64, jax.ShapeDtypeStruct((100, 784), jnp.int8))
  assert kernels.resolve("auto", macs=2**40) == AVAILABLE[0]  # an elementwise operation
  monkeypatch.setattr(kernels, "amx_int8", lambda: False)
  assert "qjax_int8" in lowered(64, w)
  monkeypatch.undo()
  with open("/proc/cpuinfo", encoding="utf-8") as f:  # no AMX reported: never granted
    if "amx_int8" not in f.read():
      assert kernels.amx_int8() is False


def test_without_the_library(monkeypatch):
  """A build without the library warns once and runs everything on XLA; a forced native path
  is an error that names the accepted values."""
  monkeypatch.setattr(kernels, "_library_file", lambda: None)
  with pytest.warns(RuntimeWarning, match="not built"):
    assert kernels._load.__wrapped__() == 0
  monkeypatch.setattr(kernels, "native_paths", lambda: ())
  assert kernels.resolve("auto") == "xla" and not kernels.available()
  with pytest.raises(ValueError, match=r"not built.*'xla'"):
    kernels.resolve("native")
  with pytest.raises(ValueError, match="runs the native paths"):
    kernels.resolve("portable")
  rng = np.random.default_rng(6)
  x, w, offset = operands(rng, 3, 5, 9)
  got = jax.jit(lambda x, w, o: kernels.matmul(x, w, o, kernel="auto"))(x, w, offset)
  np.testing.assert_array_equal(np.asarray(got), reference(x, w, offset))


def test_operand_errors():
  x = jax.device_put(np.zeros((2, 3), np.int8))
  with pytest.raises(TypeError, match="int8"):
    kernels.matmul(jax.device_put(np.zeros((2, 3), np.int32)),
                   jax.device_put(np.zeros((4, 3), np.int8)), kernel="xla")
  with pytest.raises(ValueError, match="share K"):
    kernels.matmul(x, jax.device_put(np.zeros((4, 5), np.int8)), kernel="xla")
  with pytest.raises(TypeError, match="FbgemmRequant, FloatRequant or IntegerRequant"):
    kernels.matmul_requant(x, jax.device_put(np.zeros((4, 3), np.int8)), None,
                           lambda acc: acc.astype(jnp.int8), kernel="xla")


@pytest.mark.parametrize("path", ("xla", *AVAILABLE[:1]))
def test_offset_and_geometry_errors(path):
  """Offsets and convolution geometry are checked by name on every path (a float or too wide
  offset, a zero stride, a negative padding or a pad value off int8 was cast, wrapped, or
  failed deep inside XLA or the kernel)."""
  x, w = jnp.ones((2, 4), jnp.int8), jnp.ones((3, 4), jnp.int8)
  for offset, error, message in (
      (jnp.ones((3,), jnp.float32), TypeError,
       "matmul: offset must be an integer array .* got dtype float32"),
      (jnp.ones((2,), jnp.int32), ValueError, r"offset must be int32 \(3,\), one per output "
                                              r"channel, or a scalar; got shape \(2,\)"),
      (np.full((3,), 2**40), ValueError, "offset must fit int32")):
    with pytest.raises(error, match=message):
      kernels.matmul(x, w, offset, kernel=path)
  np.testing.assert_array_equal(np.asarray(kernels.matmul(x, w, np.full((1,), 7), kernel=path)),
                                np.full((2, 3), 11))
  xc, wc = jnp.ones((1, 5, 5, 2), jnp.int8), jnp.ones((3, 3, 2, 4), jnp.int8)
  good = dict(strides=(1, 1), padding=((1, 1), (0, 0)), dilation=(1, 1), pad_value=0)
  for change, message in (
      (dict(strides=(0, 1)), r"strides must be 2 ints >= 1; got \(0, 1\)"),
      (dict(dilation=(1,)), r"dilation must be 2 ints >= 1; got \(1,\)"),
      (dict(padding=((-1, 0), (0, 0))), r"padding must be 2 \(low, high\) pairs of ints >= 0"),
      (dict(padding="SAME"), r"padding must be 2 \(low, high\) pairs"),
      (dict(pad_value=300), r"pad_value must lie in \[-128, 127\] \(an int8 value\); got 300"),
      (dict(pad_value=0.5), "pad_value must be an integer scalar")):
    with pytest.raises(ValueError, match="conv_int32: " + message):
      kernels.conv_int32(xc, wc, jnp.zeros((4,), jnp.int32), kernel=path, **(good | change))
  with pytest.raises(TypeError, match="conv_int32: offset must be an integer array"):
    kernels.conv_int32(xc, wc, jnp.zeros((4,)), kernel=path, **good)
  acc = kernels.conv_int32(xc, wc, 5, kernel=path, **good)  # a scalar offset, a Python pad
  np.testing.assert_array_equal(np.asarray(acc)[0, :, 0, 0], [17, 23, 23, 23, 17])


def test_vmap():
  rng = np.random.default_rng(7)
  x = rng.integers(-128, 128, (3, 4, 20), dtype=np.int8)
  w = rng.integers(-128, 128, (6, 20), dtype=np.int8)
  gots = jax.jit(lambda x, w: [jax.vmap(lambda a, p=p: kernels.matmul(a, w, kernel=p))(x)
                               for p in AVAILABLE])(x, w)
  for path, got in zip(AVAILABLE, gots, strict=True):
    np.testing.assert_array_equal(np.asarray(got), reference(x, w, np.zeros(6, np.int64)),
                                  err_msg=path)


def test_concurrent_callers():
  """Calls from several Python threads at once, large enough to split over threads (XLA's
  intra-op pool, which the callers share and whose workers may already run another call's
  blocks): the same integers. Each call runs every native path, in one program whose
  independent calls XLA may run side by side."""
  rng = np.random.default_rng(8)
  cases = [operands(rng, m, 300, 400) for m in (90, 3, 64, 1, 80, 9)]
  run = jax.jit(lambda x, w, o: [kernels.matmul(x, w, o, kernel=p) for p in AVAILABLE])
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda c: [np.asarray(g) for g in run(*c)], cases * 3))
  for (x, w, offset), gots in zip(cases * 3, results, strict=True):
    for path, got in zip(AVAILABLE, gots, strict=True):
      np.testing.assert_array_equal(got, reference(x, w, offset), err_msg=path)


# ------------------------------------------------------------------------------------------
# Pre-packed weights (`kernels.pack`): the panel layout every path takes without repacking.


def test_packed_int32_matches_numpy():
  """Every shape of SHAPES (K % 4 != 0, N % 16 != 0, one row, empty) and the extremes."""
  rng = np.random.default_rng(9)
  cases = [operands(rng, m, n, k) for m, n, k in SHAPES]
  cases += [operands(rng, m, n, k, kind) for kind in ("min", "max", "mixed")
            for m, n, k in ((1, 3, 1001), (37, 33, 515))]
  packed = [(x, kernels.pack(w), offset) for x, w, offset in cases]
  unpacked, results = jax.jit(lambda packed: (
      [p.unpack() for _, p, _ in packed], matmul_on_every_path(packed)))(packed)
  for (x, w, offset), w_again, gots in zip(cases, unpacked, results, strict=True):
    np.testing.assert_array_equal(np.asarray(w_again), w)
    for path, got in zip(AVAILABLE, gots, strict=True):
      np.testing.assert_array_equal(np.asarray(got), reference(x, w, offset),
                                    err_msg=f"{path} {x.shape} x {w.shape}")


def test_packed_requant_matches_unpacked():
  rng = np.random.default_rng(10)
  cases = []
  for i, (m, n, k) in enumerate(SHAPES):
    r = fbgemm(rng, n, k, per_channel=i % 2 == 0, zero=int(rng.integers(-20, 20)),
               relu=i % 3 == 0)
    x, w, offset = operands(rng, m, n, k, offsets=int(2000 * np.sqrt(k)))
    cases.append((x, kernels.pack(w), offset, r, reference(x, w, offset)))
  for (x, packed, *_), (want, gots) in zip(cases, requant_on_every_path(cases), strict=True):
    for path, got in zip(AVAILABLE, gots, strict=True):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                    err_msg=f"{path} {x.shape} x {packed.shape}")


def test_packed_layout_and_errors():
  w = np.arange(-40, 40, dtype=np.int8).reshape(4, 20)[:, :7]  # N = 4, K = 7
  packed = kernels.pack(w)
  assert packed.panels.shape == (1, 2, 16, 4) and packed.panels.dtype == jnp.int8
  assert packed.shape == (4, 7) and packed.dtype == jnp.int8
  panels = np.asarray(packed.panels)
  np.testing.assert_array_equal(panels[0, 0, :4], w[:, :4])  # channels x 4-byte groups
  np.testing.assert_array_equal(panels[0, 1, :4, :3], w[:, 4:])
  assert not panels[0, 1, :4, 3].any() and not panels[0, :, 4:].any()  # zero padding
  np.testing.assert_array_equal(np.asarray(packed.column_sums), w.astype(np.int32).sum(1))
  # A traced pack (packing inside a jitted function) gives the same panels.
  traced = jax.jit(kernels.pack)(jax.device_put(w))
  np.testing.assert_array_equal(np.asarray(traced.panels), panels)
  # XLA takes packed weights too (it unpacks them): one row, tails, more than 16 rows.
  rng = np.random.default_rng(12)
  cases = [operands(rng, m, n, k) for m, n, k in ((1, 33, 130), (17, 9, 70), (40, 48, 129))]
  packed_cases = [(x, kernels.pack(w2), offset) for x, w2, offset in cases]
  gots = jax.jit(lambda cases: [kernels.matmul(x, p, o, kernel="xla") for x, p, o in cases])(
      packed_cases)
  for (x, w2, offset), got in zip(cases, gots, strict=True):
    np.testing.assert_array_equal(np.asarray(got), reference(x, w2, offset))
  with pytest.raises(TypeError, match="kernel_t must be int8"):
    kernels.pack(w.astype(np.int32))
  with pytest.raises(ValueError, match=r"kernel_t must be \(N, K\)"):
    kernels.pack(w[None])
  with pytest.raises(ValueError, match="share K"):
    kernels.matmul(jax.device_put(np.zeros((2, 8), np.int8)), packed, kernel="xla")
  with pytest.raises(TypeError, match="x must be int8"):
    kernels.matmul(jax.device_put(np.zeros((2, 7), np.int32)), packed, kernel="xla")


# ------------------------------------------------------------------------------------------
# Convolutions: the native GEMM of the patches (gathered by the kernel in 2-D) against XLA's
# convolution.

CONVS = [  # (x shape, kernel shape, strides, padding, dilation, groups)
    ((2, 14, 14, 6), (5, 5, 6, 16), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),  # LeNet-5's conv2
    ((3, 9, 8, 3), (3, 3, 3, 7), (2, 1), ((1, 1), (2, 0)), (1, 1), 1),
    ((1, 11, 11, 5), (3, 2, 5, 33), (1, 2), ((2, 1), (0, 1)), (2, 1), 1),
    ((2, 6, 6, 20), (3, 3, 20, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    ((2, 8, 8, 1), (5, 5, 1, 6), (1, 1), ((2, 2), (2, 2)), (1, 1), 1),  # one channel: XLA
    ((2, 7, 7, 4), (3, 3, 2, 6), (1, 1), ((1, 1), (1, 1)), (1, 1), 2),  # 2 groups, one call
    ((0, 6, 6, 3), (3, 3, 3, 2), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),  # empty batch
    ((1, 3, 3, 2), (2, 2, 2, 5), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),  # M = 4
    ((2, 7, 9, 3), (2, 3, 3, 5), (1, 2), ((0, 1), (1, 1)), (1, 2), 1),  # column dilation
    ((1, 4, 5, 70), (2, 2, 70, 18), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),  # 140-byte runs
    ((2, 6, 6, 8), (3, 3, 8, 140), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),  # > 128 channels
    ((2, 10, 3), (3, 3, 4), (2,), ((1, 2),), (1,), 1),  # 1-D: XLA's patches
    ((1, 9, 9, 1), (3, 3, 1, 19), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),  # 16 + 3 channels
    # One input channel, stride 1: the direct convolution (on AVX-512 paths with VBMI):
    ((3, 32, 32, 1), (5, 5, 1, 6), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),  # LeNet-5's conv1
    ((3, 9, 70, 1), (3, 9, 1, 8), (1, 1), ((0, 0), (1, 2)), (1, 1), 1),  # 8 channels, 3 tap
    ((1, 7, 40, 1), (7, 30, 1, 5), (1, 1), ((1, 0), (0, 3)), (1, 1), 1),  # groups, 4 blocks
    ((2, 4, 3, 1), (1, 1, 1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),  # one tap, 3 pixels
    ((1, 6, 20, 1), (2, 3, 1, 7), (1, 1), ((1, 1), (0, 0)), (1, 1), 1),
    ((2, 6, 6, 1), (3, 3, 1, 9), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),  # 9 channels: XLA
    ((0, 6, 6, 1), (3, 3, 1, 4), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),  # direct, no images
    # 1.2 MB of weights and 25 rows: the tile kernel's split of the panels over threads.
    ((1, 7, 7, 128), (3, 3, 128, 1024), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),
] + [  # Depthwise (groups = C, one input channel a group): the native depthwise convolution.
    ((2, 9, 11, 5), (3, 3, 1, 5), (1, 1), ((1, 1), (1, 1)), (1, 1), 5),
    ((3, 12, 10, 20), (3, 5, 1, 40), (2, 2), ((2, 2), (1, 3)), (1, 1), 20),  # multiplier 2
    ((1, 9, 9, 33), (2, 2, 1, 99), (1, 1), ((0, 1), (0, 0)), (2, 2), 33),  # 3, dilation 2
    ((2, 7, 6, 128), (3, 3, 1, 128), (1, 2), ((1, 1), (0, 1)), (1, 1), 128),
    ((0, 5, 5, 4), (3, 3, 1, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), 4),  # no images
    ((1, 3, 5, 17), (3, 5, 1, 17), (1, 1), ((0, 0), (0, 0)), (1, 1), 17),  # one output pixel
    ((2, 6, 7, 16), (1, 1, 1, 16), (1, 1), ((0, 0), (0, 0)), (1, 1), 16),  # one tap
    # Rows with blocks of eight and four inside columns (shared input loads at strides 1, 2).
    ((1, 4, 12, 32), (3, 3, 1, 32), (1, 1), ((1, 1), (1, 1)), (1, 1), 32),
    ((1, 3, 15, 16), (3, 3, 1, 16), (1, 1), ((1, 1), (1, 1)), (1, 1), 16),  # 8 + 4 + 1
    ((2, 6, 20, 16), (5, 5, 1, 16), (1, 1), ((2, 2), (2, 2)), (1, 1), 16),
    ((2, 5, 21, 48), (3, 3, 1, 48), (2, 2), ((1, 1), (1, 1)), (1, 1), 48),
    ((1, 9, 25, 12), (5, 5, 1, 24), (2, 2), ((2, 2), (2, 2)), (1, 1), 12),  # multiplier 2
    # Padding wider than the window: whole output rows and columns of padding only; no
    # column with every tap inside the input.
    ((1, 2, 3, 8), (1, 1, 1, 8), (1, 1), ((2, 1), (3, 3)), (1, 1), 8),
    ((2, 4, 2, 32), (3, 3, 1, 32), (1, 2), ((2, 2), (2, 3)), (2, 1), 32),
] + [  # Other groups: small ones on the depthwise kernel (AVX-512 and portable paths) ...
    ((2, 8, 8, 32), (3, 3, 4, 32), (1, 1), ((1, 1), (1, 1)), (1, 1), 8),  # 4 groups a block
    ((1, 3, 3, 128), (3, 3, 4, 128), (1, 1), ((0, 0), (0, 0)), (1, 1), 32),  # one pixel
    ((2, 7, 9, 32), (3, 3, 2, 16), (2, 1), ((1, 1), (0, 2)), (1, 2), 16),  # 1 out a group
    ((1, 9, 6, 48), (2, 3, 6, 40), (1, 2), ((2, 0), (1, 1)), (2, 1), 8),  # 5 out: straddling
    ((2, 6, 7, 64), (3, 3, 16, 32), (1, 1), ((1, 1), (1, 1)), (1, 1), 4),  # 16 in, 8 out
    ((1, 5, 11, 40), (3, 1, 10, 28), (1, 1), ((0, 2), (0, 0)), (1, 1), 4),  # 7 out
    ((2, 5, 6, 56), (1, 3, 14, 32), (1, 1), ((1, 1), (2, 2)), (1, 1), 4),  # padding only rows
    ((1, 6, 6, 24), (3, 3, 8, 12), (1, 1), ((1, 1), (1, 1)), (1, 1), 3),  # 8 in, 4 out
    ((2, 4, 9, 24), (2, 2, 12, 16), (1, 2), ((0, 1), (1, 0)), (1, 1), 2),  # 12 in, 8 out
    ((0, 5, 5, 8), (3, 3, 2, 8), (1, 1), ((1, 1), (1, 1)), (1, 1), 4),  # no images
    # Rows with blocks of eight and four columns sharing their widened input pixels:
    ((2, 6, 13, 16), (5, 5, 2, 8), (1, 2), ((2, 2), (2, 2)), (1, 1), 8),  # 4 + 3 columns
    ((1, 5, 14, 32), (3, 5, 8, 16), (1, 1), ((1, 1), (2, 2)), (1, 1), 4),  # 8 + 4 + 2
    ((2, 5, 19, 24), (3, 3, 4, 18), (2, 2), ((1, 1), (1, 1)), (1, 1), 6),  # 4 + 4 + 2
    # Groups of 16 k output channels (blocks inside a group, 1-4 sharing each input dword):
    ((2, 5, 6, 32), (3, 3, 16, 32), (1, 1), ((1, 1), (1, 1)), (1, 1), 2),
    ((1, 7, 9, 24), (3, 3, 12, 96), (2, 1), ((1, 0), (2, 1)), (1, 2), 2),  # 3 blocks a group
    ((2, 4, 5, 8), (2, 2, 4, 128), (1, 1), ((1, 1), (0, 0)), (1, 1), 2),  # 4 blocks
    ((1, 6, 6, 40), (3, 3, 20, 160), (1, 1), ((1, 1), (1, 1)), (1, 1), 2),  # 4 + 1 blocks
    ((1, 5, 5, 128), (3, 3, 64, 32), (1, 2), ((0, 2), (1, 1)), (1, 1), 2),  # 64 channels in
    # ... and runs of groups as block-diagonal ungrouped native convolutions.
    ((1, 5, 6, 8), (3, 3, 4, 48), (1, 1), ((1, 1), (1, 1)), (1, 1), 2),  # 24 out: straddling
    # Past 2^21 multiply-adds: both cores, split over output rows or pixels.
    ((4, 16, 16, 64), (3, 3, 4, 64), (1, 1), ((1, 1), (1, 1)), (1, 1), 16),
    ((2, 16, 15, 64), (3, 3, 16, 64), (1, 1), ((1, 1), (1, 1)), (1, 1), 4),
    ((1, 6, 7, 12), (3, 2, 3, 20), (2, 1), ((1, 0), (0, 2)), (1, 2), 4),  # runs of 3 and 1
    ((2, 5, 5, 6), (3, 3, 3, 34), (1, 1), ((1, 1), (1, 1)), (1, 1), 2),  # 17 channels a group
    ((2, 6, 5, 64), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)), (1, 1), 4),  # 64 bytes a block
    ((3, 11, 6), (3, 2, 9), (1,), ((1, 1),), (2,), 3),  # 1-D: XLA's patches, one call
]


def _random_convs(count: int, seed: int) -> list:
  """Random 2-D convolutions (`_random_geometry`, each output at least 1 x 1): 2-70 input
  channels, 1-40 output channels."""
  rng = np.random.default_rng(seed)
  cases = []
  while len(cases) < count:
    b, c, n = int(rng.integers(1, 4)), int(rng.choice([2, 3, 5, 8, 17, 70])), int(
        rng.integers(1, 41))
    geometry = _random_geometry(rng)
    if geometry is not None:
      spatial, window, strides, padding, dilation = geometry
      cases.append(((b, *spatial, c), (*window, c, n), strides, padding, dilation, 1))
  return cases


def _random_geometry(rng: np.random.Generator):
  """(spatial, window, strides, padding, dilation) of a random 2-D convolution: sizes 1-9,
  windows, strides, dilations 1-3, paddings 0-2; None where the window does not fit."""
  window, strides, dilation = (tuple(int(v) for v in rng.integers(1, 4, 2)) for _ in range(3))
  padding = tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 3, (2, 2)))
  spatial = tuple(int(v) for v in rng.integers(1, 10, 2))
  if any(s + lo + hi < (w - 1) * d + 1 for s, (lo, hi), w, d in
         zip(spatial, padding, window, dilation, strict=True)):
    return None
  return spatial, window, strides, padding, dilation


def _random_grouped_convs(count: int, seed: int) -> list:
  """Random 2-D grouped geometries: 2-8 groups of 1-16 input and 1-32 output channels (the
  depthwise kernel's three forms and the runs of groups), `_random_geometry`'s geometries."""
  rng = np.random.default_rng(seed)
  cases = []
  while len(cases) < count:
    groups = int(rng.choice([2, 3, 4, 6, 8]))
    cg, og = int(rng.choice([1, 2, 3, 4, 6, 8, 12, 16])), int(rng.choice([1, 2, 3, 5, 8, 16, 32]))
    geometry = _random_geometry(rng)
    if geometry is not None:
      spatial, window, strides, padding, dilation = geometry
      cases.append(((int(rng.integers(1, 3)), *spatial, groups * cg),
                    (*window, cg, groups * og), strides, padding, dilation, groups))
  return cases


CONVS += _random_convs(8, seed=3) + _random_grouped_convs(8, seed=4)


def test_conv_matches_xla():
  """Int8 outputs of kernels.conv on every native path equal XLA's convolution +
  requantization: padding with a nonzero zero point, strides, dilation, random operands and
  all -128; fbgemm (fused), float and integer requantizers."""
  rng = np.random.default_rng(11)
  runs = []  # (x, w, offset, requant, geometry, extreme)
  for i, (x_shape, k_shape, strides, padding, dilation, groups) in enumerate(CONVS):
    extreme = i % 3 == 2
    if extreme:
      x, w = np.full(x_shape, -128, np.int8), np.full(k_shape, -128, np.int8)
    else:
      x = rng.integers(-128, 128, x_shape, dtype=np.int8)
      w = rng.integers(-128, 128, k_shape, dtype=np.int8)
    cout, k = k_shape[-1], int(np.prod(k_shape[:-1]))
    offset = rng.integers(-5000, 5000, cout).astype(np.int32)
    geometry = dict(strides=strides, padding=padding, dilation=dilation, groups=groups,
                    pad_value=np.int32(int(rng.integers(-128, 128))))
    # The fused fbgemm requantizer; every other case the unfused float one as well.
    requants = [fbgemm(rng, cout, k, per_channel=True, zero=3, relu=True)]
    if i % 2:
      requants.append(rq.FloatRequant(multiplier=np.float32(60 / (5500 * np.sqrt(k))),
                                      zero_point=np.int32(-4), lo=-128, hi=127, relu=False))
    if i % 4 == 1:
      m0, shift = arith.quantize_multiplier(np.full(cout, 40 / (5500 * np.sqrt(k))))
      requants.append(rq.IntegerRequant(m0=jax.device_put(m0), shift=jax.device_put(shift),
                                        zero_point=np.int32(2), lo=-128, hi=127, relu=False))
    runs += [(x, w, offset, r, geometry, extreme) for r in requants]
  # XLA and every native path on every case, in one program (one compilation); the kernel
  # packed by `pack_conv` as well on the best native path (every path runs the packed
  # convolution: unpacked kernels are packed by the library first; XLA unpacks packed ones,
  # test_pack_conv_layout_and_errors and the serving trees of test_convert_more).
  paths = [*((p, False) for p in AVAILABLE), *((p, True) for p in AVAILABLE[:1])]
  results = jax.jit(lambda operands: [
      [kernels.conv(x, pw if packed else w, o, r, **run[4], kernel=p) for p, packed in
       [("xla", False), *paths]]
      for (x, w, pw, o, r), run in zip(operands, runs, strict=True)])(
          [(x, w, kernels.pack_conv(w), o, r) for x, w, o, r, *_ in runs])
  for (x, w, _, r, _, extreme), (want, *gots) in zip(runs, results, strict=True):
    want = np.asarray(want)
    if want.size >= 1000 and not extreme:
      assert len(np.unique(want)) > 20, (x.shape, w.shape)
    for (path, packed), got in zip(paths, gots, strict=True):
      assert got.dtype == np.int8
      np.testing.assert_array_equal(np.asarray(got), want,
                                    err_msg=f"{path} packed={packed} {x.shape} {w.shape} {r}")


def test_direct_conv_rule():
  """Which convolutions run the direct single-channel kernel: 2-D, one input channel, no
  groups, stride and dilation 1, 1-8 output channels, on an AVX-512 path of a CPU with
  AVX-512 VBMI."""
  vbmi = bool(kernels._load() & kernels._VBMI)
  lenet = ((5, 5, 1, 6), (1, 1), (1, 1), 1)
  for path in ("vnni", "amx", "amx_emulated"):
    assert kernels.direct_conv(*lenet, path) is vbmi
  for path in ("xla", "avx2", "portable"):
    assert not kernels.direct_conv(*lenet, path)
  for shape, strides, dilation, groups in [((5, 5, 2, 6), (1, 1), (1, 1), 1),
                                           ((5, 5, 1, 9), (1, 1), (1, 1), 1),
                                           ((5, 5, 1, 6), (2, 1), (1, 1), 1),
                                           ((5, 5, 1, 6), (1, 1), (1, 2), 1),
                                           ((5, 49, 1, 6), (1, 1), (1, 1), 1),
                                           ((5, 1, 6), (1,), (1,), 1)]:
    assert not kernels.direct_conv(shape, strides, dilation, groups, "vnni"), shape


def test_pack_conv_layout_and_errors():
  w = np.arange(-60, 60, dtype=np.int8).reshape(2, 3, 4, 5)
  packed = kernels.pack_conv(w)
  assert packed.shape == w.shape and packed.ndim == 4 and packed.dtype == jnp.int8
  matrix = w.reshape(-1, 5).T  # (O, window * I), the (i, j, c) order of the patches
  np.testing.assert_array_equal(np.asarray(packed.matrix.unpack()), matrix)
  np.testing.assert_array_equal(np.asarray(packed.unpack()), w)
  np.testing.assert_array_equal(np.asarray(packed.column_sums),
                                matrix.astype(np.int32).sum(axis=1))
  with pytest.raises(TypeError, match="kernel_hwio must be int8"):
    kernels.pack_conv(w.astype(np.int32))
  with pytest.raises(ValueError, match=r"kernel_hwio must be \(\*window, I, O\)"):
    kernels.pack_conv(w[0, 0])


_NO_AMX_CHILD = """
import errno, numpy as np, jax
from experiments import no_amx
no_amx.deny_amx()
assert no_amx.amx_request() == errno.EPERM, no_amx.amx_request()
from qjax.integer import kernels
assert kernels.amx_int8() is False
paths = kernels.native_paths()
assert "amx" not in paths, paths
assert kernels.resolve("auto", xla_amx=True) == (paths[0] if paths else "xla")
rng = np.random.default_rng(0)
x = rng.integers(-128, 128, (40, 300), dtype=np.int8)
w = rng.integers(-128, 128, (70, 300), dtype=np.int8)
want = x.astype(np.int64) @ w.astype(np.int64).T
gots = jax.jit(lambda x, w: [kernels.matmul(x, w, kernel=p) for p in ("xla", *paths)])(x, w)
for path, got in zip(("xla", *paths), gots):
  assert (np.asarray(got) == want).all(), path
print("ok", paths)
"""


def test_amx_refused_by_seccomp():
  """Under experiments.no_amx's seccomp filter (a CPU without AMX, emulated in one process),
  the library sees no AMX, "auto" keeps large products native, and every path still gives
  the same integers."""
  root = pathlib.Path(__file__).resolve().parents[1]
  done = subprocess.run([sys.executable, "-c", _NO_AMX_CHILD], cwd=root, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr


def test_tile_check():
  """The check that the "amx" path passes at load before it is offered (the tile kernel on a
  40 x 40 x 100 product equals its emulation and an int64 reference) runs here on emulated
  tiles and passes; where AMX-INT8 is granted, the real tiles passed it (a failure would
  leave "amx" out of native_paths with a warning)."""
  if "vnni" not in AVAILABLE:
    pytest.skip("the tile kernel needs AVX-512 VNNI")
  lib = ctypes.CDLL(str(kernels._library_file()))
  assert lib.qjax_int8_tile_check_emulated() == 1
  assert not kernels._load() & kernels._AMX_CHECK_FAILED
  assert ("amx" in AVAILABLE) == kernels.amx_int8()


# ------------------------------------------------------------------------------------------
# Float -> int8 rounding (the input's quantization).


def test_round_and_quantize_input_match_xla():
  """round_to_int8 and quantize_input on every native path equal XLA's on rounding ties,
  random values, +-inf, NaN and values far outside the grid, for uint8 (shifted), int8 and
  4-bit grids; sizes on both sides of the vector width and of the threading threshold."""
  rng = np.random.default_rng(13)
  specs = [(QuantSpec(bits=8, signed=False), 0.02, 131), (QuantSpec(bits=8, signed=True), 0.1, 0),
           (QuantSpec(bits=4, signed=False), 0.25, 3), (QuantSpec(bits=8, signed=False), 1.0, 0)]
  cases = []  # (n, spec, scale, zero point, x)
  for n in (1, 15, 17, 1000, 600_000):
    for spec, s, z in specs:
      ties = (rng.integers(-300, 300, n) + 0.5) * np.float32(s)
      x = np.where(rng.random(n) < 0.5, ties, rng.normal(0, 200 * s, n)).astype(np.float32)
      x[: min(n, 5)] = [np.inf, -np.inf, 3e38, -7.5, np.nan][: min(n, 5)]  # NaN -> Z
      cases.append((n, spec, s, z, x.reshape(-1, n) if n < 1000 else x.reshape(-1, 100)))
  y = np.array([np.nan, 0.5, 1.5, -0.5, -1e10, 1e10, 2.5, -2.5], np.float32)

  def run(operands, y):
    # Per case arith's XLA rounding, kernels' "xla" and every native path; round_to_int8 on
    # every path: all in one program.
    quantized = [[arith.quantize_input(x, spec, sc, zp)] + [
        kernels.quantize_input(x, spec, sc, zp, kernel=p) for p in ("xla", *AVAILABLE)]
                 for (x, sc, zp), (_, spec, *_) in zip(operands, cases, strict=True)]
    rounded = [kernels.round_to_int8(y, -3, 100, 5, -77, kernel=p) for p in ("xla", *AVAILABLE)]
    return quantized, rounded

  quantized, rounded = jax.jit(run)(
      [(x, np.float32(s), np.int32(z)) for _, _, s, z, x in cases], y)
  for (n, spec, *_), (reference_q, want, *gots) in zip(cases, quantized, strict=True):
    want = np.asarray(want)
    np.testing.assert_array_equal(want, np.asarray(reference_q))
    for path, got in zip(AVAILABLE, gots, strict=True):
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{path} {spec} n={n}")
  for path, got in zip(("xla", *AVAILABLE), rounded, strict=True):
    np.testing.assert_array_equal(np.asarray(got), [-77, 5, 7, 5, 2, 105, 7, 3], err_msg=path)
  with pytest.raises(TypeError, match="y must be float32"):
    kernels.round_to_int8(jax.device_put(np.zeros(3, np.int32)), 0, 1, 0, 0)
  y = jnp.zeros(3, jnp.float32)
  with pytest.raises(TypeError, match="round_to_int8: low must be an integer"):
    kernels.round_to_int8(y, -3.5, 100, 5, -77)
  for bounds in ((10, -10, 0, 0), (-1000, 100, 0, 0), (0, 255, 0, 0), (-10, 10, 0, 999)):
    with pytest.raises(ValueError, match="round_to_int8: need low <= high"):  # would wrap
      kernels.round_to_int8(y, *bounds)
  # Traced bounds cannot be checked: a jitted call takes them as they are.
  got = jax.jit(lambda b: kernels.round_to_int8(y - 2.0, *b))((0, 255, -128, 0))
  assert np.asarray(got).tolist() == [-128] * 3


def test_quantize_samples_is_the_cleaned_quantization_and_the_nonfinite_mask():
  """quantize_samples on every native path: q equals quantize_input of x with its NaN /
  +-inf set to 0 and the mask equals nonfinite_samples, bit for bit, for rank 1, 2 and 3
  inputs, an empty batch, rows of every length class (below, at and past the vector width)
  and a batch past the threading threshold; a bad entry anywhere in a row flags that row."""
  rng = np.random.default_rng(29)
  spec = QuantSpec(bits=8, signed=False)
  shapes = [(7,), (0, 784), (1, 784), (5, 15), (9, 17), (3, 4, 16), (1100, 784)]
  inputs = []
  for shape in shapes:
    x = rng.normal(0, 2, shape).astype(np.float32)
    rows = x.reshape(shape[0] if len(shape) >= 2 else 1, int(np.prod(shape[1:] or shape)))
    if rows.size and rows.shape[0] >= 3:  # rows 0 and 2 (last and first entry) and the last
      rows[0, -1], rows[2, 0], rows[-1, rows.shape[1] // 2] = np.nan, np.inf, -np.inf
    elif rows.size:
      rows[0, 3] = np.nan
    inputs.append(rows.reshape(shape))

  def both(x, path):
    return kernels.quantize_samples(x, spec, np.float32(0.03), np.int32(120), kernel=path)

  def reference(x):
    clean = jnp.where(jnp.isfinite(x), x, 0.0)
    q = arith.quantize_input(clean, spec, np.float32(0.03), np.int32(120))
    return q, base.nonfinite_samples(x)

  # Every shape on XLA's reference and every path in one program.
  results = jax.jit(lambda inputs: [[reference(x)] + [both(x, p) for p in ("xla", *AVAILABLE)]
                                    for x in inputs])(inputs)
  for shape, ((want_q, want_bad), *gots) in zip(shapes, results, strict=True):
    assert want_bad.shape == ((shape[0],) if len(shape) >= 2 else ())
    for path, (q, bad) in zip(("xla", *AVAILABLE), gots, strict=True):
      np.testing.assert_array_equal(np.asarray(q), np.asarray(want_q), err_msg=f"{path} {shape}")
      np.testing.assert_array_equal(np.asarray(bad), np.asarray(want_bad),
                                    err_msg=f"{path} {shape}")
    if len(shape) >= 2 and shape[0] >= 3:
      assert np.flatnonzero(np.asarray(want_bad)).tolist() == sorted({0, 2, shape[0] - 1})


def test_dequantize_rows_matches_xla():
  """dequantize_rows on every native path equals arith.dequantize_output with NaN in the
  marked samples, bit for bit, with and without jit: every int8 value against zero points
  at both ends, scales from tiny to huge, masks of one flag a sample and of one flag, no mask,
  rank 1 to 3, an empty batch; bad arguments name themselves."""
  rng = np.random.default_rng(31)
  cases = []  # (q, scale, zero point, bad)
  for shape in [(256,), (2, 128), (5, 3, 17), (0, 10), (1, 10), (64, 10)]:
    q = rng.integers(-128, 128, shape).astype(np.int8)
    if q.size >= 256:
      q.reshape(-1)[:256] = np.arange(-128, 128)
    rows = shape[0] if len(shape) >= 2 else 1
    for scale, zero in ((0.0371, -128), (1e-30, 127), (3e30, 5), (0.5, 0)):
      masks = [None, np.array(True), np.array(False)]
      if len(shape) >= 2:
        masks.append(rng.random(rows) < 0.4)
      for bad in masks:
        cases.append((q, np.float32(scale), np.int32(zero), bad))

  def run(cases):
    out = []
    for q, s, z, bad in cases:
      want = arith.dequantize_output(q, s, z)
      if bad is not None:
        want = base.with_nan_samples(bad, want)
      out.append([want] + [kernels.dequantize_rows(q, s, z, bad, kernel=p)
                           for p in ("xla", *AVAILABLE)])
    return out

  for results in (jax.jit(run)(cases), run(cases)):
    for (q, s, z, bad), (want, *gots) in zip(cases, results, strict=True):
      want = np.asarray(want)
      for path, got in zip(("xla", *AVAILABLE), gots, strict=True):
        got = np.asarray(got)
        assert got.dtype == np.float32 and got.shape == q.shape
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32),
                                      err_msg=f"{path} {q.shape} {s} {z} {bad}")
  q = jnp.zeros((4, 3), jnp.int8)
  with pytest.raises(TypeError, match="q must be int8"):
    kernels.dequantize_rows(q.astype(jnp.int32), 1.0, 0)
  with pytest.raises(ValueError, match="scale must be a scalar"):
    kernels.dequantize_rows(q, jnp.ones(3), 0)
  with pytest.raises(ValueError, match=r"bad must have shape \(\) or \(4,\)"):
    kernels.dequantize_rows(q, 1.0, 0, jnp.zeros(3, bool))
  with pytest.raises(ValueError, match="dequantize_rows: scale must be finite and > 0"):
    kernels.dequantize_rows(q, 0.0, 0)
  with pytest.raises(TypeError, match="dequantize_rows: zero_point must be an integer"):
    kernels.dequantize_rows(q, 1.0, 0.5)
  with pytest.raises(TypeError, match="dequantize_rows: bad must be bool; got int32"):
    kernels.dequantize_rows(q, 1.0, 0, jnp.zeros(4, jnp.int32))


@pytest.mark.skipif(not AVAILABLE, reason="the native kernel does not run here")
def test_native_mlp_serving_program_has_no_xla_arithmetic():
  """On a native path an MLP's int8 apply is native calls only (the input's quantization
  with its non-finite mask, the fused GEMMs, the dequantization): XLA's cost analysis counts
  only a few scalar operations in it, the same at every batch size, which lets JAX's CPU
  client run it on the calling thread; its outputs equal the XLA path's, a NaN sample's
  included."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  import qjax  # pylint: disable=import-outside-toplevel
  from qjax import nn as qnn  # pylint: disable=import-outside-toplevel

  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x, *, mode):
      qconfig = qnn.default_qconfig  # min / max observers: quick to calibrate
      x = qnn.Quantize(qconfig, name="quant")(x, mode=mode)
      x = qnn.QuantDense(32, activation=nn.relu, qconfig=qconfig, name="fc1")(x, mode=mode)
      x = qnn.QuantDense(10, qconfig=qconfig, name="fc2")(x, mode=mode)
      return qnn.Dequantize(name="dequant")(x, mode=mode)

  model = Mlp()
  x = np.random.default_rng(3).random((64, 50)).astype(np.float32)
  variables = model.init(cases.init_key(), x, mode="float")
  _, stats = model.apply(variables, x, mode="calibrate", mutable=["quant_stats"])
  int_vars = qjax.convert(model, {**variables, **stats}, x)
  x[3, 7] = np.nan
  outs = {}
  for path in ("xla", AVAILABLE[0]):
    with kernels.use(path):
      apply = jax.jit(lambda v, x: model.apply(v, x, mode="int8"))
      flops = []
      for batch in (64,) if path == "xla" else (1, 64):
        cost = apply.lower(int_vars, x[:batch]).compile().cost_analysis()
        flops.append((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
      if path == "xla":
        assert flops[0] > 64 * 10, flops  # the dequantization alone
      else:  # a few scalar operations on the quantization parameters, at any batch size
        assert flops[0] == flops[1] < 50, flops
      outs[path] = np.asarray(apply(int_vars, x))
  np.testing.assert_array_equal(outs[AVAILABLE[0]], outs["xla"])
  assert np.isnan(outs["xla"][3]).all() and not np.isnan(np.delete(outs["xla"], 3, 0)).any()


def test_grouped_model_int8_apply_equals_the_xla_path():
  """A depthwise-separable block (MobileNet's: depthwise 3 x 3 + ReLU, pointwise 1 x 1, a
  strided depthwise layer with channel multiplier 2) and a grouped 3 x 3 layer (ResNeXt's: 6
  groups of 8 channels) calibrated, converted and applied in int8: on the best native path
  the depthwise layers are native depthwise calls, the grouped one a third (or two native
  convolutions on "avx2"),
  and the outputs equal the XLA path's (every path's kernels: test_conv_matches_xla)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  import qjax  # pylint: disable=import-outside-toplevel
  from qjax import nn as qnn  # pylint: disable=import-outside-toplevel

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, *, mode):
      qconfig = qnn.default_qconfig
      x = qnn.Quantize(qconfig, name="quant")(x, mode=mode)
      x = qnn.QuantConv(20, (3, 3), padding="SAME", feature_group_count=20, qconfig=qconfig,
                        activation=nn.relu, name="dw1")(x, mode=mode)
      x = qnn.QuantConv(24, (1, 1), qconfig=qconfig, activation=nn.relu, name="pw")(x, mode=mode)
      x = qnn.QuantConv(48, (3, 3), strides=(2, 2), padding=((1, 0), (0, 1)),
                        feature_group_count=24, qconfig=qconfig, name="dw2")(x, mode=mode)
      x = qnn.QuantConv(24, (3, 3), padding="SAME", feature_group_count=6, qconfig=qconfig,
                        name="grouped")(x, mode=mode)
      return qnn.Dequantize(name="dequant")(x, mode=mode)

  model = Block()
  x = np.random.default_rng(4).normal(size=(3, 11, 9, 20)).astype(np.float32)
  variables = model.init(cases.init_key(), x, mode="float")
  _, stats = model.apply(variables, x, mode="calibrate", mutable=["quant_stats"])
  int_vars = qjax.convert(model, {**variables, **stats}, x)

  if not AVAILABLE:
    pytest.skip("the native library is not built")
  outs = {}
  for path in ("xla", AVAILABLE[0]):
    with kernels.use(path):  # a function of its own: a jitted one keeps the path it traced
      program = jax.jit(lambda v, x: model.apply(v, x, mode="int8")).lower(int_vars, x)
      text = program.as_text()
      calls = [text.count(f"custom_call @qjax_int8_{kind}_requant")
               for kind in ("depthwise", "conv")]
      # The grouped layer's groups of 8 channels in and 4 out run on the depthwise kernel
      # (where a path's rule takes them; else as two runs of groups, 4 + 2).
      direct = kernels.grouped_direct((3, 3, 8, 24), 6, 48, path)
      want = [0, 0] if path == "xla" else [3, 1] if direct else [2, 3]
      assert calls == want, (path, calls)
      outs[path] = np.asarray(program.compile()(int_vars, x))
  assert len(np.unique(outs["xla"])) > 20
  np.testing.assert_array_equal(outs[AVAILABLE[0]], outs["xla"])


def test_max_pool_matches_xla():
  """kernels.max_pool on every native path equals lax.reduce_window (and nn.max_pool) on
  int8 NHWC inputs, with and without jit: channel counts around the 64-lane vector, windows
  and strides that overlap, skip or leave a ragged edge, all -128 / 127, an empty batch;
  qjax.nn.max_pool sends int8 to it and floats to nn.max_pool; bad arguments name
  themselves."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  import qjax.nn as qnn  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(41)
  cases = [((2, 28, 28, 6), (2, 2), (2, 2)), ((1, 10, 10, 16), (2, 2), (2, 2)),
           ((3, 7, 9, 1), (3, 3), (1, 1)), ((2, 8, 11, 65), (3, 2), (2, 3)),
           ((1, 5, 5, 130), (5, 5), (1, 1)), ((0, 4, 4, 3), (2, 2), (2, 2)),
           ((2, 6, 6, 64), (2, 3), (3, 2))]
  inputs = []
  for shape, _, _ in cases:
    x = rng.integers(-128, 128, shape, dtype=np.int8)
    if x.size:
      x.reshape(-1)[:4] = [-128, 127, -128, 127]
    inputs.append(x)

  def run(inputs):
    return [[jax.lax.reduce_window(x, np.int8(-128), jax.lax.max, (1,) + w + (1,),
                                   (1,) + s + (1,), "VALID")]
            + [kernels.max_pool(x, w, s, kernel=p) for p in ("xla", *AVAILABLE)]
            for x, (_, w, s) in zip(inputs, cases, strict=True)]

  for results in (jax.jit(run)(inputs), run(inputs)):
    for (shape, w, s), (want, *gots) in zip(cases, results, strict=True):
      for path, got in zip(("xla", *AVAILABLE), gots, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                      err_msg=f"{path} {shape} {w} {s}")
  x = inputs[0]
  np.testing.assert_array_equal(np.asarray(qnn.max_pool(x, (2, 2), strides=(2, 2))),
                                np.asarray(nn.max_pool(x, (2, 2), strides=(2, 2))))
  np.testing.assert_array_equal(np.asarray(qnn.max_pool(x, (3, 3))),  # flax's stride 1
                                np.asarray(nn.max_pool(x, (3, 3))))
  xf = x.astype(np.float32) / 7
  np.testing.assert_array_equal(np.asarray(qnn.max_pool(xf, (2, 2), strides=(2, 2))),
                                np.asarray(nn.max_pool(xf, (2, 2), strides=(2, 2))))
  with pytest.raises(TypeError, match="x must be int8"):
    kernels.max_pool(xf, (2, 2))
  with pytest.raises(ValueError, match="window must be within"):
    kernels.max_pool(x, (29, 2))
  with pytest.raises(ValueError, match=r"x must be \(N, H, W, C\)"):
    kernels.max_pool(x[0], (2, 2))
  with pytest.raises(ValueError, match="strides must be >= 1"):
    kernels.max_pool(x, (2, 2), (0, 1))


@pytest.mark.parametrize("k, n", [(1, 1), (33, 130), (784, 100)])
def test_pack_grid_matches_xla_and_numpy(k, n):
  rng = np.random.default_rng(k * 1000 + n)
  scale = rng.uniform(0.01, 0.05, n).astype(np.float32)
  q = rng.integers(-128, 128, (k, n)).astype(np.float32)
  q[0, :] = -128  # the grid's ends
  q[-1, :] = 127
  w = q * scale[None, :]  # on the grid: w / scale recovers q
  w[k // 2, n - 1] = np.nan
  w[0, 0] = -np.inf
  bad = np.zeros(n, bool)
  bad[[0, n - 1]] = True
  want = np.where(np.isfinite(w), q, 0).astype(np.int8)
  for path in ("xla", *AVAILABLE):
    for fn in (kernels.pack_grid, jax.jit(kernels.pack_grid, static_argnames="kernel_path")):
      packed, got_bad = fn(jnp.asarray(w), jnp.asarray(scale), kernel_path=path)
      np.testing.assert_array_equal(np.asarray(packed.unpack()), want.T, err_msg=path)
      np.testing.assert_array_equal(np.asarray(packed.column_sums),
                                    want.astype(np.int32).sum(axis=0), err_msg=path)
      np.testing.assert_array_equal(np.asarray(got_bad), bad, err_msg=path)
      np.testing.assert_array_equal(np.asarray(packed.panels),
                                    np.asarray(kernels.pack(jnp.asarray(want.T)).panels))


def test_pack_grid_rounds_saturates_and_checks():
  w = jnp.array([[0.26, -0.74, 1e9, -1e9, 0.375, 0.625]], jnp.float32)  # scale 0.25: ties even
  for path in ("xla", *AVAILABLE):
    packed, bad = kernels.pack_grid(w, jnp.float32(0.25), kernel_path=path)
    assert packed.unpack().T.tolist() == [[1, -3, 127, -128, 2, 2]], path
    assert not bad.any()
  packed, _ = kernels.pack_grid(w.astype(jnp.bfloat16), jnp.float32(0.25))  # widened exactly
  assert packed.unpack().T.tolist() == [[1, -3, 127, -128, 2, 2]]
  with pytest.raises(ValueError, match="kernel must be a float"):
    kernels.pack_grid(w.astype(jnp.int32), jnp.float32(0.25))
  with pytest.raises(ValueError, match=r"scale must be \(\) or \(N,\)"):
    kernels.pack_grid(w, jnp.ones((5,), jnp.float32))
  with pytest.raises(ValueError, match="pack_grid: scale must be finite and > 0"):
    kernels.pack_grid(w, jnp.float32(0.0))


def test_retain_freed_memory_stops_refaulting_large_outputs():
  with pytest.raises(ValueError, match="trim_threshold must be an int >= 33554432"):
    kernels.retain_freed_memory(2**20)
  # Process-wide: checked in a child process, on its main thread. A 4 MiB block is written,
  # freed and allocated again, as XLA does with each call's output; once glibc keeps freed
  # memory, writing the block again touches no fresh page.
  script = """
import ctypes, resource, sys
from qjax.integer import kernels
retained = kernels.retain_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 4 << 20
faults = []
for _ in range(3):
  block = libc.malloc(size)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ctypes.memset(block, 1, size)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  libc.free(block)
print(retained, *faults)
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True, timeout=120).stdout.split()
  if out[0] != "True":
    pytest.skip("not glibc: retain_freed_memory does nothing here")
  first, *again = (int(v) for v in out[1:])
  assert first > 0 and all(f <= 16 for f in again), out  # 1024 pages a fresh 4 MiB block


CONV_INT32 = [  # (x shape, kernel shape, strides, padding, dilation)
    ((2, 9, 8, 3), (3, 2, 3, 5), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((2, 9, 8, 6), (5, 5, 6, 16), (2, 1), ((2, 2), (1, 3)), (1, 1)),
    ((3, 7, 7, 4), (2, 3, 4, 17), (1, 2), ((1, 0), (0, 2)), (2, 1)),
    ((2, 8, 8, 1), (5, 5, 1, 6), (1, 1), ((2, 2), (2, 2)), (1, 1)),  # one channel: XLA's
    ((2, 11, 3), (3, 3, 7), (2,), ((1, 1),), (1,)),                  # 1-D: XLA's patches
]


def test_conv_int32_matches_xla():
  """conv_int32 (the int8-forward QAT's convolution) on XLA and every native path equals
  XLA's int32 convolution + offset, wrapping: the patch GEMM, one input channel, 1-D; all
  cases and paths in one program."""
  runs = []
  for x_shape, w_shape, strides, padding, dilation in CONV_INT32:
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x = rng.integers(-128, 128, x_shape, dtype=np.int8)
    w = rng.integers(-128, 128, w_shape, dtype=np.int8)
    w[0], w[-1] = 127, -128
    offset = rng.integers(-2**31, 2**31, w_shape[-1], dtype=np.int64).astype(np.int32)
    runs.append((x, w, offset, dict(strides=strides, padding=padding, dilation=dilation,
                                    pad_value=jnp.int32(-37))))
  paths = ("xla", *AVAILABLE)
  results = jax.jit(lambda operands: [
      [kernels.conv_int32(x, w, o, **geometry, kernel=p) for p in paths]
      for (x, w, o), (*_, geometry) in zip(operands, runs, strict=True)])(
          [run[:3] for run in runs])
  for (x, w, offset, geometry), gots in zip(runs, results, strict=True):
    want = np.asarray(arith.conv(x, w, feature_group_count=1, **geometry))
    want = (want.astype(np.int64) + offset).astype(np.uint32).view(np.int32)  # wraps
    for path, got in zip(paths, gots, strict=True):
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{path} {x.shape} {w.shape}")


GROUPED = [case for case in CONVS if case[-1] > 1]


def test_grouped_conv_int32_matches_xla():
  """The int32 sums + offset (wrapping) of grouped convolutions on every path (the native
  depthwise kernel; runs of groups as block-diagonal native convolutions) equal XLA's
  grouped convolution's, on random operands with -128 / 127 rows and offsets over the whole
  int32 range: depthwise with 5-128 channels, channel multipliers 1-3, strides, dilation,
  padding with a nonzero zero point, one output pixel, one tap, no images; 2-32 groups of
  2-4 input channels, runs of 1-4 groups, 1-D."""
  rng = np.random.default_rng(5)
  runs = []
  for x_shape, w_shape, strides, padding, dilation, groups in GROUPED:
    x = rng.integers(-128, 128, x_shape, dtype=np.int8)
    w = rng.integers(-128, 128, w_shape, dtype=np.int8)
    w[0], w[-1] = 127, -128
    offset = rng.integers(-2**31, 2**31, w_shape[-1], dtype=np.int64).astype(np.int32)
    geometry = dict(strides=strides, padding=padding, dilation=dilation, groups=groups,
                    pad_value=jnp.int32(int(rng.integers(-128, 128))))
    runs.append((x, w, offset, geometry))
  results = jax.jit(lambda operands: [
      [kernels.conv_int32(x, w, o, **geometry, kernel=p) for p in AVAILABLE]
      for (x, w, o), (*_, geometry) in zip(operands, runs, strict=True)])(
          [run[:3] for run in runs])
  for (x, w, offset, geometry), gots in zip(runs, results, strict=True):
    want = np.asarray(arith.conv(x, w, strides=geometry["strides"],
                                 padding=geometry["padding"], dilation=geometry["dilation"],
                                 feature_group_count=geometry["groups"],
                                 pad_value=geometry["pad_value"]))
    want = (want.astype(np.int64) + offset).astype(np.uint32).view(np.int32)
    for path, got in zip(AVAILABLE, gots, strict=True):
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{path} {x.shape} {w.shape}")


def test_depthwise_rule_and_its_auto_choice(monkeypatch):
  """Which convolutions run the native depthwise kernel (2-D, groups = C >= 2, one input
  channel a group, O a multiple of C); "auto" keeps them (and other grouped ones) native
  where AMX is granted, however large (XLA runs grouped convolutions without tiles), and
  gives XLA an ungrouped one of large weights over few output pixels (`xla_on_amx`)."""
  assert kernels.depthwise_conv((3, 3, 1, 32), 32, 32)
  assert kernels.depthwise_conv((5, 1, 1, 96), 32, 32)  # multiplier 3
  for shape, groups, channels in [((3, 3, 2, 32), 16, 32), ((3, 3, 1, 32), 1, 1),
                                  ((3, 1, 32), 32, 32), ((3, 3, 1, 33), 32, 32)]:
    assert not kernels.depthwise_conv(shape, groups, channels), (shape, groups, channels)
  if not AVAILABLE:
    pytest.skip("the native library is not built")
  monkeypatch.delenv(kernels.ENV_VAR, raising=False)
  monkeypatch.setattr(kernels, "amx_int8", lambda: True)
  assert kernels.resolve("auto", xla_amx=True) == "xla"
  # 64 x 64 x 64 x 64 through a 3 x 3 window: 1.5e8 multiply-adds; XLA runs none of these
  # convolutions faster on AMX (grouped ones not on tiles; the ungrouped one has 2^18 rows).
  x = jax.ShapeDtypeStruct((64, 64, 64, 64), jnp.int8)
  geometry = dict(strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1),
                  pad_value=jnp.int32(0), kernel="auto")
  # Groups of 32 channels: the grouped kernel where the best path runs them, else runs of
  # groups as ungrouped native convolutions (avx2).
  grouped = ("qjax_int8_depthwise_s32" if kernels.grouped_direct((3, 3, 32, 64), 2, 64,
                                                                  AVAILABLE[0])
             else "qjax_int8_conv_s32")
  for groups, channels_in, target in [(64, 1, "qjax_int8_depthwise_s32"), (2, 32, grouped),
                                      (1, 64, "qjax_int8_conv_s32")]:
    w = jax.ShapeDtypeStruct((3, 3, channels_in, 64), jnp.int8)
    program = jax.jit(lambda x, w, groups=groups: kernels.conv_int32(
        x, w, jnp.zeros(64, jnp.int32), groups=groups, **geometry)).lower(x, w).as_text()
    assert target in program, (groups, target)
  # An ungrouped convolution of large weights over 17 to 511 output pixels: XLA's on AMX.
  w = jax.ShapeDtypeStruct((3, 3, 256, 256), jnp.int8)
  program = jax.jit(lambda x, w: kernels.conv_int32(x, w, jnp.zeros(256, jnp.int32),
                                                    **geometry)).lower(
      jax.ShapeDtypeStruct((1, 8, 8, 256), jnp.int8), w).as_text()
  assert "qjax_int8" not in program


def test_grouped_rule_and_its_runs():
  """Which grouped convolutions run as ungrouped native calls (2 or more groups of 2 or more
  input channels, any rank) and how many groups share a call (as many as fill 16 output
  channels); every run's block-diagonal kernel gives the integers of its groups."""
  assert kernels.grouped_conv((3, 3, 4, 128), 32, 128)
  assert kernels.grouped_conv((3, 2, 9), 3, 6)  # 1-D
  for shape, groups, channels in [((3, 3, 1, 32), 32, 32), ((3, 3, 4, 32), 1, 4),
                                  ((3, 3, 4, 30), 4, 16), ((3, 3, 4, 32), 4, 12)]:
    assert not kernels.grouped_conv(shape, groups, channels), (shape, groups, channels)
  assert kernels.group_runs(32, 128) == [(g, g + 4) for g in range(0, 32, 4)]
  assert kernels.group_runs(4, 20) == [(0, 3), (3, 4)]
  assert kernels.group_runs(2, 64) == [(0, 1), (1, 2)]
  assert kernels.group_runs(3, 6) == [(0, 3)]
  # Small groups on the depthwise kernel, on its AVX-512 and portable paths:
  for path in ("vnni", "amx", "amx_emulated", "portable"):
    assert kernels.grouped_direct((3, 3, 4, 128), 32, 128, path)  # 4 groups a block
    assert kernels.grouped_direct((3, 3, 16, 32), 4, 64, path)  # 2 groups: 32 input bytes
    assert kernels.grouped_direct((3, 3, 6, 40), 8, 48, path)  # 5 outputs: up to 4 groups
    assert not kernels.grouped_direct((3, 3, 16, 16), 4, 64, path)  # 4 groups: 64 bytes
    assert not kernels.grouped_direct((3, 3, 3, 20), 4, 12, path)  # odd input channels
    assert not kernels.grouped_direct((3, 3, 18, 18), 2, 36, path)  # more than 16
    assert kernels.grouped_direct((3, 3, 4, 64), 4, 16, path)  # 16 outputs a group
    assert kernels.grouped_direct((3, 3, 64, 128), 2, 128, path)  # 64 outputs a group
    assert not kernels.grouped_direct((3, 3, 4, 48), 2, 8, path)  # 24 outputs: straddling
    assert not kernels.grouped_direct((3, 3, 6, 32), 2, 12, path)  # 16 outputs, 6 inputs
    assert not kernels.grouped_direct((3, 2, 9), 3, 6, path)  # 1-D
  # On "avx2" 8 output channels a vector: groups of 2..16 input channels (even) whose blocks
  # of 8 outputs read at most 16 bytes of a pixel.
  for shape, groups, channels, direct in [
      ((3, 3, 4, 128), 32, 128, True), ((3, 3, 16, 32), 4, 64, True),
      ((3, 3, 8, 8), 2, 16, True), ((3, 3, 8, 16), 4, 32, True),  # 2 groups of 8 a block
      ((3, 3, 6, 40), 8, 48, False), ((3, 3, 16, 16), 4, 64, False),  # 18 / 32 bytes
      ((3, 3, 32, 64), 2, 64, False), ((3, 3, 3, 20), 4, 12, False)]:
    assert kernels.grouped_direct(shape, groups, channels, "avx2") is direct, shape
  rng = np.random.default_rng(8)
  w = rng.integers(-128, 128, (2, 3, 3, 20), dtype=np.int8)  # 4 groups of 5 channels
  x = rng.integers(-128, 128, (1, 4, 5, 12), dtype=np.int8)
  geometry = dict(strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
                  pad_value=np.int32(0))
  for g0, g1 in kernels.group_runs(4, 20):
    block = np.asarray(kernels._block_diagonal(jnp.asarray(w), 4, g0, g1))
    assert block.shape == (2, 3, 3 * (g1 - g0), 5 * (g1 - g0))
    got = arith.conv(x[..., 3 * g0:3 * g1], block, feature_group_count=1, **geometry)
    want = arith.conv(x[..., 3 * g0:3 * g1], w[..., 5 * g0:5 * g1], feature_group_count=g1 - g0,
                      **geometry)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_conv_int32_groups():
  """Grouped: each group of input channels against its own output channels; bad groups are
  named."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.integers(-128, 128, (2, 5, 5, 4), dtype=np.int8))
  w = jnp.asarray(rng.integers(-128, 128, (3, 3, 2, 6), dtype=np.int8))
  geometry = {"strides": (1, 1), "padding": ((1, 1), (1, 1)), "dilation": (1, 1),
              "pad_value": jnp.int32(3)}
  got = np.asarray(kernels.conv_int32(x, w, jnp.zeros(6, jnp.int32), groups=2, **geometry))
  for g in range(2):
    want = kernels.conv_int32(x[..., 2 * g:2 * g + 2], w[..., 3 * g:3 * g + 3],
                              jnp.zeros(3, jnp.int32), kernel="xla", **geometry)
    np.testing.assert_array_equal(got[..., 3 * g:3 * g + 3], np.asarray(want))
  with pytest.raises(ValueError, match="groups must be a positive int dividing the 6 output"):
    kernels.conv_int32(x, w, jnp.zeros(6, jnp.int32), groups=4, **geometry)
  with pytest.raises(ValueError, match=r"C = 6 \(3 groups of kernel_hwio's 2\)"):
    kernels.conv_int32(x, w, jnp.zeros(6, jnp.int32), groups=3, **geometry)


def test_conv_operands_must_be_int8_on_every_path():
  """A float input or kernel is refused by name before any path runs (a native call would
  refuse it without naming it): ungrouped, depthwise, int32 sums and requantized."""
  r = rq.FloatRequant(multiplier=np.float32(0.01), zero_point=np.int32(0), lo=-128, hi=127,
                      relu=False)
  geometry = {"strides": (1, 1), "padding": ((1, 1), (1, 1)), "dilation": (1, 1),
              "pad_value": jnp.int32(0)}
  x8, xf = jnp.ones((1, 5, 5, 4), jnp.int8), jnp.ones((1, 5, 5, 4), jnp.float32)
  for groups, shape in ((1, (3, 3, 4, 4)), (4, (3, 3, 1, 4))):
    w8, wf = jnp.ones(shape, jnp.int8), jnp.ones(shape, jnp.float32)
    for path in ("xla", *AVAILABLE[:1]):
      for x, w, name in ((xf, w8, "x"), (x8, wf, "kernel_hwio")):
        with pytest.raises(TypeError, match=f"conv: {name} must be int8 .* got float32"):
          kernels.conv(x, w, jnp.zeros(4, jnp.int32), r, groups=groups, kernel=path, **geometry)
        with pytest.raises(TypeError, match=f"conv_int32: {name} must be int8 .* got float32"):
          kernels.conv_int32(x, w, jnp.zeros(4, jnp.int32), groups=groups, kernel=path,
                             **geometry)
