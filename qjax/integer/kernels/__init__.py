"""A native CPU kernel for the integer path's int8 x int8 -> int32 GEMM, with a fused epilogue.

`qjax.integer.arith.matmul` (XLA's `dot_general`) is the reference; this module computes the
same integers with a C++ kernel (`int8_gemm.cc`) called through `jax.ffi` under `jax.jit`:

  acc[m, n] = sum_k x[m, k] w[n, k] + offset[n]                          int32 (`matmul`)
  q[m, n]   = clamp(Z + rne((f32(acc[m, n]) + bias[n]) * M[n]), low, hi)  int8 (`matmul_requant`)

with low = max(lo, Z) for a fused ReLU: `qjax.integer.FbgemmRequant`'s formula, bit for bit.
int32 sums wrap modulo 2^32 as XLA's do. The code path is chosen by the `kernel` argument,
else by the environment variable QJAX_INT8_KERNEL, else by `DEFAULT_KERNEL` ("auto"; set
QJAX_INT8_KERNEL=xla to keep the integer path's programs plain XLA, int8 `dot_general`s):

  "xla"       lax.dot_general (every backend; the fallback)
  "vnni"      AVX-512 VNNI (vpdpbusd is uint8 x int8: activations carried as x + 128, the
              -128 sum_k w[n, k] correction folded into the offset)
  "avx2"      AVX2, int8 widened to int16 and vpmaddwd (exact: no 16-bit saturation)
  "portable"  plain C++
  "native"    the best of the three this CPU runs
  "auto"      "native" on the CPU backend of a process with one CPU device; "xla" on other
              backends, with several CPU devices (a device mesh: XLA's SPMD partitioner
              splits a sharded dot_general, not a custom call, which it would gather) and
              when the library is not built (one warning)

CPU features are read once (CPUID) by the library. Weights are used as the integer path
stores them, (N, K) output channel first: up to 16 rows stream them as stored; more rows pack
them per call into 16-channel panels with their column sums (a 16 x 16 transpose in
registers: a few percent of the GEMM). The kernel uses every core (a pool of threads started
once) for products of 2^23 multiply-adds and more (QJAX_INT8_THREADS caps the thread count).
The library is built by `pip install` (setup.py); where it was not, `available()` is False
and everything runs on XLA.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from qjax.integer import arith
from qjax.integer import requant as rq

ENV_VAR = "QJAX_INT8_KERNEL"
KERNELS = ("auto", "xla", "native", "vnni", "avx2", "portable")
NATIVE_PATHS = ("vnni", "avx2", "portable")  # best first
# The selection when neither the `kernel` argument nor QJAX_INT8_KERNEL gives one.
DEFAULT_KERNEL = "auto"
# "auto" takes the native kernel from this many multiply-adds (M * N * K) on. Measured on an
# AVX-512 VNNI CPU, the native kernel was faster than XLA's int8 dot at every size down to
# 8000 (13 us against 50 us for a fused Dense), so none is kept on XLA by size.
AUTO_MIN_MACS = 0

_PATH_IDS = {"portable": 1, "avx2": 2, "vnni": 3}
_PATH_BITS = {"portable": 1, "avx2": 2, "vnni": 4}
_TARGET_S32 = "qjax_int8_gemm_s32"
_TARGET_REQUANT = "qjax_int8_gemm_requant"


def _library_file() -> pathlib.Path | None:
  here = pathlib.Path(__file__).parent
  found = sorted(here.glob("_int8_gemm*.so"))
  return found[0] if found else None


@functools.cache
def _load() -> tuple[str, ...]:
  """Loads the library and registers its FFI targets, once; the paths this CPU runs."""
  path = _library_file()
  if path is None:
    warnings.warn("qjax.integer.kernels: the native int8 GEMM library is not built (reinstall "
                  "qjax with `pip install` and a C++ compiler to build it); the integer path "
                  "runs on XLA's dot_general.", RuntimeWarning, stacklevel=3)
    return ()
  try:
    lib = ctypes.CDLL(str(path))
    lib.qjax_int8_paths.restype = ctypes.c_int
    bits = int(lib.qjax_int8_paths())
    jax.ffi.register_ffi_target(_TARGET_S32, jax.ffi.pycapsule(lib.QjaxInt8GemmS32),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_REQUANT, jax.ffi.pycapsule(lib.QjaxInt8GemmRequant),
                                platform="cpu")
  except (OSError, AttributeError) as error:
    warnings.warn(f"qjax.integer.kernels: the native int8 GEMM library {path} could not be "
                  f"loaded ({error}); the integer path runs on XLA's dot_general.",
                  RuntimeWarning, stacklevel=3)
    return ()
  return tuple(p for p in NATIVE_PATHS if bits & _PATH_BITS[p])


def native_paths() -> tuple[str, ...]:
  """The native code paths this machine can run, best first; () without the library.

  "portable" is always among them when the library is built; "avx2" and "vnni" when the CPU
  (and the OS) support AVX2, respectively AVX-512 F/BW/VL + VNNI.

  Returns:
    A tuple drawn from ("vnni", "avx2", "portable").

  Example:
    >>> set(native_paths()) <= {"vnni", "avx2", "portable"}
    True
  """
  return _load()


def available() -> bool:
  """Whether the native library is built and loaded (its "portable" path always runs then).

  Returns:
    True when `native_paths()` is not empty.

  Example:
    >>> available() == bool(native_paths())
    True
  """
  return bool(native_paths())


def resolve(kernel: str | None = None, *, macs: int | None = None) -> str:
  """The code path a contraction runs on: "xla", "vnni", "avx2" or "portable".

  `kernel` if given, else the environment variable QJAX_INT8_KERNEL, else
  `DEFAULT_KERNEL`. "auto" picks the best native path on the CPU backend when the library is
  built, the process has one CPU device and the product has at least `AUTO_MIN_MACS`
  multiply-adds (`macs`; None counts as large), "xla" otherwise. A named native path
  ("native", "vnni", ...) runs whatever the size and device count (inside `shard_map`, each
  device's program calls the kernel on its own shard). The choice is made when a function is
  traced: a jitted function keeps it (its cache does not see QJAX_INT8_KERNEL change).

  Args:
    kernel: one of `KERNELS`, or None.
    macs: M * N * K of the product, for "auto".

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
        or (macs is not None and macs < AUTO_MIN_MACS)):
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


