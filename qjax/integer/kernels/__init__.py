"""A native CPU kernel for the integer path's int8 x int8 -> int32 GEMM, with a fused epilogue.

`qjax.integer.arith.matmul` (XLA's `dot_general`) is the reference; this module computes the
same integers with a C++ kernel (`int8_gemm.cc`) called through `jax.ffi` under `jax.jit`:

  acc[m, n] = sum_k x[m, k] w[n, k] + offset[n]                          int32 (`matmul`)
  q[m, n]   = clamp(Z + rne((f32(acc[m, n]) + bias[n]) * M[n]), low, hi)  int8 (`matmul_requant`)

with low = max(lo, Z) for a fused ReLU: `qjax.integer.FbgemmRequant`'s formula, bit for bit
(`FloatRequant` is the same with a zero bias; `IntegerRequant`'s fixed-point formula runs in
the same epilogue, its products exact in 64 bits).
int32 sums wrap modulo 2^32 as XLA's do. The code path is chosen by the `kernel` argument,
else by the environment variable QJAX_INT8_KERNEL, else by `DEFAULT_KERNEL` ("auto"; set
QJAX_INT8_KERNEL=xla to keep the integer path's programs plain XLA, int8 `dot_general`s):

  "xla"       lax.dot_general (every backend; the fallback)
  "amx"       AMX-INT8 tiles (tdpbusd: the "vnni" operands, 16 x 64-byte tiles, blocks of
              32 rows x 32 channels) from 17 rows on; "vnni" below
  "vnni"      AVX-512 VNNI (vpdpbusd is uint8 x int8: activations carried as x + 128, the
              -128 sum_k w[n, k] correction folded into the offset)
  "avx2"      AVX2, int8 widened to int16 and vpmaddwd (exact: no 16-bit saturation)
  "portable"  plain C++
  "amx_emulated"  "amx" with its tile instructions computed in C++: checks the tile kernel
              bit for bit on an AVX-512 VNNI CPU without AMX; slow, never chosen for a call
  "native"    the best path this CPU runs
  "auto"      "native" on the CPU backend of a process with one CPU device; "xla" on other
              backends, with several CPU devices (a device mesh: XLA's SPMD partitioner
              splits a sharded dot_general, not a custom call, which it would gather),
              where AMX-INT8 is granted (`amx_int8`) for the products XLA's int8 dot, on
              AMX tiles there too, was measured faster on (`xla_on_amx`: large weights
              not packed, 17 to 511 rows), and when the library is not built (one warning)

CPU features are read once (CPUID) by the library. Weights are taken as the integer path
stores them, (N, K) output channel first: up to 16 rows stream them as stored; more rows pack
them per call into 16-channel panels with their column sums (a 16 x 16 transpose in
registers: a few percent of the GEMM). Weights packed once (`pack`, `PackedWeights`: what
`qjax.for_serving` does to converted Dense layers where the native kernel runs) go straight
to the panel kernels at every row count. `conv` runs 2-D convolutions with several input
channels as the same GEMM on their patches, which the kernel gathers from the NHWC input
block by block of output pixels (kernels packed once with `pack_conv`, or per call), and
those of one input channel (stride 1, up to 8 output channels: LeNet-5's first layer) with a
direct kernel, 16 output pixels a vector (`direct_conv`); depthwise ones (`depthwise_conv`:
MobileNet's, any channel multiplier, stride and dilation) with a depthwise kernel, 16 output
channels a vector (vpdpwssd on the AVX-512 paths); other grouped ones (`grouped_conv`) with
small groups on the same kernel (`grouped_direct`), else as ungrouped convolutions of runs of
their groups, each run's kernel block diagonal (`group_runs`). The kernel's epilogue also
requantizes the int32 result of the convolutions XLA keeps (other single-channel ones). The
kernel uses every core for products of 2^21 multiply-adds and more, on XLA's intra-op
thread pool (the FFI's ThreadPool: the threads that run XLA's own ops), or a pool of its own
where XLA gives none (QJAX_INT8_THREADS caps the thread count).
For int8-forward QAT (`qjax.ste.int8_forward_dot` / `int8_forward_conv`), `pack_grid` packs
fake-quantized float weights' grid integers in one pass, `fake_quant_observe_int8` has a
fused QAT point hand over its result's integers from its own pass (an activation's codes, a
weight's panels), and `conv_int32` gives a convolution's int32 sums. `retain_freed_memory`
keeps glibc from handing XLA's freed buffers back to the kernel between calls (page faults on
large outputs otherwise).
The library is built by `pip install` (setup.py); where it was not, `available()` is False
and everything runs on XLA.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import os
import pathlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax import _checks, numerics
from qjax._struct import static, struct
from qjax.integer import arith
from qjax.integer import requant as rq

ENV_VAR = "QJAX_INT8_KERNEL"
KERNELS = ("auto", "xla", "native", "amx", "vnni", "avx2", "portable", "amx_emulated")
# Best first; "amx_emulated" last: a check of the tile kernel, never the best.
NATIVE_PATHS = ("amx", "vnni", "avx2", "portable", "amx_emulated")
# The selection when neither the `kernel` argument nor QJAX_INT8_KERNEL gives one.
DEFAULT_KERNEL = "auto"
# "auto" takes the native kernel from this many multiply-adds (M * N * K) on. Measured on an
# AVX-512 VNNI CPU, the native kernel was faster than XLA's int8 dot at every size down to
# 8000 (13 us against 50 us for a fused Dense), so none is kept on XLA by size.
AUTO_MIN_MACS = 0
# On a CPU with AMX-INT8 granted, XLA's int8 dot runs on AMX tiles too, and "auto" gives it
# the products it was measured faster on (`xla_on_amx`): weights not packed of at least
# AUTO_AMX_XLA_WEIGHTS entries (N * K), which the native kernel would pack on every call,
# against AUTO_AMX_XLA_ROWS[0] <= rows < AUTO_AMX_XLA_ROWS[1]. Measured on a 2-core Xeon
# (fused Dense with its requantization, XLA's time over the kernel's): packed weights
# 1.15-2.95x at every size from 32 x 1024 x 1024 to 2048^3; weights not packed of 256 x 256,
# 1.8-4.5x at 17-512 rows; of 512 x 2048 to 4096 x 4096, 0.64-0.97x at 17-256 rows and
# 1.07-1.35x from 512 rows on (where the per-call packing is amortised). Up to 16 rows the
# kernel streams the weights as stored, without tiles.
AUTO_AMX_XLA_WEIGHTS = 2**19
AUTO_AMX_XLA_ROWS = (17, 512)

_PATH_IDS = {"portable": 1, "avx2": 2, "vnni": 3, "amx": 4, "amx_emulated": 5}
# The CPU feature bit each path needs (the emulated tiles run on the AVX-512 code).
_PATH_BITS = {"portable": 1, "avx2": 2, "vnni": 4, "amx": 8, "amx_emulated": 4}
_AMX_CHECK_FAILED = 16  # AMX-INT8 granted, the tile kernel failed its check at load
_VBMI = 32  # AVX-512 VBMI: the direct single-channel convolution on the AVX-512 paths
# The direct single-channel convolution's limits (int8_gemm.cc: kDirectMax*).
_DIRECT_MAX_CHANNELS, _DIRECT_MAX_WIDTH, _DIRECT_MAX_HEIGHT = 8, 48, 64
_TARGET_S32 = "qjax_int8_gemm_s32"
_TARGET_REQUANT = "qjax_int8_gemm_requant"
_TARGET_PACKED_S32 = "qjax_int8_gemm_packed_s32"
_TARGET_PACKED_REQUANT = "qjax_int8_gemm_packed_requant"
_TARGET_ROUND = "qjax_int8_round"
_TARGET_ROUND_ROWS = "qjax_int8_round_rows"
_TARGET_DEQUANT_ROWS = "qjax_int8_dequant_rows"
_TARGET_FAKE_QUANT_OBSERVE = "qjax_fake_quant_observe"
_TARGET_MAX_POOL = "qjax_int8_max_pool"
_TARGET_PACK_ROUND = "qjax_int8_pack_round"
_TARGET_CONV_S32 = "qjax_int8_conv_s32"
_TARGET_CONV_REQUANT = "qjax_int8_conv_requant"
_TARGET_REQUANT_S32 = "qjax_int8_requant_s32"
_TARGET_CONV_PACKED_REQUANT = "qjax_int8_conv_packed_requant"
_TARGET_DEPTHWISE_S32 = "qjax_int8_depthwise_s32"
_TARGET_DEPTHWISE_REQUANT = "qjax_int8_depthwise_requant"
# The panel layout of pre-packed weights: PANEL output channels x GROUP inputs per block.
PANEL, GROUP = 16, 4


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest mmap threshold on 64-bit systems


def retain_freed_memory(trim_threshold: int = 512 * 2**20) -> bool:
  """Keeps freed buffers in this process's heap for reuse (glibc only; process-wide, one-way).

  XLA:CPU allocates every output and temporary buffer of a jitted call and frees it when
  done. glibc returns such memory to the kernel (munmap of blocks from its mmap threshold
  on, brk trims of a free heap top beyond its trim threshold; both adapt, not always in
  time), and the next call touches fresh pages: a page fault per 4 KiB. Measured on a 2-core
  VM: 700 - 1000 faults per call of a 1024^3 int32 GEMM (4 MiB out), up to 40 % of its time;
  ~13 per step of the MNIST MLP's int8-forward QAT step, ~3 %. This sets

    M_MMAP_THRESHOLD = 32 MiB    (blocks below it come from the heap)
    M_TRIM_THRESHOLD = trim_threshold   (free heap top kept up to this size)

  as `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=...`
  does for a process started with it. The price: the heap keeps up to `trim_threshold`
  bytes of freed memory instead of returning them; glibc's adaptive thresholds are off from
  then on.

  Args:
    trim_threshold: bytes of free heap top glibc keeps (>= 32 MiB).

  Returns:
    True where glibc took both settings; False elsewhere (another C library: nothing done).

  Raises:
    ValueError: trim_threshold below 32 MiB or not an int.

  Example:
    >>> retain_freed_memory() in (True, False)
    True
  """
  if isinstance(trim_threshold, bool) or not isinstance(trim_threshold, int) \
      or trim_threshold < _MMAP_THRESHOLD_MAX:
    raise ValueError(f"retain_freed_memory: trim_threshold must be an int >= {_MMAP_THRESHOLD_MAX} "
                     f"(32 MiB); got {trim_threshold!r}.")
  try:
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  clipped = min(trim_threshold, 2**31 - 1)
  return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
      mallopt(_M_TRIM_THRESHOLD, clipped))


def _library_file() -> pathlib.Path | None:
  here = pathlib.Path(__file__).parent
  found = sorted(here.glob("_int8_gemm*.so"))
  return found[0] if found else None


THREADS_ENV_VAR = "QJAX_INT8_THREADS"


def _check_threads_env() -> None:
  """ValueError unless QJAX_INT8_THREADS, when set, is a positive integer (the library reads
  it once, when it starts its threads; any other value would be ignored)."""
  value = os.environ.get(THREADS_ENV_VAR)
  if value is not None and not (value.strip().isdigit() and int(value) > 0):
    raise ValueError(f"{THREADS_ENV_VAR} must be a positive integer (the most threads the "
                     f"native int8 kernel runs on), or unset for every core; got {value!r}.")


@functools.cache
def _load() -> int:
  """Loads the library and registers its FFI targets, once; its CPU feature bits
  (`qjax_int8_paths`: 1 portable, 2 avx2, 4 vnni, 8 amx: AMX-INT8 granted and the tile
  kernel checked against its emulation on this CPU, 16: granted but that check failed, 32:
  AVX-512 VBMI), 0 without it."""
  _check_threads_env()
  path = _library_file()
  if path is None:
    warnings.warn("qjax.integer.kernels: the native int8 GEMM library is not built (reinstall "
                  "qjax with `pip install` and a C++ compiler to build it); the integer path "
                  "runs on XLA's dot_general.", RuntimeWarning, stacklevel=3)
    return 0
  try:
    lib = ctypes.CDLL(str(path))
    lib.qjax_int8_paths.restype = ctypes.c_int
    bits = int(lib.qjax_int8_paths())
    jax.ffi.register_ffi_target(_TARGET_S32, jax.ffi.pycapsule(lib.QjaxInt8GemmS32),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_REQUANT, jax.ffi.pycapsule(lib.QjaxInt8GemmRequant),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_PACKED_S32,
                                jax.ffi.pycapsule(lib.QjaxInt8GemmPackedS32), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_PACKED_REQUANT,
                                jax.ffi.pycapsule(lib.QjaxInt8GemmPackedRequant),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_ROUND, jax.ffi.pycapsule(lib.QjaxInt8Round),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_ROUND_ROWS, jax.ffi.pycapsule(lib.QjaxInt8RoundRows),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_DEQUANT_ROWS,
                                jax.ffi.pycapsule(lib.QjaxInt8DequantRows), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_FAKE_QUANT_OBSERVE,
                                jax.ffi.pycapsule(lib.QjaxFakeQuantObserve), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_MAX_POOL, jax.ffi.pycapsule(lib.QjaxInt8MaxPool),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_PACK_ROUND, jax.ffi.pycapsule(lib.QjaxInt8PackRound),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_CONV_S32, jax.ffi.pycapsule(lib.QjaxInt8ConvS32),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_CONV_REQUANT,
                                jax.ffi.pycapsule(lib.QjaxInt8ConvRequant), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_REQUANT_S32, jax.ffi.pycapsule(lib.QjaxInt8RequantS32),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_CONV_PACKED_REQUANT,
                                jax.ffi.pycapsule(lib.QjaxInt8ConvPackedRequant), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_DEPTHWISE_S32,
                                jax.ffi.pycapsule(lib.QjaxInt8DepthwiseS32), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_DEPTHWISE_REQUANT,
                                jax.ffi.pycapsule(lib.QjaxInt8DepthwiseRequant), platform="cpu")
  except (OSError, AttributeError) as error:
    warnings.warn(f"qjax.integer.kernels: the native int8 GEMM library {path} could not be "
                  f"loaded ({error}); the integer path runs on XLA's dot_general.",
                  RuntimeWarning, stacklevel=3)
    return 0
  if bits & _AMX_CHECK_FAILED:
    warnings.warn("qjax.integer.kernels: this CPU grants AMX-INT8, but the kernel's tile code "
                  "gave other integers than its emulation in a check at load; the 'amx' path is "
                  "off and the 'vnni' path runs instead.", RuntimeWarning, stacklevel=3)
  return bits


def native_paths() -> tuple[str, ...]:
  """The native code paths this machine can run, best first; () without the library.

  "portable" is always among them when the library is built; "avx2" and "vnni" when the CPU
  (and the OS) support AVX2, respectively AVX-512 F/BW/VL + VNNI; "amx" where AMX-INT8 is
  granted too (`amx_int8`); "amx_emulated" (last: never the best) wherever "vnni" runs.

  Returns:
    A tuple drawn from `NATIVE_PATHS`, in its order.

  Example:
    >>> set(native_paths()) <= set(NATIVE_PATHS)
    True
  """
  bits = _load()
  return tuple(p for p in NATIVE_PATHS if bits & _PATH_BITS[p])


def amx_int8() -> bool:
  """Whether this process may use AMX-INT8 tiles (CPUID, the OS's tile state, and Linux's
  per-process grant, which the library requests as XLA does). Where it may, the native
  path "amx" runs, and XLA's int8 dot runs on AMX too (oneDNN / YNNPACK): "auto" leaves
  it the products it was measured faster on (`xla_on_amx`).

  Returns:
    False without the library, off x86, or where the grant is refused (e.g. by seccomp).

  Example:
    >>> isinstance(amx_int8(), bool)
    True
  """
  return bool(_load() & (_PATH_BITS["amx"] | _AMX_CHECK_FAILED))


def available() -> bool:
  """Whether the native library is built and loaded (its "portable" path always runs then).

  Returns:
    True when `native_paths()` is not empty.

  Example:
    >>> available() == bool(native_paths())
    True
  """
  return bool(native_paths())


def resolve(kernel: str | None = None, *, macs: int | None = None,
            xla_amx: bool = False) -> str:
  """The code path a contraction runs on: "xla" or one of `native_paths()`.

  `kernel` if given, else the environment variable QJAX_INT8_KERNEL, else
  `DEFAULT_KERNEL`. "auto" picks the best native path on the CPU backend when the library is
  built, the process has one CPU device and the product has at least `AUTO_MIN_MACS`
  multiply-adds (`macs`; None counts as large), unless AMX-INT8 is granted (`amx_int8`) and
  the caller says XLA's form of this operation is the faster one on AMX tiles (`xla_amx`,
  from `xla_on_amx` for contractions); "xla" otherwise. A named native path
  ("native", "vnni", ...) runs whatever the size and device count (inside `shard_map`, each
  device's program calls the kernel on its own shard). The choice is made when a function is
  traced: a jitted function keeps it (its cache does not see QJAX_INT8_KERNEL change).

  Args:
    kernel: one of `KERNELS`, or None.
    macs: M * N * K of the product, for "auto".
    xla_amx: whether XLA's form of the operation was measured faster than the kernel where
      AMX-INT8 is granted (`xla_on_amx`); False for operations XLA does not run on tiles.

  Returns:
    "xla" or one of `native_paths()`.

  Raises:
    ValueError: `kernel` (or QJAX_INT8_KERNEL) is not one of `KERNELS`, or names a native
      path this machine cannot run.

  Example:
    >>> resolve("xla")
    'xla'
    >>> resolve("auto") in ("xla",) + native_paths()
    True
  """
  source = "kernel"
  if kernel is None:
    kernel = os.environ.get(ENV_VAR, DEFAULT_KERNEL) or DEFAULT_KERNEL
    source = ENV_VAR
  choice = kernel.lower() if isinstance(kernel, str) else kernel
  if choice not in KERNELS:
    raise ValueError(f"{source} must be one of {list(KERNELS)}; got {kernel!r}.")
  if choice == "xla":
    return "xla"
  if choice == "auto":
    if (jax.default_backend() != "cpu" or jax.device_count() > 1
        or (macs is not None and macs < AUTO_MIN_MACS)
        or (xla_amx and amx_int8())):
      return "xla"
    paths = native_paths()
    return paths[0] if paths else "xla"
  paths = native_paths()
  if choice == "native":
    if not paths:
      raise ValueError(f"{source}={kernel!r}: the native int8 GEMM library is not built; "
                       f"use 'xla' or 'auto' (accepted: {list(KERNELS)}).")
    return paths[0]
  if choice not in paths:
    raise ValueError(f"{source}={kernel!r}: this machine runs the native paths "
                     f"{list(paths)} only; accepted values here: "
                     f"{['auto', 'xla'] + (['native'] if paths else []) + list(paths)}.")
  return choice


def xla_on_amx(rows: int, n: int, k: int, packed: bool) -> bool:
  """Whether XLA's int8 dot was measured faster than the native kernel for a product of
  rows x K by (N, K) weights, where AMX-INT8 is granted (`resolve`'s `xla_amx`):

    not packed  and  N * K >= AUTO_AMX_XLA_WEIGHTS  and  lo <= rows < hi   (AUTO_AMX_XLA_ROWS)

  Packed weights go to the kernel as they lie (XLA would unpack them first); small weights
  cost little to pack per call; from hi rows on the per-call packing is amortised; up to 16
  rows the kernel streams the weights without tiles.

  Args:
    rows: M, the rows of the product (output pixels for a convolution).
    n: output channels N.
    k: the contraction's length K.
    packed: whether the weights are `pack`ed (`pack_conv`ed).

  Returns:
    True where "auto" should leave the product to XLA on an AMX CPU.

  Example:
    >>> xla_on_amx(64, 1024, 1024, packed=False), xla_on_amx(64, 1024, 1024, packed=True)
    (True, False)
    >>> xla_on_amx(64, 100, 784, packed=False), xla_on_amx(1024, 1024, 1024, packed=False)
    (False, False)
  """
  lo, hi = AUTO_AMX_XLA_ROWS
  return not packed and n * k >= AUTO_AMX_XLA_WEIGHTS and lo <= rows < hi


@struct
class PackedWeights:
  """An int8 (N, K) weight matrix in the native kernel's panel layout, with its column sums.

    panels[p, g, c, j] = kernel_t[PANEL p + c, GROUP g + j]   (0 beyond N or K)
    column_sums[n]     = sum_k kernel_t[n, k]                 (int32)

  panels is int8 (ceil(N / 16), ceil(K / 4), 16, 4): every 16-channel panel is one contiguous
  stream of 4-byte groups, the order the kernel's inner loop reads, so a call does not repack
  the weights (`pack`). The native paths take it as it is; "xla" unpacks it (`unpack`), so a
  packed model still runs, with the same integers, wherever the kernel does not. `n` and `k`
  are static.

  Example:
    >>> w = jnp.arange(-6, 6, dtype=jnp.int8).reshape(2, 6)
    >>> packed = pack(w)
    >>> packed.panels.shape, packed.shape, packed.column_sums
    ((1, 2, 16, 4), (2, 6), Array([-21,  15], dtype=int32))
    >>> bool((packed.unpack() == w).all())
    True
  """

  panels: jax.Array
  column_sums: jax.Array
  n: int = static()
  k: int = static()

  @property
  def shape(self) -> tuple[int, int]:
    """(N, K): the shape of the weights it packs."""
    return (self.n, self.k)

  @property
  def ndim(self) -> int:
    return 2

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(jnp.int8)

  def unpack(self) -> jax.Array:
    """The int8 (N, K) matrix (`pack`'s inverse)."""
    p, g = self.panels.shape[:2]
    full = jnp.transpose(self.panels, (0, 2, 1, 3)).reshape(p * PANEL, g * GROUP)
    return full[:self.n, :self.k]


def pack(kernel_t: jax.typing.ArrayLike) -> PackedWeights:
  """`kernel_t` (int8 (N, K), output channel first) in the native kernel's panel layout.

  See `PackedWeights` for the layout. Packing is a copy with zero padding: `matmul`,
  `matmul_requant` and `dense` give the same integers for `pack(w)` as for `w`, on every path.

  Args:
    kernel_t: int8 (N, K).

  Returns:
    The `PackedWeights`.

  Raises:
    TypeError: kernel_t not int8. ValueError: kernel_t not 2-D.

  Example:
    >>> x = jnp.array([[1, -2, 3]], jnp.int8)
    >>> w = jnp.array([[1, 1, 1], [-128, 127, 0]], jnp.int8)
    >>> matmul(x, pack(w), kernel="portable" if available() else "xla")
    Array([[   2, -382]], dtype=int32)
  """
  w = jnp.asarray(kernel_t)
  if jnp.dtype(w.dtype) != jnp.int8:
    raise TypeError(f"pack: kernel_t must be int8; got {jnp.dtype(w.dtype)}.")
  if w.ndim != 2:
    raise ValueError(f"pack: kernel_t must be (N, K), output channel first; got shape "
                     f"{w.shape}.")
  n, k = w.shape
  p, g = -(-n // PANEL), -(-k // GROUP)
  # Concrete weights (the usual case: packing a converted model) pack in NumPy: no XLA
  # compilation per weight shape. Traced weights pack in the program.
  xp = jnp if isinstance(w, jax.core.Tracer) else np
  a = w if xp is jnp else np.asarray(w)
  padded = xp.pad(a, ((0, p * PANEL - n), (0, g * GROUP - k)))
  panels = xp.transpose(padded.reshape(p, PANEL, g, GROUP), (0, 2, 1, 3))
  sums = xp.sum(a, axis=1, dtype=xp.int32)
  if xp is np:  # device_put compiles nothing (jnp.asarray compiles a copy per shape)
    return PackedWeights(panels=jax.device_put(panels), column_sums=jax.device_put(sums),
                         n=n, k=k)
  return PackedWeights(panels=panels, column_sums=sums, n=n, k=k)


def grid_integers(kernel: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`pack_grid`'s integers, unpacked, with XLA ops: for float (K, N) kernel and float32
  (N,) scale,

    q[k, n] = clamp(rne(kernel[k, n] * (1 / scale[n])), -128, 127)   (0 where not finite)
    bad[n]  = any(~isfinite(kernel[:, n]))

  Example:
    >>> q, bad = grid_integers(jnp.array([[0.5, jnp.inf]]), jnp.array([0.25, 1.0]))
    >>> q.tolist(), bad.tolist()
    ([[2, 0]], [False, True])
  """
  w = jnp.asarray(kernel).astype(jnp.float32)  # exact for the narrower floats
  finite = jnp.isfinite(w)
  inv = 1.0 / jnp.asarray(scale, jnp.float32)
  q = jnp.clip(jnp.round(jnp.where(finite, w, 0.0) * inv[None, :]), -128, 127)
  return q.astype(jnp.int8), ~jnp.all(finite, axis=0)


def pack_grid(kernel: jax.Array, scale: jax.typing.ArrayLike, *,
              kernel_path: str | None = None) -> tuple[PackedWeights, jax.Array]:
  """The grid integers of float weights on an 8-bit grid, packed for `matmul`:

    q[k, n] = clamp(rne(kernel[k, n] * (1 / scale[n])), -128, 127)   (0 where not finite)
    returns (pack(q.T), bad),   bad[n] = any(~isfinite(kernel[:, n]))

  for a fake-quantized kernel (K, N) (nn.Dense's layout, output channel last) whose values
  are scale[n] times integers: q recovers those integers exactly. One native pass (the
  transposing copy into panels, the column sums and the non-finite columns), where XLA:CPU
  spends three slow loops; "xla" computes the same integers with jnp.

  Args:
    kernel: float (K, N) (16-bit floats are widened to float32, exactly).
    scale: float32 () or (N,): the grid's scale, per tensor or per output channel.
    kernel_path: see `resolve`.

  Returns:
    (PackedWeights of q.T, bad (N,) bool).

  Raises:
    ValueError: kernel not a 2-D float array, or scale of another shape or (concrete) not
      finite and > 0.

  Example:
    >>> w = jnp.array([[0.5, -1.0], [1.5, jnp.nan]], jnp.float32)
    >>> packed, bad = pack_grid(w, jnp.array([0.5, 0.25]))
    >>> packed.unpack().tolist(), bad.tolist()
    ([[1, 3], [-4, 0]], [False, True])
  """
  w = jnp.asarray(kernel)
  if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"pack_grid: kernel must be a float (K, N) matrix; got "
                     f"{jnp.dtype(w.dtype)} of shape {w.shape}.")
  w = w.astype(jnp.float32)  # exact for the narrower floats
  k, n = w.shape
  s = jnp.asarray(scale, jnp.float32)
  if s.shape not in ((), (n,)):
    raise ValueError(f"pack_grid: scale must be () or (N,) = ({n},); got shape {s.shape}.")
  numerics.check_scale_values(s, name="pack_grid: scale")
  inv = jnp.broadcast_to(1.0 / s, (n,))
  path = resolve(kernel_path, macs=k * n)
  if path == "xla":
    q, bad = grid_integers(w, jnp.broadcast_to(s, (n,)))
    return pack(q.T), bad
  p, g = -(-n // PANEL), -(-k // GROUP)
  call = jax.ffi.ffi_call(_TARGET_PACK_ROUND,
                          (jax.ShapeDtypeStruct((p, g, PANEL, GROUP), jnp.int8),
                           jax.ShapeDtypeStruct((n,), jnp.int32),
                           jax.ShapeDtypeStruct((n,), jnp.bool_)), vmap_method="sequential")
  panels, sums, bad = call(w, inv, path=np.int64(_PATH_IDS[path]))
  return PackedWeights(panels=panels, column_sums=sums, n=n, k=k), bad


# The weights `matmul` and friends take: int8 (N, K), or the same packed.
Weights = jax.Array | PackedWeights


@struct
class PackedConvWeights:
  """An int8 HWIO convolution kernel in the native kernel's panel layout: the `PackedWeights`
  of its (O, window * I) matrix, kernel_hwio.reshape(-1, O).T, with the window and input
  channels (static) to give the HWIO shape back.

  Example:
    >>> w = jnp.arange(24, dtype=jnp.int8).reshape(2, 2, 3, 2)
    >>> packed = pack_conv(w)
    >>> packed.shape, packed.matrix.shape
    ((2, 2, 3, 2), (2, 12))
    >>> bool((packed.unpack() == w).all())
    True
  """

  panels: jax.Array
  column_sums: jax.Array
  window: tuple[int, ...] = static()
  channels_in: int = static()
  channels_out: int = static()

  @property
  def shape(self) -> tuple[int, ...]:
    """The HWIO shape of the kernel it packs."""
    return (*self.window, self.channels_in, self.channels_out)

  @property
  def ndim(self) -> int:
    return len(self.window) + 2

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(jnp.int8)

  @property
  def matrix(self) -> PackedWeights:
    """The packed (O, window * I) matrix."""
    k = int(np.prod(self.window, dtype=np.int64)) * self.channels_in
    return PackedWeights(panels=self.panels, column_sums=self.column_sums,
                         n=self.channels_out, k=k)

  def unpack(self) -> jax.Array:
    """The int8 HWIO kernel (`pack_conv`'s inverse)."""
    return self.matrix.unpack().T.reshape(self.shape)


def pack_conv(kernel_hwio: jax.typing.ArrayLike) -> PackedConvWeights:
  """An int8 convolution kernel (*window, I, O) in the native kernel's panel layout.

  `conv` gives the same integers for `pack_conv(w)` as for `w`, on every path; the native
  2-D convolution reads the panels as they are (otherwise it packs the kernel on each call).

  Args:
    kernel_hwio: int8 (*window, I, O).

  Returns:
    The `PackedConvWeights`.

  Raises:
    TypeError: not int8. ValueError: fewer than 3 dimensions.

  Example:
    >>> pack_conv(jnp.ones((3, 3, 4, 8), jnp.int8)).panels.shape
    (1, 9, 16, 4)
  """
  w = jnp.asarray(kernel_hwio) if isinstance(kernel_hwio, jax.core.Tracer) else np.asarray(
      kernel_hwio)
  if jnp.dtype(w.dtype) != jnp.int8:
    raise TypeError(f"pack_conv: kernel_hwio must be int8; got {jnp.dtype(w.dtype)}.")
  if w.ndim < 3:
    raise ValueError(f"pack_conv: kernel_hwio must be (*window, I, O); got shape {w.shape}.")
  matrix = pack(w.reshape((math.prod(w.shape[:-1]), w.shape[-1])).T)
  return PackedConvWeights(panels=matrix.panels, column_sums=matrix.column_sums,
                           window=tuple(int(v) for v in w.shape[:-2]),
                           channels_in=int(w.shape[-2]), channels_out=int(w.shape[-1]))


def _plain(kernel_t: Weights) -> jax.Array:
  return kernel_t.unpack() if isinstance(kernel_t, PackedWeights) else kernel_t


def _weight_arrays(kernel_t: Weights) -> list[jax.Array]:
  """The kernel's weight arguments: the panels and column sums, or the plain matrix."""
  if isinstance(kernel_t, PackedWeights):
    return [kernel_t.panels, kernel_t.column_sums]
  return [kernel_t]


def _weight_operands(kernel_t: Weights) -> tuple[list[jax.Array], str, str]:
  """The kernel's weight arguments and its two targets (s32, requant), packed or not."""
  packed = isinstance(kernel_t, PackedWeights)
  return (_weight_arrays(kernel_t), _TARGET_PACKED_S32 if packed else _TARGET_S32,
          _TARGET_PACKED_REQUANT if packed else _TARGET_REQUANT)


def _epilogue(requant: rq.Requantizer, n: int) -> tuple[list[jax.Array], dict]:
  """The fused requantization's arguments for n channels: two float32 (n,) arrays, bias and
  multiplier (a FloatRequant's bias zero: rne(f32(acc) * M) is rne((f32(acc) + 0) * M), adding
  a float 0 to an integer-valued float changes nothing), or an IntegerRequant's int32 m0 and
  shift as they are (a bitcast to float32 would be a copy kernel of its own on XLA:CPU); the
  zero point (1,); and the attributes lo, hi, relu and integer (which of the two formulas)."""
  if isinstance(requant, rq.IntegerRequant):
    first, second = (jnp.broadcast_to(jnp.asarray(v, jnp.int32), (n,))
                     for v in (requant.m0, requant.shift))
  else:
    bias = requant.bias if isinstance(requant, rq.FbgemmRequant) else 0.0
    first, second = (jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,))
                     for v in (bias, requant.multiplier))
  arrays = [first, second, jnp.asarray(requant.zero_point, jnp.int32).reshape((1,))]
  return arrays, {"lo": np.int64(requant.lo), "hi": np.int64(requant.hi),
                  "relu": bool(requant.relu), "integer": isinstance(requant, rq.IntegerRequant)}


@contextlib.contextmanager
def use(kernel: str) -> Iterator[None]:
  """QJAX_INT8_KERNEL=`kernel` while the block runs (restored after): functions traced inside
  choose their contractions' kernel by it. A jitted function keeps the kernel of its first
  trace, so trace (or jit) a fresh function inside.

  Args:
    kernel: one of `KERNELS`.

  Raises:
    ValueError: `kernel` not in `KERNELS`.

  Example:
    >>> with use("xla"):
    ...   resolve()
    'xla'
  """
  if kernel not in KERNELS:
    raise ValueError(f"use: kernel must be one of {list(KERNELS)}; got {kernel!r}.")
  saved = os.environ.get(ENV_VAR)
  os.environ[ENV_VAR] = kernel
  try:
    yield
  finally:
    if saved is None:
      os.environ.pop(ENV_VAR, None)
    else:
      os.environ[ENV_VAR] = saved


def _check(x: jax.Array, kernel_t: Weights, where: str) -> None:
  if isinstance(kernel_t, PackedWeights):
    if jnp.dtype(x.dtype) != jnp.int8:
      raise TypeError(f"{where}: x must be int8; got {jnp.dtype(x.dtype)}.")
    if x.ndim < 1 or x.shape[-1] != kernel_t.k:
      raise ValueError(f"{where}: x (..., K) and the packed kernel_t (N, K) must share K; got "
                       f"shapes {x.shape} and {kernel_t.shape}.")
    return
  if jnp.dtype(x.dtype) != jnp.int8 or jnp.dtype(kernel_t.dtype) != jnp.int8:
    raise TypeError(f"{where}: x and kernel_t must be int8; got {jnp.dtype(x.dtype)} and "
                    f"{jnp.dtype(kernel_t.dtype)}.")
  if x.ndim < 1 or kernel_t.ndim != 2 or x.shape[-1] != kernel_t.shape[1]:
    raise ValueError(f"{where}: x (..., K) and kernel_t (N, K) must share K; got shapes "
                     f"{x.shape} and {kernel_t.shape}.")


def _rows(x: jax.Array) -> int:
  return int(np.prod(x.shape[:-1], dtype=np.int64))


def _macs(x: jax.Array, kernel_t: Weights) -> int:
  return _rows(x) * kernel_t.shape[0] * kernel_t.shape[1]


def _xla_amx(x: jax.Array, kernel_t: Weights) -> bool:
  return xla_on_amx(_rows(x), kernel_t.shape[0], kernel_t.shape[1],
                    isinstance(kernel_t, PackedWeights))


def _offset(offset: jax.typing.ArrayLike | None, n: int, where: str) -> jax.Array:
  """The offset as int32 (n,); TypeError / ValueError naming `where` unless it is integers
  of shape (), (1,) or (n,) that int32 holds (nothing is cast or wrapped silently)."""
  if offset is None:
    return jnp.zeros((n,), jnp.int32)
  arr = _checks.as_int_array(f"{where}: offset", offset)
  if arr.shape not in ((), (1,), (n,)):
    raise ValueError(f"{where}: offset must be int32 ({n},), one per output channel, or a "
                     f"scalar; got shape {arr.shape}.")
  return jnp.broadcast_to(arr.astype(jnp.int32), (n,))


def _int_scalar(value: jax.typing.ArrayLike, name: str, where: str) -> jax.Array:
  """An integer scalar (shape () or (1,)) as int32; TypeError / ValueError naming it otherwise
  (a float would be truncated, a wider integer wrapped)."""
  arr = _checks.as_int_array(f"{where}: {name}", value)
  if arr.shape not in ((), (1,)):
    raise ValueError(f"{where}: {name} must be a scalar; got shape {arr.shape}.")
  return arr.astype(jnp.int32).reshape(())


def _native_s32(x: jax.Array, kernel_t: Weights, offset: jax.Array, path: str) -> jax.Array:
  n = kernel_t.shape[0]
  rows = x.reshape((_rows(x), x.shape[-1]))
  weights, target, _ = _weight_operands(kernel_t)
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.int32),
                          vmap_method="sequential")
  acc = call(rows, *weights, offset, path=np.int64(_PATH_IDS[path]), threads=np.int64(0))
  return acc.reshape(x.shape[:-1] + (n,))


def matmul(x: jax.Array, kernel_t: Weights, offset: jax.Array | None = None, *,
           kernel: str | None = None) -> jax.Array:
  """acc[..., n] = sum_k x[..., k] kernel_t[n, k] + offset[n] in int32 (wrapping), from int8.

  `qjax.integer.arith.matmul` plus an offset, on the code path `resolve(kernel)` picks; every
  path returns the same integers.

  Args:
    x: int8 (..., K).
    kernel_t: int8 (N, K), output channel first, or the same `pack`ed.
    offset: int32 (N,) or a scalar, added to every row; None adds nothing.
    kernel: see `resolve`.

  Returns:
    int32 (..., N).

  Raises:
    TypeError: x or kernel_t not int8. ValueError: shapes that do not share K, or a bad
      `kernel` (see `resolve`).

  Example:
    >>> x = jnp.array([[1, -2, 3]], jnp.int8)
    >>> w = jnp.array([[1, 1, 1], [-128, 127, 0]], jnp.int8)
    >>> matmul(x, w, jnp.array([10, 0], jnp.int32))
    Array([[  12, -382]], dtype=int32)
  """
  _check(x, kernel_t, "matmul")
  path = resolve(kernel, macs=_macs(x, kernel_t), xla_amx=_xla_amx(x, kernel_t))
  if path == "xla":
    acc = arith.matmul(x, _plain(kernel_t))
    return acc if offset is None else acc + rq.channels(
        _offset(offset, kernel_t.shape[0], "matmul"), acc.ndim)
  return _native_s32(x, kernel_t, _offset(offset, kernel_t.shape[0], "matmul"), path)


def matmul_requant(x: jax.Array, kernel_t: Weights, offset: jax.Array | None,
                   requant: rq.Requantizer, *, kernel: str | None = None) -> jax.Array:
  """q = requant(matmul(x, kernel_t, offset)), the requantization fused on a native path.

  For an `FbgemmRequant`
  q[..., n] = clamp(Z + rne((f32(acc[..., n]) + bias[n]) * M[n]), low, hi) as int8, with
  acc = sum_k x[..., k] kernel_t[n, k] + offset[n] (int32), low = max(lo, Z) under a fused
  ReLU, M per channel or per tensor; a `FloatRequant` is the same with a zero bias; an
  `IntegerRequant` q = clamp(Z + floor((acc m0[n] + 2^(shift[n]-1)) / 2^shift[n]), low, hi)
  with the product exact in 64 bits (shift in [1, 62], as `arith.quantize_multiplier` makes
  it). `requant(acc)` bit for bit, without an int32 result in memory.

  Args:
    x: int8 (..., K).
    kernel_t: int8 (N, K), or the same `pack`ed.
    offset: int32 (N,) or None.
    requant: the output grid and formula (`qjax.integer.FbgemmRequant`, `FloatRequant` or
      `IntegerRequant`).
    kernel: see `resolve`.

  Returns:
    int8 (..., N).

  Raises:
    TypeError: `requant` is not one of the three, or non-int8 operands. ValueError: as
      `matmul`.

  Example:
    >>> r = rq.FbgemmRequant(bias=jnp.array([0.5, 0.0], jnp.float32),
    ...                      multiplier=jnp.float32(0.5), zero_point=jnp.int32(-3),
    ...                      lo=-128, hi=127, relu=False)
    >>> x = jnp.array([[1, -2, 3]], jnp.int8)
    >>> w = jnp.array([[1, 1, 1], [-128, 127, 0]], jnp.int8)
    >>> matmul_requant(x, w, None, r)   # -3 + rne(2.5 / 2 = 1.25), -3 + rne(-191)
    Array([[  -2, -128]], dtype=int8)
  """
  if not isinstance(requant, (rq.FbgemmRequant, rq.FloatRequant, rq.IntegerRequant)):
    raise TypeError(f"matmul_requant: requant must be a qjax.integer FbgemmRequant, "
                    f"FloatRequant or IntegerRequant; got {type(requant).__name__}.")
  _check(x, kernel_t, "matmul_requant")
  n = kernel_t.shape[0]
  path = resolve(kernel, macs=_macs(x, kernel_t), xla_amx=_xla_amx(x, kernel_t))
  if path == "xla":
    acc = arith.matmul(x, _plain(kernel_t))
    if offset is not None:
      acc = acc + rq.channels(_offset(offset, n, "matmul_requant"), acc.ndim)
    return requant(acc)
  rows = x.reshape((_rows(x), x.shape[-1]))
  weights, _, target = _weight_operands(kernel_t)
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.int8),
                          vmap_method="sequential")
  arrays, grid = _epilogue(requant, n)
  q = call(rows, *weights, _offset(offset, n, "matmul_requant"), *arrays, **grid,
           path=np.int64(_PATH_IDS[path]), threads=np.int64(0))
  return q.reshape(x.shape[:-1] + (n,))


def dense(x: jax.Array, kernel_t: Weights, offset: jax.Array, requant: rq.Requantizer, *,
          kernel: str | None = None) -> jax.Array:
  """An integer Dense: requant(sum_k x[..., k] kernel_t[n, k] + offset[n]) as int8.

  `matmul_requant`: on a native path every requantizer fused into the kernel's epilogue,
  `arith.matmul` + `requant` on "xla".

  Args:
    x: int8 (..., K).
    kernel_t: int8 (N, K), or the same `pack`ed.
    offset: int32 (N,) (zero-point offset and int32 bias).
    requant: a `qjax.integer.requant` requantizer.
    kernel: see `resolve`.

  Returns:
    int8 (..., N).

  Example:
    >>> r = rq.FloatRequant(multiplier=jnp.float32(1.0), zero_point=jnp.int32(0), lo=-128,
    ...                     hi=127, relu=True)
    >>> dense(jnp.array([[3, 4]], jnp.int8), jnp.array([[1, 2], [-1, 0]], jnp.int8),
    ...       jnp.zeros(2, jnp.int32), r)
    Array([[11,  0]], dtype=int8)
  """
  return matmul_requant(x, kernel_t, offset, requant, kernel=kernel)


def _requantize(acc: jax.Array, offset: jax.Array, requant: rq.Requantizer,
                path: str) -> jax.Array:
  """`requant(acc + offset)` for an int32 acc (..., N) made outside the kernel and the
  offset int32 (N,) (`conv` checked it with `_offset`); on a native
  path the requantizer runs as the kernel's fused epilogue, one pass from int32 to int8 (no
  float intermediate in memory: at LeNet-5's first layer, batch 1024, XLA's float array and
  its fresh pages cost more than the convolution)."""
  if path == "xla":
    return requant(acc + rq.channels(offset, acc.ndim))
  n = acc.shape[-1]
  arrays, grid = _epilogue(requant, n)
  call = jax.ffi.ffi_call(_TARGET_REQUANT_S32, jax.ShapeDtypeStruct(acc.shape, jnp.int8),
                          vmap_method="sequential")
  return call(acc, offset, *arrays, **grid, path=np.int64(_PATH_IDS[path]))


def round_to_int8(y: jax.Array, low: jax.typing.ArrayLike, high: jax.typing.ArrayLike,
                  add: jax.typing.ArrayLike, nan_value: jax.typing.ArrayLike, *,
                  kernel: str | None = None) -> jax.Array:
  """q = int8(clamp(rne(y), low, high) + add), with NaN -> nan_value: float32 to int8.

  XLA:CPU converts floats to integers one element at a time (~2 ns an element: quantizing a
  64 x 784 input took 100 us, its multiply-add 11 us); the native paths do it 16 at a time.
  low, high, add and nan_value are int32 scalars (traced or not) with low <= high and
  clamp(., low, high) + add and nan_value within [-128, 127]: concrete ones are checked, a
  traced call must keep it (the result is taken modulo 2^8 as int8).

  Args:
    y: float32 array, any shape.
    low, high: the clamp bounds (before `add`).
    add: added after rounding.
    nan_value: the int8 value of a NaN.
    kernel: see `resolve`.

  Returns:
    int8, y's shape.

  Raises:
    TypeError: y not float32, or a bound that is not an integer scalar. ValueError: concrete
      bounds whose result would wrap (see above).

  Example:
    >>> round_to_int8(jnp.array([0.5, 1.5, 300.0, jnp.nan]), 0, 255, -128, -100)
    Array([-128, -126,  127, -100], dtype=int8)
  """
  y = jnp.asarray(y)
  if jnp.dtype(y.dtype) != jnp.float32:
    raise TypeError(f"round_to_int8: y must be float32; got {jnp.dtype(y.dtype)}.")
  names = ("low", "high", "add", "nan_value")
  values = [_int_scalar(v, name, "round_to_int8")
            for v, name in zip((low, high, add, nan_value), names, strict=True)]
  known = [_checks.concrete(v) for v in values]
  if not any(v is None for v in known):  # what a traced call must keep by itself
    lo, hi, plus, nan = (int(np.asarray(v)) for v in known)
    if lo > hi or not -128 <= lo + plus <= hi + plus <= 127 or not -128 <= nan <= 127:
      raise ValueError(f"round_to_int8: need low <= high, [low + add, high + add] within "
                       f"[-128, 127] and nan_value within [-128, 127] (an int8 result that "
                       f"does not wrap); got low={lo}, high={hi}, add={plus}, "
                       f"nan_value={nan}.")
  params = jnp.stack(values)
  path = resolve(kernel, macs=int(np.prod(y.shape, dtype=np.int64)))
  if path == "xla":
    q = jnp.clip(jnp.round(y), params[0].astype(jnp.float32), params[1].astype(jnp.float32))
    q = q.astype(jnp.int32) + params[2]
    return jnp.where(jnp.isnan(y), params[3], q).astype(jnp.int8)
  return _native_round(y, jnp.array([1.0, 0.0], jnp.float32), params, path)


def _native_round(y: jax.Array, affine: jax.Array, params: jax.Array, path: str) -> jax.Array:
  """The native rounding of fma(y, affine[0], affine[1]) (one float32 rounding); params:
  int32 (low, high, add, nan_value)."""
  call = jax.ffi.ffi_call(_TARGET_ROUND, jax.ShapeDtypeStruct(y.shape, jnp.int8),
                          vmap_method="sequential")
  return call(y, affine, params, path=np.int64(_PATH_IDS[path]))


def quantize_input(x: jax.Array, spec: numerics.QuantSpec, scale: jax.Array,
                   zero_point: jax.Array, *, kernel: str | None = None) -> jax.Array:
  """`qjax.integer.arith.quantize_input` (float activations to int8, per tensor) with the
  rounding and narrowing on a native path (`round_to_int8`): the same integers, x * (1/S) +
  Z formed by XLA exactly as `qjax.quantize` forms it.

  Example:
    >>> spec = numerics.QuantSpec(bits=8, signed=False)
    >>> quantize_input(jnp.array([0.0, 1.0, 9e9]), spec, jnp.float32(0.5), jnp.int32(3))
    Array([-125, -123,  127], dtype=int8)
  """
  arith.check_int8_spec(spec, name="quantize_input")
  path = resolve(kernel, macs=int(np.prod(jnp.shape(x), dtype=np.int64)))
  if path == "xla" or spec.per_channel:
    return arith.quantize_input(x, spec, scale, zero_point)
  shift = arith.int8_shift(spec)
  lo, hi = arith.int8_bounds(spec)
  qparams = numerics.QParams(scale, zero_point)
  zp = jnp.asarray(zero_point, jnp.int32)
  params = jnp.stack([jnp.int32(lo + shift), jnp.int32(hi + shift), jnp.int32(-shift),
                      zp.reshape(()) - shift])
  if jnp.dtype(jnp.result_type(x)) != jnp.float32:  # scaled casts it first
    y = numerics.scaled(x, spec, qparams)
    return _native_round(y, jnp.array([1.0, 0.0], jnp.float32), params, path)
  # x * (1/S) + Z formed in the kernel, as one FMA (numerics.scaled's form for per-tensor
  # 8-bit grids): no float32 intermediate between XLA and the kernel.
  x, inv_scale, zp_f = numerics.scaled_terms(x, spec, qparams)
  return _native_round(x, jnp.stack([inv_scale, zp_f]), params, path)


def conv(x: jax.Array, kernel_hwio: jax.Array | PackedConvWeights, offset: jax.Array,
         requant: rq.Requantizer, *,
         strides: tuple[int, ...], padding: tuple[tuple[int, int], ...],
         dilation: tuple[int, ...], groups: int, pad_value: jax.Array,
         kernel: str | None = None) -> jax.Array:
  """An integer Conv: requant(correlate(x padded with pad_value, kernel_hwio) + offset) as int8.

    acc[b, p, o] = sum_{w, c} x_pad[b, p * stride + w * dilation, c] kernel_hwio[w, c, o]
                   + offset[o]

  On a native path an ungrouped convolution with more than one input channel runs as the
  GEMM of its patches with the kernel as an (O, window * C) matrix, the requantization fused:
  in 2-D inside the native kernel, which gathers the patches block by block of output pixels
  (no patch matrix in memory; LeNet-5's second layer at batch 256: 0.7 ms less for the whole
  model than patches made by XLA), in 1-D and 3-D on XLA's patches
  (`qjax.integer.arith.im2col`). One input channel (stride and dilation 1, up to 8 output
  channels) runs the native kernel's direct convolution on the AVX-512 paths (`direct_conv`:
  LeNet-5 at batch 1024, 8.6 -> 4.3 ms for the whole model). A 2-D depthwise convolution
  (`depthwise_conv`: groups = C, one input channel a group) runs the native depthwise kernel,
  its padding and requantization fused (3 x 3 over 32 x 56 x 56 x 128: ~4 ms against ~0.43 s
  for XLA's grouped int32 convolution). Other grouped convolutions (`grouped_conv`: groups of
  two or more input channels) run on the same kernel where their groups are small
  (`grouped_direct`; ResNeXt's 3 x 3 over 8 x 56 x 56 x 128 in 32 groups: 1.0 ms against
  53 ms), else as ungrouped native convolutions of runs of groups with block-diagonal
  kernels (`group_runs`). Otherwise (and on "xla") `qjax.integer.arith.conv` then
  `requant`: XLA's exact int32 convolution, requantized by the kernel's epilogue on a native
  path. The same integers on every path.

  Args:
    x: int8 (B, *spatial, C).
    kernel_hwio: int8 (*window, C / groups, O), or the same `pack_conv`ed (read as it is by
      the native 2-D convolution, unpacked elsewhere).
    offset: int32 (O,).
    requant: a `qjax.integer.requant` requantizer.
    strides, padding, dilation, groups: the geometry (`padding` explicit (low, high) pairs).
    pad_value: int32 (): the input's zero point on the int8 grid (padding is real zero).
    kernel: see `resolve`.

  Returns:
    int8 (B, *out_spatial, O).

  Example:
    >>> r = rq.FloatRequant(multiplier=jnp.float32(1.0), zero_point=jnp.int32(0), lo=-128,
    ...                     hi=127, relu=False)
    >>> x = jnp.ones((1, 3, 3, 2), jnp.int8)
    >>> w = jnp.ones((2, 2, 2, 1), jnp.int8)
    >>> conv(x, w, jnp.zeros(1, jnp.int32), r, strides=(1, 1), padding=((0, 0), (0, 0)),
    ...      dilation=(1, 1), groups=1, pad_value=jnp.int32(0))[0, :, :, 0]
    Array([[8, 8],
           [8, 8]], dtype=int8)
  """
  _check_conv(x, kernel_hwio, "conv")
  nsp = kernel_hwio.ndim - 2
  cin, cout = x.shape[-1], kernel_hwio.shape[-1]
  window = kernel_hwio.shape[:nsp]
  offset = _offset(offset, cout, "conv")
  strides, padding, dilation, pad_value = arith.checked_conv_geometry(
      nsp, strides, padding, dilation, pad_value, "conv")
  if x.ndim == nsp + 2 and _grouped(kernel_hwio.shape, groups, cin):
    out, macs = _conv_size(x.shape, kernel_hwio.shape, strides, padding, dilation)
    path = resolve(kernel, macs=macs)
    route = _grouped_route(kernel_hwio.shape, groups, cin, out, path)
    if route == "kernel":
      return _native_depthwise(x, _hwio(kernel_hwio), tuple(out), offset, strides, padding,
                               dilation, pad_value, path, requant)
    if route == "runs":
      return _group_runs(x, _hwio(kernel_hwio), offset, groups, lambda xg, wg, og, o0, o1: conv(
          xg, wg, og, _requant_channels(requant, o0, o1, cout), strides=strides,
          padding=padding, dilation=dilation, groups=1, pad_value=pad_value, kernel=path))
  if groups == 1 and x.ndim == nsp + 2:
    out, macs = _conv_size(x.shape, kernel_hwio.shape, strides, padding, dilation)
    path = resolve(kernel, macs=macs, xla_amx=_conv_xla_amx(x.shape, kernel_hwio, out))
    direct = not isinstance(kernel_hwio, PackedConvWeights) and direct_conv(
        kernel_hwio.shape, strides, dilation, groups, path)
    if path != "xla" and min(out) >= 0 and (cin > 1 or direct):
      x = _padded(x, padding, pad_value)
      if direct or gathers_patches(kernel_hwio.shape, groups):
        weights = (kernel_hwio.matrix if isinstance(kernel_hwio, PackedConvWeights)
                   else kernel_hwio.reshape((math.prod(kernel_hwio.shape[:-1]), cout)).T)
        return _native_conv2d(x, weights, tuple(out), offset, requant, window, strides,
                              dilation, path)
      patches = arith.im2col(x, window, strides, dilation)
      return dense(patches, _hwio(kernel_hwio).reshape((math.prod(window) * cin, cout)).T,
                   offset, requant, kernel=path)
  acc = arith.conv(x, _hwio(kernel_hwio), strides=strides, padding=padding, dilation=dilation,
                   feature_group_count=groups, pad_value=pad_value)
  # XLA's convolution; its requantization native.
  return _requantize(acc, offset, requant,
                     resolve(kernel, macs=int(np.prod(acc.shape, dtype=np.int64))))


def _check_conv(x: jax.Array, kernel_hwio: jax.Array | PackedConvWeights, where: str) -> None:
  """TypeError unless x and the (unpacked) kernel are int8: a native call would otherwise
  refuse them without naming the argument."""
  arith.check_int8(f"{where}: x", x)
  if not isinstance(kernel_hwio, PackedConvWeights):
    arith.check_int8(f"{where}: kernel_hwio", kernel_hwio)


def _conv_size(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
               strides: tuple[int, ...], padding: tuple[tuple[int, int], ...],
               dilation: tuple[int, ...]) -> tuple[list[int], int]:
  """A channels-last convolution's output spatial size and its multiply-adds."""
  nsp = len(kernel_shape) - 2
  out = [(s + lo + hi - ((w - 1) * d + 1)) // st + 1 for s, (lo, hi), w, d, st in
         zip(x_shape[1:-1], padding, kernel_shape[:nsp], dilation, strides, strict=True)]
  macs = x_shape[0] * int(np.prod(out, dtype=np.int64)) * int(
      np.prod(kernel_shape, dtype=np.int64))
  return out, macs


def _conv_xla_amx(x_shape: tuple[int, ...], kernel_hwio: jax.Array | PackedConvWeights,
                  out: Sequence[int]) -> bool:
  """`xla_on_amx` for a convolution as the GEMM of its patches: rows = output pixels,
  N = output channels, K = window x input channels."""
  shape = kernel_hwio.shape
  return xla_on_amx(x_shape[0] * math.prod(out), shape[-1], math.prod(shape[:-1]),
                    isinstance(kernel_hwio, PackedConvWeights))


def _padded(x: jax.Array, padding: tuple[tuple[int, int], ...],
            pad_value: jax.Array) -> jax.Array:
  """x (B, *spatial, C) padded spatially with pad_value (as int8)."""
  pads = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding] + [(0, 0, 0)]
  if any(lo or hi for lo, hi, _ in pads):
    x = jax.lax.pad(x, jnp.asarray(pad_value).astype(jnp.int8), pads)
  return x


