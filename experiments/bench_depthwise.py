"""Throughput of grouped int8 convolutions: qjax's native kernels against XLA and PyTorch.

A grouped convolution with C channels in and out, G groups, a k x k window, k // 2 padding on
every side and stride s on an NHWC input B x H x W x C: depthwise (MobileNet's k x k filter
per channel, G = C, the default) or G groups of C / G channels (ResNeXt's). For each shape
the median time of one call of:

  * xla f32              jitted `lax.conv_general_dilated(feature_group_count=G)` in float32;
  * xla int8             jitted `qjax.integer.kernels.conv(kernel="xla")`: XLA's grouped int8
                         -> int32 convolution, then the requantization (per-channel float
                         multiplier, zero point, ReLU) as XLA ops;
  * native <path>        the same forced to each native path this CPU runs: the native
                         depthwise kernel, or runs of groups as native convolutions with
                         block-diagonal kernels (`kernels.group_runs`), the requantization
                         fused (int8 out);
  * torch qconv <engine> `torch.ao.nn.quantized.Conv2d(C, C, k, groups=G)` on the "fbgemm"
                         and on the "onednn" quantized engine (quint8 channels-last in and out,
                         per-channel qint8 weights), built and run under its engine.

Before timing, each native row runs once and must equal xla int8 exactly (int8 results; a
mismatch stops the run); xla f32 and the torch rows compute the same convolution on other
numbers and are not checked. The variants are interleaved over rounds in a rotated order
(`experiments.bench_gemm.measure`). GOP/s = 2 B OH OW C (C / G) k^2 / median time; "x int8" is xla
int8's time over the variant's, "x torch" the fastest torch row's over the variant's.
--retain-freed-memory keeps freed buffers in the heap (`kernels.retain_freed_memory`):
without it a large output may be page-faulted in on every call.

Usage:
  python -m experiments.bench_depthwise                     # the default shapes, ~1 minute
  python -m experiments.bench_depthwise --shapes 32x56x56x128:3:1 --rounds 3
  python -m experiments.bench_depthwise --shapes 8x56x56x128:3:1:32   # 32 groups of 4
  python -m experiments.bench_depthwise --quick             # seconds; smoke run
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.integer import kernels
from qjax.integer import requant as rq

from experiments import bench_gemm

# BxHxWxC:k:s[:G]. Depthwise: MobileNet-v1's 3 x 3 layers at 224 px (112 x 112 x 32 and
# 56 x 56 x 128, batch 1 and 32), a strided one, and a 5 x 5 one (EfficientNet's). Grouped:
# ResNeXt-50 32x4d's 3 x 3 layers of its first and third stages at batch 8, and 4 groups.
DEFAULT_SHAPES = ("1x112x112x32:3:1", "32x56x56x128:3:1", "32x28x28x256:3:2",
                  "8x14x14x512:5:1", "8x56x56x128:3:1:32", "8x14x14x512:3:1:32",
                  "8x28x28x128:3:1:4")
QUICK_SHAPES = ("2x9x9x16:3:1", "1x8x7x20:3:2", "2x6x7x24:3:1:4")
TORCH_ENGINES = ("fbgemm", "onednn")
LABEL_WIDTH = 20


class Shape(NamedTuple):
  """One grouped convolution: input (b, h, w, c), window k x k, stride s, g groups (c of
  them, depthwise, when g is 0)."""

  b: int
  h: int
  w: int
  c: int
  k: int
  s: int
  g: int = 0

  @property
  def groups(self) -> int:
    return self.g or self.c

  @property
  def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
    """k // 2 on every side (torchvision's MobileNet padding; "same" at stride 1)."""
    return (self.k // 2, self.k // 2), (self.k // 2, self.k // 2)

  def out_hw(self) -> tuple[int, int]:
    p = self.k // 2
    return (self.h + 2 * p - self.k) // self.s + 1, (self.w + 2 * p - self.k) // self.s + 1

  def ops(self) -> int:
    """2 x the multiply-adds."""
    oh, ow = self.out_hw()
    return 2 * self.b * oh * ow * self.c * (self.c // self.groups) * self.k * self.k

  def label(self) -> str:
    oh, ow = self.out_hw()
    kind = "depthwise" if self.groups == self.c else f"{self.groups} groups"
    return (f"{self.b}x{self.h}x{self.w}x{self.c}, {self.k}x{self.k} stride {self.s}, {kind} "
            f"-> {oh}x{ow}x{self.c}")


def parse_shape(text: str) -> Shape:
  """"BxHxWxC:k:s" (depthwise) or "BxHxWxC:k:s:G" (G groups) -> Shape.

  Example:
    >>> parse_shape("32x56x56x128:3:1")
    Shape(b=32, h=56, w=56, c=128, k=3, s=1, g=0)
    >>> parse_shape("8x56x56x128:3:1:32").groups
    32
  """
  try:
    dims, k, s, *g = text.split(":")
    b, h, w, c = (int(v) for v in dims.lower().split("x"))
    if len(g) > 1:
      raise ValueError(text)
    shape = Shape(b, h, w, c, int(k), int(s), *(int(v) for v in g))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"a shape is BxHxWxC:k:s or BxHxWxC:k:s:G (e.g. 32x56x56x128:3:1, "
        f"8x56x56x128:3:1:32); got {text!r}") from None
  if (min(shape[:6]) < 1 or shape.c < 2 or shape.k > min(shape.h, shape.w)
      or not 2 <= shape.groups <= shape.c or shape.c % shape.groups):
    raise argparse.ArgumentTypeError(f"{text!r}: every size must be >= 1, C >= 2, the "
                                     f"window no larger than the image and G (2..C) must "
                                     f"divide C")
  return shape


def _requant(c: int, terms: int, rng: np.random.Generator) -> rq.FloatRequant:
  """A per-channel float requantization (output zero point -100, fused ReLU), its multipliers
  scaled so that the outputs of sums of `terms` products spread over the int8 grid."""
  mult = rng.uniform(0.5, 1.5, c).astype(np.float32) / np.float32(64 * np.sqrt(terms))
  return rq.FloatRequant(multiplier=jnp.asarray(mult), zero_point=jnp.int32(-100), lo=-128,
                         hi=127, relu=True)


def variants(shape: Shape, seed: int = 0, torch_threads: int | None = None
             ) -> tuple[dict[str, bench_gemm.Variant], dict[str, str]]:
  """The variants this machine runs for one shape, and the reason for each one skipped."""
  rng = np.random.default_rng(seed)
  b, h, w, c, k, s, _ = shape
  g = shape.groups
  x8 = rng.integers(-128, 128, (b, h, w, c), dtype=np.int8)
  w8 = rng.integers(-127, 128, (k, k, c // g, c), dtype=np.int8)
  requant = _requant(c, k * k * (c // g), rng)
  offset = jnp.zeros(c, jnp.int32)
  geometry = {"strides": (s, s), "padding": shape.padding, "dilation": (1, 1),
              "pad_value": jnp.int32(0), "groups": g}
  x, wk = jnp.asarray(x8), jnp.asarray(w8)
  out: dict[str, bench_gemm.Variant] = {}
  skipped: dict[str, str] = {}
  xf, wf = x.astype(jnp.float32), wk.astype(jnp.float32)
  f32 = jax.jit(lambda a, v: lax.conv_general_dilated(
      a, v, (s, s), shape.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=g))
  out["xla f32"] = bench_gemm.Variant(bench_gemm._blocking(f32, xf, wf), None, 0.0, "f32")

  def int8_conv(path: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    return jax.jit(lambda a, v: kernels.conv(a, v, offset, requant, **geometry, kernel=path))

  reference = np.asarray(int8_conv("xla")(x, wk))
  out["xla int8"] = bench_gemm.Variant(bench_gemm._blocking(int8_conv("xla"), x, wk), reference,
                                       0.0, "int8")
  for path in kernels.NATIVE_PATHS:
    name = f"native {path}"
    if path not in kernels.native_paths():
      skipped[name] = "this CPU (or build) lacks it"
    elif path in bench_gemm.UNTIMED_PATHS:
      skipped[name] = bench_gemm.UNTIMED_PATHS[path]
    else:
      out[name] = bench_gemm.Variant(bench_gemm._blocking(int8_conv(path), x, wk), reference,
                                     0.0, "int8")
  _torch_variants(shape, x8, w8, out, skipped, torch_threads or bench_gemm.cores())
  return out, skipped


def _torch_variants(shape: Shape, x8: np.ndarray, w8: np.ndarray,
                    out: dict[str, bench_gemm.Variant], skipped: dict[str, str],
                    threads: int) -> None:
  """One quantized grouped Conv2d per engine of `TORCH_ENGINES`, or its reason to skip."""
  names = [f"torch qconv {engine}" for engine in TORCH_ENGINES]
  torch = bench_gemm.import_torch(names, skipped, threads)
  if torch is None:
    return
  c, k, s, g = shape.c, shape.k, shape.s, shape.groups
  qx = torch.quantize_per_tensor(
      torch.from_numpy((x8.astype(np.float32) + 128) * 0.05).permute(0, 3, 1, 2), 0.05, 128,
      torch.quint8).contiguous(memory_format=torch.channels_last)
  weight = torch.from_numpy(w8.astype(np.float32).transpose(3, 2, 0, 1) * 0.01)

  def qconv():
    module = torch.ao.nn.quantized.Conv2d(c, c, k, stride=s, padding=k // 2, groups=g)
    qweight = torch.quantize_per_channel(weight, torch.full((c,), 0.01, dtype=torch.double),
                                         torch.zeros(c, dtype=torch.long), 0, torch.qint8)
    module.set_weight_bias(qweight, torch.zeros(c))
    module.scale, module.zero_point = float(0.05 * k * np.sqrt(c // g)), 0
    return module

  for engine, name in zip(TORCH_ENGINES, names, strict=True):
    found = bench_gemm.torch_engine_variant(engine, qconv, qx)
    if isinstance(found, str):
      skipped[name] = found
    else:
      out[name] = found


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark, prints a table per shape; returns (and with --json writes) the rows."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="+", type=parse_shape,
                      default=[parse_shape(s) for s in DEFAULT_SHAPES])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--seconds", type=float, default=2.0,
                      help="target time of one round over all variants")
  parser.add_argument("--quick", action="store_true", help="small shapes, one short round")
  parser.add_argument("--torch-threads", type=int, default=None)
  parser.add_argument("--json", type=pathlib.Path, default=None, metavar="PATH")
  parser.add_argument("--retain-freed-memory", action="store_true")
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.seconds <= 0:
    parser.error("--rounds must be >= 1 and --seconds > 0")
  if args.quick:
    args.shapes, args.rounds, args.seconds = [parse_shape(s) for s in QUICK_SHAPES], 1, 0.05
  if args.retain_freed_memory:
    kernels.retain_freed_memory()
  print(f"grouped int8 convolutions, {bench_gemm.cores()} cores, native paths "
        f"{list(kernels.native_paths())}, {args.rounds} rounds")
  results: dict[str, Any] = {"shapes": []}
  for shape in args.shapes:
    found, skipped = variants(shape, torch_threads=args.torch_threads)
    for name, variant in found.items():
      bench_gemm.check(name, variant.run(), variant)
    times = bench_gemm.measure({name: v.run for name, v in found.items()}, args.rounds,
                               args.seconds)
    torch_best = min((t for name, (t, _) in times.items() if name.startswith("torch")),
                     default=None)
    print(f"\n{shape.label()}")
    print(f"  {'variant':{LABEL_WIDTH}s} {'ms':>9s} {'GOP/s':>8s} {'x int8':>7s} {'x torch':>7s}")
    rows = []
    for name, (seconds, _) in times.items():
      row = {"variant": name, "ms": seconds * 1e3, "gops": shape.ops() / seconds / 1e9,
             "x_int8": times["xla int8"][0] / seconds,
             "x_torch": torch_best / seconds if torch_best else None,
             "checked": found[name].expected is not None}
      rows.append(row)
      x_torch = f"{row['x_torch']:7.2f}" if row["x_torch"] else f"{'-':>7s}"
      print(f"  {name:{LABEL_WIDTH}s} {row['ms']:9.3f} {row['gops']:8.1f} {row['x_int8']:7.2f} "
            f"{x_torch}")
    for name, why in skipped.items():
      print(f"  {name:{LABEL_WIDTH}s} skipped: {why}")
    results["shapes"].append({"shape": shape._asdict(), "rows": rows, "skipped": skipped})
  if args.json:
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(args.json)
  return results


if __name__ == "__main__":
  main()