def _check(x: jax.Array, kernel_t: jax.Array, where: str) -> None:
  if jnp.dtype(x.dtype) != jnp.int8 or jnp.dtype(kernel_t.dtype) != jnp.int8:
    raise TypeError(f"{where}: x and kernel_t must be int8; got {jnp.dtype(x.dtype)} and "
                    f"{jnp.dtype(kernel_t.dtype)}.")
  if x.ndim < 1 or kernel_t.ndim != 2 or x.shape[-1] != kernel_t.shape[1]:
    raise ValueError(f"{where}: x (..., K) and kernel_t (N, K) must share K; got shapes "
                     f"{x.shape} and {kernel_t.shape}.")


def _rows(x: jax.Array) -> int:
  return int(np.prod(x.shape[:-1], dtype=np.int64))


def _macs(x: jax.Array, kernel_t: jax.Array) -> int:
  return _rows(x) * kernel_t.shape[0] * kernel_t.shape[1]


def _offset(offset: jax.Array | None, n: int) -> jax.Array:
  if offset is None:
    return jnp.zeros((n,), jnp.int32)
  return jnp.broadcast_to(jnp.asarray(offset, jnp.int32), (n,))


def _native_s32(x: jax.Array, kernel_t: jax.Array, offset: jax.Array, path: str) -> jax.Array:
  n = kernel_t.shape[0]
  rows = x.reshape((_rows(x), x.shape[-1]))
  call = jax.ffi.ffi_call(_TARGET_S32, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.int32),
                          vmap_method="sequential")
  acc = call(rows, kernel_t, offset, path=np.int64(_PATH_IDS[path]), threads=np.int64(0))
  return acc.reshape(x.shape[:-1] + (n,))