def conv_int32(x: jax.Array, kernel_hwio: jax.Array, offset: jax.Array, *,
               strides: tuple[int, ...], padding: tuple[tuple[int, int], ...],
               dilation: tuple[int, ...], pad_value: jax.Array, groups: int = 1,
               kernel: str | None = None) -> jax.Array:
  """An integer convolution's int32 accumulators:

    acc[b, p, o] = sum_{w, c} x_pad[b, p * stride + w * dilation, g(o) C/G + c]
                   kernel_hwio[w, c, o] + offset[o]            (int32, wrapping as XLA's)

  (g(o) = o // (O / G), the group of output channel o). Ungrouped on a native path, with two
  or more input channels, the GEMM of the patches on the native kernel (in 2-D gathered by
  the kernel block by block of output pixels, as `conv` does; else XLA's
  `qjax.integer.arith.im2col`); a 2-D depthwise convolution (`depthwise_conv`) on the native
  depthwise kernel; other groups of two or more input channels (`grouped_conv`) on the same
  kernel (`grouped_direct`) or as those ungrouped convolutions, one per run of groups
  (`group_runs`); otherwise, for one input channel (XLA's int32 convolution of a single
  channel is the faster lowering: LeNet-5's 5 x 5 x 6 first layer at batch 256, 0.5 ms
  against 4.7 ms through patches), `qjax.integer.arith.conv`. The same integers on every
  path.

  Args:
    x: int8 (B, *spatial, C).
    kernel_hwio: int8 (*window, C / G, O).
    offset: int32 (O,).
    strides, padding, dilation: the geometry (`padding` explicit (low, high) pairs).
    pad_value: int32 (): what padded positions hold (the input's zero on the int8 grid).
    groups: G, the feature group count (G divides C and O).
    kernel: see `resolve`.

  Returns:
    int32 (B, *out_spatial, O).

  Example:
    >>> x = jnp.ones((1, 3, 3, 2), jnp.int8)
    >>> w = jnp.ones((2, 2, 2, 1), jnp.int8)
    >>> conv_int32(x, w, jnp.array([5], jnp.int32), strides=(1, 1), padding=((0, 0), (0, 0)),
    ...            dilation=(1, 1), pad_value=jnp.int32(0))[0, :, :, 0]
    Array([[13, 13],
           [13, 13]], dtype=int32)
  """
  _check_conv(x, kernel_hwio, "conv_int32")
  nsp = kernel_hwio.ndim - 2
  window, (cin, cout) = kernel_hwio.shape[:nsp], kernel_hwio.shape[nsp:]
  if not isinstance(groups, int) or groups < 1 or cout % groups:
    raise ValueError(f"conv_int32: groups must be a positive int dividing the {cout} output "
                     f"channels; got {groups!r}.")
  if x.ndim != nsp + 2 or x.shape[-1] != cin * groups:
    raise ValueError(f"conv_int32: x must be (B, *spatial, C) with C = {cin * groups} "
                     f"({groups} groups of kernel_hwio's {cin}) and {nsp} spatial dims as "
                     f"kernel_hwio {kernel_hwio.shape}; got {x.shape}.")
  strides, padding, dilation, pad_value = arith.checked_conv_geometry(
      nsp, strides, padding, dilation, pad_value, "conv_int32")
  out, macs = _conv_size(x.shape, kernel_hwio.shape, strides, padding, dilation)
  grouped = _grouped(kernel_hwio.shape, groups, x.shape[-1])
  path = resolve(kernel, macs=macs,
                 xla_amx=not grouped and _conv_xla_amx(x.shape, kernel_hwio, out))
  offset = _offset(offset, cout, "conv_int32")
  route = _grouped_route(kernel_hwio.shape, groups, x.shape[-1], out, path) if grouped else None
  if route == "kernel":
    return _native_depthwise(x, kernel_hwio, tuple(out), offset, strides, padding, dilation,
                             pad_value, path)
  if route == "runs":
    return _group_runs(x, kernel_hwio, offset, groups, lambda xg, wg, og, o0, o1: conv_int32(
        xg, wg, og, strides=strides, padding=padding, dilation=dilation, pad_value=pad_value,
        kernel=path))
  if path != "xla" and groups == 1 and cin > 1 and min(out) > 0:
    x = _padded(x, padding, pad_value)
    weights = kernel_hwio.reshape((math.prod(kernel_hwio.shape[:-1]), cout)).T
    if nsp == 2:  # patches gathered by the kernel, block by block of output pixels
      call = jax.ffi.ffi_call(_TARGET_CONV_S32,
                              jax.ShapeDtypeStruct((x.shape[0], *out, cout), jnp.int32),
                              vmap_method="sequential")
      return call(x, weights, offset, kh=np.int64(window[0]), kw=np.int64(window[1]),
                  sh=np.int64(strides[0]), sw=np.int64(strides[1]),
                  dh=np.int64(dilation[0]), dw=np.int64(dilation[1]),
                  path=np.int64(_PATH_IDS[path]), threads=np.int64(0))
    patches = arith.im2col(x, window, strides, dilation)
    return matmul(patches, weights, offset, kernel=path)
  acc = arith.conv(x, kernel_hwio, strides=strides, padding=padding, dilation=dilation,
                   feature_group_count=groups, pad_value=pad_value)
  return acc + offset.reshape((1,) * (acc.ndim - 1) + (cout,))


