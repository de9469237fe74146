"""Throughput of one int8 GEMM: qjax's native kernel against XLA and PyTorch, in one run.

For each shape M x N x K (x (M, K), weights (N, K)), the median time of one call of:

  * xla f32              jitted x @ w in float32 (the same integer values as floats), w laid
                         out (K, N), XLA's faster layout;
  * xla int8             jitted `qjax.integer.arith.matmul` (int8 x int8 -> int32 dot_general);
  * native <path>        jitted `qjax.integer.kernels.matmul` forced to each path this CPU runs
                         (int32 result, zero offset);
  * native packed        the same on the best path with the weights packed once, outside the
                         timed call (`kernels.pack`: how `qjax.for_serving` stores them);
  * native fused         jitted `qjax.integer.kernels.matmul_requant` on the best path (int8
                         result with offset, float bias, per-channel multiplier, ReLU);
  * native fused packed  the same with the packed weights;
  * torch _int_mm        torch._int_mm(x, w.T) (int8 x int8 -> int32);
  * torch qlinear <eng>  torch.ao.nn.quantized.Linear on the "fbgemm" and on the "onednn"
                         quantized engine (quint8 in and out, per-channel qint8 weights:
                         requantized like "native fused"). The module is built under its engine
                         (the packed weight belongs to it) and every timed call runs under it.

Before timing, each variant runs once and its result is compared with NumPy's int32 product
(the fused variants with XLA's `matmul_requant`; xla f32 within float rounding; the torch
qlinear rows are not checked): a mismatch stops the run. Variants this machine cannot run are
skipped with the reason printed.

Calls run to completion (block_until_ready); the variants are interleaved over rounds in a
rotated order so that load on the machine hits them alike. GOP/s = 2 M N K / median time;
"x int8" is xla int8's time over the variant's; "GOP/cpu-s" divides by the process's CPU
time per call instead (all threads), which moves less than wall time when other processes
share the cores; "% limit" is GOP/s over the CPU's peak: the int8 limit of the best native
path for the integer rows, the f32 FMA limit for xla f32. The peaks are measured where the
native library runs (`measured_limits`: the path's multiply-add instruction and the float32
FMA in register-only loops on every core at once); elsewhere they are cores x GHz x
operations per cycle per core, with GHz from /proc/cpuinfo's "cpu MHz" and the operations
per cycle assumed per instruction set (`INT8_OPS_PER_CYCLE`, `F32_OPS_PER_CYCLE`; on a VM
that reports its base clock such a figure was a third of the measured one). The header
prints how, and --int8-limit-gops / --f32-limit-gops replace them. The 1-minute load
average before and after is printed: on a shared machine absolute figures move with it, the
ratios less. --retain-freed-memory keeps freed buffers in the heap for all variants alike
(`qjax.integer.kernels.retain_freed_memory`): with glibc's defaults a large output can be
page-faulted back in on every call (~1000 faults per 1024^3 int32 call, when it happens).

Usage:
  python -m experiments.bench_gemm                        # the four default shapes
  python -m experiments.bench_gemm --shapes 1024x1024x1024 64x512x256 --rounds 5
  python -m experiments.bench_gemm --quick                # seconds; smoke run
  python -m experiments.bench_gemm --json gemm.json --int8-limit-gops 600
"""

from __future__ import annotations

import argparse
import ctypes
import contextlib
import json
import math
import os
import pathlib
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax.integer import arith
from qjax.integer import kernels
from qjax.integer import requant as rq

DEFAULT_SHAPES = ("1024x1024x1024", "256x4096x4096", "1x4096x4096", "256x100x784")
QUICK_SHAPES = ("64x64x64", "1x128x96")
TORCH_ENGINES = ("fbgemm", "onednn")
# Assumed int8 operations (2 per multiply-add) per cycle and core of each native path:
# "amx" one 16 x 16 x 64 tdpbusd per 16 cycles (1024 multiply-adds); "vnni" one 512-bit
# vpdpbusd per cycle (64); "avx2" one 256-bit vpmaddwd on int16-widened values (16);
# "portable" what a compiler makes of plain C++ with SSE2 (8).
INT8_OPS_PER_CYCLE = {"amx": 2048, "vnni": 128, "avx2": 32, "portable": 16}
# Native paths that are checks, not candidates: timed they would only measure the emulation.
UNTIMED_PATHS = {"amx_emulated": "the tile kernel with its tiles computed in C++ (a check of "
                                 "that kernel on CPUs without AMX, not a fast path)"}