def matmul(x: jax.Array, kernel_t: jax.Array, offset: jax.Array | None = None, *,
           kernel: str | None = None) -> jax.Array:
  """acc[..., n] = sum_k x[..., k] kernel_t[n, k] + offset[n] in int32 (wrapping), from int8.

  `qjax.integer.arith.matmul` plus an offset, on the code path `resolve(kernel)` picks; every
  path returns the same integers.

  Args:
    x: int8 (..., K).
    kernel_t: int8 (N, K), output channel first.
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
  path = resolve(kernel, macs=_macs(x, kernel_t))
  if path == "xla":
    acc = arith.matmul(x, kernel_t)
    return acc if offset is None else acc + rq.channels(_offset(offset, kernel_t.shape[0]),
                                                        acc.ndim)
  return _native_s32(x, kernel_t, _offset(offset, kernel_t.shape[0]), path)


def matmul_requant(x: jax.Array, kernel_t: jax.Array, offset: jax.Array | None,
                   requant: rq.FbgemmRequant, *, kernel: str | None = None) -> jax.Array:
  """q = requant(matmul(x, kernel_t, offset)) for an `FbgemmRequant`, fused on a native path.

  q[..., n] = clamp(Z + rne((f32(acc[..., n]) + bias[n]) * M[n]), low, hi) as int8, with
  acc = sum_k x[..., k] kernel_t[n, k] + offset[n] (int32), low = max(lo, Z) under a fused
  ReLU, M per channel or per tensor: `requant(acc)` bit for bit, without an int32 result in
  memory.

  Args:
    x: int8 (..., K).
    kernel_t: int8 (N, K).
    offset: int32 (N,) or None.
    requant: the output grid and formula (`qjax.integer.FbgemmRequant`).
    kernel: see `resolve`.

  Returns:
    int8 (..., N).

  Raises:
    TypeError: `requant` is not an FbgemmRequant, or non-int8 operands. ValueError: as
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
  if not isinstance(requant, rq.FbgemmRequant):
    raise TypeError(f"matmul_requant: requant must be a qjax.integer.FbgemmRequant; got "
                    f"{type(requant).__name__}.")
  _check(x, kernel_t, "matmul_requant")
  n = kernel_t.shape[0]
  path = resolve(kernel, macs=_macs(x, kernel_t))
  if path == "xla":
    acc = arith.matmul(x, kernel_t)
    if offset is not None:
      acc = acc + rq.channels(_offset(offset, n), acc.ndim)
    return requant(acc)
  rows = x.reshape((_rows(x), x.shape[-1]))
  call = jax.ffi.ffi_call(_TARGET_REQUANT, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.int8),
                          vmap_method="sequential")
  q = call(rows, kernel_t, _offset(offset, n),
           jnp.broadcast_to(jnp.asarray(requant.bias, jnp.float32), (n,)),
           jnp.broadcast_to(jnp.asarray(requant.multiplier, jnp.float32), (n,)),
           jnp.asarray(requant.zero_point, jnp.int32).reshape((1,)),
           lo=np.int64(requant.lo), hi=np.int64(requant.hi), relu=bool(requant.relu),
           path=np.int64(_PATH_IDS[path]), threads=np.int64(0))
  return q.reshape(x.shape[:-1] + (n,))


def dense(x: jax.Array, kernel_t: jax.Array, offset: jax.Array, requant: rq.Requantizer, *,
          kernel: str | None = None) -> jax.Array:
  """An integer Dense: requant(sum_k x[..., k] kernel_t[n, k] + offset[n]) as int8.

  The fused `matmul_requant` for an `FbgemmRequant`; `matmul` (offset fused) then the
  requantizer for `FloatRequant` / `IntegerRequant`; `arith.matmul` + `requant` on "xla".

  Args:
    x: int8 (..., K).
    kernel_t: int8 (N, K).
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
  if isinstance(requant, rq.FbgemmRequant):
    return matmul_requant(x, kernel_t, offset, requant, kernel=kernel)
  return requant(matmul(x, kernel_t, offset, kernel=kernel))


__all__ = (
    "AUTO_MIN_MACS",
    "DEFAULT_KERNEL",
    "ENV_VAR",
    "KERNELS",
    "NATIVE_PATHS",
    "available",
    "dense",
    "matmul",
    "matmul_requant",
    "native_paths",
    "resolve",
)