def direct_conv(kernel_shape: tuple[int, ...], strides: tuple[int, ...],
                dilation: tuple[int, ...], groups: int, path: str) -> bool:
  """Whether `conv` on `path` runs a convolution with this (HWIO) kernel shape as the native
  kernel's direct single-channel convolution: 2-D, one input channel, no groups, stride and
  dilation 1, at most 8 output channels, a window at most 48 wide and 64 high (LeNet-5's first
  layer), on an AVX-512 path ("vnni", "amx", "amx_emulated") of a CPU with AVX-512 VBMI.
  16 output pixels share a vector, one per channel: the patch GEMM's 16-channel panels would
  be 6 / 16 full there, and XLA's int32 convolution writes 4 bytes a result (LeNet-5 at batch
  1024: a 19 MB intermediate that the requantization then reads).

  Example:
    >>> direct_conv((5, 5, 1, 6), (1, 1), (1, 1), 1, "xla")
    False
  """
  return (len(kernel_shape) == 4 and kernel_shape[2] == 1 and groups == 1
          and tuple(strides) == (1, 1) and tuple(dilation) == (1, 1)
          and 1 <= kernel_shape[3] <= _DIRECT_MAX_CHANNELS
          and kernel_shape[1] <= _DIRECT_MAX_WIDTH and kernel_shape[0] <= _DIRECT_MAX_HEIGHT
          and path in ("vnni", "amx", "amx_emulated") and bool(_load() & _VBMI))