# Assumed float32 operations per cycle and core: two FMA ports of 16 lanes (AVX-512) or of 8.
F32_OPS_PER_CYCLE = {"avx512f": 64, "avx2": 32}
# The clock assumed where /proc/cpuinfo does not give one.
FALLBACK_GHZ = 2.0
LABEL_WIDTH = 20

Kind = Literal["int8", "f32"]


class Variant(NamedTuple):
  """One timed GEMM: `run` computes it to completion and returns the result; `expected` is
  what the result must equal (None: not checked); `tolerance` the largest absolute difference
  allowed; `kind` picks the limit its "% limit" divides by."""

  run: Callable[[], Any]
  expected: np.ndarray | None
  tolerance: float
  kind: Kind


class CpuInfo(NamedTuple):
  """What /proc/cpuinfo says about the CPU (None / empty where it says nothing)."""

  model: str | None
  mhz: float | None
  flags: frozenset[str]


class Limits(NamedTuple):
  """Peak GOP/s the "% limit" column divides by, and how they were obtained."""

  int8_gops: float
  f32_gops: float
  int8_how: str
  f32_how: str


def parse_shape(text: str) -> tuple[int, int, int]:
  """"MxNxK" -> (M, N, K).

  Example:
    >>> parse_shape("256x100x784")
    (256, 100, 784)
  """
  parts = text.lower().split("x")
  if len(parts) != 3 or not all(p.isdigit() for p in parts):
    raise ValueError(f"--shapes takes MxNxK triples such as 256x4096x4096; got {text!r}.")
  m, n, k = (int(p) for p in parts)
  return m, n, k


def parse_cpuinfo(text: str) -> CpuInfo:
  """The model name, the mean "cpu MHz" and the flags of /proc/cpuinfo's text.

  Example:
    >>> info = parse_cpuinfo("model name : X\\ncpu MHz : 2000.0\\nflags : avx2 amx_int8\\n"
    ...                      "cpu MHz : 3000.0\\n")
    >>> info.model, info.mhz, sorted(info.flags)
    ('X', 2500.0, ['amx_int8', 'avx2'])
  """
  model: str | None = None
  mhz: list[float] = []
  flags: set[str] = set()
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    if not sep:
      continue
    key, value = key.strip(), value.strip()
    if key == "model name" and model is None:
      model = value
    elif key == "cpu MHz":
      with contextlib.suppress(ValueError):  # a malformed line is left out of the mean
        mhz.append(float(value))
    elif key == "flags" and not flags:
      flags = set(value.split())
  return CpuInfo(model=model, mhz=statistics.mean(mhz) if mhz else None,
                 flags=frozenset(flags))


def read_cpuinfo(path: str = "/proc/cpuinfo") -> CpuInfo:
  """`parse_cpuinfo` of the file; an empty `CpuInfo` where it cannot be read."""
  try:
    return parse_cpuinfo(pathlib.Path(path).read_text())
  except OSError:
    return CpuInfo(model=None, mhz=None, flags=frozenset())


