"""The NumPy references of PyTorch's quantized add, cat and average poolings, bit for bit.

`reference.quantized_add`, `quantized_cat`, `quantized_adaptive_avg_pool` and
`quantized_avg_pool2d` against torch 2.13's CPU kernels on quint8 (torch.ops.quantized.add /
add_relu / cat, torch.nn.functional.adaptive_avg_pool2d / avg_pool2d of quantized tensors),
under the fbgemm and the x86 engines, compared with np.testing.assert_array_equal on
int_repr. No tolerance anywhere.

The references take the kernel build as `cpu_capability` (torch.backends.cpu.
get_cpu_capability(), lower case), so every test predicts the CPU it runs on:

  * add: blocks of 64 elements take the vectorized forms (fma dequantization, round then add
    Z), the last n mod 64 elements the scalar ones (product dequantization, add Z then
    round). Sizes 1, 7, 33, 63, 64, 65, 130, 1000 and 4-D NCHW / channels_last tensors.
  * cat: channels_last 4-D inputs along dim 1 take the NHWC kernel (copy on equal qparams,
    vectorized forms on 8 floor(C / 8) channels, scalar forms on the rest); everything else
    dequantizes, concatenates and calls quantize_per_tensor (add Z then round, fused).
  * adaptive_avg_pool2d and avg_pool2d: channels_last and contiguous kernels, whose tie
    rules differ (see the references' docstrings).

Data: random grids (scales 1e-3..1e1, zero points 0..255), exact ties (power-of-two output
scales with input scales at half-integer multiples of them, odd and even zero points: where
"round then add Z" and "add Z then round" differ) and near ties (an output scale chosen so
that one sum lands within a few ulps of k + 1/2: where the fma and product dequantizations
and the fused and two-step quantizations differ). Each tie test also asserts that a wrong rule
would have failed on its data, so the data pins the rule. Seeds are fixed.

The kernels of the other builds run in subprocesses with ATEN_CPU_CAPABILITY=avx2 / default
(torch honours it below the CPU's own capability). The last tests quantize TorchResNetTiny
(tests/support/torch_models.py) with torch's eager-mode flow and check its add_relu, add, cat and
adaptive average pool outputs against the references applied to the captured inputs.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from support import reference as ref  # noqa: E402

# Torch 2.13 announces the deprecation of its quantized dtypes on first use; they still work.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                       reason="the references model torch's x86 kernels"),
]

F32 = np.float32
ENGINES = [e for e in ("fbgemm", "x86") if e in torch.backends.quantized.supported_engines]


def cpu_capability() -> str:
  """The kernel build torch runs here, as the references name it."""
  cap = torch.backends.cpu.get_cpu_capability().lower()
  return cap if cap in ref.TORCH_CPU_CAPABILITIES else "default"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
  """One intra-op thread: the quantize / dequantize kernels spend milliseconds per call
  waking a thread pool, and one thread keeps every op in a single chunk."""
  saved = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(saved)


@pytest.fixture(params=ENGINES)
def engine(request):
  saved = torch.backends.quantized.engine
  torch.backends.quantized.engine = request.param
  yield request.param
  torch.backends.quantized.engine = saved


# ------------------------------------------------------------------------------------------
# Torch side.


def qtensor(q_nchw: np.ndarray, scale: float, zero_point: int, channels_last: bool = False):
  """A quint8 tensor holding `q_nchw` (torch's logical layout)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    t = torch._make_per_tensor_quantized_tensor(
        torch.from_numpy(np.ascontiguousarray(q_nchw, np.uint8)), float(scale), int(zero_point))
  return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def is_channels_last(t) -> bool:
  return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def nhwc(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def nchw(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


def rand_scale(rng) -> float:
  return float(F32(10 ** rng.uniform(-3, 1)))


def near_tie_scale(x, rng, k_max: int = 120) -> float | None:
  """A float32 output scale S with |x| / S within a few ulps of k + 1/2."""
  x = abs(float(x))
  if x == 0:
    return None
  s = float(F32(x / (int(rng.integers(0, k_max)) + 0.5)))
  return s if 1e-7 < s < 1e6 else None


# ------------------------------------------------------------------------------------------
# Checks, shared by the tests and the subprocesses of the other kernel builds. Each returns
# how many compared elements the wrong rules it names would have missed.


def _torch_add(qa, sa, za, qb, sb, zb, s_out, z_out, relu, channels_last=False):
  op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
  ta = qtensor(qa, sa, za, channels_last)
  tb = qtensor(qb, sb, zb, channels_last)
  return op(ta, tb, float(s_out), int(z_out)).int_repr().numpy()


def _ref_add(qa, sa, za, qb, sb, zb, s_out, z_out, relu, channels_last, cap):
  """The reference on arrays in torch's memory order (NHWC for channels_last)."""
  if channels_last:
    return nchw(ref.quantized_add(nhwc(qa), sa, za, nhwc(qb), sb, zb, s_out, z_out, relu,
                                  cpu_capability=cap))
  return ref.quantized_add(qa, sa, za, qb, sb, zb, s_out, z_out, relu, cpu_capability=cap)


ADD_SHAPES = [(1,), (7,), (33,), (63,), (64,), (65,), (130,), (1000,), (2, 3, 5, 7),
              (3, 10, 6, 6), (1, 5, 1, 1)]


def check_add_random(cap: str, seed: int = 0, cases: int = 120) -> None:
  rng = np.random.default_rng(seed)
  for i in range(cases):
    shape = ADD_SHAPES[i % len(ADD_SHAPES)]
    channels_last = len(shape) == 4 and (i // len(ADD_SHAPES)) % 2 == 1
    sa, sb, so = rand_scale(rng), rand_scale(rng), rand_scale(rng)
    za, zb, zo = (int(v) for v in rng.integers(0, 256, 3))
    qa, qb = (rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2))
    relu = bool(i % 3 == 0)
    got = _torch_add(qa, sa, za, qb, sb, zb, so, zo, relu, channels_last)
    want = _ref_add(qa, sa, za, qb, sb, zb, so, zo, relu, channels_last, cap)
    np.testing.assert_array_equal(got, want, err_msg=f"add case {i}: {shape} {relu=}")


def check_add_exact_ties(cap: str, seed: int = 1, cases: int = 60) -> int:
  """S_out = 2^e, S_a and S_b in {1/4, 1/2, 3/2, 5/2} x 2^e: c / S_out is a multiple of 1/4,
  exactly, in both dequantization forms; k + 1/2 rounds to even k, or to even k + Z."""
  rng = np.random.default_rng(seed)
  wrong = 0
  for i in range(cases):
    so = 2.0 ** int(rng.integers(-9, 3))
    sa, sb = (so * float(rng.choice([0.25, 0.5, 1.5, 2.5])) for _ in range(2))
    za, zb = (int(v) for v in rng.integers(0, 256, 2))
    zo = int(rng.integers(0, 128)) * 2 + i % 2              # odd and even output zero points
    n = (130, 1000, 65)[i % 3]
    qa, qb = (rng.integers(0, 256, n, dtype=np.uint8) for _ in range(2))
    relu = bool(i % 4 == 0)
    got = _torch_add(qa, sa, za, qb, sb, zb, so, zo, relu)
    np.testing.assert_array_equal(
        got, ref.quantized_add(qa, sa, za, qb, sb, zb, so, zo, relu, cpu_capability=cap),
        err_msg=f"tie case {i}")
    # A wrong rule: the tail's "add Z then round" on every element.
    tail_rule = ref.quantized_add(qa, sa, za, qb, sb, zb, so, zo, relu,
                                  cpu_capability="default")
    if cap != "default":
      wrong += int((tail_rule != got).sum())
  return wrong


def _add_near_tie_case(rng):
  """(sa, za, sb, zb, so, zo, qa, qb) over all 256 x 256 input pairs: S_out puts one sum within
  a few ulps of a half-integer; the pairs on which torch's forms disagree, or None."""
  sa, sb = rand_scale(rng), rand_scale(rng)
  za, zb, zo = (int(v) for v in rng.integers(0, 256, 3))
  qa, qb = (g.reshape(-1).astype(np.uint8) for g in np.meshgrid(np.arange(256), np.arange(256)))
  i = int(rng.integers(0, qa.size))
  c = ref.torch_dequantize(qa[i], sa, za, "fma") + ref.torch_dequantize(qb[i], sb, zb, "fma")
  so = near_tie_scale(c, rng)
  if so is None:
    return None
  forms = [ref.quantized_add(qa, sa, za, qb, sb, zb, so, zo, cpu_capability=c)
           for c in (None, "default")]
  mixed = ref.quantized_add(qa, sa, za, qb, sb, zb, so, zo, cpu_capability="avx2")
  differ = (forms[0] != forms[1]) | (mixed != forms[0])
  if not differ.any():
    return None
  return sa, za, sb, zb, so, zo, qa[differ], qb[differ]


def check_add_near_ties(cap: str, seed: int = 2, cases: int = 40) -> tuple[int, int]:
  """Pairs on which the vectorized and the scalar forms disagree, repeated over 130 elements
  (two 64-element blocks and a 2-element tail) and 63 (all tail). Returns how many elements
  the all-vector rule and the all-scalar rule got wrong."""
  rng = np.random.default_rng(seed)
  wrong_vector = wrong_scalar = 0
  done = 0
  while done < cases:
    case = _add_near_tie_case(rng)
    if case is None:
      continue
    sa, za, sb, zb, so, zo, pa, pb = case
    for n in (130, 63):
      qa, qb = np.resize(pa, n), np.resize(pb, n)
      got = _torch_add(qa, sa, za, qb, sb, zb, so, zo, False)
      np.testing.assert_array_equal(
          got, ref.quantized_add(qa, sa, za, qb, sb, zb, so, zo, cpu_capability=cap),
          err_msg=f"near tie case {done}, n={n}")
      wrong_vector += int((ref.quantized_add(qa, sa, za, qb, sb, zb, so, zo) != got).sum())
      wrong_scalar += int((ref.quantized_add(qa, sa, za, qb, sb, zb, so, zo,
                                             cpu_capability="default") != got).sum())
    done += 1
  return wrong_vector, wrong_scalar


def _torch_cat(inputs_nchw, so, zo, dim, channels_last):
  ts = [qtensor(q, s, z, channels_last) for q, s, z in inputs_nchw]
  out = torch.ops.quantized.cat(ts, scale=float(so), zero_point=int(zo), dim=dim)
  return out.int_repr().numpy(), all(is_channels_last(t) for t in ts) and dim == 1


def _ref_cat(inputs_nchw, so, zo, dim, nhwc_kernel, cap):
  if nhwc_kernel:
    out = ref.quantized_cat([(nhwc(q), s, z) for q, s, z in inputs_nchw], so, zo, -1,
                            channels_last=True, cpu_capability=cap)
    return nchw(out)
  return ref.quantized_cat(inputs_nchw, so, zo, dim, cpu_capability=cap)


def _cat_inputs(rng, shapes, so, zo, qparams):
  """Inputs of the given NCHW shapes; each takes the output's qparams (copied by the NHWC
  kernel) a quarter of the time, else `qparams(rng)`."""
  inputs = []
  for shape in shapes:
    s, z = (so, zo) if rng.random() < 0.25 else qparams(rng)
    inputs.append((rng.integers(0, 256, shape, dtype=np.uint8), s, z))
  return inputs


def check_cat(cap: str, seed: int = 3, cases: int = 90) -> int:
  """Random grids, exact ties (S_out = 2^e, S_i = 3/2 2^e) and near ties, on channels_last
  4-D inputs (NHWC kernel), contiguous 4-D inputs and 2-D / 3-D ones. Returns how many
  elements the all-vector rule got wrong on the NHWC kernel's data."""
  rng = np.random.default_rng(seed)
  wrong, kernels = 0, set()
  for i in range(cases):
    kind = i % 3
    zo = int(rng.integers(0, 256))
    if kind == 0:
      so = rand_scale(rng)
      qparams = lambda r: (rand_scale(r), int(r.integers(0, 256)))  # noqa: E731
    elif kind == 1:
      so = 2.0 ** int(rng.integers(-9, 3))
      qparams = lambda r, so=so: (so * float(r.choice([0.5, 1.5, 2.5])),  # noqa: E731
                                  int(r.integers(0, 256)))
    else:
      s_in, z_in = rand_scale(rng), int(rng.integers(0, 256))
      so = near_tie_scale(ref.torch_dequantize(int(rng.integers(0, 256)), s_in, z_in, "fma"),
                          rng) or s_in
      qparams = lambda r, s=s_in, z=z_in: (s, z)  # noqa: E731
    layout = (i // 3) % 3          # channels_last 4-D, contiguous 4-D, 2-D / 3-D
    if layout < 2:
      n, h, w = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
      # (contiguous inputs with H = W = 1, or all with C = 1, are channels_last too)
      channels = [int(c) for c in rng.choice([1, 3, 7, 8, 9, 16, 20, 33], int(rng.integers(2, 4)))]
      shapes = [(n, c, h, w) for c in channels]
      dim = 1
    else:
      rank = int(rng.integers(2, 4))
      base = [int(v) for v in rng.integers(1, 6, rank)]
      dim = int(rng.integers(0, rank))
      shapes = [tuple(base[:dim] + [int(rng.integers(1, 9))] + base[dim + 1:])
                for _ in range(int(rng.integers(2, 4)))]
    inputs = _cat_inputs(rng, shapes, so, zo, qparams)
    got, nhwc_kernel = _torch_cat(inputs, so, zo, dim, channels_last=layout == 0)
    kernels.add(nhwc_kernel)
    np.testing.assert_array_equal(got, _ref_cat(inputs, so, zo, dim, nhwc_kernel, cap),
                                  err_msg=f"cat case {i}: {shapes} dim {dim}")
    if nhwc_kernel:
      wrong += int((_ref_cat(inputs, so, zo, dim, True, None) != got).sum())
  assert kernels == {True, False}
  return wrong


POOL_SHAPES = [(1, 7, 4, 4), (2, 20, 6, 6), (1, 33, 5, 3), (3, 16, 3, 7), (2, 8, 2, 2),
               (1, 1, 9, 9), (2, 5, 1, 1), (1, 40, 4, 6)]


# Shapes and output sizes whose windows hold 6, 14 or 30 elements, where the float32 roundings
# of the contiguous and channels_last adaptive kernels part on near ties.
ADAPTIVE_TIE_CASES = [((4, 20, 2, 3), 1), ((3, 20, 2, 7), 1), ((2, 20, 5, 6), 1),
                      ((2, 20, 4, 6), 2), ((2, 12, 6, 10), (3, 2))]


def check_adaptive_avg_pool(cap: str, seed: int = 4, cases: int = 80) -> int:
  """Global pooling and other output sizes, channels_last and contiguous. Returns how many
  elements each kernel's rule would have missed on the other kernel's inputs."""
  rng = np.random.default_rng(seed)
  wrong = 0
  for i in range(cases):
    channels_last = (i // 2) % 2 == 0
    if i % 2:
      shape, out_size = ADAPTIVE_TIE_CASES[(i // 4) % len(ADAPTIVE_TIE_CASES)]
      z = int(rng.integers(64, 256))
    else:
      shape = POOL_SHAPES[(i // 2) % len(POOL_SHAPES)]
      h, w = shape[2:]
      out_size = (1, 1) if i % 3 == 0 else (int(rng.integers(1, h + 1)),
                                            int(rng.integers(1, w + 1)))
      z = int(rng.integers(0, 256))
    s = rand_scale(rng)
    q = rng.integers(0, 256, shape, dtype=np.uint8)
    t = qtensor(q, s, z, channels_last)
    out = torch.nn.functional.adaptive_avg_pool2d(t, out_size)
    assert (out.q_scale(), out.q_zero_point()) == (s, z)
    got = nhwc(out.int_repr().numpy())
    kernel = is_channels_last(t)
    want = ref.quantized_adaptive_avg_pool(nhwc(q), z, out_size, channels_last=kernel,
                                           cpu_capability=cap)
    np.testing.assert_array_equal(got, want, err_msg=f"adaptive case {i}: {shape} {out_size}")
    other = ref.quantized_adaptive_avg_pool(nhwc(q), z, out_size, channels_last=not kernel,
                                            cpu_capability=cap)
    wrong += int((other != got).sum())
  return wrong


def check_avg_pool2d(cap: str, seed: int = 5, cases: int = 64) -> int:
  """Kernels, strides, padding, ceil_mode, count_include_pad and divisor_override drawn at
  random, channels_last and contiguous. Returns how many elements the all-vector rule missed
  on channels_last inputs."""
  rng = np.random.default_rng(seed)
  wrong = 0
  for i in range(cases):
    shape = POOL_SHAPES[i % len(POOL_SHAPES)]
    channels_last = (i // len(POOL_SHAPES)) % 2 == 0
    h, w = shape[2:]
    kernel = (int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1)))
    stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    padding = (int(rng.integers(0, kernel[0] // 2 + 1)), int(rng.integers(0, kernel[1] // 2 + 1)))
    ceil_mode, count_include_pad = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
    divisor = int(rng.integers(1, 13)) if i % 5 == 0 else None
    s, z = rand_scale(rng), int(rng.integers(0, 256))
    q = rng.integers(0, 256, shape, dtype=np.uint8)
    t = qtensor(q, s, z, channels_last)
    out = torch.nn.functional.avg_pool2d(t, kernel, stride, padding, ceil_mode,
                                         count_include_pad, divisor)
    assert (out.q_scale(), out.q_zero_point()) == (s, z)
    got = nhwc(out.int_repr().numpy())
    args = (nhwc(q), z, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
    want = ref.quantized_avg_pool2d(*args, channels_last=is_channels_last(t), cpu_capability=cap)
    np.testing.assert_array_equal(got, want, err_msg=f"avg_pool case {i}: {shape} {kernel}")
    if is_channels_last(t):
      wrong += int((ref.quantized_avg_pool2d(*args) != got).sum())
  return wrong


def run_checks(cap: str | None = None) -> dict:
  """Every check on this process's kernel build; {check: wrong-rule misses}."""
  cap = cap or cpu_capability()
  check_add_random(cap)
  return {"add_exact_ties": check_add_exact_ties(cap),
          "add_near_ties": check_add_near_ties(cap),
          "cat": check_cat(cap),
          "adaptive_avg_pool": check_adaptive_avg_pool(cap),
          "avg_pool2d": check_avg_pool2d(cap)}


# ------------------------------------------------------------------------------------------
# Tests on this process's build.


def test_add_random(engine):
  check_add_random(cpu_capability())


def test_add_exact_ties(engine):
  wrong = check_add_exact_ties(cpu_capability())
  if cpu_capability() != "default":
    assert wrong > 0, "the exact ties did not separate the vectorized tie rule"


def test_add_near_ties_vector_and_tail(engine):
  """The vectorized and scalar forms each disagree with torch somewhere on this data; the
  reference, which splits the elements as torch does, never."""
  wrong_vector, wrong_scalar = check_add_near_ties(cpu_capability())
  assert wrong_vector > 0
  if cpu_capability() != "default":
    assert wrong_scalar > 0


def test_cat(engine):
  wrong = check_cat(cpu_capability())
  if cpu_capability() != "default":
    assert wrong > 0, "the data did not separate the NHWC kernel's scalar channels"


def test_adaptive_avg_pool(engine):
  assert check_adaptive_avg_pool(cpu_capability()) > 0, \
      "the data did not separate the contiguous and channels_last kernels"


def test_avg_pool2d(engine):
  wrong = check_avg_pool2d(cpu_capability())
  if cpu_capability() != "default":
    assert wrong > 0, "the data did not separate the NHWC kernel's scalar channels"


def test_pool_multiplier_round_trip():
  """inv = f32(1 / f32(1 / M)) equals M = f32(1 / D) for every divisor D < 2^20."""
  d = np.arange(1, 2**20, dtype=np.float64).astype(F32)
  m = F32(1) / d
  np.testing.assert_array_equal(F32(1) / (F32(1) / m), m)


def test_adaptive_near_tie_example():
  """A 2 x 3 window, Z = 100, sum q = 9 (mean 1.5): acc = 9 - 600 = -591. The contiguous
  kernel rounds f32(9 f32(1/6)) = 1.5 to 2, the channels_last scalar channels
  f32(f32(-591 f32(1/6)) + 100) = 1.5 to 2 too, its vector channels
  f32(fma(-591, f32(1/6), 100)) = 1.4999971 to 1."""
  q = np.zeros((1, 2, 3, 9), np.uint8)
  q[0, 0, 0, :] = 9                                         # 8 vector channels and 1 scalar
  t = qtensor(nchw(q), 0.05, 100)
  assert not is_channels_last(t)
  np.testing.assert_array_equal(
      torch.nn.functional.adaptive_avg_pool2d(t, 1).int_repr().numpy().reshape(-1), [2] * 9)
  np.testing.assert_array_equal(
      ref.quantized_adaptive_avg_pool(q, 100, 1, channels_last=False).reshape(-1), [2] * 9)
  want = {"avx512": [1] * 8 + [2], "avx2": [1] * 8 + [2], "default": [2] * 9}[cpu_capability()]
  t = qtensor(nchw(q), 0.05, 100, channels_last=True)
  np.testing.assert_array_equal(
      torch.nn.functional.adaptive_avg_pool2d(t, 1).int_repr().numpy().reshape(-1), want)
  np.testing.assert_array_equal(
      ref.quantized_adaptive_avg_pool(q, 100, 1, cpu_capability=cpu_capability()).reshape(-1),
      want)


# Default run: the scalar build, whose rules differ from the vectorized ones this process runs;
# the AVX2 build (the vectorized rules on 8 lanes rather than AVX-512's 16) with -m slow.
@pytest.mark.parametrize("build", [pytest.param("avx2", marks=pytest.mark.slow), "default"])
def test_other_kernel_builds(build):
  """The same checks in a fresh interpreter with ATEN_CPU_CAPABILITY=`build`."""
  env = dict(os.environ, ATEN_CPU_CAPABILITY=build, PYTHONWARNINGS="ignore")
  here = os.path.dirname(os.path.abspath(__file__))
  code = (f"import sys; sys.path.insert(0, {here!r}); import test_reference_ops_torch as t; "
          "t.torch.set_num_threads(1); print(t.cpu_capability(), t.run_checks())")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  ran = proc.stdout.split()[0]
  assert ran in (build, "default"), proc.stdout   # below the CPU's own build, or default


# ------------------------------------------------------------------------------------------
# Integer-only add (no torch counterpart): within one step of the exact sum.


def test_integer_add_close_to_exact():
  rng = np.random.default_rng(6)
  for _ in range(50):
    sa, sb, so = rand_scale(rng), rand_scale(rng), rand_scale(rng)
    za, zb, zo = (int(v) for v in rng.integers(0, 256, 3))
    qa, qb = (rng.integers(0, 256, 500) for _ in range(2))
    got = ref.integer_add(qa, sa, za, qb, sb, zb, so, zo).astype(np.int64)
    exact = (np.float64(F32(sa)) * (qa - za) + np.float64(F32(sb)) * (qb - zb)) / np.float64(
        F32(so)) + zo
    inside = (exact > 0.5) & (exact < 254.5)
    assert np.all(np.abs(got[inside] - exact[inside]) <= 0.5 + 1e-3)
    np.testing.assert_array_equal(got, ref.integer_add(qb, sb, zb, qa, sa, za, so, zo))
  # Adding a zero (q_b = Z_b) on the first input's grid gives the first input back.
  q = np.arange(256)
  np.testing.assert_array_equal(ref.integer_add(q, 0.02, 77, np.full(256, 9), 0.5, 9, 0.02, 77),
                                q)


# ------------------------------------------------------------------------------------------
# A quantized residual CNN: the ops inside a converted model.


@pytest.fixture(scope="module")
def resnet_tiny():
  from support import torch_models as tm  # imports qjax.nn and flax: only these tests need them
  gen = torch.Generator().manual_seed(0)
  torch.manual_seed(0)
  model = tm.randomize_batch_norms(tm.TorchResNetTiny(), gen).eval()
  calib = [torch.randn(8, 1, 12, 12, generator=gen) for _ in range(3)]
  x = torch.randn(5, 1, 12, 12, generator=gen)
  return tm, model, calib, x


@pytest.mark.parametrize("eng", ENGINES)
def test_resnet_tiny_ops_match_references(resnet_tiny, eng):
  tm, model, calib, x = resnet_tiny
  qmodel = tm.quantize_resnet_tiny(model, calib, engine=eng)
  y, cap = tm.run_quantized(qmodel, x, engine=eng)
  assert y.shape == (5, 10) and torch.isfinite(y).all()
  build = cpu_capability()

  for name, relu in (("add1", True), ("add2", False)):
    c = cap[name]
    assert c["op"] == ("add_relu" if relu else "add")
    a, b, out = c["inputs"][0], c["inputs"][1], c["output"]
    assert a.channels_last and b.channels_last and out.channels_last
    assert (out.scale, out.zero_point) == (qmodel.get_submodule(name).scale,
                                           qmodel.get_submodule(name).zero_point)
    want = ref.quantized_add(nhwc(a.int_repr), a.scale, a.zero_point, nhwc(b.int_repr),
                             b.scale, b.zero_point, out.scale, out.zero_point, relu,
                             cpu_capability=build)
    np.testing.assert_array_equal(nhwc(out.int_repr), want, err_msg=name)

  c = cap["cat"]
  assert c["op"] == "cat" and c["dim"] == 1 and all(t.channels_last for t in c["inputs"])
  out = c["output"]
  want = ref.quantized_cat([(nhwc(t.int_repr), t.scale, t.zero_point) for t in c["inputs"]],
                           out.scale, out.zero_point, -1, channels_last=True,
                           cpu_capability=build)
  np.testing.assert_array_equal(nhwc(out.int_repr), want, err_msg="cat")

  c = cap["pool"]
  (inp,), out = c["inputs"], c["output"]
  assert (out.scale, out.zero_point) == (inp.scale, inp.zero_point)
  want = ref.quantized_adaptive_avg_pool(nhwc(inp.int_repr), inp.zero_point, 1,
                                         channels_last=inp.channels_last, cpu_capability=build)
  np.testing.assert_array_equal(nhwc(out.int_repr), want, err_msg="pool")