def depthwise_conv(kernel_shape: tuple[int, ...], groups: int, channels: int) -> bool:
  """Whether `conv` / `conv_int32` on a native path run a convolution with this (HWIO) kernel
  shape as the native kernel's depthwise convolution: 2-D, one group per input channel
  (`groups` = `channels` >= 2), any channel multiplier (O = m C: output channel o reads input
  channel o // m), any stride and dilation. XLA:CPU runs grouped convolutions as loops of
  scalar products (3 x 3 over 32 x 56 x 56 x 128: ~0.44 s as int8 -> int32, ~0.41 s in
  float32); the native one takes 16 output channels a vector.

  Example:
    >>> depthwise_conv((3, 3, 1, 32), 32, 32), depthwise_conv((3, 3, 2, 32), 16, 32)
    (True, False)
  """
  return (len(kernel_shape) == 4 and kernel_shape[2] == 1 and groups == channels >= 2
          and kernel_shape[3] % channels == 0)


def grouped_conv(kernel_shape: tuple[int, ...], groups: int, channels: int) -> bool:
  """Whether `conv` / `conv_int32` on a native path run a grouped convolution with this (HWIO)
  kernel shape natively: G = `groups` >= 2 groups of two or more input channels each
  (ResNeXt's, RegNet's), with C = `channels` = G times the kernel's input channels and G
  dividing its output channels. Most run on the depthwise kernel (`grouped_direct`); the
  others as runs of consecutive groups, one call a run with a block-diagonal kernel, as many
  groups as fill a 16-channel panel with their output channels (`group_runs`): the kernel's
  cost is that of whole panels, so that costs no more multiply-adds than a call a group.
  XLA:CPU runs grouped convolutions as loops of scalar products (3 x 3 over 8 x 28 x 28 x 128
  in 4 groups: ~14 ms in float32, ~6 ms as int8 -> int32).

  Example:
    >>> grouped_conv((3, 3, 4, 128), 32, 128), grouped_conv((3, 3, 1, 32), 32, 32)
    (True, False)
  """
  return (len(kernel_shape) >= 3 and isinstance(groups, int) and groups >= 2
          and kernel_shape[-2] >= 2 and channels == kernel_shape[-2] * groups
          and kernel_shape[-1] % groups == 0)