def cores() -> int:
  """The logical CPUs this process may run on (SMT siblings count twice)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def default_limits(info: CpuInfo, path: str | None, n_cores: int) -> Limits:
  """cores x GHz x assumed operations per cycle, for the int8 `path` and for float32 FMAs.

  Args:
    info: the CPU (`read_cpuinfo`); its clock, else `FALLBACK_GHZ`.
    path: the best native path ("amx", "vnni", "avx2", "portable"), or None without the
      library (the "portable" figure then).
    n_cores: the cores counted.

  Returns:
    The `Limits`, with the formula of each.

  Example:
    >>> info = CpuInfo(model=None, mhz=2500.0, flags=frozenset({"avx512f"}))
    >>> default_limits(info, "vnni", 2)[:2]
    (640.0, 320.0)
  """
  ghz = info.mhz / 1000 if info.mhz else FALLBACK_GHZ
  clock = f"{ghz:.2f} GHz" + ("" if info.mhz else " (assumed: no cpu MHz)")
  int8_ops = INT8_OPS_PER_CYCLE[path or "portable"]
  f32_isa = "avx512f" if "avx512f" in info.flags else "avx2"
  f32_ops = F32_OPS_PER_CYCLE[f32_isa]
  return Limits(
      int8_gops=n_cores * ghz * int8_ops, f32_gops=n_cores * ghz * f32_ops,
      int8_how=f"{n_cores} cores x {clock} x {int8_ops} int8 ops/cycle ({path or 'portable'})",
      f32_how=f"{n_cores} cores x {clock} x {f32_ops} f32 flops/cycle ({f32_isa} FMA)")


# The native library's peak probes: path ids of qjax_int8_peak_gops (0: float32 FMAs).
_PEAK_PATHS = {"amx": 4, "vnni": 3, "avx2": 2}
_PEAK_HOW = {"amx": "tdpbusd into 4 tiles", "vnni": "12 independent vpdpbusd zmm accumulators",
             "avx2": "12 independent vpmaddwd + vpaddd ymm accumulators"}


def measured_limits(path: str | None, n_cores: int, seconds: float = 0.3) -> Limits | None:
  """The peaks measured on this machine: the int8 `path`'s multiply-add instruction and the
  float32 FMA in a register-only loop on `n_cores` threads at once (the native library's
  qjax_int8_peak_gops probe), turbo clock and the VM's real cores included. None without the
  library or for "portable" (no single instruction to time).

  Args:
    path: the best native path, or None.
    n_cores: threads to run the probes on.
    seconds: about how long each probe runs.

  Returns:
    The `Limits`, with how each was measured, or None.
  """
  library = kernels._library_file()  # pylint: disable=protected-access
  if path not in _PEAK_PATHS or library is None:
    return None
  probe = ctypes.CDLL(str(library)).qjax_int8_peak_gops
  probe.restype, probe.argtypes = ctypes.c_double, [ctypes.c_int, ctypes.c_int, ctypes.c_double]
  int8_gops = probe(_PEAK_PATHS[path], n_cores, seconds)
  f32_gops = probe(0, n_cores, seconds)
  if int8_gops <= 0 or f32_gops <= 0:
    return None
  return Limits(int8_gops=int8_gops, f32_gops=f32_gops,
                int8_how=f"measured: {_PEAK_HOW[path]} in a loop on {n_cores} threads ({path})",
                f32_how=f"measured: 12 independent vfmadd231ps accumulators in a loop on "
                        f"{n_cores} threads")


def _blocking(fn: Callable[..., jax.Array], *args: Any) -> Callable[[], jax.Array]:
  """A zero-argument call of fn(*args) that waits for its result."""
  return lambda: fn(*args).block_until_ready()


def _int32_product(x8: np.ndarray, w8: np.ndarray) -> np.ndarray:
  return (x8.astype(np.int64) @ w8.astype(np.int64).T).astype(np.int32)


def variants(m: int, n: int, k: int, seed: int = 0,
             torch_threads: int | None = None) -> tuple[dict[str, Variant], dict[str, str]]:
  """The variants this machine runs for one shape, and the reason for each one skipped.

  Args:
    m, n, k: x is int8 (m, k), the weights int8 (n, k).
    seed: of the random integers.
    torch_threads: PyTorch's intra-op threads; None: every logical CPU (`cores()`).

  Returns:
    (name -> `Variant`, name -> why it is skipped).
  """
  rng = np.random.default_rng(seed)
  x8 = rng.integers(-128, 128, (m, k), dtype=np.int8)
  w8 = rng.integers(-128, 128, (n, k), dtype=np.int8)
  exact = _int32_product(x8, w8)
  x, w = jnp.asarray(x8), jnp.asarray(w8)
  xf = x.astype(jnp.float32)
  out: dict[str, Variant] = {}
  skipped: dict[str, str] = {}
  # float32 sums of integers are exact below 2^24; beyond, allow a few roundings per row.
  f32_tolerance = 0.0 if 128 * 128 * k < 2**24 else 2.0**-22 * 128 * 128 * k * math.sqrt(k)
  # The float weights laid out (K, N), outside the timed call: XLA:CPU's faster layout (with
  # (N, K), x @ w.T runs its M = 1 product about 20x slower, 42 ms at 1 x 4096 x 4096).
  f32 = jax.jit(lambda a, b: a @ b)
  wf_kn = jax.device_put(np.ascontiguousarray(w8.T, dtype=np.float32))
  out["xla f32"] = Variant(_blocking(f32, xf, wf_kn), exact, f32_tolerance, "f32")
  i8 = jax.jit(arith.matmul)
  out["xla int8"] = Variant(_blocking(i8, x, w), exact, 0.0, "int8")
  for path in kernels.native_paths():
    if path in UNTIMED_PATHS:
      skipped[f"native {path}"] = UNTIMED_PATHS[path]
      continue
    fn = jax.jit(lambda a, b, path=path: kernels.matmul(a, b, kernel=path))
    out[f"native {path}"] = Variant(_blocking(fn, x, w), exact, 0.0, "int8")
  if not kernels.available():
    for name in ("native packed", "native fused", "native fused packed"):
      skipped[name] = "the native library is not built"
  else:
    best = kernels.resolve("native")
    packed = kernels.pack(w)  # once, outside the timed calls
    jax.block_until_ready(packed)
    on_packed = jax.jit(lambda a, p: kernels.matmul(a, p, kernel=best))
    out["native packed"] = Variant(_blocking(on_packed, x, packed), exact, 0.0, "int8")
    offset = jnp.asarray(rng.integers(-1000, 1000, n).astype(np.int32))
    spread = 5500.0 * np.sqrt(k)
    r = rq.FbgemmRequant(bias=jnp.asarray(rng.normal(0, spread, n).astype(np.float32)),
                         multiplier=jnp.asarray((np.full(n, 60 / spread)).astype(np.float32)),
                         zero_point=jnp.int32(0), lo=-128, hi=127, relu=True)
    fused = jax.jit(lambda a, b, o: kernels.matmul_requant(a, b, o, r, kernel=best))
    requantized = np.asarray(jax.jit(
        lambda a, b, o: kernels.matmul_requant(a, b, o, r, kernel="xla"))(x, w, offset))
    out["native fused"] = Variant(_blocking(fused, x, w, offset), requantized, 0.0, "int8")
    out["native fused packed"] = Variant(_blocking(fused, x, packed, offset), requantized, 0.0,
                                         "int8")
  _torch_variants(x8, w8, exact, out, skipped, torch_threads or cores())
  return out, skipped


def _torch_variants(x8: np.ndarray, w8: np.ndarray, exact: np.ndarray, out: dict[str, Variant],
                    skipped: dict[str, str], threads: int) -> None:
  """Adds torch._int_mm and one quantized Linear per engine of `TORCH_ENGINES` to `out`, or
  their reasons to `skipped`."""
  torch = import_torch(["torch _int_mm"] + [f"torch qlinear {e}" for e in TORCH_ENGINES],
                       skipped, threads)
  if torch is None:
    return
  k, n = x8.shape[1], w8.shape[0]
  tx, tw_t = torch.from_numpy(x8), torch.from_numpy(np.ascontiguousarray(w8.T))
  try:
    torch._int_mm(tx[:1], tw_t)
    out["torch _int_mm"] = Variant(lambda: torch._int_mm(tx, tw_t).numpy(), exact, 0.0, "int8")
  except RuntimeError as error:
    skipped["torch _int_mm"] = f"torch._int_mm fails here: {str(error).splitlines()[0]}"
  qx = torch.quantize_per_tensor(torch.from_numpy((x8.astype(np.float32) + 128) * 0.05), 0.05,
                                 128, torch.quint8)
  weight = torch.from_numpy(w8.astype(np.float32) * 0.01)

  def qlinear():
    module = torch.ao.nn.quantized.Linear(k, n, dtype=torch.qint8)
    qweight = torch.quantize_per_channel(weight, torch.full((n,), 0.01, dtype=torch.double),
                                         torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    module.set_weight_bias(qweight, torch.zeros(n))
    module.scale, module.zero_point = float(0.05 * np.sqrt(k)), 0
    return module

  for engine in TORCH_ENGINES:
    found = torch_engine_variant(engine, qlinear, qx)
    if isinstance(found, str):
      skipped[f"torch qlinear {engine}"] = found
    else:
      out[f"torch qlinear {engine}"] = found


def import_torch(names: list[str], skipped: dict[str, str], threads: int) -> Any:
  """torch on `threads` intra-op threads, its deprecation warnings of quantized tensors
  silenced; None with every one of `names` skipped where it is not installed."""
  try:
    import torch
  except ImportError:
    skipped.update(dict.fromkeys(names, "torch is not installed"))
    return None
  torch.set_num_threads(threads)
  warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
  return torch


def torch_engine_variant(engine: str, build: Callable[[], Any], x: Any) -> Variant | str:
  """A torch quantized module made by `build()` under the quantized engine `engine` (its packed
  weight is the engine's own) and run on x under it, unchecked; or why it cannot run here."""
  import torch
  supported = torch.backends.quantized.supported_engines
  if engine not in supported:
    return f"engine {engine!r} not in this torch's supported engines {supported}"
  try:
    torch.backends.quantized.engine = engine
    module = build()
    with torch.no_grad():
      module(x)
  except RuntimeError as error:
    return f"engine {engine!r} fails here: {str(error).splitlines()[0]}"

  def run():
    if torch.backends.quantized.engine != engine:
      torch.backends.quantized.engine = engine
    with torch.no_grad():
      return module(x)

  return Variant(run, None, 0.0, "int8")


def check(name: str, result: Any, variant: Variant) -> None:
  """Raises if `result` (a variant's output) is not `variant.expected` within its tolerance.

  Raises:
    RuntimeError: shape or values differ; the message names the variant and the largest
      difference.
  """
  if variant.expected is None:
    return
  got = np.asarray(result)
  if got.shape != variant.expected.shape:
    raise RuntimeError(f"{name}: result of shape {got.shape}, expected "
                       f"{variant.expected.shape}.")
  diff = np.abs(got.astype(np.float64) - variant.expected.astype(np.float64))
  if diff.max(initial=0.0) > variant.tolerance:
    where = np.unravel_index(int(np.argmax(diff)), diff.shape)
    raise RuntimeError(f"{name}: result differs from the reference by up to {diff.max():g} "
                       f"(allowed {variant.tolerance:g}) at {tuple(int(i) for i in where)}: "
                       f"got {got[where]}, expected {variant.expected[where]}.")


def measure(fns: dict[str, Callable[[], object]], rounds: int,
            seconds: float) -> dict[str, tuple[float, float]]:
  """Median (wall, process CPU) seconds per call of each variant, interleaved over `rounds`
  rotated rounds."""
  names = list(fns)
  for name in names:  # compile and warm up
    fns[name]()
  times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      start, cpu = time.perf_counter(), time.process_time()
      calls = 0
      while True:
        fns[name]()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / len(names):
          break
      times[name].append((elapsed / calls, (time.process_time() - cpu) / calls))
  return {name: (statistics.median(v[0] for v in values),
                 statistics.median(v[1] for v in values)) for name, values in times.items()}


def _positive(text: str) -> float:
  value = float(text)
  if not value > 0:
    raise argparse.ArgumentTypeError(f"expected a positive number of GOP/s; got {text!r}")
  return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark, prints its table and returns its results (also written by --json).

  Returns:
    {"cpu", "torch_threads", "limits", "load_before", "load_after", "shapes": [{"m", "n", "k",
    "skipped", "rows": [{"variant", "ms", "gops", "x_int8", "gops_cpu", "pct_limit", "limit",
    "checked"}]}]}.
  """
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--seconds", type=float, default=2.0,
                      help="time per round, shared by the variants")
  parser.add_argument("--quick", action="store_true", help="small shapes, one short round")
  parser.add_argument("--int8-limit-gops", type=_positive, default=None,
                      help="int8 peak in GOP/s for the %% limit column; default: measured "
                           "(the best native path's instruction on every core), else cores x "
                           "cpu MHz x INT8_OPS_PER_CYCLE of that path")
  parser.add_argument("--f32-limit-gops", type=_positive, default=None,
                      help="float32 peak in GOP/s; default: measured (FMAs on every core), "
                           "else cores x cpu MHz x F32_OPS_PER_CYCLE (64 with AVX-512 F, else "
                           "32)")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="PyTorch's intra-op threads; default: every logical CPU (on a busy "
                           "machine small products then wait on the thread pool)")
  parser.add_argument("--json", type=pathlib.Path, default=None, metavar="PATH",
                      help="also write the results to PATH as JSON")
  parser.add_argument("--retain-freed-memory", action="store_true",
                      help="keep freed buffers in the heap for every variant alike "
                           "(qjax.integer.kernels.retain_freed_memory): no page faults from "
                           "glibc handing XLA's and torch's buffers back between calls")
  args = parser.parse_args(argv)
  retained = kernels.retain_freed_memory() if args.retain_freed_memory else False
  if args.torch_threads is not None and args.torch_threads < 1:
    parser.error(f"--torch-threads must be at least 1; got {args.torch_threads}.")
  shapes = list(QUICK_SHAPES) if args.quick else args.shapes
  rounds, seconds = (1, 0.2) if args.quick else (args.rounds, args.seconds)

  info = read_cpuinfo()
  best = kernels.resolve("native") if kernels.available() else None
  limits = measured_limits(best, cores()) or default_limits(info, best, cores())
  if args.int8_limit_gops is not None:
    limits = limits._replace(int8_gops=args.int8_limit_gops, int8_how="--int8-limit-gops")
  if args.f32_limit_gops is not None:
    limits = limits._replace(f32_gops=args.f32_limit_gops, f32_how="--f32-limit-gops")
  load_before = os.getloadavg()[0]
  print(f"CPU: {info.model or 'unknown'}; {cores()} logical CPUs; cpu MHz "
        f"{f'{info.mhz:.0f}' if info.mhz else 'not reported'}; AMX int8 "
        f"{'reported' if 'amx_int8' in info.flags else 'not reported'} (amx_int8 flag), "
        f"{'granted' if kernels.amx_int8() else 'not granted'} to this process (the native "
        f"amx path and XLA's int8 dot use it where granted)")
  print(f"native paths: {kernels.native_paths() or 'none (library not built)'}; best: "
        f"{best or 'none'}")
  print(f"int8 limit {limits.int8_gops:8.1f} GOP/s = {limits.int8_how}")
  print(f"f32 limit  {limits.f32_gops:8.1f} GOP/s = {limits.f32_how}")
  if not limits.int8_how.startswith("measured"):
    print("  (assumed peaks, not measured: SMT siblings share one core's units and the clock "
          "is the reported one, so the limits are estimates)")
  print(f"torch threads {args.torch_threads or cores()}; load average {load_before:.1f}; "
        f"allocator: {'freed memory retained' if retained else 'glibc defaults'}")

  results: dict[str, Any] = {
      "cpu": {"model": info.model, "mhz": info.mhz, "logical_cpus": cores(),
              "amx_int8": "amx_int8" in info.flags, "native_paths": list(kernels.native_paths()),
              "best_path": best},
      "torch_threads": args.torch_threads or cores(), "limits": limits._asdict(),
      "load_before": load_before, "shapes": []}
  for text in shapes:
    m, n, k = parse_shape(text)
    found, skipped = variants(m, n, k, torch_threads=args.torch_threads)
    for name, variant in found.items():  # each result checked once, before timing
      check(name, variant.run(), variant)
    medians = measure({name: v.run for name, v in found.items()}, rounds, seconds)
    base = medians["xla int8"][0]
    ops = 2 * m * n * k
    print(f"\n{m} x {n} x {k} ({ops / 1e9:.3g} GOP)")
    print(f"  {'variant':{LABEL_WIDTH}s} {'ms':>10s}  {'GOP/s':>8s}  {'x int8':>6s}  "
          f"{'GOP/cpu-s':>9s}  {'% limit':>7s}  checked")
    rows = []
    for name, (t, cpu) in medians.items():
      kind = found[name].kind
      gops = ops / t / 1e9
      limit = limits.int8_gops if kind == "int8" else limits.f32_gops
      row = {"variant": name, "ms": t * 1e3, "gops": gops, "x_int8": base / t,
             "gops_cpu": ops / max(cpu, 1e-9) / 1e9, "pct_limit": 100 * gops / limit,
             "limit": kind, "checked": found[name].expected is not None}
      rows.append(row)
      print(f"  {name:{LABEL_WIDTH}s} {row['ms']:10.3f}  {gops:8.1f}  {row['x_int8']:6.2f}  "
            f"{row['gops_cpu']:9.1f}  {row['pct_limit']:6.1f}%  "
            f"{'yes' if row['checked'] else 'no'}")
    for name, reason in skipped.items():
      print(f"  {name:{LABEL_WIDTH}s} skipped: {reason}")
    results["shapes"].append({"m": m, "n": n, "k": k, "rows": rows, "skipped": skipped})
  results["load_after"] = os.getloadavg()[0]
  print(f"\nload average after: {results['load_after']:.1f}")
  if args.json is not None:
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()
