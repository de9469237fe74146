"""Throughput of one int8 GEMM: qjax's native kernel against XLA and PyTorch, in one run.

For each shape M x N x K (x (M, K), weights (N, K)), the median time of one call of:

  * xla f32        jitted x @ w.T in float32 (the same integer values as floats);
  * xla int8       jitted `qjax.integer.arith.matmul` (int8 x int8 -> int32 dot_general);
  * native <path>  jitted `qjax.integer.kernels.matmul` forced to each path this CPU runs
                   (int32 result, zero offset);
  * native fused   jitted `qjax.integer.kernels.matmul_requant` on the best path (int8 result
                   with offset, float bias, per-channel multiplier, ReLU);
  * torch _int_mm  torch._int_mm(x, w.T) (int8 x int8 -> int32);
  * torch qlinear  torch.ao.nn.quantized.Linear on the "x86" engine (quint8 in and out, per-
                   channel qint8 weights: requantized like "native fused").

Calls run to completion (block_until_ready); the variants are interleaved over rounds in a
rotated order so that load on the machine hits them alike. GOP/s = 2 M N K / median time;
"x int8" is xla int8's time over the variant's; "GOP/cpu-s" divides by the process's CPU
time per call instead (all threads), which moves less than wall time when other processes
share the cores. The 1-minute load average before and after is printed: on a shared machine
absolute figures move with it, the ratios less.

Usage:
  python -m experiments.bench_gemm                        # the four default shapes
  python -m experiments.bench_gemm --shapes 1024x1024x1024 64x512x256 --rounds 5
  python -m experiments.bench_gemm --quick                # seconds; smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qjax.integer import arith
from qjax.integer import kernels
from qjax.integer import requant as rq

DEFAULT_SHAPES = ("1024x1024x1024", "256x4096x4096", "1x4096x4096", "256x100x784")


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


def variants(m: int, n: int, k: int, seed: int = 0) -> dict[str, Callable[[], object]]:
  """One zero-argument callable per variant, each running one GEMM to completion."""
  rng = np.random.default_rng(seed)
  x8 = rng.integers(-128, 128, (m, k), dtype=np.int8)
  w8 = rng.integers(-128, 128, (n, k), dtype=np.int8)
  x, w = jnp.asarray(x8), jnp.asarray(w8)
  xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
  out: dict[str, Callable[[], object]] = {}
  f32 = jax.jit(lambda a, b: a @ b.T)
  out["xla f32"] = lambda: f32(xf, wf).block_until_ready()
  i8 = jax.jit(arith.matmul)
  out["xla int8"] = lambda: i8(x, w).block_until_ready()
  for path in kernels.native_paths():
    fn = jax.jit(lambda a, b, path=path: kernels.matmul(a, b, kernel=path))
    out[f"native {path}"] = lambda fn=fn: fn(x, w).block_until_ready()
  if kernels.available():
    offset = jnp.asarray(rng.integers(-1000, 1000, n).astype(np.int32))
    spread = 5500.0 * np.sqrt(k)
    r = rq.FbgemmRequant(bias=jnp.asarray(rng.normal(0, spread, n).astype(np.float32)),
                         multiplier=jnp.asarray((np.full(n, 60 / spread)).astype(np.float32)),
                         zero_point=jnp.int32(0), lo=-128, hi=127, relu=True)
    fused = jax.jit(lambda a, b, o: kernels.matmul_requant(a, b, o, r, kernel="native"))
    out["native fused"] = lambda: fused(x, w, offset).block_until_ready()
  try:
    import torch
  except ImportError:
    return out
  torch.set_num_threads(os.cpu_count() or 1)
  warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
  tx, tw_t = torch.from_numpy(x8), torch.from_numpy(np.ascontiguousarray(w8.T))
  try:
    torch._int_mm(tx[:1], tw_t)
    out["torch _int_mm"] = lambda: torch._int_mm(tx, tw_t)
  except RuntimeError:
    pass
  torch.backends.quantized.engine = "x86"
  qlinear = torch.ao.nn.quantized.Linear(k, n, dtype=torch.qint8)
  scales = torch.full((n,), 0.01, dtype=torch.double)
  qweight = torch.quantize_per_channel(torch.from_numpy(w8.astype(np.float32) * 0.01), scales,
                                       torch.zeros(n, dtype=torch.long), 0, torch.qint8)
  qlinear.set_weight_bias(qweight, torch.zeros(n))
  qlinear.scale, qlinear.zero_point = float(0.05 * np.sqrt(k)), 0
  qx = torch.quantize_per_tensor(torch.from_numpy((x8.astype(np.float32) + 128) * 0.05), 0.05,
                                 128, torch.quint8)
  with torch.no_grad():
    qlinear(qx)
    out["torch qlinear"] = lambda: qlinear(qx)
  return out


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


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--seconds", type=float, default=2.0,
                      help="time per round, shared by the variants")
  parser.add_argument("--quick", action="store_true", help="small shapes, one short round")
  args = parser.parse_args(argv)
  shapes = ["64x64x64", "1x128x96"] if args.quick else args.shapes
  rounds, seconds = (1, 0.2) if args.quick else (args.rounds, args.seconds)
  print(f"native paths: {kernels.native_paths() or 'none (library not built)'}; "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
  for text in shapes:
    m, n, k = parse_shape(text)
    medians = measure(variants(m, n, k), rounds, seconds)
    base = medians["xla int8"][0]
    ops = 2 * m * n * k
    print(f"\n{m} x {n} x {k} ({ops / 1e9:.3g} GOP)")
    for name, (t, cpu) in medians.items():
      print(f"  {name:15s} {t * 1e3:10.3f} ms  {ops / t / 1e9:8.1f} GOP/s  "
            f"x int8 {base / t:6.2f}  {ops / max(cpu, 1e-9) / 1e9:8.1f} GOP/cpu-s")
  print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