def grouped_direct(kernel_shape: tuple[int, ...], groups: int, channels: int,
                   path: str) -> bool:
  """Whether `conv` / `conv_int32` on `path` run a grouped convolution (`grouped_conv`) on the
  native depthwise kernel rather than as runs of groups (`group_runs`). 2-D, and:

  * small groups (an even count of 2..16 input channels), on an AVX-512 path or "portable"
    with fewer than 16 outputs a group and each block of 16 output channels reading at most
    32 input bytes of a pixel, on "avx2" each block of 8 within 16 bytes: a block's input
    bytes are widened to int16 pairs once a pixel and tap and moved to their output lanes
    (vpermd), two exact products a lane and instruction (vpdpwssd; vpmaddwd on "avx2"), no
    multiply-adds wasted on a block-diagonal kernel's zeros (ResNeXt's 3 x 3 over 8 x 56 x 56
    x 128 in 32 groups: 1.0 ms against 4.1 ms as runs; 4.8 against 11 ms on "avx2");
  * groups of a multiple of 4 input and of 16 output channels, on an AVX-512 path or
    "portable": each block lies inside one group, and 4 input bytes of 8 (or 4) output pixels
    broadcast to up to four blocks at once meet 4 weights a lane (vpdpbusd, on the padded
    input flipped to unsigned once a call), with no patch matrix or call a run (1.3-2.5x the
    runs).

  Example:
    >>> grouped_direct((3, 3, 4, 128), 32, 128, "portable")
    True
    >>> grouped_direct((3, 3, 10, 128), 32, 320, "portable")   # 4 groups of 10: 40 bytes
    False
  """
  if (len(kernel_shape) != 4 or path not in ("vnni", "amx", "amx_emulated", "avx2", "portable")
      or not grouped_conv(kernel_shape, groups, channels)):
    return False
  cg, cout = kernel_shape[2], kernel_shape[3]
  og = cout // groups
  # A block of `lanes` output channels: its groups' input bytes of a pixel.
  def block_bytes(lanes: int) -> int:
    return max(((min(cout, o0 + lanes) - 1) // og - o0 // og + 1) * cg
               for o0 in range(0, cout, lanes))
  if path == "avx2":
    return cg % 2 == 0 and cg <= 16 and block_bytes(8) <= 16
  if cg % GROUP == 0 and og % PANEL == 0:
    return True
  return cg % 2 == 0 and cg <= 16 and og < PANEL and block_bytes(PANEL) <= 32


def group_runs(groups: int, channels_out: int) -> list[tuple[int, int]]:
  """The runs [g0, g1) of consecutive groups that `grouped_conv`'s convolutions run as one
  native call: as many groups as fill a 16-channel panel with their O / G output channels
  (at least one).

  Example:
    >>> group_runs(8, 32)   # 4 channels a group: 4 groups a call
    [(0, 4), (4, 8)]
    >>> group_runs(3, 96)
    [(0, 1), (1, 2), (2, 3)]
  """
  step = max(1, min(groups, PANEL // (channels_out // groups)))
  return [(g, min(g + step, groups)) for g in range(0, groups, step)]


def _block_diagonal(kernel_hwio: jax.Array, groups: int, g0: int, g1: int) -> jax.Array:
  """Groups g0..g1-1 of a grouped int8 kernel (*window, C/G, O) as one ungrouped kernel
  (*window, s C/G, s O/G) (s = g1 - g0): group a's input channels against its own output
  channels, zeros elsewhere."""
  *window, cg, cout = kernel_hwio.shape
  og, s = cout // groups, g1 - g0
  part = kernel_hwio[..., g0 * og:g1 * og]
  if s == 1:
    return part
  part = part.reshape((*window, 1, cg, s, og))
  own = np.eye(s, dtype=bool).reshape((1,) * len(window) + (s, 1, s, 1))
  return jnp.where(own, part, np.int8(0)).reshape((*window, s * cg, s * og))


def _requant_channels(requant: rq.Requantizer, lo: int, hi: int,
                      channels: int) -> rq.Requantizer:
  """`requant` for output channels lo..hi-1 of `channels`: its per-channel leaves sliced."""
  sliced = {f.name: getattr(requant, f.name)[lo:hi] for f in dataclasses.fields(requant)
            if f.name != "zero_point" and not f.metadata.get("static")
            and jnp.shape(getattr(requant, f.name)) == (channels,)}
  return dataclasses.replace(requant, **sliced)


def _grouped(kernel_shape: tuple[int, ...], groups: int, channels: int) -> bool:
  """Whether a native path runs this grouped convolution (`depthwise_conv` or
  `grouped_conv`); XLA's grouped convolutions do not run on AMX tiles."""
  return (depthwise_conv(kernel_shape, groups, channels)
          or grouped_conv(kernel_shape, groups, channels))


def _grouped_route(kernel_shape: tuple[int, ...], groups: int, channels: int,
                   out: Sequence[int], path: str) -> str | None:
  """How `path` runs a `_grouped` convolution with output size `out`: "kernel" (the native
  depthwise kernel: `depthwise_conv`, or `grouped_direct`), "runs" (`group_runs` of
  ungrouped native convolutions), or None (XLA)."""
  if path == "xla":
    return None
  if min(out) > 0 and (depthwise_conv(kernel_shape, groups, channels)
                       or grouped_direct(kernel_shape, groups, channels, path)):
    return "kernel"
  return "runs" if grouped_conv(kernel_shape, groups, channels) else None


def _group_runs(x: jax.Array, kernel_hwio: jax.Array, offset: jax.Array, groups: int,
                run: Callable[[jax.Array, jax.Array, jax.Array, int, int], jax.Array]
                ) -> jax.Array:
  """A grouped convolution as `run(x_part, kernel_part, offset_part, o0, o1)` (ungrouped,
  output channels o0..o1-1) over `group_runs`, concatenated along the channels."""
  cg, cout = kernel_hwio.shape[-2:]
  og = cout // groups
  parts = [run(x[..., g0 * cg:g1 * cg], _block_diagonal(kernel_hwio, groups, g0, g1),
               offset[g0 * og:g1 * og], g0 * og, g1 * og)
           for g0, g1 in group_runs(groups, cout)]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _native_depthwise(x: jax.Array, kernel_hwio: jax.Array, out: tuple[int, ...],
                      offset: jax.Array, strides: tuple[int, ...],
                      padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...],
                      pad_value: jax.Array, path: str,
                      requant: rq.Requantizer | None = None) -> jax.Array:
  """The native depthwise (or `grouped_direct`) convolution of int8 x (B, H, W, C), padded in
  the kernel with pad_value (as int8): its int32 sums + offset, or with `requant` those
  requantized to int8 by the fused epilogue."""
  n = kernel_hwio.shape[-1]
  shape = (x.shape[0], *out, n)
  (top, bottom), (left, right) = padding
  attrs = {"sh": np.int64(strides[0]), "sw": np.int64(strides[1]),
           "dh": np.int64(dilation[0]), "dw": np.int64(dilation[1]),
           "pt": np.int64(top), "pb": np.int64(bottom), "pl": np.int64(left),
           "pr": np.int64(right), "path": np.int64(_PATH_IDS[path]), "threads": np.int64(0)}
  pad = jnp.asarray(pad_value, jnp.int32).reshape((1,))
  if requant is None:
    call = jax.ffi.ffi_call(_TARGET_DEPTHWISE_S32, jax.ShapeDtypeStruct(shape, jnp.int32),
                            vmap_method="sequential")
    return call(x, kernel_hwio, offset, pad, **attrs)
  arrays, grid = _epilogue(requant, n)
  call = jax.ffi.ffi_call(_TARGET_DEPTHWISE_REQUANT, jax.ShapeDtypeStruct(shape, jnp.int8),
                          vmap_method="sequential")
  return call(x, kernel_hwio, offset, pad, *arrays, **grid, **attrs)


def gathers_patches(kernel_shape: tuple[int, ...], groups: int) -> bool:
  """Whether `conv` on a native path runs a convolution with this (HWIO) kernel shape as the
  native 2-D convolution, which gathers its patches and reads `pack_conv`'s panels as they are:
  2-D, no groups, more than one input channel.

  Example:
    >>> gathers_patches((5, 5, 6, 16), 1), gathers_patches((5, 5, 1, 6), 1)
    (True, False)
  """
  return len(kernel_shape) == 4 and groups == 1 and kernel_shape[-2] > 1


def _hwio(kernel_hwio: jax.Array | PackedConvWeights) -> jax.Array:
  return kernel_hwio.unpack() if isinstance(kernel_hwio, PackedConvWeights) else kernel_hwio


def _native_conv2d(x: jax.Array, weights: Weights, out: tuple[int, ...], offset: jax.Array,
                   requant: rq.Requantizer, window: tuple[int, ...], strides: tuple[int, ...],
                   dilation: tuple[int, ...], path: str) -> jax.Array:
  """A valid 2-D convolution of padded int8 x (B, H, W, C) with weights (O, KH * KW * C),
  packed or not, in the native kernel, requantized as `dense` does."""
  n = weights.shape[0]
  packed = isinstance(weights, PackedWeights)
  shape = (x.shape[0], *out, n)
  geometry = {"kh": np.int64(window[0]), "kw": np.int64(window[1]),
              "sh": np.int64(strides[0]), "sw": np.int64(strides[1]),
              "dh": np.int64(dilation[0]), "dw": np.int64(dilation[1]),
              "path": np.int64(_PATH_IDS[path]), "threads": np.int64(0)}
  operands = [x, *_weight_arrays(weights), offset]  # int32 (n,), checked by `conv`
  arrays, grid = _epilogue(requant, n)
  call = jax.ffi.ffi_call(_TARGET_CONV_PACKED_REQUANT if packed else _TARGET_CONV_REQUANT,
                          jax.ShapeDtypeStruct(shape, jnp.int8), vmap_method="sequential")
  return call(*operands, *arrays, **grid, **geometry)


def quantize_samples(x: jax.Array, spec: numerics.QuantSpec, scale: jax.Array,
                     zero_point: jax.Array, *,
                     kernel: str | None = None) -> tuple[jax.Array, jax.Array]:
  """A model input's quantization and its non-finite samples, in one pass on a native path:

    q = quantize_input(where(isfinite(x), x, 0)),   bad[i] = any(~isfinite(x[i]))

  bad is (N,) bool over x's leading axis ((), one sample, for x of rank <= 1), the mask of
  `qjax.integer.forms.base.nonfinite_samples`; the caller makes those samples' outputs NaN.
  XLA:CPU spends three passes on the mask and the cleaned copy (a bool array, its reduction,
  the copy), each costing more than the native rounding itself at MNIST sizes.

  Args:
    x: float activations (a float32 x takes the one-pass native route).
    spec, scale, zero_point: as in `quantize_input`.
    kernel: see `resolve`.

  Returns:
    (q int8 of x's shape, bad bool).

  Example:
    >>> spec = numerics.QuantSpec(bits=8, signed=False)
    >>> q, bad = quantize_samples(jnp.array([[1.0, 2.0], [jnp.inf, 1.0]]), spec,
    ...                          jnp.float32(0.5), jnp.int32(0))
    >>> q.tolist(), bad.tolist()
    ([[-126, -124], [-128, -126]], [False, True])
  """
  x = jnp.asarray(x)
  arith.check_int8_spec(spec, name="quantize_samples")
  path = resolve(kernel, macs=int(np.prod(jnp.shape(x), dtype=np.int64)))
  if path == "xla" or spec.per_channel or jnp.dtype(x.dtype) != jnp.float32:
    bad = ~jnp.isfinite(x)
    bad = jnp.any(bad, axis=tuple(range(1, x.ndim))) if x.ndim >= 2 else jnp.any(bad)
    clean = jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))
    return quantize_input(clean, spec, scale, zero_point, kernel=path), bad
  shift = arith.int8_shift(spec)
  lo, hi = arith.int8_bounds(spec)
  scale, zp = numerics.checked_qparams(spec, numerics.QParams(scale, zero_point), x.shape,
                                       where="quantize_samples")
  zp = zp.astype(jnp.int32)
  params = jnp.stack([jnp.int32(lo + shift), jnp.int32(hi + shift), jnp.int32(-shift),
                      zp.reshape(()) - shift])
  # fma(x, 1/S, Z) in the kernel: numerics.scaled's form (numerics.scaled_terms).
  inv_scale, zp_f = jnp.float32(1.0) / scale, zp.astype(jnp.float32)
  rows = x.shape[0] if x.ndim >= 2 else 1
  call = jax.ffi.ffi_call(_TARGET_ROUND_ROWS, (jax.ShapeDtypeStruct(x.shape, jnp.int8),
                                               jax.ShapeDtypeStruct((rows,), jnp.bool_)),
                          vmap_method="sequential")
  q, bad = call(x, jnp.stack([inv_scale, zp_f]), params, path=np.int64(_PATH_IDS[path]))
  return q, (bad if x.ndim >= 2 else bad.reshape(()))


