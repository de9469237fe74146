"""The grouped convolution benchmark runs end to end (--quick): a row for every variant this
machine runs, each native row checked equal to XLA's int8 convolution before it is timed, a
wrong result stops the run, shapes parse and bad ones are refused. No timing claims."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math

import numpy as np
import pytest
from support.experiments import load_experiment, user_promotion_rules  # noqa: F401

from qjax.integer import kernels


@pytest.fixture(scope="module")
def bench():
  return load_experiment("bench_depthwise")


def test_quick_run_prints_a_row_per_variant(bench, tmp_path):
  path = tmp_path / "depthwise.json"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = bench.main(["--quick", "--json", str(path)])
  assert json.loads(path.read_text()) == json.loads(json.dumps(results))
  assert len(results["shapes"]) == len(bench.QUICK_SHAPES)
  for shape in results["shapes"]:
    names = [row["variant"] for row in shape["rows"]]
    expected = {"xla f32", "xla int8"} | {
        f"native {p}" for p in kernels.native_paths() if p not in ("amx_emulated",)}
    assert expected <= set(names), names
    for row in shape["rows"]:
      assert math.isfinite(row["ms"]) and row["ms"] > 0 and row["gops"] > 0, row
      assert row["checked"] == (row["variant"].startswith("native")
                                or row["variant"] == "xla int8"), row
      assert sum(line.startswith(f"  {row['variant']:{bench.LABEL_WIDTH}s} ")
                 for line in out.getvalue().splitlines()) == len(bench.QUICK_SHAPES)


def test_a_wrong_native_result_stops_the_run(bench):
  shape = bench.parse_shape(bench.QUICK_SHAPES[0])
  found, _ = bench.variants(shape)
  native = [name for name in found if name.startswith("native")]
  if not native:
    pytest.skip("the native library is not built")
  variant = found[native[0]]
  result = np.array(variant.run())
  result.flat[7] ^= 1
  with pytest.raises(RuntimeError, match=f"{native[0]}: result differs"):
    bench.bench_gemm.check(native[0], result, variant)


def test_shapes_parse_and_bad_ones_are_refused(bench):
  shape = bench.parse_shape("32x28x28x256:3:2")
  assert shape.out_hw() == (14, 14) and shape.padding == ((1, 1), (1, 1))
  assert shape.ops() == 2 * 32 * 14 * 14 * 256 * 9
  grouped = bench.parse_shape("8x56x56x128:3:1:32")
  assert grouped.groups == 32 and grouped.ops() == 2 * 8 * 56 * 56 * 128 * 4 * 9
  assert "32 groups" in grouped.label() and "depthwise" in shape.label()
  for bad in ("32x28x28:3:1", "32x28x28x256:3", "32x28x28x1:3:1", "1x2x2x8:3:1", "axbxcxd:1:1",
              "8x5x5x12:3:1:5", "8x5x5x12:3:1:1", "8x5x5x12:3:1:4:2"):
    with pytest.raises(argparse.ArgumentTypeError, match="BxHxWxC:k:s|every size"):
      bench.parse_shape(bad)
