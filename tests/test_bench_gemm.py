"""The GEMM benchmark runs end to end (--quick): a row for every variant this machine runs,
positive throughputs, every checked result equal to the reference; its check fails on a wrong
result; its limits follow the documented formula. No timing claims."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import math

import numpy as np
import pytest
from support.experiments import load_experiment, user_promotion_rules  # noqa: F401

from qjax.integer import kernels


@pytest.fixture(scope="module")
def bench():
  return load_experiment("bench_gemm")


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
  """The results, printed table and JSON file of one `--quick` run."""
  path = tmp_path_factory.mktemp("bench_gemm") / "gemm.json"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = bench.main(["--quick", "--json", str(path)])
  return results, out.getvalue(), json.loads(path.read_text())


def test_quick_run_prints_a_row_per_variant(bench, quick):
  results, out, written = quick
  lines = out.splitlines()
  assert len(results["shapes"]) == len(bench.QUICK_SHAPES)
  for shape in results["shapes"]:
    m, n, k = shape["m"], shape["n"], shape["k"]
    found, skipped = bench.variants(m, n, k)
    assert set(skipped) == set(shape["skipped"])
    assert [row["variant"] for row in shape["rows"]] == list(found)
    for name in found:  # one printed row per variant, under this shape's heading
      assert sum(line.startswith(f"  {name:{bench.LABEL_WIDTH}s} ") for line in lines) == len(
          bench.QUICK_SHAPES), (name, out)
    expected = {"xla f32", "xla int8"}
    if kernels.available():
      expected |= {f"native {p}" for p in kernels.native_paths()
                   if p not in bench.UNTIMED_PATHS}
      expected |= {"native packed", "native fused", "native fused packed"}
    assert expected <= set(found), (sorted(found), skipped)
    for row in shape["rows"]:
      for key in ("ms", "gops", "x_int8", "gops_cpu", "pct_limit"):
        assert math.isfinite(row[key]) and row[key] > 0, (m, n, k, row)
  assert written == json.loads(json.dumps(results))


def test_quick_run_checks_every_integer_variant(quick):
  """Every variant but the torch quantized Linears was compared with the reference."""
  results, out, _ = quick
  for shape in results["shapes"]:
    for row in shape["rows"]:
      assert row["checked"] == (not row["variant"].startswith("torch qlinear")), row
  assert "best: " in out and "AMX int8" in out and "% limit" in out


def test_native_variants_equal_xla_int8(bench):
  """The check the run relies on, made here directly: each native result equals XLA's."""
  found, _ = bench.variants(5, 40, 33)
  reference = np.asarray(found["xla int8"].run())
  for name, variant in found.items():
    if name.startswith("native") and "fused" not in name:
      np.testing.assert_array_equal(np.asarray(variant.run()), reference, err_msg=name)
  if "torch _int_mm" in found:
    np.testing.assert_array_equal(np.asarray(found["torch _int_mm"].run()), reference)


def test_check_rejects_a_wrong_result(bench):
  found, _ = bench.variants(3, 20, 8)
  variant = found["xla int8"]
  result = np.asarray(variant.run()).copy()
  bench.check("xla int8", result, variant)
  result[1, 2] += 1
  with pytest.raises(RuntimeError, match=r"xla int8: result differs .* at \(1, 2\)"):
    bench.check("xla int8", result, variant)
  with pytest.raises(RuntimeError, match="shape"):
    bench.check("xla int8", result[:2], variant)


def test_limits_follow_the_formula(bench):
  info = bench.parse_cpuinfo("model name\t: Some CPU\ncpu MHz\t\t: 2000.000\n"
                             "flags\t\t: fpu avx2 avx512f avx512_vnni amx_int8\n"
                             "cpu MHz\t\t: 3000.000\n")
  assert info.model == "Some CPU" and info.mhz == 2500.0 and "amx_int8" in info.flags
  limits = bench.default_limits(info, "vnni", 4)
  assert limits.int8_gops == pytest.approx(4 * 2.5 * 128)
  assert limits.f32_gops == pytest.approx(4 * 2.5 * 64)
  no_clock = bench.default_limits(bench.parse_cpuinfo(""), "avx2", 1)
  assert no_clock.int8_gops == pytest.approx(bench.FALLBACK_GHZ * 32)
  assert no_clock.f32_gops == pytest.approx(bench.FALLBACK_GHZ * 32)
  assert "assumed" in no_clock.int8_how


def test_limit_options_must_be_positive(bench):
  with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
    bench.main(["--quick", "--int8-limit-gops", "0"])
  assert "positive" in err.getvalue()


def test_measured_limits(bench):
  """The peaks measured by the library's probes: positive for the best path and float32,
  labelled as measured; None where nothing can be measured (no library, "portable"); the
  probe itself gives 0 for a path this CPU lacks. (No timing is compared: the figures move
  with the load.)"""
  assert bench.measured_limits(None, 2) is None
  assert bench.measured_limits("portable", 2) is None
  best = kernels.resolve("native") if kernels.available() else None
  limits = bench.measured_limits(best, 1, seconds=0.02)
  if best not in ("vnni", "amx", "avx2"):
    assert limits is None
    return
  assert limits is not None and limits.int8_how.startswith("measured") and best in (
      limits.int8_how)
  assert limits.int8_gops > 0 and limits.f32_gops > 0
  probe = ctypes.CDLL(str(kernels._library_file())).qjax_int8_peak_gops
  probe.restype, probe.argtypes = ctypes.c_double, [ctypes.c_int, ctypes.c_int, ctypes.c_double]
  assert probe(1, 1, 0.01) == 0  # "portable": no instruction to time
  if not kernels.amx_int8():
    assert probe(4, 1, 0.01) == 0