def dequantize_rows(q: jax.Array, scale: jax.typing.ArrayLike, zero_point: jax.typing.ArrayLike,
                    bad: jax.Array | None = None, *, kernel: str | None = None) -> jax.Array:
  """int8 back to float32 at the end of an integer region, NaN in the marked samples:

    y[i, ...] = NaN if bad[i] else float32(q[i, ...] - zero_point) * scale

  q - zero_point is exact in float32, so y has one rounding, the same floats as
  `qjax.integer.arith.dequantize_output`. On a native path it is one kernel call: a serving
  program whose every other step is a native call then has no XLA arithmetic left, and JAX's
  CPU client runs such a program on the calling thread instead of handing it to a worker
  thread and back (a hop of tens of microseconds, more than an MNIST MLP's whole int8
  forward pass at batch 64).

  Args:
    q: int8 array; its leading axis holds the samples (q of rank <= 1 is one sample).
    scale: float32 scalar.
    zero_point: int32 scalar.
    bad: None, a bool scalar (every sample), or bool (q.shape[0],) (sample i) marking the
      samples to set to NaN (`qjax.integer.forms.base.nonfinite_samples`).
    kernel: see `resolve`.

  Returns:
    float32, q's shape.

  Raises:
    TypeError: q is not int8, zero_point not an integer, or bad not bool.
    ValueError: scale or zero_point is not a scalar, a concrete scale is not finite and > 0,
      or bad's shape is neither () nor (q.shape[0],).

  Example:
    >>> q = jnp.array([[4, -2], [0, 1]], jnp.int8)
    >>> dequantize_rows(q, 0.5, 2, jnp.array([False, True])).tolist()
    [[1.0, -2.0], [nan, nan]]
  """
  q = jnp.asarray(q)
  if jnp.dtype(q.dtype) != jnp.int8:
    raise TypeError(f"dequantize_rows: q must be int8; got {jnp.dtype(q.dtype)}.")
  scale = jnp.asarray(scale, jnp.float32)
  if scale.size != 1:
    raise ValueError(f"dequantize_rows: scale must be a scalar; got shape {scale.shape}.")
  numerics.check_scale_values(scale, name="dequantize_rows: scale")
  zero_point = _int_scalar(zero_point, "zero_point", "dequantize_rows")
  rows = q.shape[0] if q.ndim >= 2 else 1
  if bad is not None:
    bad = jnp.asarray(bad)
    if bad.dtype != jnp.bool_:
      raise TypeError(f"dequantize_rows: bad must be bool; got {bad.dtype}.")
    if bad.shape not in ((), (rows,)) or (bad.ndim == 1 and q.ndim < 2):
      raise ValueError(f"dequantize_rows: bad must have shape () or ({rows},) (one flag a "
                       f"sample of q {q.shape}); got {bad.shape}.")
  path = resolve(kernel, macs=int(np.prod(q.shape, dtype=np.int64)))
  if path == "xla":
    y = arith.dequantize_output(q, scale.reshape(()), zero_point.reshape(()))
    if bad is None:
      return y
    mask = bad.reshape(bad.shape + (1,) * (q.ndim - 1)) if bad.ndim == 1 else bad
    return jnp.where(mask, jnp.float32(jnp.nan), y)
  flags = jnp.zeros((0,), jnp.bool_) if bad is None else bad.astype(jnp.bool_).reshape(-1)
  call = jax.ffi.ffi_call(_TARGET_DEQUANT_ROWS, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                          vmap_method="sequential")
  return call(q, scale.reshape(()), zero_point.reshape(()), flags)


def fake_quant_observe(x: jax.Array, min_val: jax.Array, max_val: jax.Array,
                       count: jax.Array, skipped: jax.Array, *, spec: numerics.QuantSpec,
                       averaging: float | None, eps: float, path: str, mask: bool = True
                       ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...], jax.Array,
                                  jax.Array]:
  """A QAT point's observer update, qparams and fake quantization in one native call.

  For float32 x and a min / max observer state (min_val, max_val of shape () or (C,),
  count, skipped): the batch's range (per tensor, or per channel along `spec.axis`) updates
  the state as `qjax.observers.MinMaxObserver.update` (`averaging` None) or
  `MovingAverageMinMaxObserver.update` (`averaging` its constant) under jit; the qparams are
  `qjax.numerics.qparams_from_minmax` of the new state with `eps`, and

    y = S (clamp(rne(x (1/S)) + Z, qmin, qmax) - Z),   mask = qmin <= rne(x (1/S)) + Z <= qmax

  as `qjax.numerics.fake_quant_with_mask`: the same floats and integers as those XLA forms,
  in one pass for the range and one for y and the mask (PyTorch's
  fused_moving_avg_obs_fake_quant). No gradient rule: `qjax.ste.observed_fake_quant` adds
  the straight-through one.

  Args:
    x: float32, non-empty.
    min_val, max_val, count, skipped: the `MinMaxState` fields.
    spec: the grid.
    averaging: the moving average's constant, or None for the running min / max.
    eps: the scale's floor.
    path: a native path (`native_paths()`).
    mask: False leaves the mask out (an empty array): nothing differentiates y.

  Returns:
    (y, mask, (min_val, max_val, count, skipped) updated, scale, zero_point).

  Example:
    >>> if native_paths():
    ...   y, mask, state, scale, zp = fake_quant_observe(
    ...       jnp.array([-1.0, 0.3, 9.0]), jnp.float32(-1.0), jnp.float32(3.0), jnp.int32(1),
    ...       jnp.int32(0), spec=numerics.QuantSpec(bits=8, signed=False), averaging=0.5,
    ...       eps=1e-7, path=native_paths()[0])
    ...   print(state[1], int(zp), mask.tolist())
    6.0 36 [True, True, False]
  """
  y, inside, state, scale, zero_point, _ = _fake_quant_observe(
      "fake_quant_observe", x, min_val, max_val, count, skipped, spec=spec, averaging=averaging,
      eps=eps, path=path, mask=mask, emit=None)
  return y, inside, state, scale, zero_point


# What `fake_quant_observe_int8` emits beside y: an activation's int8 codes, or a (K, N)
# weight's packed panels.
_EMIT_IDS = {None: 0, "rows": 1, "panels": 2}


def _fake_quant_observe(name: str, x: jax.Array, min_val: jax.Array, max_val: jax.Array,
                        count: jax.Array, skipped: jax.Array, *, spec: numerics.QuantSpec,
                        averaging: float | None, eps: float, path: str, mask: bool,
                        emit: str | None) -> tuple[Any, ...]:
  """The fused point's native call; the last element is (integers, y holds a NaN) where
  `emit` asks for them (int8 codes for "rows", PackedWeights for "panels"), else None."""
  if path not in native_paths():
    raise ValueError(f"{name}: path must be one of {list(native_paths())} (the "
                     f"native paths of this machine); got {path!r}.")
  axis = -1 if spec.axis is None else spec.axis % x.ndim
  if emit == "rows":
    codes_shape, sums_shape = x.shape, (0,)
  elif emit == "panels":
    k, n = x.shape
    codes_shape, sums_shape = (-(-n // PANEL), -(-k // GROUP), PANEL, GROUP), (n,)
  else:
    codes_shape, sums_shape = (0,), (0,)
  shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
            jax.ShapeDtypeStruct(x.shape if mask else (0,), jnp.bool_),
            jax.ShapeDtypeStruct(min_val.shape, jnp.float32),
            jax.ShapeDtypeStruct(max_val.shape, jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
            jax.ShapeDtypeStruct(min_val.shape, jnp.float32),
            jax.ShapeDtypeStruct(min_val.shape, jnp.int32),
            jax.ShapeDtypeStruct(codes_shape, jnp.int8),
            jax.ShapeDtypeStruct(sums_shape, jnp.int32),
            jax.ShapeDtypeStruct(() if emit else (0,), jnp.bool_))
  # averaging 0 selects the running min / max (a moving average's constant is in (0, 1]).
  call = jax.ffi.ffi_call(_TARGET_FAKE_QUANT_OBSERVE, shapes, vmap_method="sequential")
  y, inside, lo, hi, cnt, skp, scale, zero_point, codes, sums, nan = call(
      x, min_val, max_val, count.reshape(()), skipped.reshape(()), axis=np.int64(axis),
      averaging=np.float32(0.0 if averaging is None else averaging),
      qmin=np.int64(spec.qmin), qmax=np.int64(spec.qmax), eps=np.float32(eps),
      symmetric=np.int64(spec.symmetric),
      symmetric_zero_point=np.int64(spec.symmetric_zero_point if spec.symmetric else 0),
      emit=np.int64(_EMIT_IDS[emit]),
      shift=np.int64(arith.int8_shift(spec) if emit == "rows" else 0),
      path=np.int64(_PATH_IDS[path]))
  state = (lo, hi, cnt.reshape(count.shape), skp.reshape(skipped.shape))
  integers: Any = codes
  if emit == "panels":
    k, n = x.shape
    integers = PackedWeights(panels=codes, column_sums=sums, n=n, k=k)
  return y, inside, state, scale, zero_point, ((integers, nan) if emit else None)


def int8_operand_grid(spec: numerics.QuantSpec, operand: str, ndim: int) -> bool:
  """Whether `fake_quant_observe_int8` hands over the integers of a point on `spec` for
  `operand`: "x" (an activation) needs an 8-bit per-tensor grid; "w" a (K, N) weight (`ndim`
  2) on a symmetric 8-bit grid, per tensor or per output channel (axis -1 or 1).

  Raises:
    ValueError: operand is neither "x" nor "w".

  Example:
    >>> int8_operand_grid(numerics.QuantSpec(bits=8, signed=False), "x", 2)
    True
    >>> int8_operand_grid(numerics.QuantSpec(bits=8, symmetric=True, axis=0), "w", 2)
    False
  """
  if operand == "x":
    return spec.bits == 8 and spec.axis is None
  if operand == "w":
    return spec.bits == 8 and spec.symmetric and ndim == 2 and spec.axis in (None, -1, 1)
  raise ValueError(f"int8_operand_grid: operand must be 'x' or 'w'; got {operand!r}.")


def fake_quant_observe_int8(x: jax.Array, min_val: jax.Array, max_val: jax.Array,
                            count: jax.Array, skipped: jax.Array, *, spec: numerics.QuantSpec,
                            averaging: float | None, eps: float, path: str,
                            operand: str, mask: bool = True) -> tuple[Any, ...]:
  """`fake_quant_observe` that also hands the int8 forward y's grid integers, in the same
  pass: for `operand` "x" (an activation on a per-tensor 8-bit grid) the codes

    q = clamp(rne(x / S) + Z, qmin, qmax) - shift      (int8, x's shape)

  that `quantize_samples(y, ...)` computes (shift: `qjax.integer.arith.int8_shift`); for
  "w" (a (K, N) weight on a symmetric 8-bit grid, per tensor or per output channel) the
  integers k = clamp(rne(x / S[n]), qmin - Z, qmax - Z) packed as `pack_grid(y, S)` packs
  them. y = S k exactly, so these are the integers a second pass over y recovers; a NaN in
  y (from a NaN in x, or a state whose qparams are NaN) has code 0 and sets the flag.

  Args:
    x, min_val, max_val, count, skipped, spec, averaging, eps, path, mask: as
      `fake_quant_observe`.
    operand: "x" (codes of x's shape) or "w" (PackedWeights).

  Returns:
    (y, mask, state, scale, zero_point, codes, nan): codes int8 or PackedWeights, nan a
    bool scalar (y holds a NaN).

  Raises:
    ValueError: an operand or grid the int8 forward does not take (above).

  Example:
    >>> if native_paths():
    ...   spec = numerics.QuantSpec(bits=8, signed=False)
    ...   y, _, _, scale, zp, q, nan = fake_quant_observe_int8(
    ...       jnp.array([[0.0, 1.0, 2.0]]), jnp.float32(0.0), jnp.float32(2.55), jnp.int32(1),
    ...       jnp.int32(0), spec=spec, averaging=None, eps=1e-7, path=native_paths()[0],
    ...       operand="x")
    ...   print(q.tolist(), bool(nan))   # S = 2.55 / 255 = 0.01, Z = 0: q = x / 0.01 - 128
    [[-128, -28, 72]] False
  """
  if operand not in ("x", "w"):
    raise ValueError(f"fake_quant_observe_int8: operand must be 'x' or 'w'; got {operand!r}.")
  if not int8_operand_grid(spec, operand, jnp.ndim(x)):
    needs = ("an 8-bit per-tensor grid" if operand == "x" else
             "a (K, N) weight on a symmetric 8-bit grid, per tensor or along axis -1")
    raise ValueError(f"fake_quant_observe_int8: operand {operand!r} needs {needs}; got shape "
                     f"{jnp.shape(x)} and {spec}.")
  emit = "rows" if operand == "x" else "panels"
  y, inside, state, scale, zero_point, (codes, nan) = _fake_quant_observe(
      "fake_quant_observe_int8", x, min_val, max_val, count, skipped, spec=spec,
      averaging=averaging, eps=eps, path=path, mask=mask, emit=emit)
  return y, inside, state, scale, zero_point, codes, nan


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int] | None = None, *,
             kernel: str | None = None) -> jax.Array:
  """2-D max pooling of int8 NHWC activations over VALID windows:

    y[b, i, j, c] = max_{di < window[0], dj < window[1]} x[b, i s0 + di, j s1 + dj, c]

  Max pooling commutes with the monotone quantization, so it pools the int8 values on their
  own grid (PyTorch's quantized max_pool2d). On a native path one kernel call (a vector of
  64 channels at a time); "xla" is `lax.reduce_window`, the same integers.

  Args:
    x: int8 (N, H, W, C).
    window: (window height, window width), each in [1, H] / [1, W].
    strides: (stride height, stride width) >= 1; None: the window.
    kernel: see `resolve`.

  Returns:
    int8 (N, (H - window[0]) // s0 + 1, (W - window[1]) // s1 + 1, C).

  Raises:
    TypeError: x is not int8.
    ValueError: x is not 4-D, or a window / stride is out of range.

  Example:
    >>> x = jnp.arange(16, dtype=jnp.int8).reshape(1, 4, 4, 1)
    >>> max_pool(x, (2, 2))[0, :, :, 0].tolist()
    [[5, 7], [13, 15]]
  """
  x = jnp.asarray(x)
  if jnp.dtype(x.dtype) != jnp.int8:
    raise TypeError(f"max_pool: x must be int8; got {jnp.dtype(x.dtype)}.")
  if x.ndim != 4:
    raise ValueError(f"max_pool: x must be (N, H, W, C); got shape {x.shape}.")
  window = tuple(int(w) for w in window)
  strides = window if strides is None else tuple(int(v) for v in strides)
  if len(window) != 2 or len(strides) != 2:
    raise ValueError(f"max_pool: window and strides must have 2 entries (height, width); got "
                     f"window={window}, strides={strides}.")
  if not (1 <= window[0] <= x.shape[1] and 1 <= window[1] <= x.shape[2]):
    raise ValueError(f"max_pool: window must be within [1, {x.shape[1]}] x [1, {x.shape[2]}] "
                     f"(the input's height and width); got {window}.")
  if min(strides) < 1:
    raise ValueError(f"max_pool: strides must be >= 1; got {strides}.")
  out_shape = (x.shape[0], (x.shape[1] - window[0]) // strides[0] + 1,
               (x.shape[2] - window[1]) // strides[1] + 1, x.shape[3])
  path = resolve(kernel, macs=int(np.prod(out_shape, dtype=np.int64)) * window[0] * window[1])
  if path == "xla" or x.size == 0:
    return jax.lax.reduce_window(x, np.int8(-128), jax.lax.max, (1,) + window + (1,),
                                 (1,) + strides + (1,), "VALID")
  call = jax.ffi.ffi_call(_TARGET_MAX_POOL, jax.ShapeDtypeStruct(out_shape, jnp.int8),
                          vmap_method="sequential")
  return call(x, window_h=np.int64(window[0]), window_w=np.int64(window[1]),
              stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              path=np.int64(_PATH_IDS[path]))


__all__ = (
    "AUTO_AMX_XLA_ROWS",
    "AUTO_AMX_XLA_WEIGHTS",
    "AUTO_MIN_MACS",
    "DEFAULT_KERNEL",
    "ENV_VAR",
    "KERNELS",
    "NATIVE_PATHS",
    "PackedConvWeights",
    "PackedWeights",
    "Weights",
    "amx_int8",
    "available",
    "conv",
    "dense",
    "depthwise_conv",
    "dequantize_rows",
    "direct_conv",
    "fake_quant_observe",
    "fake_quant_observe_int8",
    "gathers_patches",
    "group_runs",
    "grouped_conv",
    "grouped_direct",
    "int8_operand_grid",
    "matmul",
    "matmul_requant",
    "max_pool",
    "native_paths",
    "pack",
    "pack_conv",
    "quantize_input",
    "quantize_samples",
    "resolve",
    "round_to_int8",
    "use",
    "xla_on_amx",
)
